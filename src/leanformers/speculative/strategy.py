"""Speculative decoding as a strategy of the one decode loop: a drafter proposes k tokens, the target checks
them in ONE forward.

    lm.generate(prompt, draft=small_lm)            # another LanguageModel with the same tokenizer
    lm.generate(prompt, draft="self-int4")         # the target itself, int4-quantized (built once, cached)
    lm.generate(prompt, draft="prompt-lookup")     # copy what followed the last n-gram earlier in the text
    lm.generate(prompt, draft=..., num_draft_tokens=5)   # fixed k (default: adaptive)

`SpeculativeDecoding.advance` is one round of `generation.decode.generate_tokens`; prefill, the cache,
stopping, streaming and the token budget are the loop's. One round, with `pending` the last token of the
sequence (not yet in the target's cache) at position s:

    draft:   d1 .. dk                                      (k draft-model steps, or an n-gram lookup)
    target:  forward([pending, d1 .. dk], positions s .. s+k)  -> k+1 next-token distributions p0 .. pk
    accept:  d1 .. dm (the first m that pass), then one more token from the target:
             the correction at the first rejection, or the bonus token from pk when all k passed.

Rolling back is free: the caches are static and position-addressed; rejected positions are overwritten
by the next round and, until then, masked (a query only attends to positions up to its own).

Acceptance rule (Leviathan et al. 2023; Chen et al. 2023), with p the target's and q the drafter's
distribution AFTER the same SamplingParams processing: accept x ~ q with probability min(1, p(x)/q(x)); at
the first rejection draw from normalize(max(0, p - q)); when all k pass, draw the bonus token from p. The
emitted tokens are then distributed exactly as the target's own samples. Greedy decoding reduces to
"accept while the draft equals the target's argmax", so the output equals plain greedy decoding up to float
rounding (k+1 positions in one matmul can round differently from k+1 single steps).

Adaptive k (default): a decayed estimate a of the per-token acceptance rate picks the k maximizing the
expected tokens per round, (1 - a^(k+1)) / (1 - a), divided by the round's cost in target steps (k draft
steps plus the verification, speculative/costs.py). k = 0 (a plain step) wins when drafting cannot pay;
the estimate then decays back towards "unknown", so drafting is retried now and then (never when even
near-certain acceptance could not pay). Prompt lookup keeps one estimate per match length n.
"""

from __future__ import annotations

from typing import Any, Callable

import torch

from ..generation.decode import DecodeContext
from ..generation.sampling import process_logits
from . import costs


def pad_rows(tokens: torch.Tensor, rows: int) -> torch.Tensor:
    """tokens (1, n) padded to (1, rows) by repeating the last one (their K/V land in positions that later
    rounds overwrite before attending to them)."""
    n = tokens.shape[1]
    return tokens if n >= rows else torch.cat([tokens, tokens[:, -1:].expand(1, rows - n)], dim=1)


