//! The class-conditional U-Net noise predictor ε_θ(x_t, t, y).
//!
//! Residual blocks (Norm → SiLU → Conv, with the time + class embedding added),
//! a sinusoidal time embedding followed by an MLP, a learned class embedding with one
//! extra row for the null class (classifier-free guidance), self-attention at low
//! resolution and skip connections. The model knows nothing of β, samplers or guidance:
//! it implements [`ddpm_core::Denoiser`].
//!
//! # Weight names
//!
//! Stable, documented, and checked by a test:
//!
//! | prefix | layer |
//! |---|---|
//! | `time_embed.0`, `time_embed.2` | the two linear layers of the time MLP |
//! | `class_embed` | `[num_classes + 1, 4·base]` class embedding (last row: null class) |
//! | `conv_in` | first 3×3 convolution |
//! | `down.{level}.res.{j}.{norm1,conv1,emb_proj,norm2,conv2,skip}` | residual blocks |
//! | `down.{level}.attn.{j}.{norm,qkv,proj}` | self-attention after res block `j` |
//! | `down.{level}.downsample` | 3×3 stride-2 convolution |
//! | `mid.res1`, `mid.attn`, `mid.res2` | the middle block |
//! | `up.{level}.res.{j}`, `up.{level}.attn.{j}` | the way up (`num_res_blocks + 1` blocks) |
//! | `up.{level}.upsample` | the 3×3 convolution after nearest ×2 upsampling |
//! | `norm_out`, `conv_out` | output Norm and 3×3 convolution |
//!
//! # Example
//!
//! ```
//! use candle_core::{DType, Device, Tensor};
//! use candle_nn::{VarBuilder, VarMap};
//! use ddpm_core::Denoiser;
//! use ddpm_unet::{UNet, UNetConfig};
//!
//! let varmap = VarMap::new();
//! let vb = VarBuilder::from_varmap(&varmap, DType::F32, &Device::Cpu);
//! let unet = UNet::new(&UNetConfig::tiny(), vb)?;
//! let x = Tensor::zeros((2, 1, 28, 28), DType::F32, &Device::Cpu)?;
//! let t = Tensor::new(&[10u32, 500], &Device::Cpu)?;
//! let y = Tensor::new(&[3u32, 10], &Device::Cpu)?; // 10 = the null class
//! let eps = unet.predict_noise(&x, &t, Some(&y))?;
//! assert_eq!(eps.dims(), x.dims());
//! assert_eq!(unet.null_class(), Some(10));
//! # Ok::<(), candle_core::Error>(())
//! ```

mod config;
pub mod file;
/// The U-Net's hot-path ops: [`ddpm_kernels::nn`], re-exported where they used to live.
pub use ddpm_kernels::nn as ops;

use candle_core::{DType, Module, Result, Tensor};
use candle_nn::{conv2d, embedding, linear, Conv2dConfig, Embedding, Linear, VarBuilder};
use ddpm_core::Denoiser;
use ddpm_kernels::nn::precision;

pub use config::{ConfigError, Preset, UNetConfig};
pub use file::{
    load_unet, load_unet_from_bytes, DataInfo, DistillStage, Distillation, ModelCard, ModelFile,
    ModelFileError, Weights,
};
pub use ops::Kernels;

/// Reduced-precision compute with f32 weights ([`UNet::with_autocast`]); the name a flag or a
/// saved training config uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
#[cfg_attr(feature = "clap", derive(clap::ValueEnum))]
pub enum Autocast {
    /// bfloat16: f32's range, 8 bits of mantissa; needs no loss scaling. On the CPU: products
    /// take bf16-rounded inputs and accumulate in f32, on the `vdpbf16ps` kernel or the
    /// reference path ([`precision::bf16_kernel`]).
    Bf16,
    /// IEEE half: more mantissa, little range; training would need loss scaling.
    F16,
}

impl Autocast {
    /// Parses `bf16` or `f16`.
    pub fn from_name(name: &str) -> Option<Self> {
        match name {
            "bf16" => Some(Self::Bf16),
            "f16" => Some(Self::F16),
            _ => None,
        }
    }

    /// The dtype.
    pub fn dtype(self) -> DType {
        match self {
            Self::Bf16 => DType::BF16,
            Self::F16 => DType::F16,
        }
    }

