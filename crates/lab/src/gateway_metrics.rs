//! The gateway's SLO controller over the measurement window (issue 18): when a condition's
//! workloads go through the gateway, its Prometheus `/metrics` is sampled while the load runs
//! (every `sample_interval`, as the GPU counters) and kept as a timeline beside them, so the
//! report can show what the controller did and when: its best-effort limit, the best-effort
//! requests in flight and waiting, its pressure (the latency tenants' worst p99 over
//! objective), its decisions, the requests it refused with 429, and the engine levers it
//! set in the best-effort built-in engines (compute share, duty cycle, SM share).
//!
//! The names are those `deploy`'s gateway renders (`gateway/control.rs`); a gateway whose
//! controller is not active (no engine has a priority) renders none of them, and the window
//! then says so in its notes.
//!
//! - [`ControlSample::of`]: one `/metrics` page read into the controller's figures.
//! - [`window`]: the samples covering `[w0, w1]` and their [`ControlSummary`].
//! - `GatewayScraper` (with the `measure` feature): samples the gateway from the start of a
//!   condition's load; `window(w0, w1)` takes a last sample and keeps the window.

use serde::{Deserialize, Serialize};

use crate::engine_metrics::Exposition;

/// The controller's best-effort limit.
pub const LIMIT: &str = "colocate_gateway_best_effort_limit";
/// Best-effort requests in flight.
pub const IN_FLIGHT: &str = "colocate_gateway_best_effort_in_flight";
/// Worst p99 over objective of the latency tenants (NaN without latency traffic).
pub const PRESSURE: &str = "colocate_gateway_slo_pressure";
/// The compute share set in the best-effort built-in engines (-1: no cap).
pub const ENGINE_SHARE: &str = "colocate_gateway_engine_share_tokens";
/// The duty cycle set in the best-effort built-in engines, percent (-1: no pacing).
pub const ENGINE_DUTY: &str = "colocate_gateway_engine_duty_percent";
/// The percentage of the GPU's SMs set in the best-effort built-in engines (-1: the whole
/// GPU).
pub const ENGINE_SM: &str = "colocate_gateway_engine_sm_percent";
/// Ticks by decision (label `decision`: increase, decrease, hold).
pub const DECISIONS: &str = "colocate_gateway_controller_decisions_total";
/// Best-effort requests waiting, per tenant.
pub const QUEUE_DEPTH: &str = "colocate_gateway_queue_depth";
/// Best-effort requests refused with 429, per tenant and reason.
pub const REJECTED: &str = "colocate_gateway_rejected_total";
/// Best-effort requests given a place, per tenant.
pub const ADMITTED: &str = "colocate_gateway_admitted_total";

/// The controller at one instant.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct ControlSample {
    /// Unix seconds.
    pub t: f64,
    /// Best-effort requests allowed in flight.
    pub limit: f64,
    /// Best-effort requests in flight.
    pub in_flight: f64,
    /// Best-effort requests waiting for a place, all tenants.
    pub queued: f64,
    /// Latency tenants' worst p99 over objective (none without latency traffic).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pressure: Option<f64>,
    /// Compute share set in the best-effort built-in engines, tokens (none: no cap).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub engine_share_tokens: Option<f64>,
    /// Duty cycle set in the best-effort built-in engines, percent (none: no pacing).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub engine_duty_percent: Option<f64>,
    /// Percentage of the GPU's SMs set in the best-effort built-in engines (none: the whole
    /// GPU).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub engine_sm_percent: Option<f64>,
    /// Decisions so far (counters).
    pub increases: f64,
    pub decreases: f64,
    pub holds: f64,
    /// Best-effort requests refused with 429 so far, all tenants and reasons.
    pub rejected: f64,
    /// Best-effort requests admitted so far, all tenants.
    pub admitted: f64,
}

impl ControlSample {
    /// The controller's figures in one `/metrics` page taken at `t`; `None` when the page
    /// has no controller (its limit is missing).
    pub fn of(t: f64, e: &Exposition) -> Option<ControlSample> {
        let limit = e.sum(LIMIT)?;
        let decisions = |d: &str| {
            e.samples
                .iter()
                .filter(|s| {
                    s.name == DECISIONS && s.labels.iter().any(|(k, v)| k == "decision" && v == d)
                })
                .map(|s| s.value)
                .sum::<f64>()
        };
        Some(ControlSample {
            t,
            limit,
            in_flight: e.sum(IN_FLIGHT).unwrap_or(0.0),
            queued: e.sum(QUEUE_DEPTH).unwrap_or(0.0),
            pressure: e.sum(PRESSURE).filter(|p| p.is_finite()),
            engine_share_tokens: e.sum(ENGINE_SHARE).filter(|s| *s >= 0.0),
            engine_duty_percent: e.sum(ENGINE_DUTY).filter(|d| *d >= 0.0),
            engine_sm_percent: e.sum(ENGINE_SM).filter(|p| *p >= 0.0),
            increases: decisions("increase"),
            decreases: decisions("decrease"),
            holds: decisions("hold"),
            rejected: e.sum(REJECTED).unwrap_or(0.0),
            admitted: e.sum(ADMITTED).unwrap_or(0.0),
        })
    }
}

