//! `results.json`: everything a run measured, with what produced it.
//!
//! The file is rewritten atomically (temporary file, fsync, rename) after every condition,
//! so an interrupted run keeps every finished condition and `lab run --resume` continues
//! from it. It carries a schema version, the full experiment (parsed, and the file's text)
//! and the environment, so any table in a report can be traced to what produced it.

use std::collections::BTreeMap;
use std::io::Write;
use std::path::Path;

use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};

use crate::engine_metrics::EngineMetricsWindow;
use crate::gateway_metrics::GatewayWindow;
use crate::matrix::Condition;
use crate::spec::{Experiment, Kind};

/// Version of the results.json layout; bumped on incompatible changes. Additions that an
/// older reader may skip and a newer one defaults (`gpu.mps_faults`, `engine_metrics`,
/// `presets`, a workload's `copy_of`, `latency_sample`, `unfinished` and `drain`,
/// a condition's `copies`, `control`, a load's `step`, `gateway`, a condition's `placements`
/// and `baseline`, `gpu.gpus`, `gpu.per_gpu` and `gpu.placement`, a result's `control_slo`
/// and the experiment's) keep it.
pub const SCHEMA_VERSION: u32 = 1;

/// The name of the results file inside a run folder.
pub const RESULTS_FILE: &str = "results.json";

/// A whole run.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Results {
    /// [`SCHEMA_VERSION`] of the writer.
    pub schema_version: u32,
    /// The experiment, parsed.
    pub experiment: Experiment,
    /// The experiment file's text, verbatim.
    pub experiment_text: String,
    /// Where the experiment file was read from.
    pub experiment_path: String,
    /// Machine, GPU, driver, versions.
    pub environment: Environment,
    /// RFC 3339 time the run started.
    pub started_at: String,
    /// RFC 3339 time of the last write.
    pub updated_at: String,
    /// True once every planned condition has a result.
    pub complete: bool,
    /// The command line that started the run.
    pub command: String,
    /// One entry per finished condition (measured or failed), in run order.
    pub conditions: Vec<ConditionResult>,
    /// Measurements `lab run --resume --redo` took out of `conditions` to measure them
    /// again (a baseline taken under an older rule): kept, not reported.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub superseded: Vec<ConditionResult>,
}

/// Where the run happened.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct Environment {
    /// Host name.
    pub host: String,
    /// OS and architecture.
    pub os: String,
    /// Logical CPUs.
    pub cpus: usize,
    /// Version of colocate.
    pub colocate_version: String,
    /// GPUs seen (name, UUID, memory, driver, CUDA), empty without a GPU.
    #[serde(default)]
    pub gpus: Vec<GpuEnv>,
    /// Why GPU information is missing, when it is.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gpu_unavailable: Option<String>,
}

/// One GPU of the environment.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct GpuEnv {
    /// Product name.
    pub name: String,
    /// UUID.
    pub uuid: String,
    /// Total memory in bytes.
    pub memory_bytes: u64,
    /// Driver version.
    pub driver: String,
    /// CUDA version the driver supports.
    pub cuda: String,
}

/// The result of one condition (one repetition).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct ConditionResult {
    /// What was measured.
    pub condition: Condition,
    /// `None` when measured; the reason when it failed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub failed: Option<String>,
    /// Unix seconds the measurement window began and ended.
    #[serde(default)]
    pub window: Option<(f64, f64)>,
    /// Open-loop rates used, in requests/s (after resolving `% of solo`).
    #[serde(default)]
    pub resolved_rates: BTreeMap<String, f64>,
    /// Per workload.
    #[serde(default)]
    pub workloads: BTreeMap<String, WorkloadMetrics>,
    /// GPU counters over the same window.
    #[serde(default)]
    pub gpu: GpuWindow,
    /// Each engine's own counters (its Prometheus `/metrics`) over the same window; an
    /// engine that could not be scraped is here with the reason (results written before
    /// the lab scraped engines have none).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub engine_metrics: Vec<EngineMetricsWindow>,
    /// Workloads that ran as a seed study's client (bench presets), by workload name.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub presets: BTreeMap<String, PresetUse>,
    /// The gateway's SLO controller over the same window (its limit, queue and decisions
    /// as a timeline), when workloads went through the gateway.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gateway: Option<GatewayWindow>,
    /// The UUIDs of the GPUs of the machine that measured it (empty in results written
    /// before the lab recorded them): a resumed run may span machines.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub gpu_uuids: Vec<String>,
    /// The SLOs a controlled condition's deployment got from the solo run
    /// (`[control_slo]`, `crate::control_slo`): each metric's factor, solo p99 and value.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub control_slo: Vec<crate::control_slo::SoloSlo>,
}

