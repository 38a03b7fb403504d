use std::path::{Path, PathBuf};
use std::str::FromStr;

use crate::error::{DataError, Result};
use crate::{idx, load_image_folder_as, Channels, ImageDataset, Split};

/// Environment variable naming a directory with the IDX files (after `--data-dir`).
pub const DATA_DIR_ENV: &str = "DDPM_DATA_DIR";

/// Which dataset to train on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DatasetKind {
    /// MNIST digits (shipped in `assets/mnist`).
    Mnist,
    /// Zalando's Fashion-MNIST (same format; not shipped).
    FashionMnist,
    /// `ROOT/<class>/*.png|jpg`, with the channels chosen (`folder:PATH` keeps colour when
    /// the images have it, `folder-gray:PATH` and `folder-rgb:PATH` force one or three).
    Folder(PathBuf, Channels),
}

impl FromStr for DatasetKind {
    type Err = String;
    /// Parses `mnist`, `fashion-mnist`, `folder:PATH`, `folder-gray:PATH` or
    /// `folder-rgb:PATH`.
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        match s {
            "mnist" => return Ok(Self::Mnist),
            "fashion-mnist" | "fashion_mnist" => return Ok(Self::FashionMnist),
            _ => {}
        }
        for channels in [Channels::Auto, Channels::Gray, Channels::Rgb] {
            if let Some(p) = s
                .strip_prefix(channels.prefix())
                .and_then(|r| r.strip_prefix(':'))
            {
                if !p.is_empty() {
                    return Ok(Self::Folder(PathBuf::from(p), channels));
                }
            }
        }
        Err(format!(
            "unknown dataset `{s}`: expected mnist, fashion-mnist, folder:PATH (colour kept \
             when the images have it), folder-gray:PATH or folder-rgb:PATH"
        ))
    }
}

impl std::fmt::Display for DatasetKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Mnist => write!(f, "mnist"),
            Self::FashionMnist => write!(f, "fashion-mnist"),
            Self::Folder(p, c) => write!(f, "{}:{}", c.prefix(), p.display()),
        }
    }
}

impl DatasetKind {
    /// The class names of the IDX datasets (`None` for folders, whose names come from disk).
    pub fn idx_class_names(&self) -> Option<Vec<String>> {
        match self {
            Self::Mnist => Some((0..10).map(|d| d.to_string()).collect()),
            Self::FashionMnist => Some(
                [
                    "t-shirt",
                    "trouser",
                    "pullover",
                    "dress",
                    "coat",
                    "sandal",
                    "shirt",
                    "sneaker",
                    "bag",
                    "ankle-boot",
                ]
                .iter()
                .map(|s| s.to_string())
                .collect(),
            ),
            Self::Folder(..) => None,
        }
    }
}

/// The MNIST copy shipped with the repository (`assets/mnist`), if it can be found under the
/// current directory or one of its parents (so it is found from anywhere inside a checkout).
/// No path from the build machine is compiled in: a binary that wants its own source tree's
/// copy passes it as `explicit` to [`resolve_idx_dir`] (the `ddpm` command does).
pub fn shipped_mnist_dir() -> Option<PathBuf> {
    let cwd = std::env::current_dir().ok()?;
    cwd.ancestors()
        .map(|d| d.join("assets/mnist"))
        .find(|p| p.join("train-images-idx3-ubyte.gz").exists())
}

/// Where the IDX files of `kind` are: `explicit` (`--data-dir`), then `$DDPM_DATA_DIR`,
/// then the shipped copy (MNIST only). `None` means no local copy: use the hub.
pub fn resolve_idx_dir(kind: &DatasetKind, explicit: Option<&Path>) -> Option<PathBuf> {
    if let Some(dir) = explicit {
        return Some(dir.to_path_buf());
    }
    if let Some(dir) = std::env::var_os(DATA_DIR_ENV).filter(|v| !v.is_empty()) {
        return Some(PathBuf::from(dir));
    }
    match kind {
        DatasetKind::Mnist => shipped_mnist_dir(),
        _ => None,
    }
}

