#!/usr/bin/env bash
# Cluster decode benchmark: shoal's pipeline against llama.cpp's RPC backend, on loopback and
# across network namespaces with a delay and a rate limit per link, all measured in this run.
#
# Usage: benches/cluster.sh [--threads N] [--models smollm2,qwen] [--reps R] [--concurrency C]
#                           [--delay 0.5ms] [--rate 1gbit] [--no-netns] [--llama-only] [--strict]
#
#   --threads N      threads of every process: shoal bench, each shoal worker, each
#                    ggml-rpc-server and llama-bench (default: 1; 3 stages share one machine)
#   --models LIST    comma-separated, from: smollm2, qwen (default: both)
#   --reps R         repetitions per test (default: 3)
#   --concurrency C  concurrent sequences of test c (default: 16)
#   --delay D        one-way delay host to host in the netns cluster (default: 0.5ms; a round
#                    trip 2*D): netem, or shoal delay-proxy where the kernel has no netem
#   --rate R         rate limit of each host's link, each direction (default: 1gbit)
#   --no-netns       loopback only (netns needs root and iproute2)
#   --llama-only     skip shoal (to read the llama.cpp figures alone)
#   --strict         exit 1 when a bar fails
#
# Environment: SHOAL_BIN=PATH uses that shoal binary instead of building the release one;
# LLAMA_BUILD_DIR as for scripts/llama-cpp/build.sh.
#
# Decode of 128 tokens from an empty context (-p 0 -n 128), for each model:
#   a. shoal, one process:        shoal bench -m M -t T -p 0 -n 128 -r R --json
#   b. shoal, 3 stages, 1 seq:    ... --workers 3 (loopback) | --worker IP:PORT x3 (netns)
#   c. shoal, 3 stages, C seqs:   ... --concurrency C; tg_tok_s sums all sequences
#   d. llama.cpp RPC, 3 servers:  ggml-rpc-server -H HOST -p PORT -t T (x3) and
#                                 llama-bench -m M -p 0 -n 128 -r R -ngl 99 -t T -o json -v
#                                   --rpc HOST1:PORT1,HOST2:PORT2,HOST3:PORT3
# b, c and d run twice: on 127.0.0.1, and in a scripts/netns-cluster cluster (shoal bench and
# llama-bench in the coordinator's namespace, the workers / rpc-servers one per worker
# namespace). The delay there comes from netem where the kernel has it; where it has not (the
# links then get the rate alone, tbf), from one `shoal delay-proxy` per worker namespace in
# front of each shoal worker (port 7071 -> 7070) and each rpc-server (50053 -> 50052), and shoal
# bench and llama-bench are given the proxies' addresses (--worker / --rpc). shoal's stages
# dial each other at those addresses too, so every hop gets D each way with either mechanism;
# llama.cpp's hops all go through llama-bench. The proxies share the machine's cores with the
# servers. The table's header says which mechanism ran. How llama.cpp splits the model: with -ngl 99 and split mode `layer`, the
# repeating layers plus the output layer are given to the RPC devices in contiguous runs, in
# proportion to the free memory each server reports (equal here, so even: 11/10/10 of
# SmolLM2's 30+1); the token embedding stays on llama-bench's CPU. ggml-rpc copies tensors
# between buffers of the same server only, so every activation hop from one server to the next
# goes through llama-bench's process (a star around the client), and logits come back to it.
# The split, read from llama-bench's log, is printed under the table.
#
# Bars: b/a >= 0.85 (the pipeline costs little), c/b >= 4 (batching pays), b/d >= 1.2 (faster
# than llama.cpp RPC). Nothing is written to docs/: the table goes to stdout, raw JSON and logs
# to $SHOAL_CACHE/bench/DATE-cluster/. Every process and namespace started here is removed on
# exit (trap), on failure and Ctrl-C too.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
SHOAL_CACHE="${SHOAL_CACHE:-$HOME/.cache/shoal}"
MODELS_DIR="$SHOAL_CACHE/models"
NETNS="$ROOT/scripts/netns-cluster"

THREADS=1
MODELS="smollm2,qwen"
REPS=3
CONC=16
DELAY=0.5ms
RATE=1gbit
USE_NETNS=1
LLAMA_ONLY=0
STRICT=0
while [[ $# -gt 0 ]]; do
    case "$1" in
        --threads) THREADS="$2"; shift 2 ;;
        --models) MODELS="$2"; shift 2 ;;
        --reps) REPS="$2"; shift 2 ;;
        --concurrency) CONC="$2"; shift 2 ;;
        --delay) DELAY="$2"; shift 2 ;;
        --rate) RATE="$2"; shift 2 ;;
        --no-netns) USE_NETNS=0; shift ;;
        --llama-only) LLAMA_ONLY=1; shift ;;
        --strict) STRICT=1; shift ;;
        -h|--help) awk 'NR > 1 && !/^#/ { exit } NR > 1' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
        *) echo "unknown argument: $1 (see --help)" >&2; exit 2 ;;
    esac
