//! Evaluation for ddpm-rs: a small MNIST CNN classifier (trained with candle, weights cached in
//! `assets/mnist-classifier.safetensors`) and the sample-quality metrics built on it:
//!
//! * **class accuracy** of conditional samples against the classes they were asked for, per
//!   class and overall, and the mean confidence in the requested class;
//! * **`fid_mnist`**: the Fréchet distance between Gaussians fitted to the classifier's
//!   128-wide penultimate features of the samples and of the MNIST test set. It is the FID
//!   recipe with an MNIST classifier in place of Inception-v3, so its values are *not*
//!   comparable with published (Inception) FIDs;
//! * **`is_mnist`**: the Inception Score computed with the same classifier (1 to 10);
//! * **class-histogram entropy** of the predicted classes (ln 10 ≈ 2.303 nats when balanced),
//!   for unconditional samples;
//! * the **real-data floor**: the same figures for MNIST train images against the test set.
//!
//! ```
//! use ddpm_eval::{class_histogram_entropy, inception_score};
//! // Two confident, balanced predictions: IS = 2 (of 2 classes), entropy = ln 2.
//! let probs = [1.0f32, 0.0, 0.0, 1.0];
//! assert!((inception_score(&probs, 2)? - 2.0).abs() < 1e-9);
//! assert!((class_histogram_entropy(&[0, 1], 2) - 2f64.ln()).abs() < 1e-12);
//! # Ok::<(), ddpm_eval::EvalError>(())
//! ```

use std::path::{Path, PathBuf};

mod classifier;
pub mod linalg;
mod metrics;
mod report;
pub mod steps;

pub use classifier::{
    save_classifier, test_accuracy, train_classifier, Classifier, ClassifierConfig, ClassifierInfo,
    ClassifierTrainConfig, Predictions, CLASSIFIER_FORMAT,
};
pub use metrics::{
    argmax, class_accuracy, class_histogram_entropy, frechet_distance, inception_score,
    ClassAccuracy, FeatureStats,
};
pub use report::{merge_reports, sweep, Report, Row};
use serde::{Deserialize, Serialize};

