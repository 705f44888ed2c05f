//! Host-side sampling of one row of logits, used for rows that are not plain greedy
//! (temperature / top-k / top-p, or masked tokens while `min_tokens` is not reached).
//! Greedy rows are sampled on the GPU (`argmax_rows`) and never leave it but for the id.
//!
//! The rule matches the seam's contract (`runner::SampleSpec`): filter by top-k, then by
//! top-p over the temperature-scaled softmax, and invert the CDF at the request's uniform
//! draw, so the same seed gives the same token on CPU and GPU.

use crate::runner::SampleSpec;

/// Picks a token from `logits` according to `spec`.
pub fn sample_row(logits: &[f32], spec: &SampleSpec<'_>) -> u32 {
    let masked = |i: usize| spec.masked.contains(&(i as u32));
    if spec.temperature <= 0.0 {
        let mut best = (f32::NEG_INFINITY, 0usize);
        for (i, &v) in logits.iter().enumerate() {
            if !masked(i) && v > best.0 {
                best = (v, i);
            }
        }
        return best.1 as u32;
    }
    let mut idx: Vec<usize> = (0..logits.len())
        .filter(|&i| !masked(i) && logits[i].is_finite())
        .collect();
    if idx.is_empty() {
        return 0;
    }
    // Highest first; ties by lower id, as the greedy rule.
    idx.sort_by(|&a, &b| logits[b].total_cmp(&logits[a]).then(a.cmp(&b)));
    if spec.top_k > 0 && spec.top_k < idx.len() {
        idx.truncate(spec.top_k);
    }
    let max = logits[idx[0]];
    let mut probs: Vec<f64> = idx
        .iter()
        .map(|&i| (((logits[i] - max) / spec.temperature) as f64).exp())
        .collect();
    let total: f64 = probs.iter().sum();
    probs.iter_mut().for_each(|p| *p /= total);
    if spec.top_p < 1.0 {
        let mut acc = 0.0;
        let mut keep = probs.len();
        for (j, p) in probs.iter().enumerate() {
            acc += p;
            if acc >= spec.top_p as f64 {
                keep = j + 1;
                break;
            }
        }
        probs.truncate(keep);
        idx.truncate(keep);
        let t: f64 = probs.iter().sum();
        probs.iter_mut().for_each(|p| *p /= t);
    }
    let u = spec.uniform as f64;
    let mut acc = 0.0;
    for (j, p) in probs.iter().enumerate() {
        acc += p;
        if u < acc {
            return idx[j] as u32;
        }
    }
    idx[idx.len() - 1] as u32
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(
        temperature: f32,
        top_k: usize,
        top_p: f32,
        uniform: f32,
        masked: &[u32],
    ) -> SampleSpec<'_> {
        SampleSpec {
            temperature,
            top_p,
            top_k,
            uniform,
            masked,
        }
    }

    #[test]
    fn greedy_skips_masked_tokens() {
        let l = [0.1, 3.0, 2.0];
        assert_eq!(sample_row(&l, &spec(0.0, 0, 1.0, 0.5, &[])), 1);
        assert_eq!(sample_row(&l, &spec(0.0, 0, 1.0, 0.5, &[1])), 2);
    }

    #[test]
    fn cdf_inversion_follows_the_uniform_draw() {
        // probabilities after softmax at T=1: ids sorted 1 (high), 2, 0
        let l = [0.0, 2.0, 1.0];
        assert_eq!(sample_row(&l, &spec(1.0, 0, 1.0, 0.0, &[])), 1);
        assert_eq!(sample_row(&l, &spec(1.0, 0, 1.0, 0.999, &[])), 0);
        // top_k = 1 is greedy whatever the draw
        assert_eq!(sample_row(&l, &spec(1.0, 1, 1.0, 0.999, &[])), 1);
        // top_p small keeps only the best token
        assert_eq!(sample_row(&l, &spec(1.0, 0, 0.1, 0.999, &[])), 1);
    }
}
