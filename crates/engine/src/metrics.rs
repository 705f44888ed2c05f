//! Prometheus metrics of the engine, named like vLLM's (`vllm:` becomes `colocate:`), so
//! dashboards and the bench's cross-check read the same counters.
//!
//! Written by the scheduler thread, read by `GET /metrics`: every value is a relaxed atomic,
//! so the hot path never takes a lock. The text exposition format is rendered by hand (a
//! few dozen lines) because the Rust Prometheus clients either rewrite metric names (the
//! `:` namespace separator, `_total` suffixes) or lock per observation.

use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::time::Duration;

/// A cumulative histogram over fixed bucket bounds (seconds), in Prometheus text: the one
/// histogram of the workspace (the engine's latencies, the gateway's request durations).
#[derive(Debug)]
pub struct Histogram {
    bounds: &'static [f64],
    /// Non-cumulative counts per bucket, plus one for +Inf.
    counts: Vec<AtomicU64>,
    sum_ns: AtomicU64,
}

impl Histogram {
    /// An empty histogram with these upper bounds (seconds, ascending).
    pub fn new(bounds: &'static [f64]) -> Self {
        Histogram {
            bounds,
            counts: (0..=bounds.len()).map(|_| AtomicU64::new(0)).collect(),
            sum_ns: AtomicU64::new(0),
        }
    }

    /// Records one observation of `secs` seconds.
    pub fn observe(&self, secs: f64) {
        self.observe_ns(secs, (secs * 1e9) as u64);
    }

    /// Records one observation of `d` (its sum to the nanosecond).
    pub fn observe_duration(&self, d: Duration) {
        self.observe_ns(d.as_secs_f64(), d.as_nanos() as u64);
    }

    fn observe_ns(&self, secs: f64, ns: u64) {
        let i = self.bounds.partition_point(|b| *b < secs);
        self.counts[i].fetch_add(1, Relaxed);
        self.sum_ns.fetch_add(ns, Relaxed);
    }

    /// Number of observations.
    pub fn count(&self) -> u64 {
        self.counts.iter().map(|c| c.load(Relaxed)).sum()
    }

    /// The `# HELP` and `# TYPE` lines of a histogram family, written once before its series.
    pub fn render_header(out: &mut String, name: &str, help: &str) {
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} histogram");
    }

    /// The bucket, sum and count lines of one series; `labels` (`a="x",b="y"`, or empty)
    /// come before `le`.
    pub fn render_series(&self, out: &mut String, name: &str, labels: &str) {
        let (before_le, braced) = if labels.is_empty() {
            (String::new(), String::new())
        } else {
            (format!("{labels},"), format!("{{{labels}}}"))
        };
        let mut cum = 0;
        for (b, c) in self.bounds.iter().zip(&self.counts) {
            cum += c.load(Relaxed);
            let _ = writeln!(out, "{name}_bucket{{{before_le}le=\"{b}\"}} {cum}");
        }
        cum += self.counts[self.bounds.len()].load(Relaxed);
        let _ = writeln!(out, "{name}_bucket{{{before_le}le=\"+Inf\"}} {cum}");
        let sum = self.sum_ns.load(Relaxed) as f64 / 1e9;
        let _ = writeln!(out, "{name}_sum{braced} {sum}\n{name}_count{braced} {cum}");
    }

    fn render(&self, out: &mut String, name: &str, help: &str) {
        Self::render_header(out, name, help);
        self.render_series(out, name, "");
    }
}

const TTFT_BUCKETS: &[f64] = &[
    0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
    20.0, 40.0, 80.0,
];
const TPOT_BUCKETS: &[f64] = &[
    0.001, 0.005, 0.01, 0.015, 0.02, 0.025, 0.03, 0.04, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5,
    0.75, 1.0, 2.5,
];
/// Engine steps: from a graph replay of a small model (~1 ms) to an 8k-token prefill.
const STEP_BUCKETS: &[f64] = &[
    0.0005, 0.001, 0.002, 0.003, 0.004, 0.006, 0.008, 0.01, 0.012, 0.015, 0.02, 0.03, 0.05, 0.1,
    0.25, 0.5, 1.0,
];
/// The host's time between two busy steps (scheduling, token delivery, the next step's
/// packing before its launch): tens of microseconds to milliseconds.
const GAP_BUCKETS: &[f64] = &[
    0.00005, 0.0001, 0.0002, 0.0005, 0.001, 0.002, 0.005, 0.01, 0.05,
];
const E2E_BUCKETS: &[f64] = &[
    0.01, 0.05, 0.1, 0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0,
    60.0, 120.0,
];

