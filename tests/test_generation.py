"""Generation: greedy parity with transformers, cache/batch equivalence, samplers, stopping, streaming."""

from __future__ import annotations

import pytest
import torch

import leanformers
from leanformers.errors import InvalidArgumentError, LeanformersError
from leanformers.generation.sampling import SamplingParams


@pytest.fixture(scope="module")
def tiny(tiny_models):
    return leanformers.load(str(tiny_models["llama3"]), dtype="float32", progress=False)


@pytest.fixture(scope="module")
def tiny_mistral(tiny_models):
    return leanformers.load(str(tiny_models["mistral"]), dtype="float32", progress=False)


def _uncached_greedy(model, ids: list[int], n: int) -> list[int]:
    x = torch.tensor([ids])
    with torch.no_grad():
        for _ in range(n):
            x = torch.cat([x, model(x)[:, -1].argmax(-1, keepdim=True)], dim=1)
    return x[0, len(ids):].tolist()


# ------------------------------------------------------------------------------------- equivalences
@pytest.mark.parametrize("fixture", ["tiny", "tiny_mistral"])
def test_cached_equals_uncached_greedy(request, fixture):
    lm = request.getfixturevalue(fixture)  # mistral: the window (5) is crossed while decoding
    for prompt in ["Once upon a time", "def add(a, b):", "Hello world! 你好"]:
        ids = lm.tokenizer.encode(prompt)
        out = lm.generate(ids, max_new_tokens=24, ignore_eos=True)
        assert out.token_ids == _uncached_greedy(lm.model, ids, 24)
        assert out.finish_reason == "length"


def test_chunked_prefill_equals_single_pass(tiny):
    from leanformers.generation.decode import DecodeStep, generate_tokens
    from leanformers.generation.sampling import Sampler

    ids = tiny.tokenizer.encode("The quick brown fox jumps over the lazy dog. " * 3)
    step = DecodeStep(tiny.model)
    a = [s.tokens[0] for s in generate_tokens(step, [ids], max_new_tokens=12, sampler=Sampler(SamplingParams()),
                                              prefill_chunk=7)]
    b = [s.tokens[0] for s in generate_tokens(step, [ids], max_new_tokens=12, sampler=Sampler(SamplingParams()))]
    assert a == b == _uncached_greedy(tiny.model, ids, 12)


@pytest.mark.parametrize("fixture", ["tiny", "tiny_mistral"])
def test_batch_equals_single(request, fixture):
    lm = request.getfixturevalue(fixture)
    prompts = ["Once", "The quick brown fox jumps over the lazy dog", "def add(a, b):\n    return a + b"]
    batch = lm.generate(prompts, max_new_tokens=16, ignore_eos=True)
    assert isinstance(batch, list) and len(batch) == 3
    for prompt, out in zip(prompts, batch):
        single = lm.generate(prompt, max_new_tokens=16, ignore_eos=True)
        assert out.token_ids == single.token_ids
        assert out.text == single.text
        assert out.prompt_tokens == len(lm.tokenizer.encode(prompt))


def test_penalized_greedy_matches_transformers(tiny, tiny_models):
    """A repetition penalty sees each row's whole history (prompt + emitted), rows of uneven length alike."""
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(str(tiny_models["llama3"]), dtype=torch.float32).eval()
    prompts = ["Once", "The quick brown fox jumps over the lazy dog"]
    batch = tiny.generate(prompts, max_new_tokens=24, ignore_eos=True, repetition_penalty=1.8)
    plain = tiny.generate(prompts[1], max_new_tokens=24, ignore_eos=True, repetition_penalty=1.0)
    for prompt, out in zip(prompts, batch):
        ids = tiny.tokenizer.encode(prompt)
        with torch.no_grad():
            ref = hf.generate(torch.tensor([ids]), max_new_tokens=24, do_sample=False, repetition_penalty=1.8,
                              eos_token_id=None, pad_token_id=0)[0, len(ids):].tolist()
        assert out.token_ids == ref
    assert plain.token_ids == _uncached_greedy(tiny.model, tiny.tokenizer.encode(prompts[1]), 24)
    assert plain.token_ids != batch[1].token_ids  # the penalty changed something: the test can fail


