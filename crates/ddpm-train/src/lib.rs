//! Training for ddpm-rs: the ε-prediction MSE loss with one uniform t per sample, AdamW
//! with warm-up and optional cosine decay, gradient-norm clipping, class dropout for
//! classifier-free guidance, an EMA of the weights, safetensors checkpoints that carry
//! their own configuration and resume exactly, metrics, loss plots and sample grids.
//!
//! ```
//! use candle_core::Device;
//! use ddpm_train::{DataInfo, ModelCard, TrainConfig, Trainer};
//!
//! let card = ModelCard {
//!     model: ddpm_unet::UNetConfig { channel_mults: vec![1], attention_levels: vec![], ..ddpm_unet::UNetConfig::tiny() },
//!     schedule: ddpm_schedule::ScheduleConfig::default(),
//!     data: DataInfo::mnist_sized(8, 8),
//!     prediction: ddpm_core::Prediction::Epsilon,
//!     distilled: None,
//! };
//! let mut trainer = Trainer::new(card, TrainConfig { batch_size: 4, ..TrainConfig::default() }, &Device::Cpu)?;
//! let x0 = candle_core::Tensor::zeros((4, 1, 8, 8), candle_core::DType::F32, &Device::Cpu)?;
//! let y = candle_core::Tensor::new(&[0u32, 1, 2, 3], &Device::Cpu)?;
//! let loss = trainer.train_step(&ddpm_data::Batch { images: x0, labels: y })?;
//! assert!(loss.is_finite());
//! assert_eq!(trainer.step(), 1);
//! # Ok::<(), ddpm_train::TrainError>(())
//! ```

pub mod bench;
pub mod budget;
pub mod checkpoint;
pub mod distill;
mod error;
mod fit;
pub mod launch;
mod lock;
pub mod loss;
pub mod network;
pub mod optim;
pub mod progress;
pub mod recipe;
/// Pictures (the `ddpm-viz` crate, re-exported where it used to live).
pub use ddpm_viz as viz;

use candle_core::{DType, Device, Tensor, Var};
use candle_nn::{VarBuilder, VarMap};
use ddpm_core::{NoiseSchedule, NoiseSource, SeededNoise};
use ddpm_data::Batch;
use ddpm_schedule::Schedule;
use ddpm_unet::UNet;
use serde::{Deserialize, Serialize};

pub use budget::{BudgetConfig, BudgetPlan};
pub use checkpoint::{DataInfo, ModelCard, TrainState, Weights};
pub use ddpm_unet::load_unet;
pub use distill::DistillConfig;
pub use error::{Result, TrainError};
pub use fit::{
    checkpoint_path, final_grid_path, fit, fit_timed, grid_path, metrics_path, plot_metrics,
    read_metrics, write_sample_grid, EpochReport, FitData, FitOutcome, StepReport, TrainObserver,
};
pub use lock::{RunLock, LOCK_FILE};
pub use loss::{LossWeighting, Objective};
pub use network::{card_for, Trainable};
use optim::{AdamW, AdamWConfig, Ema};

/// The largest learning rate [`TrainConfig::validate`] accepts: AdamW's step is about `lr` per
/// weight, so anything above this throws the weights far from any trained value at once.
pub const MAX_LR: f64 = 1.0;

/// The largest weight magnitude [`Trainer::check_state`] accepts. Trained U-Net weights are of
/// order 1 (AdamW moves each by at most about `lr` a step); a weight beyond this means the run
/// has diverged even while its loss is still finite.
pub const MAX_WEIGHT: f32 = 1e4;

