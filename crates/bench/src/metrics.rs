//! Metric definitions, exactly as vLLM's `benchmark_serving.py` (DESIGN.md, "Conventions"):
//! TTFT from just before sending to the first chunk with a non-empty `choices`;
//! TPOT = (E2EL - TTFT) / (output tokens - 1) for requests with more than one output token;
//! ITL = every gap between consecutive content chunks, pooled over requests;
//! E2EL = send to the last content chunk; output tokens from the server's `usage`;
//! percentiles by linear interpolation (numpy's default), std with ddof = 0.
//!
//! A gen response received whole (`"stream": false`, [`RequestRecord::whole`]) has no chunk
//! times: its completion tokens are spread uniformly over its lifetime, and a window counts
//! the share that overlaps it (`RequestRecord::output_tokens_in`, which says why).

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::spec::Slo;

/// Everything measured about one request. Times are Unix epoch seconds.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct RequestRecord {
    /// Index of the workload in the spec.
    pub workload: usize,
    /// When the request was due (open loop: its scheduled arrival; closed loop: = `sent`).
    pub scheduled: f64,
    /// Just before the request was sent.
    pub sent: f64,
    /// First chunk with a non-empty `choices` (gen) or the response (embed).
    pub first_token: Option<f64>,
    /// Last chunk with a non-empty `choices` (gen) or the response (embed).
    pub last_token: Option<f64>,
    /// When the response ended (success, error, or cut at the end of the run).
    pub end: f64,
    /// Arrival time of every content chunk (gen only); not written to JSONL.
    #[serde(skip)]
    pub chunk_times: Vec<f64>,
    /// Number of content chunks received.
    pub chunks: u64,
    /// `usage.prompt_tokens` (else the client's estimate, see `prompt_tokens_estimated`).
    pub prompt_tokens: Option<u64>,
    pub prompt_tokens_estimated: bool,
    /// `usage.completion_tokens` (gen).
    pub output_tokens: Option<u64>,
    /// Inputs in this request (embed batch; 1 for gen).
    pub sequences: u32,
    /// Error kind when the request failed (`http_503`, `connect`, `stream_broken`, ...).
    pub error: Option<String>,
    /// True when the request finished normally (a complete response was received).
    pub success: bool,
    /// A response received whole: gen with `"stream": false` (no chunk times, so its
    /// completion tokens are spread over its lifetime, `output_tokens_in`) and every
    /// embedding (its batch spread the same way, `sequences_in`).
    #[serde(default)]
    pub whole: bool,
}

impl RequestRecord {
    pub fn ttft(&self) -> Option<f64> {
        self.first_token.map(|t| t - self.sent)
    }

    pub fn e2el(&self) -> Option<f64> {
        self.last_token.map(|t| t - self.sent)
    }

    /// vLLM's TPOT: only for requests with more than one output token.
    pub fn tpot(&self) -> Option<f64> {
        let out = self.output_tokens?;
        if out <= 1 {
            return None;
        }
        Some((self.e2el()? - self.ttft()?) / (out - 1) as f64)
    }

    /// Per-request decode speed (the seeds' "decode tok/s/req"): 1 / TPOT.
    pub fn decode_tok_s(&self) -> Option<f64> {
        let t = self.tpot()?;
        (t > 0.0).then(|| 1.0 / t)
    }

    /// When the prompt counts as processed: the first token of a stream; for a whole
    /// response that succeeded, its send. The prompt is prefilled once, at the start of the
    /// request's life (after any wait for a batch slot, which the client cannot see), not
    /// over its decode; in steady state where in the lifetime it is put does not change the
    /// window's expected count, and the send is the one time the client knows.
    pub fn prompt_counted_at(&self) -> Option<f64> {
        if self.whole {
            return self.success.then_some(self.sent);
        }
        self.first_token
            .or_else(|| (self.success && self.chunks > 0).then_some(self.end))
    }

    /// Client-side queueing: from the scheduled arrival to the send.
    pub fn queue(&self) -> f64 {
        (self.sent - self.scheduled).max(0.0)
    }

