//! Command-line arguments of `colocate gpu` and the function that runs it.
//! PLACEHOLDER: the owner of this crate replaces this file.

/// Arguments of `colocate gpu`.
#[derive(Debug, clap::Args)]
pub struct GpuArgs {}

/// Runs `colocate gpu`.
pub fn run(_args: GpuArgs) -> anyhow::Result<()> {
    anyhow::bail!("colocate gpu is not built yet")
}
