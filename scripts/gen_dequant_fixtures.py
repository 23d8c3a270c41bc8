#!/usr/bin/env python3
"""Dequantization fixtures for crates/backend-cpu/tests/dequant.rs.

For each ggml type: random valid blocks (random bytes, with finite f16 scales), and
their dequantization by `gguf.quants.dequantize`, the reference. One file per type:

    magic   b"SPDQ"
    version u32 = 1
    dtype   u32   (samepage_abi::DType)
    n_elems u32
    n_bytes u32
    raw block bytes (n_bytes)
    expected f32 (n_elems, little-endian)

Usage: python3 scripts/gen_dequant_fixtures.py   (needs `pip install gguf numpy`)
"""
import pathlib
import struct

import numpy as np
from gguf import GGMLQuantizationType as T
from gguf.constants import GGML_QUANT_SIZES
from gguf.quants import dequantize

OUT = pathlib.Path(__file__).resolve().parent.parent / "crates/backend-cpu/tests/fixtures"

# (name, samepage DType code, ggml type, blocks, byte offsets of f16 scales)
TYPES = [
    ("f16", 1, T.F16, 1024, None),
    ("bf16", 2, T.BF16, 1024, None),
    ("q8_0", 3, T.Q8_0, 96, [0]),
    ("q4_0", 4, T.Q4_0, 96, [0]),
    ("q4_1", 5, T.Q4_1, 96, [0, 2]),
    ("q5_0", 6, T.Q5_0, 96, [0]),
    ("q4_K", 7, T.Q4_K, 24, [0, 2]),
    ("q5_K", 8, T.Q5_K, 24, [0, 2]),
    ("q6_K", 9, T.Q6_K, 24, [208]),
]


def finite_f16(rng, n):
    """Random finite f16 values over a wide range of magnitudes, both signs."""
    mag = rng.uniform(0.5, 1.0, n) * np.exp2(rng.integers(-14, 8, n))
    sign = np.where(rng.random(n) < 0.5, -1.0, 1.0)
    return (mag * sign).astype(np.float16)


def main():
    rng = np.random.default_rng(20261101)
    OUT.mkdir(parents=True, exist_ok=True)
    total = 0
    for name, code, qtype, n_blocks, scale_offsets in TYPES:
        block_elems, block_bytes = GGML_QUANT_SIZES[qtype]
        if scale_offsets is None:
            if qtype == T.F16:
                raw = finite_f16(rng, n_blocks).view(np.uint8)
            else:
                f = (rng.standard_normal(n_blocks) * np.exp2(rng.integers(-20, 20, n_blocks))).astype(np.float32)
                raw = (f.view(np.uint32) >> 16).astype(np.uint16).view(np.uint8)
            raw = raw.reshape(n_blocks, block_bytes)
        else:
            raw = rng.integers(0, 256, (n_blocks, block_bytes), dtype=np.uint8)
            for off in scale_offsets:
                raw[:, off : off + 2] = finite_f16(rng, n_blocks).view(np.uint8).reshape(n_blocks, 2)
        raw = np.ascontiguousarray(raw)
        expected = dequantize(raw.reshape(-1), qtype).astype(np.float32).reshape(-1)
        assert expected.size == n_blocks * block_elems and np.all(np.isfinite(expected)), name
        data = struct.pack("<4sIIII", b"SPDQ", 1, code, expected.size, raw.size) + raw.tobytes() + expected.astype("<f4").tobytes()
        (OUT / f"dequant_{name}.bin").write_bytes(data)
        total += len(data)
        print(f"{name}: {n_blocks} blocks, {len(data)} bytes")
    print(f"total {total} bytes in {OUT}")


if __name__ == "__main__":
    main()
