//! The experiment file: what to deploy, which load to apply, which axes to sweep.
//!
//! The file is TOML with unknown keys rejected everywhere, so a typo is an error that names
//! the key instead of a silently ignored setting. The `[deployment]` table is a `colocate
//! up` deployment file, read once here into the `deploy` crate's typed spec (not validated:
//! it is a template, each condition's deployment is validated); `deployments` applies each
//! condition to it (sharing mode, SM split, memory split) as typed edits.
//!
//! ```toml
//! name = "quickstart"
//! repetitions = 1
//! warmup = "3s"
//! duration = "10s"
//!
//! [deployment]                 # a `colocate up` file used as the template
//! sharing = "timeslice"
//! [[deployment.engines]]
//! name = "gen"
//! # ...
//!
//! [[workloads]]
//! name = "chat"
//! engine = "gen"
//! kind = "generate"
//! concurrency = 4
//!
//! [[workloads]]                # a seed study's client: its texts, kind and defaults
//! name = "seeds"
//! engine = "gen"
//! preset = "seed-gen"
//!
//! [axes]
//! sharing = ["timeslice", "mps"]
//! mps_split = [[70, 30], [50, 50]]
//! [axes.load.chat]
//! concurrency = [4, 16]
//!
//! [slo.chat]
//! ttft_p99 = "2s"
//!
//! [control_slo.gen]            # controlled conditions: the engine's gateway SLO as a
//! tpot_p99 = 1.25              # factor of its solo run's p99 at the same load
//! ```

use std::collections::BTreeMap;
use std::path::Path;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use deploy::{DeploymentSpec, Sharing};
use serde::{Deserialize, Serialize};

/// A whole experiment file, validated.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Experiment {
    /// Name of the study; the run folder is `runs/<name>-<time>`.
    pub name: String,
    /// Free text shown at the top of the report.
    #[serde(default)]
    pub description: String,
    /// How many times every condition is measured (mean and sigma in the report).
    #[serde(default = "one")]
    pub repetitions: u32,
    /// Load applied before the measurement window; not measured.
    #[serde(with = "units::duration")]
    pub warmup: Duration,
    /// The measurement window; load and GPU counters cover the same window.
    #[serde(with = "units::duration")]
    pub duration: Duration,
    /// Expected time for a deployment to come up (only for the dry-run estimate).
    #[serde(default = "default_startup", with = "units::duration")]
    pub startup_estimate: Duration,
    /// Expected wait after each window for the whole responses still in flight (only for
    /// the dry-run estimate): about one E2EL of the slowest workload whose responses come
    /// whole (every embed workload, and gen presets that are not streamed), which the run
    /// waits for before it stops the load. Default: the warm-up, which should itself last
    /// an E2EL or more (the window's first requests were sent in it).
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        with = "units::duration::option"
    )]
    pub drain_estimate: Option<Duration>,
    /// GPU sampling interval for the counters.
    #[serde(default = "default_sample", with = "units::duration")]
    pub sample_interval: Duration,
    /// Base folder for runs (default `runs`, relative to the working directory).
    #[serde(default)]
    pub runs_dir: Option<String>,
    /// The `colocate up` deployment file used as the template of every condition. Its
    /// `name` is empty when the file gives none (the experiment's is used).
    #[serde(with = "deployment_template")]
    pub deployment: DeploymentSpec,
    /// The load, one entry per workload, each tied to an engine by name.
    pub workloads: Vec<WorkloadDef>,
    /// Axes to sweep (their cross product is the plan), unless `conditions` lists them.
    #[serde(default)]
    pub axes: Option<Axes>,
    /// An explicit list of co-located conditions instead of `axes`.
    #[serde(default)]
    pub conditions: Option<Vec<ConditionDef>>,
    /// Latency objectives per workload, for the recommendation.
    #[serde(default)]
    pub slo: BTreeMap<String, WorkloadObjectives>,
    /// The gateway's SLO of an engine in the controlled conditions relative to its solo
    /// run (`[control_slo.<engine>]`, e.g. `tpot_p99 = 1.25`): each metric that factor times
    /// the p99 its workloads had solo at the condition's load, measured earlier in the same
    /// run (`crate::control_slo`). In place of that metric in the engine's `slo`.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub control_slo: BTreeMap<String, RelativeSlo>,
    /// Workload plotted over time in the counters plot: the condition to show
    /// (its label); by default the recommended one.
    #[serde(default)]
    pub timeline_condition: Option<String>,
}

fn one() -> u32 {
    1
}
fn default_startup() -> Duration {
    Duration::from_secs(10)
}
fn default_sample() -> Duration {
    Duration::from_millis(500)
}

/// The `[deployment]` table as the `deploy` crate reads a file (start time-outs default by
/// engine kind); in results.json a table of the same form, so files written before the
/// lab typed it load the same. A table without `name` gives an empty one, and writes none.
mod deployment_template {
    use deploy::DeploymentSpec;
    use serde::{de, ser, Deserialize, Deserializer, Serialize, Serializer};

    pub fn serialize<S: Serializer>(spec: &DeploymentSpec, s: S) -> Result<S::Ok, S::Error> {
        let mut table = match toml::Value::try_from(spec).map_err(ser::Error::custom)? {
            toml::Value::Table(t) => t,
            other => return Err(ser::Error::custom(format!("not a table: {other}"))),
        };
        if spec.name.is_empty() {
            table.remove("name");
        }
        table.serialize(s)
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<DeploymentSpec, D::Error> {
        let table = toml::Table::deserialize(d)?;
        let named = table.contains_key("name");
        let mut spec = deploy::spec::from_table(table)
            .map_err(|e| de::Error::custom(format!("deployment: {e:#}")))?;
        if !named {
            spec.name.clear();
        }
        Ok(spec)
    }
}

/// Kind of a workload: text generation or embeddings.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq, PartialOrd, Ord)]
#[serde(rename_all = "lowercase")]
pub enum Kind {
    /// `/v1/completions`, throughput in output tokens/s.
    Generate,
    /// `/v1/embeddings`, throughput in sequences/s.
    Embed,
}

/// A seed study's client: bench's own preset (`bench::spec::Preset`), the one that builds
/// the requests; the lab reads its kind, lengths and default load from it.
pub use bench::spec::Preset;

/// The known preset names, for errors.
fn known_presets() -> String {
    Preset::ALL.map(Preset::name).join(", ")
}

/// The lab's kind of a preset's workload (bench's chat and completions are both generate).
fn preset_kind(p: Preset) -> Kind {
    if p.kind().is_gen() {
        Kind::Generate
    } else {
        Kind::Embed
    }
}

/// Output tokens of a generate preset (bench's fixed length).
fn preset_output_tokens(p: Preset) -> Option<u32> {
    match p.output() {
        Some(bench::LengthDist::Fixed(n)) => Some(n),
        _ => None,
    }
}

/// Requests in flight when the workload gives neither concurrency nor rate.
fn preset_concurrency(p: Preset) -> Option<u32> {
    match p.default_load() {
        bench::spec::Load::Closed { concurrency } => u32::try_from(concurrency).ok(),
        _ => None,
    }
}

/// Inputs per request of an embed preset, when the workload gives no batch.
fn preset_batch(p: Preset) -> Option<u32> {
    (preset_kind(p) == Kind::Embed).then(|| p.default_batch() as u32)
}

/// One workload of the experiment, as in `colocate bench`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct WorkloadDef {
    /// Name used in axes, SLOs and the report.
    pub name: String,
    /// The engine (name in `deployment.engines`) this workload drives.
    pub engine: String,
    /// A seed study's client (`seed-gen`, `seed-embed`): its fixed texts and request shape;
    /// `kind`, `input_tokens`, `output_tokens`, `concurrency` and `batch` default to the
    /// preset's (`input_tokens` cannot be given: the text is the preset's).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub preset: Option<Preset>,
    /// generate or embed.
    pub kind: Kind,
    /// Closed loop: requests in flight (the base load).
    #[serde(default)]
    pub concurrency: Option<u32>,
    /// Open loop: requests per second (absolute or relative to solo).
    #[serde(default)]
    pub rate: Option<Rate>,
    /// Embed: inputs per request.
    #[serde(default)]
    pub batch: Option<u32>,
    /// Open loop: gamma shape of the inter-arrival times (1 = Poisson, larger = more
    /// regular, smaller = burstier; vLLM's convention).
    #[serde(default = "default_burstiness")]
    pub burstiness: f64,
    /// Prompt / input length in tokens.
    #[serde(default = "default_input")]
    pub input_tokens: u32,
    /// Generate: tokens to produce per request.
    #[serde(default = "default_output")]
    pub output_tokens: u32,
    /// Generate: keep generating past EOS so every request has `output_tokens`.
    #[serde(default = "yes")]
    pub ignore_eos: bool,
    /// Model name sent in requests (default: the engine's served name, left to bench).
    #[serde(default)]
    pub model: Option<String>,
    /// Seed of the synthetic prompts and arrivals (default 0); repetition r uses seed + r - 1.
    #[serde(default)]
    pub seed: Option<u64>,
    /// Where its requests go: `"engine"` (straight to it) or `"gateway"` (through the
    /// deployment's gateway, which routes by model name). Default: the engine, except in a
    /// controlled condition (`control`), where every workload goes through the gateway.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub via: Option<Via>,
}

/// Where a workload's requests go.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum Via {
    /// Straight to the engine (each copy of it, when it runs in copies).
    Engine,
    /// Through the deployment's gateway: what its SLO controller sees and limits.
    Gateway,
}

