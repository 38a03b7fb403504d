//! `ddpm bench`: flags for [`ddpm_train::bench`] (its [`BenchSpec`] is the flag set), one
//! measurement per process (so peak RSS belongs to it), printed as one JSON line. `cargo xtask
//! bench` runs the grid of presets and kernels and the PyTorch reference.

use anyhow::Result;
use clap::Args;
use ddpm_train::bench::BenchSpec;

use crate::DeviceArg;

/// Options of `ddpm bench`.
#[derive(Debug, Args)]
pub struct BenchArgs {
    #[command(flatten)]
    spec: BenchSpec,
    /// Where to compute.
    #[arg(long, value_enum, default_value = "cpu")]
    device: DeviceArg,
}

/// Runs `ddpm bench`.
pub fn run(a: BenchArgs) -> Result<()> {
    let dev = crate::device(a.device)?;
    println!("{}", ddpm_train::bench::run(&a.spec, &dev)?);
    Ok(())
}
