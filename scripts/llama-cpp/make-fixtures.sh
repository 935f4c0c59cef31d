#!/usr/bin/env bash
# Regenerates tests/fixtures/*.json from llama.cpp (see make-fixtures.py for what they hold).
#
# Usage: scripts/llama-cpp/make-fixtures.sh [make-fixtures.py args...]
#
# Builds llama.cpp if needed (build.sh), makes a venv in the cache dir with the pinned packages
# that llama-cpp-python 0.3.36's pure-Python modules import, and runs make-fixtures.py with the
# llama-completion cross-check on. Models are read from $SHOAL_CACHE/models.
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
# shellcheck source=env.sh
source "$HERE/env.sh"

# The runtime dependencies of llama-cpp-python 0.3.36 (its pyproject.toml), pinned.
PINS=(numpy==2.2.6 typing-extensions==4.16.0 diskcache==5.6.3 jinja2==3.1.6 markupsafe==3.0.4)

BIN_DIR="$("$HERE/build.sh")"

VENV="$LCP_ROOT/venv"
STAMP="$VENV/.shoal-pins"
if [[ ! -f "$STAMP" || "$(cat "$STAMP")" != "${PINS[*]}" ]]; then
    echo "[make-fixtures] creating $VENV" >&2
    python3 -m venv "$VENV"
    "$VENV/bin/python" -m pip install --quiet "${PINS[@]}" >&2
    echo "${PINS[*]}" > "$STAMP"
fi

exec "$VENV/bin/python" "$HERE/make-fixtures.py" \
    --src "$LCP_SRC" --lib-dir "$BIN_DIR" --cross-check "$BIN_DIR/llama-completion" "$@"
