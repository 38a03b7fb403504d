//! Fused kernels of ddpm-rs as candle custom ops, each with a CPU half and (with the `cuda`
//! feature) a CUDA half, so one call does in one pass what a composition of candle ops does in
//! five to fifteen, each of which allocates its output and, on a GPU, is one kernel launch:
//!
//! - [`reverse_step`]: classifier-free guidance's combination of the conditional and
//!   unconditional noise predictions, x̂₀, its clipping and the DDPM, DDIM or DPM-Solver++
//!   update, for one sampling step;
//! - [`add_noise`]: the forward process x_t = √ᾱ_t·x₀ + √(1−ᾱ_t)·ε with per-sample
//!   coefficients;
//! - [`adam_moments`], [`adamw_apply`] and [`ema_update`]: the optimizer's and the weight
//!   average's updates, in place, without temporaries.
//!
//! Each op also has its plain candle composition ([`reverse_step_composed`] and friends): the
//! fallback for other dtypes, and the reference the tests hold the fused ops to.
//!
//! The crate also owns every CUDA source of the workspace (`kernels/*.cu`, compiled to PTX by
//! `build.rs` with nvcc only when the `cuda` feature is on) and the launch helpers in `cuda`,
//! which ddpm-unet's ops use too.
//!
//! # Example
//!
//! ```
//! use candle_core::{Device, Tensor};
//! use ddpm_kernels::{add_noise, add_noise_composed};
//!
//! let x0 = Tensor::new(&[[1f32, -1.0], [0.5, 0.0]], &Device::Cpu)?;
//! let eps = Tensor::new(&[[0.1f32, 0.2], [0.3, 0.4]], &Device::Cpu)?;
//! // Per sample: [√ᾱ_t, √(1 − ᾱ_t)].
//! let coef = Tensor::new(&[[0.6f32, 0.8], [1.0, 0.0]], &Device::Cpu)?;
//! let xt = add_noise(&x0, &eps, &coef)?;
//! assert_eq!(xt.to_vec2::<f32>()?, vec![vec![0.68, -0.44], vec![0.5, 0.0]]);
//! assert_eq!(add_noise_composed(&x0, &eps, &coef)?.to_vec2::<f32>()?, xt.to_vec2::<f32>()?);
//! # Ok::<(), candle_core::Error>(())
//! ```

mod abi;
mod cpu;
#[cfg(feature = "cuda")]
mod cuda;
pub mod nn;
mod noise;
mod optim;
mod step;

pub use noise::{add_noise, add_noise_composed};
pub use optim::{
    adam_moments, adam_moments_composed, adamw_apply, adamw_apply_composed, ema_update,
    ema_update_composed, AdamWApply,
};
pub use step::{guidance_combine, guided_eps, reverse_step, reverse_step_composed, Eps, StepRule};
