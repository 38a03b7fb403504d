//! `ddpm export`: a sampling-only copy of a checkpoint (the EMA weights and the model card),
//! in f16 by default: what ships as assets/ddpm-mnist.safetensors.

use std::path::PathBuf;

use anyhow::{Context, Result};
use candle_core::{DType, Device};
use clap::Args;

/// Options of `ddpm export`.
#[derive(Debug, Args)]
pub struct ExportArgs {
    /// Training checkpoint to export.
    #[arg(long)]
    checkpoint: PathBuf,
    /// Output file (written to a temp file, then renamed).
    #[arg(long, default_value = "assets/ddpm-mnist.safetensors")]
    out: PathBuf,
    /// Keep f32 weights instead of f16 (twice the size).
    #[arg(long)]
    f32: bool,
}

/// Runs `ddpm export`.
pub fn run(a: ExportArgs) -> Result<()> {
    crate::refuse_overwrite("--out", &a.out, &[("--checkpoint", &a.checkpoint)])?;
    let ckpt = ddpm_train::checkpoint::read(&a.checkpoint, &Device::Cpu)
        .with_context(|| format!("--checkpoint {}", a.checkpoint.display()))?;
    let dtype = if a.f32 { DType::F32 } else { DType::F16 };
    ddpm_train::checkpoint::export_ema(&ckpt, &a.out, dtype)
        .with_context(|| format!("--out {}", a.out.display()))?;
    let bytes = std::fs::metadata(&a.out).map(|m| m.len()).unwrap_or(0);
    println!(
        "wrote {} ({:.1} MB, EMA weights in {dtype:?}, model card included) from {}",
        a.out.display(),
        bytes as f64 / 1e6,
        a.checkpoint.display()
    );
    Ok(())
}
