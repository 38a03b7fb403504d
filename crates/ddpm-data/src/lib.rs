//! The data pipeline: MNIST and Fashion-MNIST IDX files (gzipped or raw), image folders,
//! and a seeded batch [`Loader`].
//!
//! Images come out as `[B, C, H, W]` f32 in `[-1, 1]` and labels as `[B]` u32.
//!
//! Where MNIST comes from, in this order ([`resolve_idx_dir`]):
//! 1. an explicit directory (`--data-dir`), then the `DDPM_DATA_DIR` environment variable;
//! 2. the copy shipped in the repository (`assets/mnist/`), found under the current directory
//!    or a parent of it ([`shipped_mnist_dir`]; no build-machine path is compiled in);
//! 3. the Hugging Face hub through candle-datasets, with the `hub` cargo feature.
//!
//! ```
//! use candle_core::Device;
//! use ddpm_data::{Batcher, Dataset, ImageDataset, Loader, LoaderConfig, TensorBatcher};
//!
//! // Four 2×2 grey images of two classes.
//! let pixels = vec![0u8, 255, 0, 255, 10, 20, 30, 40, 255, 255, 255, 255, 0, 0, 0, 0];
//! let ds = ImageDataset::new(pixels, vec![0, 1, 0, 1], (1, 2, 2), vec!["a".into(), "b".into()])?;
//! let batcher = TensorBatcher::new(&ds, &Device::Cpu)?;
//! let loader = Loader::new(ds.len(), LoaderConfig { batch_size: 3, shuffle: true, drop_last: true, seed: 0 })?;
//! let batches: Vec<_> = loader.epoch(0).collect();
//! assert_eq!(batches.len(), 1); // the fourth example is dropped
//! let batch = batcher.batch(&batches[0])?;
//! assert_eq!(batch.images.dims(), &[3, 1, 2, 2]);
//! assert!(batch.images.min_all()?.to_scalar::<f32>()? >= -1.0);
//! # Ok::<(), ddpm_data::DataError>(())
//! ```

mod error;
mod folder;
pub mod idx;
mod loader;
mod source;

use candle_core::{DType, Device, Tensor};

pub use error::{DataError, Result};
pub use folder::{load_image_folder, load_image_folder_as, Channels, IMAGE_EXTENSIONS};
pub use idx::{
    load_idx_dir, load_idx_dir_limited, read_idx_images, read_idx_images_limited, read_idx_labels,
    read_idx_labels_limited, Split,
};
pub use loader::{Loader, LoaderConfig};
pub use source::{
    load_dataset, load_dataset_limited, resolve_idx_dir, shipped_mnist_dir, DatasetKind,
    DATA_DIR_ENV,
};

/// A dataset of fixed-size images with integer labels.
pub trait Dataset {
    /// Number of examples.
    fn len(&self) -> usize;
    /// True when the dataset has no examples.
    fn is_empty(&self) -> bool {
        self.len() == 0
    }
    /// `(channels, height, width)` of every image.
    fn image_shape(&self) -> (usize, usize, usize);
    /// Names of the classes, in label order.
    fn class_names(&self) -> &[String];
    /// Pixels (0..=255, CHW order) and label of example `index`, `None` past the end.
    fn get(&self, index: usize) -> Option<(&[u8], u32)>;
}

/// An in-memory dataset of 8-bit images, as read from IDX files or an image folder.
#[derive(Debug, Clone)]
pub struct ImageDataset {
    pixels: Vec<u8>,
    labels: Vec<u32>,
    shape: (usize, usize, usize),
    class_names: Vec<String>,
}

impl ImageDataset {
    /// Builds a dataset from `N·C·H·W` pixels, `N` labels, the image shape and class names.
    ///
    /// Fails if the sizes disagree or a label is not below `class_names.len()`.
    pub fn new(
        pixels: Vec<u8>,
        labels: Vec<u32>,
        shape: (usize, usize, usize),
        class_names: Vec<String>,
    ) -> Result<Self> {
        let per = shape.0 * shape.1 * shape.2;
        if per == 0 || pixels.len() != per * labels.len() {
            return Err(candle_core::Error::Msg(format!(
                "dataset: {} pixels do not make {} images of shape {shape:?}",
                pixels.len(),
                labels.len()
            ))
            .into());
        }
        if let Some((index, &label)) = labels
            .iter()
            .enumerate()
            .find(|(_, &l)| l as usize >= class_names.len())
        {
            return Err(DataError::LabelOutOfRange {
                path: "<in memory>".into(),
                index,
                label,
                num_classes: class_names.len(),
            });
        }
        Ok(Self {
            pixels,
            labels,
            shape,
            class_names,
        })
    }

    /// All labels.
    pub fn labels(&self) -> &[u32] {
        &self.labels
    }

