# shellcheck shell=bash
# Shared by the benchmark scripts (sourced, not run): model names, process handling, and
# finding the shoal binary. Each script defines log() and die() with its own prefix, and
# owns the PIDS array and CHILD variable used here.

# The cached file of a test model given by its short name.
model_file() {
    case "$1" in
        smollm2) echo "SmolLM2-135M-Instruct.Q4_1.gguf" ;;
        qwen) echo "qwen2.5-coder-0.5b-instruct-q4_k_m.gguf" ;;
        *) echo "unknown model '$1' (smollm2, qwen)" >&2; exit 2 ;;
    esac
}

# The cached path of a test model given by its short name (under the caller's MODELS_DIR);
# fails with a message when it has not been fetched.
model_path() {
    local f
    f="$MODELS_DIR/$(model_file "$1")"
    [[ -f "$f" ]] || { echo "missing model $f: run scripts/fetch-models" >&2; return 1; }
    echo "$f"
}

# Succeeds while process $1 runs (exited but unreaped children count as gone).
alive() {
    local st
    st="$(sed 's/.*) //' "/proc/$1/stat" 2>/dev/null | cut -d' ' -f1)"
    [[ -n "$st" && "$st" != Z ]]
}

# shellcheck disable=SC2120  # callers without arguments stop every PID
# Stops the processes "$@" (default: all of PIDS): TERM, up to 5 s, then KILL; removes them
# from PIDS.
stop_pids() {
    local stop=("$@") p q left keep=()
    if [[ $# -eq 0 ]]; then stop=("${PIDS[@]}"); fi
    [[ ${#stop[@]} -gt 0 ]] || return 0
    kill -TERM "${stop[@]}" 2>/dev/null || true
    for _ in $(seq 50); do
        left=0
        for p in "${stop[@]}"; do if alive "$p"; then left=1; fi; done
        [[ "$left" == 1 ]] || break
        sleep 0.1
    done
    kill -KILL "${stop[@]}" 2>/dev/null || true
    { wait "${stop[@]}" || true; } 2>/dev/null
    for p in "${PIDS[@]}"; do
        for q in "${stop[@]}"; do if [[ "$p" == "$q" ]]; then continue 2; fi; done
        keep+=("$p")
    done
    PIDS=("${keep[@]}")
}

# A free TCP port on 127.0.0.1 (free now; the server binds it right after).
free_port() {
    python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}

# Runs "$@" with stdout to $1 and stderr to $2, in the background and waited for: bash runs
# traps only between foreground commands, so this way a signal ends the run at once.
run_waited() {
    local out="$1" err="$2" rc=0
    shift 2
    "$@" > "$out" 2> "$err" &
    CHILD=$!
    wait "$CHILD" || rc=$?
    CHILD=""
    return "$rc"
}

# Sets SHOAL_BIN: the one given in the environment, else a fresh release build.
shoal_bin() {
    if [[ -n "${SHOAL_BIN:-}" ]]; then
        log "using SHOAL_BIN=$SHOAL_BIN (not building)"
    else
        log "building shoal (release)"
        (cd "$ROOT" && cargo build --release -p shoal-coordinator >&2)
        SHOAL_BIN="${CARGO_TARGET_DIR:-$ROOT/target}/release/shoal"
    fi
}

# The value of metadata key $2 of GGUF file $1, as `shoal info --metadata` prints it (strings
# unquoted); empty when the file has no such key. Needs SHOAL (the binary).
gguf_meta() {
    "$SHOAL" info --model "$1" --metadata | sed -n "s/^  $2 = //p" | tr -d '"'
}

# bench_worker VAR NS LISTEN DIR: starts `shoal worker` (in network namespace NS unless
# empty) listening on LISTEN and serving models dir DIR, adds it to PIDS, waits until it
# listens and sets VAR to its address. (Not in a `$(...)`: PIDS must be the caller's.)
bench_worker() {
    local var="$1" ns="$2" listen="$3" dir="$4" out
    out="$(mktemp)"
    local cmd=("$SHOAL" --insecure worker --listen "$listen" --models-dir "$dir")
    [[ -n "$ns" ]] && cmd=(ip netns exec "$ns" "${cmd[@]}")
    "${cmd[@]}" > "$out" 2>/dev/null &
    PIDS+=($!)
    for _ in $(seq 100); do
        if grep -q "listening on" "$out"; then
            printf -v "$var" '%s' "$(sed -n 's/^listening on //p' "$out" | head -1)"
            rm -f "$out"
            return
        fi
        sleep 0.1
    done
    echo "a worker did not start" >&2
    return 1
}
