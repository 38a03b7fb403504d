//! The `cuda_fwd` halves of the custom ops: launches of the kernels in `kernels/ops.cu`, which
//! `build.rs` compiles to PTX with nvcc. Each kernel mirrors the CPU loop of the same op, and
//! `tests/cuda.rs` compares the two on a GPU under [`super::Kernels::Fused`].
//!
//! Kernel launches are foreign calls, so this module allows `unsafe`: each launch passes device
//! buffers whose lengths the caller checked against the shapes the kernel indexes with.
#![allow(unsafe_code)]

use candle_core::backend::BackendStorage;
use candle_core::cuda_backend::cudarc::driver::{CudaView, LaunchConfig, PushKernelArg};
use candle_core::cuda_backend::WrapErr;
use candle_core::{bail, CudaStorage, Layout, Result};

const PTX: &str = include_str!(concat!(env!("OUT_DIR"), "/ops.ptx"));
const MODULE: &str = "ddpm_unet_ops";
const THREADS: u32 = 256;

/// The f32 contents of a contiguous CUDA storage, or an error naming `what`.
fn view<'a>(s: &'a CudaStorage, l: &Layout, what: &str) -> Result<CudaView<'a, f32>> {
    let Some((a, b)) = l.contiguous_offsets() else {
        bail!("{what}: expected a contiguous tensor")
    };
    Ok(s.as_cuda_slice::<f32>()?.slice(a..b))
}

