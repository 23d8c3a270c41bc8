//! Tokenizers, running in the guest: GGUF's embedded vocabularies (byte-level BPE and
//! SentencePiece-style BPE, our own code) and Hugging Face `tokenizer.json` (the
//! `tokenizers` crate).
pub mod bpe;
pub mod pretok;
pub mod spm;

use std::collections::HashMap;

use crate::gguf::Gguf;

// GGUF token types (llama.cpp's llama_token_type).
const TYPE_NORMAL: i64 = 1;
const TYPE_UNKNOWN: i64 = 2;
const TYPE_CONTROL: i64 = 3;
const TYPE_USER_DEFINED: i64 = 4;
const TYPE_BYTE: i64 = 6;

/// Control tokens that end a turn, for models whose metadata names only one EOS
/// (llama.cpp's end-of-generation heuristic).
const EOG_TEXTS: &[&str] = &[
    "<|eot_id|>",
    "<|im_end|>",
    "<|end|>",
    "<end_of_turn>",
    "<|endoftext|>",
    "<|end_of_text|>",
    "<|eom_id|>",
    "<EOT>",
    "</s>",
];

enum Model {
    Bpe(Box<bpe::Bpe>),
    Spm {
        spm: Box<spm::Spm>,
        add_space_prefix: bool,
    },
    Hf(Box<tokenizers::Tokenizer>),
    /// A model directory without tokenizer.json: only token ids can be used.
    None,
}

pub struct Tokenizer {
    model: Model,
    /// Each token's text as bytes (control tokens: their literal text).
    pieces: Vec<Vec<u8>>,
    control: Vec<bool>,
    /// Tokens matched literally in input text: (text, id, is_control), longest first.
    /// Control tokens are matched only when parsing special tokens (GGUF models only;
    /// `tokenizers` handles its own added tokens).
    specials: Vec<(String, u32, bool)>,
    pub bos: Option<u32>,
    pub eos: Vec<u32>,
    pub add_bos: bool,
    pub kind: &'static str,
}