/// Training options. Saved in every checkpoint.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TrainConfig {
    /// Epochs to train (an epoch is one pass over the training set).
    pub epochs: u64,
    /// Stop after this many optimizer steps in total (smoke tests, quick looks).
    pub max_steps: Option<u64>,
    /// Examples per batch.
    pub batch_size: usize,
    /// Peak learning rate.
    pub lr: f64,
    /// Linear warm-up steps.
    pub warmup_steps: u64,
    /// Cosine decay of the learning rate to 0 over the run after warm-up.
    pub cosine_decay: bool,
    /// AdamW options.
    pub adamw: AdamWConfig,
    /// Clip the global gradient norm to this value (`None`: no clipping).
    pub grad_clip: Option<f64>,
    /// Probability of replacing a label by the null class (classifier-free guidance).
    pub p_uncond: f64,
    /// EMA decay (see [`optim::Ema`]).
    pub ema_decay: f64,
    /// Seed of the initial weights, data order, timesteps, noise and class dropout.
    pub seed: u64,
    /// Write a sample grid every this many epochs (0: never).
    pub sample_every: u64,
    /// DDIM steps of the sample grids.
    pub sample_steps: usize,
    /// Guidance weight w of the sample grids.
    pub sample_guidance: f64,
    /// Also checkpoint every this many steps (0: only at epoch ends and on stop).
    pub checkpoint_every: u64,
    /// Test-split examples used for the held-out loss (0: none).
    pub held_out_examples: usize,
    /// Also write a metrics line (and redraw the loss plot) every this many steps
    /// (0: only at epoch ends).
    #[serde(default)]
    pub log_every: u64,
    /// Run the U-Net's forward and backward in bf16 with f32 weights ([`UNet::with_autocast`]);
    /// the loss, the optimizer state and the EMA stay f32. `None`: all f32. f16 is refused
    /// (it would need loss scaling).
    #[serde(default)]
    pub autocast: Option<ddpm_unet::Autocast>,
    /// Per-timestep weights of the loss (uniform, or min-SNR-γ). What the network predicts
    /// (ε or v) is part of the model card ([`ModelCard::prediction`]).
    #[serde(default)]
    pub loss_weighting: LossWeighting,
    /// A wall-clock budget: [`fit`] measures this machine and fixes the step count so that
    /// the run ends within it ([`budget`]). The first limit reached (epochs, `max_steps`,
    /// budget) wins.
    #[serde(default)]
    pub budget: Option<BudgetConfig>,
    /// Legacy: the step count of a budget's plan, as checkpoints written before the plan moved
    /// into the run's state ([`budget::Plan`], [`TrainState::plan`]) saved it. Read on resume
    /// only (it becomes the run's plan); never written.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub budget_steps: Option<u64>,
    /// Train on the first N examples of the training split only (`--limit`); saved, so that a
    /// resumed run trains on the same data.
    #[serde(default)]
    pub train_limit: Option<usize>,
    /// Distil a teacher instead of learning from the data alone ([`distill`]): the loss is the
    /// teacher's, the data only supplies the noised inputs. `None`: ordinary training.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub distill: Option<DistillConfig>,
}

impl Default for TrainConfig {
    /// The default recipe: batch 128, lr 2e-4 after 500 warm-up steps with cosine decay,
    /// clipping at 1.0, p_uncond 0.1, EMA 0.999.
    fn default() -> Self {
        Self {
            epochs: 20,
            max_steps: None,
            batch_size: 128,
            lr: 2e-4,
            warmup_steps: 500,
            cosine_decay: true,
            adamw: AdamWConfig::default(),
            grad_clip: Some(1.0),
            p_uncond: 0.1,
            ema_decay: 0.999,
            seed: 0,
            sample_every: 1,
            sample_steps: 50,
            sample_guidance: 2.0,
            checkpoint_every: 500,
            held_out_examples: 1024,
            log_every: 0,
            autocast: None,
            loss_weighting: LossWeighting::Uniform,
            budget: None,
            budget_steps: None,
            train_limit: None,
            distill: None,
        }
    }
}

impl TrainConfig {
    /// Checks the options; the error names the field at fault ([`TrainError::Option`]).
    pub fn validate(&self) -> Result<()> {
        let bad = |field: &'static str, reason: String| Err(TrainError::Option { field, reason });
        if self.autocast == Some(ddpm_unet::Autocast::F16) {
            return bad(
                "autocast",
                "f16 training needs loss scaling, which ddpm-train does not do: use bf16".into(),
            );
        }
        if self.batch_size == 0 {
            return bad("batch_size", "must be at least 1".into());
        }
        if self.epochs == 0 {
            return bad("epochs", "0 trains nothing: give at least 1".into());
        }
        if self.max_steps == Some(0) {
            return bad("max_steps", "0 trains nothing: give at least 1".into());
        }
        if self.train_limit == Some(0) {
            return bad(
                "train_limit",
                "0 leaves no training examples: give at least 1".into(),
            );
        }
        if !(self.lr.is_finite() && self.lr > 0.0) {
            return bad("lr", format!("must be a positive number, got {}", self.lr));
        }
        if self.lr > MAX_LR {
            return bad(
                "lr",
                format!(
                    "{} is far above anything AdamW trains with (at most {MAX_LR}; 1e-3 is \
                     usual here): the weights would diverge in a few steps",
                    self.lr
                ),
            );
        }
        if !(0.0..=1.0).contains(&self.p_uncond) {
            return bad(
                "p_uncond",
                format!("must lie in [0, 1], got {}", self.p_uncond),
            );
        }
        if !(0.0..1.0).contains(&self.ema_decay) {
            return bad(
                "ema_decay",
                format!("must lie in [0, 1), got {}", self.ema_decay),
            );
        }
        if self.grad_clip.is_some_and(|c| !(c.is_finite() && c > 0.0)) {
            return bad("grad_clip", "must be a positive number".into());
        }
        if !self.sample_guidance.is_finite() {
            return bad("sample_guidance", "must be finite".into());
        }
        if let Err(m) = self.loss_weighting.validate() {
            return bad("loss_weighting", m);
        }
        if let Some(b) = &self.budget {
            if let Err(m) = b.validate() {
                return bad("budget", m);
            }
        }
        if let Some(d) = &self.distill {
            if let Err((field, m)) = d.validate() {
                return bad(field, m);
            }
            if !d.check_w(self.sample_guidance) {
                return bad(
                    "sample_guidance",
                    format!(
                        "{} lies outside the distilled range [{}, {}]",
                        self.sample_guidance, d.w_min, d.w_max
                    ),
                );
            }
        }
        Ok(())
    }

