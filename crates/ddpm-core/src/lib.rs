//! Traits and tensor conventions shared by every `ddpm-*` crate.
//!
//! The crates of the workspace compose through three small, object-safe traits:
//!
//! * [`NoiseSchedule`]: the β schedule and the forward process q(x_t | x_0);
//! * [`Denoiser`]: a network (or a wrapper such as classifier-free guidance) that maps
//!   (x_t, t, y) to the predicted noise ε;
//! * [`NoiseSource`]: where Gaussian noise comes from, so that a seed gives the same
//!   samples on every device.
//!
//! # Tensor conventions
//!
//! | tensor | shape | dtype | range |
//! |---|---|---|---|
//! | images `x_0`, `x_t` | `[B, C, H, W]` | f32 | `[-1, 1]` for data |
//! | timesteps `t` | `[B]` | u32 | `0..T` (0 is the least noisy step) |
//! | labels `y` | `[B]` | u32 | `0..num_classes`; `num_classes` is the null class |
//!
//! # Example
//!
//! ```
//! use candle_core::{DType, Device, Shape};
//! use ddpm_core::{NoiseSource, SeededNoise};
//!
//! let mut a = SeededNoise::new(7);
//! let mut b = SeededNoise::new(7);
//! let shape = Shape::from((2, 1, 4, 4));
//! let x = a.randn(&shape, DType::F32, &Device::Cpu)?;
//! let y = b.randn(&shape, DType::F32, &Device::Cpu)?;
//! assert_eq!(x.dims(), &[2, 1, 4, 4]);
//! assert_eq!(x.flatten_all()?.to_vec1::<f32>()?, y.flatten_all()?.to_vec1::<f32>()?);
//! # Ok::<(), candle_core::Error>(())
//! ```

pub mod files;
pub mod memory;

use candle_core::{DType, Device, Result, Shape, Tensor};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use rand_distr::StandardNormal;
use serde::{Deserialize, Serialize};

/// A discrete-time noise schedule: β_1..β_T and the forward process q(x_t | x_0).
///
/// Index `t` runs over `0..T`; index 0 is the first (least noisy) diffusion step, so
/// `alphas_cumprod()[0] = 1 − β_0`.
pub trait NoiseSchedule: Send + Sync {
    /// Number of training timesteps T.
    fn num_train_timesteps(&self) -> usize;
    /// β_t for t in `0..T`, in f64.
    fn betas(&self) -> &[f64];
    /// ᾱ_t = ∏_{s ≤ t} (1 − β_s) for t in `0..T`, in f64.
    fn alphas_cumprod(&self) -> &[f64];
    /// Samples q(x_t | x_0) = √ᾱ_t·x_0 + √(1−ᾱ_t)·ε with one `t` per sample.
    ///
    /// `x0` and `noise` are `[B, ...]`, `t` is `[B]` u32 with values in `0..T`.
    fn add_noise(&self, x0: &Tensor, noise: &Tensor, t: &Tensor) -> Result<Tensor>;
}

/// Which variance σ²_t the DDPM reverse step uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PosteriorVariance {
    /// σ²_t = β_t ("fixed large", the upper bound of Ho et al. 2020).
    Beta,
    /// σ²_t = β̃_t = β_t (1 − ᾱ_{t−1}) / (1 − ᾱ_t) ("fixed small", the true posterior variance).
    #[default]
    BetaTilde,
}

impl PosteriorVariance {
    /// The variance σ²_t of the reverse step p(x_{t−1} | x_t) at 0-based timestep `t`, given
    /// β_t and β̃_t ([`Posterior::variance`]). At t = 0, the last step, it is 0 for both
    /// choices: the step returns the posterior mean without noise (Ho et al. 2020,
    /// Algorithm 2: z = 0 at their t = 1).
    pub fn sigma2(self, t: usize, beta: f64, beta_tilde: f64) -> f64 {
        match self {
            _ if t == 0 => 0.0,
            PosteriorVariance::Beta => beta,
            PosteriorVariance::BetaTilde => beta_tilde,
        }
    }
}