    /// Whether `device` can run it. Every device can: bf16 on the CPU runs the `vdpbf16ps`
    /// kernel or the reference path ([`ddpm_kernels::nn::precision`]: bf16-rounded inputs to
    /// f32 products, the same numbers a bf16 kernel computes; [`Autocast::cpu_note`] says
    /// which).
    pub fn check_device(self, _device: &candle_core::Device) -> std::result::Result<(), String> {
        Ok(())
    }

    /// What a user should know about this autocast on `device`, if anything: which bf16
    /// kernel the CPU's convolutions run ([`precision::bf16_kernel`]), and that the reference
    /// path is slower than f32.
    pub fn cpu_note(self, device: &candle_core::Device) -> Option<String> {
        if self != Self::Bf16 || !device.is_cpu() {
            return None;
        }
        let kernel = precision::bf16_kernel();
        if kernel == precision::Bf16Kernel::Avx512 {
            return Some(
                "bf16 on the CPU: convolutions run the vdpbf16ps kernel (AVX512_BF16, faster \
                 than this CPU's f32 GEMM by the dispatcher's probe); linear layers and \
                 attention take the reference path (bf16-rounded inputs to f32 products)"
                    .to_string(),
            );
        }
        let cpu = match precision::cpu_bf16().flag() {
            Some(flag) => format!(
                "this CPU has {flag}, but its vdpbf16ps ran slower than its f32 GEMM in the \
                 dispatcher's probe (DDPM_BF16_KERNEL=vdpbf16ps forces it)"
            ),
            None => "this CPU has no bf16 instructions (avx512_bf16)".to_string(),
        };
        Some(format!(
            "bf16 on the CPU runs the reference path (products take bf16-rounded inputs and \
             accumulate in f32, as a bf16 kernel does; activations stay f32): {cpu}, so it is \
             slower than f32. Use it to check bf16 numerics, not for speed"
        ))
    }
}

const GN_EPS: f64 = 1e-5;

/// Sinusoidal embedding of integer timesteps: `[B]` → `[B, dim]` (sin half, then cos half).
pub fn timestep_embedding(t: &Tensor, dim: usize) -> Result<Tensor> {
    let half = dim / 2;
    let dev = t.device();
    let freqs: Vec<f32> = (0..half)
        .map(|i| (-(10_000f64.ln()) * i as f64 / half as f64).exp() as f32)
        .collect();
    let freqs = Tensor::from_vec(freqs, (1, half), dev)?;
    let args = t
        .to_dtype(DType::F32)?
        .unsqueeze(1)?
        .broadcast_mul(&freqs)?;
    Tensor::cat(&[args.sin()?, args.cos()?], 1)
}

/// The factor on w before its sinusoidal embedding: w in 0..5 spans the range t spans.
pub const GUIDANCE_EMBED_SCALE: f64 = 200.0;

/// A convolution's parameters (created by candle_nn's initialiser) run through [`ops::conv2d`].
#[derive(Debug, Clone)]
struct Conv {
    weight: Tensor,
    bias: Option<Tensor>,
    stride: usize,
    padding: usize,
}

impl Conv {
    fn new(
        cin: usize,
        cout: usize,
        k: usize,
        stride: usize,
        padding: usize,
        vb: VarBuilder<'_>,
    ) -> Result<Self> {
        let cfg = Conv2dConfig {
            padding,
            stride,
            ..Default::default()
        };
        let c = conv2d(cin, cout, k, cfg, vb)?;
        Ok(Self {
            weight: c.weight().clone(),
            bias: c.bias().cloned(),
            stride,
            padding,
        })
    }

    /// Under autocast the f32 parameters are cast to the input's dtype (a differentiable cast:
    /// their gradients come back in f32); with the bf16 reference path ([`Run::bf16`]) the
    /// product takes bf16-rounded inputs and gradients and accumulates in f32.
    fn forward(&self, x: &Tensor, run: Run) -> Result<Tensor> {
        let kernels = run.kernels;
        if run.bf16 {
            // The vdpbf16ps kernel or the reference path, as the dispatcher picks.
            return ops::conv2d_bf16(
                x,
                &self.weight,
                self.bias.as_ref(),
                self.stride,
                self.padding,
                kernels,
            );
        }
        let dt = x.dtype();
        let bias = self.bias.as_ref().map(|b| b.to_dtype(dt)).transpose()?;
        ops::conv2d(
            x,
            &self.weight.to_dtype(dt)?,
            bias.as_ref(),
            self.stride,
            self.padding,
            kernels,
        )
    }
}