/// How a workload ran as a bench preset, as bench reported it.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct PresetUse {
    /// `seed-gen`, `seed-embed`.
    pub preset: String,
    /// False when its requests were sent whole: no TTFT, TPOT or ITL.
    pub streamed: bool,
    /// What a reader must know about its figures (bench's note).
    pub note: String,
}

impl ConditionResult {
    /// The MPS faults seen since the previous window of the same deployment, up to the end
    /// of this one (see [`GpuWindow::mps_faults`]).
    pub fn mps_faults(&self) -> &[WindowFault] {
        &self.gpu.mps_faults
    }

    /// Whether an MPS fault may have touched this measurement: any fault seen since the
    /// previous window. One before warm-up counts too: the supervisor may still have been
    /// restarting the engines when the warm-up began.
    pub fn fault_touched(&self) -> bool {
        !self.gpu.mps_faults.is_empty()
    }

    /// A failed condition with its reason.
    pub fn failed(condition: Condition, reason: String) -> Self {
        ConditionResult {
            condition,
            failed: Some(reason),
            window: None,
            resolved_rates: BTreeMap::new(),
            workloads: BTreeMap::new(),
            gpu: GpuWindow::default(),
            engine_metrics: Vec::new(),
            presets: BTreeMap::new(),
            gateway: None,
            gpu_uuids: Vec::new(),
            control_slo: Vec::new(),
        }
    }
}

/// Latency percentiles in milliseconds.
#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize, PartialEq)]
pub struct Percentiles {
    /// Mean.
    pub mean: f64,
    /// Median.
    pub p50: f64,
    /// 90th percentile.
    pub p90: f64,
    /// 95th percentile.
    pub p95: f64,
    /// 99th percentile.
    pub p99: f64,
}

/// What one workload achieved in the window.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct WorkloadMetrics {
    /// generate or embed.
    pub kind: Option<Kind>,
    /// Engine driven.
    pub engine: String,
    /// The headline throughput: output tokens/s (generate) or sequences/s (embed).
    pub throughput: f64,
    /// Requests completed per second.
    pub requests_per_s: f64,
    /// Requests completed in the window.
    pub completed: u64,
    /// Failed requests in the window, by kind.
    #[serde(default)]
    pub errors: BTreeMap<String, u64>,
    /// Generate: prompt + output tokens/s; embed: input tokens/s.
    pub tokens_per_s: f64,
    /// Generate: time to first token.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ttft_ms: Option<Percentiles>,
    /// Generate: time per output token.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tpot_ms: Option<Percentiles>,
    /// Generate: inter-token latency.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub itl_ms: Option<Percentiles>,
    /// Request latency (E2EL for generate).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub latency_ms: Option<Percentiles>,
    /// Headline throughput per second of the window: (Unix seconds, value).
    #[serde(default)]
    pub timeseries: Vec<(f64, f64)>,
    /// When this tenant is one copy of a workload (its engine run in copies): which.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub copy_of: Option<CopyOf>,
    /// A bounded sample of the request latencies behind `latency_ms`, for the report's
    /// distributions and significance tests (results written before the lab kept one have
    /// none).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub latency_sample: Option<LatencySample>,
    /// Whole responses sent before the window's end that never ended (bench cut them at
    /// its drain's time-out or an interruption): their tokens are missing, so the
    /// throughput is an underestimate.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub unfinished: u64,
    /// For a workload whose responses come whole: the run's wait after the window for
    /// those still in flight (bench's drain, the same for every such workload of the
    /// condition).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub drain: Option<DrainWait>,
}

