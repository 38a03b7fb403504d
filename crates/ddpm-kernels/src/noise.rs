//! The forward (noising) process with per-sample coefficients.

use candle_core::{bail, CpuStorage, CustomOp3, DType, Layout, Result, Shape, Tensor};

use crate::cpu;

fn check(x0: &Tensor, noise: &Tensor, coef: &Tensor) -> Result<usize> {
    if x0.shape() != noise.shape() {
        bail!(
            "add_noise: x0 {:?} and noise {:?} differ in shape",
            x0.shape(),
            noise.shape()
        );
    }
    let b = x0.dim(0)?;
    if coef.dims() != [b, 2] {
        bail!(
            "add_noise: the coefficients must be [B, 2] = [{b}, 2] (√ᾱ_t and √(1−ᾱ_t) per sample), got {:?}",
            coef.shape()
        );
    }
    if x0.dtype() != noise.dtype() || x0.dtype() != coef.dtype() {
        bail!(
            "add_noise: x0, noise and coefficients must share a dtype, got {:?}, {:?}, {:?}",
            x0.dtype(),
            noise.dtype(),
            coef.dtype()
        );
    }
    Ok(b)
}

/// x_t = a_b·x0 + s_b·noise in one pass, with `coef` = `[B, 2]` holding (a_b, s_b) per sample
/// (gather them from a `[T, 2]` table of (√ᾱ_t, √(1−ᾱ_t)) with `index_select`).
///
/// f32 tensors on the CPU or a CUDA GPU take the fused op; any other dtype or device takes
/// [`add_noise_composed`].
pub fn add_noise(x0: &Tensor, noise: &Tensor, coef: &Tensor) -> Result<Tensor> {
    let b = check(x0, noise, coef)?;
    if x0.dtype() != DType::F32 || !(x0.device().is_cpu() || x0.device().is_cuda()) {
        return add_noise_composed(x0, noise, coef);
    }
    let op = AddNoise {
        n: x0.elem_count(),
        per_sample: x0.elem_count() / b.max(1),
        shape: x0.shape().clone(),
    };
    x0.contiguous()?
        .apply_op3_no_bwd(&noise.contiguous()?, &coef.contiguous()?, &op)
}

/// [`add_noise`] as a composition of candle ops (broadcast multiplies and an add).
pub fn add_noise_composed(x0: &Tensor, noise: &Tensor, coef: &Tensor) -> Result<Tensor> {
    let b = check(x0, noise, coef)?;
    let mut dims = vec![b];
    dims.extend(std::iter::repeat_n(1, x0.rank().saturating_sub(1)));
    let a = coef.narrow(1, 0, 1)?.reshape(dims.clone())?;
    let s = coef.narrow(1, 1, 1)?.reshape(dims)?;
    x0.broadcast_mul(&a)? + noise.broadcast_mul(&s)?
}

struct AddNoise {
    n: usize,
    per_sample: usize,
    shape: Shape,
}

impl CustomOp3 for AddNoise {
    fn name(&self) -> &'static str {
        "ddpm-add-noise"
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
        let x0 = cpu::slice(s1, l1, "add_noise x0")?;
        let noise = cpu::slice(s2, l2, "add_noise noise")?;
        let coef = cpu::slice(s3, l3, "add_noise coefficients")?;
        let (n, ps) = (self.n, self.per_sample.max(1));
        if x0.len() != n || noise.len() != n || coef.len() != 2 * n.div_ceil(ps) {
            bail!("add_noise: buffers do not match {n} elements");
        }
        let mut out = vec![0f32; n];
        // Per sample, so the inner loop is a plain vectorisable axpby (no division per element).
        let sample = |b: usize, o: &mut [f32]| {
            let (a, s) = (coef[2 * b], coef[2 * b + 1]);
            let r = b * ps..b * ps + o.len();
            for ((o, x), e) in o.iter_mut().zip(&x0[r.clone()]).zip(&noise[r]) {
                *o = a * x + s * e;
            }
        };
        if n <= cpu::CHUNK {
            out.chunks_mut(ps)
                .enumerate()
                .for_each(|(b, o)| sample(b, o));
        } else {
            use rayon::prelude::*;
            out.par_chunks_mut(ps)
                .enumerate()
                .with_min_len(cpu::CHUNK.div_ceil(ps))
                .for_each(|(b, o)| sample(b, o));
        }
        Ok((CpuStorage::F32(out), self.shape.clone()))
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
        let out = cuda::add_noise((s1, l1), (s2, l2), (s3, l3), self.n, self.per_sample)?;
        Ok((out, self.shape.clone()))
    }
}

// The kernels of `kernels/noise.cu`, typed (crate::abi).
crate::abi::kernel! {
    ADD_NOISE, add_noise_kernel = "ddpm_add_noise" in "noise" (x0: In, noise: In, coef: In, out: Out, n: Long, per_sample: Long);
}

#[cfg(test)]
#[test]
fn kernel_signatures_match_the_cu_source() {
    crate::abi::check(&[ADD_NOISE]);
}

/// The CUDA launch of this op: `kernels/noise.cu`, compiled to PTX by `build.rs`. Kernel
/// launches are foreign calls, so this module allows `unsafe`; each launch passes device buffers
/// whose lengths were checked against the sizes the kernel indexes with.
#[cfg(feature = "cuda")]
#[allow(unsafe_code)]
mod cuda {
    use crate::cuda::{elementwise, long, view, In};
    use candle_core::backend::BackendStorage;
    use candle_core::{bail, CudaStorage, Result};

    /// x_t from x0, noise and `[B, 2]` per-sample coefficients.
    pub(crate) fn add_noise(
        x0: In<'_>,
        noise: In<'_>,
        coef: In<'_>,
        n: usize,
        per_sample: usize,
    ) -> Result<CudaStorage> {
        let dev = x0.0.device().clone();
        let xv = view(x0.0, x0.1, "add_noise x0")?;
        let nv = view(noise.0, noise.1, "add_noise noise")?;
        let cv = view(coef.0, coef.1, "add_noise coefficients")?;
        let ps = per_sample.max(1);
        if xv.len() != n || nv.len() != n || cv.len() != 2 * n.div_ceil(ps) {
            bail!("add_noise (cuda): buffers do not match {n} elements")
        }
        // SAFETY: the grid-stride loop writes all n elements.
        let out = unsafe { dev.alloc::<f32>(n)? };
        let (nl, pl) = (long(n)?, long(ps)?);
        // SAFETY: arguments match `ddpm_add_noise`; coef holds 2 per sample of `ps` elements.
        unsafe { super::add_noise_kernel(&dev, elementwise(n), &xv, &nv, &cv, &out, &nl, &pl)? };
        Ok(CudaStorage::wrap_cuda_slice(out, dev))
    }
}
