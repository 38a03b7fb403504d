//! The MNIST classifier behind the metrics: a small CNN (four 3×3 convolutions, two of them
//! stride 2, then a 128-wide feature layer) trained with candle, using the U-Net's fast
//! convolution kernels.

use std::path::Path;
use std::time::Instant;

use candle_core::{DType, Device, Tensor};
use candle_nn::{linear, Linear, Module, Optimizer, VarBuilder, VarMap};
use ddpm_core::SeededNoise;
use ddpm_data::{Dataset, ImageDataset, Loader, LoaderConfig};
use ddpm_kernels::nn::{conv2d, Kernels};
use serde::{Deserialize, Serialize};

use crate::EvalError;

/// Format tag stored in the classifier file's metadata.
pub const CLASSIFIER_FORMAT: &str = "ddpm-rs-classifier/1";

/// Architecture of the classifier.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClassifierConfig {
    /// Image channels.
    pub in_channels: usize,
    /// Image side (square images; 28 for MNIST).
    pub image_size: usize,
    /// Channels of the two convolution stages.
    pub channels: [usize; 2],
    /// Width of the penultimate (feature) layer, the space the Fréchet distance is taken in.
    pub feature_dim: usize,
    /// Classes.
    pub num_classes: usize,
}

impl Default for ClassifierConfig {
    fn default() -> Self {
        Self {
            in_channels: 1,
            image_size: 28,
            channels: [32, 64],
            feature_dim: 128,
            num_classes: 10,
        }
    }
}

/// What the classifier file records besides weights.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ClassifierInfo {
    /// [`CLASSIFIER_FORMAT`].
    pub format: String,
    /// The architecture.
    pub config: ClassifierConfig,
    /// Accuracy on the MNIST test split when it was saved.
    pub test_accuracy: f64,
    /// Training epochs.
    pub epochs: usize,
    /// Training seed.
    pub seed: u64,
}

#[derive(Debug, Clone)]
struct Conv {
    w: Tensor,
    b: Tensor,
    stride: usize,
}

impl Conv {
    fn new(
        cin: usize,
        cout: usize,
        stride: usize,
        vb: VarBuilder<'_>,
    ) -> candle_core::Result<Self> {
        let c = candle_nn::conv2d(cin, cout, 3, Default::default(), vb)?;
        let b = c
            .bias()
            .cloned()
            .ok_or_else(|| candle_core::Error::Msg("conv without bias".into()))?;
        Ok(Self {
            w: c.weight().clone(),
            b,
            stride,
        })
    }
    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        conv2d(x, &self.w, Some(&self.b), self.stride, 1, Kernels::Fast)?.relu()
    }
}

/// Class probabilities and penultimate features of a set of images.
#[derive(Debug, Clone, PartialEq)]
pub struct Predictions {
    /// `[N, classes]` row-major softmax probabilities.
    pub probs: Vec<f32>,
    /// `[N, feature_dim]` row-major features (after ReLU).
    pub features: Vec<f32>,
    /// Argmax class of each image.
    pub predicted: Vec<u32>,
}

/// The classifier. Weight names: `conv{1..4}.{weight,bias}`, `fc1.*` (features), `fc2.*`.
#[derive(Debug, Clone)]
pub struct Classifier {
    config: ClassifierConfig,
    convs: [Conv; 4],
    fc1: Linear,
    fc2: Linear,
}

impl Classifier {
    /// Builds the network, creating or loading weights through `vb`.
    pub fn new(config: &ClassifierConfig, vb: VarBuilder<'_>) -> candle_core::Result<Self> {
        let [c1, c2] = config.channels;
        let side = config.image_size.div_ceil(2).div_ceil(2);
        Ok(Self {
            config: config.clone(),
            convs: [
                Conv::new(config.in_channels, c1, 1, vb.pp("conv1"))?,
                Conv::new(c1, c1, 2, vb.pp("conv2"))?,
                Conv::new(c1, c2, 1, vb.pp("conv3"))?,
                Conv::new(c2, c2, 2, vb.pp("conv4"))?,
            ],
            fc1: linear(c2 * side * side, config.feature_dim, vb.pp("fc1"))?,
            fc2: linear(config.feature_dim, config.num_classes, vb.pp("fc2"))?,
        })
    }

    /// The architecture.
    pub fn config(&self) -> &ClassifierConfig {
        &self.config
    }

    /// `x [N, C, H, W]` in `[-1, 1]` → `(logits [N, classes], features [N, feature_dim])`.
    pub fn forward(&self, x: &Tensor) -> candle_core::Result<(Tensor, Tensor)> {
        let mut h = x.clone();
        for c in &self.convs {
            h = c.forward(&h)?;
        }
        let features = self.fc1.forward(&h.flatten_from(1)?)?.relu()?;
        Ok((self.fc2.forward(&features)?, features))
    }

