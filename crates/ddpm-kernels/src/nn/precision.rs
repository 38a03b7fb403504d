//! bf16 products on the CPU, the portable reference path: a product (convolution, linear layer,
//! attention matmul) "in bf16" takes its inputs rounded to bf16 (round to nearest, ties to even,
//! as `vdpbf16ps`, AMX and PyTorch's conversions round) and accumulates in f32. Two ops build it
//! around any f32 product:
//!
//! - [`bf16_inputs`]: rounds a tensor to bf16 values (kept in f32 storage: every bf16 value is
//!   an f32 value), with a straight-through backward (the gradient passes unchanged, in f32,
//!   to the f32 master weights and activations);
//! - [`bf16_grads`]: the identity forward, whose backward rounds the incoming gradient to bf16,
//!   so the two gradient products of the op below it (input gradient, weight gradient) take
//!   bf16 inputs too.
//!
//! `bf16_grads(product(bf16_inputs(x), bf16_inputs(w)))` is then a product with bf16 inputs and
//! f32 accumulation forward and backward: the product of two bf16 values is exact in f32, so
//! the f32 GEMM computes exactly the sums a bf16 kernel accumulates, up to the order of the
//! additions. Convolutions have such a kernel too, on `vdpbf16ps` ([`super::conv2d_bf16`]);
//! [`bf16_kernel`] picks between the two. On a CPU without AVX512_BF16 ([`cpu_bf16`]) this
//! path is the only one, and it is slower than plain f32 (two extra passes over each input,
//! and a rounded copy of each kept for the backward pass).
//!
//! ```
//! use candle_core::{Device, Tensor};
//! use ddpm_kernels::nn::precision::{bf16_inputs, round_bf16};
//!
//! assert_eq!(round_bf16(1.0 + 1.0 / 512.0), 1.0); // below half an ulp of bf16: down
//! assert_eq!(round_bf16(1.0 + 3.0 / 512.0), 1.0 + 1.0 / 128.0); // above: up
//! let x = Tensor::new(&[0.1f32, 3.14159], &Device::Cpu)?;
//! assert_eq!(bf16_inputs(&x)?.to_vec1::<f32>()?, vec![0.10009765625, 3.140625]);
//! # Ok::<(), candle_core::Error>(())
//! ```

use candle_core::{bail, CpuStorage, CustomOp1, DType, Layout, Result, Shape, Tensor};

use super::simd::simd_fn;
use crate::cpu::slice as contiguous_f32;

/// `x` rounded to the nearest bf16 value, ties to even (NaN stays NaN, values beyond bf16's
/// largest finite value round to ±∞ as in IEEE rounding).
#[inline(always)]
pub fn round_bf16(x: f32) -> f32 {
    let bits = x.to_bits();
    let lsb = (bits >> 16) & 1;
    let r = f32::from_bits(bits.wrapping_add(0x7fff + lsb) & 0xffff_0000);
    // A select, not a branch, so loops over slices vectorise.
    if x.is_nan() {
        x
    } else {
        r
    }
}

simd_fn! {
    /// Rounds every value of `v` to bf16 in place ([`round_bf16`], vectorised).
    pub(crate) fn round_in_place(v: &mut [f32]) {
        for x in v.iter_mut() {
            *x = round_bf16(*x);
        }
    }
}

/// Which bf16 instructions this CPU has (read once from CPUID by the standard library).
/// AMX is not detected: the standard library's test for it is unstable, and AMX tiles also need
/// the operating system's permission; it would be a kernel of its own anyway.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CpuBf16 {
    /// `vdpbf16ps` (`avx512bf16`: AMD Zen 4 and later, Intel Cooper Lake and later).
    Avx512,
    /// None: bf16 products run the reference path only.
    None,
}

impl CpuBf16 {
    /// The `/proc/cpuinfo` flag of this support (`avx512_bf16`), if any.
    pub fn flag(self) -> Option<&'static str> {
        match self {
            Self::Avx512 => Some("avx512_bf16"),
            Self::None => None,
        }
    }
}

/// The bf16 instructions of this CPU (the dispatcher's choice; tested against `/proc/cpuinfo`).
pub fn cpu_bf16() -> CpuBf16 {
    #[cfg(target_arch = "x86_64")]
    {
        if std::arch::is_x86_feature_detected!("avx512bf16") {
            return CpuBf16::Avx512;
        }
    }
    CpuBf16::None
}

pub use super::bgemm::Bf16Kernel;

