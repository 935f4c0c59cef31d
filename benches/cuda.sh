#!/usr/bin/env bash
# GPU benchmark: shoal's CUDA path against llama.cpp built with CUDA, on the same GPU, in one
# run. Needs an NVIDIA GPU with a driver, `libnvrtc.so.12` (scripts/fetch-nvrtc) and, for the
# llama.cpp side, `nvcc` (a CUDA toolkit) to build llama.cpp with -DGGML_CUDA=ON.
#
# Usage: benches/cuda.sh [--models smollm2,qwen] [--reps R] [--gpu N]
#
# For each model: prefill of 512 tokens (pp512) and decode of 128 (tg128),
#   CUDA_VISIBLE_DEVICES=N llama-bench -m MODEL -ngl 99 -p 512 -n 128 -r R -o json
#   target/release/shoal bench --model MODEL --device cuda:0 --n-prompt 512 --n-gen 128 --reps R --json
# and prints a markdown table of tok/s with the ratio shoal / llama.cpp. Without nvcc the
# llama.cpp column is left out and the script says why; without a GPU it stops at once.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
SHOAL_CACHE="${SHOAL_CACHE:-$HOME/.cache/shoal}"
MODELS="smollm2,qwen"
REPS=3
GPU=0
while [[ $# -gt 0 ]]; do
    case "$1" in
        --models) MODELS="$2"; shift 2 ;;
        --reps) REPS="$2"; shift 2 ;;
        --gpu) GPU="$2"; shift 2 ;;
        -h|--help) sed -n '2,12p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
        *) echo "unknown argument: $1 (see --help)" >&2; exit 2 ;;
    esac
done
export CUDA_VISIBLE_DEVICES="$GPU"

command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader >&2 \
    || { echo "no nvidia-smi: this benchmark needs an NVIDIA GPU and its driver" >&2; exit 1; }
nvrtc="${SHOAL_NVRTC_DIR:-$("$ROOT/scripts/fetch-nvrtc")}"
export LD_LIBRARY_PATH="$nvrtc${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"

(cd "$ROOT" && cargo build --release --features shoal-coordinator/cuda -p shoal-coordinator >&2)
SHOAL="$ROOT/target/release/shoal"

# llama.cpp with CUDA, from the same sdist as the CPU reference, in its own build dir.
LLAMA_BENCH=""
if command -v nvcc >/dev/null; then
    src="$("$ROOT/scripts/llama-cpp/build.sh" --source)"
    build="$SHOAL_CACHE/llama.cpp-cuda-build"
    if [ ! -x "$build/bin/llama-bench" ]; then
        cmake -S "$src/vendor/llama.cpp" -B "$build" -DCMAKE_BUILD_TYPE=Release -DGGML_CUDA=ON \
            -DLLAMA_CURL=OFF -DGGML_NATIVE=ON >&2
        cmake --build "$build" --target llama-bench -j"$(nproc)" >&2
    fi
    LLAMA_BENCH="$build/bin/llama-bench"
else
    echo "no nvcc: llama.cpp cannot be built with CUDA here; printing shoal's figures alone" >&2
fi

model_file() {
    case "$1" in
        smollm2) echo "SmolLM2-135M-Instruct.Q4_1.gguf" ;;
        qwen) echo "qwen2.5-coder-0.5b-instruct-q4_k_m.gguf" ;;
        *) echo "unknown model $1" >&2; exit 2 ;;
    esac
}

echo "| model | test | shoal cuda tok/s | llama.cpp cuda tok/s | ratio |"
echo "|---|---|---|---|---|"
IFS=',' read -ra ms <<< "$MODELS"
for m in "${ms[@]}"; do
    f="$SHOAL_CACHE/models/$(model_file "$m")"
    "$ROOT/scripts/fetch-models" "$m" >/dev/null
    sj="$("$SHOAL" bench --model "$f" --device cuda:0 --n-prompt 512 --n-gen 128 --reps "$REPS" --json)"
    lj="[]"
    [ -n "$LLAMA_BENCH" ] && lj="$("$LLAMA_BENCH" -m "$f" -ngl 99 -p 512 -n 128 -r "$REPS" -o json)"
    python3 - "$m" "$sj" "$lj" <<'PY'
import json, sys
m, s, l = sys.argv[1], json.loads(sys.argv[2]), json.loads(sys.argv[3])
ll = {("pp" if r["n_prompt"] else "tg"): r["avg_ts"] for r in l}
for test, key in (("pp512", "pp"), ("tg128", "tg")):
    ours = s[f"{key}_tok_s"]
    theirs = ll.get(key)
    ratio = f"{ours / theirs:.2f}x" if theirs else "n/a"
    print(f"| {m} | {test} | {ours:.1f} | {theirs:.1f} | {ratio} |" if theirs else f"| {m} | {test} | {ours:.1f} | n/a | n/a |")
PY
done
