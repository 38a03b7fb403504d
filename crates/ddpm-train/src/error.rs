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
    /// The loss became NaN or infinite; the last good checkpoint is kept.
    #[error(
        "the loss became {loss} at step {step}; training stopped and the last good checkpoint is \
         kept. Lower the learning rate (--lr) or keep gradient clipping on."
    )]
    NonFiniteLoss {
        /// Optimizer step.
        step: u64,
        /// The loss value.
        loss: f32,
    },
    /// A training option is invalid.
    #[error("invalid training option: {0}")]
    Config(String),
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
    /// A tensor operation failed.
    #[error(transparent)]
    Tensor(#[from] candle_core::Error),
}

/// Result alias of this crate.
pub type Result<T, E = TrainError> = std::result::Result<T, E>;
