//! Whether two tenants' latencies differ by more than chance: Welch's t-test (means, unequal
//! variances) and the Mann-Whitney U test (ranks: one distribution shifted against the
//! other), both two-sided, the two tests the A100 multi-tenancy study ran between equal
//! tenants. Latency distributions are skewed with long tails, so the rank test is the one to
//! trust when the two disagree; the t-test is kept because the study reported both.
//!
//! The distributions' CDFs come from `statrs`; the statistics follow scipy exactly
//! (`scipy.stats.ttest_ind(a, b, equal_var=False)` and `scipy.stats.mannwhitneyu(a, b,
//! alternative="two-sided", method="asymptotic", use_continuity=True)`), and the tests below
//! hold values computed with scipy 1.17.1.

use serde::{Deserialize, Serialize};
use statrs::distribution::{ContinuousCDF, Normal, StudentsT};

/// Welch's t-test of two samples.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct WelchT {
    /// t = (mean a - mean b) / sqrt(var a / n a + var b / n b), sample variances (n - 1).
    pub t: f64,
    /// Welch-Satterthwaite degrees of freedom.
    pub df: f64,
    /// Two-sided p-value.
    pub p: f64,
}

/// The Mann-Whitney U test of two samples.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct MannWhitney {
    /// U of the first sample: its rank sum (ties get their mean rank) less n a (n a + 1) / 2.
    pub u: f64,
    /// Two-sided p-value from the normal approximation, with the tie correction of the
    /// variance and a continuity correction of 0.5.
    pub p: f64,
}

fn mean_var(x: &[f64]) -> (f64, f64) {
    let n = x.len() as f64;
    let mean = x.iter().sum::<f64>() / n;
    let var = x.iter().map(|v| (v - mean).powi(2)).sum::<f64>() / (n - 1.0);
    (mean, var)
}

/// Welch's t-test; `None` with fewer than two values on a side, a non-finite value, or no
/// spread on either side (the statistic is undefined).
pub fn welch_t_test(a: &[f64], b: &[f64]) -> Option<WelchT> {
    if a.len() < 2 || b.len() < 2 || a.iter().chain(b).any(|v| !v.is_finite()) {
        return None;
    }
    let (ma, va) = mean_var(a);
    let (mb, vb) = mean_var(b);
    let (sa, sb) = (va / a.len() as f64, vb / b.len() as f64);
    let se2 = sa + sb;
    if se2 <= 0.0 {
        return None;
    }
    let t = (ma - mb) / se2.sqrt();
    let df = se2 * se2 / (sa * sa / (a.len() as f64 - 1.0) + sb * sb / (b.len() as f64 - 1.0));
    let dist = StudentsT::new(0.0, 1.0, df).ok()?;
    let p = (2.0 * dist.sf(t.abs())).min(1.0);
    Some(WelchT { t, df, p })
}

/// Ranks of `values` from 1, ties given their mean rank, and Σ (t³ - t) over tie groups.
fn ranks(values: &[f64]) -> (Vec<f64>, f64) {
    let mut order: Vec<usize> = (0..values.len()).collect();
    order.sort_by(|&i, &j| values[i].total_cmp(&values[j]));
    let mut out = vec![0.0; values.len()];
    let mut ties = 0.0;
    let mut k = 0;
    while k < order.len() {
        let mut end = k + 1;
        while end < order.len() && values[order[end]] == values[order[k]] {
            end += 1;
        }
        // positions k..end (0-based) share ranks k+1..=end
        let rank = (k + 1 + end) as f64 / 2.0;
        for &i in &order[k..end] {
            out[i] = rank;
        }
        let t = (end - k) as f64;
        ties += t * t * t - t;
        k = end;
    }
    (out, ties)
}

/// The Mann-Whitney U test; `None` with an empty side, a non-finite value, or every value
/// equal (no ranking to test).
pub fn mann_whitney_u(a: &[f64], b: &[f64]) -> Option<MannWhitney> {
    if a.is_empty() || b.is_empty() || a.iter().chain(b).any(|v| !v.is_finite()) {
        return None;
    }
    let (n1, n2) = (a.len() as f64, b.len() as f64);
    let n = n1 + n2;
    let all: Vec<f64> = a.iter().chain(b).copied().collect();
    let (r, ties) = ranks(&all);
    let r1: f64 = r[..a.len()].iter().sum();
    let u1 = r1 - n1 * (n1 + 1.0) / 2.0;
    let u2 = n1 * n2 - u1;
    let mu = n1 * n2 / 2.0;
    let var = n1 * n2 / 12.0 * ((n + 1.0) - ties / (n * (n - 1.0)));
    if var <= 0.0 {
        return None;
    }
    let z = (u1.max(u2) - mu - 0.5) / var.sqrt();
    let normal = Normal::new(0.0, 1.0).ok()?;
    let p = (2.0 * normal.sf(z)).clamp(0.0, 1.0);
    Some(MannWhitney { u: u1, p })
}

