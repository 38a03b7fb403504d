//! Samplers over any [`Denoiser`] and [`NoiseSchedule`]: DDPM ancestral sampling (both
//! variance choices), DDIM (steps, η, timestep spacing) and DPM-Solver++(2M), plus
//! [`ClassifierFreeGuidance`] and the visible sampling loop [`sample`].
//!
//! # Guidance convention
//!
//! ε̂ = (1 + w)·ε(x, t, c) − w·ε(x, t, ∅). `w = 0` is the plain conditional model.
//! Diffusers' `guidance_scale` is `1 + w`.
//!
//! # Example
//!
//! ```
//! use candle_core::{Device, Result, Shape, Tensor, DType};
//! use ddpm_core::{Denoiser, SeededNoise, NoiseSource};
//! use ddpm_sampler::{sample, ClassifierFreeGuidance, Ddim, Sampler, SamplerConfig, Spacing};
//! use ddpm_schedule::ScheduleConfig;
//!
//! /// A denoiser that predicts zero noise: sampling returns x_T / √ᾱ_T, clipped.
//! struct Zero;
//! impl Denoiser for Zero {
//!     fn predict_noise(&self, x: &Tensor, _t: &Tensor, _y: Option<&Tensor>) -> Result<Tensor> {
//!         x.zeros_like()
//!     }
//!     fn null_class(&self) -> Option<u32> { Some(10) }
//! }
//!
//! let schedule = ScheduleConfig::default().build().unwrap();
//! let mut ddim = Ddim::new(&schedule, 20, 0.0, Spacing::Leading, SamplerConfig::default())?;
//! let guided = ClassifierFreeGuidance::new(Zero, 3.0)?;
//! let mut noise = SeededNoise::new(0);
//! let x_t = noise.randn(&Shape::from((2, 1, 28, 28)), DType::F32, &Device::Cpu)?;
//! let labels = Tensor::new(&[7u32, 7], &Device::Cpu)?;
//! let x0 = sample(&guided, &mut ddim, x_t, Some(&labels), &mut noise, &mut |_| Ok(()))?;
//! assert_eq!(x0.dims(), &[2, 1, 28, 28]);
//! # Ok::<(), candle_core::Error>(())
//! ```

use candle_core::{bail, DType, Result, Tensor};
pub use ddpm_core::Prediction;
use ddpm_core::{Denoiser, GuidancePair, NoiseSchedule, NoiseSource, Posterior, PosteriorVariance};
use ddpm_kernels::{guidance_combine, reverse_step, Eps, StepRule};
use serde::{Deserialize, Serialize};

mod spacing;

pub use multistep::{
    adams_bashforth_weights, dpmpp_coefficients, unipc_coefficients, Multistep, Solver,
    UniPcCoefficients, LOWER_ORDER_FINAL_BELOW,
};
use spacing::timesteps_from;
pub use spacing::{check_timesteps, lambda, spaced_timesteps, Spacing, KARRAS_RHO};

/// The result of one reverse step.
#[derive(Debug, Clone)]
pub struct Step {
    /// x_{t_prev}.
    pub prev_sample: Tensor,
    /// The model's current estimate of x_0.
    pub pred_x0: Tensor,
}

/// Options shared by every sampler.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct SamplerConfig {
    /// Clip the predicted x_0 to `[-1, 1]` (on by default).
    pub clip_x0: bool,
}

impl Default for SamplerConfig {
    fn default() -> Self {
        Self { clip_x0: true }
    }
}

/// A reverse-diffusion sampler: a descending list of timesteps and a step rule.
///
/// The built-in samplers run each step as one fused pass ([`ddpm_kernels::reverse_step`]: one
/// kernel on a GPU), guidance's combination included when they get the two halves through
/// [`Sampler::step_guided`].
pub trait Sampler {
    /// The timesteps visited, descending, each in `0..T`.
    fn timesteps(&self) -> &[usize];
    /// Takes step `index` (at `timesteps()[index]`) from `x_t` given the predicted noise.
    fn step(
        &mut self,
        index: usize,
        eps: &Tensor,
        x_t: &Tensor,
        noise: &mut dyn NoiseSource,
    ) -> Result<Step>;
    /// Takes step `index` from classifier-free guidance's two halves (what
    /// [`Denoiser::predict_guidance_pair`] returns). The default combines them with candle ops
    /// and calls [`Sampler::step`]; the built-in samplers fold the combination into their
    /// fused update.
    fn step_guided(
        &mut self,
        index: usize,
        guidance: &GuidancePair,
        x_t: &Tensor,
        noise: &mut dyn NoiseSource,
    ) -> Result<Step> {
        let eps = guidance_combine(&guidance.pair, guidance.w)?;
        self.step(index, &eps, x_t, noise)
    }
    /// Forgets any history kept between steps (multistep solvers); call before a new run.
    fn reset(&mut self) {}
}

