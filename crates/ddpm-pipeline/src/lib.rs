//! Generation pipelines: what turns a trained model into pictures.
//!
//! As diffusers keeps its pipelines apart from its models and schedulers, this crate composes
//! the others and owns nothing numerical of its own:
//!
//! - [`Model`]: a model file (checkpoint or export, f32 or f16) loaded with its card and
//!   schedule, as an ε-predicting denoiser whatever the network was trained to predict;
//! - [`SamplerKind`] and [`SamplerSpec`]: a sampler by name (`ddim`, `ddpm`, `dpm++`, `dpm++3m`, `unipc`, `unipc3`, `ipndm`, the
//!   names the command line takes) and its options, serialisable, built for any schedule;
//! - [`Labels`]: the label layouts the tools use (a row per class, one class, cycling);
//! - [`generate`]: classifier-free-guided sampling in batches from one seed, the one sampling
//!   loop of the workspace (the CLI, the evaluator, the benchmark and the trainer's epoch grids
//!   all call it);
//! - [`reconstruct`]: noise real images to a chosen t and denoise them back, optionally as
//!   another class (SDEdit-style guided editing).
//!
//! # Guidance convention
//!
//! ε̂ = (1 + w)·ε(x, t, c) − w·ε(x, t, ∅): `w = 0` is the plain conditional model.
//! Diffusers' `guidance_scale` is `1 + w`.
//!
//! # Example
//!
//! ```
//! use candle_core::Device;
//! use ddpm_pipeline::{generate_with, Labels, Model, Request, SamplerSpec, Weights};
//!
//! // The model shipped in the repository (doc tests run in crates/ddpm-pipeline).
//! let model = Model::load("../../assets/ddpm-mnist.safetensors".as_ref(), Weights::Ema, &Device::Cpu)?;
//! let request = Request {
//!     labels: Labels::one(7, 2),
//!     guidance: 3.0,
//!     seed: 1,
//!     sampler: "dpm++".parse::<SamplerSpec>()?.with_steps(5),
//!     batch: 128,
//! };
//! let sevens = generate_with(&model, &request, &mut |_| Ok(()))?;
//! assert_eq!(sevens.dims(), &[2, 1, 28, 28]);
//! # Ok::<(), ddpm_pipeline::PipelineError>(())
//! ```

use std::fmt;
use std::path::Path;
use std::str::FromStr;

use candle_core::{DType, Device, Shape, Tensor};
use ddpm_core::{Denoiser, NoiseSchedule, NoiseSource, PosteriorVariance, SeededNoise};
use ddpm_sampler::{
    sample, ClassifierFreeGuidance, Ddim, Ddpm, DpmSolverPp2M, Multistep, Parameterized, Sampler,
    SamplerConfig, Solver,
};
use ddpm_schedule::Schedule;
use ddpm_unet::{ModelFileError, UNet};
use serde::{Deserialize, Serialize};

mod evaluate;
pub mod memory;
mod options;
mod reconstruct;

pub use ddpm_sampler::{Spacing, StepInfo};
pub use ddpm_unet::{DataInfo, ModelCard, Weights};
pub use evaluate::{evaluate, EvalRequest, Scorer};
pub use options::{ReconstructOptions, SampleOptions, SamplePlan};

pub use reconstruct::{
    reconstruct, Reconstruction, ReconstructionAt, ReconstructionError, ReconstructionRequest,
};

