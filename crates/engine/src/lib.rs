//! The built-in engine. See docs/architecture.md for the modules and how a request flows.
pub mod cli;
pub mod runner;