/// Host copies of the schedule terms the samplers need.
#[derive(Debug, Clone)]
struct Tables {
    betas: Vec<f64>,
    alphas_cumprod: Vec<f64>,
}

impl Tables {
    fn new(s: &dyn NoiseSchedule) -> Self {
        Self {
            betas: s.betas().to_vec(),
            alphas_cumprod: s.alphas_cumprod().to_vec(),
        }
    }
    fn t_total(&self) -> usize {
        self.betas.len()
    }
    /// ᾱ at `t`, with ᾱ = 1 for the "step" before 0.
    fn ac(&self, t: Option<usize>) -> f64 {
        t.map_or(1.0, |t| self.alphas_cumprod[t])
    }
}

/// The timestep of step `index`, or an error.
fn timestep(index: usize, ts: &[usize]) -> Result<usize> {
    ts.get(index).copied().ok_or_else(|| {
        candle_core::Error::Msg(format!(
            "sampler: step {index} out of range 0..{}",
            ts.len()
        ))
    })
}

/// The guidance halves as the fused step's input.
fn guided(g: &GuidancePair) -> Eps<'_> {
    Eps::Guided {
        pair: &g.pair,
        w: g.w,
    }
}

/// Implements [`Sampler::step`] and [`Sampler::step_guided`] through one `fused_step` that
/// takes either kind of ε.
macro_rules! fused_steps {
    () => {
        fn step(
            &mut self,
            index: usize,
            eps: &Tensor,
            x_t: &Tensor,
            noise: &mut dyn NoiseSource,
        ) -> Result<Step> {
            self.fused_step(index, Eps::Plain(eps), x_t, noise)
        }
        fn step_guided(
            &mut self,
            index: usize,
            guidance: &GuidancePair,
            x_t: &Tensor,
            noise: &mut dyn NoiseSource,
        ) -> Result<Step> {
            self.fused_step(index, guided(guidance), x_t, noise)
        }
    };
}

// After the macro, which it uses.
mod multistep;

fn randn_like(noise: &mut dyn NoiseSource, x: &Tensor) -> Result<Tensor> {
    noise.randn(x.shape(), x.dtype(), x.device())
}

/// DDPM ancestral sampling (Ho et al. 2020) over every timestep T−1, …, 0.
#[derive(Debug, Clone)]
pub struct Ddpm {
    tables: Tables,
    timesteps: Vec<usize>,
    variance: PosteriorVariance,
    config: SamplerConfig,
}

impl Ddpm {
    /// A DDPM sampler with the chosen reverse variance.
    pub fn new(
        schedule: &dyn NoiseSchedule,
        variance: PosteriorVariance,
        config: SamplerConfig,
    ) -> Self {
        let tables = Tables::new(schedule);
        let timesteps = (0..tables.t_total()).rev().collect();
        Self {
            tables,
            timesteps,
            variance,
            config,
        }
    }
}

impl Ddpm {
    /// A DDPM sampler over the consecutive timesteps `ts` (`t, t−1, …`, each below T), e.g.
    /// `t, t−1, …, 0` to denoise an image noised to `t`. Fails on a gap: the ancestral step
    /// is the posterior q(x_{t−1} | x_t, x̂₀) of one timestep (use DDIM to skip).
    pub fn with_timesteps(
        schedule: &dyn NoiseSchedule,
        ts: Vec<usize>,
        variance: PosteriorVariance,
        config: SamplerConfig,
    ) -> Result<Self> {
        let tables = Tables::new(schedule);
        check_timesteps(&ts, tables.t_total())?;
        if ts.windows(2).any(|w| w[0] != w[1] + 1) {
            bail!("DDPM steps one timestep at a time: {ts:?} has a gap (use DDIM to skip steps)");
        }
        Ok(Self {
            tables,
            timesteps: ts,
            variance,
            config,
        })
    }