    /// Probabilities, features and predicted classes of `images` (`[N, C, H, W]` in `[-1, 1]`),
    /// in batches of `batch`.
    pub fn predict(&self, images: &Tensor, batch: usize) -> Result<Predictions, EvalError> {
        let (n, c, h, w) = images.dims4()?;
        let cfg = &self.config;
        if c != cfg.in_channels || h != cfg.image_size || w != cfg.image_size {
            return Err(EvalError::Shape(format!(
                "the classifier takes {}×{}×{} images, got {c}×{h}×{w}",
                cfg.in_channels, cfg.image_size, cfg.image_size
            )));
        }
        let (mut probs, mut features) = (Vec::new(), Vec::new());
        let mut start = 0;
        while start < n {
            let len = batch.max(1).min(n - start);
            let x = images.narrow(0, start, len)?.to_dtype(DType::F32)?;
            let (logits, f) = self.forward(&x)?;
            let p = candle_nn::ops::softmax_last_dim(&logits)?;
            probs.extend(p.flatten_all()?.to_vec1::<f32>()?);
            features.extend(f.flatten_all()?.to_vec1::<f32>()?);
            start += len;
        }
        let predicted = probs
            .chunks(cfg.num_classes)
            .map(|r| crate::metrics::argmax(r) as u32)
            .collect();
        Ok(Predictions {
            probs,
            features,
            predicted,
        })
    }

    /// Loads a classifier file written by [`save_classifier`](crate::save_classifier).
    pub fn load(path: &Path, device: &Device) -> Result<(Self, ClassifierInfo), EvalError> {
        let bad = |why: String| EvalError::Classifier {
            path: path.to_path_buf(),
            why,
        };
        // The shipped classifier is 0.5 MB; 1 GiB bounds any file read as one.
        let bytes = ddpm_core::files::read_regular(path, 1 << 30).map_err(|e| {
            bad(format!(
                "cannot read it ({e}); train one with `ddpm train-classifier`"
            ))
        })?;
        let (_, meta) = safetensors::SafeTensors::read_metadata(&bytes)
            .map_err(|e| bad(format!("not a safetensors file ({e})")))?;
        let raw = meta
            .metadata()
            .as_ref()
            .and_then(|m| m.get("ddpm.classifier"))
            .ok_or_else(|| bad("no `ddpm.classifier` metadata: not a ddpm-rs classifier".into()))?;
        let info: ClassifierInfo =
            serde_json::from_str(raw).map_err(|e| bad(format!("bad metadata ({e})")))?;
        if info.format != CLASSIFIER_FORMAT {
            return Err(bad(format!(
                "format `{}`, expected `{CLASSIFIER_FORMAT}`",
                info.format
            )));
        }
        let tensors = candle_core::safetensors::load_buffer(&bytes, device)
            .map_err(|e| bad(format!("cannot read its tensors ({e})")))?;
        let tensors = tensors
            .into_iter()
            .map(|(k, v)| Ok((k, v.to_dtype(DType::F32)?)))
            .collect::<candle_core::Result<_>>()?;
        let vb = VarBuilder::from_tensors(tensors, DType::F32, device);
        let model = Self::new(&info.config, vb)
            .map_err(|e| bad(format!("weights do not match the architecture ({e})")))?;
        Ok((model, info))
    }
}

/// Writes the weights in `varmap` and `info` to `path` (temp file, fsync, rename).
pub fn save_classifier(
    varmap: &VarMap,
    info: &ClassifierInfo,
    path: &Path,
) -> Result<(), EvalError> {
    let data = varmap.data().lock().map_err(|_| EvalError::Poisoned)?;
    let mut tensors: Vec<(String, Tensor)> = data
        .iter()
        .map(|(k, v)| (k.clone(), v.as_tensor().clone()))
        .collect();
    drop(data);
    tensors.sort_by(|a, b| a.0.cmp(&b.0));
    let meta = std::collections::HashMap::from([(
        "ddpm.classifier".to_string(),
        serde_json::to_string(info).map_err(|e| EvalError::Shape(e.to_string()))?,
    )]);
    let views: Vec<(String, candle_core::Tensor)> = tensors;
    let bytes = safetensors::serialize(views.iter().map(|(k, v)| (k.as_str(), v)), Some(meta))
        .map_err(|e| EvalError::Shape(format!("serialising the classifier: {e}")))?;
    ddpm_core::write_atomic(path, &bytes).map_err(|source| EvalError::Io {
        path: path.to_path_buf(),
        source,
    })
}

