//! Open-loop arrival times: Poisson by default, gamma with a burstiness factor.
//!
//! vLLM's convention: inter-arrival times ~ Gamma(shape = burstiness, scale =
//! 1 / (rate * burstiness)); the mean is 1/rate whatever the burstiness, the coefficient of
//! variation is 1/sqrt(burstiness); burstiness = 1 is a Poisson process (exponential gaps).
//!
//! [`Schedule`] turns the gaps into arrival times over a span of the run: an open loop runs
//! from the start of the load, or from a load step's time (`LoadStep`), until the end of the
//! run or the step that replaces it.

use rand::rngs::StdRng;
use rand::SeedableRng;
use rand_distr::{Distribution, Exp, Gamma};

/// An endless, seeded sequence of inter-arrival gaps in seconds.
pub struct Arrivals {
    rng: StdRng,
    dist: GapDist,
}

enum GapDist {
    Exp(Exp<f64>),
    Gamma(Gamma<f64>),
}

impl Arrivals {
    /// `rate` > 0 requests/s, `burstiness` > 0 (validated by the spec).
    pub fn new(rate: f64, burstiness: f64, seed: u64) -> anyhow::Result<Arrivals> {
        let dist = if burstiness == 1.0 {
            GapDist::Exp(Exp::new(rate).map_err(|e| anyhow::anyhow!("rate {rate}: {e}"))?)
        } else {
            GapDist::Gamma(
                Gamma::new(burstiness, 1.0 / (rate * burstiness))
                    .map_err(|e| anyhow::anyhow!("rate {rate}, burstiness {burstiness}: {e}"))?,
            )
        };
        Ok(Arrivals {
            rng: StdRng::seed_from_u64(seed),
            dist,
        })
    }

    /// The next gap in seconds.
    pub fn next_gap(&mut self) -> f64 {
        match &self.dist {
            GapDist::Exp(d) => d.sample(&mut self.rng),
            GapDist::Gamma(d) => d.sample(&mut self.rng),
        }
    }
}

/// Arrival times (seconds on the run's clock) after `from` and before `until`: the first at
/// `from` plus one gap, each next one gap later.
pub struct Schedule {
    arrivals: Arrivals,
    t: f64,
    until: Option<f64>,
}

impl Schedule {
    /// The arrivals of `arrivals` from `from` (exclusive) to `until` (exclusive; `None`:
    /// endless).
    pub fn new(arrivals: Arrivals, from: f64, until: Option<f64>) -> Schedule {
        Schedule {
            arrivals,
            t: from,
            until,
        }
    }
}

impl Iterator for Schedule {
    type Item = f64;

    fn next(&mut self) -> Option<f64> {
        let t = self.t + self.arrivals.next_gap();
        if self.until.is_some_and(|u| t >= u) {
            return None;
        }
        self.t = t;
        Some(t)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mean_cv(rate: f64, b: f64, seed: u64, n: usize) -> (f64, f64) {
        let mut a = Arrivals::new(rate, b, seed).unwrap();
        let gaps: Vec<f64> = (0..n).map(|_| a.next_gap()).collect();
        let mean = gaps.iter().sum::<f64>() / n as f64;
        let var = gaps.iter().map(|g| (g - mean).powi(2)).sum::<f64>() / (n - 1) as f64;
        (mean, var.sqrt() / mean)
    }

    #[test]
    fn poisson_and_gamma_have_the_right_mean_and_cv() {
        // With n = 40,000 the standard error of the mean is CV/200 (0.5% at CV 1, 1% at CV 2),
        // so 3% bounds sit well beyond 3 sigma.
        for (rate, b) in [(50.0, 1.0), (8.0, 0.25), (200.0, 4.0)] {
            let (mean, cv) = mean_cv(rate, b, 42, 40_000);
            let want_cv = 1.0 / f64::sqrt(b);
            assert!(
                (mean * rate - 1.0).abs() < 0.03,
                "rate {rate} b {b}: mean {mean}"
            );
            assert!(
                (cv / want_cv - 1.0).abs() < 0.05,
                "rate {rate} b {b}: cv {cv} want {want_cv}"
            );
        }
    }

    #[test]
    fn poisson_counts_per_interval_have_variance_equal_to_mean() {
        // Counts in 1 s bins of a rate-20 Poisson process: mean 20, variance 20 (dispersion 1).
        let mut a = Arrivals::new(20.0, 1.0, 7).unwrap();
        let mut t = 0.0;
        let mut counts = vec![0u32; 2000];
        loop {
            t += a.next_gap();
            if t >= counts.len() as f64 {
                break;
            }
            counts[t as usize] += 1;
        }
        let n = counts.len() as f64;
        let mean = counts.iter().map(|&c| c as f64).sum::<f64>() / n;
        let var = counts
            .iter()
            .map(|&c| (c as f64 - mean).powi(2))
            .sum::<f64>()
            / (n - 1.0);
        assert!((mean / 20.0 - 1.0).abs() < 0.03, "mean {mean}");
        assert!((var / mean - 1.0).abs() < 0.1, "dispersion {}", var / mean);
    }

    #[test]
    fn a_seed_repeats_the_schedule() {
        let mut a = Arrivals::new(10.0, 0.5, 3).unwrap();
        let mut b = Arrivals::new(10.0, 0.5, 3).unwrap();
        let mut c = Arrivals::new(10.0, 0.5, 4).unwrap();
        let xa: Vec<f64> = (0..100).map(|_| a.next_gap()).collect();
        let xb: Vec<f64> = (0..100).map(|_| b.next_gap()).collect();
        let xc: Vec<f64> = (0..100).map(|_| c.next_gap()).collect();
        assert_eq!(xa, xb);
        assert_ne!(xa, xc);
    }

    /// A load step from 10/s to 40/s at t = 20 s: each span draws its own arrivals, the
    /// first ends before the step, the second starts after it, and the counts follow the
    /// rates (Poisson counts: sd = sqrt(200) ~ 14 and sqrt(800) ~ 28; the bounds are
    /// beyond 4 sd, and the seed fixes them anyway).
    #[test]
    fn a_load_step_changes_the_arrival_rate_at_its_time() {
        let before: Vec<f64> =
            Schedule::new(Arrivals::new(10.0, 1.0, 5).unwrap(), 0.0, Some(20.0)).collect();
        let after: Vec<f64> = Schedule::new(Arrivals::new(40.0, 1.0, 6).unwrap(), 20.0, None)
            .take_while(|&t| t < 40.0)
            .collect();
        assert!(before.iter().all(|&t| t > 0.0 && t < 20.0));
        assert!(after.iter().all(|&t| t > 20.0 && t < 40.0));
        assert!(before.windows(2).all(|w| w[0] < w[1]));
        assert!((140..=260).contains(&before.len()), "{}", before.len());
        assert!((680..=920).contains(&after.len()), "{}", after.len());
        // per second, the step multiplies the rate by about four
        let ratio = (after.len() as f64 / 20.0) / (before.len() as f64 / 20.0);
        assert!((3.0..=5.5).contains(&ratio), "{ratio}");
        // an empty span has no arrival
        assert_eq!(
            Schedule::new(Arrivals::new(10.0, 1.0, 5).unwrap(), 3.0, Some(3.0)).count(),
            0
        );
    }
}