    /// Output tokens generated in `[w0, w1)`.
    ///
    /// Streamed: each content chunk carries its share of the request's
    /// `usage.completion_tokens` (one token per chunk when no usage arrived, e.g. for
    /// requests cut at the end of the run), so a request straddling an edge contributes
    /// only what streamed inside the window.
    ///
    /// Whole (not streamed): the client sees only the send and the complete answer, so the
    /// tokens are spread uniformly over `[sent, end]` and the window gets the share of that
    /// lifetime it overlaps (a zero-length lifetime counts wholly at its end; a request
    /// without usage, e.g. cut, counts nothing). Why uniform from the send:
    /// - decode dominates these requests: one prefill of a short prompt, then one decode
    ///   step per output token (512 for the seeds), so tokens come at a nearly steady pace
    ///   once the request runs;
    /// - the time before the first token (prefill, and any wait for a batch slot when the
    ///   concurrency exceeds the engine's batch: half the E2EL at 1,024 on 512 slots) is
    ///   not observable without a stream, so there is no principled offset to start from;
    /// - in steady state the rule is unbiased: with C requests in flight each spreading
    ///   `n / E2EL`, the spread rate is `C * n / E2EL`, the completion rate times `n`
    ///   (Little's law), whatever part of each lifetime was waiting; a shape other than the
    ///   true one only moves tokens between neighbouring windows, and on average the error
    ///   it makes at a window's start is the opposite of the one at its end.
    ///
    /// Identical requests started together finish in waves; counting each one's tokens at
    /// its end gave a multiple of whole waves per window, the spread gives the rate. It is
    /// exact at the window's end only if the requests in flight there are waited for,
    /// which the runner does (it drains whole-response workloads after the window).
    pub fn output_tokens_in(&self, w0: f64, w1: f64) -> f64 {
        if self.whole {
            return match (self.success, self.output_tokens) {
                (true, Some(n)) => n as f64 * self.lifetime_share(w0, w1),
                _ => 0.0,
            };
        }
        let inside = self
            .chunk_times
            .iter()
            .filter(|&&t| t >= w0 && t < w1)
            .count() as f64;
        match self.output_tokens {
            Some(n) if !self.chunk_times.is_empty() => {
                inside * n as f64 / self.chunk_times.len() as f64
            }
            _ => inside,
        }
    }

    /// The fraction of the lifetime `[sent, end]` that lies in `[w0, w1)`; a zero-length
    /// lifetime is wholly where it ends.
    pub fn lifetime_share(&self, w0: f64, w1: f64) -> f64 {
        let life = self.end - self.sent;
        if life <= 0.0 {
            return if self.end >= w0 && self.end < w1 {
                1.0
            } else {
                0.0
            };
        }
        ((self.end.min(w1) - self.sent.max(w0)) / life).clamp(0.0, 1.0)
    }

    /// Sequences embedded in `[w0, w1)` (embed): an embedding response comes whole, so its
    /// batch is spread over its lifetime as a whole gen response's tokens are
    /// ([`Self::output_tokens_in`] says why; the same waves appear when every batch takes
    /// the same long time). A failed request counts nothing.
    pub fn sequences_in(&self, w0: f64, w1: f64) -> f64 {
        if !self.success {
            return 0.0;
        }
        self.sequences as f64 * self.lifetime_share(w0, w1)
    }

    /// Finished successfully inside the window: counts for latency, wherever it started
    /// (the warm-up is there so that it started under load). Requiring the start inside
    /// the window too would drop every request longer than what is left of the window:
    /// the slowest ones, or all of them under heavy interference.
    pub fn in_latency_set(&self, w0: f64, w1: f64) -> bool {
        self.success && self.end >= w0 && self.end < w1
    }

    /// Meets every objective of the SLO (vLLM's goodput rule).
    pub fn meets(&self, slo: &Slo) -> bool {
        let ok = |limit: Option<std::time::Duration>, v: Option<f64>| match (limit, v) {
            (None, _) => true,
            (Some(l), Some(v)) => v <= l.as_secs_f64(),
            (Some(_), None) => false,
        };
        // vLLM counts a request without TPOT (one output token) as meeting the TPOT SLO.
        let tpot_ok = match (slo.tpot, self.tpot()) {
            (Some(l), Some(v)) => v <= l.as_secs_f64(),
            _ => true,
        };
        ok(slo.ttft, self.ttft()) && tpot_ok && ok(slo.e2el, self.e2el())
    }
}

/// Summary of one latency-like distribution. Values in milliseconds unless named otherwise.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Stats {
    pub count: usize,
    pub mean: f64,
    pub median: f64,
    pub std: f64,
    pub min: f64,
    pub max: f64,
    /// `"p90"` -> value, for every configured percentile.
    pub percentiles: BTreeMap<String, f64>,
}

