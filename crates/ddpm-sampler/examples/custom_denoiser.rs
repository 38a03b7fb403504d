//! Your own denoiser with DDIM and classifier-free guidance: no network, just the exact ε of a
//! toy dataset, so the sampler's answer is known. Class c's data is one fixed 4×4 image;
//! the null class (unconditional) predicts as if the data were the mean of the two.
//!
//! `cargo run --release -p ddpm-sampler --example custom_denoiser`
use candle_core::{DType, Device, Result, Shape, Tensor};
use ddpm_core::{Denoiser, NoiseSchedule, NoiseSource, SeededNoise};
use ddpm_sampler::{sample, ClassifierFreeGuidance, Ddim, SamplerConfig, Spacing};
use ddpm_schedule::{Schedule, ScheduleConfig};

struct TwoImages<'a> {
    schedule: &'a Schedule,
    images: Tensor, // [3, 1, 4, 4]: class 0, class 1, their mean (the null class, 2)
}

impl Denoiser for TwoImages<'_> {
    /// ε = (x_t − √ᾱ_t·x_0) / √(1 − ᾱ_t) for the x_0 of each sample's class.
    fn predict_noise(&self, x: &Tensor, t: &Tensor, labels: Option<&Tensor>) -> Result<Tensor> {
        let ac = self.schedule.alphas_cumprod()[t.to_vec1::<u32>()?[0] as usize];
        let y = match labels {
            Some(l) => l.clone(),
            None => Tensor::full(2u32, x.dim(0)?, x.device())?,
        };
        let x0 = self.images.index_select(&y, 0)?;
        (x - (x0 * ac.sqrt())?)? / (1.0 - ac).sqrt()
    }
    fn null_class(&self) -> Option<u32> {
        Some(2)
    }
}

fn main() -> Result<()> {
    let dev = Device::Cpu;
    let schedule = ScheduleConfig::default()
        .build()
        .map_err(candle_core::Error::wrap)?;
    let (a, b) = (
        Tensor::full(0.5f32, (1, 1, 4, 4), &dev)?,
        Tensor::full(-0.5f32, (1, 1, 4, 4), &dev)?,
    );
    let mean = ((&a + &b)? * 0.5)?;
    let images = Tensor::cat(&[&a, &b, &mean], 0)?;
    let model = TwoImages {
        schedule: &schedule,
        images,
    };
    for w in [0.0, 1.0] {
        // w = 0: the conditional model; w = 1 pushes away from the unconditional mean
        // (ε̂ = 2·ε_c − ε_u), so the clipped x̂₀ overshoots class 1's −0.5 towards −1.
        let guided = ClassifierFreeGuidance::new(&model, w)?;
        let mut ddim = Ddim::new(
            &schedule,
            20,
            0.0,
            Spacing::Leading,
            SamplerConfig::default(),
        )?;
        let mut noise = SeededNoise::new(0);
        let x_t = noise.randn(&Shape::from((2, 1, 4, 4)), DType::F32, &dev)?;
        let labels = Tensor::new(&[0u32, 1], &dev)?;
        let x0 = sample(
            &guided,
            &mut ddim,
            x_t,
            Some(&labels),
            &mut noise,
            &mut |_| Ok(()),
        )?;
        let means: Vec<f32> = x0.flatten_from(1)?.mean(1)?.to_vec1()?;
        println!(
            "w = {w}: class 0 → {:+.3}, class 1 → {:+.3} (data: +0.5, −0.5)",
            means[0], means[1]
        );
    }
    Ok(())
}
