"""The OpenAI API test suite of `shoal serve`, driven by the official `openai` Python package.

Usage: openai_suite.py --base URL --model ID [--shoal BIN --model-path GGUF] [--api-key KEY]
                       [--state-dir DIR] [--batch-file FILE] [--keep-going] [CASE...]

Runs the named cases (all by default) against a running `shoal serve`, in order. Each case
asserts the exact shapes the client expects and prints `ok CASE`, or `SKIP CASE: why` when the
server lacks the feature and says so. The first failure prints `FAIL CASE: what` (with the
request and the response) and exits 1; with --keep-going the other cases still run and the exit
status is 1 if any failed. `--shoal`/`--model-path` let `completions` compare with
single-process `shoal run`; `--api-key` tells the suite the server requires that key.
`--state-dir` is the server's (the batch cases check the records it keeps on disk), and
`batch_submit` / `batch_resume` are the two halves of a batch job across a coordinator restart,
handing over through `--batch-file`.
Needs only the `openai` package (scripts/install-deps installs it); no pytest.
"""
import argparse
import json
import subprocess
import sys
import threading
import time
import traceback
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import openai

A = None  # the parsed arguments
client = None  # an openai.OpenAI on --base


class Fail(Exception):
    """A failed check; the message names the request and the response."""


class Skip(Exception):
    """The server does not support what the case checks, and says so."""


def check(cond, what, request=None, response=None):
    if not cond:
        msg = what
        if request is not None:
            msg += f"\n  request:  {short(request)}"
        if response is not None:
            msg += f"\n  response: {short(response)}"
        raise Fail(msg)


def short(v, n=1500):
    if hasattr(v, "model_dump"):
        v = v.model_dump()
    s = v if isinstance(v, str) else json.dumps(v, default=str)
    return s if len(s) <= n else s[:n] + f"... ({len(s)} chars)"


def raw(path, body, method="POST", headers=None):
    """Sends `body` (bytes or None) without the client; returns (status, headers, body bytes)."""
    h = {"Content-Type": "application/json", "Authorization": f"Bearer {A.api_key or 'unused'}"}
    h.update(headers or {})
    req = urllib.request.Request(A.base + path, data=body, method=method, headers=h)
    try:
        with urllib.request.urlopen(req, timeout=120) as r:
            return r.status, r.headers, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.headers, e.read()


def sse(path, body):
    """Streams `body` raw; checks the framing of every event and returns their JSON data."""
    status, headers, data = raw(path, json.dumps(body).encode())
    text = data.decode()
    check(status == 200, f"streaming answered {status}", body, text)
    check(headers.get("content-type", "").startswith("text/event-stream"),
          f"content-type {headers.get('content-type')!r} is not text/event-stream", body)
    check(text.endswith("\n\n"), "the stream does not end with a blank line", body, text[-200:])
    events = text[:-2].split("\n\n")
    check(events[-1] == "data: [DONE]", "the stream does not end with `data: [DONE]`", body,
          text[-300:])
    out = []
    for e in events[:-1]:
        check(e.startswith("data: ") and "\n" not in e, f"malformed event {e!r}", body)
        check(e != "data: [DONE]", "`data: [DONE]` before the end", body, text)
        out.append(json.loads(e[len("data: "):]))
    return out


def error_body(status, data, want_status, what):
    """Checks an error response: `want_status` and OpenAI's {"error": {"message", "type"}}."""
    text = data.decode(errors="replace")
    check(status == want_status, f"{what}: answered {status}, want {want_status}", None, text)
    try:
        v = json.loads(text)
    except ValueError:
        raise Fail(f"{what}: the error body is not JSON: {text!r}")
    e = v.get("error") if isinstance(v, dict) else None
    check(isinstance(e, dict) and isinstance(e.get("message"), str) and e["message"]
          and isinstance(e.get("type"), str), f"{what}: not OpenAI's error shape", None, v)
    return e


def api_error(exc_type, call, what):
    """Runs `call`, which must raise `exc_type`; checks the error body and returns the error."""
    try:
        r = call()
    except exc_type as e:
        body = e.body
        check(isinstance(body, dict) and isinstance(body.get("message"), str)
              and isinstance(body.get("type"), str), f"{what}: not OpenAI's error shape", None,
              body)
        return e
    except openai.APIStatusError as e:
        raise Fail(f"{what}: answered {e.status_code} ({type(e).__name__}), want "
                   f"{exc_type.__name__}: {e.body}")
    raise Fail(f"{what}: was accepted", None, r)


def usage_ok(u, max_tokens, finish, req, resp):
    check(u is not None, "no usage", req, resp)
    check(isinstance(u.prompt_tokens, int) and u.prompt_tokens > 0, "usage.prompt_tokens", req,
          resp)
    check(isinstance(u.completion_tokens, int) and 0 <= u.completion_tokens <= max_tokens,
          f"usage.completion_tokens not in [0, {max_tokens}]", req, resp)
    check(u.total_tokens == u.prompt_tokens + u.completion_tokens, "usage.total_tokens", req, resp)
    if finish == "length":
        check(u.completion_tokens == max_tokens, "finish_reason length before max_tokens", req,
              resp)


def chat_whole(**kw):
    """A non-streamed chat completion, shape-checked; returns (response, content)."""
    req = dict(model=A.model, **kw)
    r = client.chat.completions.create(**req)
    check(isinstance(r.id, str) and r.id, "id", req, r)
    check(r.object == "chat.completion", f"object {r.object!r}", req, r)
    check(r.model == A.model and isinstance(r.created, int), "model/created", req, r)
    check(len(r.choices) == 1 and r.choices[0].index == 0, "choices", req, r)
    c = r.choices[0]
    check(c.message.role == "assistant", f"role {c.message.role!r}", req, r)
    check(isinstance(c.message.content, str), "content is not a string", req, r)
    check(c.finish_reason in ("stop", "length"), f"finish_reason {c.finish_reason!r}", req, r)
    usage_ok(r.usage, kw.get("max_tokens") or kw.get("max_completion_tokens") or 1 << 30,
             c.finish_reason, req, r)
    return r, c.message.content


