//! Command-line arguments of `colocate bench` and the function that runs it: builds the
//! spec from flags or a TOML file, shows a live progress line per workload (indicatif, on
//! stderr, hidden when stderr is not a terminal), turns Ctrl-C into an interrupted run, and
//! writes the results.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context;
use indicatif::{MultiProgress, ProgressBar, ProgressDrawTarget, ProgressStyle};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use crate::runner::{Phase, Progress};
use crate::spec::{parse_workload_entry, BenchSpec, Preset, Slo};

/// The seed studies measured 60 s (after a 30 s warm-up, bench's default warm-up).
const SEED_MEASUREMENT: Duration = Duration::from_secs(60);

/// Arguments of `colocate bench`.
#[derive(Debug, clap::Args)]
#[command(
    after_help = "Workload form: KIND:key=value,...  KIND = gen (chat), completions or embed.
Keys: url, model, name, concurrency=N (closed loop) | rate=R [burstiness=B] [max_concurrency=N] (open loop),
input=N or MIN-MAX (tokens), output=N or MIN-MAX (gen; fixed uses ignore_eos), batch=N (embed), file=PATH.
A load step: step_at=T (after the window opens) with step_concurrency=N | step_rate=R [step_burstiness=B]
[step_max_concurrency=N]: from then on that load replaces the first (e.g. rate=5,step_at=30s,step_concurrency=64).
Example: --workload gen:url=http://127.0.0.1:8100,model=qwen,concurrency=64,input=128,output=128
The seed studies' clients: seed-gen (one fixed ~30-token prompt, 512 tokens with ignore_eos, not
streamed, concurrency 512) and seed-embed (batches of 8 numbered ~25-token sentences, concurrency 64);
with presets the window defaults to the seeds' 30 s warm-up and 60 s measured.
Example: --workload seed-gen:url=http://127.0.0.1:8100,model=gen,concurrency=1024
         --workload seed-embed:url=http://127.0.0.1:8200,model=embed,batch=32,concurrency=128"
)]
pub struct BenchArgs {
    /// A workload (repeatable), e.g. gen:url=http://127.0.0.1:8100,model=qwen,concurrency=512,input=128,output=512
    #[arg(long = "workload", short = 'w')]
    pub workloads: Vec<String>,
    /// A TOML file with [[workload]] tables and the run settings; flags override it.
    #[arg(long)]
    pub config: Option<PathBuf>,
    /// Warm-up before the measurement window (default 30s).
    #[arg(long, value_parser = humantime::parse_duration)]
    pub warmup: Option<Duration>,
    /// Length of the measurement window.
    #[arg(long, value_parser = humantime::parse_duration)]
    pub duration: Option<Duration>,
    /// Close the window after this many completed requests instead (or as well).
    #[arg(long = "requests")]
    pub max_requests: Option<u64>,
    /// Results JSON.
    #[arg(long)]
    pub out: Option<PathBuf>,
    /// Every request as JSON lines.
    #[arg(long)]
    pub requests_out: Option<PathBuf>,
    /// Latency objectives for goodput, e.g. ttft=200ms,tpot=50ms
    #[arg(long)]
    pub slo: Option<String>,
    /// Seed for prompts and arrival times.
    #[arg(long)]
    pub seed: Option<u64>,
    /// Seed for the prompts' texts alone (lengths and arrivals keep --seed's): a second
    /// run against the same server sends texts its prefix cache has not seen.
    #[arg(long)]
    pub prompt_seed: Option<u64>,
    /// Percentiles to report, e.g. 50,90,95,99
    #[arg(long, value_delimiter = ',')]
    pub percentiles: Option<Vec<f64>>,
    /// Print the results JSON on stdout instead of the table.
    #[arg(long)]
    pub json: bool,
}