/// The name of a percentile key: `p50`, `p99.9`.
pub fn percentile_key(p: f64) -> String {
    if p.fract() == 0.0 {
        format!("p{p:.0}")
    } else {
        format!("p{p}")
    }
}

/// numpy's default percentile (linear interpolation between closest ranks) of sorted data.
pub fn percentile_sorted(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let rank = p / 100.0 * (sorted.len() - 1) as f64;
    let lo = rank.floor() as usize;
    let hi = rank.ceil() as usize;
    sorted[lo] + (sorted[hi] - sorted[lo]) * (rank - lo as f64)
}

impl Stats {
    /// Summarises `values` multiplied by `scale` (1000 for seconds to ms). An empty set gives
    /// zeros with `count` 0 (vLLM reports 0 there too).
    pub fn of(mut values: Vec<f64>, scale: f64, percentiles: &[f64]) -> Stats {
        if values.is_empty() {
            return Stats {
                percentiles: percentiles
                    .iter()
                    .map(|&p| (percentile_key(p), 0.0))
                    .collect(),
                ..Stats::default()
            };
        }
        for v in &mut values {
            *v *= scale;
        }
        values.sort_by(f64::total_cmp);
        let n = values.len() as f64;
        let mean = values.iter().sum::<f64>() / n;
        let var = values.iter().map(|v| (v - mean) * (v - mean)).sum::<f64>() / n;
        Stats {
            count: values.len(),
            mean,
            median: percentile_sorted(&values, 50.0),
            std: var.sqrt(),
            min: values[0],
            max: values[values.len() - 1],
            percentiles: percentiles
                .iter()
                .map(|&p| (percentile_key(p), percentile_sorted(&values, p)))
                .collect(),
        }
    }
}

/// Statistics of a generation workload over the measurement window.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct GenStats {
    /// Requests in the latency set (finished successfully in the window).
    pub completed: usize,
    /// Prompt tokens of requests whose first token arrived in the window (a response
    /// received whole has no first token: its prompt counts at its send).
    pub input_tokens: f64,
    /// Output tokens generated during the window: those that streamed in, and each whole
    /// response's share of its lifetime inside the window
    /// (`RequestRecord::output_tokens_in`).
    pub output_tokens: f64,
    pub output_throughput: f64,
    pub total_token_throughput: f64,
    /// Successful requests that ended in the window, per second.
    pub request_throughput: f64,
    /// Requests per second meeting every SLO (when SLOs were given).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub goodput: Option<f64>,
    pub ttft_ms: Stats,
    pub tpot_ms: Stats,
    pub itl_ms: Stats,
    pub e2el_ms: Stats,
    /// Per-request decode speed, tokens/s (1 / TPOT).
    pub decode_tok_s_per_req: Stats,
    /// Client-side queueing (open loop with a concurrency cap), ms.
    pub queue_ms: Stats,
    /// Mean `usage.prompt_tokens` and `completion_tokens` per request of the latency set.
    pub mean_prompt_tokens: f64,
    pub mean_output_tokens: f64,
}

/// Statistics of an embedding workload over the measurement window.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct EmbedStats {
    pub completed: usize,
    /// Sequences embedded during the window: each response's sequences spread over its
    /// lifetime, the window's share (`RequestRecord::sequences_in`).
    pub sequences: f64,
    /// `usage.prompt_tokens` counted the same way.
    pub tokens: f64,
    pub seq_throughput: f64,
    pub token_throughput: f64,
    pub request_throughput: f64,
    pub latency_ms: Stats,
    pub queue_ms: Stats,
    pub mean_tokens_per_seq: f64,
}

