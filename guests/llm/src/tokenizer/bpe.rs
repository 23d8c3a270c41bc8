//! Byte-level BPE (GPT-2 style, as in Llama 3, Qwen2, SmolLM): text -> pre-tokenizer
//! pieces -> bytes mapped to printable chars -> merges by rank.
use std::collections::HashMap;

use super::pretok::PreTokenizer;

pub struct Bpe {
    token_to_id: HashMap<String, u32>,
    /// (left, right) -> (rank, merged id).
    merges: HashMap<(u32, u32), (u32, u32)>,
    pre: PreTokenizer,
    /// Llama 3: a whole word that is in the vocabulary is one token, whatever the merges say.
    ignore_merges: bool,
    byte_char: [char; 256],
}

impl Bpe {
    pub fn new(tokens: &[String], merges: &[&str], pre: PreTokenizer, ignore_merges: bool) -> Bpe {
        let mut token_to_id = HashMap::with_capacity(tokens.len());
        for (i, t) in tokens.iter().enumerate() {
            token_to_id.entry(t.clone()).or_insert(i as u32);
        }
        let mut m = HashMap::with_capacity(merges.len());
        for (rank, line) in merges.iter().enumerate() {
            let Some((a, b)) = line.split_once(' ') else { continue };
            let (Some(&ia), Some(&ib)) = (token_to_id.get(a), token_to_id.get(b)) else {
                continue;
            };
            let Some(&merged) = token_to_id.get(&format!("{a}{b}")) else {
                continue;
            };
            m.entry((ia, ib)).or_insert((rank as u32, merged));
        }
        Bpe {
            token_to_id,
            merges: m,
            pre,
            ignore_merges,
            byte_char: byte_chars(),
        }
    }

    pub fn encode(&self, text: &str, out: &mut Vec<u32>) {
        let mut word = String::new();
        let mut syms: Vec<u32> = Vec::new();
        for piece in self.pre.split(text) {
            word.clear();
            word.extend(piece.bytes().map(|b| self.byte_char[b as usize]));
            if self.ignore_merges {
                if let Some(&id) = self.token_to_id.get(&word) {
                    out.push(id);
                    continue;
                }
            }
            syms.clear();
            let mut buf = [0u8; 4];
            for c in word.chars() {
                if let Some(&id) = self.token_to_id.get(&*c.encode_utf8(&mut buf)) {
                    syms.push(id);
                }
            }
            self.merge(&mut syms);
            out.extend_from_slice(&syms);
        }
    }

    /// Apply merges, lowest rank first (leftmost on ties), until none applies.
    fn merge(&self, syms: &mut Vec<u32>) {
        loop {
            let mut best: Option<(u32, usize, u32)> = None; // (rank, index, merged)
            for i in 0..syms.len().saturating_sub(1) {
                if let Some(&(rank, merged)) = self.merges.get(&(syms[i], syms[i + 1])) {
                    if best.is_none_or(|(r, _, _)| rank < r) {
                        best = Some((rank, i, merged));
                    }
                }
            }
            let Some((_, i, merged)) = best else { return };
            syms[i] = merged;
            syms.remove(i + 1);
        }
    }
}

/// GPT-2's byte -> printable char map (printable Latin-1 bytes map to themselves, the
/// rest to U+0100 onwards).
pub fn byte_chars() -> [char; 256] {
    let mut map = ['\0'; 256];
    let mut n = 0u32;
    for b in 0..256u32 {
        let printable = (33..=126).contains(&b) || (161..=172).contains(&b) || (174..=255).contains(&b);
        map[b as usize] = if printable {
            char::from_u32(b).unwrap()
        } else {
            n += 1;
            char::from_u32(255 + n).unwrap()
        };
    }
    map
}

/// Undo [`byte_chars`] for one token's text (chars outside the map pass through as UTF-8).
pub fn decode_byte_level(text: &str, inverse: &HashMap<char, u8>) -> Vec<u8> {
    let mut out = Vec::with_capacity(text.len());
    for c in text.chars() {
        match inverse.get(&c) {
            Some(&b) => out.push(b),
            None => out.extend_from_slice(c.encode_utf8(&mut [0; 4]).as_bytes()),
        }
    }
    out
}

pub fn byte_char_inverse() -> HashMap<char, u8> {
    byte_chars().iter().enumerate().map(|(b, &c)| (c, b as u8)).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn merges_by_rank() {
        let toks: Vec<String> = ["h", "e", "l", "o", "Ġ", "he", "ll", "hell", "hello", "Ġh"]
            .iter()
            .map(|s| s.to_string())
            .collect();
        let merges = ["h e", "l l", "he ll", "hell o", "Ġ h"];
        let pre = PreTokenizer::for_gguf("gpt2").unwrap().unwrap();
        let bpe = Bpe::new(&toks, &merges, pre, false);
        let mut out = vec![];
        bpe.encode("hello hel", &mut out);
        assert_eq!(out, vec![8, 4, 5, 2]);
        assert_eq!(byte_chars()[b' ' as usize], 'Ġ');
        assert_eq!(byte_chars()[b'\n' as usize], 'Ċ');
        assert_eq!(decode_byte_level("ĠhiĊ", &byte_char_inverse()), b" hi\n");
    }
}
