//! `colocate lab`: runs a matrix of co-location conditions, measures each with load and GPU
//! counters over the same window, and writes results.json, a report and plots.
//!
//! Modules, in data-flow order: [`spec`] (the experiment file) → [`matrix`] (the plan) →
//! [`runner`] (drives a [`runner::Harness`]; [`measure`] is the real one, the only module
//! that talks to `deploy`, `bench` and `gpu`) → [`results`] (results.json) → [`analysis`]
//! (efficiency, SLOs, recommendation) → [`report`] and [`plots`].
pub mod analysis;
pub mod cli;
pub mod engine_metrics;
pub mod matrix;
#[cfg(feature = "measure")]
pub mod measure;
pub mod plots;
pub mod report;
pub mod results;
pub mod runner;
pub mod spec;
pub mod template;