fn conv3(cin: usize, cout: usize, stride: usize, vb: VarBuilder<'_>) -> Result<Conv> {
    Conv::new(cin, cout, 3, stride, 1, vb)
}

fn conv1(cin: usize, cout: usize, vb: VarBuilder<'_>) -> Result<Conv> {
    Conv::new(cin, cout, 1, 1, 0, vb)
}

/// `l.forward(x)` with `l`'s parameters cast to `x`'s dtype when they differ (autocast), or,
/// on the bf16 reference path, with bf16-rounded inputs and gradients.
fn linear_in(l: &Linear, x: &Tensor, run: Run) -> Result<Tensor> {
    if run.bf16 {
        let bias = l.bias().map(precision::bf16_inputs).transpose()?;
        let y = Linear::new(precision::bf16_inputs(l.weight())?, bias)
            .forward(&precision::bf16_inputs(x)?)?;
        return precision::bf16_grads(&y);
    }
    let dt = x.dtype();
    if l.weight().dtype() == dt {
        return l.forward(x);
    }
    let bias = l.bias().map(|b| b.to_dtype(dt)).transpose()?;
    Linear::new(l.weight().to_dtype(dt)?, bias).forward(x)
}

/// Norm parameters (named `weight` and `bias`, initialised to 1 and 0 as in candle_nn).
#[derive(Debug, Clone)]
struct Norm {
    gamma: Tensor,
    beta: Tensor,
    groups: usize,
}

impl Norm {
    fn new(groups: usize, channels: usize, vb: VarBuilder<'_>) -> Result<Self> {
        Ok(Self {
            gamma: vb.get_with_hints(channels, "weight", candle_nn::Init::Const(1.))?,
            beta: vb.get_with_hints(channels, "bias", candle_nn::Init::Const(0.))?,
            groups,
        })
    }

    /// GroupNorm, then SiLU when `silu`.
    fn forward(&self, x: &Tensor, silu: bool, kernels: Kernels) -> Result<Tensor> {
        self.forward_shifted(x, None, silu, kernels)
    }

    /// GroupNorm of `x + shift` (`shift` `[n, c]`), then SiLU when `silu`.
    ///
    /// Always computed in f32 (as PyTorch's autocast does): under autocast the input is cast
    /// up and the result back down to the input's dtype.
    fn forward_shifted(
        &self,
        x: &Tensor,
        shift: Option<&Tensor>,
        silu: bool,
        kernels: Kernels,
    ) -> Result<Tensor> {
        let dt = x.dtype();
        let shift = shift.map(|s| s.to_dtype(DType::F32)).transpose()?;
        ops::group_norm(
            &x.to_dtype(DType::F32)?,
            &self.gamma,
            &self.beta,
            shift.as_ref(),
            self.groups,
            GN_EPS,
            silu,
            kernels,
        )?
        .to_dtype(dt)
    }
}

fn group_norm(groups: usize, channels: usize, vb: VarBuilder<'_>) -> Result<Norm> {
    Norm::new(groups, channels, vb)
}

fn dropout(x: &Tensor, p: f32, train: bool) -> Result<Tensor> {
    if train && p > 0.0 {
        candle_nn::ops::dropout(x, p)
    } else {
        Ok(x.clone())
    }
}

/// A residual block: GN → SiLU → Conv3 → (+ embedding) → GN → SiLU → Dropout → Conv3, plus a skip.
#[derive(Debug, Clone)]
struct ResBlock {
    norm1: Norm,
    conv1: Conv,
    emb_proj: Linear,
    norm2: Norm,
    conv2: Conv,
    skip: Option<Conv>,
    dropout: f32,
}

