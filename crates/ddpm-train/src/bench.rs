//! Speed and memory measurements: full training steps, forward passes, guided sampling, the
//! machine's GEMM ceiling, and the fused kernels against their compositions. Each run returns
//! one JSON object; `ddpm bench` prints it (one measurement per process, so peak RSS belongs
//! to it) and `cargo xtask bench` runs the grid of presets and kernels and the PyTorch
//! reference.

use std::time::Instant;

use candle_core::{DType, Device, Tensor};
use ddpm_core::{Denoiser, SeededNoise};
use ddpm_data::Batch;
use ddpm_pipeline::{Labels, Request, SamplerKind, SamplerSpec};
use ddpm_schedule::ScheduleConfig;
use ddpm_unet::{Kernels, UNetConfig};
use serde_json::Value;

use crate::error::{Result, TrainError};
use crate::{DataInfo, ModelCard, TrainConfig, Trainer};

fn bad(msg: impl Into<String>) -> TrainError {
    TrainError::Config(msg.into())
}

/// What `ddpm bench` measures.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[cfg_attr(feature = "clap", derive(clap::ValueEnum))]
pub enum BenchMode {
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

impl BenchMode {
    /// The mode's name in the JSON (`train`, `forward`, `sample`, `gemm`, `kernels`, `config`).
    pub fn name(self) -> &'static str {
        match self {
            BenchMode::Train => "train",
            BenchMode::Forward => "forward",
            BenchMode::Sample => "sample",
            BenchMode::Gemm => "gemm",
            BenchMode::Kernels => "kernels",
            BenchMode::Config => "config",
        }
    }
}

/// One measurement: what to run, on which model, how often (the `clap` feature derives
/// `clap::Args`: `ddpm bench`'s flags are these fields).
#[derive(Debug, Clone, PartialEq)]
#[cfg_attr(feature = "clap", derive(clap::Args))]
pub struct BenchSpec {
    /// What to measure.
    #[cfg_attr(feature = "clap", arg(long, value_enum, default_value = "train"))]
    pub mode: BenchMode,
    /// Model preset.
    #[cfg_attr(feature = "clap", arg(long, value_enum, default_value = "small"))]
    pub model: ddpm_unet::Preset,
    /// Batch size (default: 128 for train and for sampling on the CPU, 1000 for sampling on
    /// CUDA and for kernels, 256 for forward).
    #[cfg_attr(feature = "clap", arg(short = 'b', long))]
    pub batch: Option<usize>,
    /// Kernel implementation: fast (ours), stock (candle's), or cuda-ops (fast plus our CUDA
    /// kernels for GroupNorm, bias and upsampling on a GPU; the same as fast on the CPU).
    #[cfg_attr(feature = "clap", arg(long, value_enum, default_value = "fast"))]
    pub kernels: Kernels,
    /// Timed iterations.
    #[cfg_attr(feature = "clap", arg(long, default_value_t = 5))]
    pub iters: usize,
    /// Untimed warm-up iterations.
    #[cfg_attr(feature = "clap", arg(long, default_value_t = 1))]
    pub warmup: usize,
    /// Image side (28 for MNIST).
    #[cfg_attr(feature = "clap", arg(long, default_value_t = 28))]
    pub image_size: usize,
    /// Sampling steps (sample mode).
    #[cfg_attr(feature = "clap", arg(long, default_value_t = 50))]
    pub steps: usize,
    /// Samples per timed run (sample mode), in batches of --batch.
    #[cfg_attr(feature = "clap", arg(long, default_value_t = 1000))]
    pub n: usize,
    /// Autocast: run the U-Net's convolutions, linear layers and attention products in bf16
    /// (f16 also accepted) with the weights kept in f32; GroupNorm and softmax stay f32. On the
    /// CPU, bf16 products take bf16-rounded inputs and accumulate in f32: convolutions on the
    /// vdpbf16ps kernel where the dispatcher picks it (DDPM_BF16_KERNEL overrides), otherwise on
    /// the reference path.
    #[cfg_attr(feature = "clap", arg(long, value_enum))]
    pub autocast: Option<ddpm_unet::Autocast>,
}

/// Peak resident memory of this process in MiB (Linux `VmHWM`), if known.
fn peak_rss_mib() -> Option<f64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kb: f64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb / 1024.0)
}

