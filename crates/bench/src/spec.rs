//! What to run: the benchmark specification (TOML or CLI form) and its validation.
//!
//! A [`BenchSpec`] is the full, serialisable description of a run; it is copied into the
//! results file so that every figure can be traced back to what produced it.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{bail, Context};
use serde::{Deserialize, Serialize};

/// A whole benchmark run: workloads driven at once, and one measurement window for all.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BenchSpec {
    /// The workloads, all driven concurrently.
    #[serde(rename = "workload", alias = "workloads")]
    pub workloads: Vec<WorkloadSpec>,
    /// Load runs this long before the measurement window opens.
    #[serde(with = "units::duration", default = "default_warmup")]
    pub warmup: Duration,
    /// Length of the measurement window (at least one of this and `max_requests`).
    #[serde(
        with = "units::duration::option",
        default,
        skip_serializing_if = "Option::is_none"
    )]
    pub duration: Option<Duration>,
    /// The window closes once this many requests (all workloads together) completed in it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_requests: Option<u64>,
    /// Seeds prompt contents and open-loop arrival times: same seed, same run.
    #[serde(default)]
    pub seed: u64,
    /// Seeds the prompts' texts apart from `seed` (their lengths and the arrivals stay
    /// `seed`'s): runs against the same live servers then send texts none of them has
    /// cached (vLLM's and the built-in engine's prefix caches would otherwise reuse an
    /// earlier run's prompts), at the same lengths and times.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub prompt_seed: Option<u64>,
    /// Percentiles reported for every latency statistic (0..=100).
    #[serde(default = "default_percentiles")]
    pub percentiles: Vec<f64>,
    /// Service-level objectives for goodput.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub slo: Option<Slo>,
    /// Keep every request's record (for `--requests-out`).
    #[serde(default)]
    pub record_requests: bool,
    /// Workloads that are a seed study's client ([`Preset`]), by workload name: their
    /// fixed prompt texts and non-streamed requests (kept beside the workloads so that a
    /// [`WorkloadSpec`] stays the plain request shape every caller builds).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub presets: BTreeMap<String, Preset>,
}

fn default_warmup() -> Duration {
    Duration::from_secs(30)
}

/// The percentiles reported when none are given (vLLM's benchmark reports p99 by default;
/// the seed studies used p50/p90/p95/p99).
pub fn default_percentiles() -> Vec<f64> {
    vec![50.0, 90.0, 95.0, 99.0]
}

/// Latency objectives; a request is "good" when it meets every one given (vLLM's goodput).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Slo {
    #[serde(
        with = "units::duration::option",
        default,
        skip_serializing_if = "Option::is_none"
    )]
    pub ttft: Option<Duration>,
    #[serde(
        with = "units::duration::option",
        default,
        skip_serializing_if = "Option::is_none"
    )]
    pub tpot: Option<Duration>,
    #[serde(
        with = "units::duration::option",
        default,
        skip_serializing_if = "Option::is_none"
    )]
    pub e2el: Option<Duration>,
}

impl Slo {
    /// Parses the CLI form `ttft=200ms,tpot=50ms[,e2el=2s]`.
    pub fn parse(s: &str) -> anyhow::Result<Slo> {
        let mut slo = Slo::default();
        for part in s.split(',').map(str::trim).filter(|p| !p.is_empty()) {
            let (k, v) = part
                .split_once('=')
                .with_context(|| format!("SLO {part:?}: expected key=duration, e.g. ttft=200ms"))?;
            let d = humantime::parse_duration(v.trim())
                .with_context(|| format!("SLO {k}: {v:?} is not a duration (e.g. 200ms)"))?;
            match k.trim() {
                "ttft" => slo.ttft = Some(d),
                "tpot" => slo.tpot = Some(d),
                "e2el" => slo.e2el = Some(d),
                other => bail!("SLO: unknown metric {other:?} (expected ttft, tpot or e2el)"),
            }
        }
        if slo == Slo::default() {
            bail!("SLO {s:?} names no objective (expected e.g. ttft=200ms,tpot=50ms)");
        }
        Ok(slo)
    }
}

/// Which API a workload calls.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum WorkloadKind {
    /// `POST /v1/chat/completions`, streamed.
    Chat,
    /// `POST /v1/completions`, streamed.
    Completions,
    /// `POST /v1/embeddings` with `batch` inputs per request.
    Embed,
}

impl WorkloadKind {
    /// The default path appended to a base URL.
    pub fn path(self) -> &'static str {
        match self {
            WorkloadKind::Chat => "/v1/chat/completions",
            WorkloadKind::Completions => "/v1/completions",
            WorkloadKind::Embed => "/v1/embeddings",
        }
    }

    pub fn is_gen(self) -> bool {
        !matches!(self, WorkloadKind::Embed)
    }
}

/// How requests are issued.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "mode", rename_all = "snake_case", deny_unknown_fields)]
pub enum Load {
    /// `concurrency` requests in flight, each replaced as soon as it ends.
    Closed { concurrency: usize },
    /// Requests arrive at `rate` per second: Poisson when `burstiness` = 1, else gamma
    /// inter-arrival times with shape `burstiness` (vLLM's convention: < 1 burstier).
    Open {
        rate: f64,
        #[serde(default = "one")]
        burstiness: f64,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        max_concurrency: Option<usize>,
    },
}

fn one() -> f64 {
    1.0
}

