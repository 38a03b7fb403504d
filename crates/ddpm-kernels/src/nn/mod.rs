//! The U-Net's hot-path operations, each in two implementations selected by [`Kernels`]:
//! candle's stock composition, and our own CPU kernels (candle `CustomOp`s with hand-written
//! backward passes).
//!
//! | op | stock candle | [`Kernels::Fast`] |
//! |---|---|---|
//! | [`conv2d`] | im2col forward; input gradient by a direct `conv_transpose2d` loop | stride 1: implicit GEMM over a padded, column-shifted input for the forward, the input gradient (a flipped-kernel forward) and the kernel gradient; stride 2 and 1×1: im2col/col2im + GEMMs over groups of samples; no buffer kept between passes |
//! | [`conv2d_bf16`] | [`precision::bf16_inputs`] and [`precision::bf16_grads`] around [`conv2d`] | the same op with its three products in bf16: on the `vdpbf16ps` kernel (bf16 pairs packed while rounding, f32 accumulation) where [`precision::bf16_kernel`] picks it, else on the reference kernel (operands rounded where the op builds them, f32 GEMM); nothing rounded is kept, so memory is f32's |
//! | [`group_norm`] | about ten ops forward and backward, SiLU separate | one pass forward, one backward, affine and SiLU fused |
//! | [`add_channel_bias`] | broadcast add; backward is a single-threaded strided sum | one parallel pass each way |
//! | [`upsample_nearest2x`] | backward runs one grouped convolution per channel | one parallel pass each way (on CUDA with gradients: a broadcast, whose backward is a reshape-sum) |
//!
//! The fast kernels run on the CPU in f32, their element-wise loops compiled for AVX-512, AVX2 +
//! FMA and baseline x86-64 and picked at run time. On CUDA, [`Kernels::Fast`] keeps candle's
//! convolution forward (cuDNN with the `cudnn` feature) and replaces its backward: the input
//! gradient becomes a forward convolution of the dilated, padded upstream gradient with the
//! flipped kernel, and the kernel gradient an im2col plus one batched matrix product, instead of
//! candle's one-thread-per-output `conv_transpose2d`. Other ops run candle's stock composition
//! there.
//!
//! ```
//! use candle_core::{Device, Tensor, Var};
//! use ddpm_kernels::nn::{conv2d, Kernels};
//!
//! let dev = Device::Cpu;
//! let x = Var::randn(0f32, 1., (2, 3, 9, 7), &dev)?;
//! let w = Var::randn(0f32, 1., (4, 3, 3, 3), &dev)?;
//! let fast = conv2d(&x, &w, None, 1, 1, Kernels::Fast)?;
//! let stock = conv2d(&x, &w, None, 1, 1, Kernels::Stock)?;
//! assert!((fast - &stock)?.abs()?.max_all()?.to_scalar::<f32>()? < 1e-4);
//! let grads = stock.sqr()?.sum_all()?.backward()?;
//! assert_eq!(grads.get(&w).map(|g| g.dims().to_vec()), Some(vec![4, 3, 3, 3]));
//! # Ok::<(), candle_core::Error>(())
//! ```

mod bgemm;
pub(crate) mod bias;
mod conv;
mod conv_grad;
mod gemm;
mod norm;
pub mod precision;

/// The hook that tests the kernels' unwritten-element check (feature `check-uninit`, which the
/// workspace's tests turn on).
#[cfg(feature = "check-uninit")]
pub mod fault {
    pub use super::uninit::skip_one_write_of;
}
mod resample;
mod simd;
mod uninit;

use candle_core::{DType, Result, Tensor};

/// Which implementation of the hot-path operations to run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[cfg_attr(feature = "clap", derive(clap::ValueEnum))]
pub enum Kernels {
    /// candle's own operations (the reference; used by the benchmark for comparison).
    Stock,
    /// Our CPU kernels for f32 on the CPU. On other devices (CUDA), convolutions keep candle's
    /// forward but get a backward made of forward convolutions and batched matrix products
    /// instead of candle's direct `conv_transpose2d` loop; the other ops are candle's.
    #[default]
    Fast,
    /// [`Kernels::Fast`], plus our own CUDA kernels on a GPU for the ops `Fast` leaves to candle
    /// there (`--kernels cuda-ops`; `fused`, its old name, is still accepted): GroupNorm with its shift and SiLU, the bias add and the ×2 upsampling, forward and
    /// backward (`kernels/norm.cu`, `bias.cu`, `resample.cu`, built with the `cuda` feature). On the CPU it is `Fast`.
    /// Opt-in until `tests/cuda.rs` has passed on a GPU (they were written on a machine without
    /// one; see docs/cuda.md).
    #[cfg_attr(feature = "clap", value(alias = "fused"))]
    CudaOps,
}

