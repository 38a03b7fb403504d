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
/// use candle_core::{Module, Result, Tensor, Var};
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
///     fn initialise(vars: &[(String, Var)], _seed: u64) -> Result<()> {
///         for (_, v) in vars {
///             v.set(&v.zeros_like()?)?;
///         }
///         Ok(())
///     }
///     fn forward_train(&self, x: &Tensor, t: &Tensor, y: Option<&Tensor>) -> Result<Tensor> {
///         self.predict_noise(x, t, y)
///     }
///     fn num_classes(_: &usize) -> usize {
///         0
///     }
/// }
/// # let _ = std::marker::PhantomData::<Conv>;
/// ```
pub trait Trainable: Denoiser + Clone + Sized {
    /// What builds the network (saved on every checkpoint's card as JSON).
    type Config: Clone + std::fmt::Debug + PartialEq + Serialize + DeserializeOwned;

    /// Builds the network, taking its variables from `vb` (the trainer's variable map, or a
    /// checkpoint's weights).
    fn build(config: &Self::Config, vb: VarBuilder<'_>) -> candle_core::Result<Self>;

    /// Sets the initial values of the network's variables (`vars`, sorted by name) from
    /// `seed`: the same seed gives the same weights.
    fn initialise(vars: &[(String, Var)], seed: u64) -> candle_core::Result<()>;

    /// The train-mode forward (dropout on, where the network has any): the output the loss
    /// compares with its target (ε or v, as the card's prediction says).
    fn forward_train(
        &self,
        x_t: &Tensor,
        t: &Tensor,
        labels: Option<&Tensor>,
    ) -> candle_core::Result<Tensor>;

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
