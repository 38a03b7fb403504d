//! The training objective: what the network regresses ([`Prediction`], on the model card) and
//! how the timesteps are weighted ([`LossWeighting`], a training option).
//!
//! The loss of a batch is `mean_b( w(t_b) · mean_pixels((f(x_t, t_b, y_b) − target_b)²) )`,
//! with the target ε or v ([`Prediction::target`]) and one weight per sample.
//!
//! ```
//! use ddpm_train::loss::LossWeighting;
//! use ddpm_core::Prediction;
//!
//! // min-SNR-5 for ε-prediction: SNR = ᾱ/(1−ᾱ); the weight is min(SNR, 5)/SNR.
//! let w = LossWeighting::MinSnr { gamma: 5.0 };
//! assert_eq!(w.weight(Prediction::Epsilon, 0.5), 1.0);         // SNR 1
//! assert!((w.weight(Prediction::Epsilon, 0.99) - 5.0 / 99.0).abs() < 1e-12); // SNR 99
//! ```

use ddpm_core::Prediction;
use serde::{Deserialize, Serialize};

/// Per-timestep weights of the regression loss.
#[derive(Debug, Clone, Copy, PartialEq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", tag = "kind")]
pub enum LossWeighting {
    /// Every timestep counts the same (Ho et al. 2020's "simple" loss).
    #[default]
    Uniform,
    /// Min-SNR-γ (Hang et al. 2023): the loss at SNR(t) = ᾱ_t/(1−ᾱ_t) is weighted so that the
    /// effective x_0-space weight is min(SNR, γ): for ε-prediction min(SNR, γ)/SNR, for
    /// v-prediction min(SNR, γ)/(SNR + 1). It takes weight off the nearly clean timesteps,
    /// which dominate an ε loss and teach little about a digit's shape.
    MinSnr {
        /// The clamp γ (the paper uses 5).
        gamma: f64,
    },
}

impl LossWeighting {
    /// The weight of a sample at a timestep with cumulative product ᾱ (`alpha_cumprod`).
    pub fn weight(&self, prediction: Prediction, alpha_cumprod: f64) -> f64 {
        match *self {
            Self::Uniform => 1.0,
            Self::MinSnr { gamma } => {
                let snr = alpha_cumprod / (1.0 - alpha_cumprod).max(1e-20);
                let clamped = snr.min(gamma);
                match prediction {
                    Prediction::Epsilon => clamped / snr.max(1e-20),
                    Prediction::V => clamped / (snr + 1.0),
                }
            }
        }
    }

    /// Checks the options.
    pub fn validate(&self) -> Result<(), String> {
        match *self {
            Self::Uniform => Ok(()),
            Self::MinSnr { gamma } if gamma.is_finite() && gamma > 0.0 => Ok(()),
            Self::MinSnr { gamma } => {
                Err(format!("min-SNR γ must be a positive number, got {gamma}"))
            }
        }
    }

    /// `uniform` or `min-snr-G` (the flag's spelling).
    pub fn name(&self) -> String {
        match self {
            Self::Uniform => "uniform".into(),
            Self::MinSnr { gamma } => format!("min-snr-{gamma}"),
        }
    }

    /// Parses [`LossWeighting::name`]: `uniform`, `min-snr` (γ = 5) or `min-snr-G`.
    pub fn from_name(s: &str) -> Result<Self, String> {
        let w = match s {
            "uniform" => Self::Uniform,
            "min-snr" => Self::MinSnr { gamma: 5.0 },
            _ => match s.strip_prefix("min-snr-").map(str::parse::<f64>) {
                Some(Ok(gamma)) => Self::MinSnr { gamma },
                _ => {
                    return Err(format!(
                        "`{s}`: use uniform, min-snr (γ = 5) or min-snr-G (e.g. min-snr-5)"
                    ))
                }
            },
        };
        w.validate()?;
        Ok(w)
    }
}

impl std::str::FromStr for LossWeighting {
    type Err = String;
    /// [`LossWeighting::from_name`].
    fn from_str(s: &str) -> Result<Self, String> {
        Self::from_name(s)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn weights_match_the_paper_by_hand() {
        let w = LossWeighting::MinSnr { gamma: 5.0 };
        // ᾱ = 0.8: SNR = 4 < γ, weight 1 for ε, 4/5 for v.
        assert!((w.weight(Prediction::Epsilon, 0.8) - 1.0).abs() < 1e-12);
        assert!((w.weight(Prediction::V, 0.8) - 0.8).abs() < 1e-12);
        // ᾱ = 0.9: SNR = 9 > γ: 5/9 for ε, 5/10 for v.
        assert!((w.weight(Prediction::Epsilon, 0.9) - 5.0 / 9.0).abs() < 1e-12);
        assert!((w.weight(Prediction::V, 0.9) - 0.5).abs() < 1e-12);
        assert_eq!(LossWeighting::Uniform.weight(Prediction::V, 0.9), 1.0);
    }

    #[test]
    fn names_round_trip_and_bad_ones_are_refused() {
        for w in [LossWeighting::Uniform, LossWeighting::MinSnr { gamma: 3.0 }] {
            assert_eq!(LossWeighting::from_name(&w.name()).unwrap(), w);
        }
        assert_eq!(
            LossWeighting::from_name("min-snr").unwrap(),
            LossWeighting::MinSnr { gamma: 5.0 }
        );
        assert!(LossWeighting::from_name("min-snr-0").is_err());
        assert!(LossWeighting::from_name("snr").is_err());
    }
}
