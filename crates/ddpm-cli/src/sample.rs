//! `ddpm sample` and `ddpm noise`.

use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use clap::Args;
use ddpm_core::NoiseSchedule;
use ddpm_data::{Dataset, DatasetKind, Split};
use ddpm_pipeline::{generate_with, Frames, SampleOptions};
use ddpm_schedule::{BetaKind, ScheduleConfig};
use ddpm_train::viz;
use indicatif::{ProgressBar, ProgressStyle};

/// Options of `ddpm sample`.
#[derive(Debug, Args)]
#[command(
    after_help = "Guidance convention: eps = (1+w)*eps(x,t,c) - w*eps(x,t,null). \
    --guidance 0 is the plain conditional model (no guidance); diffusers' guidance_scale is 1 + w."
)]
pub struct SampleArgs {
    #[command(flatten)]
    model: crate::ModelArgs,
    #[command(flatten)]
    sample: SampleOptions,
    /// Output PNG grid (default: samples/class-{class}_w{w}.png).
    #[arg(long)]
    out: Option<PathBuf>,
    /// Pixel scale of the grid (1: raw 28×28 pixels).
    #[arg(long, default_value_t = 4)]
    scale: usize,
    /// Also write one PNG per sample into DIR, named with its index and class, at the model's
    /// native size whatever --scale is (28×28 grayscale for MNIST), as FID tools and
    /// classifiers expect.
    #[arg(long, conflicts_with = "sweep")]
    each: Option<PathBuf>,
    /// Also write all samples and their labels as one .npz (arr_0: uint8 [N, H, W, C];
    /// arr_1: int64 labels), the format diffusion evaluators read.
    #[arg(long, conflicts_with = "sweep")]
    npz: Option<PathBuf>,
    /// Also write the reverse-diffusion animation as a GIF.
    #[arg(long, conflicts_with = "sweep")]
    gif: Option<PathBuf>,
    /// Colours of the GIF: dark (light digits on black, as MNIST is), light (inverted, for a
    /// light page), or both (two files, NAME-light.gif and NAME-dark.gif, e.g. for a README's
    /// `<picture>` with prefers-color-scheme).
    #[arg(long, value_enum, default_value_t = viz::Themes::Dark, requires = "gif")]
    gif_theme: viz::Themes,
}

pub fn run(a: SampleArgs) -> Result<()> {
    if let Some(ckpt) = &a.model.opts.checkpoint {
        for (flag, out) in [("--out", &a.out), ("--npz", &a.npz), ("--gif", &a.gif)] {
            if let Some(out) = out {
                crate::refuse_overwrite(flag, out, &[("--checkpoint", ckpt)])?;
            }
        }
    }
    if let Some(dir) = &a.each {
        crate::out_folder("--each", dir)?;
    }
    let (model, ckpt_path, _) = a.model.load()?;
    let plan = a.sample.resolve(&model, a.scale, a.gif.is_some())?;
    let (n, per_row) = (plan.request.labels.len(), plan.per_row);
    let d = &model.card().data;
    viz::grid_size(n, per_row, d.height, d.width, a.scale).context("--scale")?;
    let c = plan.class.map_or("all".to_string(), |c| c.to_string());
    let started = std::time::Instant::now();
    if !a.sample.sweep.is_empty() {
        let mut panels = Vec::new();
        for &w in &plan.weights {
            let x0 = generate_with(&model, &plan.at(w), &mut |_| Ok(()))?;
            panels.push((format!("W = {w}"), viz::grid_image(&x0, per_row, a.scale)?));
        }
        let out = (a.out.clone()).unwrap_or_else(|| format!("samples/class-{c}_sweep.png").into());
        viz::save_panels(&panels, &out).with_context(|| format!("--out {}", out.display()))?;
        println!(
            "wrote {} (w = {:?}, {n} samples each, same noise, {:.1} s) from {}",
            out.display(),
            plan.weights,
            started.elapsed().as_secs_f64(),
            ckpt_path.display()
        );
        return Ok(());
    }
    let (w, spec) = (plan.weights[0], plan.request.sampler);
    let total = spec.num_steps(model.schedule().num_train_timesteps());
    let bar = ProgressBar::new((total * n.div_ceil(plan.request.batch)) as u64);
    bar.set_style(ProgressStyle::with_template(
        "sampling [{bar:30}] {pos}/{len} steps {elapsed_precise} (eta {eta})",
    )?);
    let mut frames = a.gif.as_ref().map(|_| Frames::new(total, 40));
    let x0 = generate_with(&model, &plan.request, &mut |p| {
        bar.inc(1);
        frames.as_mut().map_or(Ok(()), |f| f.record(&p))
    })?;
    bar.finish_and_clear();
    let secs = started.elapsed().as_secs_f64();
    let out = (a.out.clone()).unwrap_or_else(|| format!("samples/class-{c}_w{w}.png").into());
    viz::save_grid(&x0, per_row, a.scale, &out)
        .with_context(|| format!("--out {}", out.display()))?;
    println!(
        "wrote {} ({n} samples, {} {total} steps, w = {w}, {secs:.1} s) from {}",
        out.display(),
        spec.kind,
        ckpt_path.display()
    );
    let classes = plan.request.labels.classes();
    if let Some(dir) = &a.each {
        viz::write_each(&x0, classes, &model.card().data.class_names, dir)
            .with_context(|| format!("--each {}", dir.display()))?;
        println!("wrote {n} PNGs into {}", dir.display());
    }
    if let Some(npz) = &a.npz {
        viz::write_npz(&x0, classes, npz).with_context(|| format!("--npz {}", npz.display()))?;
        let what = if classes.is_some() { " and labels" } else { "" };
        println!("wrote {} ({n} samples{what})", npz.display());
    }
    if let (Some(gif), Some(f)) = (&a.gif, frames) {
        let frames = (f.into_tensors()?.iter())
            .map(|grid| viz::grid_image(grid, per_row, 2))
            .collect::<std::result::Result<Vec<_>, _>>()?;
        let written = viz::save_gif_themed(&frames, 80, gif, a.gif_theme)
            .with_context(|| format!("--gif {}", gif.display()))?;
        for path in written {
            println!("wrote {} ({} frames)", path.display(), frames.len());
        }
    }
    Ok(())
}

