//! What the [`crate::Trainer`] needs from a network: [`Trainable`]. The U-Net implements it;
//! a network of one's own does too, and then trains with the same loop, EMA, checkpoints,
//! exact resume, metrics, grids and budget (`examples/own_network.rs`).
//!
//! A network is built from its configuration (`Trainable::Config`, saved on the model card of
//! every checkpoint, so a resumed run rebuilds it), sets its own initial weights, and has a
//! train-mode forward. Its inference forward is its [`Denoiser`] implementation (the held-out
//! loss and the sample grids use it).

use candle_core::{Tensor, Var};
use candle_nn::VarBuilder;
use ddpm_core::Denoiser;
use ddpm_unet::{Autocast, ModelCard, UNet, UNetConfig};
use serde::de::DeserializeOwned;
use serde::Serialize;

/// A network the trainer can train.
///
/// ```
/// use candle_core::{Module, Result, Tensor};
/// use candle_nn::{Conv2d, VarBuilder};
/// use ddpm_core::Denoiser;
/// use ddpm_train::Trainable;
///
/// /// One 3×3 convolution: ignores t and the class (a toy, but a trainable one).
/// #[derive(Clone)]
/// struct Conv(Conv2d);
///
/// impl Denoiser for Conv {
///     fn predict_noise(&self, x: &Tensor, _t: &Tensor, _y: Option<&Tensor>) -> Result<Tensor> {
///         self.0.forward(x)
///     }
///     fn null_class(&self) -> Option<u32> {
///         None
///     }
/// }
///
/// impl Trainable for Conv {
///     type Config = usize; // image channels
///     fn build(channels: &usize, vb: VarBuilder<'_>) -> Result<Self> {
///         let cfg = candle_nn::Conv2dConfig { padding: 1, ..Default::default() };
///         Ok(Conv(candle_nn::conv2d(*channels, *channels, 3, cfg, vb.pp("conv"))?))
///     }
///     fn num_classes(_: &usize) -> usize {
///         0
///     }
/// }
/// # let _ = std::marker::PhantomData::<Conv>;
/// ```
///
/// Only `build` and `num_classes` have no default: the initial weights default to
/// [`fan_in_normal`], the train-mode forward to the [`Denoiser`]'s `predict_noise` (right for
/// a network without dropout).
pub trait Trainable: Denoiser + Clone + Sized {
    /// What builds the network (saved on every checkpoint's card as JSON).
    type Config: Clone + std::fmt::Debug + PartialEq + Serialize + DeserializeOwned;

