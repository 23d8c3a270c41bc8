"""The official `openai` Python client against `samepage serve`.

Run by the Rust test `serve::openai_python_client` (crates/cli/tests/all/serve.rs), which
starts the server and sets SAMEPAGE_URL (the server), SAMEPAGE_BIN (the samepage binary)
and SAMEPAGE_MODEL (the GGUF it serves). Standalone: start a server, set those, and run
`python3 tests/python/test_openai.py` (or pytest on this file).
"""
import os
import subprocess
import sys

import openai

URL = os.environ.get("SAMEPAGE_URL", "http://127.0.0.1:8080")
BIN = os.environ.get("SAMEPAGE_BIN", "samepage")
MODEL = os.environ.get("SAMEPAGE_MODEL")

PROMPT = "Give me one sentence about the ocean."
SEED, TEMP, TOP_P, N = 1234, 0.7, 0.9, 32


def client():
    return openai.OpenAI(base_url=URL + "/v1", api_key="unused")


def model_id(c):
    models = c.models.list()
    assert len(models.data) == 1
    return models.data[0].id


def reference_text():
    """`samepage run` with the same seed and sampling settings."""
    out = subprocess.run(
        [BIN, "run", "--backend", "cpu", "-m", MODEL, "-p", PROMPT, "-n", str(N),
         "--temp", str(TEMP), "--top-p", str(TOP_P), "--seed", str(SEED)],
        check=True, capture_output=True, text=True,
    )
    return out.stdout[:-1] if out.stdout.endswith("\n") else out.stdout


def chat_kwargs(c):
    return dict(model=model_id(c), messages=[{"role": "user", "content": PROMPT}],
                max_tokens=N, temperature=TEMP, top_p=TOP_P, seed=SEED)


def test_chat_matches_samepage_run():
    c = client()
    r = c.chat.completions.create(**chat_kwargs(c))
    text = r.choices[0].message.content
    assert r.choices[0].finish_reason in ("stop", "length")
    assert r.usage.completion_tokens > 0
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens
    assert text == reference_text(), (text, reference_text())


def test_chat_streamed_matches_samepage_run():
    c = client()
    parts, finish = [], None
    stream = c.chat.completions.create(stream=True, stream_options={"include_usage": True}, **chat_kwargs(c))
    usage = None
    for chunk in stream:
        if chunk.usage is not None:
            usage = chunk.usage
        for ch in chunk.choices:
            if ch.delta.content:
                parts.append(ch.delta.content)
            if ch.finish_reason:
                finish = ch.finish_reason
    assert finish in ("stop", "length")
    assert usage is not None and usage.completion_tokens > 0
    assert "".join(parts) == reference_text()


def test_completions_and_errors():
    c = client()
    r = c.completions.create(model=model_id(c), prompt="The capital of France is", max_tokens=4, temperature=0)
    assert "Paris" in r.choices[0].text
    try:
        c.chat.completions.create(model="no-such-model", messages=[{"role": "user", "content": "hi"}])
        raise AssertionError("no error for an unknown model")
    except openai.NotFoundError as e:
        assert "no-such-model" in str(e)
    try:
        c.chat.completions.create(model=model_id(c), messages=[{"role": "user", "content": "hi"}], temperature=-1)
        raise AssertionError("no error for a bad temperature")
    except openai.BadRequestError:
        pass


if __name__ == "__main__":
    n = 0
    for name, f in list(globals().items()):
        if name.startswith("test_") and callable(f):
            f()
            n += 1
            print(f"ok {name}")
    print(f"{n} passed, 0 failed")
    sys.exit(0)
