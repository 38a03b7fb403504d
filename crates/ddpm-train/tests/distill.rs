//! `ddpm distill`'s library: the targets against hand-computed values on toy denoisers, exact
//! resume of a stage, and a student that loads and samples through the pipeline.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::sync::atomic::AtomicBool;

use candle_core::{Device, Result, Tensor};
use ddpm_core::{Denoiser, NoiseSchedule};
use ddpm_train::distill::{
    ddim_steps, guidance_target, progressive_target, teacher_grid, DistillPlan, GuidedTeacher,
};
use ddpm_train::{fit, FitOutcome, Trainer};

/// ε(x, t, y) = x·(y + 1)/10: the null class 10 gives 1.1·x.
struct Toy;
impl Denoiser for Toy {
    fn predict_noise(&self, x: &Tensor, _t: &Tensor, y: Option<&Tensor>) -> Result<Tensor> {
        let y = y.unwrap().to_dtype(candle_core::DType::F32)?;
        let f = ((y + 1.0)? / 10.0)?.reshape((x.dim(0)?, 1, 1, 1))?;
        x.broadcast_mul(&f)
    }
    fn null_class(&self) -> Option<u32> {
        Some(10)
    }
}

/// ε(x, t; w) = w·x/4 + 0.1.
struct ToyGuided;
impl GuidedTeacher for ToyGuided {
    fn eps_at(&self, x: &Tensor, _t: &Tensor, _y: Option<&Tensor>, w: &Tensor) -> Result<Tensor> {
        let w = (w.reshape((x.dim(0)?, 1, 1, 1))? / 4.0)?;
        x.broadcast_mul(&w)? + 0.1
    }
}

fn schedule() -> ddpm_schedule::Schedule {
    ddpm_schedule::ScheduleConfig::new(ddpm_schedule::BetaSchedule::linear(), 100)
        .build()
        .unwrap()
}

#[test]
fn guidance_target_is_the_guided_combination() {
    let dev = Device::Cpu;
    let x = Tensor::new(&[[[[1.0f32, -2.0]]], [[[0.5, 4.0]]]], &dev).unwrap();
    let t = Tensor::new(&[3u32, 7], &dev).unwrap();
    let y = Tensor::new(&[2u32, 10], &dev).unwrap();
    let w = Tensor::new(&[3.0f32, 1.5], &dev).unwrap();
    let got: Vec<f32> = guidance_target(&Toy, &x, &t, &y, &w)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1()
        .unwrap();
    // Sample 0: class 2 → 0.3x, null → 1.1x: (1 + 3)·0.3x − 3·1.1x = −2.1x.
    // Sample 1: the null class itself → 1.1x whatever w.
    let want = [-2.1, 4.2, 0.55, 4.4];
    for (g, w) in got.iter().zip(want) {
        assert!((g - w).abs() < 1e-5, "{got:?} vs {want:?}");
    }
}

#[test]
fn progressive_target_is_two_clipped_ddim_steps_of_the_teacher() {
    let s = schedule();
    let ac = s.alphas_cumprod().to_vec();
    let dev = Device::Cpu;
    let z = Tensor::new(&[[[[0.8f32, -3.0]]], [[[0.2, 0.4]]]], &dev).unwrap();
    let w = Tensor::new(&[2.0f32, 0.0], &dev).unwrap();
    let (a, b, c) = ([60u32, 20], [40u32, 10], [Some(20u32), None]);
    let got: Vec<f32> = progressive_target(&ToyGuided, &s, &z, &a, &b, &c, None, &w)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1()
        .unwrap();
    // By hand, in f64: one DDIM step with clipping.
    let step = |z: f64, eps: f64, from: usize, to: Option<usize>| -> f64 {
        let (aa, sa) = (ac[from].sqrt(), (1.0 - ac[from]).sqrt());
        let x0 = ((z - sa * eps) / aa).clamp(-1.0, 1.0);
        let e = (z - aa * x0) / sa;
        let (ac_, sc) = to.map_or((1.0, 0.0), |t| (ac[t].sqrt(), (1.0 - ac[t]).sqrt()));
        ac_ * x0 + sc * e
    };
    let eps = |z: f64, w: f64| w * z / 4.0 + 0.1;
    let zs = [[0.8, -3.0], [0.2, 0.4]];
    let ws = [2.0, 0.0];
    let mut want = Vec::new();
    for i in 0..2 {
        for &z0 in &zs[i] {
            let zb = step(z0, eps(z0, ws[i]), a[i] as usize, Some(b[i] as usize));
            want.push(step(
                zb,
                eps(zb, ws[i]),
                b[i] as usize,
                c[i].map(|t| t as usize),
            ));
        }
    }
    for (g, w) in got.iter().zip(&want) {
        assert!((*g as f64 - w).abs() < 1e-4, "{got:?} vs {want:?}");
    }
    // To clean data (None) the state is the clipped x̂₀.
    let e = Tensor::zeros((1, 1, 1, 2), candle_core::DType::F32, &dev).unwrap();
    let z = Tensor::new(&[[[[0.5f32, 50.0]]]], &dev).unwrap();
    let x0: Vec<f32> = ddim_steps(&s, &z, &e, &[30], &[None], true)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1()
        .unwrap();
    assert!(
        (x0[0] as f64 - 0.5 / ac[30].sqrt()).abs() < 1e-5 && x0[1] == 1.0,
        "{x0:?}"
    );
}