impl BenchArgs {
    /// The spec these arguments describe.
    pub fn to_spec(&self) -> anyhow::Result<BenchSpec> {
        let mut spec = match &self.config {
            Some(p) => BenchSpec::from_toml_file(p)?,
            None => BenchSpec::new(Vec::new()),
        };
        for w in &self.workloads {
            let (w, preset) = parse_workload_entry(w)?;
            spec.push_workload(w, preset);
        }
        if let Some(d) = self.warmup {
            spec.warmup = d;
        }
        if self.duration.is_some() {
            spec.duration = self.duration;
        }
        if spec.duration.is_none() && spec.max_requests.is_none() && !spec.presets.is_empty() {
            spec.duration = Some(SEED_MEASUREMENT);
        }
        if self.max_requests.is_some() {
            spec.max_requests = self.max_requests;
        }
        if let Some(s) = &self.slo {
            spec.slo = Some(Slo::parse(s)?);
        }
        if let Some(s) = self.seed {
            spec.seed = s;
        }
        if self.prompt_seed.is_some() {
            spec.prompt_seed = self.prompt_seed;
        }
        if let Some(p) = &self.percentiles {
            spec.percentiles = p.clone();
        }
        if self.requests_out.is_some() {
            spec.record_requests = true;
        }
        spec.fill_names();
        spec.validate()?;
        Ok(spec)
    }
}

/// What a reader must know about the presets a run uses: each preset's note once, with
/// the workloads that run as it.
pub fn preset_notes(spec: &BenchSpec) -> Vec<String> {
    let mut by_preset: std::collections::BTreeMap<Preset, Vec<&str>> = Default::default();
    for w in &spec.workloads {
        if let Some(p) = spec.preset_of(w) {
            by_preset.entry(p).or_default().push(&w.name);
        }
    }
    by_preset
        .into_iter()
        .map(|(p, ws)| format!("note ({}): {}", ws.join(", "), p.note()))
        .collect()
}

/// Runs `colocate bench`.
pub fn run(args: BenchArgs) -> anyhow::Result<()> {
    let spec = args.to_spec()?;
    for note in preset_notes(&spec) {
        eprintln!("{note}");
    }
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("cannot start the async runtime")?;
    let results = rt.block_on(async {
        let cancel = CancellationToken::new();
        let c2 = cancel.clone();
        tokio::spawn(async move {
            if tokio::signal::ctrl_c().await.is_ok() {
                eprintln!("\ninterrupted: finishing the window and writing results");
                c2.cancel();
            }
        });
        let (tx, rx) = watch::channel(Progress::default());
        let display = tokio::spawn(show_progress(rx));
        let r = crate::runner::run(&spec, Some(tx), cancel).await;
        let _ = display.await;
        r
    })?;
    if let Some(p) = &args.out {
        results.write_json(p)?;
    }
    if let Some(p) = &args.requests_out {
        results.write_requests_jsonl(p)?;
    }
    if args.json {
        println!("{}", serde_json::to_string_pretty(&results)?);
    } else {
        print!("{}", results.table());
    }
    if let Some(p) = &args.out {
        eprintln!("results written to {}", p.display());
    }
    Ok(())
}