    /// The index of the first example of each class that has one, in class order.
    ///
    /// ```
    /// let names = vec!["a".to_string(), "b".into(), "c".into()];
    /// let ds = ddpm_data::ImageDataset::new(vec![0; 4], vec![1, 0, 1, 0], (1, 1, 1), names)?;
    /// assert_eq!(ds.first_of_each_class(), [1, 0]);
    /// assert_eq!(ds.first_per_class(2), [vec![1, 3], vec![0, 2], vec![]]);
    /// # Ok::<(), ddpm_data::DataError>(())
    /// ```
    pub fn first_of_each_class(&self) -> Vec<usize> {
        self.first_per_class(1).into_iter().flatten().collect()
    }

    /// The indices of the first `k` examples of every class (fewer where a class has fewer),
    /// one list per class in class order.
    pub fn first_per_class(&self, k: usize) -> Vec<Vec<usize>> {
        let mut by_class = vec![Vec::new(); self.class_names.len()];
        for (i, &l) in self.labels.iter().enumerate() {
            if let Some(v) = by_class.get_mut(l as usize).filter(|v| v.len() < k) {
                v.push(i);
            }
        }
        by_class
    }

    /// The first `n` examples (all of them if `n` is larger).
    pub fn take(&self, n: usize) -> Self {
        let n = n.min(self.labels.len());
        let per = self.shape.0 * self.shape.1 * self.shape.2;
        Self {
            pixels: self.pixels[..n * per].to_vec(),
            labels: self.labels[..n].to_vec(),
            shape: self.shape,
            class_names: self.class_names.clone(),
        }
    }

    /// All images as `[N, C, H, W]` f32 in `[-1, 1]` and labels as `[N]` u32.
    pub fn to_tensors(&self, device: &Device) -> Result<(Tensor, Tensor)> {
        let b = TensorBatcher::new(self, device)?;
        Ok((pixels_to_unit(&b.pixels)?, b.labels))
    }
}

impl Dataset for ImageDataset {
    fn len(&self) -> usize {
        self.labels.len()
    }
    fn image_shape(&self) -> (usize, usize, usize) {
        self.shape
    }
    fn class_names(&self) -> &[String] {
        &self.class_names
    }
    fn get(&self, index: usize) -> Option<(&[u8], u32)> {
        let per = self.shape.0 * self.shape.1 * self.shape.2;
        let label = *self.labels.get(index)?;
        Some((&self.pixels[index * per..(index + 1) * per], label))
    }
}

/// A batch of images `[B, C, H, W]` f32 in `[-1, 1]` and labels `[B]` u32.
#[derive(Debug, Clone)]
pub struct Batch {
    /// Images.
    pub images: Tensor,
    /// Labels.
    pub labels: Tensor,
}

/// Turns a list of example indices into a [`Batch`].
pub trait Batcher {
    /// Builds the batch of the given examples, in order.
    fn batch(&self, indices: &[usize]) -> Result<Batch>;
}

/// A [`Batcher`] that uploads the dataset to the device once, as u8, and gathers each
/// batch there: no copy of the whole dataset per epoch, and 4× less memory than f32.
#[derive(Debug, Clone)]
pub struct TensorBatcher {
    pixels: Tensor,
    labels: Tensor,
}

fn pixels_to_unit(pixels: &Tensor) -> Result<Tensor> {
    Ok(pixels.to_dtype(DType::F32)?.affine(2.0 / 255.0, -1.0)?)
}

impl TensorBatcher {
    /// Copies the dataset's pixels and labels onto `device`.
    pub fn new<D: Dataset + ?Sized>(ds: &D, device: &Device) -> Result<Self> {
        let (c, h, w) = ds.image_shape();
        let n = ds.len();
        let mut pixels = Vec::with_capacity(n * c * h * w);
        let mut labels = Vec::with_capacity(n);
        for i in 0..n {
            let (p, l) = ds
                .get(i)
                .ok_or(DataError::IndexOutOfRange { index: i, len: n })?;
            pixels.extend_from_slice(p);
            labels.push(l);
        }
        Ok(Self {
            pixels: Tensor::from_vec(pixels, (n, c, h, w), device)?,
            labels: Tensor::from_vec(labels, n, device)?,
        })
    }
}

impl Batcher for TensorBatcher {
    fn batch(&self, indices: &[usize]) -> Result<Batch> {
        let len = self.labels.dim(0)?;
        if let Some(&index) = indices.iter().find(|&&i| i >= len) {
            return Err(DataError::IndexOutOfRange { index, len });
        }
        let idx: Vec<u32> = indices.iter().map(|&i| i as u32).collect();
        let idx = Tensor::from_vec(idx, indices.len(), self.labels.device())?;
        Ok(Batch {
            images: pixels_to_unit(&self.pixels.index_select(&idx, 0)?)?,
            labels: self.labels.index_select(&idx, 0)?,
        })
    }
}
