//! Requests in the command line's terms: [`SampleOptions`] (`ddpm sample`'s generation flags)
//! resolved against a model into a [`Request`], with the checks a user's input needs (class,
//! steps against T, finite weights, sizes that fit in memory) made before anything is allocated.

use ddpm_core::{NoiseSchedule, PosteriorVariance};

use crate::{request_err, Labels, Model, Request, Result, SamplerKind, SamplerSpec, Spacing};

/// What `ddpm sample` generates (with the `clap` feature, its flags; the outputs stay the
/// command's).
#[derive(Debug, Clone, PartialEq)]
#[cfg_attr(feature = "clap", derive(clap::Args))]
pub struct SampleOptions {
    /// Class to draw: an index (7), a class name, or `all` (one row per class).
    #[cfg_attr(feature = "clap", arg(long, default_value = "all"))]
    pub class: String,
    /// Guidance weight w: eps = (1+w)·eps(x,t,c) − w·eps(x,t,∅). 0 = no guidance;
    /// diffusers' guidance_scale = 1 + w.
    #[cfg_attr(
        feature = "clap",
        arg(long, default_value_t = 3.0, allow_negative_numbers = true)
    )]
    pub guidance: f64,
    /// Guidance sweep: sample the same noise at each of these weights (comma-separated) and
    /// write the grids side by side into --out, each titled with its w.
    #[cfg_attr(
        feature = "clap",
        arg(long, value_delimiter = ',', allow_negative_numbers = true)
    )]
    pub sweep: Vec<f64>,
    /// Samples (per class with --class all).
    #[cfg_attr(feature = "clap", arg(long, default_value_t = 16))]
    pub n: usize,
    /// Samples denoised together (default: 128 on the CPU, where guidance makes that a
    /// forward batch of 256, the size the forward benchmark runs at; 1024 on CUDA). The
    /// deterministic samplers (all but ddpm and ddim with --eta > 0) draw the same digits whatever the
    /// batch; the stochastic ones draw their step noise batch by batch.
    #[cfg_attr(feature = "clap", arg(long))]
    pub batch: Option<usize>,
    /// Sampling steps: network calls per digit, twice that with classifier-free guidance (at
    /// most the model's T; ddpm always takes T). Default: the model's (a progressive
    /// student's own step count; else 8, or 20 with a --sampler other than dpm++3m).
    #[cfg_attr(feature = "clap", arg(long))]
    pub steps: Option<usize>,
    /// Sampler: ddim, ddpm, dpm++ (DPM-Solver++(2M)), dpm++3m (DPM-Solver++(3M)), unipc
    /// (UniPC, bh2, order 2), unipc3, ipndm. The default, DPM-Solver++(3M) in 8 log-SNR steps
    /// (16 network calls per guided digit), scored a lower fid_mnist than DPM-Solver++(2M) in
    /// 20 leading steps (40 calls) at w = 1 and 3 and tied at w = 0.5 (n = 10,000);
    /// docs/sampling.md compares them. Default: the model's (ddim for a progressive student;
    /// else dpm++3m). Another sampler alone takes 20 leading steps (`--sampler dpm++` is the
    /// former default).
    #[cfg_attr(feature = "clap", arg(long, value_enum))]
    pub sampler: Option<SamplerKind>,
    /// Timestep spacing: leading, trailing, linspace (in t), logsnr (uniform in log-SNR) or
    /// karras (EDM's rho = 7). Default: the model's (trailing for a progressive student; else
    /// logsnr, or leading with a --sampler other than dpm++3m).
    #[cfg_attr(feature = "clap", arg(long, value_enum))]
    pub spacing: Option<Spacing>,
    /// DDIM stochasticity η (0: deterministic, 1: DDPM-like).
    #[cfg_attr(feature = "clap", arg(long, default_value_t = 0.0))]
    pub eta: f64,
    /// Seed of the noise: the same seed gives the same images on CPU and GPU.
    #[cfg_attr(feature = "clap", arg(long, default_value_t = 1))]
    pub seed: u64,
    /// Do not clip the predicted x0 to [-1, 1].
    #[cfg_attr(feature = "clap", arg(long))]
    pub no_clip: bool,
}

