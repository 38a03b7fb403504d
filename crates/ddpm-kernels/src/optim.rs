//! In-place AdamW and EMA updates.
//!
//! The composed AdamW step costs about a dozen candle ops per parameter tensor, each allocating
//! its result (one kernel launch each on a GPU); these ops update the state where it lies in two
//! passes (moments, then weights), and the EMA in one.

use candle_core::{bail, CpuStorage, DType, InplaceOp2, Layout, Result, Tensor};

use crate::cpu;

/// Whether the fused op can run on `t` (f32, CPU or CUDA, contiguous).
fn fusable(t: &Tensor) -> bool {
    t.dtype() == DType::F32 && (t.device().is_cpu() || t.device().is_cuda()) && t.is_contiguous()
}

/// Overwrites `dst` with `value` (same shape): the composed fallbacks' way of writing in place.
fn assign(dst: &Tensor, value: &Tensor) -> Result<()> {
    dst.slice_set(&value.to_dtype(dst.dtype())?, 0, 0)
}

fn check_mv(mv: &Tensor, like: &Tensor, what: &str) -> Result<()> {
    let mut want = vec![2];
    want.extend_from_slice(like.dims());
    if mv.dims() != want.as_slice() {
        bail!(
            "{what}: the moments must be [2, …] = {want:?} (m then v), got {:?}",
            mv.shape()
        );
    }
    Ok(())
}

/// AdamW's moment update in place: with ĝ = `grad_scale`·g,
/// m ← β₁·m + (1−β₁)·ĝ and v ← β₂·v + (1−β₂)·ĝ², where `mv` = `[2, …g's shape]` holds m
/// then v.
pub fn adam_moments(
    mv: &Tensor,
    g: &Tensor,
    beta1: f64,
    beta2: f64,
    grad_scale: f64,
) -> Result<()> {
    check_mv(mv, g, "adam_moments")?;
    if !fusable(mv) || g.dtype() != mv.dtype() {
        return adam_moments_composed(mv, g, beta1, beta2, grad_scale);
    }
    let op = AdamMoments {
        beta1: beta1 as f32,
        beta2: beta2 as f32,
        grad_scale: grad_scale as f32,
    };
    mv.inplace_op2(&g.contiguous()?, &op)
}

/// [`adam_moments`] as candle ops.
pub fn adam_moments_composed(
    mv: &Tensor,
    g: &Tensor,
    beta1: f64,
    beta2: f64,
    grad_scale: f64,
) -> Result<()> {
    check_mv(mv, g, "adam_moments")?;
    let g = (g.to_dtype(mv.dtype())? * grad_scale)?;
    let m = ((mv.get(0)? * beta1)? + (&g * (1.0 - beta1))?)?;
    let v = ((mv.get(1)? * beta2)? + (g.sqr()? * (1.0 - beta2))?)?;
    assign(mv, &Tensor::stack(&[m, v], 0)?)
}

/// The weight half of an AdamW step (Loshchilov & Hutter, decoupled weight decay).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct AdamWApply {
    /// Learning rate.
    pub lr: f64,
    /// 1 − β₁^step (bias correction of m).
    pub bias_correction1: f64,
    /// 1 − β₂^step (bias correction of v).
    pub bias_correction2: f64,
    /// ε.
    pub eps: f64,
    /// Decoupled weight decay λ: the weights shrink by the factor 1 − lr·λ.
    pub weight_decay: f64,
}

/// AdamW's weight update in place:
/// w ← (1 − lr·λ)·w − lr · (m / bc₁) / (√(v / bc₂) + ε), from `mv` = `[2, …w's shape]`.
pub fn adamw_apply(w: &Tensor, mv: &Tensor, p: &AdamWApply) -> Result<()> {
    check_mv(mv, w, "adamw_apply")?;
    if !fusable(w) || !fusable(mv) {
        return adamw_apply_composed(w, mv, p);
    }
    let op = ApplyUpdate {
        lr: p.lr as f32,
        inv_bc1: (1.0 / p.bias_correction1) as f32,
        inv_bc2: (1.0 / p.bias_correction2) as f32,
        eps: p.eps as f32,
        decay: (1.0 - p.lr * p.weight_decay) as f32,
    };
    w.inplace_op2(mv, &op)
}

/// [`adamw_apply`] as candle ops.
pub fn adamw_apply_composed(w: &Tensor, mv: &Tensor, p: &AdamWApply) -> Result<()> {
    check_mv(mv, w, "adamw_apply")?;
    let m_hat = (mv.get(0)? * (1.0 / p.bias_correction1))?;
    let v_hat = (mv.get(1)? * (1.0 / p.bias_correction2))?;
    let update = (m_hat / (v_hat.sqrt()? + p.eps)?)?;
    let decayed = (w * (1.0 - p.lr * p.weight_decay))?;
    assign(w, &(decayed - (update * p.lr)?)?)
}

