//! `colocate plan`, `colocate up` and `colocate status`.

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::bail;

use crate::deployment::{Deployment, UpOptions};
use crate::gpu_glue;
use crate::spec;
use crate::state;
use crate::supervisor::InstanceState;

/// Arguments of `colocate plan`.
#[derive(Debug, clap::Args)]
pub struct PlanArgs {
    /// The deployment file (TOML).
    pub file: PathBuf,
    /// Plan for this GPU model (catalogue name, e.g. "H100 SXM") instead of the local GPU.
    #[arg(long)]
    pub gpu_name: Option<String>,
    /// Print the plan as JSON.
    #[arg(long)]
    pub json: bool,
}

/// Runs `colocate plan`: the memory table and every engine's command line; fails when
/// the deployment does not fit.
pub fn run(args: PlanArgs) -> anyhow::Result<()> {
    let mut spec = spec::read(&args.file)?;
    if let Some(n) = args.gpu_name {
        if gpu_glue::catalogue_memory(&n).is_none() {
            bail!("--gpu-name {n}: not in the GPU catalogue");
        }
        spec.gpu_name = Some(n);
    }
    let deployment =
        spec::validate(spec).map_err(|e| anyhow::anyhow!("{}: {e}", args.file.display()))?;
    let spec = deployment.spec();
    let facts = if spec.gpu.is_cpu() || spec.gpu_name.is_some() {
        None
    } else {
        match gpu_glue::detect(&spec.gpu) {
            Ok(f) => Some(f),
            Err(e) => {
                eprintln!(
                    "note: {e:#}\n      memory fractions cannot be turned into bytes; set gpu_name in {} or pass --gpu-name to plan for a GPU model",
                    args.file.display()
                );
                None
            }
        }
    };
    let plan = crate::plan::plan(&deployment, facts.as_ref())
        .map_err(|e| anyhow::anyhow!("{}: {e}", args.file.display()))?;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&plan)?);
    } else {
        print!("{plan}");
    }
    if !plan.fits {
        bail!(
            "{}: the deployment does not fit (see above)",
            args.file.display()
        );
    }
    Ok(())
}

/// Arguments of `colocate up`.
#[derive(Debug, clap::Args)]
pub struct UpArgs {
    /// The deployment file (TOML).
    pub file: PathBuf,
    /// Run folder (logs, state.json); default: the file's `run_dir`, else `runs/up-<time>`.
    #[arg(long)]
    pub run_dir: Option<PathBuf>,
    /// Do not copy engine output to the console (it is always in the run folder's logs).
    #[arg(long, short)]
    pub quiet: bool,
    /// The `colocate` binary for built-in engines (default: this one; env COLOCATE_BIN).
    #[arg(long)]
    pub engine_bin: Option<PathBuf>,
}

/// Runs `colocate up` until Ctrl-C or SIGTERM, or until every engine has failed.
pub fn run_up(args: UpArgs) -> anyhow::Result<()> {
    let valid = spec::load(&args.file)?;
    let run_dir = args
        .run_dir
        .clone()
        .or_else(|| valid.spec().run_dir.clone())
        .unwrap_or_else(|| {
            PathBuf::from("runs").join(format!("up-{}", chrono::Utc::now().format("%Y%m%d-%H%M%S")))
        });
    // Worker threads live as long as the runtime: the parent-death signal of every engine
    // is tied to the thread that spawned it (see process.rs).
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    rt.block_on(async move {
        let start_cancel = tokio_util::sync::CancellationToken::new();
        let opts = UpOptions {
            run_dir: run_dir.clone(),
            engine_bin: args.engine_bin,
            quiet: args.quiet,
            start_cancel: start_cancel.clone(),
        };
        let up = Deployment::up(&valid, opts);
        let signals = shutdown_signal();
        tokio::pin!(up);
        tokio::pin!(signals);
        let deployment = tokio::select! {
            d = &mut up => d?,
            _ = &mut signals => {
                // Let `up` stop what it started (engines, the MPS daemon) before leaving.
                start_cancel.cancel();
                let _ = up.await;
                bail!("interrupted while starting (engines started so far were stopped)")
            }
        };
        link_current(deployment.run_dir());
        eprintln!(
            "\ndeployment `{}` is up (run folder {}):",
            valid.spec().name,
            deployment.run_dir().display()
        );
        for e in deployment.endpoints() {
            eprintln!("  {:<16} {:<28} {}", e.engine, e.model, e.url);
        }
        if let Some(g) = deployment.gateway_url() {
            eprintln!("  gateway          {g}  (OpenAI API; routes by `model`)");
        }
        eprintln!("Ctrl-C stops it; `colocate status` shows it.");
        let outcome = tokio::select! {
            _ = &mut signals => Ok(()),
            why = deployment.failed() => Err(anyhow::anyhow!("{why}")),
        };
        eprintln!("stopping: gateway drains, engines stop in reverse order");
        let stopped = deployment.shutdown().await;
        outcome.and(stopped)
    })
}

