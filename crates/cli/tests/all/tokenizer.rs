//! The guest's tokenizers against the Python `tokenizers` library
//! (scripts/gen_tokenizer_fixtures.py): SmolLM2's GGUF vocabulary and the real Llama 3
//! tokenizer.json.
use samepage::{LoadOptions, Session};
use serde_json::Value;

use crate::{fixtures, smollm2};

fn cases() -> Vec<Value> {
    let j: Value = serde_json::from_slice(&std::fs::read(fixtures().join("tokenizer_cases.json")).unwrap()).unwrap();
    j["cases"].as_array().unwrap().clone()
}

fn vocab_only(path: &std::path::Path) -> Session {
    Session::load(
        path,
        &LoadOptions {
            vocab_only: true,
            ..LoadOptions::default()
        },
        None,
    )
    .unwrap_or_else(|e| panic!("load {}: {e:#}", path.display()))
}

fn run(s: &mut Session, key: &str) {
    let mut failures = Vec::new();
    let cases = cases();
    for c in &cases {
        let text = c["text"].as_str().unwrap();
        let want: Vec<u32> = serde_json::from_value(c[key]["ids"].clone()).unwrap();
        let got = s.tokenize(text, false, true).unwrap();
        if got != want {
            failures.push(format!("case {} {:?}: got {got:?}, want {want:?}", c["id"], text));
            continue;
        }
        if let Some(plain) = c[key].get("ids_plain") {
            let want: Vec<u32> = serde_json::from_value(plain.clone()).unwrap();
            let got = s.tokenize(text, false, false).unwrap();
            if got != want {
                failures.push(format!(
                    "case {} (specials as text) {:?}: got {got:?}, want {want:?}",
                    c["id"], text
                ));
            }
        }
        if c[key]["roundtrip"].as_bool() == Some(true) {
            let back = s.detokenize(&want).unwrap();
            if back != text {
                failures.push(format!("case {} decode: got {back:?}, want {text:?}", c["id"]));
            }
        }
    }
    assert!(
        failures.is_empty(),
        "{} of {} cases differ:\n{}",
        failures.len(),
        cases.len(),
        failures[..failures.len().min(15)].join("\n")
    );
}

#[test]
fn smollm2_gguf_vocab_matches_python_tokenizers() {
    run(&mut vocab_only(&smollm2()), "smollm2");
}

#[test]
fn llama3_tokenizer_json_matches_python_tokenizers() {
    let tok = fixtures().join("llama3/tokenizer.json");
    assert!(tok.exists(), "run scripts/fetch-llama3-tokenizer.sh first");
    // A directory with only tokenizer.json and a config is enough for a vocab-only load.
    let dir = std::env::temp_dir().join(format!("samepage-llama3-tok-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::copy(&tok, dir.join("tokenizer.json")).unwrap();
    std::fs::write(
        dir.join("config.json"),
        r#"{"architectures":["LlamaForCausalLM"],"model_type":"llama","vocab_size":128256,"hidden_size":2048,
"intermediate_size":8192,"num_hidden_layers":16,"num_attention_heads":32,"num_key_value_heads":8,
"rms_norm_eps":1e-5,"rope_theta":500000.0,"max_position_embeddings":131072,"bos_token_id":128000,
"eos_token_id":128001,"tie_word_embeddings":true}"#,
    )
    .unwrap();
    let mut s = vocab_only(&dir);
    run(&mut s, "llama3");
    let _ = std::fs::remove_dir_all(&dir);
}
