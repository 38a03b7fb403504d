//! Typed kernel launches: each CUDA kernel's parameter list is declared once, in Rust, with
//! [`kernel!`] beside the op that launches it. The declaration gives
//!
//! - a [`Signature`] (always compiled), which the op module's tests compare with the kernel's
//!   `extern "C" __global__` line in `kernels/<file>.cu`, so a parameter added, dropped,
//!   reordered or retyped on either side fails `cargo test` on any machine, GPU or not;
//! - with the `cuda` feature, an `unsafe fn` whose parameters have the Rust types of those C
//!   parameters (`const float*` takes `&CudaView<f32>`, `float*` a fresh `&CudaSlice<f32>` or an
//!   in-place `&mut CudaViewMut<f32>`, `int` `&i32`, `long long` `&i64`, `size_t` `&usize`,
//!   `float` `&f32`), so a call site that passes the wrong kind of argument does not compile.
//!
//! What stays the caller's obligation (hence `unsafe fn`): every buffer is at least as long as
//! the sizes passed make the kernel index.
//!
//! The signatures are data for the tests; outside them nothing reads them.
#![cfg_attr(not(test), allow(dead_code))]

/// One parameter of a kernel, by the C type its `.cu` file declares.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Param {
    /// `const float*`: read.
    In,
    /// `float*`: a fresh output buffer.
    Out,
    /// `float*`: a buffer updated in place.
    InOut,
    /// `size_t`.
    Size,
    /// `int`.
    Int,
    /// `long long`.
    Long,
    /// `float`.
    Float,
}

impl Param {
    /// The C type of this parameter, as written in the kernels (spacing normalised).
    pub(crate) fn c_type(self) -> &'static str {
        match self {
            Param::In => "const float*",
            Param::Out | Param::InOut => "float*",
            Param::Size => "size_t",
            Param::Int => "int",
            Param::Long => "long long",
            Param::Float => "float",
        }
    }
}

/// A kernel: its name, its source (`kernels/<file>.cu`) and its parameters in order.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Signature {
    /// The `extern "C"` name.
    pub name: &'static str,
    /// The source file's stem (also its PTX module, see `cuda::ptx!`).
    pub file: &'static str,
    /// The parameters.
    pub params: &'static [Param],
}

/// The Rust argument type of a [`Param`].
#[cfg(feature = "cuda")]
macro_rules! arg_type {
    (In) => { &candle_core::cuda_backend::cudarc::driver::CudaView<'_, f32> };
    (Out) => { &candle_core::cuda_backend::cudarc::driver::CudaSlice<f32> };
    (InOut) => { &mut candle_core::cuda_backend::cudarc::driver::CudaViewMut<'_, f32> };
    (Size) => { &usize };
    (Int) => { &i32 };
    (Long) => { &i64 };
    (Float) => { &f32 };
}
#[cfg(feature = "cuda")]
pub(crate) use arg_type;

/// Declares a kernel: `kernel!(SIG, launch_fn = "c_name" in "file" (arg: Param, …));` gives the
/// constant `SIG` (a [`Signature`]) and, with the `cuda` feature, `unsafe fn launch_fn(dev, cfg,
/// args…)` (see the module docs).
macro_rules! kernel {
    ($sig:ident, $launch:ident = $name:literal in $file:literal ($($arg:ident: $p:ident),+ $(,)?);) => {
        #[cfg_attr(not(test), allow(dead_code))]
        pub(crate) const $sig: $crate::abi::Signature = $crate::abi::Signature {
            name: $name,
            file: $file,
            params: &[$($crate::abi::Param::$p),+],
        };

        /// Launches the kernel of this module's signature of the same name, with typed arguments.
        ///
        /// # Safety
        ///
        /// Every buffer must be at least as long as the sizes passed make the kernel index.
        #[cfg(feature = "cuda")]
        #[allow(unsafe_code, clippy::too_many_arguments)]
        pub(crate) unsafe fn $launch(
            dev: &candle_core::cuda_backend::CudaDevice,
            cfg: $crate::cuda::LaunchConfig,
            $($arg: $crate::abi::arg_type!($p)),+
        ) -> candle_core::Result<()> {
            // SAFETY: the argument types are the kernel's (checked against the `.cu` by the
            // signature test); buffer lengths are the caller's obligation, stated above.
            unsafe {
                $crate::cuda::launch!(dev, $crate::cuda::ptx!($file), $name, cfg; $($arg),+)
            };
            Ok(())
        }
    };
}
pub(crate) use kernel;

/// The text of `kernels/<file>.cu`.
#[cfg(test)]
fn source(file: &str) -> &'static str {
    match file {
        "norm" => include_str!("../kernels/norm.cu"),
        "bias" => include_str!("../kernels/bias.cu"),
        "resample" => include_str!("../kernels/resample.cu"),
        "step" => include_str!("../kernels/step.cu"),
        "noise" => include_str!("../kernels/noise.cu"),
        "optim" => include_str!("../kernels/optim.cu"),
        other => panic!("no kernels/{other}.cu"),
    }
}

/// The parameter types of kernel `name` in `src` (the `extern "C" __global__ void name(…)`
/// line), each with its parameter name dropped and its spacing normalised.
#[cfg(test)]
fn c_params(src: &str, name: &str) -> Option<Vec<String>> {
    let head = format!("__global__ void {name}(");
    let start = src.find(&head)? + head.len();
    let end = start + src[start..].find(')')?;
    src[start..end]
        .split(',')
        .map(|p| {
            let p = p.split_whitespace().collect::<Vec<_>>().join(" ");
            // Drop the parameter's name: the last identifier.
            let cut = p.rfind(|c: char| !(c.is_alphanumeric() || c == '_'))?;
            Some(p[..=cut].trim().replace(" *", "*"))
        })
        .collect()
}

/// Checks each of `sigs` against its `.cu`: same kernel name, same parameter types in order.
#[cfg(test)]
pub(crate) fn check(sigs: &[Signature]) {
    for s in sigs {
        let src = source(s.file);
        let got = c_params(src, s.name)
            .unwrap_or_else(|| panic!("kernels/{}.cu has no kernel {}", s.file, s.name));
        let want: Vec<&str> = s.params.iter().map(|p| p.c_type()).collect();
        assert_eq!(
            got, want,
            "{} in kernels/{}.cu: the .cu's parameters (left) differ from the Rust declaration",
            s.name, s.file
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn c_parameter_lists_are_read_as_declared() {
        let src = "extern \"C\" __global__ void k(const float* x, float *y,\n    long long n,\
                   size_t t, int c, float eps) {";
        let got = c_params(src, "k").unwrap_or_default();
        assert_eq!(
            got,
            [
                "const float*",
                "float*",
                "long long",
                "size_t",
                "int",
                "float"
            ]
        );
        assert!(c_params(src, "missing").is_none());
    }

    #[test]
    #[should_panic(expected = "differ from the Rust declaration")]
    fn a_mismatched_declaration_fails() {
        check(&[Signature {
            name: "ddpm_ema",
            file: "optim",
            params: &[Param::InOut, Param::In, Param::Int, Param::Float],
        }]);
    }
}
