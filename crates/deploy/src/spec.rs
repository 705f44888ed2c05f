//! The deployment file: what runs where, shared how.
//!
//! A deployment is "these engines on this GPU, shared this way, behind this gateway".
//! The structs are plain serde data so the lab can build them in code as well as read
//! them from TOML. `parse` reads with `deny_unknown_fields` (a misspelt key is an error,
//! not a silently ignored setting); [`validate`], whose every message names the field and
//! the reason, is the one check of a spec and the only maker of a [`ValidDeployment`], the
//! value `plan` and `Deployment::up` take. Whether the engines fit the GPU's memory is the
//! plan's question, not validation's. `load` reads a file and validates it.

use std::collections::BTreeMap;
use std::fmt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// What an engine does with its model: the engine's own task type (`generate` / `embed`).
pub use engine::model_api::Task;

/// Which device the engines run on.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub enum GpuSelector {
    /// A GPU by its index as `nvidia-smi` numbers it.
    Index(u32),
    /// A GPU (or a MIG instance) by its UUID (`GPU-...` or `MIG-...`).
    Uuid(String),
    /// No GPU: engines run on the CPU; the only sharing is "together" (timeslice).
    #[default]
    Cpu,
}

impl GpuSelector {
    /// True when the engines run on the CPU.
    pub fn is_cpu(&self) -> bool {
        matches!(self, GpuSelector::Cpu)
    }

    /// The value of `CUDA_VISIBLE_DEVICES` that selects this GPU; `None` on the CPU.
    pub fn cuda_visible_devices(&self) -> Option<String> {
        match self {
            GpuSelector::Index(i) => Some(i.to_string()),
            GpuSelector::Uuid(u) => Some(u.clone()),
            GpuSelector::Cpu => None,
        }
    }
}

impl fmt::Display for GpuSelector {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            GpuSelector::Index(i) => write!(f, "{i}"),
            GpuSelector::Uuid(u) => f.write_str(u),
            GpuSelector::Cpu => f.write_str("cpu"),
        }
    }
}

impl Serialize for GpuSelector {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match self {
            GpuSelector::Index(i) => s.serialize_u32(*i),
            other => s.serialize_str(&other.to_string()),
        }
    }
}

impl<'de> Deserialize<'de> for GpuSelector {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Raw {
            Int(i64),
            Str(String),
        }
        match Raw::deserialize(d)? {
            Raw::Int(i) => u32::try_from(i).map(GpuSelector::Index).map_err(|_| {
                serde::de::Error::custom(format!("GPU index {i} is negative or too large"))
            }),
            Raw::Str(s) if s.eq_ignore_ascii_case("cpu") => Ok(GpuSelector::Cpu),
            Raw::Str(s) => match s.parse::<u32>() {
                Ok(i) => Ok(GpuSelector::Index(i)),
                Err(_) if s.starts_with("GPU-") || s.starts_with("MIG-") => {
                    Ok(GpuSelector::Uuid(s))
                }
                Err(_) => Err(serde::de::Error::custom(format!(
                    "`{s}` is not a GPU: use an index (0), a UUID (GPU-..., MIG-...) or \"cpu\""
                ))),
            },
        }
    }
}

/// How the engines share the GPU.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Sharing {
    /// The driver's default time-slicing: engines take turns; on the CPU, "together".
    #[default]
    Timeslice,
    /// One MPS daemon; each engine is a client with its own SM and memory limits.
    Mps,
    /// Each engine on its own MIG instance (`mig_device`).
    Mig,
}

impl Sharing {
    /// Every mode, in the order files list them.
    pub const ALL: [Sharing; 3] = [Sharing::Timeslice, Sharing::Mps, Sharing::Mig];

    /// The mode's name in files: `timeslice`, `mps`, `mig`.
    pub fn name(self) -> &'static str {
        match self {
            Sharing::Timeslice => "timeslice",
            Sharing::Mps => "mps",
            Sharing::Mig => "mig",
        }
    }
}

impl fmt::Display for Sharing {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl std::str::FromStr for Sharing {
    type Err = String;

    /// `timeslice`, `mps` or `mig`, as in files.
    fn from_str(s: &str) -> Result<Self, String> {
        Sharing::ALL
            .into_iter()
            .find(|m| m.name() == s)
            .ok_or_else(|| format!("unknown sharing mode {s:?} (timeslice, mps or mig)"))
    }
}

/// Which program serves an engine.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum EngineKind {
    /// `colocate serve`.
    #[default]
    Builtin,
    /// `vllm serve`.
    Vllm,
    /// `python3 -m sglang.launch_server`.
    Sglang,
    /// Hugging Face text-embeddings-inference (`text-embeddings-router`).
    Tei,
    /// Any command line; `{port}`, `{model}`, `{name}` are substituted.
    Command,
}

impl fmt::Display for EngineKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            EngineKind::Builtin => "builtin",
            EngineKind::Vllm => "vllm",
            EngineKind::Sglang => "sglang",
            EngineKind::Tei => "tei",
            EngineKind::Command => "command",
        })
    }
}

/// An engine's memory budget: absolute, or a fraction of the GPU's total memory.
///
/// In TOML: an integer (bytes), a size string (`"12GiB"`, `"500MB"`), a float in (0, 1]
/// (`0.4`) or a percentage string (`"40%"`).
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum MemoryBudget {
    /// Bytes.
    Bytes(u64),
    /// A fraction of the GPU's total memory, in (0, 1].
    Fraction(f64),
}

impl MemoryBudget {
    /// The budget in bytes given the GPU's total memory (needed for a fraction).
    pub fn bytes(&self, gpu_total: Option<u64>) -> Option<u64> {
        match *self {
            MemoryBudget::Bytes(b) => Some(b),
            MemoryBudget::Fraction(f) => gpu_total.map(|t| (t as f64 * f) as u64),
        }
    }
}

impl fmt::Display for MemoryBudget {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match *self {
            MemoryBudget::Bytes(b) => f.write_str(&crate::units::human_bytes(b)),
            MemoryBudget::Fraction(x) => write!(f, "{:.1}%", x * 100.0),
        }
    }
}

impl Serialize for MemoryBudget {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match *self {
            MemoryBudget::Bytes(b) => s.serialize_u64(b),
            MemoryBudget::Fraction(f) => s.serialize_f64(f),
        }
    }
}

impl<'de> Deserialize<'de> for MemoryBudget {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Raw {
            Int(i64),
            Float(f64),
            Str(String),
        }
        let bad = |what: String| serde::de::Error::custom(what);
        match Raw::deserialize(d)? {
            Raw::Int(i) if i > 0 => Ok(MemoryBudget::Bytes(i as u64)),
            Raw::Int(i) => Err(bad(format!("memory budget {i} must be positive"))),
            Raw::Float(f) if f > 0.0 && f <= 1.0 => Ok(MemoryBudget::Fraction(f)),
            Raw::Float(f) => Err(bad(format!(
                "memory fraction {f} must be in (0, 1]; give bytes as an integer or a string like \"12GiB\""
            ))),
            Raw::Str(s) => parse_budget(&s).map_err(bad),
        }
    }
}