/// The kernel that runs bf16 products here, chosen once per process:
///
/// - `DDPM_BF16_KERNEL=vdpbf16ps|reference` in the environment decides (`vdpbf16ps` only where
///   the CPU has AVX512_BF16; otherwise the reference path, with a warning);
/// - else, on a CPU without AVX512_BF16, the reference path;
/// - else a probe (a few milliseconds) times one product on the `vdpbf16ps` kernel against the
///   f32 GEMM and takes the kernel only when it is faster. CPUID alone cannot tell: an Intel
///   Xeon measured here (Emerald Rapids, under KVM) runs `vdpbf16ps` at half f32's FLOP rate
///   (docs/performance.md), where bf16-rounded f32 products (the reference path) are faster,
///   while the bf16 products are meant to be the fast ones (PyTorch's bf16 figures on AMD Zen 5
///   suggest they are there).
pub fn bf16_kernel() -> Bf16Kernel {
    static CHOICE: std::sync::OnceLock<Bf16Kernel> = std::sync::OnceLock::new();
    *CHOICE.get_or_init(|| choose_kernel(std::env::var("DDPM_BF16_KERNEL").ok().as_deref()))
}

/// [`bf16_kernel`]'s choice for an environment setting `env`.
fn choose_kernel(env: Option<&str>) -> Bf16Kernel {
    let available = Bf16Kernel::available();
    if let Some(name) = env {
        match Bf16Kernel::from_name(name) {
            Some(k) if available.contains(&k) => return k,
            _ => eprintln!(
                "DDPM_BF16_KERNEL={name}: expected `vdpbf16ps` (on a CPU with avx512_bf16) \
                 or `reference`; using the reference path"
            ),
        }
        return Bf16Kernel::Reference;
    }
    match super::bgemm::probe() {
        Some((f32_s, bf16_s)) if bf16_s < f32_s => Bf16Kernel::Avx512,
        _ => Bf16Kernel::Reference,
    }
}

/// Rounds `x` (f32) to bf16 values, with a straight-through backward. Other dtypes are
/// refused: this is the reference path of f32 models.
pub fn bf16_inputs(x: &Tensor) -> Result<Tensor> {
    check_f32(x, "bf16_inputs")?;
    x.contiguous()?.apply_op1(RoundInputs)
}

/// The identity, whose backward rounds the gradient to bf16 values.
pub fn bf16_grads(x: &Tensor) -> Result<Tensor> {
    check_f32(x, "bf16_grads")?;
    x.apply_op1(RoundGrads)
}

/// `x` rounded to bf16 values, without a backward (the backward of [`bf16_grads`]).
pub(crate) fn rounded(x: &Tensor) -> Result<Tensor> {
    x.contiguous()?.apply_op1_no_bwd(&RoundInputs)
}

fn check_f32(x: &Tensor, what: &str) -> Result<()> {
    if x.dtype() != DType::F32 {
        bail!(
            "{what}: the bf16 reference path takes f32 tensors, got {:?}",
            x.dtype()
        )
    }
    Ok(())
}

fn round_storage(s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
    let x = contiguous_f32(s, l, "bf16 rounding")?;
    let mut out = vec![0f32; x.len()];
    crate::cpu::for_chunks(&mut out, |start, chunk| {
        for (o, &v) in chunk.iter_mut().zip(&x[start..]) {
            *o = round_bf16(v);
        }
    });
    Ok((CpuStorage::F32(out), l.shape().clone()))
}

/// Forward: round to bf16; backward: pass the gradient through.
#[derive(Debug, Clone, Copy)]
struct RoundInputs;

impl CustomOp1 for RoundInputs {
    fn name(&self) -> &'static str {
        "ddpm-bf16-inputs"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        round_storage(s, l)
    }

    fn bwd(&self, _x: &Tensor, _res: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        Ok(Some(grad.clone()))
    }
}

/// Forward: the identity; backward: round the gradient to bf16.
#[derive(Debug, Clone, Copy)]
struct RoundGrads;

