//! GGUF (v2/v3) header reader: metadata key/values and tensor infos.
//!
//! Layout: magic "GGUF", u32 version, u64 n_tensors, u64 n_kv, then the key/values,
//! then the tensor infos (name, n_dims, dims, ggml type, offset), then padding to
//! `general.alignment` (default 32), then the tensor data. The header is parsed from a
//! prefix of the file; [`Error::NeedMore`] says the prefix was too short, so the caller
//! reads more and tries again (the header size is not known up front).
use std::collections::HashMap;

use samepage_guest::abi::DType;

#[derive(Clone, Debug, PartialEq)]
pub enum Value {
    U8(u8),
    I8(i8),
    U16(u16),
    I16(i16),
    U32(u32),
    I32(i32),
    U64(u64),
    I64(i64),
    F32(f32),
    F64(f64),
    Bool(bool),
    Str(String),
    Array(Vec<Value>),
}

impl Value {
    pub fn as_u64(&self) -> Option<u64> {
        Some(match *self {
            Value::U8(v) => v as u64,
            Value::U16(v) => v as u64,
            Value::U32(v) => v as u64,
            Value::U64(v) => v,
            Value::I8(v) if v >= 0 => v as u64,
            Value::I16(v) if v >= 0 => v as u64,
            Value::I32(v) if v >= 0 => v as u64,
            Value::I64(v) if v >= 0 => v as u64,
            Value::Bool(v) => v as u64,
            _ => return None,
        })
    }

    pub fn as_f64(&self) -> Option<f64> {
        match *self {
            Value::F32(v) => Some(v as f64),
            Value::F64(v) => Some(v),
            Value::I8(v) => Some(v as f64),
            Value::I16(v) => Some(v as f64),
            Value::I32(v) => Some(v as f64),
            Value::I64(v) => Some(v as f64),
            _ => self.as_u64().map(|v| v as f64),
        }
    }

    pub fn as_str(&self) -> Option<&str> {
        match self {
            Value::Str(s) => Some(s),
            _ => None,
        }
    }

    pub fn as_bool(&self) -> Option<bool> {
        match *self {
            Value::Bool(b) => Some(b),
            _ => self.as_u64().map(|v| v != 0),
        }
    }

    pub fn as_array(&self) -> Option<&[Value]> {
        match self {
            Value::Array(a) => Some(a),
            _ => None,
        }
    }
}

#[derive(Clone, Debug, PartialEq)]
pub struct TensorInfo {
    pub name: String,
    /// ggml order: `dims[0]` is the contiguous (row) dimension.
    pub dims: Vec<u64>,
    pub ggml_type: u32,
    /// Offset inside the tensor-data section.
    pub offset: u64,
}

impl TensorInfo {
    pub fn n_elements(&self) -> u64 {
        self.dims.iter().product()
    }
}

#[derive(Debug)]
pub struct Gguf {
    pub version: u32,
    pub metadata: HashMap<String, Value>,
    pub tensors: Vec<TensorInfo>,
    pub alignment: u64,
    /// File offset of the tensor-data section.
    pub data_start: u64,
}

#[derive(Debug, PartialEq)]
pub enum Error {
    /// The prefix ended inside the header; at least this many bytes are needed.
    NeedMore(usize),
    Bad(String),
}

/// The ggml type number of a GGUF tensor as an ABI dtype, or `None` if unsupported.
pub fn dtype_of(ggml_type: u32) -> Option<DType> {
    Some(match ggml_type {
        0 => DType::F32,
        1 => DType::F16,
        2 => DType::Q4_0,
        3 => DType::Q4_1,
        6 => DType::Q5_0,
        8 => DType::Q8_0,
        12 => DType::Q4_K,
        13 => DType::Q5_K,
        14 => DType::Q6_K,
        30 => DType::BF16,
        _ => return None,
    })
}