/// How to train the classifier (with the `clap` feature, `ddpm train-classifier`'s flags).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "clap", derive(clap::Args))]
pub struct ClassifierTrainConfig {
    /// Passes over the training split.
    #[cfg_attr(feature = "clap", arg(short = 'e', long, default_value_t = 4))]
    pub epochs: usize,
    /// Batch size.
    #[cfg_attr(feature = "clap", arg(short = 'b', long, default_value_t = 128))]
    pub batch_size: usize,
    /// Peak AdamW learning rate (cosine-decayed to 0).
    #[cfg_attr(feature = "clap", arg(short = 'l', long, default_value_t = 2e-3))]
    pub lr: f64,
    /// Seed of initialisation, shuffling and augmentation.
    #[cfg_attr(feature = "clap", arg(long, default_value_t = 0))]
    pub seed: u64,
    /// Random translation of each training image by up to this many pixels.
    #[cfg_attr(feature = "clap", arg(long, default_value_t = 2))]
    pub max_shift: usize,
}

impl Default for ClassifierTrainConfig {
    fn default() -> Self {
        Self {
            epochs: 4,
            batch_size: 128,
            lr: 2e-3,
            seed: 0,
            max_shift: 2,
        }
    }
}

/// Shifts each `side × side` u8 image by a random offset in `[-max, max]²`, filling with 0.
fn augment(pixels: &[u8], side: usize, max: usize, rng: &mut SeededNoise) -> Vec<u8> {
    let per = side * side;
    let n = pixels.len() / per.max(1);
    let span = (2 * max + 1) as u32;
    let offs = rng.uniform_u32(2 * n, span);
    let mut out = vec![0u8; pixels.len()];
    for (i, (src, dst)) in pixels.chunks(per).zip(out.chunks_mut(per)).enumerate() {
        let dy = offs[2 * i] as isize - max as isize;
        let dx = offs[2 * i + 1] as isize - max as isize;
        for y in 0..side as isize {
            let sy = y - dy;
            if sy < 0 || sy >= side as isize {
                continue;
            }
            for x in 0..side as isize {
                let sx = x - dx;
                if sx >= 0 && sx < side as isize {
                    dst[(y * side as isize + x) as usize] = src[(sy * side as isize + sx) as usize];
                }
            }
        }
    }
    out
}

fn to_unit(pixels: Vec<u8>, n: usize, side: usize, dev: &Device) -> candle_core::Result<Tensor> {
    Tensor::from_vec(pixels, (n, 1, side, side), dev)?
        .to_dtype(DType::F32)?
        .affine(2.0 / 255.0, -1.0)
}

/// Test-split accuracy of `model`.
pub fn test_accuracy(
    model: &Classifier,
    test: &ImageDataset,
    dev: &Device,
) -> Result<f64, EvalError> {
    let (x, y) = test.to_tensors(dev)?;
    let p = model.predict(&x, 500)?;
    let labels = y.to_vec1::<u32>()?;
    let right = p
        .predicted
        .iter()
        .zip(&labels)
        .filter(|(a, b)| a == b)
        .count();
    Ok(right as f64 / labels.len().max(1) as f64)
}

impl ClassifierTrainConfig {
    /// Checks the options against a training set of `examples` images of `side × side`, before
    /// anything is allocated: epochs in 1..=10,000, a batch size from 1 to the number of
    /// examples whose step fits in memory ([`ddpm_core::memory::check`]), a finite learning
    /// rate in (0, 1], and a shift below half the image side. The error names the field.
    pub fn validate(&self, examples: usize, side: usize) -> Result<(), EvalError> {
        let bad = |field, value: String, why: String| Err(EvalError::Config { field, value, why });
        if !(1..=10_000).contains(&self.epochs) {
            return bad("epochs", self.epochs.to_string(), "give 1 to 10000".into());
        }
        if self.batch_size == 0 || self.batch_size > examples.max(1) {
            return bad(
                "batch_size",
                self.batch_size.to_string(),
                format!("give 1 to {examples}, the number of training images"),
            );
        }
        if !(self.lr.is_finite() && self.lr > 0.0 && self.lr <= 1.0) {
            return bad("lr", self.lr.to_string(), "give a rate in (0, 1]".into());
        }
        if self.max_shift.saturating_mul(2) >= side {
            return bad(
                "max_shift",
                self.max_shift.to_string(),
                format!("shift by less than half the image side ({side})"),
            );
        }
        // Activations of both convolution stages with their gradients, per image.
        let c = ClassifierConfig::default().channels;
        let per_image = (side as u64).pow(2) * 4 * (1 + c[0] + c[1]) as u64 * 4;
        ddpm_core::memory::check(
            per_image.saturating_mul(self.batch_size as u64),
            &format!("a classifier step at batch size {}", self.batch_size),
        )
        .map_err(|why| EvalError::Config {
            field: "batch_size",
            value: self.batch_size.to_string(),
            why,
        })
    }
}