def chat_stream(**kw):
    """A streamed chat completion through the client, shape-checked; returns
    (content, finish_reason, usage or None, id, number of non-empty content deltas)."""
    req = dict(model=A.model, stream=True, **kw)
    chunks = list(client.chat.completions.create(**req))
    check(chunks, "no chunks", req)
    ids = {c.id for c in chunks}
    check(len(ids) == 1, f"the chunks carry {len(ids)} ids", req, [c.model_dump() for c in chunks])
    check(all(c.object == "chat.completion.chunk" for c in chunks), "object of a chunk", req,
          [c.object for c in chunks])
    with_choices = [c for c in chunks if c.choices]
    check(with_choices and with_choices[0].choices[0].delta.role == "assistant",
          "the first delta has no role assistant", req, chunks[0])
    finished = [c for c in with_choices if c.choices[0].finish_reason is not None]
    check(len(finished) == 1, f"{len(finished)} chunks have a finish_reason", req,
          [c.model_dump() for c in chunks])
    check(finished[0] is with_choices[-1], "a chunk with choices follows the finish_reason", req)
    content = "".join(c.choices[0].delta.content or "" for c in with_choices)
    n_pieces = sum(1 for c in with_choices if c.choices[0].delta.content)
    usage = next((c.usage for c in chunks if c.usage is not None), None)
    return content, finished[0].choices[0].finish_reason, usage, chunks[0].id, n_pieces


def cmpl_whole(**kw):
    req = dict(model=A.model, **kw)
    r = client.completions.create(**req)
    check(isinstance(r.id, str) and r.id, "id", req, r)
    check(r.object == "text_completion", f"object {r.object!r}", req, r)
    check(r.model == A.model and isinstance(r.created, int), "model/created", req, r)
    check(len(r.choices) == 1 and r.choices[0].index == 0, "choices", req, r)
    c = r.choices[0]
    check(isinstance(c.text, str), "text is not a string", req, r)
    check(c.finish_reason in ("stop", "length"), f"finish_reason {c.finish_reason!r}", req, r)
    usage_ok(r.usage, kw.get("max_tokens", 16), c.finish_reason, req, r)
    return r, c.text


def cmpl_stream(**kw):
    """Returns (text, finish_reason, usage or None, id, number of non-empty text pieces)."""
    req = dict(model=A.model, stream=True, **kw)
    chunks = list(client.completions.create(**req))
    check(chunks, "no chunks", req)
    check(len({c.id for c in chunks}) == 1, "the chunks carry several ids", req,
          [c.model_dump() for c in chunks])
    check(all(c.object == "text_completion" for c in chunks), "object of a chunk", req,
          [c.object for c in chunks])
    with_choices = [c for c in chunks if c.choices]
    finished = [c for c in with_choices if c.choices[0].finish_reason is not None]
    check(len(finished) == 1, f"{len(finished)} chunks have a finish_reason", req,
          [c.model_dump() for c in chunks])
    check(finished[0] is with_choices[-1], "a chunk with choices follows the finish_reason", req)
    text = "".join(c.choices[0].text for c in with_choices)
    n_pieces = sum(1 for c in with_choices if c.choices[0].text)
    usage = next((c.usage for c in chunks if c.usage is not None), None)
    return text, finished[0].choices[0].finish_reason, usage, chunks[0].id, n_pieces


def single(prompt, n):
    """What single-process `shoal run` prints for a greedy completion (None without --shoal)."""
    if not A.shoal:
        return None
    o = subprocess.run([A.shoal, "run", "--temperature", "0", "-t", "1", "--ctx", "1024", "-n",
                        str(n), "--model", A.model_path, prompt], capture_output=True, timeout=300)
    check(o.returncode == 0, f"shoal run failed: {o.stderr.decode(errors='replace')}")
    s = o.stdout.decode()
    return s[:-1] if s.endswith("\n") else s


CHAT = [{"role": "system", "content": "You are a helpful assistant."},
        {"role": "user", "content": "What is the capital of France? Answer in one sentence."}]
LIST = [{"role": "user", "content": "List three fruits, one per line."}]


# The cases, in the order they run.

def case_models():
    status, _, data = raw("/models", None, method="GET")
    check(status == 200, f"GET /models answered {status}", None, data.decode(errors="replace"))
    v = json.loads(data)
    check(v.get("object") == "list" and isinstance(v.get("data"), list), "list shape", None, v)
    page = client.models.list()
    models = list(page)
    check([m.id for m in models] == [A.model], f"the served ids are not [{A.model!r}]", None,
          [m.model_dump() for m in models])
    m = models[0]
    check(m.object == "model" and isinstance(m.created, int) and isinstance(m.owned_by, str),
          "model shape", None, m)
    try:
        client.models.retrieve(A.model)
    except openai.NotFoundError:
        print(f"  note: client.models.retrieve({A.model!r}) answers 404 (no GET /v1/models/ID)")


