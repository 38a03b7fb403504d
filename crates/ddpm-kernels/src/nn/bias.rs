//! Per-channel (or per-sample-and-channel) bias addition whose backward is one parallel pass
//! over the gradient, instead of candle's single-threaded strided `sum_keepdim` of a broadcast.

use candle_core::{bail, CpuStorage, CustomOp1, CustomOp2, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

use super::contiguous_f32;
use super::simd::simd_fn;

/// `x [n, c, *] + b`, with `b` of shape `[c]` or `[n, c]`.
#[derive(Debug, Clone, Copy)]
pub(crate) struct AddBias;

fn geom(x: &[usize], b: &[usize]) -> Result<(usize, usize, usize, bool)> {
    if x.len() < 2 {
        bail!("add_bias: input must be [n, c, ...], got {x:?}")
    }
    let (n, c) = (x[0], x[1]);
    let s = x[2..].iter().product();
    let per_sample = match b {
        [bc] if *bc == c => false,
        [bn, bc] if *bn == n && *bc == c => true,
        _ => bail!("add_bias: bias {b:?} fits neither [{c}] nor [{n}, {c}]"),
    };
    Ok((n, c, s, per_sample))
}

impl CustomOp2 for AddBias {
    fn name(&self) -> &'static str {
        "ddpm-add-bias"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (_, c, s, per_sample) = geom(l1.dims(), l2.dims())?;
        let x = contiguous_f32(s1, l1, "add_bias input")?;
        let b = contiguous_f32(s2, l2, "add_bias bias")?;
        let mut y = x.to_vec();
        y.par_chunks_mut(s.max(1))
            .enumerate()
            .for_each(|(i, plane)| {
                let v = if per_sample { b[i] } else { b[i % c] };
                add_scalar(plane, v);
            });
        Ok((CpuStorage::F32(y), l1.shape().clone()))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s1: &candle_core::CudaStorage,
        l1: &Layout,
        s2: &candle_core::CudaStorage,
        l2: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        let (n, c, s, per_sample) = geom(l1.dims(), l2.dims())?;
        let y = cuda::add_bias(s1, l1, s2, l2, (n, c, s), per_sample)?;
        Ok((y, l1.shape().clone()))
    }

    /// dx = dy (the add is the identity in x); db = dy summed over each plane (and over the
    /// samples for a per-channel bias).
    fn bwd(
        &self,
        _x: &Tensor,
        b: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let per_sample = b.rank() == 2;
        let db = grad
            .contiguous()?
            .apply_op1_no_bwd(&SumPlanes { per_sample })?;
        Ok((Some(grad.clone()), Some(db)))
    }
}

simd_fn! {
    /// `plane += v`.
    pub(crate) fn add_scalar(plane: &mut [f32], v: f32) {
        plane.iter_mut().for_each(|p| *p += v);
    }
}

simd_fn! {
    /// Σ plane: f32 partial sums in 16 lanes (so the loop vectorises), combined in f64.
    fn plane_sum(plane: &[f32]) -> f32 {
        let mut acc = [0f32; 16];
        let chunks = plane.chunks_exact(16);
        let rest: f64 = chunks.remainder().iter().map(|&v| v as f64).sum();
        for c in chunks {
            for i in 0..16 {
                acc[i] += c[i];
            }
        }
        (acc.iter().map(|&v| v as f64).sum::<f64>() + rest) as f32
    }
}

/// `g [n, c, *] → Σ over * ([n, c])`, then over n too unless `per_sample` (`[c]`).
#[derive(Debug, Clone, Copy)]
pub(crate) struct SumPlanes {
    pub per_sample: bool,
}

impl CustomOp1 for SumPlanes {
    fn name(&self) -> &'static str {
        "ddpm-sum-planes"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let g = contiguous_f32(s, l, "bias gradient")?;
        let dims = l.dims();
        let (n, c) = (dims[0], dims[1]);
        let plane: usize = dims[2..].iter().product();
        let sums: Vec<f32> = g.par_chunks(plane.max(1)).map(plane_sum).collect();
        if self.per_sample {
            return Ok((CpuStorage::F32(sums), Shape::from((n, c))));
        }
        let mut db = vec![0f32; c];
        for (i, v) in sums.iter().enumerate() {
            db[i % c] += v;
        }
        Ok((CpuStorage::F32(db), Shape::from(c)))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        st: &candle_core::CudaStorage,
        l: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        let dims = l.dims();
        if dims.len() < 2 {
            bail!("bias gradient: expected [n, c, ...], got {dims:?}")
        }
        let (n, c) = (dims[0], dims[1]);
        let plane: usize = dims[2..].iter().product();
        let out = cuda::sum_planes(st, l, (n, c, plane), self.per_sample)?;
        let shape = if self.per_sample {
            Shape::from((n, c))
        } else {
            Shape::from(c)
        };
        Ok((out, shape))
    }
}