    fn fused_step(
        &mut self,
        index: usize,
        eps: Eps<'_>,
        x_t: &Tensor,
        noise: &mut dyn NoiseSource,
    ) -> Result<Step> {
        let t = timestep(index, &self.timesteps)?;
        let tb = &self.tables;
        let (ac, ac_prev) = (tb.ac(Some(t)), tb.ac(t.checked_sub(1)));
        let beta = tb.betas[t];
        // Posterior mean c_x0·x̂₀ + c_xt·x_t, plus σ·z except at t = 0.
        let post = Posterior::new(beta, ac, ac_prev);
        let var = self.variance.sigma2(t, beta, post.variance);
        let (z, sigma) = if var > 0.0 {
            (Some(randn_like(noise, x_t)?), var.sqrt())
        } else {
            (None, 0.0)
        };
        let rule = StepRule {
            alpha_bar: ac,
            clip_x0: self.config.clip_x0,
            c_x0: post.coef_x0,
            c_eps: 0.0,
            c_x: post.coef_xt,
            c_extra: sigma,
        };
        let (prev_sample, pred_x0) = reverse_step(x_t, eps, z.as_ref(), &rule)?;
        Ok(Step {
            prev_sample,
            pred_x0,
        })
    }
}

impl Sampler for Ddpm {
    fn timesteps(&self) -> &[usize] {
        &self.timesteps
    }
    fused_steps!();
}

/// DDIM (Song et al. 2021): `steps` timesteps, stochasticity η (0: deterministic,
/// 1: DDPM's posterior variance β̃).
#[derive(Debug, Clone)]
pub struct Ddim {
    tables: Tables,
    timesteps: Vec<usize>,
    eta: f64,
    config: SamplerConfig,
}

impl Ddim {
    /// A DDIM sampler. Fails if `steps` is 0 or above T, or η is negative or not finite.
    pub fn new(
        schedule: &dyn NoiseSchedule,
        steps: usize,
        eta: f64,
        spacing: Spacing,
        config: SamplerConfig,
    ) -> Result<Self> {
        if !(eta.is_finite() && eta >= 0.0) {
            bail!("DDIM η must be finite and >= 0, got {eta}");
        }
        let tables = Tables::new(schedule);
        let timesteps = timesteps_from(&tables.alphas_cumprod, steps, spacing)?;
        Ok(Self {
            tables,
            timesteps,
            eta,
            config,
        })
    }
}

impl Ddim {
    /// A DDIM sampler over the timesteps `ts` (strictly descending, each below T): e.g. a
    /// spaced grid that starts at the `t` a real image was noised to.
    pub fn with_timesteps(
        schedule: &dyn NoiseSchedule,
        ts: Vec<usize>,
        eta: f64,
        config: SamplerConfig,
    ) -> Result<Self> {
        if !(eta.is_finite() && eta >= 0.0) {
            bail!("DDIM η must be finite and >= 0, got {eta}");
        }
        let tables = Tables::new(schedule);
        check_timesteps(&ts, tables.t_total())?;
        Ok(Self {
            tables,
            timesteps: ts,
            eta,
            config,
        })
    }

    fn fused_step(
        &mut self,
        index: usize,
        eps: Eps<'_>,
        x_t: &Tensor,
        noise: &mut dyn NoiseSource,
    ) -> Result<Step> {
        let t = timestep(index, &self.timesteps)?;
        let prev = self.timesteps.get(index + 1).copied();
        let (ac, ac_prev) = (self.tables.ac(Some(t)), self.tables.ac(prev));
        let sigma2 = self.eta.powi(2) * (1.0 - ac_prev) / (1.0 - ac) * (1.0 - ac / ac_prev);
        let z = if sigma2 > 0.0 {
            Some(randn_like(noise, x_t)?)
        } else {
            None
        };
        // √ᾱ_prev·x̂₀ + √(1 − ᾱ_prev − σ²)·ε̂ + σ·z, with ε̂ consistent with the clipped x̂₀.
        let rule = StepRule {
            alpha_bar: ac,
            clip_x0: self.config.clip_x0,
            c_x0: ac_prev.sqrt(),
            c_eps: (1.0 - ac_prev - sigma2).max(0.0).sqrt(),
            c_x: 0.0,
            c_extra: if z.is_some() { sigma2.sqrt() } else { 0.0 },
        };
        let (prev_sample, pred_x0) = reverse_step(x_t, eps, z.as_ref(), &rule)?;
        Ok(Step {
            prev_sample,
            pred_x0,
        })
    }
}

