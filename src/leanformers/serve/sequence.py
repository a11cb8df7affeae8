"""One generated sequence of the serving engine (a choice of a request): its tokens, sampling and text.

Token choice reuses the library's samplers (generation/sampling.py: `process_logits`, the documented order
repetition penalty -> temperature -> top-k -> top-p -> min-p) and its text assembly (generation/text.py:
stop strings, UTF-8-safe pieces). Before them come the OpenAI adjustments of the raw logits, in the order
vLLM and OpenAI document: `logit_bias` added, then presence and frequency penalties over the tokens
generated so far (logit -= presence * [count > 0] + frequency * count).

Rows with equal sampling parameters are processed as one batch (one sort for top-p), but every row draws
with its own random generator, seeded per request: a seeded request gets the same draws whatever else runs
beside it, and the same tokens as `lm.generate(prompt, seed=...)` with the same parameters.
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence as Seq

import torch

from ..generation.sampling import Sampler, SamplingParams, process_logits
from ..generation.text import TextAssembler
from .grammar import allowed_tokens

MAX_TOP_LOGPROBS = 20


@dataclass(frozen=True)
class SequenceOptions:
    """How every choice of one request is generated (validated by the HTTP layer, see schemas.py).

    max_tokens: the most new tokens (capped by the context: prompt + new <= the engine's max_model_len).
    logprobs: None = off; 0 = the chosen token's log-probability; k = also the k most likely tokens.
    Log-probabilities are of the model's raw distribution (before penalties and temperature), as the
    library's GenerationResult.logprobs are.
    """

    max_tokens: int
    sampling: SamplingParams = SamplingParams()
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logit_bias: dict[int, float] = field(default_factory=dict)
    stop: tuple[str, ...] = ()
    ignore_eos: bool = False
    logprobs: int | None = None
    grammar: str | None = None  # an llguidance grammar (response_format json_object / json_schema)


@dataclass
class TokenLogprob:
    """log p of a generated token, and the most likely alternatives (token id, log p), best first."""

    token_id: int
    logprob: float
    top: list[tuple[int, float]]


@dataclass
class Output:
    """What one engine step produced for one choice of a request (delivered to the request's callback).

    text: newly final text (may be '' while a stop string or a UTF-8 character is incomplete).
    finish_reason: None while generating; then "stop" (EOS or stop string), "length", or "error" (`error`
    says why; the engine keeps serving the others).
    """

    index: int
    text: str
    token_ids: list[int]
    logprobs: list[TokenLogprob] | None = None
    finish_reason: str | None = None
    error: str | None = None


class Sequence:
    """One choice in flight: prompt + generated ids, its KV slot, its sampler, penalties and text."""

    def __init__(self, handle: Any, index: int, prompt: list[int], options: SequenceOptions, *, seed_offset: int,
                 tokenizer: Any, eos_ids: Seq[int], max_len: int, vocab_size: int, device: torch.device,
                 grammars: Any = None):
        self.handle, self.index, self.options = handle, index, options
        self.ids = list(prompt)
        self.n_prompt = len(prompt)
        self.cached = 0  # prompt tokens whose K/V are in the slot (prefill progress)
        self.slot: int | None = None
        self.budget = min(options.max_tokens, max_len - len(prompt))
        self.generated = 0
        self.finished = False
        params = options.sampling
        if params.seed is not None and not params.greedy:
            params = dataclasses.replace(params, seed=(params.seed + seed_offset) % 2**64)
        self.params = params
        self.sampler = Sampler(params, device)
        self.group = dataclasses.replace(params, seed=None)  # rows with equal groups are processed together
        self.eos = frozenset() if options.ignore_eos else frozenset(eos_ids)
        self.assembler = TextAssembler(tokenizer, options.stop)
        self.counts: torch.Tensor | None = None  # generated-token counts, for presence/frequency penalties
        if options.presence_penalty or options.frequency_penalty:
            self.counts = torch.zeros(vocab_size, device=device)
        self.t_last = 0.0  # when the last token was emitted (inter-token latency)
        self.vocab_size = vocab_size
        self.matcher = grammars.matcher(options.grammar) if options.grammar is not None else None

    @property
    def prefilling(self) -> bool:
        return self.cached < self.n_prompt

    @property
    def adjusts_logits(self) -> bool:
        return self.counts is not None or bool(self.options.logit_bias) or self.matcher is not None

    def adjust(self, logits: torch.Tensor) -> torch.Tensor:
        """The OpenAI adjustments of this row's raw logits (V,), in place: logit_bias, presence, frequency;
        then the grammar's mask (tokens that cannot continue the JSON get -inf)."""
        o = self.options
        if o.logit_bias:
            ids = torch.tensor(list(o.logit_bias), device=logits.device)
            logits.index_add_(0, ids, torch.tensor(list(o.logit_bias.values()), device=logits.device))
        if self.counts is not None:
            logits -= o.presence_penalty * (self.counts > 0) + o.frequency_penalty * self.counts
        if self.matcher is not None:
            logits.masked_fill_(~allowed_tokens(self.matcher, self.vocab_size), float("-inf"))
        return logits

    def accept(self, token: int, logprob: TokenLogprob | None, now: float) -> Output:
        """Append a chosen token; the Output for it (finished when EOS, a stop string or the budget ends it)."""
        self.ids.append(token)
        self.generated += 1
        self.t_last = now
        if self.counts is not None:
            self.counts[token] += 1
        finish = error = None
        if token in self.eos:
            text, finish = "", "stop"
        elif self.matcher is not None and not self.matcher.consume_token(token) or \
                self.matcher is not None and self.matcher.is_error():
            text, finish, error = "", "error", f"constrained decoding failed: {self.matcher.get_error()}"
        else:
            text = self.assembler.push(token)
            if self.assembler.stopped:
                finish = "stop"
        if finish is None and self.generated >= self.budget:
            finish = "length"
        if finish is not None:
            text += self.assembler.finish()
            self.finished = True
        return Output(self.index, text, [token], [logprob] if logprob is not None else None, finish, error)


def choose_tokens(seqs: list[Sequence], logits: torch.Tensor) -> list[tuple[int, TokenLogprob | None]]:
    """The next token of each sequence from its row of raw logits (len(seqs), V), with its logprobs if asked."""
    raw = logits.float()
    adjusted = raw
    if any(s.adjusts_logits for s in seqs):
        adjusted = raw.clone()
        for r, s in enumerate(seqs):
            if s.adjusts_logits:
                s.adjust(adjusted[r])
    tokens: list[int] = [0] * len(seqs)
    groups: dict[SamplingParams, list[int]] = {}
    for r, s in enumerate(seqs):
        groups.setdefault(s.group, []).append(r)
    for params, rows in groups.items():
        block = adjusted if len(rows) == len(seqs) else adjusted[rows]
        history = _history([seqs[r] for r in rows], block.device) if params.penalized else None
        processed = process_logits(block, params, history)
        if params.greedy:
            for r, t in zip(rows, processed.argmax(-1).tolist()):
                tokens[r] = t
        else:
            probs = processed.softmax(-1)
            for j, r in enumerate(rows):  # one draw per row from the row's own generator
                tokens[r] = int(torch.multinomial(probs[j : j + 1], 1, generator=seqs[r].sampler.generator))
    out: list[tuple[int, TokenLogprob | None]] = [(t, None) for t in tokens]
    want = [r for r, s in enumerate(seqs) if s.options.logprobs is not None]
    if want:
        logp = torch.log_softmax(raw[want], -1)
        chosen = logp.gather(-1, torch.tensor([[tokens[r]] for r in want], device=logp.device)).squeeze(-1).tolist()
        k = max(seqs[r].options.logprobs or 0 for r in want)
        top_v, top_i = (logp.topk(k, -1) if k else (None, None))
        for j, r in enumerate(want):
            kr = seqs[r].options.logprobs or 0
            top = list(zip(top_i[j, :kr].tolist(), top_v[j, :kr].tolist())) if kr else []
            out[r] = (tokens[r], TokenLogprob(tokens[r], chosen[j], top))
    return out


def _history(seqs: list[Sequence], device: torch.device) -> torch.Tensor:
    """(rows, N) prompt + generated ids of each row, short rows padded with their first id (a no-op for the
    repetition penalty, which looks at the set of ids)."""
    n = max(len(s.ids) for s in seqs)
    return torch.tensor([s.ids + [s.ids[0]] * (n - len(s.ids)) for s in seqs], device=device)


OutputCallback = Callable[[list[Output]], None]


def now() -> float:
    return time.perf_counter()