/// Generation statistics of `records` over the window `[w0, w1)`.
pub fn gen_stats(
    records: &[RequestRecord],
    w0: f64,
    w1: f64,
    percentiles: &[f64],
    slo: Option<&Slo>,
) -> GenStats {
    let len = (w1 - w0).max(1e-9);
    let set: Vec<&RequestRecord> = records
        .iter()
        .filter(|r| r.in_latency_set(w0, w1))
        .collect();
    let output_tokens: f64 = records.iter().map(|r| r.output_tokens_in(w0, w1)).sum();
    let input_tokens: f64 = records
        .iter()
        .filter(|r| r.prompt_counted_at().is_some_and(|t| t >= w0 && t < w1))
        .map(|r| r.prompt_tokens.unwrap_or(0) as f64)
        .sum();
    let ended = records
        .iter()
        .filter(|r| r.success && r.end >= w0 && r.end < w1)
        .count();
    let itl: Vec<f64> = set
        .iter()
        .flat_map(|r| r.chunk_times.windows(2).map(|w| w[1] - w[0]))
        .collect();
    let col = |f: &dyn Fn(&RequestRecord) -> Option<f64>| {
        set.iter().filter_map(|r| f(r)).collect::<Vec<_>>()
    };
    let n = set.len().max(1) as f64;
    GenStats {
        completed: set.len(),
        input_tokens,
        output_tokens,
        output_throughput: output_tokens / len,
        total_token_throughput: (input_tokens + output_tokens) / len,
        request_throughput: ended as f64 / len,
        goodput: slo.map(|s| set.iter().filter(|r| r.meets(s)).count() as f64 / len),
        ttft_ms: Stats::of(col(&|r| r.ttft()), 1e3, percentiles),
        tpot_ms: Stats::of(col(&|r| r.tpot()), 1e3, percentiles),
        itl_ms: Stats::of(itl, 1e3, percentiles),
        e2el_ms: Stats::of(col(&|r| r.e2el()), 1e3, percentiles),
        decode_tok_s_per_req: Stats::of(col(&|r| r.decode_tok_s()), 1.0, percentiles),
        queue_ms: Stats::of(col(&|r| Some(r.queue())), 1e3, percentiles),
        mean_prompt_tokens: set
            .iter()
            .map(|r| r.prompt_tokens.unwrap_or(0) as f64)
            .sum::<f64>()
            / n,
        mean_output_tokens: set
            .iter()
            .map(|r| r.output_tokens.unwrap_or(0) as f64)
            .sum::<f64>()
            / n,
    }
}

/// Embedding statistics of `records` over the window `[w0, w1)`: each response's sequences
/// and tokens are spread over its lifetime (`RequestRecord::sequences_in`); latency over the
/// responses that arrived inside the window.
pub fn embed_stats(records: &[RequestRecord], w0: f64, w1: f64, percentiles: &[f64]) -> EmbedStats {
    let len = (w1 - w0).max(1e-9);
    let arrived = records
        .iter()
        .filter(|r| r.success && r.end >= w0 && r.end < w1)
        .count();
    let sequences: f64 = records.iter().map(|r| r.sequences_in(w0, w1)).sum();
    let tokens: f64 = records
        .iter()
        .filter(|r| r.success)
        .map(|r| r.prompt_tokens.unwrap_or(0) as f64 * r.lifetime_share(w0, w1))
        .sum();
    let set: Vec<&RequestRecord> = records
        .iter()
        .filter(|r| r.in_latency_set(w0, w1))
        .collect();
    EmbedStats {
        completed: set.len(),
        sequences,
        tokens,
        seq_throughput: sequences / len,
        token_throughput: tokens / len,
        request_throughput: arrived as f64 / len,
        latency_ms: Stats::of(
            set.iter().map(|r| r.end - r.sent).collect(),
            1e3,
            percentiles,
        ),
        queue_ms: Stats::of(set.iter().map(|r| r.queue()).collect(), 1e3, percentiles),
        mean_tokens_per_seq: if sequences > 0.0 {
            tokens / sequences
        } else {
            0.0
        },
    }
}

/// Errors of requests that ended in the window, by kind.
pub fn errors_in(records: &[RequestRecord], w0: f64, w1: f64) -> BTreeMap<String, u64> {
    let mut m = BTreeMap::new();
    for r in records {
        if let Some(e) = &r.error {
            if r.end >= w0 && r.end < w1 {
                *m.entry(e.clone()).or_insert(0) += 1;
            }
        }
    }
    m
}

/// One second of a workload's time series.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct TimePoint {
    /// Start of the bin, Unix seconds.
    pub t: f64,
    /// Output tokens/s (gen: streamed in, or whole responses' share of the bin) or
    /// sequences/s (embed: each response's batch spread over its lifetime).
    pub throughput: f64,
    /// Requests/s that completed successfully in the bin.
    pub requests: f64,
    /// Errors/s in the bin.
    pub errors: f64,
}

