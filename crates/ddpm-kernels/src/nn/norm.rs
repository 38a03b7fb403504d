//! GroupNorm with its affine transform and an optional SiLU fused into one pass, with a
//! hand-written backward (one pass per group, instead of candle's ten-op composition).

use candle_core::{bail, CpuStorage, CustomOp2, CustomOp3, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

use super::contiguous_f32;
use super::simd::simd_fn;
use super::uninit::{filled, Slot};

/// `y = act(γ · (v − μ_g)/σ_g + β)` with `v = x + shift` over `x [n, c, *]`; the second input
/// packs `[γ (c) ‖ β (c) ‖ shift (n·c)]` into one vector (so one backward op returns all
/// gradients; the per-sample shift fuses the U-Net's embedding addition into the norm).
#[derive(Debug, Clone, Copy)]
pub(crate) struct GroupNormOp {
    pub groups: usize,
    pub eps: f32,
    pub silu: bool,
}

struct Geom {
    c: usize,
    cg: usize,
    s: usize,
    np: usize,
}

impl GroupNormOp {
    fn geom(&self, x: &Layout, gb: &Layout) -> Result<Geom> {
        let dims = x.dims();
        if dims.len() < 2 {
            bail!("group_norm: input must be [n, c, ...], got {dims:?}")
        }
        let c = dims[1];
        if self.groups == 0 || !c.is_multiple_of(self.groups) {
            bail!(
                "group_norm: {c} channels not divisible into {} groups",
                self.groups
            )
        }
        let np = 2 * c + dims[0] * c;
        if gb.dims() != [np] {
            bail!(
                "group_norm: packed parameters must be [{np}], got {:?}",
                gb.dims()
            )
        }
        Ok(Geom {
            c,
            cg: c / self.groups,
            s: dims[2..].iter().product(),
            np,
        })
    }
}

simd_fn! {
/// Mean and 1/σ of one group's values: f32 partial sums in 16 lanes (vectorised), combined in
/// f64, shifted by the first value to avoid cancellation in E[x²] − E[x]².
fn stats(v: &[f32], eps: f32) -> (f32, f32) {
    let Some(&shift) = v.first() else {
        return (0.0, 1.0 / eps.sqrt());
    };
    let (mut s1, mut s2) = ([0f32; 16], [0f32; 16]);
    let chunks = v.chunks_exact(16);
    let rest = chunks.remainder();
    for c in chunks {
        for i in 0..16 {
            let d = c[i] - shift;
            s1[i] += d;
            s2[i] += d * d;
        }
    }
    let (mut t1, mut t2) = (0f64, 0f64);
    for i in 0..16 {
        t1 += s1[i] as f64;
        t2 += s2[i] as f64;
    }
    for &x in rest {
        let d = (x - shift) as f64;
        t1 += d;
        t2 += d * d;
    }
    let n = v.len() as f64;
    let m = t1 / n;
    let var = (t2 / n - m * m).max(0.0);
    (
        (shift as f64 + m) as f32,
        (1.0 / (var + eps as f64).sqrt()) as f32,
    )
}
}

/// [`stats`] of a group of `cg` planes of `s` values, plane `i` shifted by `shift[i]`.
fn shifted_stats(xg: &[f32], shift: &[f32], s: usize, eps: f32) -> (f32, f32) {
    if shift.iter().all(|&v| v == 0.0) {
        return stats(xg, eps);
    }
    // Per-plane mean and variance, merged exactly (Chan et al.): no E[x²] − E[x]² cancellation.
    let planes: Vec<(f64, f64, f64)> = xg
        .chunks(s.max(1))
        .zip(shift)
        .map(|(plane, &sh)| {
            let (m, rstd) = stats(plane, eps);
            let var = (1.0 / (rstd as f64).powi(2) - eps as f64).max(0.0);
            (plane.len() as f64, m as f64 + sh as f64, var)
        })
        .collect();
    let n: f64 = planes.iter().map(|p| p.0).sum::<f64>().max(1.0);
    let mean = planes.iter().map(|p| p.0 * p.1).sum::<f64>() / n;
    let m2: f64 = planes
        .iter()
        .map(|&(len, m, var)| len * (var + (m - mean).powi(2)))
        .sum();
    (mean as f32, (1.0 / (m2 / n + eps as f64).sqrt()) as f32)
}

/// `e^x` to about 2 ulp for x in [−87, 88] (clamped outside), branch-free so loops over it
/// vectorise (libm's `expf` is a scalar call per element).
#[inline(always)]
pub(crate) fn fast_exp(x: f32) -> f32 {
    let x = x.clamp(-87.0, 88.0);
    // e^x = 2^n · e^r with n = round(x / ln 2), r = x − n·ln 2 in [−ln2/2, ln2/2].
    // Round to nearest with the 1.5·2²³ trick: the integer lands in the low mantissa bits,
    // so no libm `roundf` call and no float→int conversion (both block vectorisation).
    const MAGIC: f32 = 12_582_912.0;
    let t = x * std::f32::consts::LOG2_E + MAGIC;
    let ni = t.to_bits().wrapping_sub(MAGIC.to_bits());
    let n = t - MAGIC;
    let r = x - n * 0.693_145_75 - n * 1.428_606_8e-6;
    // Degree-6 Taylor polynomial of e^r (error < 2e-8 on the interval).
    let p = 1.0
        + r * (1.0
            + r * (0.5
                + r * (1.0 / 6.0 + r * (1.0 / 24.0 + r * (1.0 / 120.0 + r * (1.0 / 720.0))))));
    f32::from_bits(ni.wrapping_add(127) << 23) * p
}

#[inline(always)]
fn sigmoid(z: f32) -> f32 {
    1.0 / (1.0 + fast_exp(-z))
}

simd_fn! {
/// Forward over one channel plane: `y = act(x·a + b)`, in blocks of [`LANES`] so it vectorises.
fn fwd_plane<const SILU: bool>(y: &mut [Slot], x: &[f32], a: f32, b: f32) {
    let one = |v: f32| {
        let z = v * a + b;
        if SILU {
            z * sigmoid(z)
        } else {
            z
        }
    };
    let mut ych = y.chunks_exact_mut(LANES);
    let mut xch = x.chunks_exact(LANES);
    for (yv, xv) in (&mut ych).zip(&mut xch) {
        for i in 0..LANES {
            yv[i] = Slot::new(one(xv[i]));
        }
    }
    for (o, &v) in ych.into_remainder().iter_mut().zip(xch.remainder()) {
        *o = Slot::new(one(v));
    }
}
}

/// Lanes of the partial sums in the backward passes: a float sum may not be reordered, so a
/// single accumulator keeps the loop scalar; `LANES` independent ones let it vectorise.
const LANES: usize = 16;

simd_fn! {
/// First backward pass over one channel plane: writes dz·γ into `dx` and returns
/// (Σ dz·x̂, Σ dz), where dz is the gradient before the affine (through SiLU when `SILU`).
fn bwd_pass1<const SILU: bool>(
    dx: &mut [f32],
    x: &[f32],
    dy: &[f32],
    off: f32,
    rstd: f32,
    ga: f32,
    be: f32,
) -> (f32, f32) {
    let one = |v: f32, gy: f32| {
        let xh = (v + off) * rstd;
        let dz = if SILU {
            let z = xh * ga + be;
            let s = sigmoid(z);
            gy * s * (1.0 + z * (1.0 - s))
        } else {
            gy
        };
        (xh, dz)
    };
    let (mut ag, mut ab) = ([0f32; LANES], [0f32; LANES]);
    let mut dch = dx.chunks_exact_mut(LANES);
    let (mut xch, mut gch) = (x.chunks_exact(LANES), dy.chunks_exact(LANES));
    for ((d, xv), gv) in (&mut dch).zip(&mut xch).zip(&mut gch) {
        for i in 0..LANES {
            let (xh, dz) = one(xv[i], gv[i]);
            ag[i] += dz * xh;
            ab[i] += dz;
            d[i] = dz * ga;
        }
    }
    for ((d, &v), &gy) in dch
        .into_remainder()
        .iter_mut()
        .zip(xch.remainder())
        .zip(gch.remainder())
    {
        let (xh, dz) = one(v, gy);
        ag[0] += dz * xh;
        ab[0] += dz;
        *d = dz * ga;
    }
    (ag.iter().sum(), ab.iter().sum())
}
}

simd_fn! {
/// Second backward pass over one channel plane: dx = rstd·(dx̂ − a − x̂·b) in place; returns Σ dx.
fn bwd_pass2(dx: &mut [f32], x: &[f32], off: f32, rstd: f32, a: f32, b: f32) -> f32 {
    let mut acc = [0f32; LANES];
    let mut dch = dx.chunks_exact_mut(LANES);
    let mut xch = x.chunks_exact(LANES);
    for (d, xv) in (&mut dch).zip(&mut xch) {
        for i in 0..LANES {
            let xh = (xv[i] + off) * rstd;
            d[i] = rstd * (d[i] - a - xh * b);
            acc[i] += d[i];
        }
    }
    for (d, &v) in dch.into_remainder().iter_mut().zip(xch.remainder()) {
        let xh = (v + off) * rstd;
        *d = rstd * (*d - a - xh * b);
        acc[0] += *d;
    }
    acc.iter().sum()
}
}

impl CustomOp2 for GroupNormOp {
    fn name(&self) -> &'static str {
        "ddpm-group-norm"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let geo = self.geom(l1, l2)?;
        let x = contiguous_f32(s1, l1, "group_norm input")?;
        let gb = contiguous_f32(s2, l2, "group_norm affine")?;
        let (gamma, rest) = gb.split_at(geo.c);
        let (beta, shift) = rest.split_at(geo.c);
        let glen = geo.cg * geo.s;
        let fill = |y: &mut [std::mem::MaybeUninit<f32>]| {
            if glen == 0 {
                return Ok(());
            }
            y.par_chunks_mut(glen)
                .zip(x.par_chunks(glen))
                .enumerate()
                .for_each(|(i, (yg, xg))| {
                    let c0 = (i % self.groups) * geo.cg;
                    let sh = &shift[(i / self.groups) * geo.c + c0..][..geo.cg];
                    let (mean, rstd) = shifted_stats(xg, sh, geo.s, self.eps);
                    for ci in 0..geo.cg {
                        let (ga, be) = (gamma[c0 + ci] * rstd, beta[c0 + ci]);
                        // y = (v + off)·ga + be = v·ga + (off·ga + be)
                        let bias = (sh[ci] - mean) * ga + be;
                        let r = ci * geo.s..(ci + 1) * geo.s;
                        if self.silu {
                            fwd_plane::<true>(&mut yg[r.clone()], &xg[r], ga, bias);
                        } else {
                            fwd_plane::<false>(&mut yg[r.clone()], &xg[r], ga, bias);
                        }
                    }
                });
            Ok(())
        };
        // SAFETY: the closure writes every element of its buffer (each output index once;
        // checked by every workspace test (feature `check-uninit`) and in debug builds,
        // where an unwritten element is an error: ddpm-unet's
        // `a_kernel_that_skips_an_element_fails_the_tests`).
        #[allow(unsafe_code)]
        let y = unsafe { filled(x.len(), "group_norm", fill) }?;
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
        let geo = self.geom(l1, l2)?;
        let dims = (l1.dims()[0], geo.c, geo.s);
        let y = cuda::group_norm_fwd(s1, l1, s2, l2, dims, self.groups, self.eps, self.silu)?;
        Ok((y, l1.shape().clone()))
    }

    fn bwd(
        &self,
        x: &Tensor,
        gb: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let packed = x.apply_op3_no_bwd(gb, &grad.contiguous()?, &GroupNormBwd(*self))?;
        let n = x.elem_count();
        let dx = packed.narrow(0, 0, n)?.reshape(x.shape())?;
        let dgb = packed.narrow(0, n, gb.elem_count())?;
        Ok((Some(dx), Some(dgb)))
    }
}

