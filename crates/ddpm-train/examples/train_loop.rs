//! A training loop written by hand over the library crates, without the `Trainer`: the
//! library's public training objective ([`ddpm_train::Objective`]: timesteps, noise, class
//! dropout, the ε-prediction MSE), the U-Net and this crate's AdamW. 60 steps of a tiny U-Net
//! on 1,024 MNIST digits (about a minute on 2 cores).
//!
//! `cargo run --release -p ddpm-train --example train_loop`
use candle_core::{DType, Device};
use candle_nn::{VarBuilder, VarMap};
use ddpm_core::{Prediction, SeededNoise};
use ddpm_data::{load_dataset, Batcher, Dataset, DatasetKind, Split, TensorBatcher};
use ddpm_schedule::ScheduleConfig;
use ddpm_train::optim::{AdamW, AdamWConfig};
use ddpm_train::{LossWeighting, Objective};
use ddpm_unet::{UNet, UNetConfig};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let dev = Device::Cpu;
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
    let mnist = root.join("assets/mnist");
    let ds = load_dataset(&DatasetKind::Mnist, Some(&mnist), Split::Train, (28, 28))?.take(1024);
    let batcher = TensorBatcher::new(&ds, &dev)?;
    let schedule = ScheduleConfig::default().build()?; // linear β, T = 1000
    let config = UNetConfig::tiny(); // 10 classes; label 10 is the null class
    let varmap = VarMap::new();
    let unet = UNet::new(&config, VarBuilder::from_varmap(&varmap, DType::F32, &dev))?;
    let mut vars: Vec<_> = varmap
        .data()
        .lock()
        .map_err(|_| "poisoned")?
        .clone()
        .into_iter()
        .collect();
    vars.sort_by(|a, b| a.0.cmp(&b.0));
    let mut opt = AdamW::new(vars, AdamWConfig::default())?;
    // ε-prediction, every timestep weighted the same, class dropout p = 0.1: one network
    // learns ε(x, t, c) and ε(x, t, ∅) (label 10 is the null class).
    let objective = Objective {
        prediction: Prediction::Epsilon,
        weighting: LossWeighting::Uniform,
        p_uncond: 0.1,
    };
    let null = Some(config.num_classes as u32);
    let (mut rng, b) = (SeededNoise::new(0), 32);
    for step in 0..60 {
        let idx: Vec<usize> = rng
            .uniform_u32(b, ds.len() as u32)
            .into_iter()
            .map(|i| i as usize)
            .collect();
        let batch = batcher.batch(&idx)?;
        // One t and one ε per sample; x_t = √ᾱ_t·x_0 + √(1−ᾱ_t)·ε; labels dropped to ∅.
        let drawn = objective.draw(
            &schedule,
            &batch.images,
            Some(&batch.labels),
            null,
            &mut rng,
        )?;
        let pred = unet.forward_t(&drawn.x_t, &drawn.t, drawn.labels.as_ref(), true)?;
        let loss = objective.loss(&schedule, &batch.images, &drawn, &pred)?;
        opt.step(&loss.backward()?, 2e-3, 1.0)?;
        if step % 10 == 0 || step == 59 {
            println!("step {step:>2}: loss {:.4}", loss.to_scalar::<f32>()?);
        }
    }
    Ok(())
}