impl Tokenizer {
    /// The tokenizer embedded in a GGUF file's metadata.
    pub fn from_gguf(g: &Gguf) -> Result<Tokenizer, String> {
        let model = g
            .str("tokenizer.ggml.model")
            .ok_or("the GGUF file has no tokenizer (tokenizer.ggml.model)")?;
        let tokens: Vec<String> = g
            .strings("tokenizer.ggml.tokens")
            .ok_or("the GGUF file has no vocabulary (tokenizer.ggml.tokens)")?
            .into_iter()
            .map(str::to_string)
            .collect();
        let n = tokens.len();
        let types: Vec<i64> = match g.get("tokenizer.ggml.token_type").and_then(|v| v.as_array()) {
            Some(a) => a.iter().map(|v| v.as_f64().unwrap_or(1.0) as i64).collect(),
            None => vec![TYPE_NORMAL; n],
        };
        let ty = |i: usize| types.get(i).copied().unwrap_or(TYPE_NORMAL);
        let id_key = |k: &str| g.u64(k).map(|v| v as u32).filter(|&v| (v as usize) < n);
        let bos = id_key("tokenizer.ggml.bos_token_id");
        let mut eos: Vec<u32> = ["eos", "eot", "eom"]
            .iter()
            .filter_map(|k| id_key(&format!("tokenizer.ggml.{k}_token_id")))
            .collect();
        let control: Vec<bool> = (0..n).map(|i| matches!(ty(i), TYPE_CONTROL)).collect();
        for (i, t) in tokens.iter().enumerate() {
            if control[i] && EOG_TEXTS.contains(&t.as_str()) && !eos.contains(&(i as u32)) && Some(i as u32) != bos {
                eos.push(i as u32);
            }
        }
        let specials = special_list(tokens.iter().enumerate().filter_map(|(i, t)| match ty(i) {
            // As llama.cpp: control and unknown tokens only when parsing specials.
            TYPE_CONTROL | TYPE_UNKNOWN => Some((t.clone(), i as u32, true)),
            TYPE_USER_DEFINED => Some((t.clone(), i as u32, false)),
            _ => None,
        }));
        let (model, pieces, add_bos_default, kind) = match model {
            "gpt2" => {
                let merges = g
                    .strings("tokenizer.ggml.merges")
                    .ok_or("the GGUF vocabulary has no merges (tokenizer.ggml.merges)")?;
                let pre_name = g.str("tokenizer.ggml.pre").unwrap_or("default");
                let pre = match pretok::PreTokenizer::for_gguf(pre_name) {
                    Some(p) => p?,
                    None => {
                        samepage_guest::log(&format!(
                            "unknown tokenizer.ggml.pre {pre_name:?}; using GPT-2's pre-tokenizer"
                        ));
                        pretok::PreTokenizer::new(&[pretok::GPT2])?
                    }
                };
                let ignore_merges = matches!(
                    pre_name,
                    "llama3" | "llama-v3" | "llama-bpe" | "falcon3" | "falcon-h1" | "pixtral"
                );
                let inv = bpe::byte_char_inverse();
                let pieces = tokens
                    .iter()
                    .enumerate()
                    .map(|(i, t)| match ty(i) {
                        TYPE_CONTROL | TYPE_USER_DEFINED => t.as_bytes().to_vec(),
                        _ => bpe::decode_byte_level(t, &inv),
                    })
                    .collect();
                (
                    Model::Bpe(Box::new(bpe::Bpe::new(&tokens, &merges, pre, ignore_merges))),
                    pieces,
                    false,
                    "bpe",
                )
            }
            "llama" => {
                let scores: Vec<f32> = match g.get("tokenizer.ggml.scores").and_then(|v| v.as_array()) {
                    Some(a) => a.iter().map(|v| v.as_f64().unwrap_or(0.0) as f32).collect(),
                    None => vec![0.0; n],
                };
                let mut byte_tokens = [None; 256];
                for (i, t) in tokens.iter().enumerate() {
                    if ty(i) == TYPE_BYTE {
                        if let Some(b) = spm::parse_byte_token(t) {
                            byte_tokens[b as usize] = Some(i as u32);
                        }
                    }
                }
                let unk = id_key("tokenizer.ggml.unknown_token_id")
                    .or_else(|| (0..n).find(|&i| ty(i) == TYPE_UNKNOWN).map(|i| i as u32));
                let pieces = tokens
                    .iter()
                    .enumerate()
                    .map(|(i, t)| match ty(i) {
                        TYPE_CONTROL | TYPE_USER_DEFINED | TYPE_UNKNOWN => t.as_bytes().to_vec(),
                        other => spm::piece_bytes(t, other == TYPE_BYTE),
                    })
                    .collect();
                let add_space_prefix = g.bool("tokenizer.ggml.add_space_prefix").unwrap_or(true);
                let spm = Box::new(spm::Spm::new(&tokens, scores, byte_tokens, unk));
                (Model::Spm { spm, add_space_prefix }, pieces, true, "spm")
            }
            other => {
                return Err(format!(
                    "the GGUF tokenizer model {other:?} is not supported (gpt2 and llama are)"
                ))
            }
        };
        let add_bos = g.bool("tokenizer.ggml.add_bos_token").unwrap_or(add_bos_default) && bos.is_some();
        Ok(Tokenizer {
            model,
            pieces,
            control,
            specials,
            bos,
            eos,
            add_bos,
            kind,
        })
    }