/// The forward-process posterior q(x_{t−1} | x_t, x_0) = N(c_x0·x_0 + c_xt·x_t, β̃_t) at one
/// timestep (Ho et al. 2020, eq. 6–7): the one place its terms are written. The schedule's
/// tables and the DDPM sampler both come from here.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Posterior {
    /// c_x0 = β_t·√ᾱ_{t−1} / (1 − ᾱ_t).
    pub coef_x0: f64,
    /// c_xt = (1 − ᾱ_{t−1})·√α_t / (1 − ᾱ_t).
    pub coef_xt: f64,
    /// β̃_t = β_t·(1 − ᾱ_{t−1}) / (1 − ᾱ_t) (0 at t = 0, where ᾱ_{t−1} = 1).
    pub variance: f64,
}

impl Posterior {
    /// The terms from β_t, ᾱ_t and ᾱ_{t−1} (1 for t = 0).
    pub fn new(beta: f64, alpha_bar: f64, alpha_bar_prev: f64) -> Self {
        Self {
            coef_x0: beta * alpha_bar_prev.sqrt() / (1.0 - alpha_bar),
            coef_xt: (1.0 - alpha_bar_prev) * (1.0 - beta).sqrt() / (1.0 - alpha_bar),
            variance: beta * (1.0 - alpha_bar_prev) / (1.0 - alpha_bar),
        }
    }
}

/// What a network's output means (its parameterisation). Samplers always work with ε; a
/// network trained for another target is turned into an ε-predictor by
/// `ddpm_sampler::Parameterized`.
///
/// With x_t = √ᾱ_t·x_0 + √(1−ᾱ_t)·ε:
///
/// * ε-prediction (Ho et al. 2020) regresses ε;
/// * v-prediction (Salimans & Ho 2022) regresses v = √ᾱ_t·ε − √(1−ᾱ_t)·x_0, from which
///   ε = √ᾱ_t·v + √(1−ᾱ_t)·x_t and x_0 = √ᾱ_t·x_t − √(1−ᾱ_t)·v.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
#[cfg_attr(feature = "clap", derive(clap::ValueEnum))]
pub enum Prediction {
    /// The network predicts the noise ε.
    #[default]
    Epsilon,
    /// The network predicts the velocity v = √ᾱ_t·ε − √(1−ᾱ_t)·x_0.
    V,
}

impl Prediction {
    /// The name used by flags and model cards: `epsilon` or `v`.
    pub fn name(&self) -> &'static str {
        match self {
            Self::Epsilon => "epsilon",
            Self::V => "v",
        }
    }
    /// Parses [`Prediction::name`] (`eps` also accepted).
    pub fn from_name(s: &str) -> Option<Self> {
        match s {
            "epsilon" | "eps" => Some(Self::Epsilon),
            "v" => Some(Self::V),
            _ => None,
        }
    }
    /// The regression target for x_0, ε and the coefficients a = √ᾱ_t, s = √(1−ᾱ_t) of one
    /// sample: ε, or a·ε − s·x_0.
    pub fn target(&self, x0: f64, eps: f64, a: f64, s: f64) -> f64 {
        match self {
            Self::Epsilon => eps,
            Self::V => a * eps - s * x0,
        }
    }
}

