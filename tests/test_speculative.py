"""Speculative decoding: greedy equality with plain decoding, exact sampling distribution, rollback, stats, errors."""

from __future__ import annotations

import json
import logging
import shutil

import pytest
import torch

import leanformers
from leanformers.config import ModelConfig
from leanformers.errors import InvalidArgumentError
from leanformers.generation.decode import DecodeContext, DecodeStep, generate_tokens
from leanformers.generation.sampling import Sampler, SamplingParams, probabilities
from leanformers.models.base import DecoderModel
from leanformers.models.llama import LlamaForCausalLM
from leanformers.speculative import ModelDrafter, PromptLookupDrafter, SpeculativeDecoding, costs

PROMPTS = [
    "Once upon a time there was a little model",
    "def add(a, b):\n    return a + b\n\ndef add(a, b):",
    "The quick brown fox jumps over the lazy dog. The quick brown",
    "Hello world! Bonjour le monde.",
]


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny models, thousands of small ops: intra-op threads only add synchronization (slow on a busy machine)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _load(path):
    return leanformers.load(str(path), dtype="float32", progress=False)


@pytest.fixture(scope="module")
def target(tiny_models):
    return _load(tiny_models["smollm2"])


_CHEAP: set[int] = set()  # id() of draft models whose modelled step time is made tiny


@pytest.fixture(scope="module", autouse=True)
def cheap_drafts():
    """Adaptive k prices drafts with costs.step_time; the tiny test models all cost about the same, so it would
    rightly not draft with them at all. Models marked by `_cheap` cost 1e-4 s per step instead (as a real
    small draft would be far cheaper than its target)."""
    real = costs.step_time
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(costs, "step_time", lambda model, compiled: 1e-4 if id(model) in _CHEAP else real(model, compiled))
        yield


def _cheap(lm):
    _CHEAP.add(id(lm.model))
    return lm


@pytest.fixture(scope="module")
def perturbed(tiny_models):
    """The target's weights plus small noise: mostly agrees with the target (high acceptance), not always."""
    lm = _load(tiny_models["smollm2"])
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in lm.model.parameters():
            p.add_(0.01 * p.std() * torch.randn(p.shape, generator=g))
    return _cheap(lm)


@pytest.fixture(scope="module")
def other(tiny_models):
    """An unrelated random model with the same tokenizer: disagrees often (many rejections)."""
    return _cheap(_load(tiny_models["llama3"]))


@pytest.fixture(scope="module")
def mistral(tiny_models):
    return _load(tiny_models["mistral"])  # sliding window 5: verification crosses the window


def _plain(lm, ids, n, **kw):
    return lm.generate(ids, max_new_tokens=n, ignore_eos=True, **kw)


@pytest.fixture(scope="module")
def plain_out(target):
    """Plain greedy outputs of the target, computed once per prompt."""
    return {p: _plain(target, target.tokenizer.encode(p), 32) for p in PROMPTS}


# ------------------------------------------------------------------------------------- greedy equality
@pytest.mark.parametrize("draft_name,k", [
    ("perturbed", None), ("perturbed", 3), ("other", None), ("other", 1), ("other", 4),
    ("prompt-lookup", None), ("prompt-lookup", 2),
])
def test_greedy_equals_plain(request, target, plain_out, draft_name, k):
    draft = draft_name if draft_name == "prompt-lookup" else request.getfixturevalue(draft_name)
    rejected = 0
    for prompt in PROMPTS:
        ids = target.tokenizer.encode(prompt)
        plain = plain_out[prompt]
        spec = _plain(target, ids, 32, draft=draft, num_draft_tokens=k)
        assert spec.token_ids == plain.token_ids, prompt
        assert spec.text == plain.text
        s = spec.stats
        rejected += s["drafted"] - s["accepted"]
        assert s["drafted"] > 0
    if draft_name == "other":
        assert rejected > 0  # the rejection/correction path was exercised