/// A load step: from `at` after the measurement window opens, the workload runs `load`
/// instead of its own (issue 18: an embedder jumps from a quarter of its capacity to
/// saturating in the middle of a window). The first load stops starting requests at the
/// step (those in flight finish), the second starts there; a closed loop's slots and an
/// open loop's arrivals are each drawn as they would be alone. In TOML:
/// `step = { at = "15s", load = { mode = "closed", concurrency = 64 } }`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LoadStep {
    /// Time after the window opens (after the warm-up).
    #[serde(with = "units::duration")]
    pub at: Duration,
    /// The load from then on.
    pub load: Load,
}

impl Load {
    /// Checks a load, naming the workload `n` and `field` (`load`, `step.load`).
    fn validate(&self, n: &str, field: &str) -> anyhow::Result<()> {
        match self {
            Load::Closed { concurrency: 0 } => {
                bail!("workload {n}: {field}: concurrency must be >= 1")
            }
            Load::Open {
                rate,
                burstiness,
                max_concurrency,
            } => {
                if !(rate.is_finite() && *rate > 0.0) {
                    bail!("workload {n}: {field}: rate must be > 0 requests/s, got {rate}");
                }
                if !(burstiness.is_finite() && *burstiness > 0.0) {
                    bail!("workload {n}: {field}: burstiness must be > 0, got {burstiness}");
                }
                if *max_concurrency == Some(0) {
                    bail!("workload {n}: {field}: max_concurrency must be >= 1");
                }
            }
            _ => {}
        }
        Ok(())
    }
}

/// A length in tokens: fixed, or uniform over `[min, max]`.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum LengthDist {
    Fixed(u32),
    Uniform { min: u32, max: u32 },
}

impl LengthDist {
    /// Parses `128` or `64-256`.
    pub fn parse(s: &str) -> anyhow::Result<LengthDist> {
        let s = s.trim();
        let num = |x: &str| -> anyhow::Result<u32> {
            x.trim()
                .parse::<u32>()
                .with_context(|| format!("{x:?} is not a token count"))
        };
        let d = match s.split_once('-') {
            Some((a, b)) => LengthDist::Uniform {
                min: num(a)?,
                max: num(b)?,
            },
            None => LengthDist::Fixed(num(s)?),
        };
        d.validate()?;
        Ok(d)
    }

    pub fn validate(&self) -> anyhow::Result<()> {
        match *self {
            LengthDist::Fixed(0) => bail!("length must be at least 1 token"),
            LengthDist::Uniform { min, max } if min == 0 || min > max => {
                bail!("length range {min}-{max}: need 1 <= min <= max")
            }
            _ => Ok(()),
        }
    }

    /// Draws one length.
    pub fn sample(&self, rng: &mut impl rand::Rng) -> u32 {
        match *self {
            LengthDist::Fixed(n) => n,
            LengthDist::Uniform { min, max } => rng.gen_range(min..=max),
        }
    }

    /// The mean length (for estimates).
    pub fn mean(&self) -> f64 {
        match *self {
            LengthDist::Fixed(n) => n as f64,
            LengthDist::Uniform { min, max } => (min as f64 + max as f64) / 2.0,
        }
    }
}

/// One workload: an endpoint, a model, a load and request shapes.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WorkloadSpec {
    /// Name in progress lines, tables and results (defaults to kind plus index).
    #[serde(default)]
    pub name: String,
    pub kind: WorkloadKind,
    /// Base URL (`http://host:port`) or the full endpoint URL (containing `/v1/`).
    pub url: String,
    /// The `model` field sent with every request.
    pub model: String,
    pub load: Load,
    /// Prompt length in tokens (per input for embed).
    pub input: LengthDist,
    /// Output length: fixed ⇒ `ignore_eos` + `min_tokens` = `max_tokens`; absent ⇒ free.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub output: Option<LengthDist>,
    /// Inputs per embedding request (1 for gen workloads).
    #[serde(default = "one_usize")]
    pub batch: usize,
    /// Prompts from the lines of this text file instead of random words.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub input_file: Option<PathBuf>,
    /// A load step in the window: from `step.at` on, `step.load` replaces `load`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub step: Option<LoadStep>,
}

fn one_usize() -> usize {
    1
}

impl WorkloadSpec {
    /// The URL requests are posted to.
    pub fn endpoint(&self) -> String {
        if self.url.contains("/v1/") {
            self.url.clone()
        } else {
            format!("{}{}", self.url.trim_end_matches('/'), self.kind.path())
        }
    }

    /// `scheme://host:port` of the endpoint (the connection pool key).
    pub fn origin(&self) -> String {
        let u = self.url.as_str();
        let after_scheme = u.find("://").map(|i| i + 3).unwrap_or(0);
        match u[after_scheme..].find('/') {
            Some(i) => u[..after_scheme + i].to_string(),
            None => u.to_string(),
        }
    }

    /// Checks that the workload makes sense, naming the workload and the field.
    pub fn validate(&self) -> anyhow::Result<()> {
        let n = &self.name;
        if !(self.url.starts_with("http://") || self.url.starts_with("https://")) {
            bail!(
                "workload {n}: url {:?} must start with http:// or https://",
                self.url
            );
        }
        if self.model.is_empty() {
            bail!("workload {n}: model is empty");
        }
        self.load.validate(n, "load")?;
        if let Some(step) = &self.step {
            step.load.validate(n, "step.load")?;
        }
        self.input
            .validate()
            .with_context(|| format!("workload {n}: input"))?;
        if let Some(o) = &self.output {
            o.validate()
                .with_context(|| format!("workload {n}: output"))?;
        }
        if self.batch == 0 {
            bail!("workload {n}: batch must be >= 1");
        }
        if self.kind.is_gen() && self.batch != 1 {
            bail!("workload {n}: batch applies to embed workloads only");
        }
        if self.kind == WorkloadKind::Embed && self.output.is_some() {
            bail!("workload {n}: output applies to gen workloads only");
        }
        Ok(())
    }
}

