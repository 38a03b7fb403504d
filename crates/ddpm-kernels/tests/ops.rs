//! The fused ops on the CPU against their candle compositions, at sizes that take both the
//! serial and the parallel loop, and their errors.
#![allow(clippy::unwrap_used)]

use candle_core::{DType, Device, Tensor};
use ddpm_core::testing::{max_abs_diff, randn};
use ddpm_core::SeededNoise;
use ddpm_kernels::*;

/// Rules as the three samplers use them (values from a linear schedule, mid-chain).
fn rules() -> Vec<(&'static str, StepRule, bool)> {
    let base = StepRule {
        alpha_bar: 0.3,
        clip_x0: true,
        c_x0: 0.0,
        c_eps: 0.0,
        c_x: 0.0,
        c_extra: 0.0,
    };
    vec![
        (
            "ddpm",
            StepRule {
                c_x0: 0.12,
                c_x: 0.87,
                c_extra: 0.05,
                ..base
            },
            true,
        ),
        (
            "ddim",
            StepRule {
                c_x0: 0.62,
                c_eps: 0.78,
                ..base
            },
            false,
        ),
        (
            "ddim unclipped",
            StepRule {
                clip_x0: false,
                c_x0: 0.62,
                c_eps: 0.78,
                ..base
            },
            false,
        ),
        (
            "dpm++",
            StepRule {
                c_x0: -0.4,
                c_x: 1.3,
                c_extra: 0.2,
                ..base
            },
            true,
        ),
    ]
}

#[test]
fn reverse_step_matches_the_composition() {
    let mut rng = SeededNoise::new(1);
    // 3 × 1 × 5 × 7 stays under one chunk; 50 × 3 × 28 × 28 spans several.
    for dims in [[3usize, 1, 5, 7], [50, 3, 28, 28]] {
        let x = (randn(&mut rng, &dims) * 1.5).unwrap();
        let eps = randn(&mut rng, &dims);
        let mut pair_dims = dims;
        pair_dims[0] *= 2;
        let pair = randn(&mut rng, &pair_dims);
        let extra = randn(&mut rng, &dims);
        for (name, rule, uses_extra) in rules() {
            let z = uses_extra.then_some(&extra);
            for eps in [
                Eps::Plain(&eps),
                Eps::Guided {
                    pair: &pair,
                    w: 3.0,
                },
            ] {
                let (p1, x1) = reverse_step(&x, eps, z, &rule).unwrap();
                let (p2, x2) = reverse_step_composed(&x, eps, z, &rule).unwrap();
                assert_eq!(p1.dims(), &dims);
                assert_eq!(x1.dims(), &dims);
                let (dp, dx) = (max_abs_diff(&p1, &p2), max_abs_diff(&x1, &x2));
                assert!(dp < 2e-5 && dx < 2e-5, "{name} {dims:?}: {dp} {dx}");
                if rule.clip_x0 {
                    let m = x1.abs().unwrap().flatten_all().unwrap().max(0).unwrap();
                    assert!(m.to_scalar::<f32>().unwrap() <= 1.0);
                }
            }
        }
    }
}

#[test]
fn guided_step_with_zero_weight_is_the_conditional_step() {
    let mut rng = SeededNoise::new(2);
    let x = randn(&mut rng, &[4, 1, 6, 6]);
    let pair = randn(&mut rng, &[8, 1, 6, 6]);
    let cond = pair.narrow(0, 0, 4).unwrap();
    let (_, rule, _) = rules()[1];
    let (a, _) = reverse_step(
        &x,
        Eps::Guided {
            pair: &pair,
            w: 0.0,
        },
        None,
        &rule,
    )
    .unwrap();
    let (b, _) = reverse_step(&x, Eps::Plain(&cond), None, &rule).unwrap();
    assert_eq!(max_abs_diff(&a, &b), 0.0);
    // And w > 0 moves away from it, along (cond − uncond).
    let (c, _) = reverse_step(
        &x,
        Eps::Guided {
            pair: &pair,
            w: 2.0,
        },
        None,
        &rule,
    )
    .unwrap();
    assert!(max_abs_diff(&a, &c) > 1e-3);
}

#[test]
fn reverse_step_rejects_bad_input() {
    let x = Tensor::zeros((2, 1, 4, 4), DType::F32, &Device::Cpu).unwrap();
    let (_, rule, _) = rules()[0];
    let msg = |r: candle_core::Result<(Tensor, Tensor)>| r.unwrap_err().to_string();
    let e = msg(reverse_step(&x, Eps::Plain(&x), None, &rule));
    assert!(e.contains("no extra tensor"), "{e}");
    let wrong = Tensor::zeros((3, 1, 4, 4), DType::F32, &Device::Cpu).unwrap();
    let e = msg(reverse_step(&x, Eps::Plain(&wrong), Some(&x), &rule));
    assert!(e.contains("differ in shape"), "{e}");
    let e = msg(reverse_step(
        &x,
        Eps::Guided { pair: &x, w: 1.0 },
        Some(&x),
        &rule,
    ));
    assert!(e.contains("[2B, …]"), "{e}");
    let bad = StepRule {
        alpha_bar: 1.0,
        ..rule
    };
    let e = msg(reverse_step(&x, Eps::Plain(&x), Some(&x), &bad));
    assert!(e.contains("(0, 1)"), "{e}");
}