def test_greedy_sliding_window_and_repetition_penalty(mistral, other, target):
    for prompt in PROMPTS[1:3]:
        ids = mistral.tokenizer.encode(prompt)
        for kw in ({}, {"repetition_penalty": 1.5}):
            plain = _plain(mistral, ids, 24, **kw)
            for draft in ("prompt-lookup", other):
                spec = _plain(mistral, ids, 24, draft=draft, num_draft_tokens=3, **kw)
                assert spec.token_ids == plain.token_ids, (prompt, kw)


def test_prompt_lookup_accepts_on_repetitive_text(target):
    ids = target.tokenizer.encode("def add(a, b):\n    return a + b\n" * 3 + "def add(a, b):\n")
    plain = _plain(target, ids, 48)
    spec = _plain(target, ids, 48, draft="prompt-lookup")
    assert spec.token_ids == plain.token_ids
    assert spec.stats["accepted"] > 0
    assert spec.stats["tokens_per_target_forward"] > 1.5


def test_high_acceptance_with_perturbed_copy(target, perturbed):
    ids = target.tokenizer.encode(PROMPTS[0])
    spec = _plain(target, ids, 40, draft=perturbed)
    assert spec.stats["acceptance_rate"] > 0.5
    assert spec.token_ids == _plain(target, ids, 40).token_ids


def test_logprobs_match_plain(target, other):
    ids = target.tokenizer.encode(PROMPTS[1])
    plain = _plain(target, ids, 20, logprobs=True)
    spec = _plain(target, ids, 20, logprobs=True, draft=other, num_draft_tokens=3)
    assert spec.token_ids == plain.token_ids
    torch.testing.assert_close(torch.tensor(spec.logprobs), torch.tensor(plain.logprobs), atol=1e-4, rtol=0)


# ------------------------------------------------------------------------------------- self-int4
def test_self_int4(tiny_models):
    lm = _load(tiny_models["llama3"])  # dims divisible by the int4 group size 32
    from leanformers.quantize import int4_backend

    ids = lm.tokenizer.encode(PROMPTS[0])
    plain = _plain(lm, ids, 30)
    spec = _plain(lm, ids, 30, draft="self-int4", num_draft_tokens=3)
    assert spec.token_ids == plain.token_ids
    expected = "self-int4" if int4_backend("cpu", torch.bfloat16)[0] != "dequant" else "self-int4 (int8)"
    assert spec.stats["draft"] == expected
    assert spec.stats["accepted"] > 0
    draft_step = lm._self_drafts["int4"]
    assert draft_step.model is not lm.model and lm.quantization is None  # the target is untouched
    _plain(lm, ids, 5, draft="self-int4")
    assert lm._self_drafts["int4"] is draft_step  # built once, cached


def test_self_int4_falls_back_to_int8(tiny_models, caplog):
    lm = _load(tiny_models["smollm2"])  # hidden size 48: no int4 group size divides it
    ids = lm.tokenizer.encode(PROMPTS[0])
    with caplog.at_level(logging.WARNING, logger="leanformers"):
        spec = _plain(lm, ids, 20, draft="self-int4")
    assert spec.stats["draft"] == "self-int4 (int8)"
    assert any("int8 instead" in r.getMessage() for r in caplog.records)
    assert spec.token_ids == _plain(lm, ids, 20).token_ids


def test_quantized_target_with_prompt_lookup(tiny_models):
    lm = _load(tiny_models["llama3"])
    lm.quantize("int8", dtype="float32")  # float32 activations: bfloat16 could flip a near-tie (see docs)
    ids = lm.tokenizer.encode("def add(a, b):\n    return a + b\n" * 2)
    plain = _plain(lm, ids, 30)
    spec = _plain(lm, ids, 30, draft="prompt-lookup")
    assert spec.token_ids == plain.token_ids
    with pytest.raises(InvalidArgumentError, match="already int8-quantized"):
        _plain(lm, ids, 5, draft="self-int4")


