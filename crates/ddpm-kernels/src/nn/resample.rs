//! Nearest-neighbour ×2 upsampling whose forward and backward are each one parallel pass over
//! the planes (candle's backward of the equivalent broadcast is a single-threaded strided sum).

use candle_core::{bail, CpuStorage, CustomOp1, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

use super::contiguous_f32;
use super::simd::simd_fn;
use super::uninit::{filled, Slot};

fn dims4(l: &Layout, what: &str) -> Result<(usize, usize, usize, usize)> {
    match l.dims() {
        &[n, c, h, w] => Ok((n, c, h, w)),
        d => bail!("{what}: expected a 4-D tensor, got {d:?}"),
    }
}

simd_fn! {
    /// One plane of [`Upsample2x`]: rows of `w` in `src`, rows of `2w` in `dst`.
    fn up_plane(dst: &mut [Slot], src: &[f32], w: usize) {
        for (rows, line) in dst.chunks_mut(4 * w).zip(src.chunks(w)) {
            let (top, bottom) = rows.split_at_mut(2 * w);
            for (pair, &v) in top.chunks_mut(2).zip(line) {
                pair[0] = Slot::new(v);
                pair[1] = Slot::new(v);
            }
            bottom.copy_from_slice(top);
        }
    }
}

simd_fn! {
    /// One plane of [`SumBlocks2x`]: each output the sum of a 2×2 block of `src`.
    fn sum_plane(dst: &mut [Slot], src: &[f32], w: usize) {
        for (line, rows) in dst.chunks_mut(w).zip(src.chunks(4 * w)) {
            let (top, bottom) = rows.split_at(2 * w);
            for ((d, t), b) in line.iter_mut().zip(top.chunks(2)).zip(bottom.chunks(2)) {
                *d = Slot::new((t[0] + t[1]) + (b[0] + b[1]));
            }
        }
    }
}

/// `x [n, c, h, w] → [n, c, 2h, 2w]`, each pixel repeated over a 2×2 block.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Upsample2x;

impl CustomOp1 for Upsample2x {
    fn name(&self) -> &'static str {
        "ddpm-upsample2x"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let (n, c, h, w) = dims4(l, "upsample input")?;
        let x = contiguous_f32(s, l, "upsample input")?;
        let fill = |y: &mut [Slot]| {
            if h * w > 0 {
                y.par_chunks_mut(4 * h * w)
                    .zip(x.par_chunks(h * w))
                    .for_each(|(dst, src)| up_plane(dst, src, w));
            }
            Ok(())
        };
        // SAFETY: the closure writes every element of its buffer (each output index once;
        // checked by every workspace test (feature `check-uninit`) and in debug builds,
        // where an unwritten element is an error: ddpm-unet's
        // `a_kernel_that_skips_an_element_fails_the_tests`).
        #[allow(unsafe_code)]
        let y = unsafe { filled(n * c * 4 * h * w, "upsample", fill) }?;
        Ok((CpuStorage::F32(y), Shape::from((n, c, 2 * h, 2 * w))))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        st: &candle_core::CudaStorage,
        l: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        let (n, c, h, w) = dims4(l, "upsample input")?;
        let y = cuda::resample2x(st, l, n * c, (h, w), true)?;
        Ok((y, Shape::from((n, c, 2 * h, 2 * w))))
    }

    fn bwd(&self, _x: &Tensor, _res: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        Ok(Some(grad.contiguous()?.apply_op1_no_bwd(&SumBlocks2x)?))
    }
}

/// The adjoint of [`Upsample2x`]: `g [n, c, 2h, 2w] → [n, c, h, w]`, summing each 2×2 block.
#[derive(Debug, Clone, Copy)]
struct SumBlocks2x;

