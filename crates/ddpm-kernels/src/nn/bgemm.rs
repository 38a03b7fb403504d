//! Matrix products with bf16 inputs and f32 accumulation (torch.autocast's bf16 products) on the
//! CPU: `dst (m × n) [+]= round(a) · round(b)`, where `round` is bf16 rounding (to nearest, ties
//! to even; [`super::precision::round_bf16`]) and the inputs and the result are f32 in memory.
//!
//! [`bgemm`] is the `vdpbf16ps` kernel ([`Bf16Kernel::Avx512`], AVX512_BF16): the operands are
//! packed into bf16 pairs (the rounding happens in the packing, in SIMD), and a 12 × 32
//! register-blocked micro-kernel accumulates `a[i][2p]·b[2p][j] + a[i][2p+1]·b[2p+1][j]` into
//! f32 lanes. The left operand (a layer's weights) can be packed once ([`PackedA`]) and reused
//! for every sample of a batch. Each product of two bf16 values is exact in f32, so it computes
//! the exact sums of the rounded inputs up to the order of the additions (and `vdpbf16ps`
//! treats subnormal inputs as zero); `tests::the_kernel_matches_exact_sums_and_f32` holds it
//! to that.
//!
//! The other [`Bf16Kernel`], [`Bf16Kernel::Reference`], is no GEMM of its own: the convolution
//! op rounds its operands where it builds them (`nn/conv.rs`) and runs the f32 GEMM, which
//! computes the same sums.
#![allow(unsafe_code)]

use std::cell::RefCell;

use candle_core::{bail, Result};
use rayon::prelude::*;

use super::gemm::{prologue, sgemm, MatRef};
use super::precision::{cpu_bf16, round_bf16, CpuBf16};

/// Rows of the micro-kernel's tile of the output.
const MR: usize = 12;
/// Columns of the micro-kernel's tile (two 16-lane registers).
const NR: usize = 32;
/// The depth (k) of one packed block; even, so that pairs never straddle blocks.
const KC: usize = 384;

/// The kernel that runs a bf16 product ([`super::precision::bf16_kernel`] picks one).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Bf16Kernel {
    /// `vdpbf16ps` on packed bf16 pairs.
    Avx512,
    /// bf16-rounded f32 values through the f32 GEMM: the operands are rounded where the op
    /// builds them (the padded input, the column and gradient matrices, the weights).
    Reference,
}

impl Bf16Kernel {
    /// The kernels this CPU can run ([`cpu_bf16`] reads CPUID): the reference path always,
    /// `vdpbf16ps` where the CPU has AVX512_BF16.
    pub fn available() -> Vec<Self> {
        match cpu_bf16() {
            CpuBf16::Avx512 => vec![Self::Reference, Self::Avx512],
            CpuBf16::None => vec![Self::Reference],
        }
    }

    /// The name of the kernel (`vdpbf16ps` or `reference`).
    pub fn name(self) -> &'static str {
        match self {
            Self::Avx512 => "vdpbf16ps",
            Self::Reference => "reference",
        }
    }

    /// Parses [`Bf16Kernel::name`]'s names.
    pub fn from_name(name: &str) -> Option<Self> {
        match name {
            "vdpbf16ps" => Some(Self::Avx512),
            "reference" => Some(Self::Reference),
            _ => None,
        }
    }
}

/// Times one product of a fixed size (96 × 384 × 512, about 38 MFLOP) in f32 and on the
/// `vdpbf16ps` kernel, single-threaded, the best of three each: `(f32, bf16)` seconds. The
/// dispatcher's probe; `None` where the CPU lacks AVX512_BF16.
pub(crate) fn probe() -> Option<(f64, f64)> {
    if cpu_bf16() != CpuBf16::Avx512 {
        return None;
    }
    let (m, k, n) = (96, 384, 512);
    let a: Vec<f32> = (0..m * k).map(|i| (i as f32 * 0.37).sin()).collect();
    let b: Vec<f32> = (0..k * n).map(|i| (i as f32 * 0.11).sin()).collect();
    let (av, bv) = (MatRef::row_major(&a, m, k), MatRef::row_major(&b, k, n));
    let packed = PackedA::new(av).ok()?;
    let mut dst = vec![0f32; m * n];
    let (mut f, mut h) = (f64::INFINITY, f64::INFINITY);
    for _ in 0..3 {
        let t = std::time::Instant::now();
        sgemm(&mut dst, av, bv, false, false).ok()?;
        f = f.min(t.elapsed().as_secs_f64());
        let t = std::time::Instant::now();
        bgemm(&mut dst, Lhs::Packed(&packed), bv, false, false).ok()?;
        h = h.min(t.elapsed().as_secs_f64());
    }
    Some((f, h))
}

