#!/usr/bin/env bash
# Main job: build, then demonstrate the shipped Shakespeare models (models/): architecture,
# generation from a prompt with both, their test perplexity on the same predicted tokens, and
# their batched generation speed at the full 1024-token context.
set -euo pipefail
cd "$(dirname "$0")"
cargo build --release --quiet
B=target/release/blockformer
V=models/shakespeare-vanilla
K=models/shakespeare-block
D=../shared/data/shakespeare

echo "== the two shipped models =="
$B info --model $V
$B info --model $K

echo
echo "== generation from a prompt (sampling: temperature 0.8, top-p 0.95, seed 1) =="
for M in $V $K; do
  echo "-- $M"
  $B generate --model $M --prompt "ROMEO. But soft, what light" --max-new-tokens 64 \
    --temperature 0.8 --top-p 0.95 --seed 1
  echo
done

echo "== test perplexity (Hamlet, Macbeth, The Tempest, Twelfth Night; never trained on) =="
if [ -d "$D" ]; then
  $B eval --model $V $K --data $D/hamlet_gut.txt $D/macbeth_gut.txt $D/tempest_gut.txt $D/twelfth_night_gut.txt
else
  echo "(corpus not found at $D: the recorded evaluation, models/eval-test.json)"
  cat models/eval-test.json
fi

echo
echo "== batched generation speed: 32 rows, 512-token prompt + 512 new tokens (the full context) =="
for M in $V $K; do
  echo "-- $M"
  $B generate --model $M --random-prompt-len 512 --max-new-tokens 512 --batch-size 32 --ignore-eos --seed 0 >/dev/null
done
echo
echo "The block model generates faster at equal-or-better perplexity: per block of 4 tokens its"
echo "block decoder runs once (over 4x fewer positions than tokens) and its token decoder attends"
echo "to at most 5 positions, while the vanilla model reads a KV cache of up to 1024 tokens per"
echo "layer for every token."
