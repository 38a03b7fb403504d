//! 2-D convolution as a candle `CustomOp2` whose forward and both gradients are im2col/col2im
//! plus one GEMM per sample. The column buffer is per thread and never kept for the backward
//! pass (it is rebuilt there), so memory stays at what stock candle keeps: the input.

use candle_core::{bail, CpuStorage, CustomOp2, CustomOp3, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

use super::contiguous_f32;
use super::gemm::{sgemm, MatRef};

/// The shape of one convolution: input `[n, cin, h, w]`, kernel `[cout, cin, kh, kw]`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct ConvGeom {
    pub n: usize,
    pub cin: usize,
    pub h: usize,
    pub w: usize,
    pub cout: usize,
    pub kh: usize,
    pub kw: usize,
    pub stride: usize,
    pub pad: usize,
    pub oh: usize,
    pub ow: usize,
}

impl ConvGeom {
    pub fn new(x: &[usize], k: &[usize], stride: usize, pad: usize) -> Result<Self> {
        let (&[n, cin, h, w], &[cout, kc, kh, kw]) = (x, k) else {
            bail!("conv2d: expected 4-D input and kernel, got {x:?} and {k:?}")
        };
        if kc != cin {
            bail!("conv2d: input has {cin} channels, kernel expects {kc}")
        }
        if stride == 0 {
            bail!("conv2d: stride must be positive")
        }
        if h + 2 * pad < kh || w + 2 * pad < kw {
            bail!("conv2d: kernel {kh}x{kw} larger than padded input {h}x{w} (+{pad})")
        }
        Ok(Self {
            n,
            cin,
            h,
            w,
            cout,
            kh,
            kw,
            stride,
            pad,
            oh: (h + 2 * pad - kh) / stride + 1,
            ow: (w + 2 * pad - kw) / stride + 1,
        })
    }
    /// Rows of the column matrix: `cin · kh · kw`.
    fn k(&self) -> usize {
        self.cin * self.kh * self.kw
    }
    /// Output positions per image.
    fn l(&self) -> usize {
        self.oh * self.ow
    }
    fn in_len(&self) -> usize {
        self.cin * self.h * self.w
    }
    /// A 1×1 stride-1 unpadded convolution needs no column matrix: the input is one.
    fn pointwise(&self) -> bool {
        self.kh == 1 && self.kw == 1 && self.stride == 1 && self.pad == 0
    }
    /// Parallelise across samples when there are enough of them, else inside each GEMM.
    fn across_samples(&self) -> bool {
        let threads = rayon::current_num_threads();
        threads > 1 && self.n >= threads
    }
    fn chunk_len(&self) -> usize {
        self.n.div_ceil(rayon::current_num_threads()).max(1)
    }
}

/// Valid output range `[lo, hi)` along one axis for kernel offset `k`: the outputs whose input
/// coordinate `o·stride + k − pad` falls inside `[0, size)`.
fn valid_range(k: usize, pad: usize, stride: usize, size: usize, out: usize) -> (usize, usize) {
    let lo = pad.saturating_sub(k).div_ceil(stride);
    // o·stride + k − pad ≤ size − 1  ⇔  o ≤ (size − 1 + pad − k) / stride
    let hi = if size + pad > k {
        ((size - 1 + pad - k) / stride + 1).min(out)
    } else {
        0
    };
    (lo.min(hi), hi)
}

/// Unfolds one image `[cin, h, w]` into `cols [cin·kh·kw, oh·ow]`.
fn im2col(g: &ConvGeom, x: &[f32], cols: &mut [f32]) {
    let l = g.l();
    for c in 0..g.cin {
        let plane = &x[c * g.h * g.w..(c + 1) * g.h * g.w];
        for ki in 0..g.kh {
            let (ylo, yhi) = valid_range(ki, g.pad, g.stride, g.h, g.oh);
            for kj in 0..g.kw {
                let (xlo, xhi) = valid_range(kj, g.pad, g.stride, g.w, g.ow);
                let row = ((c * g.kh + ki) * g.kw + kj) * l;
                let dst = &mut cols[row..row + l];
                for oy in 0..g.oh {
                    let line = &mut dst[oy * g.ow..(oy + 1) * g.ow];
                    if oy < ylo || oy >= yhi || xlo >= xhi {
                        line.fill(0.0);
                        continue;
                    }
                    let iy = oy * g.stride + ki - g.pad;
                    let src = &plane[iy * g.w..(iy + 1) * g.w];
                    line[..xlo].fill(0.0);
                    line[xhi..].fill(0.0);
                    if g.stride == 1 {
                        let x0 = xlo + kj - g.pad;
                        line[xlo..xhi].copy_from_slice(&src[x0..x0 + (xhi - xlo)]);
                    } else {
                        for (ox, v) in line.iter_mut().enumerate().take(xhi).skip(xlo) {
                            *v = src[ox * g.stride + kj - g.pad];
                        }
                    }
                }
            }
        }
    }
}

