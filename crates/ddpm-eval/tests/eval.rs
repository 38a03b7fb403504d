//! Evaluator tests: the Fréchet distance against closed forms, the matrix square root on an
//! ill-conditioned covariance, the score bounds, and the shipped classifier's test accuracy.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::needless_range_loop)]

use std::path::PathBuf;

use candle_core::Device;
use ddpm_core::SeededNoise;
use ddpm_data::{load_dataset, DatasetKind, Split};
use ddpm_eval::linalg::{sqrtm_psd, symmetric_eigen, Matrix};
use ddpm_eval::{
    class_accuracy, class_histogram_entropy, frechet_distance, inception_score, Classifier,
    EvalError, FeatureStats, Reference,
};

fn stats(mean: Vec<f64>, cov: Vec<f64>) -> FeatureStats {
    let n = mean.len();
    FeatureStats {
        count: 1000,
        mean,
        cov: Matrix { n, data: cov },
    }
}

/// A random rotation (orthonormal columns) from Gram–Schmidt on Gaussian columns.
fn rotation(n: usize, rng: &mut SeededNoise) -> Matrix {
    let g: Vec<f64> = rng.randn_vec(n * n).into_iter().map(f64::from).collect();
    let mut q = Matrix::zeros(n);
    for j in 0..n {
        let mut v: Vec<f64> = (0..n).map(|i| g[i * n + j]).collect();
        for k in 0..j {
            let dot: f64 = (0..n).map(|i| v[i] * q.at(i, k)).sum();
            for (i, vi) in v.iter_mut().enumerate() {
                *vi -= dot * q.at(i, k);
            }
        }
        let norm = v.iter().map(|x| x * x).sum::<f64>().sqrt();
        for i in 0..n {
            q.data[i * n + j] = v[i] / norm;
        }
    }
    q
}

fn with_eigenvalues(q: &Matrix, vals: &[f64]) -> Matrix {
    let n = q.n;
    let mut d = Matrix::zeros(n);
    for i in 0..n {
        d.data[i * n + i] = vals[i];
    }
    q.matmul(&d).matmul(&q.t()).symmetrized()
}

#[test]
fn frechet_distance_of_1d_gaussians_is_the_closed_form() {
    // (μ1−μ2)² + (σ1−σ2)²
    let a = stats(vec![1.0], vec![4.0]);
    let b = stats(vec![-2.0], vec![9.0]);
    let fd = frechet_distance(&a, &b).unwrap();
    assert!((fd - (9.0 + 1.0)).abs() < 1e-9, "{fd}");
}

#[test]
fn frechet_distance_of_non_commuting_2x2_covariances_matches_the_2x2_formula() {
    // For 2×2 PSD matrices tr √(Σ1Σ2) = √(tr(Σ1Σ2) + 2√(det Σ1 · det Σ2)).
    let s1: Vec<f64> = vec![2.0, 0.6, 0.6, 1.0];
    let s2: Vec<f64> = vec![0.5, -0.3, -0.3, 3.0];
    let tr12 = s1[0] * s2[0] + s1[1] * s2[2] + s1[2] * s2[1] + s1[3] * s2[3];
    let det1 = s1[0] * s1[3] - s1[1] * s1[2];
    let det2 = s2[0] * s2[3] - s2[1] * s2[2];
    let tr_sqrt = (tr12 + 2.0 * (det1 * det2).sqrt()).sqrt();
    let (m1, m2) = (vec![0.5, -1.0], vec![1.5, 1.0]);
    let want = (1.0 + 4.0) + (s1[0] + s1[3]) + (s2[0] + s2[3]) - 2.0 * tr_sqrt;
    let fd = frechet_distance(&stats(m1, s1), &stats(m2, s2)).unwrap();
    assert!((fd - want).abs() < 1e-9, "{fd} vs {want}");
}

