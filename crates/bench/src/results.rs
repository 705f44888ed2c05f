//! The results file: schema, the per-request JSONL, and the final table.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::io::Write as _;
use std::path::Path;

use anyhow::Context;
use serde::{Deserialize, Serialize};

use crate::metrics::{EmbedStats, GenStats, RequestRecord, Stats, TimePoint};
use crate::prompt::Calibration;
use crate::spec::{BenchSpec, Preset, WorkloadKind};

/// Bumped whenever a field changes meaning or disappears.
pub const SCHEMA_VERSION: u32 = 1;

/// Everything one run measured.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct BenchResults {
    pub schema_version: u32,
    pub spec: BenchSpec,
    /// When the load started (after the pre-flight), Unix seconds.
    pub started_at: f64,
    /// The measurement window, Unix seconds.
    pub window: (f64, f64),
    /// True when the run was cut short (Ctrl-C / cancellation); the window then ends at the
    /// cut, or where it was due when the cut came while draining (whole responses of the
    /// window still in flight then are missing: see each workload's `unfinished`).
    pub interrupted: bool,
    /// Set when the run waited, after the window, for the whole (non-streamed) responses in
    /// flight at its end, with every workload's load still running.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub drain: Option<Drain>,
    pub workloads: Vec<WorkloadResult>,
    /// Every request (only when `spec.record_requests`); written as JSONL, not in the JSON.
    #[serde(skip)]
    pub requests: Vec<RequestRecord>,
}

/// The wait after the window for the whole responses that were in flight at its end: a
/// non-streamed gen workload's tokens and an embed workload's sequences are spread over
/// each request's lifetime, so a request
/// straddling the window's end counts its share only once it has ended. Meanwhile every
/// workload keeps its load running (closed loops keep sending), so the engines stay under
/// the window's load; requests sent after the window's end are then cut and dropped.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Drain {
    /// When it ended and the load stopped, Unix seconds.
    pub ended: f64,
    /// Its time-out, seconds: twice the longest E2EL of a whole response seen by the
    /// window's end, at most `runner::DRAIN_TIMEOUT_MAX`.
    pub timeout_s: f64,
    /// True when requests of the window were still in flight at the time-out: they were
    /// cut and their tokens are missing (each workload's `unfinished`).
    pub timed_out: bool,
}

/// What one workload achieved in the window.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct WorkloadResult {
    pub name: String,
    pub kind: WorkloadKind,
    /// Successful requests that ended in the window.
    pub requests_completed: u64,
    /// Failed requests that ended in the window, by kind (`http_503`, `stream_broken`, ...).
    pub errors: BTreeMap<String, u64>,
    /// Whole (non-streamed) responses sent before the window's end that had not ended when
    /// the run stopped (drain time-out or interruption): their tokens are missing from the
    /// window, so when this is not 0 its throughput is an underestimate.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub unfinished: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gen: Option<GenStats>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub embed: Option<EmbedStats>,
    /// Per-second throughput over the window.
    pub timeseries: Vec<TimePoint>,
    /// The prompt-size fit measured before the warm-up.
    pub calibration: Calibration,
    /// Requests sent before the window's end, warm-up included (not those sent while
    /// draining: they count for nothing).
    pub requests_sent: u64,
    /// The seed study's client this workload ran as, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub preset: Option<Preset>,
    /// False when gen requests were sent with `stream: false` (a preset's clients): TTFT,
    /// TPOT, ITL and the decode speed have no sample (their `count` is 0), E2EL is the
    /// whole request, and each response's tokens are spread over its lifetime, the window
    /// counting the share inside it (the requests in flight at its end were waited for:
    /// `BenchResults::drain`).
    #[serde(default = "streamed_by_default")]
    pub streamed: bool,
}

fn streamed_by_default() -> bool {
    true
}

fn is_zero(n: &u64) -> bool {
    *n == 0
}

impl WorkloadResult {
    /// A gen workload whose requests were not streamed: only whole-request figures.
    pub fn whole_requests_only(&self) -> bool {
        self.kind.is_gen() && !self.streamed
    }
}

impl BenchResults {
    pub fn window_len(&self) -> f64 {
        (self.window.1 - self.window.0).max(0.0)
    }

    /// Writes the results JSON (pretty) to `path`.
    pub fn write_json(&self, path: &Path) -> anyhow::Result<()> {
        let text = serde_json::to_string_pretty(self)?;
        std::fs::write(path, text).with_context(|| format!("cannot write {}", path.display()))
    }

