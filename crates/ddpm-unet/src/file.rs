//! Model files: safetensors checkpoints and exports that carry their own configuration, and
//! the U-Net built from them.
//!
//! Tensors: `model.<name>` (raw weights), `ema.<name>` (EMA weights) and, in training
//! checkpoints, whatever else the trainer keeps (`adam.m.<name>`, `adam.v.<name>`). A
//! sampling-only export holds just `ema.<name>`, in f32 or f16. Metadata: `ddpm.format` =
//! [`FORMAT`], `ddpm.card` = the [`ModelCard`] as JSON, and any further keys the writer adds
//! (the trainer's `ddpm.train`), kept in [`ModelFile::metadata`].
//!
//! ```
//! use candle_core::Device;
//! use ddpm_unet::file::{load_unet, Weights};
//!
//! // The model shipped in the repository's assets/ (doc tests run in crates/ddpm-unet).
//! let path = std::path::Path::new("../../assets/ddpm-mnist.safetensors");
//! let (unet, card) = load_unet(path, Weights::Ema, &Device::Cpu)?;
//! assert_eq!(card.data.class_names.len(), unet.config().num_classes);
//! # Ok::<(), ddpm_unet::file::ModelFileError>(())
//! ```

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use candle_nn::VarBuilder;
use ddpm_schedule::ScheduleConfig;
use serde::{Deserialize, Serialize};

use crate::{UNet, UNetConfig};

/// Why a model file could not be read or written.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ModelFileError {
    /// The file is missing, corrupt, of another format, or does not match its card.
    #[error("checkpoint {}: {reason}", path.display())]
    Invalid {
        /// The file.
        path: PathBuf,
        /// What is wrong and how to fix it.
        reason: String,
    },
    /// Reading or writing failed (a full disk lands here).
    #[error("cannot write or read {}: {source}", path.display())]
    Io {
        /// The file.
        path: PathBuf,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },
    /// A tensor operation failed while converting the weights.
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
}

fn invalid(path: &Path, reason: impl Into<String>) -> ModelFileError {
    ModelFileError::Invalid {
        path: path.to_path_buf(),
        reason: reason.into(),
    }
}

/// Format tag written into every checkpoint.
pub const FORMAT: &str = "ddpm-rs/1";

/// What the data looked like: enough to sample without the dataset.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DataInfo {
    /// `mnist`, `fashion-mnist` or `folder:PATH` (`folder-gray:`, `folder-rgb:`).
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

impl DataInfo {
    /// MNIST: one channel of 28×28, classes `0` to `9`.
    pub fn mnist() -> Self {
        Self::mnist_sized(28, 28)
    }

    /// MNIST's channel and classes at another image size (tests use small ones).
    pub fn mnist_sized(height: usize, width: usize) -> Self {
        Self {
            dataset: "mnist".into(),
            channels: 1,
            height,
            width,
            class_names: (0..10).map(|d| d.to_string()).collect(),
        }
    }
}

/// Everything needed to rebuild and sample a model: architecture, schedule and data shape.
///
/// `M` is the network's configuration: the U-Net's ([`UNetConfig`]) by default; a network of
/// one's own, trained with `ddpm-train`'s generic trainer, puts its own here, and its files
/// are read with [`read_as`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ModelCard<M = UNetConfig> {
    /// The network's configuration.
    pub model: M,
    /// The noise schedule.
    pub schedule: ScheduleConfig,
    /// The data.
    pub data: DataInfo,
    /// What the network predicts (ε or v); cards written before this field read as ε.
    #[serde(default)]
    pub prediction: ddpm_core::Prediction,
    /// What a distilled model is (`ddpm distill`); `None` for a model trained on data.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub distilled: Option<Distillation>,
}

/// The stage of a distilled model.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DistillStage {
    /// Stage 1 (Meng et al. 2023): the guided prediction with w as an input, one network
    /// call per step, for any sampler and number of steps.
    Guidance,
    /// Stage 2: progressive distillation (Salimans & Ho 2022) to a few DDIM steps.
    Progressive,
}

