#!/usr/bin/env python3
"""Generate tiny random HF safetensors models + expected logits for samepage's loader/forward tests.

Needs torch + transformers (4.4x..5.x); run it where they are installed (not on the dev box):

    python3 scripts/gen_hf_fixtures.py tests/fixtures/hf          # CPU, float32 (the default)
    python3 scripts/gen_hf_fixtures.py tests/fixtures/hf --device cuda   # TF32 is switched off

For each model it writes tests/fixtures/hf/<name>/:
    config.json         HF config. Besides whatever this transformers version writes, it always carries
                        the classic keys "rope_theta" and "rope_scaling" (4.x / most Hub files) AND
                        "rope_parameters" (5.x), so the same file exercises either parser.
    model.safetensors   float32 weights, from save_pretrained (tied models have no lm_head.weight).
    expected.json       the input ids and the float32 logits at EVERY position (7 significant digits).
At the end it runs scripts/check_hf_fixtures.py (numpy float64 forward from the written files) on out_dir.

Models (all float32, eager attention, fixed seeds, weights re-drawn with a seeded generator so logits are
O(1) rather than HF's near-zero 0.02-std init):
    llama_tiny        LlamaForCausalLM, vocab 256, hidden 64, 2 layers, 4 heads, 2 KV heads (GQA),
                      ffn 128, rope_theta 10000, untied lm_head.
    llama3_rope_tiny  the same with Llama-3 rope scaling {rope_type llama3, factor 8, low_freq_factor 1,
                      high_freq_factor 4, original_max_position_embeddings 32}: with head_dim 16 and
                      theta 1e4 the 8 frequencies cover all three regimes (kept, smoothed, divided by 8),
                      and the 40-token sequence runs past position 32.
    qwen2_tiny        Qwen2ForCausalLM, same sizes, q/k/v biases, rope_theta 1e6, rms eps 1e-6,
                      tied embeddings.

Inputs: two sequences, 12 and 40 tokens (ids drawn from random.Random(seed)), each run on its own
(batch 1, no padding, no cache), positions 0..T-1.

Note for implementers: these are HF-layout weights, so RoPE pairs are (x[i], x[i + head_dim/2])
("rotate_half"), NOT the adjacent pairs of GGUF files.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import random
import sys

SEED = 1234
SEQ_LENS = (12, 40)

COMMON = dict(
    vocab_size=256,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=128,
    hidden_act="silu",
)

LLAMA3_SCALING = {
    "rope_type": "llama3",
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 32,
}

MODELS = [
    {
        "name": "llama_tiny",
        "arch": "llama",
        "seed": SEED,
        "config": dict(COMMON, rope_theta=10000.0, rms_norm_eps=1e-5, tie_word_embeddings=False,
                       attention_bias=False, mlp_bias=False, bos_token_id=1, eos_token_id=2),
        "rope_scaling": None,
    },
    {
        "name": "llama3_rope_tiny",
        "arch": "llama",
        "seed": SEED + 1,
        "config": dict(COMMON, rope_theta=10000.0, rms_norm_eps=1e-5, tie_word_embeddings=False,
                       attention_bias=False, mlp_bias=False, bos_token_id=1, eos_token_id=2),
        "rope_scaling": LLAMA3_SCALING,
    },
    {
        "name": "qwen2_tiny",
        "arch": "qwen2",
        "seed": SEED + 2,
        "config": dict(COMMON, rope_theta=1000000.0, rms_norm_eps=1e-6, tie_word_embeddings=True,
                       use_sliding_window=False, sliding_window=None, bos_token_id=1, eos_token_id=2),
        "rope_scaling": None,
    },
]


def input_ids(seed: int, vocab: int):
    rng = random.Random(seed)
    return [[rng.randrange(vocab) for _ in range(n)] for n in SEQ_LENS]


def make_config(spec):
    import transformers

    cls = {"llama": transformers.LlamaConfig, "qwen2": transformers.Qwen2Config}[spec["arch"]]
    kw = dict(spec["config"])
    if spec["rope_scaling"] is not None:
        kw["rope_scaling"] = dict(spec["rope_scaling"])
    try:
        cfg = cls(attn_implementation="eager", **kw)
    except TypeError:
        cfg = cls(**kw)
    # transformers 5.x reads rope settings from rope_parameters; make sure they are what we asked for.
    rp = getattr(cfg, "rope_parameters", None)
    if isinstance(rp, dict):
        assert float(rp.get("rope_theta", kw["rope_theta"])) == kw["rope_theta"], rp
        if spec["rope_scaling"] is not None:
            assert rp.get("rope_type") == "llama3", rp
    try:
        cfg._attn_implementation = "eager"
    except Exception:
        pass
    return cfg


def make_model(spec):
    import torch
    import transformers

    cfg = make_config(spec)
    cls = {"llama": transformers.LlamaForCausalLM, "qwen2": transformers.Qwen2ForCausalLM}[spec["arch"]]
    torch.manual_seed(spec["seed"])
    model = cls(cfg).to(torch.float32)
    # Re-draw every parameter from a seeded generator: O(1) logits, independent of HF init changes.
    g = torch.Generator().manual_seed(spec["seed"])
    hidden = cfg.hidden_size
    with torch.no_grad():
        for name, p in sorted(model.named_parameters(), key=lambda kv: kv[0]):
            if name.endswith("norm.weight"):
                v = 1.0 + 0.1 * torch.randn(p.shape, generator=g)
            elif name.endswith(".bias"):
                v = 0.1 * torch.randn(p.shape, generator=g)
            elif "embed_tokens" in name:
                v = torch.randn(p.shape, generator=g) * (2.0 / math.sqrt(hidden))
            elif p.dim() == 2:
                v = torch.randn(p.shape, generator=g) / math.sqrt(p.shape[1])
            else:
                raise SystemExit(f"unexpected parameter {name} {tuple(p.shape)}")
            p.copy_(v.to(p.dtype))
    if cfg.tie_word_embeddings:
        if model.lm_head.weight.data_ptr() != model.model.embed_tokens.weight.data_ptr():
            model.tie_weights()
        assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr(), "not tied"
    else:
        assert model.lm_head.weight.data_ptr() != model.model.embed_tokens.weight.data_ptr(), "unexpectedly tied"
    model.eval()
    return model


def run_logits(model, seqs, device):
    import torch

    out = []
    with torch.no_grad():
        for ids in seqs:
            x = torch.tensor([ids], dtype=torch.long, device=device)
            res = model(input_ids=x, use_cache=False)
            out.append(res.logits[0].detach().to("cpu"))
    return out


def save(model, d):
    try:
        model.save_pretrained(d, safe_serialization=True)
    except TypeError:  # transformers 5.x dropped the flag (safetensors only)
        model.save_pretrained(d)
    st = os.path.join(d, "model.safetensors")
    if not os.path.exists(st):
        raise SystemExit(f"save_pretrained did not write {st}: {os.listdir(d)}")
    for extra in ("generation_config.json",):
        p = os.path.join(d, extra)
        if os.path.exists(p):
            os.remove(p)


def normalise_config_json(d, spec):
    """Make config.json carry both the classic and the 5.x rope keys, identically."""
    p = os.path.join(d, "config.json")
    with open(p) as fh:
        cfg = json.load(fh)
    theta = spec["config"]["rope_theta"]
    cfg["rope_theta"] = theta
    cfg["rope_scaling"] = dict(spec["rope_scaling"]) if spec["rope_scaling"] else None
    rp = {"rope_theta": theta, "rope_type": "default"}
    if spec["rope_scaling"]:
        rp.update(spec["rope_scaling"])
    cfg["rope_parameters"] = rp
    cfg.setdefault("head_dim", spec["config"]["hidden_size"] // spec["config"]["num_attention_heads"])
    cfg["torch_dtype"] = "float32"
    cfg["dtype"] = "float32"
    with open(p, "w") as fh:
        json.dump(cfg, fh, indent=2, sort_keys=True)
        fh.write("\n")
    return cfg


def reload(spec, d, device):
    import torch
    import transformers

    cls = {"llama": transformers.LlamaForCausalLM, "qwen2": transformers.Qwen2ForCausalLM}[spec["arch"]]
    try:
        m = cls.from_pretrained(d, dtype=torch.float32, attn_implementation="eager")
    except TypeError:
        m = cls.from_pretrained(d, torch_dtype=torch.float32, attn_implementation="eager")
    return m.to(device).eval()


def fmt_row(row) -> str:
    return "[" + ",".join(f"{float(x):.7g}" for x in row) + "]"


def sha256_file(p):
    h = hashlib.sha256()
    with open(p, "rb") as fh:
        for b in iter(lambda: fh.read(1 << 20), b""):
            h.update(b)
    return h.hexdigest()


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("out_dir", help="e.g. tests/fixtures/hf")
    ap.add_argument("--device", default="cpu", help="cpu (default) or cuda")
    ap.add_argument("--only", default=None, help="comma-separated model names")
    ap.add_argument("--no-check", action="store_true", help="skip the numpy float64 cross-check at the end")
    a = ap.parse_args(argv)

    import torch
    import transformers

    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    try:
        torch.use_deterministic_algorithms(True, warn_only=True)
    except Exception:
        pass
    print(f"torch {torch.__version__}, transformers {transformers.__version__}, device {a.device}", file=sys.stderr)

    only = set(a.only.split(",")) if a.only else None
    for spec in MODELS:
        if only and spec["name"] not in only:
            continue
        d = os.path.join(a.out_dir, spec["name"])
        os.makedirs(d, exist_ok=True)
        model = make_model(spec).to(a.device)
        seqs = input_ids(spec["seed"], spec["config"]["vocab_size"])
        logits = run_logits(model, seqs, a.device)
        save(model.to("cpu"), d)
        cfg_json = normalise_config_json(d, spec)

        # The saved files must reproduce the same numbers through from_pretrained.
        back = run_logits(reload(spec, d, a.device), seqs, a.device)
        for l0, l1 in zip(logits, back):
            diff = (l0 - l1).abs().max().item()
            assert diff <= 1e-6, f"{spec['name']}: reloaded model differs by {diff}"
        # How far float32 is from float64 for the same weights: a guide for test tolerances.
        m64 = reload(spec, d, a.device).to(torch.float64)
        l64 = run_logits(m64, seqs, a.device)
        f32_vs_f64 = max((l0.double() - l1).abs().max().item() for l0, l1 in zip(logits, l64))

        from safetensors import safe_open

        with safe_open(os.path.join(d, "model.safetensors"), framework="pt") as f:
            tensors = {}
            for k in sorted(f.keys()):
                t = f.get_tensor(k)
                tensors[k] = [list(t.shape), str(t.dtype).replace("torch.", "")]
        assert ("lm_head.weight" in tensors) != bool(spec["config"]["tie_word_embeddings"]), sorted(tensors)

        head = {
            "about": "tiny random HF model for samepage tests (scripts/gen_hf_fixtures.py)",
            "name": spec["name"],
            "arch": spec["arch"],
            "generated_with": {"torch": torch.__version__, "transformers": transformers.__version__,
                               "device": a.device, "dtype": "float32", "attn_implementation": "eager"},
            "seed": spec["seed"],
            "config": {k: cfg_json.get(k) for k in (
                "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                "num_key_value_heads", "head_dim", "rope_theta", "rope_scaling", "rms_norm_eps",
                "tie_word_embeddings")},
            "rope_layout": "HF rotate_half: pairs (x[i], x[i + head_dim/2])",
            "safetensors_sha256": sha256_file(os.path.join(d, "model.safetensors")),
            "tensors": tensors,
            "f32_vs_f64_max_abs_logit_diff": f32_vs_f64,
            "logits_note": "logits[s][t] = float32 logits (vocab_size values, 7 significant digits) after "
                           "input_ids[s][0..=t], sequence s run alone from position 0",
            "input_ids": seqs,
            "argmax": [[int(i) for i in l.argmax(-1).tolist()] for l in logits],
        }
        p = os.path.join(d, "expected.json")
        with open(p, "w") as fh:
            fh.write("{\n")
            for k, v in head.items():
                fh.write(f" {json.dumps(k)}: {json.dumps(v)},\n")
            fh.write(' "logits": [\n')
            for si, l in enumerate(logits):
                fh.write("  [\n")
                rows = l.tolist()
                for ti, row in enumerate(rows):
                    fh.write("   " + fmt_row(row) + (",\n" if ti + 1 < len(rows) else "\n"))
                fh.write("  ]" + (",\n" if si + 1 < len(logits) else "\n"))
            fh.write(" ]\n}\n")
        with open(p) as fh:
            chk = json.load(fh)
        assert len(chk["logits"]) == len(seqs)
        assert all(len(chk["logits"][s]) == len(seqs[s]) for s in range(len(seqs)))
        sizes = {f: os.path.getsize(os.path.join(d, f)) for f in sorted(os.listdir(d))}
        print(f"{spec['name']}: {sizes}; f32 vs f64 max |dlogit| {f32_vs_f64:.2e}; "
              f"logit std {float(torch.cat(logits).std()):.3f}", file=sys.stderr)

    if not a.no_check:
        # Independent numpy float64 recomputation from the written files (exits non-zero on mismatch).
        sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
        import check_hf_fixtures

        check_hf_fixtures.main([a.out_dir])


if __name__ == "__main__":
    main()