/// The weight average in place: avg ← d·avg + (1 − d)·w.
pub fn ema_update(avg: &Tensor, w: &Tensor, d: f64) -> Result<()> {
    if avg.shape() != w.shape() {
        bail!(
            "ema_update: average {:?} and weights {:?} differ in shape",
            avg.shape(),
            w.shape()
        );
    }
    if !fusable(avg) || w.dtype() != avg.dtype() {
        return ema_update_composed(avg, w, d);
    }
    avg.inplace_op2(&w.contiguous()?, &Ema { d: d as f32 })
}

/// [`ema_update`] as candle ops.
pub fn ema_update_composed(avg: &Tensor, w: &Tensor, d: f64) -> Result<()> {
    if avg.shape() != w.shape() {
        bail!(
            "ema_update: average {:?} and weights {:?} differ in shape",
            avg.shape(),
            w.shape()
        );
    }
    assign(
        avg,
        &((avg * d)? + (w.to_dtype(avg.dtype())? * (1.0 - d))?)?,
    )
}

struct AdamMoments {
    beta1: f32,
    beta2: f32,
    grad_scale: f32,
}

impl InplaceOp2 for AdamMoments {
    fn name(&self) -> &'static str {
        "ddpm-adam-moments"
    }

    fn cpu_fwd(
        &self,
        s1: &mut CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<()> {
        let g = cpu::slice(s2, l2, "adam_moments gradient")?;
        let mv = cpu::slice_mut(s1, l1, "adam_moments moments")?;
        let n = g.len();
        if mv.len() != 2 * n {
            bail!("adam_moments: {} moments for {n} gradients", mv.len());
        }
        let (m, v) = mv.split_at_mut(n);
        let (b1, b2, s) = (self.beta1, self.beta2, self.grad_scale);
        cpu::for_chunks(m, |start, chunk| {
            for (k, mi) in chunk.iter_mut().enumerate() {
                *mi = b1 * *mi + (1.0 - b1) * (g[start + k] * s);
            }
        });
        cpu::for_chunks(v, |start, chunk| {
            for (k, vi) in chunk.iter_mut().enumerate() {
                let gi = g[start + k] * s;
                *vi = b2 * *vi + (1.0 - b2) * (gi * gi);
            }
        });
        Ok(())
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s1: &mut candle_core::CudaStorage,
        l1: &Layout,
        s2: &candle_core::CudaStorage,
        l2: &Layout,
    ) -> Result<()> {
        cuda::adam_moments((s1, l1), (s2, l2), self.beta1, self.beta2, self.grad_scale)
    }
}

struct ApplyUpdate {
    lr: f32,
    inv_bc1: f32,
    inv_bc2: f32,
    eps: f32,
    decay: f32,
}

impl InplaceOp2 for ApplyUpdate {
    fn name(&self) -> &'static str {
        "ddpm-adamw-apply"
    }

    fn cpu_fwd(
        &self,
        s1: &mut CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<()> {
        let mv = cpu::slice(s2, l2, "adamw_apply moments")?;
        let w = cpu::slice_mut(s1, l1, "adamw_apply weights")?;
        let n = w.len();
        if mv.len() != 2 * n {
            bail!("adamw_apply: {} moments for {n} weights", mv.len());
        }
        let (m, v) = mv.split_at(n);
        cpu::for_chunks(w, |start, chunk| {
            for (k, wi) in chunk.iter_mut().enumerate() {
                let i = start + k;
                let update = (m[i] * self.inv_bc1) / ((v[i] * self.inv_bc2).sqrt() + self.eps);
                *wi = *wi * self.decay - update * self.lr;
            }
        });
        Ok(())
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s1: &mut candle_core::CudaStorage,
        l1: &Layout,
        s2: &candle_core::CudaStorage,
        l2: &Layout,
    ) -> Result<()> {
        cuda::adamw_apply(
            (s1, l1),
            (s2, l2),
            [self.lr, self.inv_bc1, self.inv_bc2, self.eps, self.decay],
        )
    }
}

struct Ema {
    d: f32,
}

impl InplaceOp2 for Ema {
    fn name(&self) -> &'static str {
        "ddpm-ema"
    }

    fn cpu_fwd(
        &self,
        s1: &mut CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<()> {
        let w = cpu::slice(s2, l2, "ema_update weights")?;
        let avg = cpu::slice_mut(s1, l1, "ema_update average")?;
        if avg.len() != w.len() {
            bail!("ema_update: {} averages for {} weights", avg.len(), w.len());
        }
        let d = self.d;
        cpu::for_chunks(avg, |start, chunk| {
            for (k, a) in chunk.iter_mut().enumerate() {
                *a = d * *a + (1.0 - d) * w[start + k];
            }
        });
        Ok(())
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s1: &mut candle_core::CudaStorage,
        l1: &Layout,
        s2: &candle_core::CudaStorage,
        l2: &Layout,
    ) -> Result<()> {
        cuda::ema((s1, l1), (s2, l2), self.d)
    }
}

