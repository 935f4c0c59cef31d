#!/usr/bin/env python3
"""Load generator for an OpenAI-compatible server: N clients, K streaming chat requests each.

Usage: benches/serve_load.py BASE_URL MODEL [--clients N] [--requests-per-client K]
                             [--max-tokens 64] [--prompt-set essays|FILE] [--extra-body JSON]
                             [--warmup W] [--records FILE] [--timeout S]

  BASE_URL    the API root, e.g. http://127.0.0.1:8080/v1
  MODEL       the model id sent in each request
  --clients N             client threads sending at once (default 1)
  --requests-per-client K requests each client sends, one after the other (default 4)
  --max-tokens M          max_tokens of each request (default 64)
  --prompt-set SET        "essays" (built in: 32 prompts that ask for long answers) or a file
                          with one prompt per line
  --extra-body JSON       extra fields merged into every request body, e.g.
                          '{"cache_prompt": false}' (servers ignore fields they do not know)
  --warmup W              requests sent one at a time before the measurement (default 1)
  --records FILE          also write one JSON line per measured request to FILE
  --timeout S             per-request timeout in seconds (default 600)

Every request is `POST /chat/completions` with stream=true, temperature 0, max_tokens M and
stream_options.include_usage, sent by the `openai` client with retries off (a failed request
counts as an error, it is never retried). Client i's j-th request uses prompt (i + j*N) mod P,
so concurrent requests carry different prompts. The OpenAI API has no "ignore EOS", so the
prompts ask for long answers and the figures count the tokens actually generated.

Per request: time to first token (TTFT: from sending the request to the first chunk with
non-empty content), completion tokens (from the `usage` the server sends in a chunk, else the
number of non-empty content chunks), finish reason and text. The clients start together
(barrier); wall time runs from their start to the end of the last request, and

  tok_s = sum of completion tokens over all measured requests / wall time.

Prints one JSON line on stdout (and a one-line summary on stderr): clients, requests, ok,
errors, wall_s, completion_tokens, tok_s, ttft_ms {mean, p50, p90, max},
decode_tok_s_per_request (mean over requests of (tokens - 1) / (end - first token)),
tokens_from (usage | chunks | mixed), finish_reasons, and `anomalies`: failed or truncated
streams (no finish_reason), missing usage, usage that disagrees with the stream (more content
chunks than completion tokens, more tokens than max_tokens, finish_reason "length" with fewer
than max_tokens), a first content chunk that never came.
"""

import argparse
import json
import statistics
import sys
import threading
import time
from collections import Counter
from pathlib import Path

import openai

TOPICS = [
    "the Roman Empire", "the printing press", "the steam engine", "photosynthesis",
    "the water cycle", "plate tectonics", "the French Revolution", "the internet",
    "vaccines", "the solar system", "the Silk Road", "ancient Egypt", "electricity",
    "the Renaissance", "climate change", "the human heart", "volcanoes", "the Moon landing",
    "honeybees", "the Industrial Revolution", "coral reefs", "the Great Wall of China",
    "black holes", "the telephone", "rainforests", "the Olympic Games", "DNA",
    "the Ottoman Empire", "glaciers", "the railway", "jazz music", "the immune system",
]
ESSAYS = [f"Write a long, detailed essay about {t}. Use several paragraphs." for t in TOPICS]