impl WorkloadDef {
    /// Whether its responses come whole (every embedding; a gen preset that is not
    /// streamed): bench then waits after the window for those in flight at its end.
    pub fn whole_responses(&self) -> bool {
        match (self.kind, self.preset) {
            (Kind::Embed, _) => true,
            (Kind::Generate, Some(p)) => !p.streams(),
            (Kind::Generate, None) => false,
        }
    }
}

/// The most copies of one engine a condition may ask for.
pub const MAX_COPIES: u32 = 64;

fn default_burstiness() -> f64 {
    1.0
}
fn default_input() -> u32 {
    128
}
fn default_output() -> u32 {
    128
}
fn yes() -> bool {
    true
}

/// An offered request rate: absolute (`12.5` or `"12.5/s"`) or `"50% of solo"`.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(try_from = "RateText", into = "RateText")]
pub enum Rate {
    /// Requests per second.
    PerSecond(f64),
    /// A percentage of what the engine achieved solo with this workload's base load.
    OfSolo(f64),
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(untagged)]
enum RateText {
    Number(f64),
    Text(String),
}

impl TryFrom<RateText> for Rate {
    type Error = String;
    fn try_from(value: RateText) -> Result<Self, String> {
        let r = match value {
            RateText::Number(n) => Rate::PerSecond(n),
            RateText::Text(t) => parse_rate(&t)?,
        };
        match r {
            Rate::PerSecond(n) | Rate::OfSolo(n) if !(n.is_finite() && n > 0.0) => {
                Err(format!("rate must be positive, got {n}"))
            }
            r => Ok(r),
        }
    }
}

impl From<Rate> for RateText {
    fn from(r: Rate) -> Self {
        match r {
            Rate::PerSecond(n) => RateText::Number(n),
            Rate::OfSolo(p) => RateText::Text(format!("{p}% of solo")),
        }
    }
}

fn parse_rate(text: &str) -> Result<Rate, String> {
    let t = text.trim();
    let bad = || {
        format!("bad rate {text:?}: expected requests/s (e.g. 12 or \"12/s\") or \"50% of solo\"")
    };
    if let Some(pct) = t.strip_suffix("of solo") {
        let pct = pct.trim().strip_suffix('%').ok_or_else(bad)?;
        return pct
            .trim()
            .parse::<f64>()
            .map(Rate::OfSolo)
            .map_err(|_| bad());
    }
    let n = t.strip_suffix("/s").unwrap_or(t).trim();
    n.parse::<f64>().map(Rate::PerSecond).map_err(|_| bad())
}

impl std::fmt::Display for Rate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Rate::PerSecond(n) => write!(f, "{n}/s"),
            Rate::OfSolo(p) => write!(f, "{p}% of solo"),
        }
    }
}

/// The axes swept; their cross product (plus implied solo baselines) is the plan.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Axes {
    /// Sharing modes of the co-located conditions: timeslice, mps, mig.
    #[serde(default)]
    pub sharing: Vec<Sharing>,
    /// MPS active-thread percentages, one per engine in `deployment.engines` order.
    #[serde(default)]
    pub mps_split: Vec<Vec<u32>>,
    /// Also measure MPS with default limits (no thread percentage) when `mps` is swept.
    #[serde(default = "yes")]
    pub mps_default: bool,
    /// GPU memory fractions, one per engine in `deployment.engines` order.
    #[serde(default)]
    pub memory_split: Vec<Vec<f64>>,
    /// Load levels per workload name.
    #[serde(default)]
    pub load: BTreeMap<String, LoadAxis>,
    /// Copies per engine name (a scaling experiment): each count is one level, crossed
    /// with the other engines' and the other axes. An engine not named runs once; 0 leaves
    /// it out. Copy `i` of an engine is its replica `NAME-i` (deploy's `replicas`), with
    /// each of the engine's workloads run against it as a tenant of its own (`WORKLOAD-i`).
    /// Steps with fewer than two engine copies in all are left out: the solo baselines
    /// are that step.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub copies: BTreeMap<String, Vec<u32>>,
    /// The gateway's SLO controller off and on (`[false, true]`), crossed with the other
    /// axes; default off. A controlled cell runs the template's engine `priority`, `slo` (with
    /// `control_slo`'s metrics set from the solo run) and `[deployment.gateway.control]`
    /// with every workload through the gateway; static cells run without priorities. Cells
    /// under `mig` are not controlled (slices share no SMs).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub control: Vec<bool>,
}

/// Load levels of one workload: each concurrency (closed loop) and each rate (open loop)
/// is one level, crossed with each batch size.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct LoadAxis {
    /// Closed-loop levels.
    #[serde(default)]
    pub concurrency: Vec<u32>,
    /// Open-loop levels.
    #[serde(default)]
    pub rate: Vec<Rate>,
    /// Embed batch sizes.
    #[serde(default)]
    pub batch: Vec<u32>,
}

/// One explicit co-located condition.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct ConditionDef {
    /// timeslice, mps or mig.
    pub sharing: Sharing,
    /// MPS thread percentages per engine.
    #[serde(default)]
    pub mps_split: Option<Vec<u32>>,
    /// Memory fractions per engine.
    #[serde(default)]
    pub memory_split: Option<Vec<f64>>,
    /// Load per workload name (missing workloads keep their base load).
    #[serde(default)]
    pub load: BTreeMap<String, LoadOverride>,
    /// Copies per engine name, as in `axes.copies` (an engine not named runs once; 0 leaves
    /// it out): `copies = { small = 4, large = 1 }`.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub copies: BTreeMap<String, u32>,
    /// Under the gateway's SLO controller (see `Axes::control`).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub control: bool,
    /// Other GPUs per engine name for this condition (`crate::layout`): `layout.gen =
    /// { gpus = [0, 1] }`, optionally with `tensor_parallel_size`; an engine not named keeps
    /// the template's.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub layout: BTreeMap<String, crate::layout::LayoutOverride>,
    /// The study's baseline: the report judges the hypotheses of a multi-GPU study
    /// (`crate::hypotheses`) against this condition. At most one.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub baseline: bool,
}

/// The load of one workload in one condition.
#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct LoadOverride {
    /// Closed loop.
    #[serde(default)]
    pub concurrency: Option<u32>,
    /// Open loop.
    #[serde(default)]
    pub rate: Option<Rate>,
    /// Embed batch.
    #[serde(default)]
    pub batch: Option<u32>,
    /// A load step in the window: `step = { at = "50%", concurrency = 64 }`.
    #[serde(default)]
    pub step: Option<StepDef>,
}

/// A load step: from `at` on, the workload runs this load instead (issue 18: the embedder
/// jumps from a quarter of its capacity to saturating in the middle of the window).
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct StepDef {
    /// When, after the window opens: a time (`"15s"`) or a share of the window (`"50%"`).
    pub at: StepAt,
    /// Closed loop from then on.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub concurrency: Option<u32>,
    /// Open loop from then on (absolute, or `"400% of solo"`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rate: Option<Rate>,
}

impl StepDef {
    /// `@50%:c=64`, for labels.
    pub fn short(&self) -> String {
        let to = match (self.concurrency, self.rate) {
            (Some(c), _) => format!("c={c}"),
            (None, Some(Rate::PerSecond(r))) => format!("rate={r}/s"),
            (None, Some(Rate::OfSolo(p))) => format!("rate={p}%solo"),
            (None, None) => "?".into(),
        };
        format!("@{}:{to}", self.at)
    }
}

/// When a load step comes: a time after the window opens, or a share of the window.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub enum StepAt {
    After(Duration),
    /// A fraction of the window, in (0, 1).
    Share(f64),
}

impl StepAt {
    /// The time after the window opens, for a window of `window`.
    pub fn resolve(self, window: Duration) -> Duration {
        match self {
            StepAt::After(d) => d,
            StepAt::Share(f) => window.mul_f64(f),
        }
    }
}

impl TryFrom<String> for StepAt {
    type Error = String;
    fn try_from(s: String) -> Result<Self, String> {
        let t = s.trim();
        if let Some(p) = t.strip_suffix('%') {
            return match p.trim().parse::<f64>() {
                Ok(p) if p > 0.0 && p < 100.0 => Ok(StepAt::Share(p / 100.0)),
                _ => Err(format!(
                    "bad step time {s:?}: a share of the window must be between 0% and 100%, e.g. \"50%\""
                )),
            };
        }
        humantime::parse_duration(t)
            .map(StepAt::After)
            .map_err(|_| format!("bad step time {s:?}: expected a time after the window opens (\"15s\") or a share of the window (\"50%\")"))
    }
}

impl From<StepAt> for String {
    fn from(a: StepAt) -> String {
        a.to_string()
    }
}

impl std::fmt::Display for StepAt {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            StepAt::After(d) => write!(f, "{}", humantime::format_duration(*d)),
            StepAt::Share(x) => write!(f, "{}%", x * 100.0),
        }
    }
}

/// Latency objectives of one workload (all optional; percentiles of the window).
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct WorkloadObjectives {
    /// Time to first token, 99th percentile.
    #[serde(default, with = "units::duration::option")]
    pub ttft_p99: Option<Duration>,
    /// Time to first token, median.
    #[serde(default, with = "units::duration::option")]
    pub ttft_p50: Option<Duration>,
    /// Time per output token, 99th percentile.
    #[serde(default, with = "units::duration::option")]
    pub tpot_p99: Option<Duration>,
    /// Time per output token, median.
    #[serde(default, with = "units::duration::option")]
    pub tpot_p50: Option<Duration>,
    /// Request latency (E2EL for generate, request latency for embed), 99th percentile.
    #[serde(default, with = "units::duration::option")]
    pub latency_p99: Option<Duration>,
    /// Request latency, median.
    #[serde(default, with = "units::duration::option")]
    pub latency_p50: Option<Duration>,
    /// Minimum throughput as a fraction of solo (e.g. 0.8 = keep 80%).
    #[serde(default)]
    pub min_fraction_of_solo: Option<f64>,
}