/// The bf16 bit pattern of `x` rounded to nearest, ties to even (NaN stays a quiet NaN).
fn bf16_bits(x: f32) -> u32 {
    if x.is_nan() {
        return (x.to_bits() >> 16) | 0x40;
    }
    round_bf16(x).to_bits() >> 16
}

/// Two values as one `vdpbf16ps` lane: `lo` in the low half, `hi` in the high half.
fn pair(lo: f32, hi: f32) -> u32 {
    bf16_bits(lo) | (bf16_bits(hi) << 16)
}

/// A left operand packed once for many products (a layer's weights, reused for every sample).
#[derive(Debug, Clone)]
pub(crate) struct PackedA {
    m: usize,
    k: usize,
    /// `[k block][row tile][pair][MR]` bf16 pairs.
    pairs: Vec<u32>,
}

impl PackedA {
    /// Packs `a` into bf16 pairs.
    pub(crate) fn new(a: MatRef<'_>) -> Result<Self> {
        a.check("lhs")?;
        Ok(Self {
            m: a.rows,
            k: a.cols,
            pairs: pack_a(a),
        })
    }
}

/// The left operand of [`bgemm`]: a view, packed on the fly, or packed beforehand.
#[derive(Debug, Clone, Copy)]
pub(crate) enum Lhs<'a> {
    View(MatRef<'a>),
    Packed(&'a PackedA),
}

impl Lhs<'_> {
    fn dims(&self) -> (usize, usize) {
        match self {
            Lhs::View(v) => (v.rows, v.cols),
            Lhs::Packed(p) => (p.m, p.k),
        }
    }
}

/// Number of pairs in k block `kb` of a depth-`k` product.
fn block_pairs(k: usize, kb: usize) -> usize {
    (k - kb * KC).min(KC).div_ceil(2)
}

/// Packs all of `a` (`m × k`) as `[k block][row tile][pair][MR]`, zero-padded to whole tiles
/// and an even depth.
fn pack_a(a: MatRef<'_>) -> Vec<u32> {
    let (m, k) = (a.rows, a.cols);
    let tiles = m.div_ceil(MR);
    let mut out = vec![0u32; tiles * MR * k.div_ceil(2)];
    let mut at = 0;
    for kb in 0..k.div_ceil(KC) {
        let kp = block_pairs(k, kb);
        for t in 0..tiles {
            let tile = &mut out[at..at + kp * MR];
            for ii in 0..MR.min(m - t * MR) {
                let i = t * MR + ii;
                let row = |kk: usize| {
                    if kk < k {
                        a.data[i * a.rs + kk * a.cs]
                    } else {
                        0.0
                    }
                };
                let k0 = kb * KC;
                for p in 0..kp {
                    tile[p * MR + ii] = pair(row(k0 + 2 * p), row(k0 + 2 * p + 1));
                }
            }
            at += kp * MR;
        }
    }
    out
}

/// Packs rows `k0 .. k0 + 2·kp` of `b` (`k × n`) as `[column strip][pair][NR]`, zero-padded.
fn pack_b(b: MatRef<'_>, k0: usize, kp: usize, out: &mut Vec<u32>) {
    let (k, n) = (b.rows, b.cols);
    let strips = n.div_ceil(NR);
    out.clear();
    out.resize(strips * kp * NR, 0);
    #[cfg(target_arch = "x86_64")]
    if b.cs == 1 && cpu_bf16() == CpuBf16::Avx512 {
        // SAFETY: CPUID reported AVX512F and AVX512_BF16 (`cpu_bf16`); `b` passed `check`, so
        // every element it reads lies in its buffer (the masked loads read nothing past `n`;
        // right edges and odd depths run in `tests::the_kernel_matches_exact_sums_and_f32`).
        unsafe { avx512::pack_b_rows(b, k0, kp, out) };
        return;
    }
    let at = |kk: usize, j: usize| {
        if kk < k {
            b.data[kk * b.rs + j * b.cs]
        } else {
            0.0
        }
    };
    for s in 0..strips {
        for p in 0..kp {
            let dst = &mut out[(s * kp + p) * NR..][..NR];
            for (jj, d) in dst.iter_mut().enumerate().take(NR.min(n - s * NR)) {
                let j = s * NR + jj;
                *d = pair(at(k0 + 2 * p, j), at(k0 + 2 * p + 1, j));
            }
        }
    }
}

