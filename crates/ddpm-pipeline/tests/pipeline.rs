//! The pipelines on the shipped model and on a tiny random one: sampler names, label layouts,
//! batch-size invariance, request errors, and reconstruction at small and full t.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use candle_nn::{VarBuilder, VarMap};
use ddpm_data::{load_dataset, Batcher, DatasetKind, Split, TensorBatcher};
use ddpm_pipeline::{
    generate_with, reconstruct, Labels, Model, ModelCard, ReconstructionRequest, Request,
    SamplerKind, SamplerSpec, Weights,
};
use ddpm_schedule::ScheduleConfig;
use ddpm_unet::{DataInfo, UNet, UNetConfig};

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

fn shipped() -> Model {
    Model::load(
        &root().join("assets/ddpm-mnist.safetensors"),
        Weights::Ema,
        &Device::Cpu,
    )
    .unwrap()
}

/// A tiny random-weight model on 8×8 images with `classes` classes (0: unconditional).
fn tiny(classes: usize) -> Model {
    let mut cfg = UNetConfig::tiny();
    cfg.num_classes = classes;
    let card = ModelCard {
        model: cfg.clone(),
        schedule: ScheduleConfig::new(ddpm_schedule::BetaSchedule::linear(), 50),
        data: DataInfo {
            dataset: "mnist".into(),
            channels: 1,
            height: 8,
            width: 8,
            class_names: (0..classes).map(|c| c.to_string()).collect(),
        },
        prediction: Default::default(),
        distilled: None,
    };
    let vm = VarMap::new();
    let unet = UNet::new(&cfg, VarBuilder::from_varmap(&vm, DType::F32, &Device::Cpu)).unwrap();
    Model::new(unet, card).unwrap()
}

fn max_diff(a: &Tensor, b: &Tensor) -> f32 {
    (a - b)
        .unwrap()
        .abs()
        .unwrap()
        .flatten_all()
        .unwrap()
        .max(0)
        .unwrap()
        .to_scalar()
        .unwrap()
}

#[test]
fn sampler_names_round_trip_as_the_command_line_writes_them() {
    for k in SamplerKind::ALL {
        assert_eq!(k.to_string().parse::<SamplerKind>().unwrap(), k);
        let json = serde_json::to_string(&k).unwrap();
        assert_eq!(json, format!("\"{k}\""));
        assert_eq!(serde_json::from_str::<SamplerKind>(&json).unwrap(), k);
    }
    assert_eq!(SamplerKind::DpmPp.to_string(), "dpm++");
    assert_eq!("dpmpp".parse::<SamplerKind>().unwrap(), SamplerKind::DpmPp);
    let e = "euler".parse::<SamplerKind>().unwrap_err().to_string();
    assert!(
        e.contains("ddim, ddpm, dpm++, dpm++3m, unipc, unipc3, ipndm"),
        "{e}"
    );
    let spec: SamplerSpec = "ddim".parse().unwrap();
    assert_eq!(
        spec.with_steps(50).with_eta(0.5).to_string(),
        "ddim 50 steps η 0.5"
    );
    let back: SamplerSpec =
        serde_json::from_str(&serde_json::to_string(&SamplerSpec::default()).unwrap()).unwrap();
    assert_eq!(back, SamplerSpec::default());
}

#[test]
fn label_layouts() {
    assert_eq!(Labels::rows(3, 2), Labels::Classes(vec![0, 0, 1, 1, 2, 2]));
    assert_eq!(Labels::cycle(3, 5), Labels::Classes(vec![0, 1, 2, 0, 1]));
    assert_eq!(Labels::one(7, 2).classes(), Some(&[7u32, 7][..]));
    assert_eq!(Labels::Unconditional(4).len(), 4);
    assert!(Labels::Unconditional(4).classes().is_none());
}

/// Deterministic samplers draw the same samples whatever the batch size: x_T is drawn for
/// all samples first.
#[test]
fn deterministic_samplers_do_not_depend_on_the_batch() {
    let m = tiny(3);
    let kinds = SamplerKind::ALL
        .into_iter()
        .filter(|&k| k != SamplerKind::Ddpm);
    for spec in kinds.map(|k| SamplerSpec {
        spacing: ddpm_pipeline::Spacing::LogSnr,
        ..SamplerSpec::new(k).with_steps(6)
    }) {
        assert!(spec.is_deterministic());
        let req = |batch| Request {
            labels: Labels::cycle(3, 7),
            guidance: 2.0,
            seed: 5,
            sampler: spec,
            batch,
        };
        let whole = generate_with(&m, &req(7), &mut |_| Ok(())).unwrap();
        let split = generate_with(&m, &req(3), &mut |_| Ok(())).unwrap();
        assert_eq!(whole.dims(), &[7, 1, 8, 8]);
        // The same digits up to float rounding: a batch of 3 groups samples differently in the
        // matrix products (other blockings, other summation orders), and the random weights of
        // this untrained model can amplify a rounding difference over the steps.
        let d = max_diff(&whole, &split);
        assert!(d < 1e-4, "{spec}: the batch of 3 differs by {d}");
    }
}