    /// The learning rate at `step` of a run of `total_steps` with this config's warm-up
    /// ([`learning_rate`]).
    pub fn lr_at(&self, step: u64, total_steps: u64) -> f64 {
        learning_rate(
            self.lr,
            self.warmup_steps,
            self.cosine_decay,
            step,
            total_steps,
        )
    }
}

/// The learning rate at `step` (0-based) of a run of `total_steps`: `peak` after a linear
/// warm-up of `warmup_steps`, then (with `cosine`) a cosine decay that reaches 0 at
/// `total_steps`.
pub fn learning_rate(
    peak: f64,
    warmup_steps: u64,
    cosine: bool,
    step: u64,
    total_steps: u64,
) -> f64 {
    let warm = if warmup_steps > 0 {
        ((step + 1) as f64 / warmup_steps as f64).min(1.0)
    } else {
        1.0
    };
    let decay = if cosine && total_steps > warmup_steps {
        let p = (step.saturating_sub(warmup_steps) as f64 / (total_steps - warmup_steps) as f64)
            .min(1.0);
        0.5 * (1.0 + (std::f64::consts::PI * p).cos())
    } else {
        1.0
    };
    peak * warm * decay
}

/// What a resumed run may change ([`Trainer::resume_with`]); every other option comes from
/// the checkpoint, so the run continues exactly as it was started.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct ResumeOverrides {
    /// A new number of epochs (e.g. raised to train longer).
    pub epochs: Option<u64>,
    /// A new step limit (`None`: the saved one, so a plain resume continues the saved plan).
    pub max_steps: Option<u64>,
    /// A new peak learning rate (the schedule's shape is kept).
    pub lr: Option<f64>,
}

/// A model under training with its optimizer, EMA and random state. `N` is the network: the
/// U-Net by default, or any [`Trainable`].
pub struct Trainer<N: Trainable = UNet> {
    card: ModelCard<N::Config>,
    config: TrainConfig,
    device: Device,
    model: N,
    schedule: Schedule,
    opt: AdamW,
    ema: Ema,
    rng: SeededNoise,
    epoch: u64,
    batch_in_epoch: u64,
    elapsed_s: f64,
    period: checkpoint::PeriodState,
    steps_per_epoch: u64,
    /// A budgeted run's plan (`None`: the plan comes from the options, [`Trainer::plan`]).
    budget_plan: Option<budget::Plan>,
    /// A budgeted run's standing against its budget, as last saved.
    budget_state: Option<budget::BudgetState>,
    /// A distillation's teacher ([`TrainConfig::distill`]).
    teacher: Option<distill::Teacher>,
}

impl<N: Trainable> std::fmt::Debug for Trainer<N> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Trainer")
            .field("card", &self.card)
            .field("step", &self.step())
            .finish_non_exhaustive()
    }
}

impl<N: Trainable> Trainer<N> {
    /// A fresh network `N` with seeded initial weights ([`Trainable::initialise`]), e.g.
    /// `Trainer::<MyNet>::for_network(card, config, &device)` ([`Trainer::new`] for the U-Net).
    pub fn for_network(
        card: ModelCard<N::Config>,
        config: TrainConfig,
        device: &Device,
    ) -> Result<Self> {
        config.validate()?;
        // The card a checkpoint will carry is checked as a reader checks it (sizes, class
        // names that are safe in file names), so the trainer never writes one it cannot read.
        N::check_card(&card).map_err(TrainError::Card)?;
        let schedule = card
            .schedule
            .build()
            .map_err(|e| TrainError::Card(format!("its schedule: {e}")))?;
        let varmap = VarMap::new();
        if let Some(a) = config.autocast {
            a.check_device(device).map_err(TrainError::Config)?;
        }
        let vb = VarBuilder::from_varmap(&varmap, DType::F32, device);
        let model = N::build(&card.model, vb)
            .and_then(|m| m.with_autocast(config.autocast))
            .map_err(|e| TrainError::Card(format!("its network cannot be built: {e}")))?;
        let mut vars: Vec<(String, Var)> = varmap
            .data()
            .lock()
            .map_err(|_| candle_core::Error::Msg("variable map poisoned".into()))?
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        vars.sort_by(|a, b| a.0.cmp(&b.0));
        N::initialise(&vars, config.seed)?;
        // A student starts as a copy of its teacher (the EMA too); resume then overwrites both.
        let teacher = match &config.distill {
            Some(d) => {
                let t = distill::Teacher::load(d, device)?;
                let want = t.student_card(d);
                if serde_json::to_value(&card).ok() != serde_json::to_value(&want).ok() {
                    return Err(TrainError::Card(
                        "a distillation's card must be its teacher's with the guidance embedding \
                         and the account of the distillation (build it with \
                         distill::Teacher::student_card)"
                            .into(),
                    ));
                }
                t.copy_into(&vars)?;
                Some(t)
            }
            None => None,
        };
        let ema = Ema::new(&vars, config.ema_decay)?;
        let opt = AdamW::new(vars, config.adamw)?;
        let rng = SeededNoise::new(config.seed);
        Ok(Self {
            card,
            config,
            device: device.clone(),
            model,
            schedule,
            opt,
            ema,
            rng,
            epoch: 0,
            batch_in_epoch: 0,
            elapsed_s: 0.0,
            period: checkpoint::PeriodState::default(),
            steps_per_epoch: 0,
            budget_plan: None,
            budget_state: None,
            teacher,
        })
    }