/// Errors of the pipelines.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum PipelineError {
    /// The model file could not be read or does not match its card.
    #[error(transparent)]
    ModelFile(#[from] ModelFileError),
    /// The model card's schedule is invalid.
    #[error("the model's schedule: {0}")]
    Schedule(#[from] ddpm_schedule::ScheduleError),
    /// A request the model cannot serve (class out of range, zero samples, …).
    #[error("{0}")]
    Request(String),
    /// Scoring samples failed (see ddpm-eval), or the classifier cannot score this model.
    #[error(transparent)]
    Eval(#[from] ddpm_eval::EvalError),
    /// A tensor operation failed.
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
}

/// A `Result` with [`PipelineError`].
pub type Result<T> = std::result::Result<T, PipelineError>;

fn request_err(msg: impl Into<String>) -> PipelineError {
    PipelineError::Request(msg.into())
}

/// A sampler by name. [`fmt::Display`] and [`FromStr`] use the command line's names:
/// `ddim`, `ddpm` and `dpm++` (also read: `dpmpp`, `dpm-solver++`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[cfg_attr(feature = "clap", derive(clap::ValueEnum))]
pub enum SamplerKind {
    /// DDIM (Song et al. 2021): `steps` steps, stochasticity η.
    #[serde(rename = "ddim")]
    Ddim,
    /// DDPM ancestral sampling over all T steps (`steps` is ignored).
    #[serde(rename = "ddpm")]
    Ddpm,
    /// DPM-Solver++(2M) (Lu et al. 2022): good samples in 10–20 steps.
    #[serde(rename = "dpm++", alias = "dpmpp")]
    #[cfg_attr(feature = "clap", value(name = "dpm++"))]
    DpmPp,
    /// DPM-Solver++(3M): the third-order multistep variant.
    #[serde(rename = "dpm++3m")]
    #[cfg_attr(feature = "clap", value(name = "dpm++3m"))]
    DpmPp3M,
    /// UniPC (Zhao et al. 2023): second-order predictor with the UniC corrector (bh2).
    #[serde(rename = "unipc")]
    #[cfg_attr(feature = "clap", value(name = "unipc"))]
    UniPc,
    /// UniPC with a third-order predictor.
    #[serde(rename = "unipc3")]
    #[cfg_attr(feature = "clap", value(name = "unipc3"))]
    UniPc3,
    /// iPNDM (Zhang & Chen 2023): Adams–Bashforth up to fourth order in σ/α, variable steps.
    #[serde(rename = "ipndm")]
    #[cfg_attr(feature = "clap", value(name = "ipndm"))]
    Ipndm,
}

impl SamplerKind {
    /// Every sampler, in the order the command line lists them.
    pub const ALL: [SamplerKind; 7] = [
        SamplerKind::Ddim,
        SamplerKind::Ddpm,
        SamplerKind::DpmPp,
        SamplerKind::DpmPp3M,
        SamplerKind::UniPc,
        SamplerKind::UniPc3,
        SamplerKind::Ipndm,
    ];

    /// The name the command line and the reports use.
    pub fn name(self) -> &'static str {
        match self {
            SamplerKind::Ddim => "ddim",
            SamplerKind::Ddpm => "ddpm",
            SamplerKind::DpmPp => "dpm++",
            SamplerKind::DpmPp3M => "dpm++3m",
            SamplerKind::UniPc => "unipc",
            SamplerKind::UniPc3 => "unipc3",
            SamplerKind::Ipndm => "ipndm",
        }
    }

    /// The multistep solver behind this name, for the samplers [`Multistep`] runs.
    pub fn solver(self) -> Option<Solver> {
        match self {
            SamplerKind::DpmPp3M => Some(Solver::DpmSolverPp3M),
            SamplerKind::UniPc => Some(Solver::UniPc { order: 2 }),
            SamplerKind::UniPc3 => Some(Solver::UniPc { order: 3 }),
            SamplerKind::Ipndm => Some(Solver::Ipndm),
            SamplerKind::Ddim | SamplerKind::Ddpm | SamplerKind::DpmPp => None,
        }
    }
}

impl fmt::Display for SamplerKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for SamplerKind {
    type Err = PipelineError;
    fn from_str(s: &str) -> Result<Self> {
        let lower = s.to_ascii_lowercase();
        match lower.as_str() {
            "dpmpp" | "dpm-solver++" => Ok(SamplerKind::DpmPp),
            "dpmpp3m" | "dpm-solver++3m" => Ok(SamplerKind::DpmPp3M),
            _ => SamplerKind::ALL
                .into_iter()
                .find(|k| k.name() == lower)
                .ok_or_else(|| {
                    let names: Vec<&str> = SamplerKind::ALL.iter().map(|k| k.name()).collect();
                    request_err(format!(
                        "unknown sampler `{s}`: choose one of {}",
                        names.join(", ")
                    ))
                }),
        }
    }
}

/// A sampler and its options: everything [`SamplerSpec::build`] needs besides the schedule.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct SamplerSpec {
    /// Which sampler.
    pub kind: SamplerKind,
    /// Steps (network calls per sample, at most the schedule's T) of every sampler but
    /// `ddpm`, which visits all T.
    pub steps: usize,
    /// DDIM's stochasticity η (0: deterministic, 1: DDPM-like); ignored by the others.
    pub eta: f64,
    /// Which timesteps the samplers other than `ddpm` visit.
    pub spacing: Spacing,
    /// Clip the predicted x₀ to [−1, 1].
    pub clip_x0: bool,
    /// The reverse variance of `ddpm`.
    pub variance: PosteriorVariance,
}

