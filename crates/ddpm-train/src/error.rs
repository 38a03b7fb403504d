use std::path::PathBuf;

/// Errors of training, checkpoints and pictures.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum TrainError {
    /// A checkpoint is missing, truncated, corrupt or does not match the model.
    #[error("checkpoint {path}: {reason}")]
    Checkpoint {
        /// The checkpoint file.
        path: PathBuf,
        /// What is wrong and how to fix it.
        reason: String,
    },
    /// Reading or writing a file failed (a full disk lands here).
    #[error("cannot write or read {path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The I/O error.
        #[source]
        source: std::io::Error,
    },
    /// The loss or the gradient norm became NaN or infinite; the last checkpoint is kept.
    #[error(
        "the loss became {loss} at step {step}: training stopped, and the last checkpoint \
         written is kept (a diverged state is never checkpointed). Continue from it with a lower \
         peak learning rate (`lr`, below this run's)."
    )]
    NonFiniteLoss {
        /// Optimizer step.
        step: u64,
        /// The loss value.
        loss: f32,
    },
    /// The weights, the EMA weights or the optimizer moments became non-finite or absurdly
    /// large ([`crate::Trainer::check_state`]); the last checkpoint is kept.
    #[error(
        "training diverged by step {step}: {cause}. Training stopped, and the last checkpoint \
         written is kept (a diverged state is never checkpointed). Continue from it with a lower \
         peak learning rate (`lr`, below this run's)."
    )]
    Diverged {
        /// Optimizer steps taken.
        step: u64,
        /// Which tensor went wrong, and how.
        cause: String,
    },
    /// An output path cannot be used as given (a folder, or the wrong extension).
    #[error("{0}")]
    BadPath(String),
    /// A training option is invalid: named by its field of [`crate::TrainConfig`] (the CLI
    /// names its flag instead, [`crate::launch::with_flag_names`]).
    #[error("training option `{field}`: {reason}")]
    Option {
        /// The field of [`crate::TrainConfig`] (`batch_size`, `lr`, `budget`, …).
        field: &'static str,
        /// What is wrong with its value and what would do.
        reason: String,
    },
    /// The model card cannot be trained: the network or its schedule cannot be built from it.
    #[error("invalid model card: {0}")]
    Card(String),
    /// A run's options or state do not fit together (a resume or a plan asked of the wrong
    /// run, a run folder that is not one, a metrics line that cannot be written).
    #[error("{0}")]
    Config(String),
    /// A picture cannot be drawn as asked (its size, its channels).
    #[error("cannot draw the picture: {0}")]
    Picture(String),
    /// The dataset could not be loaded.
    #[error(transparent)]
    Data(#[from] ddpm_data::DataError),
    /// A picture could not be encoded or written.
    #[error("cannot write picture {path}: {source}")]
    Image {
        /// The file.
        path: PathBuf,
        /// The encoder's error.
        #[source]
        source: image::ImageError,
    },
    /// Another process holds the run folder (see [`crate::RunLock`]).
    #[error(
        "{dir} is in use by another run ({holder}); wait for it to end, stop it, or give this \
         run another folder"
    )]
    Locked {
        /// The run folder.
        dir: PathBuf,
        /// Who holds it, as the lock file says (its pid).
        holder: String,
    },
    /// A tensor operation failed.
    #[error(transparent)]
    Tensor(#[from] candle_core::Error),
}

/// Result alias of this crate.
pub type Result<T, E = TrainError> = std::result::Result<T, E>;

impl From<ddpm_unet::ModelFileError> for TrainError {
    fn from(e: ddpm_unet::ModelFileError) -> Self {
        match e {
            ddpm_unet::ModelFileError::Invalid { path, reason } => {
                TrainError::Checkpoint { path, reason }
            }
            ddpm_unet::ModelFileError::Io { path, source } => TrainError::Io { path, source },
            ddpm_unet::ModelFileError::Candle(e) => TrainError::Tensor(e),
            other => TrainError::Checkpoint {
                path: std::path::PathBuf::new(),
                reason: other.to_string(),
            },
        }
    }
}

impl From<ddpm_pipeline::PipelineError> for TrainError {
    fn from(e: ddpm_pipeline::PipelineError) -> Self {
        match e {
            ddpm_pipeline::PipelineError::ModelFile(e) => e.into(),
            ddpm_pipeline::PipelineError::Candle(e) => TrainError::Tensor(e),
            other => TrainError::Tensor(candle_core::Error::Msg(other.to_string())),
        }
    }
}

impl From<ddpm_viz::VizError> for TrainError {
    fn from(e: ddpm_viz::VizError) -> Self {
        match e {
            ddpm_viz::VizError::Invalid(m) => TrainError::Picture(m),
            ddpm_viz::VizError::BadPath(m) => TrainError::BadPath(m),
            ddpm_viz::VizError::Image { path, source } => TrainError::Image { path, source },
            ddpm_viz::VizError::Io { path, source } => TrainError::Io { path, source },
            ddpm_viz::VizError::Tensor(e) => TrainError::Tensor(e),
            other => TrainError::Picture(other.to_string()),
        }
    }
}