fn is_zero(n: &u64) -> bool {
    *n == 0
}

/// A tenant that is copy `index` of `workload` (against its engine's replica `index`).
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct CopyOf {
    /// The workload of the experiment it runs.
    pub workload: String,
    /// Which copy, from 0.
    pub index: u32,
}

/// The most latencies a [`LatencySample`] keeps: enough for a density and a rank test,
/// few enough that a results.json of a hundred tenant windows stays a few megabytes.
pub const LATENCY_SAMPLE_MAX: usize = 1000;

/// Request latencies (ms; E2EL for generate, the request for embed) of the requests that
/// ended in the window, in the order they ended: every one when there were at most
/// [`LATENCY_SAMPLE_MAX`], else that many taken at even steps through that order (a
/// systematic sample: each part of the window is represented as it was).
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct LatencySample {
    /// Requests it was taken from.
    pub of: u64,
    /// The sampled latencies, ms.
    pub ms: Vec<f64>,
}

impl LatencySample {
    /// The sample of `latencies_ms` (in the order the requests ended), rounded to the
    /// microsecond.
    pub fn of(latencies_ms: &[f64]) -> Self {
        let n = latencies_ms.len();
        let keep = n.min(LATENCY_SAMPLE_MAX);
        let ms = (0..keep)
            .map(|i| latencies_ms[i * n / keep.max(1)])
            .map(|v| (v * 1000.0).round() / 1000.0)
            .collect();
        LatencySample { of: n as u64, ms }
    }
}

/// How long a run waited after its window for whole responses.
#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize, PartialEq)]
pub struct DrainWait {
    /// Seconds from the window's end to the drain's end.
    pub waited_s: f64,
    /// Its time-out, seconds (twice the longest E2EL seen, at most 5 minutes).
    pub timeout_s: f64,
    /// True when requests were still in flight at the time-out (see `unfinished`).
    pub timed_out: bool,
}

impl WorkloadMetrics {
    /// Unit of [`WorkloadMetrics::throughput`].
    pub fn unit(&self) -> &'static str {
        match self.kind {
            Some(Kind::Embed) => "seq/s",
            _ => "tok/s",
        }
    }
}

/// GPU counters over a window: the deployment's, over every GPU it uses (`per_gpu`).
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct GpuWindow {
    /// Whether counters were sampled.
    pub available: bool,
    /// Why not, when they were not.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// Per counter (sm_active, sm_occupancy, tensor_active, dram_bw, power_w; since issue 19
    /// also temp_c, sm_clock_mhz, mem_clock_mhz, mem_used_bytes): summary. Over several GPUs,
    /// the deployment's totals (power and memory summed, the rest averaged: `per_gpu`), and
    /// so are `samples`.
    #[serde(default)]
    pub counters: BTreeMap<String, CounterStat>,
    /// The samples in the window: (Unix seconds, counter -> value).
    #[serde(default)]
    pub samples: Vec<(f64, BTreeMap<String, f64>)>,
    /// MPS faults the deployment's supervisor saw since the previous window on the same
    /// deployment, up to the end of this one. Any at all means the engines were (or may
    /// have been) restarted around this measurement: it is not a clean one.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub mps_faults: Vec<WindowFault>,
    /// The GPUs of the condition's deployment, whose totals `counters` are (empty in results
    /// written before the lab measured every GPU: their counters are one GPU's).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub gpus: Vec<u32>,
    /// Each of those GPUs alone.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub per_gpu: Vec<crate::per_gpu::GpuCounters>,
    /// Where each engine replica ran, as `up` planned it.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub placement: Vec<crate::per_gpu::EnginePlacement>,
}

