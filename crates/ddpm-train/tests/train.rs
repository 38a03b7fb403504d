//! End-to-end training tests on a tiny model: checkpoint, exact resume, sampling, bad input.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::Path;
use std::sync::atomic::AtomicBool;

use candle_core::{DType, Device, Tensor};
use ddpm_core::Denoiser;
use ddpm_train::{
    checkpoint, fit, read_metrics, FitOutcome, StepReport, TrainConfig, TrainError, TrainObserver,
    Trainer, Weights,
};

mod common;
use common::{card, config, data};

#[derive(Default)]
struct Losses(Vec<(u64, f32)>);
impl TrainObserver for Losses {
    fn on_step(&mut self, r: &StepReport) {
        self.0.push((r.step, r.loss));
    }
}

#[test]
fn train_checkpoint_resume_sample_end_to_end() {
    let data = data();
    let stop = AtomicBool::new(false);
    // Uninterrupted: 7 steps (4 batches per epoch, so it crosses an epoch end).
    let dir_a = tempfile::tempdir().unwrap();
    let mut a = Trainer::new(
        card(),
        TrainConfig {
            max_steps: Some(7),
            sample_every: 1,
            ..config()
        },
        &Device::Cpu,
    )
    .unwrap();
    let mut la = Losses::default();
    assert_eq!(
        fit(&mut a, &data, dir_a.path(), &mut la, &stop).unwrap(),
        FitOutcome::MaxSteps
    );
    assert_eq!(la.0.len(), 7);

    // Interrupted after 3 steps, resumed from the checkpoint for the rest.
    let dir_b = tempfile::tempdir().unwrap();
    let mut b = Trainer::new(
        card(),
        TrainConfig {
            max_steps: Some(3),
            sample_every: 1,
            ..config()
        },
        &Device::Cpu,
    )
    .unwrap();
    let mut lb = Losses::default();
    fit(&mut b, &data, dir_b.path(), &mut lb, &stop).unwrap();
    drop(b);
    let ckpt = dir_b.path().join("checkpoint.safetensors");
    let mut b2 = Trainer::resume(&ckpt, &Device::Cpu, |c| c.max_steps = Some(7)).unwrap();
    assert_eq!(b2.step(), 3);
    fit(&mut b2, &data, dir_b.path(), &mut lb, &stop).unwrap();
    assert_eq!(
        la.0, lb.0,
        "resumed losses differ from the uninterrupted run"
    );

    // The files a user looks at.
    for f in [
        "checkpoint.safetensors",
        "metrics.jsonl",
        "loss.png",
        "samples/epoch_001.png",
    ] {
        assert!(dir_a.path().join(f).exists(), "missing {f}");
    }
    let m = read_metrics(dir_a.path()).unwrap();
    assert_eq!(m.len(), 2, "one line at the epoch end, one at max_steps");
    assert_eq!((m[0].epoch, m[0].step), (0, 4));
    assert!(m
        .iter()
        .all(|r| r.train_loss.is_finite() && r.held_out_loss.is_some_and(f64::is_finite)));
    assert!(!dir_a.path().join("checkpoint.safetensors.tmp").exists());

    // Sampling needs only the checkpoint: EMA weights by default.
    let (unet, loaded_card) = ddpm_train::load_unet(&ckpt, Weights::Ema, &Device::Cpu).unwrap();
    assert_eq!(loaded_card, card());
    let x = Tensor::randn(0f32, 1.0, (2, 1, 28, 28), &Device::Cpu).unwrap();
    let t = Tensor::new(&[50u32, 50], &Device::Cpu).unwrap();
    let y = Tensor::new(&[3u32, 10], &Device::Cpu).unwrap();
    let ema_out = unet.predict_noise(&x, &t, Some(&y)).unwrap();
    let from_trainer = b2
        .ema_model()
        .unwrap()
        .predict_noise(&x, &t, Some(&y))
        .unwrap();
    let d = (ema_out - from_trainer)
        .unwrap()
        .abs()
        .unwrap()
        .max_all()
        .unwrap()
        .to_scalar::<f32>()
        .unwrap();
    assert_eq!(d, 0.0);
    let (raw, _) = ddpm_train::load_unet(&ckpt, Weights::Raw, &Device::Cpu).unwrap();
    let raw_out = raw.predict_noise(&x, &t, Some(&y)).unwrap();
    let diff = (raw_out - unet.predict_noise(&x, &t, Some(&y)).unwrap())
        .unwrap()
        .abs()
        .unwrap()
        .max_all()
        .unwrap();
    assert!(
        diff.to_scalar::<f32>().unwrap() > 0.0,
        "EMA and raw weights should differ"
    );
    ddpm_train::write_sample_grid(&b2, &dir_b.path().join("grid.png")).unwrap();
    let img = image::open(dir_b.path().join("grid.png")).unwrap();
    // 8 columns of 28 px scaled 2×, with 2 px gutters between and around them.
    assert_eq!(img.width(), 8 * (28 * 2 + 2) + 2);
}