impl SamplerSpec {
    /// `kind` with the command line's defaults: 20 steps, η = 0, leading spacing, clipping on,
    /// β̃ variance.
    pub fn new(kind: SamplerKind) -> Self {
        Self {
            kind,
            steps: 20,
            eta: 0.0,
            spacing: Spacing::Leading,
            clip_x0: true,
            variance: PosteriorVariance::BetaTilde,
        }
    }

    /// This spec with `steps` steps.
    pub fn with_steps(mut self, steps: usize) -> Self {
        self.steps = steps;
        self
    }

    /// This spec with DDIM's η.
    pub fn with_eta(mut self, eta: f64) -> Self {
        self.eta = eta;
        self
    }

    /// The number of network evaluations per sample for a schedule of `t_total` steps.
    pub fn num_steps(&self, t_total: usize) -> usize {
        match self.kind {
            SamplerKind::Ddpm => t_total,
            _ => self.steps,
        }
    }

    /// Whether two runs from one seed draw the same samples whatever the batch size (no step
    /// noise: every sampler but `ddpm` and `ddim` with η > 0).
    pub fn is_deterministic(&self) -> bool {
        match self.kind {
            SamplerKind::Ddim => self.eta == 0.0,
            SamplerKind::Ddpm => false,
            _ => true,
        }
    }

    /// Builds the sampler for `schedule`. Fails if `steps` is 0 or above T, or η is invalid.
    pub fn build(&self, schedule: &dyn NoiseSchedule) -> Result<Box<dyn Sampler>> {
        let t_total = schedule.num_train_timesteps();
        if self.kind != SamplerKind::Ddpm && (self.steps == 0 || self.steps > t_total) {
            return Err(request_err(format!(
                "{} needs 1..={t_total} steps (the model's T), got {}",
                self.kind, self.steps
            )));
        }
        let cfg = SamplerConfig {
            clip_x0: self.clip_x0,
        };
        Ok(match self.kind {
            SamplerKind::Ddim => Box::new(Ddim::new(
                schedule,
                self.steps,
                self.eta,
                self.spacing,
                cfg,
            )?),
            SamplerKind::Ddpm => Box::new(Ddpm::new(schedule, self.variance, cfg)),
            SamplerKind::DpmPp => {
                Box::new(DpmSolverPp2M::new(schedule, self.steps, self.spacing, cfg)?)
            }
            k => match k.solver() {
                Some(solver) => Box::new(Multistep::new(
                    schedule,
                    solver,
                    self.steps,
                    self.spacing,
                    cfg,
                )?),
                None => return Err(request_err(format!("sampler {k} has no builder"))),
            },
        })
    }
}