impl std::fmt::Display for Prediction {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// A noise-prediction network ε_θ(x_t, t, y).
pub trait Denoiser {
    /// Predicts the noise in `x_t` (`[B,C,H,W]` f32) at timesteps `t` (`[B]` u32).
    ///
    /// `labels` is `[B]` u32; the null class ([`Denoiser::null_class`]) asks for the
    /// unconditional prediction. `None` means unconditional for every sample.
    fn predict_noise(&self, x_t: &Tensor, t: &Tensor, labels: Option<&Tensor>) -> Result<Tensor>;
    /// The label that means "no class" (classifier-free guidance), `None` for an
    /// unconditional model.
    fn null_class(&self) -> Option<u32>;
    /// For classifier-free guidance: the conditional and unconditional predictions of one
    /// batched forward pass, stacked as `[2B, C, H, W]` (the `B` conditional ones first), with
    /// the guidance weight w, so a sampler can combine them inside its own update, in the same
    /// pass (see `ddpm_sampler::Sampler::step_guided`).
    ///
    /// `None`, the default, means "call [`Denoiser::predict_noise`]": a plain network, or a
    /// guidance wrapper with nothing to combine (w = 0, no labels).
    fn predict_guidance_pair(
        &self,
        x_t: &Tensor,
        t: &Tensor,
        labels: Option<&Tensor>,
    ) -> Result<Option<GuidancePair>> {
        let _ = (x_t, t, labels);
        Ok(None)
    }
    /// Whether the network takes the guidance weight w as an input (a guidance-distilled
    /// student): then guidance costs one call per step, [`Denoiser::predict_noise_at`],
    /// instead of classifier-free guidance's conditional and unconditional pair.
    fn takes_guidance(&self) -> bool {
        false
    }
    /// The guided prediction ε̂ at weight `w` in one call, for a network that
    /// [`Denoiser::takes_guidance`]. The default refuses.
    fn predict_noise_at(
        &self,
        x_t: &Tensor,
        t: &Tensor,
        labels: Option<&Tensor>,
        w: f64,
    ) -> Result<Tensor> {
        let _ = (x_t, t, labels);
        candle_core::bail!("this network does not take the guidance weight (w = {w}) as an input")
    }
}

/// The two halves classifier-free guidance combines as ε̂ = (1 + w)·ε_cond − w·ε_uncond
/// (the combination itself is `ddpm_kernels::guidance_combine`, the formula's one source;
/// the samplers fold it into their fused step).
#[derive(Debug, Clone)]
pub struct GuidancePair {
    /// `[2B, …]`: ε(x, t, c) for the `B` samples, then ε(x, t, ∅).
    pub pair: Tensor,
    /// The guidance weight w.
    pub w: f64,
}

impl<D: Denoiser + ?Sized> Denoiser for &D {
    fn predict_noise(&self, x_t: &Tensor, t: &Tensor, labels: Option<&Tensor>) -> Result<Tensor> {
        (**self).predict_noise(x_t, t, labels)
    }
    fn null_class(&self) -> Option<u32> {
        (**self).null_class()
    }
    fn predict_guidance_pair(
        &self,
        x_t: &Tensor,
        t: &Tensor,
        labels: Option<&Tensor>,
    ) -> Result<Option<GuidancePair>> {
        (**self).predict_guidance_pair(x_t, t, labels)
    }
    fn takes_guidance(&self) -> bool {
        (**self).takes_guidance()
    }
    fn predict_noise_at(
        &self,
        x_t: &Tensor,
        t: &Tensor,
        labels: Option<&Tensor>,
        w: f64,
    ) -> Result<Tensor> {
        (**self).predict_noise_at(x_t, t, labels, w)
    }
}

impl<D: Denoiser + ?Sized> Denoiser for Box<D> {
    fn predict_noise(&self, x_t: &Tensor, t: &Tensor, labels: Option<&Tensor>) -> Result<Tensor> {
        (**self).predict_noise(x_t, t, labels)
    }
    fn null_class(&self) -> Option<u32> {
        (**self).null_class()
    }
    fn predict_guidance_pair(
        &self,
        x_t: &Tensor,
        t: &Tensor,
        labels: Option<&Tensor>,
    ) -> Result<Option<GuidancePair>> {
        (**self).predict_guidance_pair(x_t, t, labels)
    }
    fn takes_guidance(&self) -> bool {
        (**self).takes_guidance()
    }
    fn predict_noise_at(
        &self,
        x_t: &Tensor,
        t: &Tensor,
        labels: Option<&Tensor>,
        w: f64,
    ) -> Result<Tensor> {
        (**self).predict_noise_at(x_t, t, labels, w)
    }
}

/// A source of standard Gaussian noise.
pub trait NoiseSource {
    /// Draws a tensor of i.i.d. N(0, 1) values of the given shape, dtype and device.
    fn randn(&mut self, shape: &Shape, dtype: DType, device: &Device) -> Result<Tensor>;
}

/// Gaussian noise drawn on the host from a seeded ChaCha8 generator and copied to the
/// device: the same seed gives the same numbers on CPU and GPU (candle's own CPU RNG
/// cannot be seeded).
#[derive(Debug, Clone)]
pub struct SeededNoise {
    rng: ChaCha8Rng,
}

/// The complete state of a [`SeededNoise`], for exact resume.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct NoiseState {
    /// The 32-byte seed.
    pub seed: [u8; 32],
    /// The ChaCha stream.
    pub stream: u64,
    /// The position in the stream, in 32-bit words.
    pub word_pos: u128,
}