impl BenchSpec {
    /// A spec with defaults around the given workloads.
    pub fn new(workloads: Vec<WorkloadSpec>) -> BenchSpec {
        BenchSpec {
            workloads,
            warmup: default_warmup(),
            duration: None,
            max_requests: None,
            seed: 0,
            prompt_seed: None,
            percentiles: default_percentiles(),
            slo: None,
            record_requests: false,
            presets: BTreeMap::new(),
        }
    }

    /// Reads a TOML file (`[[workload]]` tables plus the run settings). A workload table
    /// may name a `preset` (`"seed-gen"`, `"seed-embed"`): its kind, input, output, batch
    /// and load default to the seed client's.
    pub fn from_toml_file(path: &std::path::Path) -> anyhow::Result<BenchSpec> {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("cannot read {}", path.display()))?;
        let mut table: toml::Table = toml::from_str(&text)
            .with_context(|| format!("{}: invalid bench file", path.display()))?;
        let presets = expand_preset_tables(&mut table)
            .with_context(|| format!("{}: invalid bench file", path.display()))?;
        let mut spec: BenchSpec = toml::Value::Table(table)
            .try_into()
            .with_context(|| format!("{}: invalid bench file", path.display()))?;
        for (i, p) in presets {
            let name = workload_name(&spec.workloads[i], i);
            spec.workloads[i].name = name.clone();
            spec.presets.insert(name, p);
        }
        spec.fill_names();
        Ok(spec)
    }

    /// Gives unnamed workloads a name (`gen0`, `embed1`, ...).
    pub fn fill_names(&mut self) {
        for (i, w) in self.workloads.iter_mut().enumerate() {
            if w.name.is_empty() {
                w.name = workload_name(w, i);
            }
        }
    }

    /// Adds a workload (named now if unnamed, as [`BenchSpec::fill_names`] would) and
    /// records the preset it came from.
    pub fn push_workload(&mut self, mut w: WorkloadSpec, preset: Option<Preset>) {
        w.name = workload_name(&w, self.workloads.len());
        if let Some(p) = preset {
            self.presets.insert(w.name.clone(), p);
        }
        self.workloads.push(w);
    }

    /// The preset a workload came from, if any.
    pub fn preset_of(&self, w: &WorkloadSpec) -> Option<Preset> {
        self.presets.get(&w.name).copied()
    }

    /// Checks the whole spec; errors name the workload and field.
    pub fn validate(&self) -> anyhow::Result<()> {
        if self.workloads.is_empty() {
            bail!("no workload given (use --workload or [[workload]] in the config)");
        }
        if self.duration.is_none() && self.max_requests.is_none() {
            bail!("the measurement window needs a duration or a request count");
        }
        if self.duration == Some(Duration::ZERO) {
            bail!("duration must be > 0");
        }
        if self.max_requests == Some(0) {
            bail!("max_requests must be >= 1");
        }
        for p in &self.percentiles {
            if !(0.0..=100.0).contains(p) {
                bail!("percentile {p} is outside 0..100");
            }
        }
        let mut names = std::collections::BTreeSet::new();
        for w in &self.workloads {
            w.validate()?;
            if let (Some(step), Some(d)) = (&w.step, self.duration) {
                if step.at >= d {
                    bail!(
                        "workload {}: step.at ({}) is not inside the window ({})",
                        w.name,
                        humantime::format_duration(step.at),
                        humantime::format_duration(d)
                    );
                }
            }
            if !names.insert(&w.name) {
                bail!("two workloads are named {:?}", w.name);
            }
        }
        for (name, p) in &self.presets {
            let Some(w) = self.workloads.iter().find(|w| &w.name == name) else {
                bail!("presets.{name}: no workload named {name:?}");
            };
            if w.kind.is_gen() != p.kind().is_gen() {
                bail!(
                    "workload {name}: preset {p} is a {} workload, kind is {:?}",
                    if p.kind().is_gen() { "gen" } else { "embed" },
                    w.kind
                );
            }
        }
        Ok(())
    }
}

/// The name an unnamed workload gets: its kind and index (`gen0`, `embed1`).
fn workload_name(w: &WorkloadSpec, index: usize) -> String {
    if !w.name.is_empty() {
        return w.name.clone();
    }
    format!("{}{index}", if w.kind.is_gen() { "gen" } else { "embed" })
}

/// The seed studies' clients (`seeds/gen-embed-mps-colocation-h200.txt`,
/// `mig-vs-colocation-h200.txt`; their `gen_benchmark.py` and `embed_benchmark_vllm.py`)
/// as named workloads, so that a reproduction sends what they sent.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Preset {
    /// Chat completions of one fixed prompt (~30 tokens with the chat template), 512
    /// output tokens, temperature 0, not streamed; the seeds ran 512 or 1024 at once.
    SeedGen,
    /// Embeddings of batches of ~25-token sentences numbered within the batch; the seeds
    /// used batches of 8-128 at 16-128 requests in flight.
    SeedEmbed,
}

/// The seed generator's prompt, as its client sent it.
pub const SEED_GEN_PROMPT: &str = "Write a detailed essay about the history of computing. Start from the very beginning and cover every major development in great detail.";
/// The seed embedder's inputs; `{i}` is the input's index within its batch.
pub const SEED_EMBED_INPUT: &str =
    "Instruct: Retrieve relevant documents\nQuery: This is sample sentence number {i} for embedding benchmark.";

