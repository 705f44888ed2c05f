//! Each tenant's live latency, measured from the traffic the gateway proxies: no
//! cooperation from the engine, so it works the same for vLLM, SGLang, TEI and the
//! built-in engine.
//!
//! Three series per tenant, named as vLLM's serving benchmark names them, each kept over a
//! sliding window and summarised as a 99th percentile (linear interpolation, as numpy's
//! default):
//! - TTFT: from the gateway receiving the request to the first non-empty chunk of a
//!   streamed (SSE) answer; recorded when that chunk arrives, so the controller sees a slow
//!   first token before the request ends;
//! - TPOT: a streamed answer's mean gap between chunks, (last - first) / (chunks - 1), the
//!   gateway's proxy for time per output token (an engine sends one event per token);
//!   a stream longer than [`TPOT_SLICE`] gives one sample per slice as it runs (each
//!   slice's mean gap, kept with the slice's start) and the open slice at its end;
//! - E2EL: from receiving the request to the end of the answer's body.
//!
//! Only successful (2xx) answers count, TTFT and a long stream's closed slices as they
//! come, the rest when the answer ended normally: a refusal answered in a
//! millisecond says nothing about the engine's speed. Each sample keeps the time its
//! request *started*, so that the controller can ask for the latency of requests sent
//! after its last decision ([`Series::p99_since`]); requests sent before it saw the old
//! conditions.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

/// Samples kept per series at most, so that a flood of requests cannot grow memory without
/// bound; the oldest go first (a window holds far fewer at the rates a GPU serves).
const MAX_SAMPLES: usize = 8192;

/// Which latency a sample measures.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Metric {
    Ttft,
    Tpot,
    E2el,
}

impl Metric {
    /// All, in the order files and metrics list them.
    pub const ALL: [Metric; 3] = [Metric::Ttft, Metric::Tpot, Metric::E2el];

    /// `ttft`, `tpot`, `e2el`.
    pub fn name(self) -> &'static str {
        match self {
            Metric::Ttft => "ttft",
            Metric::Tpot => "tpot",
            Metric::E2el => "e2el",
        }
    }
}

/// One request's measurement.
#[derive(Debug, Clone, Copy)]
struct Sample {
    /// When its request reached the gateway.
    start: Instant,
    /// When it was measured.
    at: Instant,
    secs: f64,
}

/// One metric's samples within the window, in the order they were measured.
#[derive(Debug, Default)]
pub struct Series {
    samples: VecDeque<Sample>,
}

impl Series {
    /// Adds a sample measured at `at` for a request that started at `start`.
    pub fn push(&mut self, start: Instant, at: Instant, value: Duration) {
        if self.samples.len() >= MAX_SAMPLES {
            self.samples.pop_front();
        }
        self.samples.push_back(Sample {
            start,
            at,
            secs: value.as_secs_f64(),
        });
    }

    /// Forgets the samples measured before `now - window`.
    pub fn prune(&mut self, now: Instant, window: Duration) {
        let Some(cut) = now.checked_sub(window) else {
            return;
        };
        while self.samples.front().is_some_and(|s| s.at < cut) {
            self.samples.pop_front();
        }
    }

    /// How many samples are in the window.
    pub fn len(&self) -> usize {
        self.samples.len()
    }

    /// True when the window holds no sample.
    pub fn is_empty(&self) -> bool {
        self.samples.is_empty()
    }

    /// The p99 of the samples in the window whose request started at or after `since`
    /// (`None`: all of them); `None` when there is none.
    pub fn p99_since(&self, since: Option<Instant>) -> Option<f64> {
        let mut v: Vec<f64> = self
            .samples
            .iter()
            .filter(|s| since.is_none_or(|t| s.start >= t))
            .map(|s| s.secs)
            .collect();
        v.sort_by(f64::total_cmp);
        percentile(&v, 99.0)
    }
}

