#!/usr/bin/env bash
# Serving benchmark: `shoal serve` against llama.cpp's `llama-server` under the same load of
# concurrent streaming chat clients, both measured in this run.
#
# Usage: benches/serve.sh [--threads T] [--models smollm2,qwen] [--clients 1,8,32] [--workers N]
#                         [--worker-threads W] [--requests K] [--max-tokens M] [--strict]
#
#   --threads T         compute threads of llama-server (-t) and, shared out, of shoal's
#                       workers (default: nproc)
#   --models LIST       comma-separated, from: smollm2, qwen (default: both)
#   --clients LIST      concurrent clients, comma-separated (default: 1,8,32)
#   --workers N         local worker processes of shoal serve, a pipeline stage each (default 1)
#   --worker-threads W  threads per shoal worker (default: T / N, at least 1, so that shoal and
#                       llama-server use the same cores)
#   --requests K        streaming requests per client, one after the other (default: 4)
#   --max-tokens M      max_tokens of every request (default: 64)
#   --strict            exit 1 when the bar fails
#
# For each model:
#   shoal serve -m MODEL --workers N --threads W --http 127.0.0.1:0 --listen 127.0.0.1:0
#               --max-seqs 32 --state-dir OUT/TAG.state
# is started once (ready when it prints "serving on" on stdout) and stays up; at each client
# count C it gets the load, then
#   llama-server -m MODEL -t T --parallel C -c C*1024 --host 127.0.0.1 --port P --no-webui
# is started (ready when /health answers 200; C slots, 1024 tokens of context each, so that it
# has as many parallel slots as there are clients), gets the same load and is stopped. shoal
# idles meanwhile (its threads park), and each pair of runs sees the machine in the same
# state. The load is benches/serve_load.py: C client threads, K streaming chat requests each,
# temperature 0, max_tokens M, prompts that ask for long essays (a different prompt per
# concurrent request), `cache_prompt: false` in every body (llama-server would otherwise reuse
# the KV of a repeated prompt, which shoal has no cache for; shoal ignores the field), one
# warm-up request first. Per run it reports time to first token (p50, p90) and aggregate
# tok/s = completion tokens of all requests / wall time, counting the tokens actually generated
# (from `usage`): the OpenAI API has no way to ignore end-of-generation, so a request may stop
# before M tokens.
#
# Bar: shoal's aggregate tok/s at 8 clients >= 1.0x llama-server's with 8 slots. The table goes
# to stdout, raw JSON, per-request records and server logs to $SHOAL_CACHE/bench/DATE-serve/;
# nothing is written to docs/. The load generator runs on the same machine as the servers. Both
# engines need a quiet machine: with other processes on the cores their synchronised compute
# threads lose most of their speed, so the 1-minute load average before each run is printed
# under the table. Every process started here is stopped on exit (trap), on failure and Ctrl-C
# too.
#
# Environment: SHOAL_BIN (a built shoal; default: build it with cargo), LLAMA_BUILD_DIR (see
# scripts/llama-cpp/build.sh), SHOAL_CACHE.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
SHOAL_CACHE="${SHOAL_CACHE:-$HOME/.cache/shoal}"
MODELS_DIR="$SHOAL_CACHE/models"
LOAD="$ROOT/benches/serve_load.py"

THREADS="$(nproc)"
MODELS="smollm2,qwen"
CLIENTS="1,8,32"
WORKERS=1
WORKER_THREADS=""
REQUESTS=4
MAX_TOKENS=64
STRICT=0
while [[ $# -gt 0 ]]; do
    case "$1" in
        --threads) THREADS="$2"; shift 2 ;;
        --models) MODELS="$2"; shift 2 ;;
        --clients) CLIENTS="$2"; shift 2 ;;
        --workers) WORKERS="$2"; shift 2 ;;
        --worker-threads) WORKER_THREADS="$2"; shift 2 ;;
        --requests) REQUESTS="$2"; shift 2 ;;
        --max-tokens) MAX_TOKENS="$2"; shift 2 ;;
        --strict) STRICT=1; shift ;;
        -h|--help) awk 'NR > 1 && !/^#/ { exit } NR > 1' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
        *) echo "unknown argument: $1 (see --help)" >&2; exit 2 ;;
    esac
done
[[ "$WORKERS" -ge 1 ]] || { echo "--workers must be >= 1" >&2; exit 2; }
if [[ -z "$WORKER_THREADS" ]]; then
    WORKER_THREADS=$((THREADS / WORKERS))
    if [[ "$WORKER_THREADS" -lt 1 ]]; then WORKER_THREADS=1; fi
fi


# shellcheck source=benches/lib.sh disable=SC2119
source "$ROOT/benches/lib.sh"

log() { echo "[serve] $*" >&2; }
die() { echo "serve.sh: $*" >&2; exit 1; }