/// An engine's SLO in the controlled conditions relative to its solo run
/// (`[control_slo.<engine>]`): each metric (the gateway's, as in the engine's `slo`) a
/// factor of the p99 the engine's workloads had in their solo baseline at the condition's
/// load. `tpot_p99 = 1.25`: the controller holds the engine's TPOT p99 to 1.25 x solo.
#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct RelativeSlo {
    /// Time to first token, 99th percentile, as a factor of the solo's.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ttft_p99: Option<f64>,
    /// Time per output token, 99th percentile, as a factor of the solo's.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tpot_p99: Option<f64>,
    /// Whole-request latency (E2EL), 99th percentile, as a factor of the solo's.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub e2el_p99: Option<f64>,
}

impl RelativeSlo {
    /// The metrics, by their names in files (deploy's `SloSpec` fields).
    pub const METRICS: [&'static str; 3] = ["ttft_p99", "tpot_p99", "e2el_p99"];

    /// Each metric given, with its factor, in [`Self::METRICS`] order.
    pub fn factors(&self) -> Vec<(&'static str, f64)> {
        [
            ("ttft_p99", self.ttft_p99),
            ("tpot_p99", self.tpot_p99),
            ("e2el_p99", self.e2el_p99),
        ]
        .into_iter()
        .filter_map(|(k, v)| v.map(|v| (k, v)))
        .collect()
    }
}

impl Experiment {
    /// Reads and validates an experiment file; errors name the file and the field.
    pub fn load(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("cannot read experiment file {}", path.display()))?;
        Self::parse(&text).with_context(|| format!("in experiment file {}", path.display()))
    }

    /// Parses and validates experiment TOML text.
    pub fn parse(text: &str) -> Result<Self> {
        let mut table: toml::Table = toml::from_str(text).map_err(|e| anyhow::anyhow!("{e}"))?;
        check_sharing_names(&table)?;
        check_control_slo_table(&table)?;
        let exp: Experiment = if expand_presets(&mut table)? {
            toml::Value::Table(table)
                .try_into()
                .map_err(|e| anyhow::anyhow!("{e}"))?
        } else {
            // as written: the parser's errors point at the line
            toml::from_str(text).map_err(|e| anyhow::anyhow!("{e}"))?
        };
        exp.validate()?;
        Ok(exp)
    }

    /// Engine names of the deployment template, in file order.
    pub fn engines(&self) -> Vec<String> {
        self.deployment
            .engines
            .iter()
            .map(|e| e.name.clone())
            .collect()
    }

    /// The workload definition by name.
    pub fn workload(&self, name: &str) -> Option<&WorkloadDef> {
        self.workloads.iter().find(|w| w.name == name)
    }

    fn validate(&self) -> Result<()> {
        if self.name.trim().is_empty()
            || !self
                .name
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_' || c == '.')
        {
            bail!("name: {:?} must be non-empty letters, digits, '-', '_' or '.' (it names the run folder)", self.name);
        }
        if self.repetitions == 0 {
            bail!("repetitions: must be at least 1");
        }
        if self.duration.is_zero() {
            bail!("duration: must be longer than zero");
        }
        let engines = engine_names(&self.deployment)?;
        if self.workloads.is_empty() {
            bail!("workloads: at least one workload is needed");
        }
        let mut seen = Vec::new();
        for (i, w) in self.workloads.iter().enumerate() {
            let at = format!("workloads[{i}] ({})", w.name);
            if w.name.is_empty() {
                bail!("workloads[{i}].name: must not be empty");
            }
            if seen.contains(&&w.name) {
                bail!("{at}.name: duplicate workload name");
            }
            seen.push(&w.name);
            if let Some(p) = w.preset {
                if preset_kind(p) != w.kind {
                    bail!(
                        "{at}.kind: preset {p} is for {} workloads",
                        kind_word(preset_kind(p))
                    );
                }
            }
            if !engines.contains(&w.engine) {
                bail!(
                    "{at}.engine: no engine {:?} in deployment.engines (have: {})",
                    w.engine,
                    engines.join(", ")
                );
            }
            if w.concurrency.is_none() && w.rate.is_none() {
                bail!("{at}: give `concurrency` (closed loop) or `rate` (open loop)");
            }
            if w.concurrency == Some(0) {
                bail!("{at}.concurrency: must be at least 1");
            }
            if matches!(w.rate, Some(Rate::OfSolo(_))) {
                bail!("{at}.rate: a base load cannot be relative to solo; use it in axes or conditions");
            }
            if w.batch.is_some() && w.kind == Kind::Generate {
                bail!("{at}.batch: only embed workloads take a batch");
            }
            if !(w.burstiness.is_finite() && w.burstiness > 0.0) {
                bail!("{at}.burstiness: must be positive (1 = Poisson)");
            }
            if w.batch == Some(0) {
                bail!("{at}.batch: must be at least 1");
            }
            if w.input_tokens == 0 || (w.kind == Kind::Generate && w.output_tokens == 0) {
                bail!("{at}: input_tokens and output_tokens must be at least 1");
            }
        }
        for name in self.slo.keys() {
            if self.workload(name).is_none() {
                bail!("slo.{name}: no workload named {name:?}");
            }
        }
        for (name, slo) in &self.slo {
            let whole = self
                .workload(name)
                .and_then(|w| w.preset)
                .filter(|p| preset_kind(*p) == Kind::Generate && !p.streams());
            if let Some(p) = whole {
                for (field, set) in [
                    ("ttft_p99", slo.ttft_p99.is_some()),
                    ("ttft_p50", slo.ttft_p50.is_some()),
                    ("tpot_p99", slo.tpot_p99.is_some()),
                    ("tpot_p50", slo.tpot_p50.is_some()),
                ] {
                    if set {
                        bail!("slo.{name}.{field}: workload {name} runs preset {p}, which is not streamed: TTFT and TPOT are undefined (use latency_p99 / latency_p50)");
                    }
                }
            }
            if let Some(f) = slo.min_fraction_of_solo {
                if !(0.0..=2.0).contains(&f) {
                    bail!("slo.{name}.min_fraction_of_solo: {f} is not a fraction");
                }
            }
        }
        match (&self.axes, &self.conditions) {
            (Some(_), Some(_)) => {
                bail!("axes and conditions: give one of them (the cross product of axes, or an explicit list)")
            }
            (Some(axes), None) => self.validate_axes(axes, &engines)?,
            (None, Some(list)) => {
                if list.is_empty() {
                    bail!("conditions: the list is empty");
                }
                for (i, c) in list.iter().enumerate() {
                    let at = format!("conditions[{i}]");
                    if c.control && c.sharing == Sharing::Mig {
                        bail!("{at}.control: the controller moves work between tenants that share SMs (mps or timeslice); MIG slices share none");
                    }
                    if c.mps_split.is_some() && c.sharing != Sharing::Mps {
                        bail!("{at}.mps_split: only with sharing = \"mps\"");
                    }
                    if let Some(s) = &c.mps_split {
                        check_split_u(s, &engines, &format!("{at}.mps_split"))?;
                    }
                    if let Some(s) = &c.memory_split {
                        check_split_f(s, &engines, &format!("{at}.memory_split"))?;
                    }
                    for (w, l) in &c.load {
                        self.check_load(w, l, &format!("{at}.load.{w}"))?;
                    }
                }
            }
            (None, None) => {}
        }
        if let Some(t) = &self.timeline_condition {
            if t.trim().is_empty() {
                bail!("timeline_condition: must not be empty");
            }
        }
        self.validate_copies(&engines)?;
        self.validate_replicas()?;
        crate::layout::validate(self)?;
        self.validate_gateway_use()?;
        self.validate_control_slo()?;
        Ok(())
    }

    /// `[control_slo.<engine>]`: used by a controlled condition, on an engine of the
    /// template that can be promised an SLO, with workloads whose solo run measures the
    /// metric, each factor above zero, no metric also given absolute in the engine's `slo`.
    fn validate_control_slo(&self) -> Result<()> {
        let Some(first) = self.control_slo.keys().next() else {
            return Ok(());
        };
        if self.controlled().is_none() {
            bail!("control_slo.{first}: no condition runs under the gateway's SLO controller (axes.control or conditions[].control), the only place this SLO is set");
        }
        let engines = &self.deployment.engines;
        for (name, rel) in &self.control_slo {
            let at = format!("control_slo.{name}");
            let Some((i, e)) = engines.iter().enumerate().find(|(_, e)| &e.name == name) else {
                bail!(
                    "{at}: no engine {name:?} in deployment.engines (have: {})",
                    self.engines().join(", ")
                );
            };
            let factors = rel.factors();
            if factors.is_empty() {
                bail!(
                    "{at}: empty: give at least one of {} (a factor of the solo run's p99)",
                    RelativeSlo::METRICS.join(", ")
                );
            }
            for (metric, f) in &factors {
                if !(f.is_finite() && *f > 0.0) {
                    bail!("{at}.{metric}: {f} is not a factor above zero (e.g. 1.25: a quarter over the solo run's p99)");
                }
            }
            if e.priority == deploy::spec::Priority::BestEffort {
                bail!("{at}: engine {name} is best-effort: it gets what the others leave and cannot be promised an SLO (give the SLO to a priority = \"latency\" engine)");
            }
            if let Some(abs) = &e.slo {
                for (metric, _) in &factors {
                    if let Some((_, d)) = abs.objectives().into_iter().find(|(m, _)| m == metric) {
                        bail!("{at}.{metric}: deployment.engines[{i}] ({name}).slo.{metric} is set too ({}): give the SLO absolute there or relative to solo here, not both", humantime::format_duration(d));
                    }
                }
            }
            let mine: Vec<&WorkloadDef> = self
                .workloads
                .iter()
                .filter(|w| &w.engine == name)
                .collect();
            if mine.is_empty() {
                bail!("{at}: engine {name} has no workload, so no solo run to take its SLO from");
            }
            for (metric, _) in &factors {
                if *metric == "e2el_p99" || mine.iter().any(|w| streamed(w)) {
                    continue;
                }
                let names: Vec<&str> = mine.iter().map(|w| w.name.as_str()).collect();
                bail!("{at}.{metric}: no workload of engine {name} is a streamed generate one ({}): its solo run measures no {} (use e2el_p99)", names.join(", "), if *metric == "ttft_p99" { "TTFT" } else { "TPOT" });
            }
        }
        Ok(())
    }