/// When, relative to a condition's measurement, an MPS fault was seen.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum FaultPhase {
    /// After the previous window, before this warm-up (its restart may overlap it).
    BeforeWarmup,
    Warmup,
    Window,
}

impl FaultPhase {
    /// Words for the report.
    pub fn describe(self) -> &'static str {
        match self {
            FaultPhase::BeforeWarmup => "before warm-up",
            FaultPhase::Warmup => "during warm-up",
            FaultPhase::Window => "in the window",
        }
    }
}

/// One MPS fault seen around a condition (the supervisor's record, as the lab keeps it).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct WindowFault {
    /// Unix seconds the supervisor read it from the daemon's log.
    pub t: f64,
    /// The daemon's own timestamp, verbatim (local time), to find it in `mps/log/`.
    pub log_time: String,
    pub phase: FaultPhase,
    /// Engine replicas whose MPS clients it named.
    pub engines: Vec<String>,
    /// What the log said.
    pub message: String,
    /// What the supervisor did (e.g. restarted every engine of the GPU).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub action: Option<String>,
}

/// Summary of one counter over a window.
#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize, PartialEq)]
pub struct CounterStat {
    /// Mean.
    pub mean: f64,
    /// Median.
    pub p50: f64,
    /// Maximum.
    pub max: f64,
}

/// The counters reported, in table order, with their headings.
pub const COUNTERS: [(&str, &str); 5] = [
    ("sm_active", "SM active %"),
    ("sm_occupancy", "SM occ. %"),
    ("tensor_active", "tensor %"),
    ("dram_bw", "DRAM BW %"),
    ("power_w", "power W"),
];

impl Results {
    /// Reads a run's results.json (a run folder or the file itself).
    pub fn load(path: &Path) -> Result<Self> {
        let file = if path.is_dir() {
            path.join(RESULTS_FILE)
        } else {
            path.to_path_buf()
        };
        let text = std::fs::read_to_string(&file)
            .with_context(|| format!("cannot read {}", file.display()))?;
        let v: serde_json::Value = serde_json::from_str(&text)
            .with_context(|| format!("{} is not JSON", file.display()))?;
        let version = v.get("schema_version").and_then(|s| s.as_u64());
        if version != Some(SCHEMA_VERSION as u64) {
            bail!(
                "{}: schema_version {:?}, this colocate reads {SCHEMA_VERSION}",
                file.display(),
                version
            );
        }
        serde_json::from_value(v)
            .with_context(|| format!("{} is not a lab results file", file.display()))
    }

    /// Writes results.json into `dir` atomically: a reader sees the old or the new file.
    pub fn save(&self, dir: &Path) -> Result<()> {
        let file = dir.join(RESULTS_FILE);
        let tmp = dir.join(format!(".{RESULTS_FILE}.tmp"));
        let text = serde_json::to_vec_pretty(self)?;
        let mut f = std::fs::File::create(&tmp)
            .with_context(|| format!("cannot write {}", tmp.display()))?;
        f.write_all(&text)?;
        f.sync_all()?;
        drop(f);
        std::fs::rename(&tmp, &file)
            .with_context(|| format!("cannot replace {}", file.display()))?;
        Ok(())
    }

    /// The result recorded for a condition id, if any.
    pub fn find(&self, id: &str) -> Option<&ConditionResult> {
        self.conditions.iter().find(|c| c.condition.id() == id)
    }