/// A readable name for a ggml type number (for error messages).
pub fn ggml_type_name(t: u32) -> String {
    let name = match t {
        0 => "F32",
        1 => "F16",
        2 => "Q4_0",
        3 => "Q4_1",
        6 => "Q5_0",
        7 => "Q5_1",
        8 => "Q8_0",
        9 => "Q8_1",
        10 => "Q2_K",
        11 => "Q3_K",
        12 => "Q4_K",
        13 => "Q5_K",
        14 => "Q6_K",
        15 => "Q8_K",
        16 => "IQ2_XXS",
        17 => "IQ2_XS",
        18 => "IQ3_XXS",
        19 => "IQ1_S",
        20 => "IQ4_NL",
        21 => "IQ3_S",
        22 => "IQ2_S",
        23 => "IQ4_XS",
        24 => "I8",
        25 => "I16",
        26 => "I32",
        27 => "I64",
        28 => "F64",
        29 => "IQ1_M",
        30 => "BF16",
        34 => "TQ1_0",
        35 => "TQ2_0",
        39 => "MXFP4",
        _ => return format!("ggml type {t}"),
    };
    name.to_string()
}

struct Reader<'a> {
    b: &'a [u8],
    at: usize,
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], Error> {
        let end = self
            .at
            .checked_add(n)
            .ok_or_else(|| Error::Bad("a length in the header overflows".into()))?;
        if end > self.b.len() {
            return Err(Error::NeedMore(end));
        }
        let s = &self.b[self.at..end];
        self.at = end;
        Ok(s)
    }
    fn arr<const N: usize>(&mut self) -> Result<[u8; N], Error> {
        Ok(self.take(N)?.try_into().unwrap())
    }
    fn u8(&mut self) -> Result<u8, Error> {
        Ok(self.arr::<1>()?[0])
    }
    fn u32(&mut self) -> Result<u32, Error> {
        Ok(u32::from_le_bytes(self.arr()?))
    }
    fn u64(&mut self) -> Result<u64, Error> {
        Ok(u64::from_le_bytes(self.arr()?))
    }
    /// A count that must also be plausible for the remaining file (guards allocations).
    fn count(&mut self, what: &str) -> Result<usize, Error> {
        let n = self.u64()?;
        if n > (1 << 28) {
            return Err(Error::Bad(format!("the header's {what} count ({n}) is implausible")));
        }
        Ok(n as usize)
    }
    fn string(&mut self) -> Result<String, Error> {
        let n = self.count("string length")?;
        let s = self.take(n)?;
        // Some vocabularies carry invalid UTF-8 pieces; keep them readable.
        Ok(String::from_utf8_lossy(s).into_owned())
    }

    fn value(&mut self, ty: u32, depth: u32) -> Result<Value, Error> {
        Ok(match ty {
            0 => Value::U8(self.u8()?),
            1 => Value::I8(self.u8()? as i8),
            2 => Value::U16(u16::from_le_bytes(self.arr()?)),
            3 => Value::I16(i16::from_le_bytes(self.arr()?)),
            4 => Value::U32(self.u32()?),
            5 => Value::I32(self.u32()? as i32),
            6 => Value::F32(f32::from_le_bytes(self.arr()?)),
            7 => Value::Bool(self.u8()? != 0),
            8 => Value::Str(self.string()?),
            9 => {
                if depth > 4 {
                    return Err(Error::Bad("the header nests arrays too deeply".into()));
                }
                let ety = self.u32()?;
                let n = self.count("array length")?;
                let mut v = Vec::with_capacity(n.min(1 << 20));
                for _ in 0..n {
                    v.push(self.value(ety, depth + 1)?);
                }
                Value::Array(v)
            }
            10 => Value::U64(self.u64()?),
            11 => Value::I64(self.u64()? as i64),
            12 => Value::F64(f64::from_le_bytes(self.arr()?)),
            _ => return Err(Error::Bad(format!("unknown metadata value type {ty}"))),
        })
    }
}