def case_chat():
    req = dict(messages=CHAT, max_tokens=48, temperature=0)
    r, content = chat_whole(**req)
    check(content.strip(), "empty content", req, r)
    check(r.usage.completion_tokens > 0, "no completion tokens", req, r)
    r2, content2 = chat_whole(**req)
    check(content2 == content, "the same greedy request answered differently", req,
          {"first": content, "second": content2})
    check(r2.id != r.id, "two responses share an id", req, [r.id, r2.id])
    # A message given as a list of text parts renders the same.
    parts = [CHAT[0], {"role": "user", "content": [{"type": "text", "text": "What is the capital "},
                                                    {"type": "text", "text": "of France? Answer in "
                                                                             "one sentence."}]}]
    _, content3 = chat_whole(messages=parts, max_tokens=48, temperature=0)
    check(content3 == content, "content parts answer differently from the same text", parts,
          {"text": content, "parts": content3})


def case_chat_stream():
    req = dict(messages=CHAT, max_tokens=48, temperature=0)
    r, want = chat_whole(**req)
    got, finish, usage, _, _ = chat_stream(**req)
    check(got == want, "streamed content differs from the whole response", req,
          {"whole": want, "streamed": got})
    check(finish == r.choices[0].finish_reason, f"finish_reason {finish!r}", req, r)
    if usage is not None:
        check(usage.model_dump() == r.usage.model_dump(), "streamed usage differs", req,
              {"whole": r.usage.model_dump(), "streamed": usage.model_dump()})
    # The raw stream: `data: {json}` events, one role delta first, `data: [DONE]` last.
    events = sse("/chat/completions", dict(model=A.model, stream=True, **req))
    check(events[0]["choices"][0]["delta"].get("role") == "assistant", "first raw delta", req,
          events[0])
    check(all(e.get("object") == "chat.completion.chunk" for e in events), "raw object", req,
          events)
    raw_text = "".join(e["choices"][0]["delta"].get("content") or ""
                       for e in events if e["choices"])
    check(raw_text == want, "the raw stream differs", req, {"whole": want, "raw": raw_text})
    # stream_options.include_usage: the usage comes last, in a chunk without choices.
    events = sse("/chat/completions", dict(model=A.model, stream=True,
                                           stream_options={"include_usage": True}, **req))
    want_usage = {k: getattr(r.usage, k) for k in ("prompt_tokens", "completion_tokens",
                                                   "total_tokens")}
    check(events[-1]["choices"] == [] and events[-1]["usage"] == want_usage,
          "include_usage: the last chunk", req, events[-2:])
    check(all("usage" not in e or e["usage"] is None for e in events[:-1]),
          "include_usage: usage before the last chunk", req, events[-3:])
    chunks = list(client.chat.completions.create(model=A.model, stream=True,
                                                 stream_options={"include_usage": True}, **req))
    check(chunks[-1].usage is not None and chunks[-1].usage.total_tokens == r.usage.total_tokens
          and not chunks[-1].choices, "include_usage through the client", req, chunks[-1])


def case_completions():
    prompt, n = "The water cycle is", 24
    req = dict(prompt=prompt, max_tokens=n, temperature=0)
    r, whole = cmpl_whole(**req)
    check(r.choices[0].logprobs is None, "logprobs without asking", req, r)
    got, finish, usage, _, _ = cmpl_stream(**req)
    check(got == whole, "streamed text differs from the whole response", req,
          {"whole": whole, "streamed": got})
    check(finish == r.choices[0].finish_reason, f"streamed finish_reason {finish!r}", req, r)
    check(usage is None or usage.model_dump() == r.usage.model_dump(), "streamed usage", req,
          {"whole": r.usage.model_dump(), "streamed": usage and usage.model_dump()})
    events = sse("/completions", dict(model=A.model, stream=True, **req))
    check("".join(e["choices"][0]["text"] for e in events if e["choices"]) == whole,
          "the raw stream differs", req, events)
    # A prompt given as a one-element list answers the same.
    _, listed = cmpl_whole(prompt=[prompt], max_tokens=n, temperature=0)
    check(listed == whole, "prompt as a list differs", req, {"text": whole, "list": listed})
    ref = single(prompt, n)
    if ref is None:
        print("  (no --shoal: not compared with shoal run)")
    else:
        check(whole == ref, "differs from single-process `shoal run`", req,
              {"serve": whole, "run": ref})