thread_local! {
    /// The packed right operand of the current block (reused between calls).
    static PACKED_B: RefCell<Vec<u32>> = const { RefCell::new(Vec::new()) };
}

/// `dst (m × n, row-major) = [dst +] round(a) · round(b)` on the `vdpbf16ps` kernel.
///
/// `accumulate` adds to the existing contents of `dst`; `parallel` lets the kernel use the rayon
/// pool (use it when the caller is not already parallel). Fails on a CPU without AVX512_BF16.
pub(crate) fn bgemm(
    dst: &mut [f32],
    a: Lhs<'_>,
    b: MatRef<'_>,
    accumulate: bool,
    parallel: bool,
) -> Result<()> {
    let (m, k) = a.dims();
    if prologue("bf16 gemm", dst, (m, k), &b, accumulate)? {
        return Ok(());
    }
    if cpu_bf16() != CpuBf16::Avx512 {
        bail!("bf16 gemm: this CPU has no AVX512_BF16 for the vdpbf16ps kernel")
    }
    let owned;
    let pa = match a {
        Lhs::Packed(p) => p,
        Lhs::View(v) => {
            owned = PackedA::new(v)?;
            &owned
        }
    };
    #[cfg(target_arch = "x86_64")]
    {
        avx512_product(dst, &pa.pairs, m, k, b, accumulate, parallel);
        Ok(())
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        let _ = (pa, parallel);
        bail!("bf16 gemm: vdpbf16ps is an x86-64 instruction")
    }
}

/// The blocked product on packed operands (the CPU has AVX512_BF16: checked by the caller).
#[cfg(target_arch = "x86_64")]
fn avx512_product(
    dst: &mut [f32],
    ap: &[u32],
    m: usize,
    k: usize,
    b: MatRef<'_>,
    accumulate: bool,
    parallel: bool,
) {
    let n = b.cols;
    let tiles = m.div_ceil(MR);
    let strips = n.div_ceil(NR);
    PACKED_B.with(|cell| {
        let mut bp = cell.borrow_mut();
        let mut a_at = 0;
        for kb in 0..k.div_ceil(KC) {
            let kp = block_pairs(k, kb);
            pack_b(b, kb * KC, kp, &mut bp);
            let acc = accumulate || kb > 0;
            let a_block = &ap[a_at..a_at + tiles * kp * MR];
            a_at += tiles * kp * MR;
            let bp = &bp[..];
            // One row tile of the output against every column strip.
            let tile = |t: usize, c: &mut [f32]| {
                let rows = MR.min(m - t * MR);
                let a = &a_block[t * kp * MR..][..kp * MR];
                for s in 0..strips {
                    let cols = NR.min(n - s * NR);
                    let bs = &bp[s * kp * NR..][..kp * NR];
                    // SAFETY: CPUID reported AVX512F and AVX512_BF16 (the caller checked
                    // `cpu_bf16`); `a` holds `kp·MR` and `bs` `kp·NR` pairs; the tile writes
                    // rows < `rows` and columns < `cols` of `c`, `n` apart, which lie in `c`
                    // (`c` starts at row `t·MR` and holds `rows` rows of `n`; the bounds hold
                    // by `tests::the_kernel_matches_exact_sums_and_f32`'s edge shapes).
                    unsafe {
                        avx512::micro(kp, a, bs, &mut c[s * NR..], n, rows, cols, acc);
                    }
                }
            };
            let out = &mut dst[..m * n];
            if parallel && tiles > 1 && rayon::current_num_threads() > 1 {
                out.par_chunks_mut(MR * n)
                    .enumerate()
                    .for_each(|(t, c)| tile(t, c));
            } else {
                out.chunks_mut(MR * n)
                    .enumerate()
                    .for_each(|(t, c)| tile(t, c));
            }
        }
    });
}

