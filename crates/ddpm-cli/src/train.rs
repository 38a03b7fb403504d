//! `ddpm train`.

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use anyhow::{bail, Context, Result};
use clap::Args;
use ddpm_data::{Dataset, DatasetKind, Split, TensorBatcher};
use ddpm_schedule::{BetaSchedule, ScheduleConfig};
use ddpm_train::{
    fit, DataInfo, EpochReport, FitData, FitOutcome, ModelCard, StepReport, TrainConfig,
    TrainObserver, Trainer,
};
use ddpm_unet::UNetConfig;
use indicatif::{ProgressBar, ProgressStyle};

use crate::DeviceArg;

/// Options of `ddpm train`.
#[derive(Debug, Args)]
pub struct TrainArgs {
    /// Epochs (passes over the training set).
    #[arg(short = 'e', long, default_value_t = 20)]
    epochs: u64,
    /// Peak learning rate (AdamW).
    #[arg(short = 'l', long, default_value_t = 2e-4)]
    lr: f64,
    /// Batch size.
    #[arg(short = 'b', long, default_value_t = 128)]
    batch_size: usize,
    /// Model preset: mnist (default model), small (trains on a CPU), tiny (tests).
    #[arg(long, default_value = "mnist", value_parser = ["mnist", "small", "tiny"])]
    model: String,
    /// β schedule.
    #[arg(long, default_value = "linear", value_parser = ["linear", "cosine", "sigmoid"])]
    schedule: String,
    /// Diffusion steps T.
    #[arg(long, default_value_t = 1000)]
    timesteps: usize,
    /// Probability of dropping the class label (classifier-free guidance); 0 with an
    /// unconditional model.
    #[arg(long, default_value_t = 0.1)]
    p_uncond: f64,
    /// Train an unconditional model (no class embedding).
    #[arg(long)]
    unconditional: bool,
    /// EMA decay of the weights used for sampling.
    #[arg(long, default_value_t = 0.999)]
    ema_decay: f64,
    /// Dataset: mnist, fashion-mnist or folder:PATH (PATH/CLASS/*.png).
    #[arg(long, default_value = "mnist")]
    dataset: DatasetKind,
    /// Folder with the IDX files (else $DDPM_DATA_DIR, then the copy in assets/mnist).
    #[arg(long)]
    data_dir: Option<PathBuf>,
    /// Image size (height = width) for folder datasets.
    #[arg(long, default_value_t = 28)]
    image_size: u32,
    /// Where to compute.
    #[arg(long, value_enum, default_value_t = DeviceArg::Cpu)]
    device: DeviceArg,
    /// Seed of weights, data order, noise and class dropout.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Output folder: checkpoint.safetensors, metrics.jsonl, loss.png, samples/.
    #[arg(long, default_value = "runs/default")]
    out: PathBuf,
    /// Continue the run in --out from its checkpoint (exactly; model, schedule and data
    /// options come from the checkpoint, --epochs and --max-steps may be raised).
    #[arg(long)]
    resume: bool,
    /// Stop after this many optimizer steps in total.
    #[arg(long)]
    max_steps: Option<u64>,
    /// Learning-rate warm-up steps.
    #[arg(long, default_value_t = 500)]
    warmup: u64,
    /// Keep the learning rate constant after warm-up (no cosine decay).
    #[arg(long)]
    no_cosine: bool,
    /// Sample grid every N epochs (0: never).
    #[arg(long, default_value_t = 1)]
    sample_every: u64,
    /// DDIM steps of the sample grids.
    #[arg(long, default_value_t = 50)]
    sample_steps: usize,
    /// Checkpoint every N steps as well as at epoch ends (0: epoch ends only).
    #[arg(long, default_value_t = 500)]
    checkpoint_every: u64,
    /// Also write a metrics line and redraw loss.png every N steps (0: epoch ends only).
    #[arg(long, default_value_t = 0)]
    log_every: u64,
    /// Test-split examples for the held-out loss (0: none).
    #[arg(long, default_value_t = 1024)]
    held_out: usize,
    /// Use only the first N training examples (quick experiments).
    #[arg(long)]
    limit: Option<usize>,
    /// Autocast: forward and backward of the U-Net in bf16 (convolutions, linear layers,
    /// attention products) with f32 weights, optimizer state, EMA and loss; GroupNorm and
    /// softmax stay f32. Needs --device cuda (candle's CPU matmul has no bf16).
    #[arg(long, value_parser = ["bf16"])]
    autocast: Option<String>,
}