/// One group's parameter gradients: sample, first channel, dγ, dβ, dshift.
type GroupGrads = (usize, usize, Vec<f32>, Vec<f32>, Vec<f32>);

/// `(x, [γ ‖ β ‖ shift], dy) → [dx (flattened) ‖ dγ ‖ dβ ‖ dshift]`, one flat vector.
#[derive(Debug, Clone, Copy)]
struct GroupNormBwd(GroupNormOp);

impl CustomOp3 for GroupNormBwd {
    fn name(&self) -> &'static str {
        "ddpm-group-norm-bwd"
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
        let op = self.0;
        let geo = op.geom(l1, l2)?;
        if l3.dims() != l1.dims() {
            bail!(
                "group_norm backward: gradient shape {:?} differs",
                l3.dims()
            )
        }
        let x = contiguous_f32(s1, l1, "group_norm input")?;
        let gb = contiguous_f32(s2, l2, "group_norm affine")?;
        let dy = contiguous_f32(s3, l3, "group_norm gradient")?;
        let (gamma, rest) = gb.split_at(geo.c);
        let (beta, shift) = rest.split_at(geo.c);
        let glen = geo.cg * geo.s;
        let mut out = vec![0f32; x.len() + geo.np];
        let (dx, _) = out.split_at_mut(x.len());
        // Each group writes its dx and returns its channels' partial dγ, dβ (dshift is the
        // per-channel sum of dx, computed after the second pass).
        let partials: Vec<GroupGrads> = dx
            .par_chunks_mut(glen)
            .zip(x.par_chunks(glen).zip(dy.par_chunks(glen)))
            .enumerate()
            .map(|(i, (dxg, (xg, dyg)))| {
                let c0 = (i % op.groups) * geo.cg;
                let sample = i / op.groups;
                let sh = &shift[sample * geo.c + c0..][..geo.cg];
                let (mean, rstd) = shifted_stats(xg, sh, geo.s, op.eps);
                let (mut dga, mut dbe) = (vec![0f32; geo.cg], vec![0f32; geo.cg]);
                let (mut sum_dxh, mut sum_dxh_xh) = (0f64, 0f64);
                for ci in 0..geo.cg {
                    let (ga, be) = (gamma[c0 + ci], beta[c0 + ci]);
                    let off = sh[ci] - mean;
                    let r = ci * geo.s..(ci + 1) * geo.s;
                    let (xs, gys) = (&xg[r.clone()], &dyg[r.clone()]);
                    let (acc_g, acc_b) = if op.silu {
                        bwd_pass1::<true>(&mut dxg[r], xs, gys, off, rstd, ga, be)
                    } else {
                        bwd_pass1::<false>(&mut dxg[r], xs, gys, off, rstd, ga, be)
                    };
                    // dx̂ = dz·γ, so Σdx̂ = γ·Σdz and Σdx̂·x̂ = γ·Σdz·x̂.
                    sum_dxh += (acc_b * ga) as f64;
                    sum_dxh_xh += (acc_g * ga) as f64;
                    dga[ci] = acc_g;
                    dbe[ci] = acc_b;
                }
                let m = glen.max(1) as f64;
                let (a, b) = ((sum_dxh / m) as f32, (sum_dxh_xh / m) as f32);
                let mut dsh = vec![0f32; geo.cg];
                for ci in 0..geo.cg {
                    let off = sh[ci] - mean;
                    let r = ci * geo.s..(ci + 1) * geo.s;
                    dsh[ci] = bwd_pass2(&mut dxg[r.clone()], &xg[r], off, rstd, a, b);
                }
                (sample, c0, dga, dbe, dsh)
            })
            .collect();
        let (_, dgb) = out.split_at_mut(x.len());
        let (dgamma, rest) = dgb.split_at_mut(geo.c);
        let (dbeta, dshift) = rest.split_at_mut(geo.c);
        for (sample, c0, dga, dbe, dsh) in partials {
            for ci in 0..geo.cg {
                dgamma[c0 + ci] += dga[ci];
                dbeta[c0 + ci] += dbe[ci];
                dshift[sample * geo.c + c0 + ci] = dsh[ci];
            }
        }
        let len = out.len();
        Ok((CpuStorage::F32(out), Shape::from(len)))
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
        let op = self.0;
        let geo = op.geom(l1, l2)?;
        if l3.dims() != l1.dims() {
            bail!(
                "group_norm backward: gradient shape {:?} differs",
                l3.dims()
            )
        }
        let dims = (l1.dims()[0], geo.c, geo.s);
        let out = cuda::group_norm_bwd(s1, l1, s2, l2, s3, l3, dims, op.groups, op.eps, op.silu)?;
        let len = l1.shape().elem_count() + geo.np;
        Ok((out, Shape::from(len)))
    }
}