/// All engine metrics.
#[derive(Debug)]
pub struct Metrics {
    pub requests_running: AtomicU64,
    pub requests_waiting: AtomicU64,
    pub kv_blocks_used: AtomicU64,
    pub kv_blocks_total: AtomicU64,
    pub prompt_tokens: AtomicU64,
    pub generation_tokens: AtomicU64,
    pub preemptions: AtomicU64,
    pub requests_finished_stop: AtomicU64,
    pub requests_finished_length: AtomicU64,
    pub requests_aborted: AtomicU64,
    pub requests_rejected: AtomicU64,
    pub embedding_sequences: AtomicU64,
    /// Prompt tokens looked up in the prefix cache at a request's first admission (with
    /// the cache on), and those found there (not computed again); a preempted sequence
    /// taking its own blocks back counts in neither, as in vLLM.
    pub prefix_cache_queries: AtomicU64,
    pub prefix_cache_hits: AtomicU64,
    pub ttft: Histogram,
    pub tpot: Histogram,
    pub e2e: Histogram,
    /// Duration of a model step that only decodes (one token per sequence).
    pub step_decode: Histogram,
    /// Duration of a model step that carries prompt tokens (a prefill chunk, maybe beside
    /// decodes): with `step_decode` and `step_gap`, where a served step's time goes.
    pub step_mixed: Histogram,
    /// The host's time from the end of one step to the start of the next while sequences
    /// are running: what the GPU waits for between steps.
    pub step_gap: Histogram,
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics {
            requests_running: AtomicU64::new(0),
            requests_waiting: AtomicU64::new(0),
            kv_blocks_used: AtomicU64::new(0),
            kv_blocks_total: AtomicU64::new(0),
            prompt_tokens: AtomicU64::new(0),
            generation_tokens: AtomicU64::new(0),
            preemptions: AtomicU64::new(0),
            requests_finished_stop: AtomicU64::new(0),
            requests_finished_length: AtomicU64::new(0),
            requests_aborted: AtomicU64::new(0),
            requests_rejected: AtomicU64::new(0),
            embedding_sequences: AtomicU64::new(0),
            prefix_cache_queries: AtomicU64::new(0),
            prefix_cache_hits: AtomicU64::new(0),
            ttft: Histogram::new(TTFT_BUCKETS),
            tpot: Histogram::new(TPOT_BUCKETS),
            e2e: Histogram::new(E2E_BUCKETS),
            step_decode: Histogram::new(STEP_BUCKETS),
            step_mixed: Histogram::new(STEP_BUCKETS),
            step_gap: Histogram::new(GAP_BUCKETS),
        }
    }
}

impl Metrics {
    /// The Prometheus text exposition of every metric, labelled with the served model name.
    pub fn render(&self, model_name: &str) -> String {
        let mut out = String::with_capacity(8192);
        let label = format!("{{model_name=\"{}\"}}", model_name.replace('"', "'"));
        let gauge = |out: &mut String, name: &str, help: &str, v: &AtomicU64| {
            let _ = writeln!(
                out,
                "# HELP colocate:{name} {help}\n# TYPE colocate:{name} gauge\ncolocate:{name}{label} {}",
                v.load(Relaxed)
            );
        };
        let counter = |out: &mut String, name: &str, help: &str, v: &AtomicU64| {
            let _ = writeln!(
                out,
                "# HELP colocate:{name} {help}\n# TYPE colocate:{name} counter\ncolocate:{name}{label} {}",
                v.load(Relaxed)
            );
        };
        gauge(
            &mut out,
            "num_requests_running",
            "Requests in the running batch.",
            &self.requests_running,
        );
        gauge(
            &mut out,
            "num_requests_waiting",
            "Requests waiting to be scheduled (including preempted ones).",
            &self.requests_waiting,
        );
        gauge(
            &mut out,
            "kv_cache_blocks_used",
            "KV cache blocks held by sequences.",
            &self.kv_blocks_used,
        );
        gauge(
            &mut out,
            "kv_cache_blocks_total",
            "KV cache blocks in the budget.",
            &self.kv_blocks_total,
        );
        let total = self.kv_blocks_total.load(Relaxed);
        let used = self.kv_blocks_used.load(Relaxed);
        let perc = if total == 0 {
            0.0
        } else {
            used as f64 / total as f64
        };
        let _ = writeln!(
            out,
            "# HELP colocate:kv_cache_usage_perc Fraction of KV cache blocks in use.\n# TYPE colocate:kv_cache_usage_perc gauge\ncolocate:kv_cache_usage_perc{label} {perc}"
        );
        counter(
            &mut out,
            "prompt_tokens_total",
            "Prompt tokens admitted (each request counted once, recomputation not).",
            &self.prompt_tokens,
        );
        counter(
            &mut out,
            "generation_tokens_total",
            "Tokens generated.",
            &self.generation_tokens,
        );
        counter(
            &mut out,
            "num_preemptions_total",
            "Sequences preempted (KV freed, recomputed later).",
            &self.preemptions,
        );
        counter(
            &mut out,
            "request_rejected_total",
            "Requests refused because the waiting queue was full.",
            &self.requests_rejected,
        );
        counter(
            &mut out,
            "prefix_cache_queries_total",
            "Tokens looked up in the prefix cache when a sequence was admitted.",
            &self.prefix_cache_queries,
        );
        counter(
            &mut out,
            "prefix_cache_hits_total",
            "Tokens found in the prefix cache (their K/V reused, not computed).",
            &self.prefix_cache_hits,
        );
        counter(
            &mut out,
            "embedding_sequences_total",
            "Sequences embedded.",
            &self.embedding_sequences,
        );
        let _ = writeln!(
            out,
            "# HELP colocate:request_success_total Finished requests by reason.\n# TYPE colocate:request_success_total counter"
        );
        let m = model_name.replace('"', "'");
        for (reason, v) in [
            ("stop", &self.requests_finished_stop),
            ("length", &self.requests_finished_length),
            ("abort", &self.requests_aborted),
        ] {
            let _ = writeln!(
                out,
                "colocate:request_success_total{{model_name=\"{m}\",finished_reason=\"{reason}\"}} {}",
                v.load(Relaxed)
            );
        }
        self.ttft.render(
            &mut out,
            "colocate:time_to_first_token_seconds",
            "Time from arrival to the first generated token.",
        );
        self.tpot.render(
            &mut out,
            "colocate:time_per_output_token_seconds",
            "Time between consecutive generated tokens of a request.",
        );
        self.e2e.render(
            &mut out,
            "colocate:e2e_request_latency_seconds",
            "Time from arrival to the last token.",
        );
        let step = "colocate:engine_step_seconds";
        Histogram::render_header(
            &mut out,
            step,
            "Duration of a model step (launch to sampled tokens on the host), by kind: decode only, or with prompt tokens.",
        );
        self.step_decode
            .render_series(&mut out, step, "kind=\"decode\"");
        self.step_mixed
            .render_series(&mut out, step, "kind=\"mixed\"");
        self.step_gap.render(
            &mut out,
            "colocate:engine_step_gap_seconds",
            "Host time between consecutive steps while sequences run (scheduling, token delivery, packing).",
        );
        out
    }
}

