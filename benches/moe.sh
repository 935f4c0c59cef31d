#!/usr/bin/env bash
# Decode speed of a Mixture-of-Experts model with its routed experts in the stage, and on an
# expert host: over loopback, and across network namespaces (scripts/netns-cluster: 0.5 ms
# one way host to host, 1 Gbit/s; netem, or shoal delay-proxy where the kernel has no netem).
# Prints tg tokens/s for each (shoal bench, the same run), the ratio to experts in the stage,
# and the bytes the expert host traffic carries per token.
#
# Usage: benches/moe.sh [--model PATH] [--reps N] [--n-gen N] [--concurrency C] [--no-netns]
#   default model: the largest MoE reference fixture, ~/.cache/shoal/fixtures/mixtral.gguf
#   (scripts/fixtures/run). SHOAL_BIN: the shoal binary (default target/release/shoal).
# Needs root for the namespaces (or pass --no-netns).
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
SHOAL="${SHOAL_BIN:-$ROOT/target/release/shoal}"
MODEL="${SHOAL_CACHE:-$HOME/.cache/shoal}/fixtures/mixtral.gguf"
REPS=3 NGEN=64 CONC=1 USE_NETNS=1 DELAY=0.5ms
while [[ $# -gt 0 ]]; do
    case "$1" in
        --model) MODEL="$2"; shift 2 ;;
        --reps) REPS="$2"; shift 2 ;;
        --n-gen) NGEN="$2"; shift 2 ;;
        --concurrency) CONC="$2"; shift 2 ;;
        --no-netns) USE_NETNS=0; shift ;;
        *) echo "unknown option $1" >&2; exit 2 ;;
    esac
done
[[ -x "$SHOAL" ]] || { echo "no shoal binary at $SHOAL (cargo build --release)" >&2; exit 1; }
[[ -f "$MODEL" ]] || { echo "no model at $MODEL (scripts/fixtures/run)" >&2; exit 1; }
DIR="$(dirname "$MODEL")"
PIDS=()
PREFIX="shoalmoe$$"
cleanup() {
    for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done
    [[ "$USE_NETNS" == 1 ]] && "$ROOT/scripts/netns-cluster" down "$PREFIX" 2>/dev/null || true
}
trap cleanup EXIT

# shellcheck source=benches/lib.sh
source "$ROOT/benches/lib.sh"
# tg NS ARGS...: decode tokens/s of shoal bench (run in NS unless empty).
tg() {
    local ns="$1"; shift
    local cmd=("$SHOAL" --insecure bench --model "$MODEL" -p 0 -n "$NGEN" --reps "$REPS" -t 1 --concurrency "$CONC" --json "$@")
    [[ -n "$ns" ]] && cmd=(ip netns exec "$ns" "${cmd[@]}")
    "${cmd[@]}" 2>/dev/null | python3 -c 'import json,sys; j=json.load(sys.stdin); print(j["tg_tok_s"] if "tg_tok_s" in j else j["results"][-1]["tok_s"])'
}

# Payload per token per MoE layer: the hidden state out and back (f32) and n_used (expert,
# weight) pairs, from the model's own metadata.
ARCH="$(gguf_meta "$MODEL" general.architecture)"
E="$(gguf_meta "$MODEL" "$ARCH.embedding_length")"
K="$(gguf_meta "$MODEL" "$ARCH.expert_used_count")"
L="$(gguf_meta "$MODEL" "$ARCH.block_count")"
N_MOE="$(gguf_meta "$MODEL" "$ARCH.expert_count")"
BYTES=$(( L * (2 * E * 4 + K * 8) ))

echo "model $(basename "$MODEL"): n_embd $E, $L MoE layers, $N_MOE experts, top-$K; decode $NGEN tokens x $REPS reps, concurrency $CONC"
echo "expert host payload: $BYTES bytes per token (per MoE layer: hidden state out and back, f32, and $K expert/weight pairs; gRPC framing not counted)"
bench_worker A "" 127.0.0.1:0 "$DIR"
bench_worker B "" 127.0.0.1:0 "$DIR"
local_tg="$(tg "" --worker "$A")"
host_tg="$(tg "" --worker "$A" --expert-host "$B")"
printf '%-44s %10s %8s\n' "where the experts run" "tg tok/s" "ratio"
printf '%-44s %10.1f %8s\n' "in the stage (loopback worker)" "$local_tg" "1.00"
printf '%-44s %10.1f %8.2f\n' "expert host, loopback" "$host_tg" "$(python3 -c "print($host_tg/$local_tg)")"
if [[ "$USE_NETNS" == 1 ]]; then
    "$ROOT/scripts/netns-cluster" up "$PREFIX" 2 --delay "$DELAY" --rate 1gbit 2>/dev/null
    w1="$("$ROOT/scripts/netns-cluster" addr "$PREFIX" w1)"; w2="$("$ROOT/scripts/netns-cluster" addr "$PREFIX" w2)"
    bench_worker SA "$PREFIX-w1" "$w1:7070" "$DIR"
    bench_worker SB "$PREFIX-w2" "$w2:7070" "$DIR"
    if "$ROOT/scripts/netns-cluster" netem-check; then
        via_a="$SA" via_b="$SB" mech=netem
    else
        # No netem: the delay comes from a delay proxy in front of each worker.
        SHOAL_BIN="$SHOAL" "$ROOT/scripts/netns-cluster" proxy "$PREFIX" w1 7071 7070 --delay "$DELAY" > /dev/null 2>&1 &
        PIDS+=($!)
        SHOAL_BIN="$SHOAL" "$ROOT/scripts/netns-cluster" proxy "$PREFIX" w2 7071 7070 --delay "$DELAY" > /dev/null 2>&1 &
        PIDS+=($!)
        sleep 1
        via_a="$w1:7071" via_b="$w2:7071" mech=delay-proxy
    fi
    ns_local="$(tg "$PREFIX-c" --worker "$via_a")"
    ns_host="$(tg "$PREFIX-c" --worker "$via_a" --expert-host "$via_b")"
    printf '%-44s %10.1f %8s\n' "in the stage (netns, $mech)" "$ns_local" "1.00"
    printf '%-44s %10.1f %8.2f\n' "expert host on another host (netns, $mech)" "$ns_host" "$(python3 -c "print($ns_host/$ns_local)")"
fi