    /// Whether any condition runs under the gateway's SLO controller, and the field that
    /// asks for it.
    pub fn controlled(&self) -> Option<String> {
        if self
            .axes
            .as_ref()
            .is_some_and(|a| a.control.contains(&true))
        {
            return Some("axes.control".into());
        }
        self.conditions
            .iter()
            .flatten()
            .position(|c| c.control)
            .map(|i| format!("conditions[{i}].control"))
    }

    /// Workloads through the gateway (`via = "gateway"`, or every one when a condition is
    /// controlled) need a gateway, engines it can tell apart by model name, and no copies
    /// (the gateway would balance a tenant's copies as one); a controlled condition needs
    /// a latency engine with an SLO and a best-effort one in the template.
    fn validate_gateway_use(&self) -> Result<()> {
        let control = self.controlled();
        let engines = &self.deployment.engines;
        let copied = |engine: &str| {
            self.axes
                .iter()
                .flat_map(|a| a.copies.get(engine))
                .flatten()
                .chain(
                    self.conditions
                        .iter()
                        .flatten()
                        .flat_map(|c| c.copies.get(engine)),
                )
                .any(|&n| n > 1)
        };
        for (i, w) in self.workloads.iter().enumerate() {
            let at = format!("workloads[{i}] ({})", w.name);
            let through = match (w.via, &control) {
                (Some(Via::Engine), Some(field)) => bail!("{at}.via: \"engine\", but {field} runs conditions under the gateway's SLO controller, which sees only the requests through the gateway: remove via or set it to \"gateway\""),
                (Some(Via::Gateway), _) => format!("{at}.via"),
                (None, Some(field)) => field.clone(),
                (_, None) => continue,
            };
            if self.deployment.gateway.is_none() {
                bail!("{through}: workload {} goes through the gateway: add a [deployment.gateway] table (address = \"127.0.0.1:PORT\")", w.name);
            }
            if copied(&w.engine) {
                bail!("{through}: engine {} runs in copies, tenants of their own driven directly; through the gateway they would be balanced as one tenant", w.engine);
            }
            let (j, e) = engines
                .iter()
                .enumerate()
                .find(|(_, e)| e.name == w.engine)
                .expect("validated engine");
            if let Some(o) = engines
                .iter()
                .find(|o| o.name != e.name && o.served_name() == e.served_name())
            {
                bail!("deployment.engines[{j}] ({}).served_model_name: workload {} goes through the gateway, which routes by model name, and engine {} serves {:?} too: give each engine a served_model_name of its own", e.name, w.name, o.name, e.served_name());
            }
        }
        if let Some(field) = control {
            let latency = engines.iter().any(|e| {
                e.priority == deploy::spec::Priority::Latency
                    && (e.slo.is_some() || self.control_slo.contains_key(&e.name))
            });
            let best_effort = engines
                .iter()
                .any(|e| e.priority == deploy::spec::Priority::BestEffort);
            if !(latency && best_effort) {
                let have: Vec<String> = engines
                    .iter()
                    .map(|e| format!("{} {}", e.name, e.priority))
                    .collect();
                bail!("{field}: the controller keeps a latency engine's SLO by limiting the best-effort ones: give deployment.engines a priority = \"latency\" engine with an slo (or a [control_slo.<engine>]) and a priority = \"best-effort\" one (have: {})", have.join(", "));
            }
        }
        Ok(())
    }

    /// `axes.copies` and `conditions[].copies`: engines that exist, counts within
    /// [`MAX_COPIES`], no copies of an engine that is already one tenant balanced over
    /// replicas, and no workload named as another's copy would be.
    fn validate_copies(&self, engines: &[String]) -> Result<()> {
        let mut most: BTreeMap<&str, u32> = BTreeMap::new();
        let mut check = |name: &str, counts: &[u32], at: &str| -> Result<()> {
            let e = self
                .deployment
                .engines
                .iter()
                .find(|e| e.name == name)
                .ok_or_else(|| {
                    anyhow::anyhow!(
                        "{at}: no engine {name:?} in deployment.engines (have: {})",
                        engines.join(", ")
                    )
                })?;
            if counts.is_empty() {
                bail!("{at}: give at least one count");
            }
            if let Some(n) = counts.iter().find(|&&n| n > MAX_COPIES) {
                bail!("{at}: {n} copies; at most {MAX_COPIES}");
            }
            let copied = counts.iter().any(|&n| n > 1);
            if copied && e.replicas > 1 {
                bail!("{at}: engine {name} has replicas = {}, one tenant balanced by the gateway; copies make each replica a tenant of its own: give it replicas = 1 to copy it", e.replicas);
            }
            let m = most.entry(e.name.as_str()).or_insert(1);
            *m = (*m).max(counts.iter().copied().max().unwrap_or(1));
            Ok(())
        };
        if let Some(axes) = &self.axes {
            for (name, counts) in &axes.copies {
                check(name, counts, &format!("axes.copies.{name}"))?;
            }
        }
        for (i, c) in self.conditions.iter().flatten().enumerate() {
            for (name, n) in &c.copies {
                check(name, &[*n], &format!("conditions[{i}].copies.{name}"))?;
            }
            if !c.copies.is_empty() {
                let instances: u32 = engines
                    .iter()
                    .map(|e| c.copies.get(e).copied().unwrap_or(1))
                    .sum();
                if instances < 2 {
                    bail!("conditions[{i}].copies: {instances} engine copy in all; a co-located condition needs two or more (each engine alone is the implied solo baseline)");
                }
            }
        }
        for (engine, n) in most.into_iter().filter(|(_, n)| *n > 1) {
            for w in self.workloads.iter().filter(|w| w.engine == engine) {
                for k in 0..n {
                    let copy = crate::tenants::copy_name(&w.name, k);
                    if let Some(j) = self.workloads.iter().position(|o| o.name == copy) {
                        bail!("workloads[{j}] ({copy}).name: also the name of copy {k} of workload {} (engine {engine} runs in up to {n} copies); rename it", w.name);
                    }
                }
            }
        }
        Ok(())
    }

    /// An engine with `replicas` > 1 is one tenant whose requests the gateway balances over
    /// its replicas: the deployment needs a gateway, and no other engine may serve the same
    /// model name (the gateway routes by it, and would send the tenant's requests there too).
    fn validate_replicas(&self) -> Result<()> {
        let engines = &self.deployment.engines;
        for (i, e) in engines.iter().enumerate() {
            if e.replicas <= 1 || !self.workloads.iter().any(|w| w.engine == e.name) {
                continue;
            }
            let at = format!("deployment.engines[{i}] ({})", e.name);
            if self.deployment.gateway.is_none() {
                bail!("{at}.replicas: {} replicas of one tenant are balanced by the gateway: add a [deployment.gateway] table (address = \"127.0.0.1:PORT\")", e.replicas);
            }
            if let Some(o) = engines
                .iter()
                .find(|o| o.name != e.name && o.served_name() == e.served_name())
            {
                bail!("{at}.served_model_name: the gateway routes by model name and engine {} serves {:?} too, so this tenant's requests would reach it: give each engine a served_model_name of its own", o.name, e.served_name());
            }
        }
        Ok(())
    }

    fn validate_axes(&self, axes: &Axes, engines: &[String]) -> Result<()> {
        if !axes.mps_split.is_empty() && !axes.sharing.contains(&Sharing::Mps) {
            bail!("axes.mps_split: needs \"mps\" in axes.sharing");
        }
        for (i, s) in axes.mps_split.iter().enumerate() {
            check_split_u(s, engines, &format!("axes.mps_split[{i}]"))?;
        }
        for (i, s) in axes.memory_split.iter().enumerate() {
            check_split_f(s, engines, &format!("axes.memory_split[{i}]"))?;
        }
        for (w, axis) in &axes.load {
            let at = format!("axes.load.{w}");
            let def = self
                .workload(w)
                .ok_or_else(|| anyhow::anyhow!("{at}: no workload named {w:?}"))?;
            if axis.concurrency.contains(&0) {
                bail!("{at}.concurrency: levels must be at least 1");
            }
            if !axis.batch.is_empty() && def.kind == Kind::Generate {
                bail!("{at}.batch: only embed workloads take a batch");
            }
            if axis.batch.contains(&0) {
                bail!("{at}.batch: must be at least 1");
            }
            if axis.rate.iter().any(|r| matches!(r, Rate::OfSolo(_))) && def.concurrency.is_none() {
                bail!("{at}.rate: \"% of solo\" needs a closed-loop base load (workloads.{w}.concurrency) to measure solo capacity");
            }
        }
        Ok(())
    }