impl ResBlock {
    fn new(cin: usize, cout: usize, cfg: &UNetConfig, vb: VarBuilder<'_>) -> Result<Self> {
        Ok(Self {
            norm1: group_norm(cfg.groups, cin, vb.pp("norm1"))?,
            conv1: conv3(cin, cout, 1, vb.pp("conv1"))?,
            emb_proj: linear(cfg.embed_dim(), cout, vb.pp("emb_proj"))?,
            norm2: group_norm(cfg.groups, cout, vb.pp("norm2"))?,
            conv2: conv3(cout, cout, 1, vb.pp("conv2"))?,
            skip: if cin != cout {
                Some(conv1(cin, cout, vb.pp("skip"))?)
            } else {
                None
            },
            dropout: cfg.dropout,
        })
    }

    fn forward(&self, x: &Tensor, emb: &Tensor, train: bool, k: Run) -> Result<Tensor> {
        let h = self
            .conv1
            .forward(&self.norm1.forward(x, true, k.kernels)?, k)?;
        let e = linear_in(&self.emb_proj, emb, k)?;
        let h = self.norm2.forward_shifted(&h, Some(&e), true, k.kernels)?;
        let h = self.conv2.forward(&dropout(&h, self.dropout, train)?, k)?;
        let skip = match &self.skip {
            Some(s) => s.forward(x, k)?,
            None => x.clone(),
        };
        skip + h
    }
}

/// Multi-head self-attention over the H·W positions, with a residual connection.
#[derive(Debug, Clone)]
struct Attention {
    norm: Norm,
    qkv: Conv,
    proj: Conv,
    heads: usize,
}

impl Attention {
    fn new(ch: usize, cfg: &UNetConfig, vb: VarBuilder<'_>) -> Result<Self> {
        Ok(Self {
            norm: group_norm(cfg.groups, ch, vb.pp("norm"))?,
            qkv: conv1(ch, 3 * ch, vb.pp("qkv"))?,
            proj: conv1(ch, ch, vb.pp("proj"))?,
            heads: cfg.num_heads,
        })
    }

    fn forward(&self, x: &Tensor, kern: Run) -> Result<Tensor> {
        let (b, c, h, w) = x.dims4()?;
        let d = c / self.heads;
        let qkv = self
            .qkv
            .forward(&self.norm.forward(x, false, kern.kernels)?, kern)?
            .reshape((b, 3, self.heads, d, h * w))?;
        // [B, heads, HW, d] for q and v; [B, heads, d, HW] for k.
        let q = qkv
            .narrow(1, 0, 1)?
            .squeeze(1)?
            .transpose(2, 3)?
            .contiguous()?;
        let k = qkv.narrow(1, 1, 1)?.squeeze(1)?.contiguous()?;
        let v = qkv
            .narrow(1, 2, 1)?
            .squeeze(1)?
            .transpose(2, 3)?
            .contiguous()?;
        let scores = (product(&q, &k, kern)? * (1.0 / (d as f64).sqrt()))?;
        // The softmax in f32 under autocast, as PyTorch's autocast does.
        let attn =
            candle_nn::ops::softmax_last_dim(&scores.to_dtype(DType::F32)?)?.to_dtype(v.dtype())?;
        let out = product(&attn, &v, kern)?
            .transpose(2, 3)?
            .reshape((b, c, h, w))?;
        x + self.proj.forward(&out, kern)?
    }
}

/// `a.matmul(b)`, on the bf16 reference path with bf16-rounded inputs and gradients.
fn product(a: &Tensor, b: &Tensor, run: Run) -> Result<Tensor> {
    if run.bf16 {
        let y = precision::bf16_inputs(a)?.matmul(&precision::bf16_inputs(b)?)?;
        return precision::bf16_grads(&y);
    }
    a.matmul(b)
}

/// How one forward pass runs: the kernels, and whether its products take the bf16 reference
/// path (bf16 autocast on the CPU: activations, norms, softmax and additions stay f32; every
/// convolution, linear layer and attention product takes bf16-rounded inputs, and its two
/// gradient products bf16-rounded gradients, accumulating in f32).
#[derive(Debug, Clone, Copy)]
struct Run {
    kernels: Kernels,
    bf16: bool,
}

#[derive(Debug, Clone)]
struct Level {
    res: Vec<ResBlock>,
    attn: Vec<Attention>,
    resample: Option<Conv>,
}

