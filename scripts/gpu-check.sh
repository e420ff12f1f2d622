#!/usr/bin/env bash
# The GPU check, one script. Run on the GPU machine from the repository root, with .gpu/ made by
# scripts/build-cuda.sh on a build machine:
#
#   OUT=/some/dir [GPU_CHECK_SECONDS=450] [GPU_CHECK_PARTS="smoke tests table1 profile q8"] \
#     scripts/gpu-check.sh
#
# Parts, in this order (GPU_CHECK_PARTS picks some): smoke (a generate run; it also fills the
# driver's PTX cache), tests (tests/device.rs on CUDA: fixture parity in float32 and bfloat16,
# the official generate cases, tensor path = host engine, the attention kernels against their
# composed twins, training), table1 (the paper's Table 1 settings, one bench run per model and
# setting, TABLE1_RUNS: block_main_b4_1.2b and vanilla_410, then block_main_b4_85 and
# vanilla_160; random weights, bf16, batch auto-tuned to GPU memory, with the roofline bound;
# BLOCKFORMER_POOL_KERNELS=0 runs them on the kernels' composed twins), profile (device time
# per section of the decoder layers, BLOCKFORMER_PROFILE, for prefill- and decode-dominated runs
# of the two large models), q8 (a q8_0 generate). Every part and run has its own time limit and
# the whole check a deadline (GPU_CHECK_SECONDS); each bench run's progress lines (one per run,
# with its tokens/s) are kept even when it runs out of time.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-target/gpu-check}
PARTS=" ${GPU_CHECK_PARTS:-smoke tests table1 profile q8} "
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

# The fused QKV rotary kernel is opt-in until checked here: on for the tests and the runs after
# them, off again if the tests fail.
export BLOCKFORMER_QKV_ROTARY=1
if want tests; then
  echo "== tests/device.rs on CUDA"
  BLOCKFORMER_TEST_DEVICE=cuda timeout "$(left 120)" .gpu/test-device --nocapture --test-threads 1 \
    2>&1 | tee "$OUT/tests.log" | grep -vE "^\s+[0-9]+: |^\s+at " | tail -30
  if ! grep -q "^test result: ok" "$OUT/tests.log"; then
    echo "(tests/device.rs did not pass: the runs below use the composed twins of the kernels)"
    export BLOCKFORMER_POOL_KERNELS=0 BLOCKFORMER_QKV_ROTARY=0
  fi
fi

# One Table 1 run: table1_run MODEL SETTING WARMUP LIMIT (seconds).
table1_run() {
  local m=$1 s=$2 w=$3 limit=$4
  local log="$OUT/table1.txt"
  local args=(bench --device cuda --dtype bf16 --preset "$m" --setting "$s"
    --max-batch "${TABLE1_MAX_BATCH:-512}" --runs 1 --warmup "$w")
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
# The runs, most wanted first: the 1.2B block model and the 410M vanilla one, then the 85M/160M
# pair. Prefill-heavy block runs are short and get one warm-up; the others are timed directly
# (the smoke run has compiled the kernels).
TABLE1_RUNS=${TABLE1_RUNS:-"block_main_b4_1.2b:prefill-heavy:1:60 vanilla_410:decode-heavy:0:120
  block_main_b4_1.2b:decode-heavy:0:90 vanilla_410:prefill-heavy:0:60
  block_main_b4_85:prefill-heavy:1:40 vanilla_160:prefill-heavy:0:60
  block_main_b4_85:decode-heavy:0:60 vanilla_160:decode-heavy:0:90"}
if want table1; then
  echo "== Table 1 settings"
  for r in $TABLE1_RUNS; do
    IFS=: read -r m s w limit <<<"$r"
    table1_run "$m" "$s" "$w" "$limit"
  done
fi

if want profile; then
  echo "== where the device time goes (BLOCKFORMER_PROFILE: each section timed between waits)"
  for r in vanilla_410:2048:8:64 vanilla_410:1024:64:256 block_main_b4_1.2b:2048:8:256 \
    block_main_b4_1.2b:128:128:512; do
    IFS=: read -r m p n b <<<"$r"
    echo "-- $m $p+$n batch $b"
    BLOCKFORMER_PROFILE=1 timeout "$(left 40)" "$B" bench --device cuda --dtype bf16 --preset "$m" \
      --prompt-len "$p" --new-tokens "$n" --batch-size "$b" --runs 1 --warmup 1 --sync-split \
      >"$OUT/profile-$m-$p-$n.txt" 2>&1
    echo "exit $?" >>"$OUT/profile-$m-$p-$n.txt"
    grep -A12 "^device-time profile" "$OUT/profile-$m-$p-$n.txt"
    grep -A2 "^model .*embedder" "$OUT/profile-$m-$p-$n.txt" | tail -1
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