/// Loads one split of `kind`, resolving where it comes from (see [`resolve_idx_dir`]).
///
/// `size` is the `(height, width)` image folders are resized to (IDX data keep their own).
/// Folders have no test split of their own: every tenth image of each class (in sorted
/// order) is held out as [`Split::Test`].
pub fn load_dataset(
    kind: &DatasetKind,
    data_dir: Option<&Path>,
    split: Split,
    size: (u32, u32),
) -> Result<ImageDataset> {
    load_dataset_limited(kind, data_dir, split, size, None)
}

/// [`load_dataset`], keeping only the first `limit` examples (all with `None`); IDX files are
/// read no further than that, so a limit bounds what is read, not only what is used.
pub fn load_dataset_limited(
    kind: &DatasetKind,
    data_dir: Option<&Path>,
    split: Split,
    size: (u32, u32),
    limit: Option<usize>,
) -> Result<ImageDataset> {
    if let DatasetKind::Folder(root, channels) = kind {
        let all = load_image_folder_as(root, size.0, size.1, *channels)?;
        let split = split_folder(&all, split);
        return Ok(match limit {
            Some(n) => split.take(n),
            None => split,
        });
    }
    let names = kind.idx_class_names().unwrap_or_default();
    match resolve_idx_dir(kind, data_dir) {
        Some(dir) => idx::load_idx_dir_limited(&dir, split, names, limit),
        None => {
            let all = load_from_hub(kind, split, names)?;
            Ok(match limit {
                Some(n) => all.take(n),
                None => all,
            })
        }
    }
}

fn split_folder(all: &ImageDataset, split: Split) -> ImageDataset {
    use crate::Dataset;
    let mut seen = vec![0usize; all.class_names().len()];
    let (mut pixels, mut labels) = (Vec::new(), Vec::new());
    for i in 0..all.len() {
        let Some((p, l)) = all.get(i) else { break };
        let k = seen[l as usize];
        seen[l as usize] += 1;
        if (k % 10 == 9) == (split == Split::Test) {
            pixels.extend_from_slice(p);
            labels.push(l);
        }
    }
    ImageDataset {
        pixels,
        labels,
        shape: all.image_shape(),
        class_names: all.class_names().to_vec(),
    }
}

#[cfg(not(feature = "hub"))]
fn load_from_hub(kind: &DatasetKind, _split: Split, _names: Vec<String>) -> Result<ImageDataset> {
    Err(DataError::NotFound {
        dataset: kind.to_string(),
        tried: format!("--data-dir, ${DATA_DIR_ENV}, the shipped assets/mnist"),
        hint: format!(
            "Download the four IDX files (train-images-idx3-ubyte.gz, …) into a folder and pass \
             --data-dir FOLDER or set {DATA_DIR_ENV}; or build with `--features ddpm-data/hub` to \
             fetch from the Hugging Face hub."
        ),
    })
}

#[cfg(feature = "hub")]
fn load_from_hub(kind: &DatasetKind, split: Split, names: Vec<String>) -> Result<ImageDataset> {
    let fetched = match kind {
        DatasetKind::Mnist => candle_datasets::vision::mnist::load(),
        _ => candle_datasets::vision::fashion_mnist::load(),
    };
    let ds = fetched.map_err(|e| DataError::NotFound {
        dataset: kind.to_string(),
        tried: format!(
            "--data-dir, ${DATA_DIR_ENV}, the shipped assets/mnist, the Hugging Face hub ({e})"
        ),
        hint: format!(
            "The hub is unreachable: download the four IDX files into a folder and pass \
             --data-dir FOLDER (or set {DATA_DIR_ENV})."
        ),
    })?;
    let (images, labels) = match split {
        Split::Train => (ds.train_images, ds.train_labels),
        Split::Test => (ds.test_images, ds.test_labels),
    };
    let n = images.dim(0)?;
    let pixels: Vec<u8> = images
        .affine(255.0, 0.5)?
        .clamp(0.0, 255.0)?
        .to_dtype(candle_core::DType::U8)?
        .flatten_all()?
        .to_vec1()?;
    let labels: Vec<u32> = labels.to_dtype(candle_core::DType::U32)?.to_vec1()?;
    let side = ((pixels.len() / n.max(1)) as f64).sqrt() as usize;
    ImageDataset::new(pixels, labels, (1, side, side), names)
}