/// Ctrl-C or SIGTERM.
async fn shutdown_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = match signal(SignalKind::terminate()) {
        Ok(s) => s,
        Err(_) => {
            let _ = tokio::signal::ctrl_c().await;
            return;
        }
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
}

/// Points `runs/current` at this run so `colocate status` finds it (only for run folders
/// inside a `runs/` folder: a `--run-dir /tmp/x` must not create `/tmp/current`).
fn link_current(run_dir: &Path) {
    let Some(parent) = run_dir.parent() else {
        return;
    };
    if parent.file_name().is_none_or(|n| n != "runs") {
        return;
    }
    let link = parent.join("current");
    if let Ok(meta) = std::fs::symlink_metadata(&link) {
        if !meta.file_type().is_symlink() {
            return; // someone's real folder: leave it
        }
        let _ = std::fs::remove_file(&link);
    }
    if let Some(name) = run_dir.file_name() {
        let _ = std::os::unix::fs::symlink(name, &link);
    }
}

/// Arguments of `colocate status`.
#[derive(Debug, clap::Args)]
pub struct StatusArgs {
    /// The run folder of `colocate up` (default: runs/current).
    pub run_dir: Option<PathBuf>,
    /// Print the state as JSON.
    #[arg(long)]
    pub json: bool,
}

/// Runs `colocate status`: engines, pids, health (probed now), restarts, gateway.
pub fn run_status(args: StatusArgs) -> anyhow::Result<()> {
    let dir = args
        .run_dir
        .unwrap_or_else(|| PathBuf::from("runs/current"));
    let st = state::read(&dir)?;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&st)?);
        return Ok(());
    }
    let up_alive = crate::process::alive(st.up_pid);
    let phase = if up_alive || st.phase == "stopped" || st.phase == "failed" {
        st.phase.clone()
    } else {
        format!(
            "{} (but `up` pid {} is gone: it was killed)",
            st.phase, st.up_pid
        )
    };
    println!("deployment `{}`: {phase}", st.name);
    println!(
        "run folder: {}   gpu: {}   sharing: {}",
        st.run_dir.display(),
        st.gpu,
        st.sharing
    );
    if let Some(g) = &st.gateway_url {
        println!("gateway: {g}");
    }
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let health: Vec<&str> = rt.block_on(async {
        let client = reqwest::Client::builder()
            .no_proxy()
            .timeout(Duration::from_secs(1))
            .build()?;
        let mut out = Vec::new();
        for i in &st.instances {
            let live = i.pid.is_some_and(crate::process::alive) && up_alive;
            let h = if !live {
                "-"
            } else {
                match client.get(format!("{}/health", i.url)).send().await {
                    Ok(r) if r.status().is_success() => "ok",
                    Ok(_) => "not ready",
                    Err(_) => "no answer",
                }
            };
            out.push(h);
        }
        anyhow::Ok(out)
    })?;
    println!();
    println!(
        "{:<16} {:<24} {:<24} {:>8} {:<11} {:<10} {:>8} {:>8}  last exit",
        "engine", "model", "url", "pid", "state", "health", "restarts", "failures"
    );
    for (i, h) in st.instances.iter().zip(health) {
        let state = match i.state {
            InstanceState::Starting => "starting",
            InstanceState::Healthy => "running",
            InstanceState::Faulted => "FAULTED",
            InstanceState::Restarting => "restarting",
            InstanceState::Failed => "FAILED",
            InstanceState::Stopped => "stopped",
        };
        println!(
            "{:<16} {:<24} {:<24} {:>8} {:<11} {:<10} {:>8} {:>8}  {}",
            i.name,
            i.model,
            i.url,
            i.pid.map(|p| p.to_string()).unwrap_or_else(|| "-".into()),
            state,
            h,
            i.restarts,
            i.failures,
            i.last_exit.as_deref().unwrap_or("-")
        );
    }
    let control = control_lines(&st);
    if !control.is_empty() {
        println!();
        for l in control {
            println!("{l}");
        }
    }
    let faults = mps_fault_lines(&st);
    if !faults.is_empty() {
        println!();
        for l in faults {
            println!("{l}");
        }
    }
    let recent: Vec<_> = st.events.iter().rev().take(8).collect();
    if !recent.is_empty() {
        println!("\nrecent events:");
        for e in recent.into_iter().rev() {
            println!("  {} {:<16} {:?}: {}", e.at, e.instance, e.kind, e.message);
        }
    }
    Ok(())
}