impl Sampler for Ddim {
    fn timesteps(&self) -> &[usize] {
        &self.timesteps
    }
    fused_steps!();
}

/// DPM-Solver++(2M) (Lu et al. 2022), the multistep second-order data-prediction solver,
/// deterministic, for 10–20 step sampling. First and last steps are first order.
#[derive(Debug, Clone)]
pub struct DpmSolverPp2M {
    tables: Tables,
    timesteps: Vec<usize>,
    config: SamplerConfig,
    last: Option<(Tensor, f64)>,
}

impl DpmSolverPp2M {
    /// A DPM-Solver++(2M) sampler with `steps` timesteps.
    pub fn new(
        schedule: &dyn NoiseSchedule,
        steps: usize,
        spacing: Spacing,
        config: SamplerConfig,
    ) -> Result<Self> {
        let tables = Tables::new(schedule);
        let timesteps = timesteps_from(&tables.alphas_cumprod, steps, spacing)?;
        Ok(Self {
            tables,
            timesteps,
            config,
            last: None,
        })
    }
}

impl DpmSolverPp2M {
    /// A DPM-Solver++(2M) sampler over the timesteps `ts` (strictly descending, each below T).
    pub fn with_timesteps(
        schedule: &dyn NoiseSchedule,
        ts: Vec<usize>,
        config: SamplerConfig,
    ) -> Result<Self> {
        let tables = Tables::new(schedule);
        check_timesteps(&ts, tables.t_total())?;
        Ok(Self {
            tables,
            timesteps: ts,
            config,
            last: None,
        })
    }

    fn fused_step(
        &mut self,
        index: usize,
        eps: Eps<'_>,
        x_t: &Tensor,
        _noise: &mut dyn NoiseSource,
    ) -> Result<Step> {
        let t = timestep(index, &self.timesteps)?;
        if index == 0 {
            self.last = None;
        }
        let ac_s = self.tables.ac(Some(t));
        let lam_s = lambda(ac_s);
        let mut rule = StepRule {
            alpha_bar: ac_s,
            clip_x0: self.config.clip_x0,
            c_x0: 1.0,
            c_eps: 0.0,
            c_x: 0.0,
            c_extra: 0.0,
        };
        let Some(prev) = self.timesteps.get(index + 1).copied() else {
            // Final step to ᾱ = 1 (σ = 0): the solution is the data prediction itself.
            self.last = None;
            let (prev_sample, pred_x0) = reverse_step(x_t, eps, None, &rule)?;
            return Ok(Step {
                prev_sample,
                pred_x0,
            });
        };
        let ac_t = self.tables.ac(Some(prev));
        let (alpha_t, sigma_t, sigma_s) = (ac_t.sqrt(), (1.0 - ac_t).sqrt(), (1.0 - ac_s).sqrt());
        let h = lambda(ac_t) - lam_s;
        let phi = (-h).exp() - 1.0; // e^{−h} − 1
                                    // x_prev = (σ_t/σ_s)·x − α_t·φ·D, with D = x̂₀ (first order) or
                                    // D = (1 + 1/(2r))·x̂₀ − 1/(2r)·x̂₀_prev (second order).
        rule.c_x = sigma_t / sigma_s;
        let extra = match &self.last {
            Some((x0_prev, lam_prev)) => {
                let k = 0.5 / ((lam_s - lam_prev) / h);
                rule.c_x0 = -alpha_t * phi * (1.0 + k);
                rule.c_extra = alpha_t * phi * k;
                Some(x0_prev)
            }
            None => {
                rule.c_x0 = -alpha_t * phi;
                None
            }
        };
        let (prev_sample, pred_x0) = reverse_step(x_t, eps, extra, &rule)?;
        self.last = Some((pred_x0.clone(), lam_s));
        Ok(Step {
            prev_sample,
            pred_x0,
        })
    }
}

impl Sampler for DpmSolverPp2M {
    fn timesteps(&self) -> &[usize] {
        &self.timesteps
    }
    fn reset(&mut self) {
        self.last = None;
    }
    fused_steps!();
}

