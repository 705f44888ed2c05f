//! Command-line arguments of `colocate gpu` and the function that runs it.
//!
//! Every subcommand first opens NVML, so without a driver or GPU each one fails with
//! the same plain message ([`crate::NO_GPU`] and the reason) and a non-zero exit.
use anyhow::{Context, Result};
use clap::{Args, Subcommand};
use std::io::{IsTerminal, Write};
use std::path::PathBuf;
use std::time::{Duration, Instant};

use crate::mps::{as_shell_exports, ClientLimits, LogParser, MpsDaemon, MpsEvent};
use crate::telemetry::{Sample, SampleWriter, Sampler};

/// Arguments of `colocate gpu`.
#[derive(Debug, clap::Args)]
pub struct GpuArgs {
    #[command(subcommand)]
    command: GpuCommand,
}

#[derive(Debug, Subcommand)]
enum GpuCommand {
    /// Each GPU: name, UUID, memory, SMs, driver/CUDA, compute mode, MIG, GPM, MPS.
    Info {
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Live GPU counters (NVML GPM: SM active, occupancy, tensor, DRAM; power, clocks,
    /// memory, processes). A live view by default; CSV or JSONL with --out.
    Monitor(MonitorArgs),
    /// The MPS control daemon with private folders under --dir.
    Mps {
        #[command(subcommand)]
        command: MpsCommand,
    },
    /// MIG instances. Creating or destroying MIG instances is out of scope: colocate
    /// never changes a GPU's MIG layout.
    Mig {
        #[command(subcommand)]
        command: MigCommand,
    },
}

#[derive(Debug, Args)]
struct MonitorArgs {
    /// Sampling interval (e.g. 500ms, 1s).
    #[arg(long, default_value = "500ms", value_parser = humantime::parse_duration)]
    interval: Duration,
    /// Write samples to this .csv or .jsonl file instead of the live view.
    #[arg(long)]
    out: Option<PathBuf>,
    /// Stop after this long (default: until Ctrl-C).
    #[arg(long, value_parser = humantime::parse_duration)]
    duration: Option<Duration>,
    /// GPU indices to sample, comma-separated (default: all).
    #[arg(long, value_delimiter = ',')]
    gpus: Option<Vec<u32>>,
}

#[derive(Debug, Subcommand)]
enum MpsCommand {
    /// Start a control daemon (pipe/ and log/ under --dir) and print the client
    /// environment. The daemon keeps running after this command: end it with `mps stop`.
    Start {
        #[arg(long, default_value = "runs/mps")]
        dir: PathBuf,
        /// CUDA_MPS_ACTIVE_THREAD_PERCENTAGE for the printed client environment (1-100).
        #[arg(long)]
        active_thread_percentage: Option<u32>,
        /// CUDA_MPS_PINNED_DEVICE_MEM_LIMIT entries for the printed environment,
        /// DEVICE=SIZE (index or UUID; SIZE like 20GiB, 512MiB or bytes), repeatable.
        #[arg(long = "pinned-mem")]
        pinned_mem: Vec<String>,
        /// Also set the daemon's default active thread percentage (1-100).
        #[arg(long)]
        default_active_thread_percentage: Option<u32>,
    },
    /// Servers, clients, default thread percentage, and fault events in the logs.
    Status {
        #[arg(long, default_value = "runs/mps")]
        dir: PathBuf,
        #[arg(long)]
        json: bool,
    },
    /// Wait for clients to exit (up to --drain), then quit the daemon; no process is left.
    Stop {
        #[arg(long, default_value = "runs/mps")]
        dir: PathBuf,
        #[arg(long, default_value = "10s", value_parser = humantime::parse_duration)]
        drain: Duration,
    },
}

#[derive(Debug, Subcommand)]
enum MigCommand {
    /// List MIG instances (UUID, profile, SMs, memory) per GPU.
    List {
        #[arg(long)]
        json: bool,
    },
}

/// Runs `colocate gpu`.
pub fn run(args: GpuArgs) -> Result<()> {
    // One check up front so every subcommand fails the same way without a GPU.
    drop(crate::nvml::open()?);
    match args.command {
        GpuCommand::Info { json } => info(json),
        GpuCommand::Monitor(a) => monitor(a),
        GpuCommand::Mps { command } => match command {
            MpsCommand::Start {
                dir,
                active_thread_percentage,
                pinned_mem,
                default_active_thread_percentage,
            } => mps_start(
                dir,
                active_thread_percentage,
                &pinned_mem,
                default_active_thread_percentage,
            ),
            MpsCommand::Status { dir, json } => mps_status(dir, json),
            MpsCommand::Stop { dir, drain } => {
                MpsDaemon::attach(&dir)?.stop(drain)?;
                println!("MPS daemon of {} stopped", dir.display());
                Ok(())
            }
        },
        GpuCommand::Mig {
            command: MigCommand::List { json },
        } => mig_list(json),
    }
}

fn gib(bytes: u64) -> String {
    format!("{:.1} GiB", bytes as f64 / (1u64 << 30) as f64)
}

fn info(json: bool) -> Result<()> {
    let gpus = crate::info()?;
    if json {
        println!("{}", serde_json::to_string_pretty(&gpus)?);
        return Ok(());
    }
    for g in &gpus {
        println!("GPU {}: {} ({})", g.index, g.name, g.uuid);
        println!(
            "  memory        {} used of {}",
            gib(g.memory_used_bytes),
            gib(g.memory_total_bytes)
        );
        println!(
            "  SMs           {}",
            g.sm_count
                .map(|n| n.to_string())
                .unwrap_or_else(|| "unknown".into())
        );
        println!("  driver / CUDA {} / {}", g.driver_version, g.cuda_version);
        println!("  compute mode  {}", g.compute_mode);
        println!(
            "  GPM counters  {}",
            if g.gpm_supported {
                "supported"
            } else {
                "not supported (monitor falls back to utilization rates)"
            }
        );
        println!(
            "  MPS daemon    {}",
            if g.mps_running {
                "running"
            } else {
                "not running"
            }
        );
        println!(
            "  MIG           {}",
            if g.mig_enabled { "enabled" } else { "disabled" }
        );
        for m in &g.mig_instances {
            println!(
                "    {} {} {} SMs {}",
                m.uuid,
                m.profile,
                m.sm_count,
                gib(m.memory_bytes)
            );
        }
        if let Some(spec) = crate::catalogue::lookup(&g.name) {
            println!(
                "  datasheet     {}: {:.2} TB/s, {:.0} bf16 TFLOP/s dense",
                spec.name,
                spec.mem_bandwidth_bytes_per_s / 1e12,
                spec.bf16_dense_tflops
            );
        }
    }
    Ok(())
}

fn fmt_pct(v: Option<f64>) -> String {
    v.map(|v| format!("{v:5.1}%"))
        .unwrap_or_else(|| "    - ".into())
}

fn live_block(samples: &[Sample]) -> String {
    let mut s = String::from(
        "GPU  src   SM-act  SM-occ  tensor    DRAM   power  temp  SM MHz  mem MHz  mem used\n",
    );
    for x in samples {
        s += &format!(
            "{:<4} {:<5} {} {} {} {} {:>6} {:>5} {:>7} {:>8} {:>9}\n",
            x.gpu,
            if x.source.as_str() == "gpm" {
                "gpm"
            } else {
                "util"
            },
            fmt_pct(x.sm_active),
            fmt_pct(x.sm_occupancy),
            fmt_pct(x.tensor_active),
            fmt_pct(x.dram_bw),
            x.power_w.map(|w| format!("{w:.0}W")).unwrap_or_default(),
            x.temp_c.map(|c| format!("{c:.0}C")).unwrap_or_default(),
            x.sm_clock_mhz.map(|c| c.to_string()).unwrap_or_default(),
            x.mem_clock_mhz.map(|c| c.to_string()).unwrap_or_default(),
            x.mem_used_bytes.map(gib).unwrap_or_default(),
        );
        for p in &x.processes {
            s += &format!(
                "     pid {:<8} {:<20} {:>10} SM {}\n",
                p.pid,
                p.name,
                gib(p.mem_bytes),
                p.sm_util
                    .map(|u| format!("{u:.0}%"))
                    .unwrap_or_else(|| "-".into())
            );
        }
    }
    s
}

fn monitor(a: MonitorArgs) -> Result<()> {
    let mut writer = a.out.as_deref().map(SampleWriter::create).transpose()?;
    let sampler = Sampler::start(a.interval, a.gpus)?;
    for n in sampler.notes() {
        eprintln!("note: {n}");
    }
    let tty = std::io::stdout().is_terminal();
    let started = Instant::now();
    let mut seen = 0usize;
    let mut notes_seen = sampler.notes().len();
    loop {
        std::thread::sleep(a.interval.min(Duration::from_millis(200)));
        let new = sampler.samples_since(seen);
        seen += new.len();
        if !new.is_empty() {
            if let Some(w) = writer.as_mut() {
                w.write(&new)?;
            } else {
                let n = sampler.gpus().len().max(1);
                let last = &new[new.len().saturating_sub(n)..];
                let mut out = std::io::stdout().lock();
                if tty {
                    write!(out, "\x1b[2J\x1b[H")?;
                }
                writeln!(out, "{}", live_block(last))?;
            }
        }
        let notes = sampler.notes();
        for n in &notes[notes_seen..] {
            eprintln!("note: {n}");
        }
        notes_seen = notes.len();
        if a.duration.is_some_and(|d| started.elapsed() >= d) {
            break;
        }
    }
    let t = sampler.stop();
    if let Some(w) = writer.as_mut() {
        w.write(&t.samples[seen.min(t.samples.len())..])?;
    }
    eprintln!(
        "sampled {} GPU(s) {} times; sampler CPU {:.3} s over {:.1} s ({:.2}% of one core)",
        t.gpus.len(),
        t.samples.len() / t.gpus.len().max(1),
        t.sampler_cpu_seconds,
        t.sampler_wall_seconds,
        100.0 * t.sampler_cpu_seconds / t.sampler_wall_seconds.max(1e-9)
    );
    if let Some(p) = &a.out {
        eprintln!("samples written to {}", p.display());
    }
    Ok(())
}

/// A size of `--pinned-mem`: the one grammar of [`units::bytes`] (`20GiB`, `8192M` = MiB).
fn parse_size(s: &str) -> Result<u64> {
    units::bytes::parse(s).map_err(|e| anyhow::anyhow!(e))
}

fn mps_start(
    dir: PathBuf,
    atp: Option<u32>,
    pinned: &[String],
    default_atp: Option<u32>,
) -> Result<()> {
    let mut limits = ClientLimits {
        active_thread_percentage: atp,
        pinned_device_mem_limit: Vec::new(),
    };
    for p in pinned {
        let (dev, size) = p
            .split_once('=')
            .with_context(|| format!("--pinned-mem '{p}': expected DEVICE=SIZE"))?;
        limits
            .pinned_device_mem_limit
            .push((dev.trim().to_string(), parse_size(size)?));
    }
    limits.validate()?;
    let daemon = MpsDaemon::start(&dir)?;
    if let Some(pct) = default_atp {
        daemon.set_default_active_thread_percentage(pct)?;
    }
    eprintln!(
        "MPS control daemon running (pid {}); logs in {}; stop it with `colocate gpu mps stop --dir {}`",
        daemon.control_pid().map(|p| p.to_string()).unwrap_or_else(|| "?".into()),
        daemon.log_dir().display(),
        dir.display()
    );
    println!("{}", as_shell_exports(&daemon.client_env(&limits)));
    daemon.detach();
    Ok(())
}

fn mps_status(dir: PathBuf, json: bool) -> Result<()> {
    let daemon = MpsDaemon::attach(&dir)?;
    let status = daemon.status()?;
    let mut events = Vec::new();
    for f in ["control.log", "server.log"] {
        if let Ok(text) = std::fs::read_to_string(daemon.log_dir().join(f)) {
            events.extend(LogParser::new().feed_text(&text));
        }
    }
    let problems: Vec<&MpsEvent> = events
        .iter()
        .filter(|e| {
            matches!(
                e,
                MpsEvent::ClientFault { .. } | MpsEvent::ServerFailed { .. }
            )
        })
        .collect();
    if json {
        let v = serde_json::json!({ "status": status, "faults": problems });
        println!("{}", serde_json::to_string_pretty(&v)?);
        return Ok(());
    }
    println!(
        "MPS daemon pid {} serving {}",
        status
            .control_pid
            .map(|p| p.to_string())
            .unwrap_or_else(|| "?".into()),
        status.pipe_dir.display()
    );
    println!(
        "default active thread percentage: {}",
        status.default_active_thread_percentage
    );
    if status.servers.is_empty() {
        println!("no server running (one starts with the first client)");
    }
    for s in &status.servers {
        println!("server {}: clients {:?}", s.pid, s.clients);
    }
    if problems.is_empty() {
        println!("no faults in the logs");
    }
    for p in problems {
        println!("fault: {}", serde_json::to_string(p)?);
    }
    Ok(())
}

fn mig_list(json: bool) -> Result<()> {
    let list = crate::mig::list()?;
    if json {
        let v: Vec<_> = list
            .iter()
            .map(|(g, m)| serde_json::json!({ "gpu": g, "instance": m }))
            .collect();
        println!("{}", serde_json::to_string_pretty(&v)?);
        return Ok(());
    }
    if list.is_empty() {
        println!(
            "no MIG instances (MIG is disabled or has no instances); colocate never creates them"
        );
    }
    for (g, m) in list {
        println!(
            "GPU {g}: {} {} {} SMs {}  (CUDA_VISIBLE_DEVICES={})",
            m.uuid,
            m.profile,
            m.sm_count,
            gib(m.memory_bytes),
            m.uuid
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_parse_with_units() {
        assert_eq!(parse_size("20GiB").unwrap(), 20 << 30);
        assert_eq!(parse_size("512MiB").unwrap(), 512 << 20);
        assert_eq!(parse_size("1.5G").unwrap(), 3 << 29);
        assert_eq!(parse_size("4096").unwrap(), 4096);
        assert!(parse_size("lots").is_err());
        assert!(parse_size("3parsecs")
            .unwrap_err()
            .to_string()
            .contains("unknown unit"));
        assert_eq!(
            parse_size("8GB").unwrap(),
            8_000_000_000,
            "GB is decimal, GiB binary"
        );
    }
}
