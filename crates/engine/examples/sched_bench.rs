//! The host's share of a served decode step: the scheduler (batch planning, KV blocks,
//! prefix-cache hashing, sampling specs) and each new token's handling (detokenization,
//! stop checks, events) at many running sequences, against a generator that returns at
//! once, so that every microsecond measured is time the GPU would wait between steps.
//!
//!   cargo run --release -p engine --example sched_bench -- [TOKENIZER_JSON] [SEQS] [TOKENS]
//!
//! Defaults: `testdata/gpt2-tiny/tokenizer.json` (byte-level BPE, as Qwen3's), 512
//! sequences of a 30-token prompt making 512 tokens each (the seeds' generator client).
//! Prints the mean host time per decode step with the real tokenizer, streamed (text token
//! by token) and not (the seeds' client: the text decoded once at each request's end), and
//! with a detokenizer that does nothing, so that the differences are the detokenization.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use engine::detok::Detokenize;
use engine::kv::BlockManager;
use engine::metrics::Metrics;
use engine::model_api::{Generator, ModelInfo, SeqStep, Task};
use engine::scheduler::{Admission, GenParams, GenRequest, Scheduler, SchedulerConfig};
use engine::tokenizer::Tokenizer;

/// Answers every sampling sequence at once with the next id of a fixed cycle of ordinary
/// vocabulary ids (text that detokenizes to words), and keeps no state.
struct Instant0 {
    info: ModelInfo,
    ids: Vec<u32>,
    at: usize,
}

impl Generator for Instant0 {
    fn info(&self) -> &ModelInfo {
        &self.info
    }
    fn init_kv_cache(&mut self, _: usize, _: usize) -> anyhow::Result<()> {
        Ok(())
    }
    fn step(&mut self, seqs: &[SeqStep<'_>]) -> anyhow::Result<Vec<u32>> {
        let out = seqs
            .iter()
            .filter(|s| s.sample.is_some())
            .map(|_| {
                self.at = (self.at + 1) % self.ids.len();
                self.ids[self.at]
            })
            .collect();
        Ok(out)
    }
    fn step_logits(&mut self, _: &[SeqStep<'_>]) -> anyhow::Result<Vec<Vec<f32>>> {
        anyhow::bail!("not used")
    }
}

/// Decodes to nothing: the scheduler's cost without detokenization.
struct NoText;

impl Detokenize for NoText {
    fn decode(&self, _: &[u32]) -> anyhow::Result<String> {
        Ok(String::new())
    }
}

/// Runs `seqs` requests to `tokens` output tokens each; returns the mean wall time of the
/// steps in which every sequence decoded (all running, none prefilling).
fn run(
    detok: Arc<dyn Detokenize>,
    ids: &[u32],
    seqs: usize,
    tokens: usize,
    streamed: bool,
) -> (Duration, usize) {
    let prompt_len = 30;
    let block = 16;
    let blocks = seqs * (prompt_len + tokens).div_ceil(block) + 64;
    let mut s = Scheduler::new(
        SchedulerConfig {
            max_num_seqs: seqs,
            max_num_batched_tokens: 8192,
            max_model_len: prompt_len + tokens + 16,
        },
        BlockManager::new(blocks, block),
        vec![u32::MAX],
        detok,
        Arc::new(Metrics::default()),
        Arc::new(Admission::new(seqs + 1)),
    );
    let mut receivers = Vec::new();
    for i in 0..seqs {
        let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
        // one prompt for all, as the seeds' client; the last id differs so that every
        // sequence computes its own last block
        let mut prompt: Vec<u32> = ids[..prompt_len - 1].to_vec();
        prompt.push(ids[i % ids.len()]);
        s.add(GenRequest {
            prompt,
            params: GenParams {
                max_tokens: tokens,
                ignore_eos: true,
                ..Default::default()
            },
            streamed,
            events: tx,
            arrival: Instant::now(),
        });
        receivers.push(rx);
    }
    let mut m = Instant0 {
        info: ModelInfo {
            architecture: "instant".into(),
            task: Task::Generate,
            vocab_size: 200_000,
            max_position_embeddings: 1 << 20,
            eos_token_ids: vec![],
            kv_bytes_per_token: 0,
            weight_bytes: 0,
        },
        ids: ids.to_vec(),
        at: 0,
    };
    let (mut total, mut steps) = (Duration::ZERO, 0);
    while s.has_work() {
        let full = s.num_running() == seqs;
        let t = Instant::now();
        s.step(&mut m).expect("an instant step cannot fail");
        if full {
            total += t.elapsed();
            steps += 1;
        }
        // what the HTTP side would take off the channels
        for rx in &mut receivers {
            while rx.try_recv().is_ok() {}
        }
    }
    (total / steps.max(1) as u32, steps)
}

fn main() -> anyhow::Result<()> {
    let mut args = std::env::args().skip(1);
    let path = PathBuf::from(
        args.next()
            .unwrap_or_else(|| "testdata/gpt2-tiny/tokenizer.json".into()),
    );
    let seqs: usize = args.next().map_or(Ok(512), |a| a.parse())?;
    let tokens: usize = args.next().map_or(Ok(512), |a| a.parse())?;
    let tok = Tokenizer::from_file(&path, None)?;
    let text = "Write a detailed essay about the history of computing, from the abacus and \
                the mechanical calculators of the seventeenth century to the electronic \
                machines of the twentieth and the processors of today.";
    let ids = tok.encode(text, false)?;
    anyhow::ensure!(ids.len() >= 30, "the sample text makes {} ids", ids.len());
    let real: Arc<dyn Detokenize> = Arc::new(tok);
    let none: Arc<dyn Detokenize> = Arc::new(NoText);
    for (what, d, streamed) in [
        ("tokenizer, streamed", real.clone(), true),
        ("tokenizer, not streamed", real, false),
        ("no text", none, true),
    ] {
        let (per_step, steps) = run(d, &ids, seqs, tokens, streamed);
        println!(
            "RESULT sched {seqs} seqs x {tokens} tokens, {what}: {:.3} ms host time per decode step (mean of {steps})",
            per_step.as_secs_f64() * 1e3
        );
    }
    Ok(())
}