/// The controller over one window.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct ControlSummary {
    /// The limit over the samples in the window (the edges when none is inside).
    pub limit_min: f64,
    pub limit_mean: f64,
    pub limit_max: f64,
    /// At the sample closing the window.
    pub limit_end: f64,
    /// Decisions in the window (counter increases between the window's edge samples).
    pub increases: f64,
    pub decreases: f64,
    /// Best-effort requests refused with 429 and admitted in the window.
    pub rejected: f64,
    pub admitted: f64,
    /// Most best-effort requests waiting at a sample.
    pub queued_max: f64,
    /// Highest pressure at a sample (none: no latency traffic seen).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pressure_max: Option<f64>,
}

/// The gateway over one condition's window.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct GatewayWindow {
    /// The gateway's base URL.
    pub url: String,
    /// Seconds between samples.
    pub interval_s: f64,
    /// The controller's samples from the last one at or before the window's start to the
    /// first at or after its end (empty: no controller, or not scraped; see `notes`).
    #[serde(default)]
    pub samples: Vec<ControlSample>,
    /// Over the window, when there are samples.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub summary: Option<ControlSummary>,
    /// Why something is missing (scrape failures, no controller).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub notes: Vec<String>,
}

impl GatewayWindow {
    /// The limit at each sample, on the window's clock (seconds from `t0`).
    pub fn limit_series(&self, t0: f64) -> Vec<(f64, f64)> {
        self.samples.iter().map(|s| (s.t - t0, s.limit)).collect()
    }

    /// The mean limit over the samples in `[a, b)` (Unix seconds), if any.
    pub fn mean_limit(&self, a: f64, b: f64) -> Option<f64> {
        let v: Vec<f64> = self
            .samples
            .iter()
            .filter(|s| s.t >= a && s.t < b)
            .map(|s| s.limit)
            .collect();
        (!v.is_empty()).then(|| v.iter().sum::<f64>() / v.len() as f64)
    }
}

/// The samples of `all` (any order) that cover `[w0, w1]` and their summary: the window
/// opens at the last sample at or before `w0` (else the first) and closes at the first at or
/// after `w1` (else the last).
pub fn window(
    url: &str,
    interval_s: f64,
    all: &[ControlSample],
    w0: f64,
    w1: f64,
) -> GatewayWindow {
    let mut out = GatewayWindow {
        url: url.to_string(),
        interval_s,
        ..Default::default()
    };
    let mut pts: Vec<&ControlSample> = all.iter().collect();
    pts.sort_by(|a, b| a.t.total_cmp(&b.t));
    if pts.is_empty() {
        out.notes.push(
            "no controller in the gateway's /metrics (no engine has a priority, or it was not read)"
                .into(),
        );
        return out;
    }
    let open = pts.iter().rposition(|p| p.t <= w0).unwrap_or(0);
    let close = pts
        .iter()
        .position(|p| p.t >= w1)
        .unwrap_or(pts.len() - 1)
        .max(open);
    let used: Vec<ControlSample> = pts[open..=close].iter().map(|p| (*p).clone()).collect();
    let (first, last) = (&used[0], &used[used.len() - 1]);
    let inside: Vec<&ControlSample> = used.iter().filter(|p| p.t >= w0 && p.t <= w1).collect();
    let body: Vec<&ControlSample> = if inside.is_empty() {
        vec![first, last]
    } else {
        inside
    };
    let limits: Vec<f64> = body.iter().map(|p| p.limit).collect();
    let delta = |f: fn(&ControlSample) -> f64| (f(last) - f(first)).max(0.0);
    out.summary = Some(ControlSummary {
        limit_min: limits.iter().copied().fold(f64::INFINITY, f64::min),
        limit_mean: limits.iter().sum::<f64>() / limits.len() as f64,
        limit_max: limits.iter().copied().fold(f64::NEG_INFINITY, f64::max),
        limit_end: last.limit,
        increases: delta(|p| p.increases),
        decreases: delta(|p| p.decreases),
        rejected: delta(|p| p.rejected),
        admitted: delta(|p| p.admitted),
        queued_max: body.iter().map(|p| p.queued).fold(0.0, f64::max),
        pressure_max: body
            .iter()
            .filter_map(|p| p.pressure)
            .max_by(f64::total_cmp),
    });
    if last.t < w1 {
        out.notes.push(format!(
            "the last sample is {:.1} s before the window's end",
            w1 - last.t
        ));
    }
    out.samples = used;
    out
}