# Processes started here (servers, the running load generator), stopped by cleanup.
PIDS=()
CHILD=""
LLAMA_PID=""
SHOAL_URL=""
LLAMA_URL=""
cleanup() {
    local rc=$?
    trap - EXIT INT TERM
    if [[ -n "$CHILD" ]]; then PIDS+=("$CHILD"); fi
    stop_pids
    exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT TERM



# Starts shoal serve on model file $2 (logs: $OUT/$1.shoal.*); sets SHOAL_URL once it serves.
start_shoal() {
    local tag="$1" f="$2" addr pid
    log "$tag: shoal serve --workers $WORKERS --threads $WORKER_THREADS --max-seqs 32"
    "$SHOAL_BIN" serve -m "$f" --workers "$WORKERS" --threads "$WORKER_THREADS" \
        --http 127.0.0.1:0 --listen 127.0.0.1:0 --max-seqs 32 --state-dir "$OUT/$tag.state" \
        > "$OUT/$tag.shoal.out" 2> "$OUT/$tag.shoal.log" &
    pid=$!
    PIDS+=("$pid")
    for _ in $(seq 1200); do
        addr="$(sed -n 's|^serving on http://||p' "$OUT/$tag.shoal.out" 2>/dev/null || true)"
        if [[ -n "$addr" ]]; then SHOAL_URL="http://$addr/v1"; return 0; fi
        if ! alive "$pid"; then
            tail -5 "$OUT/$tag.shoal.log" >&2
            die "shoal serve exited; see $OUT/$tag.shoal.log"
        fi
        sleep 0.1
    done
    die "shoal serve printed no 'serving on' after 120 s; see $OUT/$tag.shoal.log"
}

# Starts llama-server on model file $2 with $3 slots (log: $OUT/$1.llama.c$3.log); sets
# LLAMA_URL and LLAMA_PID once /health answers 200.
start_llama() {
    local tag="$1" f="$2" slots="$3" port pid
    port="$(free_port)"
    log "$tag: llama-server -t $THREADS --parallel $slots -c $((slots * 1024))"
    "$BIN_DIR/llama-server" -m "$f" -t "$THREADS" --parallel "$slots" -c $((slots * 1024)) \
        --host 127.0.0.1 --port "$port" --no-webui > "$OUT/$tag.llama.c$slots.log" 2>&1 &
    pid=$!
    PIDS+=("$pid")
    for _ in $(seq 1200); do
        if [[ "$(curl -s -o /dev/null -w '%{http_code}' "http://127.0.0.1:$port/health")" == 200 ]]
        then
            LLAMA_URL="http://127.0.0.1:$port/v1"
            LLAMA_PID="$pid"
            return 0
        fi
        if ! alive "$pid"; then
            tail -5 "$OUT/$tag.llama.c$slots.log" >&2
            die "llama-server exited; see $OUT/$tag.llama.c$slots.log"
        fi
        sleep 0.1
    done
    die "llama-server not healthy after 120 s; see $OUT/$tag.llama.c$slots.log"
}

# Runs the load with $4 clients against $2 (API root), model id $3; results to $OUT/$1.c$4.*.
load() {
    local tag="$1" url="$2" id="$3" c="$4"
    echo "$(date +%T) $tag c$c $(cut -d' ' -f1-3 /proc/loadavg)" >> "$OUT/loadavg.txt"
    log "$tag: $c clients x $REQUESTS requests, max_tokens $MAX_TOKENS"
    if ! run_waited "$OUT/$tag.c$c.json" "$OUT/$tag.c$c.err" python3 "$LOAD" "$url" "$id" \
        --clients "$c" --requests-per-client "$REQUESTS" --max-tokens "$MAX_TOKENS" \
        --extra-body '{"cache_prompt": false}' --records "$OUT/$tag.c$c.jsonl"; then
        tail -5 "$OUT/$tag.c$c.err" >&2
        die "the load generator failed ($tag, $c clients); see $OUT/$tag.c$c.err"
    fi
    tail -1 "$OUT/$tag.c$c.err" >&2
}

python3 -c 'import openai' 2>/dev/null \
    || die "the load generator needs the openai package (pip install openai)"
shoal_bin
log "ensuring llama.cpp is built"
BIN_DIR="$("$ROOT/scripts/llama-cpp/build.sh")"
[[ -x "$BIN_DIR/llama-server" ]] || die "no llama-server in $BIN_DIR"

OUT="$SHOAL_CACHE/bench/$(date +%Y%m%d-%H%M%S)-serve"
mkdir -p "$OUT"
IFS=',' read -r -a MODEL_LIST <<< "$MODELS"
IFS=',' read -r -a CLIENT_LIST <<< "$CLIENTS"
for m in "${MODEL_LIST[@]}"; do
    model_path "$m" > /dev/null
done
"$BIN_DIR/llama-server" --version > "$OUT/llama-version.txt" 2>&1 || true

for m in "${MODEL_LIST[@]}"; do
    f="$(model_path "$m")"
    # shoal serve's default model id; llama-server serves one model and takes any id.
    id="$(basename "$f" .gguf)"
    # shoal serve stays up (idle between runs: its threads park) while llama-server runs, so
    # that each pair of runs at one client count sees the machine in the same state.
    start_shoal "$m" "$f"
    for c in "${CLIENT_LIST[@]}"; do
        load "$m.shoal" "$SHOAL_URL" "$id" "$c"
        start_llama "$m" "$f" "$c"
        load "$m.llama" "$LLAMA_URL" "$id" "$c"
        stop_pids "$LLAMA_PID"
    done
    stop_pids
done
log "raw results in $OUT"

python3 - "$OUT" "$STRICT" "$THREADS" "$WORKERS" "$WORKER_THREADS" "$REQUESTS" "$MAX_TOKENS" \
    "$CLIENTS" "${MODEL_LIST[@]}" <<'PY'
import json, sys
from pathlib import Path

out, strict = Path(sys.argv[1]), sys.argv[2] == "1"
threads, workers, wthreads, reqs, max_tokens = sys.argv[3:8]
clients = [int(c) for c in sys.argv[8].split(",")]
models = sys.argv[9:]
BAR_CLIENTS, BAR = 8, 1.0


def summary(p):
    if not p.exists():
        return None
    lines = [ln for ln in p.read_text().splitlines() if ln.strip()]
    return json.loads(lines[-1]) if lines else None


def records(p):
    if not p.exists():
        return {}
    recs = (json.loads(ln) for ln in p.read_text().splitlines() if ln.strip())
    return {(r["client"], r["seq"]): r for r in recs}


def ttft(s):
    t = s["ttft_ms"]
    return "-" if t["p50"] is None else f"{t['p50']:.0f} ({t['p90']:.0f})"


rows, notes, failed = [], [], False
for m in models:
    for c in clients:
        s = summary(out / f"{m}.shoal.c{c}.json")
        l = summary(out / f"{m}.llama.c{c}.json")
        if s is None or l is None:
            continue
        ratio = s["tok_s"] / l["tok_s"] if s["tok_s"] and l["tok_s"] else None
        bar = "-"
        if c == BAR_CLIENTS:
            ok = ratio is not None and ratio >= BAR
            failed |= not ok
            bar = f"{'pass' if ok else 'FAIL'} (≥ {BAR})"
        rows.append((m, str(c), ttft(s), f"{s['tok_s']:.1f}", ttft(l), f"{l['tok_s']:.1f}",
                     "-" if ratio is None else f"{ratio:.2f}×", bar))
        for name, x in (("shoal", s), ("llama-server", l)):
            notes.append(f"{m} c{c} {name}: {x['ok']}/{x['requests']} ok, "
                         f"{x['completion_tokens']} tokens in {x['wall_s']:.1f} s, "
                         f"TTFT mean {x['ttft_ms']['mean']} ms, per-request decode "
                         f"{x['decode_tok_s_per_request']} tok/s, finish {x['finish_reasons']}, "
                         f"tokens from {x['tokens_from']}")
            for a in x["anomalies"]:
                notes.append(f"{m} c{c} {name} ANOMALY: {a}")
            if x["n_anomalies"] > len(x["anomalies"]):
                notes.append(f"{m} c{c} {name}: {x['n_anomalies']} anomalies in all")
        rs, rl = records(out / f"{m}.shoal.c{c}.jsonl"), records(out / f"{m}.llama.c{c}.jsonl")
        both = [k for k in rs if k in rl and rs[k]["error"] is None and rl[k]["error"] is None]
        same = sum(rs[k]["text"] == rl[k]["text"] for k in both)
        notes.append(f"{m} c{c}: greedy text identical to llama-server's in {same}/{len(both)} "
                     "requests")

print(f"Streaming chat, {reqs} requests per client, max_tokens {max_tokens}, temperature 0. "
      f"TTFT: time to first token, p50 (p90) in ms; tok/s: completion tokens of all requests / "
      f"wall time. shoal serve: {workers} worker(s) × {wthreads} thread(s); llama-server: "
      f"-t {threads}, --parallel = clients, 1024 context per slot.")
print()
print("| model | clients | shoal TTFT ms | shoal tok/s | llama-server TTFT ms | llama-server tok/s "
      "| shoal / llama-server | bar |")
print("|---|---:|---:|---:|---:|---:|---:|---|")
for r in rows:
    print("| " + " | ".join(r) + " |")
print()
ver = (out / "llama-version.txt")
if ver.exists():
    v = [ln for ln in ver.read_text().splitlines() if ln.startswith("version")]
    if v:
        notes.insert(0, f"llama-server {v[0].removeprefix('version: ')}")
la = out / "loadavg.txt"
if la.exists():
    loads = [ln.split() for ln in la.read_text().splitlines() if ln.strip()]
    notes.append("1-minute load average before each run: "
                 + ", ".join(f"{t} {c} {l1}" for _, t, c, l1, *_ in loads))
for n in notes:
    print(f"- {n}")
sys.exit(1 if strict and failed else 0)
PY
