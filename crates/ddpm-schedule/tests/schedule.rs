//! Schedule tests: reference values are computed here, independently of the crate.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use candle_core::{DType, Device, Tensor};
use ddpm_core::{NoiseSchedule, SeededNoise};
use ddpm_schedule::{BetaSchedule, PosteriorVariance, ScheduleConfig, ScheduleError};

fn close(a: f64, b: f64, tol: f64) -> bool {
    (a - b).abs() <= tol * b.abs().max(1e-12)
}

#[test]
fn linear_exact_values() {
    let t_total = 1000;
    let s = ScheduleConfig::new(BetaSchedule::linear(), t_total)
        .build()
        .unwrap();
    // Independent: β_t = 1e-4 + t (0.02 − 1e-4) / 999; ᾱ_t by a running product.
    for &t in &[0usize, 1, 10, 250, 500, 999] {
        let beta = 1e-4 + t as f64 * (0.02 - 1e-4) / 999.0;
        let mut abar = 1.0f64;
        for s in 0..=t {
            abar *= 1.0 - (1e-4 + s as f64 * (0.02 - 1e-4) / 999.0);
        }
        assert!(close(s.betas()[t], beta, 1e-12), "beta t={t}");
        assert!(close(s.alphas_cumprod()[t], abar, 1e-10), "abar t={t}");
    }
    // Well-known anchors of Ho et al.'s schedule.
    assert_eq!(s.betas()[0], 1e-4);
    assert!(close(s.betas()[999], 0.02, 1e-12));
    assert!(
        close(s.alphas_cumprod()[999], 4.035e-5, 1e-3),
        "{}",
        s.alphas_cumprod()[999]
    );
}

#[test]
fn cosine_exact_values() {
    for &t_total in &[300usize, 1000] {
        let s = ScheduleConfig::new(BetaSchedule::cosine(), t_total)
            .build()
            .unwrap();
        let f = |t: f64| {
            let x = ((t / t_total as f64 + 0.008) / 1.008 * std::f64::consts::PI / 2.0).cos();
            x * x
        };
        for &t in &[0usize, 1, t_total / 4, t_total / 2, t_total - 2] {
            // Before any clipping, ᾱ_t = f(t+1)/f(0).
            let abar = f(t as f64 + 1.0) / f(0.0);
            assert!(
                close(s.alphas_cumprod()[t], abar, 1e-9),
                "T={t_total} t={t}"
            );
            let beta = 1.0 - f(t as f64 + 1.0) / f(t as f64);
            assert!(close(s.betas()[t], beta, 1e-9), "T={t_total} t={t}");
        }
        // The last β is clipped at 0.999 (f(T) = cos²(π/2) ≈ 0).
        assert!(close(s.betas()[t_total - 1], 0.999, 1e-12));
        // Unlike candle's integer-division helper, early betas are not zero.
        assert!(s.betas()[0] > 1e-6);
    }
}

#[test]
fn sigmoid_values() {
    let s = ScheduleConfig::new(BetaSchedule::sigmoid(), 500)
        .build()
        .unwrap();
    let b = s.betas();
    let sig = |x: f64| 1.0 / (1.0 + (-x).exp());
    assert!(close(b[0], sig(-6.0) * (0.02 - 1e-4) + 1e-4, 1e-12));
    assert!(close(b[499], sig(6.0) * (0.02 - 1e-4) + 1e-4, 1e-12));
    assert!(b.windows(2).all(|w| w[1] > w[0]));
}

#[test]
fn alphas_cumprod_strictly_decreasing_in_unit_interval() {
    for beta in [
        BetaSchedule::linear(),
        BetaSchedule::cosine(),
        BetaSchedule::sigmoid(),
    ] {
        for &t_total in &[2usize, 200, 300, 400, 500, 1000] {
            let s = ScheduleConfig::new(beta, t_total).build().unwrap();
            let ac = s.alphas_cumprod();
            assert_eq!(ac.len(), t_total);
            assert!(
                ac.iter().all(|&a| a > 0.0 && a < 1.0),
                "{beta:?} T={t_total}"
            );
            assert!(ac.windows(2).all(|w| w[1] < w[0]), "{beta:?} T={t_total}");
        }
    }
}