    /// Continues a run from a training checkpoint under the resume policy: every option comes
    /// from the checkpoint except those `overrides` sets (more epochs or steps, and a new peak
    /// learning rate, e.g. after the run diverged). Returns the trainer and, when the learning
    /// rate changed, the old and the new one.
    pub fn resume_network_with(
        path: &std::path::Path,
        device: &Device,
        overrides: &ResumeOverrides,
    ) -> Result<(Self, Option<(f64, f64)>)> {
        let mut changed = None;
        let t = Self::resume_network(path, device, |c| {
            if let Some(e) = overrides.epochs {
                c.epochs = e;
            }
            if let Some(m) = overrides.max_steps {
                c.max_steps = Some(m);
            }
            if let Some(lr) = overrides.lr {
                if lr != c.lr {
                    changed = Some((c.lr, lr));
                }
                c.lr = lr;
            }
        })?;
        Ok((t, changed))
    }

    /// Continues a run from a training checkpoint. `update` may change options that do
    /// not alter the run so far (e.g. epochs, max_steps); the rest comes from the checkpoint.
    pub fn resume_network(
        path: &std::path::Path,
        device: &Device,
        update: impl FnOnce(&mut TrainConfig),
    ) -> Result<Self> {
        let ckpt = checkpoint::read_as::<N>(path, device)?;
        let state = ckpt.train.clone().ok_or_else(|| TrainError::Checkpoint {
            path: path.to_path_buf(),
            reason: "is a sampling-only export without training state; resume needs a training checkpoint".into(),
        })?;
        let mut config = state.config.clone();
        update(&mut config);
        let mut t = Self::for_network(ckpt.card.clone(), config, device)?;
        let (model, ema, m, v) = (
            ckpt.group("model."),
            ckpt.group("ema."),
            ckpt.group("adam.m."),
            ckpt.group("adam.v."),
        );
        let mut ema_w = Vec::new();
        let (mut ms, mut vs) = (Vec::new(), Vec::new());
        for (name, var) in t.opt.vars() {
            let get = |g: &std::collections::HashMap<String, Tensor>, what: &str| {
                g.get(name).cloned().ok_or_else(|| TrainError::Checkpoint {
                    path: path.to_path_buf(),
                    reason: format!("lacks {what} `{name}`: it was saved by a different model"),
                })
            };
            let w = get(&model, "weight")?;
            if w.shape() != var.shape() {
                return Err(TrainError::Checkpoint {
                    path: path.to_path_buf(),
                    reason: format!(
                        "`{name}` has shape {:?}, the model expects {:?}",
                        w.shape(),
                        var.shape()
                    ),
                });
            }
            var.set(&w)?;
            ema_w.push(get(&ema, "EMA weight")?);
            ms.push(get(&m, "optimizer moment")?);
            vs.push(get(&v, "optimizer moment")?);
        }
        t.ema.set_weights(ema_w)?;
        t.opt.set_state(ms, vs, state.step)?;
        t.rng = SeededNoise::from_state(state.rng);
        t.epoch = state.epoch;
        t.batch_in_epoch = state.batch_in_epoch;
        t.elapsed_s = state.elapsed_s;
        t.period = state.period;
        // The plan: saved in the state, or (checkpoints written before it moved there) the
        // budget's step count in the options, with the warm-up and EMA decay fitted there.
        let legacy = state.config.budget_steps.map(|total_steps| budget::Plan {
            total_steps,
            warmup_steps: state.config.warmup_steps,
            ema_decay: state.config.ema_decay,
        });
        if let Some(plan) = state.plan.or(legacy) {
            t.set_plan(plan)?;
        }
        t.budget_state = state.budget;
        Ok(t)
    }

    /// Checks that every weight, EMA weight and optimizer moment is finite and every weight
    /// and EMA weight is below [`MAX_WEIGHT`] in magnitude: a diverged state is never
    /// checkpointed ([`fit`] calls this before each checkpoint). One read-back for the whole
    /// state.
    pub fn check_state(&self) -> Result<()> {
        let (m, v) = self.opt.moments()?;
        let vars = self.opt.vars();
        let groups: [(&str, Vec<Tensor>); 4] = [
            (
                "weight",
                vars.iter()
                    .map(|(_, var)| var.as_tensor().clone())
                    .collect(),
            ),
            ("EMA weight", self.ema.weights().to_vec()),
            ("optimizer first moment", m),
            ("optimizer second moment", v),
        ];
        let mut maxes = Vec::new();
        for (_, ts) in &groups {
            for t in ts {
                maxes.push(t.abs()?.flatten_all()?.max(0)?.to_dtype(DType::F32)?);
            }
        }
        if maxes.is_empty() {
            return Ok(());
        }
        let read = Tensor::stack(&maxes, 0)?.to_vec1::<f32>()?;
        let mut values = read.into_iter();
        for (gi, (what, ts)) in groups.iter().enumerate() {
            // Weights and EMA weights are bounded; the moments only need to be finite.
            let bounded = gi < 2;
            for ((name, _), value) in vars.iter().zip(values.by_ref().take(ts.len())) {
                if !value.is_finite() || (bounded && value > MAX_WEIGHT) {
                    return Err(TrainError::Diverged {
                        step: self.step(),
                        cause: format!("{what} `{name}` reached a magnitude of {value:e}"),
                    });
                }
            }
        }
        Ok(())
    }

