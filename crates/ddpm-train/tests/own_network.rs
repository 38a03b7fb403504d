//! A network of one's own (`examples/own_network.rs`, included here as it is) trains through
//! the library's trainer on an image folder: exact resume, its checkpoint read back as that
//! network (and refused as a U-Net), sampling through the pipeline.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::sync::atomic::{AtomicBool, Ordering};

use candle_core::Device;
use ddpm_pipeline::{Labels, Request, SamplerKind, SamplerSpec};
use ddpm_train::{
    checkpoint, checkpoint_path, fit, FitData, FitOutcome, StepReport, TrainConfig, TrainObserver,
    Trainer,
};

#[allow(dead_code)]
#[path = "../examples/own_network.rs"]
mod own_network;
use own_network::{write_digit_folder, SmallNet, SmallNetConfig};

fn config(max_steps: u64) -> TrainConfig {
    TrainConfig {
        epochs: 10,
        max_steps: Some(max_steps),
        batch_size: 8,
        lr: 1e-3,
        warmup_steps: 2,
        sample_every: 1,
        sample_steps: 2,
        checkpoint_every: 0,
        held_out_examples: 0,
        seed: 3,
        ..TrainConfig::default()
    }
}

/// Raises the stop flag (as Ctrl-C does) after step `at`.
struct StopAt<'a>(u64, &'a AtomicBool);
impl TrainObserver for StopAt<'_> {
    fn on_step(&mut self, r: &StepReport) {
        if r.step == self.0 {
            self.1.store(true, Ordering::SeqCst);
        }
    }
}

/// Every weight, EMA weight and optimizer moment of `t`, by name.
fn state(t: &Trainer<SmallNet>) -> Vec<(String, Vec<f32>)> {
    let (m, v) = t.optimizer().moments().unwrap();
    let flat = |x: &candle_core::Tensor| x.flatten_all().unwrap().to_vec1::<f32>().unwrap();
    let mut out = Vec::new();
    for (i, (name, var)) in t.optimizer().vars().iter().enumerate() {
        out.push((format!("model.{name}"), flat(var.as_tensor())));
        out.push((format!("ema.{name}"), flat(&t.ema().weights()[i])));
        out.push((format!("m.{name}"), flat(&m[i])));
        out.push((format!("v.{name}"), flat(&v[i])));
    }
    out
}

#[test]
fn an_own_network_trains_resumes_exactly_and_samples() {
    let root = tempfile::tempdir().unwrap();
    let folder = root.path().join("digits");
    write_digit_folder(&folder, 3).unwrap();
    let data = ddpm_data::load_image_folder(&folder, 28, 28).unwrap();
    assert_eq!(ddpm_data::Dataset::len(&data), 30);
    let net = SmallNetConfig {
        channels: 1,
        width: 8,
        classes: 10,
    };
    let card = ddpm_train::card_for(net, &data, "folder:digits");
    let fit_data = FitData::new(&data, None, &Device::Cpu).unwrap();
    let stop = AtomicBool::new(false);

    // Uninterrupted: 6 steps (3 batches an epoch, so it crosses an epoch end and its grid).
    let dir_a = root.path().join("a");
    let mut a = Trainer::<SmallNet>::for_network(card.clone(), config(6), &Device::Cpu).unwrap();
    assert_eq!(
        fit(&mut a, &fit_data, &dir_a, &mut (), &stop).unwrap(),
        FitOutcome::MaxSteps
    );
    // Interrupted after 4 steps (mid-epoch, as by Ctrl-C), resumed from its checkpoint.
    let dir_b = root.path().join("b");
    let mut b = Trainer::<SmallNet>::for_network(card.clone(), config(6), &Device::Cpu).unwrap();
    let stop_b = AtomicBool::new(false);
    assert_eq!(
        fit(&mut b, &fit_data, &dir_b, &mut StopAt(4, &stop_b), &stop_b).unwrap(),
        FitOutcome::Stopped
    );
    drop(b);
    let ckpt = checkpoint_path(&dir_b);
    let mut b2 = Trainer::<SmallNet>::resume_network(&ckpt, &Device::Cpu, |_| {}).unwrap();
    assert_eq!(b2.step(), 4);
    fit(&mut b2, &fit_data, &dir_b, &mut (), &stop).unwrap();
    assert_eq!(b2.step(), 6);
    let (sa, sb) = (state(&a), state(&b2));
    assert_eq!(sa.len(), 4 * 9, "9 variables, each with EMA and moments");
    for ((name, x), (_, y)) in sa.iter().zip(&sb) {
        assert_eq!(
            x, y,
            "{name} differs between the resumed and the uninterrupted run"
        );
    }
    // A change that should show does show: the step moved the weights.
    let fresh = Trainer::<SmallNet>::for_network(card.clone(), config(6), &Device::Cpu).unwrap();
    assert_ne!(state(&fresh)[0].1, sa[0].1);
    // The files a user looks at: the epoch grid and the final one.
    for f in [
        "samples/epoch_001.png",
        "samples/step_000006.png",
        "metrics.jsonl",
    ] {
        assert!(dir_a.join(f).exists(), "missing {f}");
    }

    // The checkpoint reads back as this network, and a U-Net reader refuses it by name.
    let read = checkpoint::read_as::<SmallNet>(&checkpoint_path(&dir_a), &Device::Cpu).unwrap();
    assert_eq!(read.card, card);
    let err = checkpoint::read(&checkpoint_path(&dir_a), &Device::Cpu).unwrap_err();
    assert!(err.to_string().contains("bad model card"), "{err}");

    // Sampling goes through the pipeline like a U-Net's.
    let model = a.ema_model().unwrap();
    let request = Request {
        batch: 4,
        labels: Labels::Classes(vec![0, 3, 7, 9]),
        guidance: 1.0,
        seed: 5,
        sampler: SamplerSpec::new(SamplerKind::Ddim).with_steps(3),
    };
    let x = ddpm_pipeline::generate(
        &ddpm_pipeline::denoiser(&model, &card, a.schedule()),
        a.schedule(),
        (1, 28, 28),
        &Device::Cpu,
        &request,
        &mut |_| Ok(()),
    )
    .unwrap();
    assert_eq!(x.dims(), &[4, 1, 28, 28]);
    let v: Vec<f32> = x.flatten_all().unwrap().to_vec1().unwrap();
    assert!(v.iter().all(|p| p.is_finite() && (-1.0..=1.0).contains(p)));
}