    fn check_load(&self, w: &str, l: &LoadOverride, at: &str) -> Result<()> {
        let def = self
            .workload(w)
            .ok_or_else(|| anyhow::anyhow!("{at}: no workload named {w:?}"))?;
        if l.concurrency.is_some() && l.rate.is_some() {
            bail!("{at}: give concurrency or rate, not both");
        }
        if l.concurrency == Some(0) || l.batch == Some(0) {
            bail!("{at}: concurrency and batch must be at least 1");
        }
        if l.batch.is_some() && def.kind == Kind::Generate {
            bail!("{at}.batch: only embed workloads take a batch");
        }
        if let Some(st) = &l.step {
            match (st.concurrency, st.rate) {
                (Some(_), Some(_)) => bail!("{at}.step: give concurrency or rate, not both"),
                (None, None) => {
                    bail!("{at}.step: give the load from the step on: concurrency or rate")
                }
                (Some(0), _) => bail!("{at}.step.concurrency: must be at least 1"),
                (None, Some(Rate::OfSolo(_))) if def.concurrency.is_none() => bail!("{at}.step.rate: \"% of solo\" needs a closed-loop base load (workloads.{w}.concurrency)"),
                _ => {}
            }
            if let StepAt::After(d) = st.at {
                if d.is_zero() || d >= self.duration {
                    bail!(
                        "{at}.step.at: {} is not inside the window (duration = {})",
                        st.at,
                        humantime::format_duration(self.duration)
                    );
                }
            }
        }
        if matches!(l.rate, Some(Rate::OfSolo(_))) && def.concurrency.is_none() {
            bail!("{at}.rate: \"% of solo\" needs a closed-loop base load (workloads.{w}.concurrency)");
        }
        Ok(())
    }
}

/// Whether a workload's requests are streamed generations: those whose solo run measures
/// TTFT and TPOT.
pub(crate) fn streamed(w: &WorkloadDef) -> bool {
    w.kind == Kind::Generate && !w.whole_responses()
}

/// `generate` or `embed`, as files write it.
pub(crate) fn kind_word(k: Kind) -> &'static str {
    match k {
        Kind::Generate => "generate",
        Kind::Embed => "embed",
    }
}

/// Fills the `[[workloads]]` tables that name a `preset` with the preset's kind, lengths
/// and load where the table does not give them; true when any did. Errors name the
/// workload's field.
fn expand_presets(table: &mut toml::Table) -> Result<bool> {
    let Some(toml::Value::Array(ws)) = table.get_mut("workloads") else {
        return Ok(false);
    };
    let mut any = false;
    for (i, w) in ws.iter_mut().enumerate() {
        let Some(t) = w.as_table_mut() else { continue };
        let Some(v) = t.get("preset") else { continue };
        let at = match t.get("name").and_then(|n| n.as_str()) {
            Some(n) => format!("workloads[{i}] ({n})"),
            None => format!("workloads[{i}]"),
        };
        let p = v.as_str().and_then(Preset::parse).ok_or_else(|| {
            anyhow::anyhow!(
                "{at}.preset: unknown preset {v} (known: {})",
                known_presets()
            )
        })?;
        if t.contains_key("input_tokens") {
            bail!("{at}.input_tokens: preset {p} sends its own fixed text; remove input_tokens");
        }
        let int = |n: u32| toml::Value::Integer(i64::from(n));
        t.entry("kind")
            .or_insert_with(|| toml::Value::String(kind_word(preset_kind(p)).into()));
        t.insert("input_tokens".into(), int(p.input_tokens()));
        if let Some(o) = preset_output_tokens(p) {
            t.entry("output_tokens").or_insert_with(|| int(o));
        }
        if !t.contains_key("concurrency") && !t.contains_key("rate") {
            if let Some(c) = preset_concurrency(p) {
                t.insert("concurrency".into(), int(c));
            }
        }
        if let Some(b) = preset_batch(p) {
            t.entry("batch").or_insert_with(|| int(b));
        }
        any = true;
    }
    Ok(any)
}

/// Checks the sharing modes the file names (`axes.sharing`, `conditions[].sharing`) before
/// they are read as deploy's [`Sharing`], so that a wrong one is named with its field.
fn check_sharing_names(table: &toml::Table) -> Result<()> {
    let axes = table
        .get("axes")
        .and_then(|a| a.get("sharing"))
        .and_then(|s| s.as_array());
    for (i, v) in axes.into_iter().flatten().enumerate() {
        if let Some(s) = v.as_str() {
            check_sharing(s, &format!("axes.sharing[{i}]"))?;
        }
    }
    let conditions = table.get("conditions").and_then(|c| c.as_array());
    for (i, c) in conditions.into_iter().flatten().enumerate() {
        if let Some(s) = c.get("sharing").and_then(|s| s.as_str()) {
            check_sharing(s, &format!("conditions[{i}].sharing"))?;
        }
    }
    Ok(())
}

/// Checks the `[control_slo]` tables before the file is read as typed values, so that an
/// unknown metric or a value that is not a factor is named with its key.
fn check_control_slo_table(table: &toml::Table) -> Result<()> {
    let Some(v) = table.get("control_slo") else {
        return Ok(());
    };
    let example = "e.g. [control_slo.gen] tpot_p99 = 1.25";
    let Some(engines) = v.as_table() else {
        bail!("control_slo: a table of engines, {example}");
    };
    for (engine, v) in engines {
        let at = format!("control_slo.{engine}");
        let Some(metrics) = v.as_table() else {
            bail!("{at}: a table of metrics, {example}");
        };
        for (metric, v) in metrics {
            if !RelativeSlo::METRICS.contains(&metric.as_str()) {
                bail!(
                    "{at}.{metric}: unknown metric (the gateway's SLO metrics: {})",
                    RelativeSlo::METRICS.join(", ")
                );
            }
            match v {
                toml::Value::Integer(_) | toml::Value::Float(_) => {}
                toml::Value::String(s) => bail!("{at}.{metric}: {s:?} is not a factor: give the factor of the solo run's p99 as a number (e.g. 1.25); an absolute objective goes in the engine's slo"),
                other => bail!("{at}.{metric}: {other} is not a factor: give the factor of the solo run's p99 as a number (e.g. 1.25)"),
            }
        }
    }
    Ok(())
}

fn check_sharing(s: &str, at: &str) -> Result<()> {
    match s {
        "solo" => bail!("{at}: solo baselines are implied for every engine; list only co-located modes (timeslice, mps, mig)"),
        other => other
            .parse::<Sharing>()
            .map(|_| ())
            .map_err(|why| anyhow::anyhow!("{at}: {why}")),
    }
}

fn check_split_u(s: &[u32], engines: &[String], at: &str) -> Result<()> {
    if s.len() != engines.len() {
        bail!(
            "{at}: {} values for {} engines ({}); give one percentage per engine",
            s.len(),
            engines.len(),
            engines.join(", ")
        );
    }
    if s.iter().any(|&p| p == 0 || p > 100) {
        bail!("{at}: each percentage must be in 1..=100");
    }
    Ok(())
}

fn check_split_f(s: &[f64], engines: &[String], at: &str) -> Result<()> {
    if s.len() != engines.len() {
        bail!(
            "{at}: {} values for {} engines ({}); give one fraction per engine",
            s.len(),
            engines.len(),
            engines.join(", ")
        );
    }
    if s.iter().any(|&f| !(f > 0.0 && f <= 1.0)) {
        bail!("{at}: each fraction must be in (0, 1]");
    }
    let sum: f64 = s.iter().sum();
    if sum > 1.0 + 1e-9 {
        bail!("{at}: fractions add up to {sum:.2}, over the whole GPU");
    }
    Ok(())
}

/// Engine names of a deployment template (`deployment.engines[].name`), each given and
/// given once.
pub fn engine_names(deployment: &DeploymentSpec) -> Result<Vec<String>> {
    if deployment.engines.is_empty() {
        bail!("deployment.engines: missing: at least one [[deployment.engines]] table is needed");
    }
    let mut names: Vec<String> = Vec::new();
    for (i, e) in deployment.engines.iter().enumerate() {
        if e.name.is_empty() {
            bail!("deployment.engines[{i}].name: missing");
        }
        if names.contains(&e.name) {
            bail!(
                "deployment.engines[{i}].name: duplicate engine name {:?}",
                e.name
            );
        }
        names.push(e.name.clone());
    }
    Ok(names)
}

#[cfg(test)]
mod tests {
    use super::*;

    pub(crate) const BASE: &str = r#"
name = "t"
warmup = "1s"
duration = "2s"
[deployment]
sharing = "timeslice"
[[deployment.engines]]
name = "gen"
kind = "builtin"
model = "preset:qwen3-tiny"
task = "generate"
port = 18100
[[deployment.engines]]
name = "emb"
kind = "builtin"
model = "preset:qwen3-tiny"
task = "embed"
port = 18200
[[workloads]]
name = "chat"
engine = "gen"
kind = "generate"
concurrency = 4
[[workloads]]
name = "vec"
engine = "emb"
kind = "embed"
concurrency = 2
batch = 8
"#;

    fn err(extra: &str) -> String {
        format!(
            "{:#}",
            Experiment::parse(&format!("{BASE}{extra}")).unwrap_err()
        )
    }

