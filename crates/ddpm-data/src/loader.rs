use rand::seq::SliceRandom;
use rand::SeedableRng;

use crate::error::{DataError, Result};

/// How a [`Loader`] walks the dataset.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LoaderConfig {
    /// Examples per batch.
    pub batch_size: usize,
    /// Shuffle each epoch.
    pub shuffle: bool,
    /// Drop the last, incomplete batch.
    pub drop_last: bool,
    /// Seed of the shuffles; epoch `e` uses a permutation derived from `(seed, e)`.
    pub seed: u64,
}

/// Yields the example indices of each batch of an epoch.
///
/// The order of epoch `e` depends only on `(seed, e)`, so a resumed run sees exactly the
/// batches an uninterrupted one would.
#[derive(Debug, Clone)]
pub struct Loader {
    len: usize,
    config: LoaderConfig,
}

impl Loader {
    /// A loader over `len` examples. Fails if `batch_size` is 0.
    pub fn new(len: usize, config: LoaderConfig) -> Result<Self> {
        if config.batch_size == 0 {
            return Err(candle_core::Error::Msg("batch size must be at least 1".into()).into());
        }
        if len == 0 {
            return Err(DataError::IndexOutOfRange { index: 0, len: 0 });
        }
        Ok(Self { len, config })
    }

    /// Number of batches per epoch.
    pub fn batches_per_epoch(&self) -> usize {
        if self.config.drop_last {
            self.len / self.config.batch_size
        } else {
            self.len.div_ceil(self.config.batch_size)
        }
    }

    /// The loader's configuration.
    pub fn config(&self) -> &LoaderConfig {
        &self.config
    }

    /// The batches of epoch `epoch`.
    pub fn epoch(&self, epoch: u64) -> impl Iterator<Item = Vec<usize>> + '_ {
        let mut order: Vec<usize> = (0..self.len).collect();
        if self.config.shuffle {
            let seed = self.config.seed ^ epoch.wrapping_mul(0x9E37_79B9_7F4A_7C15);
            order.shuffle(&mut rand_chacha::ChaCha8Rng::seed_from_u64(seed));
        }
        let bs = self.config.batch_size;
        (0..self.batches_per_epoch())
            .map(move |b| order[b * bs..((b + 1) * bs).min(order.len())].to_vec())
    }
}
