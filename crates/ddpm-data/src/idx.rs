//! IDX files (the MNIST format), gzipped or raw.

use std::io::Read;
use std::path::{Path, PathBuf};

use crate::error::{DataError, Result};
use crate::ImageDataset;

const IMAGES_MAGIC: u32 = 0x0000_0803;
const LABELS_MAGIC: u32 = 0x0000_0801;
/// The most bytes a gzipped IDX file may inflate to (MNIST's largest file is 47 MB).
const MAX_INFLATED: u64 = 4 << 30;

/// Which half of an IDX dataset.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Split {
    /// 60,000 training examples.
    Train,
    /// 10,000 test examples.
    Test,
}

impl std::str::FromStr for Split {
    type Err = String;
    /// Parses [`Split::name`].
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        match s {
            "train" => Ok(Split::Train),
            "test" => Ok(Split::Test),
            other => Err(format!("`{other}`: the splits are train and test")),
        }
    }
}

impl Split {
    /// `train` or `test`.
    pub fn name(self) -> &'static str {
        match self {
            Split::Train => "train",
            Split::Test => "test",
        }
    }
}

impl Split {
    /// The standard file stems (`train-images-idx3-ubyte`, `train-labels-idx1-ubyte`, …).
    pub fn file_stems(self) -> (&'static str, &'static str) {
        match self {
            Split::Train => ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
            Split::Test => ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
        }
    }
}

/// Reads a whole file, inflating it when it starts with the gzip magic bytes.
fn read_maybe_gz(path: &Path) -> Result<Vec<u8>> {
    let io = |source| DataError::Io {
        path: path.to_path_buf(),
        source,
    };
    let raw = std::fs::read(path).map_err(|e| {
        if e.kind() == std::io::ErrorKind::NotFound {
            DataError::Missing {
                path: path.to_path_buf(),
                hint: "pass --data-dir DIR (or set DDPM_DATA_DIR) to a folder with the IDX files"
                    .into(),
            }
        } else {
            io(e)
        }
    })?;
    if raw.starts_with(&[0x1f, 0x8b]) {
        // Inflated data is read in bounded: a crafted archive cannot make us allocate more
        // than MAX_INFLATED bytes (the header's promises are checked against what is there).
        let mut out = Vec::with_capacity(raw.len().saturating_mul(4).min(1 << 28));
        flate2::read::GzDecoder::new(&raw[..])
            .take(MAX_INFLATED + 1)
            .read_to_end(&mut out)
            .map_err(|e| DataError::Corrupt {
                path: path.to_path_buf(),
                reason: format!("is not a readable gzip file ({e}); download it again"),
            })?;
        if out.len() as u64 > MAX_INFLATED {
            return Err(DataError::Corrupt {
                path: path.to_path_buf(),
                reason: format!(
                    "inflates to more than {} GiB, far beyond any IDX dataset",
                    MAX_INFLATED >> 30
                ),
            });
        }
        Ok(out)
    } else {
        Ok(raw)
    }
}

fn header(path: &Path, bytes: &[u8], n_words: usize) -> Result<Vec<u32>> {
    if bytes.len() < 4 * n_words {
        return Err(DataError::Truncated {
            path: path.to_path_buf(),
            expected: 4 * n_words,
            found: bytes.len(),
        });
    }
    Ok(bytes[..4 * n_words]
        .chunks_exact(4)
        .map(|c| u32::from_be_bytes([c[0], c[1], c[2], c[3]]))
        .collect())
}

fn check_magic(path: &Path, what: &'static str, expected: u32, found: u32) -> Result<()> {
    if found == expected {
        Ok(())
    } else {
        Err(DataError::BadMagic {
            path: path.to_path_buf(),
            what,
            expected,
            found,
        })
    }
}

fn check_len(path: &Path, data: &[u8], expected: usize) -> Result<()> {
    if data.len() < expected {
        return Err(DataError::Truncated {
            path: path.to_path_buf(),
            expected,
            found: data.len(),
        });
    }
    Ok(())
}