/// `status`'s SLO control section: the best-effort limit and its decisions, then each
/// tenant's priority, measured p99s against its objectives and its queue. Nothing for a
/// deployment without priorities.
pub fn control_lines(st: &state::StateFile) -> Vec<String> {
    let Some(c) = &st.gateway_control else {
        return Vec::new();
    };
    let ms = |s: f64| format!("{:.0}ms", s * 1000.0);
    let mut out = vec![format!(
        "SLO control: best-effort limit {} (min {}, max {}), {} in flight; pressure {}; decisions: {} increase, {} decrease, {} hold",
        c.limit,
        c.min,
        c.max,
        c.in_flight,
        c.pressure.map_or("-".to_string(), |p| format!("{p:.2}")),
        c.decisions_increase,
        c.decisions_decrease,
        c.decisions_hold
    )];
    if let Some(t) = c.engine_share_tokens {
        out.push(format!(
            "engine share: best-effort built-in engines hold at most {t} embedding tokens in flight"
        ));
    }
    if let Some(d) = c.engine_duty_percent {
        out.push(format!(
            "engine pacing: best-effort built-in engines compute at most {d}% of the time"
        ));
    }
    if let Some(p) = c.engine_sm_percent {
        out.push(format!(
            "engine SMs: best-effort built-in engines run on their smallest SM partition with at least {p}% of the GPU's SMs"
        ));
    }
    if c.engine_lever_errors > 0 {
        out.push(format!(
            "engine levers: {} settings refused or not answered by best-effort engines (the gateway's log says why)",
            c.engine_lever_errors
        ));
    }
    out.push(format!(
        "{:<16} {:<12} {:<44} {:>9} {:>7} {:>9} {:>9} {:>9}",
        "tenant",
        "priority",
        format!("p99 over {:.0}s (slo)", c.window_seconds),
        "in flight",
        "queued",
        "admitted",
        "429 full",
        "429 wait"
    ));
    for t in &c.tenants {
        let latency: Vec<String> = t
            .latency
            .iter()
            .map(|m| {
                let slo = m
                    .slo_seconds
                    .map(|s| format!(" ({})", ms(s)))
                    .unwrap_or_default();
                format!("{} {}{slo}", m.metric.name(), ms(m.p99_seconds))
            })
            .collect();
        let latency = if latency.is_empty() {
            "-".to_string()
        } else {
            latency.join(", ")
        };
        let q = |f: fn(&crate::gateway::QueueStats) -> String| {
            t.queue.as_ref().map_or("-".to_string(), f)
        };
        out.push(format!(
            "{:<16} {:<12} {:<44} {:>9} {:>7} {:>9} {:>9} {:>9}",
            t.name,
            t.priority.name(),
            latency,
            q(|q| q.in_flight.to_string()),
            q(|q| q.queued.to_string()),
            q(|q| q.admitted.to_string()),
            q(|q| q.rejected_queue_full.to_string()),
            q(|q| q.rejected_timeout.to_string()),
        ));
    }
    out
}

