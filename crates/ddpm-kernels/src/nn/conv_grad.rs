//! Convolution whose gradients run as dense convolutions and matrix products, for devices our
//! CPU kernels do not cover (CUDA).
//!
//! candle differentiates `conv2d` with `conv_transpose2d` for the input gradient, which on CUDA
//! is a direct one-thread-per-output loop, far slower than the cuDNN/im2col forward. Here the
//! forward is candle's own `conv2d` (cuDNN with the `cudnn` feature) and the backward is
//! rewritten in operations that are fast on a GPU:
//!
//! * input gradient: the upstream gradient, dilated by the stride and padded, convolved at
//!   stride one with the kernel flipped in space and with its channel axes swapped — a
//!   forward convolution again;
//! * kernel gradient: an im2col of the input (k·k shifted views, stacked), then one batched
//!   matrix product with the upstream gradient and a sum over the batch.
//!
//! The gradients are attached by a pass-through [`CustomOp3`] over `(x, w, y)`, where `y` is
//! computed from detached `x` and `w`; its forward only copies `y` (on any backend).

use candle_core::backend::BackendStorage;
use candle_core::{bail, CpuStorage, CudaStorage, CustomOp3, Layout, Result, Shape, Tensor};

/// `conv2d(x, w)` (no bias) with the GEMM-based backward described in the module docs.
pub(crate) fn conv2d(x: &Tensor, w: &Tensor, stride: usize, pad: usize) -> Result<Tensor> {
    let (kh, kw) = (w.dim(2)?, w.dim(3)?);
    if pad >= kh || pad >= kw || stride == 0 || !(x.track_op() || w.track_op()) {
        // Outside what the rewritten backward covers, or no gradient wanted (sampling):
        // candle's own path, without the pass-through copy.
        return x.conv2d(w, pad, stride, 1, 1);
    }
    let y = x
        .detach()
        .conv2d(&w.detach(), pad, stride, 1, 1)?
        .contiguous()?;
    x.apply_op3(w, &y, ConvGrads { stride, pad })
}

/// The pass-through op carrying the gradients of `y = conv2d(x, w)`.
#[derive(Debug, Clone, Copy)]
struct ConvGrads {
    stride: usize,
    pad: usize,
}

/// A copy of `y` (the op's forward), checked to be a whole contiguous storage.
fn pass_through<S: BackendStorage>(s: &S, l: &Layout) -> Result<(S, Shape)> {
    if !l.is_contiguous() || l.start_offset() != 0 {
        bail!("ddpm-conv2d-grads: expected the convolution output as a fresh contiguous tensor")
    }
    Ok((s.try_clone(l)?, l.shape().clone()))
}

impl CustomOp3 for ConvGrads {
    fn name(&self) -> &'static str {
        "ddpm-conv2d-grads"
    }

    fn cpu_fwd(
        &self,
        _: &CpuStorage,
        _: &Layout,
        _: &CpuStorage,
        _: &Layout,
        y: &CpuStorage,
        ly: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        pass_through(y, ly)
    }

    fn cuda_fwd(
        &self,
        _: &CudaStorage,
        _: &Layout,
        _: &CudaStorage,
        _: &Layout,
        y: &CudaStorage,
        ly: &Layout,
    ) -> Result<(CudaStorage, Shape)> {
        pass_through(y, ly)
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        _y: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let grad = grad.contiguous()?;
        let gx = grad_input(&grad, w, x.dim(2)?, x.dim(3)?, self.stride, self.pad)?;
        let gw = grad_weight(x, &grad, w.dim(2)?, w.dim(3)?, self.stride, self.pad)?;
        Ok((Some(gx), Some(gw), None))
    }
}

/// Inserts `s − 1` zeros between neighbouring elements along `dim` (length n → (n−1)s+1).
fn dilate(g: &Tensor, dim: usize, s: usize) -> Result<Tensor> {
    if s == 1 {
        return Ok(g.clone());
    }
    let n = g.dim(dim)?;
    let zeros = g.zeros_like()?;
    let mut parts = vec![g.clone()];
    parts.extend(std::iter::repeat_n(zeros, s - 1));
    // Stacking after `dim` interleaves: [.., n, s, ..] → [.., n·s, ..].
    let stacked = Tensor::stack(&parts, dim + 1)?;
    let mut dims = g.dims().to_vec();
    dims[dim] = n * s;
    stacked.reshape(dims)?.narrow(dim, 0, (n - 1) * s + 1)
}

