//! Command-line arguments of `colocate lab` and the function that runs it.
//!
//! ```text
//! colocate lab run examples/quickstart.toml [--dry-run] [--warmup 1s --duration 3s]
//! colocate lab run --resume runs/<run>
//! colocate lab report runs/<run>
//! colocate lab compare runs/<a> runs/<b>
//! ```

use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicBool;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context, Result};

use crate::deployments::{self, Deployments};
use crate::matrix::{describe, plan, Condition};
use crate::report::{compare, render, CommandLines};
use crate::results::{Results, SCHEMA_VERSION};
use crate::runner::{now_rfc3339, run as run_plan, Only, ProgressView};
use crate::spec::Experiment;

/// Arguments of `colocate lab`.
#[derive(Debug, clap::Args)]
pub struct LabArgs {
    #[command(subcommand)]
    command: LabCommand,
}

#[derive(Debug, clap::Subcommand)]
enum LabCommand {
    /// Run an experiment: every condition, then the report.
    Run(RunArgs),
    /// Re-render report.md and the plots of a run from its results.json.
    Report {
        /// The run folder (or its results.json).
        run: PathBuf,
    },
    /// Print a comparison table of two runs.
    Compare {
        /// First run folder.
        a: PathBuf,
        /// Second run folder.
        b: PathBuf,
    },
}

#[derive(Debug, clap::Args)]
struct RunArgs {
    /// The experiment file (TOML).
    #[arg(required_unless_present = "resume")]
    experiment: Option<PathBuf>,
    /// Print the plan with its estimated time (each condition's GPUs and TP sizes in its
    /// label, the GPUs used), check every deployment, and exit.
    #[arg(long)]
    dry_run: bool,
    /// Continue an interrupted run (its folder); finished conditions are kept.
    #[arg(long, value_name = "RUN_DIR", conflicts_with = "experiment")]
    resume: Option<PathBuf>,
    /// With --resume: measure failed conditions again.
    #[arg(long, requires = "resume")]
    retry_failed: bool,
    /// With --resume: measure again every recorded condition whose id contains TEXT
    /// (repeatable; e.g. `--redo "solo "` for baselines taken under an older rule). The old
    /// records stay in results.json's `superseded`.
    #[arg(long, value_name = "TEXT", requires = "resume")]
    redo: Vec<String>,
    /// Measure only the conditions whose id contains TEXT (repeatable): a part of the plan
    /// in this call, the rest with a later `--resume`. The dry run lists that part.
    #[arg(long, value_name = "TEXT")]
    only: Vec<String>,
    /// Override the warm-up of every condition (e.g. `1s`).
    #[arg(long, value_parser = humantime::parse_duration)]
    warmup: Option<Duration>,
    /// Override the measurement window of every condition (e.g. `3s`).
    #[arg(long, value_parser = humantime::parse_duration)]
    duration: Option<Duration>,
    /// Override the number of repetitions. With --resume it can only raise the run's own:
    /// the repetitions it had not planned are measured, the recorded ones kept.
    #[arg(long)]
    repetitions: Option<u32>,
    /// Folder the run folder is created in (default: the experiment's `runs_dir`, else `runs`).
    #[arg(long)]
    runs_dir: Option<PathBuf>,
    /// Exact run folder to create instead of `<runs_dir>/<name>-<time>`.
    #[arg(long, conflicts_with = "runs_dir")]
    out: Option<PathBuf>,
    /// No progress bar.
    #[arg(long)]
    quiet: bool,
}

/// Runs `colocate lab`.
pub fn run(args: LabArgs) -> Result<()> {
    match args.command {
        LabCommand::Run(a) => run_cmd(a),
        LabCommand::Report { run } => {
            let results = Results::load(&run)?;
            let dir = run_dir_of(&run);
            let r = render(&results, &dir, command_lines())?;
            println!("{}", r.headline);
            println!("{}", r.recommendation);
            println!("report: {}", r.report.display());
            Ok(())
        }
        LabCommand::Compare { a, b } => {
            let ra = Results::load(&a)?;
            let rb = Results::load(&b)?;
            println!("{}", compare(&ra, &rb));
            Ok(())
        }
    }
}

