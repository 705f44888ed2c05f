//! The built-in engine. See docs/architecture.md for the modules and how a request flows.
pub mod cli;
pub mod detok;
pub mod kv;
pub mod metrics;
pub mod scheduler;
pub mod runner;
pub mod backend;
pub mod load;
pub mod model;
pub mod tokenizer;
pub mod weights;
