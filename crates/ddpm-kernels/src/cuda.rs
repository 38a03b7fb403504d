//! The CUDA helpers every op's launch uses: the PTX handle (`ptx!`), `launch!`, buffer views
//! and launch configurations. Each op's own launch sits in a `cuda` module beside its CPU loop
//! (`step.rs`, `noise.rs`, `optim.rs`, `nn/norm.rs`, `nn/bias.rs`, `nn/resample.rs`), and its
//! kernel in `kernels/<op>.cu`.
//!
//! Kernel launches are foreign calls, so this module allows `unsafe`: each launch passes device
//! buffers whose lengths the caller checked against the sizes the kernel indexes with.
#![allow(unsafe_code)]

use candle_core::cuda_backend::cudarc::driver::{CudaView, CudaViewMut};
use candle_core::{bail, CudaStorage, Layout, Result};

/// A PTX module: the name the device caches it under and its text.
#[derive(Debug, Clone, Copy)]
pub struct Ptx {
    /// Module name for `CudaDevice::get_or_load_custom_func`.
    pub module: &'static str,
    /// The PTX source.
    pub source: &'static str,
}

/// The PTX that `build.rs` compiled from `kernels/NAME.cu`, as the module `ddpm_NAME`.
macro_rules! ptx {
    ($name:literal) => {
        $crate::cuda::Ptx {
            module: concat!("ddpm_", $name),
            source: include_str!(concat!(env!("OUT_DIR"), "/", $name, ".ptx")),
        }
    };
}
pub(crate) use ptx;

/// Threads per block of every launch here.
pub const THREADS: u32 = 256;

/// Loads `$name` from `$ptx` on `$dev`, pushes the arguments in order and launches with `$cfg`.
///
/// A kernel launch is a foreign call that the compiler cannot check, so the expansion must sit
/// in the caller's `unsafe` block: `// SAFETY: …` then `unsafe { launch!(…) }`. The obligation:
/// the arguments match the kernel's parameter list in type and order, and every buffer is at
/// least as long as the sizes passed make the kernel index.
macro_rules! launch {
    ($dev:expr, $ptx:expr, $name:literal, $cfg:expr; $($arg:expr),+ $(,)?) => {{
        use $crate::cuda::{PushKernelArg as _, WrapErr as _};
        let ptx: $crate::cuda::Ptx = $ptx;
        let cfg: $crate::cuda::LaunchConfig = $cfg;
        let func = $dev.get_or_load_custom_func($name, ptx.module, ptx.source)?;
        let mut builder = func.builder();
        $( builder.arg($arg); )+
        // The caller's `unsafe` block covers this call (see above).
        builder.launch(cfg).w()?;
    }};
}
pub(crate) use launch;

#[doc(hidden)]
pub use candle_core::cuda_backend::cudarc::driver::{LaunchConfig, PushKernelArg};
#[doc(hidden)]
pub use candle_core::cuda_backend::WrapErr;

/// The f32 contents of a contiguous CUDA storage, or an error naming `what`.
pub fn view<'a>(s: &'a CudaStorage, l: &Layout, what: &str) -> Result<CudaView<'a, f32>> {
    let Some((a, b)) = l.contiguous_offsets() else {
        bail!("{what}: expected a contiguous tensor")
    };
    Ok(s.as_cuda_slice::<f32>()?.slice(a..b))
}

/// The f32 contents of a contiguous CUDA storage, mutable.
pub fn view_mut<'a>(
    s: &'a mut CudaStorage,
    l: &Layout,
    what: &str,
) -> Result<CudaViewMut<'a, f32>> {
    let Some((a, b)) = l.contiguous_offsets() else {
        bail!("{what}: expected a contiguous tensor")
    };
    Ok(s.as_cuda_slice_mut::<f32>()?.slice_mut(a..b))
}

/// One block of [`THREADS`] per item.
pub fn per_block(items: usize) -> Result<LaunchConfig> {
    let Ok(blocks) = u32::try_from(items) else {
        bail!("cuda kernel: {items} blocks exceed the grid limit")
    };
    Ok(LaunchConfig {
        grid_dim: (blocks.max(1), 1, 1),
        block_dim: (THREADS, 1, 1),
        shared_mem_bytes: 0,
    })
}

/// A grid-stride launch over `total` elements.
pub fn elementwise(total: usize) -> LaunchConfig {
    let blocks = total.div_ceil(THREADS as usize).clamp(1, 65_535) as u32;
    LaunchConfig {
        grid_dim: (blocks, 1, 1),
        block_dim: (THREADS, 1, 1),
        shared_mem_bytes: 0,
    }
}

/// `v` as the kernels' `int`, or an error naming `what`.
pub fn int(v: usize, what: &str) -> Result<i32> {
    i32::try_from(v).or_else(|_| bail!("cuda kernel: {what} = {v} does not fit an i32"))
}

/// `v` as the kernels' `long long` element counts.
pub(crate) fn long(v: usize) -> Result<i64> {
    i64::try_from(v).or_else(|_| bail!("cuda kernel: {v} elements do not fit an i64"))
}

/// A read-only CUDA operand.
pub(crate) type In<'a> = (&'a CudaStorage, &'a Layout);
/// A CUDA operand updated in place.
pub(crate) type Out<'a> = (&'a mut CudaStorage, &'a Layout);