fn run_dir_of(p: &Path) -> PathBuf {
    if p.is_dir() {
        p.to_path_buf()
    } else {
        p.parent()
            .map(Path::to_path_buf)
            .unwrap_or_else(|| PathBuf::from("."))
    }
}

fn command_line() -> String {
    std::env::args().collect::<Vec<_>>().join(" ")
}

fn run_cmd(a: RunArgs) -> Result<()> {
    let (mut results, dir, mut valid) = if let Some(dir) = &a.resume {
        if a.warmup.is_some() || a.duration.is_some() {
            bail!("--resume continues a run with its own windows; --warmup and --duration cannot change them");
        }
        let mut r = Results::load(dir)?;
        if let Some(n) = a.repetitions {
            let more = r.raise_repetitions(n)?;
            if more > 0 {
                eprintln!("lab: {more} more repetition(s) of every condition to measure (--repetitions {n})");
            }
        }
        if a.retry_failed {
            r.conditions.retain(|c| c.failed.is_none());
        }
        if !a.redo.is_empty() {
            let n = r.redo(&a.redo)?;
            eprintln!("lab: {n} recorded conditions will be measured again (--redo)");
        }
        // what is left is validated before its first start
        (r, dir.clone(), Deployments::default())
    } else {
        let path = a
            .experiment
            .clone()
            .context("an experiment file is needed")?;
        let mut exp = Experiment::load(&path)?;
        if let Some(w) = a.warmup {
            exp.warmup = w;
        }
        if let Some(d) = a.duration {
            if d.is_zero() {
                bail!("--duration must be longer than zero");
            }
            exp.duration = d;
        }
        if let Some(n) = a.repetitions {
            if n == 0 {
                bail!("--repetitions must be at least 1");
            }
            exp.repetitions = n;
        }
        let only = Only(a.only.clone());
        let planned: Vec<_> = plan(&exp).into_iter().filter(|c| only.selects(c)).collect();
        if planned.is_empty() {
            bail!(
                "--only {:?} selects none of the plan's conditions (see --dry-run without it)",
                a.only
            );
        }
        if a.dry_run {
            print!("{}", describe(&exp, &planned));
            for line in preset_lines(&exp) {
                println!("{line}");
            }
            let gpus = crate::layout::gpus_used(&planned);
            if !gpus.is_empty() {
                let list: Vec<String> = gpus.iter().map(u32::to_string).collect();
                println!(
                    "GPUs used: {} (each condition's layout is in its label: engine, TP size, GPUs)",
                    list.join(", ")
                );
            }
            Deployments::check(&exp, &planned)?;
            deployments::check_models(&exp, &planned)?;
            crate::layout::check_machine(
                &exp,
                &planned,
                &crate::layout::machine_of(&environment()),
            )?;
            return Ok(());
        }
        let valid = Deployments::check(&exp, &planned)?;
        deployments::check_models(&exp, &planned)?;
        crate::layout::check_machine(&exp, &planned, &crate::layout::machine_of(&environment()))?;
        let dir = match &a.out {
            Some(d) => d.clone(),
            None => {
                let base = a
                    .runs_dir
                    .clone()
                    .or_else(|| exp.runs_dir.as_ref().map(PathBuf::from))
                    .unwrap_or_else(|| PathBuf::from("runs"));
                base.join(format!(
                    "{}-{}",
                    exp.name,
                    chrono::Utc::now().format("%Y%m%d-%H%M%S")
                ))
            }
        };
        if dir.join(crate::results::RESULTS_FILE).exists() {
            bail!(
                "{} already holds a run; use --resume {} to continue it",
                dir.display(),
                dir.display()
            );
        }
        std::fs::create_dir_all(&dir)
            .with_context(|| format!("cannot create {}", dir.display()))?;
        let text = std::fs::read_to_string(&path).unwrap_or_default();
        let r = Results {
            schema_version: SCHEMA_VERSION,
            experiment: exp,
            experiment_text: text,
            experiment_path: path.display().to_string(),
            environment: environment(),
            started_at: now_rfc3339(),
            updated_at: now_rfc3339(),
            complete: false,
            command: command_line(),
            conditions: Vec::new(),
            superseded: Vec::new(),
        };
        r.save(&dir)?;
        (r, dir, valid)
    };
    let only = Only(a.only.clone());
    if a.dry_run {
        let planned: Vec<_> = plan(&results.experiment)
            .into_iter()
            .filter(|c| only.selects(c) && results.find(&c.id()).is_none())
            .collect();
        print!("{}", describe(&results.experiment, &planned));
        for line in preset_lines(&results.experiment) {
            println!("{line}");
        }
        return Ok(());
    }
    let planned = plan(&results.experiment);
    let total = planned.len();
    let done = results.conditions.len();
    // a resumed run checks the models of what is left to measure
    let left: Vec<_> = planned
        .iter()
        .filter(|c| results.find(&c.id()).is_none() && only.selects(c))
        .cloned()
        .collect();
    if left.is_empty() && !only.0.is_empty() {
        bail!(
            "--only {:?} selects no condition left to measure in {}",
            a.only,
            dir.display()
        );
    }
    deployments::check_models(&results.experiment, &left)?;
    // a resumed run may be on another machine: its GPUs are those of this one
    crate::layout::check_machine(
        &results.experiment,
        &left,
        &crate::layout::machine_of(&environment()),
    )?;
    eprintln!(
        "lab: {} — {total} conditions ({done} already done), results in {}",
        results.experiment.name,
        dir.display()
    );
    for line in preset_lines(&results.experiment) {
        eprintln!("{line}");
    }
    let cancel = Arc::new(AtomicBool::new(false));
    let mut harness = harness(&results.experiment, cancel.clone())?;
    let view = ProgressView::new(total, done, a.quiet);
    run_plan(
        &mut results,
        &dir,
        harness.as_mut(),
        &mut valid,
        &cancel,
        &view,
        &only,
    )?;
    drop(harness);
    let r = render(&results, &dir, command_lines())?;
    println!("{}", r.headline);
    println!("{}", r.recommendation);
    if !results.complete {
        println!(
            "run incomplete ({}/{total} conditions); continue with: colocate lab run --resume {}",
            results.conditions.len(),
            dir.display()
        );
    }
    println!("report: {}", r.report.display());
    outcome(&results, &planned)
}

