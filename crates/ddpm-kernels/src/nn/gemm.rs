//! A bounds-checked, safe wrapper around the `gemm` crate's f32 matrix multiply (the same kernel
//! candle's CPU matmul uses). The bf16 products live beside it in `bgemm`.
#![allow(unsafe_code)]

use candle_core::{bail, Result};

/// A read-only strided view of a `rows × cols` matrix inside a slice.
#[derive(Debug, Clone, Copy)]
pub(crate) struct MatRef<'a> {
    pub data: &'a [f32],
    pub rows: usize,
    pub cols: usize,
    /// Distance between consecutive rows.
    pub rs: usize,
    /// Distance between consecutive columns.
    pub cs: usize,
}

impl<'a> MatRef<'a> {
    /// A row-major (C-contiguous) matrix.
    pub fn row_major(data: &'a [f32], rows: usize, cols: usize) -> Self {
        Self {
            data,
            rows,
            cols,
            rs: cols,
            cs: 1,
        }
    }

    /// The transpose of this view (no copy).
    pub fn t(self) -> Self {
        Self {
            data: self.data,
            rows: self.cols,
            cols: self.rows,
            rs: self.cs,
            cs: self.rs,
        }
    }

    pub(crate) fn check(&self, what: &str) -> Result<()> {
        if self.rows == 0 || self.cols == 0 {
            return Ok(());
        }
        let last = (self.rows - 1) * self.rs + (self.cols - 1) * self.cs;
        if last >= self.data.len() {
            bail!(
                "gemm: {what} view {}x{} (strides {}, {}) exceeds its buffer of {}",
                self.rows,
                self.cols,
                self.rs,
                self.cs,
                self.data.len()
            )
        }
        Ok(())
    }
}

/// The checks both GEMMs (this one and `bgemm`) make before they touch memory, for
/// `dst (m × n) [+]= a (m × k) · b`: `b` has `k` rows, `dst` holds `m × n` and `b`'s view lies in
/// its buffer. `Ok(true)` when nothing is left to multiply: an empty result, or `k = 0`, where
/// `dst` has been zeroed unless `accumulate`. `what` names the GEMM in errors.
pub(crate) fn prologue(
    what: &str,
    dst: &mut [f32],
    (m, k): (usize, usize),
    b: &MatRef<'_>,
    accumulate: bool,
) -> Result<bool> {
    let n = b.cols;
    if b.rows != k {
        bail!("{what}: inner dimensions differ ({k} vs {})", b.rows)
    }
    let Some(len) = m.checked_mul(n).filter(|&l| l <= dst.len()) else {
        bail!("{what}: destination holds {} < {m}x{n}", dst.len())
    };
    b.check("rhs")?;
    if len == 0 {
        return Ok(true);
    }
    if k == 0 {
        if !accumulate {
            dst[..len].fill(0.0);
        }
        return Ok(true);
    }
    Ok(false)
}

/// `dst (m × n, row-major) = [dst +] a (m × k) · b (k × n)`.
///
/// `accumulate` adds to the existing contents of `dst`; `parallel` lets the kernel use the rayon
/// pool (use it when the caller is not already parallel).
pub(crate) fn sgemm(
    dst: &mut [f32],
    a: MatRef<'_>,
    b: MatRef<'_>,
    accumulate: bool,
    parallel: bool,
) -> Result<()> {
    let (m, k, n) = (a.rows, a.cols, b.cols);
    a.check("lhs")?;
    if prologue("gemm", dst, (m, k), &b, accumulate)? {
        return Ok(());
    }
    let threads = rayon::current_num_threads();
    let parallelism = if parallel && threads > 1 {
        gemm::Parallelism::Rayon(threads)
    } else {
        gemm::Parallelism::None
    };
    // SAFETY: every element the kernel reads is at `row * rs + col * cs` for row < rows and
    // col < cols, which `check` bounds within each input slice; it writes `dst[i * n + j]` for
    // i < m, j < n, bounded by `prologue`'s length check. `dst` is a unique borrow, so it aliases
    // neither input.
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            dst.as_mut_ptr(),
            1,
            n as isize,
            accumulate,
            a.data.as_ptr(),
            a.cs as isize,
            a.rs as isize,
            b.data.as_ptr(),
            b.cs as isize,
            b.rs as isize,
            1.0f32,
            1.0f32,
            false,
            false,
            false,
            parallelism,
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn naive(a: &MatRef<'_>, b: &MatRef<'_>) -> Vec<f32> {
        let mut out = vec![0.0; a.rows * b.cols];
        for i in 0..a.rows {
            for j in 0..b.cols {
                for p in 0..a.cols {
                    out[i * b.cols + j] +=
                        a.data[i * a.rs + p * a.cs] * b.data[p * b.rs + j * b.cs];
                }
            }
        }
        out
    }

    #[test]
    fn matches_naive_with_transposes_and_accumulation() {
        let a: Vec<f32> = (0..35).map(|i| (i as f32 * 0.37).sin()).collect();
        let b: Vec<f32> = (0..77).map(|i| (i as f32 * 0.11).cos()).collect();
        let am = MatRef::row_major(&a, 5, 7);
        let bm = MatRef::row_major(&b, 11, 7).t(); // 7 x 11, column-major storage
        let want = naive(&am, &bm);
        for parallel in [false, true] {
            let mut dst = vec![1.0; 55];
            sgemm(&mut dst, am, bm, true, parallel).unwrap();
            for (d, w) in dst.iter().zip(&want) {
                assert!((d - (w + 1.0)).abs() < 1e-4);
            }
            sgemm(&mut dst, am, bm, false, parallel).unwrap();
            for (d, w) in dst.iter().zip(&want) {
                assert!((d - w).abs() < 1e-4);
            }
        }
    }

    #[test]
    fn rejects_views_outside_their_buffer() {
        let a = vec![0.0; 6];
        let mut dst = vec![0.0; 9];
        let bad = MatRef::row_major(&a, 3, 3);
        assert!(sgemm(&mut dst, bad, bad, false, false).is_err());
    }
}
