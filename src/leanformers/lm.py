"""LanguageModel: a model, its tokenizer and config, with generate / stream / chat."""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any, Iterator, Sequence

import torch
from torch import nn

from .config import ModelConfig
from .errors import InvalidArgumentError
from .generation.run import GenerationResult, fit_prompt, run_generation
from .generation.sampling import SamplingParams
from .hub import ResolvedModel, resolve
from .loading import build_model, default_dtype, parse_dtype, read_checkpoint, read_generation_config
from .tokenizer import Tokenizer, load_tokenizer_from_dir, load_tokenizer_from_gguf


class LanguageModel:
    """A loaded causal LM: `.model` (logits = model(input_ids)), `.tokenizer`, `.config`."""

    def __init__(
        self,
        model: nn.Module,
        tokenizer: Tokenizer,
        config: ModelConfig,
        *,
        source: ResolvedModel | None = None,
        files: list[Path] | None = None,
        generation_config: dict[str, Any] | None = None,
    ):
        self.model = model
        self.tokenizer = tokenizer
        self.config = config
        self.source = source
        self.files = files or []
        self.generation_config = generation_config or {}
        # Speed hooks, set by compile/quantize: a replacement one-token step, and the static cache
        # size rounded up to a multiple of `cache_bucket` so a compiled step is reused across requests.
        self.decode_fn = None
        self.cache_bucket: int | None = None

    @property
    def device(self) -> torch.device:
        return self.model.model.norm.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.model.model.norm.weight.dtype

    @property
    def eos_token_ids(self) -> list[int]:
        """Every id that ends generation: tokenizer, generation_config.json and config, deduplicated."""
        ids: list[int] = []
        gen_eos = self.generation_config.get("eos_token_id")
        gen_eos = gen_eos if isinstance(gen_eos, list) else ([gen_eos] if gen_eos is not None else [])
        for i in [*self.tokenizer.eos_token_ids, *gen_eos, *self.config.eos_token_ids]:
            if isinstance(i, int) and i not in ids:
                ids.append(i)
        return ids

    @property
    def context_length(self) -> int:
        return self.config.max_position_embeddings

    # ------------------------------------------------------------------------------ generation
    def generate(
        self,
        prompt: str | Sequence[int] | Sequence[str] | Sequence[Sequence[int]],
        *,
        max_new_tokens: int = 128,
        temperature: float = 0.0,
        top_k: int | None = None,
        top_p: float | None = None,
        min_p: float | None = None,
        repetition_penalty: float | None = None,
        seed: int | None = None,
        stop: str | Sequence[str] | None = None,
        ignore_eos: bool = False,
        logprobs: bool = False,
        truncate: bool = False,
        add_special_tokens: bool = True,
    ) -> GenerationResult | list[GenerationResult]:
        """Generate a continuation (greedy by default).

        prompt: a string or token ids -> one GenerationResult; a list of strings or of id lists -> a list.
        Sampling order: repetition_penalty, temperature (0 = greedy), top_k, top_p, min_p.
        stop: strings that end generation (not included in the text). truncate: keep the end of a
        prompt that does not fit the context window instead of raising.
        """
        prompts, single = self._prompts(prompt, add_special_tokens)
        results: list[GenerationResult] = []
        for _ in self._run(prompts, results, max_new_tokens, temperature, top_k, top_p, min_p,
                           repetition_penalty, seed, stop, ignore_eos, logprobs, truncate):
            pass
        return results[0] if single else results

    def stream(self, prompt: str | Sequence[int], **kwargs: Any) -> "TextStream":
        """Like generate() for one prompt, but yields text pieces as they are final; `.result` at the end."""
        prompts, single = self._prompts(prompt, kwargs.pop("add_special_tokens", True))
        if not single:
            raise InvalidArgumentError("stream() takes one prompt; use generate() for batches")
        return TextStream(self, prompts, kwargs)

    def chat(
        self,
        messages: list[dict[str, Any]],
        *,
        stream: bool = False,
        **kwargs: Any,
    ) -> GenerationResult | "TextStream":
        """Answer a conversation: render the chat template (with the generation prompt) and generate."""
        text = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True)
        ids = self.tokenizer.encode(text, add_special_tokens=False)
        if stream:
            return self.stream(ids, **kwargs)
        return self.generate(ids, **kwargs)

    def _prompts(self, prompt: Any, add_special_tokens: bool) -> tuple[list[list[int]], bool]:
        def encode(p: Any) -> list[int]:
            if isinstance(p, str):
                if not p:
                    raise InvalidArgumentError("the prompt is empty")
                return self.tokenizer.encode(p, add_special_tokens=add_special_tokens)
            if isinstance(p, torch.Tensor):
                p = p.tolist()
            ids = list(p)
            if not all(isinstance(i, int) and not isinstance(i, bool) for i in ids):
                raise InvalidArgumentError("a prompt must be a string or a list of token ids")
            bad = [i for i in ids if not 0 <= i < self.config.vocab_size]
            if bad:
                raise InvalidArgumentError(f"token ids out of range [0, {self.config.vocab_size}): {bad[:5]}")
            return ids

        if isinstance(prompt, torch.Tensor):
            prompt = prompt.tolist()
        if isinstance(prompt, str) or (isinstance(prompt, Sequence) and prompt and not isinstance(prompt[0], (str, list, tuple))):
            return [encode(prompt)], True
        if isinstance(prompt, Sequence) and prompt:
            return [encode(p) for p in prompt], False
        raise InvalidArgumentError("the prompt is empty")

    def _run(self, prompts, results, max_new_tokens=128, temperature=0.0, top_k=None, top_p=None, min_p=None,
             repetition_penalty=None, seed=None, stop=None, ignore_eos=False, logprobs=False, truncate=False):
        params = SamplingParams(temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p,
                                repetition_penalty=repetition_penalty, seed=seed)
        fitted = [fit_prompt(p, max_new_tokens, self.context_length, truncate=truncate) for p in prompts]
        prompts = [p for p, _ in fitted]
        budget = min(b for _, b in fitted)
        if isinstance(stop, str):
            stop = [stop]
        return run_generation(
            self.model, self.tokenizer, prompts, max_new_tokens=budget, params=params,
            eos_ids=self.eos_token_ids, stop=stop or (), ignore_eos=ignore_eos, logprobs=logprobs,
            results=results, decode_fn=self.decode_fn, cache_len=self._cache_len(prompts, budget),
        )

    def _cache_len(self, prompts: list[list[int]], max_new_tokens: int) -> int | None:
        if not self.cache_bucket:
            return None
        need = max(len(p) for p in prompts) + max_new_tokens
        size = -(-need // self.cache_bucket) * self.cache_bucket
        return min(size, max(need, self.context_length))

    def __repr__(self) -> str:
        ref = self.source.reference if self.source else "?"
        return f"LanguageModel({ref!r}, {self.config.model_type}, {self.dtype}, {self.device})"


def load(
    reference: str | os.PathLike | None = None,
    *,
    dtype: str | torch.dtype | None = None,
    device: str | torch.device = "cpu",
    revision: str | None = None,
    offline: bool | None = None,
    progress: bool | None = None,
) -> LanguageModel:
    """Load a model and its tokenizer from a reference: an alias, an HF directory, `org/name[@rev]` or a .gguf file.

    dtype: float32, bfloat16 or float16; default: the checkpoint's (bfloat16 instead of float16 on CPU,
    float32 for GGUF). progress: show progress bars (default: when stderr is a terminal).
    """
    if progress is None:
        progress = sys.stderr.isatty()
    device = torch.device(device)
    wanted = parse_dtype(dtype)
    resolved = resolve(reference, revision=revision, offline=offline, progress=progress)
    config, tensors, files, gguf = read_checkpoint(resolved)
    if gguf is not None:
        tokenizer = load_tokenizer_from_gguf(gguf)
        generation_config: dict[str, Any] = {}
    else:
        tokenizer = load_tokenizer_from_dir(resolved.path)
        generation_config = read_generation_config(resolved.path)
    dtype_ = wanted or default_dtype(None if gguf is not None else config.torch_dtype, device)
    model = build_model(config, tensors, dtype=dtype_, device=device, source=str(resolved.path), progress=progress)
    return LanguageModel(
        model, tokenizer, config, source=resolved, files=files, generation_config=generation_config
    )


class TextStream:
    """Iterator over the text pieces of one generation; `.result` holds the GenerationResult afterwards."""

    def __init__(self, lm: LanguageModel, prompts: list[list[int]], kwargs: dict[str, Any]):
        self._results: list[GenerationResult] = []
        self._pieces = lm._run(prompts, self._results, **kwargs)
        self.result: GenerationResult | None = None

    def __iter__(self) -> Iterator[str]:
        yield from self._pieces
        self.result = self._results[0]