class _Counting(DecodeStep):
    """A step that counts its calls and says it is compiled (so drafters feed tokens through it one by one)."""

    is_compiled = True

    def __init__(self, model, calls, name):
        super().__init__(model)
        self.calls, self.name = calls, name

    def __call__(self, tokens, positions, cache):
        self.calls[self.name] += 1
        return super().__call__(tokens, positions, cache)


def test_the_steps_are_used_on_both_sides(tiny_models):
    lm, dlm = _load(tiny_models["smollm2"]), _load(tiny_models["llama3"])
    calls = {"target": 0, "draft": 0}
    ids = lm.tokenizer.encode(PROMPTS[2])
    plain = _plain(lm, ids, 25)
    nomatch = lm.tokenizer.encode("ab")
    plain_nomatch = _plain(lm, nomatch, 2)
    lm.step, dlm.step = _Counting(lm.model, calls, "target"), _Counting(dlm.model, calls, "draft")
    spec = _plain(lm, ids, 25, draft=dlm, num_draft_tokens=2)
    assert spec.token_ids == plain.token_ids
    assert calls["draft"] > 0 and calls["draft"] == spec.stats["draft_forwards"] - 1  # all but the draft prefill
    calls["target"] = 0
    # a lookup that finds nothing falls back to one-token steps: the target's step
    out = _plain(lm, nomatch, 2, draft="prompt-lookup")
    assert out.token_ids == plain_nomatch.token_ids
    assert calls["target"] == 1


def test_compiled_step_shares_the_plain_graph(tiny_models):
    """With a compiled decode step (backend "eager": fast to build), speculation's one-token steps reuse the
    graph plain decoding compiled (same shapes, strides and tensor kinds) instead of compiling another."""
    lm, dlm = _load(tiny_models["smollm2"]), _load(tiny_models["llama3"])
    twin = _load(tiny_models["smollm2"])  # as expensive as the target: adaptive k soon takes one-token steps
    for m in (lm, dlm):
        m.compile(backend="eager", cache_bucket=128)
        assert m.step.is_compiled
    ids = lm.tokenizer.encode(PROMPTS[0])
    plain = _plain(lm, ids, 24)
    _plain(dlm, ids, 4)
    graphs = {m: set(m.step.graphs) for m in (lm, dlm)}
    assert all(graphs.values())
    spec = _plain(lm, ids, 24, draft=twin)
    assert spec.token_ids == plain.token_ids
    assert spec.stats["target_forwards"] > spec.stats["rounds"] + 1  # one-token steps went through lm.step
    before = dlm.step.calls["compiled"]
    spec = _plain(lm, ids, 24, draft=dlm, num_draft_tokens=3)  # draft steps go through dlm.step
    assert spec.token_ids == plain.token_ids and dlm.step.calls["compiled"] > before
    # the target's verification forwards have a graph of their own; nothing else was compiled
    assert set(dlm.step.graphs) == graphs[dlm]
    assert {sig for sig in set(lm.step.graphs) - graphs[lm] if sig[0] != "verify"} == set()


def test_compiled_verification_is_used_and_priced(tiny_models):
    """With a compiled step (backend "eager": fast to build) rounds of up to verify_rows tokens go through the
    compiled verification graph, whose cost does not grow with k; longer rounds would be verified eagerly."""
    from leanformers.compile import compile_decode

    lm = _load(tiny_models["smollm2"])
    lm.compile(backend="eager", cache_bucket=128, verify_rows=4)
    fn = lm.step
    assert fn.verify_rows == 4
    ids = lm.tokenizer.encode("a b c a b c a b c a b c a b c a b c")
    plain = _plain(lm, ids, 30)
    spec = _plain(lm, ids, 30, draft="prompt-lookup")
    assert spec.token_ids == plain.token_ids and spec.stats["rounds"] > 0
    assert any(sig[0] == "verify" for sig in fn.graphs)
    ctx = DecodeContext(fn, [ids], 4, Sampler(SamplingParams()))
    cost = SpeculativeDecoding(PromptLookupDrafter())._verification_cost(ctx)
    verify_cost = costs.compiled_verify_cost
    assert cost(1) == cost(3) == verify_cost("float32", 4) < cost(4)  # padded to 4 rows / eager beyond
    assert verify_cost("float32", 5) == pytest.approx((verify_cost("float32", 4) + verify_cost("float32", 6)) / 2)
    with pytest.raises(InvalidArgumentError, match="verify_rows"):
        compile_decode(_load(tiny_models["smollm2"]).model, backend="eager", verify_rows=99, warmup=False)


