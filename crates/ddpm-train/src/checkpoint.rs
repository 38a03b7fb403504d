//! Training checkpoints: a model file ([`ddpm_unet::file`]) plus what training needs to
//! continue exactly.
//!
//! Beyond the model file's `model.<name>` and `ema.<name>` weights, a training checkpoint holds
//! the optimizer moments `adam.m.<name>` and `adam.v.<name>`, and its metadata adds
//! `ddpm.train` = the [`TrainState`] as JSON. Reading, validating and building the U-Net
//! belong to the model file and live beside the U-Net; this module adds the training state.

use std::path::Path;

use candle_core::{DType, Device, Tensor};
use ddpm_core::NoiseState;
pub use ddpm_unet::file::{
    DataInfo, ModelCard, ModelFile, Weights, FORMAT, MAX_CHANNELS, MAX_IMAGE_SIDE,
    MAX_MODEL_CHANNELS, MAX_TIMESTEPS,
};
use serde::{Deserialize, Serialize};

use crate::error::{Result, TrainError};
use crate::{TrainConfig, Trainable};

/// The metadata key of the training state.
pub const TRAIN_STATE_KEY: &str = "ddpm.train";

/// Where a training run stands: enough to continue it exactly.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TrainState {
    /// Optimizer steps taken.
    pub step: u64,
    /// Current epoch (0-based).
    pub epoch: u64,
    /// Batches of `epoch` already consumed.
    pub batch_in_epoch: u64,
    /// The noise generator (timesteps, noise, class dropout).
    pub rng: NoiseState,
    /// Wall-clock seconds trained so far.
    pub elapsed_s: f64,
    /// The training options.
    pub config: TrainConfig,
    /// The running averages of the metrics line in progress, so that a resumed run writes the
    /// same `metrics.jsonl` as an uninterrupted one (absent in older checkpoints).
    #[serde(default)]
    pub period: PeriodState,
    /// A budgeted run's plan (absent for unbudgeted runs and in older checkpoints, whose plan
    /// is [`TrainConfig::budget_steps`]).
    #[serde(default)]
    pub plan: Option<crate::budget::Plan>,
    /// A budgeted run's standing against its budget (absent for unbudgeted runs).
    #[serde(default)]
    pub budget: Option<crate::budget::BudgetState>,
}

/// Sums since the last line of `metrics.jsonl`: what the next line averages.
#[derive(Debug, Clone, Copy, PartialEq, Default, Serialize, Deserialize)]
pub struct PeriodState {
    /// Sum of the step losses.
    pub loss_sum: f64,
    /// Steps summed.
    pub steps: u64,
    /// Images trained on.
    pub images: u64,
    /// Seconds spent in those steps.
    pub seconds: f64,
    /// Learning rate of the last step.
    pub lr: f64,
}

impl PeriodState {
    /// Adds a step: its loss, its images, its seconds and its learning rate.
    pub fn add(&mut self, loss: f32, images: u64, seconds: f64, lr: f64) {
        self.loss_sum += loss as f64;
        self.steps += 1;
        self.images += images;
        self.seconds += seconds;
        self.lr = lr;
    }
}

/// A training checkpoint read from disk: the model file and, when it has one, its training
/// state. Derefs to the [`ModelFile`] (card, tensors, [`ModelFile::unet`]).
#[derive(Debug)]
pub struct Checkpoint<M = ddpm_unet::UNetConfig> {
    /// The model file.
    pub file: ModelFile<M>,
    /// The training state, for training checkpoints (`None` for sampling-only exports).
    pub train: Option<TrainState>,
}

impl<M> std::ops::Deref for Checkpoint<M> {
    type Target = ModelFile<M>;
    fn deref(&self) -> &ModelFile<M> {
        &self.file
    }
}

impl<M> std::ops::DerefMut for Checkpoint<M> {
    fn deref_mut(&mut self) -> &mut ModelFile<M> {
        &mut self.file
    }
}

fn ckpt_err(path: &Path, reason: impl Into<String>) -> TrainError {
    TrainError::Checkpoint {
        path: path.to_path_buf(),
        reason: reason.into(),
    }
}

/// Writes `bytes` to `path` through a temporary file in the same folder, synced and then
/// renamed: `path` is either the old file or the complete new one, never a torn write.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    ddpm_core::write_atomic(path, bytes).map_err(|source| TrainError::Io {
        path: path.to_path_buf(),
        source,
    })
}

/// Serialises tensors, the card and the training state into a checkpoint at `path`
/// (atomically).
pub fn save<M: Serialize>(
    path: &Path,
    card: &ModelCard<M>,
    train: Option<&TrainState>,
    tensors: Vec<(String, Tensor)>,
) -> Result<()> {
    let extra = match train {
        Some(t) => vec![(
            TRAIN_STATE_KEY,
            serde_json::to_string(t).map_err(|e| ckpt_err(path, e.to_string()))?,
        )],
        None => Vec::new(),
    };
    Ok(ddpm_unet::file::save(path, card, &extra, tensors)?)
}

/// Reads a U-Net's checkpoint, checking its format, its card and its training state.
pub fn read(path: &Path, device: &Device) -> Result<Checkpoint> {
    read_as::<ddpm_unet::UNet>(path, device)
}

/// Reads a checkpoint of the network `N`, checking its format, its card
/// ([`Trainable::check_card`]) and its training state.
pub fn read_as<N: Trainable>(path: &Path, device: &Device) -> Result<Checkpoint<N::Config>> {
    let file = ddpm_unet::file::read_as(path, device, N::check_card)?;
    let train = file
        .metadata
        .get(TRAIN_STATE_KEY)
        .map(|s| {
            serde_json::from_str(s).map_err(|e| ckpt_err(path, format!("bad training state: {e}")))
        })
        .transpose()?;
    Ok(Checkpoint { file, train })
}

/// Writes a sampling-only checkpoint: the EMA weights (as `dtype`, e.g. F16 to halve the
/// size) and the model card ([`ModelFile::export_ema`]).
pub fn export_ema<M: Serialize>(src: &Checkpoint<M>, dst: &Path, dtype: DType) -> Result<()> {
    Ok(src.file.export_ema(dst, dtype)?)
}