def percentile(xs, q):
    """Linear-interpolated percentile, q in [0, 100]."""
    s = sorted(xs)
    if not s:
        return None
    k = (len(s) - 1) * q / 100
    lo, hi = int(k), min(int(k) + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (k - lo)


def one_request(client, args, prompt, extra):
    """Sends one streaming chat request; returns its record."""
    rec = {"ttft_s": None, "chunks": 0, "usage_tokens": None, "prompt_tokens": None,
           "finish": None, "text": "", "error": None}
    parts = []
    t0 = time.perf_counter()
    rec["t_start"] = t0
    try:
        stream = client.chat.completions.create(
            model=args.model,
            messages=[{"role": "user", "content": prompt}],
            max_tokens=args.max_tokens,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
            extra_body=extra or None,
        )
        for chunk in stream:
            now = time.perf_counter()
            if chunk.usage is not None:
                rec["usage_tokens"] = chunk.usage.completion_tokens
                rec["prompt_tokens"] = chunk.usage.prompt_tokens
            for ch in chunk.choices or []:
                content = ch.delta.content if ch.delta is not None else None
                if content:
                    if rec["ttft_s"] is None:
                        rec["ttft_s"] = now - t0
                    rec["chunks"] += 1
                    parts.append(content)
                if ch.finish_reason:
                    rec["finish"] = ch.finish_reason
    except Exception as e:  # noqa: BLE001 - every failure is a data point
        rec["error"] = f"{type(e).__name__}: {e}"[:300]
    rec["t_end"] = time.perf_counter()
    rec["text"] = "".join(parts)
    return rec


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("base_url")
    ap.add_argument("model")
    ap.add_argument("--clients", type=int, default=1)
    ap.add_argument("--requests-per-client", type=int, default=4)
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--prompt-set", default="essays")
    ap.add_argument("--extra-body", default="{}")
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--records")
    ap.add_argument("--timeout", type=float, default=600)
    args = ap.parse_args()

    if args.prompt_set == "essays":
        prompts = ESSAYS
    else:
        prompts = [ln for ln in Path(args.prompt_set).read_text().splitlines() if ln.strip()]
    if not prompts:
        sys.exit("serve_load.py: the prompt set is empty")
    extra = json.loads(args.extra_body)
    n, k = args.clients, args.requests_per_client

    def new_client():
        return openai.OpenAI(base_url=args.base_url, api_key="none", max_retries=0,
                             timeout=args.timeout)

    warm = new_client()
    for w in range(args.warmup):
        r = one_request(warm, args, prompts[w % len(prompts)], extra)
        if r["error"]:
            sys.exit(f"serve_load.py: warm-up request failed: {r['error']}")

    records = [[None] * k for _ in range(n)]
    barrier = threading.Barrier(n + 1)

    def client_thread(i):
        client = new_client()
        barrier.wait()
        for j in range(k):
            p = (i + j * n) % len(prompts)
            r = one_request(client, args, prompts[p], extra)
            r.update(client=i, seq=j, prompt=p)
            records[i][j] = r

    threads = [threading.Thread(target=client_thread, args=(i,), daemon=True) for i in range(n)]
    for t in threads:
        t.start()
    barrier.wait()
    t_begin = time.perf_counter()
    for t in threads:
        t.join()
    recs = [r for row in records for r in row]
    wall = max(r["t_end"] for r in recs) - t_begin

    anomalies = []
    ok = [r for r in recs if r["error"] is None]
    errors = [r for r in recs if r["error"] is not None]
    for r in errors:
        anomalies.append(f"client {r['client']} req {r['seq']}: {r['error']}")
    sources = Counter()
    for r in ok:
        tag = f"client {r['client']} req {r['seq']}"
        if r["usage_tokens"] is None:
            sources["chunks"] += 1
            r["tokens"] = r["chunks"]
            anomalies.append(f"{tag}: no usage in the stream")
        else:
            sources["usage"] += 1
            r["tokens"] = r["usage_tokens"]
            if r["chunks"] > r["usage_tokens"]:
                anomalies.append(f"{tag}: {r['chunks']} content chunks but usage says "
                                 f"{r['usage_tokens']} completion tokens")
            if r["usage_tokens"] > args.max_tokens:
                anomalies.append(f"{tag}: usage {r['usage_tokens']} > max_tokens {args.max_tokens}")
            if r["finish"] == "length" and r["usage_tokens"] < args.max_tokens:
                anomalies.append(f"{tag}: finish_reason length with {r['usage_tokens']} < "
                                 f"max_tokens {args.max_tokens} tokens")
        if r["finish"] is None:
            anomalies.append(f"{tag}: the stream ended without a finish_reason")
        if r["ttft_s"] is None and r["tokens"] > 0:
            anomalies.append(f"{tag}: {r['tokens']} tokens but no non-empty content chunk")

    ttfts = [r["ttft_s"] * 1000 for r in ok if r["ttft_s"] is not None]
    decode = [(r["tokens"] - 1) / (r["t_end"] - r["t_start"] - r["ttft_s"])
              for r in ok if r["ttft_s"] is not None and r["tokens"] > 1
              and r["t_end"] - r["t_start"] > r["ttft_s"]]
    total = sum(r["tokens"] for r in ok)

    def ms(v):
        return None if v is None else round(v, 1)

    out = {
        "base_url": args.base_url, "model": args.model, "clients": n,
        "requests_per_client": k, "max_tokens": args.max_tokens, "requests": len(recs),
        "ok": len(ok), "errors": len(errors), "wall_s": round(wall, 3),
        "completion_tokens": total, "tok_s": round(total / wall, 2) if wall > 0 else None,
        "ttft_ms": {"mean": ms(statistics.fmean(ttfts)) if ttfts else None,
                    "p50": ms(percentile(ttfts, 50)), "p90": ms(percentile(ttfts, 90)),
                    "max": ms(max(ttfts)) if ttfts else None},
        "decode_tok_s_per_request": round(statistics.fmean(decode), 2) if decode else None,
        "tokens_from": ("usage" if set(sources) == {"usage"} else
                        "chunks" if set(sources) == {"chunks"} else "mixed"),
        "finish_reasons": dict(Counter(str(r["finish"]) for r in ok)),
        "anomalies": anomalies[:20], "n_anomalies": len(anomalies),
    }
    if args.records:
        with open(args.records, "w") as f:
            for r in recs:
                f.write(json.dumps({key: r.get(key) for key in (
                    "client", "seq", "prompt", "ttft_s", "tokens", "usage_tokens",
                    "prompt_tokens", "chunks", "finish", "error", "t_start", "t_end",
                    "text")}) + "\n")
    print(json.dumps(out), flush=True)
    t = out["ttft_ms"]
    print(f"  {n} clients: {out['tok_s']} tok/s, TTFT p50 {t['p50']} ms p90 {t['p90']} ms, "
          f"{len(ok)}/{len(recs)} ok, {len(anomalies)} anomalies", file=sys.stderr)


if __name__ == "__main__":
    main()
