#!/usr/bin/env python3
"""Writes the llama.cpp reference fixtures in tests/fixtures/ (one JSON file per model).

Run it through make-fixtures.sh, which builds llama.cpp, makes the venv and passes the paths.

For each model and raw prompt (no chat template) it records, from llama.cpp through the
llama-cpp-python 0.3.36 ctypes bindings (low-level API only, no `Llama` class):
  - prompt_tokens: llama_tokenize(add_special=True, parse_special=False);
  - top_logits / logit_stats: the logits at the last prompt position, the prompt evaluated in
    one llama_decode call;
  - greedy_tokens: 48 argmax steps, each token fed back alone; EOS does not stop the loop;
  - greedy_text: the pieces of the greedy tokens (special=False), bytes joined, UTF-8;
  - greedy_margins: top-1 minus top-2 logit at each greedy step, to tell which steps a small
    numeric difference could flip.
With --cross-check it also runs the llama-completion binary on each model's first prompt and
checks that its greedy text is the same (guards against a bindings/config mismatch).

The bindings are imported from the extracted sdist (--src) and load the libllama.so that
scripts/llama-cpp/build.sh built (--lib-dir, via LLAMA_CPP_LIB_PATH): nothing is compiled here.
"""

from __future__ import annotations

import argparse
import ctypes
import hashlib
import json
import os
import platform
import re
import shlex
import subprocess
import sys
from pathlib import Path

N_GEN = 48
TOP_K = 64
THREADS = 2

COMMON_PROMPTS = [
    "The capital of France is",
    "def fibonacci(n):",
    "Once upon a time, there was a little robot who",
    "The three primary colors are",
    "Water boils at",
]

MODELS = {
    # file name -> (fixture stem, extra prompts)
    "SmolLM2-135M-Instruct.Q4_1.gguf": ("smollm2-135m-instruct-q4_1", []),
    "qwen2.5-coder-0.5b-instruct-q4_k_m.gguf": (
        "qwen2.5-coder-0.5b-instruct-q4_k_m",
        ["import numpy as np\n\ndef softmax(x):\n    \"\"\"Numerically stable softmax.\"\"\"\n"],
    ),
}

GGML_TYPE_NAMES = {0: "f32", 1: "f16", 8: "q8_0", 2: "q4_0", 3: "q4_1", 30: "bf16"}
FA_NAMES = {-1: "auto", 0: "disabled", 1: "enabled"}


def parse_args() -> argparse.Namespace:
    repo = Path(__file__).resolve().parents[2]
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--src", required=True, type=Path, help="extracted llama-cpp-python sdist")
    p.add_argument("--lib-dir", required=True, type=Path, help="dir holding libllama.so")
    p.add_argument("--models-dir", type=Path,
                   default=Path(os.environ.get("SHOAL_CACHE", Path.home() / ".cache/shoal"))
                   / "models")
    p.add_argument("--out-dir", type=Path, default=repo / "tests/fixtures")
    p.add_argument("--cross-check", type=Path, metavar="LLAMA_COMPLETION",
                   help="llama-completion binary to compare the first prompt's greedy text with")
    p.add_argument("--models", nargs="*", default=list(MODELS), help="model file names")
    p.add_argument("--verbose", action="store_true", help="echo llama.cpp's log")
    return p.parse_args()


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def r6(x: float) -> float:
    """Rounds to 6 decimals: about the f32 resolution of logits of magnitude 1..30."""
    return round(float(x), 6)


class Ref:
    """llama.cpp through the ctypes bindings, with its log captured."""

    def __init__(self, src: Path, lib_dir: Path, verbose: bool):
        os.environ["LLAMA_CPP_LIB_PATH"] = str(lib_dir)
        sys.path.insert(0, str(src))
        import numpy as np  # noqa: PLC0415  (needs the venv)
        import llama_cpp  # noqa: PLC0415
        import llama_cpp.llama_cpp as ll  # noqa: PLC0415

        loaded = Path(ll._lib._name).resolve()
        if loaded.parent != lib_dir.resolve():
            raise SystemExit(f"bindings loaded {loaded}, expected one in {lib_dir}")
        self.np = np
        self.ll = ll
        self.version = llama_cpp.__version__
        self.lib_path = loaded
        self.log: list[str] = []
        self.verbose = verbose

        @ll.llama_log_callback
        def on_log(level: int, text: bytes, _user: ctypes.c_void_p) -> None:
            s = text.decode("utf-8", errors="replace")
            self.log.append(s)
            if self.verbose:
                print(s, end="", file=sys.stderr)

        self._on_log = on_log  # keeps the callback alive
        ll.llama_log_set(on_log, ctypes.c_void_p(0))
        ll.llama_backend_init()

    def system_info(self) -> str:
        return self.ll.llama_print_system_info().decode().strip()

    def open(self, model_path: Path) -> "Session":
        return Session(self, model_path)