struct Progress {
    bar: ProgressBar,
}

impl TrainObserver for Progress {
    fn on_start(&mut self, start: u64, total: u64) {
        self.bar.set_length(total);
        self.bar.set_position(start);
    }
    fn on_step(&mut self, r: &StepReport) {
        self.bar.set_position(r.step);
        self.bar.set_message(format!(
            "epoch {} loss {:.4} {:.1} img/s",
            r.epoch, r.loss, r.images_per_sec
        ));
    }
    fn on_epoch(&mut self, r: &EpochReport) {
        self.bar.println(format!(
            "epoch {} step {}: train loss {:.4}, held-out {}, {:.1} img/s{}",
            r.epoch,
            r.step,
            r.train_loss,
            r.held_out_loss.map_or("-".into(), |l| format!("{l:.4}")),
            r.images_per_sec,
            r.sample_grid
                .as_ref()
                .map_or(String::new(), |p| format!(", grid {}", p.display())),
        ));
    }
}

/// Flags whose value a resumed run takes from its checkpoint instead.
const FIXED_BY_CHECKPOINT: &[&str] = &[
    "lr",
    "batch_size",
    "model",
    "schedule",
    "timesteps",
    "p_uncond",
    "unconditional",
    "ema_decay",
    "dataset",
    "image_size",
    "seed",
    "warmup",
    "no_cosine",
    "sample_every",
    "sample_steps",
    "checkpoint_every",
    "log_every",
    "held_out",
    "autocast",
];

