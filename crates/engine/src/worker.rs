//! The engine thread: loads the model, sizes the KV cache, then runs the scheduler (or the
//! embedding queue) in a loop fed by a command channel (text-embeddings-inference's
//! design). The model is not `Sync`, so it lives on this one std thread and never crosses
//! an `await`; the HTTP side only sends commands and reads each request's own channel.
//! Its state ([`EngineState`]) is a watch channel: `Loading`, then `Ready` with what the
//! HTTP side needs, or `Failed` with the reason (which ends the server with a non-zero
//! exit).

use std::sync::mpsc;
use std::sync::Arc;
use std::time::Instant;

use tokio::sync::watch;

use crate::embed_queue::{EmbedQueue, EmbedRequest};
use crate::kv::BlockManager;
use crate::limits::LimitFlags;
use crate::load::{load, LoadOptions, LoadedModel};
use crate::metrics::Metrics;
use crate::model_api::ModelInfo;
use crate::scheduler::{Admission, GenRequest, Scheduler, SchedulerConfig};
use crate::server::ComputeShare;
use crate::tokenizer::Tokenizer;

/// A request for the engine thread.
#[derive(Debug)]
pub enum Command {
    Generate(GenRequest),
    Embed(EmbedRequest),
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
pub enum EngineState {
    Loading,
    Ready(Arc<Ready>),
    Failed(String),
}

/// Starts the engine thread; the returned watch says when it is ready (or why it failed).
/// An embedder's batches obey `share` (the compute share the admin route moves).
pub fn spawn(
    load_opts: LoadOptions,
    limits: LimitFlags,
    metrics: Arc<Metrics>,
    admission: Arc<Admission>,
    share: Arc<ComputeShare>,
) -> std::io::Result<watch::Receiver<EngineState>> {
    let (health_tx, health_rx) = watch::channel(EngineState::Loading);
    std::thread::Builder::new()
        .name("engine".into())
        .spawn(move || {
            // A panic in the model must not leave a server that looks healthy but never
            // answers: it becomes `Failed`, which stops the server with a non-zero exit.
            let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                run(load_opts, limits, metrics, admission, share, &health_tx)
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
            let _ = health_tx.send(EngineState::Failed(msg));
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
    limits: LimitFlags,
    metrics: Arc<Metrics>,
    admission: Arc<Admission>,
    share: Arc<ComputeShare>,
    health: &watch::Sender<EngineState>,
) -> anyhow::Result<()> {
    let t0 = Instant::now();
    let loaded = load(&load_opts)?;
    let info = loaded.info.clone();
    // On a GPU the memory budget (--gpu-memory-utilization) decides the KV bytes, and the
    // step buffers cap the sequence length.
    let limits = match loaded.device_limits {
        Some(d) => LimitFlags {
            kv_cache_memory: d.kv_cache_bytes,
            max_model_len: Some(limits.max_model_len.unwrap_or(d.max_model_len)),
            ..limits
        },
        None => limits,
    };
    let r = limits.resolve(&info)?;
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
                BlockManager::new(r.num_blocks, limits.block_size)
                    .with_prefix_caching(limits.prefix_caching),
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
            let _ = health.send(EngineState::Ready(ready(r.num_blocks)));
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
            if let Some(parts) = model.sm_partitions() {
                tracing::info!(
                    "SM partitions of {:?} of {} SMs: /admin/compute-share sm_percent moves the batches between them",
                    parts.sizes,
                    parts.total
                );
                share.set_partitions(parts);
            }
            let mut queue = EmbedQueue::new(
                r.max_num_batched_tokens,
                r.max_num_seqs,
                metrics,
                admission.clone(),
            )
            .with_share(share);
            tracing::info!(
                "loaded {} ({}, embed) in {:.1}s: batches of up to {} tokens, max model len {}",
                load_opts.model,
                info.architecture,
                t0.elapsed().as_secs_f64(),
                r.max_num_batched_tokens,
                r.max_model_len
            );
            let _ = health.send(EngineState::Ready(ready(0)));
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