/// Errors of the evaluator.
#[derive(Debug, thiserror::Error)]
pub enum EvalError {
    /// The classifier file is missing or unusable.
    #[error("classifier {path}: {why}")]
    Classifier {
        /// The file.
        path: PathBuf,
        /// What is wrong and how to fix it.
        why: String,
    },
    /// Inputs of mismatched or invalid shapes.
    #[error("{0}")]
    Shape(String),
    /// A training option is out of range (the field named, with what it accepts).
    #[error("{field} {value}: {why}")]
    Config {
        /// The option's field.
        field: &'static str,
        /// Its value, as given.
        value: String,
        /// What it accepts.
        why: String,
    },
    /// The classifier's training loss became NaN or infinite.
    #[error(
        "classifier training diverged (non-finite loss) at step {step}; lower the learning rate"
    )]
    NonFinite {
        /// The step.
        step: usize,
    },
    /// Writing a file failed.
    #[error("writing {path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The cause.
        source: std::io::Error,
    },
    /// An evaluation report is unreadable or cannot be merged with the others.
    #[error("report {path}: {why}")]
    Report {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        why: String,
    },
    /// The sample generator of a sweep failed (its own error kept as the source).
    #[error("sampling at w = {w}: {source}")]
    Sampling {
        /// The guidance weight being sampled.
        w: f64,
        /// The generator's error.
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    /// A plot could not be drawn or written.
    #[error(transparent)]
    Viz(#[from] ddpm_viz::VizError),
    /// A lock was poisoned by a panic elsewhere.
    #[error("internal: a variable map lock was poisoned")]
    Poisoned,
    /// Loading data failed.
    #[error(transparent)]
    Data(#[from] ddpm_data::DataError),
    /// A tensor operation failed.
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
}

impl Classifier {
    /// Checks that this classifier can score the images of a generator that makes
    /// `channels × height × width` images of `classes` classes (0: an unconditional model).
    pub fn check_generator(
        &self,
        channels: usize,
        height: usize,
        width: usize,
        classes: usize,
    ) -> Result<(), EvalError> {
        let c = self.config();
        if channels != c.in_channels || height != c.image_size || width != c.image_size {
            return Err(EvalError::Shape(format!(
                "the model makes {channels}×{height}×{width} images but the classifier takes \
                 {}×{}×{}: the evaluator is for MNIST-shaped models",
                c.in_channels, c.image_size, c.image_size
            )));
        }
        if classes > 0 && classes != c.num_classes {
            return Err(EvalError::Shape(format!(
                "the model has {classes} classes, the classifier {}",
                c.num_classes
            )));
        }
        Ok(())
    }
}

impl Reference {
    /// The MNIST protocol's reference and its real-data floor: the test split (from `data_dir`,
    /// else where ddpm-data finds it) is the reference, and the first `n` training digits (at
    /// most 10,000) scored against it are the floor a perfect generator would reach at that `n`.
    pub fn mnist(
        classifier: &Classifier,
        data_dir: Option<&Path>,
        n: usize,
        device: &candle_core::Device,
    ) -> Result<(Self, SetMetrics), EvalError> {
        let (train, test) = mnist_splits(data_dir)?;
        let (test, _) = test.to_tensors(device)?;
        let reference = Self::new(classifier, &test)?;
        let (x, y) = train.take(n.min(10_000)).to_tensors(device)?;
        let floor = reference.evaluate(classifier, &x, Some(&y.to_vec1::<u32>()?))?;
        Ok((reference, floor))
    }
}

/// MNIST's train and test splits at 28×28, from `data_dir` (else where ddpm-data finds them).
pub fn mnist_splits(
    data_dir: Option<&Path>,
) -> Result<(ddpm_data::ImageDataset, ddpm_data::ImageDataset), EvalError> {
    let load =
        |split| ddpm_data::load_dataset(&ddpm_data::DatasetKind::Mnist, data_dir, split, (28, 28));
    Ok((
        load(ddpm_data::Split::Train)?,
        load(ddpm_data::Split::Test)?,
    ))
}

/// Where the shipped classifier lives, relative to the workspace root.
pub const SHIPPED_CLASSIFIER: &str = "assets/mnist-classifier.safetensors";

/// The metrics of one set of images.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SetMetrics {
    /// Images evaluated.
    pub count: usize,
    /// Accuracy against requested classes (absent for unconditional sets).
    pub accuracy: Option<ClassAccuracy>,
    /// Fréchet distance to the reference features (`fid_mnist`).
    pub fid_mnist: f64,
    /// Classifier-based Inception Score.
    pub is_mnist: f64,
    /// Entropy (nats) of the predicted-class histogram.
    pub class_entropy: f64,
}

/// The classifier's view of a reference set (normally the MNIST test split).
#[derive(Debug, Clone)]
pub struct Reference {
    /// Feature statistics.
    pub stats: FeatureStats,
    /// Classes.
    pub num_classes: usize,
}

impl Reference {
    /// Fits the reference statistics to `images` (`[N, C, H, W]` in `[-1, 1]`).
    pub fn new(classifier: &Classifier, images: &candle_core::Tensor) -> Result<Self, EvalError> {
        let p = classifier.predict(images, 500)?;
        Ok(Self {
            stats: FeatureStats::from_rows(&p.features, classifier.config().feature_dim)?,
            num_classes: classifier.config().num_classes,
        })
    }

    /// Every metric of `images` against this reference; `targets` are the requested classes
    /// of conditional samples.
    pub fn evaluate(
        &self,
        classifier: &Classifier,
        images: &candle_core::Tensor,
        targets: Option<&[u32]>,
    ) -> Result<SetMetrics, EvalError> {
        let p = classifier.predict(images, 500)?;
        let k = self.num_classes;
        let stats = FeatureStats::from_rows(&p.features, classifier.config().feature_dim)?;
        Ok(SetMetrics {
            count: p.predicted.len(),
            accuracy: targets
                .map(|t| class_accuracy(&p.probs, t, k))
                .transpose()?,
            fid_mnist: frechet_distance(&stats, &self.stats)?,
            is_mnist: inception_score(&p.probs, k)?,
            class_entropy: class_histogram_entropy(&p.predicted, k),
        })
    }
}
