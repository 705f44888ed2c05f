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
        return best.map(|(i, _)| i as u32).ok_or_else(|| anyhow::anyhow!("every token id is masked"));
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
