//! The engine thread: loads the model, sizes the KV cache, then runs the scheduler (or the
//! embedding queue) in a loop fed by a command channel (text-embeddings-inference's
//! design). The model is not `Sync`, so it lives on this one std thread and never crosses
//! an `await`; the HTTP side only sends commands and reads each request's own channel.
//! Health is a watch channel: `Loading`, then `Ready` with what the HTTP side needs, or
//! `Failed` with the reason (which ends the server with a non-zero exit).

use std::sync::mpsc;
use std::sync::Arc;
use std::time::Instant;

use tokio::sync::watch;

use crate::embed_queue::{EmbedQueue, EmbedRequest};
use crate::kv::BlockManager;
use crate::load::{load, LoadOptions, LoadedModel};
use crate::metrics::Metrics;
use crate::runner::{ModelInfo, Task};
use crate::scheduler::{Admission, GenRequest, Scheduler, SchedulerConfig};
use crate::tokenizer::Tokenizer;

/// A request for the engine thread.
#[derive(Debug)]
pub enum Command {
    Generate(GenRequest),
    Embed(EmbedRequest),
}

/// Serving limits, as given on the command line (`None` = derive a default).
#[derive(Debug, Clone)]
pub struct Limits {
    pub max_num_seqs: Option<usize>,
    pub max_num_batched_tokens: Option<usize>,
    pub max_model_len: Option<usize>,
    /// KV cache budget in bytes.
    pub kv_cache_memory: u64,
    pub block_size: usize,
}

/// What the HTTP side needs once the model is loaded.
#[derive(Debug)]
pub struct Ready {
    pub tokenizer: Tokenizer,
    pub info: ModelInfo,
    pub max_model_len: usize,
    /// KV blocks (0 for embedders).
    pub num_blocks: usize,
    pub commands: mpsc::Sender<Command>,
}

/// The engine's state as `/health` sees it.
#[derive(Debug, Clone)]
pub enum Health {
    Loading,
    Ready(Arc<Ready>),
    Failed(String),
}

/// Limits resolved against the loaded model.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Resolved {
    pub num_blocks: usize,
    pub max_model_len: usize,
    pub max_num_seqs: usize,
    pub max_num_batched_tokens: usize,
}

/// Sizes the KV cache (`--kv-cache-memory / (block_size * kv_bytes_per_token)` blocks) and
/// checks the limits against it: a generator must be able to hold one sequence of
/// `max_model_len` tokens, so a too-small budget is an error naming both flags.
pub fn resolve_limits(limits: &Limits, info: &ModelInfo) -> anyhow::Result<Resolved> {
    let max_pos = info.max_position_embeddings;
    if info.task == Task::Embed {
        let max_model_len = limits.max_model_len.unwrap_or(max_pos);
        if max_model_len > max_pos {
            anyhow::bail!("--max-model-len {max_model_len} is longer than the model's max_position_embeddings ({max_pos})");
        }
        let batch_tokens = limits
            .max_num_batched_tokens
            .unwrap_or(16_384)
            .max(max_model_len);
        return Ok(Resolved {
            num_blocks: 0,
            max_model_len,
            max_num_seqs: limits.max_num_seqs.unwrap_or(256),
            max_num_batched_tokens: batch_tokens,
        });
    }
    let per_block =
        (limits.block_size as u64).saturating_mul(info.kv_bytes_per_token.max(1) as u64);
    let num_blocks = (limits.kv_cache_memory / per_block) as usize;
    let capacity = num_blocks * limits.block_size;
    if capacity == 0 {
        anyhow::bail!(
            "--kv-cache-memory {} bytes holds no KV block ({} bytes per block of {} tokens at {} bytes per token); raise --kv-cache-memory",
            limits.kv_cache_memory, per_block, limits.block_size, info.kv_bytes_per_token
        );
    }
    let max_model_len = match limits.max_model_len {
        Some(m) if m > max_pos => anyhow::bail!(
            "--max-model-len {m} is longer than the model's max_position_embeddings ({max_pos})"
        ),
        Some(m) if m > capacity => anyhow::bail!(
            "--max-model-len {m} does not fit the KV cache: --kv-cache-memory {} bytes holds {capacity} tokens; raise --kv-cache-memory or lower --max-model-len",
            limits.kv_cache_memory
        ),
        Some(m) => m,
        None => {
            if capacity < max_pos {
                tracing::warn!(
                    "--kv-cache-memory holds {capacity} tokens, fewer than the model's {max_pos}: serving with --max-model-len {capacity}"
                );
            }
            max_pos.min(capacity)
        }
    };
    // Every running sequence needs at least one token of the step budget to decode.
    let max_num_batched_tokens = limits.max_num_batched_tokens.unwrap_or(2048);
    let max_num_seqs = match limits.max_num_seqs {
        Some(s) if s > max_num_batched_tokens => anyhow::bail!(
            "--max-num-seqs {s} is larger than --max-num-batched-tokens {max_num_batched_tokens}: every running sequence needs a token of the step budget"
        ),
        Some(s) => s,
        None => 256.min(max_num_batched_tokens),
    };
    Ok(Resolved {
        num_blocks,
        max_model_len,
        max_num_seqs,
        max_num_batched_tokens,
    })
}