/// The card's account of a distilled model: what it learned and from which teacher.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Distillation {
    /// The stage that made it.
    pub stage: DistillStage,
    /// For a progressive student: the DDIM steps (trailing spacing) it was trained to sample
    /// in; `None` for a guidance student (any sampler, any steps).
    pub steps: Option<usize>,
    /// The lowest guidance weight it learned.
    pub w_min: f64,
    /// The highest guidance weight it learned.
    pub w_max: f64,
    /// The teacher's file name.
    pub teacher: String,
    /// The teacher file's SHA-256.
    pub teacher_sha256: String,
}

impl Distillation {
    /// Checks that `w` lies in the learned range; the message says which range.
    pub fn check_w(&self, w: f64) -> std::result::Result<(), String> {
        if w.is_finite() && w >= self.w_min - 1e-9 && w <= self.w_max + 1e-9 {
            Ok(())
        } else {
            Err(format!(
                "this distilled model learned guidance weights w in [{}, {}] (w is one of its \
                 inputs); w = {w} lies outside, choose one inside",
                self.w_min, self.w_max
            ))
        }
    }
}

/// The largest image side a model card may declare (a bound against crafted cards that would
/// make sampling allocate without limit; MNIST is 28, the largest image folders here 256).
pub const MAX_IMAGE_SIDE: usize = 4096;
/// The most image channels a model card may declare.
pub const MAX_CHANNELS: usize = 4;
/// The most classes a model card may name (each is a row of the trainer's grids and an
/// embedding row).
pub const MAX_CLASSES: usize = 10_000;
/// The largest model file [`read`] reads (the `mnist` preset's training checkpoint is 58 MB).
pub const MAX_FILE_BYTES: u64 = 16 << 30;
/// The most diffusion steps a schedule in a model card may declare.
pub const MAX_TIMESTEPS: usize = ddpm_schedule::MAX_TIMESTEPS;
/// The most channels a model card's U-Net may have at any level.
pub const MAX_MODEL_CHANNELS: usize = 8192;

impl<M> ModelCard<M> {
    /// Checks the parts of the card every network shares, before anything is allocated from
    /// it: the image size and channels within bounds ([`MAX_IMAGE_SIDE`], [`MAX_CHANNELS`]),
    /// at most [`MAX_CLASSES`] class names, each safe in a file name and on a terminal
    /// ([`ddpm_core::files::check_name`]; a card is untrusted input) and unique, a printable
    /// dataset name, and a schedule of at most [`MAX_TIMESTEPS`] steps. The reason names the
    /// field at fault.
    pub fn validate_data(&self) -> std::result::Result<(), String> {
        let d = &self.data;
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
        if d.class_names.len() > MAX_CLASSES {
            return Err(format!(
                "the card names {} classes, more than {MAX_CLASSES}",
                d.class_names.len()
            ));
        }
        for (i, name) in d.class_names.iter().enumerate() {
            ddpm_core::files::check_name(name)
                .map_err(|e| format!("the card's class name {i} {e}"))?;
            if d.class_names[..i].contains(name) {
                return Err(format!(
                    "the card names class `{name}` twice (classes {} and {i})",
                    d.class_names[..i]
                        .iter()
                        .position(|n| n == name)
                        .unwrap_or(0)
                ));
            }
        }
        if d.dataset.is_empty() || d.dataset.len() > 4096 || d.dataset.chars().any(char::is_control)
        {
            return Err(format!(
                "the card's dataset name `{}` is empty, too long or holds a control character",
                d.dataset.escape_debug()
            ));
        }
        let t = self.schedule.num_timesteps;
        if t == 0 || t > MAX_TIMESTEPS {
            return Err(format!(
                "the card's schedule has {t} steps, outside 1..={MAX_TIMESTEPS}"
            ));
        }
        if let Some(dist) = &self.distilled {
            let (lo, hi) = (dist.w_min, dist.w_max);
            if !(lo.is_finite() && hi.is_finite() && lo <= hi) {
                return Err(format!(
                    "the card's distilled.w_min/w_max [{lo}, {hi}] is not a finite ordered range"
                ));
            }
            if dist.steps.is_some_and(|n| n == 0 || n > t) {
                return Err(format!(
                    "the card's distilled.steps {:?} is outside 1..={t} (the schedule's T)",
                    dist.steps
                ));
            }
            if dist.teacher.len() > 4096 || dist.teacher.chars().any(char::is_control) {
                return Err(
                    "the card's distilled.teacher is too long or holds a control character".into(),
                );
            }
        }
        Ok(())
    }
}

