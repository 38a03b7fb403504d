//! Sample-quality metrics from a classifier's outputs: class accuracy, confidence, the Fréchet
//! distance between feature Gaussians, the classifier-based Inception Score and the entropy of
//! the predicted-class histogram.

use serde::{Deserialize, Serialize};

use crate::linalg::{sqrtm_psd, Matrix};
use crate::EvalError;

/// Mean and covariance of a set of feature vectors (f64).
#[derive(Debug, Clone, PartialEq)]
pub struct FeatureStats {
    /// Number of vectors.
    pub count: usize,
    /// Mean, `d` entries.
    pub mean: Vec<f64>,
    /// Unbiased covariance, `d × d`.
    pub cov: Matrix,
}

impl FeatureStats {
    /// Statistics of `count` row vectors of width `dim` stored row-major in `features`.
    pub fn from_rows(features: &[f32], dim: usize) -> Result<Self, EvalError> {
        if dim == 0 || !features.len().is_multiple_of(dim) {
            return Err(EvalError::Shape(format!(
                "{} feature values are not rows of width {dim}",
                features.len()
            )));
        }
        let count = features.len() / dim;
        if count < 2 {
            return Err(EvalError::Shape(format!(
                "a covariance needs at least 2 samples, got {count}"
            )));
        }
        let mut mean = vec![0f64; dim];
        for row in features.chunks(dim) {
            for (m, &x) in mean.iter_mut().zip(row) {
                *m += x as f64;
            }
        }
        mean.iter_mut().for_each(|m| *m /= count as f64);
        let mut cov = Matrix::zeros(dim);
        let mut centered = vec![0f64; dim];
        for row in features.chunks(dim) {
            for ((c, &x), m) in centered.iter_mut().zip(row).zip(&mean) {
                *c = x as f64 - m;
            }
            for i in 0..dim {
                let ci = centered[i];
                if ci == 0.0 {
                    continue;
                }
                for (o, &cj) in cov.data[i * dim..(i + 1) * dim].iter_mut().zip(&centered) {
                    *o += ci * cj;
                }
            }
        }
        cov.data.iter_mut().for_each(|c| *c /= (count - 1) as f64);
        Ok(Self { count, mean, cov })
    }
}

/// The Fréchet distance between two Gaussians:
/// `‖μ₁ − μ₂‖² + tr(Σ₁ + Σ₂ − 2 (Σ₁^½ Σ₂ Σ₁^½)^½)`.
///
/// The symmetric form `(Σ₁^½ Σ₂ Σ₁^½)^½` has the same trace as `(Σ₁Σ₂)^½` and keeps every
/// square root on a symmetric PSD matrix, so no complex parts appear.
///
/// ```
/// use ddpm_eval::{frechet_distance, FeatureStats};
/// let a = FeatureStats::from_rows(&[0.0, 1.0, 2.0, 3.0], 1)?;
/// let b = FeatureStats::from_rows(&[10.0, 11.0, 12.0, 13.0], 1)?;
/// // Equal variances: the distance is the squared mean difference.
/// assert!((frechet_distance(&a, &b)? - 100.0).abs() < 1e-9);
/// # Ok::<(), ddpm_eval::EvalError>(())
/// ```
pub fn frechet_distance(a: &FeatureStats, b: &FeatureStats) -> Result<f64, EvalError> {
    if a.mean.len() != b.mean.len() {
        return Err(EvalError::Shape(format!(
            "feature widths differ: {} vs {}",
            a.mean.len(),
            b.mean.len()
        )));
    }
    let diff: f64 = a
        .mean
        .iter()
        .zip(&b.mean)
        .map(|(x, y)| (x - y).powi(2))
        .sum();
    let s1 = sqrtm_psd(&a.cov);
    let inner = s1.matmul(&b.cov).matmul(&s1);
    let covmean = sqrtm_psd(&inner);
    let fd = diff + a.cov.trace() + b.cov.trace() - 2.0 * covmean.trace();
    Ok(fd.max(0.0))
}

