//! The fused ops on CUDA against their CPU halves. Built with `--features cuda`; without that
//! feature, or without a GPU, every test prints why it skipped and passes.
#![allow(clippy::unwrap_used)]

use candle_core::{Device, Tensor};
use ddpm_core::testing::{max_abs_diff, randn};
use ddpm_core::SeededNoise;
use ddpm_kernels::*;

/// The first GPU, or `None` after printing why the test is skipped.
fn gpu(test: &str) -> Option<Device> {
    ddpm_core::testing::cuda_or_skip(test, cfg!(feature = "cuda"))
}

#[test]
fn reverse_step_on_cuda_matches_cpu() {
    let Some(dev) = gpu("reverse_step_on_cuda_matches_cpu") else {
        return;
    };
    let mut rng = SeededNoise::new(1);
    let dims = [37usize, 1, 28, 28];
    let x = (randn(&mut rng, &dims) * 1.5).unwrap();
    let pair = randn(&mut rng, &[74, 1, 28, 28]);
    let extra = randn(&mut rng, &dims);
    for clip_x0 in [true, false] {
        let rule = StepRule {
            alpha_bar: 0.3,
            clip_x0,
            c_x0: 0.6,
            c_eps: 0.7,
            c_x: 0.1,
            c_extra: 0.2,
        };
        let on = |d: &Device| {
            let (x, p, z) = (
                x.to_device(d).unwrap(),
                pair.to_device(d).unwrap(),
                extra.to_device(d).unwrap(),
            );
            let guided =
                reverse_step(&x, Eps::Guided { pair: &p, w: 3.0 }, Some(&z), &rule).unwrap();
            let half = p.narrow(0, 0, 37).unwrap();
            let plain = reverse_step(&x, Eps::Plain(&half), Some(&z), &rule).unwrap();
            [guided.0, guided.1, plain.0, plain.1]
        };
        let (c, g) = (on(&Device::Cpu), on(&dev));
        for (i, (c, g)) in c.iter().zip(&g).enumerate() {
            let d = max_abs_diff(c, g);
            assert!(d < 1e-5, "clip {clip_x0}, output {i}: {d}");
        }
    }
}

#[test]
fn add_noise_on_cuda_matches_cpu() {
    let Some(dev) = gpu("add_noise_on_cuda_matches_cpu") else {
        return;
    };
    let mut rng = SeededNoise::new(2);
    let dims = [33usize, 3, 17, 5];
    let (x0, noise, coef) = (
        randn(&mut rng, &dims),
        randn(&mut rng, &dims),
        randn(&mut rng, &[33, 2]),
    );
    let cpu = add_noise(&x0, &noise, &coef).unwrap();
    let g = add_noise(
        &x0.to_device(&dev).unwrap(),
        &noise.to_device(&dev).unwrap(),
        &coef.to_device(&dev).unwrap(),
    )
    .unwrap();
    assert!(max_abs_diff(&cpu, &g) < 1e-6);
}

#[test]
fn adamw_and_ema_on_cuda_match_cpu() {
    let Some(dev) = gpu("adamw_and_ema_on_cuda_match_cpu") else {
        return;
    };
    let mut rng = SeededNoise::new(3);
    let dims = [130usize, 67, 3];
    let w = randn(&mut rng, &dims);
    let g = randn(&mut rng, &dims);
    let m = randn(&mut rng, &dims);
    let v = randn(&mut rng, &dims).sqr().unwrap();
    let mv = Tensor::stack(&[m, v], 0).unwrap();
    let avg = randn(&mut rng, &dims);
    let p = AdamWApply {
        lr: 2e-3,
        bias_correction1: 0.271,
        bias_correction2: 0.003,
        eps: 1e-8,
        weight_decay: 0.05,
    };
    let run = |d: &Device| {
        let (w, g, mv, avg) = (
            w.to_device(d).unwrap().copy().unwrap(),
            g.to_device(d).unwrap(),
            mv.to_device(d).unwrap().copy().unwrap(),
            avg.to_device(d).unwrap().copy().unwrap(),
        );
        adam_moments(&mv, &g, 0.9, 0.999, 0.7).unwrap();
        adamw_apply(&w, &mv, &p).unwrap();
        ema_update(&avg, &w, 0.995).unwrap();
        [mv, w, avg]
    };
    let (c, gp) = (run(&Device::Cpu), run(&dev));
    for (i, (c, g)) in c.iter().zip(&gp).enumerate() {
        let d = max_abs_diff(c, g);
        assert!(d < 1e-5, "state {i}: {d}");
    }
}
