#!/usr/bin/env bash
# Builds the reference llama.cpp (the one vendored in llama-cpp-python 0.3.36) for CPU.
#
# Usage: scripts/llama-cpp/build.sh            # prints the bin dir on stdout, logs on stderr
#        scripts/llama-cpp/build.sh --source    # step 1 only: prints the extracted sdist's dir
#
# Steps, each skipped when already done:
#   1. `pip download` the llama-cpp-python sdist into $SHOAL_CACHE/llama.cpp-0.3.36/, check its
#      sha256, extract it (llama_cpp/ = Python bindings, vendor/llama.cpp/ = C++ sources).
#   2. Configure with cmake: Release, shared libs, RPC on, curl off, GGML_NATIVE=ON.
#   3. Build llama-bench llama-completion llama-server ggml-rpc-server and libllama, -j$(nproc).
#
# Environment:
#   SHOAL_CACHE            cache root (default ~/.cache/shoal)
#   LLAMA_BUILD_DIR        build dir (default $SHOAL_CACHE/llama.cpp-0.3.36/build); point it at an
#                          existing build to reuse it: it is used as is when its binaries exist
#                          and its CMakeCache.txt has the options below
#   LLAMA_CPP_PYTHON_SRC   an already extracted sdist to use instead of downloading one
#   LLAMA_EXTRA_FLAGS      C/C++ flags, replacing the default `-mno-amx-tile -mno-amx-int8
#                          -mno-amx-bf16`; set it empty to let -march=native pick AMX
#
# AMX: with GGML_NATIVE=ON, a host whose CPU has AMX (Sapphire Rapids and later) would compile
# ggml's AMX kernels, which change both speed and rounding for the quantized matmuls. The flags
# are always passed (when the compiler accepts them), so every host builds the same kernel set:
# the fixtures' numerics and the benchmark baseline then mean the same thing everywhere. On a host
# without AMX (e.g. the AMD EPYC dev machines) they are no-ops.
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
# shellcheck source=env.sh
source "$HERE/env.sh"

log() { echo "[llama-cpp/build] $*" >&2; }

fetch_sdist() {
    if [[ -f "$LCP_SRC/llama_cpp/__init__.py" && -f "$LCP_SRC/vendor/llama.cpp/CMakeLists.txt" ]]
    then
        log "sdist present: $LCP_SRC"
        return
    fi
    mkdir -p "$LCP_ROOT"
    if [[ ! -f "$LCP_SDIST" ]]; then
        log "downloading llama-cpp-python==$LCP_VERSION sdist"
        python3 -m pip download --quiet --no-deps --no-binary llama-cpp-python \
            --dest "$LCP_ROOT" "llama-cpp-python==$LCP_VERSION" >&2
    fi
    local got
    got="$(sha256sum "$LCP_SDIST" | cut -d' ' -f1)"
    if [[ "$got" != "$LCP_SDIST_SHA256" ]]; then
        log "sha256 mismatch for $LCP_SDIST: got $got, want $LCP_SDIST_SHA256"
        exit 1
    fi
    log "extracting $LCP_SDIST"
    local tmp
    tmp="$(mktemp -d "$LCP_ROOT/extract.XXXXXX")"
    tar -xzf "$LCP_SDIST" -C "$tmp"
    rm -rf "$LCP_SRC"
    mv "$tmp/llama_cpp_python-$LCP_VERSION" "$LCP_SRC"
    rmdir "$tmp"
}

# Default C/C++ flags: the -mno-amx-* set, if the compiler knows it.
default_flags() {
    local flags="-mno-amx-tile -mno-amx-int8 -mno-amx-bf16"
    # shellcheck disable=SC2086
    if echo 'int main(void){return 0;}' | "${CC:-cc}" $flags -x c - -o /dev/null 2>/dev/null
    then
        echo "$flags"
    fi
}

# The options that define the build; `KEY:TYPE=VALUE` as CMakeCache.txt spells them.
wanted_cache_lines() {
    echo "CMAKE_BUILD_TYPE:STRING=Release"
    echo "BUILD_SHARED_LIBS:BOOL=ON"
    echo "GGML_NATIVE:BOOL=ON"
    echo "GGML_RPC:BOOL=ON"
    echo "CMAKE_C_FLAGS:STRING=$FLAGS"
    echo "CMAKE_CXX_FLAGS:STRING=$FLAGS"
}

cache_matches() {
    local cache="$LLAMA_BUILD_DIR/CMakeCache.txt" line
    [[ -f "$cache" ]] || return 1
    grep -Eq '^LLAMA_CURL:[A-Z]+=OFF$' "$cache" || return 1
    while read -r line; do
        grep -qxF "$line" "$cache" || return 1
    done < <(wanted_cache_lines)
}

built() {
    local t
    for t in llama-bench llama-completion llama-server ggml-rpc-server; do
        [[ -x "$LLAMA_BIN_DIR/$t" ]] || return 1
    done
    [[ -f "$LLAMA_BIN_DIR/libllama.so" ]]
}

if [[ -n "${LLAMA_EXTRA_FLAGS+set}" ]]; then
    FLAGS="$LLAMA_EXTRA_FLAGS"
else
    FLAGS="$(default_flags)"
fi

if [[ "${1:-}" == "--source" ]]; then
    fetch_sdist
    echo "$LCP_SRC"
    exit 0
fi

if built && cache_matches; then
    log "up to date: $LLAMA_BUILD_DIR"
    # The bindings and make-fixtures.py still need the sources.
    fetch_sdist
    echo "$LLAMA_BIN_DIR"
    exit 0
fi

fetch_sdist
if ! cache_matches; then
    log "configuring $LLAMA_BUILD_DIR (flags: '${FLAGS}')"
    cmake -S "$LCP_SRC/vendor/llama.cpp" -B "$LLAMA_BUILD_DIR" \
        -DCMAKE_BUILD_TYPE=Release \
        -DBUILD_SHARED_LIBS=ON \
        -DLLAMA_CURL=OFF \
        -DGGML_RPC=ON \
        -DGGML_NATIVE=ON \
        -DCMAKE_C_FLAGS="$FLAGS" \
        -DCMAKE_CXX_FLAGS="$FLAGS" >&2
fi
log "building ${LLAMA_TARGETS[*]} with -j$(nproc)"
cmake --build "$LLAMA_BUILD_DIR" --config Release -j"$(nproc)" --target "${LLAMA_TARGETS[@]}" >&2
built || { log "build finished but binaries are missing in $LLAMA_BIN_DIR"; exit 1; }
echo "$LLAMA_BIN_DIR"