/// Per-second throughput over `[w0, w1)`; a last partial bin is scaled to a rate.
pub fn timeseries(records: &[RequestRecord], gen: bool, w0: f64, w1: f64) -> Vec<TimePoint> {
    if w1 <= w0 {
        return Vec::new();
    }
    let nbins = (w1 - w0).ceil() as usize;
    let mut pts: Vec<TimePoint> = (0..nbins)
        .map(|i| TimePoint {
            t: w0 + i as f64,
            ..TimePoint::default()
        })
        .collect();
    let bin = |t: f64| -> Option<usize> {
        (t >= w0 && t < w1).then(|| ((t - w0) as usize).min(nbins - 1))
    };
    // A whole response (gen not streamed, every embed) is spread over the bins its
    // lifetime overlaps, each bin getting its share.
    let spread = |pts: &mut [TimePoint], r: &RequestRecord, share: &dyn Fn(f64, f64) -> f64| {
        if r.success && r.end >= w0 && r.sent < w1 {
            let first = ((r.sent.max(w0) - w0) as usize).min(nbins - 1);
            let last = ((r.end.min(w1) - w0) as usize).min(nbins - 1);
            for p in pts.iter_mut().take(last + 1).skip(first) {
                p.throughput += share(p.t, (p.t + 1.0).min(w1));
            }
        }
    };
    for r in records {
        if gen && r.whole {
            spread(&mut pts, r, &|a, b| r.output_tokens_in(a, b));
        } else if gen {
            let share = match r.output_tokens {
                Some(n) if !r.chunk_times.is_empty() => n as f64 / r.chunk_times.len() as f64,
                _ => 1.0,
            };
            for &t in &r.chunk_times {
                if let Some(b) = bin(t) {
                    pts[b].throughput += share;
                }
            }
        } else {
            spread(&mut pts, r, &|a, b| r.sequences_in(a, b));
        }
        if let Some(b) = bin(r.end) {
            if r.success {
                pts[b].requests += 1.0;
            } else if r.error.is_some() {
                pts[b].errors += 1.0;
            }
        }
    }
    for p in &mut pts {
        let width = (w1 - p.t).min(1.0);
        if width < 1.0 {
            p.throughput /= width;
            p.requests /= width;
            p.errors /= width;
        }
    }
    pts
}

#[cfg(test)]
mod tests {
    use super::*;

    fn gen_rec(sent: f64, chunks: &[f64], out: u64) -> RequestRecord {
        RequestRecord {
            scheduled: sent,
            sent,
            first_token: chunks.first().copied(),
            last_token: chunks.last().copied(),
            end: chunks.last().copied().unwrap_or(sent) + 0.001,
            chunk_times: chunks.to_vec(),
            chunks: chunks.len() as u64,
            prompt_tokens: Some(10),
            output_tokens: Some(out),
            sequences: 1,
            success: true,
            ..RequestRecord::default()
        }
    }

    #[test]
    fn numpy_percentiles() {
        let v = [1.0, 2.0, 3.0, 4.0];
        // numpy.percentile([1,2,3,4], [50, 90, 99]) = 2.5, 3.7, 3.97
        assert!((percentile_sorted(&v, 50.0) - 2.5).abs() < 1e-12);
        assert!((percentile_sorted(&v, 90.0) - 3.7).abs() < 1e-12);
        assert!((percentile_sorted(&v, 99.0) - 3.97).abs() < 1e-12);
        let s = Stats::of(vec![4.0, 1.0, 3.0, 2.0], 1.0, &[90.0]);
        assert_eq!(s.median, 2.5);
        assert!((s.std - 1.118033988749895).abs() < 1e-12); // numpy.std, ddof=0
        assert_eq!(s.percentiles["p90"], 3.7);
        assert_eq!(percentile_key(99.9), "p99.9");
    }

    #[test]
    fn vllm_definitions_on_hand_made_timings() {
        // Sent at 100.0; content chunks at +0.2, +0.25, +0.35, +0.4; usage says 4 tokens.
        let r = gen_rec(100.0, &[100.2, 100.25, 100.35, 100.4], 4);
        assert!((r.ttft().unwrap() - 0.2).abs() < 1e-9);
        assert!((r.e2el().unwrap() - 0.4).abs() < 1e-9);
        // TPOT = (0.4 - 0.2) / (4 - 1)
        assert!((r.tpot().unwrap() - 0.2 / 3.0).abs() < 1e-9);
        assert!((r.decode_tok_s().unwrap() - 15.0).abs() < 1e-6);
        // One output token: no TPOT (vLLM skips it).
        assert_eq!(gen_rec(0.0, &[0.5], 1).tpot(), None);

        let r2 = gen_rec(101.0, &[101.1, 101.3], 2);
        let g = gen_stats(&[r.clone(), r2], 100.0, 110.0, &[50.0, 99.0], None);
        assert_eq!(g.completed, 2);
        // TTFT 200 ms and 100 ms
        assert!((g.ttft_ms.mean - 150.0).abs() < 1e-6);
        // ITL pooled: 50, 100, 50 (r) and 200 (r2)
        assert_eq!(g.itl_ms.count, 4);
        assert!((g.itl_ms.mean - 100.0).abs() < 1e-6);
        assert!((g.itl_ms.median - 75.0).abs() < 1e-6);
        // TPOT: 66.67 ms and 200 ms
        assert!((g.tpot_ms.mean - (200.0 / 3.0 + 200.0) / 2.0).abs() < 1e-6);
        assert!((g.e2el_ms.max - 400.0).abs() < 1e-6);
        assert!((g.output_tokens - 6.0).abs() < 1e-9);
        assert!((g.output_throughput - 0.6).abs() < 1e-9);
        assert!((g.total_token_throughput - 2.6).abs() < 1e-9);
    }

