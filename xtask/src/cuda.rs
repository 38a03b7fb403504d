//! `cargo xtask build-cuda`: the CUDA build of the CLI (and, on request, of the CUDA tests),
//! on a machine with or without a CUDA toolkit, packed for a GPU machine that has no Rust
//! toolchain.

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{bail, Context, Result};

const USAGE: &str = "usage: cargo xtask build-cuda [--cudnn] [--tests] [--pack DIR] [--venv DIR]

Builds target/cuda/release/ddpm with `--features cuda` (`cudnn` with --cudnn) in its own
target folder, so CPU builds stay valid. When `nvcc` is not on PATH, first sources
xtask/cuda-env.sh, which installs the pinned PyPI CUDA 13.0 wheels (and cuDNN with --cudnn)
into --venv (default ~/.cache/ddpm-cuda-venv) with a stub libcuda for linking; the first
build takes about 20 minutes on 2 cores (candle's kernels), later ones a few.
--tests   also builds the CUDA tests of ddpm-unet and ddpm-kernels (tests/cuda.rs) and packs them;
--pack DIR  writes stripped, gzipped copies there (ddpm.gz, cuda-*.gz) plus check.sh (every
          CUDA test and the GPU benchmarks in one run: `bash DIR/check.sh RESULTS`) and run.sh, which
          sets the loader path to the PyTorch CUDA wheels and unpacks them on the GPU machine.
A machine with a normal CUDA install needs none of this: cargo build --release --features cuda.";

struct Opts {
    cudnn: bool,
    tests: bool,
    pack: Option<PathBuf>,
    venv: Option<String>,
}

fn parse(args: &[String]) -> Result<Opts> {
    let mut o = Opts {
        cudnn: false,
        tests: false,
        pack: None,
        venv: None,
    };
    let mut it = args.iter();
    while let Some(a) = it.next() {
        match a.as_str() {
            "--cudnn" => o.cudnn = true,
            "--tests" => o.tests = true,
            "--pack" => o.pack = Some(it.next().context("--pack needs a folder")?.into()),
            "--venv" => o.venv = Some(it.next().context("--venv needs a folder")?.clone()),
            "-h" | "--help" => {
                println!("{USAGE}");
                std::process::exit(0);
            }
            other => bail!("unknown option `{other}`\n\n{USAGE}"),
        }
    }
    Ok(o)
}

/// Single-quotes `s` for bash.
fn quote(s: &str) -> String {
    format!("'{}'", s.replace('\'', r"'\''"))
}

/// Runs `cargo <args>` through bash, after sourcing the CUDA environment when nvcc is missing.
fn cargo_in_cuda_env(o: &Opts, args: &[&str]) -> Result<String> {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let mut script = String::from("set -e\n");
    script.push_str("if ! command -v nvcc >/dev/null; then\n");
    if o.cudnn {
        script.push_str("  export DDPM_CUDNN=1\n");
    }
    script.push_str(&format!(
        "  source xtask/cuda-env.sh {}\nfi\n",
        o.venv.as_deref().map(quote).unwrap_or_default()
    ));
    let quoted: Vec<String> = args.iter().map(|a| quote(a)).collect();
    script.push_str(&format!("{} {}\n", quote(&cargo), quoted.join(" ")));
    let mut cmd = Command::new("bash");
    cmd.args(["-c", &script]);
    eprintln!("xtask build-cuda: {}", script.replace('\n', "; "));
    let out = cmd
        .stderr(std::process::Stdio::inherit())
        .output()
        .context("failed to start bash")?;
    if !out.status.success() {
        bail!(
            "the CUDA build failed ({}); see the messages above. Without nvcc, xtask/cuda-env.sh \
             needs pip access to PyPI; with a CUDA install, check that nvcc is on PATH",
            out.status
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

fn gzip_into(src: &Path, dir: &Path) -> Result<PathBuf> {
    let name = src
        .file_name()
        .context("binary without a file name")?
        .to_string_lossy()
        .into_owned();
    let dst = dir.join(format!("{name}.gz"));
    // Debug info is most of the size: strip a copy (when `strip` exists), then gzip it.
    let status = Command::new("bash")
        .args([
            "-c",
            &format!(
                "set -e; t=$(mktemp); (strip -o \"$t\" {src} 2>/dev/null || cp {src} \"$t\"); \
                 gzip -c \"$t\" > {dst}; rm -f \"$t\"",
                src = quote(&src.to_string_lossy()),
                dst = quote(&dst.to_string_lossy())
            ),
        ])
        .status()
        .context("failed to start gzip")?;
    if !status.success() {
        bail!("gzip {} failed", src.display());
    }
    Ok(dst)
}

/// One verification run of a packed build on a GPU machine: every CUDA test, then the
/// measurements that decide whether `Kernels::CudaOps` becomes the CUDA default, with the PyTorch
/// reference when the repository's bench/torch_reference.py is at hand.
const CHECK_SH: &str = r#"#!/usr/bin/env bash
# Usage: bash check.sh [RESULTS_DIR]   (default: $OUT, else /tmp/ddpm-check); about 5 minutes.
# Writes gpu.txt, tests.txt (both tests/cuda.rs), bench.jsonl (one JSON line per measurement,
# ours and PyTorch's, with the peak GPU memory nvidia-smi saw; last, the GPU's f32 GEMM rate for
# MFU) and bench.err. Exit status 1 when a CUDA test failed.
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
source "$here/run.sh" >/dev/null
out=${1:-${OUT:-/tmp/ddpm-check}}
mkdir -p "$out"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv > "$out/gpu.txt" 2>&1
status=0
for t in /tmp/ddpm-cuda/cuda-*; do
  echo "== $t" >> "$out/tests.txt"
  timeout 300 "$t" --nocapture >> "$out/tests.txt" 2>&1 || status=1
done
ddpm=/tmp/ddpm-cuda/ddpm
# Runs one benchmark; prints {"peak_gpu_mib": <max nvidia-smi memory.used while it ran>,
# "result": <its JSON line>} (null where either is missing).
measure() {
  nvidia-smi --query-gpu=memory.used --format=csv,noheader,nounits -lms 100 > "$out/mem.tmp" 2>/dev/null &
  local mon=$! line peak
  line=$(timeout 180 "$@" | tail -1)
  kill $mon 2>/dev/null; wait $mon 2>/dev/null
  peak=$(sort -n "$out/mem.tmp" 2>/dev/null | tail -1)
  echo "{\"peak_gpu_mib\": ${peak:-null}, \"result\": ${line:-null}}"
}
{
  for k in fast cuda-ops "cuda-ops --autocast bf16"; do
    measure $ddpm bench --device cuda --mode train --model mnist --kernels $k --iters 20 --warmup 5
  done
  measure $ddpm bench --device cuda --mode kernels --model mnist --iters 20
  for k in fast cuda-ops "cuda-ops --autocast bf16"; do
    measure $ddpm bench --device cuda --mode sample --model mnist -b 1000 --steps 50 --iters 1 --warmup 1 --kernels $k
  done
  if [ -f bench/torch_reference.py ]; then
    cfg=$($ddpm bench --mode config --model mnist)
    ref="python3 bench/torch_reference.py --device cuda"
    measure $ref --config "$cfg" --mode train --batch 128 --iters 20 --warmup 5
    measure $ref --config "$cfg" --mode train --batch 128 --iters 20 --warmup 5 --autocast bf16
    measure $ref --config "$cfg" --mode sample --batch 1000 --steps 50 --iters 1 --warmup 1
  fi
  $ddpm bench --device cuda --mode gemm
} > "$out/bench.jsonl" 2> "$out/bench.err"
echo "CUDA tests: $([ $status = 0 ] && echo passed || echo FAILED, see $out/tests.txt); results in $out"
exit $status
"#;

/// The script that runs a packed build on a GPU machine.
const RUN_SH: &str = r#"#!/usr/bin/env bash
# Unpacks the gzipped CUDA binaries next to this script into /tmp/ddpm-cuda and puts the CUDA
# libraries of the machine's PyTorch wheels (cuBLAS, cuRAND, cuDNN, ...) on the loader path.
# Usage: source run.sh; then /tmp/ddpm-cuda/ddpm ... (tests: /tmp/ddpm-cuda/<test> --nocapture)
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
mkdir -p /tmp/ddpm-cuda
for f in "$here"/*.gz; do
  b=$(basename "$f" .gz); gunzip -c "$f" > /tmp/ddpm-cuda/$b && chmod +x /tmp/ddpm-cuda/$b
done
libs=$(python3 - <<'EOF'
import os, importlib
out = []
for mod, sub in (("nvidia", "cu13/lib"), ("nvidia.cudnn", "lib")):
    try:
        m = importlib.import_module(mod)
        out.append(os.path.join(list(m.__path__)[0], sub))
    except Exception:
        pass
print(":".join(out))
EOF
)
export LD_LIBRARY_PATH=$libs${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}
echo "ddpm CUDA binaries in /tmp/ddpm-cuda; LD_LIBRARY_PATH=$LD_LIBRARY_PATH"
"#;

/// Runs `cargo xtask build-cuda`.
pub fn build_cuda(args: &[String]) -> Result<()> {
    let o = parse(args)?;
    let feature = if o.cudnn { "cudnn" } else { "cuda" };
    cargo_in_cuda_env(
        &o,
        &[
            "build",
            "--release",
            "-p",
            "ddpm-cli",
            "--features",
            feature,
            "--target-dir",
            "target/cuda",
        ],
    )?;
    let mut outputs = vec![PathBuf::from("target/cuda/release/ddpm")];
    if o.tests {
        let listing = cargo_in_cuda_env(
            &o,
            &[
                "test",
                "--release",
                "-p",
                "ddpm-unet",
                "-p",
                "ddpm-kernels",
                "--features",
                "ddpm-unet/cuda,ddpm-kernels/cuda",
                "--target-dir",
                "target/cuda",
                "--no-run",
                "--message-format",
                "json",
            ],
        )?;
        for line in listing.lines() {
            let Ok(v) = serde_json::from_str::<serde_json::Value>(line) else {
                continue;
            };
            // Only the two tests/cuda.rs: the other tests are CPU tests that CI runs anyway.
            if v["profile"]["test"].as_bool() == Some(true) && v["target"]["name"] == "cuda" {
                if let Some(exe) = v["executable"].as_str() {
                    outputs.push(PathBuf::from(exe));
                }
            }
        }
    }
    for p in &outputs {
        eprintln!("xtask build-cuda: built {}", p.display());
    }
    if let Some(dir) = &o.pack {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        for p in &outputs {
            let gz = gzip_into(p, dir)?;
            eprintln!("xtask build-cuda: packed {}", gz.display());
        }
        for (name, text) in [("run.sh", RUN_SH), ("check.sh", CHECK_SH)] {
            let path = dir.join(name);
            std::fs::write(&path, text).with_context(|| format!("writing {}", path.display()))?;
        }
        eprintln!(
            "xtask build-cuda: copy {} to the GPU machine, then `source {}/run.sh`",
            dir.display(),
            dir.display()
        );
    }
    Ok(())
}