    /// Writes every recorded request as one JSON line each.
    pub fn write_requests_jsonl(&self, path: &Path) -> anyhow::Result<()> {
        let f = std::fs::File::create(path)
            .with_context(|| format!("cannot create {}", path.display()))?;
        let mut w = std::io::BufWriter::new(f);
        for r in &self.requests {
            #[derive(Serialize)]
            struct Line<'a> {
                workload: &'a str,
                #[serde(flatten)]
                rec: &'a RequestRecord,
                ttft: Option<f64>,
                e2el: Option<f64>,
                tpot: Option<f64>,
            }
            let name = self
                .spec
                .workloads
                .get(r.workload)
                .map(|w| w.name.as_str())
                .unwrap_or("");
            let line = Line {
                workload: name,
                rec: r,
                ttft: r.ttft(),
                e2el: r.e2el(),
                tpot: r.tpot(),
            };
            serde_json::to_writer(&mut w, &line)?;
            w.write_all(b"\n")?;
        }
        w.flush()
            .with_context(|| format!("cannot write {}", path.display()))
    }

    /// The human-readable summary printed at the end of a run.
    pub fn table(&self) -> String {
        let mut s = String::new();
        let _ = writeln!(
            s,
            "measurement window: {:.1} s{}",
            self.window_len(),
            if self.interrupted {
                " (INTERRUPTED)"
            } else {
                ""
            }
        );
        if let Some(d) = &self.drain {
            let _ = writeln!(
                s,
                "drained {:.1} s after it for the whole responses in flight at its end{}",
                (d.ended - self.window.1).max(0.0),
                if d.timed_out {
                    format!(" (time-out {:.1} s: some were cut)", d.timeout_s)
                } else {
                    String::new()
                }
            );
        }
        let pk: Vec<String> = self
            .spec
            .percentiles
            .iter()
            .map(|&p| crate::metrics::percentile_key(p))
            .collect();
        let row = |s: &mut String, label: &str, st: &Stats| {
            let _ = write!(
                s,
                "  {label:<22}{:>10.2}{:>10.2}{:>10.2}",
                st.mean, st.median, st.std
            );
            for k in &pk {
                let _ = write!(s, "{:>10.2}", st.percentiles.get(k).copied().unwrap_or(0.0));
            }
            s.push('\n');
        };
        let header = |s: &mut String| {
            let _ = write!(s, "  {:<22}{:>10}{:>10}{:>10}", "", "mean", "median", "std");
            for k in &pk {
                let _ = write!(s, "{k:>10}");
            }
            s.push('\n');
        };
        for w in &self.workloads {
            let _ = writeln!(
                s,
                "\n== {} ({:?}{}) ==",
                w.name,
                w.kind,
                w.preset
                    .map(|p| format!(", preset {p}"))
                    .unwrap_or_default()
            );
            let errs: u64 = w.errors.values().sum();
            let _ = writeln!(s, "  requests completed    {}", w.requests_completed);
            let _ = writeln!(
                s,
                "  errors                {}{}",
                errs,
                if errs > 0 {
                    format!(" {:?}", w.errors)
                } else {
                    String::new()
                }
            );
            if w.unfinished > 0 {
                let _ = writeln!(
                    s,
                    "  unfinished            {} sent in time, never ended: their tokens are missing",
                    w.unfinished
                );
            }
            if let Some(g) = &w.gen {
                let _ = writeln!(s, "  output tok/s          {:.1}", g.output_throughput);
                let _ = writeln!(s, "  total tok/s           {:.1}", g.total_token_throughput);
                let _ = writeln!(s, "  requests/s            {:.2}", g.request_throughput);
                if let Some(gp) = g.goodput {
                    let _ = writeln!(s, "  goodput (req/s)       {gp:.2}");
                }
                let _ = writeln!(
                    s,
                    "  tokens per request    {:.1} in / {:.1} out (server usage)",
                    g.mean_prompt_tokens, g.mean_output_tokens
                );
                if let Some(note) = w
                    .preset
                    .and_then(|p| p.prompt_length_note(g.mean_prompt_tokens))
                {
                    let _ = writeln!(s, "  WARNING               {note}");
                }
                if w.whole_requests_only() {
                    let _ = writeln!(
                        s,
                        "  not streamed          TTFT, TPOT and ITL undefined; E2EL is the whole request; tok/s spreads each response over its lifetime"
                    );
                }
                header(&mut s);
                if !w.whole_requests_only() {
                    row(&mut s, "TTFT (ms)", &g.ttft_ms);
                    row(&mut s, "TPOT (ms)", &g.tpot_ms);
                    row(&mut s, "ITL (ms)", &g.itl_ms);
                }
                row(&mut s, "E2EL (ms)", &g.e2el_ms);
                if !w.whole_requests_only() {
                    row(&mut s, "decode tok/s per req", &g.decode_tok_s_per_req);
                }
                row(&mut s, "client queue (ms)", &g.queue_ms);
            }
            if let Some(e) = &w.embed {
                let _ = writeln!(s, "  sequences/s           {:.1}", e.seq_throughput);
                let _ = writeln!(s, "  tokens/s              {:.1}", e.token_throughput);
                let _ = writeln!(s, "  requests/s            {:.2}", e.request_throughput);
                let _ = writeln!(
                    s,
                    "  tokens per sequence   {:.1} (server usage)",
                    e.mean_tokens_per_seq
                );
                header(&mut s);
                row(&mut s, "latency (ms)", &e.latency_ms);
                row(&mut s, "client queue (ms)", &e.queue_ms);
            }
        }
        s
    }
}