impl Kernels {
    /// Parses `stock` (or `candle`), `fast` or `cuda-ops` (or `fused`, its old name).
    pub fn from_name(name: &str) -> Option<Self> {
        match name {
            "stock" | "candle" => Some(Self::Stock),
            "fast" => Some(Self::Fast),
            "cuda-ops" | "fused" => Some(Self::CudaOps),
            _ => None,
        }
    }

    /// The name [`Kernels::from_name`] accepts.
    pub fn name(self) -> &'static str {
        match self {
            Self::Stock => "stock",
            Self::Fast => "fast",
            Self::CudaOps => "cuda-ops",
        }
    }

    /// Whether our CPU kernels handle a tensor like `t` (f32 on the CPU).
    fn fast_for(self, t: &Tensor) -> bool {
        self != Self::Stock && t.device().is_cpu() && t.dtype() == DType::F32
    }

    /// Whether our CUDA kernels handle a tensor like `t` (f32 on a GPU, under `CudaOps`, in a
    /// build with the `cuda` feature).
    fn cuda_for(self, t: &Tensor) -> bool {
        cfg!(feature = "cuda")
            && self == Self::CudaOps
            && t.device().is_cuda()
            && t.dtype() == DType::F32
    }

    /// Either of the two: the custom op (with its CPU or CUDA forward) runs.
    fn ours_for(self, t: &Tensor) -> bool {
        self.fast_for(t) || self.cuda_for(t)
    }
}

/// The f32 contents of a contiguous CPU storage, or an error naming `what` (shared with
/// ddpm-kernels' ops).
pub(crate) use crate::cpu::slice as contiguous_f32;

/// 2-D convolution of `x [n, cin, h, w]` with `weight [cout, cin, kh, kw]`, plus an optional
/// `bias [cout]`, with equal stride and padding on both axes.
pub fn conv2d(
    x: &Tensor,
    weight: &Tensor,
    bias: Option<&Tensor>,
    stride: usize,
    padding: usize,
    kernels: Kernels,
) -> Result<Tensor> {
    let fast = kernels.fast_for(x) && weight.dtype() == DType::F32;
    let op = conv::Conv2dOp {
        stride,
        pad: padding,
        bf16: None,
    };
    let y = match bias {
        Some(b) if fast && b.dtype() == DType::F32 => {
            return x
                .contiguous()?
                .apply_op3(&weight.contiguous()?, &b.contiguous()?, op)
        }
        _ if fast => x.contiguous()?.apply_op2(&weight.contiguous()?, op)?,
        _ if kernels != Kernels::Stock && !x.device().is_cpu() => {
            conv_grad::conv2d(x, weight, stride, padding)?
        }
        _ => x.conv2d(weight, padding, stride, 1, 1)?,
    };
    match bias {
        Some(b) => add_channel_bias(&y, b, kernels),
        None => Ok(y),
    }
}

/// [`conv2d`] with bf16 products, as `torch.autocast` runs a convolution on bf16: the input,
/// the weights and the bias are rounded to bf16 (to nearest, ties to even), the sums
/// accumulate in f32, and the output and all gradients are f32 (the output gradient is rounded
/// to bf16 for the two gradient products). With [`Kernels::Fast`] on the CPU one op does it
/// all, on the kernel the dispatcher picks ([`precision::bf16_kernel`]): `vdpbf16ps`, which
/// rounds while it packs its operands, or the reference kernel, which rounds the operands where
/// the op builds them (padded input, column and gradient matrices) and runs the f32 GEMM. Neither
/// keeps a rounded copy for the backward pass. Elsewhere (stock kernels, CUDA) the composition
/// of [`precision::bf16_inputs`] and [`precision::bf16_grads`] around [`conv2d`] runs, which
/// keeps rounded copies of the input and weights. All compute the same sums up to the order of
/// the additions. The tensors must be f32.
///
/// ```
/// use candle_core::{Device, Tensor};
/// use ddpm_kernels::nn::{conv2d, conv2d_bf16, Kernels};
///
/// let dev = Device::Cpu;
/// let x = Tensor::randn(0f32, 1., (2, 3, 9, 7), &dev)?;
/// let w = Tensor::randn(0f32, 1., (4, 3, 3, 3), &dev)?;
/// let bf16 = conv2d_bf16(&x, &w, None, 1, 1, Kernels::Fast)?;
/// let f32 = conv2d(&x, &w, None, 1, 1, Kernels::Fast)?;
/// let err = (bf16 - &f32)?.abs()?.max_all()?.to_scalar::<f32>()?;
/// assert!(err > 0.0 && err < 0.2); // bf16 keeps 8 significant bits
/// # Ok::<(), candle_core::Error>(())
/// ```
pub fn conv2d_bf16(
    x: &Tensor,
    weight: &Tensor,
    bias: Option<&Tensor>,
    stride: usize,
    padding: usize,
    kernels: Kernels,
) -> Result<Tensor> {
    let kernel = precision::bf16_kernel();
    conv2d_bf16_on(x, weight, bias, stride, padding, kernels, kernel)
}

