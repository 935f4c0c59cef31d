#!/usr/bin/env python3
"""Float64 reference forward pass of a llama / qwen2 GGUF model, from dequantized weights.

An independent check on shoal's executor: weights are dequantized with llama.cpp's gguf-py
(numpy), and the whole forward pass (RMSNorm, RoPE normal/NEOX, GQA attention, SwiGLU) runs
in float64 with no activation quantization. Prints the top logits at the last position as
JSON. Slow but simple; meant for short prompts on the small test models.

    PYTHONPATH=<llama.cpp>/gguf-py python f64_forward.py MODEL.gguf 504,3575,282 [--top 64]

Needs numpy and gguf-py (vendor/llama.cpp/gguf-py of the llama-cpp-python 0.3.36 sdist).
"""
import argparse
import json

import numpy as np
from gguf import GGUFReader
from gguf.quants import dequantize


def field(r, key, default=None):
    f = r.fields.get(key)
    if f is None:
        return default
    v = f.parts[f.data[0]]
    if f.types and f.types[0].name == "STRING":
        return bytes(v).decode()
    return v.tolist()[0] if hasattr(v, "tolist") else v


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("model")
    ap.add_argument("tokens")
    ap.add_argument("--top", type=int, default=64)
    ap.add_argument("--ids", default="", help="also print the logits of these ids (comma-separated)")
    a = ap.parse_args()
    toks = [int(t) for t in a.tokens.split(",")]

    r = GGUFReader(a.model)
    arch = field(r, "general.architecture")
    g = lambda k, d=None: field(r, f"{arch}.{k}", d)
    n_layer, n_embd = g("block_count"), g("embedding_length")
    n_head = g("attention.head_count")
    n_kv = g("attention.head_count_kv", n_head)
    hd = n_embd // n_head
    eps = g("attention.layer_norm_rms_epsilon", 1e-5)
    base = g("rope.freq_base", 10000.0)
    neox = arch == "qwen2"

    tensors = {t.name: t for t in r.tensors}

    def W(name):
        t = tensors[name]
        w = dequantize(t.data, t.tensor_type).astype(np.float64)
        return w.reshape([int(d) for d in reversed(t.shape)]) if w.ndim == 1 and len(t.shape) > 1 else w

    def rms(x, w):
        return x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps) * w

    def rope(x, nh):  # x: (T, nh*hd)
        T = x.shape[0]
        x = x.reshape(T, nh, hd).copy()
        inv = base ** (-np.arange(0, hd, 2, dtype=np.float64) / hd)
        ang = np.arange(T, dtype=np.float64)[:, None] * inv[None, :]  # (T, hd/2)
        c, s = np.cos(ang)[:, None, :], np.sin(ang)[:, None, :]
        if neox:
            a, b = x[..., : hd // 2].copy(), x[..., hd // 2 :].copy()
            x[..., : hd // 2], x[..., hd // 2 :] = a * c - b * s, a * s + b * c
        else:
            a, b = x[..., 0::2].copy(), x[..., 1::2].copy()
            x[..., 0::2], x[..., 1::2] = a * c - b * s, a * s + b * c
        return x.reshape(T, nh * hd)

    emb = W("token_embd.weight")
    x = emb[toks]
    T = len(toks)
    mask = np.triu(np.full((T, T), -np.inf), 1)
    for il in range(n_layer):
        p = f"blk.{il}."
        xn = rms(x, W(p + "attn_norm.weight"))
        q, k, v = xn @ W(p + "attn_q.weight").T, xn @ W(p + "attn_k.weight").T, xn @ W(p + "attn_v.weight").T
        if p + "attn_q.bias" in tensors:
            q, k, v = q + W(p + "attn_q.bias"), k + W(p + "attn_k.bias"), v + W(p + "attn_v.bias")
        q, k = rope(q, n_head), rope(k, n_kv)
        out = np.zeros((T, n_head * hd))
        for h in range(n_head):
            kh = h // (n_head // n_kv)
            qh, kk, vv = q[:, h * hd:(h + 1) * hd], k[:, kh * hd:(kh + 1) * hd], v[:, kh * hd:(kh + 1) * hd]
            s = qh @ kk.T / np.sqrt(hd) + mask
            s = np.exp(s - s.max(axis=1, keepdims=True))
            s /= s.sum(axis=1, keepdims=True)
            out[:, h * hd:(h + 1) * hd] = s @ vv
        x = x + out @ W(p + "attn_output.weight").T
        xn = rms(x, W(p + "ffn_norm.weight"))
        gt, up = xn @ W(p + "ffn_gate.weight").T, xn @ W(p + "ffn_up.weight").T
        x = x + (gt / (1 + np.exp(-gt)) * up) @ W(p + "ffn_down.weight").T
    xn = rms(x[-1:], W("output_norm.weight"))
    out_w = W("output.weight") if "output.weight" in tensors else emb
    logits = (xn @ out_w.T)[0]
    top = np.argsort(-logits)[: a.top]
    doc = {"top_logits": [[int(i), float(logits[i])] for i in top]}
    if a.ids:
        doc["logits"] = {i: float(logits[int(i)]) for i in a.ids.split(",")}
    print(json.dumps(doc))


if __name__ == "__main__":
    main()