impl Default for SamplerSpec {
    /// DPM-Solver++(3M) in 8 steps on the log-SNR grid (16 network calls per guided digit):
    /// `ddpm sample`'s default, chosen at n = 10,000 against DPM-Solver++(2M) in 20 leading
    /// steps (docs/sampling.md, "The default sampler").
    fn default() -> Self {
        Self {
            spacing: Spacing::LogSnr,
            ..Self::new(SamplerKind::DpmPp3M).with_steps(8)
        }
    }
}

impl FromStr for SamplerSpec {
    type Err = PipelineError;
    /// A sampler name with the defaults of [`SamplerSpec::new`].
    fn from_str(s: &str) -> Result<Self> {
        Ok(Self::new(s.parse()?))
    }
}

impl fmt::Display for SamplerSpec {
    /// `dpm++ 20 steps`, `ddim 50 steps η 0.5`, `ddpm 1000 steps` (with T unknown: `ddpm`).
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.kind {
            SamplerKind::Ddpm => write!(f, "ddpm"),
            SamplerKind::Ddim if self.eta != 0.0 => {
                write!(f, "ddim {} steps η {}", self.steps, self.eta)
            }
            k => write!(f, "{k} {} steps", self.steps),
        }
    }
}

/// The labels of a batch of samples: which class each sample is drawn as, or none.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Labels {
    /// `n` unconditional samples (an unconditional model, or guidance-free sampling).
    Unconditional(usize),
    /// One class index per sample.
    Classes(Vec<u32>),
}

impl Labels {
    /// `per_class` samples of each of `num_classes` classes, class by class: a grid with
    /// `per_class` columns has one row per class.
    pub fn rows(num_classes: usize, per_class: usize) -> Self {
        Labels::Classes(
            (0..num_classes * per_class)
                .map(|i| (i / per_class.max(1)) as u32)
                .collect(),
        )
    }

    /// `n` samples of class `class`.
    pub fn one(class: u32, n: usize) -> Self {
        Labels::Classes(vec![class; n])
    }

    /// `n` samples cycling through the classes 0, 1, …, `num_classes` − 1, 0, …: balanced
    /// classes in every prefix (the evaluator's layout).
    pub fn cycle(num_classes: usize, n: usize) -> Self {
        Labels::Classes((0..n).map(|i| (i % num_classes.max(1)) as u32).collect())
    }

    /// The number of samples.
    pub fn len(&self) -> usize {
        match self {
            Labels::Unconditional(n) => *n,
            Labels::Classes(c) => c.len(),
        }
    }

    /// Whether there are no samples.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The class indices, if conditional.
    pub fn classes(&self) -> Option<&[u32]> {
        match self {
            Labels::Unconditional(_) => None,
            Labels::Classes(c) => Some(c),
        }
    }
}

/// What to generate.
#[derive(Debug, Clone, PartialEq)]
pub struct Request {
    /// The samples and their classes.
    pub labels: Labels,
    /// Guidance weight w (0: no guidance). Must be 0 for unconditional labels or models.
    pub guidance: f64,
    /// Seed of x_T and of any step noise.
    pub seed: u64,
    /// The sampler.
    pub sampler: SamplerSpec,
    /// Samples denoised together (a guided batch runs the network on twice as many).
    pub batch: usize,
}

/// What the per-step callback of [`generate`] sees.
#[derive(Debug)]
pub struct Progress<'a> {
    /// The batch this step belongs to, 0-based.
    pub batch: usize,
    /// The number of batches.
    pub batches: usize,
    /// The step within the batch.
    pub step: StepInfo<'a>,
}

/// A model file loaded for sampling: the U-Net, its card and its built schedule.
#[derive(Debug, Clone)]
pub struct Model {
    unet: UNet,
    card: ModelCard,
    schedule: Schedule,
}