/// IDX image file contents: `n` images of `rows × cols` bytes.
#[derive(Debug, Clone)]
pub struct IdxImages {
    /// Number of images.
    pub n: usize,
    /// Rows per image.
    pub rows: usize,
    /// Columns per image.
    pub cols: usize,
    /// `n · rows · cols` pixels, row-major, 0..=255.
    pub pixels: Vec<u8>,
}

/// Reads an IDX3 image file (magic 0x803), gzipped or raw.
pub fn read_idx_images(path: &Path) -> Result<IdxImages> {
    let bytes = read_maybe_gz(path)?;
    check_magic(path, "image", IMAGES_MAGIC, header(path, &bytes, 1)?[0])?;
    let h = header(path, &bytes, 4)?;
    let (n, rows, cols) = (h[1] as usize, h[2] as usize, h[3] as usize);
    if rows == 0 || cols == 0 {
        return Err(DataError::BadDimensions {
            path: path.to_path_buf(),
            rows,
            cols,
            reason: "images must have at least one row and column",
        });
    }
    let data = &bytes[16..];
    // Checked: the three header words multiply to up to 2^96.
    let len = n
        .checked_mul(rows)
        .and_then(|v| v.checked_mul(cols))
        .ok_or_else(|| DataError::Corrupt {
            path: path.to_path_buf(),
            reason: format!(
                "its header promises {n} images of {rows}×{cols} pixels, more bytes than \
                 this machine can address: the file is corrupt; download it again"
            ),
        })?;
    check_len(path, data, len)?;
    Ok(IdxImages {
        n,
        rows,
        cols,
        pixels: data[..len].to_vec(),
    })
}

/// Reads an IDX1 label file (magic 0x801), gzipped or raw, checking every label is < `num_classes`.
pub fn read_idx_labels(path: &Path, num_classes: usize) -> Result<Vec<u32>> {
    let bytes = read_maybe_gz(path)?;
    check_magic(path, "label", LABELS_MAGIC, header(path, &bytes, 1)?[0])?;
    let h = header(path, &bytes, 2)?;
    let n = h[1] as usize;
    let data = &bytes[8..];
    check_len(path, data, n)?;
    data[..n]
        .iter()
        .enumerate()
        .map(|(index, &l)| {
            if (l as usize) < num_classes {
                Ok(l as u32)
            } else {
                Err(DataError::LabelOutOfRange {
                    path: path.to_path_buf(),
                    index,
                    label: l as u32,
                    num_classes,
                })
            }
        })
        .collect()
}

/// Finds `stem.gz` or `stem` in `dir`; returns the `.gz` path if neither exists.
pub fn find_idx_file(dir: &Path, stem: &str) -> PathBuf {
    let gz = dir.join(format!("{stem}.gz"));
    let raw = dir.join(stem);
    if !gz.exists() && raw.exists() {
        raw
    } else {
        gz
    }
}

/// Loads one split of an MNIST-format dataset (MNIST or Fashion-MNIST) from `dir`,
/// with the standard file names, gzipped or raw.
pub fn load_idx_dir(dir: &Path, split: Split, class_names: Vec<String>) -> Result<ImageDataset> {
    let (img_stem, lbl_stem) = split.file_stems();
    let img_path = find_idx_file(dir, img_stem);
    let lbl_path = find_idx_file(dir, lbl_stem);
    let images = read_idx_images(&img_path)?;
    let labels = read_idx_labels(&lbl_path, class_names.len())?;
    if images.n != labels.len() {
        return Err(DataError::CountMismatch {
            images: img_path,
            n_images: images.n,
            labels: lbl_path,
            n_labels: labels.len(),
        });
    }
    ImageDataset::new(
        images.pixels,
        labels,
        (1, images.rows, images.cols),
        class_names,
    )
}
