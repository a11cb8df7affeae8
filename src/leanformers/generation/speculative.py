"""Speculative decoding: a cheap drafter proposes k tokens, the target model checks them in ONE forward.

    lm.generate(prompt, draft=small_lm)            # another LanguageModel with the same tokenizer
    lm.generate(prompt, draft="self-int4")         # the target itself, int4-quantized (built once, cached)
    lm.generate(prompt, draft="prompt-lookup")     # copy what followed the last n-gram earlier in the text
    lm.generate(prompt, draft=..., num_draft_tokens=5)   # fixed k (default: adaptive)

It is a strategy of the ordinary decode loop: `SpeculativeSteps` (built by `steps_factory`) takes the
arguments of `decode.generate_steps` and yields one `Step` per token, so EOS, stop strings, streaming and
max_new_tokens are handled by `run.run_generation` exactly as for plain decoding.

One round, with `pending` the last emitted token (not yet in the target's cache) at slot s:

    draft:   d1 .. dk                                      (k draft-model steps, or an n-gram lookup)
    target:  forward([pending, d1 .. dk], slots s .. s+k)  -> k+1 next-token distributions p0 .. pk
    accept:  d1 .. dm (the first m that pass), then one more token from the target:
             the correction at the first rejection, or the bonus token from pk when all k passed.

Rolling back is free: both KV caches are static and slot-addressed; rejected positions are simply
overwritten by the next round and, until then, masked causally (attention only covers slots up to the
query). The draft model's cache keeps the tokens it has seen; each round first feeds it the accepted
tokens it has not seen yet (the last accepted draft token and the correction/bonus).

Acceptance rule (Leviathan et al. 2023; Chen et al. 2023), with p the target's and q the drafter's
distribution AFTER the same SamplingParams processing (`sampling.probabilities`): accept x ~ q with
probability min(1, p(x)/q(x)); at the first rejection draw from normalize(max(0, p - q)); when all k
pass, draw the bonus token from p. The emitted tokens are then distributed exactly as the target's own
samples. An n-gram lookup is a deterministic drafter (q = one-hot). Greedy decoding (temperature 0)
reduces to "accept while the draft equals the target's argmax", so the output equals plain greedy
decoding up to float rounding: the target scores k+1 positions in one matmul instead of k+1 separate
ones, which can round differently and flip a near-tie (float32: identical on the test prompts; see
bench/bench_speculative.py for a measurement in bfloat16).

With a compiled decode step on CPU (`LanguageModel.compile()`), verification has a compiled graph of its
own (`CompiledDecode.verify`): the round's tokens are padded to a fixed `verify_rows` (2-6, by weight
type) and each row's matrix products are computed as a one-token step computes them (norms and softmax
reduce in another order: logits agree up to float rounding). Longer rounds fall back to an eager
verification.

Adaptive k (default): an exponentially decayed estimate a of the per-token acceptance rate picks the k
maximizing the expected tokens per round, (1 - a^(k+1)) / (1 - a), divided by the round's cost in
single-step units: k * draft_cost plus the verification's cost, 1 + fixed + k * per_token eagerly
(`verify_costs`, `_step_time_estimate`), a constant up to verify_rows - 1 drafts when compiled
(`compile.verify_cost`).
k = 0 (a plain step) wins when drafting cannot pay; the estimate then decays back towards "unknown", so
drafting is retried now and then (never when even near-certain acceptance could not pay for a round).
Prompt lookup keeps one estimate per match length n (a 3-gram match is
a far better bet than a 1-gram one). The cost ratios are fixed formulas, never measured at run time, so a
seeded run is reproducible. `num_draft_tokens=k` fixes k instead.
"""

from __future__ import annotations

import copy
import logging
from typing import Any, Callable, Iterator

import torch
from torch import nn

from ..errors import InvalidArgumentError, LeanformersError
from ..memory import move_to_huge_pages, uses_huge_pages
from .compile import pad_rows, verify_cost, weight_kind
from .decode import DEFAULT_PREFILL_CHUNK, Step
from .kv_cache import KVCache
from .sampling import SamplingParams, probabilities, process_logits

logger = logging.getLogger(__name__)

DRAFT_NAMES = ("prompt-lookup", "self-int4", "self-int8")
MAX_DRAFT_TOKENS = 64



# A compiled CPU decode step (models/ops.py GEMV loops) against an eager one, SmolLM2-135M, 2 threads
# (bench/results/decode.json): verification forwards stay eager, so they cost this much more in steps.
COMPILED_CPU_STEP_SPEEDUP = 3.0


