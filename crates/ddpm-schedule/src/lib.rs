//! DDPM noise schedules: linear, cosine and sigmoid β, with every table the forward
//! process, the posterior and the samplers need, computed in f64 on the host.
//!
//! ```
//! use candle_core::{Device, Tensor};
//! use ddpm_core::{NoiseSchedule, Posterior};
//! use ddpm_schedule::{BetaSchedule, ScheduleConfig};
//!
//! let schedule = ScheduleConfig::new(BetaSchedule::cosine(), 300).build()?;
//! assert_eq!(schedule.num_train_timesteps(), 300);
//! let ac = schedule.alphas_cumprod();
//! assert!(ac.windows(2).all(|w| w[1] < w[0]));
//!
//! // q(x_t | x_0) with one t per sample.
//! let x0 = Tensor::zeros((2, 1, 28, 28), candle_core::DType::F32, &Device::Cpu)?;
//! let noise = Tensor::ones((2, 1, 28, 28), candle_core::DType::F32, &Device::Cpu)?;
//! let t = Tensor::new(&[0u32, 299], &Device::Cpu)?;
//! let xt = schedule.add_noise(&x0, &noise, &t)?;
//! let v: Vec<f32> = xt.flatten_from(1)?.max(1)?.to_vec1()?;
//! assert!((v[1] as f64 - (1.0 - ac[299]).sqrt()).abs() < 1e-6);
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```

use std::sync::Mutex;

use candle_core::{DType, Device, Tensor};
pub use ddpm_core::PosteriorVariance;
use ddpm_core::{NoiseSchedule, Posterior};
use serde::{Deserialize, Serialize};

/// The most timesteps a schedule may have: its f64 tables are built on the host, and no model
/// uses more than a few thousand.
pub const MAX_TIMESTEPS: usize = 100_000;

/// Errors raised when a schedule configuration is invalid.
#[derive(Debug, thiserror::Error, PartialEq)]
#[non_exhaustive]
pub enum ScheduleError {
    /// T must be at least 2.
    #[error("the number of timesteps must be at least 2, got {0}")]
    TooFewTimesteps(usize),
    /// T is above [`MAX_TIMESTEPS`] (its tables would be gigabytes, and no sampler needs it).
    #[error(
        "the number of timesteps {0} is above {MAX_TIMESTEPS}: diffusion models use 1000 (up to \
         a few thousand)"
    )]
    TooManyTimesteps(usize),
    /// A parameter is NaN or infinite.
    #[error("schedule parameter `{name}` must be finite, got {value}")]
    NonFinite {
        /// Parameter name.
        name: &'static str,
        /// Its value.
        value: f64,
    },
    /// A β lies outside (0, 1).
    #[error("β at t = {t} is {beta}, outside (0, 1): check beta_start / beta_end / max_beta")]
    BetaOutOfRange {
        /// Timestep.
        t: usize,
        /// Offending β.
        beta: f64,
    },
    /// A parameter is outside its valid range.
    #[error("schedule parameter `{name}` = {value} is invalid: {reason}")]
    Invalid {
        /// Parameter name.
        name: &'static str,
        /// Its value.
        value: f64,
        /// Why it is invalid.
        reason: &'static str,
    },
}

/// A β schedule by name, with its standard parameters ([`BetaKind::schedule`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
#[cfg_attr(feature = "clap", derive(clap::ValueEnum))]
pub enum BetaKind {
    /// Linear β from 1e-4 to 0.02 (Ho et al. 2020).
    Linear,
    /// Cosine ᾱ (Nichol & Dhariwal 2021).
    Cosine,
    /// Sigmoid β (GeoDiff).
    Sigmoid,
}

impl BetaKind {
    /// The schedule with its standard parameters.
    pub fn schedule(self) -> BetaSchedule {
        match self {
            BetaKind::Linear => BetaSchedule::linear(),
            BetaKind::Cosine => BetaSchedule::cosine(),
            BetaKind::Sigmoid => BetaSchedule::sigmoid(),
        }
    }
}

/// How β_t is laid out over `0..T`.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum BetaSchedule {
    /// β linear from `beta_start` to `beta_end` (Ho et al. 2020: 1e-4 to 0.02).
    Linear {
        /// β_0.
        beta_start: f64,
        /// β_{T−1}.
        beta_end: f64,
    },
    /// ᾱ(t) = f(t)/f(0), f(t) = cos²(((t/T) + s)/(1 + s) · π/2), β clipped at `max_beta`
    /// (Nichol & Dhariwal 2021: s = 0.008, max_beta = 0.999).
    Cosine {
        /// Offset s.
        s: f64,
        /// Upper clip of β.
        max_beta: f64,
    },
    /// β = sigmoid(linspace(−6, 6, T))·(beta_end − beta_start) + beta_start (GeoDiff, Xu et al. 2022).
    Sigmoid {
        /// Lower asymptote of β.
        beta_start: f64,
        /// Upper asymptote of β.
        beta_end: f64,
    },
}

impl BetaSchedule {
    /// Linear 1e-4 → 0.02.
    pub fn linear() -> Self {
        Self::Linear {
            beta_start: 1e-4,
            beta_end: 0.02,
        }
    }
    /// Cosine with s = 0.008 and β ≤ 0.999.
    pub fn cosine() -> Self {
        Self::Cosine {
            s: 0.008,
            max_beta: 0.999,
        }
    }
    /// Sigmoid between 1e-4 and 0.02.
    pub fn sigmoid() -> Self {
        Self::Sigmoid {
            beta_start: 1e-4,
            beta_end: 0.02,
        }
    }
    /// Parses `linear`, `cosine` or `sigmoid` into the default parameters.
    pub fn from_name(name: &str) -> Option<Self> {
        match name {
            "linear" => Some(Self::linear()),
            "cosine" => Some(Self::cosine()),
            "sigmoid" => Some(Self::sigmoid()),
            _ => None,
        }
    }
    /// The schedule's short name.
    pub fn name(&self) -> &'static str {
        match self {
            Self::Linear { .. } => "linear",
            Self::Cosine { .. } => "cosine",
            Self::Sigmoid { .. } => "sigmoid",
        }
    }
}

/// A serialisable schedule description, carried in checkpoints.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct ScheduleConfig {
    /// The β layout.
    pub beta: BetaSchedule,
    /// Number of diffusion steps T.
    pub num_timesteps: usize,
}

impl Default for ScheduleConfig {
    /// Linear β, T = 1000 (Ho et al. 2020).
    fn default() -> Self {
        Self::new(BetaSchedule::linear(), 1000)
    }
}

impl ScheduleConfig {
    /// A configuration from its parts.
    pub fn new(beta: BetaSchedule, num_timesteps: usize) -> Self {
        Self {
            beta,
            num_timesteps,
        }
    }

    /// Computes β_t for t in `0..T`, validating the configuration.
    pub fn betas(&self) -> Result<Vec<f64>, ScheduleError> {
        let n = self.num_timesteps;
        if n < 2 {
            return Err(ScheduleError::TooFewTimesteps(n));
        }
        if n > MAX_TIMESTEPS {
            return Err(ScheduleError::TooManyTimesteps(n));
        }
        let finite = |name, value: f64| {
            if value.is_finite() {
                Ok(())
            } else {
                Err(ScheduleError::NonFinite { name, value })
            }
        };
        let betas: Vec<f64> = match self.beta {
            BetaSchedule::Linear {
                beta_start,
                beta_end,
            } => {
                finite("beta_start", beta_start)?;
                finite("beta_end", beta_end)?;
                let step = (beta_end - beta_start) / (n - 1) as f64;
                (0..n).map(|t| beta_start + step * t as f64).collect()
            }
            BetaSchedule::Sigmoid {
                beta_start,
                beta_end,
            } => {
                finite("beta_start", beta_start)?;
                finite("beta_end", beta_end)?;
                (0..n)
                    .map(|t| {
                        let x = -6.0 + 12.0 * t as f64 / (n - 1) as f64;
                        let sig = 1.0 / (1.0 + (-x).exp());
                        sig * (beta_end - beta_start) + beta_start
                    })
                    .collect()
            }
            BetaSchedule::Cosine { s, max_beta } => {
                finite("s", s)?;
                finite("max_beta", max_beta)?;
                if s < 0.0 {
                    return Err(ScheduleError::Invalid {
                        name: "s",
                        value: s,
                        reason: "the cosine offset must be >= 0",
                    });
                }
                if !(max_beta > 0.0 && max_beta < 1.0) {
                    return Err(ScheduleError::Invalid {
                        name: "max_beta",
                        value: max_beta,
                        reason: "must lie in (0, 1)",
                    });
                }
                let f = |t: f64| {
                    let v = ((t / n as f64 + s) / (1.0 + s) * std::f64::consts::FRAC_PI_2).cos();
                    v * v
                };
                (0..n)
                    .map(|t| (1.0 - f(t as f64 + 1.0) / f(t as f64)).min(max_beta))
                    .collect()
            }
        };
        for (t, &beta) in betas.iter().enumerate() {
            if !(beta > 0.0 && beta < 1.0) {
                return Err(ScheduleError::BetaOutOfRange { t, beta });
            }
        }
        Ok(betas)
    }

    /// Builds the schedule and all its tables.
    pub fn build(&self) -> Result<Schedule, ScheduleError> {
        Schedule::from_betas(*self, self.betas()?)
    }
}

/// A built schedule: host tables in f64 and the per-device f32 copies `add_noise` gathers from.
pub struct Schedule {
    config: ScheduleConfig,
    betas: Vec<f64>,
    alphas: Vec<f64>,
    alphas_cumprod: Vec<f64>,
    alphas_cumprod_prev: Vec<f64>,
    sqrt_alphas_cumprod: Vec<f64>,
    sqrt_one_minus_alphas_cumprod: Vec<f64>,
    posterior_variance: Vec<f64>,
    posterior_log_variance_clipped: Vec<f64>,
    posterior_mean_coef1: Vec<f64>,
    posterior_mean_coef2: Vec<f64>,
    device_tables: Mutex<Vec<(Device, Tensor)>>,
}

impl std::fmt::Debug for Schedule {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Schedule")
            .field("config", &self.config)
            .finish_non_exhaustive()
    }
}

impl Clone for Schedule {
    fn clone(&self) -> Self {
        Self {
            config: self.config,
            betas: self.betas.clone(),
            alphas: self.alphas.clone(),
            alphas_cumprod: self.alphas_cumprod.clone(),
            alphas_cumprod_prev: self.alphas_cumprod_prev.clone(),
            sqrt_alphas_cumprod: self.sqrt_alphas_cumprod.clone(),
            sqrt_one_minus_alphas_cumprod: self.sqrt_one_minus_alphas_cumprod.clone(),
            posterior_variance: self.posterior_variance.clone(),
            posterior_log_variance_clipped: self.posterior_log_variance_clipped.clone(),
            posterior_mean_coef1: self.posterior_mean_coef1.clone(),
            posterior_mean_coef2: self.posterior_mean_coef2.clone(),
            device_tables: Mutex::new(Vec::new()),
        }
    }
}

impl Schedule {
    fn from_betas(config: ScheduleConfig, betas: Vec<f64>) -> Result<Self, ScheduleError> {
        let alphas: Vec<f64> = betas.iter().map(|b| 1.0 - b).collect();
        let mut alphas_cumprod = Vec::with_capacity(betas.len());
        let mut acc = 1.0;
        for a in &alphas {
            acc *= a;
            alphas_cumprod.push(acc);
        }
        let mut alphas_cumprod_prev = vec![1.0];
        alphas_cumprod_prev.extend_from_slice(&alphas_cumprod[..alphas_cumprod.len() - 1]);
        let n = betas.len();
        let posterior: Vec<Posterior> = (0..n)
            .map(|t| Posterior::new(betas[t], alphas_cumprod[t], alphas_cumprod_prev[t]))
            .collect();
        let posterior_variance: Vec<f64> = posterior.iter().map(|p| p.variance).collect();
        // β̃_0 = 0: clip its log by using β̃_1 in its place (Ho et al. 2020).
        let posterior_log_variance_clipped: Vec<f64> = (0..n)
            .map(|t| posterior_variance[if t == 0 { 1 } else { t }].ln())
            .collect();
        let posterior_mean_coef1 = posterior.iter().map(|p| p.coef_x0).collect();
        let posterior_mean_coef2 = posterior.iter().map(|p| p.coef_xt).collect();
        if let Some((t, &a)) = alphas_cumprod
            .iter()
            .enumerate()
            .find(|(_, a)| !(**a > 0.0 && **a < 1.0))
        {
            return Err(ScheduleError::Invalid {
                name: "alphas_cumprod",
                value: a,
                reason: if t == 0 {
                    "ᾱ_0 must lie in (0,1)"
                } else {
                    "ᾱ underflowed to 0"
                },
            });
        }
        Ok(Self {
            config,
            sqrt_alphas_cumprod: alphas_cumprod.iter().map(|a| a.sqrt()).collect(),
            sqrt_one_minus_alphas_cumprod: alphas_cumprod
                .iter()
                .map(|a| (1.0 - a).sqrt())
                .collect(),
            betas,
            alphas,
            alphas_cumprod,
            alphas_cumprod_prev,
            posterior_variance,
            posterior_log_variance_clipped,
            posterior_mean_coef1,
            posterior_mean_coef2,
            device_tables: Mutex::new(Vec::new()),
        })
    }

    /// The configuration this schedule was built from.
    pub fn config(&self) -> &ScheduleConfig {
        &self.config
    }
    /// α_t = 1 − β_t.
    pub fn alphas(&self) -> &[f64] {
        &self.alphas
    }
    /// ᾱ_{t−1}, with ᾱ_{−1} = 1.
    pub fn alphas_cumprod_prev(&self) -> &[f64] {
        &self.alphas_cumprod_prev
    }
    /// √ᾱ_t.
    pub fn sqrt_alphas_cumprod(&self) -> &[f64] {
        &self.sqrt_alphas_cumprod
    }
    /// √(1 − ᾱ_t).
    pub fn sqrt_one_minus_alphas_cumprod(&self) -> &[f64] {
        &self.sqrt_one_minus_alphas_cumprod
    }
    /// β̃_t = β_t (1 − ᾱ_{t−1}) / (1 − ᾱ_t); β̃_0 = 0.
    pub fn posterior_variance(&self) -> &[f64] {
        &self.posterior_variance
    }
    /// log β̃_t with β̃_0 replaced by β̃_1 so the log is finite.
    pub fn posterior_log_variance_clipped(&self) -> &[f64] {
        &self.posterior_log_variance_clipped
    }
    /// Coefficient of x_0 in the posterior mean μ̃_t(x_t, x_0).
    pub fn posterior_mean_coef1(&self) -> &[f64] {
        &self.posterior_mean_coef1
    }
    /// Coefficient of x_t in the posterior mean μ̃_t(x_t, x_0).
    pub fn posterior_mean_coef2(&self) -> &[f64] {
        &self.posterior_mean_coef2
    }
    /// The variance σ²_t the DDPM reverse step adds at `t` under the chosen convention
    /// ([`PosteriorVariance::sigma2`], what the DDPM sampler uses): β_t or β̃_t, and 0 at
    /// t = 0 for both (the last step adds no noise). For the clipped log-variance of a
    /// likelihood, use [`Schedule::posterior_log_variance_clipped`].
    pub fn variance(&self, t: usize, choice: PosteriorVariance) -> f64 {
        choice.sigma2(t, self.betas[t], self.posterior_variance[t])
    }

    /// [`NoiseSchedule::add_noise`] with the timesteps given on the host: they are checked
    /// there, and the per-sample coefficients (√ᾱ_t, √(1−ᾱ_t)) are uploaded as one `[B, 2]`
    /// tensor, so nothing is read back from the device (`add_noise` reads `max(t)` back to
    /// validate it: on a GPU, a sync that stalls the launch queue). Same result.
    pub fn add_noise_from_host(
        &self,
        x0: &Tensor,
        noise: &Tensor,
        t: &[u32],
    ) -> candle_core::Result<Tensor> {
        let b = x0.dim(0)?;
        if t.len() != b {
            candle_core::bail!(
                "add_noise: {} timesteps for a batch of {b} (one per sample)",
                t.len()
            );
        }
        let mut coef = Vec::with_capacity(2 * b);
        for &ti in t {
            let i = ti as usize;
            if i >= self.betas.len() {
                candle_core::bail!("add_noise: timestep {i} is outside 0..{}", self.betas.len());
            }
            coef.extend([
                self.sqrt_alphas_cumprod[i] as f32,
                self.sqrt_one_minus_alphas_cumprod[i] as f32,
            ]);
        }
        let coef = Tensor::from_vec(coef, (b, 2), x0.device())?.to_dtype(x0.dtype())?;
        ddpm_kernels::add_noise(x0, noise, &coef)
    }

    /// The `[T, 2]` table of (√ᾱ_t, √(1−ᾱ_t)) in f32 on `device`, built once per device.
    fn table_on(&self, device: &Device) -> candle_core::Result<Tensor> {
        let mut cache = self
            .device_tables
            .lock()
            .map_err(|_| candle_core::Error::Msg("schedule device-table cache poisoned".into()))?;
        if let Some((_, table)) = cache.iter().find(|(d, _)| d.same_device(device)) {
            return Ok(table.clone());
        }
        let v: Vec<f32> = self
            .sqrt_alphas_cumprod
            .iter()
            .zip(&self.sqrt_one_minus_alphas_cumprod)
            .flat_map(|(&a, &b)| [a as f32, b as f32])
            .collect();
        let table = Tensor::from_vec(v, (self.betas.len(), 2), device)?;
        cache.push((device.clone(), table.clone()));
        Ok(table)
    }
}

impl NoiseSchedule for Schedule {
    fn num_train_timesteps(&self) -> usize {
        self.betas.len()
    }
    fn betas(&self) -> &[f64] {
        &self.betas
    }
    fn alphas_cumprod(&self) -> &[f64] {
        &self.alphas_cumprod
    }
    fn add_noise(&self, x0: &Tensor, noise: &Tensor, t: &Tensor) -> candle_core::Result<Tensor> {
        if t.rank() != 1 || t.dim(0)? != x0.dim(0)? {
            candle_core::bail!(
                "add_noise: t must be [B] with B = {} (one timestep per sample), got {:?}",
                x0.dim(0)?,
                t.shape()
            );
        }
        if x0.shape() != noise.shape() {
            candle_core::bail!(
                "add_noise: x0 {:?} and noise {:?} differ in shape",
                x0.shape(),
                noise.shape()
            );
        }
        let t = t.to_dtype(DType::U32)?;
        let max_t = t.max(0)?.to_scalar::<u32>()? as usize;
        if max_t >= self.betas.len() {
            candle_core::bail!(
                "add_noise: timestep {max_t} is outside 0..{}",
                self.betas.len()
            );
        }
        // One gather of both coefficients per sample, then one fused pass (ddpm-kernels).
        let coef = self
            .table_on(x0.device())?
            .index_select(&t, 0)?
            .to_dtype(x0.dtype())?;
        ddpm_kernels::add_noise(x0, noise, &coef)
    }
}
