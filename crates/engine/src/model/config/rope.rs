//! Rotary position embeddings as a config sets them: `rope_theta` and the scaling of
//! `rope_scaling` (transformers 4) or `rope_parameters` (transformers 5), and the one
//! computation of a head's inverse frequencies ([`inv_freq`]) every RoPE model's table is
//! built from. Scalings: none (`rope_type` absent or `default`) and Llama 3's (`llama3`,
//! Llama-3.1/3.2), computed as transformers' `_compute_llama3_parameters` does; any other
//! `rope_type` is an error naming it.

use serde::Deserialize;

/// A RoPE scaling other than the default.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum RopeScaling {
    /// Llama 3's frequency-dependent scaling: wavelengths shorter than
    /// `original_max_position_embeddings / high_freq_factor` stay, longer than
    /// `original_max_position_embeddings / low_freq_factor` are divided by `factor`, and
    /// those between are interpolated smoothly.
    Llama3 {
        factor: f64,
        low_freq_factor: f64,
        high_freq_factor: f64,
        original_max_position_embeddings: usize,
    },
}

/// `rope_scaling` / `rope_parameters` as written (both spellings of the type key).
#[derive(Deserialize, Default)]
pub(super) struct RawRope {
    pub(super) rope_theta: Option<f64>,
    #[serde(alias = "type")]
    rope_type: Option<String>,
    factor: Option<f64>,
    low_freq_factor: Option<f64>,
    high_freq_factor: Option<f64>,
    original_max_position_embeddings: Option<usize>,
}

impl RawRope {
    /// The scaling this object asks for (`None`: the default RoPE). Errors name the key.
    pub(super) fn scaling(&self) -> anyhow::Result<Option<RopeScaling>> {
        match self.rope_type.as_deref() {
            None | Some("default") => Ok(None),
            Some("llama3") => {
                let need = |v: Option<f64>, key: &str| {
                    v.ok_or_else(|| anyhow::anyhow!("rope_type llama3 needs {key}"))
                };
                let (factor, low, high) = (
                    need(self.factor, "factor")?,
                    need(self.low_freq_factor, "low_freq_factor")?,
                    need(self.high_freq_factor, "high_freq_factor")?,
                );
                let original = self.original_max_position_embeddings.ok_or_else(|| {
                    anyhow::anyhow!("rope_type llama3 needs original_max_position_embeddings")
                })?;
                if factor <= 0.0 || low <= 0.0 || high <= low {
                    anyhow::bail!(
                        "rope_type llama3: factor {factor}, low_freq_factor {low} and high_freq_factor {high} must be > 0 with high > low"
                    );
                }
                Ok(Some(RopeScaling::Llama3 {
                    factor,
                    low_freq_factor: low,
                    high_freq_factor: high,
                    original_max_position_embeddings: original,
                }))
            }
            Some(other) => {
                anyhow::bail!("unsupported rope_type {other:?} (supported: default, llama3)")
            }
        }
    }
}

/// The `head_dim / 2` inverse frequencies of one head, as transformers computes them:
/// `1 / theta^(2i / head_dim)` (rounded to f32), then the `scaling`'s adjustment in f32
/// in transformers' order of operations.
pub fn inv_freq(head_dim: usize, theta: f64, scaling: Option<&RopeScaling>) -> Vec<f32> {
    let mut inv: Vec<f32> = (0..head_dim / 2)
        .map(|i| 1.0 / (theta.powf((2 * i) as f64 / head_dim as f64)) as f32)
        .collect();
    match scaling {
        None => {}
        Some(&RopeScaling::Llama3 {
            factor,
            low_freq_factor,
            high_freq_factor,
            original_max_position_embeddings,
        }) => {
            let (factor, low, high) = (
                factor as f32,
                low_freq_factor as f32,
                high_freq_factor as f32,
            );
            let old = original_max_position_embeddings as f32;
            let (low_freq_wavelen, high_freq_wavelen) = (old / low, old / high);
            for f in &mut inv {
                let wavelen = (2.0 * std::f64::consts::PI) as f32 / *f;
                if wavelen > low_freq_wavelen {
                    *f /= factor;
                } else if wavelen >= high_freq_wavelen {
                    let smooth = (old / wavelen - low) / (high - low);
                    *f = (1.0 - smooth) * *f / factor + smooth * *f;
                }
            }
        }
    }
    inv
}

