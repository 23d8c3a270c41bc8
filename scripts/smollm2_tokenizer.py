#!/usr/bin/env python3
"""Build a HF `tokenizers.Tokenizer` for SmolLM2 from the vocab + merges embedded in its GGUF.

This is the independent tokenizer that the samepage fixtures are checked against. It mirrors
the model's own HF tokenizer.json and llama.cpp's `smollm` pre-tokenizer type:

  * model: byte-level BPE over tokenizer.ggml.tokens / tokenizer.ggml.merges, no unk token,
    no byte fallback, ignore_merges = False (llama.cpp only ignores merges for llama3-type
    vocabularies);
  * pre-tokenizer: Sequence[Digits(individual_digits=True),
                            ByteLevel(add_prefix_space=False, use_regex=True)]
    llama.cpp's LLAMA_VOCAB_PRE_TYPE_SMOLLM is the same: regex_exprs = { "\\p{N}",
    GPT-2 regex "'s|'t|'re|'ve|'m|'ll|'d| ?\\p{L}+| ?\\p{N}+| ?[^\\s\\p{L}\\p{N}]+|\\s+(?!\\S)" }
    (HF's ByteLevel regex has a trailing "|\\s+" too, which only matters for trailing
    whitespace, where both end up with the same pieces). HF Digits splits on
    `char::is_numeric`, i.e. Unicode \\p{N}, like llama.cpp;
  * added tokens: every token with token_type 3 (control) - <|endoftext|>, <|im_start|>,
    <|im_end|>, <repo_name>, ... - as special AddedTokens (normalized=False, no strip);
  * decoder: ByteLevel. No normalizer, no post-processor that adds tokens
    (tokenizer.ggml.add_bos_token is False).

Usage:
    python3 scripts/smollm2_tokenizer.py [--gguf PATH] [--out tests/fixtures/smollm2_tokenizer.json]
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_OUT = os.path.join(REPO, "tests", "fixtures", "smollm2_tokenizer.json")

TOKEN_TYPE_CONTROL = 3
TOKEN_TYPE_USER_DEFINED = 4


def default_gguf() -> str:
    """Path of the SmolLM2 GGUF: $SAMEPAGE_SMOLLM2_GGUF, or whatever scripts/fetch-model.sh prints."""
    p = os.environ.get("SAMEPAGE_SMOLLM2_GGUF")
    if p:
        return p
    out = subprocess.run(
        [os.path.join(REPO, "scripts", "fetch-model.sh")], check=True, stdout=subprocess.PIPE, text=True
    ).stdout
    return out.strip().splitlines()[-1]


def _field(reader, key):
    f = reader.fields.get(key)
    if f is None:
        return None
    return f.contents()


def build_from_gguf(path: str):
    from gguf import GGUFReader
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors

    r = GGUFReader(path)
    model = _field(r, "tokenizer.ggml.model")
    pre = _field(r, "tokenizer.ggml.pre")
    if model != "gpt2":
        raise SystemExit(f"expected tokenizer.ggml.model=gpt2, got {model!r}")
    if pre != "smollm":
        raise SystemExit(f"expected tokenizer.ggml.pre=smollm, got {pre!r}")
    tokens = list(_field(r, "tokenizer.ggml.tokens"))
    types = list(_field(r, "tokenizer.ggml.token_type"))
    merges = list(_field(r, "tokenizer.ggml.merges"))

    vocab = {t: i for i, t in enumerate(tokens)}
    if len(vocab) != len(tokens):
        raise SystemExit("duplicate tokens in the GGUF vocab")
    pairs = []
    for m in merges:
        a, b = m.split(" ", 1)
        pairs.append((a, b))

    bpe = models.BPE(vocab=vocab, merges=pairs, unk_token=None, fuse_unk=False, byte_fallback=False,
                     ignore_merges=False)
    tok = Tokenizer(bpe)
    tok.normalizer = None
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Digits(individual_digits=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
    ])
    tok.decoder = decoders.ByteLevel()
    # Same as the model's tokenizer.json: offsets only, adds no tokens.
    tok.post_processor = processors.ByteLevel(trim_offsets=False)

    specials = []
    for i, (t, ty) in enumerate(zip(tokens, types)):
        if ty in (TOKEN_TYPE_CONTROL, TOKEN_TYPE_USER_DEFINED):
            specials.append(AddedToken(t, single_word=False, lstrip=False, rstrip=False, normalized=False,
                                       special=(ty == TOKEN_TYPE_CONTROL)))
    tok.add_special_tokens([s for s in specials if s.special])
    tok.add_tokens([s for s in specials if not s.special])
    # Sanity: added tokens keep their GGUF ids.
    for i, (t, ty) in enumerate(zip(tokens, types)):
        if ty in (TOKEN_TYPE_CONTROL, TOKEN_TYPE_USER_DEFINED):
            assert tok.token_to_id(t) == i, (t, i, tok.token_to_id(t))
    assert tok.get_vocab_size(with_added_tokens=True) == len(tokens)
    return tok


class PurePythonSmolLM2:
    """A second, from-scratch encoder following llama.cpp's algorithm for pre-type 'smollm' (split on
    special tokens, then regex "\\p{N}" then the GPT-2 regex, each keeping matches and gaps as pieces;
    GPT-2 byte-to-unicode; rank-ordered BPE merges, leftmost first). Used only to cross-check the
    `tokenizers`-based fixture; slow but exact."""

    GPT2_RE = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)"

    def __init__(self, path: str):
        import regex
        from gguf import GGUFReader

        r = GGUFReader(path)
        toks = list(_field(r, "tokenizer.ggml.tokens"))
        types = list(_field(r, "tokenizer.ggml.token_type"))
        self.vocab = {t: i for i, t in enumerate(toks)}
        self.rank = {tuple(m.split(" ", 1)): i for i, m in enumerate(_field(r, "tokenizer.ggml.merges"))}
        specials = sorted((t for t, y in zip(toks, types) if y == TOKEN_TYPE_CONTROL), key=len, reverse=True)
        self.special_re = regex.compile("|".join(regex.escape(s) for s in specials))
        self.res = [regex.compile(r"\p{N}"), regex.compile(self.GPT2_RE)]
        bs = list(range(0x21, 0x7F)) + list(range(0xA1, 0xAD)) + list(range(0xAE, 0x100))
        cs = bs[:]
        n = 0
        for b in range(256):
            if b not in bs:
                bs.append(b)
                cs.append(256 + n)
                n += 1
        self.b2u = {b: chr(c) for b, c in zip(bs, cs)}

    @staticmethod
    def _split(pieces, rx):
        out = []
        for p in pieces:
            pos = 0
            for m in rx.finditer(p):
                if m.start() > pos:
                    out.append(p[pos:m.start()])
                if m.end() > m.start():
                    out.append(m.group())
                pos = m.end()
            if pos < len(p):
                out.append(p[pos:])
        return out

    def _bpe(self, word: str):
        parts = list(word)
        while len(parts) > 1:
            best = None
            for i in range(len(parts) - 1):
                rr = self.rank.get((parts[i], parts[i + 1]))
                if rr is not None and (best is None or rr < best[0]):
                    best = (rr, i)
            if best is None:
                break
            i = best[1]
            parts[i:i + 2] = [parts[i] + parts[i + 1]]
        return [self.vocab[p] for p in parts]

    def encode(self, text: str, parse_special: bool = True):
        segs = []
        if parse_special:
            pos = 0
            for m in self.special_re.finditer(text):
                segs.append(text[pos:m.start()])
                segs.append((m.group(),))
                pos = m.end()
            segs.append(text[pos:])
        else:
            segs = [text]
        ids = []
        for s in segs:
            if isinstance(s, tuple):
                ids.append(self.vocab[s[0]])
                continue
            pieces = [s] if s else []
            for rx in self.res:
                pieces = self._split(pieces, rx)
            for p in pieces:
                ids += self._bpe("".join(self.b2u[b] for b in p.encode("utf-8")))
        return ids


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--gguf", default=None, help="SmolLM2 GGUF (default: scripts/fetch-model.sh)")
    ap.add_argument("--out", default=DEFAULT_OUT)
    a = ap.parse_args(argv)
    tok = build_from_gguf(a.gguf or default_gguf())
    os.makedirs(os.path.dirname(a.out), exist_ok=True)
    tok.save(a.out, pretty=False)
    print(f"wrote {a.out} ({os.path.getsize(a.out)} bytes)", file=sys.stderr)


if __name__ == "__main__":
    main()