/// A [`SampleOptions`] resolved against a model.
#[derive(Debug, Clone, PartialEq)]
pub struct SamplePlan {
    /// The request at the first weight (the guidance, or the sweep's first).
    pub request: Request,
    /// The class asked for (`None`: all, or an unconditional model).
    pub class: Option<u32>,
    /// The guidance weights to sample at: the sweep's, else the one (0 for an unconditional
    /// model).
    pub weights: Vec<f64>,
    /// Samples per row of a grid of the result.
    pub per_row: usize,
}

impl SamplePlan {
    /// The request at weight `w`.
    pub fn at(&self, w: f64) -> Request {
        Request {
            guidance: w,
            ..self.request.clone()
        }
    }
}

impl SampleOptions {
    /// Resolves these options against `model`: the class, the labels (one row per class, or
    /// `n` of one class, or `n` unlabelled), the sampler, the batch (the device's default if
    /// none). Checks, before anything is allocated, that the weights are finite, the steps fit
    /// the model's T, and the request fits in memory with pictures at `scale` (and, with
    /// `gif`, an animation's frames).
    pub fn resolve(&self, model: &Model, scale: usize, gif: bool) -> Result<SamplePlan> {
        if self.n == 0 {
            return Err(request_err("--n 0: ask for at least one sample"));
        }
        if self.sweep.iter().any(|w| !w.is_finite()) {
            return Err(request_err(format!(
                "--sweep {:?}: the guidance weights must be finite numbers",
                self.sweep
            )));
        }
        if !self.guidance.is_finite() {
            return Err(request_err(format!(
                "--guidance {}: the guidance weight must be a finite number",
                self.guidance
            )));
        }
        let conditional = model.is_conditional();
        let class = match self.class.as_str() {
            "all" => None,
            c if !conditional => {
                return Err(request_err(format!(
                    "--class {c}: this checkpoint is an unconditional model; leave --class out \
                     (or use --class all)"
                )))
            }
            c => Some(
                model
                    .class(c)
                    .map_err(|e| request_err(format!("--class: {e}, or `all`")))?,
            ),
        };
        if !self.sweep.is_empty() && !conditional {
            return Err(request_err(
                "--sweep: this checkpoint is an unconditional model; guidance needs classes",
            ));
        }
        let base = model.default_sampler_for(self.sampler);
        let (kind, steps) = (base.kind, self.steps.unwrap_or(base.steps));
        let t_total = model.schedule().num_train_timesteps();
        if kind != SamplerKind::Ddpm && steps > t_total {
            return Err(request_err(format!(
                "--steps {steps} is above the model's T = {t_total}"
            )));
        }
        let k = model.card().model.num_classes;
        let n_total = match (conditional, class) {
            (true, None) => k.checked_mul(self.n),
            _ => Some(self.n),
        }
        .ok_or_else(|| request_err("--n: more samples than this machine can count"))?;
        let on_cpu = model.device().is_cpu();
        let batch = self.batch.unwrap_or(if on_cpu { 128 } else { 1024 });
        if batch == 0 {
            return Err(request_err(
                "--batch 0: denoise at least one sample at a time",
            ));
        }
        let guided = self.guidance != 0.0 || !self.sweep.is_empty();
        crate::memory::check_sampling(
            model.card(),
            n_total,
            batch.min(n_total),
            guided,
            scale,
            gif,
            on_cpu,
        )?;
        let (labels, per_row) = match (conditional, class) {
            (false, _) => (Labels::Unconditional(self.n), self.n.min(8)),
            (true, Some(c)) => (Labels::one(c, self.n), self.n.min(8)),
            (true, None) => (Labels::rows(k, self.n), self.n),
        };
        if !conditional && self.guidance != 0.0 {
            tracing::warn!("the model is unconditional: --guidance is ignored");
        }
        let weights = match (conditional, self.sweep.is_empty()) {
            (false, _) => vec![0.0],
            (true, true) => vec![self.guidance],
            (true, false) => self.sweep.clone(),
        };
        if let Some(d) = &model.card().distilled {
            for &w in &weights {
                d.check_w(w)
                    .map_err(|e| request_err(format!("--guidance/--sweep: {e}")))?;
            }
        }
        let sampler = SamplerSpec {
            kind,
            steps,
            eta: self.eta,
            spacing: self.spacing.unwrap_or(base.spacing),
            clip_x0: !self.no_clip,
            variance: PosteriorVariance::BetaTilde,
        };
        Ok(SamplePlan {
            request: Request {
                labels,
                guidance: weights[0],
                seed: self.seed,
                sampler,
                batch,
            },
            class,
            weights,
            per_row,
        })
    }
}

