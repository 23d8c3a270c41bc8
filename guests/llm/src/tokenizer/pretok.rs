//! Pre-tokenizers for byte-level BPE: split text into words before BPE, as llama.cpp
//! does for each `tokenizer.ggml.pre` (llama-vocab.cpp). Each regex splits every piece
//! left by the previous one; matches and the gaps between them both become pieces
//! (Hugging Face's `Split` with `Isolated` behaviour).
use fancy_regex::Regex;

/// GPT-2's pattern (Hugging Face ByteLevel's, with its `\s+` tail).
pub const GPT2: &str = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+";
/// Llama 3's pattern (tokenizer.json's `(?i:...)` contractions, numbers in groups of three).
pub const LLAMA3: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
/// Qwen2's pattern: as Llama 3's, with single digits.
pub const QWEN2: &str =
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";

pub struct PreTokenizer {
    regexes: Vec<Regex>,
}

impl PreTokenizer {
    pub fn new(patterns: &[&str]) -> Result<PreTokenizer, String> {
        let regexes = patterns
            .iter()
            .map(|p| Regex::new(p).map_err(|e| format!("bad pre-tokenizer pattern {p:?}: {e}")))
            .collect::<Result<_, _>>()?;
        Ok(PreTokenizer { regexes })
    }

    /// The pre-tokenizer for a GGUF `tokenizer.ggml.pre` value (llama.cpp's names). `None`
    /// for a name we do not know.
    pub fn for_gguf(pre: &str) -> Option<Result<PreTokenizer, String>> {
        let patterns: &[&str] = match pre {
            "llama3" | "llama-v3" | "llama-bpe" | "falcon3" | "falcon-h1" | "pixtral" | "dbrx" | "smaug-bpe"
            | "midm-2.0" | "lfm2" => &[LLAMA3],
            "qwen2" | "deepseek-r1-qwen" | "stablelm2" | "hunyuan" | "megrez" => &[QWEN2],
            "smollm" | "starcoder" | "refact" | "command-r" | "codeshell" | "exaone" | "minerva-7b" => {
                &[r"\p{N}", GPT2]
            }
            "gpt-2" | "gpt2" | "mpt" | "olmo" | "jais" | "trillion" | "phi-2" | "granite-docling" => &[GPT2],
            // llama.cpp's LLAMA_VOCAB_PRE_TYPE_DEFAULT.
            "default" => &[r"[\p{P}\$\+<=>\^~\|]+", GPT2, r"\p{N}+", "[0-9][0-9][0-9]"],
            _ => return None,
        };
        Some(PreTokenizer::new(patterns))
    }

    /// Split `text` into pieces (byte ranges, in order, covering the text).
    pub fn split<'t>(&self, text: &'t str) -> Vec<&'t str> {
        let mut pieces = vec![text];
        for re in &self.regexes {
            let mut next = Vec::with_capacity(pieces.len() * 2);
            for p in pieces {
                split_isolated(re, p, &mut next);
            }
            pieces = next;
        }
        pieces
    }
}

fn split_isolated<'t>(re: &Regex, text: &'t str, out: &mut Vec<&'t str>) {
    let mut last = 0;
    for m in re.find_iter(text) {
        let Ok(m) = m else {
            // Backtracking limit hit: keep the rest as one piece rather than fail.
            break;
        };
        if m.start() > last {
            out.push(&text[last..m.start()]);
        }
        if m.end() > m.start() {
            out.push(m.as_str());
        }
        last = m.end();
    }
    if last < text.len() {
        out.push(&text[last..]);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn splits_like_llama_cpp() {
        let gpt2 = PreTokenizer::for_gguf("gpt2").unwrap().unwrap();
        assert_eq!(
            gpt2.split("Hello world's  123!!\n\n"),
            vec!["Hello", " world", "'s", " ", " 123", "!!", "\n\n"]
        );
        let smol = PreTokenizer::for_gguf("smollm").unwrap().unwrap();
        assert_eq!(smol.split("ab 123"), vec!["ab", " ", "1", "2", "3"]);
        let l3 = PreTokenizer::for_gguf("llama-bpe").unwrap().unwrap();
        assert_eq!(
            l3.split("I'LL pay 12345 now\n\n ok"),
            vec!["I", "'LL", " pay", " ", "123", "45", " now", "\n\n", " ok"]
        );
        let q = PreTokenizer::for_gguf("qwen2").unwrap().unwrap();
        assert_eq!(q.split("x=42"), vec!["x", "=", "4", "2"]);
        assert!(PreTokenizer::for_gguf("nonsense").is_none());
        assert_eq!(gpt2.split(""), Vec::<&str>::new());
    }
}
