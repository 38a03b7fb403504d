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

/// An IDX file opened for reading: its bytes as they come (inflated when it starts with the
/// gzip magic bytes, every member of a multi-member gzip file as gzip readers do), and the
/// file's length when it is stored raw (what a header can be checked against).
struct IdxReader {
    path: PathBuf,
    inner: Box<dyn Read>,
    raw_len: Option<u64>,
}

impl IdxReader {
    /// Opens a regular file (a folder, FIFO or device is refused before it is opened).
    fn open(path: &Path) -> Result<Self> {
        let (file, len) = ddpm_core::files::open_regular(path).map_err(|e| match e.kind() {
            std::io::ErrorKind::NotFound => DataError::Missing {
                path: path.to_path_buf(),
                hint: "pass --data-dir DIR (or set DDPM_DATA_DIR) to a folder with the IDX files"
                    .into(),
            },
            std::io::ErrorKind::InvalidInput => DataError::Corrupt {
                path: path.to_path_buf(),
                reason: e.to_string(),
            },
            _ => DataError::Io {
                path: path.to_path_buf(),
                source: e,
            },
        })?;
        let mut buffered = std::io::BufReader::new(file);
        let magic = std::io::BufRead::fill_buf(&mut buffered).map_err(|source| DataError::Io {
            path: path.to_path_buf(),
            source,
        })?;
        let gz = magic.starts_with(&[0x1f, 0x8b]);
        let (inner, raw_len): (Box<dyn Read>, _) = if gz {
            (Box::new(flate2::read::MultiGzDecoder::new(buffered)), None)
        } else {
            (Box::new(buffered), Some(len))
        };
        Ok(Self {
            path: path.to_path_buf(),
            inner,
            raw_len,
        })
    }

    /// Up to `n` bytes (fewer only at the end of the data); `n` was checked against the
    /// memory this process can allocate by the caller.
    fn read_up_to(&mut self, n: u64) -> Result<Vec<u8>> {
        // Capacity grows with what is really there: a gzip header's promise is not trusted.
        let mut out = Vec::with_capacity(usize::try_from(n.min(1 << 26)).unwrap_or(0));
        (&mut self.inner)
            .take(n)
            .read_to_end(&mut out)
            .map_err(|e| DataError::Corrupt {
                path: self.path.clone(),
                reason: format!("is not a readable gzip or IDX file ({e}); download it again"),
            })?;
        Ok(out)
    }

    /// The header: its magic word, checked against `magic` (a file of `what`), then the other
    /// `n_words − 1` big-endian words. A short file is reported against the whole header.
    fn header(&mut self, what: &'static str, magic: u32, n_words: usize) -> Result<Vec<u32>> {
        let first = self.read_up_to(4)?;
        check_magic(&self.path, what, magic, header(&self.path, &first, 1)?[0])?;
        let rest = self.read_up_to(4 * (n_words as u64 - 1))?;
        if rest.len() < 4 * (n_words - 1) {
            return Err(DataError::Truncated {
                path: self.path.clone(),
                expected: 4 * n_words,
                found: 4 + rest.len(),
            });
        }
        header(&self.path, &rest, n_words - 1)
    }

    /// Exactly `len` bytes of data after a header of `header_len` bytes, refused before
    /// anything is allocated when a raw file is shorter than `promised` data bytes, when `len`
    /// is beyond [`MAX_INFLATED`] or the memory left ([`ddpm_core::memory::check`]).
    fn data(&mut self, header_len: u64, promised: u64, len: u64) -> Result<Vec<u8>> {
        if let Some(file_len) = self.raw_len {
            let held = file_len.saturating_sub(header_len);
            if held < promised {
                return Err(DataError::Truncated {
                    path: self.path.clone(),
                    expected: usize::try_from(promised).unwrap_or(usize::MAX),
                    found: usize::try_from(held).unwrap_or(usize::MAX),
                });
            }
        }
        if len > MAX_INFLATED {
            return Err(DataError::Corrupt {
                path: self.path.clone(),
                reason: format!(
                    "its header promises {len} bytes of data, more than {} GiB, far beyond any \
                     IDX dataset (a limit on the examples reads fewer)",
                    MAX_INFLATED >> 30
                ),
            });
        }
        ddpm_core::memory::check(len, "its data").map_err(|e| DataError::Corrupt {
            path: self.path.clone(),
            reason: format!("cannot be loaded: {e}; limit the examples or free memory"),
        })?;
        let data = self.read_up_to(len)?;
        check_len(
            &self.path,
            &data,
            usize::try_from(len).unwrap_or(usize::MAX),
        )?;
        Ok(data)
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
    read_idx_images_limited(path, None)
}

/// [`read_idx_images`], reading only the first `limit` images (all with `None`): the rest of
/// the file is never read, so a limit bounds time and memory as well as what is used.
pub fn read_idx_images_limited(path: &Path, limit: Option<usize>) -> Result<IdxImages> {
    let mut r = IdxReader::open(path)?;
    let h = r.header("image", IMAGES_MAGIC, 4)?;
    let (n, rows, cols) = (h[0] as usize, h[1] as usize, h[2] as usize);
    if rows == 0 || cols == 0 {
        return Err(DataError::BadDimensions {
            path: path.to_path_buf(),
            rows,
            cols,
            reason: "images must have at least one row and column",
        });
    }
    // Checked: the three header words multiply to up to 2^96.
    let corrupt = || DataError::Corrupt {
        path: path.to_path_buf(),
        reason: format!(
            "its header promises {n} images of {rows}×{cols} pixels, more bytes than this \
             machine can address: the file is corrupt; download it again"
        ),
    };
    let per_image = (rows as u64).checked_mul(cols as u64).ok_or_else(corrupt)?;
    let promised = (n as u64).checked_mul(per_image).ok_or_else(corrupt)?;
    let keep = limit.map_or(n, |l| l.min(n));
    let len = keep as u64 * per_image; // ≤ promised
    let pixels = r.data(16, promised, len)?;
    Ok(IdxImages {
        n: keep,
        rows,
        cols,
        pixels,
    })
}

/// Reads an IDX1 label file (magic 0x801), gzipped or raw, checking every label is < `num_classes`.
pub fn read_idx_labels(path: &Path, num_classes: usize) -> Result<Vec<u32>> {
    read_idx_labels_limited(path, num_classes, None)
}

/// [`read_idx_labels`], reading only the first `limit` labels (all with `None`).
pub fn read_idx_labels_limited(
    path: &Path,
    num_classes: usize,
    limit: Option<usize>,
) -> Result<Vec<u32>> {
    let mut r = IdxReader::open(path)?;
    let n = r.header("label", LABELS_MAGIC, 2)?[0] as usize;
    let keep = limit.map_or(n, |l| l.min(n));
    let data = r.data(8, n as u64, keep as u64)?;
    data.iter()
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
    load_idx_dir_limited(dir, split, class_names, None)
}

/// [`load_idx_dir`], reading only the first `limit` examples of each file.
pub fn load_idx_dir_limited(
    dir: &Path,
    split: Split,
    class_names: Vec<String>,
    limit: Option<usize>,
) -> Result<ImageDataset> {
    let (img_stem, lbl_stem) = split.file_stems();
    let img_path = find_idx_file(dir, img_stem);
    let lbl_path = find_idx_file(dir, lbl_stem);
    let images = read_idx_images_limited(&img_path, limit)?;
    let labels = read_idx_labels_limited(&lbl_path, class_names.len(), limit)?;
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