/// How many of the most recent MPS faults `status` details.
const FAULTS_SHOWN: usize = 3;

/// `status`'s MPS section: how many faults, and the last ones with their time, engines,
/// text and what the supervisor did. Nothing for a deployment without MPS and no fault.
pub fn mps_fault_lines(st: &state::StateFile) -> Vec<String> {
    let total = st.mps_faults_total.max(st.mps_faults.len() as u64);
    if total == 0 {
        return if st.sharing == "mps" {
            vec!["MPS faults: none".to_string()]
        } else {
            Vec::new()
        };
    }
    let mut out = Vec::new();
    let last = st.mps_faults.last();
    out.push(format!(
        "MPS faults: {total}{}",
        last.map(|f| format!(", last at {} (daemon log {})", f.at, f.log_time))
            .unwrap_or_default()
    ));
    for f in st.mps_faults.iter().rev().take(FAULTS_SHOWN).rev() {
        let engines = f.engines();
        let who = if engines.is_empty() {
            "no engine of this deployment".to_string()
        } else {
            engines.join(", ")
        };
        out.push(format!("  #{} {} {who}: {}", f.id, f.at, f.message));
        if !f.clients.is_empty() {
            out.push(format!("      clients: {}", f.clients_text()));
        }
        out.push(format!(
            "      action: {}",
            f.action.as_deref().unwrap_or("deciding")
        ));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn status_says_none_under_mps_and_nothing_otherwise() {
        let mut st = state::sample(state::SCHEMA);
        assert_eq!(mps_fault_lines(&st), vec!["MPS faults: none"]);
        st.sharing = "timeslice".into();
        assert!(mps_fault_lines(&st).is_empty());
        assert!(control_lines(&st).is_empty());
    }

    #[test]
    fn status_shows_the_engine_levers_and_their_refusals() {
        let snap = crate::gateway::ControlSnapshot {
            limit: 4,
            min: 1,
            max: 32,
            in_flight: 3,
            pressure: Some(1.2),
            decisions_increase: 0,
            decisions_decrease: 3,
            decisions_hold: 9,
            window_seconds: 5.0,
            tenants: Vec::new(),
            engine_share_tokens: Some(8192),
            engine_duty_percent: Some(35),
            engine_sm_percent: Some(20),
            engine_lever_errors: 2,
        };
        let mut st = state::StateFile {
            gateway_control: Some(snap.clone()),
            ..state::sample(state::SCHEMA)
        };
        let lines = control_lines(&st).join("\n");
        for want in [
            "at most 8192 embedding tokens in flight",
            "at most 35% of the time",
            "smallest SM partition with at least 20% of the GPU's SMs",
            "engine levers: 2 settings refused or not answered",
        ] {
            assert!(lines.contains(want), "{want} not in\n{lines}");
        }
        // lifted levers and no refusal: no lines for them
        st.gateway_control = Some(crate::gateway::ControlSnapshot {
            engine_share_tokens: None,
            engine_duty_percent: None,
            engine_sm_percent: None,
            engine_lever_errors: 0,
            ..snap
        });
        let lines = control_lines(&st).join("\n");
        assert!(!lines.contains("engine "), "{lines}");
        // a state file written before the SM lever still reads
        let mut v = serde_json::to_value(&st).unwrap();
        let c = v["gateway_control"].as_object_mut().unwrap();
        c.remove("engine_sm_percent");
        c.remove("engine_lever_errors");
        let back: state::StateFile = serde_json::from_value(v).unwrap();
        assert_eq!(back.gateway_control, st.gateway_control);
    }
}
