//! The fused reverse-diffusion step.

use candle_core::{bail, CpuStorage, CustomOp3, DType, Layout, Result, Shape, Tensor};

use crate::cpu;

/// The noise prediction a step consumes.
#[derive(Debug, Clone, Copy)]
pub enum Eps<'a> {
    /// ε, shaped like x_t.
    Plain(&'a Tensor),
    /// Classifier-free guidance: `pair` is `[2B, …]`, the conditional predictions of the `B`
    /// samples followed by the unconditional ones (one batched forward pass), combined as
    /// ε̂ = (1 + w)·ε_cond − w·ε_uncond.
    Guided {
        /// `[ε_cond ‖ ε_uncond]` along dimension 0.
        pair: &'a Tensor,
        /// The guidance weight w (0: the conditional prediction alone).
        w: f64,
    },
}

/// The coefficients of one reverse step, element-wise:
///
/// ```text
/// ε̂       = ε                                 (or the guided combination, see Eps)
/// x̂₀      = (x_t − √(1−ᾱ)·ε̂) / √ᾱ
/// if clip:  x̂₀ = clamp(x̂₀, −1, 1);  ε̂ = (x_t − √ᾱ·x̂₀) / √(1−ᾱ)
/// x_prev  = c_x0·x̂₀ + c_eps·ε̂ + c_x·x_t + c_extra·extra
/// ```
///
/// DDPM is `c_x0`, `c_x` = the posterior mean's coefficients and `extra` = σ·z; DDIM is
/// `c_x0 = √ᾱ_prev`, `c_eps` = the direction term and `extra` = σ·z when η > 0;
/// DPM-Solver++(2M) puts its previous x̂₀ in `extra`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct StepRule {
    /// ᾱ_t of the timestep being denoised, in (0, 1).
    pub alpha_bar: f64,
    /// Clip x̂₀ to [−1, 1] (and make ε̂ consistent with the clipped value).
    pub clip_x0: bool,
    /// Coefficient of x̂₀.
    pub c_x0: f64,
    /// Coefficient of ε̂.
    pub c_eps: f64,
    /// Coefficient of x_t.
    pub c_x: f64,
    /// Coefficient of the extra tensor (0 when there is none).
    pub c_extra: f64,
}

impl StepRule {
    fn check(&self) -> Result<()> {
        let a = self.alpha_bar;
        if !(a > 0.0 && a < 1.0) {
            bail!("reverse_step: ᾱ_t must lie in (0, 1), got {a}");
        }
        let c = [self.c_x0, self.c_eps, self.c_x, self.c_extra];
        if c.iter().any(|c| !c.is_finite()) {
            bail!("reverse_step: coefficients must be finite, got {c:?}");
        }
        Ok(())
    }
}

/// Checks shapes; returns the guidance weight (`None`: plain ε) and the ε tensor.
fn check<'a>(
    x: &Tensor,
    eps: Eps<'a>,
    extra: Option<&Tensor>,
    rule: &StepRule,
) -> Result<(Option<f64>, &'a Tensor)> {
    rule.check()?;
    let (w, e) = match eps {
        Eps::Plain(e) => {
            if e.shape() != x.shape() {
                bail!(
                    "reverse_step: ε {:?} and x_t {:?} differ in shape",
                    e.shape(),
                    x.shape()
                );
            }
            (None, e)
        }
        Eps::Guided { pair, w } => {
            if !w.is_finite() {
                bail!("reverse_step: guidance weight w must be finite, got {w}");
            }
            let mut want = x.dims().to_vec();
            if let Some(b) = want.first_mut() {
                *b *= 2;
            }
            if pair.dims() != want.as_slice() {
                bail!(
                    "reverse_step: the guided ε pair must be [2B, …] = {want:?} for x_t {:?}, got {:?}",
                    x.shape(),
                    pair.shape()
                );
            }
            (Some(w), pair)
        }
    };
    if e.dtype() != x.dtype() {
        bail!(
            "reverse_step: ε is {:?} but x_t is {:?}",
            e.dtype(),
            x.dtype()
        );
    }
    match extra {
        Some(t) if t.shape() != x.shape() || t.dtype() != x.dtype() => bail!(
            "reverse_step: the extra tensor {:?} {:?} does not match x_t {:?} {:?}",
            t.shape(),
            t.dtype(),
            x.shape(),
            x.dtype()
        ),
        None if rule.c_extra != 0.0 => {
            bail!(
                "reverse_step: c_extra is {} but no extra tensor was given",
                rule.c_extra
            )
        }
        _ => Ok((w, e)),
    }
}