    #[test]
    fn goodput_counts_requests_meeting_every_slo() {
        let fast = gen_rec(0.0, &[0.1, 0.12, 0.14], 3); // ttft 100ms, tpot 20ms
        let slow_first = gen_rec(0.0, &[0.5, 0.52], 2); // ttft 500ms
        let slow_decode = gen_rec(0.0, &[0.1, 0.3], 2); // tpot 200ms
        let slo = Slo::parse("ttft=200ms,tpot=50ms").unwrap();
        assert!(fast.meets(&slo) && !slow_first.meets(&slo) && !slow_decode.meets(&slo));
        let g = gen_stats(
            &[fast, slow_first, slow_decode],
            0.0,
            2.0,
            &[50.0],
            Some(&slo),
        );
        assert_eq!(g.goodput, Some(0.5));
    }

    #[test]
    fn window_accounting_with_straddling_requests() {
        // Window [10, 20).
        // a: starts before, streams 10 chunks at 8.5..13 (step .5), usage 20 tokens (2 per chunk).
        let a_chunks: Vec<f64> = (0..10).map(|i| 8.5 + 0.5 * i as f64).collect();
        let a = gen_rec(8.0, &a_chunks, 20);
        // b: fully inside.
        let b = gen_rec(12.0, &[12.5, 13.0, 13.5], 3);
        // c: starts inside, ends after the window: only the chunks before 20 count.
        let c = gen_rec(19.0, &[19.5, 19.9, 20.0, 20.5], 4);
        // d: cut at the end of the run: no usage, one token per chunk, not successful.
        let mut d = gen_rec(15.0, &[15.5, 16.0], 0);
        d.output_tokens = None;
        d.success = false;
        let recs = [a, b, c, d];
        let g = gen_stats(&recs, 10.0, 20.0, &[50.0], None);
        // a: chunks at 10.0 .. 13.0 inside = 7 chunks * 2 = 14; b: 3; c: 2; d: 2.
        assert!((g.output_tokens - 21.0).abs() < 1e-9, "{}", g.output_tokens);
        // Latency over the requests that ended in the window, a and b (c ended after, d
        // failed); a started in the warm-up and still counts: excluding requests longer
        // than what is left of the window would hide the slowest ones.
        assert_eq!(g.completed, 2);
        assert!((g.ttft_ms.mean - 500.0).abs() < 1e-6);
        assert!((g.e2el_ms.max - 5000.0).abs() < 1e-3, "{}", g.e2el_ms.max);
        // Requests ended in the window: a (13.001) and b.
        assert!((g.request_throughput - 0.2).abs() < 1e-9);
        // Input tokens of requests whose first token came in the window: b, c, d.
        assert!((g.input_tokens - 30.0).abs() < 1e-9);
        let ts = timeseries(&recs, true, 10.0, 20.0);
        assert_eq!(ts.len(), 10);
        let total: f64 = ts.iter().map(|p| p.throughput).sum();
        assert!((total - 21.0).abs() < 1e-9);
        assert!((ts[0].throughput - 4.0).abs() < 1e-9); // a at 10.0 and 10.5
    }