/// Folds `cols [cin·kh·kw, oh·ow]` back into one image `[cin, h, w]`, summing overlaps
/// (the adjoint of [`im2col`]).
fn col2im(g: &ConvGeom, cols: &[f32], x: &mut [f32]) {
    x.fill(0.0);
    let l = g.l();
    for c in 0..g.cin {
        let plane = &mut x[c * g.h * g.w..(c + 1) * g.h * g.w];
        for ki in 0..g.kh {
            let (ylo, yhi) = valid_range(ki, g.pad, g.stride, g.h, g.oh);
            for kj in 0..g.kw {
                let (xlo, xhi) = valid_range(kj, g.pad, g.stride, g.w, g.ow);
                if xlo >= xhi {
                    continue;
                }
                let row = ((c * g.kh + ki) * g.kw + kj) * l;
                for oy in ylo..yhi {
                    let iy = oy * g.stride + ki - g.pad;
                    let line = &cols[row + oy * g.ow..row + (oy + 1) * g.ow];
                    let dst = &mut plane[iy * g.w..(iy + 1) * g.w];
                    if g.stride == 1 {
                        let x0 = xlo + kj - g.pad;
                        for (d, s) in dst[x0..x0 + (xhi - xlo)].iter_mut().zip(&line[xlo..xhi]) {
                            *d += s;
                        }
                    } else {
                        for (ox, s) in line.iter().enumerate().take(xhi).skip(xlo) {
                            dst[ox * g.stride + kj - g.pad] += s;
                        }
                    }
                }
            }
        }
    }
}

/// Forward of one sample: `out [cout, L] = W [cout, K] · cols [K, L] (+ bias)`.
fn fwd_sample(
    g: &ConvGeom,
    w: &[f32],
    bias: Option<&[f32]>,
    x: &[f32],
    cols: &mut Vec<f32>,
    out: &mut [f32],
    par: bool,
) -> Result<()> {
    let (k, l) = (g.k(), g.l());
    let colm = if g.pointwise() {
        MatRef::row_major(x, k, l)
    } else {
        cols.resize(k * l, 0.0);
        im2col(g, x, cols);
        MatRef::row_major(cols, k, l)
    };
    sgemm(out, MatRef::row_major(w, g.cout, k), colm, false, par)?;
    if let Some(b) = bias {
        for (row, &bv) in out.chunks_mut(l.max(1)).zip(b) {
            row.iter_mut().for_each(|v| *v += bv);
        }
    }
    Ok(())
}

/// The forward pass over a batch.
fn conv_forward(g: &ConvGeom, x: &[f32], w: &[f32], bias: Option<&[f32]>) -> Result<Vec<f32>> {
    let mut out = vec![0f32; g.n * g.cout * g.l()];
    per_sample(
        g,
        &mut out,
        g.cout * g.l(),
        x,
        g.in_len(),
        |o, xs, cols, par| fwd_sample(g, w, bias, xs, cols, o, par),
    )?;
    Ok(out)
}

/// Runs `f(out_chunk, in_chunk, column_buffer, parallel_gemm)` for each sample: across samples
/// on the rayon pool when there is at least one per thread, else one after another with the
/// GEMM itself parallel. Each worker reuses one column buffer.
fn per_sample(
    g: &ConvGeom,
    out: &mut [f32],
    out_len: usize,
    inp: &[f32],
    in_len: usize,
    f: impl Fn(&mut [f32], &[f32], &mut Vec<f32>, bool) -> Result<()> + Sync,
) -> Result<()> {
    if g.across_samples() {
        out.par_chunks_mut(out_len)
            .zip(inp.par_chunks(in_len))
            .with_min_len(g.chunk_len())
            .try_for_each_init(Vec::new, |cols, (o, i)| f(o, i, cols, false))
    } else {
        let mut cols = Vec::new();
        for (o, i) in out.chunks_mut(out_len).zip(inp.chunks(in_len)) {
            f(o, i, &mut cols, true)?;
        }
        Ok(())
    }
}

