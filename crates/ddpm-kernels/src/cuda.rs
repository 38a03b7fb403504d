//! The CUDA side: the PTX that `build.rs` compiled from `kernels/*.cu`, launch helpers (used by
//! ddpm-unet's ops too) and the launches of this crate's fused ops.
//!
//! Kernel launches are foreign calls, so this module allows `unsafe`: each launch passes device
//! buffers whose lengths the caller checked against the sizes the kernel indexes with.
#![allow(unsafe_code)]

use candle_core::backend::BackendStorage;
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

/// `kernels/unet.cu`: GroupNorm(+shift+SiLU) forward/backward, bias add and its gradient,
/// ×2 upsampling and its adjoint (launched by ddpm-unet's ops).
pub const UNET: Ptx = Ptx {
    module: "ddpm_unet_ops",
    source: include_str!(concat!(env!("OUT_DIR"), "/unet.ptx")),
};

/// `kernels/fused.cu`: this crate's fused element-wise ops.
pub const FUSED: Ptx = Ptx {
    module: "ddpm_fused",
    source: include_str!(concat!(env!("OUT_DIR"), "/fused.ptx")),
};

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
fn long(v: usize) -> Result<i64> {
    i64::try_from(v).or_else(|_| bail!("cuda kernel: {v} elements do not fit an i64"))
}

type In<'a> = (&'a CudaStorage, &'a Layout);
type Out<'a> = (&'a mut CudaStorage, &'a Layout);

/// The fused reverse step: `[x_prev ‖ x̂₀]` (2n floats).
#[allow(clippy::too_many_arguments)]
pub(crate) fn reverse_step(
    x: In<'_>,
    eps: In<'_>,
    extra: In<'_>,
    n: usize,
    guided: bool,
    w: f32,
    (sqrt_ac, sqrt_one_minus_ac): (f32, f32),
    clip: bool,
    [c_x0, c_eps, c_x, c_extra]: [f32; 4],
) -> Result<CudaStorage> {
    let dev = x.0.device().clone();
    let xv = view(x.0, x.1, "reverse_step x_t")?;
    let ev = view(eps.0, eps.1, "reverse_step ε")?;
    let zv = view(extra.0, extra.1, "reverse_step extra")?;
    let want_e = if guided { 2 * n } else { n };
    if xv.len() != n || ev.len() != want_e || zv.len() != n {
        bail!("reverse_step (cuda): buffers do not match {n} elements")
    }
    // SAFETY: the grid-stride loop writes all 2n elements.
    let out = unsafe { dev.alloc::<f32>(2 * n)? };
    let (nl, gi, ci) = (long(n)?, i32::from(guided), i32::from(clip));
    // SAFETY: arguments match `ddpm_reverse_step`; x, extra hold n and eps 2n (guided) or n.
    unsafe {
        launch!(dev, FUSED, "ddpm_reverse_step", elementwise(n);
        &xv, &ev, &zv, &out, &nl, &gi, &w, &sqrt_ac, &sqrt_one_minus_ac, &ci,
        &c_x0, &c_eps, &c_x, &c_extra)
    };
    Ok(CudaStorage::wrap_cuda_slice(out, dev))
}

/// x_t from x0, noise and `[B, 2]` per-sample coefficients.
pub(crate) fn add_noise(
    x0: In<'_>,
    noise: In<'_>,
    coef: In<'_>,
    n: usize,
    per_sample: usize,
) -> Result<CudaStorage> {
    let dev = x0.0.device().clone();
    let xv = view(x0.0, x0.1, "add_noise x0")?;
    let nv = view(noise.0, noise.1, "add_noise noise")?;
    let cv = view(coef.0, coef.1, "add_noise coefficients")?;
    let ps = per_sample.max(1);
    if xv.len() != n || nv.len() != n || cv.len() != 2 * n.div_ceil(ps) {
        bail!("add_noise (cuda): buffers do not match {n} elements")
    }
    // SAFETY: the grid-stride loop writes all n elements.
    let out = unsafe { dev.alloc::<f32>(n)? };
    let (nl, pl) = (long(n)?, long(ps)?);
    // SAFETY: arguments match `ddpm_add_noise`; coef holds 2 per sample of `ps` elements.
    unsafe { launch!(dev, FUSED, "ddpm_add_noise", elementwise(n); &xv, &nv, &cv, &out, &nl, &pl) };
    Ok(CudaStorage::wrap_cuda_slice(out, dev))
}

/// AdamW moments in place (`mv` = [m ‖ v]).
pub(crate) fn adam_moments(
    mv: Out<'_>,
    g: In<'_>,
    beta1: f32,
    beta2: f32,
    grad_scale: f32,
) -> Result<()> {
    let dev = mv.0.device().clone();
    let gv = view(g.0, g.1, "adam_moments gradient")?;
    let n = gv.len();
    let mut mvv = view_mut(mv.0, mv.1, "adam_moments moments")?;
    if mvv.len() != 2 * n {
        bail!(
            "adam_moments (cuda): {} moments for {n} gradients",
            mvv.len()
        )
    }
    let nl = long(n)?;
    // SAFETY: arguments match `ddpm_adam_moments`; mv holds 2n and g n elements.
    unsafe {
        launch!(dev, FUSED, "ddpm_adam_moments", elementwise(n);
        &mut mvv, &gv, &nl, &beta1, &beta2, &grad_scale)
    };
    Ok(())
}

/// AdamW weight update in place, `p` = [lr, 1/bc₁, 1/bc₂, ε, decay].
pub(crate) fn adamw_apply(w: Out<'_>, mv: In<'_>, p: [f32; 5]) -> Result<()> {
    let dev = w.0.device().clone();
    let mvv = view(mv.0, mv.1, "adamw_apply moments")?;
    let mut wv = view_mut(w.0, w.1, "adamw_apply weights")?;
    let n = wv.len();
    if mvv.len() != 2 * n {
        bail!("adamw_apply (cuda): {} moments for {n} weights", mvv.len())
    }
    let nl = long(n)?;
    let [lr, inv_bc1, inv_bc2, eps, decay] = p;
    // SAFETY: arguments match `ddpm_adamw_apply`; w holds n and mv 2n elements.
    unsafe {
        launch!(dev, FUSED, "ddpm_adamw_apply", elementwise(n);
        &mut wv, &mvv, &nl, &lr, &inv_bc1, &inv_bc2, &eps, &decay)
    };
    Ok(())
}

/// EMA in place.
pub(crate) fn ema(avg: Out<'_>, w: In<'_>, d: f32) -> Result<()> {
    let dev = avg.0.device().clone();
    let wv = view(w.0, w.1, "ema_update weights")?;
    let mut av = view_mut(avg.0, avg.1, "ema_update average")?;
    let n = wv.len();
    if av.len() != n {
        bail!("ema_update (cuda): {} averages for {n} weights", av.len())
    }
    let nl = long(n)?;
    // SAFETY: arguments match `ddpm_ema`; both buffers hold n elements.
    unsafe { launch!(dev, FUSED, "ddpm_ema", elementwise(n); &mut av, &wv, &nl, &d) };
    Ok(())
}
