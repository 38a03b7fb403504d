//! Safetensors checkpoints that carry their own configuration.
//!
//! Tensors: `model.<name>` (raw weights), `ema.<name>` (EMA weights), `adam.m.<name>` and
//! `adam.v.<name>` (optimizer moments). A sampling-only export holds just `ema.<name>`.
//! Metadata: `ddpm.format` = [`FORMAT`], `ddpm.card` = the [`ModelCard`] as JSON, and,
//! for training checkpoints, `ddpm.train` = the [`TrainState`] as JSON.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use candle_nn::VarBuilder;
use ddpm_core::NoiseState;
use ddpm_schedule::ScheduleConfig;
use ddpm_unet::{UNet, UNetConfig};
use serde::{Deserialize, Serialize};

use crate::error::{Result, TrainError};
use crate::TrainConfig;

/// Format tag written into every checkpoint.
pub const FORMAT: &str = "ddpm-rs/1";

/// What the data looked like: enough to sample without the dataset.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DataInfo {
    /// `mnist`, `fashion-mnist` or `folder:PATH`.
    pub dataset: String,
    /// Image channels.
    pub channels: usize,
    /// Image height.
    pub height: usize,
    /// Image width.
    pub width: usize,
    /// Class names in label order.
    pub class_names: Vec<String>,
}

/// Everything needed to rebuild and sample a model: architecture, schedule and data shape.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ModelCard {
    /// The U-Net.
    pub model: UNetConfig,
    /// The noise schedule.
    pub schedule: ScheduleConfig,
    /// The data.
    pub data: DataInfo,
    /// What the network predicts (ε or v); cards written before this field read as ε.
    #[serde(default)]
    pub prediction: ddpm_core::Prediction,
}

/// The largest image side a model card may declare (a bound against crafted cards that would
/// make sampling allocate without limit; MNIST is 28, the largest image folders here 256).
pub const MAX_IMAGE_SIDE: usize = 4096;
/// The most image channels a model card may declare.
pub const MAX_CHANNELS: usize = 4;
/// The most diffusion steps a schedule in a model card may declare.
pub const MAX_TIMESTEPS: usize = 100_000;
/// The most channels a model card's U-Net may have at any level.
pub const MAX_MODEL_CHANNELS: usize = 8192;

impl ModelCard {
    /// Checks the card on its own, before anything is allocated from it: sizes within sane
    /// bounds ([`MAX_IMAGE_SIDE`], [`MAX_CHANNELS`], [`MAX_TIMESTEPS`],
    /// [`MAX_MODEL_CHANNELS`]), the data's channels and classes equal to the network's, and
    /// the image size one the U-Net can take. The reason names the field at fault.
    pub fn validate(&self) -> std::result::Result<(), String> {
        let d = &self.data;
        let m = &self.model;
        if d.height == 0 || d.width == 0 || d.height > MAX_IMAGE_SIDE || d.width > MAX_IMAGE_SIDE {
            return Err(format!(
                "the card's image size {}×{} is outside 1..={MAX_IMAGE_SIDE}",
                d.height, d.width
            ));
        }
        if d.channels == 0 || d.channels > MAX_CHANNELS {
            return Err(format!(
                "the card's {} image channels are outside 1..={MAX_CHANNELS}",
                d.channels
            ));
        }
        if m.in_channels != d.channels {
            return Err(format!(
                "the card's network takes {} channels but its data has {}",
                m.in_channels, d.channels
            ));
        }
        if m.num_classes != 0 && m.num_classes != d.class_names.len() {
            return Err(format!(
                "the card's network has {} classes but its data names {}",
                m.num_classes,
                d.class_names.len()
            ));
        }
        let widest = m
            .channel_mults
            .iter()
            .map(|&k| k.saturating_mul(m.base_channels))
            .max()
            .unwrap_or(0);
        if widest > MAX_MODEL_CHANNELS || m.channel_mults.len() > 8 {
            return Err(format!(
                "the card's network ({} levels, up to {widest} channels) is beyond any model \
                 this crate trains (at most 8 levels and {MAX_MODEL_CHANNELS} channels)",
                m.channel_mults.len()
            ));
        }
        m.validate()
            .map_err(|e| format!("the card's network: {e}"))?;
        m.check_image_size(d.height, d.width)
            .map_err(|e| format!("the card's image size: {e}"))?;
        let t = self.schedule.num_timesteps;
        if t == 0 || t > MAX_TIMESTEPS {
            return Err(format!(
                "the card's schedule has {t} steps, outside 1..={MAX_TIMESTEPS}"
            ));
        }
        Ok(())
    }

    /// `net` (this card's network) as an ε-predicting denoiser for the samplers: v-prediction
    /// is converted with `schedule`'s ᾱ ([`ddpm_sampler::Parameterized`]).
    pub fn denoiser<D: ddpm_core::Denoiser>(
        &self,
        net: D,
        schedule: &dyn ddpm_core::NoiseSchedule,
    ) -> ddpm_sampler::Parameterized<D> {
        ddpm_sampler::Parameterized::new(net, self.prediction, schedule)
    }
}

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

/// Which weights to load for sampling.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Weights {
    /// The exponential moving average (the default for sampling).
    #[default]
    Ema,
    /// The raw optimizer weights.
    Raw,
}

impl Weights {
    fn prefix(self) -> &'static str {
        match self {
            Weights::Ema => "ema.",
            Weights::Raw => "model.",
        }
    }
}

