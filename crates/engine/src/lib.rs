//! The built-in engine. See docs/architecture.md for the modules and how a request flows.
pub mod cli;
pub mod detok;
pub mod embed_queue;
pub mod kv;
pub mod metrics;
pub mod scheduler;
pub mod serve;
pub mod server;
pub mod worker;
pub mod runner;
pub mod backend;
pub mod load;
pub mod model;
pub mod tokenizer;
pub mod weights;