#[test]
fn guidance_changes_the_samples_and_w_zero_is_the_conditional_model() {
    let m = tiny(3);
    let req = |guidance| Request {
        labels: Labels::one(1, 2),
        guidance,
        seed: 1,
        sampler: SamplerSpec::new(SamplerKind::Ddim).with_steps(5),
        batch: 8,
    };
    let mut calls = 0;
    let w0 = generate_with(&m, &req(0.0), &mut |p| {
        assert_eq!(p.step.sample.dim(0)?, 2);
        calls += 1;
        Ok(())
    })
    .unwrap();
    assert_eq!(calls, 5);
    let w3 = generate_with(&m, &req(3.0), &mut |_| Ok(())).unwrap();
    assert!(max_diff(&w0, &w3) > 1e-4);
}

#[test]
fn bad_requests_are_refused_with_a_reason() {
    let m = tiny(3);
    let base = Request {
        labels: Labels::one(1, 2),
        guidance: 1.0,
        seed: 0,
        sampler: SamplerSpec::new(SamplerKind::Ddim).with_steps(5),
        batch: 4,
    };
    let err = |r: Request| {
        generate_with(&m, &r, &mut |_| Ok(()))
            .unwrap_err()
            .to_string()
    };
    assert!(err(Request {
        labels: Labels::one(3, 1),
        ..base.clone()
    })
    .contains("out of range"));
    assert!(err(Request {
        labels: Labels::Unconditional(2),
        ..base.clone()
    })
    .contains("needs class labels"));
    assert!(err(Request {
        batch: 0,
        ..base.clone()
    })
    .contains("batch"));
    assert!(err(Request {
        sampler: base.sampler.with_steps(51),
        ..base.clone()
    })
    .contains("1..=50"));
    assert!(err(Request {
        labels: Labels::Classes(vec![]),
        ..base.clone()
    })
    .contains("0 samples"));
    let uncond = tiny(0);
    let e = generate_with(&uncond, &base, &mut |_| Ok(()))
        .unwrap_err()
        .to_string();
    assert!(e.contains("unconditional"), "{e}");
    assert!(m
        .class("7")
        .unwrap_err()
        .to_string()
        .contains("out of range"));
    assert_eq!(m.class("2").unwrap(), 2);
}

/// Mean squared error between image `i` of `a` and image `j` of `b`.
fn mse(a: &Tensor, i: usize, b: &Tensor, j: usize) -> f32 {
    (a.get(i).unwrap() - b.get(j).unwrap())
        .unwrap()
        .sqr()
        .unwrap()
        .mean_all()
        .unwrap()
        .to_scalar()
        .unwrap()
}

/// (mean error against its own original, mean error against the other originals) over the
/// images of `rec`.
fn own_and_other(rec: &Tensor, originals: &Tensor) -> (f32, f32) {
    let n = originals.dim(0).unwrap();
    let (mut own, mut other) = (0.0, 0.0);
    for i in 0..n {
        own += mse(rec, i, originals, i) / n as f32;
        for j in (0..n).filter(|&j| j != i) {
            other += mse(rec, i, originals, j) / (n * (n - 1)) as f32;
        }
    }
    (own, other)
}