# ------------------------------------------------------------------------------------- stats, limits, stopping
def test_stats_consistent(target, other):
    ids = target.tokenizer.encode(PROMPTS[1])
    for draft in (other, "prompt-lookup"):
        r = _plain(target, ids, 33, draft=draft)
        s = r.stats
        assert 0 <= s["accepted"] <= s["drafted"]
        assert s["acceptance_rate"] == pytest.approx(s["accepted"] / s["drafted"])
        assert s["tokens_per_target_forward"] >= 1
        assert s["tokens_per_target_forward"] * s["target_forwards"] == pytest.approx(len(r.token_ids))
        # every round emits accepted + 1 tokens; the prefill emits the first one
        assert len(r.token_ids) == 1 + s["accepted"] + (s["target_forwards"] - 1)
        assert s["num_draft_tokens"] == "adaptive"
        assert s["new_tokens"] == 33
    plain = _plain(target, ids, 33)
    assert "drafted" not in plain.stats


def test_adaptive_k_does_not_draft_when_it_cannot_pay(tiny_models):
    lm = _load(tiny_models["smollm2"])
    twin = _load(tiny_models["smollm2"])  # a draft exactly as expensive as the target
    ids = lm.tokenizer.encode(PROMPTS[0])
    r = _plain(lm, ids, 40, draft=twin)
    # even certain acceptance could not pay for drafting with it (on top of the verification): no drafts at all
    assert r.stats["drafted"] == 0 and r.stats["tokens_per_target_forward"] == 1.0, r.stats
    assert r.token_ids == _plain(lm, ids, 40).token_ids
    r = _plain(lm, ids, 20, draft=twin, num_draft_tokens=2)  # fixed k drafts anyway
    assert r.stats["drafted"] > 0 and r.stats["acceptance_rate"] == 1.0


def test_fixed_k_is_respected(target):
    ids = target.tokenizer.encode("a b c a b c a b c a b c a b c")
    r = _plain(target, ids, 30, draft="prompt-lookup", num_draft_tokens=3)
    assert r.stats["num_draft_tokens"] == 3
    assert r.stats["drafted"] <= 3 * r.stats["rounds"]


@pytest.mark.parametrize("n", [1, 2, 3, 5, 8, 17])
def test_max_new_tokens_exact(target, n):
    ids = target.tokenizer.encode("def add(a, b):\n    return a + b\n" * 3)
    plain = _plain(target, ids, n)
    for draft, k in (("prompt-lookup", 8), ("prompt-lookup", None), (target, 4)):
        spec = _plain(target, ids, n, draft=draft, num_draft_tokens=k)
        assert len(spec.token_ids) == n
        assert spec.token_ids == plain.token_ids
        assert spec.finish_reason == "length"


def test_eos_and_stop_strings(tiny_models, other):
    lm = _load(tiny_models["smollm2"])
    ids = lm.tokenizer.encode(PROMPTS[1])
    full = _plain(lm, ids, 40)
    # a stop string taken from the middle of the plain output
    stop = lm.tokenizer.decode(full.token_ids[6:8])
    plain = lm.generate(ids, max_new_tokens=40, stop=[stop])
    spec = lm.generate(ids, max_new_tokens=40, stop=[stop], draft=other, num_draft_tokens=4)
    assert plain.finish_reason == spec.finish_reason == "stop"
    assert spec.text == plain.text and spec.token_ids == plain.token_ids
    spec = lm.generate(ids, max_new_tokens=40, stop=[stop], draft="prompt-lookup")
    assert spec.text == plain.text
    # an EOS id that the plain output reaches at position 9
    eos = full.token_ids[9]
    lm.generation_config["eos_token_id"] = eos
    plain = lm.generate(ids, max_new_tokens=40)
    assert plain.finish_reason == "stop" and plain.token_ids[-1] == eos
    for draft in (other, "prompt-lookup"):
        spec = lm.generate(ids, max_new_tokens=40, draft=draft, num_draft_tokens=6)
        assert spec.token_ids == plain.token_ids and spec.finish_reason == "stop"