#[test]
fn non_finite_loss_stops_and_keeps_the_last_checkpoint() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("checkpoint.safetensors");
    let mut t = Trainer::new(card(), config(), &Device::Cpu).unwrap();
    let good = ddpm_data::Batch {
        images: Tensor::zeros((2, 1, 28, 28), DType::F32, &Device::Cpu).unwrap(),
        labels: Tensor::new(&[1u32, 2], &Device::Cpu).unwrap(),
    };
    t.train_step(&good).unwrap();
    t.save(&path).unwrap();
    let before = std::fs::read(&path).unwrap();
    let bad = ddpm_data::Batch {
        images: (good.images.clone() / 0.0)
            .unwrap()
            .affine(0.0, f64::NAN)
            .unwrap(),
        ..good
    };
    let weights = |t: &Trainer| -> Vec<Vec<f32>> {
        t.optimizer()
            .vars()
            .iter()
            .map(|(_, v)| v.as_tensor().flatten_all().unwrap().to_vec1().unwrap())
            .collect()
    };
    let w_before = weights(&t);
    let e = t.train_step(&bad).unwrap_err();
    assert_eq!(weights(&t), w_before, "the weights must be untouched");
    assert!(
        matches!(e, TrainError::NonFiniteLoss { step: 1, .. }),
        "{e:?}"
    );
    assert!(
        e.to_string().contains("last checkpoint written is kept"),
        "{e}"
    );
    assert!(e.to_string().contains("`lr`"), "{e}");
    let cli = ddpm_train::launch::with_flag_names(e).to_string();
    assert!(cli.contains("--resume") && cli.contains("--lr"), "{cli}");
    assert_eq!(t.step(), 1, "no update applied");
    assert_eq!(std::fs::read(&path).unwrap(), before);
}

#[test]
fn bad_checkpoints_give_clear_errors() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("c.safetensors");
    let missing = checkpoint::read(&dir.path().join("none.safetensors"), &Device::Cpu).unwrap_err();
    assert!(missing.to_string().contains("does not exist"), "{missing}");

    let t = Trainer::new(card(), config(), &Device::Cpu).unwrap();
    t.save(&path).unwrap();
    let bytes = std::fs::read(&path).unwrap();
    // Truncated.
    std::fs::write(&path, &bytes[..bytes.len() / 2]).unwrap();
    let e = checkpoint::read(&path, &Device::Cpu)
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("truncated or corrupt") && e.contains("c.safetensors"),
        "{e}"
    );
    // Garbage.
    std::fs::write(&path, b"hello").unwrap();
    assert!(matches!(
        checkpoint::read(&path, &Device::Cpu).unwrap_err(),
        TrainError::Checkpoint { .. }
    ));
    // A safetensors file from elsewhere (no ddpm metadata).
    let foreign = Tensor::zeros(3, DType::F32, &Device::Cpu).unwrap();
    candle_core::safetensors::save(
        &std::collections::HashMap::from([("w".to_string(), foreign)]),
        &path,
    )
    .unwrap();
    let e = checkpoint::read(&path, &Device::Cpu)
        .unwrap_err()
        .to_string();
    assert!(e.contains("not a ddpm-rs checkpoint"), "{e}");
    // Weights that do not match the card (a different model config written into the card).
    std::fs::write(&path, &bytes).unwrap();
    let mut ck = checkpoint::read(&path, &Device::Cpu).unwrap();
    ck.card.model.base_channels = 16;
    let e = ck.unet(Weights::Ema, &Device::Cpu).unwrap_err().to_string();
    assert!(e.contains("do not match"), "{e}");
    // A sampling-only export cannot be resumed, but can be sampled, in f16.
    let export = dir.path().join("ema.safetensors");
    checkpoint::export_ema(
        &checkpoint::read(&path, &Device::Cpu).unwrap(),
        &export,
        DType::F16,
    )
    .unwrap();
    assert!(std::fs::metadata(&export).unwrap().len() * 3 < bytes.len() as u64);
    assert!(ddpm_train::load_unet(&export, Weights::Ema, &Device::Cpu).is_ok());
    let e = Trainer::resume(&export, &Device::Cpu, |_| {})
        .unwrap_err()
        .to_string();
    assert!(e.contains("sampling-only"), "{e}");
}

