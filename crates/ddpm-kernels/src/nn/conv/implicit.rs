//! Stride-1 convolutions without a column matrix ("implicit GEMM").
//!
//! Each input plane is zero-padded into a row of `Q`, once per kernel column `kj` shifted left
//! by `kj`, so `Q [(kj, c), p] = padded_c[p + kj]` with `p = oy·wp + ox` over the padded width
//! `wp`. For kernel row `ki`, the window of `Q` that starts at `ki·wp` is then exactly the
//! `kw·cin` rows of the im2col matrix that belong to that kernel row, computed at every padded
//! position: a strided view the GEMM reads in place. The convolution is `kh` accumulating
//! products `out_ext [cout, m] += W_ki [cout, kw·cin] · Q_ki [kw·cin, m]`, and the `kw − 1`
//! extra columns per output row are dropped on the way out. `Q` is `kw` copies of the input
//! instead of im2col's `kh·kw`, and the GEMM reads it without packing, so this runs about
//! 1.2–1.45× faster than im2col + GEMM on the U-Net's 3×3 layers.
//!
//! The input gradient of a stride-1 convolution is itself one of these (of the output gradient
//! with the flipped, transposed kernel and padding `k − 1 − pad`), so it needs no col2im; the
//! kernel gradient uses the same `Q` with the output gradient spread over the padded positions.

use candle_core::Result;

use super::super::bgemm::PackedA;
use super::super::gemm::MatRef;
use super::super::simd::simd_fn;
use super::super::uninit::Slot;
use super::{product, product_of_views, Bf16Kernel, ConvGeom, Scratch, Weights};
use crate::nn::precision::{round_bf16, round_in_place};

/// Positions of the padded layout.
#[derive(Debug, Clone, Copy)]
pub(super) struct Padded {
    /// Padded row width, `w + 2·pad`.
    wp: usize,
    /// GEMM columns: `oh·wp`, rounded up to a multiple of 16 (the kernel's row block, so the
    /// view needs no packing).
    m: usize,
    /// Length of one `Q` row.
    row: usize,
}

impl Padded {
    /// The layout for `g`, or `None` when `g` is not a stride-1 convolution this form handles
    /// (1×1 unpadded convolutions need no columns at all and go elsewhere).
    pub(super) fn of(g: &ConvGeom) -> Option<Self> {
        // (An empty input with a non-empty output, possible with padding, goes elsewhere
        // too: the implicit form writes each output from the input planes.)
        if g.stride != 1 || g.pointwise() || g.pad >= g.kh || g.pad >= g.kw || g.in_len() == 0 {
            return None;
        }
        let wp = g.w + 2 * g.pad;
        let m = (g.oh * wp).div_ceil(16) * 16;
        let row = ((g.h + 2 * g.pad) * wp).max(m + (g.kh - 1) * wp + g.kw - 1);
        Some(Self { wp, m, row })
    }

    /// The geometry and layout of the input gradient of `g` as a forward convolution: of the
    /// output gradient `[n, cout, oh, ow]` with the flipped kernel and padding `k − 1 − pad`.
    pub(super) fn transposed(g: &ConvGeom) -> Option<(ConvGeom, Self)> {
        if g.stride != 1 || g.kh != g.kw || g.pad >= g.kh {
            return None;
        }
        let gt = ConvGeom::new(
            &[g.n, g.cout, g.oh, g.ow],
            &[g.cin, g.cout, g.kh, g.kw],
            1,
            g.kh - 1 - g.pad,
        )
        .ok()?;
        (gt.oh == g.h && gt.ow == g.w).then_some(())?;
        Some((gt, Self::of(&gt)?))
    }

    /// Fills `q` (`[kw·cin, row]`) from one image `[cin, h, w]`. The padding positions are
    /// the same for every image of a geometry, so the buffer is zeroed only when `q.1` says it
    /// last held another geometry.
    /// With `round` the values are rounded to bf16 on the way (the reference kernel).
    fn fill_q(&self, g: &ConvGeom, x: &[f32], q: &mut (Vec<f32>, Option<ConvGeom>), round: bool) {
        let (q, holds) = q;
        if *holds != Some(*g) {
            q.clear();
            q.resize(g.kw * g.cin * self.row, 0.0);
            *holds = Some(*g);
        }
        for kj in 0..g.kw {
            for c in 0..g.cin {
                let dst = &mut q[(kj * g.cin + c) * self.row..][..self.row];
                let plane = &x[c * g.h * g.w..][..g.h * g.w];
                place_rows(dst, plane, g.w, self.wp, g.pad, kj, round);
            }
        }
    }