impl CustomOp1 for RoundGrads {
    fn name(&self) -> &'static str {
        "ddpm-bf16-grads"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let x = match s {
            CpuStorage::F32(v) => match l.contiguous_offsets() {
                Some((a, b)) => v[a..b].to_vec(),
                None => bail!("bf16_grads: expected a contiguous tensor"),
            },
            _ => bail!("bf16_grads: expected f32"),
        };
        Ok((CpuStorage::F32(x), l.shape().clone()))
    }

    fn bwd(&self, _x: &Tensor, _res: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        Ok(Some(rounded(grad)?))
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use candle_core::{Device, Var};

    #[test]
    fn rounding_is_to_nearest_even_as_candles_conversion() {
        // Ties: 1 + 2^-8 lies halfway between 1 and 1 + 2^-7; even is 1.
        assert_eq!(round_bf16(1.0 + 1.0 / 256.0), 1.0);
        // 1 + 3·2^-8 lies halfway between 1 + 2^-7 and 1 + 2^-6; even is 1 + 2^-6.
        assert_eq!(round_bf16(1.0 + 3.0 / 256.0), 1.0 + 1.0 / 64.0);
        assert_eq!(round_bf16(f32::MAX), f32::INFINITY);
        assert!(round_bf16(f32::NAN).is_nan());
        assert_eq!(round_bf16(-0.0).to_bits(), (-0.0f32).to_bits());
        // Against candle's own f32 → bf16 conversion (the `half` crate), on many values.
        let v: Vec<f32> = (0..20_000)
            .map(|i| ((i as f32) * 0.7371).sin() * 10f32.powi(i % 13 - 6))
            .collect();
        let x = Tensor::new(v.as_slice(), &Device::Cpu).unwrap();
        let theirs: Vec<f32> = x
            .to_dtype(DType::BF16)
            .unwrap()
            .to_dtype(DType::F32)
            .unwrap()
            .to_vec1()
            .unwrap();
        let ours: Vec<f32> = bf16_inputs(&x).unwrap().to_vec1().unwrap();
        assert_eq!(ours, theirs);
    }

    #[test]
    fn inputs_pass_gradients_straight_and_grads_are_rounded() {
        let dev = Device::Cpu;
        let x = Var::new(&[1.0f32 + 1.0 / 1024.0, 2.0], &dev).unwrap();
        let g = Tensor::new(&[1.0f32 + 1.0 / 1024.0, 0.1], &dev).unwrap();
        // d/dx sum(g · bf16_inputs(x)) = g, unrounded.
        let y = (bf16_inputs(x.as_tensor()).unwrap() * &g)
            .unwrap()
            .sum_all()
            .unwrap();
        let grads = y.backward().unwrap();
        assert_eq!(
            grads.get(&x).unwrap().to_vec1::<f32>().unwrap(),
            g.to_vec1::<f32>().unwrap()
        );
        // d/dx sum(g · bf16_grads(x)) = round(g).
        let y = (bf16_grads(x.as_tensor()).unwrap() * &g)
            .unwrap()
            .sum_all()
            .unwrap();
        let grads = y.backward().unwrap();
        let want: Vec<f32> = g
            .to_vec1::<f32>()
            .unwrap()
            .into_iter()
            .map(round_bf16)
            .collect();
        assert_eq!(grads.get(&x).unwrap().to_vec1::<f32>().unwrap(), want);
        // And the forward of bf16_grads is the identity.
        assert_eq!(
            bf16_grads(x.as_tensor()).unwrap().to_vec1::<f32>().unwrap(),
            x.as_tensor().to_vec1::<f32>().unwrap()
        );
    }

    #[test]
    fn the_kernel_choice_follows_cpuid_and_the_environment() {
        let has = cpu_bf16() == CpuBf16::Avx512;
        // vdpbf16ps only where CPUID says so, whatever the probe or the environment says.
        for env in [None, Some("vdpbf16ps"), Some("reference"), Some("nonsense")] {
            let k = choose_kernel(env);
            assert!(has || k == Bf16Kernel::Reference, "{env:?}: {k:?}");
        }
        assert_eq!(choose_kernel(Some("reference")), Bf16Kernel::Reference);
        assert_eq!(choose_kernel(Some("nonsense")), Bf16Kernel::Reference);
        if has {
            assert_eq!(choose_kernel(Some("vdpbf16ps")), Bf16Kernel::Avx512);
        }
        println!(
            "this CPU: {:?}; probe: {:?}",
            bf16_kernel(),
            super::super::bgemm::probe()
        );
    }

    #[cfg(target_os = "linux")]
    #[test]
    fn the_dispatcher_agrees_with_proc_cpuinfo() {
        let info = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
        let flags: Vec<&str> = info
            .lines()
            .find(|l| l.starts_with("flags"))
            .map(|l| l.split_whitespace().collect())
            .unwrap_or_default();
        let has = |f: &str| flags.contains(&f);
        let want = if has("avx512_bf16") {
            CpuBf16::Avx512
        } else {
            CpuBf16::None
        };
        println!("this CPU: {:?}", cpu_bf16());
        assert_eq!(cpu_bf16(), want);
    }
}