// The kernels of `kernels/optim.cu`, typed (crate::abi).
crate::abi::kernel! {
    ADAM_MOMENTS, adam_moments_kernel = "ddpm_adam_moments" in "optim" (mv: InOut, g: In, n: Long, beta1: Float, beta2: Float, grad_scale: Float);
}
crate::abi::kernel! {
    ADAMW_APPLY, adamw_apply_kernel = "ddpm_adamw_apply" in "optim" (w: InOut, mv: In, n: Long, lr: Float, inv_bc1: Float, inv_bc2: Float, eps: Float, decay: Float);
}
crate::abi::kernel! {
    EMA, ema_kernel = "ddpm_ema" in "optim" (avg: InOut, w: In, n: Long, d: Float);
}

#[cfg(test)]
#[test]
fn kernel_signatures_match_the_cu_source() {
    crate::abi::check(&[ADAM_MOMENTS, ADAMW_APPLY, EMA]);
}

/// The CUDA launch of this op: `kernels/optim.cu`, compiled to PTX by `build.rs`. Kernel
/// launches are foreign calls, so this module allows `unsafe`; each launch passes device buffers
/// whose lengths were checked against the sizes the kernel indexes with.
#[cfg(feature = "cuda")]
#[allow(unsafe_code)]
mod cuda {
    use crate::cuda::{elementwise, long, view, view_mut, In, Out};
    use candle_core::backend::BackendStorage;
    use candle_core::{bail, Result};

    /// AdamW moments in place (`mv` = [m ‖ v]).
    pub(crate) fn adam_moments(
        mv: Out<'_>,
        g: In<'_>,
        beta1: f32,
        beta2: f32,
        grad_scale: f32,
    ) -> Result<()> {
        let dev = mv.0.device().clone();
        let gv = view(g.0, g.1, "adam_moments gradient")?;
        let n = gv.len();
        let mut mvv = view_mut(mv.0, mv.1, "adam_moments moments")?;
        if mvv.len() != 2 * n {
            bail!(
                "adam_moments (cuda): {} moments for {n} gradients",
                mvv.len()
            )
        }
        let nl = long(n)?;
        // SAFETY: arguments match `ddpm_adam_moments`; mv holds 2n and g n elements.
        unsafe {
            super::adam_moments_kernel(
                &dev,
                elementwise(n),
                &mut mvv,
                &gv,
                &nl,
                &beta1,
                &beta2,
                &grad_scale,
            )?
        };
        Ok(())
    }

    /// AdamW weight update in place, `p` = [lr, 1/bc₁, 1/bc₂, ε, decay].
    pub(crate) fn adamw_apply(w: Out<'_>, mv: In<'_>, p: [f32; 5]) -> Result<()> {
        let dev = w.0.device().clone();
        let mvv = view(mv.0, mv.1, "adamw_apply moments")?;
        let mut wv = view_mut(w.0, w.1, "adamw_apply weights")?;
        let n = wv.len();
        if mvv.len() != 2 * n {
            bail!("adamw_apply (cuda): {} moments for {n} weights", mvv.len())
        }
        let nl = long(n)?;
        let [lr, inv_bc1, inv_bc2, eps, decay] = p;
        // SAFETY: arguments match `ddpm_adamw_apply`; w holds n and mv 2n elements.
        unsafe {
            super::adamw_apply_kernel(
                &dev,
                elementwise(n),
                &mut wv,
                &mvv,
                &nl,
                &lr,
                &inv_bc1,
                &inv_bc2,
                &eps,
                &decay,
            )?
        };
        Ok(())
    }

    /// EMA in place.
    pub(crate) fn ema(avg: Out<'_>, w: In<'_>, d: f32) -> Result<()> {
        let dev = avg.0.device().clone();
        let wv = view(w.0, w.1, "ema_update weights")?;
        let mut av = view_mut(avg.0, avg.1, "ema_update average")?;
        let n = wv.len();
        if av.len() != n {
            bail!("ema_update (cuda): {} averages for {n} weights", av.len())
        }
        let nl = long(n)?;
        // SAFETY: arguments match `ddpm_ema`; both buffers hold n elements.
        unsafe { super::ema_kernel(&dev, elementwise(n), &mut av, &wv, &nl, &d)? };
        Ok(())
    }
}
