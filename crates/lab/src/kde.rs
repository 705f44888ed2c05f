//! A Gaussian kernel density estimate of one tenant's latencies, for the report's violins
//! (the A100 study drew its tenants' latency distributions as KDEs). Scott's rule picks the
//! bandwidth, as `scipy.stats.gaussian_kde` does by default: factor n^(-1/5) times the
//! sample's standard deviation (n - 1), so a violin here is the curve scipy would draw.

/// A density estimate over a sample.
#[derive(Debug, Clone)]
pub struct Kde {
    points: Vec<f64>,
    bandwidth: f64,
}

impl Kde {
    /// The estimate of `sample` (non-finite values dropped); `None` with fewer than two
    /// values or no spread (a single spike: nothing to smooth).
    pub fn new(sample: &[f64]) -> Option<Kde> {
        let points: Vec<f64> = sample.iter().copied().filter(|v| v.is_finite()).collect();
        let n = points.len();
        if n < 2 {
            return None;
        }
        let mean = points.iter().sum::<f64>() / n as f64;
        let var = points.iter().map(|v| (v - mean).powi(2)).sum::<f64>() / (n - 1) as f64;
        let bandwidth = scott_factor(n) * var.sqrt();
        (bandwidth > 0.0).then_some(Kde { points, bandwidth })
    }

    /// The kernel's standard deviation.
    pub fn bandwidth(&self) -> f64 {
        self.bandwidth
    }

    /// The density at `x`.
    pub fn density(&self, x: f64) -> f64 {
        let h = self.bandwidth;
        let norm = 1.0 / (self.points.len() as f64 * h * (2.0 * std::f64::consts::PI).sqrt());
        norm * self
            .points
            .iter()
            .map(|p| {
                let z = (x - p) / h;
                (-0.5 * z * z).exp()
            })
            .sum::<f64>()
    }

    /// `steps` points `(x, density)` evenly over `[lo, hi]`.
    pub fn curve(&self, lo: f64, hi: f64, steps: usize) -> Vec<(f64, f64)> {
        let steps = steps.max(2);
        (0..steps)
            .map(|i| {
                let x = lo + (hi - lo) * i as f64 / (steps - 1) as f64;
                (x, self.density(x))
            })
            .collect()
    }
}

/// Scott's factor for one dimension: n^(-1/5).
fn scott_factor(n: usize) -> f64 {
    (n as f64).powf(-0.2)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// scipy 1.17.1: `gaussian_kde(A)([11.0, 13.5, 16.0])` and `gaussian_kde(A).factor`.
    #[test]
    fn matches_scipy_gaussian_kde() {
        let a = [12.1, 14.3, 11.8, 15.2, 13.9, 12.7, 16.4, 13.1, 14.8, 12.2];
        assert!((scott_factor(a.len()) - 0.6309573444801932).abs() < 1e-15);
        let k = Kde::new(&a).unwrap();
        for (x, want) in [
            (11.0, 0.08305186011653061),
            (13.5, 0.20027511678788817),
            (16.0, 0.09954532514333467),
        ] {
            let got = k.density(x);
            assert!((got - want).abs() < 1e-12, "{x}: {got} vs {want}");
        }
        // a density: integrates to about 1
        let c = k.curve(0.0, 30.0, 3001);
        let area: f64 = c
            .windows(2)
            .map(|w| (w[1].0 - w[0].0) * (w[0].1 + w[1].1) / 2.0)
            .sum();
        assert!((area - 1.0).abs() < 1e-6, "{area}");
    }

    #[test]
    fn no_estimate_without_spread() {
        assert!(Kde::new(&[1.0]).is_none());
        assert!(Kde::new(&[2.0, 2.0, 2.0]).is_none());
        assert!(Kde::new(&[1.0, f64::INFINITY]).is_none());
    }
}