    /// A Hugging Face `tokenizer.json`, with the ids of the EOS tokens from the model's
    /// configuration files (`config.json`, `generation_config.json`).
    pub fn from_hf(
        json: &[u8],
        config_eos: &[u32],
        bos_text: Option<&str>,
        eos_text: Option<&str>,
    ) -> Result<Tokenizer, String> {
        let tk =
            tokenizers::Tokenizer::from_bytes(json).map_err(|e| format!("tokenizer.json could not be loaded: {e}"))?;
        let raw: serde_json::Value =
            serde_json::from_slice(json).map_err(|e| format!("tokenizer.json is not JSON: {e}"))?;
        let byte_level = raw
            .get("decoder")
            .map(|d| d.to_string().contains("\"ByteLevel\""))
            .unwrap_or(false);
        let n = tk.get_vocab_size(true);
        let mut special_ids = HashMap::new();
        if let Some(added) = raw.get("added_tokens").and_then(|a| a.as_array()) {
            for t in added {
                if let (Some(id), Some(special)) = (
                    t.get("id").and_then(|v| v.as_u64()),
                    t.get("special").and_then(|v| v.as_bool()),
                ) {
                    special_ids.insert(id as u32, special);
                }
            }
        }
        let inv = bpe::byte_char_inverse();
        let mut pieces = Vec::with_capacity(n);
        let mut control = Vec::with_capacity(n);
        for id in 0..n as u32 {
            let t = tk.id_to_token(id).unwrap_or_default();
            let added = special_ids.get(&id).copied();
            control.push(added == Some(true));
            pieces.push(if added.is_some() {
                t.into_bytes()
            } else if byte_level {
                bpe::decode_byte_level(&t, &inv)
            } else {
                spm::piece_bytes(&t, spm::parse_byte_token(&t).is_some())
            });
        }
        let id_of = |s: Option<&str>| s.and_then(|s| tk.token_to_id(s));
        let bos = id_of(bos_text);
        let mut eos: Vec<u32> = config_eos.to_vec();
        if let Some(e) = id_of(eos_text) {
            if !eos.contains(&e) {
                eos.push(e);
            }
        }
        // Whether encoding with special tokens adds BOS: ask the post-processor.
        let add_bos = match (bos, tk.encode("", true)) {
            (Some(b), Ok(enc)) => enc.get_ids().first() == Some(&b),
            _ => false,
        };
        Ok(Tokenizer {
            model: Model::Hf(Box::new(tk)),
            pieces,
            control,
            specials: vec![],
            bos,
            eos,
            add_bos,
            kind: "hf",
        })
    }

    /// A stand-in for a model that ships no tokenizer: token ids work, text does not.
    pub fn none(vocab: u32) -> Tokenizer {
        let n = vocab as usize;
        Tokenizer {
            model: Model::None,
            pieces: vec![vec![]; n],
            control: vec![false; n],
            specials: vec![],
            bos: None,
            eos: vec![],
            add_bos: false,
            kind: "none",
        }
    }

    pub fn vocab_size(&self) -> usize {
        self.pieces.len()
    }

    pub fn encode(&mut self, text: &str, add_special: bool, parse_special: bool) -> Result<Vec<u32>, String> {
        let mut out = Vec::new();
        if let Model::Hf(tk) = &mut self.model {
            tk.set_encode_special_tokens(!parse_special);
            let enc = tk
                .encode(text, add_special)
                .map_err(|e| format!("tokenization failed: {e}"));
            tk.set_encode_special_tokens(false);
            return Ok(enc?.get_ids().to_vec());
        }
        if let Model::None = self.model {
            return Err(
                "this model has no tokenizer (its directory has no tokenizer.json); pass token ids instead of text"
                    .into(),
            );
        }
        if add_special && self.add_bos {
            out.extend(self.bos);
        }
        // Fragments: raw text or a literal special token.
        let mut prev_special = true;
        for frag in split_specials(text, &self.specials, parse_special) {
            match frag {
                Frag::Token(id) => {
                    out.push(id);
                    prev_special = true;
                }
                Frag::Text(t) => {
                    match &self.model {
                        Model::Bpe(b) => b.encode(t, &mut out),
                        Model::Spm { spm, add_space_prefix } => {
                            let mut s = String::with_capacity(t.len() + 3);
                            if *add_space_prefix && prev_special {
                                s.push('\u{2581}');
                            }
                            s.extend(t.chars().map(|c| if c == ' ' { '\u{2581}' } else { c }));
                            spm.encode(&s, &mut out);
                        }
                        Model::Hf(_) | Model::None => {}
                    }
                    prev_special = false;
                }
            }
        }
        Ok(out)
    }

    /// A token's text as bytes (possibly a partial UTF-8 sequence); empty for an unknown id.
    pub fn piece(&self, id: u32) -> &[u8] {
        self.pieces.get(id as usize).map(Vec::as_slice).unwrap_or(&[])
    }

    pub fn is_control(&self, id: u32) -> bool {
        self.control.get(id as usize).copied().unwrap_or(false)
    }

    pub fn is_eog(&self, id: u32) -> bool {
        self.eos.contains(&id)
    }

    pub fn token_text(&self, id: u32) -> String {
        String::from_utf8_lossy(self.piece(id)).into_owned()
    }

