//! Distillation of a classifier-free-guided teacher into a few-step student.
//!
//! - **Stage 1, guidance** (Meng et al., CVPR 2023, "On Distillation of Guided Diffusion
//!   Models"): a student with the guidance weight w as an input
//!   ([`ddpm_unet::UNetConfig::guidance_embedding`]) learns the teacher's guided prediction
//!   ε̂ = (1 + w)·ε(x, t, c) − w·ε(x, t, ∅) for w drawn uniformly in `[w_min, w_max]`: one
//!   network call per step instead of two, with any sampler.
//! - **Stage 2, progressive** (Salimans & Ho, ICLR 2022): a student that samples in N DDIM
//!   steps learns, from each step's start z_a, the state z_c its teacher reaches in two DDIM
//!   steps of the 2N-step grid (trailing spacing; the grids nest). The loss is the mean squared
//!   error of the student's own one-step z_c: it weighs each step by how much its error moves
//!   the state the next step starts from (for ε-prediction, the per-step factor
//!   |σ_c − α_c·σ_a/α_a| on ε, from 0.95 to 8.1 for a 4-step student of the linear
//!   schedule), where Salimans & Ho's truncated-SNR loss on x̂₀ would weigh the first step of a
//!   4-step grid 25,000 times the last.
//!
//! A distillation is an ordinary [`crate::Trainer`] run whose options carry a
//! [`DistillConfig`]: the same budget, exact resume, metrics, grids and checkpoints. The
//! student starts as a copy of its teacher (the guidance embedding's last layer at zero, so
//! that w first changes nothing), and its card says what it is ([`Distillation`]), so every
//! tool samples it without new flags.

use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor, Var};
use ddpm_core::{Denoiser, NoiseSchedule, Prediction, SeededNoise};
use ddpm_schedule::Schedule;
use ddpm_unet::{DistillStage, Distillation, ModelCard, UNet, Weights};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::error::{Result, TrainError};

/// The distillation a training run does (saved with its options, so a resumed run reloads the
/// same teacher and checks it is the same file).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DistillConfig {
    /// The teacher's model file (training checkpoint or export); its EMA weights teach.
    pub teacher: PathBuf,
    /// The teacher file's SHA-256, checked whenever the run starts or resumes.
    pub teacher_sha256: String,
    /// Which stage.
    pub stage: DistillStage,
    /// The lowest guidance weight learned (stage 1; stage 2 keeps its teacher's range).
    pub w_min: f64,
    /// The highest guidance weight learned.
    pub w_max: f64,
    /// Stage 2: the student's DDIM steps N (the teacher takes 2N).
    pub student_steps: Option<usize>,
}

impl DistillConfig {
    /// Stage 1 from the teacher at `teacher`, learning w in `[w_min, w_max]`. Hashes the file.
    pub fn guidance(teacher: &Path, w_min: f64, w_max: f64) -> Result<Self> {
        Ok(Self {
            teacher: teacher.to_path_buf(),
            teacher_sha256: sha256_hex(&read_teacher(teacher)?),
            stage: DistillStage::Guidance,
            w_min,
            w_max,
            student_steps: None,
        })
    }

    /// Stage 2: a student of `student_steps` DDIM steps from the w-conditioned teacher at
    /// `teacher` (a stage-1 or earlier stage-2 student, whose w range it keeps). Hashes the
    /// file and reads the range from its card.
    pub fn progressive(teacher: &Path, student_steps: usize) -> Result<Self> {
        let bytes = read_teacher(teacher)?;
        let file = ddpm_unet::file::from_bytes(&bytes, teacher, &Device::Cpu)
            .map_err(|e| bad_teacher(teacher, e.to_string()))?;
        let d = file.card.distilled.clone().ok_or_else(|| {
            bad_teacher(
                teacher,
                "is not a distilled model: progressive distillation starts from a guidance \
                 student (run the guidance stage first)"
                    .into(),
            )
        })?;
        Ok(Self {
            teacher: teacher.to_path_buf(),
            teacher_sha256: sha256_hex(&bytes),
            stage: DistillStage::Progressive,
            w_min: d.w_min,
            w_max: d.w_max,
            student_steps: Some(student_steps),
        })
    }

