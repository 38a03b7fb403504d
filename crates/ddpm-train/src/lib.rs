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
//!     data: DataInfo { dataset: "mnist".into(), channels: 1, height: 8, width: 8,
//!                      class_names: (0..10).map(|d| d.to_string()).collect() },
//! };
//! let mut trainer = Trainer::new(card, TrainConfig { batch_size: 4, ..TrainConfig::default() }, &Device::Cpu)?;
//! let x0 = candle_core::Tensor::zeros((4, 1, 8, 8), candle_core::DType::F32, &Device::Cpu)?;
//! let y = candle_core::Tensor::new(&[0u32, 1, 2, 3], &Device::Cpu)?;
//! let loss = trainer.train_step(&ddpm_data::Batch { images: x0, labels: y })?;
//! assert!(loss.is_finite());
//! assert_eq!(trainer.step(), 1);
//! # Ok::<(), ddpm_train::TrainError>(())
//! ```

pub mod checkpoint;
mod error;
mod fit;
pub mod optim;
pub mod viz;

use candle_core::{DType, Device, Tensor, Var};
use candle_nn::{VarBuilder, VarMap};
use ddpm_core::{NoiseSchedule, NoiseSource, SeededNoise};
use ddpm_data::Batch;
use ddpm_schedule::Schedule;
use ddpm_unet::UNet;
use serde::{Deserialize, Serialize};

pub use checkpoint::{load_unet, DataInfo, ModelCard, TrainState, Weights};
pub use error::{Result, TrainError};
pub use fit::{
    checkpoint_path, fit, metrics_path, plot_metrics, read_metrics, write_sample_grid, EpochReport,
    FitData, FitOutcome, StepReport, TrainObserver,
};
use optim::{AdamW, AdamWConfig, Ema};

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
        }
    }
}

impl TrainConfig {
    /// Checks the options.
    pub fn validate(&self) -> Result<()> {
        let bad = |m: String| Err(TrainError::Config(m));
        if self.autocast == Some(ddpm_unet::Autocast::F16) {
            return bad(
                "f16 autocast training needs loss scaling, which ddpm-train does not do: use bf16"
                    .into(),
            );
        }
        if self.batch_size == 0 {
            return bad("--batch-size must be at least 1".into());
        }
        if !(self.lr.is_finite() && self.lr > 0.0) {
            return bad(format!("--lr must be a positive number, got {}", self.lr));
        }
        if !(0.0..=1.0).contains(&self.p_uncond) {
            return bad(format!(
                "--p-uncond must lie in [0, 1], got {}",
                self.p_uncond
            ));
        }
        if !(0.0..1.0).contains(&self.ema_decay) {
            return bad(format!(
                "--ema-decay must lie in [0, 1), got {}",
                self.ema_decay
            ));
        }
        if self.grad_clip.is_some_and(|c| !(c.is_finite() && c > 0.0)) {
            return bad("gradient clipping must be a positive number".into());
        }
        if !self.sample_guidance.is_finite() {
            return bad("the sample-grid guidance must be finite".into());
        }
        Ok(())
    }

    /// The learning rate at `step` of a run of `total_steps`.
    pub fn lr_at(&self, step: u64, total_steps: u64) -> f64 {
        let warm = if self.warmup_steps > 0 {
            ((step + 1) as f64 / self.warmup_steps as f64).min(1.0)
        } else {
            1.0
        };
        let decay = if self.cosine_decay && total_steps > self.warmup_steps {
            let p = (step.saturating_sub(self.warmup_steps) as f64
                / (total_steps - self.warmup_steps) as f64)
                .min(1.0);
            0.5 * (1.0 + (std::f64::consts::PI * p).cos())
        } else {
            1.0
        };
        self.lr * warm * decay
    }
}

/// Initialises every variable from a seeded host RNG (candle's CPU RNG cannot be seeded):
/// conv/linear weights U(±1/√fan_in) (PyTorch's default), embeddings N(0, 1),
/// GroupNorm scale 1, biases 0.
fn seeded_init(vars: &[(String, Var)], seed: u64) -> Result<()> {
    let mut rng = SeededNoise::new(seed ^ 0x5EED_1417);
    for (name, var) in vars {
        let shape = var.shape().clone();
        let n = shape.elem_count();
        let dims = shape.dims();
        let data: Vec<f32> = if name.starts_with("class_embed") {
            rng.randn_vec(n)
        } else if name.contains("norm") && name.ends_with("weight") {
            vec![1.0; n]
        } else if name.ends_with("bias") {
            vec![0.0; n]
        } else {
            let fan_in: usize = dims.iter().skip(1).product::<usize>().max(1);
            let bound = 1.0 / (fan_in as f32).sqrt();
            rng.uniform_f32(n)
                .into_iter()
                .map(|u| (2.0 * u - 1.0) * bound)
                .collect()
        };
        var.set(&Tensor::from_vec(data, shape, var.device())?)?;
    }
    Ok(())
}