/// Parses `"40%"`, `"12GiB"`, `"500MB"`, `"1024"`.
fn parse_budget(s: &str) -> Result<MemoryBudget, String> {
    let t = s.trim();
    if let Some(p) = t.strip_suffix('%') {
        let v: f64 = p
            .trim()
            .parse()
            .map_err(|_| format!("`{s}` is not a percentage"))?;
        if v <= 0.0 || v > 100.0 {
            return Err(format!("`{s}`: a percentage must be in (0, 100]"));
        }
        return Ok(MemoryBudget::Fraction(v / 100.0));
    }
    units::bytes::parse(t).map(MemoryBudget::Bytes)
}

// Durations (`"90s"`, `"2m"`, `"500ms"` or whole seconds) are read by the workspace's `units`
// crate, named `::units::duration` below: this crate's own `units` module holds byte sizes.

/// Byte sizes in TOML: an integer (bytes) or a size string (`"8GiB"`, `"500MB"`).
mod bytes_serde {
    use super::*;

    pub fn serialize<S: Serializer>(b: &Option<u64>, s: S) -> Result<S::Ok, S::Error> {
        match b {
            Some(b) => s.serialize_u64(*b),
            None => s.serialize_none(),
        }
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Option<u64>, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Raw {
            Int(i64),
            Str(String),
        }
        match Raw::deserialize(d)? {
            Raw::Int(i) if i > 0 => Ok(Some(i as u64)),
            Raw::Int(i) => Err(serde::de::Error::custom(format!(
                "{i} bytes: a size must be positive"
            ))),
            Raw::Str(s) => units::bytes::parse(&s)
                .map(Some)
                .map_err(serde::de::Error::custom),
        }
    }
}

/// `start_timeout` as read from a file that does not set it: [`parse`] replaces it with
/// the engine kind's default ([`default_start_timeout`]).
const START_TIMEOUT_UNSET: Duration = Duration::MAX;

fn start_timeout_unset() -> Duration {
    START_TIMEOUT_UNSET
}

/// How long an engine of this kind may take to answer `/health` when the file does not
/// say. vLLM compiles its model (torch.compile) and captures CUDA graphs before it
/// answers: 70-150 s on the H200 with a warm compile cache, minutes more without one.
pub fn default_start_timeout(kind: EngineKind) -> Duration {
    match kind {
        EngineKind::Vllm => Duration::from_secs(600),
        EngineKind::Sglang => Duration::from_secs(300),
        _ => Duration::from_secs(120),
    }
}

/// How the gateway treats an engine's requests when tenants compete (issue 18).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Priority {
    /// Latency-critical: never throttled; its `slo` drives the gateway's controller.
    Latency,
    /// Served as it comes, neither throttled nor protected (no `priority` given).
    #[default]
    Normal,
    /// Gets what the latency tenants leave: its requests in flight are limited by the
    /// controller, the rest wait in a bounded queue or are refused with 429.
    BestEffort,
}

impl Priority {
    /// The name in files: `latency`, `normal`, `best-effort`.
    pub fn name(self) -> &'static str {
        match self {
            Priority::Latency => "latency",
            Priority::Normal => "normal",
            Priority::BestEffort => "best-effort",
        }
    }
}

impl fmt::Display for Priority {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// A tenant's latency objectives: 99th percentiles as the gateway measures them on the
/// traffic it proxies (over [`ControlSpec::window`]), with vLLM's names: TTFT (to the first
/// streamed chunk), TPOT (a streamed request's mean gap between chunks, per second of a long stream), E2EL (the whole
/// request). In TOML: `slo = { ttft_p99 = "300ms", tpot_p99 = "40ms" }`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SloSpec {
    #[serde(
        with = "::units::duration::option",
        default,
        skip_serializing_if = "Option::is_none"
    )]
    pub ttft_p99: Option<Duration>,
    #[serde(
        with = "::units::duration::option",
        default,
        skip_serializing_if = "Option::is_none"
    )]
    pub tpot_p99: Option<Duration>,
    #[serde(
        with = "::units::duration::option",
        default,
        skip_serializing_if = "Option::is_none"
    )]
    pub e2el_p99: Option<Duration>,
}

impl SloSpec {
    /// Each objective that is set, by its field name.
    pub fn objectives(&self) -> Vec<(&'static str, Duration)> {
        [
            ("ttft_p99", self.ttft_p99),
            ("tpot_p99", self.tpot_p99),
            ("e2el_p99", self.e2el_p99),
        ]
        .into_iter()
        .filter_map(|(k, v)| v.map(|v| (k, v)))
        .collect()
    }

    /// The objective named as in [`Self::objectives`], to set; `None` for another name.
    pub fn objective_mut(&mut self, name: &str) -> Option<&mut Option<Duration>> {
        match name {
            "ttft_p99" => Some(&mut self.ttft_p99),
            "tpot_p99" => Some(&mut self.tpot_p99),
            "e2el_p99" => Some(&mut self.e2el_p99),
            _ => None,
        }
    }
}

/// One engine: a model served by one program, possibly as several replicas.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct EngineSpec {
    /// Unique name; replicas are named `NAME-0`, `NAME-1`, ...
    pub name: String,
    /// Which program serves it.
    pub kind: EngineKind,
    /// The model: `preset:NAME`, a Hugging Face folder or id.
    pub model: String,
    /// The name clients put in `model`; default: `model`.
    pub served_model_name: Option<String>,
    /// Generate or embed.
    pub task: Task,
    /// Port of the first replica; replica `i` listens on `port + i`.
    pub port: u16,
    /// Memory budget (bytes or fraction of the GPU).
    pub memory: Option<MemoryBudget>,
    /// MPS only: `CUDA_MPS_ACTIVE_THREAD_PERCENTAGE`.
    pub sm_percent: Option<u32>,
    /// MIG only: the MIG instance UUID (`MIG-...`) this engine runs on.
    pub mig_device: Option<String>,
    /// How many copies of this engine to run (each on its own port).
    pub replicas: u32,
    /// Extra arguments appended to the engine's command line.
    pub args: Vec<String>,
    /// Extra environment variables for the engine.
    pub env: BTreeMap<String, String>,
    /// `kind = "command"`: the command line; `{port}`, `{model}`, `{name}` substituted.
    pub command: Option<Vec<String>>,
    /// `--load-format` (e.g. `dummy` for random weights of the real shapes).
    pub load_format: Option<String>,
    /// The tokenizer, where it is not the model's own: `--tokenizer` (the built-in engine:
    /// a `tokenizer.json` or a folder with one, which a preset needs to count prompts as
    /// the real model does; vLLM) or `--tokenizer-path` (SGLang). TEI reads the model's.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tokenizer: Option<String>,
    /// Override the device flag of the built-in engine (`cpu` or `cuda`).
    pub device: Option<String>,
    /// How long the engine may take to answer `/health` after it is started (default:
    /// [`default_start_timeout`] of its kind: 600 s for vLLM, 120 s for the built-in one).
    #[serde(with = "::units::duration", default = "start_timeout_unset")]
    pub start_timeout: Duration,
    /// vLLM: the argv that runs vLLM's CLI, before `serve` (default `["vllm"]`; e.g.
    /// `["python3", "-m", "vllm.entrypoints.cli.main"]` for a wheel install without the
    /// console script).
    pub launcher: Option<Vec<String>>,
    /// vLLM: the version the command line is written for (`"0.26"`); without it `up`
    /// asks the launcher (`--version`) and `plan` assumes the one on the H200.
    pub vllm_version: Option<String>,
    /// `--max-num-seqs` (vLLM and the built-in engine).
    pub max_num_seqs: Option<u32>,
    /// `--max-model-len` (vLLM and the built-in engine).
    pub max_model_len: Option<u32>,
    /// `--max-num-batched-tokens` (vLLM and the built-in engine).
    pub max_num_batched_tokens: Option<u32>,
    /// vLLM: `--attention-backend` (e.g. `FLASH_ATTN`).
    pub attention_backend: Option<String>,
    /// vLLM: `--api-server-count`, front-end processes in front of one engine core.
    pub api_server_count: Option<u32>,
    /// vLLM: `--kv-cache-memory-bytes`, a KV cache of this size instead of what is left of
    /// the memory budget (bytes or `"8GiB"`).
    #[serde(with = "bytes_serde")]
    pub kv_cache_memory: Option<u64>,
    /// The GPUs this engine spans, by index (`gpus = [0, 1]`); default: the deployment's
    /// `gpu`. Several GPUs run the model with tensor parallelism across them (issue 19).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub gpus: Option<Vec<u32>>,
    /// vLLM / SGLang: `--tensor-parallel-size` / `--tp-size`; default: the number of
    /// `gpus`, which it must equal when given (one worker per GPU).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tensor_parallel_size: Option<u32>,
    /// How the gateway treats this engine's requests beside the others' (`latency`,
    /// `normal`, `best-effort`).
    pub priority: Priority,
    /// Latency objectives the gateway keeps (a `latency` engine needs one; a `normal`
    /// one's are measured and shown, not enforced).
    pub slo: Option<SloSpec>,
}