/// Parse the header from a prefix of the file.
pub fn parse(bytes: &[u8]) -> Result<Gguf, Error> {
    let mut r = Reader { b: bytes, at: 0 };
    if r.take(4)? != b"GGUF" {
        return Err(Error::Bad("this is not a GGUF file (bad magic)".into()));
    }
    let version = r.u32()?;
    if !(2..=3).contains(&version) {
        return Err(Error::Bad(format!(
            "GGUF version {version} is not supported (2 and 3 are)"
        )));
    }
    let n_tensors = r.count("tensor")?;
    let n_kv = r.count("metadata")?;
    let mut metadata = HashMap::with_capacity(n_kv.min(4096));
    for _ in 0..n_kv {
        let key = r.string()?;
        let ty = r.u32()?;
        let v = r.value(ty, 0)?;
        metadata.insert(key, v);
    }
    let mut tensors = Vec::with_capacity(n_tensors.min(1 << 16));
    for _ in 0..n_tensors {
        let name = r.string()?;
        let nd = r.u32()?;
        if nd == 0 || nd > 4 {
            return Err(Error::Bad(format!("tensor {name} has {nd} dimensions")));
        }
        let mut dims = Vec::with_capacity(nd as usize);
        for _ in 0..nd {
            dims.push(r.u64()?);
        }
        let ggml_type = r.u32()?;
        let offset = r.u64()?;
        tensors.push(TensorInfo {
            name,
            dims,
            ggml_type,
            offset,
        });
    }
    let alignment = match metadata.get("general.alignment") {
        Some(v) => v
            .as_u64()
            .filter(|a| a.is_power_of_two())
            .ok_or_else(|| Error::Bad("general.alignment is not a power of two".into()))?,
        None => 32,
    };
    let data_start = (r.at as u64).div_ceil(alignment) * alignment;
    Ok(Gguf {
        version,
        metadata,
        tensors,
        alignment,
        data_start,
    })
}

impl Gguf {
    pub fn get(&self, key: &str) -> Option<&Value> {
        self.metadata.get(key)
    }
    pub fn u64(&self, key: &str) -> Option<u64> {
        self.get(key).and_then(Value::as_u64)
    }
    pub fn f64(&self, key: &str) -> Option<f64> {
        self.get(key).and_then(Value::as_f64)
    }
    pub fn str(&self, key: &str) -> Option<&str> {
        self.get(key).and_then(Value::as_str)
    }
    pub fn bool(&self, key: &str) -> Option<bool> {
        self.get(key).and_then(Value::as_bool)
    }
    pub fn strings(&self, key: &str) -> Option<Vec<&str>> {
        self.get(key)?.as_array()?.iter().map(Value::as_str).collect()
    }
    pub fn tensor(&self, name: &str) -> Option<&TensorInfo> {
        self.tensors.iter().find(|t| t.name == name)
    }

    /// Bytes of a tensor's data, or an error naming an unsupported type or bad shape.
    pub fn tensor_bytes(t: &TensorInfo) -> Result<u64, String> {
        let dt = dtype_of(t.ggml_type).ok_or_else(|| {
            format!(
                "tensor {} has type {}, which samepage does not support",
                t.name,
                ggml_type_name(t.ggml_type)
            )
        })?;
        let row = dt.row_bytes(t.dims[0] as usize).ok_or_else(|| {
            format!(
                "tensor {} has a row of {} elements, not whole {} blocks",
                t.name,
                t.dims[0],
                dt.name()
            )
        })?;
        t.dims[1..]
            .iter()
            .try_fold(row as u64, |acc, &d| acc.checked_mul(d))
            .ok_or_else(|| format!("tensor {}'s size overflows", t.name))
    }
}

/// Write a minimal GGUF file (tests, fuzzing).
#[cfg(test)]
pub mod write {
    use super::Value;

    pub fn string(out: &mut Vec<u8>, s: &str) {
        out.extend_from_slice(&(s.len() as u64).to_le_bytes());
        out.extend_from_slice(s.as_bytes());
    }

    fn value(out: &mut Vec<u8>, v: &Value) {
        match v {
            Value::U32(x) => out.extend_from_slice(&x.to_le_bytes()),
            Value::F32(x) => out.extend_from_slice(&x.to_le_bytes()),
            Value::Str(s) => string(out, s),
            Value::Bool(b) => out.push(*b as u8),
            Value::U64(x) => out.extend_from_slice(&x.to_le_bytes()),
            Value::I32(x) => out.extend_from_slice(&x.to_le_bytes()),
            Value::Array(a) => {
                out.extend_from_slice(&type_of(&a[0]).to_le_bytes());
                out.extend_from_slice(&(a.len() as u64).to_le_bytes());
                for e in a {
                    value(out, e);
                }
            }
            _ => unimplemented!(),
        }
    }

    fn type_of(v: &Value) -> u32 {
        match v {
            Value::U32(_) => 4,
            Value::I32(_) => 5,
            Value::F32(_) => 6,
            Value::Bool(_) => 7,
            Value::Str(_) => 8,
            Value::Array(_) => 9,
            Value::U64(_) => 10,
            _ => unimplemented!(),
        }
    }