    #[test]
    fn parses_base_and_rates() {
        let e = Experiment::parse(&format!(
            "{BASE}[axes]\nsharing=[\"mps\"]\nmps_split=[[70,30]]\n[axes.load.vec]\nrate=[\"50% of solo\", 3, \"2.5/s\"]\n"
        ))
        .unwrap();
        assert_eq!(e.engines(), vec!["gen", "emb"]);
        let axes = e.axes.unwrap();
        assert_eq!(
            axes.load["vec"].rate,
            vec![
                Rate::OfSolo(50.0),
                Rate::PerSecond(3.0),
                Rate::PerSecond(2.5)
            ]
        );
        assert_eq!(e.warmup, Duration::from_secs(1));
    }

    #[test]
    fn unknown_keys_are_named() {
        let m = err("[axes]\nsharng = [\"mps\"]\n");
        assert!(m.contains("sharng"), "{m}");
        let m = Experiment::parse(&BASE.replace("concurrency = 4", "concurency = 4")).unwrap_err();
        assert!(format!("{m:#}").contains("concurency"), "{m:#}");
    }

    #[test]
    fn semantic_errors_name_the_field() {
        assert!(err("[axes]\nsharing=[\"solo\"]\n").contains("axes.sharing[0]"));
        assert!(err("[axes]\nsharing=[\"mps\"]\nmps_split=[[70]]\n").contains("axes.mps_split[0]"));
        assert!(
            err("[axes]\nsharing=[\"timeslice\"]\nmps_split=[[70,30]]\n").contains("needs \"mps\"")
        );
        assert!(err("[axes]\nmemory_split=[[0.7,0.6]]\n").contains("over the whole GPU"));
        assert!(err("[axes.load.nope]\nconcurrency=[1]\n").contains("axes.load.nope"));
        assert!(err("[axes.load.chat]\nbatch=[2]\n").contains("only embed"));
        assert!(err("[slo.nope]\nttft_p99=\"1s\"\n").contains("slo.nope"));
        assert!(err("[slo.chat]\nttft_p99=\"fast\"\n").contains("bad duration"));
        assert!(err("[axes.load.vec]\nrate=[\"half of solo\"]\n").contains("bad rate"));
        assert!(err("[axes]\n[[conditions]]\nsharing=\"mps\"\n").contains("give one of them"));
        let m =
            Experiment::parse(&BASE.replace("engine = \"emb\"", "engine = \"embx\"")).unwrap_err();
        assert!(
            format!("{m:#}").contains("workloads[1] (vec).engine"),
            "{m:#}"
        );
        let m = Experiment::parse(&BASE.replace("name = \"t\"", "name = \"a b\"")).unwrap_err();
        assert!(format!("{m:#}").contains("name:"), "{m:#}");
    }

    /// `[deployment]` is read once into deploy's spec, as `deploy` reads a file; results.json
    /// keeps it as a table of the file's form, and older files (the table as written) load
    /// to the same experiment.
    #[test]
    fn the_deployment_is_deploys_spec() {
        let e = Experiment::parse(BASE).unwrap();
        let d = &e.deployment;
        assert_eq!(d.sharing, Sharing::Timeslice);
        assert_eq!(d.engines[1].task, deploy::Task::Embed);
        assert_eq!(
            d.engines[0].start_timeout,
            deploy::spec::default_start_timeout(deploy::EngineKind::Builtin)
        );
        assert!(d.name.is_empty(), "the file names no deployment");
        let json = serde_json::to_value(&e).unwrap();
        assert!(json["deployment"].get("name").is_none(), "{json}");
        assert_eq!(
            serde_json::from_value::<Experiment>(json.clone()).unwrap(),
            e
        );
        let mut old = json;
        let raw: toml::Table = toml::from_str(BASE).unwrap();
        old["deployment"] = serde_json::to_value(&raw["deployment"]).unwrap();
        assert_eq!(serde_json::from_value::<Experiment>(old).unwrap(), e);
        let named =
            Experiment::parse(&BASE.replace("[deployment]\n", "[deployment]\nname = \"pair\"\n"))
                .unwrap();
        assert_eq!(named.deployment.name, "pair");
        // a wrong key or value in it is named as the deploy crate names it
        let m = format!(
            "{:#}",
            Experiment::parse(&BASE.replace("port = 18100", "prot = 18100")).unwrap_err()
        );
        assert!(m.contains("deployment: unknown field `prot`"), "{m}");
        let m = format!(
            "{:#}",
            Experiment::parse(&BASE.replace("sharing = \"timeslice\"", "sharing = \"mpss\""))
                .unwrap_err()
        );
        assert!(m.contains("deployment: unknown variant `mpss`"), "{m}");
    }

    #[test]
    fn sharing_modes_are_named_with_their_field() {
        let list = "[[conditions]]\nsharing = \"mps\"\n[[conditions]]\nsharing = \"gang\"\n";
        let m = err(list);
        assert!(
            m.contains(
                "conditions[1].sharing: unknown sharing mode \"gang\" (timeslice, mps or mig)"
            ),
            "{m}"
        );
        let m = err("[axes]\nsharing = [\"mps\", \"MIG\"]\n");
        assert!(
            m.contains("axes.sharing[1]: unknown sharing mode \"MIG\""),
            "{m}"
        );
        let e =
            Experiment::parse(&format!("{BASE}[axes]\nsharing = [\"mig\", \"mps\"]\n")).unwrap();
        assert_eq!(e.axes.unwrap().sharing, vec![Sharing::Mig, Sharing::Mps]);
    }

    /// Workloads that name a seed preset: the preset's kind, lengths and load unless the
    /// file gives them; what cannot go with a preset is refused with the field named.
    const SEEDS: &str = r#"
name = "s"
warmup = "1s"
duration = "2s"
[deployment]
[[deployment.engines]]
name = "gen"
[[deployment.engines]]
name = "emb"
[[workloads]]
name = "g"
engine = "gen"
preset = "seed-gen"
[[workloads]]
name = "e"
engine = "emb"
preset = "seed-embed"
concurrency = 128
"#;