    /// `Q`'s window for kernel row `ki`: `[kw·cin, m]`, rows `row` apart.
    fn window<'a>(&self, g: &ConvGeom, q: &'a [f32], ki: usize) -> MatRef<'a> {
        MatRef {
            data: &q[ki * self.wp..],
            rows: g.kw * g.cin,
            cols: self.m,
            rs: self.row,
            cs: 1,
        }
    }
}

simd_fn! {
    /// Writes the rows (`w` wide) of `plane` into `dst` at their padded positions
    /// `(y + pad)·wp + pad`, shifted left by `kj` (what falls left of 0 is dropped), rounded to
    /// bf16 values when `round`.
    fn place_rows(
        dst: &mut [f32],
        plane: &[f32],
        w: usize,
        wp: usize,
        pad: usize,
        kj: usize,
        round: bool,
    ) {
        for (y, src) in plane.chunks(w).enumerate() {
            let at = (y + pad) * wp + pad;
            let skip = kj.saturating_sub(at);
            let d0 = at + skip - kj;
            let row = &mut dst[d0..d0 + w - skip];
            if round {
                for (d, &v) in row.iter_mut().zip(&src[skip..]) {
                    *d = round_bf16(v);
                }
            } else {
                row.copy_from_slice(&src[skip..]);
            }
        }
    }
}

/// The kernel `[cout, cin, kh, kw]` regrouped per kernel row: `[kh][cout][kw·cin]`.
pub(super) fn by_kernel_row(g: &ConvGeom, w: &[f32]) -> Vec<f32> {
    let kc = g.kw * g.cin;
    let mut out = vec![0f32; g.kh * g.cout * kc];
    for co in 0..g.cout {
        for c in 0..g.cin {
            for ki in 0..g.kh {
                for kj in 0..g.kw {
                    out[(ki * g.cout + co) * kc + kj * g.cin + c] =
                        w[((co * g.cin + c) * g.kh + ki) * g.kw + kj];
                }
            }
        }
    }
    out
}

/// The kernel per kernel row (from [`by_kernel_row`]) as the left operands of the `kh`
/// products: f32 views, or packed once for the bf16 kernel.
pub(super) struct KernelRows<'a>(Vec<Weights<'a>>);

impl<'a> KernelRows<'a> {
    /// The `kh` operands `[cout, kw·cin]` of `wr`, packed for the `vdpbf16ps` kernel when
    /// `packed`; `packs` keeps the packings alive.
    pub(super) fn new(
        g: &ConvGeom,
        wr: &'a [f32],
        packed: bool,
        packs: &'a mut Vec<PackedA>,
    ) -> Result<Self> {
        if !packed {
            return Ok(Self::f32(g, wr));
        }
        *packs = (0..g.kh)
            .map(|ki| PackedA::new(view(g, wr, ki)))
            .collect::<Result<_>>()?;
        Ok(Self(packs.iter().map(Weights::Bf16).collect()))
    }

    /// The `kh` f32 operands of `wr`.
    pub(super) fn f32(g: &ConvGeom, wr: &'a [f32]) -> Self {
        Self((0..g.kh).map(|ki| Weights::F32(view(g, wr, ki))).collect())
    }
}

/// Kernel row `ki` of `wr` (from [`by_kernel_row`]): `[cout, kw·cin]`.
fn view<'a>(g: &ConvGeom, wr: &'a [f32], ki: usize) -> MatRef<'a> {
    let kc = g.kw * g.cin;
    MatRef::row_major(&wr[ki * g.cout * kc..][..g.cout * kc], g.cout, kc)
}

/// The input-gradient kernel of `g` (`[cout, cin, kh, kw]`, flipped and transposed to
/// `[cin, cout, kh, kw]`), regrouped per kernel row for the transposed geometry `gt`.
pub(super) fn flipped_by_kernel_row(g: &ConvGeom, gt: &ConvGeom, w: &[f32]) -> Vec<f32> {
    let mut wt = vec![0f32; w.len()];
    let (kh, kw) = (g.kh, g.kw);
    for co in 0..g.cout {
        for c in 0..g.cin {
            for ki in 0..kh {
                for kj in 0..kw {
                    wt[((c * g.cout + co) * kh + kh - 1 - ki) * kw + kw - 1 - kj] =
                        w[((co * g.cin + c) * kh + ki) * kw + kj];
                }
            }
        }
    }
    by_kernel_row(gt, &wt)
}