    /// Optimizer steps taken.
    pub fn step(&self) -> u64 {
        self.opt.step_count()
    }
    /// Wall-clock seconds trained so far (across resumes).
    pub fn elapsed_s(&self) -> f64 {
        self.elapsed_s
    }
    /// The current epoch (0-based).
    pub fn epoch(&self) -> u64 {
        self.epoch
    }
    /// The model card.
    pub fn card(&self) -> &ModelCard<N::Config> {
        &self.card
    }
    /// The training options.
    pub fn config(&self) -> &TrainConfig {
        &self.config
    }
    /// The model with its current (raw) weights.
    pub fn model(&self) -> &N {
        &self.model
    }
    /// The optimizer (its moments and step count).
    pub fn optimizer(&self) -> &AdamW {
        &self.opt
    }
    /// The EMA of the weights.
    pub fn ema(&self) -> &Ema {
        &self.ema
    }
    /// The noise schedule.
    pub fn schedule(&self) -> &Schedule {
        &self.schedule
    }
    /// The device.
    pub fn device(&self) -> &Device {
        &self.device
    }

    /// The network holding the EMA weights (what sampling uses), run as the training model
    /// runs ([`Trainable::with_run_options_of`]: the U-Net's kernels and autocast).
    pub fn ema_model(&self) -> Result<N> {
        let map = self
            .opt
            .vars()
            .iter()
            .zip(self.ema.weights())
            // A snapshot: the average is updated in place by later steps.
            .map(|((n, _), w)| Ok((n.clone(), w.copy()?)))
            .collect::<candle_core::Result<_>>()?;
        let vb = VarBuilder::from_tensors(map, DType::F32, &self.device);
        Ok(N::build(&self.card.model, vb)?.with_run_options_of(&self.model)?)
    }

    /// A scratch trainer for the budget's probe: this run's card and options without the
    /// budget, its network run as this one's.
    pub(crate) fn scratch(&self) -> Result<Self> {
        let mut cfg = self.config.clone();
        cfg.budget = None;
        let mut scratch = Self::for_network(self.card.clone(), cfg, &self.device)?;
        scratch.model = scratch.model.with_run_options_of(&self.model)?;
        Ok(scratch)
    }

    /// The unweighted ε-MSE of the raw model (its inference forward) on a batch with the
    /// host-side timesteps `ts`, noise and labels ([`loss::epsilon_mse`]): what the held-out
    /// loss reports.
    pub fn loss(
        &self,
        x0: &Tensor,
        ts: &[u32],
        noise: &Tensor,
        labels: Option<&Tensor>,
    ) -> Result<Tensor> {
        let x_t = self.schedule.add_noise_from_host(x0, noise, ts)?;
        let t = Tensor::new(ts, &self.device)?;
        let out = self.model.predict_noise(&x_t, &t, labels)?;
        Ok(loss::epsilon_mse(
            &self.schedule,
            self.card.prediction,
            &x_t,
            ts,
            noise,
            out,
        )?)
    }

    /// The training objective of this run: the card's prediction, the config's loss
    /// weighting and class dropout.
    pub fn objective(&self) -> Objective {
        Objective {
            prediction: self.card.prediction,
            weighting: self.config.loss_weighting,
            p_uncond: self.config.p_uncond,
        }
    }

    /// The null class of the network (`None`: unconditional).
    pub fn null_class(&self) -> Option<u32> {
        match N::num_classes(&self.card.model) {
            0 => None,
            n => u32::try_from(n).ok(),
        }
    }

