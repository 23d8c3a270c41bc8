//! SentencePiece-style BPE (Llama 2, TinyLlama, Mistral GGUFs): spaces become "▁", then
//! adjacent symbols merge greedily by the merged token's score; characters with no token
//! fall back to `<0xXX>` byte tokens (llama.cpp's llm_tokenizer_spm).
use std::collections::HashMap;

pub struct Spm {
    token_to_id: HashMap<String, u32>,
    scores: Vec<f32>,
    byte_tokens: [Option<u32>; 256],
    unk: Option<u32>,
}

impl Spm {
    /// `byte_tokens[b]` is the id of `<0xXX>`.
    pub fn new(tokens: &[String], scores: Vec<f32>, byte_tokens: [Option<u32>; 256], unk: Option<u32>) -> Spm {
        let mut token_to_id = HashMap::with_capacity(tokens.len());
        for (i, t) in tokens.iter().enumerate() {
            token_to_id.entry(t.clone()).or_insert(i as u32);
        }
        Spm {
            token_to_id,
            scores,
            byte_tokens,
            unk,
        }
    }

    /// Tokenize text that has already had spaces escaped to "▁" (and the space prefix added).
    pub fn encode(&self, text: &str, out: &mut Vec<u32>) {
        // Symbols: byte ranges of `text`, merged left to right as pairs qualify.
        let mut syms: Vec<(usize, usize)> = Vec::new();
        let mut at = 0;
        for c in text.chars() {
            syms.push((at, at + c.len_utf8()));
            at += c.len_utf8();
        }
        loop {
            let mut best: Option<(f32, usize, u32)> = None;
            for i in 0..syms.len().saturating_sub(1) {
                let (s, _) = syms[i];
                let (_, e) = syms[i + 1];
                if let Some(&id) = self.token_to_id.get(&text[s..e]) {
                    let score = self.scores.get(id as usize).copied().unwrap_or(0.0);
                    if best.is_none_or(|(b, _, _)| score > b) {
                        best = Some((score, i, id));
                    }
                }
            }
            let Some((_, i, _)) = best else { break };
            syms[i].1 = syms[i + 1].1;
            syms.remove(i + 1);
        }
        for (s, e) in syms {
            let piece = &text[s..e];
            if let Some(&id) = self.token_to_id.get(piece) {
                out.push(id);
                continue;
            }
            for b in piece.bytes() {
                if let Some(id) = self.byte_tokens[b as usize].or(self.unk) {
                    out.push(id);
                }
            }
        }
    }
}

/// `<0xAB>` -> 0xAB.
pub fn parse_byte_token(t: &str) -> Option<u8> {
    let hex = t.strip_prefix("<0x")?.strip_suffix('>')?;
    if hex.len() != 2 {
        return None;
    }
    u8::from_str_radix(hex, 16).ok()
}

/// A token's text as bytes: "▁" is a space, `<0xXX>` (when `is_byte`) is that byte.
pub fn piece_bytes(t: &str, is_byte: bool) -> Vec<u8> {
    if is_byte {
        if let Some(b) = parse_byte_token(t) {
            return vec![b];
        }
    }
    t.replace('\u{2581}', " ").into_bytes()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn merges_by_score_with_byte_fallback() {
        let toks: Vec<String> = ["<unk>", "▁", "h", "i", "▁h", "▁hi", "<0xE2>", "<0x82>", "<0xAC>"]
            .iter()
            .map(|s| s.to_string())
            .collect();
        let scores = vec![0.0, -1.0, -2.0, -2.0, -3.0, -1.5, 0.0, 0.0, 0.0];
        let mut bt = [None; 256];
        bt[0xE2] = Some(6);
        bt[0x82] = Some(7);
        bt[0xAC] = Some(8);
        let spm = Spm::new(&toks, scores, bt, Some(0));
        let mut out = vec![];
        spm.encode("▁hi€", &mut out);
        assert_eq!(out, vec![5, 6, 7, 8]);
        assert_eq!(piece_bytes("<0x0A>", true), b"\n");
        assert_eq!(piece_bytes("▁hi", false), b" hi");
    }
}