/// Gauges of the admission bound (`--max-waiting`), which the server owns: places in use
/// (requests accepted, not yet started) and the bound. With `kv_cache_blocks_used` and the
/// running/waiting gauges, what a check needs to see that nothing leaked (all 0 when idle).
pub fn render_admission(model_name: &str, used: usize, capacity: usize) -> String {
    let label = format!("{{model_name=\"{}\"}}", model_name.replace('"', "'"));
    format!(
        "# HELP colocate:admission_places_used Requests accepted and not yet started (bounded by --max-waiting).\n\
         # TYPE colocate:admission_places_used gauge\n\
         colocate:admission_places_used{label} {used}\n\
         # HELP colocate:admission_places_total The bound on accepted, not yet started requests (--max-waiting).\n\
         # TYPE colocate:admission_places_total gauge\n\
         colocate:admission_places_total{label} {capacity}\n"
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_counters_and_cumulative_buckets() {
        let m = Metrics::default();
        m.generation_tokens.fetch_add(5, Relaxed);
        m.ttft.observe(0.003);
        m.ttft.observe(100.0);
        let t = m.render("qwen");
        assert!(t.contains("colocate:generation_tokens_total{model_name=\"qwen\"} 5\n"));
        assert!(t.contains("colocate:time_to_first_token_seconds_bucket{le=\"0.001\"} 0\n"));
        assert!(t.contains("colocate:time_to_first_token_seconds_bucket{le=\"0.005\"} 1\n"));
        assert!(t.contains("colocate:time_to_first_token_seconds_bucket{le=\"80\"} 1\n"));
        assert!(t.contains("colocate:time_to_first_token_seconds_bucket{le=\"+Inf\"} 2\n"));
        assert!(t.contains("colocate:time_to_first_token_seconds_count 2\n"));
    }

    #[test]
    fn step_histograms_by_kind() {
        let m = Metrics::default();
        m.step_decode.observe(0.0059);
        m.step_mixed.observe(0.04);
        m.step_mixed.observe(0.2);
        m.step_gap.observe(0.0003);
        let t = m.render("q");
        assert!(
            t.contains("colocate:engine_step_seconds_bucket{kind=\"decode\",le=\"0.006\"} 1\n"),
            "{t}"
        );
        assert!(
            t.contains("colocate:engine_step_seconds_count{kind=\"mixed\"} 2\n"),
            "{t}"
        );
        assert!(
            t.contains("colocate:engine_step_seconds_bucket{kind=\"mixed\",le=\"0.05\"} 1\n"),
            "{t}"
        );
        assert!(
            t.contains("colocate:engine_step_gap_seconds_bucket{le=\"0.0005\"} 1\n"),
            "{t}"
        );
        assert_eq!(
            t.matches("# TYPE colocate:engine_step_seconds histogram")
                .count(),
            1
        );
    }

    #[test]
    fn admission_gauges() {
        let t = render_admission("q", 2, 10);
        assert!(
            t.contains("colocate:admission_places_used{model_name=\"q\"} 2\n"),
            "{t}"
        );
        assert!(
            t.contains("colocate:admission_places_total{model_name=\"q\"} 10\n"),
            "{t}"
        );
        assert!(
            t.contains("# TYPE colocate:admission_places_used gauge\n"),
            "{t}"
        );
    }
}