/// Starts the engine thread; the returned watch says when it is ready (or why it failed).
pub fn spawn(
    load_opts: LoadOptions,
    limits: Limits,
    metrics: Arc<Metrics>,
    admission: Arc<Admission>,
) -> std::io::Result<watch::Receiver<Health>> {
    let (health_tx, health_rx) = watch::channel(Health::Loading);
    std::thread::Builder::new()
        .name("engine".into())
        .spawn(move || {
            // A panic in the model must not leave a server that looks healthy but never
            // answers: it becomes `Failed`, which stops the server with a non-zero exit.
            let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                run(load_opts, limits, metrics, admission, &health_tx)
            }));
            let msg = match result {
                Ok(Ok(())) => return,
                Ok(Err(e)) => format!("{e:#}"),
                Err(p) => {
                    let what = p
                        .downcast_ref::<String>()
                        .map(String::as_str)
                        .or_else(|| p.downcast_ref::<&str>().copied())
                        .unwrap_or("unknown panic");
                    format!("the engine thread panicked: {what}")
                }
            };
            tracing::error!("engine failed: {msg}");
            let _ = health_tx.send(Health::Failed(msg));
        })?;
    Ok(health_rx)
}

/// The commands to take before the next step: when idle, waits for one; then takes all that
/// are queued. `None` once every sender is gone (the server has shut down).
fn next_commands(rx: &mpsc::Receiver<Command>, busy: bool) -> Option<Vec<Command>> {
    let first = if busy { None } else { Some(rx.recv().ok()?) };
    Some(first.into_iter().chain(rx.try_iter()).collect())
}

