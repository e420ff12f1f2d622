#!/usr/bin/env bash
# Main job: build, then demo generation and batched speed on the paper's smallest Block
# Transformer preset with RANDOM weights (no trained model is shipped yet).
set -euo pipefail
cd "$(dirname "$0")"
cargo build --release --quiet
B=target/release/blockformer
$B info --preset block_main_b4_5
echo "== greedy generation, random weights (ids) =="
$B generate --preset block_main_b4_5 --ids "1 2 3 4 5 6 7" --max-new-tokens 16 --ignore-eos
echo "== batched speed: block_main_b4_85 vs vanilla_70, random weights, prompt 128, 128 new, batch 8 =="
$B generate --preset block_main_b4_85 --random-prompt-len 128 --max-new-tokens 128 --batch-size 8 --ignore-eos >/dev/null
$B generate --preset vanilla_70 --random-prompt-len 128 --max-new-tokens 128 --batch-size 8 --ignore-eos >/dev/null
