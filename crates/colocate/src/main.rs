//! The `colocate` binary: argument parsing and dispatch, nothing else.
//! Each subcommand's arguments and behaviour live in the crate that owns it.

use clap::{Parser, Subcommand};

/// Run several LLM inference engines on one GPU and know what that costs.
#[derive(Debug, Parser)]
#[command(name = "colocate", version, about, long_about = None)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Serve one model with the built-in OpenAI-compatible engine (CPU or CUDA).
    Serve(engine::cli::ServeArgs),
    /// Drive one or several endpoints with gen and embed workloads in one window.
    Bench(bench::cli::BenchArgs),
    /// GPU information, live counters (NVML GPM) and the MPS daemon.
    Gpu(gpu::cli::GpuArgs),
    /// Check that a deployment fits the GPU and print every engine's command line.
    Plan(deploy::cli::PlanArgs),
    /// Run a deployment: MPS if asked, supervised engines, a gateway in front.
    Up(deploy::cli::UpArgs),
    /// Show what `colocate up` is running: engines, health, restarts.
    Status(deploy::cli::StatusArgs),
    /// Run an experiment matrix and write a report with a recommendation.
    Lab(lab::cli::LabArgs),
}

fn main() -> std::process::ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| {
                tracing_subscriber::EnvFilter::new("info,deploy::supervisor=warn")
            }),
        )
        .with_writer(std::io::stderr)
        // Colours only on a terminal: engine logs go to files under `up` and `lab`.
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Serve(a) => engine::cli::run(a),
        Command::Bench(a) => bench::cli::run(a),
        Command::Gpu(a) => gpu::cli::run(a),
        Command::Plan(a) => deploy::cli::run(a),
        Command::Up(a) => deploy::cli::run_up(a),
        Command::Status(a) => deploy::cli::run_status(a),
        Command::Lab(a) => lab::cli::run(a),
    };
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}
