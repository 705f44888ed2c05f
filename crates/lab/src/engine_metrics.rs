//! The engines' own counters over the measurement window: each engine's Prometheus
//! `/metrics`, sampled while the load runs and summarized over the same window as the GPU
//! counters, so a report can say *why* a throughput moved (requests queued, KV cache full).
//!
//! - [`parse`]: the Prometheus text exposition format (version 0.0.4), by hand: a few
//!   dozen lines, no dependency, and it keeps metric names exactly as written (vLLM's and
//!   the built-in engine's names carry a `:` namespace).
//! - [`Dialect`]: which names an engine uses. vLLM 0.26: `vllm:num_requests_running`,
//!   `vllm:num_requests_waiting`, `vllm:kv_cache_usage_perc` (`vllm:gpu_cache_usage_perc`
//!   before it was renamed), `vllm:prompt_tokens_total`, `vllm:generation_tokens_total`;
//!   the built-in engine the same with `colocate:` (crates/engine/src/metrics.rs).
//! - [`summarize`]: gauges as start / end / mean / max over the window, counters as the
//!   increase between the samples at its edges and its rate.
//! - `EngineScraper` (with the `measure` feature): samples every engine's `/metrics`
//!   periodically from the start of a condition; `window(w0, w1)` takes a last sample and
//!   summarizes `[w0, w1]`. `measure` starts one before each window's load and keeps the
//!   summaries in the condition's results (`ConditionResult::engine_metrics`); an engine
//!   that could not be scraped is kept too, with the reason ([`EngineMetricsWindow::not_scraped`]).

use std::collections::BTreeMap;
use std::fmt;

use serde::{Deserialize, Serialize};

/// One sample line: a metric name, its labels and its value.
#[derive(Debug, Clone, PartialEq)]
pub struct Sample {
    pub name: String,
    pub labels: Vec<(String, String)>,
    pub value: f64,
}

/// A parsed exposition: every sample, and the declared type of each family.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Exposition {
    pub samples: Vec<Sample>,
    /// `# TYPE name type` lines: family name -> `counter`, `gauge`, `histogram`, ...
    pub types: BTreeMap<String, String>,
}

/// A line that is not the text format, with its 1-based number.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ParseError {
    pub line: usize,
    pub reason: String,
}

impl fmt::Display for ParseError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "line {}: {}", self.line, self.reason)
    }
}

impl std::error::Error for ParseError {}

impl Exposition {
    /// The sum of every sample named `name` over all label sets (several engine cores or
    /// API servers each report their own); `None` when there is none.
    pub fn sum(&self, name: &str) -> Option<f64> {
        let mut found = false;
        let mut total = 0.0;
        for s in self.samples.iter().filter(|s| s.name == name) {
            found = true;
            total += s.value;
        }
        found.then_some(total)
    }

    /// The mean of every sample named `name` (a usage fraction per engine core).
    pub fn mean(&self, name: &str) -> Option<f64> {
        let v: Vec<f64> = self
            .samples
            .iter()
            .filter(|s| s.name == name)
            .map(|s| s.value)
            .collect();
        (!v.is_empty()).then(|| v.iter().sum::<f64>() / v.len() as f64)
    }

    /// The first of `names` that has samples, with its name.
    fn first_of<'a>(&self, names: &[&'a str]) -> Option<&'a str> {
        names
            .iter()
            .copied()
            .find(|n| self.samples.iter().any(|s| s.name == *n))
    }
}

/// Parses the Prometheus text format. Comments other than `# TYPE` are skipped; a sample
/// line that does not parse is an error naming it.
pub fn parse(text: &str) -> Result<Exposition, ParseError> {
    let mut out = Exposition::default();
    for (i, raw) in text.lines().enumerate() {
        let line = raw.trim();
        if line.is_empty() {
            continue;
        }
        if let Some(comment) = line.strip_prefix('#') {
            let mut words = comment.split_whitespace();
            if words.next() == Some("TYPE") {
                if let (Some(name), Some(kind)) = (words.next(), words.next()) {
                    out.types.insert(name.to_string(), kind.to_string());
                }
            }
            continue;
        }
        let sample = parse_sample(line).map_err(|reason| ParseError {
            line: i + 1,
            reason,
        })?;
        out.samples.push(sample);
    }
    Ok(out)
}