impl Default for EngineSpec {
    fn default() -> Self {
        EngineSpec {
            name: String::new(),
            kind: EngineKind::Builtin,
            model: String::new(),
            served_model_name: None,
            task: Task::Generate,
            port: 0,
            memory: None,
            sm_percent: None,
            mig_device: None,
            replicas: 1,
            args: Vec::new(),
            env: BTreeMap::new(),
            command: None,
            load_format: None,
            tokenizer: None,
            device: None,
            start_timeout: Duration::from_secs(120),
            launcher: None,
            vllm_version: None,
            max_num_seqs: None,
            max_model_len: None,
            max_num_batched_tokens: None,
            attention_backend: None,
            api_server_count: None,
            kv_cache_memory: None,
            gpus: None,
            tensor_parallel_size: None,
            priority: Priority::Normal,
            slo: None,
        }
    }
}

impl EngineSpec {
    /// The model name clients use.
    pub fn served_name(&self) -> &str {
        self.served_model_name.as_deref().unwrap_or(&self.model)
    }

    /// Names and ports of this engine's replicas.
    pub fn instances(&self) -> Vec<(String, u16)> {
        let n = self.replicas.max(1);
        (0..n)
            .map(|i| {
                let name = if n == 1 {
                    self.name.clone()
                } else {
                    format!("{}-{i}", self.name)
                };
                (name, self.port.saturating_add(i as u16))
            })
            .collect()
    }
}

/// The gateway: one OpenAI endpoint in front of every engine.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct GatewaySpec {
    /// `HOST:PORT` to listen on; default `127.0.0.1:8080`.
    pub address: String,
    /// Served model names it routes; empty = every engine's model.
    pub models: Vec<String>,
    /// How long in-flight requests may take to finish at shutdown.
    #[serde(with = "::units::duration")]
    pub drain_timeout: Duration,
    /// The SLO controller's settings (used when an engine has a `priority`).
    pub control: ControlSpec,
}

impl Default for GatewaySpec {
    fn default() -> Self {
        GatewaySpec {
            address: "127.0.0.1:8080".into(),
            models: Vec::new(),
            drain_timeout: Duration::from_secs(30),
            control: ControlSpec::default(),
        }
    }
}

/// `[gateway.control]`: how the gateway keeps the latency engines' SLOs by limiting the
/// best-effort engines' requests in flight (additive increase, multiplicative decrease).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ControlSpec {
    /// How often the controller looks at the measured latency and moves the limit.
    #[serde(with = "::units::duration")]
    pub interval: Duration,
    /// The sliding window the p99 latencies are measured over.
    #[serde(with = "::units::duration")]
    pub window: Duration,
    /// The fewest best-effort requests in flight the controller goes down to (0: all
    /// best-effort work pauses while a latency engine is over its SLO).
    pub min_best_effort: u32,
    /// The most best-effort requests in flight (also the limit it starts from).
    pub max_best_effort: u32,
    /// Best-effort requests that may wait for a place, per engine; beyond: 429.
    pub queue: u32,
    /// How long a best-effort request may wait for a place before it gets 429.
    #[serde(with = "::units::duration")]
    pub queue_timeout: Duration,
    /// Tokens of engine compute share per best-effort place. With it the controller also
    /// moves the lever inside every best-effort built-in engine: its
    /// `/admin/compute-share` cap on embedding tokens in flight is set to limit x this,
    /// and lifted while the limit is at `max_best_effort`. Other engines have no lever.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub engine_share_tokens: Option<u32>,
    /// The duty cycle, in percent of the time, that best-effort built-in engines get at
    /// the floor of the limit (`min_best_effort`): pacing, the second engine lever. It
    /// rises in a line with the limit to none at `max_best_effort`. Other engines have no
    /// lever.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub engine_duty_floor: Option<u32>,
    /// The percentage of the GPU's SMs that best-effort built-in engines get at the floor
    /// of the limit (`min_best_effort`): an SM partition, the third engine lever. It rises
    /// in a line with the limit to none (the whole GPU) at `max_best_effort`. Only an
    /// engine started with `--sm-partitions` takes it (it runs each embedding batch on its
    /// smallest partition with at least that share of the SMs); the others refuse it, and
    /// keep the other levers.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub engine_sm_floor: Option<u32>,
    /// The pressure (a latency tenant's p99 over its SLO) above which the limit halves:
    /// below 1.0 the controller acts before the SLO is missed.
    pub decrease_above: f64,
    /// The pressure below which the limit grows by one (headroom).
    pub increase_below: f64,
}

impl Default for ControlSpec {
    fn default() -> Self {
        ControlSpec {
            interval: Duration::from_millis(200),
            window: Duration::from_secs(10),
            min_best_effort: 1,
            max_best_effort: 64,
            queue: 256,
            queue_timeout: Duration::from_secs(30),
            engine_share_tokens: None,
            engine_duty_floor: None,
            engine_sm_floor: None,
            decrease_above: crate::gateway::controller::DECREASE_ABOVE,
            increase_below: crate::gateway::controller::INCREASE_BELOW,
        }
    }
}

