//! `ddpm train`.

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use anyhow::{bail, Context, Result};
use clap::Args;
use ddpm_core::Prediction;
use ddpm_data::{Dataset, DatasetKind, Split, TensorBatcher};
use ddpm_schedule::{BetaKind, ScheduleConfig};
use ddpm_train::budget::WallClock;
use ddpm_train::progress::PlainLines;
use ddpm_train::recipe::Recipe;
use ddpm_train::{
    fit_timed, BudgetConfig, DataInfo, EpochReport, FitData, FitOutcome, LossWeighting, ModelCard,
    RunLock, StepReport, TrainConfig, TrainObserver, Trainer,
};
use ddpm_unet::Preset;
use indicatif::{ProgressBar, ProgressStyle};

use crate::DeviceArg;

/// Options of `ddpm train`. Flags left out take their value from `--recipe`.
#[derive(Debug, Args)]
pub struct TrainArgs {
    /// Defaults for the flags left out: quick (the CPU default: a 30-minute budget) or full
    /// (the shipped model's recipe; the default on --device cuda).
    #[arg(long, value_enum)]
    recipe: Option<Recipe>,
    /// Wall-clock budget for the whole run (e.g. 15m, 30m, 1h30m, 2h; `off` for none): the run
    /// measures this machine, then fixes the step count so that it ends in time, grids and
    /// checkpoints included. Combines with --epochs/--max-steps: the first limit reached wins.
    /// Default: from --recipe (quick: 30m).
    #[arg(long, value_parser = parse_budget)]
    budget: Option<BudgetArg>,
    /// Epochs (passes over the training set). Default: from --recipe (quick 100, full 6).
    #[arg(short = 'e', long)]
    epochs: Option<u64>,
    /// Peak learning rate (AdamW). Default: from --recipe (1e-3). With --resume, continues the
    /// run at this rate instead (e.g. after it diverged).
    #[arg(short = 'l', long)]
    lr: Option<f64>,
    /// Batch size. Default: from --recipe (quick 32, full 256).
    #[arg(short = 'b', long)]
    batch_size: Option<usize>,
    /// Model preset: mnist (the shipped model's), small (trains on a CPU), tiny (tests).
    /// Default: from --recipe (quick small, full mnist).
    #[arg(long, value_enum)]
    model: Option<Preset>,
    /// β schedule.
    #[arg(long, value_enum, default_value_t = BetaKind::Linear)]
    schedule: BetaKind,
    /// Diffusion steps T.
    #[arg(long, default_value_t = 1000)]
    timesteps: usize,
    /// What the network predicts: epsilon (the noise) or v (√ᾱ·ε − √(1−ᾱ)·x0). Saved on the
    /// model card; sampling converts. Default: from --recipe.
    #[arg(long, value_enum)]
    prediction: Option<Prediction>,
    /// Per-timestep loss weights: uniform, min-snr (γ = 5) or min-snr-G. Default: from --recipe.
    #[arg(long)]
    loss_weighting: Option<String>,
    /// Probability of dropping the class label (classifier-free guidance); 0 with an
    /// unconditional model.
    #[arg(long, default_value_t = 0.1)]
    p_uncond: f64,
    /// Train an unconditional model (no class embedding).
    #[arg(long)]
    unconditional: bool,
    /// EMA decay of the weights used for sampling. Default: from --recipe (full 0.995); with a
    /// budget and no --ema-decay, fitted so that the EMA spans the last 25 % of the steps.
    #[arg(long)]
    ema_decay: Option<f64>,
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
    /// Continue the run in --out from its checkpoint (exactly; model, schedule, data and
    /// budget plan come from the checkpoint, --epochs and --max-steps may be raised).
    #[arg(long)]
    resume: bool,
    /// Stop after this many optimizer steps in total.
    #[arg(long)]
    max_steps: Option<u64>,
    /// Learning-rate warm-up steps. Default: from --recipe (full 200); with a budget and no
    /// --warmup, fitted to 5 % of the planned steps.
    #[arg(long)]
    warmup: Option<u64>,
    /// Keep the learning rate constant after warm-up (no cosine decay).
    #[arg(long)]
    no_cosine: bool,
    /// Sample grid every N epochs (0: never).
    #[arg(long, default_value_t = 1)]
    sample_every: u64,
    /// DDIM steps of the sample grids.
    #[arg(long, default_value_t = 50)]
    sample_steps: usize,
    /// Checkpoint every N steps as well as at epoch ends (0: epoch ends only). Default: from
    /// --recipe (quick 500, full 0).
    #[arg(long)]
    checkpoint_every: Option<u64>,
    /// Also write a metrics line and redraw loss.png every N steps (0: epoch ends only).
    /// Default: from --recipe (quick 400, full 100).
    #[arg(long)]
    log_every: Option<u64>,
    /// Test-split examples for the held-out loss (0: none).
    #[arg(long, default_value_t = 1024)]
    held_out: usize,
    /// Use only the first N training examples (quick experiments). Saved in the checkpoint:
    /// a resumed run trains on the same examples.
    #[arg(long)]
    limit: Option<usize>,
    /// When stderr is not a terminal (a log file, CI), the progress bar is hidden; print a
    /// plain progress line (step, loss, images/s, time left) every this many seconds instead
    /// (0: never).
    #[arg(long, default_value_t = 30.0)]
    progress_every: f64,
    /// Autocast: forward and backward of the U-Net in bf16 (convolutions, linear layers,
    /// attention products) with f32 weights, optimizer state, EMA and loss; GroupNorm and
    /// softmax stay f32. Needs --device cuda (candle's CPU matmul has no bf16). Only bf16:
    /// f16 training would need loss scaling.
    #[arg(long, value_enum)]
    autocast: Option<ddpm_unet::Autocast>,
}