/// One progress line per workload until the run is done.
async fn show_progress(mut rx: watch::Receiver<Progress>) {
    let multi = MultiProgress::with_draw_target(ProgressDrawTarget::stderr_with_hz(4));
    let style = ProgressStyle::with_template("{prefix:>12} {msg}")
        .unwrap_or_else(|_| ProgressStyle::default_spinner());
    let mut bars: Vec<ProgressBar> = Vec::new();
    while rx.changed().await.is_ok() {
        let p = rx.borrow_and_update().clone();
        if bars.len() != p.workloads.len() {
            bars = p
                .workloads
                .iter()
                .map(|w| {
                    let b = multi.add(ProgressBar::new_spinner().with_style(style.clone()));
                    b.set_prefix(w.name.clone());
                    b
                })
                .collect();
        }
        let phase = match p.phase {
            Phase::Preflight => "pre-flight".to_string(),
            Phase::Warmup => format!("warm-up {:.0}/{:.0}s", p.elapsed, p.warmup),
            Phase::Measuring => match p.duration {
                Some(d) => format!("measuring {:.0}/{:.0}s", p.elapsed - p.warmup, d),
                None => format!("measuring {:.0}s", p.elapsed - p.warmup),
            },
            Phase::Draining => match &p.drain {
                Some(d) => format!(
                    "draining: {} whole responses of the window in flight {:.0}/{:.0}s",
                    d.left, d.elapsed, d.timeout
                ),
                None => "draining".into(),
            },
            Phase::Finishing => "finishing".into(),
            Phase::Done => "done".into(),
        };
        for (b, w) in bars.iter().zip(&p.workloads) {
            let unit = if w.kind.is_some_and(|k| k.is_gen()) {
                "tok/s"
            } else {
                "seq/s"
            };
            b.set_message(format!(
                "{phase} | {:>9.1} {unit} | done {} | in flight {} | errors {}",
                w.throughput, w.completed, w.in_flight, w.errors
            ));
        }
        if p.phase == Phase::Done {
            break;
        }
    }
    for b in bars {
        b.finish();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        bench: BenchArgs,
    }

    fn spec(args: &[&str]) -> anyhow::Result<BenchSpec> {
        let mut argv = vec!["bench"];
        argv.extend_from_slice(args);
        Cli::try_parse_from(argv)?.bench.to_spec()
    }

    #[test]
    fn seed_presets_get_the_seeds_window() {
        let s = spec(&[
            "--workload",
            "seed-gen:url=http://127.0.0.1:8100,model=gen,concurrency=512",
            "-w",
            "seed-embed:url=http://127.0.0.1:8200,model=embed,batch=8,concurrency=64",
        ])
        .unwrap();
        assert_eq!(s.warmup, Duration::from_secs(30));
        assert_eq!(s.duration, Some(Duration::from_secs(60)));
        assert_eq!(s.workloads[0].name, "gen0");
        assert_eq!(s.workloads[1].name, "embed1");
        assert_eq!(s.preset_of(&s.workloads[0]), Some(Preset::SeedGen));
        assert_eq!(s.preset_of(&s.workloads[1]), Some(Preset::SeedEmbed));
        let short = spec(&[
            "-w",
            "seed-gen:url=http://h:1,model=m",
            "--duration",
            "10s",
            "--warmup",
            "5s",
        ])
        .unwrap();
        assert_eq!(short.duration, Some(Duration::from_secs(10)));
        assert_eq!(short.warmup, Duration::from_secs(5));
        // Plain workloads still need a window.
        let e = spec(&["-w", "gen:url=http://h:1,model=m,concurrency=1"]).unwrap_err();
        assert!(e.to_string().contains("duration"), "{e}");
    }

    #[test]
    fn each_preset_note_is_said_once() {
        let s = spec(&[
            "-w",
            "seed-gen:url=http://h:1,model=m,concurrency=4",
            "-w",
            "seed-gen:url=http://h:2,model=m,concurrency=8",
            "-w",
            "gen:url=http://h:3,model=m,concurrency=1",
            "-w",
            "seed-embed:url=http://h:4,model=e",
        ])
        .unwrap();
        let notes = preset_notes(&s);
        assert_eq!(notes.len(), 2, "{notes:?}");
        assert!(
            notes[0].starts_with("note (gen0, gen1): seed-gen:"),
            "{notes:?}"
        );
        assert!(notes[0].contains("ignore_eos"), "{notes:?}");
        assert!(
            notes[1].starts_with("note (embed3): seed-embed:"),
            "{notes:?}"
        );
        let plain = spec(&[
            "-w",
            "gen:url=http://h:1,model=m,concurrency=1",
            "--duration",
            "1s",
        ])
        .unwrap();
        assert!(preset_notes(&plain).is_empty());
    }
}