/// A checkpoint read from disk.
#[derive(Debug)]
pub struct Checkpoint {
    /// The file it was read from.
    pub path: PathBuf,
    /// Its model card.
    pub card: ModelCard,
    /// The training state, for training checkpoints.
    pub train: Option<TrainState>,
    /// All tensors by name.
    pub tensors: HashMap<String, Tensor>,
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

/// Serialises tensors and metadata into a checkpoint at `path` (atomically).
pub fn save(
    path: &Path,
    card: &ModelCard,
    train: Option<&TrainState>,
    tensors: Vec<(String, Tensor)>,
) -> Result<()> {
    let mut meta = HashMap::new();
    meta.insert("ddpm.format".to_string(), FORMAT.to_string());
    meta.insert("ddpm.card".to_string(), to_json(path, card)?);
    if let Some(t) = train {
        meta.insert("ddpm.train".to_string(), to_json(path, t)?);
    }
    let tensors: Vec<(String, Tensor)> = tensors
        .into_iter()
        .map(|(n, t)| Ok((n, t.to_device(&Device::Cpu)?)))
        .collect::<Result<_>>()?;
    let bytes = safetensors::serialize(tensors, Some(meta))
        .map_err(|e| ckpt_err(path, format!("cannot serialise: {e}")))?;
    write_atomic(path, &bytes)
}

fn to_json<T: Serialize>(path: &Path, v: &T) -> Result<String> {
    serde_json::to_string(v).map_err(|e| ckpt_err(path, e.to_string()))
}

/// Reads a checkpoint, checking its format and configuration.
pub fn read(path: &Path, device: &Device) -> Result<Checkpoint> {
    let bytes = std::fs::read(path).map_err(|e| {
        if e.kind() == std::io::ErrorKind::NotFound {
            ckpt_err(
                path,
                "does not exist. Train a model with `cargo xtask train` or pass --checkpoint PATH",
            )
        } else {
            TrainError::Io {
                path: path.to_path_buf(),
                source: e,
            }
        }
    })?;
    let (_, meta) = safetensors::SafeTensors::read_metadata(&bytes).map_err(|e| {
        ckpt_err(
            path,
            format!("not a readable safetensors file (truncated or corrupt?): {e}"),
        )
    })?;
    let md = meta.metadata().clone().unwrap_or_default();
    match md.get("ddpm.format") {
        Some(f) if f == FORMAT => {}
        Some(f) => {
            return Err(ckpt_err(
                path,
                format!("format `{f}` is not supported (expected {FORMAT})"),
            ))
        }
        None => {
            return Err(ckpt_err(
                path,
                "not a ddpm-rs checkpoint (no ddpm.format metadata)",
            ))
        }
    }
    let card: ModelCard = md
        .get("ddpm.card")
        .ok_or_else(|| ckpt_err(path, "has no model card (ddpm.card metadata)"))
        .and_then(|s| {
            serde_json::from_str(s).map_err(|e| ckpt_err(path, format!("bad model card: {e}")))
        })?;
    card.validate()
        .map_err(|reason| ckpt_err(path, format!("has an invalid model card: {reason}")))?;
    let train = md
        .get("ddpm.train")
        .map(|s| {
            serde_json::from_str(s).map_err(|e| ckpt_err(path, format!("bad training state: {e}")))
        })
        .transpose()?;
    let tensors = candle_core::safetensors::load_buffer(&bytes, device).map_err(|e| {
        ckpt_err(
            path,
            format!("cannot read tensors (truncated or corrupt?): {e}"),
        )
    })?;
    Ok(Checkpoint {
        path: path.to_path_buf(),
        card,
        train,
        tensors,
    })
}

impl Checkpoint {
    /// The tensors under `prefix`, with the prefix stripped.
    pub fn group(&self, prefix: &str) -> HashMap<String, Tensor> {
        self.tensors
            .iter()
            .filter_map(|(k, v)| k.strip_prefix(prefix).map(|n| (n.to_string(), v.clone())))
            .collect()
    }

    /// Builds the U-Net with the chosen weights (EMA falls back to an error if absent).
    pub fn unet(&self, which: Weights, device: &Device) -> Result<UNet> {
        let weights = self.group(which.prefix());
        if weights.is_empty() {
            return Err(ckpt_err(
                &self.path,
                format!("holds no `{}*` weights", which.prefix()),
            ));
        }
        let weights = weights
            .into_iter()
            .map(|(k, v)| Ok((k, v.to_dtype(DType::F32)?)))
            .collect::<Result<HashMap<_, _>>>()?;
        let vb = VarBuilder::from_tensors(weights, DType::F32, device);
        UNet::new(&self.card.model, vb).map_err(|e| {
            ckpt_err(
                &self.path,
                format!("weights do not match its model config: {e}"),
            )
        })
    }
}

/// Reads `path` and builds its U-Net: the usual entry point for sampling.
pub fn load_unet(path: &Path, which: Weights, device: &Device) -> Result<(UNet, ModelCard)> {
    let ckpt = read(path, device)?;
    let unet = ckpt.unet(which, device)?;
    Ok((unet, ckpt.card))
}

/// Writes a sampling-only checkpoint: the EMA weights (as `dtype`, e.g. F16 to halve the
/// size) and the model card.
pub fn export_ema(src: &Checkpoint, dst: &Path, dtype: DType) -> Result<()> {
    let mut tensors: Vec<(String, Tensor)> = Vec::new();
    for (name, t) in src.group("ema.") {
        tensors.push((format!("ema.{name}"), t.to_dtype(dtype)?));
    }
    if tensors.is_empty() {
        return Err(ckpt_err(&src.path, "holds no EMA weights to export"));
    }
    save(dst, &src.card, None, tensors)
}
