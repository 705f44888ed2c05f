//! Qwen3-MoE's sparse block (transformers' `Qwen3MoeSparseMoeBlock`) on [`Backend`] ops:
//! the router (`mlp.gate`, a linear to `num_experts` logits), softmax in f32, the top
//! `num_experts_per_tok` experts of each token (renormalised to sum 1 when
//! `norm_topk_prob`), and the weighted sum of those experts' SiLU-gated MLPs
//! (`mlp.experts.E.{gate,up,down}_proj`). Tokens are grouped by expert, as vLLM's fused
//! MoE does (`moe_align_block_size`): each expert with work runs one GEMM chain over its
//! tokens, gathered, and scatters its weighted output back in token order, so the cost is
//! that of the active experts, not of all.
//!
//! The routing is decided on the host ([`Routing::of_logits`]): on the CPU it is host data
//! anyway, and this path is the numerics reference. The CUDA MoE (grouped expert GEMMs,
//! routing on the device) will be a model file of its own.

use crate::backend::{Backend, Init};
use crate::model::config::MoeConfig;
use crate::model::decoder::{GatedMlp, GetWeight};

/// One MoE layer's weights.
pub struct SparseMoe<T> {
    /// The router: `[num_experts, hidden]`.
    gate: T,
    experts: Vec<GatedMlp<T>>,
    top_k: usize,
    renormalise: bool,
}

impl<T> SparseMoe<T> {
    /// Loads layer `layer`'s router and experts (names without the `model.` prefix).
    pub fn load(
        get: &GetWeight<'_, T>,
        layer: usize,
        hidden: usize,
        moe: &MoeConfig,
        init: Init,
    ) -> anyhow::Result<Self> {
        let p = format!("layers.{layer}.mlp");
        let gate = get(&format!("{p}.gate.weight"), moe.num_experts, hidden, init)?;
        let experts = (0..moe.num_experts)
            .map(|e| {
                GatedMlp::load(
                    get,
                    &format!("{p}.experts.{e}"),
                    hidden,
                    moe.moe_intermediate_size,
                    init,
                )
            })
            .collect::<anyhow::Result<_>>()?;
        Ok(Self {
            gate,
            experts,
            top_k: moe.num_experts_per_tok,
            renormalise: moe.norm_topk_prob,
        })
    }

    /// `x` `[tokens, hidden]` -> the block's output `[tokens, hidden]`.
    pub fn forward<B: Backend<Tensor = T>>(&self, b: &B, x: &T) -> anyhow::Result<T> {
        let logits = b.linear(x, &self.gate, None)?;
        let (tokens, experts) = b.shape(&logits);
        let routing =
            Routing::of_logits(&b.to_host(&logits)?, experts, self.top_k, self.renormalise)?;
        let (_, hidden) = b.shape(x);
        let mut out = b.zeros(tokens, hidden)?;
        for (e, mlp) in self.experts.iter().enumerate() {
            let (rows, weights) = routing.expert(e);
            if rows.is_empty() {
                continue;
            }
            let y = mlp.forward(b, &b.gather_rows(x, rows)?)?;
            b.scatter_add_rows(&mut out, &y, rows, weights)?;
        }
        Ok(out)
    }
}

/// Which tokens each expert serves, with the router's weights: grouped by expert (tokens
/// in order within an expert), the layout a grouped GEMM wants.
#[derive(Debug, Clone, PartialEq)]
pub struct Routing {
    /// `num_experts + 1` offsets into `rows` / `weights`: expert `e` owns
    /// `offsets[e] .. offsets[e + 1]`.
    offsets: Vec<usize>,
    rows: Vec<u32>,
    weights: Vec<f32>,
}

impl Routing {
    /// Routes each row of `logits` (`[tokens, experts]`, row-major) as transformers does:
    /// softmax in f32, the `k` largest probabilities (ties to the lower expert id),
    /// divided by their sum when `renormalise`.
    pub fn of_logits(
        logits: &[f32],
        experts: usize,
        k: usize,
        renormalise: bool,
    ) -> anyhow::Result<Self> {
        if experts == 0 || k == 0 || k > experts || !logits.len().is_multiple_of(experts) {
            anyhow::bail!(
                "routing: top-{k} of {experts} experts over {} logits",
                logits.len()
            );
        }
        // (expert, token, weight) of every choice, then grouped by expert.
        let mut chosen = Vec::with_capacity(logits.len() / experts * k);
        let mut probs = vec![0f32; experts];
        let mut order: Vec<usize> = (0..experts).collect();
        for (t, row) in logits.chunks_exact(experts).enumerate() {
            let max = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
            let mut sum = 0.0;
            for (p, &l) in probs.iter_mut().zip(row) {
                *p = (l - max).exp();
                sum += *p;
            }
            probs.iter_mut().for_each(|p| *p /= sum);
            // Stable sort by descending probability: equal ones keep the lower id first.
            order.sort_by(|&a, &b| probs[b].total_cmp(&probs[a]));
            let top = &order[..k];
            let norm = if renormalise {
                top.iter().map(|&e| probs[e]).sum::<f32>()
            } else {
                1.0
            };
            for &e in top {
                chosen.push((e, t as u32, probs[e] / norm));
            }
            order.sort_unstable();
        }
        chosen.sort_by_key(|&(e, t, _)| (e, t));
        let mut offsets = vec![0; experts + 1];
        for &(e, _, _) in &chosen {
            offsets[e + 1] += 1;
        }
        for e in 0..experts {
            offsets[e + 1] += offsets[e];
        }
        Ok(Self {
            offsets,
            rows: chosen.iter().map(|c| c.1).collect(),
            weights: chosen.iter().map(|c| c.2).collect(),
        })
    }