/// Classifier-free guidance as a [`Denoiser`] wrapper:
/// ε̂ = (1 + w)·ε(x, t, c) − w·ε(x, t, ∅), with the conditional and unconditional halves
/// in ONE batched forward pass. `w = 0` runs only the conditional half. Around a network that
/// takes w as an input ([`Denoiser::takes_guidance`], a guidance-distilled student) it makes
/// one call at w instead.
///
/// Diffusers' `guidance_scale` equals `1 + w`.
#[derive(Debug, Clone)]
pub struct ClassifierFreeGuidance<D> {
    inner: D,
    w: f64,
}

impl<D: Denoiser> ClassifierFreeGuidance<D> {
    /// Wraps `inner` with guidance weight `w`. Fails if `w` is not finite, or beyond the range
    /// of f32 (the precision the predictions are combined in, where such a w would overflow),
    /// or if `w ≠ 0` and the model is unconditional.
    pub fn new(inner: D, w: f64) -> Result<Self> {
        if !w.is_finite() || !(w as f32).is_finite() || !((1.0 + w) as f32).is_finite() {
            bail!(
                "guidance weight w must be a finite number within f32's range (|w| < 3.4e38), \
                 got {w:e}; useful values lie between 0 and about 10"
            );
        }
        if w != 0.0 && inner.null_class().is_none() {
            bail!("guidance weight w = {w} needs a class-conditional model; this one is unconditional");
        }
        Ok(Self { inner, w })
    }
    /// The guidance weight w.
    pub fn weight(&self) -> f64 {
        self.w
    }
    /// The wrapped denoiser.
    pub fn inner(&self) -> &D {
        &self.inner
    }
}

impl<D: Denoiser> Denoiser for ClassifierFreeGuidance<D> {
    fn predict_noise(&self, x: &Tensor, t: &Tensor, labels: Option<&Tensor>) -> Result<Tensor> {
        if self.inner.takes_guidance() {
            // A guidance-distilled student: w is an input, one call (w = 0 included).
            return self.inner.predict_noise_at(x, t, labels, self.w);
        }
        match self.predict_guidance_pair(x, t, labels)? {
            Some(g) => guidance_combine(&g.pair, g.w),
            None => self.inner.predict_noise(x, t, labels),
        }
    }
    fn null_class(&self) -> Option<u32> {
        self.inner.null_class()
    }
    /// The `[2B]` batch of conditional then unconditional predictions, from one forward pass;
    /// `None` when there is nothing to combine (w = 0, no labels, or an unconditional model).
    fn predict_guidance_pair(
        &self,
        x: &Tensor,
        t: &Tensor,
        labels: Option<&Tensor>,
    ) -> Result<Option<GuidancePair>> {
        let (Some(labels), Some(null)) = (labels, self.inner.null_class()) else {
            return Ok(None);
        };
        if self.w == 0.0 || self.inner.takes_guidance() {
            return Ok(None);
        }
        let b = x.dim(0)?;
        let nulls = ddpm_core::null_labels(null, b, labels.device())?;
        let xx = Tensor::cat(&[x, x], 0)?;
        let tt = Tensor::cat(&[t, t], 0)?;
        let yy = Tensor::cat(&[&labels.to_dtype(DType::U32)?, &nulls], 0)?;
        let pair = self.inner.predict_noise(&xx, &tt, Some(&yy))?;
        Ok(Some(GuidancePair { pair, w: self.w }))
    }
}

/// A network trained for another target ([`Prediction`]) as an ε-predicting [`Denoiser`]:
/// for v-prediction, ε = √ᾱ_t·v + √(1−ᾱ_t)·x_t with one t per sample. ε-prediction passes
/// through unchanged.
///
/// Wrap the network first, then guidance around it:
/// `ClassifierFreeGuidance::new(Parameterized::new(&unet, Prediction::V, &schedule), w)`
/// (the guidance combination is linear, so combining ε or converting the combined v agree).
#[derive(Debug, Clone)]
pub struct Parameterized<D> {
    inner: D,
    prediction: Prediction,
    sqrt_ac: Vec<f32>,
    sqrt_1m_ac: Vec<f32>,
}

