//! The one sampling rule of the seam (`model_api::SampleSpec`), on the host. The CPU backend
//! samples every row with it; the CUDA model picks greedy rows on the GPU (`argmax_rows`,
//! the same argmax) and reads back only the rows this rule must see: a temperature, or a
//! masked id where the GPU's argmax landed.
//!
//! The rule, for one row of logits:
//! 1. Candidates: the ids whose logit is a number (NaN is dropped) and that are not
//!    masked. A mask that leaves no candidate is dropped (every id masked, or every
//!    unmasked logit NaN): the row is sampled as if nothing were masked, so one request's
//!    `min_tokens` never fails the step of every sequence batched with it. A row with no
//!    number at all is an error (the model produced NaN everywhere).
//! 2. Greedy (`temperature <= 0` or `top_k == 1`): the highest logit, ties to the lower id.
//! 3. Otherwise candidates are ordered by logit (ties to the lower id), cut to `top_k`,
//!    weighted by `exp((logit - max) / T)`, cut to the smallest prefix whose mass reaches
//!    `top_p`, and the CDF is inverted at the request's `uniform` draw, so the same seed
//!    gives the same token on every device. `+inf` logits share all the mass.

use crate::model_api::SampleSpec;

/// Picks the token of one row of `logits` by the rule above.
pub fn sample_row(logits: &[f32], spec: &SampleSpec<'_>) -> anyhow::Result<u32> {
    let unmasked = |i: usize| !spec.masked.contains(&(i as u32));
    let number = |i: usize| !logits[i].is_nan();
    let any_unmasked = (0..logits.len()).any(|i| number(i) && unmasked(i));
    if !any_unmasked && !(0..logits.len()).any(number) {
        anyhow::bail!("every logit of the row is NaN");
    }
    // Step 1: the mask holds unless it would leave nothing to sample.
    let allowed = |i: usize| number(i) && (!any_unmasked || unmasked(i));
    if spec.temperature <= 0.0 || spec.top_k == 1 {
        let mut best: Option<(usize, f32)> = None;
        for (i, &l) in logits.iter().enumerate() {
            if allowed(i) && best.is_none_or(|(_, b)| l > b) {
                best = Some((i, l));
            }
        }
        // `any_unmasked` or some number exists, so `best` is set.
        return Ok(best.map_or(0, |(i, _)| i as u32));
    }
    let inv_t = 1.0 / spec.temperature;
    let mut cand: Vec<(f32, u32)> = logits
        .iter()
        .enumerate()
        .filter(|&(i, _)| allowed(i))
        .map(|(i, &l)| (l * inv_t, i as u32))
        .collect();
    let order = |a: &(f32, u32), b: &(f32, u32)| b.0.total_cmp(&a.0).then(a.1.cmp(&b.1));
    if spec.top_k > 0 && spec.top_k < cand.len() {
        cand.select_nth_unstable_by(spec.top_k - 1, order);
        cand.truncate(spec.top_k);
    }
    cand.sort_unstable_by(order);
    let max = cand[0].0;
    let mut total = 0.0f64;
    for c in cand.iter_mut() {
        // `c == max` covers infinite maxima, where `c - max` is NaN.
        c.0 = if c.0 == max { 1.0 } else { (c.0 - max).exp() };
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

    fn spec(
        temperature: f32,
        top_p: f32,
        top_k: usize,
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

    const LOGITS: [f32; 6] = [0.5, 2.0, -1.0, 1.9, 0.0, 2.0];

    fn pick(logits: &[f32], s: SampleSpec<'_>) -> u32 {
        sample_row(logits, &s).unwrap()
    }

    #[test]
    fn greedy_is_argmax_with_ties_to_the_lower_id() {
        assert_eq!(pick(&LOGITS, spec(0.0, 1.0, 0, 0.99, &[])), 1);
        assert_eq!(pick(&LOGITS, spec(0.0, 1.0, 0, 0.99, &[1])), 5);
        assert_eq!(pick(&LOGITS, spec(0.0, 1.0, 0, 0.99, &[1, 5])), 3);
    }

    #[test]
    fn top_k_one_is_greedy_at_any_temperature_and_uniform() {
        for u in [0.0, 0.3, 0.999] {
            assert_eq!(pick(&LOGITS, spec(1.5, 1.0, 1, u, &[])), 1);
            assert_eq!(pick(&LOGITS, spec(1.5, 0.9, 1, u, &[1])), 5);
        }
    }

    #[test]
    fn masked_ids_are_never_chosen_while_another_id_is_left() {
        for i in 0..100 {
            let u = i as f32 / 100.0;
            let t = pick(&LOGITS, spec(2.0, 1.0, 0, u, &[1, 5]));
            assert!(t != 1 && t != 5);
        }
        // Every id but one masked: that one, greedy or not.
        let all_but_2 = [0, 1, 3, 4, 5];
        assert_eq!(pick(&LOGITS, spec(0.0, 1.0, 0, 0.5, &all_but_2)), 2);
        assert_eq!(pick(&LOGITS, spec(1.0, 0.5, 3, 0.9, &all_but_2)), 2);
    }

    /// The all-masked rule: the mask is dropped and the row sampled as if unmasked, on the
    /// greedy path and the sampling path alike (the CUDA model's GPU argmax then stands).
    #[test]
    fn a_mask_that_leaves_nothing_is_dropped() {
        let all = [0, 1, 2, 3, 4, 5];
        assert_eq!(
            pick(&LOGITS, spec(0.0, 1.0, 0, 0.5, &all)),
            pick(&LOGITS, spec(0.0, 1.0, 0, 0.5, &[]))
        );
        for i in 0..50 {
            let u = i as f32 / 50.0;
            assert_eq!(
                pick(&LOGITS, spec(1.3, 0.9, 4, u, &all)),
                pick(&LOGITS, spec(1.3, 0.9, 4, u, &[])),
                "uniform {u}"
            );
        }
        // Unmasked ids that are all NaN count as nothing left, too.
        let l = [f32::NAN, 1.0, f32::NAN];
        assert_eq!(pick(&l, spec(0.0, 1.0, 0, 0.5, &[1])), 1);
        assert_eq!(pick(&l, spec(1.0, 1.0, 0, 0.5, &[1])), 1);
    }

    #[test]
    fn nan_logits_are_never_chosen_and_a_row_of_nan_is_an_error() {
        let l = [f32::NAN, 0.5, f32::NAN, 0.4];
        assert_eq!(pick(&l, spec(0.0, 1.0, 0, 0.5, &[])), 1);
        for i in 0..20 {
            let t = pick(&l, spec(1.0, 1.0, 0, i as f32 / 20.0, &[]));
            assert!(t == 1 || t == 3, "{t}");
        }
        let nan = [f32::NAN; 3];
        for s in [spec(0.0, 1.0, 0, 0.5, &[]), spec(1.0, 1.0, 0, 0.5, &[0])] {
            let err = sample_row(&nan, &s).unwrap_err().to_string();
            assert!(err.contains("NaN"), "{err}");
        }
    }

    #[test]
    fn infinite_logits_take_all_the_mass() {
        let l = [0.0, f32::INFINITY, 3.0, f32::INFINITY];
        for i in 0..20 {
            let t = pick(&l, spec(1.0, 1.0, 0, i as f32 / 20.0, &[]));
            assert!(t == 1 || t == 3, "{t}");
        }
        assert_eq!(pick(&l, spec(1.0, 1.0, 0, 0.2, &[])), 1);
        assert_eq!(pick(&l, spec(1.0, 1.0, 0, 0.8, &[])), 3);
        // All -inf: no information, the candidates share the mass evenly.
        let l = [f32::NEG_INFINITY; 4];
        assert_eq!(pick(&l, spec(0.0, 1.0, 0, 0.5, &[])), 0);
        assert_eq!(pick(&l, spec(1.0, 1.0, 0, 0.6, &[])), 2);
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
            let t = pick(&LOGITS, spec(1.0, 1.0, 0, u, &[]));
            assert_eq!(t, pick(&LOGITS, spec(1.0, 1.0, 0, u, &[])));
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
            let t = pick(&LOGITS, spec(1.0, 0.6, 0, u, &[]));
            assert!(t == 1 || t == 5, "top_p 0.6 picked {t}");
            let t = pick(&LOGITS, spec(1.0, 1.0, 3, u, &[]));
            assert!([1, 3, 5].contains(&t), "top_k 3 picked {t}");
        }
        // Low uniform picks the most likely candidate, high the least likely kept one.
        assert_eq!(pick(&LOGITS, spec(1.0, 1.0, 3, 0.0, &[])), 1);
        assert_eq!(pick(&LOGITS, spec(1.0, 1.0, 3, 0.999, &[])), 3);
        // A small top_p keeps only the best token, whatever the draw.
        let l = [0.0, 2.0, 1.0];
        assert_eq!(pick(&l, spec(1.0, 0.1, 0, 0.999, &[])), 1);
        assert_eq!(pick(&l, spec(1.0, 1.0, 0, 0.999, &[])), 0);
    }
}
