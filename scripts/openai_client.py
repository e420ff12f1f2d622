#!/usr/bin/env python3
"""Calls a running `blockformer serve` with the official `openai` Python client.

    pip install openai
    python scripts/openai_client.py [--base-url http://127.0.0.1:8080/v1] [--api-key KEY]

It lists the model, completes a prompt, streams the same seeded request and checks that the
chunks reassemble to the same text, and scores a text with `echo=True, max_tokens=0,
logprobs=1` (what evaluation harnesses do for log-likelihoods). Exits non-zero on a mismatch.
Only talks to this machine (loopback).
"""

import argparse
import ipaddress
import math
import os
import socket
import sys
from urllib.parse import urlparse

from openai import OpenAI


def loopback_only(url: str) -> None:
    host = urlparse(url).hostname or ""
    try:
        ips = {info[4][0] for info in socket.getaddrinfo(host, None)}
    except OSError as e:
        sys.exit(f"cannot resolve {host}: {e}")
    if not all(ipaddress.ip_address(ip.split("%")[0]).is_loopback for ip in ips):
        sys.exit(f"{url}: this script only talks to a server on this machine")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--base-url", default="http://127.0.0.1:8080/v1")
    ap.add_argument("--api-key", default=os.environ.get("BLOCKFORMER_API_KEY", "none"))
    ap.add_argument("--prompt", default="To be, or not to be,")
    ap.add_argument("--max-tokens", type=int, default=32)
    args = ap.parse_args()
    loopback_only(args.base_url)

    client = OpenAI(base_url=args.base_url, api_key=args.api_key, max_retries=0, timeout=120)

    models = client.models.list()
    model = models.data[0].id
    print(f"model: {model}")

    # 1. A plain completion (greedy).
    r = client.completions.create(model=model, prompt=args.prompt, max_tokens=args.max_tokens, temperature=0)
    c = r.choices[0]
    print(f"completion ({c.finish_reason}, {r.usage.completion_tokens} tokens): {args.prompt}{c.text!r}")

    # 2. The same seeded sampling request, whole and streamed: the same text.
    kw = dict(model=model, prompt=args.prompt, max_tokens=args.max_tokens, temperature=0.8, top_p=0.95, seed=7, n=2)
    whole = client.completions.create(**kw)
    pieces = ["", ""]
    chunks = 0
    for chunk in client.completions.create(stream=True, **kw):
        for ch in chunk.choices:
            pieces[ch.index] += ch.text
        chunks += 1
    ok_stream = [c.text for c in sorted(whole.choices, key=lambda c: c.index)] == pieces
    print(f"streamed {chunks} chunks; reassembled text equals the non-streamed text: {ok_stream}")
    for i, p in enumerate(pieces):
        print(f"  choice {i}: {p!r}")

    # 3. Log-likelihood of a text, as evaluation harnesses ask for it.
    text = args.prompt + " that is the question"
    s = client.completions.create(model=model, prompt=text, max_tokens=0, echo=True, logprobs=1, temperature=0)
    lp = s.choices[0].logprobs
    first_null = lp.token_logprobs[0] is None
    rest_ok = all(x is not None and x <= 0 and math.isfinite(x) for x in lp.token_logprobs[1:])
    total = sum(x for x in lp.token_logprobs[1:])
    ok_echo = s.choices[0].text == text and first_null and rest_ok and "".join(lp.tokens) == text
    print(f"scored {len(lp.tokens)} tokens of {text!r}: sum logprob {total:.3f}; format ok: {ok_echo}")

    # 4. Streaming with stop sequences and usage.
    stream = client.completions.create(
        model=model, prompt=args.prompt, max_tokens=args.max_tokens, temperature=0,
        stop=["\n"], stream=True, stream_options={"include_usage": True},
    )
    usage = None
    finish = None
    for chunk in stream:
        if chunk.usage is not None:
            usage = chunk.usage
        for ch in chunk.choices:
            finish = ch.finish_reason or finish
    print(f"stream with stop=['\\n']: finish {finish}, usage {usage.completion_tokens if usage else None} tokens")

    ok = ok_stream and ok_echo and usage is not None
    print("OK" if ok else "MISMATCH")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