/// One block of [`THREADS`] per item.
fn per_block(items: usize) -> Result<LaunchConfig> {
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
fn elementwise(total: usize) -> LaunchConfig {
    let blocks = total.div_ceil(THREADS as usize).clamp(1, 65_535) as u32;
    LaunchConfig {
        grid_dim: (blocks, 1, 1),
        block_dim: (THREADS, 1, 1),
        shared_mem_bytes: 0,
    }
}

fn int(v: usize, what: &str) -> Result<i32> {
    i32::try_from(v).or_else(|_| bail!("cuda kernel: {what} = {v} does not fit an i32"))
}

/// GroupNorm forward over `x [n, c, s]` with packed `[γ ‖ β ‖ shift]`.
#[allow(clippy::too_many_arguments)]
pub(crate) fn group_norm_fwd(
    x: &CudaStorage,
    lx: &Layout,
    gb: &CudaStorage,
    lg: &Layout,
    (n, c, s): (usize, usize, usize),
    groups: usize,
    eps: f32,
    silu: bool,
) -> Result<CudaStorage> {
    let dev = x.device().clone();
    let (xv, gv) = (
        view(x, lx, "group_norm input")?,
        view(gb, lg, "group_norm affine")?,
    );
    if xv.len() != n * c * s || gv.len() != 2 * c + n * c {
        bail!("group_norm (cuda): buffers do not match [{n}, {c}, {s}]")
    }
    // SAFETY: the kernel writes every element (each (sample, group) block covers its slice).
    let y = unsafe { dev.alloc::<f32>(n * c * s)? };
    let (ni, ci, gi, si) = (
        int(n, "n")?,
        int(c, "c")?,
        int(groups, "groups")?,
        int(s, "s")?,
    );
    let silu = i32::from(silu);
    let func = dev.get_or_load_custom_func("ddpm_gn_fwd", MODULE, PTX)?;
    let mut b = func.builder();
    b.arg(&xv)
        .arg(&gv)
        .arg(&y)
        .arg(&ni)
        .arg(&ci)
        .arg(&gi)
        .arg(&si)
        .arg(&eps)
        .arg(&silu);
    // SAFETY: argument types and order match `ddpm_gn_fwd`; lengths checked above.
    unsafe { b.launch(per_block(n * groups)?) }.w()?;
    Ok(CudaStorage::wrap_cuda_slice(y, dev))
}

/// GroupNorm backward: `[dx ‖ dγ ‖ dβ ‖ dshift]` from `x`, the packed parameters and `dy`.
#[allow(clippy::too_many_arguments)]
pub(crate) fn group_norm_bwd(
    x: &CudaStorage,
    lx: &Layout,
    gb: &CudaStorage,
    lg: &Layout,
    dy: &CudaStorage,
    ld: &Layout,
    (n, c, s): (usize, usize, usize),
    groups: usize,
    eps: f32,
    silu: bool,
) -> Result<CudaStorage> {
    let dev = x.device().clone();
    let xv = view(x, lx, "group_norm input")?;
    let gv = view(gb, lg, "group_norm affine")?;
    let dv = view(dy, ld, "group_norm gradient")?;
    if xv.len() != n * c * s || dv.len() != n * c * s || gv.len() != 2 * c + n * c {
        bail!("group_norm backward (cuda): buffers do not match [{n}, {c}, {s}]")
    }
    let out = dev.alloc_zeros::<f32>(n * c * s + 2 * c + n * c)?;
    let (ni, ci, gi, si) = (
        int(n, "n")?,
        int(c, "c")?,
        int(groups, "groups")?,
        int(s, "s")?,
    );
    let silu = i32::from(silu);
    let func = dev.get_or_load_custom_func("ddpm_gn_bwd", MODULE, PTX)?;
    let mut b = func.builder();
    b.arg(&xv).arg(&gv).arg(&dv).arg(&out);
    b.arg(&ni).arg(&ci).arg(&gi).arg(&si).arg(&eps).arg(&silu);
    // SAFETY: argument types and order match `ddpm_gn_bwd`; lengths checked above.
    unsafe { b.launch(per_block(n * groups)?) }.w()?;
    Ok(CudaStorage::wrap_cuda_slice(out, dev))
}

/// `x [n, c, s] + b`, `b` of `[c]` or (per sample) `[n, c]`.
pub(crate) fn add_bias(
    x: &CudaStorage,
    lx: &Layout,
    bias: &CudaStorage,
    lb: &Layout,
    (n, c, s): (usize, usize, usize),
    per_sample: bool,
) -> Result<CudaStorage> {
    let dev = x.device().clone();
    let (xv, bv) = (
        view(x, lx, "add_bias input")?,
        view(bias, lb, "add_bias bias")?,
    );
    let want = if per_sample { n * c } else { c };
    if xv.len() != n * c * s || bv.len() != want {
        bail!("add_bias (cuda): buffers do not match [{n}, {c}, {s}]")
    }
    let total = n * c * s;
    // SAFETY: the grid-stride loop writes every element.
    let y = unsafe { dev.alloc::<f32>(total)? };
    let (ci, si, ps) = (int(c, "c")?, int(s.max(1), "s")?, i32::from(per_sample));
    let func = dev.get_or_load_custom_func("ddpm_add_bias", MODULE, PTX)?;
    let mut b = func.builder();
    b.arg(&xv)
        .arg(&bv)
        .arg(&y)
        .arg(&total)
        .arg(&ci)
        .arg(&si)
        .arg(&ps);
    // SAFETY: argument types and order match `ddpm_add_bias`; lengths checked above.
    unsafe { b.launch(elementwise(total)) }.w()?;
    Ok(CudaStorage::wrap_cuda_slice(y, dev))
}

/// Per-plane sums of `g [n, c, s]`: `[n, c]`, or summed over `n` to `[c]`.
pub(crate) fn sum_planes(
    g: &CudaStorage,
    lg: &Layout,
    (n, c, s): (usize, usize, usize),
    per_sample: bool,
) -> Result<CudaStorage> {
    let dev = g.device().clone();
    let gv = view(g, lg, "bias gradient")?;
    if gv.len() != n * c * s {
        bail!("bias gradient (cuda): buffer does not match [{n}, {c}, {s}]")
    }
    let out = dev.alloc_zeros::<f32>(if per_sample { n * c } else { c })?;
    let (pi, ci, si, ps) = (
        int(n * c, "planes")?,
        int(c, "c")?,
        int(s, "s")?,
        i32::from(per_sample),
    );
    let func = dev.get_or_load_custom_func("ddpm_sum_planes", MODULE, PTX)?;
    let mut b = func.builder();
    b.arg(&gv).arg(&out).arg(&pi).arg(&ci).arg(&si).arg(&ps);
    // SAFETY: argument types and order match `ddpm_sum_planes`; lengths checked above.
    unsafe { b.launch(per_block(n * c)?) }.w()?;
    Ok(CudaStorage::wrap_cuda_slice(out, dev))
}

/// Nearest ×2 upsampling of `planes` planes of `h × w` (`up`), or its adjoint, the 2×2 block sums
/// of `planes` planes of `2h × 2w` (`!up`).
pub(crate) fn resample2x(
    x: &CudaStorage,
    lx: &Layout,
    planes: usize,
    (h, w): (usize, usize),
    up: bool,
) -> Result<CudaStorage> {
    let dev = x.device().clone();
    let xv = view(x, lx, "upsample")?;
    let (inp, outp) = if up {
        (h * w, 4 * h * w)
    } else {
        (4 * h * w, h * w)
    };
    if xv.len() != planes * inp {
        bail!("upsample (cuda): buffer does not match {planes} planes of {h}x{w}")
    }
    let total = planes * outp;
    // SAFETY: the grid-stride loop writes every element.
    let y = unsafe { dev.alloc::<f32>(total)? };
    let (hi, wi) = (int(h, "h")?, int(w, "w")?);
    let name = if up {
        "ddpm_upsample2x"
    } else {
        "ddpm_sum_blocks2x"
    };
    let func = dev.get_or_load_custom_func(name, MODULE, PTX)?;
    let mut b = func.builder();
    b.arg(&xv).arg(&y).arg(&total).arg(&hi).arg(&wi);
    // SAFETY: argument types and order match the kernel; lengths checked above.
    unsafe { b.launch(elementwise(total)) }.w()?;
    Ok(CudaStorage::wrap_cuda_slice(y, dev))
}