def test_logprobs_match_direct_forward(tiny):
    ids = tiny.tokenizer.encode("Once upon a time")
    out = tiny.generate(ids, max_new_tokens=6, ignore_eos=True, logprobs=True)
    full = torch.tensor([ids + out.token_ids])
    with torch.no_grad():
        lp = torch.log_softmax(tiny.model(full)[0].float(), -1)
    expected = [lp[len(ids) - 1 + i, t].item() for i, t in enumerate(out.token_ids)]
    assert out.logprobs == pytest.approx(expected, abs=1e-4)


def test_eos_stops_generation(tiny):
    ids = tiny.tokenizer.encode("Once upon a time")
    free = tiny.generate(ids, max_new_tokens=10, ignore_eos=True).token_ids
    eos = free[3]
    tiny.config.eos_token_id = [2, eos]  # pretend the 4th greedy token is an end-of-sequence id
    try:
        out = tiny.generate(ids, max_new_tokens=10)
    finally:
        tiny.config.eos_token_id = 2
    first = free.index(eos)
    assert out.token_ids == free[: first + 1] and out.finish_reason == "stop"
    assert out.text == tiny.tokenizer.decode(free[:first])


# ------------------------------------------------------------------------------------- sampling
def test_same_seed_same_output(tiny):
    kw = dict(max_new_tokens=20, temperature=1.0, top_k=50, top_p=0.95, min_p=0.01, repetition_penalty=1.1,
              ignore_eos=True)
    a = tiny.generate("Once upon a time", seed=123, **kw)
    b = tiny.generate("Once upon a time", seed=123, **kw)
    c = tiny.generate("Once upon a time", seed=124, **kw)
    assert a.token_ids == b.token_ids
    assert a.token_ids != c.token_ids


def test_temperature_to_zero_equals_greedy(tiny):
    greedy = tiny.generate("Once upon a time", max_new_tokens=16, ignore_eos=True)
    cold = tiny.generate("Once upon a time", max_new_tokens=16, ignore_eos=True, temperature=1e-5, seed=0)
    assert cold.token_ids == greedy.token_ids


# Sampler semantics against transformers' processors: tests/test_sampling.py.


# ------------------------------------------------------------------------------------- text and stop
# TextAssembler (stop strings, UTF-8 streaming) on its own: tests/test_text.py.


def test_stop_strings_in_generate(tiny):
    free = tiny.generate("Once upon a time", max_new_tokens=20, ignore_eos=True)
    stop = free.text[5:8]
    assert stop and stop in free.text
    out = tiny.generate("Once upon a time", max_new_tokens=20, ignore_eos=True, stop=[stop])
    assert out.finish_reason == "stop" and out.text == free.text[: free.text.find(stop)]
    streamed = tiny.stream("Once upon a time", max_new_tokens=20, ignore_eos=True, stop=stop)
    assert "".join(streamed) == out.text and streamed.result.text == out.text


# ------------------------------------------------------------------------------------- bad input
@pytest.mark.parametrize(
    "kwargs, needle",
    [(dict(max_new_tokens=0), "max_new_tokens"), (dict(max_new_tokens=-3), "max_new_tokens"),
     (dict(temperature=-0.1), "temperature"), (dict(top_p=0.0), "top_p"), (dict(top_p=1.5), "top_p"),
     (dict(top_k=-1), "top_k"), (dict(min_p=2.0), "min_p"), (dict(repetition_penalty=0.0), "repetition_penalty")],
)
def test_invalid_arguments(tiny, kwargs, needle):
    with pytest.raises(InvalidArgumentError, match=needle):
        tiny.generate("hello", **kwargs)


def test_empty_prompt(tiny):
    for prompt in ["", [], ["a", ""]]:
        with pytest.raises(InvalidArgumentError, match="empty"):
            tiny.generate(prompt)


def test_prompt_longer_than_context(tiny):
    ids = [5] * (tiny.context_length + 10)
    with pytest.raises(InvalidArgumentError, match="context window"):
        tiny.generate(ids, max_new_tokens=4)
    out = tiny.generate(ids, max_new_tokens=4, truncate=True, ignore_eos=True)
    assert out.prompt_tokens == tiny.context_length - 4 and len(out.token_ids) == 4