fn parse_sample(line: &str) -> Result<Sample, String> {
    let name_end = line
        .find(|c: char| c == '{' || c.is_whitespace())
        .ok_or_else(|| format!("`{line}`: a sample needs a value"))?;
    let name = &line[..name_end];
    if name.is_empty()
        || !name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == ':')
    {
        return Err(format!("`{name}` is not a metric name"));
    }
    let mut rest = &line[name_end..];
    let mut labels = Vec::new();
    if let Some(after) = rest.strip_prefix('{') {
        let (parsed, remaining) = parse_labels(after)?;
        labels = parsed;
        rest = remaining;
    }
    let value_text = rest
        .split_whitespace()
        .next()
        .ok_or_else(|| format!("{name}: no value"))?;
    let value =
        parse_value(value_text).ok_or_else(|| format!("{name}: `{value_text}` is not a number"))?;
    Ok(Sample {
        name: name.to_string(),
        labels,
        value,
    })
}

/// Labels after `{` up to the closing `}`: `k="v",...` with `\\`, `\"` and `\n` escapes.
#[allow(clippy::type_complexity)]
fn parse_labels(s: &str) -> Result<(Vec<(String, String)>, &str), String> {
    let mut labels = Vec::new();
    let mut rest = s;
    loop {
        rest = rest.trim_start();
        if let Some(after) = rest.strip_prefix('}') {
            return Ok((labels, after));
        }
        let eq = rest
            .find('=')
            .ok_or_else(|| "a label without `=`".to_string())?;
        let key = rest[..eq].trim().to_string();
        rest = rest[eq + 1..].trim_start();
        let mut chars = rest.char_indices();
        if chars.next().map(|(_, c)| c) != Some('"') {
            return Err(format!("label {key}: the value is not quoted"));
        }
        let mut value = String::new();
        let mut end = None;
        let mut escaped = false;
        for (i, c) in chars {
            if escaped {
                value.push(if c == 'n' { '\n' } else { c });
                escaped = false;
            } else if c == '\\' {
                escaped = true;
            } else if c == '"' {
                end = Some(i);
                break;
            } else {
                value.push(c);
            }
        }
        let end = end.ok_or_else(|| format!("label {key}: unterminated value"))?;
        labels.push((key, value));
        rest = rest[end + 1..].trim_start();
        if let Some(after) = rest.strip_prefix(',') {
            rest = after;
        } else if !rest.starts_with('}') {
            return Err("labels not separated by `,`".into());
        }
    }
}

fn parse_value(s: &str) -> Option<f64> {
    match s {
        "+Inf" | "Inf" => Some(f64::INFINITY),
        "-Inf" => Some(f64::NEG_INFINITY),
        "NaN" => Some(f64::NAN),
        _ => s.parse().ok(),
    }
}

/// Which engine's names a `/metrics` page uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Dialect {
    Vllm,
    Builtin,
}

/// The names read for one dialect, each a list of spellings tried in order.
struct Names {
    running: &'static [&'static str],
    waiting: &'static [&'static str],
    kv_usage: &'static [&'static str],
    prompt_tokens: &'static [&'static str],
    generation_tokens: &'static [&'static str],
    embedded_sequences: &'static [&'static str],
    prefix_cache_queries: &'static [&'static str],
    prefix_cache_hits: &'static [&'static str],
}

const VLLM_NAMES: Names = Names {
    running: &["vllm:num_requests_running"],
    waiting: &["vllm:num_requests_waiting"],
    // renamed from gpu_cache_usage_perc (deprecated, hidden in later releases)
    kv_usage: &["vllm:kv_cache_usage_perc", "vllm:gpu_cache_usage_perc"],
    prompt_tokens: &["vllm:prompt_tokens_total"],
    generation_tokens: &["vllm:generation_tokens_total"],
    embedded_sequences: &[],
    prefix_cache_queries: &["vllm:prefix_cache_queries_total"],
    prefix_cache_hits: &["vllm:prefix_cache_hits_total"],
};

