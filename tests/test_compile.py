"""Compiled decode: greedy parity with eager, no recompiles, eager fallback with a warning, disk cache reuse."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import leanformers
from leanformers.errors import InvalidArgumentError
from leanformers.compile import CompiledDecode, compile_decode
from leanformers.compile.memory import huge_pages_unavailable, in_huge_pages
from leanformers.generation.decode import DecodeStep

pytestmark = pytest.mark.slow

PROMPTS = ["Once upon a time", "def add(a, b):\n    return a + b", "Hello world! Bonjour le monde."]


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("compile-cache")


@pytest.fixture(scope="module")
def compiled_mistral(tiny_models, cache_dir):
    """The tiny Mistral (GQA 4:1, head_dim 24, sliding window 5) loaded twice: eager and compiled."""
    eager = leanformers.load(str(tiny_models["mistral"]), dtype="float32", progress=False)
    lm = leanformers.load(str(tiny_models["mistral"]), dtype="float32", progress=False)
    lm.compile(cache_bucket=128, cache_dir=cache_dir, mode="default")
    return eager, lm


def _greedy(lm, prompt, n=20):
    return lm.generate(prompt, max_new_tokens=n, ignore_eos=True).token_ids


def _compiled_greedy(lm, prompt, n=20):
    """Greedy tokens, asserting that every decode step ran a compiled graph (no silent eager fallback)."""
    step = lm.step
    assert isinstance(step, CompiledDecode), type(step)
    before = dict(step.calls)
    out = _greedy(lm, prompt, n)
    assert step.calls["eager"] == before["eager"], (step.eager, step.failure)
    assert step.calls["compiled"] - before["compiled"] == n - 1  # the first token comes from the prefill
    return out


def _eager_step(model, tokens, positions, cache):
    return DecodeStep(model)(tokens, positions, cache)


def test_compiled_greedy_equals_eager(compiled_mistral):
    eager, lm = compiled_mistral
    fn = lm.step
    assert isinstance(fn, CompiledDecode) and fn.is_compiled and fn.failure is None
    assert fn.cache_bucket == 128
    for prompt in PROMPTS:  # different lengths, crossing the sliding window, one graph
        assert _compiled_greedy(lm, prompt) == _greedy(eager, prompt)
    assert len(fn.graphs) == 1 and not fn.eager, (fn.info, fn.eager)
    if huge_pages_unavailable() is None:  # compile() moved the weights first (load(huge_pages=None))
        assert all(in_huge_pages(p) for p in lm.model.parameters())
        assert not any(in_huge_pages(p) for p in eager.model.parameters())


@pytest.mark.parametrize("kind", ["float32", "bfloat16", "int8"])
def test_compiled_verification_equals_one_token_steps(tiny_models, cache_dir, kind):
    """Speculative verification of T tokens in one compiled forward gives the logits of T compiled one-token
    steps (up to float rounding: norms and softmax reduce rows in another order), also with bfloat16 and int8
    weights and Mistral's sliding window; and prompt lookup on top of compiled decoding returns plain
    greedy's tokens."""
    kw = dict(dtype="float32", quantize="int8") if kind == "int8" else dict(dtype=kind)
    lm = leanformers.load(str(tiny_models["mistral"]), progress=False, **kw)
    lm.compile(cache_bucket=128, cache_dir=cache_dir, verify_rows=4, speculative=True)
    fn, model = lm.step, lm.model
    assert sorted(info["how"] != "jit" for info in fn.info.values()) == [True, True]  # step + verification, now
    ids = lm.tokenizer.encode(PROMPTS[1])
    P = len(ids)
    with torch.inference_mode(False):
        cache = fn.make_cache(1, 128)
    with torch.inference_mode():
        model(torch.tensor([ids]), cache=cache, positions=torch.arange(P))  # prefill positions 0 .. P-1
        drafts = [ids[-1], 7, 11]  # three tokens (padded to verify_rows = 4) at positions P .. P+2
        assert fn.can_verify(3, 128, P) and not fn.can_verify(5, 128, P)
        before = dict(fn.calls)
        verified = fn.verify(torch.tensor([drafts]), torch.arange(P, P + 3).unsqueeze(0), cache)
        steps = torch.stack([fn(torch.tensor([[t]]), torch.tensor([[P + i]]), cache)[0] for i, t in enumerate(drafts)])
        assert fn.calls["compiled"] - before["compiled"] == 4 and fn.calls["eager"] == before["eager"]
    assert verified.shape == steps.shape == (3, lm.config.vocab_size)
    tol = 2e-2 if kind == "bfloat16" else 1e-5  # bfloat16: one rounding step of the logits
    torch.testing.assert_close(verified.float(), steps.float(), atol=tol * steps.abs().max().item(), rtol=0)
    assert torch.equal(verified.argmax(-1), steps.argmax(-1))
    assert {sig[0] for sig in fn.graphs} == {"step", "verify"} and len(fn.graphs) == 2
    assert not fn.eager, fn.eager
    prompt = "def add(a, b):\n    return a + b\n\ndef add(a, b):\n    return a + b\n\ndef add(a, b):"
    plain = lm.generate(prompt, max_new_tokens=30, ignore_eos=True)
    spec = lm.generate(prompt, max_new_tokens=30, ignore_eos=True, draft="prompt-lookup")
    assert spec.token_ids == plain.token_ids
    assert spec.stats["rounds"] > 0 and len(fn.graphs) == 2 and not fn.eager  # drafts were verified, compiled
    assert fn.calls["eager"] <= 2, fn.calls  # the first positions only (below the packages' window range)