/// The U-Net. Build it with [`UNet::new`]; run it through [`Denoiser::predict_noise`]
/// (inference) or [`UNet::forward_t`] (training, with dropout).
#[derive(Debug, Clone)]
pub struct UNet {
    config: UNetConfig,
    time_embed: (Linear, Linear),
    class_embed: Option<Embedding>,
    guidance_embed: Option<(Linear, Linear)>,
    conv_in: Conv,
    down: Vec<Level>,
    mid: (ResBlock, Attention, ResBlock),
    up: Vec<Level>,
    norm_out: Norm,
    conv_out: Conv,
    kernels: Kernels,
    autocast: Option<DType>,
}

impl UNet {
    /// Builds the U-Net, creating or loading its weights through `vb`.
    pub fn new(config: &UNetConfig, vb: VarBuilder<'_>) -> Result<Self> {
        config
            .validate()
            .map_err(|e| candle_core::Error::Msg(e.to_string()))?;
        let cfg = config;
        let emb = cfg.embed_dim();
        let levels = cfg.channel_mults.len();
        let time_embed = (
            linear(cfg.base_channels, emb, vb.pp("time_embed.0"))?,
            linear(emb, emb, vb.pp("time_embed.2"))?,
        );
        let class_embed = if cfg.num_classes > 0 {
            Some(embedding(cfg.num_classes + 1, emb, vb.pp("class_embed"))?)
        } else {
            None
        };
        let guidance_embed = if cfg.guidance_embedding {
            Some((
                linear(cfg.base_channels, emb, vb.pp("guidance_embed.0"))?,
                linear(emb, emb, vb.pp("guidance_embed.2"))?,
            ))
        } else {
            None
        };
        let conv_in = conv3(cfg.in_channels, cfg.base_channels, 1, vb.pp("conv_in"))?;

        let mut skip_channels = vec![cfg.base_channels];
        let mut ch = cfg.base_channels;
        let mut down = Vec::with_capacity(levels);
        for level in 0..levels {
            let vbl = vb.pp(format!("down.{level}"));
            let out = cfg.level_channels(level);
            let (mut res, mut attn) = (Vec::new(), Vec::new());
            for j in 0..cfg.num_res_blocks {
                res.push(ResBlock::new(ch, out, cfg, vbl.pp(format!("res.{j}")))?);
                ch = out;
                if cfg.attention_levels.contains(&level) {
                    attn.push(Attention::new(ch, cfg, vbl.pp(format!("attn.{j}")))?);
                }
                skip_channels.push(ch);
            }
            let resample = if level + 1 < levels {
                skip_channels.push(ch);
                Some(conv3(ch, ch, 2, vbl.pp("downsample"))?)
            } else {
                None
            };
            down.push(Level {
                res,
                attn,
                resample,
            });
        }
        let mid = (
            ResBlock::new(ch, ch, cfg, vb.pp("mid.res1"))?,
            Attention::new(ch, cfg, vb.pp("mid.attn"))?,
            ResBlock::new(ch, ch, cfg, vb.pp("mid.res2"))?,
        );
        let mut up = Vec::with_capacity(levels);
        for level in (0..levels).rev() {
            let vbl = vb.pp(format!("up.{level}"));
            let out = cfg.level_channels(level);
            let (mut res, mut attn) = (Vec::new(), Vec::new());
            for j in 0..=cfg.num_res_blocks {
                let skip = skip_channels.pop().ok_or_else(|| {
                    candle_core::Error::Msg("internal: U-Net skip bookkeeping".into())
                })?;
                res.push(ResBlock::new(
                    ch + skip,
                    out,
                    cfg,
                    vbl.pp(format!("res.{j}")),
                )?);
                ch = out;
                if cfg.attention_levels.contains(&level) {
                    attn.push(Attention::new(ch, cfg, vbl.pp(format!("attn.{j}")))?);
                }
            }
            let resample = if level > 0 {
                Some(conv3(ch, ch, 1, vbl.pp("upsample"))?)
            } else {
                None
            };
            up.push(Level {
                res,
                attn,
                resample,
            });
        }
        Ok(Self {
            config: cfg.clone(),
            time_embed,
            class_embed,
            guidance_embed,
            conv_in,
            down,
            mid,
            up,
            norm_out: group_norm(cfg.groups, ch, vb.pp("norm_out"))?,
            conv_out: conv3(ch, cfg.in_channels, 1, vb.pp("conv_out"))?,
            kernels: Kernels::default(),
            autocast: None,
        })
    }

