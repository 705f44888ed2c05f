//! See docs/architecture.md for what this crate owns.
pub mod cli;