impl Model {
    /// Reads a checkpoint or export (f32 or f16) with the chosen weights.
    pub fn load(path: &Path, weights: Weights, device: &Device) -> Result<Self> {
        let (unet, card) = ddpm_unet::load_unet(path, weights, device)?;
        Self::new(unet, card)
    }

    /// A model from a model file's bytes (fetched over the network, say, where there is no
    /// file system); `name` stands for the file in errors.
    ///
    /// ```
    /// # fn main() -> Result<(), Box<dyn std::error::Error>> {
    /// use ddpm_pipeline::{Model, Weights};
    /// use std::path::Path;
    /// // Doc tests run in the crate's folder.
    /// let bytes = std::fs::read("../../assets/ddpm-small-student.safetensors")?;
    /// let model = Model::from_bytes(&bytes, Path::new("student.safetensors"), Weights::Ema, &candle_core::Device::Cpu)?;
    /// assert!(model.takes_guidance());
    /// // Not a model file: one error that names it.
    /// let err = Model::from_bytes(b"junk", Path::new("junk.bin"), Weights::Ema, &candle_core::Device::Cpu).unwrap_err();
    /// assert!(err.to_string().contains("junk.bin"));
    /// # Ok(()) }
    /// ```
    pub fn from_bytes(
        bytes: &[u8],
        name: &Path,
        weights: Weights,
        device: &Device,
    ) -> Result<Self> {
        let (unet, card) = ddpm_unet::load_unet_from_bytes(bytes, name, weights, device)?;
        Self::new(unet, card)
    }

    /// A model from a network and the card it was built from.
    pub fn new(unet: UNet, card: ModelCard) -> Result<Self> {
        let schedule = card.schedule.build()?;
        Ok(Self {
            unet,
            card,
            schedule,
        })
    }

    /// The network.
    pub fn unet(&self) -> &UNet {
        &self.unet
    }

    /// Replaces the network (e.g. with autocast or other kernels); same card.
    pub fn map_unet(self, f: impl FnOnce(UNet) -> candle_core::Result<UNet>) -> Result<Self> {
        Ok(Self {
            unet: f(self.unet)?,
            ..self
        })
    }

    /// The model card.
    pub fn card(&self) -> &ModelCard {
        &self.card
    }

    /// The noise schedule the model was trained with.
    pub fn schedule(&self) -> &Schedule {
        &self.schedule
    }

    /// The device the weights live on.
    pub fn device(&self) -> &Device {
        self.unet.device()
    }

    /// Whether the model takes class labels.
    pub fn is_conditional(&self) -> bool {
        self.card.model.num_classes > 0
    }

    /// `[C, H, W]` of one sample.
    pub fn image_dims(&self) -> (usize, usize, usize) {
        let d = &self.card.data;
        (d.channels, d.height, d.width)
    }

    /// The network as an ε-predicting denoiser (v-prediction converted with the schedule).
    pub fn denoiser(&self) -> Parameterized<&UNet> {
        denoiser(&self.unet, &self.card, &self.schedule)
    }

    /// The sampler this model samples with when none is asked for: a progressive student's
    /// own DDIM steps on the trailing grid it learned, else [`SamplerSpec::default`].
    pub fn default_sampler(&self) -> SamplerSpec {
        match self.card.distilled.as_ref().and_then(|d| d.steps) {
            Some(n) => SamplerSpec {
                spacing: Spacing::Trailing,
                ..SamplerSpec::new(SamplerKind::Ddim).with_steps(n)
            },
            None => SamplerSpec::default(),
        }
    }