/// The `q`th percentile of sorted values by linear interpolation between closest ranks
/// (numpy's default, which vLLM's benchmark uses); `None` for no value.
pub fn percentile(sorted: &[f64], q: f64) -> Option<f64> {
    let n = sorted.len();
    if n == 0 {
        return None;
    }
    let rank = (q / 100.0).clamp(0.0, 1.0) * (n - 1) as f64;
    let lo = rank.floor() as usize;
    let hi = rank.ceil() as usize;
    let frac = rank - lo as f64;
    Some(sorted[lo] + (sorted[hi.min(n - 1)] - sorted[lo]) * frac)
}

/// A tenant's three series.
#[derive(Debug, Default)]
pub struct TenantLatency {
    ttft: Series,
    tpot: Series,
    e2el: Series,
}

impl TenantLatency {
    /// The series of `metric`.
    pub fn series(&self, metric: Metric) -> &Series {
        match metric {
            Metric::Ttft => &self.ttft,
            Metric::Tpot => &self.tpot,
            Metric::E2el => &self.e2el,
        }
    }

    /// Adds a sample of `metric`.
    pub fn push(&mut self, metric: Metric, start: Instant, at: Instant, value: Duration) {
        match metric {
            Metric::Ttft => self.ttft.push(start, at, value),
            Metric::Tpot => self.tpot.push(start, at, value),
            Metric::E2el => self.e2el.push(start, at, value),
        }
    }

    /// Forgets what fell out of the window.
    pub fn prune(&mut self, now: Instant, window: Duration) {
        self.ttft.prune(now, window);
        self.tpot.prune(now, window);
        self.e2el.prune(now, window);
    }
}

/// How long a slice of a streamed answer is: a stream longer than this gives a TPOT
/// sample per slice as it runs, so the controller sees a long request's pace within a
/// second instead of when it ends (saturated, a request can outlive the whole window).
pub const TPOT_SLICE: Duration = Duration::from_secs(1);

/// What a streamed answer's chunks looked like: TTFT at the first chunk, the mean gap
/// between chunks (TPOT) per [`TPOT_SLICE`] while it runs, and the rest at its end.
#[derive(Debug, Clone, Copy, Default)]
pub struct ChunkTimes {
    pub last: Option<Instant>,
    pub chunks: u32,
    /// Where the current slice began: its first chunk's time and the count by then.
    slice: Option<(Instant, u32)>,
}

/// What one chunk gives to measure.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ChunkSample {
    /// The first chunk: TTFT is now.
    First,
    /// A slice ended: its mean gap between chunks, and when it began.
    Tpot { start: Instant, tpot: Duration },
    /// Nothing yet.
    None,
}

impl ChunkTimes {
    /// Notes a non-empty chunk arriving now and says what it gives to measure.
    pub fn chunk(&mut self, now: Instant) -> ChunkSample {
        self.chunks = self.chunks.saturating_add(1);
        self.last = Some(now);
        let Some((start, at)) = self.slice else {
            self.slice = Some((now, self.chunks));
            return ChunkSample::First;
        };
        let span = now.saturating_duration_since(start);
        if span < TPOT_SLICE {
            return ChunkSample::None;
        }
        self.slice = Some((now, self.chunks));
        ChunkSample::Tpot {
            start,
            tpot: span / (self.chunks - at),
        }
    }