done

# shellcheck source=benches/lib.sh disable=SC2119
source "$ROOT/benches/lib.sh"

log() { echo "[cluster] $*" >&2; }
die() { echo "cluster.sh: $*" >&2; exit 1; }

# Processes started here (servers), and the netns cluster, removed by cleanup.
PIDS=()
CHILD=""
PREFIX=""
cleanup() {
    local rc=$?
    trap - EXIT INT TERM
    # A benchmark cut short by a signal (shoal's own local workers exit with it).
    if [[ -n "$CHILD" ]]; then PIDS+=("$CHILD"); fi
    stop_pids
    if [[ -n "$PREFIX" ]]; then "$NETNS" down "$PREFIX" 2>/dev/null || true; fi
    exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT TERM


# Waits until something listens on $2:$3 in namespace $1 ("" = this one); $4 = pid to watch.
wait_listen() {
    local ns="$1" host="$2" port="$3" pid="$4" i
    local ss=(ss -Hltn src "$host:$port")
    if [[ -n "$ns" ]]; then ss=(ip netns exec "$ns" "${ss[@]}"); fi
    for i in $(seq 300); do
        if [[ -n "$("${ss[@]}" 2>/dev/null)" ]]; then return 0; fi
        kill -0 "$pid" 2>/dev/null || die "server pid $pid ($host:$port) exited; see its log in $OUT"
        sleep 0.1
    done
    die "nothing listens on $host:$port after 30 s"
}

# Sets NSP to the command prefix that runs a command in namespace $1 ("" = here).
ns_prefix() {
    NSP=()
    if [[ -n "$1" ]]; then NSP=(ip netns exec "$1"); fi
}


# Without netem, starts a delay proxy in namespace $1 (PREFIX-wI) on port $3 in front of port $4
# of address $2 (logs: $OUT/$5.*), and sets PROXIED to its endpoint; with netem (or no delay)
# sets it to $2:$4.
proxied() {
    local ns="$1" host="$2" port="$3" to="$4" f="$OUT/$5"
    PROXIED="$host:$to"
    [[ "$MECH" == proxy && -n "$ns" ]] || return 0
    # A simple command: netns-cluster proxy execs the proxy, so $! is the proxy itself.
    SHOAL_BIN="$PROXY_BIN" "$NETNS" proxy "$PREFIX" "${ns#"$PREFIX"-}" "$port" "$to" --delay "$DELAY" \
        > "$f.out" 2> "$f.log" &
    PIDS+=($!)
    wait_listen "$ns" "$host" "$port" "$!"
    PROXIED="$host:$port"
}

# Starts the 3 ggml-rpc-servers (hosts "$@": "127.0.0.1" x3 or the worker IPs with their
# namespaces as NS=IP); sets RPC to their comma-separated endpoints (their proxies' without
# netem).
start_rpc() {
    local tag="$1" spec ns host port i=0
    shift
    RPC=""
    for spec in "$@"; do
        i=$((i + 1))
        ns="${spec%%=*}"; host="${spec#*=}"
        if [[ -z "$ns" ]]; then port="$(free_port)"; else port=50052; fi
        # A simple command, not a function, so that $! is the server itself (ip netns exec
        # execs it) and stop_pids reaches it.
        ns_prefix "$ns"
        "${NSP[@]}" "$BIN_DIR/ggml-rpc-server" -H "$host" -p "$port" -t "$THREADS" \
            > "$OUT/$tag.rpc$i.log" 2>&1 &
        PIDS+=($!)
        wait_listen "$ns" "$host" "$port" "$!"
        proxied "$ns" "$host" 50053 "$port" "$tag.rpc$i.proxy"
        RPC+="${RPC:+,}$PROXIED"
    done
}

# Starts 3 shoal workers, one per worker namespace; sets WORKER_ARGS (their proxies' addresses
# without netem).
start_shoal_workers() {
    local tag="$1" spec ns host i=0 f
    shift
    WORKER_ARGS=()
    for spec in "$@"; do
        i=$((i + 1))
        ns="${spec%%=*}"; host="${spec#*=}"
        f="$OUT/$tag.worker$i"
        ns_prefix "$ns"
        "${NSP[@]}" "$SHOAL_BIN" worker --insecure --listen "$host:7070" --name "w$i" \
            --models-dir "$MODELS_DIR" > "$f.out" 2> "$f.log" &
        PIDS+=($!)
        wait_listen "$ns" "$host" 7070 "$!"
        proxied "$ns" "$host" 7071 7070 "$tag.worker$i.proxy"
        WORKER_ARGS+=(--worker "$PROXIED")
    done
}

# shoal bench for test $2 of model file $3, in namespace $1; JSON to $4.
shoal_bench() {
    local ns="$1" test="$2" f="$3" out="$4"
    shift 4
    log "$(basename "$out" .json): shoal bench -t $THREADS -p 0 -n 128 -r $REPS $*"
    ns_prefix "$ns"
    if ! run_waited "$out" "${out%.json}.log" "${NSP[@]}" "$SHOAL_BIN" bench --insecure --model "$f" \
        --threads "$THREADS" -p 0 -n 128 --reps "$REPS" --json "$@"; then
        cat "${out%.json}.log" >&2
        die "shoal bench ($test) failed: see ${out%.json}.log"
    fi
}

llama_rpc_bench() {
    local ns="$1" f="$2" out="$3"
    log "$(basename "$out" .json): llama-bench -t $THREADS -p 0 -n 128 -r $REPS -ngl 99 --rpc $RPC"
    ns_prefix "$ns"
    if ! run_waited "$out" "${out%.json}.log" "${NSP[@]}" "$BIN_DIR/llama-bench" -m "$f" \
        -t "$THREADS" -p 0 -n 128 -r "$REPS" -ngl 99 --rpc "$RPC" -o json -v; then
        tail -5 "${out%.json}.log" >&2
        die "llama-bench over RPC failed: see ${out%.json}.log"
    fi
    grep -q "assigned to device RPC" "${out%.json}.log" \
        || die "llama-bench put no layer on the RPC servers: see ${out%.json}.log"
}

if [[ "$LLAMA_ONLY" == 0 ]]; then
    shoal_bin
    help="$("$SHOAL_BIN" bench --help)"
    for flag in --workers --worker --concurrency; do
        grep -q -- "$flag " <<< "$help" || die "this shoal has no 'shoal bench $flag' yet \
(needed for tests b and c); run with --llama-only for the llama.cpp figures alone"
    done
fi
log "ensuring llama.cpp is built"
BIN_DIR="$("$ROOT/scripts/llama-cpp/build.sh")"

OUT="$SHOAL_CACHE/bench/$(date +%Y%m%d-%H%M%S)-cluster"
mkdir -p "$OUT"
IFS=',' read -r -a MODEL_LIST <<< "$MODELS"
for m in "${MODEL_LIST[@]}"; do
    model_path "$m" > /dev/null
done

NETWORKS=(loopback)
NETNS_NOTE=""
# What delays the netns links: netem, proxy (shoal delay-proxy) or none (--delay 0).
MECH=none
MECH_NOTE=""
if [[ "$USE_NETNS" == 1 ]]; then
    [[ "$(id -u)" == 0 ]] || die "the netns cluster needs root (or pass --no-netns)"
    PREFIX="shoalb$$"
    if [[ "$DELAY" =~ ^0+(\.0*)?(ms|us|s)?$ ]]; then
        MECH=none
    elif "$NETNS" netem-check 2>/dev/null; then
        MECH=netem
    else
        MECH=proxy
        # The proxy is a shoal subcommand: --llama-only still needs a shoal binary for it.
        shoal_bin
        PROXY_BIN="$SHOAL_BIN"
        log "no netem in this kernel: the netns links get the rate limit (tbf) and the delay $DELAY \
comes from shoal delay-proxy in front of every worker and rpc-server"
    fi
    "$NETNS" up "$PREFIX" 3 --delay "$DELAY" --rate "$RATE" 2> "$OUT/netns-up.log" \
        || { cat "$OUT/netns-up.log" >&2; die "netns-cluster up failed"; }
    NETWORKS+=(netns)
    case "$MECH" in
        netem) MECH_NOTE="netns delay: netem, $DELAY one way host to host (round trip 2 x $DELAY)" ;;
        proxy) MECH_NOTE="netns delay: shoal delay-proxy (this kernel has no netem), $DELAY one way \
per hop (round trip 2 x $DELAY)" ;;
        none) MECH_NOTE="netns delay: none (--delay 0)" ;;
    esac
    NETNS_NOTE="netns: 3 worker namespaces + 1 coordinator namespace on a bridge, rate $RATE each \
way on every host's link; $MECH_NOTE"
fi