impl<D: Denoiser> Parameterized<D> {
    /// Wraps `inner`, whose output is a `prediction`, for `schedule`'s ᾱ.
    pub fn new(inner: D, prediction: Prediction, schedule: &dyn NoiseSchedule) -> Self {
        let ac = schedule.alphas_cumprod();
        Self {
            inner,
            prediction,
            sqrt_ac: ac.iter().map(|a| a.sqrt() as f32).collect(),
            sqrt_1m_ac: ac.iter().map(|a| (1.0 - a).sqrt() as f32).collect(),
        }
    }
    /// What the wrapped network predicts.
    pub fn prediction(&self) -> Prediction {
        self.prediction
    }
    /// The wrapped network.
    pub fn inner(&self) -> &D {
        &self.inner
    }
}

impl<D> Parameterized<D> {
    /// The network's output `out` for `x` at `t` as ε.
    fn to_epsilon(&self, out: Tensor, x: &Tensor, t: &Tensor) -> Result<Tensor> {
        match self.prediction {
            Prediction::Epsilon => Ok(out),
            Prediction::V => {
                let b = x.dim(0)?;
                let t_total = self.sqrt_ac.len();
                let dev = x.device();
                let t = t.to_dtype(DType::U32)?;
                let gather = |table: &[f32]| -> Result<Tensor> {
                    Tensor::from_slice(table, t_total, dev)?
                        .index_select(&t, 0)?
                        .to_dtype(out.dtype())?
                        .reshape((b, 1, 1, 1))
                };
                let (a, s) = (gather(&self.sqrt_ac)?, gather(&self.sqrt_1m_ac)?);
                out.broadcast_mul(&a)? + x.to_dtype(out.dtype())?.broadcast_mul(&s)?
            }
        }
    }
}

impl<D: Denoiser> Denoiser for Parameterized<D> {
    fn predict_noise(&self, x: &Tensor, t: &Tensor, labels: Option<&Tensor>) -> Result<Tensor> {
        let out = self.inner.predict_noise(x, t, labels)?;
        self.to_epsilon(out, x, t)
    }
    fn null_class(&self) -> Option<u32> {
        self.inner.null_class()
    }
    fn takes_guidance(&self) -> bool {
        self.inner.takes_guidance()
    }
    fn predict_noise_at(
        &self,
        x: &Tensor,
        t: &Tensor,
        labels: Option<&Tensor>,
        w: f64,
    ) -> Result<Tensor> {
        let out = self.inner.predict_noise_at(x, t, labels, w)?;
        self.to_epsilon(out, x, t)
    }
}

/// What the per-step callback of [`sample`] sees.
#[derive(Debug)]
pub struct StepInfo<'a> {
    /// Step number, 0-based.
    pub index: usize,
    /// Number of steps.
    pub total: usize,
    /// The timestep just denoised.
    pub t: usize,
    /// The new sample x_{t_prev}.
    pub sample: &'a Tensor,
    /// The current x_0 estimate.
    pub pred_x0: &'a Tensor,
}

/// The sampling loop: from `x_t` (pure noise at the sampler's first timestep) down to x_0.
///
/// A guided denoiser ([`ClassifierFreeGuidance`]) hands over its two halves
/// ([`Denoiser::predict_guidance_pair`]) and the sampler combines them inside its step.
///
/// `labels` are `[B]` u32 or `None` (unconditional). `on_step` runs after every step
/// (progress bars, GIF frames, tracing); an error from it stops sampling.
pub fn sample(
    denoiser: &dyn Denoiser,
    sampler: &mut dyn Sampler,
    x_t: Tensor,
    labels: Option<&Tensor>,
    noise: &mut dyn NoiseSource,
    on_step: &mut dyn FnMut(StepInfo<'_>) -> Result<()>,
) -> Result<Tensor> {
    sampler.reset();
    let ts = sampler.timesteps().to_vec();
    let b = x_t.dim(0)?;
    let mut x = x_t;
    for (index, &t) in ts.iter().enumerate() {
        let tt = Tensor::full(t as u32, b, x.device())?;
        let step = match denoiser.predict_guidance_pair(&x, &tt, labels)? {
            Some(g) => sampler.step_guided(index, &g, &x, noise)?,
            None => {
                let eps = denoiser.predict_noise(&x, &tt, labels)?;
                sampler.step(index, &eps, &x, noise)?
            }
        };
        x = step.prev_sample;
        on_step(StepInfo {
            index,
            total: ts.len(),
            t,
            sample: &x,
            pred_x0: &step.pred_x0,
        })?;
    }
    Ok(x)
}