    /// One optimizer step on `batch`; returns the loss before the update.
    ///
    /// A NaN or infinite loss is an error and leaves the weights untouched.
    pub fn train_step(&mut self, batch: &Batch) -> Result<f32> {
        let x0 = batch.images.to_device(&self.device)?;
        let loss = match (&self.teacher, &self.config.distill) {
            (Some(teacher), Some(cfg)) => {
                let d = distill::DistillBatch::draw(
                    cfg,
                    teacher,
                    &self.schedule,
                    &x0,
                    &batch.labels.to_device(&self.device)?,
                    self.config.p_uncond,
                    &mut self.rng,
                )?;
                let out = self
                    .model
                    .forward_train_at(&d.x_in, &d.t, d.labels.as_ref(), &d.w)?;
                d.loss(&self.schedule, &out)?
            }
            _ => {
                let objective = self.objective();
                let null = self.null_class();
                let drawn = objective.draw(
                    &self.schedule,
                    &x0,
                    Some(&batch.labels),
                    null,
                    &mut self.rng,
                )?;
                let out = self
                    .model
                    .forward_train(&drawn.x_t, &drawn.t, drawn.labels.as_ref())?;
                objective.loss(&self.schedule, &x0, &drawn, &out)?
            }
        };
        let grads = loss.backward()?;
        // The loss and the squared gradient norm come back in one read (one GPU sync a step);
        // nothing has touched the weights yet, so a non-finite value still leaves them as they
        // were.
        let mut watched = vec![loss.to_dtype(DType::F64)?];
        if self.config.grad_clip.is_some() {
            watched.push(self.opt.grad_sq_norm(&grads)?);
        }
        let read = Tensor::stack(&watched, 0)?.to_vec1::<f64>()?;
        let value = read[0] as f32;
        if !value.is_finite() {
            return Err(TrainError::NonFiniteLoss {
                step: self.step(),
                loss: value,
            });
        }
        let scale = match (self.config.grad_clip, read.get(1)) {
            (Some(clip), Some(&sq)) => {
                let norm = sq.sqrt();
                if !norm.is_finite() {
                    return Err(TrainError::NonFiniteLoss {
                        step: self.step(),
                        loss: norm as f32,
                    });
                }
                if norm > clip {
                    clip / norm
                } else {
                    1.0
                }
            }
            _ => 1.0,
        };
        let lr = self.lr_at(self.step());
        self.opt.step(&grads, lr, scale)?;
        self.ema.update(self.opt.vars(), self.step())?;
        Ok(value)
    }

    /// Where the run stands in its data: the epoch (0-based) and the batches of it done.
    pub fn position(&self) -> (u64, u64) {
        (self.epoch, self.batch_in_epoch)
    }

    /// Counts a batch trained in `secs` seconds.
    pub(crate) fn count_batch(&mut self, secs: f64) {
        self.batch_in_epoch += 1;
        self.elapsed_s += secs;
    }

    /// Marks the epoch's batches as all done (its end then comes next).
    pub(crate) fn advance_to_epoch_end(&mut self, per_epoch: u64) {
        self.batch_in_epoch = self.batch_in_epoch.max(per_epoch);
    }

    /// Closes the epoch: the next batch is the first of the next one.
    pub(crate) fn close_epoch(&mut self) {
        self.epoch += 1;
        self.batch_in_epoch = 0;
    }

    /// The metrics line in progress, as last saved.
    pub fn period(&self) -> checkpoint::PeriodState {
        self.period
    }

    pub(crate) fn set_period(&mut self, period: checkpoint::PeriodState) {
        self.period = period;
    }

    /// Whether the run has reached its step limit (`max_steps` or the budget's plan).
    pub fn at_step_limit(&self) -> bool {
        self.step_cap().is_some_and(|m| self.step() >= m)
    }

    /// Tells the trainer how many batches an epoch has (for the cosine decay's length).
    pub fn set_steps_per_epoch(&mut self, n: u64) {
        self.steps_per_epoch = n;
    }

    /// The run's plan: a budgeted run's (saved in its state), else the options' (warm-up,
    /// EMA decay); its step count the least of `max_steps`, the budget's plan and epochs ×
    /// batches (set by [`fit`] through `set_steps_per_epoch`).
    pub fn plan(&self) -> budget::Plan {
        let by_epochs = self.config.epochs.saturating_mul(self.steps_per_epoch);
        let total = match self.step_cap() {
            Some(m) if by_epochs > 0 => m.min(by_epochs),
            Some(m) => m,
            None => by_epochs,
        };
        match self.budget_plan {
            Some(p) => budget::Plan {
                total_steps: total,
                ..p
            },
            None => budget::Plan {
                total_steps: total,
                warmup_steps: self.config.warmup_steps,
                ema_decay: self.config.ema_decay,
            },
        }
    }

    /// The learning rate of the step after `step` steps, under the run's [`Trainer::plan`].
    pub fn lr_at(&self, step: u64) -> f64 {
        let plan = self.plan();
        learning_rate(
            self.config.lr,
            plan.warmup_steps,
            self.config.cosine_decay,
            step,
            plan.total_steps,
        )
    }

    /// The lower of `max_steps` and the budget's step count.
    pub(crate) fn step_cap(&self) -> Option<u64> {
        let planned = self.budget_plan.map(|p| p.total_steps);
        match (self.config.max_steps, planned) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }

    /// Whether the run is budgeted and planned.
    pub fn is_planned(&self) -> bool {
        self.budget_plan.is_some()
    }

    /// Sets a budgeted run's plan (its first, or a re-plan): the step count, the warm-up and
    /// the EMA decay, saved with the next checkpoint.
    pub(crate) fn set_plan(&mut self, plan: budget::Plan) -> Result<()> {
        self.ema.set_decay(plan.ema_decay)?;
        self.budget_plan = Some(plan);
        Ok(())
    }

    /// A budgeted run's standing, as last saved (`None`: unbudgeted, or not saved yet).
    pub fn budget_state(&self) -> Option<&budget::BudgetState> {
        self.budget_state.as_ref()
    }