fn run(
    load_opts: LoadOptions,
    limits: Limits,
    metrics: Arc<Metrics>,
    admission: Arc<Admission>,
    health: &watch::Sender<Health>,
) -> anyhow::Result<()> {
    let t0 = Instant::now();
    let loaded = load(&load_opts)?;
    let info = loaded.info.clone();
    // On a GPU the memory budget (--gpu-memory-utilization) decides the KV bytes, and the
    // step buffers cap the sequence length.
    let limits = match loaded.device_limits {
        Some(d) => Limits {
            kv_cache_memory: d.kv_cache_bytes,
            max_model_len: Some(limits.max_model_len.unwrap_or(d.max_model_len)),
            ..limits
        },
        None => limits,
    };
    let r = resolve_limits(&limits, &info)?;
    let (tx, rx) = mpsc::channel();
    let ready = |num_blocks| {
        Arc::new(Ready {
            tokenizer: loaded.tokenizer.clone(),
            info: info.clone(),
            max_model_len: r.max_model_len,
            num_blocks,
            commands: tx.clone(),
        })
    };
    match loaded.model {
        LoadedModel::Generator(mut model) => {
            model.init_kv_cache(r.num_blocks, limits.block_size)?;
            let mut sched = Scheduler::new(
                SchedulerConfig {
                    max_num_seqs: r.max_num_seqs,
                    max_num_batched_tokens: r.max_num_batched_tokens,
                    max_model_len: r.max_model_len,
                },
                BlockManager::new(r.num_blocks, limits.block_size),
                info.eos_token_ids.clone(),
                Arc::new(loaded.tokenizer.clone()),
                metrics,
                admission.clone(),
            );
            tracing::info!(
                "loaded {} ({}, generate) in {:.1}s: {} KV blocks of {} tokens, max model len {}",
                load_opts.model,
                info.architecture,
                t0.elapsed().as_secs_f64(),
                r.num_blocks,
                limits.block_size,
                r.max_model_len
            );
            let _ = health.send(Health::Ready(ready(r.num_blocks)));
            drop(tx);
            loop {
                let Some(commands) = next_commands(&rx, sched.has_work()) else {
                    return Ok(());
                };
                for c in commands {
                    match c {
                        Command::Generate(g) => sched.add(g),
                        Command::Embed(e) => {
                            // The server checks the task first; if one slips through, its
                            // admission place must not leak.
                            admission.leave();
                            let _ = e.reply.send(Err(anyhow::anyhow!(
                                "this model generates; it does not embed"
                            )));
                        }
                    }
                }
                if let Err(e) = sched.step(&mut *model) {
                    tracing::error!("generation step failed: {e:#}");
                }
            }
        }
        LoadedModel::Embedder(mut model) => {
            let mut queue = EmbedQueue::new(
                r.max_num_batched_tokens,
                r.max_num_seqs,
                metrics,
                admission.clone(),
            );
            tracing::info!(
                "loaded {} ({}, embed) in {:.1}s: batches of up to {} tokens, max model len {}",
                load_opts.model,
                info.architecture,
                t0.elapsed().as_secs_f64(),
                r.max_num_batched_tokens,
                r.max_model_len
            );
            let _ = health.send(Health::Ready(ready(0)));
            drop(tx);
            loop {
                let Some(commands) = next_commands(&rx, queue.has_work()) else {
                    return Ok(());
                };
                for c in commands {
                    match c {
                        Command::Embed(e) => queue.add(e),
                        Command::Generate(g) => {
                            admission.leave();
                            let _ = g.events.send(crate::scheduler::GenEvent::Error(
                                "this model embeds; it does not generate".into(),
                            ));
                        }
                    }
                }
                if let Err(e) = queue.step(&mut *model) {
                    tracing::error!("embedding batch failed: {e:#}");
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn info(task: Task) -> ModelInfo {
        ModelInfo {
            architecture: "x".into(),
            task,
            vocab_size: 10,
            max_position_embeddings: 4096,
            eos_token_ids: vec![],
            kv_bytes_per_token: 1000,
            weight_bytes: 0,
        }
    }

    fn limits(kv: u64, mml: Option<usize>) -> Limits {
        Limits {
            max_num_seqs: None,
            max_num_batched_tokens: None,
            max_model_len: mml,
            kv_cache_memory: kv,
            block_size: 16,
        }
    }

    #[test]
    fn blocks_from_budget_and_max_model_len_defaults() {
        let r = resolve_limits(&limits(16_000 * 100 + 5, None), &info(Task::Generate)).unwrap();
        assert_eq!(r.num_blocks, 100);
        assert_eq!(r.max_model_len, 1600, "capped by the KV capacity");
        let r = resolve_limits(&limits(16_000 * 1000, None), &info(Task::Generate)).unwrap();
        assert_eq!(r.max_model_len, 4096);
    }

    #[test]
    fn too_small_budgets_name_the_flags() {
        let e = resolve_limits(&limits(100, None), &info(Task::Generate)).unwrap_err();
        assert!(e.to_string().contains("--kv-cache-memory"), "{e}");
        let e =
            resolve_limits(&limits(16_000 * 10, Some(1000)), &info(Task::Generate)).unwrap_err();
        assert!(e.to_string().contains("--max-model-len 1000"), "{e}");
        let e = resolve_limits(&limits(1 << 40, Some(5000)), &info(Task::Generate)).unwrap_err();
        assert!(e.to_string().contains("max_position_embeddings"), "{e}");
        let mut l = limits(1 << 30, None);
        l.max_num_batched_tokens = Some(8);
        assert_eq!(
            resolve_limits(&l, &info(Task::Generate))
                .unwrap()
                .max_num_seqs,
            8
        );
        l.max_num_seqs = Some(9);
        let e = resolve_limits(&l, &info(Task::Generate)).unwrap_err();
        assert!(e.to_string().contains("--max-num-seqs 9"), "{e}");
    }
}
