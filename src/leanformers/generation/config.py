"""GenerationConfig: every generation parameter, typed and validated once, where a request enters.

    cfg = GenerationConfig(max_new_tokens=64, temperature=0.7, top_p=0.9, seed=0)
    lm.generate("Once upon a time", cfg)               # or lm.generate(prompt, max_new_tokens=64, ...)
    lm.generate(prompt, cfg, stop=["\\n\\n"])           # keyword arguments override fields of cfg

Defaults: the model's `generation_config.json` where it has one (transformers' convention, see
`from_hf`), else `FALLBACK`: greedy, 256 new tokens and a repetition penalty of 1.1. Without the penalty,
greedy decoding sent the bundled 135M chat model into repetition loops on 6 of 10 ordinary questions, with
it on none (bench/RESULTS.md, "Generation defaults"); Ollama uses the same 1.1.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any, Sequence, TypedDict

from ..errors import InvalidArgumentError
from .sampling import SamplingParams

#: draft= names accepted by generate() and the CLI's --draft (the one table of them)
DRAFT_NAMES = ("prompt-lookup", "self-int4", "self-int8")
MAX_DRAFT_TOKENS = 64


class GenerationKwargs(TypedDict, total=False):
    """The keyword arguments generate()/stream()/chat() take: the fields of GenerationConfig."""

    max_new_tokens: int
    temperature: float
    top_k: int | None
    top_p: float | None
    min_p: float | None
    repetition_penalty: float | None
    seed: int | None
    stop: str | Sequence[str] | None
    ignore_eos: bool
    logprobs: bool
    truncate: bool
    draft: Any
    num_draft_tokens: int | None


@dataclass(frozen=True)
class GenerationConfig:
    """How to generate. Sampling order: repetition_penalty -> temperature (0 = greedy) -> top_k -> top_p -> min_p.

    stop: strings that end generation (not included in the text). ignore_eos: keep going past EOS.
    logprobs: record log p(token) under the model's raw distribution. truncate: keep the end of a prompt
    that does not fit the context window instead of raising. draft: speculative decoding, one of
    DRAFT_NAMES or another LanguageModel with the same tokenizer; num_draft_tokens: fixed k (default:
    adaptive). Speculative output is the same as without it (greedy: same tokens; sampling: same distribution).
    """

    max_new_tokens: int = 256
    temperature: float = 0.0
    top_k: int | None = None
    top_p: float | None = None
    min_p: float | None = None
    repetition_penalty: float | None = None
    seed: int | None = None
    stop: tuple[str, ...] = field(default=())
    ignore_eos: bool = False
    logprobs: bool = False
    truncate: bool = False
    draft: Any = None
    num_draft_tokens: int | None = None

    def __post_init__(self) -> None:
        n = self.max_new_tokens
        if not isinstance(n, int) or isinstance(n, bool) or n <= 0:
            raise InvalidArgumentError(f"max_new_tokens must be a positive integer, got {n!r}")
        stop = self.stop
        if isinstance(stop, str):
            stop = (stop,)
        if stop is None:
            stop = ()
        if not isinstance(stop, (list, tuple)) or not all(isinstance(s, str) for s in stop):
            raise InvalidArgumentError(f"stop must be a string or a list of strings, got {self.stop!r}")
        object.__setattr__(self, "stop", tuple(s for s in stop if s))
        for name in ("ignore_eos", "logprobs", "truncate"):
            if not isinstance(getattr(self, name), bool):
                raise InvalidArgumentError(f"{name} must be True or False, got {getattr(self, name)!r}")
        if self.seed is not None and (not isinstance(self.seed, int) or isinstance(self.seed, bool)):
            raise InvalidArgumentError(f"seed must be an integer, got {self.seed!r}")
        self.sampling  # validates the sampling fields
        if isinstance(self.draft, str) and self.draft not in DRAFT_NAMES:
            raise InvalidArgumentError(
                f"unknown draft {self.draft!r}: pass a LanguageModel with the same tokenizer, or one of "
                f"{', '.join(DRAFT_NAMES)}")
        k = self.num_draft_tokens
        if k is not None:
            if self.draft is None:
                raise InvalidArgumentError(f"num_draft_tokens needs draft= (a draft model or one of {', '.join(DRAFT_NAMES)})")
            if not isinstance(k, int) or isinstance(k, bool) or not 1 <= k <= MAX_DRAFT_TOKENS:
                raise InvalidArgumentError(
                    f"num_draft_tokens must be an integer in [1, {MAX_DRAFT_TOKENS}] (or None for adaptive), got {k!r}")

    @property
    def sampling(self) -> SamplingParams:
        return SamplingParams(temperature=self.temperature, top_k=self.top_k, top_p=self.top_p, min_p=self.min_p,
                              repetition_penalty=self.repetition_penalty, seed=self.seed)

    def replace(self, **changes: Any) -> "GenerationConfig":
        """A copy with some fields changed (validated again); unknown names are refused."""
        names = {f.name for f in dataclasses.fields(self)}
        unknown = sorted(set(changes) - names)
        if unknown:
            raise InvalidArgumentError(f"unknown generation argument(s) {', '.join(unknown)}; "
                                       f"valid: {', '.join(sorted(names))}")
        return dataclasses.replace(self, **changes)

    @classmethod
    def from_hf(cls, data: dict[str, Any], base: "GenerationConfig | None" = None) -> "GenerationConfig":
        """Defaults from a generation_config.json dict, as transformers reads it: do_sample with temperature,
        top_k, top_p, min_p; repetition_penalty; max_new_tokens. Values it cannot take are ignored."""
        base = base or cls()
        changes: dict[str, Any] = {}
        if data.get("do_sample") is True:
            t = data.get("temperature", 1.0)
            changes["temperature"] = float(t) if _number(t) and t > 0 else 1.0
            top_k = data.get("top_k", 50)  # transformers' default top_k when sampling
            if isinstance(top_k, int) and not isinstance(top_k, bool) and top_k > 0:
                changes["top_k"] = top_k
            for name in ("top_p", "min_p"):
                v = data.get(name)
                if _number(v) and 0 < v < 1:
                    changes[name] = float(v)
        rp = data.get("repetition_penalty")
        if _number(rp) and rp > 0 and rp != 1.0:
            changes["repetition_penalty"] = float(rp)
        n = data.get("max_new_tokens")
        if isinstance(n, int) and not isinstance(n, bool) and n > 0:
            changes["max_new_tokens"] = n
        return dataclasses.replace(base, **changes)


#: the defaults of a model that has no generation_config.json (e.g. a GGUF file)
FALLBACK = GenerationConfig(repetition_penalty=1.1)


def _number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
