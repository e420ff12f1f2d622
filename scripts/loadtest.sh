#!/usr/bin/env bash
# Bounded load test of `blockformer serve`, block and vanilla model side by side, on loopback.
#
#   scripts/loadtest.sh [REQUESTS] [CONCURRENCY] [MAX_TOKENS] [PROMPT_LEN]
#
# For each model it starts a server on a free loopback port, runs `blockformer loadtest`
# (every request streams; EOS is ignored so each generates MAX_TOKENS tokens), stops the server
# with SIGTERM and prints throughput and latency percentiles. Models: $BLOCK_MODEL and
# $VANILLA_MODEL (folders), else models/shakespeare-{block,vanilla} when trained, else the
# same architectures (models/configs/*.json) with random weights and models/tokenizer.json.
# Extra server flags: $SERVE_FLAGS (e.g. "--max-batch 32 --threads 2").
set -euo pipefail
cd "$(dirname "$0")/.."

REQUESTS=${1:-128}
CONCURRENCY=${2:-32}
MAX_TOKENS=${3:-64}
PROMPT_LEN=${4:-32}
BIN=${BIN:-target/release/blockformer}
[ -x "$BIN" ] || cargo build --release --quiet
OUT=${OUT:-$(mktemp -d)}
mkdir -p "$OUT"

model_args() { # kind -> flags
    local kind=$1 var dir
    var=$(echo "${kind}_MODEL" | tr a-z A-Z)
    dir=${!var:-models/shakespeare-$kind}
    if [ -f "$dir/model.safetensors" ]; then
        echo "--model $dir"
    else
        echo "--config models/configs/shakespeare-$kind.json --tokenizer models/tokenizer.json"
    fi
}

pid=""
trap '[ -n "$pid" ] && kill -TERM "$pid" 2>/dev/null || true' EXIT

for kind in block vanilla; do
    args=$(model_args "$kind")
    log="$OUT/serve-$kind.log"
    : >"$log"
    # shellcheck disable=SC2086
    "$BIN" serve $args --host 127.0.0.1 --port 0 --model-name "shakespeare-$kind" ${SERVE_FLAGS:-} \
        </dev/null >/dev/null 2>"$log" &
    pid=$!
    addr=""
    for _ in $(seq 1 300); do
        addr=$(sed -n 's/^listening on http:\/\/\([^ ]*\).*/\1/p' "$log" | head -1)
        [ -n "$addr" ] && break
        kill -0 "$pid" 2>/dev/null || break
        sleep 0.1
    done
    if [ -z "$addr" ]; then
        cat "$log"
        kill "$pid" 2>/dev/null || true
        exit 1
    fi
    echo "== $kind: $(head -1 "$log")"
    "$BIN" loadtest --url "http://$addr" --requests "$REQUESTS" --concurrency "$CONCURRENCY" \
        --max-tokens "$MAX_TOKENS" --prompt-len "$PROMPT_LEN" --time-limit 300 \
        --json "$OUT/loadtest-$kind.json" || true
    kill -TERM "$pid"
    wait "$pid" || true
    pid=""
done
echo "summaries: $OUT/loadtest-{block,vanilla}.json"