#[test]
fn posterior_identities() {
    for beta in [
        BetaSchedule::linear(),
        BetaSchedule::cosine(),
        BetaSchedule::sigmoid(),
    ] {
        let s = ScheduleConfig::new(beta, 400).build().unwrap();
        let (ac, acp) = (s.alphas_cumprod(), s.alphas_cumprod_prev());
        assert_eq!(acp[0], 1.0);
        assert_eq!(s.posterior_variance()[0], 0.0);
        assert!(s
            .posterior_log_variance_clipped()
            .iter()
            .all(|v| v.is_finite()));
        assert_eq!(
            s.posterior_log_variance_clipped()[0],
            s.posterior_variance()[1].ln()
        );
        for t in 1..400 {
            let (c1, c2) = (s.posterior_mean_coef1()[t], s.posterior_mean_coef2()[t]);
            // With zero noise the posterior mean maps √ᾱ_t x0 onto √ᾱ_{t−1} x0.
            assert!(
                close(c1 + c2 * ac[t].sqrt(), acp[t].sqrt(), 1e-9),
                "{beta:?} t={t}"
            );
            // Marginalising the posterior over x_t | x_0 gives Var(x_{t−1} | x_0) = 1 − ᾱ_{t−1}.
            let var = c2 * c2 * (1.0 - ac[t]) + s.posterior_variance()[t];
            assert!(close(var, 1.0 - acp[t], 1e-9), "{beta:?} t={t}");
            // β̃_t ≤ β_t, and the two variance choices.
            assert!(s.posterior_variance()[t] <= s.betas()[t]);
            assert_eq!(s.variance(t, PosteriorVariance::Beta), s.betas()[t]);
            // Against the paper's formulas (Ho et al. 2020, eq. 7), written out here.
            let (b, a, ap) = (s.betas()[t], ac[t], acp[t]);
            assert!(close(c1, b * ap.sqrt() / (1.0 - a), 1e-14));
            assert!(close(c2, (1.0 - ap) * (1.0 - b).sqrt() / (1.0 - a), 1e-14));
            assert!(close(
                s.posterior_variance()[t],
                (1.0 - ap) / (1.0 - a) * b,
                1e-14
            ));
            assert_eq!(
                s.variance(t, PosteriorVariance::BetaTilde),
                s.posterior_variance()[t]
            );
        }
    }
}

#[test]
fn closed_form_matches_iterated_forward_process() -> candle_core::Result<()> {
    let s = ScheduleConfig::new(BetaSchedule::linear(), 300)
        .build()
        .unwrap();
    let n = 40_000;
    let x0v = 0.7f32;
    let dev = Device::Cpu;
    let mut rng = SeededNoise::new(11);
    for &t in &[0usize, 10, 120, 299] {
        // Iterate q(x_s | x_{s−1}) = N(√α_s x_{s−1}, β_s) for s = 0..=t.
        let mut x = vec![x0v as f64; n];
        for step in 0..=t {
            let eps = rng.randn_vec(n);
            let (a, b) = (s.alphas()[step].sqrt(), s.betas()[step].sqrt());
            for (xi, e) in x.iter_mut().zip(eps) {
                *xi = a * *xi + b * e as f64;
            }
        }
        let mean_it = x.iter().sum::<f64>() / n as f64;
        let var_it = x.iter().map(|v| (v - mean_it).powi(2)).sum::<f64>() / n as f64;
        // Closed form through add_noise, one t per sample.
        let x0 = Tensor::full(x0v, (n, 1), &dev)?;
        let noise = Tensor::from_vec(rng.randn_vec(n), (n, 1), &dev)?;
        let tt = Tensor::full(t as u32, n, &dev)?;
        let xt: Vec<f32> = s.add_noise(&x0, &noise, &tt)?.flatten_all()?.to_vec1()?;
        let mean_cf = xt.iter().map(|&v| v as f64).sum::<f64>() / n as f64;
        let var_cf = xt
            .iter()
            .map(|&v| (v as f64 - mean_cf).powi(2))
            .sum::<f64>()
            / n as f64;
        let ac = s.alphas_cumprod()[t];
        let (m, v) = (ac.sqrt() * x0v as f64, 1.0 - ac);
        let se_m = (v / n as f64).sqrt() * 5.0 + 1e-6;
        let se_v = v * (2.0 / n as f64).sqrt() * 5.0 + 1e-6;
        assert!(
            (mean_it - m).abs() < se_m,
            "t={t}: iterated mean {mean_it} vs {m}"
        );
        assert!(
            (mean_cf - m).abs() < se_m,
            "t={t}: closed-form mean {mean_cf} vs {m}"
        );
        assert!(
            (var_it - v).abs() < se_v,
            "t={t}: iterated var {var_it} vs {v}"
        );
        assert!(
            (var_cf - v).abs() < se_v,
            "t={t}: closed-form var {var_cf} vs {v}"
        );
    }
    Ok(())
}