#[test]
fn the_teacher_grid_nests_the_students() {
    let s = schedule();
    for n in [1usize, 2, 4, 8, 16] {
        let two = teacher_grid(&s, n).unwrap();
        let one = ddpm_sampler::spaced_timesteps(&s, n, ddpm_sampler::Spacing::Trailing).unwrap();
        assert_eq!(two.len(), 2 * n);
        for (i, t) in one.iter().enumerate() {
            assert_eq!(two[2 * i], *t, "n = {n}: {two:?} vs {one:?}");
        }
    }
}

/// Every weight, EMA weight and optimizer moment, flattened.
fn state(t: &Trainer) -> Vec<Vec<f32>> {
    let (m, v) = t.optimizer().moments().unwrap();
    let flat = |x: &Tensor| x.flatten_all().unwrap().to_vec1::<f32>().unwrap();
    let mut out = Vec::new();
    for (i, (_, var)) in t.optimizer().vars().iter().enumerate() {
        out.extend([
            flat(var.as_tensor()),
            flat(&t.ema().weights()[i]),
            flat(&m[i]),
            flat(&v[i]),
        ]);
    }
    out
}

fn plan(teacher: &std::path::Path, out: &std::path::Path, steps: u64) -> DistillPlan {
    DistillPlan {
        teacher: teacher.to_path_buf(),
        out: out.to_path_buf(),
        w_min: 0.0,
        w_max: 4.0,
        from_steps: 8,
        to_steps: 4,
        stage_config: ddpm_train::TrainConfig {
            max_steps: Some(steps),
            held_out_examples: 0,
            sample_guidance: 1.0,
            ..common::config()
        },
    }
}

/// Runs every stage of `p` to its step limit; returns the trainers.
fn run_all(p: &DistillPlan) -> Vec<Trainer> {
    let data = common::data();
    let stop = AtomicBool::new(false);
    let mut out = Vec::new();
    for stage in p.stages().unwrap() {
        let (mut t, _) = p.trainer(&stage, &Device::Cpu).unwrap();
        let o = fit(&mut t, &data, &stage.out, &mut (), &stop).unwrap();
        assert!(
            matches!(o, FitOutcome::MaxSteps | FitOutcome::Complete),
            "{o:?}"
        );
        out.push(t);
    }
    out
}