fn time_iters(warmup: usize, iters: usize, mut f: impl FnMut() -> Result<()>) -> Result<f64> {
    for _ in 0..warmup {
        f()?;
    }
    let start = Instant::now();
    for _ in 0..iters {
        f()?;
    }
    Ok(start.elapsed().as_secs_f64())
}

fn sync(dev: &Device) -> Result<()> {
    Ok(dev.synchronize()?)
}

/// Runs one measurement on `dev` and returns it as a JSON object.
pub fn run(a: &BenchSpec, dev: &Device) -> Result<Value> {
    if a.iters == 0 {
        return Err(bad("--iters 0: time at least one iteration"));
    }
    if a.batch == Some(0) || a.n == 0 {
        return Err(bad("--batch and --n must be at least 1"));
    }
    if let Some(c) = a.autocast {
        c.check_device(dev)
            .map_err(|e| bad(format!("--autocast {}: {e}", c.dtype().as_str())))?;
    }
    let dev = dev.clone();
    let threads = candle_core::utils::get_num_threads();
    let cfg = a.model.config();
    let kernels = a.kernels;
    let s = a.image_size;
    if a.mode == BenchMode::Config {
        return serde_json::to_value(&cfg).map_err(|e| bad(e.to_string()));
    }
    if a.mode == BenchMode::Gemm {
        // 1024³ is already the ceiling of a 2-core CPU; a GPU needs a larger product.
        let n = if dev.is_cuda() { 8192 } else { 1024 };
        let x = Tensor::ones((n, n), DType::F32, &dev)?;
        let y = Tensor::ones((n, n), DType::F32, &dev)?;
        let iters = a.iters.max(5);
        let secs = time_iters(a.warmup, iters, || {
            x.matmul(&y)?;
            sync(&dev)
        })?;
        let gflops = 2.0 * (n * n * n) as f64 * iters as f64 / secs / 1e9;
        return Ok(
            serde_json::json!({"mode": "gemm", "n": n, "threads": threads, "gflops": gflops}),
        );
    }
    let batch = a.batch.unwrap_or(match a.mode {
        BenchMode::Train => 128,
        BenchMode::Sample if dev.is_cpu() => 128,
        BenchMode::Sample | BenchMode::Kernels => 1000,
        _ => 256,
    });
    if batch == 0 || a.n == 0 {
        return Err(bad("bench: batch and n must be at least 1"));
    }
    let card = ModelCard {
        model: cfg.clone(),
        schedule: ScheduleConfig::default(),
        data: DataInfo {
            dataset: "mnist".into(),
            channels: cfg.in_channels,
            height: s,
            width: s,
            class_names: (0..cfg.num_classes).map(|d| d.to_string()).collect(),
        },
        prediction: Default::default(),
        distilled: None,
    };
    // Sizes are checked before anything is allocated from them.
    card.validate()
        .map_err(|e| bad(format!("image size {s}: {e}")))?;
    if dev.is_cpu() {
        let fits = match a.mode {
            BenchMode::Train => ddpm_pipeline::memory::check_training(&card, batch),
            _ => ddpm_pipeline::memory::check_sampling(&card, a.n, batch, true, 1, false, true),
        };
        fits.map_err(|e| bad(e.to_string()))?;
    }
    if a.mode == BenchMode::Kernels {
        return kernels_bench(a, &dev, &cfg, batch);
    }
    let params = ddpm_unet::parameter_count(&cfg)?;
    let mut rng = SeededNoise::new(0);
    let x = Tensor::from_vec(
        rng.randn_vec(batch * cfg.in_channels * s * s),
        (batch, cfg.in_channels, s, s),
        &dev,
    )?;
    let labels = Tensor::from_vec(rng.uniform_u32(batch, 10), batch, &dev)?;
    let autocast = a.autocast;
    // Training takes autocast from its config (which refuses f16); the other modes set it on
    // the model they sample with.
    let train_config = TrainConfig {
        batch_size: batch,
        autocast: autocast.filter(|_| a.mode == BenchMode::Train),
        ..TrainConfig::default()
    };
    let dtype = autocast.map(|a| a.dtype());
    let mut trainer = Trainer::new(card, train_config, &dev)?;
    trainer.set_kernels(kernels);
    // Sample mode: the forward batch and its images/s.
    let mut sample_extra: Option<(usize, f64)> = None;
    let secs = match a.mode {
        BenchMode::Train => {
            let b = Batch {
                images: x.clone(),
                labels: labels.clone(),
            };
            time_iters(a.warmup, a.iters, || {
                trainer.train_step(&b)?;
                sync(&dev)
            })?
        }
        BenchMode::Sample => {
            // Plain (EMA) tensors, as when sampling from a checkpoint: with the trainer's Vars,
            // every step would keep the autograd graph of the whole chain alive.
            let model = trainer
                .ema_model()?
                .with_kernels(kernels)
                .with_autocast(dtype)?;
            let schedule = trainer
                .card()
                .schedule
                .build()
                .map_err(|e| bad(e.to_string()))?;
            let classes = rng.uniform_u32(a.n, 10);
            // The sampler `ddpm eval` uses, in the batches `ddpm sample` uses.
            let request = Request {
                labels: Labels::Classes(classes),
                guidance: 3.0,
                seed: 1,
                sampler: SamplerSpec::new(SamplerKind::Ddim).with_steps(a.steps),
                batch,
            };
            let dims = (cfg.in_channels, s, s);
            let secs = time_iters(a.warmup, a.iters, || {
                ddpm_pipeline::generate(&model, &schedule, dims, &dev, &request, &mut |_| Ok(()))?;
                sync(&dev)
            })?;
            // The forward rate at the batch guided sampling runs the network at.
            let fb = 2 * batch.min(a.n);
            let fx = Tensor::from_vec(
                rng.randn_vec(fb * cfg.in_channels * s * s),
                (fb, cfg.in_channels, s, s),
                &dev,
            )?;
            let ft = Tensor::from_vec(rng.uniform_u32(fb, 1000), fb, &dev)?;
            let fl = Tensor::from_vec(rng.uniform_u32(fb, 11), fb, &dev)?;
            let fsecs = time_iters(1, 3, || {
                model.predict_noise(&fx, &ft, Some(&fl))?;
                sync(&dev)
            })?;
            sample_extra = Some((fb, (fb * 3) as f64 / fsecs));
            secs
        }
        _ => {
            let model = trainer
                .ema_model()?
                .with_kernels(kernels)
                .with_autocast(dtype)?;
            let t = Tensor::from_vec(rng.uniform_u32(batch, 1000), batch, &dev)?;
            time_iters(a.warmup, a.iters, || {
                model.predict_noise(&x, &t, Some(&labels))?;
                sync(&dev)
            })?
        }
    };
    let per_iter = if a.mode == BenchMode::Sample {
        a.n
    } else {
        batch
    };
    let images_per_s = (per_iter * a.iters) as f64 / secs;
    let fwd = ddpm_unet::forward_flops(&cfg, s, s);
    // Training is forward + backward (≈ 2× forward); guided sampling runs 2 forwards a step.
    let per_image = match a.mode {
        BenchMode::Train => 3.0 * fwd,
        BenchMode::Sample => 2.0 * a.steps as f64 * fwd,
        _ => fwd,
    };
    Ok(serde_json::json!({
            "impl": match autocast {
                // bf16 on the CPU names its kernel (the dispatcher's choice, or
                // DDPM_BF16_KERNEL's): candle-fast-bf16-vdpbf16ps or candle-fast-bf16-reference.
                Some(ddpm_unet::Autocast::Bf16) if dev.is_cpu() && kernels != Kernels::Stock => format!(
                    "candle-{}-bf16-{}",
                    kernels.name(),
                    ddpm_unet::ops::precision::bf16_kernel().name()
                ),
                Some(a) => format!("candle-{}-{}", kernels.name(), a.dtype().as_str()),
                None => format!("candle-{}", kernels.name()),
            },
            "mode": a.mode.name(),
            "model": a.model.name(),
            "params": params,
            "batch": batch,
            "threads": threads,
            "iters": a.iters,
            "seconds": secs,
            "images_per_s": images_per_s,
            "gflops": images_per_s * per_image / 1e9,
            "peak_rss_mib": peak_rss_mib(),
            "device": if dev.is_cuda() { "cuda" } else { "cpu" },
            "steps": (a.mode == BenchMode::Sample).then_some(a.steps),
            "samples": (a.mode == BenchMode::Sample).then_some(a.n),
            "forward_batch": sample_extra.map(|e| e.0),
            "forward_images_per_s": sample_extra.map(|e| e.1),
            // Two forward images a sample a step: the rate the forward pass alone allows.
            "forward_bound_samples_per_s": sample_extra.map(|e| e.1 / (2.0 * a.steps as f64)),
            "vs_forward_bound": sample_extra.map(|e| images_per_s / (e.1 / (2.0 * a.steps as f64))),
    }))
}