def case_stop():
    # Completions: a word from the middle of the greedy text, given as one string.
    prompt = "The history of Rome is"
    req = dict(prompt=prompt, max_tokens=32, temperature=0)
    _, full = cmpl_whole(**req)
    words = [w for w in full.split() if len(w) >= 3 and full.find(w) > 0]
    check(words, "no word to stop at in the greedy text", req, full)
    word = words[len(words) // 2]
    want = full[:full.find(word)]
    req = dict(prompt=prompt, max_tokens=32, temperature=0, stop=word)
    r, text = cmpl_whole(**req)
    check(text == want, f"stop={word!r}: the text is not the greedy text cut before it", req,
          {"want": want, "got": text, "full": full})
    check(r.choices[0].finish_reason == "stop", "finish_reason is not stop", req, r)
    text, finish, usage, _, _ = cmpl_stream(**req)
    check(text == want and finish == "stop", "streamed stop", req,
          {"want": want, "got": text, "finish": finish})
    check(usage is None or usage.completion_tokens == r.usage.completion_tokens, "streamed usage",
          req, {"whole": r.usage.model_dump(), "streamed": usage and usage.model_dump()})
    # Chat: a newline, given in a list (or a word, if the answer has no newline).
    req = dict(messages=LIST, max_tokens=48, temperature=0)
    _, full = chat_whole(**req)
    i = full.find("\n")
    if i > 0:
        stop = "\n"
    else:
        words = [w for w in full.split() if len(w) >= 3 and full.find(w) > 0]
        check(words, "no word to stop at in the greedy chat answer", req, full)
        stop = words[len(words) // 2]
        i = full.find(stop)
    req = dict(messages=LIST, max_tokens=48, temperature=0, stop=[stop, "zzzzqqq"])
    r, content = chat_whole(**req)
    check(content == full[:i], f"stop={stop!r}: not the greedy answer cut before it", req,
          {"want": full[:i], "got": content, "full": full})
    check(r.choices[0].finish_reason == "stop", "finish_reason is not stop", req, r)
    content, finish, _, _, _ = chat_stream(**req)
    check(content == full[:i] and finish == "stop", "streamed chat stop", req,
          {"want": full[:i], "got": content, "finish": finish})


def case_max_tokens():
    for n in (1, 5):
        req = dict(prompt="Once upon a time", max_tokens=n, temperature=0)
        r, _ = cmpl_whole(**req)
        check(r.choices[0].finish_reason == "length", "finish_reason is not length", req, r)
        check(r.usage.completion_tokens == n, f"completion_tokens is not {n}", req, r)
    req = dict(prompt="Once upon a time", max_tokens=7, temperature=0)
    _, finish, usage, _, _ = cmpl_stream(**req)
    check(finish == "length", f"streamed finish_reason {finish!r}", req)
    check(usage is not None and usage.completion_tokens == 7, "streamed usage", req,
          usage and usage.model_dump())
    req = dict(messages=CHAT, max_completion_tokens=4, temperature=0)
    r, _ = chat_whole(**req)
    check(r.choices[0].finish_reason == "length" and r.usage.completion_tokens == 4,
          "chat max_completion_tokens=4", req, r)
    req = dict(messages=CHAT, max_tokens=3, temperature=0)
    _, finish, usage, _, _ = chat_stream(**req)
    check(finish == "length" and usage is not None and usage.completion_tokens == 3,
          "streamed chat max_tokens=3", req,
          {"finish": finish, "usage": usage and usage.model_dump()})


def case_seed():
    story = [{"role": "user", "content": "Tell me a short story about a cat."}]

    def chat(seed):
        return chat_whole(messages=story, max_tokens=24, temperature=0.9, seed=seed)[1]

    def cmpl(seed):
        return cmpl_whole(prompt="My favourite colour is", max_tokens=24, temperature=0.9,
                          seed=seed)[1]

    for name, f in (("chat", chat), ("completions", cmpl)):
        a, b, c = f(42), f(42), f(43)
        check(a == b, f"{name}: seed 42 twice answered differently", {"seed": 42},
              {"first": a, "second": b})
        print(f"  {name}: seed 43 {'differs from' if c != a else 'EQUALS'} seed 42")
    # A streamed sampled request draws the same tokens as the whole one.
    req = dict(messages=story, max_tokens=24, temperature=0.9, seed=42)
    got = chat_stream(**req)[0]
    check(got == chat(42), "seed 42 streamed differs from whole", req, got)


def close(a, b):
    return abs(a - b) <= 1e-4 * max(1.0, abs(a), abs(b))


def case_logprobs_chat():
    req = dict(model=A.model, messages=CHAT, max_tokens=8, temperature=0, logprobs=True,
               top_logprobs=3)
    r = client.chat.completions.create(**req)
    c = r.choices[0]
    lp = c.logprobs
    check(lp is not None and lp.content is not None, "choices[0].logprobs.content is missing",
          req, r)
    check(len(lp.content) == r.usage.completion_tokens, "one logprobs entry per token", req, r)
    for i, t in enumerate(lp.content):
        check(isinstance(t.token, str) and isinstance(t.logprob, float) and t.logprob <= 0,
              f"content[{i}] token/logprob", req, t)
        check(t.bytes is None or (isinstance(t.bytes, list)
                                  and all(isinstance(b, int) and 0 <= b < 256 for b in t.bytes)),
              f"content[{i}].bytes", req, t)
        check(isinstance(t.top_logprobs, list) and len(t.top_logprobs) == 3,
              f"content[{i}] has not 3 top_logprobs", req, t)
        tops = [x.logprob for x in t.top_logprobs]
        check(all(isinstance(x.token, str) and isinstance(x.logprob, float)
                  for x in t.top_logprobs), f"content[{i}].top_logprobs shape", req, t)
        check(tops == sorted(tops, reverse=True), f"content[{i}].top_logprobs not sorted", req, t)
        check(close(t.logprob, tops[0]) and t.token == t.top_logprobs[0].token,
              f"content[{i}]: the greedy token is not the most likely one", req, t)
    check("".join(t.token for t in lp.content) == c.message.content,
          "the tokens do not spell the content", req, r)
    # Streamed, the logprobs ride on the chunks and agree with the whole response.
    chunks = list(client.chat.completions.create(stream=True, **req))
    toks = [t for ch in chunks if ch.choices and ch.choices[0].logprobs
            and ch.choices[0].logprobs.content for t in ch.choices[0].logprobs.content]
    check(len(toks) == len(lp.content)
          and all(a.token == b.token and close(a.logprob, b.logprob)
                  for a, b in zip(toks, lp.content)),
          "streamed logprobs differ from the whole response", req,
          {"whole": [t.model_dump() for t in lp.content],
           "streamed": [t.model_dump() for t in toks]})


def case_logprobs_completions():
    req = dict(model=A.model, prompt="The water cycle is", max_tokens=8, temperature=0, logprobs=3)
    r = client.completions.create(**req)
    c = r.choices[0]
    lp = c.logprobs
    check(lp is not None, "choices[0].logprobs is missing", req, r)
    n = r.usage.completion_tokens
    check(isinstance(lp.tokens, list) and len(lp.tokens) == n, "logprobs.tokens", req, r)
    check(isinstance(lp.token_logprobs, list) and len(lp.token_logprobs) == n,
          "logprobs.token_logprobs", req, r)
    check(isinstance(lp.top_logprobs, list) and len(lp.top_logprobs) == n,
          "logprobs.top_logprobs", req, r)
    check(lp.text_offset is None or (len(lp.text_offset) == n
                                     and lp.text_offset == sorted(lp.text_offset)),
          "logprobs.text_offset", req, r)
    for i, (tok, l, top) in enumerate(zip(lp.tokens, lp.token_logprobs, lp.top_logprobs)):
        check(isinstance(tok, str) and isinstance(l, float) and l <= 0, f"token {i}", req, r)
        # Tokens that decode to the same text share a key, so there may be fewer than 3.
        check(isinstance(top, dict) and 1 <= len(top) <= 3
              and all(isinstance(k, str) and isinstance(v, float) for k, v in top.items()),
              f"top_logprobs[{i}] is not a dict of up to 3 token -> logprob", req, top)
        check(tok in top and close(l, max(top.values())),
              f"token {i} ({tok!r}, {l}): the greedy token is not the most likely one", req, top)
    check("".join(lp.tokens) == c.text, "the tokens do not spell the text", req, r)


def case_error_malformed_json():
    for path in ("/chat/completions", "/completions"):
        status, _, data = raw(path, b'{"messages": [')
        error_body(status, data, 400, f"malformed JSON to {path}")
    status, _, data = raw("/completions", b"not json")
    error_body(status, data, 400, "a body that is not JSON")


def case_error_invalid_body():
    # JSON that is not a request: OpenAI answers 400 invalid_request_error (the client raises
    # BadRequestError), not 422.
    wrong = []
    for path, body in (("/chat/completions", {"model": A.model}),
                       ("/chat/completions", {"model": A.model, "messages": "hi"}),
                       ("/completions", {"model": A.model, "max_tokens": 4}),
                       ("/completions", {"model": A.model, "prompt": "x", "max_tokens": "four"}),
                       ("/chat/completions", [1, 2])):
        try:
            error_body(*raw(path, json.dumps(body).encode())[::2], 400,
                       f"POST /v1{path} {json.dumps(body)}")
        except Fail as e:
            wrong.append(str(e))
    check(not wrong, "\n".join(wrong))


def case_error_unknown_model():
    e = api_error(openai.NotFoundError, lambda: client.chat.completions.create(
        model="no-such-model", messages=CHAT, max_tokens=4), "unknown model (chat)")
    check("no-such-model" in e.body["message"], "the message does not name the model", None, e.body)
    api_error(openai.NotFoundError, lambda: client.completions.create(
        model="no-such-model", prompt="x", max_tokens=4), "unknown model (completions)")


def case_error_temperature():
    e = api_error(openai.BadRequestError, lambda: client.chat.completions.create(
        model=A.model, messages=CHAT, max_tokens=4, temperature=5), "temperature 5 (chat)")
    check(e.status_code == 400 and "temperature" in e.body["message"], "message", None, e.body)
    api_error(openai.BadRequestError, lambda: client.completions.create(
        model=A.model, prompt="x", max_tokens=4, temperature=5), "temperature 5 (completions)")
    api_error(openai.BadRequestError, lambda: client.completions.create(
        model=A.model, prompt="x", max_tokens=-1), "max_tokens -1")


def case_error_oversized_prompt():
    long = "word " * 5000
    e = api_error(openai.BadRequestError, lambda: client.completions.create(
        model=A.model, prompt=long, max_tokens=4), "a prompt longer than the context (completions)")
    check("context" in e.body["message"].lower(), "the message does not mention the context",
          None, e.body)
    e = api_error(openai.BadRequestError, lambda: client.chat.completions.create(
        model=A.model, messages=[{"role": "user", "content": long}], max_tokens=4),
        "a prompt longer than the context (chat)")
    check("context" in e.body["message"].lower(), "the message does not mention the context",
          None, e.body)
    # Streamed, the refusal is still a plain 400, before any event.
    api_error(openai.BadRequestError, lambda: client.completions.create(
        model=A.model, prompt=long, max_tokens=4, stream=True), "oversized prompt, streamed")


def case_n_choices():
    req = dict(model=A.model, messages=CHAT, max_tokens=8, temperature=0, n=2)
    r = client.chat.completions.create(**req)
    check(len(r.choices) == 2 and [c.index for c in r.choices] == [0, 1], "2 choices", req, r)
    for c in r.choices:
        check(c.message.role == "assistant" and isinstance(c.message.content, str), "choice",
              req, r)
    check(r.choices[0].message.content == r.choices[1].message.content,
          "greedy choices differ", req, r)
    check(2 <= r.usage.completion_tokens <= 16, "usage counts both choices' tokens", req, r)
    # Sampled choices of a seeded request: reproducible, and (almost surely) not all equal.
    req = dict(model=A.model, prompt="My favourite colour is", max_tokens=12, temperature=1.0,
               seed=7, n=3)
    a, b = client.completions.create(**req), client.completions.create(**req)
    texts = [c.text for c in a.choices]
    check(texts == [c.text for c in b.choices], "seeded n=3 is not reproducible", req, [a, b])
    check(len(set(texts)) > 1, "the 3 sampled choices are all equal", req, a)
    api_error(openai.BadRequestError, lambda: client.chat.completions.create(
        model=A.model, messages=CHAT, max_tokens=4, n=2, stream=True), "n=2 streamed")
    print("  n=2 answered with 2 choices; seeded n=3 reproducible")


def case_api_key():
    if not A.api_key:
        raise Skip("the server has no API keys configured")
    bad = openai.OpenAI(base_url=A.base, api_key="wrong-" + A.api_key, max_retries=0, timeout=60)
    api_error(openai.AuthenticationError, lambda: bad.chat.completions.create(
        model=A.model, messages=CHAT, max_tokens=2), "a bad API key")
    chat_whole(messages=CHAT, max_tokens=2)


TOPICS = [
    "The history of Rome", "How bread is made", "The planets of the solar system",
    "Why the sky is blue", "A recipe for pancakes", "The rules of chess", "How a bicycle works",
    "The life of bees", "Tips for learning a language", "The water cycle",
    "How computers store numbers", "The French revolution", "Photosynthesis in plants",
    "How to tie a knot", "The tallest mountains", "Why cats purr", "The invention of paper",
    "How rainbows form", "The first airplanes", "Why leaves change colour", "How volcanoes erupt",
    "The life of Mozart", "How vaccines work", "The Great Wall of China", "How tides work",
    "The migration of birds", "Why we dream", "The Roman aqueducts", "How glass is made",
    "The deep ocean", "How trains run on rails", "The life of ants",
]


def case_concurrency():
    n_tok = 64
    reqs = []
    for i, t in enumerate(TOPICS):
        if i % 2 == 0:
            msg = {"role": "user", "content": f"Tell me about {t.lower()}."}
            reqs.append(("chat", dict(messages=[msg], max_tokens=n_tok, temperature=0)))
        else:
            reqs.append(("completions", dict(prompt=f"{t} is", max_tokens=n_tok, temperature=0)))
    gate = threading.Barrier(len(reqs))

    def one(kr, wait=True):
        kind, kw = kr
        if wait:
            gate.wait(timeout=60)
        return (chat_stream if kind == "chat" else cmpl_stream)(**kw)

    t0 = time.monotonic()
    with ThreadPoolExecutor(len(reqs)) as ex:
        futs = [ex.submit(one, r) for r in reqs]
        got, errors = [], []
        for r, f in zip(reqs, futs):
            try:
                got.append(f.result())
            except Exception as e:  # every request must complete
                errors.append((r, f"{type(e).__name__}: {e}"))
                got.append(None)
    t_conc = time.monotonic() - t0
    check(not errors, f"{len(errors)} of {len(reqs)} concurrent requests failed; the first",
          errors and errors[0][0], errors and errors[0][1])
    ids = [g[3] for g in got]
    check(len(set(ids)) == len(ids), "duplicated ids among the concurrent responses", None, ids)
    t0 = time.monotonic()
    alone = [one(r, wait=False) for r in reqs]
    t_seq = time.monotonic() - t0
    bad = []
    for r, (text, finish, usage, _, pieces), (text1, finish1, usage1, _, _) in zip(reqs, got,
                                                                                   alone):
        what = None
        if usage is None:
            what = "no usage in the stream"
        elif (text, finish, usage.completion_tokens) != (text1, finish1, usage1.completion_tokens):
            what = (f"differs from the same request alone: concurrent {finish} "
                    f"{usage.completion_tokens} tok {text!r}; alone {finish1} "
                    f"{usage1.completion_tokens} tok {text1!r}")
        elif finish == "length" and usage.completion_tokens != n_tok:
            what = f"finish length after {usage.completion_tokens} tokens"
        elif pieces > usage.completion_tokens or (text.isascii()
                                                  and pieces != usage.completion_tokens):
            # Held-back UTF-8 may merge pieces; ASCII text streams one piece per token.
            what = f"{pieces} text pieces streamed for {usage.completion_tokens} tokens"
        if what:
            bad.append(f"{r[0]} {json.dumps(r[1])}: {what}")
    check(not bad, f"{len(bad)} of {len(reqs)} concurrent requests are wrong:\n  "
          + "\n  ".join(bad))
    n = sum(g[2].completion_tokens for g in got)
    print(f"  {len(reqs)} streams, {n} tokens: {t_conc:.1f} s at once, {t_seq:.1f} s one at a time")


def case_health_metrics():
    root = A.base[:-len("/v1")]
    with urllib.request.urlopen(root + "/health", timeout=30) as r:
        check(r.status == 200, f"/health answered {r.status}")
        v = json.loads(r.read())
    check(v == {"status": "ok"}, "/health body", None, v)

    def scrape():
        req = urllib.request.Request(root + "/metrics", headers={
            "Authorization": f"Bearer {A.api_key or 'unused'}"})
        with urllib.request.urlopen(req, timeout=30) as r:
            check(r.headers.get("content-type", "").startswith("text/plain"), "content-type",
                  None, r.headers.get("content-type"))
            text = r.read().decode()
        values = {}
        for line in text.splitlines():
            if line and not line.startswith("#"):
                k, v = line.rsplit(" ", 1)
                values[k] = float(v)
        return text, values

    # One request moves the counters by exactly its own figures.
    _, before = scrape()
    r, _ = chat_whole(messages=CHAT, max_tokens=4, temperature=0)
    text, values = scrape()

    def delta(k):
        return values.get(k, 0) - before.get(k, 0)

    ok200 = 'shoal_requests_total{endpoint="chat_completions",code="200"}'
    got = (delta(ok200), delta("shoal_time_to_first_token_seconds_count"),
           delta("shoal_prompt_tokens_total"), delta("shoal_completion_tokens_total"))
    want = (1, 1, r.usage.prompt_tokens, r.usage.completion_tokens)
    check(got == want, f"/metrics moved by {got} for one request, want {want}", None, text[:2000])
    for stage in ("0", "1"):
        up = [v for k, v in values.items() if k.startswith(f'shoal_stage_up{{stage="{stage}"')]
        check(up == [1.0], f"stage {stage} is not up", None, text)
        kv = [k for k in values if k.startswith(f'shoal_kv_budget_bytes{{stage="{stage}"')]
        check(kv, f"no KV budget of stage {stage}", None, text)
    check("shoal_queue_depth" in values, "no queue depth", None, text)
    if A.api_key:
        r = urllib.request.Request(root + "/metrics", headers={"Authorization": "Bearer no"})
        try:
            urllib.request.urlopen(r, timeout=30)
            raise Fail("/metrics answered a wrong key")
        except urllib.error.HTTPError as e:
            check(e.code == 401, f"/metrics with a wrong key answered {e.code}")
    print(f"  /metrics: {len(values)} series")


# A batch input: chat requests with greedy answers, and one the server must refuse.
BATCH_BAD = "bad-temperature"


def batch_lines(n):
    lines = []
    for i in range(n):
        body = {"messages": [{"role": "user", "content": f"Tell me about {TOPICS[i].lower()}."}],
                "max_tokens": 48, "temperature": 0}
        lines.append({"custom_id": f"line-{i}", "method": "POST", "url": "/v1/chat/completions",
                      "body": body})
    lines.insert(3, {"custom_id": BATCH_BAD, "method": "POST", "url": "/v1/chat/completions",
                     "body": {"messages": LIST, "max_tokens": 4, "temperature": 7}})
    return lines


def upload(lines, name="batch.jsonl"):
    data = ("\n".join(json.dumps(x) for x in lines) + "\n").encode()
    f = client.files.create(file=(name, data), purpose="batch")
    check(f.id.startswith("file-") and f.bytes == len(data) and f.purpose == "batch"
          and f.filename == name, "file object", None, f)
    got = client.files.retrieve(f.id)
    check(got.id == f.id and got.bytes == f.bytes, "files.retrieve", None, got)
    check(client.files.content(f.id).read() == data, "the stored file differs from the upload")
    return f


def wait_batch(bid, until, timeout=600):
    t0 = time.monotonic()
    while True:
        b = client.batches.retrieve(bid)
        if until(b):
            return b
        check(time.monotonic() - t0 < timeout, f"batch {bid} still {b.status} after {timeout} s",
              None, b)
        time.sleep(0.1)


def journal(bid):
    """The records the server wrote for batch `bid` (bytes on disk in --state-dir)."""
    path = f"{A.state_dir}/batches/{bid}.results.jsonl"
    with open(path) as f:
        return [json.loads(x) for x in f if x.endswith("\n")]


def case_batch_submit():
    """First half of the restart round trip: starts a batch and stops once some lines are done,
    writing what was done to --batch-file (the test then kills the coordinator)."""
    if not A.batch_file or not A.state_dir:
        raise Skip("needs --batch-file and --state-dir")
    lines = batch_lines(10)
    f = upload(lines)
    b = client.batches.create(input_file_id=f.id, endpoint="/v1/chat/completions",
                              completion_window="24h", metadata={"suite": "restart"})
    check(b.object == "batch" and b.id.startswith("batch_") and b.status in
          ("validating", "in_progress") and b.input_file_id == f.id
          and b.endpoint == "/v1/chat/completions" and b.completion_window == "24h",
          "batch object", None, b)
    check(b.metadata == {"suite": "restart"}, "metadata", None, b)
    b = wait_batch(b.id, lambda b: b.request_counts.completed + b.request_counts.failed >= 3
                   or b.status != "in_progress")
    check(b.status == "in_progress" and b.request_counts.total == len(lines),
          f"the batch should still run with {len(lines)} lines", None, b)
    done = journal(b.id)
    check(3 <= len(done) < len(lines), f"{len(done)} records on disk", None, done)
    with open(A.batch_file, "w") as out:
        json.dump({"batch": b.id, "lines": lines, "done": done}, out)
    print(f"  batch {b.id}: {len(done)} of {len(lines)} lines done before the restart")


def case_batch_resume():
    """Second half: after the restart, the batch finishes without running a done line again,
    and each answer equals the same request run interactively."""
    if not A.batch_file:
        raise Skip("needs --batch-file")
    with open(A.batch_file) as f:
        saved = json.load(f)
    bid, lines, before = saved["batch"], saved["lines"], saved["done"]
    b = wait_batch(bid, lambda b: b.status in ("completed", "failed", "cancelled", "expired"))
    n = len(lines)
    check(b.status == "completed", f"status {b.status}", None, b)
    check((b.request_counts.total, b.request_counts.completed, b.request_counts.failed)
          == (n, n - 1, 1), "request_counts", None, b)
    check(b.output_file_id and b.error_file_id and b.completed_at and b.in_progress_at,
          "files and times", None, b)
    recs = journal(bid)
    by_line = {}
    for r in recs:
        check(r["line"] not in by_line, f"line {r['line']} was run twice", None, recs)
        by_line[r["line"]] = r
    check(sorted(by_line) == list(range(n)), "a record for every line", None, sorted(by_line))
    for r in before:
        check(by_line[r["line"]] == r, f"line {r['line']}, done before the restart, changed",
              r, by_line[r["line"]])
    out = [json.loads(x) for x in client.files.content(b.output_file_id).text.splitlines()]
    err = [json.loads(x) for x in client.files.content(b.error_file_id).text.splitlines()]
    want_ids = [x["custom_id"] for x in lines if x["custom_id"] != BATCH_BAD]
    check([o["custom_id"] for o in out] == want_ids, "output custom_ids (in input order)", None,
          [o["custom_id"] for o in out])
    check(len(err) == 1 and err[0]["custom_id"] == BATCH_BAD
          and err[0]["response"]["status_code"] == 400
          and "temperature" in err[0]["response"]["body"]["error"]["message"], "error file",
          None, err)
    for o, line in zip(out, [x for x in lines if x["custom_id"] != BATCH_BAD]):
        resp = o["response"]
        check(o["id"].startswith("batch_req_") and o["error"] is None
              and resp["status_code"] == 200 and resp["request_id"], "output line shape", None, o)
        body = resp["body"]
        check(body["object"] == "chat.completion" and body["model"] == A.model, "body", None, body)
        _, text = chat_whole(**line["body"])
        got = body["choices"][0]["message"]["content"]
        check(got == text, f"{o['custom_id']}: the batch answer differs from the same request "
              f"run interactively", {"batch": got}, {"interactive": text})
        usage = body["usage"]
        check(usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"],
              "usage", None, body)
    if A.shoal:
        o = subprocess.run([A.shoal, "jobs", "--state-dir", A.state_dir], capture_output=True,
                           timeout=60)
        row = next((x for x in o.stdout.decode().splitlines() if x.startswith(bid)), "")
        check(o.returncode == 0 and "completed" in row and f"{n}/{n} 100%" in row,
              "shoal jobs does not list the batch as done", None, o.stdout.decode())
    print(f"  batch {bid}: {n - 1} answers equal the interactive ones; {len(before)} lines kept "
          "from before the restart")


def case_batch_cancel():
    lines = batch_lines(24)
    f = upload(lines, "cancel.jsonl")
    b = client.batches.create(input_file_id=f.id, endpoint="/v1/chat/completions",
                              completion_window="24h")
    b = wait_batch(b.id, lambda b: b.request_counts.completed >= 1 or b.status != "in_progress")
    c = client.batches.cancel(b.id)
    check(c.status in ("cancelling", "cancelled") and c.cancelling_at, "cancel answer", None, c)
    b = wait_batch(b.id, lambda b: b.status not in ("in_progress", "cancelling"), timeout=120)
    check(b.status == "cancelled" and b.cancelled_at, f"status {b.status}", None, b)
    done = b.request_counts.completed + b.request_counts.failed
    check(1 <= done < len(lines), f"{done} of {len(lines)} lines done when cancelled", None, b)
    if b.output_file_id:
        out = client.files.content(b.output_file_id).text.splitlines()
        check(len(out) == b.request_counts.completed, "output lines of a cancelled batch", None, b)
    page = client.batches.list(limit=100)
    check(any(x.id == b.id for x in page.data), "batches.list lacks the batch", None, page)
    print(f"  cancelled after {done} of {len(lines)} lines")


def case_batch_errors():
    bad = [{"custom_id": "a", "method": "POST", "url": "/v1/chat/completions",
            "body": {"messages": LIST}},
           {"custom_id": "a", "method": "POST", "url": "/v1/chat/completions",
            "body": {"messages": LIST}},
           {"custom_id": "b", "method": "POST", "url": "/v1/completions", "body": {"prompt": "x"}}]
    f = upload(bad, "bad.jsonl")
    b = client.batches.create(input_file_id=f.id, endpoint="/v1/chat/completions",
                              completion_window="24h")
    b = wait_batch(b.id, lambda b: b.status != "validating")
    check(b.status == "failed" and b.errors and len(b.errors.data) == 2, "validation", None, b)
    check([e.line for e in b.errors.data] == [2, 3], "error lines", None, b)
    api_error(openai.NotFoundError, lambda: client.batches.create(
        input_file_id="file-nope", endpoint="/v1/chat/completions", completion_window="24h"),
        "an unknown input file")
    api_error(openai.BadRequestError, lambda: client.batches.create(
        input_file_id=f.id, endpoint="/v1/embeddings", completion_window="24h"),
        "an unsupported endpoint")
    api_error(openai.BadRequestError, lambda: client.files.create(
        file=("x.jsonl", b"{}\n"), purpose="fine-tune"), "an unsupported purpose")
    api_error(openai.NotFoundError, lambda: client.batches.retrieve("batch_nope"), "unknown batch")
    d = client.files.delete(f.id)
    check(d.deleted and d.id == f.id, "files.delete", None, d)
    api_error(openai.NotFoundError, lambda: client.files.retrieve(f.id), "a deleted file")


CASES = {name[len("case_"):]: f for name, f in globals().items() if name.startswith("case_")}


def main():
    global A, client
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--base", required=True, help="the API's base URL, ending in /v1")
    p.add_argument("--model", required=True, help="the served model id")
    p.add_argument("--shoal", help="the shoal binary, to compare with `shoal run`")
    p.add_argument("--model-path", help="the GGUF file for `shoal run`")
    p.add_argument("--api-key", help="the key the server requires (none: keys not configured)")
    p.add_argument("--keep-going", action="store_true", help="run every case despite failures")
    p.add_argument("--state-dir", help="the server's --state-dir (batch cases read its journal)")
    p.add_argument("--batch-file", help="where batch_submit leaves its batch for batch_resume")
    p.add_argument("cases", nargs="*", help=f"cases to run (default all): {' '.join(CASES)}")
    A = p.parse_args()
    unknown = [c for c in A.cases if c not in CASES]
    if unknown:
        p.error(f"unknown case(s) {unknown}; the cases are {list(CASES)}")
    client = openai.OpenAI(base_url=A.base, api_key=A.api_key or "unused", max_retries=0,
                           timeout=300)
    failed = []
    for name in A.cases or list(CASES):
        t0 = time.monotonic()
        try:
            CASES[name]()
        except Skip as e:
            print(f"SKIP {name}: {e}", flush=True)
            continue
        except Fail as e:
            msg = str(e)
        except openai.APIStatusError as e:
            msg = f"{type(e).__name__} {e.status_code}: {e.body}"
        except Exception as e:  # noqa: BLE001 - reported with its traceback
            msg = "".join(traceback.format_exception(e)).rstrip()
        else:
            print(f"ok {name} ({time.monotonic() - t0:.1f} s)", flush=True)
            continue
        print(f"FAIL {name}: {msg}", flush=True)
        failed.append(name)
        if not A.keep_going:
            break
    if failed:
        print(f"failed: {' '.join(failed)}", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
