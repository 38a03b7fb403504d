//! With the `cuda` feature, compiles every `kernels/*.cu` to `$OUT_DIR/<name>.ptx` with nvcc (as
//! candle-kernels does for candle's own kernels); `src/cuda.rs` embeds the results. Without the
//! feature it does nothing, so CPU builds never need nvcc.

fn main() {
    println!("cargo::rerun-if-changed=build.rs");
    #[cfg(feature = "cuda")]
    if let Err(e) = cuda::compile_all() {
        eprintln!("ddpm-kernels: {e}");
        std::process::exit(1);
    }
}

#[cfg(feature = "cuda")]
mod cuda {
    use std::path::{Path, PathBuf};
    use std::process::Command;

    /// The CUDA sources, one per op (or group of an op's kernels), each its own PTX module.
    const SOURCES: [&str; 6] = ["norm", "bias", "resample", "step", "noise", "optim"];

    pub fn compile_all() -> Result<(), String> {
        for var in ["NVCC", "CUDA_HOME", "CUDA_PATH", "CUDA_COMPUTE_CAP"] {
            println!("cargo::rerun-if-env-changed={var}");
        }
        let out_dir = PathBuf::from(std::env::var("OUT_DIR").map_err(|e| format!("OUT_DIR: {e}"))?);
        let nvcc = nvcc();
        // PTX for the virtual architecture: the driver JIT-compiles it for newer GPUs too.
        let cap = std::env::var("CUDA_COMPUTE_CAP")
            .ok()
            .map(|c| c.trim().trim_end_matches(['a', 'f']).to_string())
            .filter(|c| !c.is_empty() && c.chars().all(|ch| ch.is_ascii_digit()))
            .unwrap_or_else(|| "70".into());
        println!("cargo::rerun-if-changed=kernels/common.cuh");
        for name in SOURCES {
            let src = format!("kernels/{name}.cu");
            println!("cargo::rerun-if-changed={src}");
            compile(&nvcc, &cap, &src, &out_dir.join(format!("{name}.ptx")))?;
        }
        Ok(())
    }

    fn nvcc() -> PathBuf {
        std::env::var("NVCC")
            .ok()
            .map(PathBuf::from)
            .unwrap_or_else(|| {
                ["CUDA_HOME", "CUDA_PATH"]
                    .iter()
                    .filter_map(|v| std::env::var(v).ok())
                    .map(|home| PathBuf::from(home).join("bin/nvcc"))
                    .find(|p| p.exists())
                    .unwrap_or_else(|| PathBuf::from("nvcc"))
            })
    }

    fn compile(nvcc: &Path, cap: &str, src: &str, out: &Path) -> Result<(), String> {
        let status = Command::new(nvcc)
            .args(["--ptx", "-O3", "-std=c++17"])
            .arg(format!("-arch=compute_{cap}"))
            .arg(src)
            .arg("-o")
            .arg(out)
            .status()
            .map_err(|e| {
                format!(
                    "cannot run {} ({e}): the `cuda` feature needs the CUDA toolkit's nvcc \
                     (set NVCC or CUDA_HOME, or see docs/cuda.md for `cargo xtask build-cuda`)",
                    nvcc.display()
                )
            })?;
        if !status.success() {
            return Err(format!("{} failed on {src} ({status})", nvcc.display()));
        }
        Ok(())
    }
}