    /// Autocast, as PyTorch's `torch.autocast`: convolutions, linear layers and attention's
    /// products run in `dtype` (bf16 on a GPU; f16 also works, but training in f16 would need
    /// loss scaling, which the trainer does not do), while the weights stay in f32 (they are
    /// cast on use, so their gradients arrive in f32), GroupNorm and the softmax compute in
    /// f32, and the output is cast back to the input's dtype. `None` (the default): all f32.
    ///
    /// Fails for a dtype other than bf16 and f16. On the CPU, bf16 runs the reference path
    /// ([`ddpm_kernels::nn::precision`]): activations stay f32 and every product takes
    /// bf16-rounded inputs (and gradients) with f32 accumulation.
    pub fn with_autocast(mut self, dtype: Option<DType>) -> Result<Self> {
        if let Some(dt) = dtype {
            if !matches!(dt, DType::BF16 | DType::F16) {
                candle_core::bail!("autocast: expected bf16 or f16, got {dt:?}");
            }
        }
        self.autocast = dtype;
        Ok(self)
    }

    /// The autocast dtype, if any.
    pub fn autocast(&self) -> Option<DType> {
        self.autocast
    }

    /// Selects the implementation of the hot-path operations ([`Kernels::Fast`] by default).
    /// Both compute the same function; [`Kernels::Stock`] exists for comparison.
    pub fn with_kernels(mut self, kernels: Kernels) -> Self {
        self.kernels = kernels;
        self
    }

    /// The kernels in use.
    pub fn kernels(&self) -> Kernels {
        self.kernels
    }

    /// The device the weights live on.
    pub fn device(&self) -> &candle_core::Device {
        self.conv_in.weight.device()
    }

    /// The configuration the model was built with.
    pub fn config(&self) -> &UNetConfig {
        &self.config
    }

    /// Sets the U-Net's variables (`vars`, sorted by name, as a trainer holds them) to their
    /// initial values from a seeded host generator (candle's CPU generator cannot be seeded):
    /// convolution and linear weights U(±1/√fan_in) (PyTorch's default), class embeddings
    /// N(0, 1), GroupNorm scales 1, biases 0, and the guidance embedding's last layer 0 (so
    /// that w changes nothing until trained). The names are this crate's own (`UNet::new`
    /// gives them), which is why the U-Net, not the trainer, owns this choice.
    pub fn initialise(vars: &[(String, candle_core::Var)], seed: u64) -> Result<()> {
        let mut rng = ddpm_core::SeededNoise::new(seed ^ 0x5EED_1417);
        for (name, var) in vars {
            let shape = var.shape().clone();
            let n = shape.elem_count();
            let data: Vec<f32> = if name.starts_with("class_embed") {
                rng.randn_vec(n)
            } else if name.starts_with("guidance_embed.2") {
                // The guidance embedding starts at zero: a student starts as its teacher.
                vec![0.0; n]
            } else if name.contains("norm") && name.ends_with("weight") {
                vec![1.0; n]
            } else if name.ends_with("bias") {
                vec![0.0; n]
            } else {
                let fan_in: usize = shape.dims().iter().skip(1).product::<usize>().max(1);
                let bound = 1.0 / (fan_in as f32).sqrt();
                rng.uniform_f32(n)
                    .into_iter()
                    .map(|u| (2.0 * u - 1.0) * bound)
                    .collect()
            };
            var.set(&Tensor::from_vec(data, shape, var.device())?)?;
        }
        Ok(())
    }

    /// The forward pass. `labels` is `[B]` u32 (the null class allowed); `None` means
    /// unconditional. `train` enables dropout. A network with a guidance embedding runs at
    /// w = 0 here (see [`UNet::forward_w`]).
    pub fn forward_t(
        &self,
        x: &Tensor,
        t: &Tensor,
        labels: Option<&Tensor>,
        train: bool,
    ) -> Result<Tensor> {
        self.forward_w(x, t, labels, None, train)
    }

