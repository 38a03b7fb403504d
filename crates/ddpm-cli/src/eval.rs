//! `ddpm eval` (sample-quality metrics across guidance weights) and `ddpm train-classifier`.

use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{bail, Context, Result};
use clap::Args;
use ddpm_data::{load_dataset, DatasetKind, Split};
use ddpm_eval::{merge_reports, Classifier, ClassifierTrainConfig, Reference, Report};
use ddpm_pipeline::{generate_with, Labels, Request, SamplerKind, SamplerSpec};
use indicatif::{ProgressBar, ProgressStyle};

use crate::DeviceArg;

/// The shipped classifier, found from the workspace or the current directory.
fn default_classifier() -> PathBuf {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../..");
    let in_tree = root.join(ddpm_eval::SHIPPED_CLASSIFIER);
    if in_tree.exists() {
        in_tree
    } else {
        PathBuf::from(ddpm_eval::SHIPPED_CLASSIFIER)
    }
}

/// Options of `ddpm eval`.
#[derive(Debug, Args)]
#[command(
    after_help = "Guidance convention: eps = (1+w)*eps(x,t,c) - w*eps(x,t,null); w = 0 is the plain \
    conditional model. fid_mnist is a Fréchet distance in the features of an MNIST classifier, not \
    Inception: compare it only with other fid_mnist figures and with the real-data floor printed beside it."
)]
pub struct EvalArgs {
    #[command(flatten)]
    model: crate::ModelArgs,
    /// Samples per guidance weight (classes balanced).
    #[arg(long, default_value_t = 10_000)]
    n: usize,
    /// Guidance weights w to evaluate, comma-separated.
    #[arg(
        long,
        default_value = "0,0.5,1,2,3,5",
        value_delimiter = ',',
        allow_negative_numbers = true
    )]
    guidance: Vec<f64>,
    /// Sampling steps.
    #[arg(long, default_value_t = 50)]
    steps: usize,
    /// Sampler.
    #[arg(long, value_enum, default_value_t = SamplerKind::Ddim)]
    sampler: SamplerKind,
    /// Samples generated per batch.
    #[arg(long, default_value_t = 500)]
    batch: usize,
    /// Seed of the sampling noise (the same for every w, so rows differ only by w).
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// Classifier weights (default: assets/mnist-classifier.safetensors).
    #[arg(long)]
    classifier: Option<PathBuf>,
    /// Folder with the MNIST IDX files (else $DDPM_DATA_DIR, then assets/mnist).
    #[arg(long)]
    data_dir: Option<PathBuf>,
    /// Where to write report.json, fid_vs_is.png and accuracy_vs_w.png.
    #[arg(long, default_value = "runs/eval")]
    out: PathBuf,
    /// Redraw the table and plots from earlier report.json files into --out, sampling nothing.
    /// Several reports (comma-separated) of the same checkpoint, --n, --steps and --sampler are
    /// merged into one, rows sorted by w (e.g. guidance weights evaluated in separate runs).
    #[arg(long, value_delimiter = ',')]
    replot: Vec<PathBuf>,
}

