//! `ddpm sample` and `ddpm noise`.

use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use clap::Args;
use ddpm_core::{NoiseSchedule, PosteriorVariance};
use ddpm_data::{Dataset, DatasetKind, Split};
use ddpm_pipeline::{generate_with, Frames, Labels, Model, Request, SamplerKind, SamplerSpec};
use ddpm_sampler::Spacing;
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
    /// Class to draw: an index (7), a class name, or `all` (one row per class).
    #[arg(long, default_value = "all")]
    class: String,
    /// Guidance weight w: eps = (1+w)·eps(x,t,c) − w·eps(x,t,∅). 0 = no guidance;
    /// diffusers' guidance_scale = 1 + w.
    #[arg(long, default_value_t = 3.0, allow_negative_numbers = true)]
    guidance: f64,
    /// Guidance sweep: sample the same noise at each of these weights (comma-separated) and
    /// write the grids side by side into --out, each titled with its w.
    #[arg(long, value_delimiter = ',', allow_negative_numbers = true, conflicts_with_all = ["gif", "each", "npz"])]
    sweep: Vec<f64>,
    /// Samples (per class with --class all).
    #[arg(long, default_value_t = 16)]
    n: usize,
    /// Samples denoised together (default: 128 on the CPU, where guidance makes that a
    /// forward batch of 256, the size the forward benchmark runs at; 1024 on CUDA). The
    /// deterministic samplers (dpm++, ddim with --eta 0) draw the same digits whatever the
    /// batch; the stochastic ones draw their step noise batch by batch.
    #[arg(long)]
    batch: Option<usize>,
    /// Sampling steps for ddim and dpm++ (at most the model's T).
    #[arg(long, default_value_t = 20)]
    steps: usize,
    /// Sampler. The default, DPM-Solver++(2M) in 20 steps, draws the same digits as DDIM in 50
    /// steps from the same seed, in 40 % of the time.
    #[arg(long, value_enum, default_value_t = SamplerKind::DpmPp)]
    sampler: SamplerKind,
    /// Timestep spacing of ddim and dpm++: leading, trailing or linspace.
    #[arg(long, value_enum, default_value_t = Spacing::Leading)]
    spacing: Spacing,
    /// DDIM stochasticity η (0: deterministic, 1: DDPM-like).
    #[arg(long, default_value_t = 0.0)]
    eta: f64,
    /// Seed of the noise: the same seed gives the same images on CPU and GPU.
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// Output PNG grid (default: samples/class-{class}_w{w}.png).
    #[arg(long)]
    out: Option<PathBuf>,
    /// Pixel scale of the grid (1: raw 28×28 pixels).
    #[arg(long, default_value_t = 4)]
    scale: usize,
    /// Also write one PNG per sample into DIR, named with its index and class, at the model's
    /// native size whatever --scale is (28×28 grayscale for MNIST), as FID tools and
    /// classifiers expect.
    #[arg(long)]
    each: Option<PathBuf>,
    /// Also write all samples and their labels as one .npz (arr_0: uint8 [N, H, W, C];
    /// arr_1: int64 labels), the format diffusion evaluators read.
    #[arg(long)]
    npz: Option<PathBuf>,
    /// Also write the reverse-diffusion animation as a GIF.
    #[arg(long)]
    gif: Option<PathBuf>,
    /// Colours of the GIF: dark (light digits on black, as MNIST is), light (inverted, for a
    /// light page), or both (two files, NAME-light.gif and NAME-dark.gif, e.g. for a README's
    /// <picture> with prefers-color-scheme).
    #[arg(long, value_enum, default_value_t = viz::Themes::Dark, requires = "gif")]
    gif_theme: viz::Themes,
    /// Do not clip the predicted x0 to [-1, 1].
    #[arg(long)]
    no_clip: bool,
}

/// Resolves `--class` against the model's classes: `Ok(None)` for `all`.
fn parse_class(arg: &str, model: &Model) -> Result<Option<u32>> {
    if arg == "all" {
        return Ok(None);
    }
    if !model.is_conditional() {
        bail!("--class {arg}: this checkpoint is an unconditional model; leave --class out (or use --class all)");
    }
    Ok(Some(
        model
            .class(arg)
            .map_err(|e| anyhow::anyhow!("--class: {e}, or `all`"))?,
    ))
}

