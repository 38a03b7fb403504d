//! Output vectors that the kernels write in full, allocated without the zero fill that
//! `vec![0.0; n]` does: on a multi-megabyte activation that fill is a serial pass over memory
//! on the calling thread before the parallel kernel starts (about 5 % of a CPU training step).
#![allow(unsafe_code)]

use std::mem::{ManuallyDrop, MaybeUninit};

use candle_core::{bail, Result};

/// One output element before the kernel writes it.
pub(crate) type Slot = MaybeUninit<f32>;

/// Whether to pre-fill with [`SENTINEL`] and check that every element was written: in this
/// crate's unit tests, in builds with debug assertions, and with the `check-uninit` feature,
/// which the workspace's test builds turn on through their dev-dependencies (ddpm-kernels' and
/// ddpm-unet's), so every test that reaches a kernel runs the check
/// (`crates/ddpm-unet/tests/ops.rs`, `a_kernel_that_skips_an_element_fails_the_tests`, proves it).
pub(crate) const CHECK: bool = cfg!(any(test, debug_assertions, feature = "check-uninit"));

#[cfg(feature = "check-uninit")]
thread_local! {
    static SKIP: std::cell::Cell<Option<&'static str>> = const { std::cell::Cell::new(None) };
}

/// Makes the next buffer named `what` that [`filled`] returns on this thread lose one written
/// element, as a kernel that skipped it would: the test of the check itself.
#[cfg(feature = "check-uninit")]
pub fn skip_one_write_of(what: &'static str) {
    SKIP.with(|s| s.set(Some(what)));
}

/// A signalling-NaN payload that arithmetic never produces (it only yields quiet NaNs).
const SENTINEL: u32 = 0x7f80_dead;

/// Runs `fill` over a fresh `len`-long buffer and returns the buffer as a vector.
///
/// When checking is on, an element left unwritten is reported as an error naming `what`.
///
/// # Safety
///
/// `fill` must write every element of the buffer (each kernel here writes each output exactly
/// once). Without checking, an element it skips is returned uninitialised.
pub(crate) unsafe fn filled(
    len: usize,
    what: &str,
    fill: impl FnOnce(&mut [Slot]) -> Result<()>,
) -> Result<Vec<f32>> {
    let mut v: Vec<Slot> = Vec::with_capacity(len);
    if CHECK {
        v.resize(len, MaybeUninit::new(f32::from_bits(SENTINEL)));
    } else {
        v.resize_with(len, MaybeUninit::uninit);
    }
    fill(&mut v)?;
    #[cfg(feature = "check-uninit")]
    if SKIP.with(|s| s.get()) == Some(what) && len > 0 {
        SKIP.with(|s| s.set(None));
        v[len / 2] = MaybeUninit::new(f32::from_bits(SENTINEL));
    }
    if CHECK {
        if let Some(i) = v.iter().position(|x| {
            // SAFETY: with checking on, every element was initialised by the `resize` above.
            unsafe { x.assume_init() }.to_bits() == SENTINEL
        }) {
            bail!("{what}: kernel left output element {i} of {len} unwritten")
        }
    }
    let mut v = ManuallyDrop::new(v);
    // SAFETY: `fill` wrote every element (the contract above; checked where `CHECK` is on: the
    // workspace's tests and debug builds), `MaybeUninit<f32>` has the layout of `f32`, and the pointer, length and capacity
    // come from a vector of the same layout whose ownership `ManuallyDrop` hands over.
    Ok(unsafe { Vec::from_raw_parts(v.as_mut_ptr().cast::<f32>(), v.len(), v.capacity()) })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn returns_what_was_written_and_catches_gaps() {
        // SAFETY: writes every element.
        let v = unsafe {
            filled(5, "test", |s| {
                for (i, x) in s.iter_mut().enumerate() {
                    *x = MaybeUninit::new(i as f32);
                }
                Ok(())
            })
        }
        .unwrap();
        assert_eq!(v, [0.0, 1.0, 2.0, 3.0, 4.0]);
        // SAFETY: leaves element 1 unwritten on purpose; tests check every element first, so
        // this returns an error and never an uninitialised element.
        let err = unsafe {
            filled(3, "gappy op", |s| {
                s[0] = MaybeUninit::new(1.0);
                s[2] = MaybeUninit::new(1.0);
                Ok(())
            })
        }
        .unwrap_err();
        assert!(err.to_string().contains("gappy op") && err.to_string().contains("element 1"));
        // SAFETY: an empty buffer has nothing to write.
        assert!(unsafe { filled(0, "empty", |_| Ok(())) }
            .unwrap()
            .is_empty());
    }
}
