//! safetensors headers and Hugging Face `config.json`.
//!
//! A safetensors file is a u64 header length, a JSON header
//! `{name: {dtype, shape, data_offsets: [begin, end]}, "__metadata__": {...}}`, then the
//! data; offsets are relative to the end of the header.
use samepage_guest::abi::{self, DType};
use serde_json::Value;

use crate::model::Config;

#[derive(Clone, Debug, PartialEq)]
pub struct StTensor {
    pub name: String,
    pub dtype: DType,
    /// Row-major shape, as in PyTorch.
    pub shape: Vec<u64>,
    pub begin: u64,
    pub end: u64,
}

/// Parse a header (the JSON bytes after the length prefix).
pub fn parse_header(json: &[u8], file: &str) -> Result<Vec<StTensor>, String> {
    let v: Value =
        serde_json::from_slice(json).map_err(|e| format!("{file}: the safetensors header is not JSON: {e}"))?;
    let obj = v
        .as_object()
        .ok_or_else(|| format!("{file}: the safetensors header is not an object"))?;
    let mut out = Vec::with_capacity(obj.len());
    for (name, t) in obj {
        if name == "__metadata__" {
            continue;
        }
        let dt = t.get("dtype").and_then(Value::as_str).unwrap_or("?");
        let dtype = match dt {
            "F32" => DType::F32,
            "F16" => DType::F16,
            "BF16" => DType::BF16,
            _ => {
                return Err(format!(
                    "{file}: tensor {name} has dtype {dt}, which samepage does not support (F32, F16, BF16 are)"
                ))
            }
        };
        let shape: Vec<u64> = t
            .get("shape")
            .and_then(Value::as_array)
            .map(|a| a.iter().filter_map(Value::as_u64).collect())
            .ok_or_else(|| format!("{file}: tensor {name} has no shape"))?;
        let offs: Vec<u64> = t
            .get("data_offsets")
            .and_then(Value::as_array)
            .map(|a| a.iter().filter_map(Value::as_u64).collect())
            .filter(|o: &Vec<u64>| o.len() == 2 && o[0] <= o[1])
            .ok_or_else(|| format!("{file}: tensor {name} has bad data_offsets"))?;
        let n: u64 = shape.iter().product();
        if n.checked_mul(dtype.block_bytes() as u64) != Some(offs[1] - offs[0]) {
            return Err(format!(
                "{file}: tensor {name}'s byte range does not match its shape {shape:?}"
            ));
        }
        out.push(StTensor {
            name: name.clone(),
            dtype,
            shape,
            begin: offs[0],
            end: offs[1],
        });
    }
    Ok(out)
}

fn num(v: &Value, key: &str) -> Option<f64> {
    v.get(key).and_then(Value::as_f64)
}

/// Ids from a field that is an int or a list of ints (`eos_token_id`).
pub fn ids(v: Option<&Value>) -> Vec<u32> {
    match v {
        Some(Value::Number(n)) => n.as_u64().map(|x| vec![x as u32]).unwrap_or_default(),
        Some(Value::Array(a)) => a.iter().filter_map(Value::as_u64).map(|x| x as u32).collect(),
        _ => vec![],
    }
}

