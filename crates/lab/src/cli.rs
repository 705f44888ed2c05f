//! Command-line arguments of `colocate lab` and the function that runs it.
//! PLACEHOLDER: the owner of this crate replaces this file.

/// Arguments of `colocate lab`.
#[derive(Debug, clap::Args)]
pub struct LabArgs {}

/// Runs `colocate lab`.
pub fn run(_args: LabArgs) -> anyhow::Result<()> {
    anyhow::bail!("colocate lab is not built yet")
}