def test_compiled_padded_batch_equals_eager(compiled_mistral):
    eager, lm = compiled_mistral  # rows of different lengths at their own positions: a batch-2 graph
    before = dict(lm.step.calls)
    a = [r.token_ids for r in lm.generate(PROMPTS[:2], max_new_tokens=12, ignore_eos=True)]
    b = [r.token_ids for r in eager.generate(PROMPTS[:2], max_new_tokens=12, ignore_eos=True)]
    assert a == b
    assert not lm.step.eager and len(lm.step.graphs) == 2
    assert lm.step.calls["compiled"] - before["compiled"] == 11 and lm.step.calls["eager"] == before["eager"]


def test_compiled_logits_close_to_eager(compiled_mistral):
    eager, lm = compiled_mistral
    ids = lm.tokenizer.encode(PROMPTS[1])
    before = lm.step.calls["compiled"]
    a = lm.generate(ids, max_new_tokens=12, ignore_eos=True, logprobs=True)
    b = eager.generate(ids, max_new_tokens=12, ignore_eos=True, logprobs=True)
    assert lm.step.calls["compiled"] - before == 11
    assert a.token_ids == b.token_ids
    assert max(abs(x - y) for x, y in zip(a.logprobs, b.logprobs)) < 1e-4


def test_disk_cache_populated_and_reused_by_a_second_process(compiled_mistral, tiny_models, cache_dir):
    eager, lm = compiled_mistral
    saved = list((cache_dir / "decode").glob("*.pt2"))
    assert saved, "the compiled step was not saved"
    assert (cache_dir / "env.json").is_file()
    assert any(p.is_dir() and p.name not in ("decode",) for p in cache_dir.iterdir())  # Inductor's own caches
    script = f"""
import json, sys, time, torch
import leanformers
lm = leanformers.load({str(tiny_models["mistral"])!r}, dtype="float32", progress=False)
t = time.perf_counter()
lm.compile(cache_bucket=128, cache_dir={str(cache_dir)!r}, mode="default")
dt = time.perf_counter() - t
out = lm.generate({PROMPTS[0]!r}, max_new_tokens=20, ignore_eos=True).token_ids
imported = [m for m in ("torch._dynamo", "torch._inductor") if m in sys.modules]
print(json.dumps({{"info": [v for v in lm.step.info.values()], "seconds": dt, "tokens": out,
                  "imported": imported}}))
"""
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300,
                          env=dict(os.environ, TOKENIZERS_PARALLELISM="false"))
    assert proc.returncode == 0, proc.stderr[-2000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert [i["how"] for i in result["info"]] == ["loaded"], result
    assert result["tokens"] == _greedy(eager, PROMPTS[0])
    assert result["imported"] == [], result  # the saved package loads without Dynamo or Inductor


def test_a_corrupt_package_is_rebuilt(tiny_models, tmp_path, caplog):
    lm = leanformers.load(str(tiny_models["llama3"]), dtype="float32", progress=False)
    lm.compile(cache_bucket=64, cache_dir=tmp_path)
    [package] = (tmp_path / "decode").glob("*.pt2")
    package.write_bytes(b"not a zip file")
    again = leanformers.load(str(tiny_models["llama3"]), dtype="float32", progress=False)
    with caplog.at_level(logging.INFO, logger="leanformers.compile"):
        again.compile(cache_bucket=64, cache_dir=tmp_path)
    assert [i["how"] for i in again.step.info.values()] == ["compiled"]
    assert "unusable" in caplog.text and package.stat().st_size > 1000
    eager = leanformers.load(str(tiny_models["llama3"]), dtype="float32", progress=False)
    assert _greedy(again, PROMPTS[0]) == _greedy(eager, PROMPTS[0])


def test_the_last_cache_slot_decodes_eagerly_and_correctly(compiled_mistral):
    """The packages take window lengths up to the cache length - 1 (plain generation never needs more); a
    step at the cache's last slot runs eagerly, and a request that fills the cache gives eager's tokens."""
    eager, lm = compiled_mistral
    fn, model = lm.step, lm.model
    ids = (lm.tokenizer.encode(PROMPTS[1]) * 64)[:127]
    logits = []
    for step in (fn, DecodeStep(model)):
        with torch.inference_mode(False):
            cache = model.make_cache(1, 128)
        with torch.inference_mode():
            model(torch.tensor([ids]), cache=cache, positions=torch.arange(127))
            before = fn.calls["eager"]
            logits.append(step(torch.tensor([[5]]), torch.tensor([[127]]), cache))
            assert step is not fn or fn.calls["eager"] == before + 1  # the last slot: eagerly
            del cache
    assert torch.equal(logits[0], logits[1])
    n = 128 - len(ids[:20])
    assert fn.cache_len(20 + n) == 128
    assert _greedy(lm, ids[:20], n) == _greedy(eager, ids[:20], n)
    assert len(fn.graphs) <= 2 and not fn.eager


def test_artifact_key_includes_the_thread_count(compiled_mistral):
    fn = compiled_mistral[1].step
    sig = next(iter(fn.graphs))
    threads = torch.get_num_threads()
    try:
        a = fn._artifact_path(sig)
        torch.set_num_threads(threads + 1)
        b = fn._artifact_path(sig)
    finally:
        torch.set_num_threads(threads)
    assert a != b and a == fn._artifact_path(sig)


def test_no_recompiles_across_steps_and_requests(tiny_models, cache_dir):
    """torch.compile path (no precompile): Dynamo compiles once; later steps and requests reuse it."""
    from torch._dynamo.utils import counters

    lm = leanformers.load(str(tiny_models["llama3"]), dtype="float32", progress=False)
    eager = leanformers.load(str(tiny_models["llama3"]), dtype="float32", progress=False)
    lm.compile(cache_bucket=128, cache_dir=cache_dir, mode="default", precompile=False)
    fn = lm.step
    assert fn.is_compiled and [i["how"] for i in fn.info.values()] == ["jit"]
    graphs, frames = counters["stats"]["unique_graphs"], dict(counters["frames"])
    for prompt in PROMPTS:
        assert _compiled_greedy(lm, prompt, 16) == _greedy(eager, prompt, 16)
    assert counters["stats"]["unique_graphs"] == graphs
    assert dict(counters["frames"]) == frames  # no new frame compiled (a recompile would add one)
    assert len(fn.graphs) == 1 and not fn.eager


def test_many_compiled_steps_in_one_process_stay_compiled(tiny_models):
    """Each signature's torch.compile function has its own code object: Dynamo's recompile limit (8 per code
    object) is not shared by every step and model of the process (the 9th graph fell back to eager: a test
    order with many compiled families hit it). Steps built under different thread counts (a global state
    that Dynamo guards on) each need a graph of their own."""
    import copy

    import torch._dynamo

    lm = leanformers.load(str(tiny_models["llama3"]), dtype="float32", progress=False)
    threads = torch.get_num_threads()
    steps = []
    try:
        with torch.inference_mode():
            for n in range(1, torch._dynamo.config.recompile_limit + 3):
                torch.set_num_threads(n)
                model = copy.deepcopy(lm.model)
                fn = compile_decode(model, backend="eager", precompile=False, cache_bucket=64, warmup=False)
                cache = model.make_cache(1, 64)
                model(torch.tensor([[1, 2, 3]]), cache=cache, positions=torch.arange(3))
                fn(torch.tensor([[4]]), torch.tensor([[3]]), cache)
                steps.append(fn)
    finally:
        torch.set_num_threads(threads)
    assert all(not fn.eager and fn.calls["compiled"] == 1 for fn in steps), [fn.eager for fn in steps]
    assert all([i["how"] for i in fn.info.values()] == ["jit"] for fn in steps)


def _failing_backend(gm, example_inputs):
    raise RuntimeError("backend exploded on purpose")


def test_compile_failure_falls_back_to_eager_with_a_warning(tiny_models, caplog):
    lm = leanformers.load(str(tiny_models["llama3"]), dtype="float32", progress=False)
    expected = _greedy(lm, PROMPTS[0])
    with caplog.at_level(logging.WARNING, logger="leanformers.compile"):
        fn = compile_decode(lm.model, backend=_failing_backend, cache_bucket=128)
    assert fn.failure and "backend exploded on purpose" in fn.failure and not fn.is_compiled
    assert any("decoding eagerly" in r.message and "backend exploded" in r.getMessage() for r in caplog.records)
    lm.step = fn
    assert _greedy(lm, PROMPTS[0]) == expected  # eager, same answer
    assert fn.calls["compiled"] == 0 and fn.calls["eager"] > 0


def test_no_compiler_means_eager_with_a_warning(tiny_models, tmp_path, caplog):
    import torch._inductor.config as inductor_config

    lm = leanformers.load(str(tiny_models["smollm2"]), dtype="float32", progress=False)
    # config.patch restores the option afterwards (monkeypatch.setattr left it unreadable for later tests)
    with caplog.at_level(logging.WARNING, logger="leanformers.compile"), \
            inductor_config.patch({"cpp.cxx": ("/nonexistent/c++",)}):
        lm.compile(cache_bucket=128, cache_dir=tmp_path)
    assert type(lm.step) is DecodeStep  # plain eager decoding
    assert any("no C++ compiler" in r.getMessage() for r in caplog.records)
    assert lm.generate("Hello", max_new_tokens=4, ignore_eos=True).token_ids


def test_a_saved_package_needs_no_compiler(compiled_mistral, tiny_models, cache_dir):
    import torch._inductor.config as inductor_config

    eager = compiled_mistral[0]
    lm = leanformers.load(str(tiny_models["mistral"]), dtype="float32", progress=False)
    with inductor_config.patch({"cpp.cxx": ("/nonexistent/c++",)}):
        lm.compile(cache_bucket=128, cache_dir=cache_dir, mode="default")
    assert [i["how"] for i in lm.step.info.values()] == ["loaded"]
    assert _compiled_greedy(lm, PROMPTS[2]) == _greedy(eager, PROMPTS[2])


def test_an_unknown_mode_is_refused(tiny_models):
    lm = leanformers.load(str(tiny_models["llama3"]), dtype="float32", progress=False)
    with pytest.raises(InvalidArgumentError, match="unknown compile mode 'fastest'"):
        lm.compile(mode="fastest")


def test_a_step_for_another_model_compiles_its_own_graph(compiled_mistral, tiny_models, cache_dir):
    eager, lm = compiled_mistral
    other = leanformers.load(str(tiny_models["mistral"]), dtype="float32", progress=False)
    other.model.fuse_projections()
    step = lm.step.for_model(other.model)  # a draft model's step: same options, its own graphs and pool
    assert isinstance(step, CompiledDecode) and step.model is other.model and not step.graphs
    other.step = step
    assert _compiled_greedy(other, PROMPTS[0]) == _greedy(eager, PROMPTS[0])
    assert len(step.graphs) == 1 and step._pool is not lm.step._pool


@pytest.mark.parametrize("scheme", ["int8", "int4"])
def test_compiled_quantized_greedy_equals_eager(tiny_models, cache_dir, scheme):
    # the compiled CPU step multiplies int8 weights in its own fused loops (models/ops.py), eager uses the
    # kernel; int4 calls the same CPU kernel in both, in its tensor-group-size form when compiled
    # (int4 picks bfloat16 activations, the kernel's; forced float32 would take the dequantizing fallback)
    kw = dict(dtype="float32") if scheme == "int8" else {}
    eager = leanformers.load(str(tiny_models["mistral"]), quantize=scheme, progress=False, **kw)
    lm = leanformers.load(str(tiny_models["mistral"]), quantize=scheme, progress=False, **kw)
    if scheme == "int4":
        assert {m.backend for m in lm.model.modules() if type(m).__name__ == "Int4Linear"} == {"cpu"}
    lm.compile(cache_bucket=128, cache_dir=cache_dir)
    # a package (built here, or by an earlier test of this module), not the torch.compile fallback
    assert [i["how"] in ("compiled", "loaded") for i in lm.step.info.values()] == [True]
    if scheme == "int8":  # float32 activations: the same greedy tokens
        for prompt in PROMPTS:
            assert _compiled_greedy(lm, prompt) == _greedy(eager, prompt)
        return
    # bfloat16 activations: compiled and eager round differently (near-ties of a random model may flip), so
    # compare the logits of compiled and eager steps along one path, within bfloat16 rounding
    fn, model = lm.step, lm.model
    ids = lm.tokenizer.encode(PROMPTS[1])
    P = len(ids)
    with torch.inference_mode(False):
        caches = [model.make_cache(1, 128) for _ in range(2)]
    with torch.inference_mode():
        for cache in caches:
            model(torch.tensor([ids]), cache=cache, positions=torch.arange(P))
        token = torch.tensor([[ids[-1]]])
        before = dict(fn.calls)
        for i in range(8):
            pos = torch.tensor([[P + i]])
            a = fn(token, pos, caches[0])
            b = _eager_step(model, token, pos, caches[1])
            torch.testing.assert_close(a.float(), b.float(), atol=3e-2 * b.abs().max().item(), rtol=0)
            token = b.argmax(-1, keepdim=True)
        assert fn.calls["compiled"] - before["compiled"] == 8 and fn.calls["eager"] == before["eager"]


def test_smollm2_int4_compiles_to_a_package(smollm2_gguf, tmp_path):
    """The real model's exact-Q4_1 int4 step builds into a package (its 210 int4 kernels' group sizes once
    became anonymous constants there and it fell back to torch.compile) and decodes as eager int4 does."""
    eager = leanformers.load(str(smollm2_gguf), quantize="int4", progress=False)
    lm = leanformers.load(str(smollm2_gguf), quantize="int4", progress=False)
    lm.compile(cache_bucket=256, cache_dir=tmp_path)
    assert [i["how"] for i in lm.step.info.values()] == ["compiled"]
    prompt = lm.tokenizer.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}],
                                              add_generation_prompt=True)
    assert _compiled_greedy(lm, prompt, 16) == _greedy(eager, prompt, 16)