impl ModelCard {
    /// Checks the card on its own, before anything is allocated from it: sizes within sane
    /// bounds ([`MAX_IMAGE_SIDE`], [`MAX_CHANNELS`], [`MAX_TIMESTEPS`],
    /// [`MAX_MODEL_CHANNELS`], [`MAX_CLASSES`]), the data's channels and classes equal to the
    /// network's, class names that are safe in a file name and on a terminal
    /// ([`ddpm_core::files::check_name`]; a card is untrusted input) and unique, and the image
    /// size one the U-Net can take. The reason names the field at fault.
    pub fn validate(&self) -> std::result::Result<(), String> {
        self.validate_data()?;
        let d = &self.data;
        let m = &self.model;
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
        Ok(())
    }
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
    /// The tensor-name prefix of these weights in a model file (`ema.` or `model.`).
    pub fn prefix(self) -> &'static str {
        match self {
            Weights::Ema => "ema.",
            Weights::Raw => "model.",
        }
    }
}

/// A model file read from disk: its card, its metadata and all its tensors. `M` is the
/// network's configuration ([`ModelCard`]).
#[derive(Debug)]
pub struct ModelFile<M = UNetConfig> {
    /// The file it was read from.
    pub path: PathBuf,
    /// Its model card.
    pub card: ModelCard<M>,
    /// Every metadata entry (`ddpm.format`, `ddpm.card`, and what else the writer added).
    pub metadata: HashMap<String, String>,
    /// All tensors by name, as stored (f32 or f16).
    pub tensors: HashMap<String, Tensor>,
}

/// Serialises `tensors`, the card and `extra` metadata into a model file at `path`, written
/// atomically ([`ddpm_core::write_atomic`]): `path` is either the old file or the new one.
pub fn save<M: Serialize>(
    path: &Path,
    card: &ModelCard<M>,
    extra: &[(&str, String)],
    tensors: Vec<(String, Tensor)>,
) -> Result<(), ModelFileError> {
    let mut meta = HashMap::new();
    meta.insert("ddpm.format".to_string(), FORMAT.to_string());
    let card_json = serde_json::to_string(card).map_err(|e| invalid(path, e.to_string()))?;
    meta.insert("ddpm.card".to_string(), card_json);
    for (k, v) in extra {
        meta.insert((*k).to_string(), v.clone());
    }
    let tensors: Vec<(String, Tensor)> = tensors
        .into_iter()
        .map(|(n, t)| Ok((n, t.to_device(&Device::Cpu)?)))
        .collect::<Result<_, ModelFileError>>()?;
    let bytes = safetensors::serialize(tensors, Some(meta))
        .map_err(|e| invalid(path, format!("cannot serialise: {e}")))?;
    ddpm_core::write_atomic(path, &bytes).map_err(|source| ModelFileError::Io {
        path: path.to_path_buf(),
        source,
    })
}

