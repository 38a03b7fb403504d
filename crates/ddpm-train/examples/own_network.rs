//! Trains a network of one's own (not the U-Net) with the library's trainer: its loop, class
//! dropout, EMA, checkpoints, exact resume, metrics and sample grids, on a folder of images
//! laid out as `FOLDER/<class>/*.png`.
//!
//! `cargo run --release -p ddpm-train --example own_network -- [FOLDER] [OUT]`
//!
//! Without a FOLDER it first writes 64 digits of each class of the shipped MNIST test split as
//! PNG files into `OUT/data` (OUT defaults to `runs/own_network`). Run it again to continue
//! from `OUT/checkpoint.safetensors` (raise `epochs` below to train longer); the grids land in
//! `OUT/samples/`. `tests/own_network.rs` trains this network and checks its resume.
use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicBool;

use candle_core::{DType, Device, Module, Result, Tensor};
use candle_nn::{conv2d, embedding, linear, Conv2d, Conv2dConfig, Embedding, Linear, VarBuilder};
use ddpm_core::Denoiser;
use ddpm_data::Dataset;
use ddpm_train::{card_for, checkpoint_path, fit, FitData, TrainConfig, Trainable, Trainer};

// ---- The user's network, and what ddpm-train needs of it (`Trainable`: 19 lines). ----
/// Three 3×3 convolutions; the timestep and the class shift the hidden features.
#[derive(Clone)]
pub struct SmallNet {
    conv_in: Conv2d,
    mid: Conv2d,
    out: Conv2d,
    time: Linear,
    class: Embedding,
    classes: u32,
}

/// What builds a [`SmallNet`]: saved on the card of every checkpoint.
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct SmallNetConfig {
    /// Image channels.
    pub channels: usize,
    /// Hidden channels.
    pub width: usize,
    /// Classes (the null class is one more).
    pub classes: usize,
}

impl Denoiser for SmallNet {
    fn predict_noise(&self, x: &Tensor, t: &Tensor, y: Option<&Tensor>) -> Result<Tensor> {
        let mut emb = self
            .time
            .forward(&(t.to_dtype(DType::F32)? / 1000.0)?.unsqueeze(1)?)?
            .silu()?;
        if let Some(y) = y {
            emb = (emb + self.class.forward(y)?)?;
        }
        let h = self
            .conv_in
            .forward(x)?
            .silu()?
            .broadcast_add(&emb.unsqueeze(2)?.unsqueeze(3)?)?;
        self.out.forward(&self.mid.forward(&h)?.silu()?)
    }
    fn null_class(&self) -> Option<u32> {
        (self.classes > 0).then_some(self.classes)
    }
}

impl Trainable for SmallNet {
    type Config = SmallNetConfig;
    fn build(c: &SmallNetConfig, vb: VarBuilder<'_>) -> Result<Self> {
        let pad = Conv2dConfig {
            padding: 1,
            ..Default::default()
        };
        Ok(Self {
            conv_in: conv2d(c.channels, c.width, 3, pad, vb.pp("conv_in"))?,
            mid: conv2d(c.width, c.width, 3, pad, vb.pp("mid"))?,
            out: conv2d(c.width, c.channels, 3, pad, vb.pp("out"))?,
            time: linear(1, c.width, vb.pp("time"))?,
            class: embedding(c.classes + 1, c.width, vb.pp("class"))?, // + the null class
            classes: c.classes as u32,
        })
    }
    fn num_classes(c: &SmallNetConfig) -> usize {
        c.classes
    }
}
// ---- End of the user's network. ----

/// Writes `per_class` digits of each class of the shipped MNIST test split to
/// `dir/<class>/<i>.png`.
pub fn write_digit_folder(
    dir: &Path,
    per_class: usize,
) -> std::result::Result<(), Box<dyn std::error::Error>> {
    let mnist = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../assets/mnist");
    let names: Vec<String> = (0..10).map(|d| d.to_string()).collect();
    let test = ddpm_data::load_idx_dir(&mnist, ddpm_data::Split::Test, names)?;
    for (class, indices) in test.first_per_class(per_class).into_iter().enumerate() {
        std::fs::create_dir_all(dir.join(class.to_string()))?;
        for i in indices {
            let (pixels, _) = test.get(i).ok_or("index past the end")?;
            let img = image::GrayImage::from_raw(28, 28, pixels.to_vec()).ok_or("not 28×28")?;
            img.save(dir.join(class.to_string()).join(format!("{i}.png")))?;
        }
    }
    Ok(())
}

fn main() -> std::result::Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().collect();
    let out = PathBuf::from(args.get(2).map_or("runs/own_network", String::as_str));
    let folder = match args.get(1) {
        Some(f) => PathBuf::from(f),
        None => {
            write_digit_folder(&out.join("data"), 64)?;
            out.join("data")
        }
    };
    let dev = Device::Cpu;
    let data = ddpm_data::load_image_folder(&folder, 28, 28)?;
    let ckpt = checkpoint_path(&out);
    let mut trainer = if ckpt.exists() {
        println!("continuing {}", ckpt.display());
        Trainer::<SmallNet>::resume_network(&ckpt, &dev, |_| {})?
    } else {
        let (channels, _, _) = data.image_shape();
        let net = SmallNetConfig {
            channels,
            width: 32,
            classes: data.class_names().len(),
        };
        let card = card_for(net, &data, format!("folder:{}", folder.display()));
        let config = TrainConfig {
            epochs: 4,
            batch_size: 32,
            lr: 1e-3,
            warmup_steps: 20,
            sample_steps: 20,
            held_out_examples: 0,
            ..TrainConfig::default()
        };
        Trainer::<SmallNet>::for_network(card, config, &dev)?
    };
    let outcome = fit(
        &mut trainer,
        &FitData::new(&data, None, &dev)?,
        &out,
        &mut (),
        &AtomicBool::new(false),
    )?;
    println!(
        "{outcome:?} at step {}: {} and {}",
        trainer.step(),
        ckpt.display(),
        out.join("samples").display()
    );
    Ok(())
}
