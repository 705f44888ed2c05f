//! The built-in engine. See docs/architecture.md for the modules and how a request flows.
pub mod backend;
pub mod cli;
pub mod detok;
pub mod embed_queue;
pub mod kv;
pub mod lifecycle;
pub mod limits;
pub mod load;
pub mod metrics;
pub mod model;
pub mod model_api;
pub mod scheduler;
pub mod server;
pub mod sm_share;
pub mod tokenizer;
pub mod weights;
pub mod worker;
