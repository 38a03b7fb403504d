//! Reconstruction: noise real images to a timestep t with the forward process, denoise them
//! back with the model, and measure how much of each image survives; with another class and
//! guidance, the same chain redraws a real image as that class (SDEdit, Meng et al. 2022).

use candle_core::{DType, Tensor};
use ddpm_core::{NoiseSchedule, NoiseSource, SeededNoise};
use ddpm_sampler::{sample, ClassifierFreeGuidance, Ddim, Ddpm, DpmSolverPp2M, Multistep, Sampler};
use serde::{Deserialize, Serialize};

use crate::{check_classes, request_err, Model, Result, SamplerKind, SamplerSpec};

/// What to reconstruct.
#[derive(Debug, Clone, PartialEq)]
pub struct ReconstructionRequest {
    /// The timesteps to noise to, each in `0..T`; one reconstruction per t.
    pub timesteps: Vec<usize>,
    /// Denoise every image as this class instead of its own (guided editing).
    pub as_class: Option<u32>,
    /// Guidance weight w while denoising (0: none).
    pub guidance: f64,
    /// Seed of the forward noise ε (one draw, shared by every t) and of any step noise.
    pub seed: u64,
    /// The sampler. Its grid of `steps` timesteps over 0..T is cut at each t, with t itself
    /// as the first step, so a small t takes few steps (as diffusers' img2img `strength`).
    /// `ddpm` walks every timestep from t down to 0.
    pub sampler: SamplerSpec,
}

/// The reconstructions of a batch of images.
#[derive(Debug, Clone)]
pub struct Reconstruction {
    /// The images reconstructed, as given (`[B, C, H, W]` in [−1, 1]).
    pub originals: Tensor,
    /// One entry per requested t, in order.
    pub rows: Vec<ReconstructionAt>,
}

/// The reconstructions at one t.
#[derive(Debug, Clone)]
pub struct ReconstructionAt {
    /// The timestep the images were noised to.
    pub t: usize,
    /// √ᾱ_t: how much of the image the noised input keeps.
    pub signal: f64,
    /// The reconstructions, `[B, C, H, W]`, clipped to [−1, 1].
    pub images: Tensor,
    /// Network evaluations per image.
    pub steps: usize,
    /// The error of each reconstruction against its original.
    pub error: ReconstructionError,
}

/// How far the reconstructions at one t are from the originals, pixels in [−1, 1].
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct ReconstructionError {
    /// Mean squared error over all pixels of all images.
    pub mse: f64,
    /// PSNR in dB for the peak-to-peak range 2: 10·log10(4 / mse).
    pub psnr_db: f64,
}

impl ReconstructionError {
    fn between(a: &Tensor, b: &Tensor) -> Result<Self> {
        let mse = (a - b)?
            .sqr()?
            .mean_all()?
            .to_dtype(DType::F64)?
            .to_scalar::<f64>()?;
        Ok(Self {
            mse,
            psnr_db: 10.0 * (4.0 / mse.max(1e-12)).log10(),
        })
    }
}

impl SamplerSpec {
    /// The sampler for denoising from timestep `t_start` (an image noised to it) down to 0:
    /// `t_start`, then the timesteps of this spec's grid below it (`ddpm`: every one).
    pub fn build_from(
        &self,
        schedule: &dyn NoiseSchedule,
        t_start: usize,
    ) -> Result<Box<dyn Sampler>> {
        let t_total = schedule.num_train_timesteps();
        if t_start >= t_total {
            return Err(request_err(format!(
                "t = {t_start} is outside 0..{t_total} (the model's T)"
            )));
        }
        let cfg = ddpm_sampler::SamplerConfig {
            clip_x0: self.clip_x0,
        };
        let grid = |spec: &Self| -> Result<Vec<usize>> {
            let steps = spec.steps.clamp(1, t_total);
            let mut ts = vec![t_start];
            ts.extend(
                ddpm_sampler::spaced_timesteps(schedule, steps, spec.spacing)?
                    .into_iter()
                    .filter(|&t| t < t_start),
            );
            Ok(ts)
        };
        Ok(match self.kind {
            SamplerKind::Ddpm => Box::new(Ddpm::with_timesteps(
                schedule,
                (0..=t_start).rev().collect(),
                self.variance,
                cfg,
            )?),
            SamplerKind::Ddim => {
                Box::new(Ddim::with_timesteps(schedule, grid(self)?, self.eta, cfg)?)
            }
            SamplerKind::DpmPp => {
                Box::new(DpmSolverPp2M::with_timesteps(schedule, grid(self)?, cfg)?)
            }
            k => match k.solver() {
                Some(solver) => Box::new(Multistep::with_timesteps(
                    schedule,
                    solver,
                    grid(self)?,
                    cfg,
                )?),
                None => return Err(request_err(format!("sampler {k} has no builder"))),
            },
        })
    }
}