#[cfg(test)]
mod tests {
    use super::*;

    const A: [f64; 10] = [12.1, 14.3, 11.8, 15.2, 13.9, 12.7, 16.4, 13.1, 14.8, 12.2];
    const B: [f64; 12] = [
        15.3, 17.1, 14.9, 18.2, 16.4, 15.8, 19.0, 16.1, 17.7, 15.0, 16.6, 18.8,
    ];
    const C: [f64; 8] = [1.0, 2.0, 2.0, 3.0, 3.0, 3.0, 4.0, 5.0];
    const D: [f64; 9] = [2.0, 3.0, 3.0, 4.0, 5.0, 5.0, 6.0, 7.0, 7.0];
    const E: [f64; 8] = [10.0, 10.5, 11.0, 9.5, 10.2, 10.8, 9.9, 10.1];
    const F: [f64; 8] = [10.1, 10.4, 11.2, 9.6, 10.0, 10.9, 9.8, 10.3];

    fn close(got: f64, want: f64, rel: f64) {
        assert!(
            (got - want).abs() <= rel * want.abs().max(1e-300),
            "got {got}, want {want}"
        );
    }

    /// Expected values: scipy 1.17.1, `ttest_ind(x, y, equal_var=False)` and
    /// `mannwhitneyu(x, y, alternative="two-sided", method="asymptotic",
    /// use_continuity=True)` on the samples above.
    #[test]
    fn matches_scipy() {
        // (x, y, t, p_t, df, U, p_U)
        type Case<'a> = (&'a [f64], &'a [f64], f64, f64, f64, f64, f64);
        let cases: [Case; 3] = [
            (
                &A,
                &B,
                -4.874074464426388,
                0.00010889260471262027,
                18.770831693481878,
                7.5,
                0.0006041444901444675,
            ),
            // ties in both samples and across them
            (
                &C,
                &D,
                -2.404309812019882,
                0.030374401997784302,
                14.218548536425565,
                15.5,
                0.04989254490309934,
            ),
            // two draws of one distribution: nothing to find
            (
                &E,
                &F,
                -0.1449379257962214,
                0.8868434897704727,
                13.879872907839445,
                31.0,
                0.9580602618255808,
            ),
        ];
        for (x, y, t, pt, df, u, pu) in cases {
            let w = welch_t_test(x, y).unwrap();
            close(w.t, t, 1e-12);
            close(w.df, df, 1e-12);
            close(w.p, pt, 1e-9);
            let m = mann_whitney_u(x, y).unwrap();
            close(m.u, u, 1e-12);
            close(m.p, pu, 1e-9);
        }
        // symmetric in its p-value; U is the first sample's
        let m = mann_whitney_u(&B, &A).unwrap();
        assert_eq!(m.u, (A.len() * B.len()) as f64 - 7.5);
        close(m.p, 0.0006041444901444675, 1e-9);
    }

    #[test]
    fn undefined_cases_give_none() {
        assert!(welch_t_test(&[1.0], &A).is_none());
        assert!(welch_t_test(&[2.0, 2.0], &[2.0, 2.0]).is_none());
        assert!(welch_t_test(&[1.0, f64::NAN], &A).is_none());
        assert!(mann_whitney_u(&[], &A).is_none());
        assert!(mann_whitney_u(&[3.0, 3.0], &[3.0]).is_none());
        // one side without spread is fine for Welch
        assert!(welch_t_test(&[2.0, 2.0], &[1.0, 3.0, 4.0]).is_some());
    }

    #[test]
    fn ranks_share_ties() {
        let (r, ties) = ranks(&[3.0, 1.0, 3.0, 2.0]);
        assert_eq!(r, vec![3.5, 1.0, 3.5, 2.0]);
        assert_eq!(ties, 6.0);
    }
}