/// ∂L/∂x for `y = conv2d(x, w, stride, pad)`, `x` of spatial size `h × w_in`.
fn grad_input(
    grad: &Tensor,
    w: &Tensor,
    h: usize,
    w_in: usize,
    stride: usize,
    pad: usize,
) -> Result<Tensor> {
    let (kh, kw) = (w.dim(2)?, w.dim(3)?);
    let g = dilate(&dilate(grad, 2, stride)?, 3, stride)?;
    let (hd, wd) = (g.dim(2)?, g.dim(3)?);
    // After padding, a stride-1 valid convolution with a kh×kw kernel must give h × w_in.
    let g = g
        .pad_with_zeros(2, kh - 1 - pad, h + pad - hd)?
        .pad_with_zeros(3, kw - 1 - pad, w_in + pad - wd)?;
    let wf = w.flip(&[2, 3])?.transpose(0, 1)?.contiguous()?;
    g.conv2d(&wf, 0, 1, 1, 1)
}

/// ∂L/∂w for `y = conv2d(x, w, stride, pad)`: im2col of `x`, then a batched product.
fn grad_weight(
    x: &Tensor,
    grad: &Tensor,
    kh: usize,
    kw: usize,
    stride: usize,
    pad: usize,
) -> Result<Tensor> {
    let (b, ci, _, _) = x.dims4()?;
    let (_, co, oh, ow) = grad.dims4()?;
    let k = ci * kh * kw;
    let cols = if kh == 1 && kw == 1 && stride == 1 && pad == 0 {
        x.contiguous()?.reshape((b, k, oh * ow))?
    } else {
        let xp = x.pad_with_zeros(2, pad, pad)?.pad_with_zeros(3, pad, pad)?;
        let (hd, wd) = ((oh - 1) * stride + 1, (ow - 1) * stride + 1);
        let every = |n: usize| -> Result<Tensor> {
            let idx: Vec<u32> = (0..n).map(|i| (i * stride) as u32).collect();
            Tensor::from_vec(idx, n, x.device())
        };
        let (rows, colsi) = (every(oh)?, every(ow)?);
        let mut patches = Vec::with_capacity(kh * kw);
        for i in 0..kh {
            for j in 0..kw {
                let p = xp.narrow(2, i, hd)?.narrow(3, j, wd)?;
                let p = if stride > 1 {
                    p.contiguous()?
                        .index_select(&rows, 2)?
                        .index_select(&colsi, 3)?
                } else {
                    p
                };
                patches.push(p);
            }
        }
        // [b, ci, kh·kw, oh, ow]: the kernel's (ci, kh, kw) order.
        Tensor::stack(&patches, 2)?.reshape((b, k, oh * ow))?
    };
    let g = grad.reshape((b, co, oh * ow))?;
    // [b, co, k] summed over the batch.
    g.matmul(&cols.transpose(1, 2)?)?
        .sum(0)?
        .reshape((co, ci, kh, kw))
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var};

    fn max_diff(a: &Tensor, b: &Tensor) -> f32 {
        (a - b)
            .and_then(|d| d.abs())
            .and_then(|d| d.max_all())
            .and_then(|d| d.to_scalar::<f32>())
            .unwrap_or(f32::INFINITY)
    }

    /// The rewritten gradients equal candle's for the shapes the U-Net uses and a few others.
    #[test]
    fn gradients_match_candle() -> Result<()> {
        let dev = Device::Cpu;
        for &(h, w, ci, co, k, s, p) in &[
            (8usize, 8usize, 3usize, 4usize, 3usize, 1usize, 1usize),
            (28, 28, 2, 3, 3, 2, 1),
            (7, 7, 4, 4, 3, 2, 1),
            (16, 12, 3, 5, 3, 1, 1),
            (9, 6, 4, 2, 1, 1, 0),
            (10, 10, 2, 2, 3, 1, 0),
            (11, 11, 2, 3, 3, 3, 2),
        ] {
            let x = Var::randn(0f32, 1., (2, ci, h, w), &dev)?;
            let wt = Var::randn(0f32, 1., (co, ci, k, k), &dev)?;
            let ours = conv2d(&x, &wt, s, p)?;
            let stock = x.conv2d(&wt, p, s, 1, 1)?;
            assert!(
                max_diff(&ours, &stock) < 1e-5,
                "forward {h}x{w} k{k} s{s} p{p}"
            );
            let r = Tensor::randn(0f32, 1., ours.shape(), &dev)?;
            let g1 = (ours * &r)?.sum_all()?.backward()?;
            let g2 = (stock * &r)?.sum_all()?.backward()?;
            for (name, v) in [("x", x.as_tensor()), ("w", wt.as_tensor())] {
                let (a, b) = (g1.get(v).expect("grad"), g2.get(v).expect("grad"));
                assert_eq!(a.dims(), b.dims());
                let scale = b.abs()?.max_all()?.to_scalar::<f32>()?.max(1.0);
                let d = max_diff(a, b) / scale;
                assert!(d < 1e-5, "grad {name} {h}x{w} k{k} s{s} p{p}: {d}");
            }
        }
        Ok(())
    }
}
