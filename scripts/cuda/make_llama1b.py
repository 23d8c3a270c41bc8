#!/usr/bin/env python3
"""Build the benchmark model of issue 4 §6 on the GPU machine: a Llama-3.2-1B-shaped model
with random bf16 weights, as

  OUT/hf/        HF safetensors (bf16) + config.json + the Llama 3 tokenizer.json
  OUT/q8_0.gguf  GGUF, Q8_0 (norms and rope_freqs F32)
  OUT/q4_k_m.gguf GGUF, llama.cpp's Q4_K_M mix: Q4_K, with Q6_K for token_embd (tied
                 output) and for attn_v / ffn_down in the "more bits" layers

Shape: vocab 128256, dim 2048, ffn 8192, 16 layers, 32 heads, 8 KV heads, head_dim 64,
tied embeddings, rope theta 500000 with Llama 3 scaling (factor 32, low 1, high 4,
original 8192). The GGUF files follow llama.cpp's converter: q/k rows permuted for the
interleaved rope, a rope_freqs tensor, the tokenizer as tokenizer.ggml.* (gpt2, llama-bpe).

Quantization runs in torch on the GPU (the `gguf` package has no Q4_K/Q6_K quantizer); a
self-check dequantizes a sample with the `gguf` package's reference code first.

Usage: make_llama1b.py OUT_DIR TOKENIZER_JSON [--formats hf,q8_0,q4_k_m]
Needs: torch, safetensors, numpy, gguf (carry its wheel).
"""
import json, math, os, sys, time

import numpy as np
import torch

V, D, FF, L, H, KVH, HD = 128256, 2048, 8192, 16, 32, 8, 64
THETA, FACTOR, LOW, HIGH, ORIG = 500000.0, 32.0, 1.0, 4.0, 8192
EPS = 1e-5
dev = "cuda" if torch.cuda.is_available() else "cpu"


def log(*a):
    print(f"[make_llama1b {time.strftime('%H:%M:%S')}]", *a, flush=True)


# ---- quantizers (torch, rows of float32 -> uint8 blocks, ggml layouts) -----------------

def f16_bytes(x):  # (n,) float -> (n, 2) uint8
    return x.to(torch.float16).contiguous().view(torch.uint8).view(-1, 2)


def q8_0(w):  # (rows, cols) -> (rows, cols/32*34)
    rows, cols = w.shape
    x = w.float().reshape(-1, 32)
    amax = x.abs().amax(1)
    d = amax / 127
    inv = torch.where(d > 0, 1 / d, torch.zeros_like(d))
    q = torch.round(x * inv[:, None]).clamp(-127, 127).to(torch.int8).view(torch.uint8)
    return torch.cat([f16_bytes(d), q], 1).reshape(rows, -1)


def q4_k(w):  # (rows, cols) -> (rows, cols/256*144)
    rows, cols = w.shape
    x = w.float().reshape(-1, 8, 32)
    nb = x.shape[0]
    mn = x.amin(2).clamp(max=0)
    mx = x.amax(2)
    scale = (mx - mn) / 15
    m = -mn
    d = scale.amax(1) / 63
    dmin = m.amax(1) / 63
    d16 = d.to(torch.float16).float()
    dm16 = dmin.to(torch.float16).float()
    sc = torch.where(d16[:, None] > 0, torch.round(scale / d16[:, None]), torch.zeros_like(scale)).clamp(0, 63)
    mq = torch.where(dm16[:, None] > 0, torch.round(m / dm16[:, None]), torch.zeros_like(m)).clamp(0, 63)
    eff = d16[:, None] * sc  # (nb, 8)
    off = dm16[:, None] * mq
    q = torch.where(eff[:, :, None] > 0, torch.round((x + off[:, :, None]) / eff[:, :, None]), torch.zeros_like(x))
    q = q.clamp(0, 15).to(torch.uint8)  # (nb, 8, 32)
    sc, mq = sc.to(torch.uint8), mq.to(torch.uint8)
    s = torch.zeros(nb, 12, dtype=torch.uint8, device=w.device)
    s[:, 0:4] = sc[:, 0:4] | ((sc[:, 4:8] >> 4) << 6)
    s[:, 4:8] = mq[:, 0:4] | ((mq[:, 4:8] >> 4) << 6)
    s[:, 8:12] = (sc[:, 4:8] & 0xF) | ((mq[:, 4:8] & 0xF) << 4)
    qs = (q[:, 0::2, :] | (q[:, 1::2, :] << 4)).reshape(nb, 128)
    return torch.cat([f16_bytes(d16), f16_bytes(dm16), s, qs], 1).reshape(rows, -1)