#[test]
fn frechet_distance_of_commuting_covariances_in_64_dimensions() {
    // Σ1 = Q A Qᵀ, Σ2 = Q B Qᵀ: the distance is Σ (√a − √b)² plus the mean term.
    let mut rng = SeededNoise::new(1);
    let n = 64;
    let q = rotation(n, &mut rng);
    let a: Vec<f64> = (0..n).map(|i| 0.1 + i as f64 * 0.05).collect();
    let b: Vec<f64> = (0..n).map(|i| 2.0 / (1.0 + i as f64)).collect();
    let want: f64 = a
        .iter()
        .zip(&b)
        .map(|(x, y)| (x.sqrt() - y.sqrt()).powi(2))
        .sum::<f64>()
        + 0.25 * n as f64;
    let fd = frechet_distance(
        &stats(vec![0.0; n], with_eigenvalues(&q, &a).data),
        &stats(vec![0.5; n], with_eigenvalues(&q, &b).data),
    )
    .unwrap();
    assert!((fd - want).abs() < 1e-7 * want, "{fd} vs {want}");
}

#[test]
fn a_set_against_itself_is_zero() {
    let mut rng = SeededNoise::new(2);
    let dim = 16;
    let feats = rng.randn_vec(500 * dim);
    let s = FeatureStats::from_rows(&feats, dim).unwrap();
    assert!(frechet_distance(&s, &s).unwrap() < 1e-8);
    // And a different draw of the same distribution is small but not zero.
    let other = FeatureStats::from_rows(&rng.randn_vec(500 * dim), dim).unwrap();
    let fd = frechet_distance(&s, &other).unwrap();
    assert!(fd > 1e-3 && fd < 2.0, "{fd}");
}

#[test]
fn sqrtm_is_accurate_on_an_ill_conditioned_covariance() {
    let mut rng = SeededNoise::new(3);
    let n = 40;
    let q = rotation(n, &mut rng);
    // Condition number 1e10.
    let vals: Vec<f64> = (0..n)
        .map(|i| 10f64.powf(-10.0 * i as f64 / (n - 1) as f64))
        .collect();
    let a = with_eigenvalues(&q, &vals);
    let s = sqrtm_psd(&a);
    let back = s.matmul(&s);
    let err: f64 = back
        .data
        .iter()
        .zip(&a.data)
        .map(|(x, y)| (x - y).powi(2))
        .sum::<f64>()
        .sqrt();
    let norm: f64 = a.data.iter().map(|x| x * x).sum::<f64>().sqrt();
    assert!(err / norm < 1e-12, "relative error {}", err / norm);
    // The smallest eigenvalues are recovered to relative accuracy, not just absolute.
    let (ev, _) = symmetric_eigen(&a);
    let mut ev = ev;
    ev.sort_by(|x, y| x.partial_cmp(y).unwrap());
    assert!((ev[0] - 1e-10).abs() < 1e-6 * 1.0, "{}", ev[0]);
    for i in 0..n {
        assert!((s.at(i, (i + 3) % n) - s.at((i + 3) % n, i)).abs() < 1e-12);
    }
}

#[test]
fn inception_score_and_entropy_bounds() {
    let k = 10;
    let uniform = vec![0.1f32; 50 * k];
    assert!((inception_score(&uniform, k).unwrap() - 1.0).abs() < 1e-6);
    let mut onehot = vec![0f32; 50 * k];
    for i in 0..50 {
        onehot[i * k + i % k] = 1.0;
    }
    assert!((inception_score(&onehot, k).unwrap() - 10.0).abs() < 1e-6);
    let all_same: Vec<u32> = vec![3; 40];
    assert_eq!(class_histogram_entropy(&all_same, k), 0.0);
    let balanced: Vec<u32> = (0..40).map(|i| i % 10).collect();
    assert!((class_histogram_entropy(&balanced, k) - 10f64.ln()).abs() < 1e-12);
    assert!(inception_score(&[0.5, 0.5, 0.5], 2).is_err());
}

#[test]
fn class_accuracy_counts_per_class() {
    let probs = [0.9f32, 0.1, 0.2, 0.8, 0.6, 0.4, 0.3, 0.7];
    let acc = class_accuracy(&probs, &[0, 1, 1, 1], 2).unwrap();
    assert_eq!(acc.counts, vec![1, 3]);
    assert!((acc.overall - 0.75).abs() < 1e-12);
    assert!((acc.per_class[1] - 2.0 / 3.0).abs() < 1e-12);
    assert!((acc.mean_confidence - (0.9 + 0.8 + 0.4 + 0.7) / 4.0).abs() < 1e-6);
    assert!(class_accuracy(&probs, &[0, 1, 2, 1], 2).is_err());
}