#[test]
fn lr_schedule_warms_up_and_decays() {
    let c = TrainConfig {
        lr: 1.0,
        warmup_steps: 10,
        cosine_decay: true,
        ..TrainConfig::default()
    };
    assert!((c.lr_at(0, 110) - 0.1).abs() < 1e-12);
    assert!((c.lr_at(9, 110) - 1.0).abs() < 1e-12);
    assert!((c.lr_at(60, 110) - 0.5).abs() < 1e-9);
    assert!(c.lr_at(109, 110) < 0.01);
    let flat = TrainConfig {
        cosine_decay: false,
        ..c.clone()
    };
    assert_eq!(flat.lr_at(100, 110), 1.0);
    assert!(TrainConfig {
        p_uncond: 1.5,
        ..c.clone()
    }
    .validate()
    .is_err());
    assert!(TrainConfig {
        lr: f64::NAN,
        ..c.clone()
    }
    .validate()
    .is_err());
}

#[test]
fn same_seed_same_initial_weights() {
    let a = Trainer::new(card(), config(), &Device::Cpu).unwrap();
    let b = Trainer::new(card(), config(), &Device::Cpu).unwrap();
    let c = Trainer::new(
        card(),
        TrainConfig {
            seed: 8,
            ..config()
        },
        &Device::Cpu,
    )
    .unwrap();
    let x = Tensor::randn(0f32, 1.0, (1, 1, 28, 28), &Device::Cpu).unwrap();
    let t = Tensor::new(&[5u32], &Device::Cpu).unwrap();
    let f = |tr: &Trainer| {
        tr.model()
            .predict_noise(&x, &t, None)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap()
    };
    assert_eq!(f(&a), f(&b));
    assert_ne!(f(&a), f(&c));
}

#[test]
fn stop_flag_saves_a_checkpoint_after_the_current_step() {
    let data = data();
    let dir = tempfile::tempdir().unwrap();
    let stop = AtomicBool::new(true); // as if Ctrl-C came during the first step
    let mut t = Trainer::new(card(), config(), &Device::Cpu).unwrap();
    let mut l = Losses::default();
    assert_eq!(
        fit(&mut t, &data, dir.path(), &mut l, &stop).unwrap(),
        FitOutcome::Stopped
    );
    assert_eq!(l.0.len(), 1);
    let resumed = Trainer::resume(
        &dir.path().join("checkpoint.safetensors"),
        &Device::Cpu,
        |_| {},
    )
    .unwrap();
    assert_eq!(resumed.step(), 1);
}

#[test]
fn unconditional_models_train_without_labels() {
    let mut c = card();
    c.model.num_classes = 0;
    let mut t = Trainer::new(
        c,
        TrainConfig {
            p_uncond: 0.0,
            ..config()
        },
        &Device::Cpu,
    )
    .unwrap();
    let batch = ddpm_data::Batch {
        images: Tensor::zeros((2, 1, 28, 28), DType::F32, &Device::Cpu).unwrap(),
        labels: Tensor::new(&[1u32, 2], &Device::Cpu).unwrap(),
    };
    assert!(t.train_step(&batch).unwrap().is_finite());
    assert_eq!(t.model().null_class(), None);
}