/// `--mode kernels`: fused against composed, per call, after warm-up.
fn kernels_bench(a: &BenchSpec, dev: &Device, cfg: &UNetConfig, batch: usize) -> Result<Value> {
    use ddpm_kernels as k;
    let mut rng = SeededNoise::new(0);
    let mut randn = |dims: &[usize]| -> Result<Tensor> {
        let n = dims.iter().product();
        Ok(Tensor::from_vec(rng.randn_vec(n), dims, dev)?)
    };
    // The preset's parameter shapes, from a freshly built U-Net.
    let varmap = candle_nn::VarMap::new();
    ddpm_unet::UNet::new(
        cfg,
        candle_nn::VarBuilder::from_varmap(&varmap, DType::F32, dev),
    )?;
    let vars = varmap.all_vars();
    let mut state = Vec::with_capacity(vars.len());
    for v in &vars {
        let mut mv_dims = vec![2];
        mv_dims.extend_from_slice(v.dims());
        let g = randn(v.dims())?;
        let mv = randn(&mv_dims)?.abs()?;
        let avg = v.as_tensor().copy()?;
        state.push((v.as_tensor().copy()?, g, mv, avg));
    }
    let apply = k::AdamWApply {
        lr: 1e-4,
        bias_correction1: 0.5,
        bias_correction2: 0.01,
        eps: 1e-8,
        weight_decay: 0.0,
    };
    let per_call = |f: &mut dyn FnMut() -> Result<()>| -> Result<f64> {
        let secs = time_iters(a.warmup.max(1), a.iters, || {
            f()?;
            sync(dev)
        })?;
        Ok(secs * 1e3 / a.iters as f64)
    };
    let state = &state;
    let optimizer = |fused: bool| {
        move || -> Result<()> {
            for (w, g, mv, avg) in state {
                if fused {
                    k::adam_moments(mv, g, 0.9, 0.999, 1.0)?;
                    k::adamw_apply(w, mv, &apply)?;
                    k::ema_update(avg, w, 0.999)?;
                } else {
                    k::adam_moments_composed(mv, g, 0.9, 0.999, 1.0)?;
                    k::adamw_apply_composed(w, mv, &apply)?;
                    k::ema_update_composed(avg, w, 0.999)?;
                }
            }
            Ok(())
        }
    };
    let opt_fused = per_call(&mut optimizer(true))?;
    let opt_composed = per_call(&mut optimizer(false))?;

    let s = a.image_size;
    let c = cfg.in_channels;
    let x = randn(&[batch, c, s, s])?;
    let pair = randn(&[2 * batch, c, s, s])?;
    let rule = k::StepRule {
        alpha_bar: 0.3,
        clip_x0: true,
        c_x0: 0.6,
        c_eps: 0.7,
        c_x: 0.0,
        c_extra: 0.0,
    };
    let eps = k::Eps::Guided {
        pair: &pair,
        w: 3.0,
    };
    let step_fused = per_call(&mut || Ok(k::reverse_step(&x, eps, None, &rule).map(drop)?))?;
    let step_composed =
        per_call(&mut || Ok(k::reverse_step_composed(&x, eps, None, &rule).map(drop)?))?;
    let noise = randn(&[batch, c, s, s])?;
    let coef = randn(&[batch, 2])?;
    let noise_fused = per_call(&mut || Ok(k::add_noise(&x, &noise, &coef).map(drop)?))?;
    let noise_composed = per_call(&mut || Ok(k::add_noise_composed(&x, &noise, &coef).map(drop)?))?;
    Ok(serde_json::json!({
            "mode": "kernels",
            "model": a.model.name(),
            "param_tensors": vars.len(),
            "batch": batch,
            "device": if dev.is_cuda() { "cuda" } else { "cpu" },
            "threads": candle_core::utils::get_num_threads(),
            "adamw_ema_ms": {"fused": opt_fused, "composed": opt_composed},
            "guided_step_ms": {"fused": step_fused, "composed": step_composed},
            "add_noise_ms": {"fused": noise_fused, "composed": noise_composed},
    }))
}