impl GatewaySpec {
    /// The port part of `address`, if it parses.
    pub fn port(&self) -> Option<u16> {
        self.address
            .rsplit_once(':')
            .and_then(|(_, p)| p.parse().ok())
    }
}

/// How the supervisor treats crashes.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SuperviseSpec {
    /// Give up on an engine after this many crashes (the deployment then reports why).
    pub max_failures: u32,
    /// First restart delay; doubles with each failure.
    #[serde(with = "::units::duration")]
    pub backoff_initial: Duration,
    /// Longest restart delay.
    #[serde(with = "::units::duration")]
    pub backoff_max: Duration,
    /// Time between SIGTERM and SIGKILL when stopping an engine.
    #[serde(with = "::units::duration")]
    pub stop_timeout: Duration,
}

impl Default for SuperviseSpec {
    fn default() -> Self {
        SuperviseSpec {
            max_failures: 5,
            backoff_initial: Duration::from_millis(500),
            backoff_max: Duration::from_secs(30),
            stop_timeout: Duration::from_secs(10),
        }
    }
}

/// A whole deployment.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DeploymentSpec {
    /// Name (used for the run folder).
    pub name: String,
    /// The GPU (index, UUID) or `"cpu"`.
    pub gpu: GpuSelector,
    /// A GPU model name from the catalogue (e.g. `"H100-SXM-80GB"`), for `plan` on a machine
    /// without that GPU.
    pub gpu_name: Option<String>,
    /// How engines share the GPU.
    pub sharing: Sharing,
    /// The engines, in start order.
    pub engines: Vec<EngineSpec>,
    /// The gateway; none = engines are reached directly.
    pub gateway: Option<GatewaySpec>,
    /// Where `up` writes logs and state; default `runs/up-<time>`.
    pub run_dir: Option<PathBuf>,
    /// Crash handling.
    pub supervise: SuperviseSpec,
}

impl Default for DeploymentSpec {
    fn default() -> Self {
        DeploymentSpec {
            name: "deployment".into(),
            gpu: GpuSelector::Cpu,
            gpu_name: None,
            sharing: Sharing::Timeslice,
            engines: Vec::new(),
            gateway: None,
            run_dir: None,
            supervise: SuperviseSpec::default(),
        }
    }
}

impl DeploymentSpec {
    /// The spec as a deployment file that [`parse`] reads back to the same spec (the lab's
    /// recommended deployment). Settings at their defaults are left out, except those that
    /// say what runs: the deployment's name, GPU and sharing mode, and each engine's name,
    /// kind, model, task and port.
    pub fn to_toml(&self) -> anyhow::Result<String> {
        let mut top = table_of(self)?;
        let always = ["name", "gpu", "sharing", "engines", "gateway", "supervise"];
        at_defaults_left_out(&mut top, &table_of(&DeploymentSpec::default())?, &always);
        if let Some(toml::Value::Table(t)) = top.get_mut("supervise") {
            at_defaults_left_out(t, &table_of(&SuperviseSpec::default())?, &[]);
            if t.is_empty() {
                top.remove("supervise");
            }
        }
        if let Some(toml::Value::Table(t)) = top.get_mut("gateway") {
            // kept when empty: `[gateway]` alone asks for the default gateway
            at_defaults_left_out(t, &table_of(&GatewaySpec::default())?, &[]);
        }
        if let Some(toml::Value::Array(engines)) = top.get_mut("engines") {
            for (v, e) in engines.iter_mut().zip(&self.engines) {
                let Some(t) = v.as_table_mut() else { continue };
                let default = EngineSpec {
                    kind: e.kind,
                    start_timeout: default_start_timeout(e.kind),
                    ..EngineSpec::default()
                };
                let always = ["name", "kind", "model", "task", "port"];
                at_defaults_left_out(t, &table_of(&default)?, &always);
            }
        }
        Ok(toml::to_string_pretty(&top)?)
    }
}

/// A serialisable value as a TOML table.
fn table_of<T: Serialize>(v: &T) -> anyhow::Result<toml::Table> {
    match toml::Value::try_from(v)? {
        toml::Value::Table(t) => Ok(t),
        other => anyhow::bail!("not a table: {other}"),
    }
}

/// Removes the keys of `t` whose value is the one in `defaults`, but those in `keep`.
fn at_defaults_left_out(t: &mut toml::Table, defaults: &toml::Table, keep: &[&str]) {
    t.retain(|k, v| keep.contains(&k) || defaults.get(k) != Some(&*v));
}

/// Reads, parses and validates a deployment file. Errors name the file, the field and the
/// reason.
pub fn load(path: &Path) -> anyhow::Result<ValidDeployment> {
    let spec = read(path)?;
    validate(spec).map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))
}

/// Reads and parses a deployment file (no validation: for a caller that edits the spec
/// first, as `colocate plan --gpu-name` does). Errors name the file.
pub fn read(path: &Path) -> anyhow::Result<DeploymentSpec> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| anyhow::anyhow!("{}: cannot read the deployment file: {e}", path.display()))?;
    parse(&text).map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))
}

/// Parses TOML text into a spec (no validation).
pub fn parse(text: &str) -> anyhow::Result<DeploymentSpec> {
    let spec = toml::from_str::<DeploymentSpec>(text).map_err(|e| {
        // toml's message already names the key and shows the line; keep it on one block.
        anyhow::anyhow!("{}", e.to_string().trim_end())
    })?;
    Ok(with_kind_defaults(spec))
}

/// A spec from an already parsed TOML table, as [`parse`] reads it from text (no
/// validation): the lab's `[deployment]`, which is a table inside the experiment file.
pub fn from_table(table: toml::Table) -> anyhow::Result<DeploymentSpec> {
    let spec: DeploymentSpec = toml::Value::Table(table)
        .try_into()
        .map_err(|e: toml::de::Error| anyhow::anyhow!("{}", e.to_string().trim_end()))?;
    Ok(with_kind_defaults(spec))
}

/// Gives each engine whose file did not set `start_timeout` its kind's default.
fn with_kind_defaults(mut spec: DeploymentSpec) -> DeploymentSpec {
    for e in &mut spec.engines {
        if e.start_timeout == START_TIMEOUT_UNSET {
            e.start_timeout = default_start_timeout(e.kind);
        }
    }
    spec
}

/// A deployment that passed [`validate`], the only function that makes one: what
/// [`crate::plan::plan`] and [`crate::Deployment::up`] take, so a spec is checked once
/// however many steps read it. To change it, take the spec out ([`Self::into_spec`]) and
/// validate again.
#[derive(Debug, Clone, PartialEq)]
pub struct ValidDeployment(DeploymentSpec);

impl ValidDeployment {
    /// The spec, to read.
    pub fn spec(&self) -> &DeploymentSpec {
        &self.0
    }

    /// The spec, to edit (and validate again).
    pub fn into_spec(self) -> DeploymentSpec {
        self.0
    }
}

/// Every problem found in a spec, one per line, each `field: reason`.
#[derive(Debug, Clone, PartialEq)]
pub struct ValidationErrors(pub Vec<(String, String)>);

impl fmt::Display for ValidationErrors {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, (field, reason)) in self.0.iter().enumerate() {
            if i > 0 {
                f.write_str("\n")?;
            }
            write!(f, "{field}: {reason}")?;
        }
        Ok(())
    }
}