    /// The forward pass with the guidance weights w (`guidance`, `[B]` f32) as an input, for a
    /// network built with [`UNetConfig::guidance_embedding`] (`None`: w = 0). Fails when w is
    /// given to a network without the embedding.
    pub fn forward_w(
        &self,
        x: &Tensor,
        t: &Tensor,
        labels: Option<&Tensor>,
        guidance: Option<&Tensor>,
        train: bool,
    ) -> Result<Tensor> {
        let (b, c, h, w) = x.dims4()?;
        if c != self.config.in_channels {
            candle_core::bail!(
                "U-Net: expected {} input channels, got {c}",
                self.config.in_channels
            );
        }
        self.config
            .check_image_size(h, w)
            .map_err(|e| candle_core::Error::Msg(e.to_string()))?;
        if t.dims() != [b] {
            candle_core::bail!("U-Net: t must be [{b}], got {:?}", t.shape());
        }
        let out_dtype = x.dtype();
        // bf16 on the CPU: the reference path (module docs of ddpm_kernels::nn::precision).
        let bf16_reference =
            self.autocast == Some(DType::BF16) && x.device().is_cpu() && out_dtype == DType::F32;
        let k = Run {
            kernels: self.kernels,
            bf16: bf16_reference,
        };
        let (x, dt) = match self.autocast {
            Some(_) if bf16_reference => (x.clone(), out_dtype),
            Some(dt) => (x.to_dtype(dt)?, dt),
            None => (x.clone(), out_dtype),
        };
        let temb = timestep_embedding(t, self.config.base_channels)?.to_dtype(dt)?;
        let (te0, te1) = &self.time_embed;
        let mut emb = linear_in(te1, &candle_nn::ops::silu(&linear_in(te0, &temb, k)?)?, k)?;
        if let Some(ce) = &self.class_embed {
            let null = self.config.num_classes as u32;
            let labels = match labels {
                Some(l) => {
                    if l.dims() != [b] {
                        candle_core::bail!("U-Net: labels must be [{b}], got {:?}", l.shape());
                    }
                    l.to_dtype(DType::U32)?
                }
                None => Tensor::full(null, b, x.device())?,
            };
            emb = (emb + ce.forward(&labels)?.to_dtype(dt)?)?;
        }
        match (&self.guidance_embed, guidance) {
            (Some((g0, g1)), g) => {
                let g = match g {
                    Some(g) if g.dims() != [b] => {
                        candle_core::bail!("U-Net: w must be [{b}], got {:?}", g.shape())
                    }
                    Some(g) => g.to_dtype(DType::F32)?,
                    None => Tensor::zeros(b, DType::F32, x.device())?,
                };
                let wemb =
                    timestep_embedding(&(g * GUIDANCE_EMBED_SCALE)?, self.config.base_channels)?
                        .to_dtype(dt)?;
                emb = (emb + linear_in(g1, &candle_nn::ops::silu(&linear_in(g0, &wemb, k)?)?, k)?)?;
            }
            (None, Some(_)) => candle_core::bail!(
                "U-Net: this network has no guidance embedding and takes no w input"
            ),
            (None, None) => {}
        }
        let mut hs = vec![self.conv_in.forward(&x, k)?];
        let mut hcur = hs[0].clone();
        for level in &self.down {
            for (j, res) in level.res.iter().enumerate() {
                hcur = res.forward(&hcur, &emb, train, k)?;
                if let Some(a) = level.attn.get(j) {
                    hcur = a.forward(&hcur, k)?;
                }
                hs.push(hcur.clone());
            }
            if let Some(ds) = &level.resample {
                hcur = ds.forward(&hcur, k)?;
                hs.push(hcur.clone());
            }
        }
        hcur = self.mid.0.forward(&hcur, &emb, train, k)?;
        hcur = self.mid.1.forward(&hcur, k)?;
        hcur = self.mid.2.forward(&hcur, &emb, train, k)?;
        for level in &self.up {
            for (j, res) in level.res.iter().enumerate() {
                let skip = hs
                    .pop()
                    .ok_or_else(|| candle_core::Error::Msg("internal: skip stack".into()))?;
                hcur = res.forward(&Tensor::cat(&[&hcur, &skip], 1)?, &emb, train, k)?;
                if let Some(a) = level.attn.get(j) {
                    hcur = a.forward(&hcur, k)?;
                }
            }
            if let Some(us) = &level.resample {
                hcur = us.forward(&ops::upsample_nearest2x(&hcur, k.kernels)?, k)?;
            }
        }
        let out = self.norm_out.forward(&hcur, true, k.kernels)?;
        self.conv_out.forward(&out, k)?.to_dtype(out_dtype)
    }
}