/// [`conv2d_bf16`] on a given bf16 kernel instead of the dispatcher's choice (tests and
/// benchmarks compare them). Fails for [`precision::Bf16Kernel::Avx512`] on a CPU without
/// AVX512_BF16.
pub fn conv2d_bf16_on(
    x: &Tensor,
    weight: &Tensor,
    bias: Option<&Tensor>,
    stride: usize,
    padding: usize,
    kernels: Kernels,
    kernel: precision::Bf16Kernel,
) -> Result<Tensor> {
    if kernel == precision::Bf16Kernel::Avx512
        && !precision::Bf16Kernel::available().contains(&kernel)
    {
        candle_core::bail!("conv2d_bf16: this CPU has no AVX512_BF16 for the vdpbf16ps kernel")
    }
    let f32s = weight.dtype() == DType::F32 && bias.is_none_or(|b| b.dtype() == DType::F32);
    if kernels.fast_for(x) && f32s {
        let op = conv::Conv2dOp {
            stride,
            pad: padding,
            bf16: Some(kernel),
        };
        let (x, w) = (x.contiguous()?, weight.contiguous()?);
        return match bias {
            Some(b) => x.apply_op3(&w, &b.contiguous()?, op),
            None => x.apply_op2(&w, op),
        };
    }
    let bias = bias.map(precision::bf16_inputs).transpose()?;
    let y = conv2d(
        &precision::bf16_inputs(x)?,
        &precision::bf16_inputs(weight)?,
        bias.as_ref(),
        stride,
        padding,
        kernels,
    )?;
    precision::bf16_grads(&y)
}

/// `x [n, c, h, w] + b`, with `b` `[c]` (one value per channel) or `[n, c]` (per sample and
/// channel, e.g. a projected time embedding).
pub fn add_channel_bias(x: &Tensor, b: &Tensor, kernels: Kernels) -> Result<Tensor> {
    if kernels.ours_for(x) && b.dtype() == DType::F32 {
        return x.contiguous()?.apply_op2(&b.contiguous()?, bias::AddBias);
    }
    let (n, c) = (x.dim(0)?, x.dim(1)?);
    let b = if b.rank() == 1 {
        b.reshape((1, c, 1, 1))?
    } else {
        b.reshape((n, c, 1, 1))?
    };
    x.broadcast_add(&b)
}

/// GroupNorm over `x [n, c, ...]` with `groups` groups and per-channel `gamma` and `beta`
/// `[c]`, followed by SiLU when `silu` is set. With `shift` (`[n, c]`), normalises
/// `x + shift` instead (the U-Net adds its projected embedding there; fusing it saves a pass).
#[allow(clippy::too_many_arguments)]
pub fn group_norm(
    x: &Tensor,
    gamma: &Tensor,
    beta: &Tensor,
    shift: Option<&Tensor>,
    groups: usize,
    eps: f64,
    silu: bool,
    kernels: Kernels,
) -> Result<Tensor> {
    let (n, c) = (x.dim(0)?, x.dim(1)?);
    if kernels.ours_for(x) && gamma.dtype() == DType::F32 {
        let shift = match shift {
            Some(s) => s.reshape(n * c)?,
            None => Tensor::zeros(n * c, DType::F32, x.device())?,
        };
        let packed = Tensor::cat(&[gamma, beta, &shift], 0)?;
        return x.contiguous()?.apply_op2(
            &packed,
            norm::GroupNormOp {
                groups,
                eps: eps as f32,
                silu,
            },
        );
    }
    let x = match shift {
        Some(s) => x.broadcast_add(&s.reshape((n, c, 1, 1))?)?,
        None => x.clone(),
    };
    let norm = candle_nn::GroupNorm::new(gamma.clone(), beta.clone(), c, groups, eps)?;
    let y = candle_core::Module::forward(&norm, &x)?;
    if silu {
        candle_nn::ops::silu(&y)
    } else {
        Ok(y)
    }
}

/// Nearest-neighbour ×2 upsampling of `x [n, c, h, w]` to `[n, c, 2h, 2w]`.
pub fn upsample_nearest2x(x: &Tensor, kernels: Kernels) -> Result<Tensor> {
    let (n, c, h, w) = x.dims4()?;
    if kernels.ours_for(x) {
        return x.contiguous()?.apply_op1(resample::Upsample2x);
    }
    // On a GPU without gradients (sampling), candle's upsampling kernel is one pass; the
    // broadcast below exists for its backward.
    if kernels == Kernels::Stock || (!x.device().is_cpu() && !x.track_op()) {
        return x.upsample_nearest2d(2 * h, 2 * w);
    }
    // Broadcast each pixel over a 2×2 block; the backward of a broadcast is a sum.
    x.reshape((n, c, h, 1, w, 1))?
        .broadcast_as((n, c, h, 2, w, 2))?
        .contiguous()?
        .reshape((n, c, 2 * h, 2 * w))
}