    /// Raises the run's repetitions to `n`: a resume then measures repetitions the run had
    /// not planned (each deployment's, back to back after one start), and keeps every one
    /// recorded. Lowering them is an error: recorded repetitions are never dropped.
    /// Returns how many repetitions each condition gains.
    pub fn raise_repetitions(&mut self, n: u32) -> Result<u32> {
        let have = self.experiment.repetitions;
        if n < have {
            bail!("--repetitions {n}: the run has {have}; a resume can add repetitions, not drop recorded ones");
        }
        if n > have {
            self.experiment.repetitions = n;
            self.complete = false;
        }
        Ok(n - have)
    }

    /// Takes every condition whose id contains one of `patterns` out of the run, so that
    /// a resume measures it again, and keeps the old record in `superseded`. A pattern
    /// that matches nothing is an error naming it. Returns how many were taken out.
    pub fn redo(&mut self, patterns: &[String]) -> Result<usize> {
        let matches = |c: &ConditionResult, p: &str| c.condition.id().contains(p);
        for p in patterns {
            if !self.conditions.iter().any(|c| matches(c, p)) {
                bail!(
                    "--redo {p:?} matches none of the run's {} recorded conditions (ids look like {:?})",
                    self.conditions.len(),
                    self.conditions.first().map(|c| c.condition.id()).unwrap_or_default()
                );
            }
        }
        let (redo, keep): (Vec<_>, Vec<_>) = std::mem::take(&mut self.conditions)
            .into_iter()
            .partition(|c| patterns.iter().any(|p| matches(c, p)));
        self.conditions = keep;
        self.complete = false;
        let n = redo.len();
        self.superseded.extend(redo);
        Ok(n)
    }
}