#[test]
fn optimizer_and_ema_state_hold_no_autograd_graph() {
    // A state tensor that tracks ops keeps every earlier step's activations alive: memory
    // then grows without bound over a run (seen as an OOM kill at 24 GB).
    let mut t = Trainer::new(card(), config(), &Device::Cpu).unwrap();
    // Before any step too: sampling from a fresh trainer (`ddpm bench --mode sample`) kept
    // the graph of the whole sampling chain when the initial average tracked the Vars.
    assert!(
        t.ema().weights().iter().all(|x| !x.track_op()),
        "initial EMA weights track ops"
    );
    let batch = ddpm_data::Batch {
        images: Tensor::zeros((2, 1, 28, 28), DType::F32, &Device::Cpu).unwrap(),
        labels: Tensor::new(&[1u32, 2], &Device::Cpu).unwrap(),
    };
    for _ in 0..2 {
        t.train_step(&batch).unwrap();
    }
    let (m, v) = t.optimizer().moments().unwrap();
    assert!(
        m.iter().chain(&v).all(|x| !x.track_op()),
        "AdamW moments track ops"
    );
    assert!(
        t.ema().weights().iter().all(|x| !x.track_op()),
        "EMA weights track ops"
    );
}

#[test]
fn resuming_exactly_at_an_epoch_end_still_writes_that_epochs_grid() {
    let data = data();
    let dir = tempfile::tempdir().unwrap();
    let stop = AtomicBool::new(false);
    // 4 batches per epoch: stopping at step 4 leaves the epoch-end work to the resumed run.
    let cfg = TrainConfig {
        max_steps: Some(4),
        sample_every: 1,
        held_out_examples: 0,
        ..config()
    };
    let mut t = Trainer::new(card(), cfg, &Device::Cpu).unwrap();
    fit(&mut t, &data, dir.path(), &mut (), &stop).unwrap();
    assert!(!dir.path().join("samples/epoch_001.png").exists());
    // A run that reaches --max-steps ends with a grid of its final model.
    assert!(dir.path().join("samples/step_000004.png").exists());
    let ckpt = dir.path().join("checkpoint.safetensors");
    let mut r = Trainer::resume(&ckpt, &Device::Cpu, |c| c.max_steps = Some(5)).unwrap();
    fit(&mut r, &data, dir.path(), &mut (), &stop).unwrap();
    assert!(dir.path().join("samples/epoch_001.png").exists());
    assert_eq!(r.step(), 5);
}

#[test]
fn autocast_options_are_checked_up_front() {
    let f16 = TrainConfig {
        autocast: Some(ddpm_unet::Autocast::F16),
        ..config()
    };
    let e = Trainer::new(card(), f16, &Device::Cpu)
        .unwrap_err()
        .to_string();
    assert!(e.contains("loss scaling"), "{e}");
    // bf16 on the CPU trains through the reference path; the loss, weights, optimizer state
    // and EMA stay f32, and a checkpoint saves f32 weights and the option.
    let bf16 = TrainConfig {
        autocast: Some(ddpm_unet::Autocast::Bf16),
        ..config()
    };
    let mut t = Trainer::new(card(), bf16, &Device::Cpu).unwrap();
    let mut rng = ddpm_core::SeededNoise::new(4);
    let batch = ddpm_data::Batch {
        images: ddpm_core::testing::randn(&mut rng, &[2, 1, 28, 28]),
        labels: Tensor::new(&[1u32, 2], &Device::Cpu).unwrap(),
    };
    for _ in 0..2 {
        assert!(t.train_step(&batch).unwrap().is_finite());
    }
    for (name, v) in t.optimizer().vars() {
        assert_eq!(v.dtype(), DType::F32, "{name}");
    }
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("bf16.safetensors");
    t.save(&path).unwrap();
    let back = checkpoint::read(&path, &Device::Cpu).unwrap();
    assert!(back.file.tensors.values().all(|t| t.dtype() == DType::F32));
    assert_eq!(
        back.train.unwrap().config.autocast,
        Some(ddpm_unet::Autocast::Bf16)
    );
    // Checkpoints written before the option existed read as "no autocast".
    let mut json = serde_json::to_value(config()).unwrap();
    json.as_object_mut().unwrap().remove("autocast");
    let back: TrainConfig = serde_json::from_value(json).unwrap();
    assert_eq!(back.autocast, None);
}