// The kernels of `kernels/bias.cu`, typed (crate::abi).
crate::abi::kernel! {
    ADD_BIAS, add_bias_kernel = "ddpm_add_bias" in "bias" (x: In, b: In, y: Out, total: Size, c: Int, s: Int, per_sample: Int);
}
crate::abi::kernel! {
    SUM_PLANES, sum_planes_kernel = "ddpm_sum_planes" in "bias" (g: In, out: Out, planes: Int, c: Int, s: Int, per_sample: Int);
}

#[cfg(test)]
#[test]
fn kernel_signatures_match_the_cu_source() {
    crate::abi::check(&[ADD_BIAS, SUM_PLANES]);
}

/// The CUDA launch of this op: `kernels/bias.cu`, compiled to PTX by `build.rs`. Kernel
/// launches are foreign calls, so this module allows `unsafe`; each launch passes device buffers
/// whose lengths were checked against the sizes the kernel indexes with.
#[cfg(feature = "cuda")]
#[allow(unsafe_code)]
mod cuda {
    use crate::cuda::{elementwise, int, per_block, view};
    use candle_core::backend::BackendStorage;
    use candle_core::{bail, CudaStorage, Layout, Result};

    /// `x [n, c, s] + b`, `b` of `[c]` or (per sample) `[n, c]`.
    pub(crate) fn add_bias(
        x: &CudaStorage,
        lx: &Layout,
        bias: &CudaStorage,
        lb: &Layout,
        (n, c, s): (usize, usize, usize),
        per_sample: bool,
    ) -> Result<CudaStorage> {
        let dev = x.device().clone();
        let (xv, bv) = (
            view(x, lx, "add_bias input")?,
            view(bias, lb, "add_bias bias")?,
        );
        let want = if per_sample { n * c } else { c };
        if xv.len() != n * c * s || bv.len() != want {
            bail!("add_bias (cuda): buffers do not match [{n}, {c}, {s}]")
        }
        let total = n * c * s;
        // SAFETY: the grid-stride loop writes every element.
        let y = unsafe { dev.alloc::<f32>(total)? };
        let (ci, si, ps) = (int(c, "c")?, int(s.max(1), "s")?, i32::from(per_sample));
        // SAFETY: argument types and order match `ddpm_add_bias`; lengths checked above.
        unsafe {
            super::add_bias_kernel(
                &dev,
                elementwise(total),
                &xv,
                &bv,
                &y,
                &total,
                &ci,
                &si,
                &ps,
            )?
        };
        Ok(CudaStorage::wrap_cuda_slice(y, dev))
    }

    /// Per-plane sums of `g [n, c, s]`: `[n, c]`, or summed over `n` to `[c]`.
    pub(crate) fn sum_planes(
        g: &CudaStorage,
        lg: &Layout,
        (n, c, s): (usize, usize, usize),
        per_sample: bool,
    ) -> Result<CudaStorage> {
        let dev = g.device().clone();
        let gv = view(g, lg, "bias gradient")?;
        if gv.len() != n * c * s {
            bail!("bias gradient (cuda): buffer does not match [{n}, {c}, {s}]")
        }
        let out = dev.alloc_zeros::<f32>(if per_sample { n * c } else { c })?;
        let (pi, ci, si, ps) = (
            int(n * c, "planes")?,
            int(c, "c")?,
            int(s, "s")?,
            i32::from(per_sample),
        );
        // SAFETY: argument types and order match `ddpm_sum_planes`; lengths checked above.
        unsafe {
            super::sum_planes_kernel(&dev, per_block(n * c)?, &gv, &out, &pi, &ci, &si, &ps)?
        };
        Ok(CudaStorage::wrap_cuda_slice(out, dev))
    }
}