/// Collects host, OS and version; GPU fields are filled by the caller.
pub fn host_environment() -> Environment {
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|s| s.trim().to_string())
        .or_else(|_| std::env::var("HOSTNAME"))
        .unwrap_or_else(|_| "unknown".into());
    Environment {
        host,
        os: format!("{} {}", std::env::consts::OS, std::env::consts::ARCH),
        cpus: std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(1),
        colocate_version: env!("CARGO_PKG_VERSION").to_string(),
        gpus: Vec::new(),
        gpu_unavailable: None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine_metrics::{CounterDelta, Dialect, GaugeSummary};

    const EXP: &str = r#"
name = "r"
warmup = "0s"
duration = "1s"
[deployment]
[[deployment.engines]]
name = "gen"
[[workloads]]
name = "g"
engine = "gen"
preset = "seed-gen"
"#;

    fn results() -> Results {
        let exp = Experiment::parse(EXP).unwrap();
        let cond = crate::matrix::plan(&exp).remove(0);
        let mut c = ConditionResult {
            failed: None,
            window: Some((10.0, 11.0)),
            ..ConditionResult::failed(cond, String::new())
        };
        c.engine_metrics.push(EngineMetricsWindow {
            engine: "gen".into(),
            url: "http://127.0.0.1:8100".into(),
            dialect: Some(Dialect::Builtin),
            samples: 3,
            span_s: 2.0,
            requests_running: Some(GaugeSummary {
                metric: "colocate:num_requests_running".into(),
                start: 1.0,
                end: 2.0,
                mean: 1.5,
                max: 2.0,
            }),
            generation_tokens: Some(CounterDelta {
                metric: "colocate:generation_tokens_total".into(),
                increase: 100.0,
                per_s: 50.0,
            }),
            ..Default::default()
        });
        c.presets.insert(
            "g".into(),
            PresetUse {
                preset: "seed-gen".into(),
                streamed: false,
                note: "seed-gen: whole responses".into(),
            },
        );
        Results {
            schema_version: SCHEMA_VERSION,
            experiment: exp,
            experiment_text: EXP.into(),
            experiment_path: "r.toml".into(),
            environment: host_environment(),
            started_at: "2026-12-01T00:00:00Z".into(),
            updated_at: "2026-12-01T00:00:01Z".into(),
            complete: true,
            command: "test".into(),
            conditions: vec![c],
            superseded: Vec::new(),
        }
    }

    /// `--redo` takes the matching conditions out for a new measurement and keeps the old
    /// ones; a pattern matching nothing changes nothing and says so.
    #[test]
    fn redo_supersedes_matching_conditions() {
        let dir = tempfile::tempdir().unwrap();
        let mut r = results();
        let id = r.conditions[0].condition.id();
        let err = r.redo(&["timeslice".into()]).unwrap_err().to_string();
        assert!(err.contains("--redo \"timeslice\" matches none"), "{err}");
        assert_eq!(r.conditions.len(), 1);
        assert_eq!(r.redo(&["solo ".into()]).unwrap(), 1);
        assert!(r.find(&id).is_none() && !r.complete);
        assert_eq!(r.superseded[0].condition.id(), id);
        r.save(dir.path()).unwrap();
        assert_eq!(Results::load(dir.path()).unwrap(), r);
    }

    /// A resume may raise the repetitions (the new ones are left to measure, the recorded
    /// one kept) but not lower them.
    #[test]
    fn repetitions_are_raised_not_lowered() {
        let mut r = results();
        assert_eq!(r.experiment.repetitions, 1);
        let err = r.raise_repetitions(0).unwrap_err().to_string();
        assert!(err.contains("the run has 1"), "{err}");
        assert_eq!(r.raise_repetitions(1).unwrap(), 0);
        assert!(r.complete, "the same count changes nothing");
        assert_eq!(r.raise_repetitions(3).unwrap(), 2);
        assert!(!r.complete);
        let left: Vec<String> = crate::matrix::plan(&r.experiment)
            .iter()
            .filter(|c| r.find(&c.id()).is_none())
            .map(|c| c.id())
            .collect();
        assert_eq!(left, ["solo gen: g c=512 #2", "solo gen: g c=512 #3"]);
        assert!(r.find("solo gen: g c=512 #1").is_some());
        let err = r.raise_repetitions(2).unwrap_err().to_string();
        assert!(err.contains("not drop recorded ones"), "{err}");
    }

    /// Engine metrics and presets survive results.json; a file written before the lab
    /// recorded them (what `--resume` may find) still loads, with none.
    #[test]
    fn engine_metrics_and_presets_round_trip_and_old_files_load() {
        let dir = tempfile::tempdir().unwrap();
        let r = results();
        r.save(dir.path()).unwrap();
        let back = Results::load(dir.path()).unwrap();
        assert_eq!(back, r);
        assert_eq!(back.conditions[0].engine_metrics[0].samples, 3);
        assert!(!back.conditions[0].presets["g"].streamed);

        let mut v = serde_json::to_value(&r).unwrap();
        let c = v["conditions"][0].as_object_mut().unwrap();
        assert!(c.remove("engine_metrics").is_some() && c.remove("presets").is_some());
        let old = dir.path().join("old.json");
        std::fs::write(&old, serde_json::to_vec(&v).unwrap()).unwrap();
        let back = Results::load(&old).unwrap();
        assert!(back.conditions[0].engine_metrics.is_empty());
        assert!(back.conditions[0].presets.is_empty());
        assert_eq!(back.conditions[0].window, Some((10.0, 11.0)));
    }

    /// At most [`LATENCY_SAMPLE_MAX`] latencies, taken at even steps through the order the
    /// requests ended; fewer are all kept.
    #[test]
    fn latency_samples_are_bounded_and_systematic() {
        let few = LatencySample::of(&[3.0, 1.23456789, 2.0]);
        assert_eq!(few.of, 3);
        assert_eq!(few.ms, vec![3.0, 1.235, 2.0]);
        let many: Vec<f64> = (0..2500).map(|i| i as f64).collect();
        let s = LatencySample::of(&many);
        assert_eq!((s.of, s.ms.len()), (2500, LATENCY_SAMPLE_MAX));
        assert_eq!((s.ms[0], s.ms[1], s.ms[999]), (0.0, 2.0, 2497.0));
        assert!(LatencySample::of(&[]).ms.is_empty());
    }
}
