#!/usr/bin/env bash
# Assembles a CUDA 13.0 build kit (nvcc, headers, link libraries) from the PyPI wheels, so that
# `cargo build --features cuda` works on a machine with no GPU, no driver and no toolkit.
#
#   source scripts/cuda-sdk.sh [DIR]        # DIR defaults to target/cuda-sdk
#
# Pinned to CUDA 13.0: candle's kernels are embedded as PTX that the GPU driver compiles at run
# time, and a 580-series driver (CUDA 13.0) rejects PTX from a newer nvcc; binaries are linked
# BIND_NOW, so a driver symbol newer than 13.0 would also stop them at load time.
# libcuda.so belongs to the driver and is in no wheel: a stub whose every entry point returns
# CUDA_ERROR_NO_DEVICE is generated for linking (and for running here, which then fails cleanly).
set -e
SDK=${1:-${CUDA_SDK_DIR:-target/cuda-sdk}}
mkdir -p "$SDK"
SDK=$(cd "$SDK" && pwd)
if [ ! -x "$SDK/bin/nvcc" ] || [ ! -e "$SDK/lib/stubs/libcuda.so.1" ]; then
  WHL="$SDK/.whl"
  mkdir -p "$WHL"
  python3 -m pip download -q --no-deps --only-binary=:all: -d "$WHL" \
    nvidia-cuda-nvcc==13.0.88 nvidia-cuda-crt==13.0.88 nvidia-nvvm==13.0.88 \
    nvidia-cuda-runtime==13.0.96 nvidia-cuda-cccl==13.0.85 \
    nvidia-cuda-nvrtc==13.0.88 nvidia-cublas==13.0.2.14 nvidia-curand==10.4.0.35
  T=$(mktemp -d)
  for w in "$WHL"/*.whl; do python3 -m zipfile -e "$w" "$T"; done
  cp -a "$T"/nvidia/cu13/. "$SDK"/
  rm -rf "$T" "$WHL"
  chmod +x "$SDK"/bin/* "$SDK"/nvvm/bin/*
  # nvcc.profile looks for $TOP/targets/x86_64-linux/{include,lib}.
  mkdir -p "$SDK/targets/x86_64-linux"
  ln -sfn ../../include "$SDK/targets/x86_64-linux/include"
  ln -sfn ../../lib "$SDK/targets/x86_64-linux/lib"
  ln -sfn lib "$SDK/lib64"
  # The wheels ship versioned sonames only; the linker wants lib*.so.
  for l in cudart.so.13 cublas.so.13 cublasLt.so.13 curand.so.10 nvrtc.so.13; do
    ln -sfn "lib$l" "$SDK/lib/lib${l%.so.*}.so"
  done
  # Driver API stub: every cu* name the 13.0 cuda.h declares returns 100 (no device).
  mkdir -p "$SDK/lib/stubs"
  gcc -E -P -x c "$SDK/include/cuda.h" | grep -oE '\bcu[A-Z][A-Za-z0-9_]*\s*\(' \
    | sed -E 's/\s*\($//' | sort -u \
    | awk '{print "int " $1 "(void) { return 100; }"}' >"$SDK/lib/stubs/cuda-stub.c"
  gcc -shared -fPIC -Wl,-soname,libcuda.so.1 -o "$SDK/lib/stubs/libcuda.so" "$SDK/lib/stubs/cuda-stub.c"
  ln -sfn libcuda.so "$SDK/lib/stubs/libcuda.so.1"
fi
export CUDA_HOME="$SDK" CUDA_PATH="$SDK"
export PATH="$SDK/bin:$PATH"
export CUDARC_CUDA_VERSION=13000                # cudarc: pin the 13.0 bindings, skip `nvcc --version`
export CUDA_COMPUTE_CAP=${CUDA_COMPUTE_CAP:-90} # H100/H200 (built as sm_90a); no GPU here to ask
set +e