impl std::error::Error for ValidationErrors {}

/// Problems with the engine options that only some kinds take (vLLM's launcher and
/// version, the scheduler limits), and with flags given twice: once by a field and again in
/// `args` (vLLM's parser would silently keep the last).
fn engine_options_problems(e: &EngineSpec) -> Vec<(&'static str, String)> {
    let mut out = Vec::new();
    let vllm = e.kind == EngineKind::Vllm;
    let only_vllm = |field: &'static str, set: bool, out: &mut Vec<(&'static str, String)>| {
        if set && !vllm {
            out.push((
                field,
                format!(
                    "only kind = \"vllm\" takes {field} (kind is \"{}\")",
                    e.kind
                ),
            ));
        }
    };
    only_vllm("launcher", e.launcher.is_some(), &mut out);
    only_vllm("vllm_version", e.vllm_version.is_some(), &mut out);
    only_vllm("attention_backend", e.attention_backend.is_some(), &mut out);
    only_vllm("api_server_count", e.api_server_count.is_some(), &mut out);
    only_vllm("kv_cache_memory", e.kv_cache_memory.is_some(), &mut out);
    if matches!(&e.launcher, Some(l) if l.is_empty() || l.iter().any(|w| w.trim().is_empty())) {
        out.push((
            "launcher",
            "empty: write the argv before `serve`, e.g. [\"python3\", \"-m\", \"vllm.entrypoints.cli.main\"]"
                .into(),
        ));
    }
    if let (true, Some(v)) = (vllm, &e.vllm_version) {
        if let Err(why) = crate::vllm::VllmVersion::parse(v) {
            out.push(("vllm_version", why));
        }
    }
    if matches!(&e.attention_backend, Some(b) if b.trim().is_empty()) {
        out.push(("attention_backend", "empty: e.g. \"FLASH_ATTN\"".into()));
    }
    if e.api_server_count == Some(0) {
        out.push(("api_server_count", "must be at least 1".into()));
    }
    match &e.tokenizer {
        Some(_) if matches!(e.kind, EngineKind::Tei | EngineKind::Command) => out.push((
            "tokenizer",
            format!(
                "only kind = \"builtin\", \"vllm\" or \"sglang\" take tokenizer (kind is \"{}\")",
                e.kind
            ),
        )),
        Some(t) if t.trim().is_empty() => out.push((
            "tokenizer",
            "empty: a tokenizer.json, a folder with one, or a Hugging Face id".into(),
        )),
        _ => {}
    }
    let scheduler = [
        ("max_num_seqs", e.max_num_seqs),
        ("max_model_len", e.max_model_len),
        ("max_num_batched_tokens", e.max_num_batched_tokens),
    ];
    for (field, v) in scheduler {
        match v {
            Some(_) if !matches!(e.kind, EngineKind::Vllm | EngineKind::Builtin) => out.push((
                field,
                format!(
                    "only kind = \"vllm\" or \"builtin\" take {field}; pass {}'s own flag in args",
                    e.kind
                ),
            )),
            Some(0) => out.push((field, "must be at least 1".into())),
            _ => {}
        }
    }
    if matches!(e.kind, EngineKind::Vllm | EngineKind::Builtin) {
        let given = crate::vllm::flags_in(&e.args);
        let by_field: [(&str, &str, bool); 10] = [
            ("--max-num-seqs", "max_num_seqs", e.max_num_seqs.is_some()),
            (
                "--max-model-len",
                "max_model_len",
                e.max_model_len.is_some(),
            ),
            (
                "--max-num-batched-tokens",
                "max_num_batched_tokens",
                e.max_num_batched_tokens.is_some(),
            ),
            (
                "--attention-backend",
                "attention_backend",
                e.attention_backend.is_some(),
            ),
            (
                "--api-server-count",
                "api_server_count",
                e.api_server_count.is_some(),
            ),
            (
                "--kv-cache-memory-bytes",
                "kv_cache_memory",
                e.kv_cache_memory.is_some(),
            ),
            ("--gpu-memory-utilization", "memory", e.memory.is_some()),
            ("--load-format", "load_format", e.load_format.is_some()),
            ("--tokenizer", "tokenizer", e.tokenizer.is_some()),
            ("--served-model-name", "served_model_name", true),
        ];
        for (flag, field, set) in by_field {
            if set && given.iter().any(|g| g == flag) {
                out.push((
                    "args",
                    format!("{flag} is also set by {field}: keep one (the field)"),
                ));
            }
        }
        for flag in ["--port", "--host", "--task", "--runner", "--convert"] {
            if given.iter().any(|g| g == flag) {
                let field = if matches!(flag, "--port" | "--host") {
                    "port"
                } else {
                    "task"
                };
                out.push((
                    "args",
                    format!("{flag} is colocate's to set (from {field}): remove it from args"),
                ));
            }
        }
    }
    out
}

/// Problems with an engine's `priority` and `slo`: a latency engine needs an SLO to keep,
/// a best-effort one cannot be promised one, an embedding engine's answers are not
/// streamed (so it has no TTFT or TPOT), and only a gateway can enforce any of it.
fn priority_problems(e: &EngineSpec, has_gateway: bool) -> Vec<(&'static str, String)> {
    let mut out = Vec::new();
    if !has_gateway && (e.priority != Priority::Normal || e.slo.is_some()) {
        let field = if e.priority != Priority::Normal {
            "priority"
        } else {
            "slo"
        };
        out.push((
            field,
            "needs a [gateway]: the gateway measures latency and enforces priorities".into(),
        ));
    }
    match (&e.slo, e.priority) {
        (None, Priority::Latency) => out.push((
            "slo",
            "missing: priority = \"latency\" needs an SLO to keep, e.g. slo = { ttft_p99 = \"300ms\" }"
                .into(),
        )),
        (Some(_), Priority::BestEffort) => out.push((
            "slo",
            "a best-effort engine gets what the others leave and cannot be promised an SLO: remove slo or use priority = \"normal\"".into(),
        )),
        _ => {}
    }
    if let Some(slo) = &e.slo {
        if slo.objectives().is_empty() {
            out.push((
                "slo",
                "empty: give at least one of ttft_p99, tpot_p99, e2el_p99".into(),
            ));
        }
        for (name, d) in slo.objectives() {
            let field = match name {
                "ttft_p99" => "slo.ttft_p99",
                "tpot_p99" => "slo.tpot_p99",
                _ => "slo.e2el_p99",
            };
            if d.is_zero() {
                out.push((field, "must be longer than zero".into()));
            } else if e.task == Task::Embed && name != "e2el_p99" {
                out.push((
                    field,
                    "an embedding engine's answers are not streamed, so they have no first token or token gaps: use e2el_p99".into(),
                ));
            }
        }
    }
    out
}

