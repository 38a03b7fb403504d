//! The training objective: what the network regresses ([`Prediction`], on the model card) and
//! how the timesteps are weighted ([`LossWeighting`], a training option).
//!
//! The loss of a batch is `mean_b( w(t_b) · mean_pixels((f(x_t, t_b, y_b) − target_b)²) )`,
//! with the target ε or v ([`Prediction::target`]) and one weight per sample.
//!
//! [`Objective`] is the public training step's loss for any network: [`Objective::draw`] picks
//! one timestep, one noise image and the class dropout per sample and noises the batch;
//! [`Objective::loss`] compares the network's output with its target. The [`crate::Trainer`]
//! calls the two around its network's forward; a hand-written loop
//! (`examples/train_loop.rs`) does the same.
//!
//! ```
//! use candle_core::{Device, Tensor};
//! use ddpm_core::{Prediction, SeededNoise};
//! use ddpm_train::loss::{LossWeighting, Objective};
//!
//! let schedule = ddpm_schedule::ScheduleConfig::default().build()?;
//! let objective = Objective { prediction: Prediction::Epsilon, weighting: LossWeighting::Uniform, p_uncond: 0.1 };
//! let x0 = Tensor::zeros((2, 1, 4, 4), candle_core::DType::F32, &Device::Cpu)?;
//! let labels = Tensor::new(&[3u32, 7], &Device::Cpu)?;
//! let drawn = objective.draw(&schedule, &x0, Some(&labels), Some(10), &mut SeededNoise::new(0))?;
//! // A network that predicts the noise exactly has zero loss.
//! let loss = objective.loss(&schedule, &x0, &drawn, &drawn.noise)?;
//! assert_eq!(loss.to_scalar::<f32>()?, 0.0);
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```
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

use candle_core::{DType, Tensor};
type Result<T> = candle_core::Result<T>;
use ddpm_core::{NoiseSchedule, NoiseSource, Prediction, SeededNoise};
use ddpm_schedule::Schedule;
use serde::{Deserialize, Serialize};

/// The diffusion loss of a training step, for any network.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Objective {
    /// What the network predicts (the card's [`Prediction`]).
    pub prediction: Prediction,
    /// How the timesteps are weighted.
    pub weighting: LossWeighting,
    /// Probability of replacing a label by the null class (classifier-free guidance).
    pub p_uncond: f64,
}

/// A batch noised for one training step ([`Objective::draw`]).
#[derive(Debug, Clone)]
pub struct Drawn {
    /// The timesteps, on the host.
    pub ts: Vec<u32>,
    /// The timesteps as a `[B]` u32 tensor.
    pub t: Tensor,
    /// The noise ε, `[B, C, H, W]`.
    pub noise: Tensor,
    /// x_t = √ᾱ_t·x_0 + √(1−ᾱ_t)·ε.
    pub x_t: Tensor,
    /// The labels after class dropout (`None` for an unconditional network).
    pub labels: Option<Tensor>,
}

impl Objective {
    /// Draws one uniform timestep and one Gaussian noise image per sample (in that order, from
    /// `rng`), noises `x0` with them, and replaces each label by `null_class` with probability
    /// `p_uncond` (one more uniform draw per sample; `null_class` `None`: the network is
    /// unconditional and gets no labels).
    pub fn draw(
        &self,
        schedule: &Schedule,
        x0: &Tensor,
        labels: Option<&Tensor>,
        null_class: Option<u32>,
        rng: &mut SeededNoise,
    ) -> Result<Drawn> {
        let b = x0.dim(0)?;
        let device = x0.device();
        let ts = rng.uniform_u32(b, schedule.num_train_timesteps() as u32);
        let t = Tensor::new(ts.as_slice(), device)?;
        let noise = rng.randn(x0.shape(), DType::F32, device)?;
        let labels = match (null_class, labels) {
            (Some(null), Some(labels)) => {
                let u = rng.uniform_f32(b);
                let mut l: Vec<u32> = labels.to_dtype(DType::U32)?.to_vec1()?;
                if l.len() != b {
                    candle_core::bail!("{} labels for a batch of {b} images", l.len());
                }
                for (li, ui) in l.iter_mut().zip(u) {
                    if (ui as f64) < self.p_uncond {
                        *li = null;
                    }
                }
                Some(Tensor::from_vec(l, b, device)?)
            }
            (Some(_), None) => {
                candle_core::bail!("the network is class-conditional: the batch needs labels")
            }
            (None, _) => None,
        };
        // Timesteps checked on the host: no device read-back before the forward pass.
        let x_t = schedule.add_noise_from_host(x0, &noise, &ts)?;
        Ok(Drawn {
            ts,
            t,
            noise,
            x_t,
            labels,
        })
    }

    /// The loss of the network's `output` on the batch `x0` noised as `drawn`: the regression
    /// target of [`Objective::prediction`], weighted per sample by [`Objective::weighting`].
    pub fn loss(
        &self,
        schedule: &Schedule,
        x0: &Tensor,
        drawn: &Drawn,
        output: &Tensor,
    ) -> Result<Tensor> {
        let device = x0.device();
        let target = match self.prediction {
            Prediction::Epsilon => drawn.noise.clone(),
            Prediction::V => {
                let (a, s) = coefficients(schedule, &drawn.ts, device)?;
                (drawn.noise.broadcast_mul(&a)? - x0.broadcast_mul(&s)?)?
            }
        };
        match self.weighting {
            LossWeighting::Uniform => candle_nn::loss::mse(output, &target),
            weighting => {
                let ac = schedule.alphas_cumprod();
                let w: Vec<f32> = drawn
                    .ts
                    .iter()
                    .map(|&t| weighting.weight(self.prediction, ac[t as usize]) as f32)
                    .collect();
                let w = Tensor::from_vec(w, drawn.ts.len(), device)?;
                let per_sample = (output - target)?.sqr()?.flatten_from(1)?.mean(1)?;
                (per_sample * w)?.mean_all()
            }
        }
    }
}

/// The unweighted ε-MSE of a network's `output` for `x_t` (noised from `noise` at the host-side
/// timesteps `ts`), a v-prediction converted to ε first: comparable across parameterisations
/// and loss weightings (what the held-out loss reports).
pub fn epsilon_mse(
    schedule: &Schedule,
    prediction: Prediction,
    x_t: &Tensor,
    ts: &[u32],
    noise: &Tensor,
    output: Tensor,
) -> Result<Tensor> {
    let eps = match prediction {
        Prediction::Epsilon => output,
        Prediction::V => {
            let (a, s) = coefficients(schedule, ts, x_t.device())?;
            // ε = √ᾱ·v + √(1−ᾱ)·x_t
            (output.broadcast_mul(&a)? + x_t.broadcast_mul(&s)?)?
        }
    };
    candle_nn::loss::mse(&eps, noise)
}

/// `[B,1,1,1]` tensors of √ᾱ_t and √(1−ᾱ_t) for host-side timesteps.
fn coefficients(
    schedule: &Schedule,
    ts: &[u32],
    device: &candle_core::Device,
) -> Result<(Tensor, Tensor)> {
    let (sa, s1) = (
        schedule.sqrt_alphas_cumprod(),
        schedule.sqrt_one_minus_alphas_cumprod(),
    );
    let b = ts.len();
    let pick = |table: &[f64]| -> Result<Tensor> {
        let v = ts
            .iter()
            .map(|&t| {
                table.get(t as usize).map(|&x| x as f32).ok_or_else(|| {
                    candle_core::Error::Msg(format!(
                        "timestep {t} is outside the schedule's 0..{}",
                        table.len()
                    ))
                })
            })
            .collect::<Result<Vec<f32>>>()?;
        Tensor::from_vec(v, (b, 1, 1, 1), device)
    };
    Ok((pick(sa)?, pick(s1)?))
}

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
    pub fn validate(&self) -> std::result::Result<(), String> {
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
    pub fn from_name(s: &str) -> std::result::Result<Self, String> {
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
    fn from_str(s: &str) -> std::result::Result<Self, String> {
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
