#!/usr/bin/env bash
# Makes a CUDA 13.0 build environment on a machine with no GPU and no CUDA install, from PyPI wheels
# pinned to what the GPU machines' PyTorch (cu130) ships, so a binary built here links against the very
# libraries found there. Usage:
#   source xtask/cuda-env.sh [VENV_DIR]   (cargo xtask build-cuda does this for you)     (default: $HOME/.cache/ddpm-cuda-venv)
# then: cargo build --release --features cuda
# What it sets: PATH (nvcc), CUDA_HOME, CUDA_COMPUTE_CAP=90 (H100/H200), CUDARC_CUDA_VERSION=13000,
# and CUDNN_LIB when cuDNN was installed (DDPM_CUDNN=1).
# A binary built so needs libcuda.so.1 (the NVIDIA driver) at run time; on this machine only a stub is
# there, so run CUDA code on the GPU machine.
venv=${1:-$HOME/.cache/ddpm-cuda-venv}
py=${PYTHON:-python3}
if [ ! -x "$venv/bin/nvcc-ready" ]; then
  "$py" -m venv "$venv" || return 1 2>/dev/null || exit 1
  "$venv/bin/pip" install -q --upgrade pip
  "$venv/bin/pip" install -q \
    nvidia-cuda-nvcc==13.0.88 nvidia-cuda-crt==13.0.88 nvidia-nvvm==13.0.88 nvidia-cuda-cccl==13.0.85 \
    nvidia-cuda-runtime==13.0.96 nvidia-cublas==13.1.0.3 nvidia-cuda-nvrtc==13.0.88 \
    nvidia-curand==10.4.0.35 || { echo "setup-cuda-env: pip install failed" >&2; return 1 2>/dev/null || exit 1; }
  n=$(ls -d "$venv"/lib/python3*/site-packages/nvidia/cu13 | head -1)
  # The wheels ship only versioned sonames: add the unversioned names the linker looks for.
  (cd "$n/lib" && for l in cublas cublasLt curand nvrtc cudart; do
     f=$(ls lib$l.so.* 2>/dev/null | grep -v alt | head -1); [ -n "$f" ] && ln -sf "$f" lib$l.so; done)
  # No libcuda on PyPI: a stub with every driver symbol cudarc binds, each returning CUDA_ERROR_NO_DEVICE.
  syms=$(ls -d "$HOME"/.cargo/registry/src/*/cudarc-0.19.*/src/driver/sys/mod.rs 2>/dev/null | head -1)
  if [ -z "$syms" ]; then
    echo "setup-cuda-env: cudarc 0.19 source not found; run 'cargo fetch' in the workspace first" >&2
    return 1 2>/dev/null || exit 1
  fi
  mkdir -p "$n/lib/stubs"
  grep -oE '^pub unsafe fn (cu[A-Za-z0-9_]+)\(' "$syms" | sed -E 's/pub unsafe fn (.*)\(/\1/' | sort -u \
    | awk '{print "int " $1 "(void){return 100;}"}' > "$n/lib/stubs/cuda_stub.c"
  gcc -shared -fPIC -Wl,-soname,libcuda.so.1 -o "$n/lib/stubs/libcuda.so" "$n/lib/stubs/cuda_stub.c" || return 1 2>/dev/null || exit 1
  ln -sf libcuda.so "$n/lib/stubs/libcuda.so.1"
  touch "$venv/bin/nvcc-ready"; chmod +x "$venv/bin/nvcc-ready"
fi
# cuDNN (for the `cudnn` feature), only when asked: DDPM_CUDNN=1 source …
if [ "${DDPM_CUDNN:-0}" = 1 ] && [ ! -e "$venv/bin/cudnn-ready" ]; then
  "$venv/bin/pip" install -q nvidia-cudnn-cu13==9.19.0.56 || { echo "setup-cuda-env: cudnn install failed" >&2; return 1 2>/dev/null || exit 1; }
  c=$(ls -d "$venv"/lib/python3*/site-packages/nvidia/cudnn | head -1)
  ln -sf libcudnn.so.9 "$c/lib/libcudnn.so"
  touch "$venv/bin/cudnn-ready"
fi
c=$(ls -d "$venv"/lib/python3*/site-packages/nvidia/cudnn 2>/dev/null | head -1)
[ -n "$c" ] && export CUDNN_LIB="$c"
n=$(ls -d "$venv"/lib/python3*/site-packages/nvidia/cu13 | head -1)
export PATH="$n/bin:$PATH" CUDA_HOME="$n" CUDA_COMPUTE_CAP=${CUDA_COMPUTE_CAP:-90} CUDARC_CUDA_VERSION=13000
echo "CUDA build env: $(nvcc --version | tail -1)  CUDA_HOME=$CUDA_HOME  CUDA_COMPUTE_CAP=$CUDA_COMPUTE_CAP"