/// Problems with `[gateway.control]`.
fn control_problems(c: &ControlSpec) -> Vec<(&'static str, String)> {
    let mut out = Vec::new();
    if c.interval.is_zero() {
        out.push(("interval", "must be longer than zero".into()));
    }
    if c.window < c.interval {
        out.push((
            "window",
            format!(
                "{} is shorter than interval ({}): the controller would look at no sample",
                ::units::duration::format(c.window),
                ::units::duration::format(c.interval)
            ),
        ));
    }
    if c.max_best_effort == 0 {
        out.push((
            "max_best_effort",
            "must be at least 1: best-effort engines would never be served".into(),
        ));
    }
    if c.min_best_effort > c.max_best_effort {
        out.push((
            "min_best_effort",
            format!(
                "{} is above max_best_effort ({})",
                c.min_best_effort, c.max_best_effort
            ),
        ));
    }
    if c.engine_share_tokens == Some(0) {
        out.push((
            "engine_share_tokens",
            "must be at least 1 (leave it out for no engine lever)".into(),
        ));
    }
    if c.engine_duty_floor.is_some_and(|p| !(1..=99).contains(&p)) {
        out.push((
            "engine_duty_floor",
            "must be a percentage from 1 to 99 (leave it out for no pacing)".into(),
        ));
    }
    if !(c.decrease_above > 0.0 && c.decrease_above <= 1.0) {
        out.push((
            "decrease_above",
            format!(
                "must be above 0 and at most 1.0 (a fraction of the SLO), got {}",
                c.decrease_above
            ),
        ));
    } else if !(c.increase_below > 0.0 && c.increase_below < c.decrease_above) {
        out.push((
            "increase_below",
            format!(
                "must be above 0 and below decrease_above ({}), got {}",
                c.decrease_above, c.increase_below
            ),
        ));
    }
    if c.engine_sm_floor.is_some_and(|p| !(1..=99).contains(&p)) {
        out.push((
            "engine_sm_floor",
            "must be a percentage from 1 to 99 (leave it out for the whole GPU)".into(),
        ));
    }
    if c.queue > 0 && c.queue_timeout.is_zero() {
        out.push((
            "queue_timeout",
            "must be longer than zero (queue = 0 refuses at once instead)".into(),
        ));
    }
    out
}

