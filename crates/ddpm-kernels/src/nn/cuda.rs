//! The `cuda_fwd` halves of the custom ops: launches of the kernels in ddpm-kernels'
//! `kernels/unet.cu`, which its `build.rs` compiles to PTX with nvcc. Each kernel mirrors the CPU
//! loop of the same op, and `tests/cuda.rs` compares the two on a GPU under
//! [`super::Kernels::Fused`].
//!
//! Kernel launches are foreign calls, so this module allows `unsafe`: each launch passes device
//! buffers whose lengths the caller checked against the shapes the kernel indexes with.
#![allow(unsafe_code)]

use crate::cuda::launch;
use crate::cuda::{elementwise, int, per_block, view, UNET};
use candle_core::backend::BackendStorage;
use candle_core::{bail, CudaStorage, Layout, Result};

/// GroupNorm's sizes as the kernels' `int`s: `[n, c, groups, s]`.
fn gn_dims(n: usize, c: usize, groups: usize, s: usize) -> Result<[i32; 4]> {
    Ok([
        int(n, "n")?,
        int(c, "c")?,
        int(groups, "groups")?,
        int(s, "s")?,
    ])
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
    let [ni, ci, gi, si] = gn_dims(n, c, groups, s)?;
    let silu = i32::from(silu);
    // SAFETY: argument types and order match `ddpm_gn_fwd`; lengths checked above.
    unsafe {
        launch!(dev, UNET, "ddpm_gn_fwd", per_block(n * groups)?;
        &xv, &gv, &y, &ni, &ci, &gi, &si, &eps, &silu)
    };
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
    let [ni, ci, gi, si] = gn_dims(n, c, groups, s)?;
    let silu = i32::from(silu);
    // SAFETY: argument types and order match `ddpm_gn_bwd`; lengths checked above.
    unsafe {
        launch!(dev, UNET, "ddpm_gn_bwd", per_block(n * groups)?;
        &xv, &gv, &dv, &out, &ni, &ci, &gi, &si, &eps, &silu)
    };
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
    // SAFETY: argument types and order match `ddpm_add_bias`; lengths checked above.
    unsafe {
        launch!(dev, UNET, "ddpm_add_bias", elementwise(total);
        &xv, &bv, &y, &total, &ci, &si, &ps)
    };
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
    // SAFETY: argument types and order match `ddpm_sum_planes`; lengths checked above.
    unsafe {
        launch!(dev, UNET, "ddpm_sum_planes", per_block(n * c)?; &gv, &out, &pi, &ci, &si, &ps)
    };
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
    // SAFETY: argument types and order match both kernels; lengths checked above.
    unsafe {
        if up {
            launch!(dev, UNET, "ddpm_upsample2x", elementwise(total); &xv, &y, &total, &hi, &wi)
        } else {
            launch!(dev, UNET, "ddpm_sum_blocks2x", elementwise(total); &xv, &y, &total, &hi, &wi)
        }
    }
    Ok(CudaStorage::wrap_cuda_slice(y, dev))
}