fn shipped() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../assets/mnist-classifier.safetensors")
}

#[test]
fn shipped_classifier_scores_at_least_98_percent_on_the_test_split() {
    let dev = Device::Cpu;
    let (model, info) = Classifier::load(&shipped(), &dev).unwrap();
    assert!(
        info.test_accuracy >= 0.992,
        "recorded {}",
        info.test_accuracy
    );
    let test = load_dataset(&DatasetKind::Mnist, None, Split::Test, (28, 28)).unwrap();
    let acc = ddpm_eval::test_accuracy(&model, &test, &dev).unwrap();
    assert!(acc >= 0.98, "test accuracy {acc}");
    // Real test digits against themselves: fid 0, and a high IS; the requested classes are
    // the true labels, so the accuracy is the classifier's.
    let (x, y) = test.take(2000).to_tensors(&dev).unwrap();
    let reference = Reference::new(&model, &x).unwrap();
    let labels = y.to_vec1::<u32>().unwrap();
    let m = reference.evaluate(&model, &x, Some(&labels)).unwrap();
    assert!(m.fid_mnist < 1e-6, "{}", m.fid_mnist);
    assert!(m.is_mnist > 9.0, "{}", m.is_mnist);
    assert!(m.accuracy.unwrap().overall >= 0.98);
    assert!(m.class_entropy > 2.2);
    // Pure noise is far from digits.
    let noise = candle_core::Tensor::rand(-1f32, 1f32, (500, 1, 28, 28), &dev).unwrap();
    let n = reference.evaluate(&model, &noise, None).unwrap();
    assert!(n.fid_mnist > 10.0 * (m.fid_mnist + 1.0), "{}", n.fid_mnist);
}

