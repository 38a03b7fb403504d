//! Small dense f64 linear algebra for the Fréchet distance: the symmetric eigendecomposition
//! (cyclic Jacobi, accurate for ill-conditioned matrices) and the PSD matrix square root.

/// A square row-major `n × n` matrix.
#[derive(Debug, Clone, PartialEq)]
pub struct Matrix {
    /// Side.
    pub n: usize,
    /// `n·n` entries, row-major.
    pub data: Vec<f64>,
}

impl Matrix {
    /// The zero matrix.
    pub fn zeros(n: usize) -> Self {
        Self {
            n,
            data: vec![0.0; n * n],
        }
    }

    /// The identity.
    pub fn identity(n: usize) -> Self {
        let mut m = Self::zeros(n);
        for i in 0..n {
            m.data[i * n + i] = 1.0;
        }
        m
    }

    /// Entry `(i, j)`.
    pub fn at(&self, i: usize, j: usize) -> f64 {
        self.data[i * self.n + j]
    }

    /// `self · other`.
    pub fn matmul(&self, other: &Matrix) -> Matrix {
        let n = self.n;
        let mut out = Matrix::zeros(n);
        for i in 0..n {
            for k in 0..n {
                let a = self.data[i * n + k];
                if a == 0.0 {
                    continue;
                }
                let row = &other.data[k * n..(k + 1) * n];
                for (o, &b) in out.data[i * n..(i + 1) * n].iter_mut().zip(row) {
                    *o += a * b;
                }
            }
        }
        out
    }

    /// The transpose.
    pub fn t(&self) -> Matrix {
        let n = self.n;
        let mut out = Matrix::zeros(n);
        for i in 0..n {
            for j in 0..n {
                out.data[j * n + i] = self.data[i * n + j];
            }
        }
        out
    }

    /// The trace.
    pub fn trace(&self) -> f64 {
        (0..self.n).map(|i| self.at(i, i)).sum()
    }

    /// `(self + selfᵀ) / 2`: removes rounding asymmetry before an eigendecomposition.
    pub fn symmetrized(&self) -> Matrix {
        let n = self.n;
        let mut out = self.clone();
        for i in 0..n {
            for j in 0..n {
                out.data[i * n + j] = 0.5 * (self.at(i, j) + self.at(j, i));
            }
        }
        out
    }
}

/// Eigenvalues and eigenvectors (columns of the returned matrix) of a symmetric matrix, by
/// cyclic Jacobi rotations until the off-diagonal mass is below 1e-15 of the total.
pub fn symmetric_eigen(a: &Matrix) -> (Vec<f64>, Matrix) {
    let n = a.n;
    let mut m = a.symmetrized();
    let mut v = Matrix::identity(n);
    let total: f64 = m
        .data
        .iter()
        .map(|x| x * x)
        .sum::<f64>()
        .max(f64::MIN_POSITIVE);
    for _sweep in 0..100 {
        let off: f64 = (0..n)
            .flat_map(|i| (0..n).filter(move |&j| j != i).map(move |j| (i, j)))
            .map(|(i, j)| m.at(i, j).powi(2))
            .sum();
        if off <= 1e-30 * total {
            break;
        }
        for p in 0..n {
            for q in p + 1..n {
                let apq = m.at(p, q);
                if apq == 0.0 {
                    continue;
                }
                let (app, aqq) = (m.at(p, p), m.at(q, q));
                let theta = (aqq - app) / (2.0 * apq);
                let t = theta.signum() / (theta.abs() + (theta * theta + 1.0).sqrt());
                let t = if theta == 0.0 { 1.0 } else { t };
                let c = 1.0 / (t * t + 1.0).sqrt();
                let s = t * c;
                // Rotate rows/columns p and q of m.
                for k in 0..n {
                    let (mkp, mkq) = (m.at(k, p), m.at(k, q));
                    m.data[k * n + p] = c * mkp - s * mkq;
                    m.data[k * n + q] = s * mkp + c * mkq;
                }
                for k in 0..n {
                    let (mpk, mqk) = (m.at(p, k), m.at(q, k));
                    m.data[p * n + k] = c * mpk - s * mqk;
                    m.data[q * n + k] = s * mpk + c * mqk;
                }
                for k in 0..n {
                    let (vkp, vkq) = (v.at(k, p), v.at(k, q));
                    v.data[k * n + p] = c * vkp - s * vkq;
                    v.data[k * n + q] = s * vkp + c * vkq;
                }
            }
        }
    }
    ((0..n).map(|i| m.at(i, i)).collect(), v)
}

/// The square root of a symmetric positive semi-definite matrix (negative eigenvalues from
/// rounding are clamped to zero).
pub fn sqrtm_psd(a: &Matrix) -> Matrix {
    let (vals, v) = symmetric_eigen(a);
    let n = a.n;
    let mut scaled = v.clone();
    for (j, &val) in vals.iter().enumerate() {
        let s = val.max(0.0).sqrt();
        for i in 0..n {
            scaled.data[i * n + j] *= s;
        }
    }
    scaled.matmul(&v.t())
}

#[cfg(test)]
#[allow(clippy::needless_range_loop)]
mod tests {
    use super::*;

    #[test]
    fn eigen_reconstructs_a_symmetric_matrix() {
        let n = 6;
        let mut a = Matrix::zeros(n);
        for i in 0..n {
            for j in 0..n {
                a.data[i * n + j] = ((i * 7 + j * 3) as f64).sin() + ((j * 7 + i * 3) as f64).sin();
            }
        }
        let (vals, v) = symmetric_eigen(&a);
        let mut d = Matrix::zeros(n);
        for i in 0..n {
            d.data[i * n + i] = vals[i];
        }
        let back = v.matmul(&d).matmul(&v.t());
        for (x, y) in back.data.iter().zip(&a.data) {
            assert!((x - y).abs() < 1e-10);
        }
        let orth = v.t().matmul(&v);
        for i in 0..n {
            for j in 0..n {
                let want = if i == j { 1.0 } else { 0.0 };
                assert!((orth.at(i, j) - want).abs() < 1e-10);
            }
        }
    }
}