#[test]
fn a_distillation_resumes_exactly_and_its_student_samples() {
    let root = tempfile::tempdir().unwrap();
    let data = common::data();
    let stop = AtomicBool::new(false);
    // A tiny teacher, trained a few steps.
    let tdir = root.path().join("teacher");
    let mut teacher = Trainer::new(
        common::card(),
        ddpm_train::TrainConfig {
            max_steps: Some(3),
            ..common::config()
        },
        &Device::Cpu,
    )
    .unwrap();
    fit(&mut teacher, &data, &tdir, &mut (), &stop).unwrap();
    let tpath = ddpm_train::checkpoint_path(&tdir);
    let p = plan(&tpath, &root.path().join("a"), 4);
    assert_eq!(
        p.stages()
            .unwrap()
            .iter()
            .map(|s| s.name.as_str())
            .collect::<Vec<_>>(),
        ["guidance", "steps-4"]
    );
    // Uninterrupted: every stage 4 steps.
    let whole = run_all(&p);
    // Interrupted: the guidance stage stopped at 2 steps, then resumed to 4 (and the next
    // stage run from it).
    let q = plan(&tpath, &root.path().join("b"), 2);
    let stages = q.stages().unwrap();
    let (mut t, resumed) = q.trainer(&stages[0], &Device::Cpu).unwrap();
    assert!(!resumed);
    // A fresh student is its teacher: the guidance embedding starts at zero.
    let xt = Tensor::randn(0f32, 1.0, (2, 1, 28, 28), &Device::Cpu).unwrap();
    let tt = Tensor::new(&[50u32, 90], &Device::Cpu).unwrap();
    let yy = Tensor::new(&[3u32, 10], &Device::Cpu).unwrap();
    let student_eps = t
        .ema_model()
        .unwrap()
        .predict_noise_at(&xt, &tt, Some(&yy), 3.0)
        .unwrap();
    let teacher_eps = ddpm_unet::load_unet(&tpath, ddpm_unet::Weights::Ema, &Device::Cpu)
        .unwrap()
        .0
        .predict_noise(&xt, &tt, Some(&yy))
        .unwrap();
    let diff = (student_eps - teacher_eps)
        .unwrap()
        .abs()
        .unwrap()
        .max_all()
        .unwrap();
    assert!(diff.to_scalar::<f32>().unwrap() < 1e-5);
    fit(&mut t, &data, &stages[0].out, &mut (), &stop).unwrap();
    assert_eq!(t.step(), 2);
    let resumed_all = run_all(&plan(&tpath, &root.path().join("b"), 4));
    for (x, y) in whole.iter().zip(&resumed_all) {
        assert_eq!(x.step(), 4);
        assert_eq!(state(x), state(y), "stage {:?}", x.card().distilled);
    }
    // The student's file: a model every tool samples, its card saying what it is.
    let student = ddpm_train::checkpoint_path(&p.out.join("steps-4"));
    let model =
        ddpm_pipeline::Model::load(&student, ddpm_unet::Weights::Ema, &Device::Cpu).unwrap();
    let d = model.card().distilled.clone().unwrap();
    assert_eq!(
        (d.stage, d.steps, d.w_min, d.w_max),
        (ddpm_unet::DistillStage::Progressive, Some(4), 0.0, 4.0)
    );
    assert!(model.takes_guidance());
    let spec = model.default_sampler();
    assert_eq!(
        (spec.kind, spec.steps, spec.spacing),
        (
            ddpm_pipeline::SamplerKind::Ddim,
            4,
            ddpm_pipeline::Spacing::Trailing
        )
    );
    let request = ddpm_pipeline::Request {
        labels: ddpm_pipeline::Labels::cycle(10, 6),
        guidance: 2.5,
        seed: 1,
        sampler: spec,
        batch: 6,
    };
    let mut steps = 0;
    let x = ddpm_pipeline::generate_with(&model, &request, &mut |_| {
        steps += 1;
        Ok(())
    })
    .unwrap();
    assert_eq!((x.dims(), steps), (&[6usize, 1, 28, 28][..], 4));
    // Outside its learned range it refuses, saying which range.
    let e = ddpm_pipeline::generate_with(
        &model,
        &ddpm_pipeline::Request {
            guidance: 5.0,
            ..request
        },
        &mut |_| Ok(()),
    )
    .unwrap_err()
    .to_string();
    assert!(e.contains("[0, 4]"), "{e}");
    // A teacher that changed under a stage stops its resume, naming the file.
    let mut more = Trainer::resume(&tpath, &Device::Cpu, |c| c.max_steps = Some(4)).unwrap();
    fit(&mut more, &data, &tdir, &mut (), &stop).unwrap();
    let q = plan(&tpath, &root.path().join("b"), 6);
    let e = q
        .trainer(&q.stages().unwrap()[0], &Device::Cpu)
        .unwrap_err()
        .to_string();
    assert!(e.contains("has changed") && e.contains("teacher"), "{e}");
}

#[test]
fn a_plan_must_halve_down_to_its_last_student() {
    let p = |from, to| DistillPlan {
        from_steps: from,
        to_steps: to,
        ..plan("t".as_ref(), "o".as_ref(), 1)
    };
    assert_eq!(p(32, 4).stages().unwrap().len(), 4);
    for (from, to) in [(4, 4), (12, 4), (32, 0), (6, 4)] {
        let e = p(from, to).stages().unwrap_err().to_string();
        assert!(e.contains("steps"), "{from} → {to}: {e}");
    }
}