#[test]
fn classifier_file_errors_name_the_file_and_the_fix() {
    let dev = Device::Cpu;
    let missing = PathBuf::from("/nonexistent/clf.safetensors");
    let err = Classifier::load(&missing, &dev).unwrap_err();
    assert!(matches!(err, EvalError::Classifier { .. }));
    let msg = err.to_string();
    assert!(
        msg.contains("/nonexistent/clf.safetensors") && msg.contains("train-classifier"),
        "{msg}"
    );
    let dir = std::env::temp_dir().join(format!("ddpm-eval-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let junk = dir.join("junk.safetensors");
    std::fs::write(&junk, b"not a safetensors file").unwrap();
    let msg = Classifier::load(&junk, &dev).unwrap_err().to_string();
    assert!(msg.contains("not a safetensors file"), "{msg}");
    // A truncated copy of the real one.
    let bytes = std::fs::read(shipped()).unwrap();
    let cut = dir.join("cut.safetensors");
    std::fs::write(&cut, &bytes[..bytes.len() / 2]).unwrap();
    assert!(Classifier::load(&cut, &dev).is_err());
    std::fs::remove_dir_all(&dir).ok();
}

#[test]
fn classifier_training_learns_from_a_small_subset() {
    let dev = Device::Cpu;
    let train = load_dataset(&DatasetKind::Mnist, None, Split::Train, (28, 28))
        .unwrap()
        .take(1536);
    let test = load_dataset(&DatasetKind::Mnist, None, Split::Test, (28, 28))
        .unwrap()
        .take(500);
    let cfg = ddpm_eval::ClassifierTrainConfig {
        epochs: 2,
        batch_size: 64,
        ..Default::default()
    };
    let mut losses = Vec::new();
    let (varmap, _model, info) =
        ddpm_eval::train_classifier(&train, &test, &cfg, &dev, |_, loss, _| losses.push(loss))
            .unwrap();
    assert_eq!(losses.len(), 2);
    assert!(losses[1] < losses[0], "{losses:?}");
    assert!(info.test_accuracy > 0.7, "{}", info.test_accuracy);
    // Saved and reloaded, it predicts the same.
    let dir = std::env::temp_dir().join(format!("ddpm-eval-train-{}", std::process::id()));
    let path = dir.join("clf.safetensors");
    ddpm_eval::save_classifier(&varmap, &info, &path).unwrap();
    let (back, back_info) = Classifier::load(&path, &dev).unwrap();
    assert_eq!(back_info, info);
    let acc = ddpm_eval::test_accuracy(&back, &test, &dev).unwrap();
    assert!((acc - info.test_accuracy).abs() < 1e-9);
    std::fs::remove_dir_all(&dir).ok();
}

/// The protocol in the library: a sweep over "guidance weights" whose generator returns real
/// digits or noise, the report written and read back, merging, and the refusals.
#[test]
fn sweep_report_and_merge() {
    let dev = Device::Cpu;
    let (model, info) = Classifier::load(&shipped(), &dev).unwrap();
    let test = load_dataset(&DatasetKind::Mnist, None, Split::Test, (28, 28)).unwrap();
    let (x, y) = test.take(600).to_tensors(&dev).unwrap();
    let reference = Reference::new(&model, &x.narrow(0, 0, 300).unwrap()).unwrap();
    let digits = x.narrow(0, 300, 300).unwrap();
    let labels: Vec<u32> = y.narrow(0, 300, 300).unwrap().to_vec1().unwrap();
    let mut seen = Vec::new();
    // w = 0 gives real digits, w = 1 noise; the rows come back sorted by w.
    let rows = ddpm_eval::sweep(
        &model,
        &reference,
        &[1.0, 0.0],
        Some(&labels),
        &mut |w| {
            Ok(if w == 0.0 {
                digits.clone()
            } else {
                candle_core::Tensor::rand(-1f32, 1f32, (300, 1, 28, 28), &dev)?
            })
        },
        &mut |r| seen.push(r.w),
    )
    .unwrap();
    assert_eq!(seen, vec![1.0, 0.0]);
    assert_eq!(rows.iter().map(|r| r.w).collect::<Vec<_>>(), vec![0.0, 1.0]);
    assert!(rows[0].metrics.accuracy.as_ref().unwrap().overall > 0.95);
    assert!(rows[1].metrics.fid_mnist > 10.0 * rows[0].metrics.fid_mnist);
    let card: serde_json::Value = serde_json::from_str(include_str!("card.json")).unwrap();
    let report = |rows: Vec<ddpm_eval::Row>, sampler: &str| ddpm_eval::Report {
        checkpoint: "c.safetensors".into(),
        card: card.clone(),
        n: 300,
        steps: 20,
        sampler: sampler.into(),
        spacing: "leading".into(),
        seed: 1,
        classifier: shipped().display().to_string(),
        classifier_test_accuracy: info.test_accuracy,
        real_data_floor: rows[0].metrics.clone(),
        rows,
    };
    let dir = tempfile::tempdir().unwrap();
    let (a, b) = (dir.path().join("a"), dir.path().join("b"));
    let written = report(vec![rows[1].clone()], "dpmpp").write(&a).unwrap();
    assert_eq!(written.len(), 3, "{written:?}");
    report(vec![rows[0].clone()], "dpm++").write(&b).unwrap();
    let merged = ddpm_eval::merge_reports(&[a.join("report.json"), b.join("report.json")]).unwrap();
    // Merged and sorted by w (dpmpp and dpm++ are one sampler); JSON keeps the figures to
    // within an ulp.
    assert_eq!(
        merged.rows.iter().map(|r| r.w).collect::<Vec<_>>(),
        vec![0.0, 1.0]
    );
    for (m, r) in merged.rows.iter().zip(&rows) {
        assert!((m.metrics.fid_mnist - r.metrics.fid_mnist).abs() < 1e-9);
    }
    assert!(merged.table().contains("| real (train vs test) |"));
    // The same w twice, and another setting, are refused.
    let twice = ddpm_eval::merge_reports(&[a.join("report.json"), a.join("report.json")]);
    assert!(twice.unwrap_err().to_string().contains("appears twice"));
    report(vec![rows[0].clone()], "ddim").write(&b).unwrap();
    let other = ddpm_eval::merge_reports(&[a.join("report.json"), b.join("report.json")]);
    assert!(other
        .unwrap_err()
        .to_string()
        .contains("another checkpoint"));
}