    /// Whether `w` lies in the learned range.
    pub fn check_w(&self, w: f64) -> bool {
        w >= self.w_min && w <= self.w_max
    }

    /// Checks the fields; the error names the one at fault.
    pub fn validate(&self) -> std::result::Result<(), (&'static str, String)> {
        if !(self.w_min.is_finite() && self.w_max.is_finite() && self.w_min <= self.w_max) {
            return Err((
                "distill.w_min",
                format!(
                    "the range [{}, {}] must be finite and ordered",
                    self.w_min, self.w_max
                ),
            ));
        }
        if self.w_min < 0.0 {
            return Err(("distill.w_min", format!("must be >= 0, got {}", self.w_min)));
        }
        match (self.stage, self.student_steps) {
            (DistillStage::Progressive, None | Some(0)) => Err((
                "distill.student_steps",
                "progressive distillation needs the student's steps (at least 1)".into(),
            )),
            (DistillStage::Guidance, Some(_)) => Err((
                "distill.student_steps",
                "the guidance stage has no step count (any sampler samples its student)".into(),
            )),
            _ => Ok(()),
        }
    }
}

fn bad_teacher(path: &Path, reason: String) -> TrainError {
    TrainError::Checkpoint {
        path: path.to_path_buf(),
        reason: format!("as a distillation teacher: {reason}"),
    }
}

/// A teacher file's bytes (read once: hashed and parsed from the same copy).
fn read_teacher(path: &Path) -> Result<Vec<u8>> {
    ddpm_unet::file::read_bytes(path).map_err(|e| bad_teacher(path, e.to_string()))
}