/// Trains a classifier on `train` (single-channel square images) and measures it on `test`.
/// `on_epoch(epoch, mean_loss, seconds)` is called after each epoch.
pub fn train_classifier(
    train: &ImageDataset,
    test: &ImageDataset,
    config: &ClassifierTrainConfig,
    device: &Device,
    mut on_epoch: impl FnMut(usize, f64, f64),
) -> Result<(VarMap, Classifier, ClassifierInfo), EvalError> {
    let (c, h, w) = train.image_shape();
    if c != 1 || h != w {
        return Err(EvalError::Shape(format!(
            "the classifier trains on single-channel square images, got {c}×{h}×{w}"
        )));
    }
    config.validate(train.len(), h)?;
    let arch = ClassifierConfig {
        in_channels: 1,
        image_size: h,
        num_classes: train.class_names().len(),
        ..ClassifierConfig::default()
    };
    let varmap = VarMap::new();
    let vb = VarBuilder::from_varmap(&varmap, DType::F32, device);
    let model = Classifier::new(&arch, vb)?;
    let mut rng = SeededNoise::new(config.seed);
    // Seeded initialisation (candle's CPU RNG cannot be seeded): weights U(±1/√fan_in) as in
    // PyTorch, biases 0. Sorted by name so the draw order does not depend on the map's.
    let mut vars: Vec<(String, candle_core::Var)> = varmap
        .data()
        .lock()
        .map_err(|_| EvalError::Poisoned)?
        .iter()
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    vars.sort_by(|a, b| a.0.cmp(&b.0));
    for (name, var) in &vars {
        let dims = var.dims().to_vec();
        if name.ends_with(".bias") {
            var.set(&var.zeros_like()?)?;
            continue;
        }
        let fan_in: usize = dims[1..].iter().product::<usize>().max(1);
        let bound = 1.0 / (fan_in as f32).sqrt();
        let vals: Vec<f32> = rng
            .uniform_f32(var.elem_count())
            .into_iter()
            .map(|u| (2.0 * u - 1.0) * bound)
            .collect();
        var.set(&Tensor::from_vec(vals, dims, device)?)?;
    }
    let params = candle_nn::ParamsAdamW {
        lr: config.lr,
        weight_decay: 1e-4,
        ..Default::default()
    };
    let mut opt = candle_nn::AdamW::new(varmap.all_vars(), params)?;
    let loader = Loader::new(
        train.len(),
        LoaderConfig {
            batch_size: config.batch_size,
            shuffle: true,
            drop_last: true,
            seed: config.seed,
        },
    )?;
    let total = (loader.batches_per_epoch() * config.epochs).max(1);
    let per = h * w;
    let mut step = 0usize;
    for epoch in 0..config.epochs {
        let start = Instant::now();
        let (mut loss_sum, mut batches) = (0f64, 0usize);
        for idx in loader.epoch(epoch as u64) {
            let mut px = Vec::with_capacity(idx.len() * per);
            let mut labels = Vec::with_capacity(idx.len());
            for &i in &idx {
                let (p, l) = train.get(i).ok_or_else(|| {
                    EvalError::Shape(format!("index {i} out of the training set"))
                })?;
                px.extend_from_slice(p);
                labels.push(l);
            }
            let px = augment(&px, h, config.max_shift, &mut rng);
            let x = to_unit(px, idx.len(), h, device)?;
            let y = Tensor::from_vec(labels, idx.len(), device)?;
            let lr =
                0.5 * config.lr * (1.0 + (std::f64::consts::PI * step as f64 / total as f64).cos());
            opt.set_learning_rate(lr);
            let (logits, _) = model.forward(&x)?;
            let loss = candle_nn::loss::cross_entropy(&logits, &y)?;
            let value = loss.to_scalar::<f32>()?;
            if !value.is_finite() {
                return Err(EvalError::NonFinite { step });
            }
            opt.backward_step(&loss)?;
            loss_sum += value as f64;
            batches += 1;
            step += 1;
        }
        on_epoch(
            epoch,
            loss_sum / batches.max(1) as f64,
            start.elapsed().as_secs_f64(),
        );
    }
    let acc = test_accuracy(&model, test, device)?;
    let info = ClassifierInfo {
        format: CLASSIFIER_FORMAT.into(),
        config: arch,
        test_accuracy: acc,
        epochs: config.epochs,
        seed: config.seed,
    };
    Ok((varmap, model, info))
}
