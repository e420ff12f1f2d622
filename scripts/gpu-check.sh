#!/usr/bin/env bash
# The GPU check, one script (about 8 minutes at most: every part has its own time limit and the
# whole run a deadline). Run on the GPU machine from the repository root, with .gpu/ made by
# scripts/build-cuda.sh on a build machine:
#
#   OUT=/some/dir scripts/gpu-check.sh
#
# 1. a smoke run (also warms the driver's PTX cache), 2. tests/device.rs on CUDA (fixture parity
# in float32 and bfloat16, the official generate cases, tensor path = host engine, training),
# 3. the paper's Table 1 settings for block_main_b4_1.2b vs vanilla_410 and block_main_b4_85 vs
# vanilla_160 (random weights, bf16, batch auto-tuned to GPU memory), with the roofline bound.
# Progress lines (one per run, with its tokens/s) are kept even when a part runs out of time.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-target/gpu-check}
DEADLINE=$((SECONDS + ${GPU_CHECK_SECONDS:-450}))
left() { local l=$((DEADLINE - SECONDS)); if [ "$l" -lt "$1" ]; then echo "$l"; else echo "$1"; fi; }
mkdir -p "$OUT"
for f in .gpu/*.xz; do
  xz -dc "$f" >"${f%.xz}" && chmod +x "${f%.xz}"
done
# CUDA 13 runtime libraries from the machine's PyTorch wheels (or a CUDA install); libcuda from
# the driver.
LIB=$(python3 -c 'import nvidia, os; print(os.path.join(list(nvidia.__path__)[0], "cu13", "lib"))' 2>/dev/null)
if [ ! -e "$LIB/libcublas.so.13" ]; then
  LIB=$(dirname "$(find /opt /usr/local /usr/lib -name 'libcublas.so.13' 2>/dev/null | head -1)")
fi
export LD_LIBRARY_PATH="${LIB}:/usr/local/nvidia/lib64:/usr/local/nvidia/lib:/usr/local/cuda/lib64:${LD_LIBRARY_PATH:-}"
export BLOCKFORMER_FIXTURES="$PWD/tests/fixtures/official"
B=.gpu/blockformer
{
  nvidia-smi --query-gpu=name,memory.total,memory.used,driver_version,clocks.sm,clocks.max.sm --format=csv
  echo "libraries from: $LIB"
  ldd "$B" | grep -E "cuda|cublas|curand|not found"
  nproc
} 2>&1 | tee "$OUT/gpu.txt"

echo "== smoke"
timeout "$(left 90)" "$B" generate --preset block_main_b4_5 --random-prompt-len 16 --max-new-tokens 8 \
  --device cuda --ignore-eos 2>&1 | tail -3 | tee -a "$OUT/gpu.txt"

echo "== q8_0 on CUDA (candle's quantized matmul on every decoder layer and the LM head)"
timeout "$(left 90)" "$B" generate --preset block_main_b4_5 --random-prompt-len 16 --max-new-tokens 8 \
  --device cuda --dtype f32 --quantize q8_0 --ignore-eos 2>&1 | tail -3 | tee -a "$OUT/gpu.txt"

echo "== tests/device.rs on CUDA"
BLOCKFORMER_TEST_DEVICE=cuda timeout "$(left 130)" .gpu/test-device --nocapture --test-threads 1 2>&1 \
  | tee "$OUT/tests.log" | grep -vE "^\s+[0-9]+: |^\s+at " | tail -40

echo "== Table 1 settings"
# Prefill-heavy runs are short: one warm-up first. Decode-heavy runs are long (the smoke run has
# already compiled the kernels): timed directly.
for pair in "block_main_b4_1.2b vanilla_410" "block_main_b4_85 vanilla_160"; do
  for s in prefill-heavy decode-heavy; do
    set -- $pair
    w=1
    [ "$s" = decode-heavy ] && w=0
    log="$OUT/bench-$1-$s.txt"
    args=(bench --device cuda --dtype bf16 --compare "$1" "$2" --setting "$s" --max-batch 512
      --runs 1 --warmup "$w")
    timeout "$(left 150)" "$B" "${args[@]}" >"$log" 2>&1
    rc=$?
    if [ $rc -ne 0 ] && grep -qi "out of memory" "$log"; then
      echo "(out of GPU memory at the default budget: again at 70%)" | tee -a "$log"
      timeout "$(left 120)" "$B" "${args[@]}" --memory-budget 70% >>"$log" 2>&1
      rc=$?
    fi
    echo "exit $rc" >>"$log"
    grep -vE "^\s+[0-9]+: |^\s+at " "$log" | tail -14
  done
done
echo "== where the device time goes (time split synchronised with the device)"
for m in block_main_b4_1.2b vanilla_410; do
  timeout "$(left 60)" "$B" bench --device cuda --dtype bf16 --preset "$m" --setting custom \
    --prompt-len 2048 --new-tokens 32 --batch-size 128 --runs 1 --warmup 0 --sync-split \
    >"$OUT/split-$m.txt" 2>&1
  echo "exit $?" >>"$OUT/split-$m.txt"
  grep -A4 "^model  .*embedder" "$OUT/split-$m.txt"
done
nvidia-smi --query-gpu=memory.used,clocks.sm --format=csv | tee -a "$OUT/gpu.txt"
