//! `ddpm eval` (sample-quality metrics across guidance weights) and `ddpm train-classifier`.

use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{Context, Result};
use clap::Args;
use ddpm_data::DatasetKind;
use ddpm_eval::{merge_reports, Classifier, ClassifierTrainConfig, Reference, Report};
use ddpm_pipeline::{evaluate, EvalRequest, Scorer};
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
    #[command(flatten)]
    request: EvalRequest,
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
    /// Draw the steps-versus-quality study from the reports in DIR/*/report.json (one
    /// `ddpm eval --out` per sampler, spacing and step count, e.g. bench/steps_study.sh's) into
    /// --out: steps_table.md and `fid_vs_calls_w<W>.png` per guidance weight, sampling nothing.
    #[arg(long, value_name = "DIR")]
    steps_table: Option<PathBuf>,
}

/// Runs `ddpm eval`.
pub fn run(a: EvalArgs) -> Result<()> {
    crate::out_folder("--out", &a.out)?;
    if let Some(dir) = &a.steps_table {
        let reports = ddpm_eval::steps::read_dir_reports(dir)
            .with_context(|| format!("--steps-table {}", dir.display()))?;
        let points = ddpm_eval::steps::points(&reports);
        let written = ddpm_eval::steps::write_study(&points, &a.out)
            .with_context(|| format!("--out {}", a.out.display()))?;
        print!("{}", ddpm_eval::steps::table(&points));
        for f in written {
            println!("wrote {}", f.display());
        }
        return Ok(());
    }
    let outputs = ["report.json", "fid_vs_is.png", "accuracy_vs_w.png"].map(|f| a.out.join(f));
    for written in &outputs {
        for report in &a.replot {
            crate::refuse_overwrite("--out", written, &[("--replot", report)])?;
        }
    }
    if !a.replot.is_empty() {
        let report = merge_reports(&a.replot).context("--replot")?;
        return write_outputs(&report, &a.out);
    }
    a.request.validate()?;
    let (model, ckpt, device) = a.model.load()?;
    let clf_path = a.classifier.clone().unwrap_or_else(default_classifier);
    let clf_path = std::fs::canonicalize(&clf_path).unwrap_or(clf_path);
    let (clf, info) = Classifier::load(&clf_path, &device)?;
    let data_dir = crate::data_dir(&DatasetKind::Mnist, a.data_dir.as_deref());
    let (reference, floor) = Reference::mnist(&clf, data_dir.as_deref(), a.request.n, &device)
        .context(
            "loading MNIST (the test split is the reference, train digits the real-data floor)",
        )?;
    tracing::info!(
        fid_mnist = floor.fid_mnist,
        is = floor.is_mnist,
        "real-data floor (train vs test)"
    );
    let scorer = Scorer {
        classifier: &clf,
        info: &info,
        path: &clf_path,
        reference: &reference,
        floor: &floor,
    };
    // One bar per guidance weight, made when its first batch is done.
    let mut bar: Option<(f64, ProgressBar)> = None;
    let n = a.request.n as u64;
    let report = evaluate(
        &model,
        &ckpt,
        &a.request,
        &scorer,
        &mut |w, k| {
            if bar.as_ref().is_none_or(|(bw, _)| *bw != w) {
                let b = ProgressBar::new(n);
                if let Ok(style) = ProgressStyle::with_template(&format!(
                "w = {w:<4} [{{bar:30}}] {{pos}}/{{len}} samples {{elapsed_precise}} (eta {{eta}})"
            )) {
                    b.set_style(style);
                }
                bar = Some((w, b));
            }
            if let Some((_, b)) = &bar {
                b.inc(k as u64);
                if b.position() >= n {
                    b.finish_and_clear();
                }
            }
        },
        &mut |row| {
            tracing::info!(
                w = row.w,
                fid_mnist = row.metrics.fid_mnist,
                is = row.metrics.is_mnist,
                seconds = row.sampling_seconds,
                "evaluated"
            )
        },
    )
    .with_context(|| {
        format!(
            "evaluating --checkpoint {} with --classifier {}",
            ckpt.display(),
            clf_path.display()
        )
    })?;
    write_outputs(&report, &a.out)
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
    #[command(flatten)]
    config: ClassifierTrainConfig,
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
    let data_dir = crate::data_dir(&DatasetKind::Mnist, a.data_dir.as_deref());
    let (train, test) = ddpm_eval::mnist_splits(data_dir.as_deref()).context("loading MNIST")?;
    let started = Instant::now();
    let (varmap, _, info) =
        ddpm_eval::train_classifier(&train, &test, &a.config, &device, |e, loss, secs| {
            tracing::info!(epoch = e + 1, loss, seconds = secs, "classifier epoch");
        })?;
    ddpm_eval::save_classifier(&varmap, &info, &a.out)
        .with_context(|| format!("--out {}", a.out.display()))?;
    println!(
        "wrote {}: test accuracy {:.2} % after {} epochs ({:.0} s)",
        a.out.display(),
        100.0 * info.test_accuracy,
        a.config.epochs,
        started.elapsed().as_secs_f64()
    );
    Ok(())
}