/// Forward of one image: `out [cout, oh, ow] = conv(x) (+ bias)`, with `wr` from
/// [`by_kernel_row`]; `round` rounds `x` to bf16 values on the way (the reference kernel).
#[allow(clippy::too_many_arguments)]
pub(super) fn forward(
    g: &ConvGeom,
    p: &Padded,
    wr: &KernelRows<'_>,
    bias: Option<&[f32]>,
    x: &[f32],
    q: &mut (Vec<f32>, Option<ConvGeom>),
    stage: &mut Vec<f32>,
    out: &mut [Slot],
    par: bool,
    round: bool,
) -> Result<()> {
    p.fill_q(g, x, q, round);
    let q = &q.0;
    stage.resize(g.cout * p.m, 0.0);
    for (ki, &a) in wr.0.iter().enumerate() {
        product(stage, a, p.window(g, q, ki), ki > 0, par)?;
    }
    let l = g.oh * g.ow;
    for (co, o) in out.chunks_mut(l).enumerate() {
        let b = bias.map_or(0.0, |b| b[co]);
        let ext = &stage[co * p.m..][..g.oh * p.wp];
        compact(o, ext, g.ow, p.wp, b);
    }
    Ok(())
}

simd_fn! {
    /// `out` (rows of `ow`) from the rows of `ext` (`wp` apart; the extra columns dropped), plus
    /// `b`.
    fn compact(out: &mut [Slot], ext: &[f32], ow: usize, wp: usize, b: f32) {
        for (dst, src) in out.chunks_mut(ow).zip(ext.chunks(wp)) {
            dst.iter_mut().zip(src).for_each(|(d, s)| *d = Slot::new(s + b));
        }
    }
}

/// Kernel-gradient contribution of one image, per kernel row and transposed:
/// `dwt [kh][kw·cin][cout] += Q_ki [kw·cin, m] · g_extᵀ [m, cout]`, where `g_ext` is the output
/// gradient at the padded positions (zero at the extra ones). This orientation lets the GEMM
/// read `Q` without packing it (12–35 % faster than `g_ext · Q_kiᵀ`).
#[allow(clippy::too_many_arguments)]
pub(super) fn filter_grad(
    g: &ConvGeom,
    p: &Padded,
    x: &[f32],
    grad: &[f32],
    sc: &mut Scratch,
    dwt: &mut [f32],
    par: bool,
    bf16: Option<Bf16Kernel>,
) -> Result<()> {
    let Scratch { q, stage, .. } = sc;
    let round = super::rounds(bf16);
    p.fill_q(g, x, q, round);
    let q = &q.0;
    stage.resize(g.cout * p.m, 0.0);
    let l = g.oh * g.ow;
    for (co, gs) in grad.chunks(l).enumerate() {
        let (ext, tail) = stage[co * p.m..][..p.m].split_at_mut(g.oh * p.wp);
        for (dst, src) in ext.chunks_mut(p.wp).zip(gs.chunks(g.ow)) {
            let (valid, extra) = dst.split_at_mut(g.ow);
            valid.copy_from_slice(src);
            extra.fill(0.0);
        }
        tail.fill(0.0);
    }
    if round {
        round_in_place(&mut stage[..g.cout * p.m]);
    }
    let kc = g.kw * g.cin;
    let gt = MatRef::row_major(stage, g.cout, p.m).t();
    for ki in 0..g.kh {
        let d = &mut dwt[ki * kc * g.cout..][..kc * g.cout];
        product_of_views(d, p.window(g, q, ki), gt, true, par, bf16)?;
    }
    Ok(())
}

/// `dwt [kh][kw·cin][cout]` (from [`filter_grad`]) back to the kernel layout
/// `[cout, cin, kh, kw]`.
pub(super) fn from_kernel_rows(g: &ConvGeom, dwt: &[f32]) -> Vec<f32> {
    let kc = g.kw * g.cin;
    let mut dw = vec![0f32; g.cout * g.cin * g.kh * g.kw];
    for co in 0..g.cout {
        for c in 0..g.cin {
            for ki in 0..g.kh {
                for kj in 0..g.kw {
                    dw[((co * g.cin + c) * g.kh + ki) * g.kw + kj] =
                        dwt[(ki * kc + kj * g.cin + c) * g.cout + co];
                }
            }
        }
    }
    dw
}

#[cfg(test)]
mod tests {
    use super::super::super::uninit::filled;
    use super::super::{bwd_data_group, bwd_filter_group, fwd_group, Scratch};
    use super::*;