/// One reverse step fused into a single pass (one kernel on a GPU). Returns
/// `(x_prev, x̂₀)`, both shaped like `x`. See [`StepRule`] for the formula.
///
/// f32 tensors on the CPU or a CUDA GPU take the fused op; any other dtype or device takes
/// [`reverse_step_composed`].
///
/// ```
/// use candle_core::{Device, Tensor};
/// use ddpm_kernels::{reverse_step, Eps, StepRule};
///
/// let x = Tensor::new(&[[0.5f32, -0.25]], &Device::Cpu)?;
/// let pair = Tensor::new(&[[0.2f32, 0.1], [0.4, 0.3]], &Device::Cpu)?; // cond, uncond
/// // DDIM to ᾱ_prev = 1 (the last step): x_prev = x̂₀.
/// let rule = StepRule { alpha_bar: 0.5, clip_x0: true, c_x0: 1.0, c_eps: 0.0, c_x: 0.0, c_extra: 0.0 };
/// let (prev, x0) = reverse_step(&x, Eps::Guided { pair: &pair, w: 1.0 }, None, &rule)?;
/// // ε̂ = 2·cond − uncond = [0, −0.1]; x̂₀ = (x − √0.5·ε̂)/√0.5.
/// let want = [0.5 / 0.5f32.sqrt(), (-0.25 + 0.1 * 0.5f32.sqrt()) / 0.5f32.sqrt()];
/// for (got, want) in x0.flatten_all()?.to_vec1::<f32>()?.iter().zip(want) {
///     assert!((got - want).abs() < 1e-6);
/// }
/// assert_eq!(prev.to_vec2::<f32>()?, x0.to_vec2::<f32>()?);
/// # Ok::<(), candle_core::Error>(())
/// ```
pub fn reverse_step(
    x: &Tensor,
    eps: Eps<'_>,
    extra: Option<&Tensor>,
    rule: &StepRule,
) -> Result<(Tensor, Tensor)> {
    let (w, e) = check(x, eps, extra, rule)?;
    if x.dtype() != DType::F32 || !(x.device().is_cpu() || x.device().is_cuda()) {
        return reverse_step_composed(x, eps, extra, rule);
    }
    let x = x.contiguous()?;
    let e = e.contiguous()?;
    // Without an extra tensor, x stands in for it with a zero coefficient (checked above).
    let extra = match extra {
        Some(t) => t.contiguous()?,
        None => x.clone(),
    };
    let mut out_dims = vec![2];
    out_dims.extend_from_slice(x.dims());
    let op = ReverseStep {
        n: x.elem_count(),
        guided: w.is_some(),
        w: w.unwrap_or(0.0) as f32,
        sqrt_ac: rule.alpha_bar.sqrt() as f32,
        sqrt_one_minus_ac: (1.0 - rule.alpha_bar).sqrt() as f32,
        clip: rule.clip_x0,
        c: [rule.c_x0, rule.c_eps, rule.c_x, rule.c_extra].map(|c| c as f32),
        out: Shape::from(out_dims),
    };
    let out = x.apply_op3_no_bwd(&e, &extra, &op)?;
    Ok((out.get(0)?, out.get(1)?))
}

/// Classifier-free guidance's combination for one element: ε̂ = (1 + w)·ε_cond − w·ε_uncond.
/// The one Rust source of the formula: [`guidance_combine`], the fused step's CPU loop and
/// (through them) every sampler use it; `kernels/step.cu` holds its CUDA twin, which the GPU
/// tests hold to this.
#[inline(always)]
pub fn guided_eps(cond: f32, uncond: f32, w: f32) -> f32 {
    (1.0 + w) * cond - w * uncond
}