/// The bytes of a model file: a regular file of at most [`MAX_FILE_BYTES`] that fits in memory.
pub fn read_bytes(path: &Path) -> Result<Vec<u8>, ModelFileError> {
    let io = |source| ModelFileError::Io {
        path: path.to_path_buf(),
        source,
    };
    let (_, len) = ddpm_core::files::open_regular(path).map_err(|e| match e.kind() {
        std::io::ErrorKind::NotFound => invalid(
            path,
            "does not exist. Train a model with `cargo xtask train` or pass the path of a \
             model file",
        ),
        std::io::ErrorKind::InvalidInput => invalid(path, e.to_string()),
        _ => io(e),
    })?;
    if len > MAX_FILE_BYTES {
        return Err(invalid(
            path,
            format!(
                "is {}, more than any model file ({}): it is not a model file",
                ddpm_core::memory::human(len),
                ddpm_core::memory::human(MAX_FILE_BYTES)
            ),
        ));
    }
    // The bytes and the tensors built from them.
    ddpm_core::memory::check(len.saturating_mul(2), "reading it").map_err(|e| invalid(path, e))?;
    ddpm_core::files::read_regular(path, MAX_FILE_BYTES).map_err(io)
}

/// Reads a U-Net's model file, checking its format tag and validating its card
/// ([`ModelCard::validate`]) before any tensor is built from it.
pub fn read(path: &Path, device: &Device) -> Result<ModelFile, ModelFileError> {
    read_as(path, device, ModelCard::validate)
}

/// Reads a model file of any network whose configuration is `M`: checks its format tag, parses
/// its card and runs `check` on it (say [`ModelCard::validate_data`] plus the network's own
/// checks) before any tensor is built from it.
pub fn read_as<M: serde::de::DeserializeOwned>(
    path: &Path,
    device: &Device,
    check: impl FnOnce(&ModelCard<M>) -> std::result::Result<(), String>,
) -> Result<ModelFile<M>, ModelFileError> {
    from_bytes_as(&read_bytes(path)?, path, device, check)
}

/// Parses a U-Net's model file from its bytes (fetched over the network, say, where there is no
/// file system): the checks of [`read`]. `name` stands for the file in errors and in
/// [`ModelFile::path`].
pub fn from_bytes(bytes: &[u8], name: &Path, device: &Device) -> Result<ModelFile, ModelFileError> {
    from_bytes_as(bytes, name, device, ModelCard::validate)
}

/// [`read_as`] on a file's bytes; `name` stands for the file in errors.
pub fn from_bytes_as<M: serde::de::DeserializeOwned>(
    bytes: &[u8],
    name: &Path,
    device: &Device,
    check: impl FnOnce(&ModelCard<M>) -> std::result::Result<(), String>,
) -> Result<ModelFile<M>, ModelFileError> {
    let path = name;
    let (_, meta) = safetensors::SafeTensors::read_metadata(bytes).map_err(|e| {
        invalid(
            path,
            format!("not a readable safetensors file (truncated or corrupt?): {e}"),
        )
    })?;
    let metadata = meta.metadata().clone().unwrap_or_default();
    match metadata.get("ddpm.format") {
        Some(f) if f == FORMAT => {}
        Some(f) => {
            return Err(invalid(
                path,
                format!("format `{f}` is not supported (expected {FORMAT})"),
            ))
        }
        None => {
            return Err(invalid(
                path,
                "not a ddpm-rs checkpoint (no ddpm.format metadata)",
            ))
        }
    }
    let card: ModelCard<M> = metadata
        .get("ddpm.card")
        .ok_or_else(|| invalid(path, "has no model card (ddpm.card metadata)"))
        .and_then(|s| {
            serde_json::from_str(s).map_err(|e| invalid(path, format!("bad model card: {e}")))
        })?;
    check(&card).map_err(|reason| invalid(path, format!("has an invalid model card: {reason}")))?;
    let tensors = candle_core::safetensors::load_buffer(bytes, device).map_err(|e| {
        invalid(
            path,
            format!("cannot read tensors (truncated or corrupt?): {e}"),
        )
    })?;
    if let Some((name, t)) = tensors.iter().find(|(_, t)| !t.dtype().is_float()) {
        return Err(invalid(
            path,
            format!(
                "tensor `{name}` is {:?}, but model weights are floating point (f32, f16 or \
                 bf16): the file is not a model of this kind",
                t.dtype()
            ),
        ));
    }
    Ok(ModelFile {
        path: path.to_path_buf(),
        card,
        metadata,
        tensors,
    })
}

