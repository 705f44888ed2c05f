//! Fairness between the tenants of a condition, as the A100 multi-tenancy study read it:
//! equal tenants (`tenants`: same workload, load and engine) are compared with each other,
//! unequal ones through their slowdown against their own solo run.
//!
//! - Jain's index J = (Σx)² / (n Σx²) lies in [1/n, 1]: 1 when every x is the same, 1/n when
//!   one tenant has everything. Over equal tenants x is each one's throughput in the window
//!   (one index per repetition); over all tenants x is each one's throughput as a fraction
//!   of its solo throughput, so tenants of different sizes can be compared.
//! - Between each pair of equal tenants, Welch's t-test and the Mann-Whitney U test on their
//!   per-request latencies (`significance`), pooled over repetitions, answer whether one was
//!   served faster than the other by more than chance.

use std::collections::BTreeMap;

use serde::Serialize;

use crate::analysis::{Stat, WorkloadSummary};
use crate::matrix::Condition;
use crate::results::ConditionResult;
use crate::significance::{mann_whitney_u, welch_t_test, MannWhitney, WelchT};
use crate::spec::Experiment;

/// The level under which a test's p-value is called significant.
pub const ALPHA: f64 = 0.05;

/// Jain's fairness index of `xs`; `None` when empty, not finite, negative or all zero.
pub fn jain(xs: &[f64]) -> Option<f64> {
    if xs.is_empty() || xs.iter().any(|x| !x.is_finite() || *x < 0.0) {
        return None;
    }
    let sum: f64 = xs.iter().sum();
    let squares: f64 = xs.iter().map(|x| x * x).sum();
    (squares > 0.0).then(|| sum * sum / (xs.len() as f64 * squares))
}

/// The fairness figures of one condition.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Fairness {
    /// Jain's index over every tenant's throughput as a fraction of its solo throughput
    /// (`None` when a tenant has no solo figure).
    pub jain_vs_solo: Option<f64>,
    /// Classes of equal tenants (two or more each).
    pub classes: Vec<EqualClass>,
}

impl Fairness {
    /// Pairs of equal tenants whose latencies differ significantly by either test.
    pub fn significant_pairs(&self) -> usize {
        self.classes
            .iter()
            .flat_map(|c| &c.pairs)
            .filter(|p| p.significant())
            .count()
    }
}

/// Equal tenants of one condition and how evenly they were served.
#[derive(Debug, Clone, Default, Serialize)]
pub struct EqualClass {
    /// The tenants, in name order.
    pub tenants: Vec<String>,
    /// What they share (workload kind, model, load).
    pub shared: String,
    /// Jain's index of their throughputs, one per repetition.
    pub jain: Option<Stat>,
    /// Every pair's tests.
    pub pairs: Vec<PairTest>,
}

/// Two equal tenants' latencies side by side, and the tests between them.
#[derive(Debug, Clone, Default, Serialize)]
pub struct PairTest {
    /// First tenant.
    pub a: String,
    /// Second tenant.
    pub b: String,
    /// Latencies tested on each side (pooled over repetitions).
    pub n: (usize, usize),
    /// Median latency of each side, ms.
    pub median_ms: (f64, f64),
    /// Welch's t-test (`None` when undefined: too few values or no spread).
    pub welch: Option<WelchT>,
    /// The Mann-Whitney U test.
    pub mann_whitney: Option<MannWhitney>,
}

impl PairTest {
    /// Whether either test finds the difference significant at [`ALPHA`].
    pub fn significant(&self) -> bool {
        self.welch.is_some_and(|t| t.p < ALPHA) || self.mann_whitney.is_some_and(|u| u.p < ALPHA)
    }
}

fn median(v: &[f64]) -> f64 {
    let mut s = v.to_vec();
    s.sort_by(f64::total_cmp);
    bench::metrics::percentile_sorted(&s, 50.0)
}

/// The fairness of one condition from its measured repetitions and its tenants'
/// summaries (which hold each one's vs-solo figure and pooled latency sample).
pub fn assess(
    exp: &Experiment,
    cond: &Condition,
    reps: &[&ConditionResult],
    tenants: &BTreeMap<String, WorkloadSummary>,
) -> Fairness {
    let ratios: Option<Vec<f64>> = tenants.values().map(|t| t.vs_solo).collect();
    let jain_vs_solo = ratios.and_then(|r| jain(&r));
    let origins: BTreeMap<String, String> = tenants
        .iter()
        .map(|(name, t)| (name.clone(), t.workload.clone()))
        .collect();
    let classes = crate::tenants::equal_classes(exp, cond, &origins)
        .into_iter()
        .map(|(members, shared)| {
            let per_rep: Vec<f64> = reps
                .iter()
                .filter_map(|r| {
                    let x: Option<Vec<f64>> = members
                        .iter()
                        .map(|m| r.workloads.get(m).map(|w| w.throughput))
                        .collect();
                    jain(&x?)
                })
                .collect();
            let mut pairs = Vec::new();
            for (i, a) in members.iter().enumerate() {
                for b in &members[i + 1..] {
                    let (sa, sb) = (&tenants[a].sample, &tenants[b].sample);
                    if sa.is_empty() || sb.is_empty() {
                        continue;
                    }
                    pairs.push(PairTest {
                        a: a.clone(),
                        b: b.clone(),
                        n: (sa.len(), sb.len()),
                        median_ms: (median(sa), median(sb)),
                        welch: welch_t_test(sa, sb),
                        mann_whitney: mann_whitney_u(sa, sb),
                    });
                }
            }
            EqualClass {
                tenants: members,
                shared,
                jain: Stat::of(&per_rep),
                pairs,
            }
        })
        .collect();
    Fairness {
        jain_vs_solo,
        classes,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn jain_bounds_and_known_values() {
        assert_eq!(jain(&[5.0, 5.0, 5.0]), Some(1.0));
        // one tenant has everything: 1/n
        assert_eq!(jain(&[4.0, 0.0, 0.0, 0.0]), Some(0.25));
        // (1 + 2 + 3)^2 / (3 * 14) = 36 / 42
        assert!((jain(&[1.0, 2.0, 3.0]).unwrap() - 36.0 / 42.0).abs() < 1e-15);
        // the seeds' MPS pair: gen kept 97.6%, the embedder 71%
        let j = jain(&[0.976, 0.71]).unwrap();
        assert!(
            (j - (1.686f64.powi(2) / (2.0 * (0.976f64.powi(2) + 0.71f64.powi(2))))).abs() < 1e-12
        );
        assert_eq!(jain(&[]), None);
        assert_eq!(jain(&[0.0, 0.0]), None);
        assert_eq!(jain(&[1.0, -1.0]), None);
        assert_eq!(jain(&[1.0, f64::NAN]), None);
    }

    #[test]
    fn a_pair_is_significant_when_either_test_says_so() {
        let mut p = PairTest::default();
        assert!(!p.significant());
        p.mann_whitney = Some(MannWhitney { u: 1.0, p: 0.01 });
        assert!(p.significant());
        p.mann_whitney = Some(MannWhitney { u: 1.0, p: 0.5 });
        p.welch = Some(WelchT {
            t: 3.0,
            df: 10.0,
            p: 0.049,
        });
        assert!(p.significant());
    }
}