/// One line per workload that runs as a bench preset, with what a reader must know about
/// its figures (said once, at the start of a run and in its plan).
fn preset_lines(exp: &Experiment) -> Vec<String> {
    exp.workloads
        .iter()
        .filter_map(|w| {
            let p = w.preset?;
            Some(format!("workload {} runs preset {p}: {}", w.name, p.note()))
        })
        .collect()
}

/// The end of a run: every failed condition with its reason (on stderr), and an error when
/// the run is complete but measured nothing it was for: no co-located condition (or, in an
/// experiment without any, no condition at all).
fn outcome(results: &Results, planned: &[Condition]) -> Result<()> {
    let failed: Vec<_> = results
        .conditions
        .iter()
        .filter_map(|c| c.failed.as_ref().map(|why| (c, why)))
        .collect();
    if !failed.is_empty() {
        eprintln!(
            "{} of {} conditions failed:",
            failed.len(),
            results.conditions.len()
        );
        for (c, why) in &failed {
            eprintln!("  {}: {}", c.condition.id(), why.replace('\n', "\n    "));
        }
    }
    if !results.complete {
        return Ok(());
    }
    let any_co = planned.iter().any(|c| !c.is_solo());
    let measured = results
        .conditions
        .iter()
        .filter(|c| c.failed.is_none())
        .filter(|c| !any_co || !c.condition.is_solo())
        .count();
    if measured == 0 {
        bail!(
            "no {}condition could be measured ({} of {} failed; reasons above)",
            if any_co { "co-located " } else { "" },
            failed.len(),
            results.conditions.len()
        );
    }
    Ok(())
}