// The kernels of `kernels/norm.cu`, typed (crate::abi).
crate::abi::kernel! {
    GN_FWD, gn_fwd_kernel = "ddpm_gn_fwd" in "norm" (x: In, gb: In, y: Out, n: Int, c: Int, groups: Int, s: Int, eps: Float, silu: Int);
}
crate::abi::kernel! {
    GN_BWD, gn_bwd_kernel = "ddpm_gn_bwd" in "norm" (x: In, gb: In, dy: In, out: Out, n: Int, c: Int, groups: Int, s: Int, eps: Float, silu: Int);
}

#[cfg(test)]
#[test]
fn kernel_signatures_match_the_cu_source() {
    crate::abi::check(&[GN_FWD, GN_BWD]);
}

/// The CUDA launch of this op: `kernels/norm.cu`, compiled to PTX by `build.rs`. Kernel
/// launches are foreign calls, so this module allows `unsafe`; each launch passes device buffers
/// whose lengths were checked against the sizes the kernel indexes with.
#[cfg(feature = "cuda")]
#[allow(unsafe_code)]
mod cuda {
    use crate::cuda::{int, per_block, view};
    use candle_core::backend::BackendStorage;
    use candle_core::{bail, CudaStorage, Layout, Result};

    /// GroupNorm's sizes as the kernels' `int`s: `[n, c, groups, s]`.
    fn gn_dims(n: usize, c: usize, groups: usize, s: usize) -> Result<[i32; 4]> {
        Ok([
            int(n, "n")?,
            int(c, "c")?,
            int(groups, "groups")?,
            int(s, "s")?,
        ])
    }