impl Preset {
    pub const ALL: [Preset; 2] = [Preset::SeedGen, Preset::SeedEmbed];

    /// `seed-gen` / `seed-embed`.
    pub fn name(self) -> &'static str {
        match self {
            Preset::SeedGen => "seed-gen",
            Preset::SeedEmbed => "seed-embed",
        }
    }

    pub fn parse(name: &str) -> Option<Preset> {
        Preset::ALL.into_iter().find(|p| p.name() == name.trim())
    }

    /// The API the seed client called.
    pub fn kind(self) -> WorkloadKind {
        match self {
            Preset::SeedGen => WorkloadKind::Chat,
            Preset::SeedEmbed => WorkloadKind::Embed,
        }
    }

    /// The prompt text (`{i}`: the input's index in its request).
    pub fn text(self) -> &'static str {
        match self {
            Preset::SeedGen => SEED_GEN_PROMPT,
            Preset::SeedEmbed => SEED_EMBED_INPUT,
        }
    }

    /// Prompt tokens of one input, about (the server's `usage` gives the exact count).
    pub fn input_tokens(self) -> u32 {
        match self {
            Preset::SeedGen => 30,
            Preset::SeedEmbed => 25,
        }
    }

    /// Output tokens: 512, made exact with `ignore_eos` (random weights would otherwise
    /// stop at whichever token happens to be EOS).
    pub fn output(self) -> Option<LengthDist> {
        match self {
            Preset::SeedGen => Some(LengthDist::Fixed(512)),
            Preset::SeedEmbed => None,
        }
    }

    /// The load the seeds used most: 512 generators, 64 embedding requests of 8.
    pub fn default_load(self) -> Load {
        match self {
            Preset::SeedGen => Load::Closed { concurrency: 512 },
            Preset::SeedEmbed => Load::Closed { concurrency: 64 },
        }
    }

    pub fn default_batch(self) -> usize {
        match self {
            Preset::SeedGen => 1,
            Preset::SeedEmbed => 8,
        }
    }

    /// The seeds' clients read whole responses; a request is sent with `stream: false`.
    pub fn streams(self) -> bool {
        false
    }

    /// The prompt source a runner uses for this preset's inputs.
    pub fn prompt_source(self) -> crate::prompt::PromptSource {
        crate::prompt::PromptSource::Template(crate::prompt::PromptTemplate::new(
            self.text(),
            self.input_tokens() as u64,
        ))
    }

    /// A warning when a server counted a generation preset's prompt as far longer than
    /// the seeds' tokenizer does (Qwen3's: 32 tokens with the chat template): the server
    /// lacks the model's tokenizer, so every request carries a longer prompt than in the
    /// seeds' runs (a colocate preset counts one token per byte unless `--tokenizer`
    /// names one). `None` when the count is plausible, and for embeddings (whose
    /// requests' counts depend on the batch).
    pub fn prompt_length_note(self, server_mean_tokens: f64) -> Option<String> {
        let nominal = f64::from(self.input_tokens());
        (self == Preset::SeedGen && server_mean_tokens > 3.0 * nominal).then(|| {
            format!(
                "the server counted {server_mean_tokens:.0} prompt tokens where Qwen3's tokenizer counts 32 \
                 (the {nominal:.0}-token prompt in its chat template): it lacks the model's tokenizer \
                 (a colocate preset counts one token per byte unless given --tokenizer), so its \
                 prompts are longer than the seeds' were"
            )
        })
    }

    /// What a reader of the results must know about the figures of this preset.
    pub fn note(self) -> &'static str {
        match self {
            Preset::SeedGen => "seed-gen: the seeds' generator client: one fixed prompt, 512 output tokens with ignore_eos (random weights), temperature 0, not streamed: TTFT, TPOT and ITL are undefined, E2EL is the whole request, throughput spreads each response's usage.completion_tokens over its lifetime and counts the share inside the window (requests in flight at its end are waited for)",
            Preset::SeedEmbed => "seed-embed: the seeds' embedding client: batches of numbered ~25-token sentences",
        }
    }

    /// A workload of this preset against `url`, with the seeds' defaults where not given.
    pub fn workload(
        self,
        name: &str,
        url: &str,
        model: &str,
        load: Option<Load>,
        batch: Option<usize>,
    ) -> WorkloadSpec {
        WorkloadSpec {
            name: name.to_string(),
            kind: self.kind(),
            url: url.to_string(),
            model: model.to_string(),
            load: load.unwrap_or_else(|| self.default_load()),
            input: LengthDist::Fixed(self.input_tokens()),
            output: self.output(),
            batch: batch.unwrap_or_else(|| self.default_batch()),
            input_file: None,
            step: None,
        }
    }
}