/// Runs `ddpm train`; `explicit` names the flags given on the command line.
pub fn run(a: TrainArgs, explicit: &[String]) -> Result<()> {
    let device = crate::device(a.device)?;
    if a.resume {
        let ignored: Vec<String> = explicit
            .iter()
            .filter(|id| FIXED_BY_CHECKPOINT.contains(&id.as_str()))
            .map(|id| format!("--{}", id.replace('_', "-")))
            .collect();
        if !ignored.is_empty() {
            tracing::warn!(
                "--resume continues the run exactly as it was started: {} {} taken from the \
                 checkpoint, not from the command line (only --epochs and --max-steps can change)",
                ignored.join(", "),
                if ignored.len() == 1 { "is" } else { "are" }
            );
        }
    }
    let ckpt = ddpm_train::checkpoint_path(&a.out);
    let mut preloaded = None;
    let mut trainer = if a.resume {
        let (epochs, max_steps) = (a.epochs, a.max_steps);
        Trainer::resume(&ckpt, &device, |c| {
            c.epochs = epochs;
            c.max_steps = max_steps;
        })
        .with_context(|| format!("--resume: cannot continue from {}", ckpt.display()))?
    } else {
        if ckpt.exists() {
            bail!(
                "{} already holds a checkpoint: pass --resume to continue it, or choose another --out",
                a.out.display()
            );
        }
        let mut model = UNetConfig::preset(&a.model).context("--model")?;
        let beta = BetaSchedule::from_name(&a.schedule).context("--schedule")?;
        let schedule = ScheduleConfig::new(beta, a.timesteps);
        schedule
            .build()
            .with_context(|| format!("--timesteps {} / --schedule {}", a.timesteps, a.schedule))?;
        let probe = load(&a, Split::Train)?;
        let (c, h, w) = probe.image_shape();
        model.in_channels = c;
        model.num_classes = if a.unconditional {
            0
        } else {
            probe.class_names().len()
        };
        let card = ModelCard {
            model,
            schedule,
            data: DataInfo {
                dataset: a.dataset.to_string(),
                channels: c,
                height: h,
                width: w,
                class_names: probe.class_names().to_vec(),
            },
        };
        preloaded = Some(probe);
        let config = TrainConfig {
            epochs: a.epochs,
            max_steps: a.max_steps,
            batch_size: a.batch_size,
            lr: a.lr,
            warmup_steps: a.warmup,
            cosine_decay: !a.no_cosine,
            p_uncond: if a.unconditional { 0.0 } else { a.p_uncond },
            ema_decay: a.ema_decay,
            seed: a.seed,
            sample_every: a.sample_every,
            sample_steps: a.sample_steps,
            checkpoint_every: a.checkpoint_every,
            held_out_examples: a.held_out,
            log_every: a.log_every,
            autocast: crate::autocast(a.autocast.as_deref(), &device)?,
            ..TrainConfig::default()
        };
        Trainer::new(card, config, &device).context("cannot set up training")?
    };
    let card = trainer.card().clone();
    let kind: DatasetKind = card.data.dataset.parse().map_err(anyhow::Error::msg)?;
    let size = (card.data.height as u32, card.data.width as u32);
    let data_dir = a.data_dir.as_deref();
    let mut train = match preloaded {
        Some(t) => t,
        None => ddpm_data::load_dataset(&kind, data_dir, Split::Train, size)
            .with_context(|| format!("loading the {kind} training split"))?,
    };
    if let Some(n) = a.limit {
        train = train.take(n);
    }
    let held_n = trainer.config().held_out_examples;
    let held_out = match ddpm_data::load_dataset(&kind, data_dir, Split::Test, size) {
        Ok(test) if held_n > 0 && !test.is_empty() => Some(test.take(held_n).to_tensors(&device)?),
        Ok(_) => None,
        Err(e) => {
            tracing::warn!("no held-out loss: {e}");
            None
        }
    };
    tracing::info!(
        dataset = %kind, examples = train.len(), params = ddpm_unet::parameter_count(&card.model)?,
        out = %a.out.display(), "starting"
    );
    let data = FitData {
        train: TensorBatcher::new(&train, &device)?,
        train_len: train.len(),
        held_out,
    };
    let stop = Arc::new(AtomicBool::new(false));
    {
        let stop = stop.clone();
        ctrlc::set_handler(move || {
            eprintln!("\nCtrl-C: finishing this step and saving a checkpoint…");
            stop.store(true, Ordering::SeqCst);
        })
        .context("cannot install the Ctrl-C handler")?;
    }
    let bar = ProgressBar::new(0);
    bar.set_style(
        ProgressStyle::with_template(
            "{elapsed_precise} [{bar:30}] {pos}/{len} steps, eta {eta} {msg}",
        )
        .context("progress bar template")?
        .progress_chars("=> "),
    );
    let mut progress = Progress { bar };
    let outcome = fit(&mut trainer, &data, &a.out, &mut progress, &stop)
        .with_context(|| format!("training into {}", a.out.display()))?;
    progress.bar.finish_and_clear();
    let what = match outcome {
        FitOutcome::Finished => "finished",
        FitOutcome::MaxSteps => "reached --max-steps",
        FitOutcome::Stopped => "stopped by Ctrl-C",
    };
    println!(
        "training {what} at step {}; checkpoint: {} (continue with --resume)",
        trainer.step(),
        ckpt.display()
    );
    Ok(())
}

fn load(a: &TrainArgs, split: Split) -> Result<ddpm_data::ImageDataset> {
    ddpm_data::load_dataset(
        &a.dataset,
        a.data_dir.as_deref(),
        split,
        (a.image_size, a.image_size),
    )
    .with_context(|| format!("loading --dataset {}", a.dataset))
}