/// `exp(E_x KL(p(y|x) ‖ p(y)))` over rows of class probabilities (`classes` wide).
/// Ranges from 1 (every sample gets the same distribution) to `classes` (each sample is
/// confidently one class, all classes equally often).
pub fn inception_score(probs: &[f32], classes: usize) -> Result<f64, EvalError> {
    let rows = check_rows(probs, classes)?;
    let mut marginal = vec![0f64; classes];
    for row in probs.chunks(classes) {
        for (m, &p) in marginal.iter_mut().zip(row) {
            *m += p as f64;
        }
    }
    marginal.iter_mut().for_each(|m| *m /= rows as f64);
    let mut kl = 0f64;
    for row in probs.chunks(classes) {
        for (&p, &m) in row.iter().zip(&marginal) {
            let p = p as f64;
            if p > 0.0 && m > 0.0 {
                kl += p * (p.ln() - m.ln());
            }
        }
    }
    Ok((kl / rows as f64).exp())
}

/// Entropy (nats) of the histogram of predicted classes; `ln(classes)` when every class is
/// predicted equally often (what an unconditional model should reach).
pub fn class_histogram_entropy(predicted: &[u32], classes: usize) -> f64 {
    let mut counts = vec![0usize; classes];
    for &p in predicted {
        if let Some(c) = counts.get_mut(p as usize) {
            *c += 1;
        }
    }
    let n = counts.iter().sum::<usize>().max(1) as f64;
    counts
        .iter()
        .filter(|&&c| c > 0)
        .map(|&c| {
            let p = c as f64 / n;
            -p * p.ln()
        })
        .sum()
}

fn check_rows(probs: &[f32], classes: usize) -> Result<usize, EvalError> {
    if classes == 0 || probs.is_empty() || !probs.len().is_multiple_of(classes) {
        return Err(EvalError::Shape(format!(
            "{} probabilities are not rows of {classes} classes",
            probs.len()
        )));
    }
    Ok(probs.len() / classes)
}

/// Accuracy of the classifier's predictions against the classes the samples were asked for.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ClassAccuracy {
    /// Fraction of samples classified as their requested class.
    pub overall: f64,
    /// Per requested class (NaN-free: classes with no samples are 0 with `counts` 0).
    pub per_class: Vec<f64>,
    /// Samples per requested class.
    pub counts: Vec<usize>,
    /// Mean probability the classifier gives the requested class.
    pub mean_confidence: f64,
}

/// Compares argmax predictions of `probs` with `targets`.
pub fn class_accuracy(
    probs: &[f32],
    targets: &[u32],
    classes: usize,
) -> Result<ClassAccuracy, EvalError> {
    let rows = check_rows(probs, classes)?;
    if rows != targets.len() {
        return Err(EvalError::Shape(format!(
            "{rows} predictions for {} targets",
            targets.len()
        )));
    }
    let (mut right, mut counts) = (vec![0usize; classes], vec![0usize; classes]);
    let mut conf = 0f64;
    for (row, &t) in probs.chunks(classes).zip(targets) {
        let t = t as usize;
        if t >= classes {
            return Err(EvalError::Shape(format!("target class {t} ≥ {classes}")));
        }
        counts[t] += 1;
        conf += row[t] as f64;
        if argmax(row) == t {
            right[t] += 1;
        }
    }
    Ok(ClassAccuracy {
        overall: right.iter().sum::<usize>() as f64 / rows as f64,
        per_class: right
            .iter()
            .zip(&counts)
            .map(|(&r, &c)| if c > 0 { r as f64 / c as f64 } else { 0.0 })
            .collect(),
        counts,
        mean_confidence: conf / rows as f64,
    })
}

/// Index of the largest entry (the first on ties).
pub fn argmax(row: &[f32]) -> usize {
    let mut best = 0;
    for (i, &v) in row.iter().enumerate() {
        if v > row[best] {
            best = i;
        }
    }
    best
}
