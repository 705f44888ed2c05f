//! Deployments: "these engines on this GPU, shared this way" turned into running,
//! supervised processes behind one OpenAI endpoint.
//!
//! - [`spec`]: the deployment file and its validation, once, into a [`ValidDeployment`].
//! - [`model`]: model shapes (presets, `config.json`) for the memory plan.
//! - [`plan`]: the memory table and each engine's own flags.
//! - [`topology`]: which GPUs each engine uses; tensor parallelism's checks.
//! - [`adapters`]: command lines per engine kind.
//! - [`process`]: one child process: own process group, parent-death signal, logs.
//! - [`supervisor`]: start in order behind `/health`, restart with backoff, MPS fault model.
//! - [`gateway`]: the OpenAI endpoint in front: routing, balancing, health, metrics.
//! - [`deployment`]: `Deployment::up` / `shutdown`, the API the lab uses.
//! - [`state`]: the state file `colocate status` reads.
//! - [`vllm`]: vLLM's version, the flags it knows, what changed between versions.
pub mod adapters;
pub mod cli;
pub mod deployment;
pub mod gateway;
pub mod gpu_glue;
pub mod model;
pub mod plan;
pub mod process;
pub mod spec;
pub mod state;
pub mod supervisor;
pub mod topology;
pub mod units;
pub mod vllm;

pub use deployment::{Deployment, ReplicaEndpoint, UpOptions};
pub use gateway::{LeastOutstanding, Policy};
pub use plan::{plan, EnginePlan, GpuFacts, Plan};
pub use spec::{
    load, validate, DeploymentSpec, EngineKind, EngineSpec, GatewaySpec, GpuSelector, MemoryBudget,
    Sharing, SuperviseSpec, Task, ValidDeployment,
};
pub use supervisor::{Event, EventKind, InstanceState, InstanceStatus};
