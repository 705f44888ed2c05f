//! How much load can one client process drive? (`docs/bench/bench-client.md`)
//!
//! `client_bench serve`: the mock OpenAI server (`tests/support/mock_server.rs`), on its
//! own cores, streaming with a chosen per-token pause (0 = as fast as it can).
//! `client_bench client <colocate bench flags>`: the same code path as `colocate bench`
//! (spec from the same flags, `bench::run` on a default multi-thread runtime), then the
//! process's CPU time (getrusage) and the streamed chunks it handled per CPU-second.
//! Run both under `taskset` so that the client has exactly the cores being measured;
//! `crates/bench/scripts/client-bench.sh` does the whole sweep.

use std::time::{Duration, Instant};

use anyhow::Context;
use clap::{Parser, Subcommand};

// The tests' mock server; this example does not read its token counter.
#[allow(dead_code)]
#[path = "../tests/support/mock_server.rs"]
mod mock_server;

#[derive(Parser)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Run the mock server until killed.
    Serve {
        #[arg(long, default_value_t = 18100)]
        port: u16,
        #[arg(long, default_value_t = 4)]
        threads: usize,
        /// Pause between two tokens of one stream, microseconds (0 = as fast as possible).
        #[arg(long, default_value_t = 0)]
        token_delay_us: u64,
        /// Pause before each embeddings response, milliseconds.
        #[arg(long, default_value_t = 0)]
        embed_delay_ms: u64,
        /// Embedding dimension of the responses (4096 = Qwen3-Embedding-8B).
        #[arg(long, default_value_t = 4096)]
        embed_dim: usize,
    },
    /// Run `colocate bench` logic with these flags and report the client's CPU cost.
    Client {
        #[command(flatten)]
        args: bench::cli::BenchArgs,
    },
}

fn cpu_seconds() -> f64 {
    // SAFETY: getrusage only writes the struct we pass.
    let mut u: libc::rusage = unsafe { std::mem::zeroed() };
    unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut u) };
    let tv = |t: libc::timeval| t.tv_sec as f64 + t.tv_usec as f64 * 1e-6;
    tv(u.ru_utime) + tv(u.ru_stime)
}

fn main() -> anyhow::Result<()> {
    match Cli::parse().cmd {
        Cmd::Serve {
            port,
            threads,
            token_delay_us,
            embed_delay_ms,
            embed_dim,
        } => {
            let rt = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(threads)
                .enable_all()
                .build()?;
            rt.block_on(async {
                let opts = mock_server::MockOptions {
                    token_delay: Duration::from_micros(token_delay_us),
                    embed_delay: Duration::from_millis(embed_delay_ms),
                    embed_dim,
                    ..Default::default()
                };
                let s = mock_server::start(port, opts).await?;
                eprintln!("mock server on {}", s.url());
                std::future::pending::<()>().await;
                #[allow(unreachable_code)]
                Ok(())
            })
        }
        Cmd::Client { args } => {
            let mut spec = args.to_spec()?;
            spec.record_requests = true;
            let rt = tokio::runtime::Builder::new_multi_thread()
                .enable_all()
                .build()?;
            let threads = std::thread::available_parallelism()
                .map(|n| n.get())
                .unwrap_or(1);
            let (c0, t0) = (cpu_seconds(), Instant::now());
            let r = rt
                .block_on(bench::run(
                    &spec,
                    None,
                    tokio_util::sync::CancellationToken::new(),
                ))
                .context("bench run failed")?;
            let (cpu, wall) = (cpu_seconds() - c0, t0.elapsed().as_secs_f64());
            print!("{}", r.table());
            let chunks: u64 = r.requests.iter().map(|q| q.chunks).sum();
            let seqs: u64 = r
                .requests
                .iter()
                .filter(|q| q.success && q.sequences > 1)
                .map(|q| q.sequences as u64)
                .sum();
            let errors: usize = r.requests.iter().filter(|q| q.error.is_some()).count();
            println!("\nclient process: {threads} cores available, wall {wall:.1} s, CPU {cpu:.1} s ({:.2} cores busy)", cpu / wall);
            println!(
                "whole run: {chunks} streamed chunks, {seqs} embedded sequences, {errors} errors; {:.0} chunks per client CPU-second",
                chunks as f64 / cpu
            );
            for w in &r.workloads {
                if let Some(g) = &w.gen {
                    println!(
                        "RESULT {} gen output tok/s {:.0} itl p50 {:.2} ms p99 {:.2} ms",
                        w.name,
                        g.output_throughput,
                        g.itl_ms.median,
                        g.itl_ms.percentiles.get("p99").copied().unwrap_or(0.0)
                    );
                }
                if let Some(e) = &w.embed {
                    println!(
                        "RESULT {} embed seq/s {:.0} latency p50 {:.1} ms",
                        w.name, e.seq_throughput, e.latency_ms.median
                    );
                }
            }
            println!(
                "RESULT cpu_cores_busy {:.2} chunks_per_cpu_s {:.0}",
                cpu / wall,
                chunks as f64 / cpu
            );
            Ok(())
        }
    }
}
