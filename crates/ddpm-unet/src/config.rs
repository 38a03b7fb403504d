use serde::{Deserialize, Serialize};

/// Errors raised by an invalid [`UNetConfig`] or input size.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[non_exhaustive]
pub enum ConfigError {
    /// A field is out of its valid range.
    #[error("invalid U-Net config: {0}")]
    Invalid(String),
    /// The image size cannot go down and back up through the U-Net's levels exactly.
    #[error(
        "image size {height}x{width} cannot round-trip through {levels} levels: each side must be \
         divisible by {factor} (e.g. 28 works for 3 levels, 32 for up to 6)"
    )]
    SizeMismatch {
        /// Image height.
        height: usize,
        /// Image width.
        width: usize,
        /// Number of resolution levels.
        levels: usize,
        /// 2^(levels − 1).
        factor: usize,
    },
}

/// The U-Net's hyper-parameters. Serialised into every checkpoint.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct UNetConfig {
    /// Image channels in and out (1 for MNIST).
    pub in_channels: usize,
    /// Channels of the first level; level `i` has `base_channels * channel_mults[i]`.
    pub base_channels: usize,
    /// Channel multiplier per resolution level; the image is halved between levels,
    /// so `[1, 2, 2]` maps 28 → 14 → 7.
    pub channel_mults: Vec<usize>,
    /// Residual blocks per level on the way down (the way up has one more, for the skips).
    pub num_res_blocks: usize,
    /// Indices of the levels that have self-attention after each residual block
    /// (the middle block always has one).
    pub attention_levels: Vec<usize>,
    /// Attention heads; must divide every attended level's channel count.
    pub num_heads: usize,
    /// Dropout probability inside residual blocks (training only).
    pub dropout: f32,
    /// GroupNorm groups; must divide every level's channel count.
    pub groups: usize,
    /// Number of classes; 0 makes the model unconditional. The class embedding has
    /// `num_classes + 1` rows: the last one is the null class of classifier-free guidance.
    pub num_classes: usize,
    /// Take the guidance weight w as an input (a guidance-distilled student, `ddpm distill`):
    /// w's sinusoidal embedding (of 200·w) goes through its own two-layer MLP and is added to
    /// the time and class embedding. Cards without the field read as `false`.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub guidance_embedding: bool,
}

impl UNetConfig {
    /// The default MNIST model (3.6 M parameters, 7.3 MB in f16): 48 base channels,
    /// levels 28/14/7 with 48/96/96 channels, attention at 7×7, two residual blocks per
    /// level, 10 classes.
    pub fn mnist() -> Self {
        Self {
            in_channels: 1,
            base_channels: 48,
            channel_mults: vec![1, 2, 2],
            num_res_blocks: 2,
            attention_levels: vec![2],
            num_heads: 4,
            dropout: 0.0,
            groups: 16,
            num_classes: 10,
            guidance_embedding: false,
        }
    }

    /// The CPU model (1.1 M parameters): 32 base channels, levels 28/14/7, attention at
    /// 7×7, one residual block per level. With stock candle it trains at about 6 images/s
    /// on 2 cores (docs/performance.md); the fast CPU kernels are what make it an
    /// under-an-hour model.
    pub fn small() -> Self {
        Self {
            in_channels: 1,
            base_channels: 32,
            channel_mults: vec![1, 2, 2],
            num_res_blocks: 1,
            attention_levels: vec![2],
            num_heads: 2,
            dropout: 0.0,
            groups: 8,
            num_classes: 10,
            guidance_embedding: false,
        }
    }

    /// A very small model for tests: 8 base channels, two levels, attention at the lower one.
    pub fn tiny() -> Self {
        Self {
            in_channels: 1,
            base_channels: 8,
            channel_mults: vec![1, 2],
            num_res_blocks: 1,
            attention_levels: vec![1],
            num_heads: 2,
            dropout: 0.0,
            groups: 4,
            num_classes: 10,
            guidance_embedding: false,
        }
    }

    /// A named preset: `mnist`, `small` or `tiny`.
    pub fn preset(name: &str) -> Option<Self> {
        Preset::from_name(name).map(Preset::config)
    }