    #[test]
    fn embed_window_spreads_each_batch_over_its_lifetime() {
        let mk = |sent: f64, end: f64| RequestRecord {
            scheduled: sent,
            sent,
            first_token: Some(end),
            last_token: Some(end),
            end,
            prompt_tokens: Some(64 * 8),
            sequences: 64,
            success: true,
            whole: true,
            ..RequestRecord::default()
        };
        // Lifetimes [9, 10.5] (a third inside), [10, 10.25] (all), [19.5, 20.5] (half).
        let recs = [mk(9.0, 10.5), mk(10.0, 10.25), mk(19.5, 20.5)];
        let e = embed_stats(&recs, 10.0, 20.0, &[50.0]);
        let seqs = 64.0 * (0.5 / 1.5 + 1.0 + 0.5);
        assert!((e.sequences - seqs).abs() < 1e-9, "{}", e.sequences);
        assert!((e.tokens - 8.0 * seqs).abs() < 1e-9);
        assert!((e.seq_throughput - seqs / 10.0).abs() < 1e-9);
        // Latency over the two responses that arrived in the window, one sent before it.
        assert_eq!(e.completed, 2);
        assert!((e.latency_ms.mean - 875.0).abs() < 1e-6);
        assert!((e.mean_tokens_per_seq - 8.0).abs() < 1e-9);
        // The time series spreads the same way and adds up to the window's sequences.
        let ts = timeseries(&recs, false, 10.0, 20.0);
        let total: f64 = ts.iter().map(|p| p.throughput).sum();
        assert!((total - seqs).abs() < 1e-9, "{total}");
        let mut failed = mk(11.0, 12.0);
        failed.success = false;
        failed.error = Some("http_503".into());
        assert_eq!(
            embed_stats(&[failed.clone()], 10.0, 20.0, &[50.0]).sequences,
            0.0
        );
        let errs = errors_in(&[failed], 10.0, 20.0);
        assert_eq!(errs["http_503"], 1);
    }

    /// Batches that all take the same long time and start together (as a closed loop of
    /// identical requests does) finish in waves: counted on arrival a 30 s window sees one
    /// wave or two; spread over their lifetimes it sees the rate.
    #[test]
    fn embed_waves_give_the_rate_when_spread() {
        // 128 clients, batches of 32, each batch takes 16 s: 256 seq/s.
        let recs: Vec<RequestRecord> = (0..4)
            .flat_map(|wave| {
                (0..128).map(move |_| RequestRecord {
                    sent: wave as f64 * 16.0,
                    scheduled: wave as f64 * 16.0,
                    end: (wave + 1) as f64 * 16.0,
                    last_token: Some((wave + 1) as f64 * 16.0),
                    first_token: Some((wave + 1) as f64 * 16.0),
                    sequences: 32,
                    prompt_tokens: Some(32 * 25),
                    success: true,
                    whole: true,
                    ..RequestRecord::default()
                })
            })
            .collect();
        let e = embed_stats(&recs, 15.0, 45.0, &[50.0]);
        assert!(
            (e.seq_throughput - 256.0).abs() < 1e-9,
            "{}",
            e.seq_throughput
        );
    }

    /// A whole (non-streamed) response of `out` tokens, sent at `sent`, ended at `end`, as
    /// `unstreamed::record_response` leaves it.
    fn whole_rec(sent: f64, end: f64, out: u64) -> RequestRecord {
        RequestRecord {
            scheduled: sent,
            sent,
            first_token: None,
            last_token: Some(end),
            end,
            chunk_times: vec![end],
            chunks: 1,
            prompt_tokens: Some(10),
            prompt_tokens_estimated: false,
            output_tokens: Some(out),
            sequences: 1,
            success: true,
            whole: true,
            ..RequestRecord::default()
        }
    }