#[cfg(feature = "measure")]
fn environment() -> crate::results::Environment {
    crate::measure::environment()
}

#[cfg(not(feature = "measure"))]
fn environment() -> crate::results::Environment {
    let mut e = crate::results::host_environment();
    e.gpu_unavailable = Some("built without the measure feature".into());
    e
}

#[cfg(feature = "measure")]
fn harness(exp: &Experiment, cancel: Arc<AtomicBool>) -> Result<Box<dyn crate::runner::Harness>> {
    Ok(Box::new(crate::measure::RealHarness::new(exp, cancel)?))
}

#[cfg(not(feature = "measure"))]
fn harness(_exp: &Experiment, _cancel: Arc<AtomicBool>) -> Result<Box<dyn crate::runner::Harness>> {
    bail!("this colocate was built without the lab's measure feature: it cannot run experiments")
}

fn command_lines() -> CommandLines<'static> {
    Some(&deployments::command_lines)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::results::{host_environment, ConditionResult};

    const EXP: &str = r#"
name = "t"
warmup = "0s"
duration = "1s"
[deployment]
[[deployment.engines]]
name = "gen"
port = 1
[[deployment.engines]]
name = "emb"
port = 2
[[workloads]]
name = "chat"
engine = "gen"
kind = "generate"
concurrency = 1
[[workloads]]
name = "vec"
engine = "emb"
kind = "embed"
concurrency = 1
"#;

    /// A complete run of `EXP` where the conditions for which `fails` is true failed.
    fn results(fails: impl Fn(&Condition) -> bool) -> (Results, Vec<Condition>) {
        let exp = Experiment::parse(EXP).unwrap();
        let planned = plan(&exp);
        let conditions = planned
            .iter()
            .map(|c| {
                if fails(c) {
                    ConditionResult::failed(c.clone(), "not a folder\nsecond line".into())
                } else {
                    ConditionResult {
                        failed: None,
                        ..ConditionResult::failed(c.clone(), String::new())
                    }
                }
            })
            .collect();
        let r = Results {
            schema_version: SCHEMA_VERSION,
            experiment: exp,
            experiment_text: EXP.into(),
            experiment_path: "t.toml".into(),
            environment: host_environment(),
            started_at: now_rfc3339(),
            updated_at: now_rfc3339(),
            complete: true,
            command: "test".into(),
            conditions,
            superseded: Vec::new(),
        };
        (r, planned)
    }

    #[test]
    fn preset_workloads_are_announced() {
        let exp = Experiment::parse(&EXP.replace(
            "kind = \"generate\"\nconcurrency = 1",
            "preset = \"seed-gen\"\nconcurrency = 1",
        ))
        .unwrap();
        let lines = preset_lines(&exp);
        assert_eq!(lines.len(), 1, "{lines:?}");
        assert!(
            lines[0].starts_with("workload chat runs preset seed-gen: "),
            "{lines:?}"
        );
        assert!(lines[0].contains("not streamed"), "{lines:?}");
        assert!(preset_lines(&Experiment::parse(EXP).unwrap()).is_empty());
    }

    #[test]
    fn a_run_without_a_measured_co_located_condition_fails() {
        let (r, p) = results(|_| false);
        outcome(&r, &p).unwrap();
        // one solo failing is reported but the run still measured a co-located condition
        let (r, p) = results(|c| c.engines == ["emb"]);
        outcome(&r, &p).unwrap();
        // the embedder never came up: the solo gen was measured, nothing co-located
        let (r, p) = results(|c| c.engines.iter().any(|e| e == "emb"));
        let e = outcome(&r, &p).unwrap_err().to_string();
        assert!(
            e.contains("no co-located condition could be measured"),
            "{e}"
        );
        assert!(e.contains("2 of 3 failed"), "{e}");
        // an interrupted run is not judged yet
        let (mut r, p) = results(|_| true);
        r.complete = false;
        outcome(&r, &p).unwrap();
    }
}
