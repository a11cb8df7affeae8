"""Weights in transparent huge pages (leanformers.memory): values, identities and ties survive the move."""

from __future__ import annotations

import copy
import gc
import logging
import weakref
from pathlib import Path

import pytest
import torch

import leanformers
from leanformers.compile import memory
from leanformers.errors import InvalidArgumentError
from leanformers.compile import compile_decode
from leanformers.compile.memory import huge_pages_unavailable, in_huge_pages, move_to_huge_pages, uses_huge_pages
from leanformers.quantize import quantize_model

REASON = huge_pages_unavailable()


def _vm_flags(address: int) -> list[str]:
    """The VmFlags of the mapping of this process that contains `address` (/proc/self/smaps)."""
    inside = False
    for line in Path("/proc/self/smaps").read_text().splitlines():
        head = line.split()[0]
        if "-" in head and not head.endswith(":"):
            lo, hi = (int(x, 16) for x in head.split("-"))
            inside = lo <= address < hi
        elif inside and line.startswith("VmFlags:"):
            return line.split()[1:]
    raise AssertionError(f"no mapping holds {address:#x}")


def _model(tiny_models, kind="smollm2", **kw):
    return leanformers.load(str(tiny_models[kind]), progress=False, **kw)


@pytest.mark.skipif(REASON is not None, reason=f"needs transparent huge pages: {REASON}")
@pytest.mark.parametrize("kind", ["qwen2", "llama3"])  # tied embeddings and biases; sharded safetensors (mmap)
def test_move_keeps_values_identities_and_ties(tiny_models, kind):
    lm = _model(tiny_models, kind, dtype="float32", huge_pages=False)
    model = lm.model
    params = {name: p for name, p in model.named_parameters(remove_duplicate=False)}
    before = {name: p.detach().clone() for name, p in params.items()}
    for p in model.parameters():
        p.requires_grad_(True)
    ids = torch.tensor([[1, 5, 9, 2, 7]])
    logits = model(ids)
    assert not any(in_huge_pages(p) for p in params.values())

    moved = move_to_huge_pages(model)

    assert moved >= sum(p.numel() * p.element_size() for p in model.parameters())
    for name, p in model.named_parameters(remove_duplicate=False):
        assert p is params[name] and p.requires_grad and in_huge_pages(p)
        assert torch.equal(p, before[name]) and p.dtype == before[name].dtype
    assert all(in_huge_pages(b) for b in model.buffers() if b.numel())
    if lm.config.tie_word_embeddings:
        assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    assert torch.equal(model(ids), logits)
    assert "hg" in _vm_flags(next(model.parameters()).data_ptr())  # madvise(MADV_HUGEPAGE) on the mapping
    assert move_to_huge_pages(model) == 0  # already there: nothing copied

    model(ids).logsumexp(-1).sum().backward()  # still ordinary trainable parameters
    assert all(p.grad is not None for p in model.parameters())


@pytest.mark.skipif(REASON is not None, reason=f"needs transparent huge pages: {REASON}")
def test_quantized_weights_move_and_decode_the_same(tiny_models):
    plain = _model(tiny_models, "llama3", quantize="int4", huge_pages=False)
    moved = _model(tiny_models, "llama3", quantize="int4", huge_pages=True)
    assert all(in_huge_pages(b) for b in moved.model.buffers() if b.numel())
    assert not any(in_huge_pages(b) for b in plain.model.buffers())
    out = moved.generate("Once upon a time", max_new_tokens=12, ignore_eos=True).token_ids
    assert out == plain.generate("Once upon a time", max_new_tokens=12, ignore_eos=True).token_ids


@pytest.mark.skipif(REASON is not None, reason=f"needs transparent huge pages: {REASON}")
def test_load_moves_only_when_asked_or_compiling(tiny_models):
    assert not any(in_huge_pages(p) for p in _model(tiny_models).model.parameters())  # default: at compile()
    assert all(in_huge_pages(p) for p in _model(tiny_models, huge_pages=True).model.parameters())
    lm = _model(tiny_models, huge_pages=True)
    old = weakref.ref(memory._arenas[-1][2]())
    lm.quantize("int8")  # the new int8 tensors follow, into one new mapping; the old one (float weights) is freed
    tensors = [t for t in [*lm.model.parameters(), *lm.model.buffers()] if t.numel()]
    assert all(in_huge_pages(t) for t in tensors)
    start, end, _ = memory._arenas[-1]  # one new mapping (a storage per tensor range in it: no false aliasing)
    assert all(start <= t.data_ptr() < end for t in tensors)
    gc.collect()
    assert old() is None