/// Checks what the types cannot: names, ports, budgets, sharing-mode settings. Every
/// problem is reported, one per line, each as `field: reason`. Whether the budgets fit the
/// GPU's memory is left to the plan, which knows the GPU.
pub fn validate(spec: DeploymentSpec) -> anyhow::Result<ValidDeployment> {
    let mut errs: Vec<(String, String)> = Vec::new();
    let mut err = |field: String, reason: String| errs.push((field, reason));

    if spec.engines.is_empty() {
        err(
            "engines".into(),
            "no engine: add at least one [[engines]] table".into(),
        );
    }
    if spec.gpu.is_cpu() && spec.sharing != Sharing::Timeslice {
        err(
            "sharing".into(),
            format!(
                "sharing = \"{}\" needs a GPU; on gpu = \"cpu\" engines can only run together (sharing = \"timeslice\")",
                spec.sharing
            ),
        );
    }

    let mut names: BTreeMap<String, usize> = BTreeMap::new();
    let mut ports: BTreeMap<u16, String> = BTreeMap::new();
    for (i, e) in spec.engines.iter().enumerate() {
        let at = |f: &str| format!("engines[{i}].{f}");
        if e.name.trim().is_empty() {
            err(at("name"), "missing: every engine needs a name".into());
        } else if !e
            .name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_' || c == '.')
        {
            err(
                at("name"),
                format!("`{}`: use letters, digits, '-', '_' or '.'", e.name),
            );
        } else if let Some(j) = names.insert(e.name.clone(), i) {
            err(
                at("name"),
                format!("`{}` is already the name of engines[{j}]", e.name),
            );
        }
        if e.model.trim().is_empty() && e.kind != EngineKind::Command {
            err(
                at("model"),
                "missing: the model to serve (`preset:NAME`, a folder or a Hugging Face id)".into(),
            );
        }
        if e.kind == EngineKind::Command {
            match &e.command {
                None => err(
                    at("command"),
                    "missing: kind = \"command\" needs command = [\"prog\", \"arg\", ...]".into(),
                ),
                Some(c) if c.is_empty() => err(at("command"), "empty command".into()),
                _ => {}
            }
        } else if e.command.is_some() {
            err(
                at("command"),
                format!(
                    "only kind = \"command\" takes a command (kind is \"{}\")",
                    e.kind
                ),
            );
        }
        if e.replicas == 0 {
            err(at("replicas"), "must be at least 1".into());
        }
        if e.port == 0 {
            err(
                at("port"),
                "missing: every engine needs a port (1-65535)".into(),
            );
        } else {
            if e.port as u32 + e.replicas.max(1) - 1 > u16::MAX as u32 {
                err(at("port"), "replica ports run past 65535".into());
            }
            for (inst, port) in e.instances() {
                if let Some(other) = ports.insert(port, inst.clone()) {
                    err(at("port"), format!("port {port} clashes with {other}"));
                }
            }
        }
        if e.task == Task::Embed && e.kind == EngineKind::Tei {
            // fine: TEI is embed-only
        } else if e.task == Task::Generate && e.kind == EngineKind::Tei {
            err(
                at("task"),
                "TEI only serves embeddings: use task = \"embed\"".into(),
            );
        }
        if let Some(sm) = e.sm_percent {
            if spec.sharing != Sharing::Mps {
                err(
                    at("sm_percent"),
                    format!(
                        "MPS setting with sharing = \"{}\": sm_percent needs sharing = \"mps\"",
                        spec.sharing
                    ),
                );
            } else if sm == 0 || sm > 100 {
                err(
                    at("sm_percent"),
                    format!("{sm} is not a percentage in 1..=100"),
                );
            }
        }
        if let Some(m) = &e.mig_device {
            if spec.sharing != Sharing::Mig {
                err(
                    at("mig_device"),
                    format!(
                        "MIG instance with sharing = \"{}\": mig_device needs sharing = \"mig\"",
                        spec.sharing
                    ),
                );
            } else if !m.starts_with("MIG-") {
                err(
                    at("mig_device"),
                    format!("`{m}` is not a MIG instance UUID (MIG-...)"),
                );
            }
        } else if spec.sharing == Sharing::Mig {
            err(
                at("mig_device"),
                "missing: sharing = \"mig\" needs each engine's MIG instance UUID".into(),
            );
        }
        if let Some(d) = &e.device {
            if d != "cpu" && d != "cuda" {
                err(at("device"), format!("`{d}`: use \"cpu\" or \"cuda\""));
            } else if d == "cuda" && spec.gpu.is_cpu() {
                err(at("device"), "device = \"cuda\" with gpu = \"cpu\"".into());
            }
        }
        if e.start_timeout.is_zero() {
            err(at("start_timeout"), "must be longer than zero".into());
        }
        for (field, reason) in engine_options_problems(e) {
            err(at(field), reason);
        }
        for (field, reason) in crate::topology::engine_problems(&spec, e) {
            err(at(field), reason);
        }
        for (field, reason) in priority_problems(e, spec.gateway.is_some()) {
            err(at(field), reason);
        }
        for k in e.env.keys() {
            if k.is_empty() || k.contains('=') {
                err(
                    at("env"),
                    format!("`{k}` is not an environment variable name"),
                );
            }
        }
        match e.memory {
            Some(MemoryBudget::Fraction(_)) => {
                if spec.gpu.is_cpu() {
                    err(
                        at("memory"),
                        "a fraction of GPU memory with gpu = \"cpu\": give bytes (e.g. \"512MiB\")"
                            .into(),
                    );
                }
            }
            Some(MemoryBudget::Bytes(_)) | None => {}
        }
    }
    // Fractions add up per GPU: `memory = 0.5` is half of each GPU of its engine.
    for (field, reason) in crate::topology::fraction_problems(&spec) {
        err(field, reason);
    }
    if let Some(g) = &spec.gateway {
        match g.port() {
            None => err(
                "gateway.address".into(),
                format!("`{}` is not HOST:PORT", g.address),
            ),
            Some(p) => {
                if let Some(other) = ports.get(&p) {
                    err(
                        "gateway.address".into(),
                        format!("port {p} clashes with {other}"),
                    );
                }
            }
        }
        for m in &g.models {
            if !spec.engines.iter().any(|e| e.served_name() == m) {
                err("gateway.models".into(), format!("no engine serves `{m}`"));
            }
        }
        for (field, reason) in control_problems(&g.control) {
            err(format!("gateway.control.{field}"), reason);
        }
    }
    for (i, e) in spec.engines.iter().enumerate() {
        // The gateway tells tenants apart by the model a request names.
        if let Some((j, other)) = spec.engines[..i]
            .iter()
            .enumerate()
            .find(|(_, o)| o.served_name() == e.served_name())
        {
            if (other.priority, other.slo) != (e.priority, e.slo) {
                err(
                    format!("engines[{i}].priority"),
                    format!(
                        "engines[{j}] serves `{}` too with another priority or slo: the gateway tells tenants apart by the model a request names, so give both the same",
                        e.served_name()
                    ),
                );
            }
        }
    }
    if errs.is_empty() {
        Ok(ValidDeployment(spec))
    } else {
        Err(ValidationErrors(errs).into())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn one_engine(kind: &str, extra: &str) -> String {
        format!(
            "gpu = 0\n[[engines]]\nname = \"e\"\nkind = \"{kind}\"\nmodel = \"Qwen/Qwen3-8B\"\nport = 8001\n{extra}\n"
        )
    }

    fn problems(text: &str) -> String {
        match parse(text) {
            Ok(spec) => validate(spec)
                .map(|_| String::new())
                .unwrap_or_else(|e| e.to_string()),
            Err(e) => e.to_string(),
        }
    }

    /// The file form reads back to the same spec and leaves out what is at its default,
    /// a start time-out included only where it is not the engine kind's.
    #[test]
    fn to_toml_reads_back_and_leaves_defaults_out() {
        let text = r#"
name = "pair"
gpu = 0
sharing = "mps"
[gateway]
[supervise]
max_failures = 2
[[engines]]
name = "gen"
kind = "vllm"
model = "Qwen/Qwen3-8B"
port = 8001
memory = 0.45
sm_percent = 70
start_timeout = "120s"
env = { PYTHONPATH = "/tmp/site" }
[[engines]]
name = "embed"
model = "preset:qwen3-tiny"
task = "embed"
port = 8002
memory = "4GiB"
replicas = 2
"#;
        let spec = parse(text).unwrap();
        let out = spec.to_toml().unwrap();
        assert_eq!(parse(&out).unwrap(), spec, "{out}");
        for kept in [
            "name = \"pair\"",
            "sharing = \"mps\"",
            "[gateway]",
            "max_failures = 2",
            "start_timeout = \"2m\"",
            "kind = \"builtin\"",
            "replicas = 2",
            "memory = 4294967296",
            "PYTHONPATH = \"/tmp/site\"",
        ] {
            assert!(out.contains(kept), "{kept} not in\n{out}");
        }
        for left_out in [
            "backoff_max",
            "args",
            "drain_timeout",
            "start_timeout = \"10m\"",
        ] {
            assert!(!out.contains(left_out), "{left_out} in\n{out}");
        }
        assert_eq!(out.matches("start_timeout").count(), 1, "{out}");
        // no gateway, default supervision: neither table is written
        let plain = parse("[[engines]]\nname = \"e\"\nmodel = \"m\"\nport = 1\n").unwrap();
        let out = plain.to_toml().unwrap();
        assert_eq!(parse(&out).unwrap(), plain, "{out}");
        assert!(
            !out.contains("[gateway]") && !out.contains("[supervise]"),
            "{out}"
        );
    }

    /// vLLM compiles and captures graphs before it answers /health: a longer default.
    #[test]
    fn start_timeout_defaults_per_kind() {
        let s = parse(&one_engine("vllm", "")).unwrap();
        assert_eq!(s.engines[0].start_timeout, Duration::from_secs(600));
        let s = parse(&one_engine("builtin", "")).unwrap();
        assert_eq!(s.engines[0].start_timeout, Duration::from_secs(120));
        let s = parse(&one_engine("vllm", "start_timeout = \"90s\"")).unwrap();
        assert_eq!(s.engines[0].start_timeout, Duration::from_secs(90));
        assert!(
            problems(&one_engine("vllm", "start_timeout = \"0s\"")).contains("longer than zero")
        );
    }

    /// Priorities and SLOs (issue 18): read with their units, written back, and every
    /// misuse named with its field and reason.
    #[test]
    fn priorities_and_slos_read_and_check() {
        let pair = |gen: &str, embed: &str, gateway: &str| {
            format!(
                "gpu = \"cpu\"\n{gateway}\n[[engines]]\nname = \"gen\"\nmodel = \"m\"\nport = 8001\n{gen}\n[[engines]]\nname = \"embed\"\nmodel = \"e\"\ntask = \"embed\"\nport = 8002\n{embed}\n"
            )
        };
        let good = pair(
            "priority = \"latency\"\nslo = { ttft_p99 = \"300ms\", tpot_p99 = \"40ms\" }",
            "priority = \"best-effort\"",
            "[gateway]\n[gateway.control]\nmin_best_effort = 0\nqueue_timeout = \"2s\"",
        );
        let spec = validate(parse(&good).unwrap()).unwrap().into_spec();
        let gen = &spec.engines[0];
        assert_eq!(gen.priority, Priority::Latency);
        let slo = gen.slo.unwrap();
        assert_eq!(slo.ttft_p99, Some(Duration::from_millis(300)));
        assert_eq!(slo.tpot_p99, Some(Duration::from_millis(40)));
        assert_eq!(slo.e2el_p99, None);
        assert_eq!(spec.engines[1].priority, Priority::BestEffort);
        let control = &spec.gateway.as_ref().unwrap().control;
        assert_eq!(control.min_best_effort, 0);
        assert_eq!(control.queue_timeout, Duration::from_secs(2));
        assert_eq!(control.interval, ControlSpec::default().interval);
        let out = spec.to_toml().unwrap();
        assert_eq!(parse(&out).unwrap(), spec, "{out}");
        assert!(out.contains("priority = \"best-effort\""), "{out}");
        assert!(!out.contains("priority = \"normal\""), "{out}");

        let gw = "[gateway]";
        for (gen, embed, gateway, want) in [
            (
                "priority = \"latency\"",
                "",
                gw,
                "engines[0].slo: missing: priority = \"latency\" needs an SLO",
            ),
            (
                "priority = \"latency\"\nslo = {}",
                "",
                gw,
                "engines[0].slo: empty: give at least one of",
            ),
            (
                "priority = \"latency\"\nslo = { ttft_p99 = \"0s\" }",
                "",
                gw,
                "engines[0].slo.ttft_p99: must be longer than zero",
            ),
            (
                "",
                "priority = \"best-effort\"\nslo = { e2el_p99 = \"1s\" }",
                gw,
                "engines[1].slo: a best-effort engine",
            ),
            (
                "",
                "slo = { ttft_p99 = \"1s\" }",
                gw,
                "engines[1].slo.ttft_p99: an embedding engine's answers are not streamed",
            ),
            (
                "",
                "priority = \"best-effort\"",
                "",
                "engines[1].priority: needs a [gateway]",
            ),
            (
                "",
                "",
                "[gateway]\n[gateway.control]\nmin_best_effort = 9\nmax_best_effort = 4",
                "gateway.control.min_best_effort: 9 is above max_best_effort (4)",
            ),
            (
                "",
                "",
                "[gateway]\n[gateway.control]\nmax_best_effort = 0",
                "gateway.control.max_best_effort: must be at least 1",
            ),
            (
                "",
                "",
                "[gateway]\n[gateway.control]\nengine_share_tokens = 0",
                "gateway.control.engine_share_tokens: must be at least 1",
            ),
            (
                "",
                "",
                "[gateway]\n[gateway.control]\nengine_duty_floor = 100",
                "gateway.control.engine_duty_floor: must be a percentage from 1 to 99",
            ),
            (
                "",
                "",
                "[gateway]\n[gateway.control]\nengine_sm_floor = 0",
                "gateway.control.engine_sm_floor: must be a percentage from 1 to 99 (leave it out for the whole GPU)",
            ),
            (
                "",
                "",
                "[gateway]\n[gateway.control]\nengine_sm_floor = 100",
                "gateway.control.engine_sm_floor: must be a percentage from 1 to 99",
            ),
            (
                "",
                "",
                "[gateway]\n[gateway.control]\ndecrease_above = 1.2",
                "gateway.control.decrease_above: must be above 0 and at most 1.0",
            ),
            (
                "",
                "",
                "[gateway]\n[gateway.control]\ndecrease_above = 0.95\nincrease_below = 0.95",
                "gateway.control.increase_below: must be above 0 and below decrease_above (0.95)",
            ),
            (
                "",
                "",
                "[gateway]\n[gateway.control]\ninterval = \"1s\"\nwindow = \"500ms\"",
                "gateway.control.window: 500ms is shorter than interval (1s)",
            ),
            (
                "",
                "",
                "[gateway]\n[gateway.control]\nqueue_timeout = 0",
                "gateway.control.queue_timeout: must be longer than zero",
            ),
        ] {
            let got = problems(&pair(gen, embed, gateway));
            assert!(got.contains(want), "{gen} / {embed} / {gateway}: {got}");
        }
        // read errors name the key and what to write
        for (bad, want) in [
            ("priority = \"urgent\"", "unknown variant `urgent`"),
            ("slo = { ttft_p99 = \"fast\" }", "bad duration \"fast\""),
            ("slo = { ttft = \"1s\" }", "unknown field `ttft`"),
        ] {
            let got = problems(&pair(bad, "", gw));
            assert!(got.contains(want), "{bad}: {got}");
        }
        // engines serving one model are one tenant: they must agree
        let twin = format!(
            "{}\n[[engines]]\nname = \"gen2\"\nmodel = \"m\"\nport = 8003\n",
            pair(
                "priority = \"latency\"\nslo = { ttft_p99 = \"1s\" }",
                "",
                gw
            )
        );
        assert!(
            problems(&twin).contains("engines[2].priority: engines[0] serves `m` too"),
            "{}",
            problems(&twin)
        );
    }

    #[test]
    fn vllm_options_read_and_check() {
        let s = parse(&one_engine(
            "vllm",
            r#"launcher = ["python3", "-m", "vllm.entrypoints.cli.main"]
vllm_version = "0.26"
env = { PYTHONPATH = "/tmp/site", VLLM_USE_FLASHINFER_SAMPLER = "0" }
max_num_seqs = 512
max_model_len = 4096
attention_backend = "FLASH_ATTN"
api_server_count = 2
kv_cache_memory = "8GiB""#,
        ))
        .unwrap();
        let s = validate(s).unwrap().into_spec();
        let e = &s.engines[0];
        assert_eq!(e.launcher.as_ref().unwrap()[2], "vllm.entrypoints.cli.main");
        assert_eq!(e.kv_cache_memory, Some(8 << 30));
        assert_eq!(e.env["PYTHONPATH"], "/tmp/site");
        for (kind, extra, want) in [
            (
                "builtin",
                "launcher = [\"x\"]",
                "engines[0].launcher: only kind = \"vllm\" takes launcher",
            ),
            ("vllm", "launcher = []", "engines[0].launcher: empty"),
            (
                "vllm",
                "vllm_version = \"latest\"",
                "engines[0].vllm_version: `latest` is not a vLLM version",
            ),
            (
                "tei",
                "max_num_seqs = 8",
                "engines[0].max_num_seqs: only kind = \"vllm\" or \"builtin\"",
            ),
            (
                "tei",
                "tokenizer = \"/t\"",
                "engines[0].tokenizer: only kind = \"builtin\", \"vllm\" or \"sglang\" take tokenizer",
            ),
            (
                "builtin",
                "tokenizer = \" \"",
                "engines[0].tokenizer: empty",
            ),
            (
                "vllm",
                "tokenizer = \"/t\"\nargs = [\"--tokenizer\", \"/u\"]",
                "engines[0].args: --tokenizer is also set by tokenizer",
            ),
            (
                "vllm",
                "max_model_len = 0",
                "engines[0].max_model_len: must be at least 1",
            ),
            (
                "vllm",
                "api_server_count = 0",
                "engines[0].api_server_count: must be at least 1",
            ),
            ("vllm", "kv_cache_memory = \"lots\"", "not a size"),
            (
                "vllm",
                "max_num_seqs = 8\nargs = [\"--max_num_seqs=16\"]",
                "engines[0].args: --max-num-seqs is also set by max_num_seqs",
            ),
            (
                "vllm",
                "memory = 0.5\nargs = [\"--gpu-memory-utilization\", \"0.4\"]",
                "engines[0].args: --gpu-memory-utilization is also set by memory",
            ),
            (
                "vllm",
                "args = [\"--task\", \"embed\"]",
                "engines[0].args: --task is colocate's to set (from task)",
            ),
            (
                "vllm",
                "args = [\"--port\", \"9\"]",
                "engines[0].args: --port is colocate's to set (from port)",
            ),
        ] {
            let got = problems(&one_engine(kind, extra));
            assert!(got.contains(want), "{kind} {extra}: {got}");
        }
    }
}