    /// Builds the network, taking its variables from `vb` (the trainer's variable map, or a
    /// checkpoint's weights).
    fn build(config: &Self::Config, vb: VarBuilder<'_>) -> candle_core::Result<Self>;

    /// Sets the initial values of the network's variables (`vars`, sorted by name) from
    /// `seed`: the same seed gives the same weights. The default is [`fan_in_normal`].
    fn initialise(vars: &[(String, Var)], seed: u64) -> candle_core::Result<()> {
        fan_in_normal(vars, seed)
    }

    /// The train-mode forward (dropout on, where the network has any): the output the loss
    /// compares with its target (ε or v, as the card's prediction says). The default is the
    /// inference forward, [`Denoiser::predict_noise`].
    fn forward_train(
        &self,
        x_t: &Tensor,
        t: &Tensor,
        labels: Option<&Tensor>,
    ) -> candle_core::Result<Tensor> {
        self.predict_noise(x_t, t, labels)
    }

    /// The train-mode forward with per-sample guidance weights `w` (`[B]` f32) as an input:
    /// what a distillation's student runs ([`crate::distill`]). The default refuses (a network
    /// needs a guidance input to be a student).
    fn forward_train_at(
        &self,
        x_t: &Tensor,
        t: &Tensor,
        labels: Option<&Tensor>,
        w: &Tensor,
    ) -> candle_core::Result<Tensor> {
        let _ = (x_t, t, labels, w);
        candle_core::bail!(
            "this network takes no guidance weight input: it cannot be a distillation student"
        )
    }

    /// The classes the network is conditioned on (0: unconditional). The trainer replaces a
    /// label by the null class, this number, with the training option `p_uncond`.
    fn num_classes(config: &Self::Config) -> usize;

    /// The network's own checks of a card it is to be built from (a card read from a file is
    /// untrusted input). The default checks what every network shares
    /// ([`ModelCard::validate_data`]) and that the card names as many classes as the network
    /// has (when it has any).
    fn check_card(card: &ModelCard<Self::Config>) -> Result<(), String> {
        card.validate_data()?;
        let classes = Self::num_classes(&card.model);
        if classes != 0 && classes != card.data.class_names.len() {
            return Err(format!(
                "the card's network has {classes} classes but its data names {}",
                card.data.class_names.len()
            ));
        }
        Ok(())
    }

    /// Runs the network's products in a lower precision (the training option `autocast`).
    /// The default refuses any.
    fn with_autocast(self, autocast: Option<Autocast>) -> candle_core::Result<Self> {
        match autocast {
            None => Ok(self),
            Some(a) => candle_core::bail!(
                "autocast: this network has no {a:?} mode (train it with autocast unset)"
            ),
        }
    }

    /// This network, run the way `trained` runs (its kernels, its autocast): what the EMA
    /// model and the budget's probe take over from the model under training. The default
    /// keeps `self` as it is.
    fn with_run_options_of(self, trained: &Self) -> candle_core::Result<Self> {
        let _ = trained;
        Ok(self)
    }
}

/// Seeded fan-in initialisation (LeCun normal), the default of [`Trainable::initialise`]: a
/// variable of rank 2 or more (a linear or convolution weight, an embedding table) draws from
/// N(0, 1/fan_in), fan_in being the product of its dimensions after the first; a vector named
/// `…weight` (a normalisation's scale) is set to ones, any other vector (a bias) to zeros.
/// Variables are drawn in the order given, so the same `vars` and `seed` give the same weights.
///
/// ```
/// use candle_core::{DType, Device, Var};
/// let w = Var::zeros((64, 16, 3, 3), DType::F32, &Device::Cpu)?;
/// let b = Var::ones(64, DType::F32, &Device::Cpu)?;
/// let vars = [("conv.weight".to_string(), w.clone()), ("conv.bias".to_string(), b.clone())];
/// ddpm_train::network::fan_in_normal(&vars, 7)?;
/// let std = w.as_tensor().flatten_all()?.sqr()?.mean_all()?.sqrt()?.to_scalar::<f32>()?;
/// assert!((std - (1.0 / 144f32).sqrt()).abs() < 0.01, "{std}");
/// assert_eq!(b.as_tensor().sum_all()?.to_scalar::<f32>()?, 0.0);
/// # Ok::<(), candle_core::Error>(())
/// ```
pub fn fan_in_normal(vars: &[(String, Var)], seed: u64) -> candle_core::Result<()> {
    let mut rng = ddpm_core::SeededNoise::new(seed);
    for (name, var) in vars {
        let dims = var.dims();
        let value = if dims.len() >= 2 {
            let fan_in = dims[1..].iter().product::<usize>().max(1);
            let x =
                ddpm_core::NoiseSource::randn(&mut rng, var.shape(), var.dtype(), var.device())?;
            (x / (fan_in as f64).sqrt())?
        } else if name.ends_with("weight") {
            var.ones_like()?
        } else {
            var.zeros_like()?
        };
        var.set(&value)?;
    }
    Ok(())
}

/// The card of `model` trained on `data` (named `dataset`, e.g. `folder:PATH`): its image
/// shape and class names, the default noise schedule (linear β, 1,000 steps) and
/// ε-prediction. Change its `schedule` or `prediction` for others.
pub fn card_for<M>(
    model: M,
    data: &impl ddpm_data::Dataset,
    dataset: impl Into<String>,
) -> ModelCard<M> {
    let (channels, height, width) = data.image_shape();
    ModelCard {
        model,
        schedule: ddpm_schedule::ScheduleConfig::default(),
        data: ddpm_unet::DataInfo {
            dataset: dataset.into(),
            channels,
            height,
            width,
            class_names: data.class_names().to_vec(),
        },
        prediction: ddpm_core::Prediction::Epsilon,
        distilled: None,
    }
}

impl Trainable for UNet {
    type Config = UNetConfig;

    fn build(config: &UNetConfig, vb: VarBuilder<'_>) -> candle_core::Result<Self> {
        UNet::new(config, vb)
    }

    fn initialise(vars: &[(String, Var)], seed: u64) -> candle_core::Result<()> {
        UNet::initialise(vars, seed)
    }

    fn forward_train(
        &self,
        x_t: &Tensor,
        t: &Tensor,
        labels: Option<&Tensor>,
    ) -> candle_core::Result<Tensor> {
        self.forward_t(x_t, t, labels, true)
    }

    fn forward_train_at(
        &self,
        x_t: &Tensor,
        t: &Tensor,
        labels: Option<&Tensor>,
        w: &Tensor,
    ) -> candle_core::Result<Tensor> {
        self.forward_w(x_t, t, labels, Some(w), true)
    }

    fn num_classes(config: &UNetConfig) -> usize {
        config.num_classes
    }

    fn check_card(card: &ModelCard) -> Result<(), String> {
        card.validate()
    }

    fn with_autocast(self, autocast: Option<Autocast>) -> candle_core::Result<Self> {
        UNet::with_autocast(self, autocast.map(|a| a.dtype()))
    }

    fn with_run_options_of(self, trained: &Self) -> candle_core::Result<Self> {
        self.with_kernels(trained.kernels())
            .with_autocast(trained.autocast())
    }
}