# Namespace=host of the coordinator and the 3 workers of each network.
hosts_of() {
    if [[ "$1" == loopback ]]; then
        COORD_NS=""
        HOSTS=("=127.0.0.1" "=127.0.0.1" "=127.0.0.1")
    else
        COORD_NS="$PREFIX-c"
        HOSTS=()
        for i in 1 2 3; do HOSTS+=("$PREFIX-w$i=$("$NETNS" addr "$PREFIX" "w$i" 2>/dev/null)"); done
    fi
}

for m in "${MODEL_LIST[@]}"; do
    f="$(model_path "$m")"
    if [[ "$LLAMA_ONLY" == 0 ]]; then
        shoal_bench "" a "$f" "$OUT/$m.a.json"
    fi
    for net in "${NETWORKS[@]}"; do
        hosts_of "$net"
        if [[ "$LLAMA_ONLY" == 0 ]]; then
            if [[ "$net" == loopback ]]; then
                shoal_bench "" b "$f" "$OUT/$m.$net.b.json" --workers 3
                shoal_bench "" c "$f" "$OUT/$m.$net.c.json" --workers 3 --concurrency "$CONC"
            else
                start_shoal_workers "$m.$net" "${HOSTS[@]}"
                shoal_bench "$COORD_NS" b "$f" "$OUT/$m.$net.b.json" "${WORKER_ARGS[@]}"
                shoal_bench "$COORD_NS" c "$f" "$OUT/$m.$net.c.json" "${WORKER_ARGS[@]}" \
                    --concurrency "$CONC"
                stop_pids
            fi
        fi
        start_rpc "$m.$net" "${HOSTS[@]}"
        llama_rpc_bench "$COORD_NS" "$f" "$OUT/$m.$net.d.json"
        stop_pids
    done