#[test]
fn other_dtypes_take_the_composition() {
    let mut rng = SeededNoise::new(3);
    let x = randn(&mut rng, &[2, 3, 3]);
    let e = randn(&mut rng, &[2, 3, 3]);
    let (_, rule, _) = rules()[2];
    let (p32, _) = reverse_step(&x, Eps::Plain(&e), None, &rule).unwrap();
    let x64 = x.to_dtype(DType::F64).unwrap();
    let e64 = e.to_dtype(DType::F64).unwrap();
    let (p64, _) = reverse_step(&x64, Eps::Plain(&e64), None, &rule).unwrap();
    assert_eq!(p64.dtype(), DType::F64);
    let d = max_abs_diff(&p64.to_dtype(DType::F32).unwrap(), &p32);
    assert!(d < 1e-5, "{d}");
}

#[test]
fn add_noise_matches_the_composition() {
    let mut rng = SeededNoise::new(4);
    for dims in [[3usize, 1, 5, 7], [64, 1, 28, 28]] {
        let x0 = randn(&mut rng, &dims);
        let noise = randn(&mut rng, &dims);
        let coef = randn(&mut rng, &[dims[0], 2]);
        let a = add_noise(&x0, &noise, &coef).unwrap();
        let b = add_noise_composed(&x0, &noise, &coef).unwrap();
        assert!(max_abs_diff(&a, &b) < 1e-6);
        // Sample 1 uses row 1 of the coefficients.
        let c: Vec<f32> = coef.get(1).unwrap().to_vec1().unwrap();
        let want = ((x0.get(1).unwrap() * c[0] as f64).unwrap()
            + (noise.get(1).unwrap() * c[1] as f64).unwrap())
        .unwrap();
        assert!(max_abs_diff(&a.get(1).unwrap(), &want) < 1e-6);
    }
    let x0 = Tensor::zeros((2, 4), DType::F32, &Device::Cpu).unwrap();
    let coef = Tensor::zeros((3, 2), DType::F32, &Device::Cpu).unwrap();
    let e = add_noise(&x0, &x0, &coef).unwrap_err().to_string();
    assert!(e.contains("[B, 2]"), "{e}");
}

/// Runs `fused` and `composed` on two fresh copies of `state` and compares the copies after.
fn compare_in_place(
    state: &[Tensor],
    fused: impl Fn(&[Tensor]),
    composed: impl Fn(&[Tensor]),
    tol: f32,
) {
    let a: Vec<Tensor> = state.iter().map(|t| t.copy().unwrap()).collect();
    let b: Vec<Tensor> = state.iter().map(|t| t.copy().unwrap()).collect();
    fused(&a);
    composed(&b);
    for (i, (x, y)) in a.iter().zip(&b).enumerate() {
        let d = max_abs_diff(x, y);
        assert!(d <= tol, "state {i}: {d}");
    }
}

#[test]
fn adamw_and_ema_match_the_composition_and_update_in_place() {
    let mut rng = SeededNoise::new(5);
    for dims in [vec![7usize, 3], vec![96, 64, 3, 3]] {
        let w = randn(&mut rng, &dims);
        let g = randn(&mut rng, &dims);
        let mut mv_dims = vec![2];
        mv_dims.extend(&dims);
        // v ≥ 0, as it is in a run.
        let mv = Tensor::cat(
            &[
                &randn(&mut rng, &dims).unsqueeze(0).unwrap(),
                &randn(&mut rng, &dims).sqr().unwrap().unsqueeze(0).unwrap(),
            ],
            0,
        )
        .unwrap();
        let avg = randn(&mut rng, &dims);
        let p = AdamWApply {
            lr: 1e-3,
            bias_correction1: 1.0 - 0.9f64.powi(3),
            bias_correction2: 1.0 - 0.999f64.powi(3),
            eps: 1e-8,
            weight_decay: 0.01,
        };
        let before = w.to_vec1_flat();
        compare_in_place(
            &[mv.clone(), w.clone(), avg.clone()],
            |s| {
                adam_moments(&s[0], &g, 0.9, 0.999, 0.5).unwrap();
                adamw_apply(&s[1], &s[0], &p).unwrap();
                ema_update(&s[2], &s[1], 0.99).unwrap();
            },
            |s| {
                adam_moments_composed(&s[0], &g, 0.9, 0.999, 0.5).unwrap();
                adamw_apply_composed(&s[1], &s[0], &p).unwrap();
                ema_update_composed(&s[2], &s[1], 0.99).unwrap();
            },
            1e-6,
        );
        // In place: a fresh copy changes; the original (not passed) does not.
        let w2 = w.copy().unwrap();
        let mv2 = mv.copy().unwrap();
        adam_moments(&mv2, &g, 0.9, 0.999, 1.0).unwrap();
        adamw_apply(&w2, &mv2, &p).unwrap();
        assert_eq!(w.to_vec1_flat(), before);
        assert!(max_abs_diff(&w, &w2) > 1e-5);
    }
}

#[test]
fn in_place_ops_reject_mismatched_state() {
    let w = Tensor::zeros((4, 3), DType::F32, &Device::Cpu).unwrap();
    let mv = Tensor::zeros((2, 3, 4), DType::F32, &Device::Cpu).unwrap();
    let e = adam_moments(&mv, &w, 0.9, 0.999, 1.0)
        .unwrap_err()
        .to_string();
    assert!(e.contains("[2, …]"), "{e}");
    let avg = Tensor::zeros(12, DType::F32, &Device::Cpu).unwrap();
    let e = ema_update(&avg, &w, 0.9).unwrap_err().to_string();
    assert!(e.contains("differ in shape"), "{e}");
}

trait Flat {
    fn to_vec1_flat(&self) -> Vec<f32>;
}

impl Flat for Tensor {
    fn to_vec1_flat(&self) -> Vec<f32> {
        self.flatten_all().unwrap().to_vec1().unwrap()
    }
}