    pub(crate) fn set_budget_state(&mut self, state: budget::BudgetState) {
        self.budget_state = Some(state);
    }

    /// Fixes a budgeted run's first plan: its step count and, where the budget asks for it,
    /// the warm-up and EMA decay fitted to that count (else the options'). Called by [`fit`]
    /// before the first step; the plan is part of the run's state, saved with every
    /// checkpoint.
    pub fn apply_budget_plan(&mut self, plan: &BudgetPlan) -> Result<()> {
        let budget = self.config.budget.ok_or_else(|| {
            TrainError::Config("apply_budget_plan: this run has no budget".into())
        })?;
        if self.step() > 0 {
            return Err(TrainError::Config(
                "a budget's plan is fixed before the first step; this run has already started"
                    .into(),
            ));
        }
        // Fitted to the steps the run will take: the plan, or a lower --max-steps.
        let steps = self
            .config
            .max_steps
            .map_or(plan.steps, |m| m.min(plan.steps));
        self.set_plan(budget::Plan {
            total_steps: plan.steps,
            warmup_steps: budget.warmup_for(steps).unwrap_or(self.config.warmup_steps),
            ema_decay: budget.ema_decay_for(steps).unwrap_or(self.config.ema_decay),
        })
    }

    /// Mean ε-MSE of the raw model on `x0`/`labels` with t and noise from a fixed seed
    /// (comparable across epochs), in batches of the training batch size.
    pub fn held_out_loss(&self, x0: &Tensor, labels: &Tensor) -> Result<f32> {
        let n = x0.dim(0)?;
        let mut rng = SeededNoise::new(0x0004_E1D0_u64 ^ self.config.seed);
        let t_total = self.schedule.num_train_timesteps() as u32;
        let (mut sum, mut count) = (0f64, 0usize);
        let bs = self.config.batch_size.max(1);
        for start in (0..n).step_by(bs) {
            let len = bs.min(n - start);
            let xb = x0.narrow(0, start, len)?;
            let ts = rng.uniform_u32(len, t_total);
            let noise = rng.randn(xb.shape(), DType::F32, &self.device)?;
            let yb = labels.narrow(0, start, len)?;
            let y = self.null_class().is_some().then_some(&yb);
            let l = self.loss(&xb, &ts, &noise, y)?.to_scalar::<f32>()?;
            sum += l as f64 * len as f64;
            count += len;
        }
        Ok((sum / count.max(1) as f64) as f32)
    }

    /// Writes a training checkpoint (weights, EMA, optimizer moments, step, RNG, options).
    pub fn save(&self, path: &std::path::Path) -> Result<()> {
        let mut tensors = Vec::new();
        let (m, v) = self.opt.moments()?;
        for (i, (name, var)) in self.opt.vars().iter().enumerate() {
            tensors.push((format!("model.{name}"), var.as_tensor().clone()));
            tensors.push((format!("ema.{name}"), self.ema.weights()[i].clone()));
            tensors.push((format!("adam.m.{name}"), m[i].clone()));
            tensors.push((format!("adam.v.{name}"), v[i].clone()));
        }
        let state = TrainState {
            step: self.step(),
            epoch: self.epoch,
            batch_in_epoch: self.batch_in_epoch,
            rng: self.rng.state(),
            elapsed_s: self.elapsed_s,
            config: self.config.clone(),
            period: self.period,
            plan: self.budget_plan,
            budget: self.budget_state,
        };
        checkpoint::save(path, &self.card, Some(&state), tensors)
    }
}

impl Trainer<UNet> {
    /// A fresh U-Net with seeded initial weights ([`Trainer::for_network`] for any other
    /// network).
    pub fn new(card: ModelCard, config: TrainConfig, device: &Device) -> Result<Self> {
        Self::for_network(card, config, device)
    }

    /// [`Trainer::resume_network_with`] for a U-Net's checkpoint.
    pub fn resume_with(
        path: &std::path::Path,
        device: &Device,
        overrides: &ResumeOverrides,
    ) -> Result<(Self, Option<(f64, f64)>)> {
        Self::resume_network_with(path, device, overrides)
    }

    /// [`Trainer::resume_network`] for a U-Net's checkpoint.
    pub fn resume(
        path: &std::path::Path,
        device: &Device,
        update: impl FnOnce(&mut TrainConfig),
    ) -> Result<Self> {
        Self::resume_network(path, device, update)
    }

