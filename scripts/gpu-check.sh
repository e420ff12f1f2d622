#!/usr/bin/env bash
# The GPU check, one script. Run on the GPU machine from the repository root, with .gpu/ made by
# scripts/build-cuda.sh on a build machine:
#
#   OUT=/some/dir [GPU_CHECK_SECONDS=450] [GPU_CHECK_PARTS="smoke tests table1 split q8"] \
#     scripts/gpu-check.sh
#
# Parts, in this order (GPU_CHECK_PARTS picks some): smoke (a generate run; it also fills the
# driver's PTX cache), tests (tests/device.rs on CUDA: fixture parity in float32 and bfloat16,
# the official generate cases, tensor path = host engine, training), table1 (the paper's Table 1
# settings, one bench run per model and setting: block_main_b4_1.2b and vanilla_410, then
# block_main_b4_85 and vanilla_160; random weights, bf16, batch auto-tuned to GPU memory, with
# the roofline bound), split (a device-time split of a short run of each large model), q8 (a
# q8_0 generate). Every part and run has its own time limit and the whole check a deadline
# (GPU_CHECK_SECONDS); each bench run's progress lines (one per run, with its tokens/s) are
# kept even when it runs out of time.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-target/gpu-check}
PARTS=" ${GPU_CHECK_PARTS:-smoke tests table1 split q8} "
DEADLINE=$((SECONDS + ${GPU_CHECK_SECONDS:-450}))
left() { local l=$((DEADLINE - SECONDS)); if [ "$l" -lt "$1" ]; then echo "$l"; else echo "$1"; fi; }
want() { [[ "$PARTS" == *" $1 "* ]]; }
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

if want smoke; then
  echo "== smoke"
  timeout "$(left 90)" "$B" generate --preset block_main_b4_5 --random-prompt-len 16 \
    --max-new-tokens 8 --device cuda --ignore-eos 2>&1 | tail -3 | tee -a "$OUT/gpu.txt"
fi

if want tests; then
  echo "== tests/device.rs on CUDA"
  BLOCKFORMER_TEST_DEVICE=cuda timeout "$(left 120)" .gpu/test-device --nocapture --test-threads 1 \
    2>&1 | tee "$OUT/tests.log" | grep -vE "^\s+[0-9]+: |^\s+at " | tail -30
fi

# One Table 1 run: bench MODEL SETTING LIMIT. Prefill-heavy runs are short: one warm-up first.
# Decode-heavy runs are long (the smoke run has compiled the kernels): timed directly.
table1_run() {
  local m=$1 s=$2 limit=$3 w=1
  [ "$s" = decode-heavy ] && w=0
  local log="$OUT/table1.txt"
  local args=(bench --device cuda --dtype bf16 --preset "$m" --setting "$s" --max-batch 512
    --runs 1 --warmup "$w")
  echo "-- $m $s" >>"$log"
  timeout "$(left "$limit")" "$B" "${args[@]}" >>"$log" 2>&1
  local rc=$?
  if [ $rc -ne 0 ] && tail -5 "$log" | grep -qi "out of memory"; then
    echo "(out of GPU memory at the default budget: again at 70%)" >>"$log"
    timeout "$(left "$limit")" "$B" "${args[@]}" --memory-budget 70% >>"$log" 2>&1
    rc=$?
  fi
  echo "exit $rc" >>"$log"
  echo "-- $m $s: exit $rc"
  sed -n '/^-- '"$m $s"'$/,$p' "$log" | grep -E "tokens/s|^model|^$m|error" | tail -6
}
if want table1; then
  echo "== Table 1 settings"
  for pair in "block_main_b4_1.2b vanilla_410" "block_main_b4_85 vanilla_160"; do
    for s in prefill-heavy decode-heavy; do
      for m in $pair; do
        table1_run "$m" "$s" "${TABLE1_LIMIT:-75}"
      done
    done
  done
fi

if want split; then
  echo "== where the device time goes (time split synchronised with the device)"
  for m in block_main_b4_1.2b vanilla_410; do
    timeout "$(left 45)" "$B" bench --device cuda --dtype bf16 --preset "$m" --setting custom \
      --prompt-len 2048 --new-tokens 32 --batch-size 128 --runs 1 --warmup 0 --sync-split \
      >"$OUT/split-$m.txt" 2>&1
    echo "exit $?" >>"$OUT/split-$m.txt"
    grep -A4 "^model  .*embedder" "$OUT/split-$m.txt"
  done
fi

if want q8; then
  echo "== q8_0 on CUDA (candle's quantized matmul on every decoder layer and the LM head)"
  timeout "$(left 60)" "$B" generate --preset block_main_b4_5 --random-prompt-len 16 \
    --max-new-tokens 8 --device cuda --dtype f32 --quantize q8_0 --ignore-eos 2>&1 | tail -3 \
    | tee -a "$OUT/gpu.txt"
fi
nvidia-smi --query-gpu=memory.used,clocks.sm --format=csv | tee -a "$OUT/gpu.txt"
echo "check done in $SECONDS s"
