//! Shared pieces of the CPU halves of custom ops (this crate's and ddpm-unet's): contiguous
//! f32 access and a parallel element loop.

use candle_core::backend::BackendStorage;
use candle_core::{bail, CpuStorage, Layout, Result};
use rayon::prelude::*;

/// Elements per parallel task: below this a loop runs on the calling thread.
pub const CHUNK: usize = 1 << 15;

/// The f32 elements of a contiguous CPU storage, or an error naming `what`.
pub fn slice<'a>(s: &'a CpuStorage, l: &Layout, what: &str) -> Result<&'a [f32]> {
    let CpuStorage::F32(v) = s else {
        bail!("{what}: expected f32, got {:?}", s.dtype())
    };
    let Some((a, b)) = l.contiguous_offsets() else {
        bail!("{what}: expected a contiguous tensor")
    };
    Ok(&v[a..b])
}

/// The f32 elements of a contiguous CPU storage, mutable.
pub fn slice_mut<'a>(s: &'a mut CpuStorage, l: &Layout, what: &str) -> Result<&'a mut [f32]> {
    let dtype = s.dtype();
    let CpuStorage::F32(v) = s else {
        bail!("{what}: expected f32, got {dtype:?}")
    };
    let Some((a, b)) = l.contiguous_offsets() else {
        bail!("{what}: expected a contiguous tensor")
    };
    Ok(&mut v[a..b])
}

/// Runs `f(start, chunk)` over `out` in chunks of [`CHUNK`], in parallel when there are several.
pub fn for_chunks(out: &mut [f32], f: impl Fn(usize, &mut [f32]) + Sync) {
    if out.len() <= CHUNK {
        f(0, out);
    } else {
        out.par_chunks_mut(CHUNK)
            .enumerate()
            .for_each(|(i, c)| f(i * CHUNK, c));
    }
}
