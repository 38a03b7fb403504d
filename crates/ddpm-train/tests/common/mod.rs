//! The tiny model, options and data the training tests share.
#![allow(dead_code, clippy::unwrap_used)]

use std::path::Path;

use candle_core::Device;
use ddpm_data::{Dataset, TensorBatcher};
use ddpm_train::{DataInfo, FitData, ModelCard, TrainConfig};

pub fn card() -> ModelCard {
    ModelCard {
        model: ddpm_unet::UNetConfig::tiny(),
        schedule: ddpm_schedule::ScheduleConfig::new(ddpm_schedule::BetaSchedule::cosine(), 100),
        data: DataInfo::mnist(),
        prediction: Default::default(),
        distilled: None,
    }
}

pub fn config() -> TrainConfig {
    TrainConfig {
        epochs: 3,
        batch_size: 8,
        lr: 1e-3,
        warmup_steps: 2,
        sample_every: 0,
        sample_steps: 2,
        checkpoint_every: 0,
        held_out_examples: 16,
        seed: 7,
        ..TrainConfig::default()
    }
}

pub fn data() -> FitData {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../assets/mnist");
    let names = (0..10).map(|d| d.to_string()).collect();
    let test = ddpm_data::load_idx_dir(&dir, ddpm_data::Split::Test, names).unwrap();
    let train = test.take(32);
    assert_eq!(train.len(), 32);
    let held = ddpm_data::ImageDataset::take(&test, 48);
    let (hx, hy) = held.to_tensors(&Device::Cpu).unwrap();
    FitData {
        train: TensorBatcher::new(&train, &Device::Cpu).unwrap(),
        train_len: train.len(),
        held_out: Some((hx.narrow(0, 32, 16).unwrap(), hy.narrow(0, 32, 16).unwrap())),
    }
}