/// Reconstructs `images` (`[B, C, H, W]` in [−1, 1], on the model's device) at each t of the
/// request: x_t = √ᾱ_t·x₀ + √(1−ᾱ_t)·ε with one ε for every t, then the sampler from t down
/// to 0, guided towards `labels` (each image's class) or `request.as_class`. At small t the
/// result is close to the input; at t = T − 1 almost nothing of it is left and the result is
/// a fresh sample of the class.
pub fn reconstruct(
    model: &Model,
    images: &Tensor,
    labels: Option<&[u32]>,
    request: &ReconstructionRequest,
) -> Result<Reconstruction> {
    let (b, c, h, w) = images.dims4()?;
    if b == 0 {
        return Err(request_err("no images to reconstruct"));
    }
    if (c, h, w) != model.image_dims() {
        return Err(request_err(format!(
            "images of {c}×{h}×{w}, but the model takes {:?}",
            model.image_dims()
        )));
    }
    if request.timesteps.is_empty() {
        return Err(request_err("no timesteps to reconstruct at"));
    }
    let dev = model.device();
    let classes: Option<Vec<u32>> = match (model.is_conditional(), request.as_class, labels) {
        (false, Some(_), _) => {
            return Err(request_err(
                "--as-class needs a class-conditional model; this one is unconditional",
            ))
        }
        (false, None, _) => None,
        (true, Some(k), _) => Some(vec![k; b]),
        (true, None, Some(l)) if l.len() == b => Some(l.to_vec()),
        (true, None, Some(l)) => {
            return Err(request_err(format!("{} labels for {b} images", l.len())))
        }
        (true, None, None) => {
            return Err(request_err(
                "a class-conditional model needs each image's label or an --as-class",
            ))
        }
    };
    let denoiser = model.denoiser();
    if let Some(cl) = &classes {
        check_classes(cl, ddpm_core::Denoiser::null_class(&denoiser))?;
    } else if request.guidance != 0.0 {
        return Err(request_err(
            "guidance needs a class-conditional model; use w = 0",
        ));
    }
    let y = classes
        .as_ref()
        .map(|cl| Tensor::from_slice(cl, b, dev))
        .transpose()?;
    let guided = ClassifierFreeGuidance::new(&denoiser, request.guidance)?;
    let originals = images.to_dtype(DType::F32)?;
    let mut noise = SeededNoise::new(request.seed);
    let eps = noise.randn(originals.shape(), DType::F32, dev)?;
    let ac = model.schedule().alphas_cumprod();
    let mut rows = Vec::with_capacity(request.timesteps.len());
    for &t in &request.timesteps {
        let mut sampler = request.sampler.build_from(model.schedule(), t)?;
        let steps = sampler.timesteps().len();
        let tt = Tensor::full(t as u32, b, dev)?;
        let x_t = model.schedule().add_noise(&originals, &eps, &tt)?;
        let x0 = sample(
            &guided,
            sampler.as_mut(),
            x_t,
            y.as_ref(),
            &mut noise,
            &mut |_| Ok(()),
        )?
        .clamp(-1f32, 1f32)?;
        rows.push(ReconstructionAt {
            t,
            signal: ac[t].sqrt(),
            error: ReconstructionError::between(&x0, &originals)?,
            images: x0,
            steps,
        });
    }
    Ok(Reconstruction { originals, rows })
}

impl Reconstruction {
    /// The images as one grid, row-major with `1 + rows.len()` columns: each image's
    /// original, then its reconstruction at each t.
    pub fn grid(&self) -> Result<Tensor> {
        let b = self.originals.dim(0)?;
        let mut cells = Vec::with_capacity(b * (1 + self.rows.len()));
        for i in 0..b {
            cells.push(self.originals.narrow(0, i, 1)?);
            for r in &self.rows {
                cells.push(r.images.narrow(0, i, 1)?);
            }
        }
        Ok(Tensor::cat(&cells, 0)?)
    }
}
