//! The evaluation protocol applied to a model, as `ddpm eval` runs it: at each guidance weight,
//! `n` samples balanced over the classes (the same noise for every w, so rows differ only by w),
//! scored by ddpm-eval's classifier against its reference, gathered into one [`Report`].
//!
//! ddpm-eval measures images and knows no model; this module is where the two meet.

use std::path::Path;

use ddpm_eval::{Classifier, ClassifierInfo, EvalError, Reference, Report, Row, SetMetrics};

use crate::{
    generate_with, request_err, Labels, Model, Request, Result, SamplerKind, SamplerSpec, Spacing,
};

/// What to evaluate; with the `clap` feature, `ddpm eval`'s flags.
#[derive(Debug, Clone, PartialEq)]
#[cfg_attr(feature = "clap", derive(clap::Args))]
pub struct EvalRequest {
    /// Samples per guidance weight (classes balanced).
    #[cfg_attr(feature = "clap", arg(long, default_value_t = 10_000))]
    pub n: usize,
    /// Guidance weights w to evaluate, comma-separated (an unconditional model is evaluated
    /// at w = 0 only).
    #[cfg_attr(
        feature = "clap",
        arg(
            long,
            default_value = "0,0.5,1,2,3,5",
            value_delimiter = ',',
            allow_negative_numbers = true
        )
    )]
    pub guidance: Vec<f64>,
    /// Sampling steps (default: a progressive student's own; else 50).
    #[cfg_attr(feature = "clap", arg(long))]
    pub steps: Option<usize>,
    /// Sampler (default: ddim).
    #[cfg_attr(feature = "clap", arg(long, value_enum))]
    pub sampler: Option<SamplerKind>,
    /// Timestep spacing (see `ddpm sample --help`; default: trailing for a progressive
    /// student, else leading).
    #[cfg_attr(feature = "clap", arg(long, value_enum))]
    pub spacing: Option<Spacing>,
    /// Samples generated per batch.
    #[cfg_attr(feature = "clap", arg(long, default_value_t = 500))]
    pub batch: usize,
    /// Seed of the sampling noise (the same for every w, so rows differ only by w).
    #[cfg_attr(feature = "clap", arg(long, default_value_t = 1))]
    pub seed: u64,
}

impl EvalRequest {
    /// The sampler this request evaluates `model` with: the flags given, the rest from a
    /// progressive student's card (ddim, its steps, trailing) or `ddpm eval`'s defaults (ddim,
    /// 50 steps, leading).
    pub fn sampler_for(&self, model: &Model) -> SamplerSpec {
        let base = model.default_sampler_or(SamplerSpec::new(SamplerKind::Ddim).with_steps(50));
        SamplerSpec {
            kind: self.sampler.unwrap_or(base.kind),
            steps: self.steps.unwrap_or(base.steps),
            spacing: self.spacing.unwrap_or(base.spacing),
            ..base
        }
    }

    /// Fails on a request that cannot be evaluated (fewer than 2 samples, batch 0, no or
    /// non-finite weights), before anything is loaded or sampled. The messages name the fields
    /// by their flags (`--n`), as this struct is `ddpm eval`'s flag set.
    pub fn validate(&self) -> Result<()> {
        if self.n < 2 {
            return Err(request_err(format!(
                "--n {}: the covariance needs at least 2 samples",
                self.n
            )));
        }
        if self.batch == 0 {
            return Err(request_err(
                "--batch 0: generate at least 1 sample at a time",
            ));
        }
        if self.guidance.is_empty() || self.guidance.iter().any(|w| !w.is_finite()) {
            return Err(request_err("--guidance: give finite weights, e.g. 0,1,3"));
        }
        Ok(())
    }
}

/// The scorer of an evaluation: ddpm-eval's classifier (with the file it came from and its
/// training summary), the reference it measures against and the real-data floor at this `n`
/// (see [`Reference::mnist`]).
#[derive(Debug, Clone, Copy)]
pub struct Scorer<'a> {
    /// The classifier.
    pub classifier: &'a Classifier,
    /// What its file says of it.
    pub info: &'a ClassifierInfo,
    /// Its file.
    pub path: &'a Path,
    /// The reference statistics.
    pub reference: &'a Reference,
    /// Real data against the reference: what a perfect generator would score.
    pub floor: &'a SetMetrics,
}

/// Evaluates `model` (loaded from `checkpoint`) as `request` asks. `on_samples(w, k)` hears of
/// each batch of `k` samples done at weight `w`, and `on_row` of each weight's metrics.
pub fn evaluate(
    model: &Model,
    checkpoint: &Path,
    request: &EvalRequest,
    scorer: &Scorer<'_>,
    on_samples: &mut dyn FnMut(f64, usize),
    on_row: &mut dyn FnMut(&Row),
) -> Result<Report> {
    request.validate()?;
    let card = model.card();
    let (d, k) = (&card.data, card.model.num_classes);
    scorer
        .classifier
        .check_generator(d.channels, d.height, d.width, k)?;
    let n = request.n;
    let on_cpu = model.device().is_cpu();
    crate::memory::check_sampling(card, n, request.batch.min(n), true, 1, false, on_cpu)?;
    let (weights, labels) = if k > 0 {
        (request.guidance.clone(), Labels::cycle(k, n))
    } else {
        (vec![0.0], Labels::Unconditional(n))
    };
    let spec = request.sampler_for(model);
    let mut generate = |w: f64| -> std::result::Result<candle_core::Tensor, EvalError> {
        let req = Request {
            labels: labels.clone(),
            guidance: w,
            seed: request.seed,
            sampler: spec,
            batch: request.batch,
        };
        generate_with(model, &req, &mut |p| {
            if p.step.index + 1 == p.step.total {
                on_samples(w, p.step.sample.dim(0)?);
            }
            Ok(())
        })
        .map_err(|e| EvalError::Sampling {
            w,
            source: Box::new(e),
        })
    };
    let rows = ddpm_eval::sweep(
        scorer.classifier,
        scorer.reference,
        &weights,
        labels.classes(),
        &mut generate,
        on_row,
    )?;
    Ok(Report {
        checkpoint: checkpoint.display().to_string(),
        card: serde_json::to_value(card)
            .map_err(|e| request_err(format!("the model card as JSON: {e}")))?,
        n,
        steps: spec.steps,
        sampler: spec.kind.to_string(),
        spacing: spec.spacing.name().into(),
        seed: request.seed,
        classifier: scorer.path.display().to_string(),
        classifier_test_accuracy: scorer.info.test_accuracy,
        real_data_floor: scorer.floor.clone(),
        rows,
    })
}
