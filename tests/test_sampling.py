"""The sampler against transformers' logits processors (the reference), in leanformers' documented order:

    repetition penalty -> temperature -> top-k -> top-p -> min-p -> softmax -> draw

on fixed logits (exact float32 probabilities, ties, the exact top-p boundary), on Hypothesis-generated
ones (derandomized, with the boundary cases as explicit examples), and end to end: greedy generation
with a repetition penalty equals `transformers.generate(repetition_penalty=..., do_sample=False)`.

One deliberate difference, pinned below: when tokens tie at the top-p boundary, leanformers keeps all of
them (like top-k in both libraries), transformers keeps as many as the mass needs, chosen by their
position after sorting (on CPU the highest token ids).
"""

from __future__ import annotations

import math
from dataclasses import replace

import pytest
import torch
from hypothesis import example, given, settings
from hypothesis import strategies as st
from transformers.generation.logits_process import (
    MinPLogitsWarper,
    RepetitionPenaltyLogitsProcessor,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

import leanformers
from leanformers.generation.sampling import SamplingParams, probabilities, process_logits, sample

INF = float("-inf")


# ------------------------------------------------------------------------------------- the reference
def reference(logits: torch.Tensor, params: SamplingParams, history: torch.Tensor | None = None) -> torch.Tensor:
    """transformers' processors in leanformers' order, each added under the condition transformers'
    generate() uses (top_k != 0, top_p < 1, min_p given); greedy is the penalty only."""
    procs = []
    if params.repetition_penalty is not None and history is not None:
        procs.append(RepetitionPenaltyLogitsProcessor(float(params.repetition_penalty)))
    if not params.greedy:
        procs.append(TemperatureLogitsWarper(float(params.temperature)))
        if params.top_k:
            procs.append(TopKLogitsWarper(params.top_k))
        if params.top_p is not None and params.top_p < 1.0:
            procs.append(TopPLogitsWarper(float(params.top_p)))
        if params.min_p is not None:
            procs.append(MinPLogitsWarper(float(params.min_p)))
    ids = history if history is not None else torch.zeros(logits.shape[0], 0, dtype=torch.long)
    out = logits.float().clone()
    for proc in procs:
        out = proc(ids, out)
    return out


def assert_matches_reference(ours: torch.Tensor, ref: torch.Tensor) -> bool:
    """Equal, except that ours may keep more tokens tied with the least likely token the reference kept
    (the tie rule at the top-p boundary). Returns True when they are exactly equal."""
    kept_ours, kept_ref = torch.isfinite(ours), torch.isfinite(ref)
    assert bool((kept_ours | ~kept_ref).all()), "the reference keeps a token leanformers drops"
    assert torch.equal(ours[kept_ref], ref[kept_ref])
    extra = kept_ours & ~kept_ref
    for row in range(ours.shape[0]):
        if extra[row].any():
            boundary = ref[row][kept_ref[row]].min()
            assert bool((ours[row][extra[row]] == boundary).all()), "an extra token is not a tie at the boundary"
    return not bool(extra.any())


def _exp2_logit(k: int) -> float:
    """A float32 x with exp(x) == 2**-k exactly (the float32 value nearest -k ln 2, or a neighbour)."""
    x = torch.tensor(-k * math.log(2.0), dtype=torch.float32)
    lo = hi = x
    for _ in range(64):
        for c in (lo, hi):
            if torch.exp(c).item() == 2.0**-k:
                return c.item()
        lo, hi = torch.nextafter(lo, torch.tensor(-1e9)), torch.nextafter(hi, torch.tensor(1e9))
    raise AssertionError(f"no float32 logit with exp == 2**-{k}")


L1, L2, L3 = _exp2_logit(1), _exp2_logit(2), _exp2_logit(3)
# softmax = [1/2, 1/4, 1/8, 1/16, 1/16] exactly: exps 1, 1/2, 1/4, 1/8, 1/8 sum to 2
DYADIC = torch.tensor([[0.0, L1, L2, L3, L3]])
DYADIC_SHUFFLED = DYADIC[:, [3, 0, 4, 2, 1]]  # probabilities [1/16, 1/2, 1/16, 1/8, 1/4]


def test_dyadic_logits_have_exact_probabilities():
    """The premise of the boundary tests: the top-p mass reaches 1/2, 3/4, 7/8, 15/16 exactly."""
    assert torch.equal(DYADIC.softmax(-1), torch.tensor([[0.5, 0.25, 0.125, 0.0625, 0.0625]]))
    assert torch.equal(DYADIC.softmax(-1).cumsum(-1), torch.tensor([[0.5, 0.75, 0.875, 0.9375, 1.0]]))


# ------------------------------------------------------------------------------------- fixed cases
@pytest.mark.parametrize("logits", [DYADIC, DYADIC_SHUFFLED], ids=["sorted", "shuffled"])
@pytest.mark.parametrize("p, n_kept", [(0.5, 1), (0.75, 2), (0.875, 3), (0.4, 1), (0.6, 2), (0.8, 3), (0.95, 5)])
def test_top_p_exact_boundary(logits, p, n_kept):
    """Mass reaching p exactly closes the nucleus: p = 3/4 keeps {1/2, 1/4}, not the 1/8 after it."""
    params = SamplingParams(temperature=1.0, top_p=p)
    ours, ref = process_logits(logits, params), reference(logits, params)
    assert assert_matches_reference(ours, ref)
    assert int(torch.isfinite(ours).sum()) == n_kept
    kept = logits.softmax(-1)[torch.isfinite(ours)]
    assert kept.sum() >= p and kept.sum() - kept.min() < p  # reaches p, and is the smallest set that does


def test_top_p_ties_at_the_boundary_are_kept():
    """p = 15/16 needs one of the two tokens of 1/16: leanformers keeps both (order-independent), transformers
    keeps the one sorted last (here: the higher id). Pinned so a change on either side is noticed."""
    params = SamplingParams(temperature=1.0, top_p=0.9375)
    ours, ref = process_logits(DYADIC, params), reference(DYADIC, params)
    assert torch.isfinite(ours).tolist() == [[True] * 5]
    assert torch.isfinite(ref).tolist() == [[True, True, True, False, True]]
    assert not assert_matches_reference(ours, ref)  # differs, and only by the tie
    uniform = torch.zeros(1, 4)
    params = SamplingParams(temperature=1.0, top_p=0.5)
    assert torch.isfinite(process_logits(uniform, params)).all()
    assert torch.isfinite(reference(uniform, params)).tolist() == [[False, False, True, True]]
    # renumbering the tokens renumbers leanformers' result (transformers' choice among ties would change)
    params = SamplingParams(temperature=1.0, top_p=0.9375)
    perm = torch.tensor([4, 2, 0, 3, 1])
    assert torch.equal(process_logits(DYADIC[:, perm], params), process_logits(DYADIC, params)[:, perm])


@pytest.mark.parametrize("k", [1, 2, 3, 4, 5, 9])
def test_top_k_keeps_ties_like_transformers(k):
    logits = torch.tensor([[3.0, 1.0, 1.0, 1.0, -2.0]])
    params = SamplingParams(temperature=1.0, top_k=k)
    ours, ref = process_logits(logits, params), reference(logits, params)
    assert assert_matches_reference(ours, ref)
    assert int(torch.isfinite(ours).sum()) == {1: 1, 2: 4, 3: 4, 4: 4, 5: 5, 9: 5}[k]


@pytest.mark.parametrize("min_p, n_kept", [(0.25, 3), (0.125, 5), (0.2, 3), (0.5, 2), (1.0, 1), (0.0, 5)])
def test_min_p_exact_threshold(min_p, n_kept):
    """Probabilities 1/2, 1/4, 1/8, 1/16, 1/16: min_p = 1/4 keeps 1/8 (exactly at the threshold)."""
    params = SamplingParams(temperature=1.0, min_p=min_p)
    ours, ref = process_logits(DYADIC, params), reference(DYADIC, params)
    assert assert_matches_reference(ours, ref)
    assert int(torch.isfinite(ours).sum()) == n_kept


def test_repetition_penalty_like_transformers():
    logits = torch.tensor([[2.0, -1.0, 0.0, 0.5, -3.0, 4.0], [1.0, 1.0, -1.0, -1.0, 0.0, 0.0]])
    history = torch.tensor([[0, 1, 2, 0, 1], [3, 3, 3, 5, 4]])  # repeated ids are penalized once
    for penalty in (1.5, 0.7, 1.0):
        params = SamplingParams(repetition_penalty=penalty)
        ours = process_logits(logits, params, history)
        assert torch.equal(ours, reference(logits, params, history))
    ours = process_logits(logits, SamplingParams(repetition_penalty=2.0), history)
    assert ours[0].tolist() == [1.0, -2.0, 0.0, 0.5, -3.0, 4.0]  # positive divided, negative multiplied
    assert ours[1].tolist() == [1.0, 1.0, -1.0, -2.0, 0.0, 0.0]


def test_temperature_comes_before_the_filters():
    """The order matters: at temperature 4 the distribution is flat enough that top-p 0.6 and min-p 0.5
    keep several tokens; filtering first and scaling after would keep only the most likely one."""
    logits = torch.tensor([[4.0, 2.0, 1.0, 0.0, -1.0]])
    for params in (SamplingParams(temperature=4.0, top_p=0.6), SamplingParams(temperature=4.0, min_p=0.5),
                   SamplingParams(temperature=0.25, top_k=2, top_p=0.99, min_p=0.001)):
        ours = process_logits(logits, params)
        assert assert_matches_reference(ours, reference(logits, params))
        filters_first = reference(logits, SamplingParams(temperature=1.0, top_k=params.top_k, top_p=params.top_p,
                                                         min_p=params.min_p)) / params.temperature
        assert not torch.equal(torch.isfinite(ours), torch.isfinite(filters_first)), params


def test_greedy_is_the_argmax_of_the_penalized_logits():
    logits = torch.tensor([[3.0, 2.9, -1.0, -1.2], [-1.0, -1.1, -5.0, -6.0]])
    history = torch.tensor([[0], [0]])
    params = SamplingParams(repetition_penalty=1.5)
    assert sample(logits, SamplingParams()).tolist() == [0, 0]
    assert sample(logits, params, history=history).tolist() == [1, 1] == reference(logits, params, history).argmax(-1).tolist()
    assert torch.equal(probabilities(logits, params, history), torch.eye(4)[[1, 1]])


# ------------------------------------------------------------------------------------- properties
_VALUES = st.one_of(
    st.sampled_from([0.0, L1, L2, L3, 1.0, -1.0, 2.5]),  # exact probabilities and many ties
    st.floats(-20, 20, allow_nan=False, width=32),
)


@st.composite
def _cases(draw):
    vocab = draw(st.integers(2, 40))
    rows = draw(st.integers(1, 2))
    logits = torch.tensor([[draw(_VALUES) for _ in range(vocab)] for _ in range(rows)], dtype=torch.float32)
    history = None
    penalty = draw(st.none() | st.sampled_from([1.0, 1.3, 2.0]) | st.floats(0.5, 3.0))
    if penalty is not None:
        n = draw(st.integers(0, 12))
        history = torch.tensor([[draw(st.integers(0, vocab - 1)) for _ in range(n)] for _ in range(rows)],
                               dtype=torch.long).reshape(rows, n)
    params = SamplingParams(
        temperature=draw(st.sampled_from([0.0, 0.25, 0.5, 1.0, 2.0]) | st.floats(0.05, 5.0)),
        top_k=draw(st.none() | st.integers(0, 45)),
        top_p=draw(st.none() | st.sampled_from([0.5, 0.75, 0.875, 0.9375, 1.0]) | st.floats(0.01, 1.0)),
        min_p=draw(st.none() | st.sampled_from([0.0, 0.125, 0.25, 0.5, 1.0]) | st.floats(0.0, 1.0)),
        repetition_penalty=penalty,
    )
    return logits, params, history, draw(st.integers(0, 2**31 - 1))


_P = SamplingParams(temperature=1.0)


@settings(derandomize=True, database=None, max_examples=250, deadline=None)
@given(case=_cases())
@example(case=(DYADIC, replace(_P, top_p=0.75), None, 0))
@example(case=(DYADIC_SHUFFLED, replace(_P, top_p=0.875), None, 1))
@example(case=(DYADIC, replace(_P, top_p=0.5, min_p=0.125), None, 2))
@example(case=(DYADIC, replace(_P, min_p=0.25), None, 3))
@example(case=(DYADIC, replace(_P, top_k=3, top_p=0.875), None, 4))
@example(case=(DYADIC, replace(_P, temperature=0.5, top_p=0.75), None, 5))
@example(case=(DYADIC, replace(_P, temperature=2.0, min_p=0.5), None, 6))
@example(case=(torch.tensor([[2.0, -1.0, 0.5, 1.5]]), replace(_P, repetition_penalty=1.5, top_p=0.6),
               torch.tensor([[0, 3, 3]]), 7))
def test_process_logits_matches_transformers(case):
    logits, params, history, seed = case
    ours, ref = process_logits(logits, params, history), reference(logits, params, history)
    exact = assert_matches_reference(ours, ref)
    if params.greedy:
        assert exact and torch.equal(sample(logits, params, history=history), ref.argmax(-1))
        return
    if exact:  # the same distribution, and the same draws from the same generator
        assert torch.equal(probabilities(logits, params, history), ref.softmax(-1))
        g1, g2 = torch.Generator().manual_seed(seed), torch.Generator().manual_seed(seed)
        drawn = sample(logits, params, g1, history)
        assert torch.equal(drawn, torch.multinomial(ref.softmax(-1), 1, generator=g2).squeeze(-1))
    else:  # tied at the top-p boundary: every draw stays in leanformers' (larger) kept set
        g = torch.Generator().manual_seed(seed)
        for _ in range(3):
            drawn = sample(logits, params, g, history)
            assert bool(torch.isfinite(ours.gather(-1, drawn.unsqueeze(-1))).all())


@settings(derandomize=True, database=None, max_examples=300, deadline=None)
@given(logits=st.lists(_VALUES, min_size=2, max_size=40).map(lambda v: torch.tensor([v])),
       p=st.sampled_from([0.5, 0.75, 0.875, 0.9375]) | st.floats(0.01, 1.0))
@example(logits=DYADIC, p=0.75)
@example(logits=DYADIC, p=0.9375)
@example(logits=torch.zeros(1, 4), p=0.5)
def test_top_p_nucleus_is_minimal_up_to_ties(logits, p):
    """Whatever transformers does: the kept set is made of the most likely tokens, reaches p, and without the
    tokens tied with its least likely one it would not."""
    probs = logits[0].softmax(-1)
    kept = torch.isfinite(process_logits(logits, SamplingParams(temperature=1.0, top_p=p))[0])
    assert kept.any() and probs[kept].sum() >= min(p, float(probs.sum())) - 1e-6
    if (~kept).any():
        assert logits[0][kept].min() > logits[0][~kept].max()
        low = logits[0][kept].min()
        assert probs[kept & (logits[0] > low)].sum() < p + 1e-6


# ------------------------------------------------------------------------------------- end to end
def _hf_greedy(model, ids: list[int], n: int, penalty: float | None, prompt_only: bool = False) -> list[int]:
    """transformers.generate, greedy, EOS ignored; prompt_only: the penalty sees the prompt tokens only
    (what a loop that forgot to add generated tokens to the history would do)."""
    import transformers

    x = torch.tensor([ids])
    kw = dict(attention_mask=torch.ones_like(x), max_new_tokens=n, do_sample=False, eos_token_id=None,
              pad_token_id=0)
    if prompt_only:
        class PromptOnly(transformers.LogitsProcessor):
            def __call__(self, input_ids, scores):
                return RepetitionPenaltyLogitsProcessor(penalty)(input_ids[:, : len(ids)], scores)

        kw["logits_processor"] = transformers.LogitsProcessorList([PromptOnly()])
    elif penalty is not None:
        kw["repetition_penalty"] = penalty
    with torch.no_grad():
        out = model.generate(x, **kw)
    return out[0, len(ids):].tolist()


PROMPTS = ["Once upon a time", "def add(a, b):\n    return a + b\n", "Hello world! Bonjour le monde."]


@pytest.mark.parametrize("kind", ["llama3", "mistral", "qwen2", "smollm2"])
def test_greedy_repetition_penalty_equals_transformers(tiny_models, kind):
    import transformers

    lm = leanformers.load(str(tiny_models[kind]), dtype="float32", progress=False)
    model = transformers.AutoModelForCausalLM.from_pretrained(tiny_models[kind], dtype=torch.float32).eval()
    sensitive = False
    for prompt, penalty in zip(PROMPTS, (1.3, 0.8, 1.5)):  # > 1 penalizes, < 1 rewards repeats
        ids = lm.tokenizer.encode(prompt)
        ref = _hf_greedy(model, ids, 24, penalty)
        ours = lm.generate(ids, max_new_tokens=24, ignore_eos=True, repetition_penalty=penalty)
        assert ours.token_ids == ref, (prompt, penalty)
        # the test can fail: a history without the generated tokens changes the tokens
        sensitive = sensitive or _hf_greedy(model, ids, 24, penalty, prompt_only=True) != ref
    assert sensitive


def test_batched_repetition_penalty_equals_single(tiny_models):
    """Left padding repeats each row's first token, which the penalty already counts: rows decode alone."""
    lm = leanformers.load(str(tiny_models["llama3"]), dtype="float32", progress=False)
    outs = lm.generate(PROMPTS, max_new_tokens=20, ignore_eos=True, repetition_penalty=1.3)
    for prompt, out in zip(PROMPTS, outs):
        assert out.token_ids == lm.generate(prompt, max_new_tokens=20, ignore_eos=True,
                                            repetition_penalty=1.3).token_ids


@pytest.mark.slow
def test_smollm2_greedy_repetition_penalty_equals_transformers(lf_smollm2, hf_smollm2):
    model, tok = hf_smollm2
    sensitive = False
    for prompt in ["The capital of France is", "List the days of the week:"]:
        ids = tok(prompt).input_ids
        ref = _hf_greedy(model, ids, 32, 1.3)
        ours = lf_smollm2.generate(ids, max_new_tokens=32, ignore_eos=True, repetition_penalty=1.3)
        assert ours.token_ids == ref, prompt
        sensitive = sensitive or _hf_greedy(model, ids, 32, 1.3, prompt_only=True) != ref
    assert sensitive