/// A clock that advances by one second every time it is read: every timed part of the budget
/// probe then "costs" exactly one second.
struct FakeClock(std::cell::Cell<f64>);
impl ddpm_train::budget::Clock for FakeClock {
    fn now_s(&self) -> f64 {
        let t = self.0.get();
        self.0.set(t + 1.0);
        t
    }
}

/// Stops the run (as Ctrl-C would) after `at` steps, and records the losses and the plan.
struct StopAt<'a> {
    at: u64,
    stop: &'a AtomicBool,
    losses: Vec<(u64, f32)>,
    plan: Option<ddpm_train::BudgetPlan>,
}
impl TrainObserver for StopAt<'_> {
    fn on_plan(&mut self, p: &ddpm_train::BudgetPlan) {
        self.plan = Some(*p);
    }
    fn on_step(&mut self, r: &StepReport) {
        self.losses.push((r.step, r.loss));
        if r.step == self.at {
            self.stop.store(true, std::sync::atomic::Ordering::SeqCst);
        }
    }
}

#[test]
fn a_budget_too_small_for_one_step_is_a_clear_error() {
    let stop = AtomicBool::new(false);
    let dir = tempfile::tempdir().unwrap();
    let mut t = Trainer::new(
        card(),
        TrainConfig {
            budget: Some(ddpm_train::BudgetConfig::fitted(5.0)),
            ..config()
        },
        &Device::Cpu,
    )
    .unwrap();
    let clock = FakeClock(std::cell::Cell::new(0.0));
    let e = ddpm_train::fit_timed(&mut t, &data(), dir.path(), &mut (), &stop, &clock, 0.0)
        .unwrap_err();
    assert!(e.to_string().contains("not even one step fits"), "{e}");
    assert_eq!(t.step(), 0);
}

/// A state whose loss is still finite but whose weights have blown up is never checkpointed:
/// the run stops naming the step and the tensor, and the checkpoint on disk stays the last
/// good one.
#[test]
fn a_diverged_state_is_never_checkpointed() {
    let data = data();
    let dir = tempfile::tempdir().unwrap();
    let stop = AtomicBool::new(false);
    let cfg = TrainConfig {
        max_steps: Some(2),
        checkpoint_every: 1,
        ..config()
    };
    let mut t = Trainer::new(card(), cfg, &Device::Cpu).unwrap();
    fit(&mut t, &data, dir.path(), &mut (), &stop).unwrap();
    let path = dir.path().join("checkpoint.safetensors");
    let good = std::fs::read(&path).unwrap();
    // Poison one weight as a huge learning rate would (finite, absurd), then go on.
    let mut t = Trainer::resume(&path, &Device::Cpu, |c| c.max_steps = Some(4)).unwrap();
    let (name, var) = t.optimizer().vars()[3].clone();
    var.set(&(var.as_tensor().ones_like().unwrap() * 2e27).unwrap())
        .unwrap();
    let e = fit(&mut t, &data, dir.path(), &mut (), &stop).unwrap_err();
    let msg = e.to_string();
    assert!(
        matches!(
            e,
            TrainError::Diverged { .. } | TrainError::NonFiniteLoss { .. }
        ),
        "{e:?}"
    );
    // The library names the field; the command line's wording adds the command.
    assert!(msg.contains("`lr`") && !msg.contains("--lr"), "{msg}");
    let cli = ddpm_train::launch::with_flag_names(TrainError::Diverged {
        step: 3,
        cause: "x".into(),
    })
    .to_string();
    assert!(cli.contains("--resume") && cli.contains("--lr X"), "{cli}");
    if let TrainError::Diverged { step, cause } = &e {
        assert_eq!(*step, 3, "stopped at the first checkpoint after the damage");
        assert!(cause.contains(&name) || cause.contains("EMA"), "{cause}");
    }
    assert_eq!(
        std::fs::read(&path).unwrap(),
        good,
        "the good checkpoint is kept"
    );
    // The checkpoint left on disk passes the check; the same state with one absurd weight
    // does not, and the error names that weight.
    let fresh = Trainer::resume(&path, &Device::Cpu, |_| {}).unwrap();
    fresh.check_state().unwrap();
    let (name, var) = fresh.optimizer().vars()[5].clone();
    var.set(&(var.as_tensor().ones_like().unwrap() * 3e5).unwrap())
        .unwrap();
    match fresh.check_state() {
        Err(TrainError::Diverged { step: 2, cause }) => {
            assert!(cause.contains(&name) && cause.contains("3e5"), "{cause}")
        }
        other => panic!("expected Diverged, got {other:?}"),
    }
}

