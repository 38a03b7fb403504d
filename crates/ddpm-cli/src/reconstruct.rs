//! `ddpm reconstruct`: noise real test images to each t and denoise them back
//! ([`ddpm_pipeline::reconstruct`]), optionally as another class.

use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use clap::Args;
use ddpm_data::{Batcher, Dataset, DatasetKind, Split, TensorBatcher};
use ddpm_pipeline::{reconstruct, ReconstructOptions};
use ddpm_train::viz;

/// Options of `ddpm reconstruct`.
#[derive(Debug, Args)]
#[command(
    after_help = "Each row is one test image: the original, then its reconstruction from each --t. \
    Small t keeps the digit; t near T leaves almost nothing of it, and the model draws a fresh one. \
    With --as-class C the denoising is guided towards class C (SDEdit-style editing). \
    Guidance convention: eps = (1+w)*eps(x,t,c) - w*eps(x,t,null); w = 0 is no guidance."
)]
pub struct ReconstructArgs {
    #[command(flatten)]
    model: crate::ModelArgs,
    /// Test images by index, comma-separated (default: the first of each class).
    #[arg(long, value_delimiter = ',', conflicts_with = "count")]
    index: Vec<usize>,
    /// The first N test images instead of one per class.
    #[arg(long)]
    count: Option<usize>,
    #[command(flatten)]
    what: ReconstructOptions,
    /// Dataset the test images come from (default: the model's own).
    #[arg(long)]
    dataset: Option<DatasetKind>,
    /// Folder with the IDX files.
    #[arg(long)]
    data_dir: Option<PathBuf>,
    /// Pixel scale.
    #[arg(long, default_value_t = 3)]
    scale: usize,
    /// Output PNG.
    #[arg(long, default_value = "reconstruct.png")]
    out: PathBuf,
}

/// Runs `ddpm reconstruct`.
pub fn run(a: ReconstructArgs) -> Result<()> {
    if a.scale == 0 || a.scale > 16 {
        bail!("--scale {}: use 1 to 16", a.scale);
    }
    if let Some(ckpt) = &a.model.opts.checkpoint {
        crate::refuse_overwrite("--out", &a.out, &[("--checkpoint", ckpt)])?;
    }
    let (model, _, device) = a.model.load()?;
    let request = a.what.resolve(&model)?;
    let kind = match &a.dataset {
        Some(k) => k.clone(),
        None => model.card().data.dataset.parse().map_err(|e: String| {
            anyhow::anyhow!(
                "the model's dataset `{}`: {e}; pass --dataset",
                model.card().data.dataset
            )
        })?,
    };
    let (_, h, w) = model.image_dims();
    let ds = crate::load(
        &kind,
        a.data_dir.as_deref(),
        Split::Test,
        (h as u32, w as u32),
    )?;
    let indices = pick(&a, &ds)?;
    let batch = TensorBatcher::new(&ds, &device)?.batch(&indices)?;
    let labels: Option<Vec<u32>> = model
        .is_conditional()
        .then(|| batch.labels.to_vec1::<u32>())
        .transpose()?;
    let started = std::time::Instant::now();
    let rec = reconstruct(&model, &batch.images, labels.as_deref(), &request)?;
    let secs = started.elapsed().as_secs_f64();
    let names = ds.class_names();
    let cols = 1 + rec.rows.len();
    let grid = rec.grid()?;
    let mut rows = Vec::new();
    for (r, &i) in indices.iter().enumerate() {
        let label = labels
            .as_ref()
            .and_then(|l| names.get(l[r] as usize))
            .map_or(format!("#{i}"), |n| format!("#{i} {n}"));
        let row = grid.narrow(0, r * cols, cols)?;
        rows.push((label, viz::grid_image(&row, cols, a.scale)?));
    }
    viz::write_png(&viz::labelled_rows(&rows), &a.out)
        .with_context(|| format!("--out {}", a.out.display()))?;
    let target = match request.as_class {
        Some(c) => format!(
            " as class {}",
            names.get(c as usize).map_or(c.to_string(), |n| n.clone())
        ),
        None => String::new(),
    };
    println!(
        "wrote {}: {} test images{target}, columns = original, then t = {:?} ({}, w = {}, {secs:.1} s)",
        a.out.display(),
        indices.len(),
        request.timesteps,
        request.sampler,
        request.guidance
    );
    println!("\n| t | √ᾱ_t | steps | mse | psnr dB |\n|---|---|---|---|---|");
    for r in &rec.rows {
        println!(
            "| {} | {:.3} | {} | {:.4} | {:.2} |",
            r.t, r.signal, r.steps, r.error.mse, r.error.psnr_db
        );
    }
    Ok(())
}

/// The test images to reconstruct: `--index`, the first `--count`, or the first of each class.
fn pick(a: &ReconstructArgs, ds: &ddpm_data::ImageDataset) -> Result<Vec<usize>> {
    let n = ds.len();
    let indices: Vec<usize> = if !a.index.is_empty() {
        a.index.clone()
    } else if let Some(c) = a.count {
        (0..c).collect()
    } else {
        ds.first_of_each_class()
    };
    if indices.is_empty() || indices.len() > 100 {
        bail!(
            "reconstruct between 1 and 100 images (got {}); use --index or --count",
            indices.len()
        );
    }
    if let Some(&bad) = indices.iter().find(|&&i| i >= n) {
        bail!("--index {bad} is past the {n} test images");
    }
    Ok(indices)
}