impl Denoiser for UNet {
    fn predict_noise(&self, x_t: &Tensor, t: &Tensor, labels: Option<&Tensor>) -> Result<Tensor> {
        self.forward_t(x_t, t, labels, false)
    }
    fn takes_guidance(&self) -> bool {
        self.config.guidance_embedding
    }
    fn predict_noise_at(
        &self,
        x_t: &Tensor,
        t: &Tensor,
        labels: Option<&Tensor>,
        w: f64,
    ) -> Result<Tensor> {
        let ws = Tensor::full(w as f32, x_t.dim(0)?, x_t.device())?;
        self.forward_w(x_t, t, labels, Some(&ws), false)
    }
    fn null_class(&self) -> Option<u32> {
        (self.config.num_classes > 0).then_some(self.config.num_classes as u32)
    }
}

/// Number of scalar parameters of a model built from `config` (without building it on a device).
pub fn parameter_count(config: &UNetConfig) -> Result<usize> {
    let varmap = candle_nn::VarMap::new();
    let vb = VarBuilder::from_varmap(&varmap, DType::F32, &candle_core::Device::Cpu);
    UNet::new(config, vb)?;
    let n = varmap.all_vars().iter().map(|v| v.elem_count()).sum();
    Ok(n)
}

/// Multiply-add FLOPs (2 per multiply-accumulate) of one forward pass for one `height × width`
/// image: convolutions, linear layers and the attention matrix products. Norms, activations and
/// additions are left out (they are a few per element, not per weight). A training step costs
/// about three times this (forward, input gradient, weight gradient).
pub fn forward_flops(config: &UNetConfig, height: usize, width: usize) -> f64 {
    let cfg = config;
    let emb = cfg.embed_dim() as f64;
    let conv = |cin: usize, cout: usize, k: usize, hw: f64| 2.0 * (cin * cout * k * k) as f64 * hw;
    let res = |cin: usize, cout: usize, hw: f64| {
        conv(cin, cout, 3, hw)
            + conv(cout, cout, 3, hw)
            + 2.0 * emb * cout as f64
            + if cin != cout {
                conv(cin, cout, 1, hw)
            } else {
                0.0
            }
    };
    let attn = |ch: usize, hw: f64| {
        conv(ch, 3 * ch, 1, hw) + conv(ch, ch, 1, hw) + 2.0 * 2.0 * hw * hw * ch as f64
    };
    let levels = cfg.channel_mults.len();
    let hw_at = |level: usize| ((height >> level) * (width >> level)) as f64;
    let mut flops = 2.0 * (cfg.base_channels as f64 * emb + emb * emb);
    flops += conv(cfg.in_channels, cfg.base_channels, 3, hw_at(0));
    let mut skips = vec![cfg.base_channels];
    let mut ch = cfg.base_channels;
    for level in 0..levels {
        let out = cfg.level_channels(level);
        for _ in 0..cfg.num_res_blocks {
            flops += res(ch, out, hw_at(level));
            ch = out;
            if cfg.attention_levels.contains(&level) {
                flops += attn(ch, hw_at(level));
            }
            skips.push(ch);
        }
        if level + 1 < levels {
            flops += conv(ch, ch, 3, hw_at(level + 1));
            skips.push(ch);
        }
    }
    let bottom = hw_at(levels - 1);
    flops += 2.0 * res(ch, ch, bottom) + attn(ch, bottom);
    for level in (0..levels).rev() {
        let out = cfg.level_channels(level);
        for _ in 0..=cfg.num_res_blocks {
            let skip = skips.pop().unwrap_or(0);
            flops += res(ch + skip, out, hw_at(level));
            ch = out;
            if cfg.attention_levels.contains(&level) {
                flops += attn(ch, hw_at(level));
            }
        }
        if level > 0 {
            flops += conv(ch, ch, 3, hw_at(level - 1));
        }
    }
    flops + conv(ch, cfg.in_channels, 3, hw_at(0))
}