def test_streaming_and_chat(target, other):
    ids = target.tokenizer.encode(PROMPTS[0])
    stream = target.stream(ids, max_new_tokens=30, ignore_eos=True, draft=other)
    pieces = list(stream)
    plain = _plain(target, ids, 30)
    assert "".join(pieces) == stream.result.text == plain.text
    assert stream.result.stats["drafted"] > 0
    messages = [{"role": "user", "content": "Hello world! Hello world!"}]
    a = target.chat(messages, max_new_tokens=20, ignore_eos=True)
    b = target.chat(messages, max_new_tokens=20, ignore_eos=True, draft="prompt-lookup")
    assert a.token_ids == b.token_ids
    c = "".join(target.chat(messages, stream=True, max_new_tokens=20, ignore_eos=True, draft=other))
    assert c == a.text


def test_sampling_seeded_reproducible(target, other):
    ids = target.tokenizer.encode(PROMPTS[0])
    kw = dict(temperature=1.0, top_p=0.9, seed=123, draft=other)
    a, b = _plain(target, ids, 30, **kw), _plain(target, ids, 30, **kw)
    assert a.token_ids == b.token_ids
    c = _plain(target, ids, 30, **{**kw, "seed": 124})
    assert c.token_ids != a.token_ids


# ------------------------------------------------------------------------------------- errors
def test_batch_with_draft_is_refused(target):
    with pytest.raises(InvalidArgumentError, match="one prompt at a time"):
        target.generate(["a", "b"], draft="prompt-lookup")


def test_bad_arguments(target):
    with pytest.raises(InvalidArgumentError, match="unknown draft"):
        target.generate("a", draft="self-int3")
    with pytest.raises(InvalidArgumentError, match="num_draft_tokens"):
        target.generate("a", draft="prompt-lookup", num_draft_tokens=0)
    with pytest.raises(InvalidArgumentError, match="needs draft"):
        target.generate("a", num_draft_tokens=3)
    with pytest.raises(InvalidArgumentError, match="LanguageModel"):
        target.generate("a", draft=target.model)
    with pytest.raises(InvalidArgumentError, match="unknown generation argument"):
        target.generate("a", draft_model="prompt-lookup")


def _copy_with_tokenizer(src, dst, edit):
    shutil.copytree(src, dst)
    path = dst / "tokenizer.json"
    data = json.loads(path.read_text())
    edit(data)
    path.write_text(json.dumps(data))
    return _load(dst)


def test_different_vocabulary_is_refused(tiny_models, target, tmp_path):
    names = {}

    def swap(data):
        vocab = data["model"]["vocab"]
        a, b = sorted(vocab, key=vocab.get)[40:42]
        names["a"] = a
        vocab[a], vocab[b] = vocab[b], vocab[a]

    swapped = _copy_with_tokenizer(tiny_models["llama3"], tmp_path / "swapped", swap)
    with pytest.raises(InvalidArgumentError, match=r"vocabulary differs from the target's in 2 of \d+ tokens") as e:
        target.generate("Once upon", draft=swapped)
    assert repr(names["a"]) in str(e.value)

    def grow(data):
        n = max(t["id"] for t in data["added_tokens"]) + 1
        n = max(n, len(data["model"]["vocab"]) + len(data["added_tokens"]))
        data["added_tokens"].append({"id": n, "content": "<|extra|>", "single_word": False, "lstrip": False,
                                     "rstrip": False, "normalized": False, "special": True})

    bigger = _copy_with_tokenizer(tiny_models["llama3"], tmp_path / "bigger", grow)
    with pytest.raises(InvalidArgumentError, match=r"has \d+ tokens but the target's has \d+"):
        target.generate("Once upon", draft=bigger)