def q6_k(w):  # (rows, cols) -> (rows, cols/256*210)
    rows, cols = w.shape
    x = w.float().reshape(-1, 16, 16)
    nb = x.shape[0]
    s = x.abs().amax(2) / 31  # per-16 scale, >= 0
    d = s.amax(1) / 127
    d16 = d.to(torch.float16).float()
    sc = torch.where(d16[:, None] > 0, torch.round(s / d16[:, None]), torch.zeros_like(s)).clamp(-128, 127)
    eff = d16[:, None] * sc
    q = torch.where(eff[:, :, None] > 0, torch.round(x / eff[:, :, None]), torch.zeros_like(x))
    q = (q.clamp(-32, 31) + 32).to(torch.uint8).reshape(nb, 2, 128)  # two halves of 128
    Q0, Q1, Q2, Q3 = q[:, :, 0:32], q[:, :, 32:64], q[:, :, 64:96], q[:, :, 96:128]
    ql = torch.cat([(Q0 & 0xF) | ((Q2 & 0xF) << 4), (Q1 & 0xF) | ((Q3 & 0xF) << 4)], 2)  # (nb,2,64)
    qh = (Q0 >> 4) | ((Q1 >> 4) << 2) | ((Q2 >> 4) << 4) | ((Q3 >> 4) << 6)  # (nb,2,32)
    sc8 = sc.to(torch.int8).view(torch.uint8)
    return torch.cat([ql.reshape(nb, 128), qh.reshape(nb, 64), sc8, f16_bytes(d16)], 1).reshape(rows, -1)


QUANT = {"Q8_0": q8_0, "Q4_K": q4_k, "Q6_K": q6_k}


def quantize(w, kind):
    out = []
    for i in range(0, w.shape[0], 8192):  # chunks bound the temporaries
        out.append(QUANT[kind](w[i:i + 8192].to(dev)).cpu())
    return torch.cat(out).numpy()


def self_check():
    import gguf
    from gguf.quants import dequantize
    g = torch.Generator(device="cpu").manual_seed(1)
    x = (torch.randn(64, 512, generator=g) * 0.02).to(torch.bfloat16).float()
    x[3] = 0  # an all-zero row
    x[5, :256] = torch.linspace(0.01, 0.5, 256)  # all positive (min > 0 case)
    ok = set()
    for kind, bound in (("Q8_0", 0.01), ("Q4_K", 0.15), ("Q6_K", 0.04)):
        try:
            b = quantize(x, kind)
            t = getattr(gguf.GGMLQuantizationType, kind)
            y = dequantize(b, t).reshape(x.shape)
            e = np.linalg.norm(y - x.numpy()) / np.linalg.norm(x.numpy())
            good = bool(np.isfinite(y).all() and e < bound and np.abs(y[3]).max() == 0)
            log(f"self-check {kind}: {b.shape[1]} bytes/row, normalised error {e:.3e} (bound {bound}): {'ok' if good else 'FAILED'}")
        except Exception as ex:  # keep going with the formats that work
            log(f"self-check {kind}: FAILED: {ex!r}")
            good = False
        if good:
            ok.add(kind)
    return ok


# ---- the model --------------------------------------------------------------------------