    /// The sampler of a request that names the sampler `kind`, or none, and leaves the steps
    /// and spacing to the model:
    ///
    /// - a progressive student: its own DDIM steps on its trailing grid, whatever the sampler;
    /// - otherwise, with no sampler or the default's: [`SamplerSpec::default`];
    /// - otherwise `kind` with [`SamplerSpec::new`]'s 20 leading steps, so that
    ///   `--sampler dpm++` alone is DPM-Solver++(2M) as it was the default before the switch,
    ///   not the 2M solver on the 3M default's 8 log-SNR steps.
    pub fn default_sampler_for(&self, kind: Option<SamplerKind>) -> SamplerSpec {
        let base = self.default_sampler();
        match kind {
            Some(k)
                if k != base.kind
                    && self.card.distilled.as_ref().and_then(|d| d.steps).is_none() =>
            {
                SamplerSpec::new(k)
            }
            Some(k) => SamplerSpec { kind: k, ..base },
            None => base,
        }
    }

    /// [`Model::default_sampler`] for a progressive student, else `fallback` (a command's own
    /// default: `ddpm eval` and `reconstruct` use DDIM in 50 steps).
    pub fn default_sampler_or(&self, fallback: SamplerSpec) -> SamplerSpec {
        match self.card.distilled.as_ref().and_then(|d| d.steps) {
            Some(_) => self.default_sampler(),
            None => fallback,
        }
    }

    /// Whether this model takes the guidance weight as an input (a distilled student: one
    /// network call per step at any w).
    pub fn takes_guidance(&self) -> bool {
        self.card.model.guidance_embedding
    }

    /// Resolves a class given as an index (`7`) or a class name (`seven`, `Sneaker`).
    pub fn class(&self, arg: &str) -> Result<u32> {
        parse_class(arg, &self.card.data.class_names, self.is_conditional())
    }
}

/// Which weights of a model file to load, and how to run them; with the `clap` feature, the
/// model flags of `ddpm sample`, `eval` and `reconstruct`.
#[derive(Debug, Clone, Default, PartialEq)]
#[cfg_attr(feature = "clap", derive(clap::Args))]
pub struct ModelOptions {
    /// Checkpoint or export to load (default: the model shipped in assets/, else
    /// runs/default/checkpoint.safetensors).
    #[cfg_attr(feature = "clap", arg(long))]
    pub checkpoint: Option<std::path::PathBuf>,
    /// Use the raw weights instead of the EMA weights.
    #[cfg_attr(feature = "clap", arg(long))]
    pub raw_weights: bool,
    /// Autocast: run the U-Net's convolutions, linear layers and attention products in bf16
    /// (f16 also accepted) with the weights kept in f32; GroupNorm and softmax stay f32. On the
    /// CPU, bf16 products take bf16-rounded inputs and accumulate in f32: convolutions on the
    /// vdpbf16ps kernel where the dispatcher picks it, otherwise on the reference path, slower
    /// than f32.
    #[cfg_attr(feature = "clap", arg(long, value_enum))]
    pub autocast: Option<ddpm_unet::Autocast>,
}

impl ModelOptions {
    /// Loads the model file at `path` (this struct's `checkpoint` is the caller's to resolve:
    /// the `ddpm` binary falls back to the shipped model) onto `device`, with the weights and
    /// autocast asked for. Autocast on the CPU works but is slow, and says so.
    pub fn load(&self, path: &Path, device: &Device) -> Result<Model> {
        let weights = if self.raw_weights {
            Weights::Raw
        } else {
            Weights::Ema
        };
        if let Some(a) = self.autocast {
            let name = a.dtype().as_str();
            a.check_device(device)
                .map_err(|e| request_err(format!("--autocast {name}: {e}")))?;
            match a.cpu_note(device) {
                Some(note) => tracing::warn!("--autocast {name}: {note}"),
                None if device.is_cpu() => tracing::warn!(
                    "--autocast {name} on the CPU runs several times slower than f32 (candle's \
                     CPU products convert half floats); it is meant for GPUs"
                ),
                None => {}
            }
        }
        let cast = self.autocast.map(|a| a.dtype());
        Model::load(path, weights, device)?.map_unet(|u| u.with_autocast(cast))
    }
}

