#!/usr/bin/env bash
# End-to-end speed benchmark: shoal against llama.cpp, both measured in this run.
#
# Usage: benches/e2e.sh [--threads N] [--models smollm2,qwen] [--reps R] [--llama-only] [--strict]
#
#   --threads N    threads for both engines (default: nproc)
#   --models LIST  comma-separated, from: smollm2, qwen (default: both)
#   --reps R       repetitions per test (default: 3)
#   --llama-only   skip shoal (to read the llama.cpp targets alone)
#   --strict       exit 1 when a bar fails
#
# For each model it runs prefill of 512 tokens (pp512) and decode of 128 tokens (tg128):
#   llama-bench -m MODEL -t N -p 512 -n 128 -r R -o json
#   target/release/shoal bench --model MODEL --threads N --n-prompt 512 --n-gen 128 --reps R --json
# and prints a markdown table of tok/s with the ratio shoal / llama.cpp and the bars:
# decode (tg) >= 0.8x, prefill (pp) >= 0.5x. llama.cpp runs with its defaults (flash attention
# auto, f16 KV cache, n_batch 2048, n_ubatch 512, weight repacking on), built by
# scripts/llama-cpp/build.sh. Nothing is written to docs/: the table goes to stdout, raw JSON to
# $SHOAL_CACHE/bench/.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
SHOAL_CACHE="${SHOAL_CACHE:-$HOME/.cache/shoal}"
MODELS_DIR="$SHOAL_CACHE/models"

THREADS="$(nproc)"
MODELS="smollm2,qwen"
REPS=3
LLAMA_ONLY=0
STRICT=0
while [[ $# -gt 0 ]]; do
    case "$1" in
        --threads) THREADS="$2"; shift 2 ;;
        --models) MODELS="$2"; shift 2 ;;
        --reps) REPS="$2"; shift 2 ;;
        --llama-only) LLAMA_ONLY=1; shift ;;
        --strict) STRICT=1; shift ;;
        -h|--help) sed -n '2,19p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
        *) echo "unknown argument: $1 (see --help)" >&2; exit 2 ;;
    esac
done

# shellcheck source=benches/lib.sh
source "$ROOT/benches/lib.sh"

log() { echo "[e2e] $*" >&2; }

if [[ "$LLAMA_ONLY" == 0 ]]; then
    shoal_bin
fi
log "ensuring llama.cpp is built"
BIN_DIR="$("$ROOT/scripts/llama-cpp/build.sh")"

OUT="$SHOAL_CACHE/bench/$(date +%Y%m%d-%H%M%S)"
mkdir -p "$OUT"
IFS=',' read -r -a MODEL_LIST <<< "$MODELS"
for m in "${MODEL_LIST[@]}"; do
    f="$(model_path "$m")"
    log "$m: llama-bench -t $THREADS -p 512 -n 128 -r $REPS"
    "$BIN_DIR/llama-bench" -m "$f" -t "$THREADS" -p 512 -n 128 -r "$REPS" -o json \
        > "$OUT/$m.llama.json" 2> "$OUT/$m.llama.log"
    if [[ "$LLAMA_ONLY" == 0 ]]; then
        log "$m: shoal bench --threads $THREADS --n-prompt 512 --n-gen 128 --reps $REPS"
        "$SHOAL_BIN" bench --model "$f" --threads "$THREADS" \
            --n-prompt 512 --n-gen 128 --reps "$REPS" --json \
            > "$OUT/$m.shoal.json" 2> "$OUT/$m.shoal.log"
    fi
done
log "raw results in $OUT"

python3 - "$OUT" "$STRICT" "${MODEL_LIST[@]}" <<'PY'
import json, sys
from pathlib import Path

out, strict, models = Path(sys.argv[1]), sys.argv[2] == "1", sys.argv[3:]
BARS = {"pp512": 0.5, "tg128": 0.8}
FA = {-1: "auto", 0: "off", 1: "on", "-1": "auto", "0": "off", "1": "on"}


def fmt(avg, std):
    return f"{avg:.2f} ± {std:.2f}" if std is not None else f"{avg:.2f}"


rows, failed, notes = [], False, []
for m in models:
    llama = {}
    for t in json.loads((out / f"{m}.llama.json").read_text()):
        test = f"pp{t['n_prompt']}" if t["n_gen"] == 0 else f"tg{t['n_gen']}"
        llama[test] = (t["avg_ts"], t.get("stddev_ts"))
        notes.append(f"{m}: llama.cpp {t['build_commit']} fa={FA.get(t['flash_attn'], t['flash_attn'])} "
                     f"kv={t['type_k']}/{t['type_v']} n_batch={t['n_batch']} "
                     f"n_ubatch={t['n_ubatch']} threads={t['n_threads']} "
                     f"repack={t.get('repack')} cpu={t['cpu_info']}")
    shoal = {}
    sp = out / f"{m}.shoal.json"
    if sp.exists():
        # shoal bench --json prints one object:
        # {"model", "threads", "pp_tok_s", "tg_tok_s", "pp_tok_s_std", "tg_tok_s_std"}
        lines = [ln for ln in sp.read_text().splitlines() if ln.strip()]
        s = json.loads(lines[-1])
        shoal["pp512"] = (s["pp_tok_s"], s.get("pp_tok_s_std"))
        shoal["tg128"] = (s["tg_tok_s"], s.get("tg_tok_s_std"))
    for test in ("pp512", "tg128"):
        l_avg, l_std = llama[test]
        if test in shoal:
            s_avg, s_std = shoal[test]
            ratio = s_avg / l_avg
            ok = ratio >= BARS[test]
            failed |= not ok
            rows.append((m, test, fmt(l_avg, l_std), fmt(s_avg, s_std), f"{ratio:.2f}x",
                         f"{'pass' if ok else 'FAIL'} (≥ {BARS[test]}x)"))
        else:
            rows.append((m, test, fmt(l_avg, l_std), "-", "-", f"- (≥ {BARS[test]}x)"))

print("| model | test | llama.cpp tok/s | shoal tok/s | ratio | bar |")
print("|---|---|---:|---:|---:|---|")
for r in rows:
    print("| " + " | ".join(r) + " |")
print()
for n in dict.fromkeys(notes):
    print(f"- {n}")
sys.exit(1 if strict and failed else 0)
PY