impl SeededNoise {
    /// A generator seeded from a `u64`.
    pub fn new(seed: u64) -> Self {
        Self {
            rng: ChaCha8Rng::seed_from_u64(seed),
        }
    }

    /// The generator's state; [`SeededNoise::from_state`] continues exactly from here.
    pub fn state(&self) -> NoiseState {
        NoiseState {
            seed: self.rng.get_seed(),
            stream: self.rng.get_stream(),
            word_pos: self.rng.get_word_pos(),
        }
    }

    /// Restores a generator saved with [`SeededNoise::state`].
    pub fn from_state(state: NoiseState) -> Self {
        let mut rng = ChaCha8Rng::from_seed(state.seed);
        rng.set_stream(state.stream);
        rng.set_word_pos(state.word_pos);
        Self { rng }
    }

    /// Draws `n` standard normal f32 values on the host.
    pub fn randn_vec(&mut self, n: usize) -> Vec<f32> {
        (0..n)
            .map(|_| self.rng.sample::<f32, _>(StandardNormal))
            .collect()
    }

    /// Draws `n` integers uniformly from `0..high` (e.g. timesteps). `high` must be > 0.
    pub fn uniform_u32(&mut self, n: usize, high: u32) -> Vec<u32> {
        (0..n)
            .map(|_| self.rng.random_range(0..high.max(1)))
            .collect()
    }

    /// Draws `n` uniform f32 values in `[0, 1)`.
    pub fn uniform_f32(&mut self, n: usize) -> Vec<f32> {
        (0..n).map(|_| self.rng.random::<f32>()).collect()
    }
}

impl NoiseSource for SeededNoise {
    fn randn(&mut self, shape: &Shape, dtype: DType, device: &Device) -> Result<Tensor> {
        let data = self.randn_vec(shape.elem_count());
        Tensor::from_vec(data, shape.clone(), &Device::Cpu)?
            .to_dtype(dtype)?
            .to_device(device)
    }
}

/// The environment variable that makes [`write_atomic`] and [`append_durable`] fail as a full
/// disk would (`ENOSPC`, after writing part of the data): the fault-injection tests use it where
/// they cannot mount a small tmpfs. Any non-empty value but `0` turns it on.
pub const FAULT_FULL_DISK_ENV: &str = "DDPM_FAULT_FULL_DISK";

fn full_disk_injected() -> bool {
    std::env::var_os(FAULT_FULL_DISK_ENV).is_some_and(|v| !v.is_empty() && v != "0")
}

/// Writes `buf`, or, under [`FAULT_FULL_DISK_ENV`], half of it and then fails as a full disk.
fn write_checked(f: &mut std::fs::File, buf: &[u8]) -> std::io::Result<()> {
    use std::io::Write;
    if full_disk_injected() {
        f.write_all(&buf[..buf.len() / 2])?;
        return Err(std::io::Error::new(
            std::io::ErrorKind::StorageFull,
            format!("no space left on device (injected by {FAULT_FULL_DISK_ENV})"),
        ));
    }
    f.write_all(buf)
}