const BUILTIN_NAMES: Names = Names {
    running: &["colocate:num_requests_running"],
    waiting: &["colocate:num_requests_waiting"],
    kv_usage: &["colocate:kv_cache_usage_perc"],
    prompt_tokens: &["colocate:prompt_tokens_total"],
    generation_tokens: &["colocate:generation_tokens_total"],
    embedded_sequences: &["colocate:embedding_sequences_total"],
    prefix_cache_queries: &["colocate:prefix_cache_queries_total"],
    prefix_cache_hits: &["colocate:prefix_cache_hits_total"],
};

impl Dialect {
    /// The dialect of an exposition, from its names' namespaces.
    pub fn detect(e: &Exposition) -> Option<Dialect> {
        if e.samples.iter().any(|s| s.name.starts_with("vllm:")) {
            Some(Dialect::Vllm)
        } else if e.samples.iter().any(|s| s.name.starts_with("colocate:")) {
            Some(Dialect::Builtin)
        } else {
            None
        }
    }

    fn names(self) -> &'static Names {
        match self {
            Dialect::Vllm => &VLLM_NAMES,
            Dialect::Builtin => &BUILTIN_NAMES,
        }
    }
}

/// A gauge over the window.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct GaugeSummary {
    /// The metric read (its spelling in this engine's version).
    pub metric: String,
    /// At the sample opening the window and at the one closing it.
    pub start: f64,
    pub end: f64,
    /// Over the samples inside the window (the edges when none is inside).
    pub mean: f64,
    pub max: f64,
}

/// A counter's increase over the window.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CounterDelta {
    pub metric: String,
    pub increase: f64,
    /// Increase over the time between the two samples, per second.
    pub per_s: f64,
}

/// One engine's counters over one window.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct EngineMetricsWindow {
    /// Replica name in the deployment.
    pub engine: String,
    pub url: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dialect: Option<Dialect>,
    /// Scrapes used (those at the edges included).
    pub samples: usize,
    /// Seconds between the samples the counters are taken from.
    pub span_s: f64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub requests_running: Option<GaugeSummary>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub requests_waiting: Option<GaugeSummary>,
    /// KV cache in use, a fraction (1 = full).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kv_cache_usage: Option<GaugeSummary>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub prompt_tokens: Option<CounterDelta>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub generation_tokens: Option<CounterDelta>,
    /// Built-in embedders: sequences embedded.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub embedded_sequences: Option<CounterDelta>,
    /// Prompt tokens looked up in the engine's prefix cache, and those found there (not
    /// computed): a window whose prompts an earlier one sent shows here.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub prefix_cache_queries: Option<CounterDelta>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub prefix_cache_hits: Option<CounterDelta>,
    /// Why something is missing (scrape failures, a counter reset by a restart).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub notes: Vec<String>,
}

impl EngineMetricsWindow {
    /// Why nothing was read from this engine in the window, when nothing was (the report
    /// says "not scraped" with this reason; the condition's other figures stand).
    pub fn not_scraped(&self) -> Option<String> {
        (self.samples == 0).then(|| {
            if self.notes.is_empty() {
                "no sample of /metrics".to_string()
            } else {
                self.notes.join("; ")
            }
        })
    }

    /// Prompt tokens served from the prefix cache in the window, in % of those looked up
    /// (`None` without lookups).
    pub fn prefix_hit_percent(&self) -> Option<f64> {
        let q = self.prefix_cache_queries.as_ref()?.increase;
        let h = self.prefix_cache_hits.as_ref()?.increase;
        (q > 0.0).then(|| 100.0 * h / q)
    }

    /// A window for an engine that was not scraped at all, with the reason.
    pub fn unscraped(engine: &str, url: &str, reason: String) -> EngineMetricsWindow {
        EngineMetricsWindow {
            engine: engine.to_string(),
            url: url.to_string(),
            notes: vec![reason],
            ..Default::default()
        }
    }
}