    #[test]
    fn a_whole_response_counts_the_share_of_its_lifetime_inside_the_window() {
        // Window [10, 20); 100 tokens each.
        let straddles_w0 = whole_rec(6.0, 14.0, 100); // 4 of 8 s inside: 50
        let straddles_w1 = whole_rec(18.0, 23.0, 100); // 2 of 5 s inside: 40
        let inside = whole_rec(11.0, 15.0, 100); // all: 100
        let before = whole_rec(2.0, 8.0, 100); // none
        let after = whole_rec(21.0, 25.0, 100); // none
        let spans = whole_rec(5.0, 25.0, 100); // 10 of 20 s: 50
                                               // Cut at the end of the run: no usage, no tokens (even with its pseudo-chunk).
        let mut cut = whole_rec(12.0, 19.0, 100);
        cut.success = false;
        cut.output_tokens = None;
        let (w0, w1) = (10.0, 20.0);
        let near = |a: f64, b: f64| (a - b).abs() < 1e-9;
        assert!(near(straddles_w0.output_tokens_in(w0, w1), 50.0));
        assert!(near(straddles_w1.output_tokens_in(w0, w1), 40.0));
        assert!(near(inside.output_tokens_in(w0, w1), 100.0));
        assert_eq!(before.output_tokens_in(w0, w1), 0.0);
        assert_eq!(after.output_tokens_in(w0, w1), 0.0);
        assert!(near(spans.output_tokens_in(w0, w1), 50.0));
        assert_eq!(cut.output_tokens_in(w0, w1), 0.0);
        // Shares of adjacent windows add up to the whole.
        let r = &straddles_w1;
        let parts = r.output_tokens_in(0.0, 19.0) + r.output_tokens_in(19.0, 30.0);
        assert!(near(parts, 100.0));
        // A zero-length lifetime counts wholly where it ends.
        let instant = whole_rec(12.0, 12.0, 7);
        assert_eq!(instant.output_tokens_in(w0, w1), 7.0);
        assert_eq!(instant.output_tokens_in(12.5, w1), 0.0);

        let recs = [
            straddles_w0,
            straddles_w1,
            inside,
            before,
            after,
            spans,
            cut,
        ];
        let g = gen_stats(&recs, w0, w1, &[50.0], None);
        assert!(near(g.output_tokens, 240.0), "{}", g.output_tokens);
        assert!(near(g.output_throughput, 24.0));
        // Latency and request counts keep their rule: the requests that ended inside (two).
        assert_eq!(g.completed, 2);
        assert!(near(g.request_throughput, 0.2));
        assert!((g.e2el_ms.mean - 6_000.0).abs() < 1e-6, "{:?}", g.e2el_ms);
        // A whole response's prompt counts when it was sent (successful ones only): the two
        // sent inside, not the cut one.
        assert!(near(g.input_tokens, 20.0), "{}", g.input_tokens);
        // The time series spreads the same way and adds up to the window's tokens.
        let ts = timeseries(&recs, true, w0, w1);
        let total: f64 = ts.iter().map(|p| p.throughput).sum();
        assert!(near(total, 240.0), "{total}");
        // [13, 14): straddles_w0 12.5, inside 25, spans 5.
        assert!(near(ts[3].throughput, 42.5), "{:?}", ts[3]);
        // [19, 20): straddles_w1 20, spans 5.
        assert!(near(ts[9].throughput, 25.0), "{:?}", ts[9]);
    }

    /// Identical requests started together finish in waves; counting each one's tokens
    /// where it ends gives a multiple of whole waves over the window (the H200 runs:
    /// 26,214 tok/s at 512 against vLLM's 25,046). Spread over their lifetimes they give
    /// the steady rate in any window, and requests queueing for a slot (concurrency above
    /// the engine's batch) stretch the spread but not the rate (Little's law).
    #[test]
    fn waves_of_identical_requests_give_the_steady_rate() {
        let t = 10.0;
        // 8 in flight, 512 tokens in 10 s each, back to back: 409.6 tok/s.
        let waves: Vec<RequestRecord> = (0..12)
            .flat_map(|k| (0..8).map(move |_| whole_rec(t * k as f64, t * (k + 1) as f64, 512)))
            .collect();
        // 8 in flight, 4 slots: after the first wave each request waits one wave for a
        // slot and then runs one: lifetime 2T, 4 done every T: 204.8 tok/s.
        let mut queued: Vec<RequestRecord> = (0..4).map(|_| whole_rec(0.0, t, 512)).collect();
        for k in 0..12 {
            for _ in 0..4 {
                queued.push(whole_rec(t * k as f64, t * (k + 2) as f64, 512));
            }
        }
        for (w0, w1) in [(15.0, 45.0), (12.3, 37.9), (20.0, 50.0), (10.5, 20.4)] {
            let g = gen_stats(&waves, w0, w1, &[50.0], None);
            assert!(
                (g.output_throughput - 409.6).abs() < 1e-9,
                "[{w0}, {w1}): {}",
                g.output_throughput
            );
            let g = gen_stats(&queued, w0, w1, &[50.0], None);
            assert!(
                (g.output_throughput - 204.8).abs() < 1e-9,
                "[{w0}, {w1}) queued: {}",
                g.output_throughput
            );
        }
        // Counted at their ends, [12.3, 37.9) would hold two waves: 320 tok/s.
        let ended = waves
            .iter()
            .filter(|r| r.end >= 12.3 && r.end < 37.9)
            .count();
        assert_eq!(ended as f64 * 512.0 / 25.6, 320.0);
    }
}