/// `(cos, sin)` of the rotation angle at `position` for one inverse frequency: the angle
/// in f64 from transformers' f32 `inv_freq`, which every backend's RoPE table is built
/// from.
pub fn cos_sin(position: usize, inv_freq: f32) -> (f32, f32) {
    let a = position as f64 * inv_freq as f64;
    (a.cos() as f32, a.sin() as f32)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn raw(json: &str) -> RawRope {
        serde_json::from_str(json).unwrap()
    }

    /// Llama-3.2-1B's published rope_scaling against transformers' own inv_freq: the
    /// high-frequency end unchanged, the low end divided by 32, and the smoothed band.
    #[test]
    fn llama3_scaling_is_transformers() {
        let s = raw(
            r#"{"factor": 32.0, "high_freq_factor": 4.0, "low_freq_factor": 1.0,
            "original_max_position_embeddings": 8192, "rope_type": "llama3"}"#,
        )
        .scaling()
        .unwrap();
        let got = inv_freq(64, 500_000.0, s.as_ref());
        let plain = inv_freq(64, 500_000.0, None);
        assert_eq!(got.len(), 32);
        let want = LLAMA_3_2_INV_FREQ;
        for (i, w) in want {
            let rel = (got[i] - w).abs() / w;
            assert!(
                rel < 2e-7,
                "inv_freq[{i}] = {:e}, transformers {w:e}",
                got[i]
            );
        }
        assert_eq!(got[0], plain[0]);
        assert_eq!(got[31], plain[31] / 32.0);
        // The three bands are all present: unchanged, smoothed (neither), divided.
        let banded = |i: usize| {
            if got[i] == plain[i] {
                0
            } else if got[i] == plain[i] / 32.0 {
                2
            } else {
                1
            }
        };
        let bands: Vec<u8> = (0..32).map(banded).collect();
        assert!(bands.windows(2).all(|w| w[0] <= w[1]), "{bands:?}");
        assert!(bands.contains(&0) && bands.contains(&1) && bands.contains(&2));
    }

    #[test]
    fn rope_types_and_errors() {
        assert_eq!(raw(r#"{"rope_type": "default"}"#).scaling().unwrap(), None);
        assert_eq!(raw(r#"{"rope_theta": 5.0}"#).scaling().unwrap(), None);
        // transformers 4's older key `type`.
        assert!(
            raw(r#"{"type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
            "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}"#)
            .scaling()
            .unwrap()
            .is_some()
        );
        let err = raw(r#"{"rope_type": "yarn", "factor": 4.0}"#)
            .scaling()
            .unwrap_err()
            .to_string();
        assert!(err.contains("\"yarn\""), "{err}");
        let err = raw(r#"{"rope_type": "llama3", "factor": 8.0}"#)
            .scaling()
            .unwrap_err()
            .to_string();
        assert!(err.contains("low_freq_factor"), "{err}");
    }

    /// transformers 5.24.0's `ROPE_INIT_FUNCTIONS["llama3"]` for Llama-3.2-1B (head_dim 64,
    /// theta 500000), torch 2.15 on CPU: both ends and the smoothed band (15 to 17).
    const LLAMA_3_2_INV_FREQ: [(usize, f32); 7] = [
        (1, 0.663_601_3),
        (14, 0.003_211_446),
        (15, 0.001_290_548),
        (16, 0.000_429_556_7),
        (17, 9.708_286e-5),
        (18, 1.946_163_9e-5),
        (31, 9.418_306_5e-8),
    ];
}