def test_quantize_after_compile_drops_the_compiled_step(tiny_models, cache_dir, caplog):
    from leanformers.quantize import quantize_model

    lm = leanformers.load(str(tiny_models["mistral"]), dtype="float32", progress=False)
    lm.compile(cache_bucket=128, cache_dir=cache_dir)
    fn = lm.step
    assert fn.is_compiled
    with caplog.at_level(logging.WARNING, logger="leanformers"):
        lm.quantize("int8")
    assert type(lm.step) is DecodeStep and "compile again" in caplog.text
    assert not fn.is_compiled  # the step sees the model changed, also when quantize_model is called directly
    other = leanformers.load(str(tiny_models["mistral"]), dtype="float32", progress=False).model
    fn2 = compile_decode(other, cache_dir=cache_dir, cache_bucket=128)
    assert fn2.is_compiled
    quantize_model(other, "int4")
    assert not fn2.is_compiled
    with torch.inference_mode(False):
        cache = fn2.make_cache(1, 128)
    with caplog.at_level(logging.WARNING, logger="leanformers.compile"):
        with torch.inference_mode():
            fn2(torch.tensor([[1]]), torch.tensor([[0]]), cache)  # runs eagerly on the changed model
    assert "changed" in fn2.failure and fn2.calls["eager"] == 1 and not fn2.graphs
    # the reference went through the same steps eagerly: projections fused (compile did it), then int8
    eager = leanformers.load(str(tiny_models["mistral"]), dtype="float32", progress=False)
    eager.model.fuse_projections()
    eager.quantize("int8")
    assert _greedy(lm, PROMPTS[0]) == _greedy(eager, PROMPTS[0])