#[cfg(target_arch = "x86_64")]
mod avx512 {
    use super::{MatRef, MR, NR};
    use std::arch::x86_64::*;

    /// The bf16 bits of each lane of `x` (rounded to nearest even; NaN kept quiet) in the
    /// high half of the lane, the low half zero.
    #[inline]
    #[target_feature(enable = "avx512f")]
    fn rounded_hi(x: __m512) -> __m512i {
        let b = _mm512_castps_si512(x);
        let lsb = _mm512_and_si512(_mm512_srli_epi32::<16>(b), _mm512_set1_epi32(1));
        let r = _mm512_add_epi32(b, _mm512_add_epi32(lsb, _mm512_set1_epi32(0x7fff)));
        let nan = _mm512_cmp_ps_mask::<_CMP_UNORD_Q>(x, x);
        let r = _mm512_mask_mov_epi32(r, nan, _mm512_or_si512(b, _mm512_set1_epi32(0x0040_0000)));
        _mm512_and_si512(r, _mm512_set1_epi32(0xffff_0000_u32 as i32))
    }

    /// Packs rows `k0 + 2p`, `k0 + 2p + 1` of a row-major-like `b` (`cs == 1`) for each pair
    /// `p < kp`: 16 lanes at a time, masked at the right edge.
    ///
    /// # Safety
    /// The CPU has AVX512F; `b`'s view lies in its buffer; `out` holds `strips·kp·NR` values.
    #[target_feature(enable = "avx512f")]
    pub(super) unsafe fn pack_b_rows(b: MatRef<'_>, k0: usize, kp: usize, out: &mut [u32]) {
        let (k, n) = (b.rows, b.cols);
        let strips = n.div_ceil(NR);
        let zero = _mm512_setzero_ps();
        let ptr = b.data.as_ptr();
        let load = |kk: usize, j: usize, mask: __mmask16| {
            if kk < k {
                // SAFETY: row kk < k, columns j .. j + popcount(mask) < n of the view,
                // which `check` bounds within `b.data`.
                unsafe { _mm512_maskz_loadu_ps(mask, ptr.add(kk * b.rs + j)) }
            } else {
                zero
            }
        };
        for s in 0..strips {
            for half in 0..2 {
                let j = s * NR + half * 16;
                if j >= n {
                    break;
                }
                let left = (n - j).min(16);
                let mask: __mmask16 = if left == 16 {
                    0xffff
                } else {
                    (1u16 << left) - 1
                };
                for p in 0..kp {
                    let lo = rounded_hi(load(k0 + 2 * p, j, mask));
                    let hi = rounded_hi(load(k0 + 2 * p + 1, j, mask));
                    let v = _mm512_or_si512(_mm512_srli_epi32::<16>(lo), hi);
                    let at = (s * kp + p) * NR + half * 16;
                    let dst = &mut out[at..at + 16];
                    // SAFETY: `dst` holds 16 u32.
                    unsafe { _mm512_storeu_si512(dst.as_mut_ptr().cast(), v) };
                }
            }
        }
    }