/// Summarizes timed scrapes `(unix seconds, exposition)` over `[w0, w1]`: the window
/// opens at the last sample at or before `w0` (else the first after) and closes at the
/// first sample at or after `w1` (else the last).
pub fn summarize(
    engine: &str,
    url: &str,
    points: &[(f64, Exposition)],
    w0: f64,
    w1: f64,
) -> EngineMetricsWindow {
    let mut out = EngineMetricsWindow {
        engine: engine.to_string(),
        url: url.to_string(),
        ..Default::default()
    };
    let mut pts: Vec<&(f64, Exposition)> = points.iter().collect();
    pts.sort_by(|a, b| a.0.total_cmp(&b.0));
    if pts.is_empty() {
        out.notes.push("no sample of /metrics".into());
        return out;
    }
    let open = pts.iter().rposition(|p| p.0 <= w0).unwrap_or(0);
    let close = pts
        .iter()
        .position(|p| p.0 >= w1)
        .unwrap_or(pts.len() - 1)
        .max(open);
    let used = &pts[open..=close];
    out.samples = used.len();
    let (first, last) = (used[0], used[used.len() - 1]);
    out.span_s = last.0 - first.0;
    if last.0 < w1 {
        out.notes.push(format!(
            "the last sample is {:.1} s before the window's end",
            w1 - last.0
        ));
    }
    let Some(dialect) = used.iter().find_map(|p| Dialect::detect(&p.1)) else {
        out.notes
            .push("neither vLLM's nor the built-in engine's metric names".into());
        return out;
    };
    out.dialect = Some(dialect);
    let names = dialect.names();
    let inside: Vec<&(f64, Exposition)> = used
        .iter()
        .copied()
        .filter(|p| p.0 >= w0 && p.0 <= w1)
        .collect();
    // Counts (running, waiting) add up over engine cores; the KV fraction is their mean.
    let gauge = |choices: &[&str], combine: fn(&Exposition, &str) -> Option<f64>| {
        let metric = used.iter().find_map(|p| p.1.first_of(choices))?;
        let start = combine(&first.1, metric)?;
        let end = combine(&last.1, metric)?;
        let body: Vec<f64> = if inside.is_empty() {
            vec![start, end]
        } else {
            inside
                .iter()
                .filter_map(|p| combine(&p.1, metric))
                .collect()
        };
        Some(GaugeSummary {
            metric: metric.to_string(),
            start,
            end,
            mean: body.iter().sum::<f64>() / body.len().max(1) as f64,
            max: body.iter().copied().fold(f64::NEG_INFINITY, f64::max),
        })
    };
    out.requests_running = gauge(names.running, Exposition::sum);
    out.requests_waiting = gauge(names.waiting, Exposition::sum);
    out.kv_cache_usage = gauge(names.kv_usage, Exposition::mean);
    let mut counter = |choices: &[&str]| -> Option<CounterDelta> {
        let metric = used.iter().find_map(|p| p.1.first_of(choices))?;
        let (a, b) = (first.1.sum(metric)?, last.1.sum(metric)?);
        if b < a {
            out.notes.push(format!(
                "{metric} went down ({a} -> {b}): the engine restarted in the window"
            ));
            return None;
        }
        let span = out.span_s;
        Some(CounterDelta {
            metric: metric.to_string(),
            increase: b - a,
            per_s: if span > 0.0 { (b - a) / span } else { 0.0 },
        })
    };
    let prompt = counter(names.prompt_tokens);
    let generation = counter(names.generation_tokens);
    let embedded = counter(names.embedded_sequences);
    out.prompt_tokens = prompt;
    out.generation_tokens = generation;
    out.embedded_sequences = embedded;
    out.prefix_cache_queries = counter(names.prefix_cache_queries);
    out.prefix_cache_hits = counter(names.prefix_cache_hits);
    out
}

#[cfg(feature = "measure")]
pub use scrape::EngineScraper;

/// Sampling `/metrics` over HTTP while a condition runs.
#[cfg(feature = "measure")]
mod scrape {
    use std::sync::Arc;
    use std::time::{Duration, SystemTime, UNIX_EPOCH};

    use tokio::sync::Mutex;
    use tokio_util::sync::CancellationToken;

    use super::{parse, summarize, EngineMetricsWindow, Exposition};

