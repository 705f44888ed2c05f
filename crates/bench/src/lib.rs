//! `colocate bench`: drives one or several OpenAI-compatible endpoints at once (gen and
//! embed workloads, closed or open loop) and reports what each achieved in one shared
//! measurement window, with vLLM's metric definitions.
//!
//! Modules, one job each: `spec` (what to run), `prompt` (prompt texts of a token length),
//! `arrivals` (open-loop timing), `sse` (incremental stream parsing), `client` (HTTP),
//! `unstreamed` (non-streamed completions), `runner` (the run and its window), `metrics`
//! (definitions and statistics), `results` (file formats and the table), `cli`. The mock
//! server that the tests and the client benchmark run against is not part of the library:
//! it lives in `tests/support/mock_server.rs`.

pub mod arrivals;
pub mod cli;
pub mod client;
pub mod metrics;
pub mod prompt;
pub mod results;
pub mod runner;
pub mod spec;
pub mod sse;
pub mod unstreamed;

pub use metrics::{EmbedStats, GenStats, RequestRecord, Stats, TimePoint};
pub use results::{BenchResults, WorkloadResult, SCHEMA_VERSION};
pub use runner::{run, Phase, Progress, WorkloadProgress};
pub use spec::{
    parse_workload, BenchSpec, LengthDist, Load, LoadStep, Slo, WorkloadKind, WorkloadSpec,
};
