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

# shellcheck source=benches/lib.sh
source "$ROOT/benches/lib.sh"
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
ARCH="$(gguf_meta "$MODEL" general.architecture)"
m() { gguf_meta "$MODEL" "$ARCH.$1"; }
E="$(m embedding_length)" L="$(m block_count)" NH="$(m attention.head_count)"
HD="$(m attention.key_length)"; HD="${HD:-$((E / NH))}"
if [[ -n "$(m expert_count)" ]]; then FFN=$(( $(m expert_used_count) * E )); else FFN="$(m feed_forward_length)"; fi
EXACT=$(( L * 4 * (NH * HD + FFN + 2 * E) )) SUM=$(( L * 4 * 2 * E )) DESC="$ARCH:n_embd=$E,layers=$L"
echo "model $(basename "$MODEL") ($DESC): decode $NGEN tokens x $REPS reps, $T thread(s) per worker, loopback"
echo "collective traffic per token per follower, each way: exact $EXACT bytes, sum $SUM bytes"
bench_worker A "" 127.0.0.1:0 "$DIR"
bench_worker B "" 127.0.0.1:0 "$DIR"
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