/// A model under training with its optimizer, EMA and random state.
pub struct Trainer {
    card: ModelCard,
    config: TrainConfig,
    device: Device,
    model: UNet,
    schedule: Schedule,
    opt: AdamW,
    ema: Ema,
    rng: SeededNoise,
    pub(crate) epoch: u64,
    pub(crate) batch_in_epoch: u64,
    pub(crate) elapsed_s: f64,
    steps_per_epoch: u64,
}

impl std::fmt::Debug for Trainer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Trainer")
            .field("card", &self.card)
            .field("step", &self.step())
            .finish_non_exhaustive()
    }
}

impl Trainer {
    /// A fresh model with seeded initial weights.
    pub fn new(card: ModelCard, config: TrainConfig, device: &Device) -> Result<Self> {
        config.validate()?;
        card.model
            .check_image_size(card.data.height, card.data.width)
            .map_err(|e| TrainError::Config(e.to_string()))?;
        if card.model.in_channels != card.data.channels {
            return Err(TrainError::Config(format!(
                "the model has {} input channels, the data {}",
                card.model.in_channels, card.data.channels
            )));
        }
        if card.model.num_classes != 0 && card.model.num_classes != card.data.class_names.len() {
            return Err(TrainError::Config(format!(
                "the model has {} classes, the data {}",
                card.model.num_classes,
                card.data.class_names.len()
            )));
        }
        let schedule = card
            .schedule
            .build()
            .map_err(|e| TrainError::Config(e.to_string()))?;
        let varmap = VarMap::new();
        if let Some(a) = config.autocast {
            a.check_device(device).map_err(TrainError::Config)?;
        }
        let vb = VarBuilder::from_varmap(&varmap, DType::F32, device);
        let model = UNet::new(&card.model, vb)
            .and_then(|m| m.with_autocast(config.autocast.map(|a| a.dtype())))
            .map_err(|e| TrainError::Config(e.to_string()))?;
        let mut vars: Vec<(String, Var)> = varmap
            .data()
            .lock()
            .map_err(|_| TrainError::Config("variable map poisoned".into()))?
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        vars.sort_by(|a, b| a.0.cmp(&b.0));
        seeded_init(&vars, config.seed)?;
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
            steps_per_epoch: 0,
        })
    }

    /// Continues a run from a training checkpoint. `update` may change options that do
    /// not alter the run so far (e.g. epochs, max_steps); the rest comes from the checkpoint.
    pub fn resume(
        path: &std::path::Path,
        device: &Device,
        update: impl FnOnce(&mut TrainConfig),
    ) -> Result<Self> {
        let ckpt = checkpoint::read(path, device)?;
        let state = ckpt.train.clone().ok_or_else(|| TrainError::Checkpoint {
            path: path.to_path_buf(),
            reason: "is a sampling-only export without training state; resume needs a training checkpoint".into(),
        })?;
        let mut config = state.config.clone();
        update(&mut config);
        let mut t = Self::new(ckpt.card.clone(), config, device)?;
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
        Ok(t)
    }

    /// Optimizer steps taken.
    pub fn step(&self) -> u64 {
        self.opt.step_count()
    }
    /// The current epoch (0-based).
    pub fn epoch(&self) -> u64 {
        self.epoch
    }
    /// The model card.
    pub fn card(&self) -> &ModelCard {
        &self.card
    }
    /// The training options.
    pub fn config(&self) -> &TrainConfig {
        &self.config
    }
    /// Selects the U-Net's kernel implementation ([`ddpm_unet::Kernels::Fast`] by default).
    pub fn set_kernels(&mut self, kernels: ddpm_unet::Kernels) {
        self.model = self.model.clone().with_kernels(kernels);
    }
    /// The model with its current (raw) weights.
    pub fn model(&self) -> &UNet {
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

    /// A U-Net holding the EMA weights (what sampling uses), with the training model's kernels
    /// and autocast.
    pub fn ema_model(&self) -> Result<UNet> {
        let map = self
            .opt
            .vars()
            .iter()
            .zip(self.ema.weights())
            // A snapshot: the average is updated in place by later steps.
            .map(|((n, _), w)| Ok((n.clone(), w.copy()?)))
            .collect::<candle_core::Result<_>>()?;
        Ok(UNet::new(
            &self.card.model,
            VarBuilder::from_tensors(map, DType::F32, &self.device),
        )?
        .with_kernels(self.model.kernels())
        .with_autocast(self.model.autocast())?)
    }

    fn labels_with_dropout(&mut self, labels: &Tensor) -> Result<Option<Tensor>> {
        if self.card.model.num_classes == 0 {
            return Ok(None);
        }
        let b = labels.dim(0)?;
        let null = self.card.model.num_classes as u32;
        let u = self.rng.uniform_f32(b);
        let mut l: Vec<u32> = labels.to_dtype(DType::U32)?.to_vec1()?;
        for (li, ui) in l.iter_mut().zip(u) {
            if (ui as f64) < self.config.p_uncond {
                *li = null;
            }
        }
        Ok(Some(Tensor::from_vec(l, b, &self.device)?))
    }

    /// The ε-prediction loss of the raw model on a batch with the given t, noise and labels.
    pub fn loss(
        &self,
        x0: &Tensor,
        t: &Tensor,
        noise: &Tensor,
        labels: Option<&Tensor>,
        train: bool,
    ) -> Result<Tensor> {
        let x_t = self.schedule.add_noise(x0, noise, t)?;
        self.loss_at(&x_t, t, noise, labels, train)
    }

    /// The loss from `x_t` already noised (the training loop noises with host-side timesteps).
    fn loss_at(
        &self,
        x_t: &Tensor,
        t: &Tensor,
        noise: &Tensor,
        labels: Option<&Tensor>,
        train: bool,
    ) -> Result<Tensor> {
        let eps = self.model.forward_t(x_t, t, labels, train)?;
        Ok(candle_nn::loss::mse(&eps, noise)?)
    }

    /// One optimizer step on `batch`; returns the loss before the update.
    ///
    /// A NaN or infinite loss is an error and leaves the weights untouched.
    pub fn train_step(&mut self, batch: &Batch) -> Result<f32> {
        let x0 = batch.images.to_device(&self.device)?;
        let b = x0.dim(0)?;
        let t_total = self.schedule.num_train_timesteps() as u32;
        let ts = self.rng.uniform_u32(b, t_total);
        let t = Tensor::new(ts.as_slice(), &self.device)?;
        let noise = self.rng.randn(x0.shape(), DType::F32, &self.device)?;
        let labels = self.labels_with_dropout(&batch.labels)?;
        // Timesteps checked on the host: no device read-back before the forward pass.
        let x_t = self.schedule.add_noise_from_host(&x0, &noise, &ts)?;
        let loss = self.loss_at(&x_t, &t, &noise, labels.as_ref(), true)?;
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
        let lr = self.config.lr_at(self.step(), self.total_steps_hint());
        self.opt.step(&grads, lr, scale)?;
        self.ema.update(self.opt.vars(), self.step())?;
        Ok(value)
    }

    /// Tells the trainer how many batches an epoch has (for the cosine decay's length).
    pub fn set_steps_per_epoch(&mut self, n: u64) {
        self.steps_per_epoch = n;
    }

    /// Total steps of the run for the cosine decay: `max_steps`, else epochs × batches
    /// (set by [`fit`] through `set_steps_per_epoch`).
    fn total_steps_hint(&self) -> u64 {
        let by_epochs = self.config.epochs.saturating_mul(self.steps_per_epoch);
        match self.config.max_steps {
            Some(m) if by_epochs > 0 => m.min(by_epochs),
            Some(m) => m,
            None => by_epochs,
        }
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
            let t = Tensor::from_vec(rng.uniform_u32(len, t_total), len, &self.device)?;
            let noise = rng.randn(xb.shape(), DType::F32, &self.device)?;
            let yb = labels.narrow(0, start, len)?;
            let y = (self.card.model.num_classes > 0).then_some(&yb);
            let l = self.loss(&xb, &t, &noise, y, false)?.to_scalar::<f32>()?;
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
        };
        checkpoint::save(path, &self.card, Some(&state), tensors)
    }
}