# ------------------------------------------------------------------------------------- rollback
def test_target_cache_rollback_gives_fresh_logits(target):
    """Verify 5 tokens, 'reject' after the 2nd, continue from there: logits equal a fresh run's."""
    model = target.model
    ids = target.tokenizer.encode(PROMPTS[0])
    L = len(ids)
    draft = [5, 9, 13, 17, 21]
    with torch.inference_mode():
        cache = model.make_cache(1, L + 10)
        model(torch.tensor([ids]), cache=cache, positions=torch.arange(L))
        model(torch.tensor([draft]), cache=cache, positions=torch.arange(L, L + 5))
        # accepted 5, 9; continue with a different token at position L + 2 (L+3.. hold stale K/V)
        rolled = model(torch.tensor([[40, 41]]), cache=cache, positions=torch.arange(L + 2, L + 4))
        fresh = model(torch.tensor([ids + [5, 9, 40, 41]]))[:, -2:]
    torch.testing.assert_close(rolled, fresh, atol=1e-5, rtol=1e-5)


def test_draft_cache_rollback(target, other):
    """After a rejected round, the drafter proposes what a fresh drafter would from the same text."""
    sampler = Sampler(SamplingParams())
    ids = target.tokenizer.encode(PROMPTS[0])
    with torch.inference_mode():
        d = ModelDrafter(DecodeStep(other.model), name="d", cost=0.5)
        d.start(ids, 64)
        first, _, _ = d.propose(ids + [7], lambda _: 5, sampler, False)
        seq = ids + [7] + first[:2] + [(first[2] + 1) % 300]  # two accepted, then a correction
        again, _, _ = d.propose(seq, lambda _: 4, sampler, False)
        fresh = ModelDrafter(DecodeStep(other.model), name="f", cost=0.5)
        fresh.start(ids, 64)
        expected, _, _ = fresh.propose(seq, lambda _: 4, sampler, False)
        assert again == expected
        # all accepted + bonus: the drafter catches up with two unseen tokens
        seq2 = seq + again + [3]
        got = d.propose(seq2, lambda _: 3, sampler, False)[0]
        assert got == fresh.propose(seq2, lambda _: 3, sampler, False)[0]


def test_prompt_lookup_proposals():
    d = PromptLookupDrafter()
    sampler = Sampler(SamplingParams())
    d.start([], 0)
    seq = [1, 2, 3, 4, 5, 9, 2, 3, 4, 6, 7, 2, 3]
    # 3-gram (7, 2, 3) never occurred before; the 2-gram (2, 3) did, most recently at 6: propose what followed
    assert d.propose(seq, lambda n: 3, sampler, False) == ([4, 6, 7], None, 2)
    # k is asked per match length
    assert d.propose(seq + [4, 6], lambda n: n, sampler, False) == ([7, 2, 3], None, 3)
    # a repeating pattern keeps copying from the proposal itself
    d.start([], 0)
    assert d.propose([8, 1, 2, 1, 2], lambda n: 5, sampler, False)[0] == [1, 2, 1, 2, 1]
    d.start([], 0)
    assert d.propose([1, 2, 3], lambda n: 4, sampler, False) == ([], None, None)


# ------------------------------------------------------------------------------------- distribution
# The statistical tests draw thousands of generations. To keep them fast the tiny random transformer is
# wrapped in `MemoModel`: the same model contract (K/V written at slots, attention over slots up to the
# query), but the "cache" stores token ids per slot and the logits for a prefix come from an uncached
# forward of the real model, computed once per distinct prefix. Rollback semantics are the real ones:
# stale slots after the query are never read.
V = 16


def _tiny_random(seed: int, scale: float) -> LlamaForCausalLM:
    cfg = ModelConfig(model_type="llama", vocab_size=V, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                      num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=64)
    torch.manual_seed(seed)
    model = LlamaForCausalLM(cfg).eval()
    with torch.no_grad():
        model.lm_head.weight.mul_(scale)  # spread the logits: a distribution far from uniform
    return model


