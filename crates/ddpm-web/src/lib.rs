//! ddpm-rs in the browser: the library the page in `web/` runs in a Web Worker, compiled to
//! WebAssembly.
//!
//! [`Session`] is plain Rust (tested on the host like every other crate): a model loaded from
//! the bytes the page fetched ([`Model::from_bytes`]: there is no file system), and
//! [`Session::generate`], which samples with the same options, noise and sampler as
//! `ddpm sample` (the page's settings resolve through [`SampleOptions::resolve`]) and hands the
//! predicted x₀ of every step to a callback, so the page can animate the reverse process.
//! [`Generator`] is its JavaScript face (`wasm-bindgen`): settings and answers travel as JSON,
//! pixels as `Uint8Array`s.
//!
//! ```
//! use ddpm_web::{Session, Settings};
//! # fn main() -> Result<(), Box<dyn std::error::Error>> {
//! // Doc tests run in the crate's folder.
//! let bytes = std::fs::read("../../assets/ddpm-small-student.safetensors")?;
//! let session = Session::from_bytes(&bytes)?;
//! let settings = Settings { class: "7".into(), n: 2, guidance: 1.0, ..Settings::default() };
//! let mut frames = 0;
//! let digits = session.generate(&settings, &mut |f| {
//!     frames += 1;
//!     assert_eq!(f.pixels.len(), f.len * 28 * 28);
//!     Ok(())
//! })?;
//! assert_eq!(frames, 4); // the shipped student: four steps, one network call each
//! assert_eq!(digits.pixels.len(), 2 * 28 * 28);
//! assert_eq!(digits.labels, vec![7, 7]);
//! # Ok(()) }
//! ```

use std::path::Path;

use candle_core::Device;
use ddpm_pipeline::{Model, SampleOptions, SamplerKind, Spacing, Weights};
use serde::{Deserialize, Serialize};

mod bindings;
pub use bindings::{Drawn, Generator};

/// What went wrong, naming the field of [`Settings`] or the model at fault.
#[derive(Debug, thiserror::Error)]
pub enum WebError {
    /// The model bytes or a request the pipeline refused.
    #[error(transparent)]
    Pipeline(#[from] ddpm_pipeline::PipelineError),
    /// A setting that cannot be used.
    #[error("settings.{field}: {reason}")]
    Settings {
        /// The field.
        field: &'static str,
        /// Why, and what would do.
        reason: String,
    },
    /// A tensor operation failed (or the frame callback stopped generation).
    #[error(transparent)]
    Tensor(#[from] candle_core::Error),
}

/// The name the model bytes go by in errors.
pub const MODEL_NAME: &str = "the fetched model file";

/// What the page asks for: `ddpm sample`'s generation options, by name.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Settings {
    /// Class: an index (`7`), a class name, or `all` (one row per class).
    pub class: String,
    /// Samples (per class with `all`).
    pub n: usize,
    /// Guidance weight w: ε̂ = (1+w)·ε(x,t,c) − w·ε(x,t,∅) (diffusers' guidance_scale = 1 + w).
    pub guidance: f64,
    /// Seed of x_T: the same seed and settings draw the same digits as `ddpm sample`.
    pub seed: u64,
    /// A deterministic sampler by name (`ddim`, `dpm++`, `dpm++3m`, `unipc`, `unipc3`,
    /// `ipndm`); `None`: the model's default.
    pub sampler: Option<String>,
    /// Network calls per digit (twice that for a guided teacher); `None`: the model's default.
    pub steps: Option<usize>,
    /// Timestep spacing by name (`leading`, `trailing`, `linspace`, `logsnr`, `karras`);
    /// `None`: the model's default.
    pub spacing: Option<String>,
    /// Samples denoised together; `None`: all at once. The deterministic samplers draw the
    /// same digits whatever the batch, so a page may take one digit at a time to show the
    /// first sooner.
    pub batch: Option<usize>,
}

impl Default for Settings {
    fn default() -> Self {
        Self {
            class: "all".into(),
            n: 1,
            guidance: 1.0,
            seed: 1,
            sampler: None,
            steps: None,
            spacing: None,
            batch: None,
        }
    }
}

/// What the page needs to know about the model to draw its controls.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ModelInfo {
    /// Class names, in index order (empty: unconditional).
    pub classes: Vec<String>,
    /// Channels, height and width of a sample.
    pub dims: (usize, usize, usize),
    /// The guidance weights the model takes (`None`: any; a distilled student learned a range).
    pub w_range: Option<(f64, f64)>,
    /// Whether it is a distilled student (one call per step, w an input).
    pub distilled: bool,
    /// The default sampler, its steps and spacing.
    pub sampler: String,
    /// Default steps.
    pub steps: usize,
    /// Default spacing.
    pub spacing: String,
    /// Network calls per digit at the defaults with guidance.
    pub calls_per_digit: usize,
    /// The deterministic samplers the page offers.
    pub samplers: Vec<String>,
    /// The spacings.
    pub spacings: Vec<String>,
}

/// What [`Session::generate`] drew.
#[derive(Debug, Clone, PartialEq)]
pub struct Digits {
    /// The class of each sample, in order (empty for an unconditional model).
    pub labels: Vec<u32>,
    /// Samples per row of the grid `ddpm sample` would write.
    pub per_row: usize,
    /// Channels, height and width of a sample.
    pub dims: (usize, usize, usize),
    /// The samples' pixels, `[N, C, H, W]`, in `0..=255` ([`ddpm_core::to_u8`]).
    pub pixels: Vec<u8>,
}