#[cfg(feature = "measure")]
pub use scrape::GatewayScraper;

/// Sampling the gateway's `/metrics` over HTTP while a condition runs.
#[cfg(feature = "measure")]
mod scrape {
    use std::sync::{Arc, Mutex};
    use std::time::{Duration, SystemTime, UNIX_EPOCH};

    use tokio_util::sync::CancellationToken;

    use super::{window, ControlSample, GatewayWindow};
    use crate::engine_metrics::parse;

    fn now() -> f64 {
        SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_secs_f64())
            .unwrap_or(0.0)
    }

    #[derive(Default)]
    struct Gathered {
        samples: Vec<ControlSample>,
        /// Pages read without a controller in them.
        without: usize,
        errors: Vec<String>,
    }

    /// Samples a gateway's `/metrics` from `start` until stopped or dropped.
    pub struct GatewayScraper {
        client: reqwest::Client,
        url: String,
        every: Duration,
        gathered: Arc<Mutex<Gathered>>,
        stop: CancellationToken,
    }

    async fn record(client: &reqwest::Client, url: &str, g: &Mutex<Gathered>) {
        let t = now();
        let metrics = format!("{}/metrics", url.trim_end_matches('/'));
        let page = async {
            let resp = client
                .get(&metrics)
                .send()
                .await
                .map_err(|e| format!("{metrics}: {e}"))?;
            if !resp.status().is_success() {
                return Err(format!("{metrics}: HTTP {}", resp.status()));
            }
            let text = resp.text().await.map_err(|e| format!("{metrics}: {e}"))?;
            parse(&text).map_err(|e| format!("{metrics}: {e}"))
        };
        let r = page.await;
        let Ok(mut g) = g.lock() else { return };
        match r {
            Ok(e) => match ControlSample::of(t, &e) {
                Some(s) => g.samples.push(s),
                None => g.without += 1,
            },
            Err(e) if g.errors.len() < 5 => g.errors.push(e),
            Err(_) => {}
        }
    }

    impl GatewayScraper {
        /// Starts sampling the gateway at base `url` now and every `every` after, on the
        /// runtime of `handle`.
        pub fn start(
            handle: &tokio::runtime::Handle,
            url: &str,
            every: Duration,
        ) -> anyhow::Result<GatewayScraper> {
            let client = reqwest::Client::builder()
                .timeout(Duration::from_secs(5))
                .no_proxy()
                .build()?;
            let stop = CancellationToken::new();
            let gathered = Arc::new(Mutex::new(Gathered::default()));
            let (c, u, g, s) = (
                client.clone(),
                url.to_string(),
                gathered.clone(),
                stop.clone(),
            );
            handle.spawn(async move {
                loop {
                    record(&c, &u, &g).await;
                    tokio::select! {
                        _ = s.cancelled() => break,
                        _ = tokio::time::sleep(every) => {}
                    }
                }
            });
            Ok(GatewayScraper {
                client,
                url: url.to_string(),
                every,
                gathered,
                stop,
            })
        }

        /// Takes one more sample (closing the window), stops, and keeps `[w0, w1]`.
        pub async fn window(&self, w0: f64, w1: f64) -> GatewayWindow {
            record(&self.client, &self.url, &self.gathered).await;
            self.stop.cancel();
            let g = match self.gathered.lock() {
                Ok(g) => g,
                Err(p) => p.into_inner(),
            };
            let mut w = window(&self.url, self.every.as_secs_f64(), &g.samples, w0, w1);
            if g.samples.is_empty() && g.without > 0 {
                w.notes = vec![format!(
                    "the gateway's controller is not active ({} pages of /metrics without it): no engine has a priority",
                    g.without
                )];
            }
            w.notes.extend(g.errors.iter().cloned());
            w
        }
    }

    impl Drop for GatewayScraper {
        fn drop(&mut self) {
            self.stop.cancel();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine_metrics::parse;

    /// A page as the gateway renders it (`ControlSnapshot::render`), cut to the lines read.
    fn page(limit: u32, queued: u32, decreases: u32, rejected: u32, pressure: &str) -> String {
        // the SM share rises with the limit, lifted at 64 (as `control::engine_sm`)
        let sm = if limit >= 64 { -1 } else { 12 + limit as i64 };
        format!(
            "# TYPE colocate_gateway_best_effort_limit gauge\n\
             colocate_gateway_best_effort_limit {limit}\n\
             colocate_gateway_engine_share_tokens -1\n\
             colocate_gateway_engine_duty_percent 35\n\
             colocate_gateway_engine_sm_percent {sm}\n\
             colocate_gateway_best_effort_in_flight {limit}\n\
             colocate_gateway_slo_pressure {pressure}\n\
             colocate_gateway_controller_decisions_total{{decision=\"increase\"}} 3\n\
             colocate_gateway_controller_decisions_total{{decision=\"decrease\"}} {decreases}\n\
             colocate_gateway_controller_decisions_total{{decision=\"hold\"}} 10\n\
             colocate_gateway_queue_depth{{tenant=\"embed\"}} {queued}\n\
             colocate_gateway_queue_depth{{tenant=\"other\"}} 1\n\
             colocate_gateway_admitted_total{{tenant=\"embed\"}} 40\n\
             colocate_gateway_rejected_total{{tenant=\"embed\",reason=\"queue_full\"}} {rejected}\n\
             colocate_gateway_rejected_total{{tenant=\"embed\",reason=\"timeout\"}} 1\n"
        )
    }

    fn sample(t: f64, text: &str) -> ControlSample {
        ControlSample::of(t, &parse(text).unwrap()).unwrap()
    }

    #[test]
    fn a_page_reads_into_the_controllers_figures() {
        let s = sample(5.0, &page(8, 4, 2, 6, "1.3"));
        assert_eq!((s.t, s.limit, s.in_flight, s.queued), (5.0, 8.0, 8.0, 5.0));
        assert_eq!((s.increases, s.decreases, s.holds), (3.0, 2.0, 10.0));
        assert_eq!((s.rejected, s.admitted), (7.0, 40.0));
        assert_eq!(s.pressure, Some(1.3));
        assert_eq!(s.engine_share_tokens, None);
        assert_eq!(s.engine_duty_percent, Some(35.0));
        assert_eq!(s.engine_sm_percent, Some(20.0));
        let s = sample(5.0, &page(8, 0, 0, 0, "NaN"));
        assert_eq!(s.pressure, None);
        assert_eq!(
            sample(5.0, &page(64, 0, 0, 0, "NaN")).engine_sm_percent,
            None
        );
        // a gateway without a controller renders no limit
        let plain = parse("colocate_gateway_requests_total{model=\"m\"} 3\n").unwrap();
        assert_eq!(ControlSample::of(1.0, &plain), None);
    }

    #[test]
    fn the_window_keeps_its_samples_and_what_changed_in_it() {
        let all = vec![
            sample(13.0, &page(2, 9, 4, 10, "2.0")),
            sample(9.0, &page(64, 0, 0, 0, "NaN")),
            sample(10.0, &page(64, 0, 0, 0, "0.5")),
            sample(11.0, &page(32, 3, 1, 0, "1.2")),
            sample(12.0, &page(8, 6, 3, 5, "1.5")),
        ];
        let w = window("http://g", 1.0, &all, 10.5, 12.5);
        let ts: Vec<f64> = w.samples.iter().map(|s| s.t).collect();
        assert_eq!(ts, vec![10.0, 11.0, 12.0, 13.0]);
        let s = w.summary.clone().unwrap();
        assert_eq!((s.limit_min, s.limit_max, s.limit_end), (8.0, 32.0, 2.0));
        assert_eq!(s.limit_mean, 20.0);
        assert_eq!((s.decreases, s.increases), (4.0, 0.0));
        assert_eq!((s.rejected, s.queued_max), (10.0, 7.0));
        assert_eq!(s.pressure_max, Some(1.5));
        assert!(w.notes.is_empty());
        assert_eq!(
            w.limit_series(10.0),
            vec![(0.0, 64.0), (1.0, 32.0), (2.0, 8.0), (3.0, 2.0)]
        );
        assert_eq!(w.mean_limit(10.5, 12.5), Some(20.0));
        assert_eq!(w.mean_limit(20.0, 30.0), None);
        // a window past the samples says so; none at all says why
        let late = window("http://g", 1.0, &all, 14.0, 20.0);
        assert!(
            late.notes[0].contains("before the window's end"),
            "{late:?}"
        );
        let none = window("http://g", 1.0, &[], 0.0, 1.0);
        assert!(none.summary.is_none() && none.notes[0].contains("no controller"));
        // results.json keeps it as written
        let json = serde_json::to_string(&w).unwrap();
        assert_eq!(serde_json::from_str::<GatewayWindow>(&json).unwrap(), w);
    }
}