/// Real test digits through the shipped model: at small t the reconstruction is its input
/// (far closer to it than to the other digits); at t = T − 1 it is a fresh sample, no closer to
/// its own input than to any other digit.
#[test]
fn reconstruction_keeps_the_digit_at_small_t_and_draws_afresh_at_t_max() {
    let m = shipped();
    let ds = load_dataset(
        &DatasetKind::Mnist,
        Some(&root().join("assets/mnist")),
        Split::Test,
        (28, 28),
    )
    .unwrap();
    // Test images 0..6 are the digits 7, 2, 1, 0, 4, 1.
    let batch = TensorBatcher::new(&ds, &Device::Cpu)
        .unwrap()
        .batch(&[0, 1, 2, 3, 4, 5])
        .unwrap();
    let labels: Vec<u32> = batch.labels.to_vec1().unwrap();
    let t_max = m.schedule().config().num_timesteps - 1;
    let req = ReconstructionRequest {
        timesteps: vec![20],
        as_class: None,
        guidance: 0.0,
        seed: 3,
        sampler: SamplerSpec::new(SamplerKind::Ddim).with_steps(20),
    };
    let rec = reconstruct(&m, &batch.images, Some(&labels), &req).unwrap();
    let small = &rec.rows[0];
    assert_eq!(small.t, 20);
    assert!(small.error.mse < 0.01, "t = 20: mse {}", small.error.mse);
    let (own, other) = own_and_other(&small.images, &batch.images);
    assert!(own < 0.1 * other, "t = 20: own {own}, other {other}");
    // At t = T − 1, all drawn as one class: each result is as far from its own input as from
    // the others.
    let fresh = ReconstructionRequest {
        timesteps: vec![t_max],
        as_class: Some(8),
        ..req.clone()
    };
    let r = reconstruct(&m, &batch.images, Some(&labels), &fresh).unwrap();
    let (own, other) = own_and_other(&r.rows[0].images, &batch.images);
    assert!(
        r.rows[0].error.mse > 0.1,
        "t = T−1: mse {}",
        r.rows[0].error.mse
    );
    assert!(own > 0.7 * other, "t = T−1: own {own}, other {other}");
    // The grid: original then each t, row by row.
    assert_eq!(rec.grid().unwrap().dims(), &[6 * 2, 1, 28, 28]);
    // A t past T is refused.
    let bad = ReconstructionRequest {
        timesteps: vec![t_max + 1],
        ..req
    };
    assert!(reconstruct(&m, &batch.images, Some(&labels), &bad).is_err());
}

/// The command line's defaults of `ddpm sample` (what clap gives with no flags).
fn sample_options() -> ddpm_pipeline::SampleOptions {
    ddpm_pipeline::SampleOptions {
        class: "all".into(),
        guidance: 3.0,
        sweep: vec![],
        n: 2,
        batch: None,
        steps: Some(20),
        sampler: Some(SamplerKind::DpmPp),
        spacing: Some(ddpm_pipeline::Spacing::Leading),
        eta: 0.0,
        seed: 1,
        no_clip: false,
    }
}

/// With no sampler flags `ddpm sample` runs the default (DPM-Solver++(3M), 8 log-SNR steps);
/// a sampler named alone takes 20 leading steps, so `--sampler dpm++` is the default before the
/// switch; the flags given always win.
#[test]
fn sample_options_take_the_default_sampler_or_the_named_ones_own_steps() {
    let m = tiny(3);
    let bare = ddpm_pipeline::SampleOptions {
        steps: None,
        sampler: None,
        spacing: None,
        ..sample_options()
    };
    let spec = |o: &ddpm_pipeline::SampleOptions| o.resolve(&m, 1, false).unwrap().request.sampler;
    let got = spec(&bare);
    assert_eq!(got, SamplerSpec::default());
    assert_eq!(
        (got.kind, got.steps, got.spacing),
        (SamplerKind::DpmPp3M, 8, ddpm_pipeline::Spacing::LogSnr)
    );
    assert_eq!(m.default_sampler(), SamplerSpec::default());
    let named = |kind| ddpm_pipeline::SampleOptions {
        sampler: Some(kind),
        ..bare.clone()
    };
    let got = spec(&named(SamplerKind::DpmPp));
    assert_eq!(
        (got.kind, got.steps, got.spacing),
        (SamplerKind::DpmPp, 20, ddpm_pipeline::Spacing::Leading)
    );
    let got = spec(&named(SamplerKind::DpmPp3M));
    assert_eq!(
        (got.steps, got.spacing),
        (8, ddpm_pipeline::Spacing::LogSnr)
    );
    let got = spec(&ddpm_pipeline::SampleOptions {
        steps: Some(12),
        spacing: Some(ddpm_pipeline::Spacing::Trailing),
        ..named(SamplerKind::UniPc)
    });
    assert_eq!(
        (got.kind, got.steps, got.spacing),
        (SamplerKind::UniPc, 12, ddpm_pipeline::Spacing::Trailing)
    );
    let got = spec(&ddpm_pipeline::SampleOptions {
        steps: Some(5),
        ..bare.clone()
    });
    assert_eq!(
        (got.kind, got.steps, got.spacing),
        (SamplerKind::DpmPp3M, 5, ddpm_pipeline::Spacing::LogSnr)
    );
}

