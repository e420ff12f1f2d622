#!/usr/bin/env bash
# The GPU check, one script (at most 9 minutes: every part has its own time limit). Run on the GPU
# machine from the repository root, with .gpu/ made by scripts/build-cuda.sh on a build machine:
#
#   OUT=/some/dir scripts/gpu-check.sh
#
# 1. a smoke run (also warms the driver's PTX cache), 2. tests/device.rs on CUDA (fixture parity
# in float32 and bfloat16, the official generate cases, tensor path = host engine, training),
# 3. the paper's Table 1 settings for block_main_b4_85 vs vanilla_160 and block_main_b4_1.2b vs
# vanilla_410 (random weights, bf16, batch auto-tuned to GPU memory), with the roofline bound.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-target/gpu-check}
mkdir -p "$OUT"
for f in .gpu/*.xz; do
  xz -dc "$f" >"${f%.xz}" && chmod +x "${f%.xz}"
done
# CUDA 13 runtime libraries from the machine's PyTorch wheels; libcuda from the driver.
LIB=$(python3 -c 'import nvidia, os; print(os.path.join(list(nvidia.__path__)[0], "cu13", "lib"))' 2>/dev/null)
export LD_LIBRARY_PATH="${LIB}:/usr/local/nvidia/lib64:/usr/local/nvidia/lib:${LD_LIBRARY_PATH:-}"
export BLOCKFORMER_FIXTURES="$PWD/tests/fixtures/official"
B=.gpu/blockformer
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"
ldd "$B" | grep -E "cuda|cublas|curand" | tee -a "$OUT/gpu.txt"

echo "== smoke"
timeout 90 "$B" generate --preset block_main_b4_5 --random-prompt-len 16 --max-new-tokens 8 \
  --device cuda --ignore-eos 2>&1 | tail -3 | tee "$OUT/smoke.log"

echo "== tests/device.rs on CUDA"
BLOCKFORMER_TEST_DEVICE=cuda timeout 150 .gpu/test-device --nocapture --test-threads 1 2>&1 \
  | tee "$OUT/tests.log" | grep -vE "^\s+[0-9]+: |^\s+at " | tail -40

echo "== Table 1 settings"
for pair in "block_main_b4_85 vanilla_160" "block_main_b4_1.2b vanilla_410"; do
  set -- $pair
  timeout 150 "$B" bench --device cuda --dtype bf16 --compare "$1" "$2" --max-batch 512 \
    --runs 1 --warmup 0 --chart "$OUT/bench-$1.svg" 2>&1 | tee "$OUT/bench-$1.txt" | tail -30
done