/// [`guided_eps`] over a `[2B, …]` pair (the conditional half, then the unconditional half):
/// returns the `[B, …]` guided ε. Composed from candle ops, for any dtype and device.
pub fn guidance_combine(pair: &Tensor, w: f64) -> Result<Tensor> {
    let b2 = pair.dim(0)?;
    if b2 % 2 != 0 {
        bail!("guidance: the pair has an odd batch {b2}; expected [ε_cond ‖ ε_uncond]");
    }
    let b = b2 / 2;
    // (1 + w)·c − w·u, as guided_eps computes it.
    (pair.narrow(0, 0, b)? * (1.0 + w))? - (pair.narrow(0, b, b)? * w)?
}

/// [`reverse_step`] as a composition of candle ops: the fallback for other dtypes and devices,
/// and the reference the fused op is tested against.
pub fn reverse_step_composed(
    x: &Tensor,
    eps: Eps<'_>,
    extra: Option<&Tensor>,
    rule: &StepRule,
) -> Result<(Tensor, Tensor)> {
    let (w, e) = check(x, eps, extra, rule)?;
    let e = match w {
        None => e.clone(),
        Some(w) => guidance_combine(e, w)?,
    };
    let ac = rule.alpha_bar;
    let mut x0 = ((x - (&e * (1.0 - ac).sqrt())?)? / ac.sqrt())?;
    let mut e = e;
    if rule.clip_x0 {
        x0 = x0.clamp(-1f32, 1f32)?;
        e = ((x - (&x0 * ac.sqrt())?)? / (1.0 - ac).sqrt())?;
    }
    let mut prev = ((&x0 * rule.c_x0)? + (&e * rule.c_eps)?)?;
    prev = (prev + (x * rule.c_x)?)?;
    if let Some(t) = extra {
        prev = (prev + (t * rule.c_extra)?)?;
    }
    Ok((prev, x0))
}

/// The fused op over contiguous f32 `x`, `eps` (n or 2n elements) and `extra`; output `[2, …]`.
struct ReverseStep {
    n: usize,
    guided: bool,
    w: f32,
    sqrt_ac: f32,
    sqrt_one_minus_ac: f32,
    clip: bool,
    c: [f32; 4],
    out: Shape,
}

impl ReverseStep {
    /// The element loop, for elements `start..start + prev.len()`.
    fn run(
        &self,
        x: &[f32],
        e: &[f32],
        extra: &[f32],
        start: usize,
        prev: &mut [f32],
        x0: &mut [f32],
    ) {
        let (n, w, sa, sb) = (self.n, self.w, self.sqrt_ac, self.sqrt_one_minus_ac);
        let [ca, ce, cx, cz] = self.c;
        for (k, (p, o)) in prev.iter_mut().zip(x0.iter_mut()).enumerate() {
            let i = start + k;
            let mut ei = if self.guided {
                guided_eps(e[i], e[n + i], w)
            } else {
                e[i]
            };
            let xi = x[i];
            let mut x0i = (xi - sb * ei) / sa;
            if self.clip {
                x0i = x0i.clamp(-1.0, 1.0);
                ei = (xi - sa * x0i) / sb;
            }
            *p = ca * x0i + ce * ei + cx * xi + cz * extra[i];
            *o = x0i;
        }
    }
}