class Session:
    def __init__(self, ref: Ref, model_path: Path):
        ll = ref.ll
        self.ref, self.ll, self.np = ref, ll, ref.np
        mparams = ll.llama_model_default_params()
        self.model = ll.llama_model_load_from_file(str(model_path).encode(), mparams)
        if not self.model:
            raise SystemExit(f"failed to load {model_path}")
        self.vocab = ll.llama_model_get_vocab(self.model)
        self.n_vocab = ll.llama_vocab_n_tokens(self.vocab)
        self.cparams = ll.llama_context_default_params()
        self.cparams.n_threads = THREADS
        self.cparams.n_threads_batch = THREADS
        self.ctx = None

    def new_context(self) -> None:
        """A fresh context (empty KV cache, positions from 0) for each prompt."""
        if self.ctx:
            self.ll.llama_free(self.ctx)
        self.ref.log.clear()
        self.ctx = self.ll.llama_init_from_model(self.model, self.cparams)
        if not self.ctx:
            raise SystemExit("failed to create a context")

    def settings(self) -> dict:
        ll, c = self.ll, self.cparams
        log = "".join(self.ref.log)
        fa_req = FA_NAMES.get(c.flash_attn_type, str(c.flash_attn_type))
        fa = fa_req
        if c.flash_attn_type == -1:
            # resolve_fused_ops() logs how auto resolved; the API exposes no getter for it.
            if re.search(r"Flash Attention enabled", log):
                fa = "enabled"
            elif re.search(r"Flash Attention not supported", log):
                fa = "disabled"
            else:
                fa = "auto (resolution not logged)"
        return {
            "n_ctx": ll.llama_n_ctx(self.ctx),
            "n_batch": ll.llama_n_batch(self.ctx),
            "n_ubatch": ll.llama_n_ubatch(self.ctx),
            "n_threads": ll.llama_n_threads(self.ctx),
            "n_threads_batch": ll.llama_n_threads_batch(self.ctx),
            "flash_attn_type": fa_req,
            "flash_attn_resolved": fa,
            "type_k": GGML_TYPE_NAMES.get(c.type_k, str(c.type_k)),
            "type_v": GGML_TYPE_NAMES.get(c.type_v, str(c.type_v)),
            "n_gpu_layers": 0,
        }

    def tokenize(self, text: str) -> list[int]:
        ll = self.ll
        data = text.encode("utf-8")
        cap = len(data) + 8
        buf = (ll.llama_token * cap)()
        n = ll.llama_tokenize(self.vocab, data, len(data), buf, cap, True, False)
        if n < 0:
            raise SystemExit(f"tokenize failed ({n})")
        return list(buf[:n])

    def piece(self, tok: int) -> bytes:
        buf = ctypes.create_string_buffer(256)
        n = self.ll.llama_token_to_piece(self.vocab, tok, buf, len(buf), 0, False)
        if n < 0:
            raise SystemExit(f"token_to_piece({tok}) failed ({n})")
        return buf.raw[:n]

    def decode(self, tokens: list[int]):
        """Evaluates tokens as one batch; returns the last position's logits (float32 copy)."""
        ll, np = self.ll, self.np
        arr = (ll.llama_token * len(tokens))(*tokens)
        batch = ll.llama_batch_get_one(arr, len(tokens))
        rc = ll.llama_decode(self.ctx, batch)
        if rc != 0:
            raise SystemExit(f"llama_decode failed ({rc})")
        ptr = ll.llama_get_logits_ith(self.ctx, -1)
        return np.ctypeslib.as_array(ptr, shape=(self.n_vocab,)).copy()

    def is_eog(self, tok: int) -> bool:
        return bool(self.ll.llama_vocab_is_eog(self.vocab, tok))

    def close(self) -> None:
        if self.ctx:
            self.ll.llama_free(self.ctx)
        self.ll.llama_model_free(self.model)


def run_case(s: Session, prompt: str) -> tuple[dict, dict]:
    np = s.np
    s.new_context()
    tokens = s.tokenize(prompt)
    logits = s.decode(tokens)
    settings = s.settings()

    # Top-k by logit, ties by lower id (a stable sort of -logit).
    order = np.argsort(-logits, kind="stable")[:TOP_K]
    top = [[int(i), r6(logits[i])] for i in order]
    l64 = logits.astype(np.float64)
    stats = {
        "n_vocab": int(logits.shape[0]),
        "max": r6(l64.max()),
        "min": r6(l64.min()),
        "mean": r6(l64.mean()),
        "l2_norm": r6(np.sqrt((l64 * l64).sum())),
    }

    greedy: list[int] = []
    margins: list[float] = []
    eog_steps: list[int] = []
    for step in range(N_GEN):
        # np.argmax takes the first maximum, as llama.cpp's greedy sampler does.
        tok = int(np.argmax(logits))
        top2 = np.partition(logits, -2)[-2:]
        margins.append(round(float(top2[1] - top2[0]), 4))
        greedy.append(tok)
        if s.is_eog(tok):
            eog_steps.append(step)
        if step + 1 < N_GEN:
            logits = s.decode([tok])

    text = b"".join(s.piece(t) for t in greedy).decode("utf-8", errors="replace")
    case = {
        "prompt": prompt,
        "prompt_tokens": tokens,
        "greedy_tokens": greedy,
        "greedy_text": text,
        "greedy_eog_steps": eog_steps,
        "greedy_margins": margins,
        "top_logits": top,
        "logit_stats": stats,
    }
    return case, settings


