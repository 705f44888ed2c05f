//! Command-line arguments of `colocate serve` and the function that runs it.
//! PLACEHOLDER: the owner of this crate replaces this file.

/// Arguments of `colocate serve`.
#[derive(Debug, clap::Args)]
pub struct ServeArgs {}

/// Runs `colocate serve`.
pub fn run(_args: ServeArgs) -> anyhow::Result<()> {
    anyhow::bail!("colocate serve is not built yet")
}
