//! Model architectures, with names mirroring the Hugging Face parameter names. The
//! portable models are written only against [`crate::backend::Backend`] ops (the CPU
//! backend runs them; the numerics reference): `decoder` is the one causal decoder of
//! every decoder family, its options decided by the config
//! ([`config::DecoderLayout`]), fed by one loader per checkpoint naming: `qwen3` (Qwen3,
//! Qwen3-MoE, whose sparse block is `moe`, Qwen2/Qwen2.5, Llama, Mistral) and `gpt2`
//! (GPT-2, DistilGPT2); `bert` is the encoder.
//! `qwen3_cuda` is every decoder on the CUDA path (Qwen3, Qwen3-MoE, whose sparse block is
//! `moe_cuda`, Qwen2, Llama, Mistral, GPT-2, their options from the same layout; fused
//! bf16 weights and its forward pass of kernels and GEMMs, served by
//! `backend::cuda::executor`); `encoder_cuda` is the BERT family's encoders there (BERT,
//! RoBERTa, DistilBERT, by the names of `encoder`), served by the same executor.
//! Every model reads the one [`config::ModelConfig`], loads through the one
//! [`crate::weights::WeightSource`], samples with the one rule
//! ([`crate::backend::sampling`]) and packs its steps with the one [`StepBuilder`], which
//! flattens a step's sequences into the varlen layout ([`StepMeta`]) a device receives
//! once per step. A new architecture is a model file per device plus its `config` entry (a
//! new decoder family: a loader, or none where it shares a naming, and its layout).

pub mod bert;
pub mod config;
pub mod decoder;
pub mod encoder;
#[cfg(feature = "cuda")]
pub mod encoder_cuda;
pub mod gpt2;
pub mod moe;
#[cfg(feature = "cuda")]
pub mod moe_cuda;
pub mod qwen3;
#[cfg(feature = "cuda")]
pub mod qwen3_cuda;

use crate::backend::StepMeta;
use crate::model_api::{SampleSpec, SeqStep};

/// Reusable host buffers for a step's metadata: no allocation per step once warm.
#[derive(Debug, Default)]
pub struct StepBuilder {
    tokens: Vec<u32>,
    positions: Vec<u32>,
    seq_starts: Vec<u32>,
    context_lens: Vec<u32>,
    block_tables: Vec<u32>,
    slot_mapping: Vec<u32>,
    sample_rows: Vec<u32>,
}

impl StepBuilder {
    fn clear(&mut self) {
        self.tokens.clear();
        self.positions.clear();
        self.seq_starts.clear();
        self.context_lens.clear();
        self.block_tables.clear();
        self.slot_mapping.clear();
        self.sample_rows.clear();
    }

    /// A paged step from the scheduler's sequences. Checks token ids against `vocab` and
    /// block tables against `num_blocks`, so bad input is an error, never a panic.
    pub fn paged<'a>(
        &'a mut self,
        seqs: &[SeqStep<'_>],
        samples: &'a [SampleSpec<'a>],
        block_size: usize,
        num_blocks: usize,
        vocab: usize,
    ) -> anyhow::Result<StepMeta<'a>> {
        self.clear();
        let max_blocks = seqs.iter().map(|s| s.block_table.len()).max().unwrap_or(0);
        self.seq_starts.push(0);
        for s in seqs {
            if s.tokens.is_empty() {
                anyhow::bail!("a step sequence has no tokens");
            }
            let ctx = s.start_pos + s.tokens.len();
            if s.block_table.len() * block_size < ctx {
                anyhow::bail!(
                    "block table of {} blocks x {block_size} does not cover {ctx} tokens",
                    s.block_table.len()
                );
            }
            if let Some(&b) = s.block_table.iter().find(|&&b| b as usize >= num_blocks) {
                anyhow::bail!("block id {b} out of range (cache has {num_blocks} blocks)");
            }
            for (i, &t) in s.tokens.iter().enumerate() {
                if t as usize >= vocab {
                    anyhow::bail!("token id {t} out of range (vocab size {vocab})");
                }
                let p = s.start_pos + i;
                self.tokens.push(t);
                self.positions.push(p as u32);
                let block = s.block_table[p / block_size];
                self.slot_mapping
                    .push(block * block_size as u32 + (p % block_size) as u32);
            }
            self.block_tables.extend_from_slice(s.block_table);
            self.block_tables.resize(
                self.block_tables.len() + max_blocks - s.block_table.len(),
                0,
            );
            self.context_lens.push(ctx as u32);
            self.seq_starts.push(self.tokens.len() as u32);
            if s.sample.is_some() {
                self.sample_rows.push(self.tokens.len() as u32 - 1);
            }
        }
        Ok(StepMeta {
            tokens: &self.tokens,
            positions: &self.positions,
            seq_starts: &self.seq_starts,
            context_lens: &self.context_lens,
            block_tables: &self.block_tables,
            max_blocks_per_seq: max_blocks,
            block_size,
            slot_mapping: &self.slot_mapping,
            sample_rows: &self.sample_rows,
            samples,
        })
    }

    /// A dense (no KV cache) step over whole inputs, positions from 0: encoders and
    /// decoders used as embedders. The last row of each input is a sample row.
    pub fn dense<'a>(
        &'a mut self,
        inputs: &[&[u32]],
        vocab: usize,
        max_len: usize,
    ) -> anyhow::Result<StepMeta<'a>> {
        self.clear();
        self.seq_starts.push(0);
        for (n, input) in inputs.iter().enumerate() {
            if input.is_empty() {
                anyhow::bail!("input {n} is empty");
            }
            if input.len() > max_len {
                anyhow::bail!(
                    "input {n} has {} tokens, more than the model's maximum of {max_len}",
                    input.len()
                );
            }
            for (p, &t) in input.iter().enumerate() {
                if t as usize >= vocab {
                    anyhow::bail!("token id {t} out of range (vocab size {vocab})");
                }
                self.tokens.push(t);
                self.positions.push(p as u32);
            }
            self.seq_starts.push(self.tokens.len() as u32);
            self.sample_rows.push(self.tokens.len() as u32 - 1);
        }
        Ok(StepMeta {
            tokens: &self.tokens,
            positions: &self.positions,
            seq_starts: &self.seq_starts,
            context_lens: &[],
            block_tables: &[],
            max_blocks_per_seq: 0,
            block_size: 0,
            slot_mapping: &[],
            sample_rows: &self.sample_rows,
            samples: &[],
        })
    }
}
