//! 2-D convolution as a candle `CustomOp2` whose forward and both gradients are im2col/col2im
//! plus GEMMs. Samples go through the GEMMs in groups sized so that each product has at least
//! [`MIN_COLS`] columns (one sample at 28×28, four at 14×14, sixteen at 7×7): on the 196 or 49
//! columns of a single low-resolution sample the kernel runs far below its peak, and each call
//! repacks the weights. The column buffer is per thread and never kept for the backward pass (it
//! is rebuilt there), so memory stays at what stock candle keeps: the input.

use candle_core::{bail, CpuStorage, CustomOp2, CustomOp3, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

use super::bgemm::{bgemm, Bf16Kernel, Lhs, PackedA};
use super::contiguous_f32;
use super::gemm::{sgemm, MatRef};
use super::precision::round_in_place;
use super::simd::simd_fn;
use super::uninit::filled;

mod implicit;
use implicit::Padded;

/// The fewest GEMM columns (output positions, over the samples of a group) worth one call.
const MIN_COLS: usize = 768;

/// The left operand of a product (the weights): f32 (for the bf16 reference kernel, a copy
/// rounded to bf16 values), or packed once per op for the `vdpbf16ps` kernel
/// ([`super::bgemm`]).
#[derive(Debug, Clone, Copy)]
pub(crate) enum Weights<'a> {
    F32(MatRef<'a>),
    Bf16(&'a PackedA),
}

impl<'a> Weights<'a> {
    /// `w` for products in the precision `bf16` says (`None`: f32): packed for `vdpbf16ps`,
    /// or copied and rounded for the reference kernel. `packed` and `rounded` keep what it
    /// makes alive.
    fn prepare(
        w: MatRef<'a>,
        bf16: Option<Bf16Kernel>,
        packed: &'a mut Option<PackedA>,
        rounded: &'a mut Vec<f32>,
    ) -> Result<Self> {
        match bf16 {
            None => Ok(Self::F32(w)),
            Some(Bf16Kernel::Avx512) => Ok(Self::Bf16(packed.insert(PackedA::new(w)?))),
            Some(Bf16Kernel::Reference) => {
                w.check("weights")?;
                rounded.clear();
                for i in 0..w.rows {
                    rounded.extend((0..w.cols).map(|j| w.data[i * w.rs + j * w.cs]));
                }
                round_in_place(rounded);
                let r: &'a Vec<f32> = rounded;
                Ok(Self::F32(MatRef::row_major(r, w.rows, w.cols)))
            }
        }
    }
}

/// Whether products in precision `bf16` take operands rounded where they are built (the
/// reference kernel: rounded f32 values through the f32 GEMM), rather than rounded by the GEMM
/// itself (`vdpbf16ps`, which rounds while packing) or not at all (f32).
fn rounds(bf16: Option<Bf16Kernel>) -> bool {
    bf16 == Some(Bf16Kernel::Reference)
}

/// `dst [+]= a · b` in f32, or with bf16 inputs and f32 accumulation (`vdpbf16ps`).
fn product(dst: &mut [f32], a: Weights<'_>, b: MatRef<'_>, acc: bool, par: bool) -> Result<()> {
    match a {
        Weights::F32(a) => sgemm(dst, a, b, acc, par),
        Weights::Bf16(a) => bgemm(dst, Lhs::Packed(a), b, acc, par),
    }
}

/// `dst [+]= a · b` for operands that change with every call (no packing kept). For the
/// reference kernel the caller has rounded both.
fn product_of_views(
    dst: &mut [f32],
    a: MatRef<'_>,
    b: MatRef<'_>,
    acc: bool,
    par: bool,
    bf16: Option<Bf16Kernel>,
) -> Result<()> {
    if bf16 == Some(Bf16Kernel::Avx512) {
        return bgemm(dst, Lhs::View(a), b, acc, par);
    }
    sgemm(dst, a, b, acc, par)
}

/// The bias, rounded to bf16 values for bf16 products (as autocast casts it).
fn bias_for(bias: Option<&[f32]>, bf16: Option<Bf16Kernel>) -> Option<std::borrow::Cow<'_, [f32]>> {
    bias.map(|b| {
        if bf16.is_some() {
            let mut r = b.to_vec();
            round_in_place(&mut r);
            std::borrow::Cow::Owned(r)
        } else {
            std::borrow::Cow::Borrowed(b)
        }
    })
}

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
    /// Per-thread buffers and the GEMM calls are organised by [`ConvGeom::plan`]: samples per
    /// GEMM (always one on the implicit path, whose GEMMs read one padded image), and whether
    /// the groups run in parallel (else one after another, each GEMM itself parallel).
    fn plan(&self) -> (usize, bool) {
        let threads = rayon::current_num_threads();
        let want = if Padded::of(self).is_some() {
            1
        } else {
            MIN_COLS.div_ceil(self.l().max(1))
        };
        if threads > 1 && self.n >= threads {
            (want.min(self.n.div_ceil(threads)).max(1), true)
        } else {
            (want.min(self.n).max(1), false)
        }
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

simd_fn! {
/// Unfolds one image `[cin, h, w]` into `cols [cin·kh·kw, oh·ow]`, whose rows start `ld` apart
/// (`ld = oh·ow` for one image; wider when several images share the matrix side by side).
fn im2col(g: &ConvGeom, x: &[f32], cols: &mut [f32], ld: usize) {
    let l = g.l();
    for c in 0..g.cin {
        let plane = &x[c * g.h * g.w..(c + 1) * g.h * g.w];
        for ki in 0..g.kh {
            let (ylo, yhi) = valid_range(ki, g.pad, g.stride, g.h, g.oh);
            for kj in 0..g.kw {
                let (xlo, xhi) = valid_range(kj, g.pad, g.stride, g.w, g.ow);
                let row = ((c * g.kh + ki) * g.kw + kj) * ld;
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
}

simd_fn! {
/// Folds `cols [cin·kh·kw, oh·ow]` (rows `ld` apart) back into one image `[cin, h, w]`, summing
/// overlaps (the adjoint of [`im2col`]).
fn col2im(g: &ConvGeom, cols: &[f32], x: &mut [f32], ld: usize) {
    x.fill(0.0);
    for c in 0..g.cin {
        let plane = &mut x[c * g.h * g.w..(c + 1) * g.h * g.w];
        for ki in 0..g.kh {
            let (ylo, yhi) = valid_range(ki, g.pad, g.stride, g.h, g.oh);
            for kj in 0..g.kw {
                let (xlo, xhi) = valid_range(kj, g.pad, g.stride, g.w, g.ow);
                if xlo >= xhi {
                    continue;
                }
                let row = ((c * g.kh + ki) * g.kw + kj) * ld;
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
}

/// Per-worker buffers: the column matrix of a group, a `[cout, group·L]` staging matrix, and
/// the padded input of the implicit form with the geometry it was laid out for.
#[derive(Default)]
struct Scratch {
    cols: Vec<f32>,
    stage: Vec<f32>,
    q: (Vec<f32>, Option<ConvGeom>),
}

/// The column matrix `[K, s·L]` of the `s` images in `x`, side by side (the input itself for a
/// single image under a 1×1 convolution), its values rounded to bf16 when `round`.
fn columns<'a>(g: &ConvGeom, x: &'a [f32], cols: &'a mut Vec<f32>, round: bool) -> MatRef<'a> {
    let (k, l) = (g.k(), g.l());
    let s = x.len() / g.in_len();
    if s == 1 && g.pointwise() {
        if !round {
            return MatRef::row_major(x, k, l);
        }
        cols.clear();
        cols.extend_from_slice(x);
    } else {
        cols.resize(k * s * l, 0.0);
        for (i, xs) in x.chunks(g.in_len()).enumerate() {
            im2col(g, xs, &mut cols[i * l..], s * l);
        }
    }
    if round {
        round_in_place(&mut cols[..k * s * l]);
    }
    MatRef::row_major(cols, k, s * l)
}

/// The output gradients of the `s` samples in `grad` as one `[cout, s·L]` matrix (the gradient
/// itself for a single sample), its values rounded to bf16 when `round`.
fn grad_matrix<'a>(
    g: &ConvGeom,
    grad: &'a [f32],
    stage: &'a mut Vec<f32>,
    round: bool,
) -> MatRef<'a> {
    let l = g.l();
    let s = grad.len() / (g.cout * l);
    if s == 1 && !round {
        return MatRef::row_major(grad, g.cout, l);
    }
    stage.resize(g.cout * s * l, 0.0);
    for (i, gs) in grad.chunks(g.cout * l).enumerate() {
        for (c, src) in gs.chunks(l).enumerate() {
            let at = c * s * l + i * l;
            stage[at..at + l].copy_from_slice(src);
        }
    }
    if round {
        round_in_place(&mut stage[..g.cout * s * l]);
    }
    MatRef::row_major(stage, g.cout, s * l)
}

/// Forward of a group: `out [cout, s·L] = W [cout, K] · cols [K, s·L] (+ bias)`, written to
/// the samples' `[cout, L]` planes; `round` rounds the columns to bf16 (the reference kernel).
#[allow(clippy::too_many_arguments)]
fn fwd_group(
    g: &ConvGeom,
    wm: Weights<'_>,
    bias: Option<&[f32]>,
    x: &[f32],
    sc: &mut Scratch,
    out: &mut [f32],
    par: bool,
    round: bool,
) -> Result<()> {
    let l = g.l();
    let s = x.len() / g.in_len();
    let Scratch { cols, stage, .. } = sc;
    let colm = columns(g, x, cols, round);
    if s == 1 {
        product(out, wm, colm, false, par)?;
        if let Some(b) = bias {
            for (row, &bv) in out.chunks_mut(l.max(1)).zip(b) {
                super::bias::add_scalar(row, bv);
            }
        }
        return Ok(());
    }
    stage.resize(g.cout * s * l, 0.0);
    product(stage, wm, colm, false, par)?;
    for (i, o) in out.chunks_mut(g.cout * l).enumerate() {
        for (c, dst) in o.chunks_mut(l).enumerate() {
            let src = &stage[c * s * l + i * l..][..l];
            match bias {
                Some(b) => dst.iter_mut().zip(src).for_each(|(d, v)| *d = v + b[c]),
                None => dst.copy_from_slice(src),
            }
        }
    }
    Ok(())
}

/// The forward pass over a batch, its products in bf16 on the kernel `bf16` names (`None`: f32).
fn conv_forward(
    g: &ConvGeom,
    x: &[f32],
    w: &[f32],
    bias: Option<&[f32]>,
    bf16: Option<Bf16Kernel>,
) -> Result<Vec<f32>> {
    let bias = bias_for(bias, bf16);
    let bias = bias.as_deref();
    let round = rounds(bf16);
    if let Some(p) = Padded::of(g) {
        let mut wr = implicit::by_kernel_row(g, w);
        if round {
            round_in_place(&mut wr);
        }
        let mut packs = Vec::new();
        let packed = bf16 == Some(Bf16Kernel::Avx512);
        let wr = implicit::KernelRows::new(g, &wr, packed, &mut packs)?;
        let fill = |out: &mut [std::mem::MaybeUninit<f32>]| {
            per_group(
                g,
                g.plan(),
                out,
                g.cout * g.l(),
                x,
                g.in_len(),
                |o, xs, sc, par| {
                    let q = &mut sc.q;
                    implicit::forward(g, &p, &wr, bias, xs, q, &mut sc.stage, o, par, round)
                },
            )
        };
        // SAFETY: the closure writes every element of its buffer (each output index once;
        // checked by every workspace test (feature `check-uninit`) and in debug builds,
        // where an unwritten element is an error: ddpm-unet's
        // `a_kernel_that_skips_an_element_fails_the_tests`).
        #[allow(unsafe_code)]
        return unsafe { filled(g.n * g.cout * g.l(), "conv2d", fill) };
    }
    let (mut packed, mut rounded) = (None, Vec::new());
    let wm = MatRef::row_major(w, g.cout, g.k());
    let wm = Weights::prepare(wm, bf16, &mut packed, &mut rounded)?;
    let mut out = vec![0f32; g.n * g.cout * g.l()];
    per_group(
        g,
        g.plan(),
        &mut out,
        g.cout * g.l(),
        x,
        g.in_len(),
        |o, xs, sc, par| fwd_group(g, wm, bias, xs, sc, o, par, round),
    )?;
    Ok(out)
}

/// Runs `f(out_chunk, in_chunk, scratch, parallel_gemm)` for each group of samples of
/// [`ConvGeom::plan`]: across groups on the rayon pool, or one after another with the GEMM itself
/// parallel. Each worker reuses one scratch.
fn per_group<T: Send>(
    g: &ConvGeom,
    (s, across): (usize, bool),
    out: &mut [T],
    out_len: usize,
    inp: &[f32],
    in_len: usize,
    f: impl Fn(&mut [T], &[f32], &mut Scratch, bool) -> Result<()> + Sync,
) -> Result<()> {
    if out_len == 0 || in_len == 0 {
        return Ok(());
    }
    let s = s.max(1);
    if across {
        let per_thread = g.n.div_ceil(s).div_ceil(rayon::current_num_threads());
        out.par_chunks_mut(s * out_len)
            .zip(inp.par_chunks(s * in_len))
            .with_min_len(per_thread.max(1))
            .try_for_each_init(Scratch::default, |sc, (o, i)| f(o, i, sc, false))
    } else {
        let mut sc = Scratch::default();
        for (o, i) in out.chunks_mut(s * out_len).zip(inp.chunks(s * in_len)) {
            f(o, i, &mut sc, true)?;
        }
        Ok(())
    }
}

/// `Σ f(x_group, grad_group)` over the groups of [`ConvGeom::plan`], each call adding into a
/// `len`-long accumulator: one per worker when the groups run in parallel, summed at the end.
fn per_sample_sum(
    g: &ConvGeom,
    x: &[f32],
    grad: &[f32],
    len: usize,
    f: impl Fn(&[f32], &[f32], &mut Scratch, &mut [f32], bool) -> Result<()> + Sync,
) -> Result<Vec<f32>> {
    let (group, across) = g.plan();
    let (xlen, glen) = (group * g.in_len(), group * g.cout * g.l());
    if xlen == 0 || glen == 0 {
        return Ok(vec![0f32; len]);
    }
    if across {
        let per_thread = g.n.div_ceil(group).div_ceil(rayon::current_num_threads());
        x.par_chunks(xlen)
            .zip(grad.par_chunks(glen))
            .with_min_len(per_thread.max(1))
            .try_fold(
                || (vec![0f32; len], Scratch::default()),
                |(mut acc, mut sc), (xs, gs)| {
                    f(xs, gs, &mut sc, &mut acc, false)?;
                    Ok::<_, candle_core::Error>((acc, sc))
                },
            )
            .map(|r| r.map(|(acc, _)| acc))
            .try_reduce(
                || vec![0f32; len],
                |mut a, b| {
                    a.iter_mut().zip(&b).for_each(|(a, b)| *a += b);
                    Ok(a)
                },
            )
    } else {
        let mut acc = vec![0f32; len];
        let mut sc = Scratch::default();
        for (xs, gs) in x.chunks(xlen).zip(grad.chunks(glen)) {
            f(xs, gs, &mut sc, &mut acc, true)?;
        }
        Ok(acc)
    }
}

/// Input gradient of a group: `dcols [K, s·L] = Wᵀ · g [cout, s·L]`, then col2im per sample;
/// `round` rounds the gradient to bf16 (the reference kernel).
fn bwd_data_group(
    g: &ConvGeom,
    wt: Weights<'_>,
    grad: &[f32],
    sc: &mut Scratch,
    dx: &mut [f32],
    par: bool,
    round: bool,
) -> Result<()> {
    let (k, l) = (g.k(), g.l());
    let s = grad.len() / (g.cout * l);
    let Scratch { cols, stage, .. } = sc;
    let gm = grad_matrix(g, grad, stage, round);
    if s == 1 && g.pointwise() {
        return product(dx, wt, gm, false, par);
    }
    cols.resize(k * s * l, 0.0);
    product(cols, wt, gm, false, par)?;
    for (i, d) in dx.chunks_mut(g.in_len()).enumerate() {
        col2im(g, &cols[i * l..], d, s * l);
    }
    Ok(())
}

/// Kernel gradient contribution of a group, transposed: `dWᵀ [K, cout] += cols [K, s·L] ·
/// gᵀ [s·L, cout]` (in this orientation the GEMM reads the column matrix unpacked).
#[allow(clippy::too_many_arguments)]
fn bwd_filter_group(
    g: &ConvGeom,
    x: &[f32],
    grad: &[f32],
    sc: &mut Scratch,
    dwt: &mut [f32],
    par: bool,
    bf16: Option<Bf16Kernel>,
) -> Result<()> {
    let Scratch { cols, stage, .. } = sc;
    let round = rounds(bf16);
    let gm = grad_matrix(g, grad, stage, round);
    let colm = columns(g, x, cols, round);
    product_of_views(dwt, colm, gm.t(), true, par, bf16)
}

/// `conv2d(x, w)` without bias: the forward op, differentiable in both arguments.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Conv2dOp {
    pub stride: usize,
    pub pad: usize,
    /// bf16 products (inputs, weights and output gradients rounded to bf16, f32 accumulation)
    /// on this kernel (`None`: f32): `vdpbf16ps`, which the caller checked that the CPU has, or
    /// the reference kernel, which rounds the operands where they are built (the padded input,
    /// the column matrix, the gradient matrix) and runs the f32 GEMM. Either way nothing
    /// rounded outlives the op, so memory stays f32's.
    pub bf16: Option<Bf16Kernel>,
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
        let out = conv_forward(&g, x, w, None, self.bf16)?;
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
        let out = conv_forward(&g, x, w, Some(b), self.bf16)?;
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
        // Under bf16 the bias's gradient sums the bf16-rounded output gradient, as the
        // reference path's (and autocast's) does.
        let gb = if self.bf16.is_some() {
            super::precision::rounded(&grad)?
        } else {
            grad
        };
        let db = gb.apply_op1_no_bwd(&super::bias::SumPlanes { per_sample: false })?;
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
                bf16: self.bf16,
            },
        )?;
        let dw = x.apply_op2_no_bwd(
            grad,
            &Conv2dBwdFilter {
                stride: self.stride,
                pad: self.pad,
                kernel_hw: (w.dim(2)?, w.dim(3)?),
                bf16: self.bf16,
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
    bf16: Option<Bf16Kernel>,
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
        let round = rounds(self.bf16);
        if let Some((gt, p)) = Padded::transposed(&g) {
            let mut wr = implicit::flipped_by_kernel_row(&g, &gt, w);
            if round {
                round_in_place(&mut wr);
            }
            let mut packs = Vec::new();
            let packed = self.bf16 == Some(Bf16Kernel::Avx512);
            let wr = implicit::KernelRows::new(&gt, &wr, packed, &mut packs)?;
            let fill = |dx: &mut [std::mem::MaybeUninit<f32>]| {
                per_group(
                    &gt,
                    gt.plan(),
                    dx,
                    g.in_len(),
                    grad,
                    g.cout * g.l(),
                    |d, gs, sc, par| {
                        let q = &mut sc.q;
                        implicit::forward(&gt, &p, &wr, None, gs, q, &mut sc.stage, d, par, round)
                    },
                )
            };
            // SAFETY: the closure writes every element of its buffer (each output index once;
            // checked by every workspace test (feature `check-uninit`) and in debug builds,
            // where an unwritten element is an error: ddpm-unet's
            // `a_kernel_that_skips_an_element_fails_the_tests`).
            #[allow(unsafe_code)]
            let dx = unsafe { filled(n * g.in_len(), "conv2d backward", fill) }?;
            return Ok((CpuStorage::F32(dx), Shape::from((n, cin, h, wd))));
        }
        let (mut packed, mut rounded) = (None, Vec::new());
        let wt = MatRef::row_major(w, g.cout, g.k()).t();
        let wt = Weights::prepare(wt, self.bf16, &mut packed, &mut rounded)?;
        let mut dx = vec![0f32; n * g.in_len()];
        per_group(
            &g,
            g.plan(),
            &mut dx,
            g.in_len(),
            grad,
            g.cout * g.l(),
            |d, gs, sc, par| bwd_data_group(&g, wt, gs, sc, d, par, round),
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
    bf16: Option<Bf16Kernel>,
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
        let wlen = cout * g.k();
        if let Some(p) = Padded::of(&g) {
            let dwr = per_sample_sum(&g, x, grad, wlen, |xs, gs, sc, dwr, par| {
                implicit::filter_grad(&g, &p, xs, gs, sc, dwr, par, self.bf16)
            })?;
            let dw = implicit::from_kernel_rows(&g, &dwr);
            return Ok((CpuStorage::F32(dw), Shape::from((cout, cin, kh, kw))));
        }
        let dwt = per_sample_sum(&g, x, grad, wlen, |xs, gs, sc, dwt, par| {
            bwd_filter_group(&g, xs, gs, sc, dwt, par, self.bf16)
        })?;
        let k = g.k();
        let mut dw = vec![0f32; wlen];
        for (co, row) in dw.chunks_mut(k.max(1)).enumerate() {
            for (r, v) in row.iter_mut().enumerate() {
                *v = dwt[r * cout + co];
            }
        }
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
            im2col(&g, &x, &mut cols, g.l());
            let mut back = vec![0.0; g.in_len()];
            col2im(&g, &c, &mut back, g.l());
            let lhs: f64 = cols.iter().zip(&c).map(|(a, b)| (a * b) as f64).sum();
            let rhs: f64 = x.iter().zip(&back).map(|(a, b)| (a * b) as f64).sum();
            assert!(
                (lhs - rhs).abs() < 1e-3,
                "{h}x{w} k{k} s{stride} p{pad}: {lhs} vs {rhs}"
            );
        }
    }
}