#[test]
fn sample_options_resolve_against_the_model_and_refuse_what_it_cannot_serve() {
    let m = tiny(3);
    let plan = sample_options().resolve(&m, 1, false).unwrap();
    // One row of n per class, at the guidance asked for, with the CPU's batch.
    assert_eq!(plan.request.labels, Labels::rows(3, 2));
    assert_eq!((plan.per_row, plan.weights.clone()), (2, vec![3.0]));
    assert_eq!((plan.request.batch, plan.class), (128, None));
    let one = ddpm_pipeline::SampleOptions {
        class: "2".into(),
        sweep: vec![0.0, 1.0],
        n: 12,
        ..sample_options()
    };
    let plan = one.resolve(&m, 1, false).unwrap();
    assert_eq!(plan.request.labels, Labels::one(2, 12));
    assert_eq!((plan.per_row, plan.class), (8, Some(2)));
    assert_eq!(plan.at(1.0).guidance, 1.0);
    // An unconditional model samples at w = 0 and takes no class.
    let plan = sample_options().resolve(&tiny(0), 1, false).unwrap();
    assert_eq!(
        (plan.weights, plan.request.labels),
        (vec![0.0], Labels::Unconditional(2))
    );
    for (bad, says) in [
        (
            ddpm_pipeline::SampleOptions {
                class: "9".into(),
                ..sample_options()
            },
            "out of range",
        ),
        (
            ddpm_pipeline::SampleOptions {
                steps: Some(51),
                ..sample_options()
            },
            "T = 50",
        ),
        (
            ddpm_pipeline::SampleOptions {
                guidance: f64::NAN,
                ..sample_options()
            },
            "finite",
        ),
        (
            ddpm_pipeline::SampleOptions {
                n: 0,
                ..sample_options()
            },
            "--n 0",
        ),
        (
            ddpm_pipeline::SampleOptions {
                batch: Some(0),
                ..sample_options()
            },
            "--batch 0",
        ),
        (
            ddpm_pipeline::SampleOptions {
                n: usize::MAX,
                ..sample_options()
            },
            "count",
        ),
    ] {
        let e = bad.resolve(&m, 1, false).unwrap_err().to_string();
        assert!(e.contains(says), "{e}");
    }
}

#[test]
fn reconstruct_options_resolve_and_check_t_and_class() {
    let m = tiny(3);
    let opts = ddpm_pipeline::ReconstructOptions {
        t: vec![10, 40],
        as_class: Some("1".into()),
        guidance: 2.0,
        sampler: Some(SamplerKind::Ddim),
        steps: Some(10),
        seed: 4,
    };
    let req = opts.resolve(&m).unwrap();
    assert_eq!(
        (req.timesteps.clone(), req.as_class),
        (vec![10, 40], Some(1))
    );
    assert_eq!(
        req.sampler,
        SamplerSpec::new(SamplerKind::Ddim).with_steps(10)
    );
    let late = ddpm_pipeline::ReconstructOptions {
        t: vec![50],
        ..opts.clone()
    };
    assert!(late.resolve(&m).unwrap_err().to_string().contains("--t 50"));
    let none = ddpm_pipeline::ReconstructOptions {
        t: vec![],
        ..opts.clone()
    };
    assert!(none.resolve(&m).is_err());
    let class = ddpm_pipeline::ReconstructOptions {
        as_class: Some("7".into()),
        ..opts
    };
    assert!(class
        .resolve(&m)
        .unwrap_err()
        .to_string()
        .contains("--as-class"));
}

#[test]
fn eval_requests_and_model_options_are_checked_before_any_work() {
    let ok = ddpm_pipeline::EvalRequest {
        n: 10,
        guidance: vec![0.0, 1.0],
        steps: Some(5),
        sampler: Some(SamplerKind::Ddim),
        spacing: Some(ddpm_pipeline::Spacing::Leading),
        batch: 5,
        seed: 1,
    };
    assert!(ok.validate().is_ok());
    for (bad, says) in [
        (ddpm_pipeline::EvalRequest { n: 1, ..ok.clone() }, "--n 1"),
        (
            ddpm_pipeline::EvalRequest {
                batch: 0,
                ..ok.clone()
            },
            "--batch 0",
        ),
        (
            ddpm_pipeline::EvalRequest {
                guidance: vec![f64::INFINITY],
                ..ok.clone()
            },
            "finite",
        ),
        (
            ddpm_pipeline::EvalRequest {
                guidance: vec![],
                ..ok.clone()
            },
            "--guidance",
        ),
    ] {
        let e = bad.validate().unwrap_err().to_string();
        assert!(e.contains(says), "{e}");
    }
    // bf16 autocast loads on the CPU too (the reference path), with the autocast set.
    let bf16 = ddpm_pipeline::ModelOptions {
        autocast: Some(ddpm_unet::Autocast::Bf16),
        ..Default::default()
    };
    let path = root().join("assets/ddpm-mnist.safetensors");
    let model = bf16.load(&path, &Device::Cpu).unwrap();
    assert_eq!(model.unet().autocast(), Some(candle_core::DType::BF16));
    let raw = ddpm_pipeline::ModelOptions {
        raw_weights: true,
        ..Default::default()
    };
    // The shipped export holds only EMA weights: asking for the raw ones is an error.
    assert!(raw.load(&path, &Device::Cpu).is_err());
    assert!(ddpm_pipeline::ModelOptions::default()
        .load(&path, &Device::Cpu)
        .is_ok());
}