    fn rows<'a>(g: &ConvGeom, wr: &'a [f32]) -> KernelRows<'a> {
        KernelRows::f32(g, wr)
    }

    fn max_diff(a: &[f32], b: &[f32]) -> f32 {
        assert_eq!(a.len(), b.len());
        a.iter()
            .zip(b)
            .map(|(x, y)| (x - y).abs())
            .fold(0.0, f32::max)
    }

    #[test]
    fn matches_im2col_on_odd_geometries() {
        // (cin, h, w, cout, kh, kw, pad): square and non-square kernels, every padding the
        // form accepts, widths that are and are not multiples of 16 after padding.
        for (cin, h, w, cout, kh, kw, pad) in [
            (3, 7, 5, 4, 3, 3, 1),
            (2, 6, 9, 3, 3, 3, 0),
            (4, 5, 5, 2, 5, 5, 2),
            (2, 8, 6, 3, 3, 2, 1),
            (3, 4, 4, 5, 2, 2, 1),
            (1, 14, 14, 6, 3, 3, 2),
        ] {
            let g = ConvGeom::new(&[1, cin, h, w], &[cout, cin, kh, kw], 1, pad).unwrap();
            let Some(p) = Padded::of(&g) else {
                panic!("{g:?} should take the implicit form")
            };
            let x: Vec<f32> = (0..g.in_len()).map(|i| (i as f32 * 0.37).sin()).collect();
            let wt: Vec<f32> = (0..cout * g.k()).map(|i| (i as f32 * 0.11).cos()).collect();
            let b: Vec<f32> = (0..cout).map(|i| i as f32 * 0.5 - 1.0).collect();
            let gr: Vec<f32> = (0..cout * g.l()).map(|i| (i as f32 * 0.23).cos()).collect();
            let mut sc = Scratch::default();

            let mut want = vec![0f32; cout * g.l()];
            let wm = Weights::F32(MatRef::row_major(&wt, cout, g.k()));
            fwd_group(&g, wm, Some(&b), &x, &mut sc, &mut want, false, false).unwrap();
            let wr = by_kernel_row(&g, &wt);
            let wr = rows(&g, &wr);
            // twice through the same scratch: the padding must survive reuse
            for _ in 0..2 {
                let fill = |o: &mut [std::mem::MaybeUninit<f32>]| {
                    forward(
                        &g,
                        &p,
                        &wr,
                        Some(&b),
                        &x,
                        &mut sc.q,
                        &mut sc.stage,
                        o,
                        false,
                        false,
                    )
                };
                // SAFETY: the closure writes every element of its buffer (each output index once;
                // checked by every workspace test (feature `check-uninit`) and in debug builds,
                // where an unwritten element is an error: ddpm-unet's
                // `a_kernel_that_skips_an_element_fails_the_tests`).
                #[allow(unsafe_code)]
                let got = unsafe { filled(cout * g.l(), "forward", fill) }.unwrap();
                assert!(max_diff(&got, &want) < 1e-4, "forward {g:?}");
            }

            // the im2col path accumulates dWᵀ [K, cout]
            let mut want_t = vec![0f32; cout * g.k()];
            bwd_filter_group(&g, &x, &gr, &mut sc, &mut want_t, false, None).unwrap();
            let want: Vec<f32> = (0..cout * g.k())
                .map(|i| want_t[(i % g.k()) * cout + i / g.k()])
                .collect();
            let mut dwt = vec![0f32; cout * g.k()];
            filter_grad(&g, &p, &x, &gr, &mut sc, &mut dwt, false, None).unwrap();
            let got = from_kernel_rows(&g, &dwt);
            assert!(max_diff(&got, &want) < 1e-3, "kernel gradient {g:?}");

            let mut want = vec![0f32; g.in_len()];
            let wm = Weights::F32(MatRef::row_major(&wt, cout, g.k()).t());
            bwd_data_group(&g, wm, &gr, &mut sc, &mut want, false, false).unwrap();
            if let Some((gt, pt)) = Padded::transposed(&g) {
                let wr = flipped_by_kernel_row(&g, &gt, &wt);
                let wr = rows(&gt, &wr);
                let fill = |o: &mut [std::mem::MaybeUninit<f32>]| {
                    let q = &mut sc.q;
                    forward(&gt, &pt, &wr, None, &gr, q, &mut sc.stage, o, false, false)
                };
                // SAFETY: the closure writes every element of its buffer (each output index once;
                // checked by every workspace test (feature `check-uninit`) and in debug builds,
                // where an unwritten element is an error: ddpm-unet's
                // `a_kernel_that_skips_an_element_fails_the_tests`).
                #[allow(unsafe_code)]
                let got = unsafe { filled(g.in_len(), "input gradient", fill) }.unwrap();
                assert!(max_diff(&got, &want) < 1e-4, "input gradient {g:?}");
            } else {
                assert_ne!(
                    kh, kw,
                    "only non-square kernels fall back for the input gradient"
                );
            }
        }
    }

    #[test]
    fn declines_what_it_does_not_handle() {
        let strided = ConvGeom::new(&[1, 2, 8, 8], &[2, 2, 3, 3], 2, 1).unwrap();
        let pointwise = ConvGeom::new(&[1, 2, 8, 8], &[2, 2, 1, 1], 1, 0).unwrap();
        let overpadded = ConvGeom::new(&[1, 2, 8, 8], &[2, 2, 3, 3], 1, 3).unwrap();
        for g in [strided, pointwise, overpadded] {
            assert!(Padded::of(&g).is_none(), "{g:?}");
        }
    }
}