/// What `ddpm reconstruct` does to the images it picks (with the `clap` feature, its flags).
#[derive(Debug, Clone, PartialEq)]
#[cfg_attr(feature = "clap", derive(clap::Args))]
pub struct ReconstructOptions {
    /// Timesteps to noise to, comma-separated, each in 0..T.
    #[cfg_attr(
        feature = "clap",
        arg(long, value_delimiter = ',', default_value = "50,200,400,600,800,999")
    )]
    pub t: Vec<usize>,
    /// Denoise every image as this class (index or name) instead of its own.
    #[cfg_attr(feature = "clap", arg(long))]
    pub as_class: Option<String>,
    /// Guidance weight w while denoising (0 = none; diffusers' guidance_scale = 1 + w).
    #[cfg_attr(
        feature = "clap",
        arg(long, default_value_t = 0.0, allow_negative_numbers = true)
    )]
    pub guidance: f64,
    /// Sampler; its grid of --steps timesteps is cut at each t (ddpm: every step from t).
    /// Default: ddim.
    #[cfg_attr(feature = "clap", arg(long, value_enum))]
    pub sampler: Option<SamplerKind>,
    /// Steps of the sampler's grid over the whole of 0..T (default: a progressive student's
    /// own, on its trailing grid; else 50).
    #[cfg_attr(feature = "clap", arg(long))]
    pub steps: Option<usize>,
    /// Seed of the forward noise and any step noise.
    #[cfg_attr(feature = "clap", arg(long, default_value_t = 0))]
    pub seed: u64,
}

impl ReconstructOptions {
    /// The request these options make of `model`, checked: a finite weight, at least one t,
    /// every t below the model's T, a class the model has.
    pub fn resolve(&self, model: &Model) -> Result<crate::ReconstructionRequest> {
        if !self.guidance.is_finite() {
            return Err(request_err(format!(
                "--guidance {}: give a finite weight",
                self.guidance
            )));
        }
        if self.t.is_empty() {
            return Err(request_err("--t: give at least one timestep"));
        }
        let t_total = model.schedule().num_train_timesteps();
        if let Some(&bad) = self.t.iter().find(|&&t| t >= t_total) {
            return Err(request_err(format!(
                "--t {bad} is outside 0..{t_total} (the model's T)"
            )));
        }
        if let Some(d) = &model.card().distilled {
            d.check_w(self.guidance)
                .map_err(|e| request_err(format!("--guidance: {e}")))?;
        }
        let as_class = (self.as_class.as_deref())
            .map(|c| {
                model
                    .class(c)
                    .map_err(|e| request_err(format!("--as-class: {e}")))
            })
            .transpose()?;
        Ok(crate::ReconstructionRequest {
            timesteps: self.t.clone(),
            as_class,
            guidance: self.guidance,
            seed: self.seed,
            sampler: {
                let base =
                    model.default_sampler_or(SamplerSpec::new(SamplerKind::Ddim).with_steps(50));
                SamplerSpec {
                    kind: self.sampler.unwrap_or(base.kind),
                    steps: self.steps.unwrap_or(base.steps),
                    ..base
                }
            },
        })
    }
}