    /// Selects the U-Net's kernel implementation ([`ddpm_unet::Kernels::Fast`] by default).
    pub fn set_kernels(&mut self, kernels: ddpm_unet::Kernels) {
        self.model = self.model.clone().with_kernels(kernels);
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use ddpm_core::Prediction;

    fn tiny_card(prediction: Prediction) -> ModelCard {
        ModelCard {
            model: ddpm_unet::UNetConfig {
                channel_mults: vec![1],
                attention_levels: vec![],
                ..ddpm_unet::UNetConfig::tiny()
            },
            schedule: ddpm_schedule::ScheduleConfig::default(),
            data: DataInfo::mnist_sized(4, 4),
            prediction,
            distilled: None,
        }
    }

    /// The training loss against the formula computed on the host in f64: the target of the
    /// card's prediction, the per-sample min-SNR weight, the mean over pixels, then samples.
    #[test]
    fn weighted_losses_match_the_formula_by_hand() {
        let mut rng = SeededNoise::new(3);
        let b = 3;
        let ts = [5u32, 300, 900];
        let x0v = rng.randn_vec(b * 16);
        let nv = rng.randn_vec(b * 16);
        for prediction in [Prediction::Epsilon, Prediction::V] {
            for weighting in [LossWeighting::Uniform, LossWeighting::MinSnr { gamma: 5.0 }] {
                let config = TrainConfig {
                    loss_weighting: weighting,
                    ..TrainConfig::default()
                };
                let tr = Trainer::new(tiny_card(prediction), config, &Device::Cpu).unwrap();
                let x0 = Tensor::from_vec(x0v.clone(), (b, 1, 4, 4), &Device::Cpu).unwrap();
                let noise = Tensor::from_vec(nv.clone(), (b, 1, 4, 4), &Device::Cpu).unwrap();
                let t = Tensor::new(&ts, &Device::Cpu).unwrap();
                let y = Tensor::new(&[1u32, 2, 10], &Device::Cpu).unwrap();
                let x_t = tr.schedule.add_noise_from_host(&x0, &noise, &ts).unwrap();
                let drawn = loss::Drawn {
                    ts: ts.to_vec(),
                    t: t.clone(),
                    noise: noise.clone(),
                    x_t: x_t.clone(),
                    labels: Some(y.clone()),
                };
                let output = tr.model.forward_train(&x_t, &t, Some(&y)).unwrap();
                let got = tr
                    .objective()
                    .loss(&tr.schedule, &x0, &drawn, &output)
                    .unwrap()
                    .to_scalar::<f32>()
                    .unwrap() as f64;
                // The network's output, then everything else by hand.
                let out: Vec<f32> = output.flatten_all().unwrap().to_vec1().unwrap();
                let ac = tr.schedule.alphas_cumprod();
                let mut want = 0.0;
                for (i, &ti) in ts.iter().enumerate() {
                    let abar = ac[ti as usize];
                    let (a, s) = (abar.sqrt(), (1.0 - abar).sqrt());
                    let snr = abar / (1.0 - abar);
                    let w = match (weighting, prediction) {
                        (LossWeighting::Uniform, _) => 1.0,
                        (_, Prediction::Epsilon) => snr.min(5.0) / snr,
                        (_, Prediction::V) => snr.min(5.0) / (snr + 1.0),
                    };
                    let mut se = 0.0;
                    for p in 0..16 {
                        let k = i * 16 + p;
                        let (x, e) = (x0v[k] as f64, nv[k] as f64);
                        let target = match prediction {
                            Prediction::Epsilon => e,
                            Prediction::V => a * e - s * x,
                        };
                        se += (out[k] as f64 - target).powi(2);
                    }
                    want += w * se / 16.0;
                }
                want /= b as f64;
                assert!(
                    (got - want).abs() < 1e-5 * want.max(1e-3),
                    "{prediction:?} {weighting:?}: got {got}, want {want}"
                );
            }
        }
    }

    /// For v-prediction the held-out loss is still the ε-MSE: ε̂ = √ᾱ·v̂ + √(1−ᾱ)·x_t.
    #[test]
    fn held_out_loss_of_a_v_model_is_an_epsilon_mse() {
        let tr = Trainer::new(
            tiny_card(Prediction::V),
            TrainConfig::default(),
            &Device::Cpu,
        )
        .unwrap();
        let mut rng = SeededNoise::new(4);
        let x0 = rng
            .randn(&(2, 1, 4, 4).into(), DType::F32, &Device::Cpu)
            .unwrap();
        let noise = rng
            .randn(&(2, 1, 4, 4).into(), DType::F32, &Device::Cpu)
            .unwrap();
        let ts = [10u32, 700];
        let t = Tensor::new(&ts, &Device::Cpu).unwrap();
        let got = tr
            .loss(&x0, &ts, &noise, None)
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        let x_t = tr.schedule.add_noise(&x0, &noise, &t).unwrap();
        let v: Vec<f32> = tr
            .model
            .forward_t(&x_t, &t, None, false)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap();
        let xt: Vec<f32> = x_t.flatten_all().unwrap().to_vec1().unwrap();
        let e: Vec<f32> = noise.flatten_all().unwrap().to_vec1().unwrap();
        let ac = tr.schedule.alphas_cumprod();
        let mut want = 0.0f64;
        for k in 0..32 {
            let abar = ac[ts[k / 16] as usize];
            let eps = abar.sqrt() * v[k] as f64 + (1.0 - abar).sqrt() * xt[k] as f64;
            want += (eps - e[k] as f64).powi(2);
        }
        want /= 32.0;
        assert!((got as f64 - want).abs() < 1e-5, "{got} vs {want}");
    }
}