# Eager float32 on CPU: torch's matmul (MKL on this AMD EPYC) is slowest for 2-4 rows. A forward over T tokens,
# in one-token steps (SmolLM2-135M, cache position 300, 2 threads): T=2 1.61, 3 1.94, 4 1.36, 5 1.20, 6 1.29,
# 8 1.30. Eager float32 verifications of 2-4 tokens are therefore padded to EAGER_F32_ROWS.
EAGER_F32_ROWS = 5
EAGER_F32_COST = {5: 1.20, 6: 1.29, 7: 1.30, 8: 1.30}


def _eager_f32(model: nn.Module) -> bool:
    p = next((t for t in model.parameters() if t.is_floating_point()), None)
    return p is not None and p.device.type == "cpu" and weight_kind(model) == "float32"


def verify_costs(model: nn.Module, compiled: bool = False) -> tuple[float, float]:
    """(fixed, per_token): a verification forward over k+1 tokens costs 1 + fixed + k * per_token single steps.

    compiled: the single steps run a compiled CPU decode step while verification runs eagerly.

    Fixed heuristics (measured on a 2-core AMD EPYC, torch 2.13, SmolLM2-135M): a forward over a few tokens is
    memory-bound, so extra positions are cheap, but in float32 on CPU any T > 1 leaves the GEMV path for a
    GEMM (~1.4-1.6x a step for 2-8 tokens, ~1.8x for 12); bfloat16 has no such step (~1.0-1.4x for 2-8).
    """
    p = next((t for t in model.parameters() if t.is_floating_point()), None)
    if p is None or p.device.type != "cpu":
        return 0.0, 0.01
    if compiled:
        fixed, per_token = verify_costs(model)
        s = COMPILED_CPU_STEP_SPEEDUP
        return (1 + fixed) * s - 1, per_token * s
    kind = weight_kind(model)
    if kind == "int4":  # the CPU int4 kernel's time grows with the rows: 1.5x for 2-4 tokens, 2.9x for 8
        return 0.4, 0.2
    if kind == "int8":  # 1.25x for 2-4 tokens, 2x for 8
        return 0.2, 0.12
    return (0.45, 0.05) if kind == "float32" else (0.0, 0.04)


# ------------------------------------------------------------------------------------------ drafters
class PromptLookupDrafter:
    """Propose the tokens that followed the most recent earlier occurrence of the text's last n-gram.

    n goes from `max_ngram` down to `min_ngram`; the first n with a match wins. Among the occurrences of
    that n-gram, the one that continues the previous proposal's source wins (copying a passage keeps
    copying from the same place even when the n-gram also occurs elsewhere; +5% speed on the benchmark's
    input-grounded prompts), else the most recent one. The n-grams are indexed incrementally (a dict per
    n: n-gram -> starts with at least one following token), so a lookup costs a few dict probes. A
    continuation that runs into the end of the text keeps copying from its own proposal (like an LZ77
    back-reference), so a repeating pattern yields k tokens, not fewer.
    """

    name = "prompt-lookup"
    cost = 0.0  # per drafted token, relative to one target forward
    max_k = 24

    def __init__(self, max_ngram: int = 3, min_ngram: int = 1):
        if not (1 <= min_ngram <= max_ngram):
            raise InvalidArgumentError(f"prompt lookup needs 1 <= min_ngram <= max_ngram, got {min_ngram}, {max_ngram}")
        self.max_ngram, self.min_ngram = max_ngram, min_ngram
        self.forwards = 0

    def catch_up_cost(self, seq_len: int) -> float:
        return 0.0  # nothing to feed: the lookup reads the text itself

    def start(self, prompt: list[int], max_len: int, params: SamplingParams, prefill_chunk: int) -> None:
        self._index: list[dict[tuple[int, ...], list[int]]] = [{} for _ in range(self.max_ngram + 1)]
        self._indexed = 0  # n-grams starting before this position (with a following token) are indexed
        self._last: tuple[int, int] | None = None  # (source position, text length) of the last proposal
        self.forwards = 0

    def _extend_index(self, seq: list[int]) -> None:
        # every n-gram seq[i:i+n] with i + n <= len(seq) - 1 (at least one token follows it)
        end = len(seq) - 1
        for i in range(self._indexed, end):
            for n in range(self.min_ngram, self.max_ngram + 1):
                if i + n > end:
                    break
                self._index[n].setdefault(tuple(seq[i:i + n]), []).append(i)
        self._indexed = max(self._indexed, end)

    def propose(self, seq: list[int], k_for: Callable[[Any], int], params: SamplingParams, generator,
                history_needed: bool):
        """(tokens, None, n): the proposal, q (None: deterministic), and the match length as the adaptive-k key."""
        self._extend_index(seq)
        # where the previous proposal's source continues, aligned with the end of the text
        follow = self._last[0] + len(seq) - self._last[1] if self._last is not None else None
        self._last = None
        for n in range(min(self.max_ngram, len(seq) - 1), self.min_ngram - 1, -1):
            starts = self._index[n].get(tuple(seq[-n:]))
            if not starts:
                continue
            start = starts[-1]
            if follow is not None and start != follow - n and follow - n in starts[-64:]:
                start = follow - n
            k = k_for(n)  # longer matches earn longer proposals (acceptance is tracked per n)
            src = start + n
            self._last = (src, len(seq))
            out: list[int] = []
            for j in range(k):
                pos = src + j
                out.append(seq[pos] if pos < len(seq) else out[pos - len(seq)])
            return out, None, n
        return [], None, None

    def close(self) -> None:
        pass


