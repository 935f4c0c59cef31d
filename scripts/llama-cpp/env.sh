# shellcheck shell=bash
# Paths and pins shared by the llama.cpp reference scripts; sourced, not run.
#
# The reference is the llama.cpp vendored in the llama-cpp-python sdist from PyPI, so one pinned
# version names the C++ engine (fixtures, benchmarks) and the Python bindings (fixtures) together.
# Nothing from llama.cpp is copied into this repository: everything lives under the cache dir.

LCP_VERSION=0.3.36
# sha256 of llama_cpp_python-0.3.36.tar.gz as PyPI serves it; its vendor/llama.cpp is at 0c1e570.
LCP_SDIST_SHA256=832db0699007f1be95a7e41ef12e88926b02ba836461e36a36372db2760c1a2e

SHOAL_CACHE="${SHOAL_CACHE:-$HOME/.cache/shoal}"
LCP_ROOT="$SHOAL_CACHE/llama.cpp-$LCP_VERSION"
LCP_SDIST="$LCP_ROOT/llama_cpp_python-$LCP_VERSION.tar.gz"
# Extracted sdist: llama_cpp/ (pure-Python bindings) and vendor/llama.cpp/ (C++ sources).
LCP_SRC="${LLAMA_CPP_PYTHON_SRC:-$LCP_ROOT/llama_cpp_python-$LCP_VERSION}"
LLAMA_BUILD_DIR="${LLAMA_BUILD_DIR:-$LCP_ROOT/build}"
# Binaries and shared libraries (libllama.so, libggml*.so) land together here.
LLAMA_BIN_DIR="$LLAMA_BUILD_DIR/bin"
# The RPC worker is `ggml-rpc-server` in this llama.cpp (once `rpc-server`).
LLAMA_TARGETS=(llama-bench llama-completion llama-server ggml-rpc-server llama)
