//! `colocate lab`: runs a matrix of co-location conditions, measures each with load and GPU
//! counters over the same window, and writes results.json, a report and plots.
//!
//! Modules, in data-flow order: [`spec`] (the experiment file, its `[deployment]` read
//! once into deploy's typed spec) → [`matrix`] (the plan) → [`deployments`] (each
//! condition's deployment, typed edits of that spec, validated once) → [`runner`] (drives a
//! [`runner::Harness`]; [`measure`] is the real one, the only module that starts
//! deployments and talks to `bench` and `gpu`) → [`results`] (results.json) → [`analysis`]
//! (efficiency, SLOs, recommendation; per tenant, [`fairness`] between tenants) →
//! [`report`] and [`plots`].
//!
//! Many tenants: [`tenants`] names the copies of an engine run in copies and says which
//! tenants are equal; [`significance`] (Welch's t, Mann-Whitney U) and [`kde`] (the
//! densities of [`violins`]) are the statistics; [`report_tenants`] and [`scaling`] the
//! report's pages for them.
//!
//! SLO control (issue 18): a controlled condition runs the gateway's controller with every
//! workload through the gateway; [`gateway_metrics`] keeps the controller's timeline over
//! the window and [`report_control`] the report's page for it; [`control_slo`] sets an
//! engine's SLO there relative to its solo run measured earlier in the same run.
//!
//! Several GPUs (issue 19): [`layout`] places engines on other GPUs per condition (their GPUs
//! and TP size, the study's baseline), [`per_gpu`] keeps every GPU of a deployment over the
//! window with the deployment's totals, and [`hypotheses`] judges the seeds' expectations for
//! tensor parallelism against the baseline.
pub mod analysis;
pub mod cli;
pub mod control_slo;
pub mod deployments;
pub mod engine_metrics;
pub mod fairness;
pub mod gateway_metrics;
pub mod hypotheses;
pub mod kde;
pub mod layout;
pub mod matrix;
#[cfg(feature = "measure")]
pub mod measure;
pub mod per_gpu;
pub mod plots;
pub mod report;
pub mod report_control;
pub mod report_tenants;
pub mod results;
pub mod runner;
pub mod scaling;
pub mod significance;
pub mod spec;
pub mod tenants;
pub mod violins;