/// Options of `ddpm noise`.
#[derive(Debug, Args)]
pub struct NoiseArgs {
    /// First test-split image to show.
    #[arg(long, default_value_t = 0)]
    index: usize,
    /// How many consecutive images (one row each).
    #[arg(long, default_value_t = 4)]
    rows: usize,
    /// Timesteps to show, comma-separated (each in 0..T).
    #[arg(long, value_delimiter = ',', default_value = "0,50,100,200,400,999")]
    t: Vec<usize>,
    /// β schedule.
    #[arg(long, value_enum, default_value_t = BetaKind::Linear)]
    schedule: BetaKind,
    /// Diffusion steps T.
    #[arg(long, default_value_t = 1000)]
    timesteps: usize,
    /// Dataset: mnist, fashion-mnist or folder:PATH (folder-gray:PATH, folder-rgb:PATH).
    #[arg(long, default_value = "mnist")]
    dataset: DatasetKind,
    /// Folder with the IDX files.
    #[arg(long)]
    data_dir: Option<PathBuf>,
    /// Seed of the noise.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Pixel scale.
    #[arg(long, default_value_t = 4)]
    scale: usize,
    /// Output PNG.
    #[arg(long, default_value = "noise.png")]
    out: PathBuf,
}

pub fn noise(a: NoiseArgs) -> Result<()> {
    let schedule = ScheduleConfig::new(a.schedule.schedule(), a.timesteps)
        .build()
        .context("--schedule/--timesteps")?;
    if let Some(&bad) = a.t.iter().find(|&&t| t >= a.timesteps) {
        bail!("--t {bad} is outside 0..{} (T = --timesteps)", a.timesteps);
    }
    if a.rows == 0 || a.t.is_empty() {
        bail!("--rows and --t must be non-empty");
    }
    let end = a.index.checked_add(a.rows);
    viz::grid_size(a.rows.saturating_mul(a.t.len()), a.t.len(), 28, 28, a.scale)
        .context("--scale/--rows/--t")?;
    let ds = crate::load(&a.dataset, a.data_dir.as_deref(), Split::Test, (28, 28))?;
    if end.is_none_or(|end| end > ds.len()) {
        bail!(
            "--index {} + --rows {} is past the {} test images",
            a.index,
            a.rows,
            ds.len()
        );
    }
    let dev = candle_core::Device::Cpu;
    let indices: Vec<usize> = (a.index..a.index + a.rows).collect();
    let batch = ddpm_data::Batcher::batch(&ddpm_data::TensorBatcher::new(&ds, &dev)?, &indices)?;
    let (r, k) = (a.rows, a.t.len());
    let xt = ddpm_pipeline::forward_process(&schedule, &batch.images, &a.t, a.seed)?;
    viz::save_grid(&xt, k, a.scale, &a.out)
        .with_context(|| format!("--out {}", a.out.display()))?;
    let ac = schedule.alphas_cumprod();
    let desc: Vec<String> =
        a.t.iter()
            .map(|&t| format!("t={t} (√ᾱ={:.3})", ac[t].sqrt()))
            .collect();
    println!(
        "wrote {}: rows = test images {}..{}, columns = {}",
        a.out.display(),
        a.index,
        a.index + r,
        desc.join(", ")
    );
    Ok(())
}