/// `--budget`: a duration, or `off`.
#[derive(Debug, Clone, Copy)]
pub enum BudgetArg {
    /// No budget.
    Off,
    /// Seconds.
    Seconds(f64),
}

fn parse_budget(s: &str) -> std::result::Result<BudgetArg, String> {
    if s == "off" || s == "none" {
        return Ok(BudgetArg::Off);
    }
    ddpm_train::budget::parse_duration(s).map(BudgetArg::Seconds)
}

struct Progress {
    bar: ProgressBar,
    /// The budget's deadline, in seconds since `started`.
    deadline_s: Option<f64>,
    started: std::time::Instant,
    /// Without a terminal the bar is hidden: a plain line this often instead.
    plain: Option<PlainLines>,
}

impl TrainObserver for Progress {
    fn on_plan(&mut self, p: &ddpm_train::BudgetPlan) {
        let fmt = ddpm_train::budget::format_duration;
        self.bar.println(format!(
            "budget {}: {} steps planned ({:.2} s a step, {:.0} s a sample grid), predicted {}",
            fmt(p.budget_s),
            p.steps,
            p.costs.train_step_s,
            p.costs.grid_s,
            fmt(p.predicted_s)
        ));
    }
    fn on_start(&mut self, start: u64, total: u64) {
        self.bar.set_length(total);
        self.bar.set_position(start);
        if let Some(p) = &mut self.plain {
            p.start(total, self.started.elapsed().as_secs_f64());
        }
    }
    fn on_step(&mut self, r: &StepReport) {
        self.bar.set_position(r.step);
        let left = self.deadline_s.map_or(String::new(), |d| {
            let left = d - self.started.elapsed().as_secs_f64();
            if left >= 0.0 {
                format!(
                    ", budget left {}",
                    ddpm_train::budget::format_duration(left)
                )
            } else {
                format!(
                    ", {} over budget",
                    ddpm_train::budget::format_duration(-left)
                )
            }
        });
        if let Some(p) = &mut self.plain {
            if let Some(line) = p.line(r, self.started.elapsed().as_secs_f64(), &left) {
                eprintln!("{line}");
            }
        }
        self.bar.set_message(format!(
            "epoch {} loss {:.4} {:.1} img/s{left}",
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
    "recipe",
    "budget",
    "batch_size",
    "model",
    "schedule",
    "timesteps",
    "prediction",
    "loss_weighting",
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
    "limit",
    "autocast",
];

/// The recipe in force: `--recipe`, else quick on the CPU and full on CUDA.
fn recipe(a: &TrainArgs) -> Recipe {
    a.recipe
        .unwrap_or(Recipe::default_for(a.device == DeviceArg::Cpu))
}

/// Runs `ddpm train`; `explicit` names the flags given on the command line.
pub fn run(a: TrainArgs, explicit: &[String]) -> Result<()> {
    let process_start = std::time::Instant::now();
    if a.autocast == Some(ddpm_unet::Autocast::F16) {
        bail!(
            "--autocast f16: training autocasts to bf16 only (f16 would need loss scaling, which \
             the trainer does not do); use --autocast bf16 on --device cuda"
        );
    }
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
    if a.image_size == 0 || a.image_size as usize > ddpm_train::checkpoint::MAX_IMAGE_SIDE {
        bail!(
            "--image-size {}: give a side between 1 and {} pixels",
            a.image_size,
            ddpm_train::checkpoint::MAX_IMAGE_SIDE
        );
    }
    let ckpt = ddpm_train::checkpoint_path(&a.out);
    if a.resume && !ckpt.exists() {
        bail!(
            "--resume: {} holds no checkpoint ({} is missing); start a new run with the same \
             --out and without --resume",
            a.out.display(),
            ckpt.display()
        );
    }
    // Held for the whole run: a second run on this folder stops here, naming this one.
    let _lock = RunLock::acquire(&a.out).with_context(|| format!("--out {}", a.out.display()))?;
    let mut preloaded = None;
    let mut trainer = if a.resume {
        let overrides = ddpm_train::ResumeOverrides {
            epochs: a.epochs,
            max_steps: a.max_steps,
            lr: a.lr,
        };
        let (t, lr_change) = Trainer::resume_with(&ckpt, &device, &overrides)
            .with_context(|| format!("--resume: cannot continue from {}", ckpt.display()))?;
        if let Some((old, new)) = lr_change {
            tracing::warn!(
                "--lr {new}: the run continues with this peak learning rate instead of its \
                 {old} (the schedule's shape is kept); it is no longer the run it started as"
            );
        }
        println!(
            "ddpm train: resuming {} at step {}{}",
            ckpt.display(),
            t.step(),
            t.config()
                .budget_steps
                .map_or(String::new(), |n| format!(" of the budget's {n}"))
        );
        t
    } else {
        if ckpt.exists() {
            bail!(
                "{} already holds a checkpoint: pass --resume to continue it, or choose another --out",
                a.out.display()
            );
        }
        let r = recipe(&a);
        let v = r.values();
        let budget_s = match a.budget {
            Some(BudgetArg::Off) => None,
            Some(BudgetArg::Seconds(s)) => Some(s),
            None => v.budget,
        };
        println!(
            "{}",
            ddpm_train::recipe::announce(r, a.recipe.is_some(), budget_s)
        );
        let mut model = a.model.unwrap_or(v.model).config();
        let schedule = ScheduleConfig::new(a.schedule.schedule(), a.timesteps);
        schedule.build().with_context(|| {
            format!("--timesteps {} / --schedule {:?}", a.timesteps, a.schedule)
        })?;
        let prediction = a.prediction.unwrap_or(v.prediction);
        let loss_weighting = match a.loss_weighting.as_deref() {
            Some(w) => {
                LossWeighting::from_name(w).map_err(|e| anyhow::anyhow!("--loss-weighting {e}"))?
            }
            None => v.loss_weighting,
        };
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
            prediction,
        };
        preloaded = Some(probe);
        let fitted = BudgetConfig::fitted(0.0);
        let budget = budget_s.map(|seconds| BudgetConfig {
            seconds,
            warmup_fraction: fitted.warmup_fraction.filter(|_| a.warmup.is_none()),
            ema_horizon_fraction: fitted
                .ema_horizon_fraction
                .filter(|_| a.ema_decay.is_none()),
        });
        let config = TrainConfig {
            epochs: a.epochs.unwrap_or(v.epochs),
            max_steps: a.max_steps,
            batch_size: a.batch_size.unwrap_or(v.batch_size),
            lr: a.lr.unwrap_or(v.lr),
            warmup_steps: a.warmup.unwrap_or(v.warmup),
            cosine_decay: !a.no_cosine,
            p_uncond: if a.unconditional { 0.0 } else { a.p_uncond },
            ema_decay: a.ema_decay.unwrap_or(v.ema_decay),
            seed: a.seed,
            sample_every: a.sample_every,
            sample_steps: a.sample_steps,
            checkpoint_every: a.checkpoint_every.unwrap_or(v.checkpoint_every),
            held_out_examples: a.held_out,
            log_every: a.log_every.unwrap_or(v.log_every),
            autocast: crate::autocast(a.autocast, &device)?,
            loss_weighting,
            budget,
            train_limit: a.limit,
            ..TrainConfig::default()
        };
        if device.is_cpu() {
            ddpm_pipeline::memory::check_training(&card, config.batch_size)?;
        }
        Trainer::new(card, config, &device).context("cannot set up training")?
    };
    let card = trainer.card().clone();
    let kind: DatasetKind = card.data.dataset.parse().map_err(anyhow::Error::msg)?;
    let size = (card.data.height as u32, card.data.width as u32);
    let data_dir = crate::data_dir(&kind, a.data_dir.as_deref());
    let data_dir = data_dir.as_deref();
    let mut train = match preloaded {
        Some(t) => t,
        None => ddpm_data::load_dataset(&kind, data_dir, Split::Train, size)
            .with_context(|| format!("loading the {kind} training split"))?,
    };
    if let Some(n) = trainer.config().train_limit {
        train = train.take(n);
    }
    if train.is_empty() {
        bail!(
            "the {kind} training split has no examples{}: nothing to train on",
            data_dir.map_or(String::new(), |d| format!(" in {}", d.display()))
        );
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
    // The budget counts from the process start on a first run; a resumed run has already
    // spent the checkpoint's training time (its plan is fixed, so this only feeds the display).
    let resumed_s = if a.resume { trainer.elapsed_s() } else { 0.0 };
    let plain = (!std::io::IsTerminal::is_terminal(&std::io::stderr()) && a.progress_every > 0.0)
        .then(|| PlainLines::new(a.progress_every));
    let mut progress = Progress {
        bar,
        deadline_s: trainer.config().budget.map(|b| b.seconds - resumed_s),
        started: process_start,
        plain,
    };
    let spent = process_start.elapsed().as_secs_f64();
    let outcome = fit_timed(
        &mut trainer,
        &data,
        &a.out,
        &mut progress,
        &stop,
        &WallClock::new(),
        spent,
    )
    .with_context(|| format!("training into {}", a.out.display()))?;
    progress.bar.finish_and_clear();
    let what = match outcome {
        FitOutcome::Finished => "finished",
        FitOutcome::MaxSteps if trainer.config().budget_steps.is_some() => {
            "reached its step limit (budget or --max-steps)"
        }
        FitOutcome::MaxSteps => "reached --max-steps",
        FitOutcome::Stopped => "stopped by Ctrl-C",
        FitOutcome::Deadline => {
            "reached the budget's deadline before its planned steps (this machine ran slower \
             than its probe measured)"
        }
    };
    let c = trainer.config();
    println!(
        "training {what} at step {} in {}; checkpoint: {} (continue with --resume)",
        trainer.step(),
        ddpm_train::budget::format_duration(process_start.elapsed().as_secs_f64()),
        ckpt.display()
    );
    if let (FitOutcome::Deadline, Some(n)) = (outcome, c.budget_steps) {
        println!(
            "the plan was {n} steps and its learning-rate schedule ran to {n}; it ended at step \
             {} to stay within the budget. `--max-steps {n} --warmup {} --ema-decay {} --budget \
             off` reruns the whole plan (on a machine fast enough, or without a deadline)",
            trainer.step(),
            c.warmup_steps,
            c.ema_decay
        );
    } else if let Some(n) = c.budget_steps {
        println!(
            "the budget's plan, to rerun it on any machine: --max-steps {n} --warmup {} \
             --ema-decay {} --budget off (with the other flags of this run)",
            c.warmup_steps, c.ema_decay
        );
    }
    Ok(())
}

fn load(a: &TrainArgs, split: Split) -> Result<ddpm_data::ImageDataset> {
    ddpm_data::load_dataset(
        &a.dataset,
        crate::data_dir(&a.dataset, a.data_dir.as_deref()).as_deref(),
        split,
        (a.image_size, a.image_size),
    )
    .with_context(|| format!("loading --dataset {}", a.dataset))
}