impl<M: Serialize> ModelFile<M> {
    /// The tensors under `prefix`, with the prefix stripped.
    pub fn group(&self, prefix: &str) -> HashMap<String, Tensor> {
        self.tensors
            .iter()
            .filter_map(|(k, v)| k.strip_prefix(prefix).map(|n| (n.to_string(), v.clone())))
            .collect()
    }

    /// The weights of `which`, converted to f32 (exports may be f16), by name; an error when
    /// the file holds none.
    pub fn weights(&self, which: Weights) -> Result<HashMap<String, Tensor>, ModelFileError> {
        let weights = self.group(which.prefix());
        if weights.is_empty() {
            return Err(invalid(
                &self.path,
                format!("holds no `{}*` weights", which.prefix()),
            ));
        }
        weights
            .into_iter()
            .map(|(k, v)| Ok((k, v.to_dtype(DType::F32)?)))
            .collect()
    }

    /// Writes a sampling-only export of this file to `dst`: the EMA weights as `dtype` (F16
    /// halves the size) and the card.
    pub fn export_ema(&self, dst: &Path, dtype: DType) -> Result<(), ModelFileError> {
        let mut tensors: Vec<(String, Tensor)> = Vec::new();
        let mut names: Vec<(String, Tensor)> = self.group("ema.").into_iter().collect();
        names.sort_by(|a, b| a.0.cmp(&b.0));
        for (name, t) in names {
            if ddpm_core::ensure_finite(&t, "").is_err() {
                return Err(invalid(
                    &self.path,
                    format!(
                        "EMA weight `{name}` holds NaN or infinite values: the run diverged, and \
                         an export of it would only draw noise. Nothing was written; export an \
                         earlier checkpoint or resume the run at a lower learning rate"
                    ),
                ));
            }
            let converted = t.to_dtype(dtype)?;
            if ddpm_core::ensure_finite(&converted, "").is_err() {
                return Err(invalid(
                    &self.path,
                    format!(
                        "EMA weight `{name}` overflows {dtype:?} (values beyond its range): \
                         nothing was written; export in f32"
                    ),
                ));
            }
            tensors.push((format!("ema.{name}"), converted));
        }
        if tensors.is_empty() {
            return Err(invalid(&self.path, "holds no EMA weights to export"));
        }
        save(dst, &self.card, &[], tensors)
    }
}

impl ModelFile {
    /// Builds the U-Net with the chosen weights, converted to f32 (exports may be f16).
    pub fn unet(&self, which: Weights, device: &Device) -> Result<UNet, ModelFileError> {
        let vb = VarBuilder::from_tensors(self.weights(which)?, DType::F32, device);
        UNet::new(&self.card.model, vb).map_err(|e| {
            invalid(
                &self.path,
                format!("weights do not match its model config: {e}"),
            )
        })
    }
}

/// Reads `path` and builds its U-Net: the usual entry point for sampling.
pub fn load_unet(
    path: &Path,
    which: Weights,
    device: &Device,
) -> Result<(UNet, ModelCard), ModelFileError> {
    let file = read(path, device)?;
    let unet = file.unet(which, device)?;
    Ok((unet, file.card))
}

/// [`load_unet`] from a model file's bytes; `name` stands for the file in errors.
pub fn load_unet_from_bytes(
    bytes: &[u8],
    name: &Path,
    which: Weights,
    device: &Device,
) -> Result<(UNet, ModelCard), ModelFileError> {
    let file = from_bytes(bytes, name, device)?;
    let unet = file.unet(which, device)?;
    Ok((unet, file.card))
}