    /// Width of the time (and class) embedding: 4 × `base_channels`.
    pub fn embed_dim(&self) -> usize {
        4 * self.base_channels
    }

    /// Channels of level `i`.
    pub fn level_channels(&self, level: usize) -> usize {
        self.base_channels * self.channel_mults[level]
    }

    /// Checks every field.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let bad = |m: String| Err(ConfigError::Invalid(m));
        if self.in_channels == 0 {
            return bad("in_channels must be at least 1".into());
        }
        if self.base_channels == 0 || !self.base_channels.is_multiple_of(2) {
            return bad(format!(
                "base_channels must be even and > 0, got {}",
                self.base_channels
            ));
        }
        if self.channel_mults.is_empty() || self.channel_mults.contains(&0) {
            return bad(format!(
                "channel_mults must be non-empty and > 0, got {:?}",
                self.channel_mults
            ));
        }
        if self.num_res_blocks == 0 {
            return bad("num_res_blocks must be at least 1".into());
        }
        if self.groups == 0 {
            return bad("groups must be at least 1".into());
        }
        if self.num_heads == 0 {
            return bad("num_heads must be at least 1".into());
        }
        if !(0.0..1.0).contains(&self.dropout) {
            return bad(format!("dropout must lie in [0, 1), got {}", self.dropout));
        }
        let levels = self.channel_mults.len();
        for (i, _) in self.channel_mults.iter().enumerate() {
            let ch = self.level_channels(i);
            if !ch.is_multiple_of(self.groups) {
                return bad(format!(
                    "groups = {} does not divide the {ch} channels of level {i}",
                    self.groups
                ));
            }
        }
        let deepest = self.level_channels(levels - 1);
        let mut attended: Vec<usize> = self.attention_levels.clone();
        attended.push(levels - 1); // the middle block
        for &l in &attended {
            if l >= levels {
                return bad(format!(
                    "attention level {l} does not exist (levels 0..{levels})"
                ));
            }
            let ch = if l == levels - 1 {
                deepest
            } else {
                self.level_channels(l)
            };
            if ch % self.num_heads != 0 {
                return bad(format!(
                    "num_heads = {} does not divide the {ch} channels of level {l}",
                    self.num_heads
                ));
            }
        }
        Ok(())
    }

    /// Checks that `height × width` images go down and back up the levels exactly.
    pub fn check_image_size(&self, height: usize, width: usize) -> Result<(), ConfigError> {
        let levels = self.channel_mults.len();
        let factor = 1usize << (levels - 1);
        if height == 0
            || width == 0
            || !height.is_multiple_of(factor)
            || !width.is_multiple_of(factor)
        {
            return Err(ConfigError::SizeMismatch {
                height,
                width,
                levels,
                factor,
            });
        }
        Ok(())
    }
}

/// The U-Net presets by name: `mnist` (the shipped model's), `small` (trains on a CPU), `tiny`
/// (tests).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
#[cfg_attr(feature = "clap", derive(clap::ValueEnum))]
pub enum Preset {
    /// The shipped model's architecture ([`UNetConfig::mnist`]).
    Mnist,
    /// A smaller U-Net that trains on a CPU ([`UNetConfig::small`]).
    Small,
    /// A few thousand parameters, for tests ([`UNetConfig::tiny`]).
    Tiny,
}

impl Preset {
    /// Every preset.
    pub const ALL: [Preset; 3] = [Preset::Mnist, Preset::Small, Preset::Tiny];

    /// The preset's configuration.
    pub fn config(self) -> UNetConfig {
        match self {
            Preset::Mnist => UNetConfig::mnist(),
            Preset::Small => UNetConfig::small(),
            Preset::Tiny => UNetConfig::tiny(),
        }
    }

    /// Its name: `mnist`, `small` or `tiny`.
    pub fn name(self) -> &'static str {
        match self {
            Preset::Mnist => "mnist",
            Preset::Small => "small",
            Preset::Tiny => "tiny",
        }
    }

    /// The preset named `name`.
    pub fn from_name(name: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|p| p.name() == name)
    }
}