    /// At the end, the TPOT sample of the slice still open (the whole answer when it was
    /// shorter than a slice) and when it began; `None` without a gap in it.
    pub fn tpot(&self) -> Option<(Instant, Duration)> {
        let ((start, at), last) = (self.slice?, self.last?);
        (self.chunks > at).then(|| {
            (
                start,
                last.saturating_duration_since(start) / (self.chunks - at),
            )
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_interpolate_as_numpy() {
        assert_eq!(percentile(&[], 99.0), None);
        assert_eq!(percentile(&[3.0], 99.0), Some(3.0));
        // numpy.percentile([1, 2, 3, 4], 99) = 3.97
        let p = percentile(&[1.0, 2.0, 3.0, 4.0], 99.0).unwrap();
        assert!((p - 3.97).abs() < 1e-12, "{p}");
        let v: Vec<f64> = (1..=100).map(f64::from).collect();
        assert!((percentile(&v, 50.0).unwrap() - 50.5).abs() < 1e-12);
        assert!((percentile(&v, 99.0).unwrap() - 99.01).abs() < 1e-9);
    }

    #[test]
    fn the_window_forgets_old_samples_and_since_picks_fresh_requests() {
        let t0 = Instant::now();
        let ms = Duration::from_millis;
        let mut s = Series::default();
        s.push(t0, t0 + ms(100), ms(900));
        s.push(t0 + ms(500), t0 + ms(600), ms(100));
        s.push(t0 + ms(700), t0 + ms(800), ms(200));
        assert_eq!(s.len(), 3);
        assert!((s.p99_since(None).unwrap() - 0.886).abs() < 1e-9);
        // only requests sent after t0 + 600 ms
        assert!((s.p99_since(Some(t0 + ms(600))).unwrap() - 0.2).abs() < 1e-12);
        assert_eq!(s.p99_since(Some(t0 + ms(900))), None);
        s.prune(t0 + ms(1200), ms(1000)); // cut at 200 ms: the first goes
        assert_eq!(s.len(), 2);
        s.prune(t0 + ms(5000), ms(1000));
        assert!(s.is_empty());
    }

    #[test]
    fn a_flood_keeps_a_bounded_number_of_samples() {
        let t0 = Instant::now();
        let mut s = Series::default();
        for i in 0..(MAX_SAMPLES + 10) {
            s.push(t0, t0, Duration::from_micros(i as u64));
        }
        assert_eq!(s.len(), MAX_SAMPLES);
    }

    #[test]
    fn chunk_gaps_give_the_mean_time_per_chunk() {
        let t0 = Instant::now();
        let ms = Duration::from_millis;
        let mut c = ChunkTimes::default();
        assert_eq!(c.tpot(), None);
        assert_eq!(c.chunk(t0), ChunkSample::First);
        assert_eq!(c.tpot(), None);
        assert_eq!(c.chunk(t0 + ms(30)), ChunkSample::None);
        assert_eq!(c.chunk(t0 + ms(90)), ChunkSample::None);
        assert_eq!(c.tpot(), Some((t0, ms(45))));
    }

    #[test]
    fn a_long_stream_gives_a_tpot_sample_per_slice_and_the_rest_at_its_end() {
        let t0 = Instant::now();
        let ms = Duration::from_millis;
        let mut c = ChunkTimes::default();
        assert_eq!(c.chunk(t0), ChunkSample::First);
        let mut slices = vec![];
        let mut feed = |c: &mut ChunkTimes, times: &mut dyn Iterator<Item = u64>| {
            for t in times {
                if let ChunkSample::Tpot { start, tpot } = c.chunk(t0 + ms(t)) {
                    slices.push((start.duration_since(t0), tpot));
                }
            }
        };
        // 100 ms a chunk: the chunk at 1 s closes the first slice (10 gaps)
        feed(&mut c, &mut (1..=10).map(|i| 100 * i));
        // then 40 ms a chunk for 600 ms: the slice still open holds 15 gaps
        feed(&mut c, &mut (1..=15).map(|i| 1000 + 40 * i));
        assert_eq!(c.tpot(), Some((t0 + ms(1000), ms(40))));
        // to 2 s: the second slice closes (25 gaps), and nothing is left open
        feed(&mut c, &mut (16..=25).map(|i| 1000 + 40 * i));
        assert_eq!(slices, vec![(ms(0), ms(100)), (ms(1000), ms(40))]);
        assert_eq!(c.tpot(), None);
        assert_eq!(c.chunks, 36);
    }
}
