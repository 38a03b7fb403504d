//! `ddpm data preview`: a look at a dataset before training on it.

use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use candle_core::Device;
use clap::{Args, Subcommand};
use ddpm_data::{Batcher, Dataset, DatasetKind, Split, TensorBatcher};
use ddpm_train::viz;

/// `ddpm data …`.
#[derive(Debug, Subcommand)]
pub enum DataCommand {
    /// A grid of real images, one row per class, each row named with its class.
    Preview(PreviewArgs),
}

/// Options of `ddpm data preview`.
#[derive(Debug, Args)]
pub struct PreviewArgs {
    /// Dataset: mnist, fashion-mnist or an image folder (`folder:PATH`, one sub-folder per
    /// class; colour kept when the images have it, `folder-gray:PATH`/`folder-rgb:PATH` force
    /// one or three channels).
    #[arg(long, default_value = "mnist")]
    dataset: DatasetKind,
    /// Folder with the IDX files (else $DDPM_DATA_DIR, then the copy in assets/mnist).
    #[arg(long)]
    data_dir: Option<PathBuf>,
    /// Which split to show: train or test.
    #[arg(long, default_value = "train")]
    split: Split,
    /// Images per class (the first ones of each class in the split).
    #[arg(long, default_value_t = 10)]
    per_class: usize,
    /// Image size (height = width) for folder datasets.
    #[arg(long, default_value_t = 28)]
    image_size: u32,
    /// Pixel scale.
    #[arg(long, default_value_t = 2)]
    scale: usize,
    /// Output PNG.
    #[arg(long, default_value = "preview.png")]
    out: PathBuf,
}

/// Runs `ddpm data …`.
pub fn run(c: DataCommand) -> Result<()> {
    match c {
        DataCommand::Preview(a) => preview(a),
    }
}

fn preview(a: PreviewArgs) -> Result<()> {
    if a.per_class == 0 || a.per_class > 100 {
        bail!(
            "--per-class {}: show between 1 and 100 images a class",
            a.per_class
        );
    }
    if a.scale == 0 || a.scale > 16 {
        bail!("--scale {}: use 1 to 16", a.scale);
    }
    let size = (a.image_size, a.image_size);
    let ds = crate::load(&a.dataset, a.data_dir.as_deref(), a.split, size)?;
    if ds.is_empty() {
        bail!(
            "--dataset {}: the {} split has no images",
            a.dataset,
            a.split.name()
        );
    }
    let names = ds.class_names().to_vec();
    let by_class = ds.first_per_class(a.per_class);
    let batcher = TensorBatcher::new(&ds, &Device::Cpu)?;
    let mut rows = Vec::new();
    for (name, indices) in names.iter().zip(&by_class) {
        if indices.is_empty() {
            continue;
        }
        let batch = batcher.batch(indices)?;
        let row = viz::grid_image(&batch.images, a.per_class, a.scale)?;
        rows.push((format!("{name} ({})", indices.len()), row));
    }
    let img = viz::labelled_rows(&rows);
    viz::write_png(&img, &a.out).with_context(|| format!("--out {}", a.out.display()))?;
    println!(
        "wrote {} ({} classes of {}, {} split, up to {} each)",
        a.out.display(),
        rows.len(),
        a.dataset,
        a.split.name(),
        a.per_class
    );
    Ok(())
}