/// The SHA-256 of some bytes, as lowercase hex.
pub fn sha256_hex(bytes: &[u8]) -> String {
    Sha256::digest(bytes)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// A loaded teacher: its EMA network, card and weights by name.
#[derive(Debug, Clone)]
pub struct Teacher {
    /// The network.
    pub net: UNet,
    /// Its card.
    pub card: ModelCard,
    /// Its weights by name (copied into a fresh student).
    pub weights: std::collections::HashMap<String, Tensor>,
}

impl Teacher {
    /// Loads the teacher of `cfg` onto `device`, checking that it is the file the run started
    /// from, that it predicts ε, is class-conditional, and suits the stage.
    pub fn load(cfg: &DistillConfig, device: &Device) -> Result<Self> {
        let path = &cfg.teacher;
        let bytes = read_teacher(path)?;
        let sha = sha256_hex(&bytes);
        if sha != cfg.teacher_sha256 {
            return Err(bad_teacher(
                path,
                format!(
                    "has changed since the distillation started (SHA-256 {sha}, expected {}): \
                     restore that file or start a new distillation",
                    cfg.teacher_sha256
                ),
            ));
        }
        let file = ddpm_unet::file::from_bytes(&bytes, path, device)
            .map_err(|e| bad_teacher(path, e.to_string()))?;
        drop(bytes);
        let card = file.card.clone();
        if card.prediction != Prediction::Epsilon {
            return Err(bad_teacher(
                path,
                "predicts v; distillation takes ε-prediction teachers".into(),
            ));
        }
        if card.model.num_classes == 0 {
            return Err(bad_teacher(
                path,
                "is unconditional: there is no guidance to distil".into(),
            ));
        }
        match (cfg.stage, card.model.guidance_embedding) {
            (DistillStage::Guidance, true) => {
                return Err(bad_teacher(
                    path,
                    "already takes w as an input: it is a student; distil it progressively".into(),
                ))
            }
            (DistillStage::Progressive, false) => {
                return Err(bad_teacher(
                    path,
                    "does not take w as an input: run the guidance stage on it first".into(),
                ))
            }
            _ => {}
        }
        let weights = file
            .weights(Weights::Ema)
            .map_err(|e| bad_teacher(path, e.to_string()))?;
        let net = file
            .unet(Weights::Ema, device)
            .map_err(|e| bad_teacher(path, e.to_string()))?;
        Ok(Self { net, card, weights })
    }

    /// The student's card: the teacher's, with the guidance embedding and the account of the
    /// distillation.
    pub fn student_card(&self, cfg: &DistillConfig) -> ModelCard {
        let mut card = self.card.clone();
        card.model.guidance_embedding = true;
        let name = cfg
            .teacher
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        card.distilled = Some(Distillation {
            stage: cfg.stage,
            steps: cfg.student_steps,
            w_min: cfg.w_min,
            w_max: cfg.w_max,
            teacher: name,
            teacher_sha256: cfg.teacher_sha256.clone(),
        });
        card
    }

    /// Sets every student variable the teacher has (same name and shape) to the teacher's
    /// weight; the others (the guidance embedding, new in stage 1) keep their initial values.
    pub fn copy_into(&self, vars: &[(String, Var)]) -> Result<usize> {
        let mut copied = 0;
        for (name, var) in vars {
            if let Some(w) = self.weights.get(name) {
                if w.shape() == var.shape() {
                    var.set(&w.to_dtype(DType::F32)?.to_device(var.device())?)?;
                    copied += 1;
                }
            }
        }
        Ok(copied)
    }
}

/// A network that predicts ε at per-sample guidance weights `w` (`[B]` f32): a
/// w-conditioned student, the teacher of progressive distillation.
pub trait GuidedTeacher {
    /// ε̂(x_t, t, c; w).
    fn eps_at(
        &self,
        x_t: &Tensor,
        t: &Tensor,
        labels: Option<&Tensor>,
        w: &Tensor,
    ) -> candle_core::Result<Tensor>;
}

impl GuidedTeacher for UNet {
    fn eps_at(
        &self,
        x_t: &Tensor,
        t: &Tensor,
        labels: Option<&Tensor>,
        w: &Tensor,
    ) -> candle_core::Result<Tensor> {
        self.forward_w(x_t, t, labels, Some(w), false)
    }
}

/// Stage 1's target: (1 + w)·ε(x, t, c) − w·ε(x, t, ∅) per sample from one batched forward
/// pass of `teacher` on the conditional and unconditional halves (`w`: `[B]` f32).
pub fn guidance_target(
    teacher: &dyn Denoiser,
    x_t: &Tensor,
    t: &Tensor,
    labels: &Tensor,
    w: &Tensor,
) -> candle_core::Result<Tensor> {
    let b = x_t.dim(0)?;
    let null = teacher
        .null_class()
        .ok_or_else(|| candle_core::Error::Msg("the teacher is unconditional".into()))?;
    let nulls = ddpm_core::null_labels(null, b, labels.device())?;
    let pair = teacher.predict_noise(
        &Tensor::cat(&[x_t, x_t], 0)?,
        &Tensor::cat(&[t, t], 0)?,
        Some(&Tensor::cat(&[&labels.to_dtype(DType::U32)?, &nulls], 0)?),
    )?;
    let (cond, uncond) = (pair.narrow(0, 0, b)?, pair.narrow(0, b, b)?);
    let w = w.to_dtype(cond.dtype())?.reshape((b, 1, 1, 1))?;
    cond.broadcast_add(&(cond.broadcast_sub(&uncond)?.broadcast_mul(&w)?))
}

/// Per-sample `[B, 1, 1, 1]` values of `f(ᾱ)` at timesteps `ts` (`None`: clean data, ᾱ = 1).
fn column_of(
    ac: &[f64],
    ts: &[Option<u32>],
    f: impl Fn(f64) -> f64,
    device: &Device,
) -> candle_core::Result<Tensor> {
    let v: Vec<f32> = ts
        .iter()
        .map(|t| f(t.map_or(1.0, |t| ac[t as usize])) as f32)
        .collect();
    Tensor::from_vec(v, (ts.len(), 1, 1, 1), device)
}

/// One deterministic DDIM step per sample from `z` at `from` to `to` (`None`: clean data) with
/// the noise prediction `eps`: x̂₀ = (z − σ_a·ε)/α_a (clipped to [−1, 1] when `clip`, with ε
/// made consistent), then α_c·x̂₀ + σ_c·ε.
pub fn ddim_steps(
    schedule: &Schedule,
    z: &Tensor,
    eps: &Tensor,
    from: &[u32],
    to: &[Option<u32>],
    clip: bool,
) -> candle_core::Result<Tensor> {
    let ac = schedule.alphas_cumprod();
    let dev = z.device();
    let from_o: Vec<Option<u32>> = from.iter().map(|&t| Some(t)).collect();
    let a_a = column_of(ac, &from_o, f64::sqrt, dev)?;
    let s_a = column_of(ac, &from_o, |a| (1.0 - a).sqrt(), dev)?;
    let a_c = column_of(ac, to, f64::sqrt, dev)?;
    let s_c = column_of(ac, to, |a| (1.0 - a).sqrt(), dev)?;
    let mut x0 = z
        .broadcast_sub(&eps.broadcast_mul(&s_a)?)?
        .broadcast_div(&a_a)?;
    let mut e = eps.clone();
    if clip {
        x0 = x0.clamp(-1f32, 1f32)?;
        e = z
            .broadcast_sub(&x0.broadcast_mul(&a_a)?)?
            .broadcast_div(&s_a)?;
    }
    x0.broadcast_mul(&a_c)?
        .broadcast_add(&e.broadcast_mul(&s_c)?)
}

/// Stage 2's target: the state the teacher reaches from `z_a` (at `a`) in two clipped DDIM
/// steps, `a → b → c` (`c` `None`: clean data, where the state is the teacher's x̂₀ at `b`).
#[allow(clippy::too_many_arguments)]
pub fn progressive_target(
    teacher: &dyn GuidedTeacher,
    schedule: &Schedule,
    z_a: &Tensor,
    a: &[u32],
    b: &[u32],
    c: &[Option<u32>],
    labels: Option<&Tensor>,
    w: &Tensor,
) -> candle_core::Result<Tensor> {
    let dev = z_a.device();
    let ta = Tensor::new(a, dev)?;
    let eps_a = teacher.eps_at(z_a, &ta, labels, w)?;
    let b_o: Vec<Option<u32>> = b.iter().map(|&t| Some(t)).collect();
    let z_b = ddim_steps(schedule, z_a, &eps_a, a, &b_o, true)?;
    let tb = Tensor::new(b, dev)?;
    let eps_b = teacher.eps_at(&z_b, &tb, labels, w)?;
    ddim_steps(schedule, &z_b, &eps_b, b, c, true)
}

/// The 2N-step teacher grid of an N-step student: trailing spacing, which nests (the
/// student's step i runs from the grid's point 2i to point 2i + 2).
pub fn teacher_grid(schedule: &Schedule, student_steps: usize) -> candle_core::Result<Vec<usize>> {
    let two = student_steps
        .checked_mul(2)
        .ok_or_else(|| candle_core::Error::Msg("student steps overflow".into()))?;
    ddpm_sampler::spaced_timesteps(schedule, two, ddpm_sampler::Spacing::Trailing)
}

/// A progressive batch's teacher steps: the middle timesteps b and the ends c.
type Halves = (Vec<u32>, Vec<Option<u32>>);

/// One distillation batch drawn from `rng` and the loss of the student's output on it.
pub(crate) struct DistillBatch {
    pub x_in: Tensor,
    pub t: Tensor,
    pub labels: Option<Tensor>,
    pub w: Tensor,
    target: Tensor,
    /// Stage 2: the student's step, from `a` to `c`.
    progressive: Option<(Vec<u32>, Vec<Option<u32>>)>,
}

impl DistillBatch {
    /// Draws (in this order from `rng`) the timesteps (stage 1) or grid steps (stage 2), the
    /// noise, the weights w and the class dropout, and computes the teacher's target.
    pub(crate) fn draw(
        cfg: &DistillConfig,
        teacher: &Teacher,
        schedule: &Schedule,
        x0: &Tensor,
        labels: &Tensor,
        p_uncond: f64,
        rng: &mut SeededNoise,
    ) -> candle_core::Result<Self> {
        use ddpm_core::NoiseSource;
        let b = x0.dim(0)?;
        let dev = x0.device();
        let t_total = schedule.num_train_timesteps();
        let (a, progressive): (Vec<u32>, Option<Halves>) = match cfg.student_steps {
            None => (rng.uniform_u32(b, t_total as u32), None),
            Some(n) => {
                let grid = teacher_grid(schedule, n)?;
                let n = grid.len() / 2;
                let idx = rng.uniform_u32(b, n as u32);
                let at = |i: usize| grid.get(i).map(|&t| t as u32);
                let a: Vec<u32> = idx.iter().map(|&i| grid[2 * i as usize] as u32).collect();
                let bb: Vec<u32> = idx
                    .iter()
                    .map(|&i| grid[2 * i as usize + 1] as u32)
                    .collect();
                let c: Vec<Option<u32>> = idx.iter().map(|&i| at(2 * i as usize + 2)).collect();
                (a, Some((bb, c)))
            }
        };
        let noise = rng.randn(x0.shape(), DType::F32, dev)?;
        let span = cfg.w_max - cfg.w_min;
        let w: Vec<f32> = rng
            .uniform_f32(b)
            .into_iter()
            .map(|u| (cfg.w_min + span * u as f64) as f32)
            .collect();
        let w = Tensor::from_vec(w, b, dev)?;
        let null = teacher.card.model.num_classes as u32;
        let u = rng.uniform_f32(b);
        let mut l: Vec<u32> = labels.to_dtype(DType::U32)?.to_vec1()?;
        if l.len() != b {
            candle_core::bail!("{} labels for a batch of {b} images", l.len());
        }
        for (li, ui) in l.iter_mut().zip(u) {
            if (ui as f64) < p_uncond {
                *li = null;
            }
        }
        let labels = Tensor::from_vec(l, b, dev)?;
        let x_in = schedule.add_noise_from_host(x0, &noise, &a)?;
        let t = Tensor::new(a.as_slice(), dev)?;
        let (target, progressive) = match progressive {
            None => (guidance_target(&teacher.net, &x_in, &t, &labels, &w)?, None),
            Some((bb, c)) => {
                let target = progressive_target(
                    &teacher.net,
                    schedule,
                    &x_in,
                    &a,
                    &bb,
                    &c,
                    Some(&labels),
                    &w,
                )?;
                (target, Some((a, c)))
            }
        };
        Ok(Self {
            x_in,
            t,
            labels: Some(labels),
            w,
            target: target.detach(),
            progressive,
        })
    }

    /// The loss of the student's output (its ε at `x_in`): stage 1, the ε-MSE against the
    /// guided target; stage 2, the MSE of the state its one DDIM step reaches.
    pub(crate) fn loss(&self, schedule: &Schedule, out: &Tensor) -> candle_core::Result<Tensor> {
        match &self.progressive {
            None => candle_nn::loss::mse(out, &self.target),
            Some((a, c)) => {
                let z_c = ddim_steps(schedule, &self.x_in, out, a, c, false)?;
                candle_nn::loss::mse(&z_c, &self.target)
            }
        }
    }
}

/// One stage of a whole distillation ([`DistillPlan::stages`]).
#[derive(Debug, Clone, PartialEq)]
pub struct Stage {
    /// `guidance`, or `steps-N` for the progressive student of N steps.
    pub name: String,
    /// Its run folder (checkpoint, metrics, grids).
    pub out: PathBuf,
    /// Its teacher's model file.
    pub teacher: PathBuf,
    /// `None`: the guidance stage; `Some(N)`: the progressive student of N steps.
    pub student_steps: Option<usize>,
}

/// A whole distillation, `ddpm distill`: the guidance stage from `teacher`, then progressive
/// halvings from `from_steps / 2` down to `to_steps`, each in its own folder under `out` and
/// each the teacher of the next. Every stage is an ordinary training run of `stage_config`
/// (its steps or budget per stage), resumable where it stopped.
#[derive(Debug, Clone, PartialEq)]
pub struct DistillPlan {
    /// The guided teacher (a class-conditional ε-prediction model file).
    pub teacher: PathBuf,
    /// The folder the stages go under.
    pub out: PathBuf,
    /// The lowest guidance weight the students learn.
    pub w_min: f64,
    /// The highest.
    pub w_max: f64,
    /// The DDIM steps the guidance student is taken to sample in when the first halving starts
    /// (that halving's teacher runs this many steps).
    pub from_steps: usize,
    /// The last student's steps (a power-of-two fraction of `from_steps`).
    pub to_steps: usize,
    /// The options of every stage (batch, learning rate, steps or budget, EMA, seed).
    pub stage_config: crate::TrainConfig,
}

impl DistillPlan {
    /// The stages, in order. Fails unless `to_steps` is `from_steps` halved at least once.
    pub fn stages(&self) -> Result<Vec<Stage>> {
        let bad = |field: &'static str, reason: String| Err(TrainError::Option { field, reason });
        if self.to_steps == 0 || self.from_steps < 2 * self.to_steps {
            return bad(
                "to_steps",
                format!(
                    "the halvings run from {} steps down to {}: give to_steps >= 1 and at most half of from_steps",
                    self.from_steps, self.to_steps
                ),
            );
        }
        let mut n = self.from_steps;
        let mut halvings = Vec::new();
        while n > self.to_steps {
            if !n.is_multiple_of(2) {
                return bad(
                    "from_steps",
                    format!(
                        "{} halves to an odd {n} before reaching {}: give a power-of-two multiple of to_steps",
                        self.from_steps, self.to_steps
                    ),
                );
            }
            n /= 2;
            halvings.push(n);
        }
        if n != self.to_steps {
            return bad(
                "to_steps",
                format!(
                    "{} does not halve down to {}",
                    self.from_steps, self.to_steps
                ),
            );
        }
        let mut stages = vec![Stage {
            name: "guidance".into(),
            out: self.out.join("guidance"),
            teacher: self.teacher.clone(),
            student_steps: None,
        }];
        for n in halvings {
            let teacher = crate::checkpoint_path(&stages[stages.len() - 1].out);
            stages.push(Stage {
                name: format!("steps-{n}"),
                out: self.out.join(format!("steps-{n}")),
                teacher,
                student_steps: Some(n),
            });
        }
        Ok(stages)
    }

    /// The trainer of `stage`: resumed from its checkpoint when there is one (the stage's
    /// options then come from it, except `max_steps`, which this plan may raise), else a new
    /// student of its teacher. The second value says whether it resumed.
    pub fn trainer(&self, stage: &Stage, device: &Device) -> Result<(crate::Trainer, bool)> {
        let ckpt = crate::checkpoint_path(&stage.out);
        if ckpt.exists() {
            let max = self.stage_config.max_steps;
            let t = crate::Trainer::resume(&ckpt, device, |c| {
                if let Some(m) = max {
                    c.max_steps = Some(m);
                }
            })?;
            return Ok((t, true));
        }
        let d = match stage.student_steps {
            None => DistillConfig::guidance(&stage.teacher, self.w_min, self.w_max)?,
            Some(n) => DistillConfig::progressive(&stage.teacher, n)?,
        };
        let teacher = Teacher::load(&d, device)?;
        let card = teacher.student_card(&d);
        let mut config = self.stage_config.clone();
        config.sample_guidance = config.sample_guidance.clamp(d.w_min, d.w_max);
        config.distill = Some(d);
        Ok((crate::Trainer::new(card, config, device)?, false))
    }
}

/// The training examples a distillation draws its noised inputs from: the split `card`'s
/// dataset names, loaded from `dir` (`None`: ddpm-data finds it), on `device`.
pub fn data_for(card: &ModelCard, dir: Option<&Path>, device: &Device) -> Result<crate::FitData> {
    let kind: ddpm_data::DatasetKind = card.data.dataset.parse().map_err(TrainError::Config)?;
    let size = (card.data.height as u32, card.data.width as u32);
    let train = ddpm_data::load_dataset_limited(&kind, dir, ddpm_data::Split::Train, size, None)?;
    crate::FitData::new(&train, None, device)
}