    fn now() -> f64 {
        SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_secs_f64())
            .unwrap_or(0.0)
    }

    /// What one engine's sampler has gathered.
    #[derive(Default)]
    struct Gathered {
        points: Vec<(f64, Exposition)>,
        /// The first few distinct reasons a scrape failed.
        errors: Vec<String>,
        tried: usize,
        failed: usize,
    }

    impl Gathered {
        /// The errors, and how many scrapes failed when any did.
        fn notes(&self) -> Vec<String> {
            let mut notes = self.errors.clone();
            if self.failed > 0 {
                notes.push(format!("{} of {} scrapes failed", self.failed, self.tried));
            }
            notes
        }
    }

    /// An engine busy with its clients (vLLM's API server under a heavy embedding load) can
    /// take seconds to answer `/metrics`.
    const SCRAPE_TIMEOUT: Duration = Duration::from_secs(10);

    struct Target {
        engine: String,
        url: String,
        gathered: Arc<Mutex<Gathered>>,
    }

    /// Samples every engine's `/metrics` from `start` until dropped or stopped.
    pub struct EngineScraper {
        client: reqwest::Client,
        targets: Vec<Target>,
        stop: CancellationToken,
    }

    /// One scrape of `url/metrics`.
    async fn scrape_once(client: &reqwest::Client, url: &str) -> Result<Exposition, String> {
        let metrics = format!("{}/metrics", url.trim_end_matches('/'));
        // `{:#}` gives the causes too: reqwest's own text ("error sending request") does
        // not say whether the connection was refused or the answer timed out.
        let resp = client
            .get(&metrics)
            .send()
            .await
            .map_err(|e| format!("{metrics}: {:#}", anyhow::Error::from(e)))?;
        if !resp.status().is_success() {
            return Err(format!("{metrics}: HTTP {}", resp.status()));
        }
        let text = resp.text().await.map_err(|e| format!("{metrics}: {e}"))?;
        parse(&text).map_err(|e| format!("{metrics}: {e}"))
    }

    async fn record(client: &reqwest::Client, t_url: &str, gathered: &Mutex<Gathered>) {
        let t = now();
        let r = scrape_once(client, t_url).await;
        let mut g = gathered.lock().await;
        g.tried += 1;
        match r {
            Ok(e) => g.points.push((t, e)),
            Err(e) => {
                g.failed += 1;
                if g.errors.len() < 3 && !g.errors.contains(&e) {
                    g.errors.push(e);
                }
            }
        }
    }

    impl EngineScraper {
        /// Starts sampling each `(engine, base url)` now and every `every` after, on the
        /// runtime of `handle`.
        pub fn start(
            handle: &tokio::runtime::Handle,
            engines: &[(String, String)],
            every: Duration,
        ) -> anyhow::Result<EngineScraper> {
            let client = reqwest::Client::builder()
                .timeout(SCRAPE_TIMEOUT)
                .no_proxy()
                .build()?;
            let stop = CancellationToken::new();
            let mut targets = Vec::new();
            for (engine, url) in engines {
                let gathered = Arc::new(Mutex::new(Gathered::default()));
                let (c, u, g, s) = (client.clone(), url.clone(), gathered.clone(), stop.clone());
                handle.spawn(async move {
                    loop {
                        record(&c, &u, &g).await;
                        tokio::select! {
                            _ = s.cancelled() => break,
                            _ = tokio::time::sleep(every) => {}
                        }
                    }
                });
                targets.push(Target {
                    engine: engine.clone(),
                    url: url.clone(),
                    gathered,
                });
            }
            Ok(EngineScraper {
                client,
                targets,
                stop,
            })
        }

        /// Takes one more sample of every engine (closing the window) and summarizes
        /// `[w0, w1]` per engine.
        pub async fn window(&self, w0: f64, w1: f64) -> Vec<EngineMetricsWindow> {
            let mut out = Vec::new();
            for t in &self.targets {
                record(&self.client, &t.url, &t.gathered).await;
                let g = t.gathered.lock().await;
                let mut w = summarize(&t.engine, &t.url, &g.points, w0, w1);
                w.notes.extend(g.notes());
                out.push(w);
            }
            out
        }

        /// Stops sampling.
        pub fn stop(&self) {
            self.stop.cancel();
        }
    }

    impl Drop for EngineScraper {
        fn drop(&mut self) {
            self.stop.cancel();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fixture(name: &str) -> String {
        let p = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../../testdata/vllm")
            .join(name);
        std::fs::read_to_string(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display()))
    }

    #[test]
    fn parses_the_text_format() {
        let e = parse(
            "# HELP a:b_total x\n# TYPE a:b_total counter\na:b_total{model_name=\"q\\\"x\",engine=\"0\"} 12.0\n\
             a:b_total{engine=\"1\",} 3\nc 1e+09 1700000000000\nd NaN\ne{le=\"+Inf\"} +Inf\n",
        )
        .unwrap();
        assert_eq!(e.types["a:b_total"], "counter");
        assert_eq!(e.sum("a:b_total"), Some(15.0));
        assert_eq!(
            e.samples[0].labels,
            vec![
                ("model_name".to_string(), "q\"x".to_string()),
                ("engine".to_string(), "0".to_string())
            ]
        );
        assert_eq!(e.sum("c"), Some(1e9));
        assert!(e.sum("d").unwrap().is_nan());
        assert_eq!(e.sum("e"), Some(f64::INFINITY));
        assert_eq!(e.sum("missing"), None);
        for bad in ["x{a=1} 2", "x{a=\"1\" 2", "x 1.2.3", "x", "9-bad 1"] {
            let err = parse(&format!("ok 1\n{bad}\n")).unwrap_err();
            assert_eq!(err.line, 2, "{bad}: {err}");
        }
    }

    /// The recorded (for now reconstructed) vLLM 0.26 page: the seeds' generator mid-run.
    #[test]
    fn vllm_fixture_pages() {
        let a = parse(&fixture("metrics-0.26.0-gen-a.txt")).unwrap();
        let b = parse(&fixture("metrics-0.26.0-gen-b.txt")).unwrap();
        assert_eq!(Dialect::detect(&a), Some(Dialect::Vllm));
        assert_eq!(a.types["vllm:generation_tokens_total"], "counter");
        assert_eq!(a.types["vllm:e2e_request_latency_seconds"], "histogram");
        let w = summarize(
            "gen",
            "http://127.0.0.1:8100",
            &[(100.0, a), (160.0, b)],
            100.0,
            160.0,
        );
        assert!(w.notes.is_empty(), "{:?}", w.notes);
        assert_eq!(w.samples, 2);
        assert_eq!(w.span_s, 60.0);
        let run = w.requests_running.as_ref().unwrap();
        assert_eq!((run.start, run.end), (512.0, 512.0));
        let waiting = w.requests_waiting.as_ref().unwrap();
        assert_eq!(waiting.end, 0.0);
        let kv = w.kv_cache_usage.as_ref().unwrap();
        assert_eq!(kv.metric, "vllm:kv_cache_usage_perc");
        assert!((kv.end - 0.4412).abs() < 1e-9, "{kv:?}");
        let gen = w.generation_tokens.as_ref().unwrap();
        assert_eq!(gen.increase, 1_221_120.0);
        assert!((gen.per_s - 20_352.0).abs() < 1e-6);
        let prompt = w.prompt_tokens.as_ref().unwrap();
        assert_eq!(prompt.increase, 2385.0 * 33.0);
        // The seeds' one fixed prompt: most of it comes from the prefix cache.
        assert_eq!(w.prefix_cache_queries.as_ref().unwrap().increase, 78_705.0);
        assert_eq!(w.prefix_cache_hits.as_ref().unwrap().increase, 38_160.0);
        let pct = w.prefix_hit_percent().unwrap();
        assert!((pct - 100.0 * 38_160.0 / 78_705.0).abs() < 1e-9, "{pct}");
    }

    /// Before the rename vLLM exposed only `gpu_cache_usage_perc`.
    #[test]
    fn older_vllm_kv_name() {
        let page = "vllm:num_requests_running{engine=\"0\",model_name=\"m\"} 4.0\n\
                    vllm:gpu_cache_usage_perc{engine=\"0\",model_name=\"m\"} 0.25\n";
        let e = parse(page).unwrap();
        let w = summarize("m", "u", &[(0.0, e.clone()), (10.0, e)], 0.0, 10.0);
        assert_eq!(
            w.kv_cache_usage.unwrap().metric,
            "vllm:gpu_cache_usage_perc"
        );
        assert_eq!(w.requests_running.unwrap().mean, 4.0);
        assert!(w.generation_tokens.is_none());
    }

    /// Two engine cores (data parallel) report their own gauges: counts add up.
    #[test]
    fn engine_cores_add_up() {
        let page = |run: f64, gen: f64| {
            parse(&format!(
                "vllm:num_requests_running{{engine=\"0\",model_name=\"m\"}} {run}\n\
                 vllm:num_requests_running{{engine=\"1\",model_name=\"m\"}} {run}\n\
                 vllm:kv_cache_usage_perc{{engine=\"0\",model_name=\"m\"}} 0.2\n\
                 vllm:kv_cache_usage_perc{{engine=\"1\",model_name=\"m\"}} 0.4\n\
                 vllm:generation_tokens_total{{engine=\"0\",model_name=\"m\"}} {gen}\n\
                 vllm:generation_tokens_total{{engine=\"1\",model_name=\"m\"}} {gen}\n"
            ))
            .unwrap()
        };
        let pts = [
            (0.0, page(1.0, 0.0)),
            (5.0, page(3.0, 50.0)),
            (10.0, page(2.0, 100.0)),
        ];
        let w = summarize("m", "u", &pts, 0.0, 10.0);
        let r = w.requests_running.unwrap();
        assert_eq!((r.start, r.end, r.max), (2.0, 4.0, 6.0));
        assert!((r.mean - 4.0).abs() < 1e-9);
        assert!((w.kv_cache_usage.unwrap().mean - 0.3).abs() < 1e-9);
        assert_eq!(w.generation_tokens.unwrap().increase, 200.0);
    }

    /// The built-in engine's page, as crates/engine/src/metrics.rs renders it.
    #[test]
    fn builtin_engine_page() {
        let page = |g: u64, e: u64| {
            parse(&format!(
                "# HELP colocate:num_requests_running Requests in the running batch.\n\
                 # TYPE colocate:num_requests_running gauge\n\
                 colocate:num_requests_running{{model_name=\"qwen\"}} 3\n\
                 # HELP colocate:kv_cache_usage_perc Fraction of KV cache blocks in use.\n\
                 # TYPE colocate:kv_cache_usage_perc gauge\n\
                 colocate:kv_cache_usage_perc{{model_name=\"qwen\"}} 0.5\n\
                 # HELP colocate:generation_tokens_total Tokens generated.\n\
                 # TYPE colocate:generation_tokens_total counter\n\
                 colocate:generation_tokens_total{{model_name=\"qwen\"}} {g}\n\
                 # HELP colocate:embedding_sequences_total Sequences embedded.\n\
                 # TYPE colocate:embedding_sequences_total counter\n\
                 colocate:embedding_sequences_total{{model_name=\"qwen\"}} {e}\n\
                 colocate:time_to_first_token_seconds_bucket{{le=\"+Inf\"}} 2\n"
            ))
            .unwrap()
        };
        let w = summarize(
            "e",
            "u",
            &[(1.0, page(10, 5)), (3.0, page(50, 25))],
            1.0,
            3.0,
        );
        assert_eq!(w.dialect, Some(Dialect::Builtin));
        assert_eq!(w.generation_tokens.unwrap().per_s, 20.0);
        assert_eq!(w.embedded_sequences.unwrap().increase, 20.0);
        assert_eq!(w.requests_running.unwrap().end, 3.0);
        assert_eq!(w.kv_cache_usage.unwrap().mean, 0.5);
    }

    /// Through HTTP: a server whose counter grows at every scrape; an engine that is not
    /// there is a note, not a failure.
    #[cfg(feature = "measure")]
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn scraper_samples_over_the_window() {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        tokio::spawn(async move {
            let mut n = 0u64;
            while let Ok((mut sock, _)) = listener.accept().await {
                n += 1;
                let mut buf = vec![0u8; 2048];
                let _ = sock.read(&mut buf).await;
                let body = format!(
                    "vllm:num_requests_running{{model_name=\"gen\",engine=\"0\"}} 8.0\n\
                     vllm:generation_tokens_total{{model_name=\"gen\",engine=\"0\"}} {}\n",
                    n * 100
                );
                let reply = format!(
                    "HTTP/1.1 200 OK\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
                    body.len()
                );
                let _ = sock.write_all(reply.as_bytes()).await;
            }
        });
        let now = || {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap()
                .as_secs_f64()
        };
        let engines = vec![
            ("gen".to_string(), url),
            ("gone".to_string(), "http://127.0.0.1:9".to_string()),
        ];
        let handle = tokio::runtime::Handle::current();
        let s =
            EngineScraper::start(&handle, &engines, std::time::Duration::from_millis(50)).unwrap();
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
        let w0 = now();
        tokio::time::sleep(std::time::Duration::from_millis(300)).await;
        let w1 = now();
        let ws = s.window(w0, w1).await;
        s.stop();
        let gen = &ws[0];
        assert_eq!(gen.dialect, Some(Dialect::Vllm));
        assert!(gen.samples >= 4, "{gen:?}");
        let g = gen.generation_tokens.as_ref().unwrap();
        // One scrape, one step of 100 (the closing scrape may race a periodic one).
        assert!(g.increase >= 100.0 * (gen.samples as f64 - 2.0), "{gen:?}");
        assert_eq!(g.increase % 100.0, 0.0);
        assert!(g.per_s > 0.0);
        assert_eq!(gen.requests_running.as_ref().unwrap().mean, 8.0);
        assert!(
            ws[1].notes.iter().any(|n| n.contains("no sample")),
            "{:?}",
            ws[1]
        );
        assert!(
            ws[1]
                .notes
                .iter()
                .any(|n| n.contains("127.0.0.1:9/metrics")),
            "{:?}",
            ws[1]
        );
        assert_eq!(gen.not_scraped(), None);
        let why = ws[1].not_scraped().unwrap();
        assert!(
            why.starts_with("no sample of /metrics; http://127.0.0.1:9/metrics"),
            "{why}"
        );
        // The cause is said (not only reqwest's "error sending request"), once, and the
        // failures are counted.
        assert!(why.contains("refused"), "{why}");
        assert_eq!(ws[1].notes.len(), 3, "{:?}", ws[1].notes);
        // Every scrape of the dead engine failed: "N of N scrapes failed".
        let tried = ws[1].notes.last().unwrap();
        let counts: Vec<&str> = tried.split(' ').collect();
        assert_eq!(
            counts[1..],
            ["of", counts[0], "scrapes", "failed"],
            "{tried}"
        );
        assert!(counts[0].parse::<usize>().unwrap() >= 1, "{tried}");
        assert_eq!(gen.notes, Vec::<String>::new());
    }

    #[test]
    fn edges_restarts_and_gaps_are_said() {
        let page = |gen: f64| {
            parse(&format!(
                "vllm:generation_tokens_total{{engine=\"0\"}} {gen}\n"
            ))
            .unwrap()
        };
        // A restart: the counter went down.
        let w = summarize(
            "g",
            "u",
            &[(0.0, page(100.0)), (10.0, page(5.0))],
            0.0,
            10.0,
        );
        assert!(w.generation_tokens.is_none());
        assert!(w.notes[0].contains("restarted"), "{:?}", w.notes);
        // Samples outside the window pick the edges: last before w0, first after w1.
        let pts = [
            (0.0, page(0.0)),
            (4.0, page(40.0)),
            (6.0, page(60.0)),
            (12.0, page(120.0)),
            (20.0, page(200.0)),
        ];
        let w = summarize("g", "u", &pts, 5.0, 11.0);
        let g = w.generation_tokens.unwrap();
        assert_eq!((g.increase, w.span_s), (80.0, 8.0));
        // No sample at all.
        assert!(summarize("g", "u", &[], 0.0, 1.0).notes[0].contains("no sample"));
        // The last sample before the end of the window.
        let w = summarize("g", "u", &pts[..3], 0.0, 10.0);
        assert!(
            w.notes[0].contains("before the window's end"),
            "{:?}",
            w.notes
        );
    }
}
