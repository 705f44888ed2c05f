//! What the gateway counts (requests, errors, latency per worker and route) and the
//! Prometheus text `GET /metrics` answers with.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::sync::Arc;
use std::time::Duration;

use super::Worker;

/// Latency histogram bounds in seconds.
const BUCKETS: &[f64] = &[
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
];

/// One (worker, route)'s counters.
#[derive(Debug, Default, Clone)]
struct RouteStats {
    requests: u64,
    errors: u64,
    latency_sum: f64,
    buckets: Vec<u64>,
}

impl RouteStats {
    fn record(&mut self, ok: bool, latency: Option<Duration>) {
        self.requests += 1;
        if !ok {
            self.errors += 1;
        }
        if let Some(l) = latency {
            let s = l.as_secs_f64();
            self.latency_sum += s;
            if self.buckets.is_empty() {
                self.buckets = vec![0; BUCKETS.len()];
            }
            for (b, bound) in self.buckets.iter_mut().zip(BUCKETS) {
                if s <= *bound {
                    *b += 1;
                }
            }
        }
    }
}

/// (worker or "-" for the gateway's own answers, route) -> counters.
#[derive(Debug, Default, Clone)]
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
            .or_default()
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
        out.push_str("# HELP colocate_gateway_request_duration_seconds Time from receiving a request to the end of its response body.\n");
        out.push_str("# TYPE colocate_gateway_request_duration_seconds histogram\n");
        for ((w, r), st) in &self.0 {
            if st.buckets.is_empty() {
                continue;
            }
            let l = lbl(w, r);
            for (b, bound) in st.buckets.iter().zip(BUCKETS) {
                let _ = writeln!(
                    out,
                    "colocate_gateway_request_duration_seconds_bucket{{{l},le=\"{bound}\"}} {b}"
                );
            }
            let count: u64 = st.requests;
            let _ = writeln!(
                out,
                "colocate_gateway_request_duration_seconds_bucket{{{l},le=\"+Inf\"}} {count}"
            );
            let _ = writeln!(
                out,
                "colocate_gateway_request_duration_seconds_sum{{{l}}} {}",
                st.latency_sum
            );
            let _ = writeln!(
                out,
                "colocate_gateway_request_duration_seconds_count{{{l}}} {count}"
            );
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
        let mut st = RouteStats::default();
        st.record(true, Some(Duration::from_millis(30)));
        st.record(false, Some(Duration::from_secs(3)));
        assert_eq!(st.requests, 2);
        assert_eq!(st.errors, 1);
        let le_005 = BUCKETS.iter().position(|b| *b == 0.05).unwrap();
        assert_eq!(st.buckets[le_005], 1);
        assert_eq!(*st.buckets.last().unwrap(), 2);
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