class _SlotCache:
    def __init__(self, max_len: int):
        self.tokens = [-1] * max_len
        self.max_len = max_len


class MemoModel(DecoderModel):
    """A model of the contract whose "hidden states" are already the logits (its head is the identity)."""

    def __init__(self, net: LlamaForCausalLM):
        super().__init__(net.config)
        self.net = net
        self.anchor = torch.nn.Parameter(torch.zeros(1), requires_grad=False)  # .device / .dtype
        self.memo: dict[tuple[int, ...], torch.Tensor] = {}

    @property
    def dtype(self) -> torch.dtype:
        return torch.float32

    def make_cache(self, batch_size: int, max_len: int, *, dtype=None) -> _SlotCache:
        assert batch_size == 1
        return _SlotCache(max_len)

    def _logits(self, prefix: tuple[int, ...]) -> torch.Tensor:
        if prefix not in self.memo:
            self.memo[prefix] = self.net(torch.tensor([prefix]))[0, -1]
        return self.memo[prefix]

    def hidden_states(self, input_ids, *, cache=None, positions=None, attention_mask=None):
        slots = positions.reshape(-1).tolist()
        for s, t in zip(slots, input_ids[0].tolist()):
            cache.tokens[s] = t
        return torch.stack([self._logits(tuple(cache.tokens[: s + 1])) for s in slots])[None]

    def logits(self, hidden):
        return hidden


def _exact(model, prompt, params, depth):
    """Exact joint distribution of the first `depth` sampled tokens: tensor (V,) * depth, flattened."""
    with torch.no_grad():
        joint = torch.ones(())
        prefixes = torch.tensor([prompt])
        for _ in range(depth):
            p = probabilities(model(prefixes)[:, -1], params).double()  # (#prefixes, V)
            joint = (joint.reshape(-1, 1) * p).reshape(-1)
            n = prefixes.shape[0]
            prefixes = torch.cat([prefixes.repeat_interleave(V, 0), torch.arange(V).repeat(n).unsqueeze(1)], 1)
    return joint


def _chi2_pvalue(counts: torch.Tensor, probs: torch.Tensor, n: int) -> float:
    """Pearson goodness of fit; cells with expected count < 5 are pooled into one."""
    expected = probs * n
    small = expected < 5
    obs = torch.cat([counts[~small].double(), counts[small].double().sum().reshape(1)])
    exp = torch.cat([expected[~small], expected[small].sum().reshape(1)])
    if bool((counts[probs == 0] > 0).any()):
        return 0.0  # an impossible outcome was sampled
    keep = exp > 0
    obs, exp = obs[keep], exp[keep]
    stat = ((obs - exp) ** 2 / exp).sum()
    df = torch.tensor((obs.numel() - 1) / 2, dtype=torch.float64)
    return float(torch.special.gammaincc(df, stat / 2))  # chi-square survival function


class _AlwaysAccept(SpeculativeDecoding):
    """A broken verifier (accepts every draft token): the negative control."""

    def _verify_sampled(self, out, draft, q, hist, sampler):
        if not draft:
            return super()._verify_sampled(out, draft, q, hist, sampler)
        p = probabilities(out, sampler.params)
        return draft + [sampler.draw(p[len(draft)])], len(draft)


def _samples(target, drafter, params_kw, prompt, n, k, cls=SpeculativeDecoding):
    """n generations of 3 tokens (seeds 1000..): the 1st from the prefill, the 2nd and 3rd verified drafts."""
    out = torch.empty(n, 3, dtype=torch.long)
    drafted = accepted = 0
    step = DecodeStep(target)
    for i in range(n):
        strategy = cls(drafter, num_draft_tokens=k)
        steps = generate_tokens(step, [prompt], max_new_tokens=3, sampler=Sampler(SamplingParams(seed=1000 + i, **params_kw)),
                                strategy=strategy)
        out[i] = torch.tensor([s.tokens[0] for s in steps])
        drafted, accepted = drafted + strategy.drafted, accepted + strategy.accepted
    return out, drafted, accepted