impl std::fmt::Display for Preset {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// Replaces `preset = "..."` in `[[workload]]` tables by the preset's kind, input, output,
/// batch and load where the table does not give them; returns (workload index, preset).
fn expand_preset_tables(table: &mut toml::Table) -> anyhow::Result<Vec<(usize, Preset)>> {
    let mut found = Vec::new();
    let key = if table.contains_key("workload") {
        "workload"
    } else {
        "workloads"
    };
    let Some(toml::Value::Array(ws)) = table.get_mut(key) else {
        return Ok(found);
    };
    for (i, w) in ws.iter_mut().enumerate() {
        let Some(t) = w.as_table_mut() else { continue };
        let Some(v) = t.remove("preset") else {
            continue;
        };
        let name = v.as_str().unwrap_or_default();
        let p = Preset::parse(name).with_context(|| {
            format!("workload[{i}].preset: unknown preset {v} (expected seed-gen or seed-embed)")
        })?;
        for k in ["input", "input_file"] {
            if t.contains_key(k) {
                bail!("workload[{i}].{k}: preset {p} sends its own fixed text; remove {k}");
            }
        }
        let defaults =
            toml::Value::try_from(p.workload("", "", "", None, None)).context("preset defaults")?;
        if let toml::Value::Table(d) = defaults {
            for k in ["kind", "input", "output", "batch", "load"] {
                if let (false, Some(v)) = (t.contains_key(k), d.get(k)) {
                    t.insert(k.to_string(), v.clone());
                }
            }
        }
        found.push((i, p));
    }
    Ok(found)
}

/// Parses the CLI form of a workload:
/// `gen:url=...,model=...,concurrency=512,input=128,output=512` (chat; `completions:` for
/// the completions API) or `embed:url=...,model=...,batch=64,input=512,rate=5`.
/// Keys: url, model, name, concurrency | rate (+ burstiness, max_concurrency), input,
/// output, batch, file; a load step: step_at (time after the window opens) with
/// step_concurrency | step_rate (+ step_burstiness, step_max_concurrency).
pub fn parse_workload(s: &str) -> anyhow::Result<WorkloadSpec> {
    parse_workload_entry(s).map(|(w, _)| w)
}

/// [`parse_workload`] that also accepts the seed presets,
/// `seed-gen:url=...,model=...[,concurrency=1024][,output=512]` and
/// `seed-embed:url=...,model=...[,batch=32][,concurrency=128]`, and says which preset.
pub fn parse_workload_entry(s: &str) -> anyhow::Result<(WorkloadSpec, Option<Preset>)> {
    let (kind_s, rest) = s.split_once(':').with_context(|| {
        format!(
            "workload {s:?}: expected KIND:key=value,... (KIND = gen, chat, completions, embed, seed-gen or seed-embed)"
        )
    })?;
    if let Some(p) = Preset::parse(kind_s) {
        return parse_preset_workload(s, p, rest).map(|w| (w, Some(p)));
    }
    parse_plain_workload(s, kind_s, rest).map(|w| (w, None))
}

/// `seed-gen:` / `seed-embed:` with their defaults; `input` and `file` are refused (the
/// preset's text is the point).
fn parse_preset_workload(s: &str, p: Preset, rest: &str) -> anyhow::Result<WorkloadSpec> {
    let mut plain = String::new();
    let mut has_load = false;
    let mut keys = Vec::new();
    for part in rest.split(',').map(str::trim).filter(|x| !x.is_empty()) {
        let k = part.split('=').next().unwrap_or_default().trim();
        keys.push(k);
        match k {
            "input" | "file" | "input_file" => {
                bail!("workload {s:?}: preset {p} sends its own fixed text; remove {k}")
            }
            "batch" if p == Preset::SeedGen => {
                bail!("workload {s:?}: batch applies to seed-embed only")
            }
            "concurrency" | "rate" => has_load = true,
            _ => {}
        }
        plain.push_str(part);
        plain.push(',');
    }
    if !has_load {
        if let Load::Closed { concurrency } = p.default_load() {
            plain.push_str(&format!("concurrency={concurrency},"));
        }
    }
    let kind = if p.kind().is_gen() { "gen" } else { "embed" };
    let mut w = parse_plain_workload(s, kind, &plain)?;
    w.input = LengthDist::Fixed(p.input_tokens());
    if p == Preset::SeedGen && !keys.contains(&"output") {
        w.output = p.output();
    }
    if p == Preset::SeedEmbed && !keys.contains(&"batch") {
        w.batch = p.default_batch();
    }
    Ok(w)
}

fn parse_plain_workload(s: &str, kind_s: &str, rest: &str) -> anyhow::Result<WorkloadSpec> {
    let kind = match kind_s.trim() {
        "gen" | "chat" => WorkloadKind::Chat,
        "completions" | "completion" => WorkloadKind::Completions,
        "embed" | "embeddings" => WorkloadKind::Embed,
        other => bail!(
            "workload {s:?}: unknown kind {other:?} (expected gen, chat, completions, embed, seed-gen or seed-embed)"
        ),
    };
    let (mut url, mut model, mut name) = (None, None, String::new());
    let (mut concurrency, mut rate, mut burstiness, mut max_conc) = (None, None, None, None);
    let (mut input, mut output, mut batch, mut file) = (None, None, None, None);
    let (mut step_at, mut step_conc, mut step_rate, mut step_burst, mut step_max) =
        (None, None, None, None, None);
    for part in rest.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        let (k, v) = part
            .split_once('=')
            .with_context(|| format!("workload {s:?}: {part:?} is not key=value"))?;
        let ctx = || format!("workload {s:?}: {k}={v}");
        let v = v.trim();
        match k.trim() {
            "url" => url = Some(v.to_string()),
            "model" => model = Some(v.to_string()),
            "name" => name = v.to_string(),
            "concurrency" => concurrency = Some(v.parse::<usize>().with_context(ctx)?),
            "rate" => rate = Some(v.parse::<f64>().with_context(ctx)?),
            "burstiness" => burstiness = Some(v.parse::<f64>().with_context(ctx)?),
            "max_concurrency" => max_conc = Some(v.parse::<usize>().with_context(ctx)?),
            "input" => input = Some(LengthDist::parse(v).with_context(ctx)?),
            "output" => output = Some(LengthDist::parse(v).with_context(ctx)?),
            "batch" => batch = Some(v.parse::<usize>().with_context(ctx)?),
            "file" | "input_file" => file = Some(PathBuf::from(v)),
            "step_at" => step_at = Some(humantime::parse_duration(v).with_context(ctx)?),
            "step_concurrency" => step_conc = Some(v.parse::<usize>().with_context(ctx)?),
            "step_rate" => step_rate = Some(v.parse::<f64>().with_context(ctx)?),
            "step_burstiness" => step_burst = Some(v.parse::<f64>().with_context(ctx)?),
            "step_max_concurrency" => step_max = Some(v.parse::<usize>().with_context(ctx)?),
            other => bail!(
                "workload {s:?}: unknown key {other:?} (expected url, model, name, concurrency, rate, burstiness, max_concurrency, input, output, batch, file, step_at, step_concurrency, step_rate, step_burstiness, step_max_concurrency)"
            ),
        }
    }
    let load = match (concurrency, rate) {
        (Some(_), Some(_)) => {
            bail!("workload {s:?}: give concurrency (closed loop) or rate (open loop), not both")
        }
        (Some(c), None) => {
            if burstiness.is_some() {
                bail!("workload {s:?}: burstiness needs rate (open loop)");
            }
            Load::Closed { concurrency: c }
        }
        (None, Some(r)) => Load::Open {
            rate: r,
            burstiness: burstiness.unwrap_or(1.0),
            max_concurrency: max_conc,
        },
        (None, None) => {
            bail!("workload {s:?}: give concurrency=N (closed loop) or rate=R (open loop)")
        }
    };
    if max_conc.is_some() && matches!(load, Load::Closed { .. }) {
        bail!("workload {s:?}: max_concurrency applies to the open loop (rate=...)");
    }
    let step = match (step_at, step_conc, step_rate) {
        (None, None, None) if step_burst.is_none() && step_max.is_none() => None,
        (None, _, _) => {
            bail!("workload {s:?}: a load step needs step_at (time after the window opens)")
        }
        (Some(_), Some(_), Some(_)) => {
            bail!("workload {s:?}: give step_concurrency or step_rate, not both")
        }
        (Some(_), None, None) => {
            bail!("workload {s:?}: step_at needs step_concurrency (closed loop) or step_rate (open loop)")
        }
        (Some(at), Some(c), None) => {
            if step_burst.is_some() || step_max.is_some() {
                bail!("workload {s:?}: step_burstiness and step_max_concurrency need step_rate (open loop)");
            }
            Some(LoadStep {
                at,
                load: Load::Closed { concurrency: c },
            })
        }
        (Some(at), None, Some(r)) => Some(LoadStep {
            at,
            load: Load::Open {
                rate: r,
                burstiness: step_burst.unwrap_or(1.0),
                max_concurrency: step_max,
            },
        }),
    };
    let w = WorkloadSpec {
        name,
        kind,
        url: url.with_context(|| format!("workload {s:?}: url=... is required"))?,
        model: model.with_context(|| format!("workload {s:?}: model=... is required"))?,
        load,
        input: input.unwrap_or(LengthDist::Fixed(if kind.is_gen() { 128 } else { 512 })),
        output: if kind.is_gen() {
            Some(output.unwrap_or(LengthDist::Fixed(128)))
        } else {
            if output.is_some() {
                bail!("workload {s:?}: output applies to gen workloads only");
            }
            None
        },
        batch: batch.unwrap_or(1),
        input_file: file,
        step,
    };
    Ok(w)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_the_issue_examples() {
        let g = parse_workload(
            "gen:url=http://127.0.0.1:8100,model=qwen,concurrency=512,input=128,output=512",
        )
        .unwrap();
        assert_eq!(g.kind, WorkloadKind::Chat);
        assert_eq!(g.load, Load::Closed { concurrency: 512 });
        assert_eq!(g.output, Some(LengthDist::Fixed(512)));
        assert_eq!(g.endpoint(), "http://127.0.0.1:8100/v1/chat/completions");
        let e = parse_workload(
            "embed:url=http://127.0.0.1:8200/,model=emb,concurrency=32,batch=64,input=512",
        )
        .unwrap();
        assert_eq!(e.kind, WorkloadKind::Embed);
        assert_eq!(e.batch, 64);
        assert_eq!(e.endpoint(), "http://127.0.0.1:8200/v1/embeddings");
        assert_eq!(e.origin(), "http://127.0.0.1:8200");
        let o = parse_workload("completions:url=http://h:1,model=m,rate=2.5,burstiness=0.5,max_concurrency=8,input=10-20")
            .unwrap();
        assert_eq!(
            o.load,
            Load::Open {
                rate: 2.5,
                burstiness: 0.5,
                max_concurrency: Some(8)
            }
        );
        assert_eq!(o.input, LengthDist::Uniform { min: 10, max: 20 });
    }

