//! The built-in engine. See docs/architecture.md for the modules and how a request flows.
pub mod backend;
pub mod cli;
pub mod detok;
pub mod embed_queue;
pub mod kv;
pub mod limits;
pub mod load;
pub mod metrics;
pub mod model;
pub mod runner;
pub mod scheduler;
pub mod serve;
pub mod server;
pub mod tokenizer;
pub mod weights;
pub mod worker;