    /// GroupNorm forward over `x [n, c, s]` with packed `[γ ‖ β ‖ shift]`.
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn group_norm_fwd(
        x: &CudaStorage,
        lx: &Layout,
        gb: &CudaStorage,
        lg: &Layout,
        (n, c, s): (usize, usize, usize),
        groups: usize,
        eps: f32,
        silu: bool,
    ) -> Result<CudaStorage> {
        let dev = x.device().clone();
        let (xv, gv) = (
            view(x, lx, "group_norm input")?,
            view(gb, lg, "group_norm affine")?,
        );
        if xv.len() != n * c * s || gv.len() != 2 * c + n * c {
            bail!("group_norm (cuda): buffers do not match [{n}, {c}, {s}]")
        }
        // SAFETY: the kernel writes every element (each (sample, group) block covers its slice).
        let y = unsafe { dev.alloc::<f32>(n * c * s)? };
        let [ni, ci, gi, si] = gn_dims(n, c, groups, s)?;
        let silu = i32::from(silu);
        // SAFETY: argument types and order match `ddpm_gn_fwd`; lengths checked above.
        unsafe {
            super::gn_fwd_kernel(
                &dev,
                per_block(n * groups)?,
                &xv,
                &gv,
                &y,
                &ni,
                &ci,
                &gi,
                &si,
                &eps,
                &silu,
            )?
        };
        Ok(CudaStorage::wrap_cuda_slice(y, dev))
    }

