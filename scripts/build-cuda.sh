#!/usr/bin/env bash
# Builds the CUDA binary (and the CUDA parity-test binaries) on a machine without a GPU and packs
# them for the GPU machine:
#
#   scripts/build-cuda.sh            # -> target/cuda/release/blockformer, .gpu/*.xz
#
# Clean build: about 10 minutes on 2 cores (most of it nvcc compiling candle's kernels), then
# incremental. The default CPU build (target/) is untouched.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/cuda-sdk.sh
export CARGO_TARGET_DIR=target/cuda
cargo build --release --features cuda --bin blockformer
# Test binary: the fixture parity and tensor-path tests (tests/device.rs), run on the GPU by
# scripts/gpu-check.sh with BLOCKFORMER_TEST_DEVICE=cuda.
cargo test --release --features cuda --no-run --test device \
  --message-format=json 2>/dev/null \
  | python3 -c 'import json,sys
for l in sys.stdin:
    m=json.loads(l)
    if m.get("reason")=="compiler-artifact" and m.get("executable") and m["target"]["kind"]==["test"]:
        print(m["target"]["name"], m["executable"])' >target/cuda/test-binaries.txt
rm -rf .gpu
mkdir -p .gpu
xz -T2 -c target/cuda/release/blockformer >.gpu/blockformer.xz
while read -r name exe; do xz -T2 -c "$exe" >".gpu/test-$name.xz"; done <target/cuda/test-binaries.txt
ls -l .gpu
