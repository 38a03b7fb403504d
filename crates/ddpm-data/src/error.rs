use std::path::PathBuf;

/// Everything that can go wrong while finding, reading or batching a dataset.
///
/// Every variant names the file or folder at fault and, where there is one, the fix.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum DataError {
    /// A file or folder could not be read.
    #[error("cannot read {path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The I/O error.
        #[source]
        source: std::io::Error,
    },
    /// A required dataset file does not exist.
    #[error("{path} does not exist: {hint}")]
    Missing {
        /// The expected file.
        path: PathBuf,
        /// How to fix it.
        hint: String,
    },
    /// The IDX magic number is wrong (not an IDX file, or images and labels swapped).
    #[error(
        "{path}: not an IDX {what} file (magic number {found:#010x}, expected {expected:#010x})"
    )]
    BadMagic {
        /// The file.
        path: PathBuf,
        /// "image" or "label".
        what: &'static str,
        /// Expected magic number.
        expected: u32,
        /// Found magic number.
        found: u32,
    },
    /// The file cannot be decoded, or its header makes no sense.
    #[error("{path} {reason}")]
    Corrupt {
        /// The file.
        path: PathBuf,
        /// What is wrong and how to fix it.
        reason: String,
    },
    /// The file holds fewer bytes than its header promises.
    #[error(
        "{path}: truncated: the header promises {expected} bytes of data, the file has {found} \
         (download it again)"
    )]
    Truncated {
        /// The file.
        path: PathBuf,
        /// Bytes promised by the header.
        expected: usize,
        /// Bytes present.
        found: usize,
    },
    /// Image dimensions are zero or not those the caller asked for.
    #[error("{path}: bad image dimensions {rows}x{cols}: {reason}")]
    BadDimensions {
        /// The file.
        path: PathBuf,
        /// Rows.
        rows: usize,
        /// Columns.
        cols: usize,
        /// Why they are rejected.
        reason: &'static str,
    },
    /// The image and label files disagree on the number of examples.
    #[error("{images} holds {n_images} images but {labels} holds {n_labels} labels")]
    CountMismatch {
        /// Image file.
        images: PathBuf,
        /// Number of images.
        n_images: usize,
        /// Label file.
        labels: PathBuf,
        /// Number of labels.
        n_labels: usize,
    },
    /// A label is not below the number of classes.
    #[error("{path}: label {label} at index {index} is not below {num_classes}")]
    LabelOutOfRange {
        /// The label file.
        path: PathBuf,
        /// Index of the example.
        index: usize,
        /// The label.
        label: u32,
        /// Number of classes.
        num_classes: usize,
    },
    /// An image folder has no class sub-folders.
    #[error("{path}: no class folders found: expected ROOT/<class>/*.png|jpg")]
    NoClasses {
        /// The root folder.
        path: PathBuf,
    },
    /// A class folder holds no images.
    #[error("{path}: class folder holds no .png/.jpg/.jpeg images")]
    EmptyClassFolder {
        /// The class folder.
        path: PathBuf,
    },
    /// An image file could not be decoded.
    #[error("{path}: cannot decode image: {source}")]
    UnreadableImage {
        /// The image.
        path: PathBuf,
        /// The decoder's error.
        #[source]
        source: image::ImageError,
    },
    /// No source could provide the dataset.
    #[error("{dataset} not found; tried: {tried}. {hint}")]
    NotFound {
        /// The dataset's name.
        dataset: String,
        /// The places looked in.
        tried: String,
        /// How to fix it.
        hint: String,
    },
    /// A batch asked for an index past the end of the dataset.
    #[error("index {index} is out of range for a dataset of {len} examples")]
    IndexOutOfRange {
        /// The index.
        index: usize,
        /// Dataset length.
        len: usize,
    },
    /// A tensor operation failed.
    #[error(transparent)]
    Tensor(#[from] candle_core::Error),
}

/// Result alias of this crate.
pub type Result<T, E = DataError> = std::result::Result<T, E>;