    /// Detokenize, rendering special tokens as their text.
    pub fn decode(&self, ids: &[u32]) -> String {
        if let Model::Hf(tk) = &self.model {
            if let Ok(s) = tk.decode(ids, false) {
                return s;
            }
        }
        let mut bytes = Vec::new();
        let mut first_text = matches!(
            self.model,
            Model::Spm {
                add_space_prefix: true,
                ..
            }
        );
        for &id in ids {
            let p = self.piece(id);
            if first_text && !self.is_control(id) {
                first_text = false;
                bytes.extend_from_slice(p.strip_prefix(b" ").unwrap_or(p));
            } else {
                bytes.extend_from_slice(p);
            }
        }
        String::from_utf8_lossy(&bytes).into_owned()
    }
}

fn special_list(it: impl Iterator<Item = (String, u32, bool)>) -> Vec<(String, u32, bool)> {
    let mut v: Vec<_> = it.filter(|(t, _, _)| !t.is_empty()).collect();
    v.sort_by(|a, b| b.0.len().cmp(&a.0.len()).then(a.1.cmp(&b.1)));
    v
}

#[derive(Debug, PartialEq)]
enum Frag<'t> {
    Text(&'t str),
    Token(u32),
}

/// Split text on literal special tokens, longest first (llama.cpp's tokenizer_st_partition).
fn split_specials<'t>(text: &'t str, specials: &[(String, u32, bool)], parse_control: bool) -> Vec<Frag<'t>> {
    if text.is_empty() {
        return vec![];
    }
    let mut frags = vec![Frag::Text(text)];
    for (s, id, is_control) in specials {
        if *is_control && !parse_control {
            continue;
        }
        if !text.contains(s.as_str()) {
            continue;
        }
        let mut next = Vec::with_capacity(frags.len() + 2);
        for f in frags {
            match f {
                Frag::Text(t) => {
                    let mut rest = t;
                    while let Some(at) = rest.find(s.as_str()) {
                        if at > 0 {
                            next.push(Frag::Text(&rest[..at]));
                        }
                        next.push(Frag::Token(*id));
                        rest = &rest[at + s.len()..];
                    }
                    if !rest.is_empty() {
                        next.push(Frag::Text(rest));
                    }
                }
                tok => next.push(tok),
            }
        }
        frags = next;
    }
    frags
}

/// Streams bytes as UTF-8 text, holding back an incomplete trailing sequence.
#[derive(Default)]
pub struct Utf8Stream {
    pending: Vec<u8>,
}

impl Utf8Stream {
    pub fn push(&mut self, bytes: &[u8]) -> String {
        self.pending.extend_from_slice(bytes);
        let mut out = String::new();
        loop {
            match std::str::from_utf8(&self.pending) {
                Ok(s) => {
                    out.push_str(s);
                    self.pending.clear();
                    return out;
                }
                Err(e) => {
                    let good = e.valid_up_to();
                    out.push_str(std::str::from_utf8(&self.pending[..good]).unwrap());
                    match e.error_len() {
                        // Incomplete at the end: keep it for the next token.
                        None => {
                            self.pending.drain(..good);
                            return out;
                        }
                        Some(bad) => {
                            out.push('\u{FFFD}');
                            self.pending.drain(..good + bad);
                        }
                    }
                }
            }
        }
    }

    /// Whatever is left (an incomplete sequence becomes U+FFFD).
    pub fn finish(&mut self) -> String {
        let s = String::from_utf8_lossy(&self.pending).into_owned();
        self.pending.clear();
        s
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn utf8_stream_holds_back_partial_sequences() {
        let mut s = Utf8Stream::default();
        let euro = "€".as_bytes();
        assert_eq!(s.push(b"a"), "a");
        assert_eq!(s.push(&euro[..1]), "");
        assert_eq!(s.push(&euro[1..2]), "");
        assert_eq!(s.push(&[euro[2], b'b']), "€b");
        assert_eq!(s.push(&[0xff, b'c']), "\u{FFFD}c");
        assert_eq!(s.push(&euro[..2]), "");
        assert_eq!(s.finish(), "\u{FFFD}");
    }

    #[test]
    fn splits_on_specials() {
        let sp = special_list(vec![("<s>".to_string(), 1, true), ("<|x|>".to_string(), 5, false)].into_iter());
        assert_eq!(
            split_specials("a<s>b<|x|>", &sp, true),
            vec![Frag::Text("a"), Frag::Token(1), Frag::Text("b"), Frag::Token(5)]
        );
        assert_eq!(
            split_specials("a<s>b<|x|>", &sp, false),
            vec![Frag::Text("a<s>b"), Frag::Token(5)]
        );
    }
}