/// `net` (a network built from `card`) as an ε-predicting denoiser for the samplers:
/// v-prediction is converted with `schedule`'s ᾱ.
pub fn denoiser<D: Denoiser, M>(
    net: D,
    card: &ModelCard<M>,
    schedule: &dyn NoiseSchedule,
) -> Parameterized<D> {
    Parameterized::new(net, card.prediction, schedule)
}

/// Resolves a class index or name against `names`; errors name the classes there are.
pub fn parse_class(arg: &str, names: &[String], conditional: bool) -> Result<u32> {
    if !conditional {
        return Err(request_err(format!(
            "class {arg}: this model is unconditional and takes no class"
        )));
    }
    if let Some(i) = names.iter().position(|n| n == arg) {
        return Ok(i as u32);
    }
    match arg.parse::<usize>() {
        Ok(i) if i < names.len() => Ok(i as u32),
        Ok(i) => Err(request_err(format!(
            "class {i} is out of range: this model has classes 0..{} ({})",
            names.len().saturating_sub(1),
            names.join(", ")
        ))),
        Err(_) => Err(request_err(format!(
            "class {arg}: not a class of this model ({}) or an index",
            names.join(", ")
        ))),
    }
}

/// [`generate`] with a loaded [`Model`].
pub fn generate_with(
    model: &Model,
    request: &Request,
    on_step: &mut dyn FnMut(Progress<'_>) -> candle_core::Result<()>,
) -> Result<Tensor> {
    if let Some(d) = &model.card.distilled {
        d.check_w(request.guidance).map_err(request_err)?;
    }
    generate(
        &model.denoiser(),
        model.schedule(),
        model.image_dims(),
        model.device(),
        request,
        on_step,
    )
}

/// Generates `request.labels.len()` samples `[N, C, H, W]` (`dims` = `(C, H, W)`) on `device`
/// (where the denoiser's weights are) with
/// classifier-free guidance, `request.batch` at a time, and returns them as the sampler left
/// them (not clipped).
///
/// The noise: one [`SeededNoise`] from `request.seed` draws x_T for all N samples first, then
/// the step noise of each batch in turn; so the deterministic samplers
/// ([`SamplerSpec::is_deterministic`]) draw the same samples whatever the batch size, and
/// one batch is exactly [`ddpm_sampler::sample`]. `denoiser` must predict ε (wrap a network
/// with [`denoiser`] or use [`generate_with`]). `on_step` runs after every step of every
/// batch; an error from it stops generation.
pub fn generate(
    denoiser: &dyn Denoiser,
    schedule: &dyn NoiseSchedule,
    dims: (usize, usize, usize),
    device: &Device,
    request: &Request,
    on_step: &mut dyn FnMut(Progress<'_>) -> candle_core::Result<()>,
) -> Result<Tensor> {
    let n = request.labels.len();
    if n == 0 {
        return Err(request_err("asked for 0 samples; ask for at least one"));
    }
    if request.batch == 0 {
        return Err(request_err(
            "a batch of 0 samples: denoise at least one at a time",
        ));
    }
    let labels = match request.labels.classes() {
        Some(c) => {
            check_classes(c, denoiser.null_class())?;
            Some(Tensor::from_slice(c, n, device)?)
        }
        None if request.guidance != 0.0 => {
            return Err(request_err(format!(
                "guidance w = {} needs class labels; unconditional samples take w = 0",
                request.guidance
            )))
        }
        None => None,
    };
    let guided = ClassifierFreeGuidance::new(denoiser, request.guidance)?;
    // Built before x_T is drawn, so that a bad spec fails first; it runs the first batch, and
    // every later batch gets a fresh one (the multistep samplers keep a history).
    let mut first = Some(request.sampler.build(schedule)?);
    let (c, h, w) = dims;
    let mut noise = SeededNoise::new(request.seed);
    let x_t = noise.randn(&Shape::from((n, c, h, w)), DType::F32, device)?;
    let batches = n.div_ceil(request.batch);
    let mut outs = Vec::with_capacity(batches);
    for (batch, start) in (0..n).step_by(request.batch).enumerate() {
        let len = request.batch.min(n - start);
        let xb = x_t.narrow(0, start, len)?;
        let lb = labels
            .as_ref()
            .map(|l| l.narrow(0, start, len))
            .transpose()?;
        let mut sampler = match first.take() {
            Some(s) => s,
            None => request.sampler.build(schedule)?,
        };
        outs.push(sample(
            &guided,
            sampler.as_mut(),
            xb,
            lb.as_ref(),
            &mut noise,
            &mut |step| {
                on_step(Progress {
                    batch,
                    batches,
                    step,
                })
            },
        )?);
    }
    Ok(Tensor::cat(&outs, 0)?)
}

/// The frames of a reverse-diffusion animation, recorded from [`generate`]'s callback: the
/// samples of every batch at the same steps (about `max_frames` of them, the last step
/// included), joined into one `[N, C, H, W]` tensor per frame.
#[derive(Debug, Default)]
pub struct Frames {
    every: usize,
    parts: Vec<Vec<Tensor>>,
    next: usize,
}

impl Frames {
    /// A recorder for a sampler of `total_steps` steps, keeping about `max_frames` frames.
    pub fn new(total_steps: usize, max_frames: usize) -> Self {
        Self {
            every: (total_steps / max_frames.max(1)).max(1),
            parts: Vec::new(),
            next: 0,
        }
    }

    /// Records the step `p` reports, if it is a frame's.
    pub fn record(&mut self, p: &Progress<'_>) -> candle_core::Result<()> {
        let info = &p.step;
        if !info.index.is_multiple_of(self.every) && info.index + 1 != info.total {
            return Ok(());
        }
        if info.index == 0 {
            self.next = 0;
        }
        if p.batch == 0 {
            self.parts.push(Vec::new());
        }
        if let Some(parts) = self.parts.get_mut(self.next) {
            parts.push(info.sample.copy()?);
        }
        self.next += 1;
        Ok(())
    }

    /// The frames, each the samples of all batches at one step.
    pub fn into_tensors(self) -> Result<Vec<Tensor>> {
        self.parts
            .iter()
            .map(|parts| Ok(Tensor::cat(parts, 0)?))
            .collect()
    }
}

/// The forward process q(x_t | x_0) shown on `images` (`[R, C, H, W]`): a row-major
/// `[R·K, C, H, W]` tensor with each image noised to each of the `K` timesteps `ts`, all from
/// one seeded ε per cell (`ddpm noise`'s figure).
pub fn forward_process(
    schedule: &Schedule,
    images: &Tensor,
    ts: &[usize],
    seed: u64,
) -> Result<Tensor> {
    let (r, c, h, w) = images.dims4()?;
    let t_total = schedule.config().num_timesteps;
    if let Some(&bad) = ts.iter().find(|&&t| t >= t_total) {
        return Err(request_err(format!("t = {bad} is outside 0..{t_total}")));
    }
    let k = ts.len();
    let x0 = images.repeat((1, k, 1, 1))?.reshape((r * k, c, h, w))?;
    let t: Vec<u32> = (0..r).flat_map(|_| ts.iter().map(|&t| t as u32)).collect();
    let eps = SeededNoise::new(seed).randn(x0.shape(), DType::F32, x0.device())?;
    Ok(schedule.add_noise_from_host(&x0, &eps, &t)?)
}

/// The classes must be real classes of the model (below its null class).
fn check_classes(classes: &[u32], null: Option<u32>) -> Result<()> {
    let Some(null) = null else {
        return Err(request_err(
            "class labels given, but the model is unconditional: ask for unconditional samples",
        ));
    };
    if let Some(&bad) = classes.iter().find(|&&c| c >= null) {
        return Err(request_err(format!(
            "class {bad} is out of range: the model has classes 0..{}",
            null.saturating_sub(1)
        )));
    }
    Ok(())
}