@pytest.mark.skipif(REASON is not None, reason=f"needs transparent huge pages: {REASON}")
def test_quantizing_a_moved_model_frees_the_float_weights(tiny_models):
    """load() then compile() moved the weights (huge_pages=None); quantize() repacks rather than keeping
    the replaced float weights alive in the old mapping."""
    lm = _model(tiny_models, dtype="float32")
    move_to_huge_pages(lm.model)  # what compile() does first
    old = weakref.ref(memory._arenas[-1][2]())
    lm.quantize("int8")
    gc.collect()
    assert old() is None
    assert all(in_huge_pages(t) for t in lm.model.buffers() if t.numel())


@pytest.mark.skipif(REASON is not None, reason=f"needs transparent huge pages: {REASON}")
def test_only_used_bytes_are_copied(tiny_models):
    """A deepcopy of a moved model shares one copy of the whole mapping; repacking it after quantization
    copies only what the quantized model still uses."""
    lm = _model(tiny_models, dtype="float32", huge_pages=True)
    full = sum(t.numel() * t.element_size() for t in lm.model.parameters())
    clone = copy.deepcopy(lm.model)
    quantize_model(clone, "int8")
    used = {id(t): t for t in [*clone.parameters(), *clone.buffers()] if t.numel()}.values()
    moved = move_to_huge_pages(clone)
    assert moved < 0.5 * full
    assert moved >= sum(t.numel() * t.element_size() for t in used)


def test_no_huge_pages_changes_nothing(tiny_models, tmp_path, monkeypatch):
    thp = tmp_path / "enabled"
    thp.write_text("always madvise [never]\n")
    monkeypatch.setattr(memory, "_THP", thp)
    assert huge_pages_unavailable() == f"transparent huge pages are disabled ({thp}: never)"
    monkeypatch.setattr(memory, "_THP", tmp_path / "missing")
    assert "unreadable" in huge_pages_unavailable()
    model = _model(tiny_models, huge_pages=False).model
    ptrs = [p.data_ptr() for p in model.parameters()]
    assert move_to_huge_pages(model) == 0
    assert [p.data_ptr() for p in model.parameters()] == ptrs


@pytest.mark.skipif(REASON is not None, reason=f"needs transparent huge pages: {REASON}")
def test_a_copy_that_would_not_fit_is_skipped_with_a_message(tiny_models, monkeypatch, caplog):
    monkeypatch.setattr(memory, "_available_bytes", lambda: 1000)
    model = _model(tiny_models, huge_pages=False).model
    with caplog.at_level(logging.INFO, logger="leanformers"):
        assert move_to_huge_pages(model) == 0
    assert "would not fit" in caplog.text
    assert not any(in_huge_pages(p) for p in model.parameters())


@pytest.mark.slow
@pytest.mark.skipif(REASON is not None, reason=f"needs transparent huge pages: {REASON}")
def test_smollm2_moved_weights_give_the_same_greedy_answer(smollm2_gguf):
    lm = leanformers.load(str(smollm2_gguf), dtype="float32", progress=False, huge_pages=False)
    prompt = lm.tokenizer.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}],
                                              add_generation_prompt=True)
    want = lm.generate(prompt, max_new_tokens=16).token_ids
    assert move_to_huge_pages(lm.model) > 500e6
    assert in_huge_pages(lm.model.lm_head.weight)
    assert lm.generate(prompt, max_new_tokens=16).token_ids == want
    assert "Paris" in lm.tokenizer.decode(want)


def test_a_bad_huge_pages_argument_is_refused(tiny_models):
    with pytest.raises(InvalidArgumentError, match="huge_pages must be None, True or False, got 'yes'"):
        _model(tiny_models, huge_pages="yes")


@pytest.mark.skipif(REASON is not None, reason=f"needs transparent huge pages: {REASON}")
def test_a_refused_compile_moves_nothing(tiny_models):
    """Arguments are checked before the weights are copied."""
    lm = _model(tiny_models)
    with pytest.raises(InvalidArgumentError, match="unknown compile mode"):
        compile_decode(lm.model, mode="fastest", fuse=False)
    assert not uses_huge_pages(lm.model)