/// Writes `bytes` to `path` without ever leaving a partial file there: into a temp file in the
/// same folder whose name is unique to this process and call, fsynced, then renamed over
/// `path`, and the folder fsynced (creating parent folders). `path` is afterwards either its old
/// contents or the complete new ones. On any error (a full disk included) the temp file is
/// removed, the previous file is left as it was, and the error is returned.
///
/// ```
/// let dir = std::env::temp_dir().join(format!("write-atomic-doc-{}", std::process::id()));
/// let path = dir.join("a.txt");
/// ddpm_core::write_atomic(&path, b"new")?;
/// assert_eq!(std::fs::read(&path)?, b"new");
/// // Only the file itself is left: no temp file.
/// assert_eq!(std::fs::read_dir(&dir)?.count(), 1);
/// # std::fs::remove_dir_all(&dir)?;
/// # Ok::<(), std::io::Error>(())
/// ```
pub fn write_atomic(path: &std::path::Path, bytes: &[u8]) -> std::io::Result<()> {
    use std::sync::atomic::{AtomicU64, Ordering};
    static CALLS: AtomicU64 = AtomicU64::new(0);
    if path.is_dir() {
        return Err(std::io::Error::new(
            std::io::ErrorKind::IsADirectory,
            "is a directory: give a file path",
        ));
    }
    let name = path.file_name().ok_or_else(|| {
        std::io::Error::new(
            std::io::ErrorKind::InvalidInput,
            "the path has no file name",
        )
    })?;
    let parent = path
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(std::path::Path::new("."));
    std::fs::create_dir_all(parent)?;
    let mut tmp_name = std::ffi::OsString::from(".");
    tmp_name.push(name);
    tmp_name.push(format!(
        ".{}.{}.tmp",
        std::process::id(),
        CALLS.fetch_add(1, Ordering::Relaxed)
    ));
    let tmp = parent.join(tmp_name);
    let result = (|| {
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(&tmp)?;
        write_checked(&mut f, bytes)?;
        f.sync_all()?;
        drop(f);
        std::fs::rename(&tmp, path)?;
        sync_dir(parent);
        Ok(())
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result
}

/// Appends `bytes` to `path` (creating it), then fsyncs it. Under [`FAULT_FULL_DISK_ENV`] it
/// fails as a full disk would. For logs such as `metrics.jsonl`, where each record is one
/// short line: a failed append is reported, never silent.
pub fn append_durable(path: &std::path::Path, bytes: &[u8]) -> std::io::Result<()> {
    let mut f = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)?;
    write_checked(&mut f, bytes)?;
    f.sync_data()
}

/// Best-effort fsync of a folder, so that a rename in it survives a power cut (Unix only; an
/// error here cannot lose data that the rename has not already made visible).
fn sync_dir(dir: &std::path::Path) {
    #[cfg(unix)]
    if let Ok(d) = std::fs::File::open(dir) {
        let _ = d.sync_all();
    }
    #[cfg(not(unix))]
    let _ = dir;
}

/// Fails, naming `what`, if `t` holds any NaN or infinite value: generated samples are checked
/// with it before they are written, so that a diverged model or an absurd guidance weight gives
/// an error instead of a black picture.
///
/// ```
/// use candle_core::{Device, Tensor};
/// let ok = Tensor::new(&[0.5f32, -1.0], &Device::Cpu)?;
/// ddpm_core::ensure_finite(&ok, "samples")?;
/// let bad = Tensor::new(&[0.5f32, f32::NAN, f32::INFINITY], &Device::Cpu)?;
/// let err = ddpm_core::ensure_finite(&bad, "samples").unwrap_err().to_string();
/// assert!(err.contains("2 of 3"), "{err}");
/// # Ok::<(), candle_core::Error>(())
/// ```
pub fn ensure_finite(t: &Tensor, what: &str) -> Result<()> {
    finite_values(t, what).map(|_| ())
}

/// The values of `t` as f32, read to the host once, after the check of [`ensure_finite`].
pub fn finite_values(t: &Tensor, what: &str) -> Result<Vec<f32>> {
    let v: Vec<f32> = t.to_dtype(DType::F32)?.flatten_all()?.to_vec1()?;
    let bad = v.iter().filter(|x| !x.is_finite()).count();
    if bad > 0 {
        candle_core::bail!(
            "{what}: {bad} of {} values are not finite (NaN or infinite): the model's weights \
             or the guidance weight are out of range, so nothing was written",
            v.len()
        )
    }
    Ok(v)
}

/// `[N, C, H, W]` images in `[-1, 1]` as bytes in `0..=255` (same layout):
/// `round((x + 1)·127.5)` after clamping, the one mapping every picture, sample file and the
/// web page use. Fails on any non-finite value, so a diverged model gives an error instead of a
/// black picture.
///
/// ```
/// use candle_core::{Device, Tensor};
/// let x = Tensor::new(&[-2f32, -1.0, 0.0, 0.5, 1.0], &Device::Cpu)?;
/// assert_eq!(ddpm_core::to_u8(&x)?, vec![0, 0, 128, 191, 255]);
/// assert!(ddpm_core::to_u8(&Tensor::new(&[f32::NAN], &Device::Cpu)?).is_err());
/// # Ok::<(), candle_core::Error>(())
/// ```
pub fn to_u8(images: &Tensor) -> Result<Vec<u8>> {
    // One read to the host; the same f32 arithmetic as candle's clamp, affine, round and
    // saturating cast (the pinned grids of crates/ddpm-cli/tests/shipped.rs hold it to that).
    let v = finite_values(images, "the images to write")?;
    Ok(v.iter()
        .map(|&x| ((x.clamp(-1.0, 1.0) + 1.0) * 127.5).round() as u8)
        .collect())
}

/// Builds the label tensor for a batch where every sample asks for the null class.
pub fn null_labels(null_class: u32, batch: usize, device: &Device) -> Result<Tensor> {
    Tensor::full(null_class, batch, device)
}

pub mod testing {
    //! Helpers for the tests of the `ddpm-*` crates (and of code built on them): seeded random
    //! tensors, tensor comparisons on any device, and "a GPU, or say why the test is skipped".
    //!
    //! Like `assert!`, these panic when something is wrong: they are for tests only.

    use candle_core::{Device, Tensor};

    use crate::SeededNoise;

    /// A CPU f32 tensor of standard normal values from `rng`.
    pub fn randn(rng: &mut SeededNoise, dims: &[usize]) -> Tensor {
        let n: usize = dims.iter().product();
        Tensor::from_vec(rng.randn_vec(n), dims, &Device::Cpu).expect("randn: shape")
    }

    fn abs_max(t: &Tensor) -> f32 {
        t.abs()
            .and_then(|t| t.flatten_all())
            .and_then(|t| t.to_dtype(candle_core::DType::F32))
            .and_then(|t| t.max(0))
            .and_then(|t| t.to_scalar::<f32>())
            .expect("abs_max")
    }

    /// max |a − b| over all elements (on the CPU, in f32); panics if the shapes differ.
    pub fn max_abs_diff(a: &Tensor, b: &Tensor) -> f32 {
        assert_eq!(a.dims(), b.dims(), "max_abs_diff: shapes differ");
        let cpu = |t: &Tensor| t.to_device(&Device::Cpu).expect("to the CPU");
        abs_max(&(cpu(a) - cpu(b)).expect("a − b"))
    }

    /// max |a − b| / max(max |b|, 10⁻³): the error relative to the reference `b`'s scale.
    pub fn max_rel_diff(a: &Tensor, b: &Tensor) -> f32 {
        let scale = abs_max(&b.to_device(&Device::Cpu).expect("to the CPU")).max(1e-3);
        max_abs_diff(a, b) / scale
    }

    /// The first CUDA device, or `None` after printing why `test` is skipped: the test was
    /// built without the `cuda` feature (`built_with_cuda` is the test crate's
    /// `cfg!(feature = "cuda")`), or there is no GPU.
    pub fn cuda_or_skip(test: &str, built_with_cuda: bool) -> Option<Device> {
        if !built_with_cuda {
            eprintln!(
                "{test}: skipped: built without the `cuda` feature (cargo test --features cuda)"
            );
            return None;
        }
        match Device::new_cuda(0) {
            Ok(d) => Some(d),
            Err(e) => {
                eprintln!("{test}: skipped: no CUDA device ({e})");
                None
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn seeded_noise_is_standard_normal_and_resumable() -> Result<()> {
        let mut a = SeededNoise::new(3);
        let v = a.randn_vec(200_000);
        let n = v.len() as f64;
        let mean = v.iter().map(|&x| x as f64).sum::<f64>() / n;
        let var = v.iter().map(|&x| (x as f64 - mean).powi(2)).sum::<f64>() / n;
        assert!(mean.abs() < 0.01, "mean {mean}");
        assert!((var - 1.0).abs() < 0.02, "var {var}");
        // Gaussian, not uniform: about 4.6 % of N(0,1) lies beyond |2|, none of U(-√3, √3).
        let tail = v.iter().filter(|x| x.abs() > 2.0).count() as f64 / n;
        assert!((tail - 0.0455).abs() < 0.005, "tail {tail}");

        let state = a.state();
        let next = a.randn_vec(10);
        let mut b = SeededNoise::from_state(state);
        assert_eq!(next, b.randn_vec(10));
        Ok(())
    }

    #[test]
    fn different_seeds_differ() {
        assert_ne!(
            SeededNoise::new(1).randn_vec(4),
            SeededNoise::new(2).randn_vec(4)
        );
    }
}