#[test]
fn add_noise_uses_one_t_per_sample() -> candle_core::Result<()> {
    let s = ScheduleConfig::new(BetaSchedule::cosine(), 200)
        .build()
        .unwrap();
    let dev = Device::Cpu;
    let x0 = Tensor::ones((3, 1, 2, 2), DType::F32, &dev)?;
    let noise = Tensor::full(2f32, (3, 1, 2, 2), &dev)?;
    let ts = [5u32, 0, 199];
    let out = s.add_noise(&x0, &noise, &Tensor::new(&ts, &dev)?)?;
    let out: Vec<Vec<f32>> = out.flatten_from(1)?.to_vec2()?;
    for (row, &t) in out.iter().zip(&ts) {
        let ac = s.alphas_cumprod()[t as usize];
        let want = ac.sqrt() + 2.0 * (1.0 - ac).sqrt();
        assert!(row.iter().all(|&v| (v as f64 - want).abs() < 1e-5), "t={t}");
    }
    // t out of range and a t of the wrong length are errors, not panics.
    assert!(s
        .add_noise(&x0, &noise, &Tensor::new(&[0u32, 1, 200], &dev)?)
        .is_err());
    assert!(s
        .add_noise(&x0, &noise, &Tensor::new(&[0u32, 1], &dev)?)
        .is_err());
    // The host-timestep variant gives the same values and the same errors.
    let host = s.add_noise_from_host(&x0, &noise, &ts)?;
    let dev_t = s.add_noise(&x0, &noise, &Tensor::new(&ts, &dev)?)?;
    assert_eq!(
        host.flatten_all()?.to_vec1::<f32>()?,
        dev_t.flatten_all()?.to_vec1::<f32>()?
    );
    let e = s
        .add_noise_from_host(&x0, &noise, &[0, 1, 200])
        .unwrap_err();
    assert!(e.to_string().contains("outside 0..200"), "{e}");
    assert!(s.add_noise_from_host(&x0, &noise, &[0, 1]).is_err());
    Ok(())
}

#[test]
fn invalid_configs_are_rejected() {
    let bad = |beta, t| ScheduleConfig::new(beta, t).build().err();
    assert_eq!(
        bad(BetaSchedule::linear(), 0),
        Some(ScheduleError::TooFewTimesteps(0))
    );
    assert_eq!(
        bad(BetaSchedule::cosine(), 1),
        Some(ScheduleError::TooFewTimesteps(1))
    );
    assert!(matches!(
        bad(
            BetaSchedule::Linear {
                beta_start: f64::NAN,
                beta_end: 0.02
            },
            100
        ),
        Some(ScheduleError::NonFinite {
            name: "beta_start",
            ..
        })
    ));
    assert!(matches!(
        bad(
            BetaSchedule::Linear {
                beta_start: 1e-4,
                beta_end: 1.5
            },
            100
        ),
        Some(ScheduleError::BetaOutOfRange { .. })
    ));
    assert!(matches!(
        bad(
            BetaSchedule::Linear {
                beta_start: 0.0,
                beta_end: 0.02
            },
            100
        ),
        Some(ScheduleError::BetaOutOfRange { t: 0, .. })
    ));
    assert!(matches!(
        bad(
            BetaSchedule::Sigmoid {
                beta_start: -0.1,
                beta_end: 0.02
            },
            100
        ),
        Some(ScheduleError::BetaOutOfRange { .. })
    ));
    assert!(matches!(
        bad(
            BetaSchedule::Cosine {
                s: 0.008,
                max_beta: 1.0
            },
            100
        ),
        Some(ScheduleError::Invalid {
            name: "max_beta",
            ..
        })
    ));
    assert!(matches!(
        bad(
            BetaSchedule::Cosine {
                s: f64::INFINITY,
                max_beta: 0.999
            },
            100
        ),
        Some(ScheduleError::NonFinite { .. })
    ));
    // Errors say what is wrong.
    let msg = bad(BetaSchedule::linear(), 0).unwrap().to_string();
    assert!(msg.contains("at least 2"), "{msg}");
}

#[test]
fn config_round_trips_through_json() {
    for beta in [
        BetaSchedule::linear(),
        BetaSchedule::cosine(),
        BetaSchedule::sigmoid(),
    ] {
        let c = ScheduleConfig::new(beta, 321);
        let j = serde_json::to_string(&c).unwrap();
        assert_eq!(serde_json::from_str::<ScheduleConfig>(&j).unwrap(), c);
        assert_eq!(BetaSchedule::from_name(beta.name()), Some(beta));
    }
}
