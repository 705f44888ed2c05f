//! Command-line arguments of `colocate plan` and the function that runs it.
//! PLACEHOLDER: the owner of this crate replaces this file.

/// Arguments of `colocate plan`.
#[derive(Debug, clap::Args)]
pub struct PlanArgs {}

/// Runs `colocate plan`.
pub fn run(_args: PlanArgs) -> anyhow::Result<()> {
    anyhow::bail!("colocate plan is not built yet")
}

/// Arguments of `colocate up`.
#[derive(Debug, clap::Args)]
pub struct UpArgs {}

/// Runs `colocate up`.
pub fn run_up(_args: UpArgs) -> anyhow::Result<()> {
    anyhow::bail!("colocate up is not built yet")
}

/// Arguments of `colocate status`.
#[derive(Debug, clap::Args)]
pub struct StatusArgs {}

/// Runs `colocate status`.
pub fn run_status(_args: StatusArgs) -> anyhow::Result<()> {
    anyhow::bail!("colocate status is not built yet")
}