    #[test]
    fn bad_workloads_say_why() {
        for (s, want) in [
            ("gen:model=m,concurrency=1", "url"),
            ("gen:url=http://h,concurrency=1", "model"),
            ("gen:url=http://h,model=m", "concurrency"),
            ("gen:url=http://h,model=m,concurrency=x", "concurrency=x"),
            ("foo:url=http://h", "unknown kind"),
            ("gen:url=http://h,model=m,concurrency=1,bogus=2", "bogus"),
            ("gen:url=http://h,model=m,concurrency=1,rate=2", "not both"),
            (
                "embed:url=http://h,model=m,concurrency=1,output=3",
                "output",
            ),
            (
                "gen:url=http://h,model=m,concurrency=1,input=9-3",
                "min <= max",
            ),
        ] {
            let e = format!("{:#}", parse_workload(s).unwrap_err());
            assert!(e.contains(want), "{s}: {e}");
        }
    }

    #[test]
    fn toml_round_trip_and_errors() {
        let text = r#"
            warmup = "2s"
            duration = "5s"
            seed = 7
            slo = { ttft = "200ms", tpot = "50ms" }
            [[workload]]
            kind = "chat"
            url = "http://127.0.0.1:8100"
            model = "qwen"
            load = { mode = "closed", concurrency = 4 }
            input = 128
            output = { min = 10, max = 20 }
            [[workload]]
            name = "emb"
            kind = "embed"
            url = "http://127.0.0.1:8200"
            model = "minilm"
            load = { mode = "open", rate = 3.0 }
            input = 64
            batch = 8
        "#;
        let dir = std::env::temp_dir().join(format!("bench-spec-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let p = dir.join("b.toml");
        std::fs::write(&p, text).unwrap();
        let spec = BenchSpec::from_toml_file(&p).unwrap();
        spec.validate().unwrap();
        assert_eq!(spec.warmup, Duration::from_secs(2));
        assert_eq!(spec.workloads[0].name, "gen0");
        assert_eq!(
            spec.workloads[1].load,
            Load::Open {
                rate: 3.0,
                burstiness: 1.0,
                max_concurrency: None
            }
        );
        let json = serde_json::to_string(&spec).unwrap();
        let back: BenchSpec = serde_json::from_str(&json).unwrap();
        assert_eq!(back, spec);
        std::fs::write(&p, text.replace("batch = 8", "batch = 8\nbogus = 1")).unwrap();
        let e = format!("{:#}", BenchSpec::from_toml_file(&p).unwrap_err());
        assert!(e.contains("bogus") && e.contains("b.toml"), "{e}");
        std::fs::remove_dir_all(&dir).ok();
    }

    #[test]
    fn a_server_without_the_models_tokenizer_is_named() {
        // 185: a colocate preset without --tokenizer counting the templated prompt's bytes
        // (H200, 2026-12-03); 32: vLLM and Qwen3's tokenizer on the same prompt.
        let note = Preset::SeedGen.prompt_length_note(185.0).unwrap();
        assert!(
            note.contains("185 prompt tokens") && note.contains("--tokenizer"),
            "{note}"
        );
        assert_eq!(Preset::SeedGen.prompt_length_note(32.0), None);
        assert_eq!(Preset::SeedEmbed.prompt_length_note(8.0 * 185.0), None);
    }

    #[test]
    fn seed_presets_from_the_command_line() {
        let (g, p) =
            parse_workload_entry("seed-gen:url=http://127.0.0.1:8100,model=gen,concurrency=1024")
                .unwrap();
        assert_eq!(p, Some(Preset::SeedGen));
        assert_eq!(g.kind, WorkloadKind::Chat);
        assert_eq!(g.load, Load::Closed { concurrency: 1024 });
        assert_eq!(g.output, Some(LengthDist::Fixed(512)));
        assert_eq!(g.input, LengthDist::Fixed(30));
        let (e, p) =
            parse_workload_entry("seed-embed:url=http://127.0.0.1:8200,model=emb,batch=32")
                .unwrap();
        assert_eq!(p, Some(Preset::SeedEmbed));
        assert_eq!(e.kind, WorkloadKind::Embed);
        assert_eq!(e.batch, 32);
        assert_eq!(
            e.load,
            Load::Closed { concurrency: 64 },
            "the seeds' default"
        );
        let (e, _) = parse_workload_entry("seed-embed:url=http://h:1,model=m").unwrap();
        assert_eq!(e.batch, 8);
        for (s, want) in [
            ("seed-gen:url=http://h:1,model=m,input=128", "fixed text"),
            ("seed-gen:url=http://h:1,model=m,batch=8", "seed-embed only"),
            ("seed-embed:url=http://h:1,model=m,output=3", "output"),
            ("seed-gen:model=m", "url"),
        ] {
            let e = format!("{:#}", parse_workload_entry(s).unwrap_err());
            assert!(e.contains(want), "{s}: {e}");
        }
        // The plain parser reads a preset's request shape too.
        assert_eq!(
            parse_workload("seed-gen:url=http://h:1,model=m")
                .unwrap()
                .kind,
            WorkloadKind::Chat
        );
    }

    #[test]
    fn seed_presets_in_toml_and_in_the_results() {
        let text = r#"
            warmup = "30s"
            duration = "60s"
            [[workload]]
            preset = "seed-gen"
            url = "http://127.0.0.1:8100"
            model = "gen"
            [[workload]]
            name = "emb"
            preset = "seed-embed"
            url = "http://127.0.0.1:8200"
            model = "embed"
            batch = 64
            load = { mode = "closed", concurrency = 32 }
        "#;
        let dir = std::env::temp_dir().join(format!("bench-seeds-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let p = dir.join("seeds.toml");
        std::fs::write(&p, text).unwrap();
        let spec = BenchSpec::from_toml_file(&p).unwrap();
        spec.validate().unwrap();
        assert_eq!(spec.workloads[0].name, "gen0");
        assert_eq!(spec.preset_of(&spec.workloads[0]), Some(Preset::SeedGen));
        assert_eq!(spec.workloads[0].load, Load::Closed { concurrency: 512 });
        assert_eq!(spec.workloads[0].output, Some(LengthDist::Fixed(512)));
        assert_eq!(spec.preset_of(&spec.workloads[1]), Some(Preset::SeedEmbed));
        assert_eq!(spec.workloads[1].batch, 64);
        assert_eq!(spec.workloads[1].load, Load::Closed { concurrency: 32 });
        // The results carry the spec: the preset goes with it.
        let json = serde_json::to_string(&spec).unwrap();
        assert!(
            json.contains(r#""presets":{"emb":"seed-embed","gen0":"seed-gen"}"#),
            "{json}"
        );
        let back: BenchSpec = serde_json::from_str(&json).unwrap();
        assert_eq!(back, spec);

        std::fs::write(&p, text.replace("seed-embed", "seed-nothing")).unwrap();
        let e = format!("{:#}", BenchSpec::from_toml_file(&p).unwrap_err());
        assert!(
            e.contains("workload[1].preset") && e.contains("seed-nothing"),
            "{e}"
        );
        std::fs::write(&p, text.replace("batch = 64", "batch = 64\ninput = 5")).unwrap();
        let e = format!("{:#}", BenchSpec::from_toml_file(&p).unwrap_err());
        assert!(e.contains("workload[1].input"), "{e}");
        std::fs::remove_dir_all(&dir).ok();
    }

    #[test]
    fn the_seed_texts_are_the_seed_clients() {
        let src = Preset::SeedEmbed.prompt_source();
        let mut rng = crate::prompt::request_rng(0, 0, 0);
        assert_eq!(
            src.prompt_at(&mut rng, 25, 3).0,
            "Instruct: Retrieve relevant documents\nQuery: This is sample sentence number 3 for embedding benchmark."
        );
        assert!(Preset::SeedGen
            .prompt_source()
            .prompt(&mut rng, 30)
            .0
            .starts_with("Write a detailed essay about the history of computing."));
        assert!(!Preset::SeedGen.streams());
        assert!(Preset::SeedGen.note().contains("ignore_eos"));
        assert!(Preset::SeedGen.note().contains("TTFT"));
    }

    #[test]
    fn slo_parsing() {
        let s = Slo::parse("ttft=200ms,tpot=50ms").unwrap();
        assert_eq!(s.ttft, Some(Duration::from_millis(200)));
        assert_eq!(s.tpot, Some(Duration::from_millis(50)));
        assert!(Slo::parse("itl=3ms").is_err());
        assert!(Slo::parse("ttft=fast").is_err());
    }

    /// A load step on the command line and in TOML; its errors name the field.
    #[test]
    fn load_steps_parse_and_say_what_is_wrong() {
        let w = parse_workload(
            "embed:url=http://h:1,model=m,rate=5,step_at=10s,step_concurrency=64,batch=8",
        )
        .unwrap();
        assert_eq!(
            w.step,
            Some(LoadStep {
                at: Duration::from_secs(10),
                load: Load::Closed { concurrency: 64 }
            })
        );
        let w = parse_workload(
            "gen:url=http://h:1,model=m,concurrency=2,step_at=1500ms,step_rate=9,step_max_concurrency=4",
        )
        .unwrap();
        assert_eq!(
            w.step.unwrap().load,
            Load::Open {
                rate: 9.0,
                burstiness: 1.0,
                max_concurrency: Some(4)
            }
        );
        for (s, want) in [
            ("step_concurrency=4", "needs step_at"),
            ("step_at=1s", "step_at needs step_concurrency"),
            ("step_at=1s,step_concurrency=4,step_rate=2", "not both"),
            (
                "step_at=1s,step_concurrency=4,step_burstiness=2",
                "need step_rate",
            ),
            ("step_at=soon,step_rate=2", "step_at=soon"),
        ] {
            let e =
                parse_workload(&format!("embed:url=http://h:1,model=m,rate=5,{s}")).unwrap_err();
            assert!(format!("{e:#}").contains(want), "{s}: {e:#}");
        }
        let mut spec = BenchSpec::new(vec![parse_workload(
            "embed:url=http://h:1,model=m,rate=5,step_at=10s,step_rate=0",
        )
        .unwrap()]);
        spec.fill_names();
        spec.duration = Some(Duration::from_secs(20));
        let e = spec.validate().unwrap_err();
        assert!(
            format!("{e:#}").contains("workload embed0: step.load: rate must be > 0"),
            "{e:#}"
        );
        spec.workloads[0].step.as_mut().unwrap().load = Load::Closed { concurrency: 4 };
        spec.validate().unwrap();
        spec.duration = Some(Duration::from_secs(10));
        let e = spec.validate().unwrap_err();
        assert!(
            format!("{e:#}").contains("step.at (10s) is not inside the window (10s)"),
            "{e:#}"
        );
        // in a file
        let t: WorkloadSpec = toml::from_str(
            "kind = \"embed\"\nurl = \"http://h:1\"\nmodel = \"m\"\ninput = 8\nload = { mode = \"open\", rate = 5.0 }\nstep = { at = \"15s\", load = { mode = \"closed\", concurrency = 64 } }\n",
        )
        .unwrap();
        assert_eq!(t.step.unwrap().at, Duration::from_secs(15));
    }
}

#[cfg(test)]
mod example_files {
    /// The example bench files in the repository stay valid.
    #[test]
    fn examples_parse_and_validate() {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../examples");
        let mut n = 0;
        for e in std::fs::read_dir(&dir).unwrap() {
            let p = e.unwrap().path();
            let name = p.file_name().unwrap().to_string_lossy().to_string();
            if name.starts_with("bench-") && name.ends_with(".toml") {
                let spec = super::BenchSpec::from_toml_file(&p).unwrap();
                spec.validate().unwrap_or_else(|e| panic!("{name}: {e:#}"));
                n += 1;
            }
        }
        assert!(n >= 2);
    }
}