    /// (name, dims, ggml type, data) tensors; data is laid out at 32-byte alignment.
    pub fn file(kv: &[(&str, Value)], tensors: &[(&str, Vec<u64>, u32, Vec<u8>)]) -> Vec<u8> {
        let mut out = b"GGUF".to_vec();
        out.extend_from_slice(&3u32.to_le_bytes());
        out.extend_from_slice(&(tensors.len() as u64).to_le_bytes());
        out.extend_from_slice(&(kv.len() as u64).to_le_bytes());
        for (k, v) in kv {
            string(&mut out, k);
            out.extend_from_slice(&type_of(v).to_le_bytes());
            value(&mut out, v);
        }
        let mut off = 0u64;
        let mut offs = vec![];
        for (name, dims, ty, data) in tensors {
            string(&mut out, name);
            out.extend_from_slice(&(dims.len() as u32).to_le_bytes());
            for d in dims {
                out.extend_from_slice(&d.to_le_bytes());
            }
            out.extend_from_slice(&ty.to_le_bytes());
            out.extend_from_slice(&off.to_le_bytes());
            offs.push(off);
            off = (off + data.len() as u64).div_ceil(32) * 32;
        }
        while !out.len().is_multiple_of(32) {
            out.push(0);
        }
        let start = out.len();
        for ((_, _, _, data), o) in tensors.iter().zip(offs) {
            out.resize(start + o as usize, 0);
            out.extend_from_slice(data);
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_header_and_asks_for_more() {
        let f = write::file(
            &[
                ("general.architecture", Value::Str("llama".into())),
                ("llama.block_count", Value::U32(2)),
                (
                    "tokenizer.ggml.tokens",
                    Value::Array(vec![Value::Str("a".into()), Value::Str("b".into())]),
                ),
                ("llama.rope.freq_base", Value::F32(10000.0)),
            ],
            &[
                ("token_embd.weight", vec![32, 2], 0, vec![0u8; 256]),
                ("output_norm.weight", vec![32], 0, vec![1u8; 128]),
            ],
        );
        let g = parse(&f).unwrap();
        assert_eq!(g.version, 3);
        assert_eq!(g.str("general.architecture"), Some("llama"));
        assert_eq!(g.u64("llama.block_count"), Some(2));
        assert_eq!(g.f64("llama.rope.freq_base"), Some(10000.0));
        assert_eq!(g.strings("tokenizer.ggml.tokens").unwrap(), vec!["a", "b"]);
        assert_eq!(g.tensors.len(), 2);
        assert_eq!(g.tensor("output_norm.weight").unwrap().offset, 256);
        assert_eq!(g.data_start % 32, 0);
        assert_eq!(Gguf::tensor_bytes(&g.tensors[0]).unwrap(), 256);
        // Every strict prefix of the header asks for more bytes (never panics).
        for cut in 0..g.data_start as usize - 1 {
            match parse(&f[..cut]) {
                Err(Error::NeedMore(n)) => assert!(n > cut),
                Ok(_) => {} // the header may end before the padding
                Err(e) => panic!("cut {cut}: {e:?}"),
            }
        }
    }

    #[test]
    fn rejects_garbage_and_unsupported_types() {
        assert!(matches!(parse(b"GGML\0\0\0\0"), Err(Error::Bad(_))));
        let mut f = write::file(&[], &[]);
        f[4] = 9;
        assert!(matches!(parse(&f), Err(Error::Bad(m)) if m.contains("version 9")));
        let t = TensorInfo {
            name: "blk.0.attn_q.weight".into(),
            dims: vec![64, 64],
            ggml_type: 10,
            offset: 0,
        };
        let e = Gguf::tensor_bytes(&t).unwrap_err();
        assert!(e.contains("Q2_K") && e.contains("blk.0.attn_q.weight"), "{e}");
        // Random bytes after a valid magic never panic.
        let mut seed = 0x1234_5678u64;
        for _ in 0..2000 {
            let mut b = b"GGUF\x03\0\0\0".to_vec();
            for _ in 0..64 {
                seed ^= seed << 13;
                seed ^= seed >> 7;
                seed ^= seed << 17;
                b.push((seed % 7) as u8);
            }
            let _ = parse(&b);
        }
    }
}