/// Input gradient of one sample: `dcols [K, L] = Wᵀ · g [cout, L]`, then col2im.
fn bwd_data_sample(
    g: &ConvGeom,
    w: &[f32],
    grad: &[f32],
    cols: &mut Vec<f32>,
    dx: &mut [f32],
    par: bool,
) -> Result<()> {
    let (k, l) = (g.k(), g.l());
    let wt = MatRef::row_major(w, g.cout, k).t();
    let gm = MatRef::row_major(grad, g.cout, l);
    if g.pointwise() {
        return sgemm(dx, wt, gm, false, par);
    }
    cols.resize(k * l, 0.0);
    sgemm(cols, wt, gm, false, par)?;
    col2im(g, cols, dx);
    Ok(())
}

/// Kernel gradient contribution of one sample: `dW [cout, K] += g [cout, L] · colsᵀ [L, K]`.
fn bwd_filter_sample(
    g: &ConvGeom,
    x: &[f32],
    grad: &[f32],
    cols: &mut Vec<f32>,
    dw: &mut [f32],
    par: bool,
) -> Result<()> {
    let (k, l) = (g.k(), g.l());
    let colm = if g.pointwise() {
        MatRef::row_major(x, k, l)
    } else {
        cols.resize(k * l, 0.0);
        im2col(g, x, cols);
        MatRef::row_major(cols, k, l)
    };
    sgemm(dw, MatRef::row_major(grad, g.cout, l), colm.t(), true, par)
}

/// `conv2d(x, w)` without bias: the forward op, differentiable in both arguments.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Conv2dOp {
    pub stride: usize,
    pub pad: usize,
}

impl CustomOp2 for Conv2dOp {
    fn name(&self) -> &'static str {
        "ddpm-conv2d"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let x = contiguous_f32(s1, l1, "conv2d input")?;
        let w = contiguous_f32(s2, l2, "conv2d kernel")?;
        let g = ConvGeom::new(l1.dims(), l2.dims(), self.stride, self.pad)?;
        let out = conv_forward(&g, x, w, None)?;
        Ok((CpuStorage::F32(out), Shape::from((g.n, g.cout, g.oh, g.ow))))
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        self.grads(x, w, &grad.contiguous()?)
    }
}

/// `conv2d(x, w) + b` with the bias added while the output is in cache; differentiable in all
/// three arguments.
impl CustomOp3 for Conv2dOp {
    fn name(&self) -> &'static str {
        "ddpm-conv2d-bias"
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
        let x = contiguous_f32(s1, l1, "conv2d input")?;
        let w = contiguous_f32(s2, l2, "conv2d kernel")?;
        let b = contiguous_f32(s3, l3, "conv2d bias")?;
        let g = ConvGeom::new(l1.dims(), l2.dims(), self.stride, self.pad)?;
        if l3.dims() != [g.cout] {
            bail!("conv2d: bias must be [{}], got {:?}", g.cout, l3.dims())
        }
        let out = conv_forward(&g, x, w, Some(b))?;
        Ok((CpuStorage::F32(out), Shape::from((g.n, g.cout, g.oh, g.ow))))
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        _b: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let grad = grad.contiguous()?;
        let (dx, dw) = self.grads(x, w, &grad)?;
        let db = grad.apply_op1_no_bwd(&super::bias::SumPlanes { per_sample: false })?;
        Ok((dx, dw, Some(db)))
    }
}

impl Conv2dOp {
    fn grads(
        &self,
        x: &Tensor,
        w: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let dx = grad.apply_op2_no_bwd(
            w,
            &Conv2dBwdData {
                stride: self.stride,
                pad: self.pad,
                input_hw: (x.dim(2)?, x.dim(3)?),
            },
        )?;
        let dw = x.apply_op2_no_bwd(
            grad,
            &Conv2dBwdFilter {
                stride: self.stride,
                pad: self.pad,
                kernel_hw: (w.dim(2)?, w.dim(3)?),
            },
        )?;
        Ok((Some(dx), Some(dw)))
    }
}

/// Input gradient: `(grad [n, cout, oh, ow], w) → dx [n, cin, h, w]`.
#[derive(Debug, Clone, Copy)]
struct Conv2dBwdData {
    stride: usize,
    pad: usize,
    input_hw: (usize, usize),
}

