//! Startup and shutdown of `colocate serve`: bind the port first (so a port in use fails
//! at once with a clear message), start the engine thread that loads the model, serve HTTP
//! (`/health` answers 503 until the model is loaded) within `http_guard`'s connection
//! limits, and stop on Ctrl-C / SIGTERM or when loading fails (then exit non-zero with the
//! loader's message).

use std::sync::Arc;

use anyhow::Context as _;

use crate::cli::ServeArgs;
use crate::limits::{LimitFlags, DEFAULT_GPU_MEMORY_UTILIZATION};
use crate::load::{Device, GpuLoadOptions, LoadOptions};
use crate::metrics::Metrics;
use crate::scheduler::Admission;
use crate::server::{router, AppState, ComputeShare};
use crate::worker::{self, EngineState};

/// Runs the server on a tokio runtime of its own until a shutdown signal.
pub fn run(args: ServeArgs) -> anyhow::Result<()> {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .thread_name("serve-http")
        .build()
        .context("cannot start the async runtime")?;
    rt.block_on(serve(args))
}

async fn serve(args: ServeArgs) -> anyhow::Result<()> {
    if matches!(args.device, Device::Cpu)
        && args.gpu_memory_utilization != DEFAULT_GPU_MEMORY_UTILIZATION
    {
        tracing::warn!(
            "--gpu-memory-utilization is ignored with --device cpu (use --kv-cache-memory)"
        );
    }
    if matches!(args.device, Device::Cpu) && args.sm_partition.is_some() {
        anyhow::bail!("--sm-partition needs --device cuda: it confines the engine's GPU kernels to some of the SMs");
    }
    if matches!(args.device, Device::Cpu) && !args.sm_partitions.is_empty() {
        anyhow::bail!("--sm-partitions needs --device cuda: they are CUDA green contexts the embedder's GPU kernels move between");
    }
    let addr = format!("{}:{}", args.host, args.port);
    let listener = tokio::net::TcpListener::bind(&addr).await.map_err(|e| {
        if e.kind() == std::io::ErrorKind::AddrInUse {
            anyhow::anyhow!("cannot listen on {addr}: the port is already in use (another server running? pick another --port)")
        } else {
            anyhow::anyhow!("cannot listen on {addr} (--host/--port): {e}")
        }
    })?;
    let metrics = Arc::new(Metrics::default());
    let admission = Arc::new(Admission::new(args.max_waiting));
    let limits = LimitFlags {
        max_num_seqs: args.max_num_seqs.map(|v| v as usize),
        max_num_batched_tokens: args.max_num_batched_tokens.map(|v| v as usize),
        max_model_len: args.max_model_len.map(|v| v as usize),
        kv_cache_memory: args.kv_cache_memory,
        block_size: args.block_size as usize,
        prefix_caching: !args.no_enable_prefix_caching,
    };
    let load_opts = LoadOptions {
        model: args.model.clone(),
        task: args.task,
        load_format: args.load_format,
        device: args.device,
        seed: args.seed,
        tokenizer: args.tokenizer.clone(),
        gpu: GpuLoadOptions {
            sm_partition: args.sm_partition,
            sm_partitions: args.sm_partitions.clone(),
            ..GpuLoadOptions::new(args.gpu_memory_utilization, &limits)
        },
    };
    let share = Arc::new(ComputeShare::default());
    let health = worker::spawn(
        load_opts,
        limits,
        metrics.clone(),
        admission.clone(),
        share.clone(),
    )
    .context("cannot start the engine thread")?;
    let served = args
        .served_model_name
        .clone()
        .unwrap_or_else(|| args.model.clone());
    tracing::info!(
        "colocate serve: http://{addr} serving `{served}`; loading {}",
        args.model
    );
    let state = Arc::new(AppState {
        served_model_name: served,
        health: health.clone(),
        metrics,
        admission,
        share,
    });
    let mut h = health.clone();
    let stop = async move {
        let failed = async {
            loop {
                if matches!(&*h.borrow_and_update(), EngineState::Failed(_)) {
                    return;
                }
                if h.changed().await.is_err() {
                    return;
                }
            }
        };
        tokio::select! {
            _ = shutdown_signal() => tracing::info!("shutting down"),
            _ = failed => {},
        }
    };
    // Connections within bounds (cap, head/body/idle timeouts; TCP_NODELAY so that
    // token-sized SSE writes leave at once): see `http_guard`.
    if let Err(e) = http_guard::raise_fd_limit() {
        tracing::debug!("cannot raise the open-files limit: {e}");
    }
    let limits = http_guard::Limits::default();
    tracing::debug!(?limits, "HTTP limits");
    http_guard::Server::new(listener, router(state), limits)
        .serve(stop)
        .await;
    if let EngineState::Failed(e) = &*health.borrow() {
        anyhow::bail!("{e}");
    }
    Ok(())
}

async fn shutdown_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut term) => {
                tokio::select! {
                    _ = ctrl_c => {},
                    _ = term.recv() => {},
                }
            }
            Err(_) => {
                let _ = ctrl_c.await;
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = ctrl_c.await;
    }
}