class SpeculativeDecoding:
    """The strategy of one speculative generation (one prompt); `.stats` holds its counters."""

    def __init__(self, drafter: Any, *, num_draft_tokens: int | None = None):
        self.drafter = drafter
        self.fixed_k = num_draft_tokens
        self.drafted = self.accepted = self.rounds = self.target_forwards = self.emitted = self.k_sum = 0
        self._started = False
        self._acceptance: dict[Any, tuple[float, float]] = {}  # key -> decayed (accepted, observed) counts

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
            "tokens_per_target_forward": self.emitted / self.target_forwards if self.target_forwards else 0.0,
        }

    # ------------------------------------------------------------------------------ the round
    def advance(self, ctx: DecodeContext, budget: int) -> list[tuple[list[int], torch.Tensor]]:
        if len(ctx.rows) != 1:
            raise ValueError("speculative decoding takes one sequence")
        if not self._started:
            self._start(ctx)
        seq, step, sampler = ctx.rows[0], ctx.step, ctx.sampler
        need_hist = sampler.params.penalized
        cap = budget - 1  # the round emits up to k + 1 tokens
        draft: list[int] = []
        q = key = None
        if cap > 0:
            draft, q, key = self.drafter.propose(seq, lambda key: min(cap, self._choose_k(key, len(seq))),
                                                 sampler, need_hist)
        n = len(draft)
        pos = len(seq) - 1  # position of the pending token
        dev = ctx.device
        if n == 0:
            tokens, positions = ctx.pending()
            out = step(tokens, positions, ctx.cache)  # (1, V): the same step as plain decoding
        else:
            inp = torch.tensor([[seq[-1], *draft]], device=dev)
            rows = n + 1
            if not step.can_verify(rows, ctx.max_len, pos) and rows < self._pad_to \
                    and pos + self._pad_to <= ctx.max_len:
                inp, rows = pad_rows(inp, self._pad_to), self._pad_to
            positions = torch.arange(pos, pos + rows, device=dev).unsqueeze(0)
            out = step.verify(inp, positions, ctx.cache)[:n + 1]  # (n + 1, V)
        self.target_forwards += 1
        hist = self._histories(seq, draft).to(dev) if need_hist else None
        if sampler.params.greedy:
            target = process_logits(out, sampler.params, hist).argmax(-1).tolist()
            m = 0
            while m < n and draft[m] == target[m]:
                m += 1
            new = draft[:m] + [target[m]]
        else:
            new, m = self._verify_sampled(out, draft, q, hist, sampler)
        if n:
            self.rounds += 1
            self.k_sum += n
            self.drafted += n
            self.accepted += m
            # acceptance observations: m successes, plus one failure if a draft token was rejected
            succ, trials = self._acceptance.get(key, (0.0, 0.0))
            self._acceptance[key] = (0.7 * succ + m, 0.7 * trials + m + (1 if m < n else 0))
        self.emitted += len(new)
        return [([t], out[j:j + 1]) for j, t in enumerate(new)]

    def _start(self, ctx: DecodeContext) -> None:
        self._started = True
        self.target_forwards = self.emitted = 1  # the prefill: the forward that produced the first token
        self.drafter.start(ctx.rows[0][:-1], ctx.max_len)
        self._round_cost = self._verification_cost(ctx)

    def close(self) -> None:
        self.drafter.close()

    # ------------------------------------------------------------------------------ costs and k
    def _verification_cost(self, ctx: DecodeContext) -> Callable[[int], float]:
        """k -> time of the verification forward over k + 1 tokens, in one-token steps; sets `_pad_to`
        (eager float32 on CPU: short verifications padded to the row count that is fastest there)."""
        step, model = ctx.step, ctx.model
        kind, device = step.weight_kind, model.device
        fixed, per_token = costs.eager_verify_cost(kind, device, compiled_steps=step.is_compiled)
        self._pad_to = 0
        if not step.is_compiled and kind == "float32" and device.type == "cpu":
            self._pad_to, table = costs.eager_float32_padding()
            last = max(table)
            return lambda k: table.get(max(k + 1, self._pad_to), table[last] + (k + 1 - last) * per_token)
        rows = step.verify_rows if step.is_compiled else 0
        if not rows:
            return lambda k: 1 + fixed + k * per_token
        padded = costs.compiled_verify_cost(kind, rows)  # any k + 1 <= rows costs the same (one static shape)
        return lambda k: padded if k + 1 <= rows else 1 + fixed + k * per_token

    def _choose_k(self, key: Any, seq_len: int) -> int:
        if self.fixed_k is not None:
            return self.fixed_k
        d = self.drafter
        succ, trials = self._acceptance.get(key, (0.0, 0.0))
        a = min((succ + 1.0) / (trials + 1.5), 0.995)  # prior: acceptance ~ 2/3 until observations say otherwise
        best_k, best = 1, 0.0
        # a model draft that fell behind (plain steps) first catches up: one extra draft step, or an eager
        # forward over the unseen tokens, which makes retries after long plain stretches costly
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
            # k = 0 (a plain step) is better. Only once there is evidence: the estimate decays towards
            # "unknown" while not drafting, so drafting is retried every ~20 steps.
            self._acceptance[key] = (0.95 * succ, 0.95 * trials)
            return 0
        return best_k

    # ------------------------------------------------------------------------------ acceptance
    @staticmethod
    def _histories(seq: list[int], draft: list[int]) -> torch.Tensor:
        """Row i: the tokens before position i of the round (seq + draft[:i]), padded with seq[0]."""
        n = len(draft)
        return torch.tensor([seq + draft[:i] + [seq[0]] * (n - i) for i in range(n + 1)])

    @staticmethod
    def _verify_sampled(out: torch.Tensor, draft: list[int], q: torch.Tensor | None,
                        hist: torch.Tensor | None, sampler) -> tuple[list[int], int]:
        n = len(draft)
        p = sampler.probabilities(out, hist)  # (n+1, V)
        if n == 0:
            return [sampler.draw(p[0])], 0
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
        u = sampler.uniform(n, p.device)
        ok = (u * qx < px).tolist()  # accept with probability min(1, p(x) / q(x))
        m = 0
        while m < n and ok[m]:
            m += 1
        if m == n:
            return draft + [sampler.draw(p[n])], m
        if q is not None:
            residual = (p[m] - q[m]).clamp_(min=0)
        else:
            residual = p[m].clone()
            residual[draft[m]] = 0
        if float(residual.sum()) <= 0:  # only possible through rounding: p == q
            residual = p[m]
        return draft[:m] + [sampler.draw(residual)], m