    /// One `MR × NR` tile: `c[i][j] = [c[i][j] +] Σ_p a[p][i] · b[p][j]` over `kp` pairs, for
    /// rows `i < rows` and columns `j < cols`, rows of `c` `ldc` apart.
    ///
    /// # Safety
    /// The CPU has AVX512F and AVX512_BF16; `a` holds `kp·MR` and `b` `kp·NR` values;
    /// `c[(rows − 1)·ldc + cols − 1]` is in bounds.
    #[allow(clippy::too_many_arguments)]
    #[target_feature(enable = "avx512f,avx512bf16")]
    pub(super) unsafe fn micro(
        kp: usize,
        a: &[u32],
        b: &[u32],
        c: &mut [f32],
        ldc: usize,
        rows: usize,
        cols: usize,
        accumulate: bool,
    ) {
        debug_assert!(a.len() >= kp * MR && b.len() >= kp * NR);
        debug_assert!(rows >= 1 && cols >= 1 && c.len() > (rows - 1) * ldc + cols - 1);
        let mut acc = [[_mm512_setzero_ps(); 2]; MR];
        let (ap, bp) = (a.as_ptr(), b.as_ptr());
        for p in 0..kp {
            // SAFETY: pair p < kp of `b` (NR values) and of `a` (MR values) are in bounds.
            let (b0, b1) = unsafe {
                (
                    _mm512_loadu_si512(bp.add(p * NR).cast()),
                    _mm512_loadu_si512(bp.add(p * NR + 16).cast()),
                )
            };
            // SAFETY: both are 64-byte vectors; every bit pattern is a valid bf16 vector.
            let (b0, b1): (__m512bh, __m512bh) = unsafe {
                (
                    std::mem::transmute::<__m512i, __m512bh>(b0),
                    std::mem::transmute::<__m512i, __m512bh>(b1),
                )
            };
            for (i, acc) in acc.iter_mut().enumerate() {
                // SAFETY: as above.
                let av = _mm512_set1_epi32(unsafe { *ap.add(p * MR + i) } as i32);
                // SAFETY: as for `b0` above.
                let av: __m512bh = unsafe { std::mem::transmute::<__m512i, __m512bh>(av) };
                acc[0] = _mm512_dpbf16_ps(acc[0], av, b0);
                acc[1] = _mm512_dpbf16_ps(acc[1], av, b1);
            }
        }
        let mask = |from: usize| -> __mmask16 {
            let left = cols.saturating_sub(from).min(16);
            if left == 16 {
                0xffff
            } else {
                (1u16 << left) - 1
            }
        };
        let (m0, m1) = (mask(0), mask(16));
        let cp = c.as_mut_ptr();
        for (i, acc) in acc.iter().enumerate() {
            if i >= rows {
                break;
            }
            // SAFETY: row i < rows, columns < cols (the masks), within `c` by the contract.
            unsafe {
                let row = cp.add(i * ldc);
                let (mut v0, mut v1) = (acc[0], acc[1]);
                if accumulate {
                    v0 = _mm512_add_ps(v0, _mm512_maskz_loadu_ps(m0, row));
                    v1 = _mm512_add_ps(v1, _mm512_maskz_loadu_ps(m1, row.add(16)));
                }
                _mm512_mask_storeu_ps(row, m0, v0);
                if m1 != 0 {
                    _mm512_mask_storeu_ps(row.add(16), m1, v1);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    /// The exact sums of the rounded products, and (`abs`) of their magnitudes.
    fn naive(a: &MatRef<'_>, b: &MatRef<'_>, abs: bool) -> Vec<f32> {
        let mut out = vec![0.0; a.rows * b.cols];
        for i in 0..a.rows {
            for j in 0..b.cols {
                let mut s = 0f64;
                for p in 0..a.cols {
                    let t = round_bf16(a.data[i * a.rs + p * a.cs]) as f64
                        * round_bf16(b.data[p * b.rs + j * b.cs]) as f64;
                    s += if abs { t.abs() } else { t };
                }
                out[i * b.cols + j] = s as f32;
            }
        }
        out
    }

    fn values(n: usize, f: f32) -> Vec<f32> {
        (0..n).map(|i| (i as f32 * f).sin() * 1.7).collect()
    }

    /// Whether the kernel runs here; says so when it does not.
    fn runs_here() -> bool {
        let yes = cpu_bf16() == CpuBf16::Avx512;
        if !yes {
            println!("this CPU has no AVX512_BF16: the vdpbf16ps kernel is not run here");
        }
        yes
    }

    /// The kernel against the exact sums of the rounded inputs (f64) and against f32 within
    /// bf16's bound, on shapes with edge tiles in every direction, odd depths, depths over one
    /// block, transposed views, packed and unpacked left operands, and accumulation.
    #[test]
    fn the_kernel_matches_exact_sums_and_f32() {
        if !runs_here() {
            return;
        }
        for (m, k, n) in [
            (1, 1, 1),
            (5, 3, 7),
            (12, 32, 32),
            (13, 33, 33),
            (25, 400, 47),
            (64, 2 * KC + 5, 70),
            (30, 17, 200),
        ] {
            let a = values(m * k, 0.37);
            let b = values(k * n, 0.11);
            let views = [
                (MatRef::row_major(&a, m, k), MatRef::row_major(&b, k, n)),
                (
                    MatRef::row_major(&a, k, m).t(),
                    MatRef::row_major(&b, n, k).t(),
                ),
            ];
            for (av, bv) in views {
                let want = naive(&av, &bv, false);
                let magnitude = naive(&av, &bv, true);
                let f32_want = {
                    let mut d = vec![0f32; m * n];
                    sgemm(&mut d, av, bv, false, false).unwrap();
                    d
                };
                {
                    let packed = PackedA::new(av).unwrap();
                    for (lhs, parallel) in [(Lhs::View(av), false), (Lhs::Packed(&packed), true)] {
                        let mut dst = vec![1.0f32; m * n];
                        bgemm(&mut dst, lhs, bv, true, parallel).unwrap();
                        let tol = 1e-5 * (k as f32).sqrt() * 4.0;
                        for (i, (d, w)) in dst.iter().zip(&want).enumerate() {
                            assert!(
                                (d - (w + 1.0)).abs() <= tol * (1.0 + w.abs()),
                                "{m}x{k}x{n} at {i}: {d} vs {}",
                                w + 1.0
                            );
                        }
                        bgemm(&mut dst, lhs, bv, false, parallel).unwrap();
                        for (i, (d, w)) in dst.iter().zip(&want).enumerate() {
                            assert!((d - w).abs() <= tol * (1.0 + w.abs()), "{m}x{k}x{n}");
                            // Against unrounded f32: each input is within 2^-9 of its value
                            // (relative), so each product within 2^-8 + 2^-18, and the sum
                            // within that times Σ|a·b|; plus f32 summation error.
                            let bound = 2f32.powi(-8) * 1.01 * magnitude[i] + 1e-4;
                            assert!(
                                (d - f32_want[i]).abs() <= bound,
                                "{m}x{k}x{n} at {i}: {d} vs f32 {}",
                                f32_want[i]
                            );
                        }
                    }
                }
            }
        }
    }

    #[test]
    fn rounding_in_the_packing_matches_round_bf16() {
        // Ties, NaN, infinities, subnormals, the largest values: packed pairs carry the same
        // bits as the scalar rounding.
        let v = [
            1.0 + 1.0 / 256.0,
            1.0 + 3.0 / 256.0,
            f32::NAN,
            f32::INFINITY,
            -f32::INFINITY,
            1e-40,
            -3e-39,
            f32::MAX,
            -0.0,
            0.1,
            65504.0,
            -1.2345e-20,
            7.0,
            f32::MIN_POSITIVE,
            2.5,
            -1.0,
        ];
        let b = MatRef::row_major(&v, 2, 8);
        let mut scalar = Vec::new();
        let strips = 1;
        scalar.resize(strips * NR, 0u32);
        for j in 0..8 {
            scalar[j] = pair(v[j], v[8 + j]);
        }
        let mut got = Vec::new();
        pack_b(b, 0, 1, &mut got);
        assert_eq!(got, scalar);
        assert_eq!(bf16_bits(f32::NAN) & 0x7fc0, 0x7fc0);
        assert_eq!(bf16_bits(1.0), 0x3f80);
    }

    #[test]
    fn refuses_mismatched_operands_and_missing_instructions() {
        let a = vec![1.0f32; 6];
        let mut dst = vec![0.0; 9];
        let av = MatRef::row_major(&a, 3, 2);
        let e = bgemm(&mut dst, Lhs::View(av), av, false, false).unwrap_err();
        assert!(e.to_string().contains("inner dimensions"), "{e}");
        let e = bgemm(&mut dst[..8], Lhs::View(av), av.t(), false, false).unwrap_err();
        assert!(e.to_string().contains("destination"), "{e}");
        let p = PackedA::new(av).unwrap();
        let bv = MatRef::row_major(&a, 2, 3);
        let r = bgemm(&mut dst, Lhs::Packed(&p), bv, false, false);
        if cpu_bf16() == CpuBf16::Avx512 {
            r.unwrap();
            assert!(dst.iter().all(|&v| v == 2.0));
        } else {
            assert!(r.unwrap_err().to_string().contains("AVX512_BF16"));
        }
    }
}