impl CustomOp3 for ReverseStep {
    fn name(&self) -> &'static str {
        "ddpm-reverse-step"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let x = cpu::slice(s1, l1, "reverse_step x_t")?;
        let e = cpu::slice(s2, l2, "reverse_step ε")?;
        let extra = cpu::slice(s3, l3, "reverse_step extra")?;
        let n = self.n;
        let want_e = if self.guided { 2 * n } else { n };
        if x.len() != n || e.len() != want_e || extra.len() != n {
            bail!("reverse_step: buffers do not match {n} elements");
        }
        let mut out = vec![0f32; 2 * n];
        let (prev, x0) = out.split_at_mut(n);
        if n <= cpu::CHUNK {
            self.run(x, e, extra, 0, prev, x0);
        } else {
            use rayon::prelude::*;
            prev.par_chunks_mut(cpu::CHUNK)
                .zip(x0.par_chunks_mut(cpu::CHUNK))
                .enumerate()
                .for_each(|(i, (p, o))| self.run(x, e, extra, i * cpu::CHUNK, p, o));
        }
        Ok((CpuStorage::F32(out), self.out.clone()))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s1: &candle_core::CudaStorage,
        l1: &Layout,
        s2: &candle_core::CudaStorage,
        l2: &Layout,
        s3: &candle_core::CudaStorage,
        l3: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        let out = cuda::reverse_step(
            (s1, l1),
            (s2, l2),
            (s3, l3),
            self.n,
            self.guided,
            self.w,
            (self.sqrt_ac, self.sqrt_one_minus_ac),
            self.clip,
            self.c,
        )?;
        Ok((out, self.out.clone()))
    }
}

// The kernels of `kernels/step.cu`, typed (crate::abi).
crate::abi::kernel! {
    REVERSE_STEP, reverse_step_kernel = "ddpm_reverse_step" in "step" (x: In, eps: In, extra: In, out: Out, n: Long, guided: Int, w: Float, sqrt_ac: Float, sqrt_one_minus_ac: Float, clip: Int, c_x0: Float, c_eps: Float, c_x: Float, c_extra: Float);
}

#[cfg(test)]
#[test]
fn kernel_signatures_match_the_cu_source() {
    crate::abi::check(&[REVERSE_STEP]);
}

/// The CUDA launch of this op: `kernels/step.cu`, compiled to PTX by `build.rs`. Kernel
/// launches are foreign calls, so this module allows `unsafe`; each launch passes device buffers
/// whose lengths were checked against the sizes the kernel indexes with.
#[cfg(feature = "cuda")]
#[allow(unsafe_code)]
mod cuda {
    use crate::cuda::{elementwise, long, view, In};
    use candle_core::backend::BackendStorage;
    use candle_core::{bail, CudaStorage, Result};

    /// The fused reverse step: `[x_prev ‖ x̂₀]` (2n floats).
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn reverse_step(
        x: In<'_>,
        eps: In<'_>,
        extra: In<'_>,
        n: usize,
        guided: bool,
        w: f32,
        (sqrt_ac, sqrt_one_minus_ac): (f32, f32),
        clip: bool,
        [c_x0, c_eps, c_x, c_extra]: [f32; 4],
    ) -> Result<CudaStorage> {
        let dev = x.0.device().clone();
        let xv = view(x.0, x.1, "reverse_step x_t")?;
        let ev = view(eps.0, eps.1, "reverse_step ε")?;
        let zv = view(extra.0, extra.1, "reverse_step extra")?;
        let want_e = if guided { 2 * n } else { n };
        if xv.len() != n || ev.len() != want_e || zv.len() != n {
            bail!("reverse_step (cuda): buffers do not match {n} elements")
        }
        // SAFETY: the grid-stride loop writes all 2n elements.
        let out = unsafe { dev.alloc::<f32>(2 * n)? };
        let (nl, gi, ci) = (long(n)?, i32::from(guided), i32::from(clip));
        // SAFETY: arguments match `ddpm_reverse_step`; x, extra hold n and eps 2n (guided) or n.
        unsafe {
            super::reverse_step_kernel(
                &dev,
                elementwise(n),
                &xv,
                &ev,
                &zv,
                &out,
                &nl,
                &gi,
                &w,
                &sqrt_ac,
                &sqrt_one_minus_ac,
                &ci,
                &c_x0,
                &c_eps,
                &c_x,
                &c_extra,
            )?
        };
        Ok(CudaStorage::wrap_cuda_slice(out, dev))
    }
}