def weights():
    torch.manual_seed(0)
    def w(*s):
        return (torch.randn(*s, device=dev, dtype=torch.float32) * 0.02).to(torch.bfloat16)
    def norm():
        return (1 + 0.1 * torch.randn(D, device=dev)).to(torch.bfloat16)
    t = {"model.embed_tokens.weight": w(V, D), "model.norm.weight": norm()}
    for i in range(L):
        p = f"model.layers.{i}."
        t[p + "input_layernorm.weight"] = norm()
        t[p + "post_attention_layernorm.weight"] = norm()
        t[p + "self_attn.q_proj.weight"] = w(H * HD, D)
        t[p + "self_attn.k_proj.weight"] = w(KVH * HD, D)
        t[p + "self_attn.v_proj.weight"] = w(KVH * HD, D)
        t[p + "self_attn.o_proj.weight"] = w(D, H * HD)
        t[p + "mlp.gate_proj.weight"] = w(FF, D)
        t[p + "mlp.up_proj.weight"] = w(FF, D)
        t[p + "mlp.down_proj.weight"] = w(D, FF)
    return t


CONFIG = {
    "architectures": ["LlamaForCausalLM"], "model_type": "llama", "torch_dtype": "bfloat16",
    "vocab_size": V, "hidden_size": D, "intermediate_size": FF, "num_hidden_layers": L,
    "num_attention_heads": H, "num_key_value_heads": KVH, "head_dim": HD, "hidden_act": "silu",
    "max_position_embeddings": 131072, "rms_norm_eps": EPS, "rope_theta": THETA,
    "rope_scaling": {"factor": FACTOR, "low_freq_factor": LOW, "high_freq_factor": HIGH,
                     "original_max_position_embeddings": ORIG, "rope_type": "llama3"},
    "tie_word_embeddings": True, "attention_bias": False, "mlp_bias": False,
    "bos_token_id": 128000, "eos_token_id": 128001,
}


def write_hf(t, out, tok_path):
    from safetensors.torch import save_file
    os.makedirs(out, exist_ok=True)
    save_file({k: v.cpu().contiguous() for k, v in t.items()}, os.path.join(out, "model.safetensors"),
              metadata={"format": "pt"})
    json.dump(CONFIG, open(os.path.join(out, "config.json"), "w"), indent=1)
    json.dump({"bos_token": "<|begin_of_text|>", "eos_token": "<|end_of_text|>"},
              open(os.path.join(out, "tokenizer_config.json"), "w"))
    with open(tok_path, "rb") as f, open(os.path.join(out, "tokenizer.json"), "wb") as g:
        g.write(f.read())


def rope_freqs():  # llama.cpp's converter: per-frequency divisors
    out = []
    lo_wl, hi_wl = ORIG / LOW, ORIG / HIGH
    for i in range(HD // 2):
        freq = 1.0 / THETA ** (2 * i / HD)
        wl = 2 * math.pi / freq
        if wl < hi_wl:
            out.append(1.0)
        elif wl > lo_wl:
            out.append(FACTOR)
        else:
            smooth = (ORIG / wl - LOW) / (HIGH - LOW)
            out.append(1 / ((1 - smooth) / FACTOR + smooth))
    return np.array(out, dtype=np.float32)


def permute(w, n_head):  # HF rotate-half -> GGUF interleaved rope
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, w.shape[1]).transpose(1, 2).reshape(w.shape)


def more_bits(i):
    return i < L // 8 or i >= 7 * L // 8 or (i - L // 8) % 3 == 2