impl CustomOp2 for Conv2dBwdData {
    fn name(&self) -> &'static str {
        "ddpm-conv2d-bwd-data"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let grad = contiguous_f32(s1, l1, "conv2d output gradient")?;
        let w = contiguous_f32(s2, l2, "conv2d kernel")?;
        let (n, cin) = (l1.dims()[0], l2.dims()[1]);
        let (h, wd) = self.input_hw;
        let g = ConvGeom::new(&[n, cin, h, wd], l2.dims(), self.stride, self.pad)?;
        if l1.dims() != [n, g.cout, g.oh, g.ow] {
            bail!(
                "conv2d backward: gradient shape {:?} does not match",
                l1.dims()
            )
        }
        let mut dx = vec![0f32; n * g.in_len()];
        per_sample(
            &g,
            &mut dx,
            g.in_len(),
            grad,
            g.cout * g.l(),
            |d, gs, cols, par| bwd_data_sample(&g, w, gs, cols, d, par),
        )?;
        Ok((CpuStorage::F32(dx), Shape::from((n, cin, h, wd))))
    }
}

/// Kernel gradient: `(x [n, cin, h, w], grad [n, cout, oh, ow]) → dw [cout, cin, kh, kw]`.
#[derive(Debug, Clone, Copy)]
struct Conv2dBwdFilter {
    stride: usize,
    pad: usize,
    kernel_hw: (usize, usize),
}

impl CustomOp2 for Conv2dBwdFilter {
    fn name(&self) -> &'static str {
        "ddpm-conv2d-bwd-filter"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let x = contiguous_f32(s1, l1, "conv2d input")?;
        let grad = contiguous_f32(s2, l2, "conv2d output gradient")?;
        let (kh, kw) = self.kernel_hw;
        let (cin, cout) = (l1.dims()[1], l2.dims()[1]);
        let g = ConvGeom::new(l1.dims(), &[cout, cin, kh, kw], self.stride, self.pad)?;
        if l2.dims() != [g.n, cout, g.oh, g.ow] {
            bail!(
                "conv2d backward: gradient shape {:?} does not match",
                l2.dims()
            )
        }
        let (wlen, glen) = (cout * g.k(), cout * g.l());
        let dw = if g.across_samples() {
            x.par_chunks(g.in_len())
                .zip(grad.par_chunks(glen))
                .with_min_len(g.chunk_len())
                .try_fold(
                    || (vec![0f32; wlen], Vec::new()),
                    |(mut dw, mut cols), (xs, gs)| {
                        bwd_filter_sample(&g, xs, gs, &mut cols, &mut dw, false)?;
                        Ok::<_, candle_core::Error>((dw, cols))
                    },
                )
                .map(|r| r.map(|(dw, _)| dw))
                .try_reduce(
                    || vec![0f32; wlen],
                    |mut a, b| {
                        a.iter_mut().zip(&b).for_each(|(a, b)| *a += b);
                        Ok(a)
                    },
                )?
        } else {
            let mut dw = vec![0f32; wlen];
            let mut cols = Vec::new();
            for (xs, gs) in x.chunks(g.in_len()).zip(grad.chunks(glen)) {
                bwd_filter_sample(&g, xs, gs, &mut cols, &mut dw, true)?;
            }
            dw
        };
        Ok((CpuStorage::F32(dw), Shape::from((cout, cin, kh, kw))))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn col2im_is_the_adjoint_of_im2col() {
        // <im2col(x), c> == <x, col2im(c)> for every geometry the U-Net uses, plus odd ones.
        for (h, w, k, stride, pad) in [
            (5, 7, 3, 1, 1),
            (6, 6, 3, 2, 1),
            (7, 5, 3, 2, 1),
            (4, 4, 1, 1, 0),
            (5, 3, 2, 2, 0),
            (3, 3, 3, 1, 0),
        ] {
            let g = ConvGeom::new(&[1, 2, h, w], &[1, 2, k, k], stride, pad).unwrap_or_else(|e| {
                panic!("{e}");
            });
            let x: Vec<f32> = (0..g.in_len()).map(|i| (i as f32 * 0.7).sin()).collect();
            let c: Vec<f32> = (0..g.k() * g.l()).map(|i| (i as f32 * 0.3).cos()).collect();
            let mut cols = vec![0.0; g.k() * g.l()];
            im2col(&g, &x, &mut cols);
            let mut back = vec![0.0; g.in_len()];
            col2im(&g, &c, &mut back);
            let lhs: f64 = cols.iter().zip(&c).map(|(a, b)| (a * b) as f64).sum();
            let rhs: f64 = x.iter().zip(&back).map(|(a, b)| (a * b) as f64).sum();
            assert!(
                (lhs - rhs).abs() < 1e-3,
                "{h}x{w} k{k} s{stride} p{pad}: {lhs} vs {rhs}"
            );
        }
    }
}
