//! Starting a run from its options, as `ddpm train` does: a new run takes the recipe's value for
//! every option left out, loads the dataset, builds the model card and the budget; a resumed run
//! takes all of that from its checkpoint. [`launch`] returns the trainer with its data, ready for
//! [`crate::fit_timed`]; [`summary`] says how the run ended.
//!
//! ```
//! use candle_core::Device;
//! use ddpm_train::launch::{launch, RunOptions};
//!
//! let out = tempfile::tempdir()?;
//! let dir = ddpm_data::shipped_mnist_dir().expect("run from the repository");
//! let opts = RunOptions {
//!     model: Some(ddpm_unet::Preset::Tiny),
//!     budget: Some(ddpm_train::launch::Budget::Off),
//!     limit: Some(16),
//!     held_out: 0,
//!     out: out.path().to_path_buf(),
//!     ..RunOptions::default()
//! };
//! let run = launch(&opts, &Device::Cpu, &[], |_| Some(dir.clone()))?;
//! assert_eq!(run.data.train_len, 16);
//! assert_eq!(run.trainer.config().batch_size, 32); // the quick recipe's
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```

use std::path::{Path, PathBuf};
use std::str::FromStr;

use candle_core::Device;
use ddpm_core::Prediction;
use ddpm_data::{Dataset, DatasetKind, Split, TensorBatcher};
use ddpm_schedule::{BetaKind, ScheduleConfig};
use ddpm_unet::{Autocast, Preset};

use crate::recipe::Recipe;
use crate::{
    budget, checkpoint_path, BudgetConfig, FitData, FitOutcome, LossWeighting, ModelCard, Result,
    ResumeOverrides, RunLock, TrainConfig, TrainError, Trainer,
};

/// A wall-clock budget for a whole run.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Budget {
    /// None (`off`).
    Off,
    /// This many seconds.
    Seconds(f64),
}

impl FromStr for Budget {
    type Err = String;
    /// Parses `off` (or `none`), or a duration: `90s`, `15m`, `1h30m`, `2h`.
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        if s == "off" || s == "none" {
            return Ok(Self::Off);
        }
        budget::parse_duration(s).map(Self::Seconds)
    }
}

/// The options of a training run, one per `ddpm train` flag (the `clap` feature derives
/// `clap::Args`, so the command line is this struct). `None` takes the recipe's value.
#[derive(Debug, Clone, PartialEq)]
#[cfg_attr(feature = "clap", derive(clap::Args))]
pub struct RunOptions {
    /// Defaults for the flags left out: quick (the CPU default: a 30-minute budget) or full
    /// (the shipped model's recipe; the default on --device cuda).
    #[cfg_attr(feature = "clap", arg(long, value_enum))]
    pub recipe: Option<Recipe>,
    /// Wall-clock budget for the whole run (e.g. 15m, 30m, 1h30m, 2h; `off` for none): the run
    /// measures this machine, then fixes the step count so that it ends in time, grids and
    /// checkpoints included. Combines with --epochs/--max-steps: the first limit reached wins.
    /// Default: from --recipe (quick: 30m).
    #[cfg_attr(feature = "clap", arg(long))]
    pub budget: Option<Budget>,
    /// Epochs (passes over the training set). Default: from --recipe (quick 100, full 6).
    #[cfg_attr(feature = "clap", arg(short = 'e', long))]
    pub epochs: Option<u64>,
    /// Peak learning rate (AdamW). Default: from --recipe (1e-3). With --resume, continues the
    /// run at this rate instead (e.g. after it diverged).
    #[cfg_attr(feature = "clap", arg(short = 'l', long))]
    pub lr: Option<f64>,
    /// Batch size. Default: from --recipe (quick 32, full 256).
    #[cfg_attr(feature = "clap", arg(short = 'b', long))]
    pub batch_size: Option<usize>,
    /// Model preset: mnist (the shipped model's), small (trains on a CPU), tiny (tests).
    /// Default: from --recipe (quick small, full mnist).
    #[cfg_attr(feature = "clap", arg(long, value_enum))]
    pub model: Option<Preset>,
    /// β schedule.
    #[cfg_attr(feature = "clap", arg(long, value_enum, default_value_t = BetaKind::Linear))]
    pub schedule: BetaKind,
    /// Diffusion steps T.
    #[cfg_attr(feature = "clap", arg(long, default_value_t = 1000))]
    pub timesteps: usize,
    /// What the network predicts: epsilon (the noise) or v (√ᾱ·ε − √(1−ᾱ)·x0). Saved on the
    /// model card; sampling converts. Default: from --recipe.
    #[cfg_attr(feature = "clap", arg(long, value_enum))]
    pub prediction: Option<Prediction>,
    /// Per-timestep loss weights: uniform, min-snr (γ = 5) or min-snr-G. Default: from --recipe.
    #[cfg_attr(feature = "clap", arg(long))]
    pub loss_weighting: Option<LossWeighting>,
    /// Probability of dropping the class label (classifier-free guidance); 0 with an
    /// unconditional model.
    #[cfg_attr(feature = "clap", arg(long, default_value_t = 0.1))]
    pub p_uncond: f64,
    /// Train an unconditional model (no class embedding).
    #[cfg_attr(feature = "clap", arg(long))]
    pub unconditional: bool,
    /// EMA decay of the weights used for sampling. Default: from --recipe (full 0.995); with a
    /// budget and no --ema-decay, fitted so that the EMA spans the last 25 % of the steps.
    #[cfg_attr(feature = "clap", arg(long))]
    pub ema_decay: Option<f64>,
    /// Dataset: mnist, fashion-mnist or folder:PATH (PATH/CLASS/*.png; colour kept when the
    /// images have it, folder-gray:PATH or folder-rgb:PATH force one or three channels).
    #[cfg_attr(feature = "clap", arg(long, default_value = "mnist"))]
    pub dataset: DatasetKind,
    /// Folder with the IDX files (else $DDPM_DATA_DIR, then the copy in assets/mnist).
    #[cfg_attr(feature = "clap", arg(long))]
    pub data_dir: Option<PathBuf>,
    /// Image size (height = width) for folder datasets.
    #[cfg_attr(feature = "clap", arg(long, default_value_t = 28))]
    pub image_size: u32,
    /// Seed of weights, data order, noise and class dropout.
    #[cfg_attr(feature = "clap", arg(long, default_value_t = 0))]
    pub seed: u64,
    /// Output folder: checkpoint.safetensors, metrics.jsonl, loss.png, samples/.
    #[cfg_attr(feature = "clap", arg(long, default_value = "runs/default"))]
    pub out: PathBuf,
    /// Continue the run in --out from its checkpoint (exactly; model, schedule, data and
    /// budget plan come from the checkpoint, --epochs and --max-steps may be raised).
    #[cfg_attr(feature = "clap", arg(long))]
    pub resume: bool,
    /// Stop after this many optimizer steps in total.
    #[cfg_attr(feature = "clap", arg(long))]
    pub max_steps: Option<u64>,
    /// Learning-rate warm-up steps. Default: from --recipe (full 200); with a budget and no
    /// --warmup, fitted to 5 % of the planned steps.
    #[cfg_attr(feature = "clap", arg(long))]
    pub warmup: Option<u64>,
    /// Keep the learning rate constant after warm-up (no cosine decay).
    #[cfg_attr(feature = "clap", arg(long))]
    pub no_cosine: bool,
    /// Sample grid every N epochs (0: never).
    #[cfg_attr(feature = "clap", arg(long, default_value_t = 1))]
    pub sample_every: u64,
    /// DDIM steps of the sample grids.
    #[cfg_attr(feature = "clap", arg(long, default_value_t = 50))]
    pub sample_steps: usize,
    /// Checkpoint every N steps as well as at epoch ends (0: epoch ends only). Default: from
    /// --recipe (quick 500, full 0).
    #[cfg_attr(feature = "clap", arg(long))]
    pub checkpoint_every: Option<u64>,
    /// Also write a metrics line and redraw loss.png every N steps (0: epoch ends only).
    /// Default: from --recipe (quick 400, full 100).
    #[cfg_attr(feature = "clap", arg(long))]
    pub log_every: Option<u64>,
    /// Test-split examples for the held-out loss (0: none).
    #[cfg_attr(feature = "clap", arg(long, default_value_t = 1024))]
    pub held_out: usize,
    /// Use only the first N training examples (quick experiments). Saved in the checkpoint:
    /// a resumed run trains on the same examples.
    #[cfg_attr(feature = "clap", arg(long))]
    pub limit: Option<usize>,
    /// Autocast: forward and backward of the U-Net in bf16 (convolutions, linear layers,
    /// attention products) with f32 weights, optimizer state, EMA and loss; GroupNorm and
    /// softmax stay f32. On the CPU: bf16-rounded product inputs and gradients with f32
    /// accumulation, convolutions on the vdpbf16ps kernel where it is faster than f32 (AVX512_BF16
    /// and a speed probe; DDPM_BF16_KERNEL overrides), else the reference path, slower than f32;
    /// the first lines say which. Only bf16: f16 training would need loss scaling.
    #[cfg_attr(feature = "clap", arg(long, value_enum))]
    pub autocast: Option<Autocast>,
}

impl Default for RunOptions {
    /// The command line's defaults: everything from the recipe, MNIST, `runs/default`.
    fn default() -> Self {
        Self {
            recipe: None,
            budget: None,
            epochs: None,
            lr: None,
            batch_size: None,
            model: None,
            schedule: BetaKind::Linear,
            timesteps: 1000,
            prediction: None,
            loss_weighting: None,
            p_uncond: 0.1,
            unconditional: false,
            ema_decay: None,
            dataset: DatasetKind::Mnist,
            data_dir: None,
            image_size: 28,
            seed: 0,
            out: PathBuf::from("runs/default"),
            resume: false,
            max_steps: None,
            warmup: None,
            no_cosine: false,
            sample_every: 1,
            sample_steps: 50,
            checkpoint_every: None,
            log_every: None,
            held_out: 1024,
            limit: None,
            autocast: None,
        }
    }
}

/// The options a resumed run takes from its checkpoint whatever is given (by field name, as
/// clap names them); only `epochs`, `max_steps` and `lr` change a resumed run.
pub const FIXED_BY_CHECKPOINT: &[&str] = &[
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

impl RunOptions {
    /// The recipe in force: the one named, else quick on the CPU and full on a GPU.
    pub fn recipe_for(&self, device: &Device) -> Recipe {
        self.recipe.unwrap_or(Recipe::default_for(device.is_cpu()))
    }

    /// The budget in force, in seconds: the one given, else the recipe's.
    pub fn budget_s(&self, device: &Device) -> Option<f64> {
        match self.budget {
            Some(Budget::Off) => None,
            Some(Budget::Seconds(s)) => Some(s),
            None => self.recipe_for(device).values().budget,
        }
    }

    /// The model card and training configuration of a new run on `data` (whose image shape
    /// and classes the card records), with the recipe's value for every option left out.
    pub fn new_run(
        &self,
        data: &ddpm_data::ImageDataset,
        device: &Device,
    ) -> Result<(ModelCard, TrainConfig)> {
        let v = self.recipe_for(device).values();
        let mut model = self.model.unwrap_or(v.model).config();
        let schedule = ScheduleConfig::new(self.schedule.schedule(), self.timesteps);
        schedule.build().map_err(|e| {
            TrainError::Config(format!(
                "timesteps {} with the {:?} schedule: {e}",
                self.timesteps, self.schedule
            ))
        })?;
        let (c, _, _) = data.image_shape();
        model.in_channels = c;
        model.num_classes = if self.unconditional {
            0
        } else {
            data.class_names().len()
        };
        let card = ModelCard {
            schedule,
            prediction: self.prediction.unwrap_or(v.prediction),
            ..crate::card_for(model, data, self.dataset.to_string())
        };
        let fitted = BudgetConfig::fitted(0.0);
        let budget = self.budget_s(device).map(|seconds| BudgetConfig {
            seconds,
            warmup_fraction: fitted.warmup_fraction.filter(|_| self.warmup.is_none()),
            ema_horizon_fraction: fitted
                .ema_horizon_fraction
                .filter(|_| self.ema_decay.is_none()),
        });
        let config = TrainConfig {
            epochs: self.epochs.unwrap_or(v.epochs),
            max_steps: self.max_steps,
            batch_size: self.batch_size.unwrap_or(v.batch_size),
            lr: self.lr.unwrap_or(v.lr),
            warmup_steps: self.warmup.unwrap_or(v.warmup),
            cosine_decay: !self.no_cosine,
            p_uncond: if self.unconditional {
                0.0
            } else {
                self.p_uncond
            },
            ema_decay: self.ema_decay.unwrap_or(v.ema_decay),
            seed: self.seed,
            sample_every: self.sample_every,
            sample_steps: self.sample_steps,
            checkpoint_every: self.checkpoint_every.unwrap_or(v.checkpoint_every),
            held_out_examples: self.held_out,
            log_every: self.log_every.unwrap_or(v.log_every),
            autocast: self.autocast,
            loss_weighting: self.loss_weighting.unwrap_or(v.loss_weighting),
            budget,
            train_limit: self.limit,
            ..TrainConfig::default()
        };
        Ok((card, config))
    }
}

/// A run ready to train: its trainer and data, and the lock on its folder (held until this is
/// dropped, so that a second run on the folder stops, naming this one).
pub struct Launch {
    /// The trainer (new, or restored from the checkpoint).
    pub trainer: Trainer,
    /// The training set and the held-out batch, on the device.
    pub data: FitData,
    /// The run folder.
    pub out: PathBuf,
    /// Whether the run continues a checkpoint.
    pub resumed: bool,
    /// What to tell the user before training starts (the recipe, or the step resumed at).
    pub announcement: String,
    _lock: RunLock,
}

/// Sets up the run `opts` describe on `device`. `explicit` names the options given on the
/// command line (a resumed run warns about those its checkpoint fixes); `data_dir` gives the
/// folder to load a dataset from when `opts.data_dir` is not set (`None`: ddpm-data looks for
/// itself, see [`ddpm_data::resolve_idx_dir`]). An invalid option is named by its flag
/// ([`with_flag_names`]): these options are the command line's.
pub fn launch(
    opts: &RunOptions,
    device: &Device,
    explicit: &[String],
    data_dir: impl Fn(&DatasetKind) -> Option<PathBuf>,
) -> Result<Launch> {
    launch_options(opts, device, explicit, data_dir).map_err(with_flag_names)
}

fn launch_options(
    opts: &RunOptions,
    device: &Device,
    explicit: &[String],
    data_dir: impl Fn(&DatasetKind) -> Option<PathBuf>,
) -> Result<Launch> {
    let dir_for = |kind: &DatasetKind| opts.data_dir.clone().or_else(|| data_dir(kind));
    check_options(opts, device)?;
    let ckpt = checkpoint_path(&opts.out);
    if opts.resume && !ckpt.exists() {
        return Err(TrainError::Config(format!(
            "--resume: {} holds no checkpoint ({} is missing); start a new run with the same \
             --out and without --resume",
            opts.out.display(),
            ckpt.display()
        )));
    }
    let created = !opts.out.exists();
    let lock = RunLock::acquire(&opts.out)?;
    match start(opts, device, explicit, &dir_for, &ckpt) {
        Ok((trainer, data, announcement)) => Ok(Launch {
            trainer,
            data,
            out: opts.out.clone(),
            resumed: opts.resume,
            announcement,
            _lock: lock,
        }),
        Err(e) => {
            // A refused run leaves behind no folder that it made.
            if created {
                lock.abandon();
            }
            Err(e)
        }
    }
}

/// The trainer, its data and the first line to print, for a run whose folder is locked.
fn start(
    opts: &RunOptions,
    device: &Device,
    explicit: &[String],
    dir_for: &dyn Fn(&DatasetKind) -> Option<PathBuf>,
    ckpt: &Path,
) -> Result<(Trainer, FitData, String)> {
    let (trainer, preloaded, announcement) = if opts.resume {
        warn_fixed(explicit);
        let overrides = ResumeOverrides {
            epochs: opts.epochs,
            max_steps: opts.max_steps,
            lr: opts.lr,
        };
        let (t, lr_change) = Trainer::resume_with(ckpt, device, &overrides)?;
        if let Some((old, new)) = lr_change {
            tracing::warn!(
                "--lr {new}: the run continues with this peak learning rate instead of its \
                 {old} (the schedule's shape is kept); it is no longer the run it started as"
            );
        }
        let c = t.config();
        let budget_steps = t.is_planned().then(|| t.plan().total_steps);
        let plan = match (c.max_steps, budget_steps) {
            (Some(m), Some(b)) if m < b => format!(" of {m} (the step limit)"),
            (_, Some(b)) => format!(" of the budget's {b}"),
            (Some(m), None) => format!(" of {m} (the step limit)"),
            (None, None) => format!(" of {} epochs", c.epochs),
        };
        let kept = if opts.max_steps.is_none() && opts.epochs.is_none() {
            ", continuing the saved plan"
        } else {
            ""
        };
        let line = format!(
            "ddpm train: resuming {} at step {}{plan}{kept}; {}",
            ckpt.display(),
            t.step(),
            precision_note(t.config().autocast, device)
        );
        (t, None, line)
    } else {
        if ckpt.exists() {
            return Err(TrainError::Config(format!(
                "{} already holds a checkpoint: pass --resume to continue it, or choose another \
                 --out",
                opts.out.display()
            )));
        }
        let recipe = opts.recipe_for(device);
        let line = format!(
            "{}; {}",
            crate::recipe::announce(recipe, opts.recipe.is_some(), opts.budget_s(device)),
            precision_note(opts.autocast, device)
        );
        let train = load(
            &opts.dataset,
            dir_for(&opts.dataset).as_deref(),
            Split::Train,
            (opts.image_size, opts.image_size),
            opts.limit,
        )?;
        let (card, config) = opts.new_run(&train, device)?;
        if device.is_cpu() {
            ddpm_pipeline::memory::check_training(&card, config.batch_size)
                .map_err(|e| TrainError::Config(e.to_string()))?;
        }
        (Trainer::new(card, config, device)?, Some(train), line)
    };
    let data = fit_data(&trainer, preloaded, device, dir_for)?;
    tracing::info!(
        dataset = %trainer.card().data.dataset, examples = data.train_len,
        params = ddpm_unet::parameter_count(&trainer.card().model)?,
        out = %opts.out.display(), "starting"
    );
    Ok((trainer, data, announcement))
}

/// The checks that need no file: options that cannot work, whatever the data.
fn check_options(opts: &RunOptions, device: &Device) -> Result<()> {
    if opts.image_size == 0 || opts.image_size as usize > crate::checkpoint::MAX_IMAGE_SIDE {
        return Err(TrainError::Config(format!(
            "--image-size {}: give a side between 1 and {} pixels",
            opts.image_size,
            crate::checkpoint::MAX_IMAGE_SIDE
        )));
    }
    if std::fs::metadata(&opts.out).is_ok_and(|m| !m.is_dir()) {
        return Err(TrainError::Config(format!(
            "out {}: is a file, not a folder; give the folder to train into (it is created if \
             missing)",
            opts.out.display()
        )));
    }
    if opts.timesteps < 2 || opts.timesteps > ddpm_schedule::MAX_TIMESTEPS {
        return Err(TrainError::Config(format!(
            "timesteps {}: give between 2 and {} diffusion steps (models use 1000)",
            opts.timesteps,
            ddpm_schedule::MAX_TIMESTEPS
        )));
    }
    match opts.autocast {
        Some(Autocast::F16) => Err(TrainError::Config(
            "--autocast f16: training autocasts to bf16 only (f16 would need loss scaling, which \
             the trainer does not do); use --autocast bf16"
                .into(),
        )),
        Some(a) => {
            if let Some(note) = a.cpu_note(device) {
                tracing::warn!("--autocast bf16: {note}");
            }
            a.check_device(device)
                .map_err(|e| TrainError::Config(format!("--autocast bf16: {e}")))
        }
        None => Ok(()),
    }
}

/// The precision a run trains in, for its first output line.
fn precision_note(autocast: Option<Autocast>, device: &Device) -> String {
    match autocast {
        None => "precision f32 (--autocast bf16 for bf16 products)".into(),
        Some(a) if device.is_cpu() => {
            let how = match ddpm_unet::ops::precision::bf16_kernel() {
                ddpm_unet::ops::precision::Bf16Kernel::Avx512 => {
                    "convolutions on the CPU's vdpbf16ps kernel, the rest on its reference path"
                }
                ddpm_unet::ops::precision::Bf16Kernel::Reference => {
                    "on the CPU's reference path (slower than f32)"
                }
            };
            format!(
                "precision: {} products with f32 weights, {how}",
                a.dtype().as_str()
            )
        }
        Some(a) => format!(
            "precision: {} products with f32 weights",
            a.dtype().as_str()
        ),
    }
}

/// Warns about the options of `explicit` that a resumed run takes from its checkpoint.
fn warn_fixed(explicit: &[String]) {
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

fn load(
    kind: &DatasetKind,
    dir: Option<&Path>,
    split: Split,
    size: (u32, u32),
    limit: Option<usize>,
) -> Result<ddpm_data::ImageDataset> {
    Ok(ddpm_data::load_dataset_limited(
        kind, dir, split, size, limit,
    )?)
}

/// The training set (the one loaded to build a new run's card, else the checkpoint's, limited
/// as the run was) and the held-out batch, on the device.
fn fit_data(
    trainer: &Trainer,
    preloaded: Option<ddpm_data::ImageDataset>,
    device: &Device,
    dir_for: &dyn Fn(&DatasetKind) -> Option<PathBuf>,
) -> Result<FitData> {
    let card = trainer.card();
    let kind: DatasetKind = card.data.dataset.parse().map_err(TrainError::Config)?;
    let size = (card.data.height as u32, card.data.width as u32);
    let dir = dir_for(&kind);
    let mut train = match preloaded {
        Some(t) => t,
        None => load(
            &kind,
            dir.as_deref(),
            Split::Train,
            size,
            trainer.config().train_limit,
        )?,
    };
    if let Some(n) = trainer.config().train_limit {
        train = train.take(n);
    }
    if train.is_empty() {
        return Err(TrainError::Config(format!(
            "the {kind} training split has no examples{}: nothing to train on",
            dir.map_or(String::new(), |d| format!(" in {}", d.display()))
        )));
    }
    let held_n = trainer.config().held_out_examples;
    let held_out = if held_n == 0 {
        None
    } else {
        match load(&kind, dir.as_deref(), Split::Test, size, Some(held_n)) {
            Ok(test) if !test.is_empty() => Some(test.take(held_n).to_tensors(device)?),
            Ok(_) => None,
            Err(e) => {
                tracing::warn!("no held-out loss: {e}");
                None
            }
        }
    };
    Ok(FitData {
        train: TensorBatcher::new(&train, device)?,
        train_len: train.len(),
        held_out,
    })
}

/// The `ddpm train` flag of a [`crate::TrainConfig`] field.
pub fn flag_for(field: &str) -> String {
    match field {
        "train_limit" => "--limit".into(),
        "held_out_examples" => "--held-out".into(),
        "warmup_steps" => "--warmup".into(),
        "batch_size" | "epochs" | "max_steps" | "lr" | "p_uncond" | "ema_decay"
        | "loss_weighting" | "budget" | "autocast" | "seed" | "log_every" | "sample_every"
        | "sample_steps" | "checkpoint_every" => format!("--{}", field.replace('_', "-")),
        // Set by the recipe, with no flag of its own.
        other => format!("the recipe's `{other}`"),
    }
}

/// `e` with the flag named instead of the field ([`TrainError::Option`] → `--flag …`), and
/// the command that continues a diverged run, for messages to a
/// user of the command line; other errors as they are.
pub fn with_flag_names(e: TrainError) -> TrainError {
    match e {
        TrainError::Option { field, reason } => {
            let flag = flag_for(field);
            // "0 trains nothing" reads as `--epochs 0 trains nothing`; "must …" after the flag.
            TrainError::Config(format!("{flag} {reason}"))
        }
        e @ (TrainError::NonFiniteLoss { .. } | TrainError::Diverged { .. }) => TrainError::Config(
            format!("{e} On the command line: `ddpm train --resume --out DIR --lr X`."),
        ),
        other => other,
    }
}

/// What to tell the user when a run has ended: how, where its checkpoint is, and (for a
/// budgeted run) the flags that rerun its plan on any machine.
pub fn summary(outcome: FitOutcome, trainer: &Trainer, out: &Path, elapsed_s: f64) -> String {
    let plan = trainer.plan();
    let budgeted = trainer.is_planned();
    let what = match outcome {
        FitOutcome::Finished => "finished",
        FitOutcome::MaxSteps if budgeted => "reached its step limit (budget or --max-steps)",
        FitOutcome::MaxSteps => "reached --max-steps",
        FitOutcome::Stopped => "stopped by a signal (Ctrl-C, SIGTERM or SIGHUP)",
        FitOutcome::Complete => {
            return format!(
                "the run in {} is already complete at step {}: nothing was trained and no file \
                 changed. To train longer, resume with a higher --max-steps or --epochs",
                out.display(),
                trainer.step()
            )
        }
        FitOutcome::Deadline => {
            "reached the budget's deadline before its planned steps (this machine slowed down \
             after the budget's last re-plan)"
        }
    };
    let mut s = format!(
        "training {what} at step {} in {}; checkpoint: {} (continue with --resume)",
        trainer.step(),
        budget::format_duration(elapsed_s),
        checkpoint_path(out).display()
    );
    let n = plan.total_steps;
    let replans = trainer.budget_state().map_or(0, |b| b.replans);
    match (outcome, budgeted) {
        (FitOutcome::Deadline, true) => s.push_str(&format!(
            "\nthe plan was {n} steps and its learning-rate schedule ran to {n}; it ended at step \
             {} to stay within the budget. `--max-steps {n} --warmup {} --ema-decay {} --budget \
             off` reruns the whole plan (on a machine fast enough, or without a deadline)",
            trainer.step(),
            plan.warmup_steps,
            plan.ema_decay
        )),
        (_, true) => s.push_str(&format!(
            "\nthe budget's plan ({replans} re-plans to the measured speed), to rerun its final \
             schedule on any machine: --max-steps {n} --warmup {} --ema-decay {} --budget off \
             (with the other flags of this run)",
            plan.warmup_steps, plan.ema_decay
        )),
        _ => {}
    }
    s
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn budget_parses_off_and_durations() {
        assert_eq!("off".parse::<Budget>(), Ok(Budget::Off));
        assert_eq!("none".parse::<Budget>(), Ok(Budget::Off));
        assert_eq!("1h30m".parse::<Budget>(), Ok(Budget::Seconds(5400.0)));
        assert!("soon".parse::<Budget>().is_err());
    }

    #[test]
    fn options_left_out_take_the_recipe_and_given_ones_win() {
        let names: Vec<String> = (0..10).map(|d| d.to_string()).collect();
        let data =
            ddpm_data::ImageDataset::new(vec![0; 4 * 64], vec![0, 1, 2, 3], (1, 8, 8), names)
                .unwrap();
        let cpu = Device::Cpu;
        let (card, config) = RunOptions::default().new_run(&data, &cpu).unwrap();
        let quick = Recipe::Quick.values();
        let want = quick.model.config();
        assert_eq!(card.model.base_channels, want.base_channels);
        assert_eq!((card.model.in_channels, card.model.num_classes), (1, 10));
        assert_eq!((card.data.height, card.data.width), (8, 8));
        assert_eq!(config.batch_size, quick.batch_size);
        assert_eq!(config.budget.map(|b| b.seconds), quick.budget);
        let given = RunOptions {
            recipe: Some(Recipe::Full),
            batch_size: Some(7),
            budget: Some(Budget::Off),
            unconditional: true,
            ..RunOptions::default()
        };
        let (card, config) = given.new_run(&data, &cpu).unwrap();
        assert_eq!(config.batch_size, 7);
        assert_eq!(config.epochs, Recipe::Full.values().epochs);
        assert!(config.budget.is_none());
        assert_eq!((card.model.num_classes, config.p_uncond), (0, 0.0));
    }

    #[test]
    fn impossible_options_are_refused_before_any_file_is_read() {
        let bad_size = RunOptions {
            image_size: 0,
            ..RunOptions::default()
        };
        let f16 = RunOptions {
            autocast: Some(Autocast::F16),
            ..RunOptions::default()
        };
        for (opts, says) in [(bad_size, "--image-size 0"), (f16, "--autocast f16")] {
            let e = check_options(&opts, &Device::Cpu).unwrap_err().to_string();
            assert!(e.contains(says), "{e}");
        }
    }
}