/// Runs `ddpm eval`.
pub fn run(a: EvalArgs) -> Result<()> {
    if !a.replot.is_empty() {
        let report = merge_reports(&a.replot).context("--replot")?;
        return write_outputs(&report, &a.out);
    }
    if a.n < 2 {
        bail!("--n {}: the covariance needs at least 2 samples", a.n);
    }
    if a.batch == 0 {
        bail!("--batch 0: use at least 1");
    }
    if a.guidance.is_empty() || a.guidance.iter().any(|w| !w.is_finite()) {
        bail!("--guidance: give finite weights, e.g. 0,1,3");
    }
    let (model, ckpt, device) = a.model.load()?;
    let card = model.card().clone();
    ddpm_pipeline::memory::check_sampling(
        &card,
        a.n,
        a.batch.min(a.n),
        true,
        1,
        false,
        device.is_cpu(),
    )?;
    let clf_path = a.classifier.clone().unwrap_or_else(default_classifier);
    let clf_path = std::fs::canonicalize(&clf_path).unwrap_or(clf_path);
    let (clf, info) = Classifier::load(&clf_path, &device)?;
    let k = card.model.num_classes;
    let d = &card.data;
    clf.check_generator(d.channels, d.height, d.width, k)
        .with_context(|| {
            format!(
                "--checkpoint {} with --classifier {}",
                ckpt.display(),
                clf_path.display()
            )
        })?;
    let data_dir = crate::data_dir(&DatasetKind::Mnist, a.data_dir.as_deref());
    let (reference, floor) = Reference::mnist(&clf, data_dir.as_deref(), a.n, &device).context(
        "loading MNIST (the test split is the reference, train digits the real-data floor)",
    )?;
    tracing::info!(
        fid_mnist = floor.fid_mnist,
        is = floor.is_mnist,
        "real-data floor (train vs test)"
    );

    let weights: Vec<f64> = if k == 0 {
        vec![0.0]
    } else {
        a.guidance.clone()
    };
    let labels = if k > 0 {
        Labels::cycle(k, a.n)
    } else {
        Labels::Unconditional(a.n)
    };
    let spec = SamplerSpec::new(a.sampler).with_steps(a.steps);
    let mut generate = |wt: f64| -> std::result::Result<candle_core::Tensor, ddpm_eval::EvalError> {
        let bar = ProgressBar::new(a.n as u64);
        if let Ok(style) = ProgressStyle::with_template(&format!(
            "w = {wt:<4} [{{bar:30}}] {{pos}}/{{len}} samples {{elapsed_precise}} (eta {{eta}})"
        )) {
            bar.set_style(style);
        }
        let request = Request {
            labels: labels.clone(),
            guidance: wt,
            seed: a.seed,
            sampler: spec,
            batch: a.batch,
        };
        let x0 = generate_with(&model, &request, &mut |p| {
            if p.step.index + 1 == p.step.total {
                bar.inc(p.step.sample.dim(0)? as u64);
            }
            Ok(())
        })
        .map_err(|e| ddpm_eval::EvalError::Sampling {
            w: wt,
            source: Box::new(e),
        })?;
        bar.finish_and_clear();
        Ok(x0)
    };
    let rows = ddpm_eval::sweep(
        &clf,
        &reference,
        &weights,
        labels.classes(),
        &mut generate,
        &mut |row| {
            tracing::info!(
                w = row.w,
                fid_mnist = row.metrics.fid_mnist,
                is = row.metrics.is_mnist,
                seconds = row.sampling_seconds,
                "evaluated"
            )
        },
    )?;
    let report = Report {
        checkpoint: ckpt.display().to_string(),
        card: serde_json::to_value(&card).context("the model card as JSON")?,
        n: a.n,
        steps: a.steps,
        sampler: a.sampler.to_string(),
        classifier: clf_path.display().to_string(),
        classifier_test_accuracy: info.test_accuracy,
        real_data_floor: floor,
        rows,
    };
    write_outputs(&report, &a.out)?;
    Ok(())
}

fn write_outputs(r: &Report, out: &Path) -> Result<()> {
    let written = r
        .write(out)
        .with_context(|| format!("--out {}", out.display()))?;
    println!("{}", r.table());
    let names: Vec<String> = written.iter().map(|p| p.display().to_string()).collect();
    println!("wrote {}", names.join(", "));
    Ok(())
}

/// Options of `ddpm train-classifier`.
#[derive(Debug, Args)]
pub struct TrainClassifierArgs {
    /// Epochs.
    #[arg(short = 'e', long, default_value_t = 4)]
    epochs: usize,
    /// Batch size.
    #[arg(short = 'b', long, default_value_t = 128)]
    batch_size: usize,
    /// Peak learning rate.
    #[arg(short = 'l', long, default_value_t = 2e-3)]
    lr: f64,
    /// Seed.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Folder with the MNIST IDX files (else $DDPM_DATA_DIR, then assets/mnist).
    #[arg(long)]
    data_dir: Option<PathBuf>,
    /// Where to write the weights.
    #[arg(long, default_value = "assets/mnist-classifier.safetensors")]
    out: PathBuf,
    /// Where to compute.
    #[arg(long, value_enum, default_value_t = DeviceArg::Cpu)]
    device: DeviceArg,
}

/// Runs `ddpm train-classifier`.
pub fn train_classifier(a: TrainClassifierArgs) -> Result<()> {
    let device = crate::device(a.device)?;
    let kind = DatasetKind::Mnist;
    let train = load_dataset(
        &kind,
        crate::data_dir(&kind, a.data_dir.as_deref()).as_deref(),
        Split::Train,
        (28, 28),
    )
    .context("loading the MNIST train split")?;
    let test = load_dataset(
        &kind,
        crate::data_dir(&kind, a.data_dir.as_deref()).as_deref(),
        Split::Test,
        (28, 28),
    )
    .context("loading the MNIST test split")?;
    let cfg = ClassifierTrainConfig {
        epochs: a.epochs,
        batch_size: a.batch_size,
        lr: a.lr,
        seed: a.seed,
        ..Default::default()
    };
    let started = Instant::now();
    let (varmap, _, info) =
        ddpm_eval::train_classifier(&train, &test, &cfg, &device, |e, loss, secs| {
            tracing::info!(epoch = e + 1, loss, seconds = secs, "classifier epoch");
        })?;
    ddpm_eval::save_classifier(&varmap, &info, &a.out)
        .with_context(|| format!("--out {}", a.out.display()))?;
    println!(
        "wrote {}: test accuracy {:.2} % after {} epochs ({:.0} s)",
        a.out.display(),
        100.0 * info.test_accuracy,
        a.epochs,
        started.elapsed().as_secs_f64()
    );
    Ok(())
}
