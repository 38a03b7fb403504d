//! Run-time instruction-set dispatch for the element-wise loops of our CPU kernels.
//!
//! The workspace compiles for baseline x86-64, so the loops the compiler vectorises run four
//! lanes wide (SSE2) without fused multiply-add: our GroupNorm forward ran at 2.5× PyTorch's
//! time. [`simd_fn!`] compiles a function's body three times (for AVX-512, for AVX2 + FMA and
//! for the baseline) and calls the best version this CPU supports, as the `gemm` crate does
//! for its matrix kernels. Binaries stay portable; nothing needs `-C target-cpu`.
#![allow(unsafe_code)]

/// What this CPU supports: 2 for AVX-512 (F, BW, VL, DQ) with AVX2 and FMA, 1 for AVX2 with
/// FMA, 0 otherwise (and on other architectures). Detected once.
#[inline]
#[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))] // dispatch is x86-64 only
pub(crate) fn level() -> u8 {
    #[cfg(target_arch = "x86_64")]
    {
        use std::sync::atomic::{AtomicU8, Ordering};
        static LEVEL: AtomicU8 = AtomicU8::new(u8::MAX);
        let cached = LEVEL.load(Ordering::Relaxed);
        if cached != u8::MAX {
            return cached;
        }
        let avx2 = is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma");
        let avx512 = avx2
            && is_x86_feature_detected!("avx512f")
            && is_x86_feature_detected!("avx512bw")
            && is_x86_feature_detected!("avx512vl")
            && is_x86_feature_detected!("avx512dq");
        let l = if avx512 { 2 } else { u8::from(avx2) };
        LEVEL.store(l, Ordering::Relaxed);
        l
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        0
    }
}

/// Defines a function whose body is compiled for AVX-512, AVX2 + FMA and the baseline, and
/// which runs the best of the three that [`level`] allows. Arguments are plain `name: Type`
/// pairs; const generic parameters are allowed.
macro_rules! simd_fn {
    (
        $(#[$meta:meta])*
        $vis:vis fn $name:ident $(< $(const $cn:ident : $ct:ty),+ >)?
            ( $($arg:ident : $aty:ty),* $(,)? ) $(-> $ret:ty)? $body:block
    ) => {
        $(#[$meta])*
        #[allow(unsafe_code)]
        $vis fn $name $(< $(const $cn: $ct),+ >)? ( $($arg: $aty),* ) $(-> $ret)? {
            #[inline(always)]
            fn imp $(< $(const $cn: $ct),+ >)? ( $($arg: $aty),* ) $(-> $ret)? $body
            #[cfg(target_arch = "x86_64")]
            {
                #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512dq,avx2,fma")]
                fn v4 $(< $(const $cn: $ct),+ >)? ( $($arg: $aty),* ) $(-> $ret)? {
                    imp $(::< $($cn),+ >)? ( $($arg),* )
                }
                #[target_feature(enable = "avx2,fma")]
                fn v3 $(< $(const $cn: $ct),+ >)? ( $($arg: $aty),* ) $(-> $ret)? {
                    imp $(::< $($cn),+ >)? ( $($arg),* )
                }
                match $crate::nn::simd::level() {
                    // SAFETY: `level` reported these target features present on this CPU.
                    2 => return unsafe { v4 $(::< $($cn),+ >)? ( $($arg),* ) },
                    // SAFETY: as above.
                    1 => return unsafe { v3 $(::< $($cn),+ >)? ( $($arg),* ) },
                    _ => {}
                }
            }
            imp $(::< $($cn),+ >)? ( $($arg),* )
        }
    };
}
pub(crate) use simd_fn;

#[cfg(test)]
mod tests {
    simd_fn! {
        /// Σ x·y in 16 lanes.
        fn dot(x: &[f32], y: &[f32]) -> f32 {
            let mut acc = [0f32; 16];
            for (xs, ys) in x.chunks_exact(16).zip(y.chunks_exact(16)) {
                for i in 0..16 {
                    acc[i] += xs[i] * ys[i];
                }
            }
            acc.iter().sum()
        }
    }

    simd_fn! {
        fn scaled<const NEG: bool>(v: f32) -> f32 {
            if NEG { -2.0 * v } else { 2.0 * v }
        }
    }

    #[test]
    fn dispatched_bodies_compute_the_same() {
        let x: Vec<f32> = (0..64).map(|i| i as f32).collect();
        assert_eq!(dot(&x, &x), (0..64).map(|i| (i * i) as f32).sum::<f32>());
        assert_eq!(scaled::<true>(1.5), -3.0);
        assert_eq!(scaled::<false>(1.5), 3.0);
        assert!(super::level() <= 2);
    }
}