/// One step of one batch: its predicted x₀, as pixels.
#[derive(Debug)]
pub struct Frame<'a> {
    /// The step, 0-based.
    pub step: usize,
    /// Steps per batch.
    pub total: usize,
    /// The batch's first sample.
    pub start: usize,
    /// Samples in the batch.
    pub len: usize,
    /// `[len, C, H, W]` pixels in `0..=255`.
    pub pixels: &'a [u8],
}

/// A model loaded for the page.
#[derive(Debug, Clone)]
pub struct Session {
    model: Model,
}

impl Session {
    /// Loads a model file's bytes (checkpoint or f16 export: its EMA weights) on the CPU,
    /// with every check `ddpm sample` makes on a file.
    pub fn from_bytes(bytes: &[u8]) -> Result<Self, WebError> {
        let model = Model::from_bytes(bytes, Path::new(MODEL_NAME), Weights::Ema, &Device::Cpu)?;
        Ok(Self { model })
    }

    /// The loaded model.
    pub fn model(&self) -> &Model {
        &self.model
    }

    /// The model's classes, size, guidance range and default sampler.
    pub fn info(&self) -> ModelInfo {
        let card = self.model.card();
        let spec = self.model.default_sampler();
        let guided = self.model.is_conditional() && !self.model.takes_guidance();
        ModelInfo {
            classes: card.data.class_names.clone(),
            dims: self.model.image_dims(),
            w_range: card.distilled.as_ref().map(|d| (d.w_min, d.w_max)),
            distilled: card.distilled.is_some(),
            sampler: spec.kind.name().into(),
            steps: spec.steps,
            spacing: spec.spacing.name().into(),
            calls_per_digit: spec.steps * if guided { 2 } else { 1 },
            samplers: DETERMINISTIC.iter().map(|k| k.name().to_string()).collect(),
            spacings: Spacing::ALL.iter().map(|s| s.name().to_string()).collect(),
        }
    }

    /// The `ddpm sample` options these settings stand for.
    pub fn options(&self, s: &Settings) -> Result<SampleOptions, WebError> {
        let sampler = s
            .sampler
            .as_deref()
            .map(|name| {
                let kind: SamplerKind = name.parse().map_err(|e| bad("sampler", e))?;
                if DETERMINISTIC.contains(&kind) {
                    Ok(kind)
                } else {
                    Err(bad(
                        "sampler",
                        format!("{name} draws fresh noise at every step; pick a deterministic one"),
                    ))
                }
            })
            .transpose()?;
        let spacing = s
            .spacing
            .as_deref()
            .map(|name| {
                Spacing::from_name(name).ok_or_else(|| {
                    bad(
                        "spacing",
                        format!("`{name}` is not a spacing (leading, trailing, linspace, logsnr, karras)"),
                    )
                })
            })
            .transpose()?;
        if s.batch == Some(0) {
            return Err(bad("batch", "0: denoise at least one sample at a time"));
        }
        Ok(SampleOptions {
            class: s.class.clone(),
            guidance: s.guidance,
            sweep: Vec::new(),
            n: s.n,
            batch: s.batch,
            steps: s.steps,
            sampler,
            spacing,
            eta: 0.0,
            seed: s.seed,
            no_clip: false,
        })
    }

    /// Samples as `ddpm sample` would with these settings (one digit per class with `all`),
    /// calling `on_frame` after every step of every batch with that batch's predicted x₀; an
    /// error from it stops generation.
    pub fn generate(
        &self,
        settings: &Settings,
        on_frame: &mut dyn FnMut(Frame<'_>) -> Result<(), WebError>,
    ) -> Result<Digits, WebError> {
        let mut plan = self.options(settings)?.resolve(&self.model, 1, false)?;
        // All at once unless asked (the resolved labels count the samples).
        plan.request.batch = settings.batch.unwrap_or(plan.request.labels.len());
        let batch = plan.request.batch;
        let mut request_error = None;
        let x0 = ddpm_pipeline::generate_with(&self.model, &plan.request, &mut |p| {
            let pixels = ddpm_core::to_u8(p.step.pred_x0)?;
            let len = p.step.pred_x0.dim(0)?;
            on_frame(Frame {
                step: p.step.index,
                total: p.step.total,
                start: p.batch * batch,
                len,
                pixels: &pixels,
            })
            .map_err(|e| {
                let msg = e.to_string();
                request_error = Some(e);
                candle_core::Error::Msg(msg)
            })
        });
        let x0 = match (x0, request_error) {
            (_, Some(e)) => return Err(e),
            (r, None) => r?,
        };
        Ok(Digits {
            labels: plan.request.labels.classes().unwrap_or_default().to_vec(),
            per_row: plan.per_row,
            dims: self.model.image_dims(),
            pixels: ddpm_core::to_u8(&x0)?,
        })
    }
}

/// The samplers that draw no noise after x_T, so that a seed fixes the digits whatever the
/// batch: the ones the page offers.
pub const DETERMINISTIC: [SamplerKind; 6] = [
    SamplerKind::DpmPp,
    SamplerKind::DpmPp3M,
    SamplerKind::UniPc,
    SamplerKind::UniPc3,
    SamplerKind::Ipndm,
    SamplerKind::Ddim,
];

fn bad(field: &'static str, reason: impl ToString) -> WebError {
    WebError::Settings {
        field,
        reason: reason.to_string(),
    }
}
