#!/usr/bin/env bash
# Decode speed of one stage split over tensor-parallel ranks on CPU: TP = 1 (one worker),
# TP = 2 in both modes (two worker processes, one TCP collective between them), and TP = 1
# with the threads of both ranks, for comparison. Every worker has -t threads; all on
# loopback. Prints tg tokens/s (shoal bench, the same run), the ratio to TP = 1, and the
# bytes each follower sends (and receives) per token per mode.
#
# Usage: benches/tp.sh [--model PATH] [--reps N] [--n-gen N] [-t THREADS]
#   default model: SmolLM2-135M-Instruct Q4_1 (scripts/fetch-models).
#   SHOAL_BIN: the shoal binary (default target/release/shoal).
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
SHOAL="${SHOAL_BIN:-$ROOT/target/release/shoal}"
MODEL="${SHOAL_CACHE:-$HOME/.cache/shoal}/models/SmolLM2-135M-Instruct.Q4_1.gguf"
REPS=3 NGEN=64 T=1
while [[ $# -gt 0 ]]; do
    case "$1" in
        --model) MODEL="$2"; shift 2 ;;
        --reps) REPS="$2"; shift 2 ;;
        --n-gen) NGEN="$2"; shift 2 ;;
        -t) T="$2"; shift 2 ;;
        *) echo "unknown option $1" >&2; exit 2 ;;
    esac
done
[[ -x "$SHOAL" ]] || { echo "no shoal binary at $SHOAL (cargo build --release)" >&2; exit 1; }
[[ -f "$MODEL" ]] || { echo "no model at $MODEL" >&2; exit 1; }
DIR="$(dirname "$MODEL")"
PIDS=()
trap 'for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done' EXIT

worker() {
    local out; out="$(mktemp)"
    "$SHOAL" --insecure worker --listen 127.0.0.1:0 --models-dir "$DIR" > "$out" 2>/dev/null &
    PIDS+=($!)
    for _ in $(seq 100); do
        grep -q "listening on" "$out" && { sed -n 's/^listening on //p' "$out" | head -1; return; }
        sleep 0.1
    done
    echo "a worker did not start" >&2; exit 1
}

# tg THREADS ARGS...: decode tokens/s of shoal bench.
tg() {
    local t="$1"; shift
    "$SHOAL" --insecure bench --model "$MODEL" -p 0 -n "$NGEN" --reps "$REPS" -t "$t" --json "$@" 2>/dev/null \
        | python3 -c 'import json,sys; j=json.load(sys.stdin); print(j["tg_tok_s"] if "tg_tok_s" in j else j["results"][-1]["tok_s"])'
}

# Collective bytes per token each follower sends (and receives the same), from the metadata:
# exact mode gathers attention output (n_head*head_dim), the FFN activation (n_ff, or
# n_used*n_embd per-slot expert outputs) and twice the hidden size per layer; sum mode
# all-reduces the hidden size twice per layer.
read -r EXACT SUM DESC < <(python3 - "$MODEL" <<'PY'
import struct, sys
f = open(sys.argv[1], "rb"); assert f.read(4) == b"GGUF"; f.read(4)
n_t, n_kv = struct.unpack("<QQ", f.read(16))
def s(): n, = struct.unpack("<Q", f.read(8)); return f.read(n).decode()
size = {0:1,1:1,2:2,3:2,4:4,5:4,6:4,7:1,10:8,11:8,12:8}
def val(t):
    if t == 8: return s()
    if t == 9:
        et, n = struct.unpack("<IQ", f.read(12)); return [val(et) for _ in range(n)]
    b = f.read(size[t]); return int.from_bytes(b, "little") if t in (0,2,4,10) else b
kv = {}
for _ in range(n_kv):
    k = s(); t, = struct.unpack("<I", f.read(4)); kv[k] = val(t)
a = kv["general.architecture"]; g = lambda k, d=None: kv.get(a + "." + k, d)
e, L, nh = g("embedding_length"), g("block_count"), g("attention.head_count")
hd = g("attention.key_length", e // nh)
ffn = g("expert_used_count") * e if g("expert_count") else g("feed_forward_length")
print(L * 4 * (nh * hd + ffn + 2 * e), L * 4 * 2 * e, f"{a}:n_embd={e},layers={L}")
PY
)
echo "model $(basename "$MODEL") ($DESC): decode $NGEN tokens x $REPS reps, $T thread(s) per worker, loopback"
echo "collective traffic per token per follower, each way: exact $EXACT bytes, sum $SUM bytes"
A="$(worker)"; B="$(worker)"
tp1="$(tg "$T" --worker "$A")"
tp1x2="$(tg "$((2 * T))" --worker "$A")"
tp2e="$(tg "$T" --worker "$A+$B" --tp-mode exact)"
tp2s="$(tg "$T" --worker "$A+$B" --tp-mode sum)"
r() { python3 -c "print(f'{$1/$tp1:.2f}')"; }
printf '%-44s %10s %8s\n' "stage" "tg tok/s" "ratio"
printf '%-44s %10.1f %8s\n' "TP=1 ($T thread)" "$tp1" "1.00"
printf '%-44s %10.1f %8s\n' "TP=1 ($((2 * T)) threads: the cores of two ranks)" "$tp1x2" "$(r "$tp1x2")"
printf '%-44s %10.1f %8s\n' "TP=2 exact ($T thread per rank)" "$tp2e" "$(r "$tp2e")"
printf '%-44s %10.1f %8s\n' "TP=2 sum ($T thread per rank)" "$tp2s" "$(r "$tp2s")"