#[test]
fn absurd_learning_rates_and_empty_runs_are_refused_up_front() {
    for (cfg, needle) in [
        (
            TrainConfig {
                lr: 1e30,
                ..config()
            },
            "training option `lr`: 1000000000000000000000000000000 is far above",
        ),
        (
            TrainConfig {
                epochs: 0,
                ..config()
            },
            "training option `epochs`: 0 trains nothing",
        ),
        (
            TrainConfig {
                max_steps: Some(0),
                ..config()
            },
            "training option `max_steps`: 0 trains nothing",
        ),
        (
            TrainConfig {
                train_limit: Some(0),
                ..config()
            },
            "training option `train_limit`: 0 leaves no training examples",
        ),
    ] {
        let e = Trainer::new(card(), cfg, &Device::Cpu).unwrap_err();
        assert!(e.to_string().contains(needle), "{needle}: {e}");
    }
}

/// The metrics of a run stopped mid-period (Ctrl-C, or killed after a checkpoint) and resumed
/// equal those of the uninterrupted run: the running averages live in the checkpoint, and
/// lines written after the checkpoint are dropped on resume.
#[test]
fn metrics_of_an_interrupted_run_equal_the_uninterrupted_ones() {
    let data = data();
    let cfg = TrainConfig {
        max_steps: Some(7),
        log_every: 3,
        ..config()
    };
    let strip = |dir: &Path| -> Vec<(u64, u64, f64, Option<f64>, f64)> {
        read_metrics(dir)
            .unwrap()
            .into_iter()
            .map(|r| (r.epoch, r.step, r.train_loss, r.held_out_loss, r.lr))
            .collect()
    };
    let stop = AtomicBool::new(false);
    let a = tempfile::tempdir().unwrap();
    let mut t = Trainer::new(card(), cfg.clone(), &Device::Cpu).unwrap();
    fit(&mut t, &data, a.path(), &mut (), &stop).unwrap();
    let want = strip(a.path());
    assert_eq!(
        want.iter().map(|r| r.1).collect::<Vec<_>>(),
        vec![3, 4, 6, 7],
        "lines every 3 steps, at the epoch end (4) and at the end"
    );

    // Stopped at step 5, in the middle of the line that closes at step 6.
    let b = tempfile::tempdir().unwrap();
    let stop_b = AtomicBool::new(false);
    let mut obs = StopAt {
        at: 5,
        stop: &stop_b,
        losses: vec![],
        plan: None,
    };
    let mut t = Trainer::new(card(), cfg.clone(), &Device::Cpu).unwrap();
    assert_eq!(
        fit(&mut t, &data, b.path(), &mut obs, &stop_b).unwrap(),
        FitOutcome::Stopped
    );
    // A kill after the checkpoint would leave lines past it: fake one.
    let mut text = std::fs::read_to_string(b.path().join("metrics.jsonl")).unwrap();
    let mut extra: ddpm_train::EpochReport =
        serde_json::from_str(text.lines().last().unwrap()).unwrap();
    extra.step = 6;
    text.push_str(&(serde_json::to_string(&extra).unwrap() + "\n"));
    std::fs::write(b.path().join("metrics.jsonl"), text).unwrap();
    let mut t = Trainer::resume(
        &b.path().join("checkpoint.safetensors"),
        &Device::Cpu,
        |_| {},
    )
    .unwrap();
    assert_eq!(t.step(), 5);
    fit(&mut t, &data, b.path(), &mut (), &stop).unwrap();
    assert_eq!(strip(b.path()), want);
}
