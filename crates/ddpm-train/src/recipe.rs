//! Named training recipes: sets of defaults chosen by measurement (docs/recipes.md), so that
//! `ddpm train` with no flags does the right thing on the machine it runs on; any option given
//! explicitly overrides its recipe value.

use crate::LossWeighting;
use ddpm_core::Prediction;
use ddpm_unet::Preset;

/// A named set of defaults for `ddpm train`; any flag given explicitly overrides its value.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[cfg_attr(feature = "clap", derive(clap::ValueEnum))]
pub enum Recipe {
    /// The CPU default: the `small` model at batch 32, lr 1e-3, for a 30-minute budget (warm-up
    /// and EMA fitted to the planned steps); chosen by measurement, see docs/recipes.md.
    Quick,
    /// The recipe of the shipped model (the default on --device cuda): the `mnist` preset,
    /// 6 epochs at batch 256, lr 1e-3, 200 warm-up steps, EMA 0.995. About 8 minutes on an
    /// H100, about 10 hours on a 2-core CPU.
    Full,
}

/// The values a recipe gives to the options left out.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RecipeValues {
    /// The U-Net preset.
    pub model: Preset,
    /// Epochs.
    pub epochs: u64,
    /// Batch size.
    pub batch_size: usize,
    /// Peak learning rate.
    pub lr: f64,
    /// Warm-up steps (with a budget and no explicit value, fitted to the plan instead).
    pub warmup: u64,
    /// EMA decay (with a budget and no explicit value, fitted to the plan instead).
    pub ema_decay: f64,
    /// Wall-clock budget in seconds, if any.
    pub budget: Option<f64>,
    /// Per-timestep loss weights.
    pub loss_weighting: LossWeighting,
    /// What the network predicts.
    pub prediction: Prediction,
    /// Steps between metrics lines.
    pub log_every: u64,
    /// Steps between checkpoints (0: epoch ends only).
    pub checkpoint_every: u64,
}

impl Recipe {
    /// The recipe a run gets when none is named: `quick` on a CPU, `full` on a GPU.
    pub fn default_for(on_cpu: bool) -> Self {
        if on_cpu {
            Recipe::Quick
        } else {
            Recipe::Full
        }
    }

    /// The recipe's values.
    pub fn values(self) -> RecipeValues {
        match self {
            Recipe::Quick => RecipeValues {
                model: Preset::Small,
                epochs: 100,
                // Batch 32 over batch 64 at the same images seen: 99.10 % against 98.30 % class
                // accuracy at w = 1 (docs/recipes.md, runs EA and default-1).
                batch_size: 32,
                lr: 1e-3,
                warmup: 100,
                ema_decay: 0.998,
                budget: Some(30.0 * 60.0),
                loss_weighting: LossWeighting::Uniform,
                prediction: Prediction::Epsilon,
                // Each metrics line evaluates the held-out loss (about 6 s for 1,024 examples
                // on a 2-core CPU): every 400 steps keeps that under 2 % of the budget.
                log_every: 400,
                checkpoint_every: 500,
            },
            Recipe::Full => RecipeValues {
                model: Preset::Mnist,
                epochs: 6,
                batch_size: 256,
                lr: 1e-3,
                warmup: 200,
                ema_decay: 0.995,
                budget: None,
                loss_weighting: LossWeighting::Uniform,
                prediction: Prediction::Epsilon,
                log_every: 100,
                checkpoint_every: 0,
            },
        }
    }
    /// The recipe's name (`quick`, `full`).
    pub fn name(self) -> &'static str {
        match self {
            Recipe::Quick => "quick",
            Recipe::Full => "full",
        }
    }
}

/// The first line of a run: what the recipe will do, and the flag that changes it.
/// `named`: whether the recipe was asked for (else it is the device's default).
pub fn announce(r: Recipe, named: bool, budget: Option<f64>) -> String {
    let explicit = if named {
        ""
    } else {
        " (the default on this device)"
    };
    match (r, budget) {
        (_, Some(s)) => format!(
            "ddpm train: recipe `{}`{explicit}: ends within {} of wall-clock, sample grids and \
             checkpoints included (--budget changes it; --recipe full is the shipped model's recipe)",
            r.name(),
            crate::budget::format_duration(s)
        ),
        (Recipe::Full, None) => format!(
            "ddpm train: recipe `full`{explicit}: the shipped model's recipe, about 8 min on an H100 \
             and hours on a CPU (--budget 30m caps it; --recipe quick is the 30-minute CPU recipe)"
        ),
        (r, None) => format!(
            "ddpm train: recipe `{}`{explicit} with no budget (--budget 30m sets one)",
            r.name()
        ),
    }
}