def write_gguf(t, path, ftype, tok):
    import gguf
    w = gguf.GGUFWriter(path, "llama")
    w.add_name("Llama-3.2-1B-shape (random bf16 weights)")
    w.add_block_count(L)
    w.add_context_length(131072)
    w.add_embedding_length(D)
    w.add_feed_forward_length(FF)
    w.add_head_count(H)
    w.add_head_count_kv(KVH)
    w.add_key_length(HD)
    w.add_value_length(HD)
    w.add_rope_dimension_count(HD)
    w.add_rope_freq_base(THETA)
    w.add_layer_norm_rms_eps(EPS)
    w.add_vocab_size(V)
    w.add_file_type({"q8_0": 7, "q4_k_m": 15}[ftype])
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("llama-bpe")
    w.add_token_list(tok["tokens"])
    w.add_token_types(tok["types"])
    w.add_token_merges(tok["merges"])
    w.add_bos_token_id(128000)
    w.add_eos_token_id(128001)
    w.add_add_bos_token(True)

    def q(name, x, kind):
        w.add_tensor(name, quantize(x, kind), raw_dtype=getattr(gguf.GGMLQuantizationType, kind))

    def f32(name, x):
        w.add_tensor(name, x.float().cpu().numpy())

    def kind(default, i=None, t6=False):
        if ftype == "q8_0":
            return "Q8_0"
        return "Q6_K" if t6 and (i is None or more_bits(i)) else default

    w.add_tensor("rope_freqs.weight", rope_freqs())
    q("token_embd.weight", t["model.embed_tokens.weight"], kind("Q4_K", None, True))
    f32("output_norm.weight", t["model.norm.weight"])
    for i in range(L):
        p, b = f"model.layers.{i}.", f"blk.{i}."
        f32(b + "attn_norm.weight", t[p + "input_layernorm.weight"])
        f32(b + "ffn_norm.weight", t[p + "post_attention_layernorm.weight"])
        q(b + "attn_q.weight", permute(t[p + "self_attn.q_proj.weight"], H), kind("Q4_K"))
        q(b + "attn_k.weight", permute(t[p + "self_attn.k_proj.weight"], KVH), kind("Q4_K"))
        q(b + "attn_v.weight", t[p + "self_attn.v_proj.weight"], kind("Q4_K", i, True))
        q(b + "attn_output.weight", t[p + "self_attn.o_proj.weight"], kind("Q4_K"))
        q(b + "ffn_gate.weight", t[p + "mlp.gate_proj.weight"], kind("Q4_K"))
        q(b + "ffn_up.weight", t[p + "mlp.up_proj.weight"], kind("Q4_K"))
        q(b + "ffn_down.weight", t[p + "mlp.down_proj.weight"], kind("Q4_K", i, True))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def tokenizer_vocab(tok_path):
    j = json.load(open(tok_path, encoding="utf-8"))
    vocab = dict(j["model"]["vocab"])
    special = set()
    for a in j.get("added_tokens", []):
        vocab[a["content"]] = a["id"]
        if a.get("special"):
            special.add(a["id"])
    n = max(vocab.values()) + 1
    assert n == V, f"tokenizer has {n} tokens, the model {V}"
    tokens = [""] * n
    for s, i in vocab.items():
        tokens[i] = s
    types = [3 if i in special else 1 for i in range(n)]
    merges = [m if isinstance(m, str) else " ".join(m) for m in j["model"]["merges"]]
    return {"tokens": tokens, "types": types, "merges": merges}


def main():
    out, tok_path = sys.argv[1], sys.argv[2]
    formats = "hf,q8_0,q4_k_m"
    if "--formats" in sys.argv:
        formats = sys.argv[sys.argv.index("--formats") + 1]
    formats = formats.split(",")
    os.makedirs(out, exist_ok=True)
    t0 = time.time()
    ok = self_check()
    if "Q8_0" not in ok and "q8_0" in formats:
        formats.remove("q8_0")
    if not {"Q4_K", "Q6_K"} <= ok and "q4_k_m" in formats:
        formats.remove("q4_k_m")
    log("formats:", formats)
    t = weights()
    torch.cuda.synchronize() if dev == "cuda" else None
    n = sum(v.numel() for v in t.values())
    log(f"{n / 1e9:.3f} B parameters, {n * 2 / 1e9:.3f} GB bf16, on {dev}, {time.time() - t0:.1f} s")
    if "hf" in formats:
        t1 = time.time()
        write_hf(t, os.path.join(out, "hf"), tok_path)
        log(f"hf: {os.path.getsize(os.path.join(out, 'hf', 'model.safetensors')) / 1e9:.3f} GB in {time.time() - t1:.1f} s")
    tok = tokenizer_vocab(tok_path)
    for f in ("q8_0", "q4_k_m"):
        if f in formats:
            t1 = time.time()
            p = os.path.join(out, f + ".gguf")
            try:
                write_gguf(t, p, f, tok)
            except Exception as ex:
                log(f"{f}: FAILED: {ex!r}")
                continue
            log(f"{f}: {os.path.getsize(p) / 1e9:.3f} GB in {time.time() - t1:.1f} s")


if __name__ == "__main__":
    main()