def test_generation_capped_by_context(tiny):
    ids = [5] * (tiny.context_length - 3)
    out = tiny.generate(ids, max_new_tokens=50, ignore_eos=True)
    assert len(out.token_ids) == 3 and out.finish_reason == "length"


def test_token_ids_out_of_range(tiny):
    with pytest.raises(InvalidArgumentError, match="out of range"):
        tiny.generate([1, 2, 10**6])


@pytest.mark.parametrize(
    "messages",
    [[{"role": "user"}], [{"content": "hi"}], [{"role": 3, "content": "hi"}], "hello", [["user", "hi"]]],
)
def test_malformed_chat_messages(tiny, messages):
    with pytest.raises(LeanformersError):
        tiny.chat(messages, max_new_tokens=2)


def test_chat_uses_template(tiny):
    out = tiny.chat([{"role": "user", "content": "Hello"}], max_new_tokens=5, ignore_eos=True)
    text = tiny.tokenizer.apply_chat_template([{"role": "user", "content": "Hello"}], add_generation_prompt=True)
    ids = tiny.tokenizer.encode(text, add_special_tokens=False)
    assert out.token_ids == tiny.generate(ids, max_new_tokens=5, ignore_eos=True).token_ids


# ------------------------------------------------------------------------------------- real model
PROMPTS = [
    ("plain", "The capital of France is"),
    ("plain", "def fibonacci(n):\n    \"\"\"Return the n-th Fibonacci number.\"\"\""),
    ("chat", "What is the capital of France?"),
    ("chat", "Write a haiku about autumn leaves."),
    ("chat", "Explain in two sentences why the sky is blue."),
]


def test_defaults_come_from_generation_config_or_the_fallback(tiny, lf_smollm2):
    from leanformers.generation.config import FALLBACK, GenerationConfig

    assert tiny.defaults == GenerationConfig()  # transformers' save_pretrained wrote a generation_config.json
    assert lf_smollm2.defaults == FALLBACK and FALLBACK.repetition_penalty == 1.1  # a GGUF file has none
    sampled = GenerationConfig.from_hf({"do_sample": True, "temperature": 0.6, "top_p": 0.9, "max_new_tokens": 64})
    assert (sampled.temperature, sampled.top_k, sampled.top_p, sampled.max_new_tokens) == (0.6, 50, 0.9, 64)


@pytest.mark.slow
def test_greedy_generation_matches_transformers(lf_smollm2, hf_smollm2):
    model, tok = hf_smollm2
    model.generation_config.eos_token_id = None  # EOS ignored on both sides: 128 tokens each
    for kind, prompt in PROMPTS:
        if kind == "chat":
            msgs = [{"role": "user", "content": prompt}]
            text = tok.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False)
            ids = tok(text, add_special_tokens=False).input_ids
            ours = lf_smollm2.chat(msgs, max_new_tokens=128, ignore_eos=True, repetition_penalty=None)
        else:
            ids = tok(prompt).input_ids
            ours = lf_smollm2.generate(prompt, max_new_tokens=128, ignore_eos=True, repetition_penalty=None)
        x = torch.tensor([ids])
        with torch.no_grad():  # explicit mask: the chat prompt contains <|im_end|>, which is also the pad id
            ref = model.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=128, do_sample=False,
                                 eos_token_id=None, pad_token_id=tok.pad_token_id)
        assert ours.prompt_tokens == len(ids)
        assert ours.token_ids == ref[0, len(ids):].tolist(), prompt


@pytest.mark.slow
def test_real_model_answers_and_streams(lf_smollm2):
    out = lf_smollm2.chat([{"role": "user", "content": "What is the capital of France?"}], max_new_tokens=32)
    assert "Paris" in out.text and out.finish_reason == "stop"
    pieces = list(s := lf_smollm2.stream("List three emoji and the Chinese word for cat:", max_new_tokens=40))
    assert "".join(pieces) == s.result.text and all("\ufffd" not in p for p in pieces)
