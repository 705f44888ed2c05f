//! What the gateway counts (requests, errors, latency per worker and route) and the
//! Prometheus text `GET /metrics` answers with.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::sync::Arc;
use std::time::Duration;

use engine::metrics::Histogram;

use super::Worker;

/// Latency histogram bounds in seconds.
const BUCKETS: &[f64] = &[
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
];

/// The latency histogram's name.
const DURATION: &str = "colocate_gateway_request_duration_seconds";

/// One (worker, route)'s counters.
#[derive(Debug)]
struct RouteStats {
    requests: u64,
    errors: u64,
    latency: Histogram,
}

impl RouteStats {
    fn new() -> Self {
        RouteStats {
            requests: 0,
            errors: 0,
            latency: Histogram::new(BUCKETS),
        }
    }

    fn record(&mut self, ok: bool, latency: Option<Duration>) {
        self.requests += 1;
        if !ok {
            self.errors += 1;
        }
        if let Some(l) = latency {
            self.latency.observe_duration(l);
        }
    }
}

/// (worker or "-" for the gateway's own answers, route) -> counters.
#[derive(Debug, Default)]
pub(crate) struct StatsTable(BTreeMap<(String, String), RouteStats>);

impl StatsTable {
    /// Counts one answer.
    pub(crate) fn record(
        &mut self,
        worker: &str,
        route: &str,
        ok: bool,
        latency: Option<Duration>,
    ) {
        self.0
            .entry((worker.to_string(), route.to_string()))
            .or_insert_with(RouteStats::new)
            .record(ok, latency);
    }

    /// The table and the workers' gauges in Prometheus text format.
    pub(crate) fn render(&self, workers: &[Arc<Worker>]) -> String {
        let mut out = String::new();
        let lbl = |w: &str, r: &str| format!("engine=\"{w}\",route=\"{r}\"");
        out.push_str("# HELP colocate_gateway_requests_total Requests the gateway answered, per engine and route.\n");
        out.push_str("# TYPE colocate_gateway_requests_total counter\n");
        for ((w, r), st) in &self.0 {
            let _ = writeln!(
                out,
                "colocate_gateway_requests_total{{{}}} {}",
                lbl(w, r),
                st.requests
            );
        }
        out.push_str("# HELP colocate_gateway_errors_total Requests that failed (upstream error, 5xx, no replica).\n");
        out.push_str("# TYPE colocate_gateway_errors_total counter\n");
        for ((w, r), st) in &self.0 {
            let _ = writeln!(
                out,
                "colocate_gateway_errors_total{{{}}} {}",
                lbl(w, r),
                st.errors
            );
        }
        Histogram::render_header(
            &mut out,
            DURATION,
            "Time from receiving a request to the end of its response body.",
        );
        for ((w, r), st) in &self.0 {
            if st.latency.count() > 0 {
                st.latency.render_series(&mut out, DURATION, &lbl(w, r));
            }
        }
        out.push_str("# HELP colocate_gateway_in_flight Requests being served, per engine.\n");
        out.push_str("# TYPE colocate_gateway_in_flight gauge\n");
        for w in workers {
            let _ = writeln!(
                out,
                "colocate_gateway_in_flight{{engine=\"{}\"}} {}",
                w.spec.name,
                w.outstanding()
            );
        }
        out.push_str(
            "# HELP colocate_gateway_engine_healthy 1 while the engine receives requests.\n",
        );
        out.push_str("# TYPE colocate_gateway_engine_healthy gauge\n");
        for w in workers {
            let _ = writeln!(
                out,
                "colocate_gateway_engine_healthy{{engine=\"{}\"}} {}",
                w.spec.name,
                u8::from(w.routable())
            );
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn histogram_buckets_are_cumulative() {
        let mut t = StatsTable::default();
        t.record("a", "/r", true, Some(Duration::from_millis(30)));
        t.record("a", "/r", false, Some(Duration::from_secs(3)));
        let st = &t.0[&("a".to_string(), "/r".to_string())];
        assert_eq!(st.requests, 2);
        assert_eq!(st.errors, 1);
        let text = t.render(&[]);
        for (le, n) in [
            ("0.025", 0),
            ("0.05", 1),
            ("2.5", 1),
            ("5", 2),
            ("60", 2),
            ("+Inf", 2),
        ] {
            let line = format!("{DURATION}_bucket{{engine=\"a\",route=\"/r\",le=\"{le}\"}} {n}\n");
            assert!(text.contains(&line), "{line} in {text}");
        }
        assert!(text.contains(&format!(
            "{DURATION}_sum{{engine=\"a\",route=\"/r\"}} 3.03\n"
        )));
    }

    #[test]
    fn the_table_renders_as_prometheus_text() {
        let mut t = StatsTable::default();
        t.record("-", "/v1/completions", false, None);
        t.record(
            "a",
            "/v1/completions",
            true,
            Some(Duration::from_millis(20)),
        );
        let text = t.render(&[]);
        assert!(text
            .contains(r#"colocate_gateway_requests_total{engine="-",route="/v1/completions"} 1"#));
        assert!(
            text.contains(r#"colocate_gateway_errors_total{engine="-",route="/v1/completions"} 1"#)
        );
        assert!(text.contains(
            r#"colocate_gateway_request_duration_seconds_count{engine="a",route="/v1/completions"} 1"#
        ));
    }
}