/// A model configuration from `config.json`. Hugging Face checkpoints keep q/k in the
/// "half" rotary layout.
pub fn config(cfg: &Value) -> Result<Config, String> {
    let arch = cfg.get("model_type").and_then(Value::as_str).unwrap_or("").to_string();
    if !matches!(arch.as_str(), "llama" | "mistral" | "qwen2") {
        return Err(format!(
            "the model type {arch:?} in config.json is not a Llama-family one samepage runs (llama, mistral, qwen2)"
        ));
    }
    let need = |k: &str| {
        num(cfg, k)
            .map(|x| x as u32)
            .filter(|&x| x > 0)
            .ok_or_else(|| format!("config.json has no {k}"))
    };
    let dim = need("hidden_size")?;
    let n_heads = need("num_attention_heads")?;
    let head_dim = num(cfg, "head_dim")
        .map(|x| x as u32)
        .filter(|&x| x > 0)
        .unwrap_or(dim / n_heads);
    // transformers >= 5 keeps rope settings in `rope_parameters` (older: `rope_scaling`).
    let rope_params = cfg.get("rope_parameters").filter(|v| v.is_object());
    let scaling = cfg.get("rope_scaling").filter(|v| !v.is_null()).or(rope_params);
    let rope_theta = num(cfg, "rope_theta")
        .or_else(|| rope_params.and_then(|p| num(p, "rope_theta")))
        .unwrap_or(10000.0);
    let rope_scaling = match scaling {
        None => None,
        Some(rs) => {
            let ty = rs
                .get("rope_type")
                .or_else(|| rs.get("type"))
                .and_then(Value::as_str)
                .unwrap_or("");
            match ty {
                "llama3" => Some((
                    num(rs, "factor").unwrap_or(8.0) as f32,
                    num(rs, "low_freq_factor").unwrap_or(1.0) as f32,
                    num(rs, "high_freq_factor").unwrap_or(4.0) as f32,
                    num(rs, "original_max_position_embeddings").unwrap_or(8192.0) as u32,
                )),
                "default" => None,
                _ => return Err(format!("rope scaling {ty:?} is not supported (llama3 is)")),
            }
        }
    };
    Ok(Config {
        name: cfg
            .get("_name_or_path")
            .and_then(Value::as_str)
            .unwrap_or(&arch)
            .to_string(),
        arch,
        n_layers: need("num_hidden_layers")?,
        dim,
        n_heads,
        n_kv_heads: num(cfg, "num_key_value_heads").map(|x| x as u32).unwrap_or(n_heads),
        head_dim,
        ffn: need("intermediate_size")?,
        vocab: need("vocab_size")?,
        ctx_max: num(cfg, "max_position_embeddings").map(|x| x as u32).unwrap_or(2048),
        n_rot: head_dim,
        norm_eps: num(cfg, "rms_norm_eps").unwrap_or(1e-6) as f32,
        rope_base: rope_theta as f32,
        rope_mode: abi::ROPE_HALF,
        rope_scaling,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_header_and_config() {
        let h = br#"{"__metadata__":{"format":"pt"},"a":{"dtype":"BF16","shape":[2,3],"data_offsets":[0,12]},"b":{"dtype":"F32","shape":[4],"data_offsets":[12,28]}}"#;
        let mut t = parse_header(h, "m.safetensors").unwrap();
        t.sort_by(|a, b| a.name.cmp(&b.name));
        assert_eq!(
            t[0],
            StTensor {
                name: "a".into(),
                dtype: DType::BF16,
                shape: vec![2, 3],
                begin: 0,
                end: 12
            }
        );
        let bad = br#"{"a":{"dtype":"I8","shape":[2],"data_offsets":[0,2]}}"#;
        assert!(parse_header(bad, "x").unwrap_err().contains("I8"));
        let wrong = br#"{"a":{"dtype":"F32","shape":[2],"data_offsets":[0,4]}}"#;
        assert!(parse_header(wrong, "x").is_err());

        let cfg: Value = serde_json::from_str(
            r#"{"model_type":"llama","hidden_size":2048,"num_attention_heads":32,"num_key_value_heads":8,"num_hidden_layers":16,
            "intermediate_size":8192,"vocab_size":128256,"max_position_embeddings":131072,"rms_norm_eps":1e-5,"rope_theta":500000.0,
            "rope_scaling":{"factor":32.0,"high_freq_factor":4.0,"low_freq_factor":1.0,"original_max_position_embeddings":8192,"rope_type":"llama3"},
            "eos_token_id":[128001,128008,128009]}"#,
        )
        .unwrap();
        let c = config(&cfg).unwrap();
        assert_eq!(
            (c.head_dim, c.n_kv_heads, c.rope_scaling),
            (64, 8, Some((32.0, 1.0, 4.0, 8192)))
        );
        assert_eq!(ids(cfg.get("eos_token_id")), vec![128001, 128008, 128009]);
        let gpt: Value = serde_json::from_str(r#"{"model_type":"gpt_neox"}"#).unwrap();
        assert!(config(&gpt).unwrap_err().contains("gpt_neox"));
    }
}
