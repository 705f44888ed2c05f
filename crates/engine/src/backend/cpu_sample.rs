//! CPU sampling, the reference for GPU samplers: masked ids removed, greedy at
//! temperature 0, else softmax(logits / T) -> top-k -> top-p -> inverse CDF at the
//! host-drawn uniform. Candidates are ordered by probability, ties to the lower id, so the
//! same uniform picks the same token on every backend.

use super::cpu::CpuSample;

pub(super) fn sample_row(logits: &[f32], spec: &CpuSample) -> anyhow::Result<u32> {
    let allowed = |i: usize| !spec.masked.contains(&(i as u32));
    if spec.temperature <= 0.0 || spec.top_k == 1 {
        let mut best: Option<(usize, f32)> = None;
        for (i, &l) in logits.iter().enumerate() {
            if allowed(i) && best.is_none_or(|(_, b)| l > b) {
                best = Some((i, l));
            }
        }
        return best
            .map(|(i, _)| i as u32)
            .ok_or_else(|| anyhow::anyhow!("every token id is masked"));
    }
    let inv_t = 1.0 / spec.temperature;
    let mut cand: Vec<(f32, u32)> = logits
        .iter()
        .enumerate()
        .filter(|&(i, l)| allowed(i) && !l.is_nan())
        .map(|(i, &l)| (l * inv_t, i as u32))
        .collect();
    if cand.is_empty() {
        anyhow::bail!("every token id is masked");
    }
    let order = |a: &(f32, u32), b: &(f32, u32)| b.0.total_cmp(&a.0).then(a.1.cmp(&b.1));
    if spec.top_k > 0 && spec.top_k < cand.len() {
        cand.select_nth_unstable_by(spec.top_k - 1, order);
        cand.truncate(spec.top_k);
    }
    cand.sort_unstable_by(order);
    let max = cand[0].0;
    let mut total = 0.0f64;
    for c in cand.iter_mut() {
        c.0 = (c.0 - max).exp();
        total += c.0 as f64;
    }
    if spec.top_p < 1.0 {
        let target = spec.top_p.max(0.0) as f64 * total;
        let mut cum = 0.0f64;
        let mut keep = cand.len();
        for (n, c) in cand.iter().enumerate() {
            cum += c.0 as f64;
            if cum >= target {
                keep = n + 1;
                break;
            }
        }
        cand.truncate(keep);
        total = cand.iter().map(|c| c.0 as f64).sum();
    }
    let target = spec.uniform.clamp(0.0, 1.0) as f64 * total;
    let mut cum = 0.0f64;
    for c in &cand {
        cum += c.0 as f64;
        if cum > target {
            return Ok(c.1);
        }
    }
    Ok(cand[cand.len() - 1].1)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(temperature: f32, top_p: f32, top_k: usize, uniform: f32, masked: &[u32]) -> CpuSample {
        CpuSample {
            temperature,
            top_p,
            top_k,
            uniform,
            masked: masked.to_vec(),
        }
    }

    const LOGITS: [f32; 6] = [0.5, 2.0, -1.0, 1.9, 0.0, 2.0];

    #[test]
    fn greedy_is_argmax_with_ties_to_the_lower_id() {
        assert_eq!(
            sample_row(&LOGITS, &spec(0.0, 1.0, 0, 0.99, &[])).unwrap(),
            1
        );
        assert_eq!(
            sample_row(&LOGITS, &spec(0.0, 1.0, 0, 0.99, &[1])).unwrap(),
            5
        );
        assert_eq!(
            sample_row(&LOGITS, &spec(0.0, 1.0, 0, 0.99, &[1, 5])).unwrap(),
            3
        );
    }

    #[test]
    fn top_k_one_is_greedy_at_any_temperature_and_uniform() {
        for u in [0.0, 0.3, 0.999] {
            assert_eq!(sample_row(&LOGITS, &spec(1.5, 1.0, 1, u, &[])).unwrap(), 1);
            assert_eq!(sample_row(&LOGITS, &spec(1.5, 0.9, 1, u, &[1])).unwrap(), 5);
        }
    }

    #[test]
    fn masked_ids_are_never_chosen_and_all_masked_is_an_error() {
        for i in 0..100 {
            let u = i as f32 / 100.0;
            let t = sample_row(&LOGITS, &spec(2.0, 1.0, 0, u, &[1, 5])).unwrap();
            assert!(t != 1 && t != 5);
        }
        assert!(sample_row(&LOGITS, &spec(1.0, 1.0, 0, 0.5, &[0, 1, 2, 3, 4, 5])).is_err());
        assert!(sample_row(&LOGITS, &spec(0.0, 1.0, 0, 0.5, &[0, 1, 2, 3, 4, 5])).is_err());
    }

    #[test]
    fn inverse_cdf_follows_the_softmax_and_is_deterministic() {
        // Sweeping the uniform over [0, 1) visits each token in proportion to its probability.
        let p: Vec<f64> = {
            let e: Vec<f64> = LOGITS.iter().map(|&l| (l as f64).exp()).collect();
            let s: f64 = e.iter().sum();
            e.iter().map(|x| x / s).collect()
        };
        let n = 10_000;
        let mut counts = [0usize; 6];
        for i in 0..n {
            let u = (i as f32 + 0.5) / n as f32;
            let t = sample_row(&LOGITS, &spec(1.0, 1.0, 0, u, &[])).unwrap();
            assert_eq!(t, sample_row(&LOGITS, &spec(1.0, 1.0, 0, u, &[])).unwrap());
            counts[t as usize] += 1;
        }
        for (c, p) in counts.iter().zip(&p) {
            assert!(
                (*c as f64 / n as f64 - p).abs() < 1e-3,
                "{counts:?} vs {p:?}"
            );
        }
    }

    #[test]
    fn top_p_and_top_k_restrict_the_candidates() {
        // Probabilities at T=1: ids 1 and 5 ~0.31 each, id 3 ~0.28; the top two reach 0.6.
        for i in 0..100 {
            let u = i as f32 / 100.0;
            let t = sample_row(&LOGITS, &spec(1.0, 0.6, 0, u, &[])).unwrap();
            assert!(t == 1 || t == 5, "top_p 0.6 picked {t}");
            let t = sample_row(&LOGITS, &spec(1.0, 1.0, 3, u, &[])).unwrap();
            assert!([1, 3, 5].contains(&t), "top_k 3 picked {t}");
        }
        // Low uniform picks the most likely candidate, high the least likely kept one.
        assert_eq!(
            sample_row(&LOGITS, &spec(1.0, 1.0, 3, 0.0, &[])).unwrap(),
            1
        );
        assert_eq!(
            sample_row(&LOGITS, &spec(1.0, 1.0, 3, 0.999, &[])).unwrap(),
            3
        );
    }
}