    #[test]
    fn presets_fill_the_workload() {
        let e = Experiment::parse(SEEDS).unwrap();
        let g = e.workload("g").unwrap();
        assert_eq!(g.preset, Some(Preset::SeedGen));
        assert_eq!(g.kind, Kind::Generate);
        assert_eq!(
            (g.input_tokens, g.output_tokens, g.concurrency),
            (30, 512, Some(512))
        );
        assert!(g.ignore_eos);
        let v = e.workload("e").unwrap();
        assert_eq!(v.kind, Kind::Embed);
        assert_eq!(
            (v.input_tokens, v.concurrency, v.batch),
            (25, Some(128), Some(8))
        );
        // What the file gives wins: a shorter output, an open loop, a batch.
        let e = Experiment::parse(
            &SEEDS
                .replace(
                    "preset = \"seed-gen\"",
                    "preset = \"seed-gen\"\noutput_tokens = 16\nrate = 4.0",
                )
                .replace("concurrency = 128", "concurrency = 16\nbatch = 32"),
        )
        .unwrap();
        let g = e.workload("g").unwrap();
        assert_eq!((g.output_tokens, g.concurrency), (16, None));
        assert_eq!(g.rate, Some(Rate::PerSecond(4.0)));
        let v = e.workload("e").unwrap();
        assert_eq!((v.concurrency, v.batch), (Some(16), Some(32)));
        // results.json carries the parsed experiment: the preset goes with it.
        let json = serde_json::to_string(&e).unwrap();
        assert!(json.contains(r#""preset":"seed-gen""#), "{json}");
        let back: Experiment = serde_json::from_str(&json).unwrap();
        assert_eq!(back, e);
        // A file without presets keeps the parser's own errors, which point at the line.
        let m = format!(
            "{:#}",
            Experiment::parse(&BASE.replace("concurrency = 4", "concurrency = \"4\"")).unwrap_err()
        );
        assert!(m.contains("line"), "{m}");
    }

    #[test]
    fn preset_errors_name_the_field() {
        let bad = |from: &str, to: &str| {
            let text = SEEDS.replacen(from, to, 1);
            assert_ne!(text, SEEDS, "{from} not in the file");
            format!("{:#}", Experiment::parse(&text).unwrap_err())
        };
        let m = bad("\"seed-embed\"", "\"seed-nothing\"");
        assert!(
            m.contains("workloads[1] (e).preset: unknown preset \"seed-nothing\"")
                && m.contains("known: seed-gen, seed-embed"),
            "{m}"
        );
        let m = bad("\"seed-gen\"", "7");
        assert!(
            m.contains("workloads[0] (g).preset: unknown preset 7"),
            "{m}"
        );
        let m = bad(
            "preset = \"seed-gen\"",
            "preset = \"seed-gen\"\ninput_tokens = 128",
        );
        assert!(
            m.contains("workloads[0] (g).input_tokens: preset seed-gen sends its own fixed text"),
            "{m}"
        );
        let m = bad(
            "preset = \"seed-gen\"",
            "preset = \"seed-gen\"\nkind = \"embed\"",
        );
        assert!(
            m.contains("workloads[0] (g).kind: preset seed-gen is for generate workloads"),
            "{m}"
        );
        let m = bad("preset = \"seed-gen\"", "preset = \"seed-gen\"\nbatch = 8");
        assert!(m.contains("workloads[0] (g).batch: only embed"), "{m}");
        // Whole responses have no first token: a TTFT objective could never be judged.
        let m = format!(
            "{:#}",
            Experiment::parse(&format!("{SEEDS}[slo.g]\nttft_p99 = \"1s\"\n")).unwrap_err()
        );
        assert!(
            m.contains("slo.g.ttft_p99: workload g runs preset seed-gen, which is not streamed"),
            "{m}"
        );
        Experiment::parse(&format!("{SEEDS}[slo.g]\nlatency_p99 = \"30s\"\n")).unwrap();
        // validate checks it too, for an experiment not read from a file.
        let mut e = Experiment::parse(SEEDS).unwrap();
        e.workloads[1].kind = Kind::Generate;
        let m = format!("{:#}", e.validate().unwrap_err());
        assert!(
            m.contains("workloads[1] (e).kind: preset seed-embed is for embed workloads"),
            "{m}"
        );
    }

    #[test]
    fn load_names_the_file() {
        let m = Experiment::load(Path::new("/nonexistent/x.toml")).unwrap_err();
        assert!(format!("{m:#}").contains("/nonexistent/x.toml"));
    }

    #[test]
    fn copies_and_replicas_errors_name_the_field() {
        assert!(err("[axes.copies]\nnope = [2]\n").contains("axes.copies.nope: no engine \"nope\""));
        assert!(
            err("[axes.copies]\ngen = []\n").contains("axes.copies.gen: give at least one count")
        );
        assert!(
            err("[axes.copies]\ngen = [65]\n").contains("axes.copies.gen: 65 copies; at most 64")
        );
        let m = err("[[conditions]]\nsharing = \"timeslice\"\ncopies = { gen = 1, emb = 0 }\n");
        assert!(
            m.contains("conditions[0].copies: 1 engine copy in all"),
            "{m}"
        );
        // a workload named like a copy of another
        let m = format!(
            "{:#}",
            Experiment::parse(&format!(
                "{}[[workloads]]\nname = \"chat-1\"\nengine = \"emb\"\nkind = \"embed\"\nconcurrency = 1\n[axes.copies]\ngen = [2]\n",
                BASE
            ))
            .unwrap_err()
        );
        assert!(
            m.contains("workloads[2] (chat-1).name: also the name of copy 1 of workload chat"),
            "{m}"
        );
        // replicas of one tenant need the gateway, and a model name of their own
        let replicated = BASE.replace("port = 18100", "port = 18100\nreplicas = 2");
        let m = format!("{:#}", Experiment::parse(&replicated).unwrap_err());
        assert!(m.contains("deployment.engines[0] (gen).replicas: 2 replicas of one tenant are balanced by the gateway: add a [deployment.gateway] table"), "{m}");
        let gw = replicated.replace(
            "[deployment]\n",
            "[deployment.gateway]\naddress = \"127.0.0.1:18999\"\n[deployment]\n",
        );
        let m = format!("{:#}", Experiment::parse(&gw).unwrap_err());
        assert!(m.contains("deployment.engines[0] (gen).served_model_name: the gateway routes by model name and engine emb serves \"preset:qwen3-tiny\" too"), "{m}");
        let ok = gw.replace(
            "port = 18100\n",
            "port = 18100\nserved_model_name = \"pool\"\n",
        );
        let e = Experiment::parse(&ok).unwrap();
        assert_eq!(e.deployment.engines[0].replicas, 2);
        // copies of a replicated engine: one or the other
        let m = format!(
            "{:#}",
            Experiment::parse(&format!("{ok}[axes.copies]\ngen = [2]\n")).unwrap_err()
        );
        assert!(
            m.contains("axes.copies.gen: engine gen has replicas = 2"),
            "{m}"
        );
    }

    /// BASE with a gateway, a model name per engine, a latency generator and a best-effort
    /// embedder: what a controlled condition needs.
    fn controlled_base() -> String {
        BASE.replace("[deployment]\n", "[deployment.gateway]\naddress = \"127.0.0.1:18999\"\n[deployment]\n")
            .replace(
                "port = 18100",
                "port = 18100\nserved_model_name = \"g\"\npriority = \"latency\"\nslo = { ttft_p99 = \"300ms\" }",
            )
            .replace(
                "port = 18200",
                "port = 18200\nserved_model_name = \"e\"\npriority = \"best-effort\"",
            )
    }

    /// The controller as an axis and per condition: controlled cells beside the static
    /// ones (never under MIG), labelled, with the template's priorities kept only there.
    #[test]
    fn controlled_conditions_are_planned_beside_the_static_ones() {
        let e = Experiment::parse(&format!(
            "{}[axes]\nsharing = [\"timeslice\", \"mps\", \"mig\"]\nmps_default = true\ncontrol = [false, true]\n",
            controlled_base()
        ))
        .unwrap();
        assert_eq!(e.controlled().as_deref(), Some("axes.control"));
        let plan = crate::matrix::plan(&e);
        let co: Vec<(&str, bool)> = plan
            .iter()
            .filter(|c| !c.is_solo())
            .map(|c| (c.label.as_str(), c.control))
            .collect();
        assert_eq!(
            co.iter().map(|c| c.0).collect::<Vec<_>>(),
            vec![
                "timeslice: chat c=4, vec c=2 b=8",
                "timeslice controlled: chat c=4, vec c=2 b=8",
                "mps default: chat c=4, vec c=2 b=8",
                "mps default controlled: chat c=4, vec c=2 b=8",
                "mig: chat c=4, vec c=2 b=8",
            ]
        );
        assert!(co[1].1 && co[3].1 && !co[0].1);
        assert!(plan.iter().filter(|c| c.is_solo()).all(|c| !c.control));
        // solo gen, solo emb, then the co-located cells in the order above
        let (fixed, ctl) = (&plan[2], &plan[3]);
        assert!(ctl.control && !fixed.control);
        assert_ne!(fixed.deployment_key(), ctl.deployment_key());
        let d = crate::deployments::for_condition(&e, ctl).unwrap();
        assert_eq!(d.engines[0].priority, deploy::spec::Priority::Latency);
        assert_eq!(d.engines[1].priority, deploy::spec::Priority::BestEffort);
        let d = crate::deployments::for_condition(&e, fixed).unwrap();
        assert_eq!(d.engines[0].priority, deploy::spec::Priority::Normal);
        assert!(d.engines[0].slo.is_none());
        // results.json keeps the flag
        let json = serde_json::to_string(ctl).unwrap();
        assert!(json.contains("\"control\":true"), "{json}");
        assert!(!serde_json::to_string(fixed).unwrap().contains("control"));
        // an explicit list
        let e = Experiment::parse(&format!(
            "{}[[conditions]]\nsharing = \"mps\"\ncontrol = true\n",
            controlled_base()
        ))
        .unwrap();
        assert_eq!(e.controlled().as_deref(), Some("conditions[0].control"));
        assert!(crate::matrix::plan(&e).iter().any(|c| c.control));
    }

    #[test]
    fn control_and_via_errors_name_the_field() {
        let ctl = "[[conditions]]\nsharing = \"mps\"\ncontrol = true\n";
        // no gateway
        let m = err(ctl);
        assert!(
            m.contains("conditions[0].control: workload chat goes through the gateway: add a [deployment.gateway] table"),
            "{m}"
        );
        // no priorities
        let plain = BASE
            .replace(
                "[deployment]\n",
                "[deployment.gateway]\naddress = \"127.0.0.1:18999\"\n[deployment]\n",
            )
            .replace("port = 18100", "port = 18100\nserved_model_name = \"g\"");
        let m = format!(
            "{:#}",
            Experiment::parse(&format!("{plain}{ctl}")).unwrap_err()
        );
        assert!(
            m.contains("conditions[0].control: the controller keeps a latency engine's SLO by limiting the best-effort ones")
                && m.contains("have: gen normal, emb normal"),
            "{m}"
        );
        // one model name for both engines: the gateway cannot tell them apart
        let same = controlled_base().replace("served_model_name = \"g\"\n", "");
        let same = same.replace("served_model_name = \"e\"\n", "");
        let m = format!(
            "{:#}",
            Experiment::parse(&format!("{same}{ctl}")).unwrap_err()
        );
        assert!(
            m.contains("deployment.engines[0] (gen).served_model_name: workload chat goes through the gateway"),
            "{m}"
        );
        // a workload that insists on going to its engine
        let direct =
            controlled_base().replace("concurrency = 4\n", "concurrency = 4\nvia = \"engine\"\n");
        let m = format!(
            "{:#}",
            Experiment::parse(&format!("{direct}{ctl}")).unwrap_err()
        );
        assert!(
            m.contains("workloads[0] (chat).via: \"engine\", but conditions[0].control runs conditions under the gateway's SLO controller"),
            "{m}"
        );
        // via = "gateway" without a controller: a gateway is needed, and no copies
        let via = BASE.replace("concurrency = 4\n", "concurrency = 4\nvia = \"gateway\"\n");
        let m = format!("{:#}", Experiment::parse(&via).unwrap_err());
        assert!(
            m.contains("workloads[0] (chat).via: workload chat goes through the gateway: add a [deployment.gateway]"),
            "{m}"
        );
        let via =
            controlled_base().replace("concurrency = 4\n", "concurrency = 4\nvia = \"gateway\"\n");
        let e = Experiment::parse(&via).unwrap();
        assert_eq!(e.workloads[0].via, Some(Via::Gateway));
        let m = format!(
            "{:#}",
            Experiment::parse(&format!("{via}[axes.copies]\ngen = [2]\n")).unwrap_err()
        );
        assert!(
            m.contains("workloads[0] (chat).via: engine gen runs in copies"),
            "{m}"
        );
        let m = format!(
            "{:#}",
            Experiment::parse(&format!("{via}[axes]\nsharing = [\"mpx\"]\n")).unwrap_err()
        );
        assert!(m.contains("axes.sharing[0]"), "{m}");
        // MIG slices share no SMs
        let m = format!(
            "{:#}",
            Experiment::parse(&format!(
                "{}[[conditions]]\nsharing = \"mig\"\ncontrol = true\n",
                controlled_base()
            ))
            .unwrap_err()
        );
        assert!(
            m.contains(
                "conditions[0].control: the controller moves work between tenants that share SMs"
            ),
            "{m}"
        );
    }

    /// `[control_slo.<engine>]`: the controller's SLO as factors of the solo run, read,
    /// kept in results.json, and refused with the key and the reason when it cannot be used.
    #[test]
    fn control_slo_is_read_and_checked() {
        let ctl = "[[conditions]]\nsharing = \"timeslice\"\ncontrol = true\n";
        // the generator's TTFT absolute, its TPOT relative (an integer factor reads too)
        let base = controlled_base();
        let ok = format!("{base}{ctl}[control_slo.gen]\ntpot_p99 = 1.25\ne2el_p99 = 3\n");
        let e = Experiment::parse(&ok).unwrap();
        assert_eq!(
            e.control_slo["gen"],
            RelativeSlo {
                tpot_p99: Some(1.25),
                e2el_p99: Some(3.0),
                ttft_p99: None
            }
        );
        assert_eq!(
            e.control_slo["gen"].factors(),
            vec![("tpot_p99", 1.25), ("e2el_p99", 3.0)]
        );
        let json = serde_json::to_string(&e).unwrap();
        assert_eq!(serde_json::from_str::<Experiment>(&json).unwrap(), e);
        assert!(!serde_json::to_string(&Experiment::parse(BASE).unwrap())
            .unwrap()
            .contains("control_slo"));
        // only relative: the latency engine needs no absolute slo, and its deployment
        // validates with the stand-in before any solo has run
        let rel_only = base.replace("slo = { ttft_p99 = \"300ms\" }", "");
        assert_ne!(rel_only, base);
        let e = Experiment::parse(&format!(
            "{rel_only}{ctl}[control_slo.gen]\nttft_p99 = 2.0\n"
        ))
        .unwrap();
        let plan = crate::matrix::plan(&e);
        let mut d = crate::deployments::Deployments::check(&e, &plan).unwrap();
        let c = plan.iter().find(|c| c.control).unwrap();
        let spec = d.of(&e, c).unwrap().spec().clone();
        assert_eq!(
            spec.engines[0].slo.unwrap().ttft_p99,
            Some(crate::control_slo::STAND_IN)
        );
        // without it, the controller has nothing to keep
        let m = format!(
            "{:#}",
            Experiment::parse(&format!("{rel_only}{ctl}")).unwrap_err()
        );
        assert!(
            m.contains("conditions[0].control: the controller keeps a latency engine's SLO"),
            "{m}"
        );

        let bad = |extra: &str| {
            format!(
                "{:#}",
                Experiment::parse(&format!("{base}{ctl}{extra}")).unwrap_err()
            )
        };
        for (extra, want) in [
            (
                "[control_slo.nope]\ntpot_p99 = 1.25\n",
                "control_slo.nope: no engine \"nope\" in deployment.engines (have: gen, emb)",
            ),
            (
                "[control_slo.gen]\ntpot_p90 = 1.25\n",
                "control_slo.gen.tpot_p90: unknown metric (the gateway's SLO metrics: ttft_p99, tpot_p99, e2el_p99)",
            ),
            (
                "[control_slo.gen]\ntpot_p99 = 0\n",
                "control_slo.gen.tpot_p99: 0 is not a factor above zero",
            ),
            (
                "[control_slo.gen]\ntpot_p99 = -1.5\n",
                "control_slo.gen.tpot_p99: -1.5 is not a factor above zero",
            ),
            (
                "[control_slo.gen]\ntpot_p99 = nan\n",
                "control_slo.gen.tpot_p99: NaN is not a factor above zero",
            ),
            (
                "[control_slo.gen]\ntpot_p99 = \"3.5ms\"\n",
                "control_slo.gen.tpot_p99: \"3.5ms\" is not a factor: give the factor of the solo run's p99 as a number (e.g. 1.25); an absolute objective goes in the engine's slo",
            ),
            (
                "[control_slo.gen]\ntpot_p99 = true\n",
                "control_slo.gen.tpot_p99: true is not a factor",
            ),
            (
                "[control_slo.gen]\n",
                "control_slo.gen: empty: give at least one of ttft_p99, tpot_p99, e2el_p99",
            ),
            (
                "[control_slo]\ngen = 1.25\n",
                "control_slo.gen: a table of metrics",
            ),
            // the same metric absolute and relative
            (
                "[control_slo.gen]\nttft_p99 = 2\n",
                "control_slo.gen.ttft_p99: deployment.engines[0] (gen).slo.ttft_p99 is set too (300ms): give the SLO absolute there or relative to solo here, not both",
            ),
            (
                "[control_slo.emb]\ne2el_p99 = 2\n",
                "control_slo.emb: engine emb is best-effort: it gets what the others leave and cannot be promised an SLO",
            ),
        ] {
            let m = bad(extra);
            assert!(m.contains(want), "{extra:?}: {m}");
        }
        let m = format!(
            "{:#}",
            Experiment::parse(&format!("control_slo = 1.25\n{base}{ctl}")).unwrap_err()
        );
        assert!(
            m.contains("control_slo: a table of engines, e.g. [control_slo.gen] tpot_p99 = 1.25"),
            "{m}"
        );
        // no controlled condition: nothing would use it
        let m = format!(
            "{:#}",
            Experiment::parse(&format!("{base}[control_slo.gen]\ntpot_p99 = 1.25\n")).unwrap_err()
        );
        assert!(
            m.contains("control_slo.gen: no condition runs under the gateway's SLO controller"),
            "{m}"
        );
        // an engine whose workloads are not streamed measures no TPOT solo
        let whole = base.replace(
            "kind = \"generate\"\nconcurrency = 4",
            "preset = \"seed-gen\"\nconcurrency = 4",
        );
        assert_ne!(whole, base);
        let m = format!(
            "{:#}",
            Experiment::parse(&format!("{whole}{ctl}[control_slo.gen]\ntpot_p99 = 1.25\n"))
                .unwrap_err()
        );
        assert!(
            m.contains("control_slo.gen.tpot_p99: no workload of engine gen is a streamed generate one (chat): its solo run measures no TPOT (use e2el_p99)"),
            "{m}"
        );
        Experiment::parse(&format!("{whole}{ctl}[control_slo.gen]\ne2el_p99 = 1.25\n")).unwrap();
    }

    /// A load step in a condition: in the label and the load, given to the solo baseline
    /// too (the same offered load), with its errors named.
    #[test]
    fn load_steps_in_conditions() {
        let e = Experiment::parse(&format!(
            "{BASE}[[conditions]]\nsharing = \"mps\"\nload.vec = {{ concurrency = 1, step = {{ at = \"50%\", concurrency = 8 }} }}\n"
        ))
        .unwrap();
        let plan = crate::matrix::plan(&e);
        let co = plan.iter().find(|c| !c.is_solo()).unwrap();
        let step = co.loads["vec"].step.unwrap();
        assert_eq!(step.at, StepAt::Share(0.5));
        assert_eq!(
            step.at.resolve(Duration::from_secs(2)),
            Duration::from_secs(1)
        );
        assert_eq!(step.concurrency, Some(8));
        assert!(
            co.label.contains("vec c=1 b=8 step@50%:c=8"),
            "{}",
            co.label
        );
        assert!(plan
            .iter()
            .any(|c| c.is_solo() && c.loads.get("vec") == co.loads.get("vec")));
        let json = serde_json::to_string(&e).unwrap();
        assert_eq!(serde_json::from_str::<Experiment>(&json).unwrap(), e);
        let with = |step: &str| {
            format!(
                "{:#}",
                Experiment::parse(&format!(
                    "{BASE}[[conditions]]\nsharing = \"mps\"\nload.vec = {{ step = {step} }}\n"
                ))
                .unwrap_err()
            )
        };
        let m = with("{ at = \"1s\" }");
        assert!(
            m.contains("conditions[0].load.vec.step: give the load from the step on"),
            "{m}"
        );
        let m = with("{ at = \"1s\", concurrency = 2, rate = 3 }");
        assert!(
            m.contains("conditions[0].load.vec.step: give concurrency or rate, not both"),
            "{m}"
        );
        let m = with("{ at = \"2s\", concurrency = 2 }");
        assert!(
            m.contains(
                "conditions[0].load.vec.step.at: 2s is not inside the window (duration = 2s)"
            ),
            "{m}"
        );
        let m = with("{ at = \"150%\", concurrency = 2 }");
        assert!(m.contains("between 0% and 100%"), "{m}");
        let m = with("{ at = \"later\", concurrency = 2 }");
        assert!(m.contains("bad step time \"later\""), "{m}");
        let m = with("{ at = \"1s\", concurrency = 0 }");
        assert!(
            m.contains("conditions[0].load.vec.step.concurrency: must be at least 1"),
            "{m}"
        );
        // "% of solo" after the step needs the closed-loop base load, as a rate does
        let open = BASE.replace("concurrency = 2\nbatch = 8", "rate = 2.0\nbatch = 8");
        let m = format!(
            "{:#}",
            Experiment::parse(&format!(
                "{open}[[conditions]]\nsharing = \"mps\"\nload.vec = {{ step = {{ at = \"1s\", rate = \"400% of solo\" }} }}\n"
            ))
            .unwrap_err()
        );
        assert!(
            m.contains(
                "conditions[0].load.vec.step.rate: \"% of solo\" needs a closed-loop base load"
            ),
            "{m}"
        );
    }
}