impl CustomOp1 for SumBlocks2x {
    fn name(&self) -> &'static str {
        "ddpm-sum-blocks2x"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let (n, c, h2, w2) = dims4(l, "upsample gradient")?;
        if h2 % 2 != 0 || w2 % 2 != 0 {
            bail!("upsample gradient: {h2}x{w2} is not twice an input size")
        }
        let (h, w) = (h2 / 2, w2 / 2);
        let g = contiguous_f32(s, l, "upsample gradient")?;
        let fill = |dx: &mut [Slot]| {
            if h * w > 0 {
                dx.par_chunks_mut(h * w)
                    .zip(g.par_chunks(4 * h * w))
                    .for_each(|(dst, src)| sum_plane(dst, src, w));
            }
            Ok(())
        };
        // SAFETY: the closure writes every element of its buffer (each output index once;
        // checked by every workspace test (feature `check-uninit`) and in debug builds,
        // where an unwritten element is an error: ddpm-unet's
        // `a_kernel_that_skips_an_element_fails_the_tests`).
        #[allow(unsafe_code)]
        let dx = unsafe { filled(n * c * h * w, "upsample backward", fill) }?;
        Ok((CpuStorage::F32(dx), Shape::from((n, c, h, w))))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        st: &candle_core::CudaStorage,
        l: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        let (n, c, h2, w2) = dims4(l, "upsample gradient")?;
        if h2 % 2 != 0 || w2 % 2 != 0 {
            bail!("upsample gradient: {h2}x{w2} is not twice an input size")
        }
        let (h, w) = (h2 / 2, w2 / 2);
        let dx = cuda::resample2x(st, l, n * c, (h, w), false)?;
        Ok((dx, Shape::from((n, c, h, w))))
    }
}

// The kernels of `kernels/resample.cu`, typed (crate::abi).
crate::abi::kernel! {
    UPSAMPLE2X, upsample2x_kernel = "ddpm_upsample2x" in "resample" (x: In, y: Out, total: Size, h: Int, w: Int);
}
crate::abi::kernel! {
    SUM_BLOCKS2X, sum_blocks2x_kernel = "ddpm_sum_blocks2x" in "resample" (g: In, dx: Out, total: Size, h: Int, w: Int);
}

#[cfg(test)]
#[test]
fn kernel_signatures_match_the_cu_source() {
    crate::abi::check(&[UPSAMPLE2X, SUM_BLOCKS2X]);
}

/// The CUDA launch of this op: `kernels/resample.cu`, compiled to PTX by `build.rs`. Kernel
/// launches are foreign calls, so this module allows `unsafe`; each launch passes device buffers
/// whose lengths were checked against the sizes the kernel indexes with.
#[cfg(feature = "cuda")]
#[allow(unsafe_code)]
mod cuda {
    use crate::cuda::{elementwise, int, view};
    use candle_core::backend::BackendStorage;
    use candle_core::{bail, CudaStorage, Layout, Result};

    /// Nearest ×2 upsampling of `planes` planes of `h × w` (`up`), or its adjoint, the 2×2 block sums
    /// of `planes` planes of `2h × 2w` (`!up`).
    pub(crate) fn resample2x(
        x: &CudaStorage,
        lx: &Layout,
        planes: usize,
        (h, w): (usize, usize),
        up: bool,
    ) -> Result<CudaStorage> {
        let dev = x.device().clone();
        let xv = view(x, lx, "upsample")?;
        let (inp, outp) = if up {
            (h * w, 4 * h * w)
        } else {
            (4 * h * w, h * w)
        };
        if xv.len() != planes * inp {
            bail!("upsample (cuda): buffer does not match {planes} planes of {h}x{w}")
        }
        let total = planes * outp;
        // SAFETY: the grid-stride loop writes every element.
        let y = unsafe { dev.alloc::<f32>(total)? };
        let (hi, wi) = (int(h, "h")?, int(w, "w")?);
        // SAFETY: argument types and order match both kernels; lengths checked above.
        unsafe {
            if up {
                super::upsample2x_kernel(&dev, elementwise(total), &xv, &y, &total, &hi, &wi)?
            } else {
                super::sum_blocks2x_kernel(&dev, elementwise(total), &xv, &y, &total, &hi, &wi)?
            }
        }
        Ok(CudaStorage::wrap_cuda_slice(y, dev))
    }
}
