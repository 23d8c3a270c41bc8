#!/usr/bin/env python3
"""Recompute the logits of tests/fixtures/hf/<name>/ with an independent float64 numpy forward pass
(numpy only: the safetensors file is parsed by hand) and compare with expected.json.

    python3 scripts/check_hf_fixtures.py [tests/fixtures/hf] [--tol 1e-3]

It is the cross-check for scripts/gen_hf_fixtures.py (which needs torch) and a second statement of the
math that samepage must implement for HF-layout weights:
  * RoPE "rotate_half": pairs (x[i], x[i + D/2]), inv_freq_i = theta^(-2i/D), optionally rescaled by
    Llama-3 scaling (wavelen = 2*pi/inv_freq; wavelen < orig/high_freq_factor: kept; wavelen >
    orig/low_freq_factor: divided by factor; in between: smooth = (orig/wavelen - low)/(high - low),
    inv = (1 - smooth) * inv/factor + smooth * inv);
  * Qwen2: biases on q/k/v projections; tied lm_head = embed_tokens.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import struct
import sys

import numpy as np

DT = {"F32": np.float32, "F16": np.float16, "F64": np.float64, "BF16": None}


def load_safetensors(path):
    with open(path, "rb") as fh:
        n = struct.unpack("<Q", fh.read(8))[0]
        header = json.loads(fh.read(n))
        base = 8 + n
        out = {}
        data = np.fromfile(path, dtype=np.uint8)
    for k, v in header.items():
        if k == "__metadata__":
            continue
        a, b = v["data_offsets"]
        raw = data[base + a: base + b]
        if v["dtype"] == "BF16":
            arr = (raw.view(np.uint16).astype(np.uint32) << 16).view(np.float32)
        else:
            arr = raw.view(DT[v["dtype"]])
        out[k] = arr.reshape(v["shape"]).astype(np.float64)
    return out


def rope_inv_freq(cfg, D):
    theta = cfg.get("rope_theta") or (cfg.get("rope_parameters") or {}).get("rope_theta")
    inv = 1.0 / (float(theta) ** (np.arange(0, D, 2, dtype=np.float64) / D))
    sc = cfg.get("rope_scaling") or {}
    rtype = sc.get("rope_type", sc.get("type"))
    if rtype == "llama3":
        factor, lo, hi = sc["factor"], sc["low_freq_factor"], sc["high_freq_factor"]
        orig = sc["original_max_position_embeddings"]
        wavelen = 2 * math.pi / inv
        new = np.where(wavelen > orig / lo, inv / factor, inv)
        smooth = (orig / wavelen - lo) / (hi - lo)
        smoothed = (1 - smooth) * new / factor + smooth * new
        medium = ~(wavelen < orig / hi) & ~(wavelen > orig / lo)
        inv = np.where(medium, smoothed, new)
    elif rtype not in (None, "default"):
        raise SystemExit(f"rope type {rtype} not handled here")
    return inv


def rmsnorm(x, w, eps):
    return x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps) * w


def forward(W, cfg, ids):
    H, KV = cfg["num_attention_heads"], cfg["num_key_value_heads"]
    dim = cfg["hidden_size"]
    D = cfg.get("head_dim") or dim // H
    eps = cfg["rms_norm_eps"]
    T = len(ids)
    inv = rope_inv_freq(cfg, D)
    ang = np.arange(T, dtype=np.float64)[:, None] * inv[None, :]
    cos = np.concatenate([np.cos(ang)] * 2, axis=-1)[:, None, :]
    sin = np.concatenate([np.sin(ang)] * 2, axis=-1)[:, None, :]

    def rot(x):
        x1, x2 = x[..., : D // 2], x[..., D // 2:]
        return x * cos + np.concatenate([-x2, x1], axis=-1) * sin

    def lin(x, name):
        y = x @ W[name + ".weight"].T
        if name + ".bias" in W:
            y = y + W[name + ".bias"]
        return y

    mask = np.triu(np.full((T, T), -np.inf), 1)
    h = W["model.embed_tokens.weight"][ids]
    for L in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{L}."
        x = rmsnorm(h, W[p + "input_layernorm.weight"], eps)
        q = rot(lin(x, p + "self_attn.q_proj").reshape(T, H, D))
        k = rot(lin(x, p + "self_attn.k_proj").reshape(T, KV, D))
        v = lin(x, p + "self_attn.v_proj").reshape(T, KV, D)
        att = np.empty((T, H, D))
        for hh in range(H):
            kv = hh // (H // KV)
            s = q[:, hh] @ k[:, kv].T / math.sqrt(D) + mask
            s = np.exp(s - s.max(-1, keepdims=True))
            s /= s.sum(-1, keepdims=True)
            att[:, hh] = s @ v[:, kv]
        h = h + lin(att.reshape(T, H * D), p + "self_attn.o_proj")
        x = rmsnorm(h, W[p + "post_attention_layernorm.weight"], eps)
        g = lin(x, p + "mlp.gate_proj")
        h = h + lin(g / (1 + np.exp(-g)) * lin(x, p + "mlp.up_proj"), p + "mlp.down_proj")
    x = rmsnorm(h, W["model.norm.weight"], eps)
    head = W.get("lm_head.weight")
    if head is None:
        assert cfg.get("tie_word_embeddings", True), "no lm_head.weight but embeddings not tied"
        head = W["model.embed_tokens.weight"]
    return x @ head.T


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("root", nargs="?", default=os.path.join(os.path.dirname(os.path.dirname(
        os.path.abspath(__file__))), "tests", "fixtures", "hf"))
    ap.add_argument("--tol", type=float, default=1e-3, help="max |logit difference| allowed")
    a = ap.parse_args(argv)
    names = sorted(n for n in os.listdir(a.root) if os.path.exists(os.path.join(a.root, n, "expected.json")))
    if not names:
        raise SystemExit(f"no fixtures under {a.root}")
    bad = 0
    for n in names:
        d = os.path.join(a.root, n)
        with open(os.path.join(d, "config.json")) as fh:
            cfg = json.load(fh)
        with open(os.path.join(d, "expected.json")) as fh:
            exp = json.load(fh)
        W = load_safetensors(os.path.join(d, "model.safetensors"))
        worst = 0.0
        for ids, want in zip(exp["input_ids"], exp["logits"]):
            got = forward(W, cfg, ids)
            worst = max(worst, float(np.abs(got - np.asarray(want, dtype=np.float64)).max()))
        ok = worst <= a.tol
        bad += not ok
        print(f"{n}: max |numpy f64 - expected| = {worst:.3e} {'ok' if ok else 'FAIL'}")
    sys.exit(1 if bad else 0)


if __name__ == "__main__":
    main()