pub fn run(a: SampleArgs) -> Result<()> {
    if a.n == 0 {
        bail!("--n 0: ask for at least one sample");
    }
    if a.sweep.iter().any(|w| !w.is_finite()) {
        bail!(
            "--sweep {:?}: the guidance weights must be finite numbers",
            a.sweep
        );
    }
    if !a.guidance.is_finite() {
        bail!(
            "--guidance {}: the guidance weight must be a finite number",
            a.guidance
        );
    }
    let (model, ckpt_path, device) = a.model.load()?;
    let card = model.card().clone();
    let conditional = model.is_conditional();
    let class = parse_class(&a.class, &model)?;
    let t_total = model.schedule().num_train_timesteps();
    if a.sampler != SamplerKind::Ddpm && a.steps > t_total {
        bail!("--steps {} is above the model's T = {t_total}", a.steps);
    }
    // Checked before anything is allocated from --n, --batch and --scale.
    let n_total = match (conditional, class) {
        (true, None) => card.model.num_classes.checked_mul(a.n),
        _ => Some(a.n),
    }
    .context("--n: more samples than this machine can count")?;
    let batch = a.batch.unwrap_or(if device.is_cpu() { 128 } else { 1024 });
    if batch == 0 {
        bail!("--batch 0: denoise at least one sample at a time");
    }
    ddpm_pipeline::memory::check_sampling(
        &card,
        n_total,
        batch.min(n_total),
        a.guidance != 0.0 || !a.sweep.is_empty(),
        a.scale,
        a.gif.is_some(),
        device.is_cpu(),
    )?;
    // Labels: one row per class, or n of one class, or none (unconditional).
    let (labels, per_row) = match (conditional, class) {
        (false, _) => (Labels::Unconditional(a.n), a.n.min(8)),
        (true, Some(c)) => (Labels::one(c, a.n), a.n.min(8)),
        (true, None) => (Labels::rows(card.model.num_classes, a.n), a.n),
    };
    let n = labels.len();
    let w = if conditional { a.guidance } else { 0.0 };
    if !conditional && a.guidance != 0.0 {
        tracing::warn!("the model is unconditional: --guidance is ignored");
    }
    let spec = SamplerSpec {
        kind: a.sampler,
        steps: a.steps,
        eta: a.eta,
        spacing: a.spacing,
        clip_x0: !a.no_clip,
        variance: PosteriorVariance::BetaTilde,
    };
    let request = |guidance: f64| Request {
        labels: labels.clone(),
        guidance,
        seed: a.seed,
        sampler: spec,
        batch,
    };
    if !a.sweep.is_empty() {
        if !conditional {
            bail!("--sweep: this checkpoint is an unconditional model; guidance needs classes");
        }
        let mut panels = Vec::new();
        let started = std::time::Instant::now();
        for &sw in &a.sweep {
            let x0 = generate_with(&model, &request(sw), &mut |_| Ok(()))?;
            panels.push((format!("W = {sw}"), viz::grid_image(&x0, per_row, a.scale)?));
        }
        let out = a.out.clone().unwrap_or_else(|| {
            let c = class.map_or("all".to_string(), |c| c.to_string());
            PathBuf::from(format!("samples/class-{c}_sweep.png"))
        });
        viz::save_panels(&panels, &out).with_context(|| format!("--out {}", out.display()))?;
        println!(
            "wrote {} (w = {:?}, {n} samples each, same noise, {:.1} s) from {}",
            out.display(),
            a.sweep,
            started.elapsed().as_secs_f64(),
            ckpt_path.display()
        );
        return Ok(());
    }
    let total = spec.num_steps(t_total);
    let bar = ProgressBar::new((total * n.div_ceil(batch)) as u64);
    bar.set_style(ProgressStyle::with_template(
        "sampling [{bar:30}] {pos}/{len} steps {elapsed_precise} (eta {eta})",
    )?);
    let mut frames = a.gif.as_ref().map(|_| Frames::new(total, 40));
    let started = std::time::Instant::now();
    let x0 = generate_with(&model, &request(w), &mut |p| {
        bar.inc(1);
        frames.as_mut().map_or(Ok(()), |f| f.record(&p))
    })?;
    bar.finish_and_clear();
    let frames = match frames {
        Some(f) => f
            .into_tensors()?
            .iter()
            .map(|grid| viz::grid_image(grid, per_row, 2))
            .collect::<std::result::Result<Vec<_>, _>>()?,
        None => Vec::new(),
    };
    let secs = started.elapsed().as_secs_f64();
    let out = a.out.clone().unwrap_or_else(|| {
        let c = class.map_or("all".to_string(), |c| c.to_string());
        PathBuf::from(format!("samples/class-{c}_w{w}.png"))
    });
    viz::save_grid(&x0, per_row, a.scale, &out)
        .with_context(|| format!("--out {}", out.display()))?;
    println!(
        "wrote {} ({n} samples, {} {total} steps, w = {w}, {secs:.1} s) from {}",
        out.display(),
        a.sampler,
        ckpt_path.display()
    );
    let classes = labels.classes();
    if let Some(dir) = &a.each {
        viz::write_each(&x0, classes, &card.data.class_names, dir)
            .with_context(|| format!("--each {}", dir.display()))?;
        println!("wrote {n} PNGs into {}", dir.display());
    }
    if let Some(npz) = &a.npz {
        viz::write_npz(&x0, classes, npz).with_context(|| format!("--npz {}", npz.display()))?;
        println!(
            "wrote {} ({n} samples{})",
            npz.display(),
            if classes.is_some() { " and labels" } else { "" }
        );
    }
    if let Some(gif) = &a.gif {
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
    /// Dataset: mnist, fashion-mnist or folder:PATH.
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
    let ds = ddpm_data::load_dataset(
        &a.dataset,
        crate::data_dir(&a.dataset, a.data_dir.as_deref()).as_deref(),
        Split::Test,
        (28, 28),
    )
    .with_context(|| format!("loading --dataset {}", a.dataset))?;
    if a.index + a.rows > ds.len() {
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
