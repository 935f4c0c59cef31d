#!/usr/bin/env bash
# Planner check against reality: predicted vs measured decode and prefill on local clusters
# of 1, 2 and 3 worker processes with unequal thread counts, both test models.
#
# Usage: benches/planner.sh [--models smollm2,qwen] [--reps R] [--threads 2,1,1] [--strict]
#
#   --threads LIST  compute threads of worker 1, 2, 3 (default 2,1,1: unequal, so the
#                   optimizer's split is not the even one); clusters of N workers use the
#                   first N entries
#   --strict        exit 1 when a decode measured/predicted ratio is outside [0.75, 1.25]
#
# Each run is `shoal bench -m M --workers N --worker-threads T1,..,TN -p 128 -n 64 -r R`:
# the coordinator asks every worker to calibrate its kernels on its thread count
# and to time the model's own block shapes (GetInventory with calibrate and probes), plans with shoal-planner's optimizer, loads that plan, then
# measures pp128 and tg64; the table shows the plan's layer split, the measured figure, the
# plan's prediction and their ratio, and each stage's measured compute per decode step
# (the workers' Stats) beside its predicted time. Nothing is written to docs/.
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
log() { echo "planner.sh: $*" >&2; }
die() { log "$*"; exit 1; }
# shellcheck source=benches/lib.sh
source "$ROOT/benches/lib.sh"
PIDS=()
CHILD=""
SHOAL_CACHE="${SHOAL_CACHE:-$HOME/.cache/shoal}"
MODELS_DIR="$SHOAL_CACHE/models"

MODELS="smollm2,qwen"
REPS=3
THREADS="2,1,1"
STRICT=0
while [[ $# -gt 0 ]]; do
    case "$1" in
        --models) MODELS="$2"; shift 2 ;;
        --reps) REPS="$2"; shift 2 ;;
        --threads) THREADS="$2"; shift 2 ;;
        --strict) STRICT=1; shift ;;
        *) die "unknown argument: $1" ;;
    esac
done
IFS=, read -r -a TH <<< "$THREADS"
[[ ${#TH[@]} -ge 3 ]] || die "--threads needs three entries"
shoal_bin

echo "| model | workers | threads | layers | test | measured tok/s | predicted tok/s | measured/predicted | per stage ms measured/predicted (decode) |"
echo "|---|---|---|---|---|---|---|---|---|"
bad=0
IFS=, read -r -a MS <<< "$MODELS"
for m in "${MS[@]}"; do
    file="$(model_path "$m")"
    for n in 1 2 3; do
        t="$(IFS=,; echo "${TH[*]:0:$n}")"
        json="$("$SHOAL_BIN" bench -m "$file" --workers "$n" --worker-threads "$t" -p 128 -n 64 -r "$REPS" --json 2>/dev/null)"
        python3 - "$m" "$n" "$t" "$json" <<'PY' || bad=1
import json, sys
m, n, t, j = sys.argv[1], sys.argv[2], sys.argv[3], json.loads(sys.argv[4])
ok = True
stages = " ".join(f"{a:.2f}/{b:.2f}" for a, b in zip(j["stage_compute_ms"], j["stage_predicted_ms"]))
for test, meas, pred in (("pp128", j["pp_tok_s"], j["pp_predicted_tok_s"]), ("tg64", j["tg_tok_s"], j["tg_predicted_tok_s"])):
    r = meas / pred
    if test == "tg64":
        ok &= 0.75 <= r <= 1.25
    print(f"| {m} | {n} | {t} | {j['layers']} | {test} | {meas:.1f} | {pred:.1f} | {r:.2f} | {stages if test == 'tg64' else ''} |")
sys.exit(0 if ok else 1)
PY
    done
done
if [[ $bad -ne 0 ]]; then
    log "some decode ratios are outside [0.75, 1.25]"
    [[ $STRICT -eq 1 ]] && exit 1
fi
exit 0
