//! Command-line arguments of `colocate bench` and the function that runs it.
//! PLACEHOLDER: the owner of this crate replaces this file.

/// Arguments of `colocate bench`.
#[derive(Debug, clap::Args)]
pub struct BenchArgs {}

/// Runs `colocate bench`.
pub fn run(_args: BenchArgs) -> anyhow::Result<()> {
    anyhow::bail!("colocate bench is not built yet")
}
