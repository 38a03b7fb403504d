//! 16 guided 7s from the model shipped in assets/, as one PNG.
//!
//! `cargo run --release -p ddpm-pipeline --example generate` (writes sevens.png)
use candle_core::Device;
use ddpm_pipeline::{generate_with, Labels, Model, Request, SamplerSpec, Weights};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
    let model = Model::load(
        &root.join("assets/ddpm-mnist.safetensors"),
        Weights::Ema,
        &Device::Cpu,
    )?;
    let request = Request {
        labels: Labels::one(model.class("7")?, 16),
        guidance: 3.0, // ε̂ = (1 + w)·ε(x, t, c) − w·ε(x, t, ∅); diffusers' guidance_scale = 1 + w
        seed: 0,
        sampler: SamplerSpec::default(), // DPM-Solver++(3M), 8 log-SNR steps
        batch: 16,
    };
    let x = generate_with(&model, &request, &mut |_| Ok(()))?;
    // [16, 1, 28, 28] in [−1, 1] → a 4×4 grid of u8 pixels.
    let px = ((x.clamp(-1f32, 1f32)? + 1.0)? * 127.5)?.to_dtype(candle_core::DType::U8)?;
    let grid = px
        .reshape((4, 4, 28, 28))?
        .permute((0, 2, 1, 3))?
        .reshape((112, 112))?;
    let img = image::GrayImage::from_raw(112, 112, grid.flatten_all()?.to_vec1::<u8>()?)
        .ok_or("grid size")?;
    img.save("sevens.png")?;
    println!("wrote sevens.png (16 sevens, w = 3, {})", request.sampler);
    Ok(())
}