class ModelDrafter:
    """A smaller (or quantized) causal LM with its own static KV cache."""

    max_k = 12

    def __init__(self, model: nn.Module, *, name: str, cost: float, decode_fn=None, cache_bucket: int | None = None,
                 context_length: int | None = None, chunk_cost: float | None = None):
        self.model = model
        self.name = name
        self.cost = cost
        # feeding more than a few unseen tokens runs one eager forward: its cost in target steps
        self.chunk_cost = 1.5 * cost if chunk_cost is None else chunk_cost
        self.decode_fn = decode_fn
        self.cache_bucket = cache_bucket
        self.context_length = context_length
        self.forwards = 0
        self.cache: KVCache | None = None

    @property
    def device(self) -> torch.device:
        return self.model.model.embed_tokens.weight.device if hasattr(self.model.model.embed_tokens, "weight") \
            else next(self.model.parameters()).device

    def start(self, prompt: list[int], max_len: int, params: SamplingParams, prefill_chunk: int) -> None:
        if self.cache_bucket:
            size = -(-max_len // self.cache_bucket) * self.cache_bucket
            max_len = min(size, max(max_len, self.context_length or size))
        with torch.inference_mode(False):  # as the plain loop makes them, so a compiled step shares its graph
            self.cache = self.model.make_cache(1, max_len)
            self.positions = torch.arange(max_len, device=self.device).unsqueeze(0)
        self.fed: list[int] = []  # tokens whose K/V sit in slots 0 .. len-1 of the draft cache
        self.prefill_chunk = prefill_chunk
        self.forwards = 0

    def catch_up_cost(self, seq_len: int) -> float:
        """Cost (target steps) of feeding the tokens the draft has not seen before it can draft again."""
        unseen = max(1, seq_len - len(self.fed))
        return unseen * self.cost if self.decode_fn is not None and unseen <= 4 else self.chunk_cost

    def _feed(self, tokens: list[int], start: int) -> torch.Tensor:
        """Write `tokens` at slots start.. into the draft cache; logits (V,) after the last one."""
        dev = self.device
        if self.decode_fn is not None and len(tokens) <= 4:
            for j, t in enumerate(tokens):  # the (compiled) one-token step, one token at a time
                slot = torch.tensor([start + j], device=dev)
                logits = self.decode_fn(self.model, torch.tensor([[t]], device=dev), self.cache, slot,
                                        self.positions[:, start + j:start + j + 1], None)[0]
                self.forwards += 1
            return logits
        chunk = self.prefill_chunk
        for a in range(0, len(tokens), chunk):
            b = min(len(tokens), a + chunk)
            logits = self.model(torch.tensor([tokens[a:b]], device=dev), cache=self.cache,
                                cache_position=torch.arange(start + a, start + b, device=dev), logits_to_keep=1)
            self.forwards += 1
        return logits[0, -1]

    def propose(self, seq: list[int], k_for: Callable[[Any], int], params: SamplingParams, generator,
                history_needed: bool):
        """(tokens, q (k, V) or None when greedy, None): k tokens sampled from the draft model."""
        k = k_for(None)
        if k <= 0:
            return [], None, None  # the unseen tokens are fed next time
        # the longest prefix of seq already in the draft cache (rejected drafts after it get overwritten)
        fed, c = self.fed, 0
        limit = min(len(fed), len(seq) - 1)
        c = limit
        for i in range(limit):
            if fed[i] != seq[i]:
                c = i
                break
        logits = self._feed(seq[c:], c)
        fed[c:] = seq[c:]
        tokens: list[int] = []
        qs: list[torch.Tensor] = []
        hist = torch.tensor([seq], device=logits.device) if history_needed else None
        for i in range(k):
            if params.greedy:
                x = int(process_logits(logits[None], params, hist).argmax(-1))
            else:
                q = probabilities(logits[None], params, hist)[0]
                x = int(torch.multinomial(q, 1, generator=generator))
                qs.append(q)
            tokens.append(x)
            if i + 1 < k:
                logits = self._feed([x], len(fed))
                fed.append(x)
                if hist is not None:
                    hist = torch.cat([hist, hist.new_tensor([[x]])], dim=1)
        return tokens, (torch.stack(qs) if qs else None), None

    def close(self) -> None:
        self.cache = None


# ------------------------------------------------------------------------------------------ the loop
class SpeculativeSteps:
    """The token iterator of one speculative generation (one prompt). `.stats` holds the counters."""

    def __init__(self, model: nn.Module, prompts: list[list[int]], *, drafter, num_draft_tokens: int | None,
                 max_new_tokens: int, params: SamplingParams, logprobs: bool = False, decode_fn=None,
                 prefill_chunk: int = DEFAULT_PREFILL_CHUNK, on_prefill_done: Callable[[], None] | None = None,
                 cache_len: int | None = None):
        if len(prompts) != 1:
            raise InvalidArgumentError(
                f"speculative decoding (draft=) takes one prompt at a time, got a batch of {len(prompts)}"
            )
        if max_new_tokens <= 0:
            raise InvalidArgumentError(f"max_new_tokens must be > 0, got {max_new_tokens}")
        self.model, self.prompt, self.drafter = model, list(prompts[0]), drafter
        self.fixed_k = num_draft_tokens
        self.max_new_tokens, self.params, self.logprobs = max_new_tokens, params, logprobs
        self.decode_fn, self.prefill_chunk, self.on_prefill_done = decode_fn, prefill_chunk, on_prefill_done
        self.cache_len = cache_len
        self.drafted = self.accepted = self.rounds = self.target_forwards = self.emitted = 0
        self.k_sum = 0
        self._gen = self._run()

    # iterator protocol --------------------------------------------------------------------------
    def __iter__(self) -> "SpeculativeSteps":
        return self

    def __next__(self) -> Step:
        with torch.inference_mode():
            return next(self._gen)

    def close(self) -> None:
        self._gen.close()
        self.drafter.close()

    @property
    def stats(self) -> dict[str, Any]:
        return {
            "draft": self.drafter.name,
            "num_draft_tokens": self.fixed_k if self.fixed_k is not None else "adaptive",
            "drafted": self.drafted,
            "accepted": self.accepted,
            "acceptance_rate": self.accepted / self.drafted if self.drafted else 0.0,
            "rounds": self.rounds,
            "mean_draft_tokens": self.k_sum / self.rounds if self.rounds else 0.0,
            "target_forwards": self.target_forwards,
            "draft_forwards": self.drafter.forwards,
            # prefill counts as the forward that produced the first token: plain decoding gives exactly 1.0
            "tokens_per_target_forward": self.emitted / self.target_forwards if self.target_forwards else 0.0,
        }

    # adaptive k ---------------------------------------------------------------------------------
    def _plan_verification(self, model: nn.Module) -> Callable[[int], float]:
        """Pick how rounds are verified (compiled graph: `_can_verify`; eager float32 padding: `_pad_rows`)
        and return k -> time of the verification forward over k + 1 tokens, in one-token decode steps."""
        fn = self.decode_fn
        compiled = bool(getattr(fn, "is_compiled", False))
        fixed, per_token = verify_costs(model, compiled=compiled)
        rows = getattr(fn, "verify_rows", 0) if compiled else 0
        self._can_verify = fn.can_verify if rows else None
        self._pad_rows = EAGER_F32_ROWS if not compiled and _eager_f32(model) else 0
        if self._pad_rows:
            last = max(EAGER_F32_COST)
            return lambda k: EAGER_F32_COST.get(max(k + 1, self._pad_rows),
                                                EAGER_F32_COST[last] + (k + 1 - last) * per_token)
        if not rows:
            return lambda k: 1 + fixed + k * per_token
        padded = verify_cost(model, rows)  # any k + 1 <= rows costs the same (one static shape)
        return lambda k: padded if k + 1 <= rows else 1 + fixed + k * per_token

    def _choose_k(self, key: Any, seq_len: int) -> int:
        if self.fixed_k is not None:
            return self.fixed_k
        d = self.drafter
        succ, trials = self._acceptance.get(key, (0.0, 0.0))
        a = (succ + 1.0) / (trials + 1.5)  # prior: acceptance ~ 2/3 until observations say otherwise
        a = min(a, 0.995)
        best_k, best = 1, 0.0
        # a model draft that fell behind (plain steps) first catches up: one extra draft step, or an eager
        # forward over the unseen tokens (~4 compiled target steps for SmolLM2's int4 self-draft), which
        # is what makes retries after long plain stretches unprofitable when drafting barely pays
        extra = max(0.0, d.catch_up_cost(seq_len) - d.cost)
        a_max, ceiling = 0.995, 0.0
        for k in range(1, d.max_k + 1):
            cost = self._round_cost(k) + k * d.cost + extra
            gain = (1 - a ** (k + 1)) / (1 - a) / cost
            if gain > best * 1.0001:
                best_k, best = k, gain
            ceiling = max(ceiling, (1 - a_max ** (k + 1)) / (1 - a_max) / cost)
        if ceiling <= 1.0:
            return 0  # even near-certain acceptance would not pay for the round: never explore
        if best <= 1.0 and trials >= 2:
            # k = 0 (a plain step: one token per forward) is better. Only once there is evidence: the estimate
            # decays towards "unknown" while not drafting, so drafting is retried every ~20 steps.
            self._acceptance[key] = (0.95 * succ, 0.95 * trials)
            return 0
        return best_k

    # the generator -------------------------------------------------------------------------------
    def _run(self) -> Iterator[Step]:
        model, params, drafter = self.model, self.params, self.drafter
        device = model.model.embed_tokens.weight.device if hasattr(model.model.embed_tokens, "weight") \
            else next(model.parameters()).device
        L = len(self.prompt)
        max_len = max(L + self.max_new_tokens, self.cache_len or 0)
        with torch.inference_mode(False):  # normal tensors, as the plain loop makes them: same compiled graph
            cache = model.make_cache(1, max_len)
            positions = torch.arange(max_len, device=device).unsqueeze(0)  # (1, max_len), as decode.Batch has it
        generator = params.make_generator(device)
        need_hist = bool(params.repetition_penalty)
        seq = list(self.prompt)

        # prefill the target (in chunks), first token exactly as plain decoding picks it
        logits = None
        for a in range(0, L, self.prefill_chunk):
            b = min(L, a + self.prefill_chunk)
            logits = model(torch.tensor([seq[a:b]], device=device), cache=cache,
                           cache_position=torch.arange(a, b, device=device), logits_to_keep=1)
        self.target_forwards += 1
        if self.on_prefill_done is not None:
            self.on_prefill_done()
        last = logits[:, -1]
        hist0 = torch.tensor([seq], device=device) if need_hist else None
        if params.greedy:
            tok = int(process_logits(last, params, hist0).argmax(-1))
        else:
            tok = int(torch.multinomial(probabilities(last, params, hist0), 1, generator=generator))
        seq.append(tok)
        self.emitted += 1
        yield Step([tok], self._logprob(last[0], tok))
        drafter.start(self.prompt, max_len, params, self.prefill_chunk)

        self._acceptance: dict[Any, tuple[float, float]] = {}  # key -> decayed (accepted, observed) counts
        self._round_cost = self._plan_verification(model)
        while self.emitted < self.max_new_tokens:
            cap = self.max_new_tokens - self.emitted - 1  # the round emits up to k + 1 tokens
            draft: list[int] = []
            q = key = None
            if cap > 0:
                draft, q, key = drafter.propose(seq, lambda key: min(cap, self._choose_k(key, len(seq))), params,
                                                generator, need_hist)
            n = len(draft)
            pos = len(seq) - 1  # slot of the pending token
            inp = torch.tensor([[seq[-1], *draft]], device=device)
            slots = torch.arange(pos, pos + n + 1, device=device)
            if n == 0 and self.decode_fn is not None:
                # the (compiled) one-token step, with inputs shaped and strided as the plain loop's (one graph)
                out = self.decode_fn(model, inp, cache, torch.tensor([pos], device=device),
                                     positions[:, pos:pos + 1], None)  # (1, V)
            elif n and self._can_verify is not None and self._can_verify(model, n + 1, max_len, pos):
                out = self.decode_fn.verify(model, inp, cache, pos, positions)  # compiled, (n + 1, V)
            elif n and n + 1 < self._pad_rows and pos + self._pad_rows <= max_len:
                # eager float32: padded rows (their K/V land in later slots, overwritten before use) are cheaper
                out = model(pad_rows(inp, self._pad_rows), cache=cache, cache_position=torch.arange(pos, pos + self._pad_rows,
                                                                              device=device))[0, :n + 1]
            else:
                out = model(inp, cache=cache, cache_position=slots)[0]  # (n + 1, V)
            self.target_forwards += 1
            hist = self._histories(seq, draft).to(device) if need_hist else None
            if params.greedy:
                target = process_logits(out, params, hist).argmax(-1).tolist()
                m = 0
                while m < n and draft[m] == target[m]:
                    m += 1
                new = draft[:m] + [target[m]]
            else:
                new, m = self._verify_sampled(out, draft, q, hist, generator)
            if n:
                self.rounds += 1
                self.k_sum += n
                self.drafted += n
                self.accepted += m
                # acceptance observations: m successes, plus one failure if a draft token was rejected
                succ, trials = self._acceptance.get(key, (0.0, 0.0))
                self._acceptance[key] = (0.7 * succ + m, 0.7 * trials + m + (1 if m < n else 0))
            for j, t in enumerate(new):
                seq.append(t)
                self.emitted += 1
                yield Step([t], self._logprob(out[j], t))

    @staticmethod
    def _histories(seq: list[int], draft: list[int]) -> torch.Tensor:
        """Row i: the tokens before position i of the round (seq + draft[:i]), padded with seq[0]."""
        n = len(draft)
        rows = [seq + draft[:i] + [seq[0]] * (n - i) for i in range(n + 1)]
        return torch.tensor(rows)

    def _verify_sampled(self, out: torch.Tensor, draft: list[int], q: torch.Tensor | None,
                        hist: torch.Tensor | None, generator) -> tuple[list[int], int]:
        n = len(draft)
        p = probabilities(out, self.params, hist)  # (n+1, V)
        if n == 0:
            return [int(torch.multinomial(p[0], 1, generator=generator))], 0
        if q is not None:
            q = q.to(p.device)
        if q is not None and q.shape[-1] != p.shape[-1]:  # draft and target logit widths differ
            width = max(q.shape[-1], p.shape[-1])
            p = torch.nn.functional.pad(p, (0, width - p.shape[-1]))
            q = torch.nn.functional.pad(q, (0, width - q.shape[-1]))
        idx = torch.tensor(draft, device=p.device)
        rows = torch.arange(n, device=p.device)
        px = p[rows, idx]
        qx = q[rows, idx] if q is not None else torch.ones_like(px)
        u = torch.rand(n, generator=generator, device=p.device)
        ok = (u * qx < px).tolist()  # accept with probability min(1, p(x) / q(x))
        m = 0
        while m < n and ok[m]:
            m += 1
        if m == n:
            return draft + [int(torch.multinomial(p[n], 1, generator=generator))], m
        if q is not None:
            residual = (p[m] - q[m]).clamp_(min=0)
        else:
            residual = p[m].clone()
            residual[draft[m]] = 0
        if float(residual.sum()) <= 0:  # only possible through rounding: p == q
            residual = p[m]
        return draft[:m] + [int(torch.multinomial(residual, 1, generator=generator))], m

    def _logprob(self, logits: torch.Tensor, token: int) -> list[float] | None:
        if not self.logprobs:
            return None
        return [float(torch.log_softmax(logits.float(), -1)[token])]


def speculative_steps(model: nn.Module, prompts: list[list[int]], *, drafter, num_draft_tokens: int | None = None,
                      **kwargs: Any) -> SpeculativeSteps:
    """`generate_steps`-compatible entry point (bind drafter/num_draft_tokens with a lambda or partial)."""
    return SpeculativeSteps(model, prompts, drafter=drafter, num_draft_tokens=num_draft_tokens, **kwargs)


# ------------------------------------------------------------------------------------------ draft= resolution
def check_num_draft_tokens(num_draft_tokens: Any) -> int | None:
    if num_draft_tokens is None:
        return None
    if not isinstance(num_draft_tokens, int) or isinstance(num_draft_tokens, bool) \
            or not 1 <= num_draft_tokens <= MAX_DRAFT_TOKENS:
        raise InvalidArgumentError(
            f"num_draft_tokens must be an integer in [1, {MAX_DRAFT_TOKENS}] (or None for adaptive), "
            f"got {num_draft_tokens!r}"
        )
    return num_draft_tokens


def check_same_vocabulary(target_lm, draft_lm) -> None:
    """Raise InvalidArgumentError unless the draft's tokenizer maps every id to the same token string."""
    ta, tb = target_lm.tokenizer, draft_lm.tokenizer
    if ta is tb:
        return
    na, nb = ta.vocab_size, tb.vocab_size
    if na != nb:
        raise InvalidArgumentError(
            f"the draft model's tokenizer has {nb} tokens but the target's has {na}: speculative decoding "
            "needs a draft with the same tokenizer/vocabulary"
        )
    va = ta.backend.get_vocab(with_added_tokens=True)
    vb = tb.backend.get_vocab(with_added_tokens=True)
    if va != vb:
        ia = {i: s for s, i in va.items()}
        ib = {i: s for s, i in vb.items()}
        diff = [i for i in sorted(set(ia) | set(ib)) if ia.get(i) != ib.get(i)]
        sample = ", ".join(f"id {i}: {ia.get(i)!r} vs {ib.get(i)!r}" for i in diff[:3])
        raise InvalidArgumentError(
            f"the draft model's vocabulary differs from the target's in {len(diff)} of {na} tokens "
            f"(target vs draft: {sample}): speculative decoding needs the same tokenizer"
        )
    if ta.eos_token_ids != tb.eos_token_ids or ta.bos_token_id != tb.bos_token_id:
        logger.info("draft and target tokenizers differ in special-token settings; ids are identical, continuing")


def _weight_bytes(model: nn.Module) -> int:
    seen: set[int] = set()
    total = 0
    for t in [*model.parameters(), *model.buffers()]:
        if t.device.type == "meta":
            continue
        key = t.untyped_storage().data_ptr()
        if key not in seen:
            seen.add(key)
            total += t.untyped_storage().nbytes()
    return total


def self_draft(lm, scheme: str):
    """The LanguageModel's own weights quantized to `scheme` ("int4" falls back to "int8"), built once.

    lm_head and the embedding stay in floating point (bfloat16 activations on CPU): on SmolLM2-135M that
    raised greedy acceptance on open-ended chat from ~0.90 to ~0.93 at about the same draft cost.
    When the target has a compiled decode step, the draft's step is compiled too (on first use).
    """
    cached = lm.__dict__.setdefault("_speculative_self_drafts", {})
    if scheme in cached:
        return cached[scheme]
    if getattr(lm, "quantization", None):
        raise InvalidArgumentError(
            f"draft='self-{scheme}': the target is already {lm.quantization}-quantized; use a smaller draft "
            "model or draft='prompt-lookup'"
        )
    try:
        from ..quantize import int4_backend, quantize_model
    except ImportError as exc:  # pragma: no cover - the quantize module ships with the package
        raise InvalidArgumentError(f"draft='self-{scheme}' needs leanformers.quantize ({exc})") from exc
    from ..lm import LanguageModel

    used = scheme
    if scheme == "int4" and int4_backend(lm.device, torch.bfloat16)[0] == "dequant" \
            and int4_backend(lm.device, lm.dtype)[0] == "dequant":
        logger.warning("draft='self-int4': no int4 kernel on %s (%s); drafting with int8 instead",
                       lm.device.type, int4_backend(lm.device, lm.dtype)[1])
        used = "int8"
    model = copy.deepcopy(lm.model)
    # the copy must not share a compiled-cache pool or other instance hooks with the target
    model.__dict__.pop("make_cache", None)
    try:
        model = quantize_model(model, used, include_lm_head=False) or model
    except (LeanformersError, NotImplementedError, RuntimeError) as exc:
        if used != "int4":
            raise
        logger.warning("draft='self-int4': int4 quantization failed (%s); drafting with int8 instead", exc)
        used = "int8"
        model = copy.deepcopy(lm.model)
        model.__dict__.pop("make_cache", None)
        model = quantize_model(model, used, include_lm_head=False) or model
    model.eval()
    huge = uses_huge_pages(lm.model)
    if huge:  # the deepcopy shares one copy of the target's mapping: repacking keeps only what the draft uses
        move_to_huge_pages(model)
    draft = LanguageModel(model, lm.tokenizer, lm.config, source=lm.source, files=lm.files,
                          generation_config=lm.generation_config)
    draft.quantization = used
    draft._self_draft_of = scheme
    target_fn = getattr(lm, "decode_fn", None)
    if getattr(target_fn, "is_compiled", False):
        from .compile import compile_decode

        draft.decode_fn = compile_decode(model, mode=getattr(target_fn, "mode", None), warmup=False, fuse=False,
                                        huge_pages=huge)
        draft.cache_bucket = lm.cache_bucket
    cached[scheme] = draft
    return draft


def make_drafter(lm, draft: Any):
    """A drafter for `LanguageModel.generate(draft=...)`: a LanguageModel or one of DRAFT_NAMES."""
    from ..lm import LanguageModel

    if isinstance(draft, str):
        if draft == "prompt-lookup":
            return PromptLookupDrafter()
        if draft in ("self-int4", "self-int8"):
            dlm = self_draft(lm, draft.removeprefix("self-"))
            name = f"{draft} ({dlm.quantization})" if dlm.quantization != draft.removeprefix("self-") else draft
            return _model_drafter(lm, dlm, name)
        raise InvalidArgumentError(
            f"unknown draft {draft!r}: pass a LanguageModel with the same tokenizer, or one of {', '.join(DRAFT_NAMES)}"
        )
    if isinstance(draft, LanguageModel):
        check_same_vocabulary(lm, draft)
        ref = draft.source.reference if getattr(draft, "source", None) else "model"
        return _model_drafter(lm, draft, f"model:{ref}")
    raise InvalidArgumentError(
        f"draft must be a LanguageModel or one of {', '.join(DRAFT_NAMES)}, got {type(draft).__name__}"
    )


def _step_time_estimate(lm, compiled: bool = False) -> float:
    """A fixed (never measured, so runs stay reproducible) model of one decode step's time on a CPU:
    reading the weights plus a per-layer overhead (small ops, attention, dispatch).
    Eager (fitted on SmolLM2-135M, one thread: float32 98 ms, int4 self-draft 26 ms, int8 49 ms, bfloat16
    72 ms): ~6.5 GB/s and ~0.5 ms per layer. Compiled CPU steps (SmolLM2-135M, 2 threads: float32 19.0 ms,
    bfloat16 11.5, int8 8.6, int4 self-draft 8.9): ~42 GB/s and ~0.2 ms per layer, so an int4 draft costs
    ~0.7 of a compiled bfloat16 step, not the ~0.45 that eager timings suggest."""
    key = "_speculative_step_estimate_compiled" if compiled else "_speculative_step_estimate"
    if key not in lm.__dict__:
        layers = getattr(lm.config, "num_hidden_layers", 1) or 1
        bandwidth, per_layer = (42e9, 0.2e-3) if compiled else (6.5e9, 0.5e-3)
        lm.__dict__[key] = _weight_bytes(lm.model) / bandwidth + layers * per_layer
    return lm.__dict__[key]


def _model_drafter(lm, dlm, name: str) -> ModelDrafter:
    # both steps compiled (a self-draft of a compiled target is compiled too): compare compiled step times
    compiled = getattr(lm.decode_fn, "is_compiled", False) and dlm.decode_fn is not None \
        and getattr(dlm.decode_fn, "failure", None) is None and lm.device.type == "cpu"
    cost = min(1.0, max(0.02, _step_time_estimate(dlm, compiled) / _step_time_estimate(lm, compiled)))
    chunk = 1.5 * _step_time_estimate(dlm) / _step_time_estimate(lm, compiled)  # an eager forward of the draft
    return ModelDrafter(dlm.model, name=name, cost=cost, decode_fn=dlm.decode_fn, cache_bucket=dlm.cache_bucket,
                        context_length=dlm.context_length, chunk_cost=max(cost, chunk))


def steps_factory(lm, draft: Any, num_draft_tokens: Any, n_prompts: int):
    """Validate draft= / num_draft_tokens= for a request and return a steps_factory for run_generation."""
    k = check_num_draft_tokens(num_draft_tokens)
    if n_prompts != 1:
        raise InvalidArgumentError(
            f"speculative decoding (draft=) takes one prompt at a time, got a batch of {n_prompts}"
        )
    drafter = make_drafter(lm, draft)

    def factory(model, prompts, **kwargs):
        return SpeculativeSteps(model, prompts, drafter=drafter, num_draft_tokens=k, **kwargs)

    return factory