    /// Expert `e`'s token rows and their weights.
    pub fn expert(&self, e: usize) -> (&[u32], &[f32]) {
        let (a, b) = (self.offsets[e], self.offsets[e + 1]);
        (&self.rows[a..b], &self.weights[a..b])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn routes_top_k_of_the_softmax() {
        // Two tokens over four experts.
        let logits = [1.0, 3.0, 2.0, 0.0, 0.5, 0.5, 4.0, 0.5];
        let r = Routing::of_logits(&logits, 4, 2, false).unwrap();
        let softmax = |row: &[f32]| {
            let s: f32 = row.iter().map(|x| x.exp()).sum();
            row.iter().map(|x| x.exp() / s).collect::<Vec<_>>()
        };
        let (p0, p1) = (softmax(&logits[..4]), softmax(&logits[4..]));
        let close = |got: &[f32], want: &[f32]| {
            got.len() == want.len() && got.iter().zip(want).all(|(a, b)| (a - b).abs() < 1e-6)
        };
        // Token 0 picks experts 1 and 2; token 1 expert 2 and, of the three tied at 0.5,
        // the lowest id, 0.
        let rows: Vec<&[u32]> = (0..4).map(|e| r.expert(e).0).collect();
        assert_eq!(rows, [&[1u32][..], &[0], &[0, 1], &[]]);
        assert!(close(r.expert(0).1, &[p1[0]]));
        assert!(close(r.expert(1).1, &[p0[1]]));
        assert!(close(r.expert(2).1, &[p0[2], p1[2]]));
        // Renormalised, each token's weights sum to 1.
        let r = Routing::of_logits(&logits, 4, 2, true).unwrap();
        let t0 = r.expert(1).1[0] + r.expert(2).1[0];
        assert!((t0 - 1.0).abs() < 1e-6);
        assert!((r.expert(1).1[0] - p0[1] / (p0[1] + p0[2])).abs() < 1e-7);
    }

    /// The grouped-by-expert block against a plain per-token loop over the same weights.
    #[test]
    fn block_matches_a_per_token_reference() {
        use crate::backend::cpu::CpuBackend;
        let b = CpuBackend::new();
        let (hidden, inter, tokens) = (6, 4, 5);
        let moe = MoeConfig {
            num_experts: 4,
            num_experts_per_tok: 2,
            moe_intermediate_size: inter,
            norm_topk_prob: false,
            decoder_sparse_step: 1,
            mlp_only_layers: vec![],
        };
        let seed = std::cell::Cell::new(0u64);
        let host = std::cell::RefCell::new(std::collections::HashMap::new());
        let get = |name: &str, r: usize, c: usize, _init: Init| {
            seed.set(seed.get() + 1);
            let t = b.dummy(r, c, Init::Normal { std: 0.5 }, seed.get())?;
            host.borrow_mut().insert(name.to_string(), b.to_host(&t)?);
            Ok(t)
        };
        let block = SparseMoe::load(&get, 0, hidden, &moe, Init::Zeros).unwrap();
        let x = b
            .dummy(tokens, hidden, Init::Normal { std: 1.0 }, 99)
            .unwrap();
        let got = b.to_host(&block.forward(&b, &x).unwrap()).unwrap();

        let w = host.borrow();
        let mat = |name: &str, v: &[f32], rows: usize| -> Vec<f32> {
            let m = &w[name];
            (0..rows)
                .map(|r| (0..v.len()).map(|c| m[r * v.len() + c] * v[c]).sum())
                .collect()
        };
        let xs = b.to_host(&x).unwrap();
        for t in 0..tokens {
            let xt = &xs[t * hidden..(t + 1) * hidden];
            let logits = mat("layers.0.mlp.gate.weight", xt, 4);
            let z: f32 = logits.iter().map(|l| l.exp()).sum();
            let mut order: Vec<usize> = (0..4).collect();
            order.sort_by(|&a, &c| logits[c].total_cmp(&logits[a]));
            let mut want = vec![0f32; hidden];
            for &e in &order[..2] {
                let p = format!("layers.0.mlp.experts.{e}");
                let g = mat(&format!("{p}.gate_proj.weight"), xt, inter);
                let u = mat(&format!("{p}.up_proj.weight"), xt, inter);
                let a: Vec<f32> = g
                    .iter()
                    .zip(&u)
                    .map(|(g, u)| g / (1.0 + (-g).exp()) * u)
                    .collect();
                let y = mat(&format!("{p}.down_proj.weight"), &a, hidden);
                for (acc, v) in want.iter_mut().zip(y) {
                    *acc += logits[e].exp() / z * v;
                }
            }
            for (c, (g, w)) in got[t * hidden..(t + 1) * hidden]
                .iter()
                .zip(&want)
                .enumerate()
            {
                assert!((g - w).abs() < 1e-5, "token {t} col {c}: {g} vs {w}");
            }
        }
    }

    #[test]
    fn bad_shapes_are_errors() {
        assert!(Routing::of_logits(&[0.0; 6], 4, 2, true).is_err());
        assert!(Routing::of_logits(&[0.0; 8], 4, 5, true).is_err());
        assert!(Routing::of_logits(&[0.0; 8], 4, 0, true).is_err());
    }
}