def cross_check(binary: Path, model: Path, prompt: str, want: str, n_ctx: int) -> dict:
    """Runs llama-completion greedily; its text must equal `want` (ours up to the first EOG)."""
    cmd = [
        str(binary), "-m", str(model), "-p", prompt, "-n", str(N_GEN),
        "--temp", "0", "-no-cnv", "-t", str(THREADS), "-tb", str(THREADS),
        "-c", str(n_ctx), "--no-display-prompt", "--no-warmup", "-s", "0",
    ]
    out = subprocess.run(cmd, capture_output=True, check=True, timeout=600).stdout
    # llama-completion ends its output with "\n\n" (completion.cpp, on exit).
    got = out.decode("utf-8", errors="replace").removesuffix("\n\n")
    ok = got == want
    shown = [model.name if a == str(model) else a for a in cmd[1:]]
    return {
        "binary": "llama-completion",
        "args": shlex.join(shown),
        "prompt": prompt,
        "text": got,
        "matches": ok,
    }


def cpu_summary() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


def llama_commit(src: Path, lib_dir: Path) -> str:
    info = lib_dir.parent / "common" / "build-info.cpp"
    if info.exists():
        m = re.search(r'LLAMA_COMMIT = "([^"]+)"', info.read_text())
        if m:
            return m.group(1)
    try:
        return subprocess.run(["git", "-C", str(src / "vendor/llama.cpp"), "rev-parse",
                               "--short", "HEAD"], capture_output=True, text=True,
                              check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def main() -> None:
    args = parse_args()
    ref = Ref(args.src, args.lib_dir, args.verbose)
    system_info = ref.system_info()
    args.out_dir.mkdir(parents=True, exist_ok=True)
    mismatches = 0
    for name in args.models:
        stem, extra = MODELS[name]
        path = args.models_dir / name
        prompts = COMMON_PROMPTS + extra
        print(f"[make-fixtures] {name}: {len(prompts)} prompts", file=sys.stderr)
        s = ref.open(path)
        cases, settings = [], None
        for prompt in prompts:
            case, st = run_case(s, prompt)
            if settings is None:
                settings = st
            elif st != settings:
                raise SystemExit(f"settings changed between prompts: {settings} vs {st}")
            cases.append(case)
            print(f"  {prompt!r}: {case['greedy_tokens'][:10]} ... {case['greedy_text']!r}",
                  file=sys.stderr)
        # llama-completion stops at an EOG; ours goes on, so compare the text before it.
        first = cases[0]
        n_cmp = (first["greedy_eog_steps"] or [N_GEN])[0]
        want = b"".join(s.piece(t) for t in first["greedy_tokens"][:n_cmp]).decode(
            "utf-8", errors="replace")
        s.close()

        settings.update({
            "add_special": True,
            "parse_special": False,
            "n_gen": N_GEN,
            "top_k_saved": TOP_K,
            "sampling": "argmax (first maximum), EOG does not stop",
            "detokenize": "llama_token_to_piece(special=False), bytes joined, UTF-8",
            "llama_cpp_commit": llama_commit(args.src, args.lib_dir),
            "llama_system_info": system_info,
            "cpu": cpu_summary(),
        })
        doc = {
            "model": name,
            "model_sha256": sha256(path),
            "generator": {
                "script": "scripts/llama-cpp/make-fixtures.py",
                "llama_cpp_python": ref.version,
            },
            "settings": settings,
            "cases": cases,
        }
        if args.cross_check:
            cc = cross_check(args.cross_check, path, first["prompt"], want, settings["n_ctx"])
            print(f"  cross-check llama-completion: matches={cc['matches']} {cc['text']!r}",
                  file=sys.stderr)
            doc["cross_check"] = cc
            if not cc["matches"]:
                print(f"  MISMATCH: bindings {want!r}", file=sys.stderr)
                mismatches += 1
        out = args.out_dir / f"{stem}.json"
        write_json(out, doc)
        print(f"[make-fixtures] wrote {out}", file=sys.stderr)
    if mismatches:
        raise SystemExit(f"{mismatches} llama-completion cross-check(s) did not match")


def write_json(path: Path, doc: dict) -> None:
    """Compact JSON, one case per line, so diffs of a regenerated fixture stay readable."""
    cases = doc.pop("cases")
    head = json.dumps(doc, ensure_ascii=False, indent=1)
    body = ",\n".join("  " + json.dumps(c, ensure_ascii=False, separators=(",", ":"))
                      for c in cases)
    path.write_text(head[:-2] + ',\n "cases": [\n' + body + "\n ]\n}\n", encoding="utf-8")
    doc["cases"] = cases
    json.loads(path.read_text(encoding="utf-8"))  # well-formed


if __name__ == "__main__":
    main()
