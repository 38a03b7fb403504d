//! `ddpm bench`: flags for [`ddpm_train::bench`], one measurement per process (so peak RSS
//! belongs to it), printed as one JSON line. `cargo xtask bench` runs the grid of presets and
//! kernels and the PyTorch reference.

use anyhow::Result;
use clap::{Args, ValueEnum};
use ddpm_train::bench::{BenchMode, BenchSpec};
use ddpm_unet::{Kernels, Preset};

use crate::DeviceArg;

/// What `ddpm bench` measures.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum ModeArg {
    /// Full training steps (forward, MSE, backward, AdamW, EMA) at --batch.
    Train,
    /// Inference forward passes (no gradients) at --batch.
    Forward,
    /// Guided sampling: --n samples (default 1000) by DDIM with --steps steps at guidance
    /// w = 3, in batches of --batch (default 128 on the CPU, 1000 on CUDA; one forward of
    /// 2×batch a step), as `ddpm sample` and `ddpm eval` do. Also times the forward pass at
    /// 2×batch and reports the samples/s that forward rate allows.
    Sample,
    /// A 1024×1024×1024 f32 matrix product: the machine's practical ceiling.
    Gemm,
    /// The element-wise work around the network, fused (ddpm-kernels) against the candle
    /// composition it replaced: AdamW + EMA over the preset's parameters, one guided DDIM step
    /// and add_noise at --batch (default 1000). Milliseconds per call.
    Kernels,
    /// Print the preset's U-Net configuration as JSON (for the PyTorch reference).
    Config,
}

/// Options of `ddpm bench`.
#[derive(Debug, Args)]
pub struct BenchArgs {
    /// What to measure.
    #[arg(long, value_enum, default_value = "train")]
    mode: ModeArg,
    /// Model preset.
    #[arg(long, value_enum, default_value_t = Preset::Small)]
    model: Preset,
    /// Batch size (default: 128 for train, 256 for forward).
    #[arg(short = 'b', long)]
    batch: Option<usize>,
    /// Kernel implementation: fast (ours), stock (candle's), or cuda-ops (fast plus our CUDA
    /// kernels for GroupNorm, bias and upsampling on a GPU; the same as fast on the CPU).
    #[arg(long, value_enum, default_value_t = Kernels::Fast)]
    kernels: Kernels,
    /// Timed iterations.
    #[arg(long, default_value_t = 5)]
    iters: usize,
    /// Untimed warm-up iterations.
    #[arg(long, default_value_t = 1)]
    warmup: usize,
    /// Image side (28 for MNIST).
    #[arg(long, default_value_t = 28)]
    image_size: usize,
    /// Sampling steps (sample mode).
    #[arg(long, default_value_t = 50)]
    steps: usize,
    /// Samples per timed run (sample mode), in batches of --batch.
    #[arg(long, default_value_t = 1000)]
    n: usize,
    /// Where to compute.
    #[arg(long, value_enum, default_value = "cpu")]
    device: DeviceArg,
    /// Autocast: run the U-Net's convolutions, linear layers and attention products in bf16
    /// (f16 also accepted) with the weights kept in f32; GroupNorm and softmax stay f32. bf16
    /// needs --device cuda (candle's CPU matmul has no bf16).
    #[arg(long, value_enum)]
    autocast: Option<ddpm_unet::Autocast>,
}

/// Runs `ddpm bench`.
pub fn run(a: BenchArgs) -> Result<()> {
    if a.iters == 0 {
        anyhow::bail!("--iters must be at least 1");
    }
    if a.batch == Some(0) || a.n == 0 {
        anyhow::bail!("--batch and --n must be at least 1");
    }
    let dev = crate::device(a.device)?;
    let mode = match a.mode {
        ModeArg::Train => BenchMode::Train,
        ModeArg::Forward => BenchMode::Forward,
        ModeArg::Sample => BenchMode::Sample,
        ModeArg::Gemm => BenchMode::Gemm,
        ModeArg::Kernels => BenchMode::Kernels,
        ModeArg::Config => BenchMode::Config,
    };
    let spec = BenchSpec {
        mode,
        model: a.model,
        batch: a.batch,
        kernels: a.kernels,
        iters: a.iters,
        warmup: a.warmup,
        image_size: a.image_size,
        steps: a.steps,
        n: a.n,
        autocast: crate::autocast(a.autocast, &dev)?,
    };
    let out = ddpm_train::bench::run(&spec, &dev)?;
    println!("{out}");
    Ok(())
}