    /// GroupNorm backward: `[dx ‖ dγ ‖ dβ ‖ dshift]` from `x`, the packed parameters and `dy`.
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn group_norm_bwd(
        x: &CudaStorage,
        lx: &Layout,
        gb: &CudaStorage,
        lg: &Layout,
        dy: &CudaStorage,
        ld: &Layout,
        (n, c, s): (usize, usize, usize),
        groups: usize,
        eps: f32,
        silu: bool,
    ) -> Result<CudaStorage> {
        let dev = x.device().clone();
        let xv = view(x, lx, "group_norm input")?;
        let gv = view(gb, lg, "group_norm affine")?;
        let dv = view(dy, ld, "group_norm gradient")?;
        if xv.len() != n * c * s || dv.len() != n * c * s || gv.len() != 2 * c + n * c {
            bail!("group_norm backward (cuda): buffers do not match [{n}, {c}, {s}]")
        }
        let out = dev.alloc_zeros::<f32>(n * c * s + 2 * c + n * c)?;
        let [ni, ci, gi, si] = gn_dims(n, c, groups, s)?;
        let silu = i32::from(silu);
        // SAFETY: argument types and order match `ddpm_gn_bwd`; lengths checked above.
        unsafe {
            super::gn_bwd_kernel(
                &dev,
                per_block(n * groups)?,
                &xv,
                &gv,
                &dv,
                &out,
                &ni,
                &ci,
                &gi,
                &si,
                &eps,
                &silu,
            )?
        };
        Ok(CudaStorage::wrap_cuda_slice(out, dev))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fast_exp_is_accurate_over_its_range() {
        let mut worst = 0f64;
        let mut x = -87.0f32;
        while x <= 88.0 {
            let want = (x as f64).exp();
            let got = fast_exp(x) as f64;
            worst = worst.max(((got - want) / want).abs());
            x += 0.01;
        }
        assert!(worst < 5e-7, "worst relative error {worst}");
        assert!(fast_exp(-1000.0) >= 0.0 && fast_exp(-1000.0) < 1e-37);
        assert!(fast_exp(1000.0).is_finite());
    }

    #[test]
    fn stats_match_two_pass_on_a_shifted_group() {
        let v: Vec<f32> = (0..1001)
            .map(|i| 1000.0 + (i as f32 * 0.37).sin())
            .collect();
        let mean = v.iter().map(|&a| a as f64).sum::<f64>() / v.len() as f64;
        let var = v.iter().map(|&a| (a as f64 - mean).powi(2)).sum::<f64>() / v.len() as f64;
        let (m, rstd) = stats(&v, 1e-5);
        assert!((m as f64 - mean).abs() < 1e-3);
        let want = 1.0 / (var + 1e-5).sqrt();
        assert!(
            ((rstd as f64 - want) / want).abs() < 1e-4,
            "{rstd} vs {want}"
        );
    }
}