done
log "raw results in $OUT"

python3 - "$OUT" "$STRICT" "$CONC" "$NETNS_NOTE" "$MECH_NOTE" "${MODEL_LIST[@]}" <<'PY'
import json, re, sys
from collections import Counter
from pathlib import Path

out, strict, conc, netns_note, mech_note, models = (Path(sys.argv[1]), sys.argv[2] == "1",
                                                    sys.argv[3], sys.argv[4], sys.argv[5],
                                                    sys.argv[6:])
BARS = {"b/a": 0.85, "c/b": 4.0, "b/d": 1.2}


def shoal(p):
    # shoal bench --json prints one object: {"tg_tok_s", "tg_tok_s_std", "stages",
    # "concurrency", ...}; tg_tok_s sums the tokens of all concurrent sequences.
    if not p.exists():
        return None
    lines = [ln for ln in p.read_text().splitlines() if ln.strip()]
    s = json.loads(lines[-1])
    return s["tg_tok_s"], s.get("tg_tok_s_std"), s


def llama(p):
    if not p.exists():
        return None
    t = [t for t in json.loads(p.read_text()) if t["n_prompt"] == 0 and t["n_gen"] > 0][0]
    return t["avg_ts"], t.get("stddev_ts"), t


def fmt(v):
    if v is None:
        return "-"
    avg, std = v[0], v[1]
    return f"{avg:.2f} ± {std:.2f}" if std is not None else f"{avg:.2f}"


rows, notes, failed = [], [], False
for m in models:
    a = shoal(out / f"{m}.a.json")
    for net in ("loopback", "netns"):
        d = llama(out / f"{m}.{net}.d.json")
        if d is None:
            continue
        b = shoal(out / f"{m}.{net}.b.json")
        c = shoal(out / f"{m}.{net}.c.json")
        for name, s in (("b", b), ("c", c)):
            if s is not None:
                want = (3, 1 if name == "b" else int(conc))
                got = (s[2].get("stages"), s[2].get("concurrency"))
                if got != want:
                    notes.append(f"{m} {net} {name}: shoal bench reports stages/concurrency "
                                 f"{got}, expected {want}")
        ratios = []
        for key, num, den in (("b/a", b, a), ("c/b", c, b), ("b/d", b, d)):
            if num is None or den is None:
                ratios.append(f"- (≥ {BARS[key]})")
                continue
            r = num[0] / den[0]
            ok = r >= BARS[key]
            failed |= not ok
            ratios.append(f"{r:.2f} {'pass' if ok else 'FAIL'} (≥ {BARS[key]})")
        rows.append((m, net, fmt(a), fmt(b), fmt(c), fmt(d), *ratios))
        split = Counter(re.findall(r"assigned to device (RPC\d+)",
                                   (out / f"{m}.{net}.d.log").read_text()))
        t = d[2]
        notes.append(f"{m} {net}: llama.cpp {t['build_commit']} threads={t['n_threads']} "
                     f"rpc={t.get('gpu_info')} layers per server "
                     + " ".join(f"{k}={v}" for k, v in sorted(split.items())))

print(f"Decode tok/s, 128 tokens from an empty context; c: {conc} concurrent sequences "
      "(sum over them)." + (f" {mech_note}." if mech_note else ""))
print()
print("| model | network | a: shoal 1 process | b: shoal 3 stages | "
      f"c: shoal 3 stages × {conc} | d: llama.cpp RPC × 3 | b/a | c/b | b/d |")
print("|---|---|---:|---:|---:|---:|---|---|---|")
for r in rows:
    print("| " + " | ".join(r) + " |")
print()
if netns_note:
    notes.append(netns_note)
for n in notes:
    print(f"- {n}")
sys.exit(1 if strict and failed else 0)
PY