def _pvalues(samples, exact, n):
    """p-values of the joint (t1, t2) and of the joint (t2, t3) (t3 follows a verified token)."""
    e = exact.reshape(V, V, V)
    c12 = torch.bincount(samples[:, 0] * V + samples[:, 1], minlength=V * V)
    c23 = torch.bincount(samples[:, 1] * V + samples[:, 2], minlength=V * V)
    return _chi2_pvalue(c12, e.sum(2).reshape(-1), n), _chi2_pvalue(c23, e.sum(0).reshape(-1), n)


@pytest.fixture(scope="module")
def sampling_models():
    target = MemoModel(_tiny_random(1, 4.0))
    draft = MemoModel(_tiny_random(2, 4.0))  # unrelated weights: disagrees with the target, so rejections happen
    return target, draft


@pytest.mark.parametrize("params_kw", [dict(temperature=1.0), dict(temperature=0.8, top_k=10)])
@pytest.mark.parametrize("k", [1, 2])
def test_speculative_sampling_matches_target_distribution(sampling_models, params_kw, k):
    target, draft = sampling_models
    prompt = [3, 1, 4, 1, 5]
    n = 4000
    drafter = ModelDrafter(DecodeStep(draft), name="d", cost=0.5)
    samples, drafted, accepted = _samples(target, drafter, params_kw, prompt, n, k)
    exact = _exact(target.net, prompt, SamplingParams(**params_kw), 3)
    # the draft really disagrees: the total variation between its and the target's 2nd-token laws is large
    q = _exact(draft.net, prompt, SamplingParams(**params_kw), 2).reshape(V, V)
    p = exact.reshape(V, V, V).sum(-1)
    assert 0.5 * float((p - q).abs().sum()) > 0.3
    assert 0.05 < accepted / drafted < 0.9  # both the acceptance and the residual paths ran often
    p12, p23 = _pvalues(samples, exact, n)
    assert p12 > 1e-3 and p23 > 1e-3, (p12, p23)
    # the negative control: accepting every draft token is detected
    broken, _, _ = _samples(target, drafter, params_kw, prompt, 2000, k, cls=_AlwaysAccept)
    assert min(_pvalues(broken, exact, 2000)) < 1e-3


def test_prompt_lookup_sampling_matches_target_distribution(sampling_models):
    target, _ = sampling_models
    prompt = [3, 1, 4, 1, 5, 3, 1, 4, 1, 5, 3, 1]  # lookups find continuations: one-hot (deterministic) drafts
    params_kw = dict(temperature=1.0)
    n = 4000
    samples, drafted, accepted = _samples(target, PromptLookupDrafter(), params_kw, prompt, n, None)
    assert drafted > n // 4 and 0 < accepted < drafted
    exact = _exact(target.net, prompt, SamplingParams(**params_kw), 3)
    p12, p23 = _pvalues(samples, exact, n)
    assert p12 > 1e-3 and p23 > 1e-3, (p12, p23)
    broken, _, _ = _samples(target, PromptLookupDrafter(), params_kw, prompt, 2000, None, cls=_AlwaysAccept)
    assert min(_pvalues(broken, exact, 2000)) < 1e-3


def test_memo_model_matches_real_model(sampling_models):
    """The memoized stand-in gives the real model's cached logits (so the tests above test the real thing)."""
    memo, _ = sampling_models
    net = memo.net
    ids = [3, 1, 4, 1, 5, 9, 2]
    with torch.inference_mode():
        cache = net.make_cache(1, 16)
        real = net(torch.tensor([ids]), cache=cache, positions=torch.arange(7))
        mcache = memo.make_cache(1, 16)
        got = memo(torch.tensor([ids]), cache=mcache, positions=torch.arange(7))
    torch.testing.assert_close(got, real, atol=1e-5, rtol=1e-5)
