"""LanguageModel: a model, its tokenizer and config, with generate / stream / chat."""

from __future__ import annotations

import logging
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
from .loading import DTYPE_NAMES, build_model, default_dtype, parse_dtype, read_checkpoint, read_generation_config
from .memory import move_to_huge_pages, uses_huge_pages
from .tokenizer import Tokenizer, load_tokenizer_from_dir, load_tokenizer_from_gguf

logger = logging.getLogger(__name__)


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
        self.quantization: str | None = None  # "int8" / "int4" once quantized
        self.huge_pages: bool | None = None  # CPU weights into huge pages: at compile() (None), at load (True), never

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
        draft: Any = None,
        num_draft_tokens: int | None = None,
    ) -> GenerationResult | list[GenerationResult]:
        """Generate a continuation (greedy by default).

        prompt: a string or token ids -> one GenerationResult; a list of strings or of id lists -> a list.
        Sampling order: repetition_penalty, temperature (0 = greedy), top_k, top_p, min_p.
        stop: strings that end generation (not included in the text). truncate: keep the end of a
        prompt that does not fit the context window instead of raising.
        draft: speculative decoding (one prompt at a time): a LanguageModel with the same tokenizer,
        "self-int4" (this model int4-quantized), or "prompt-lookup"; num_draft_tokens: fixed k
        (default: adaptive). Output as without it (greedy: same tokens; sampling: same distribution).
        """
        prompts, single = self._prompts(prompt, add_special_tokens)
        results: list[GenerationResult] = []
        for _ in self._run(prompts, results, max_new_tokens, temperature, top_k, top_p, min_p,
                           repetition_penalty, seed, stop, ignore_eos, logprobs, truncate,
                           draft=draft, num_draft_tokens=num_draft_tokens):
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
             repetition_penalty=None, seed=None, stop=None, ignore_eos=False, logprobs=False, truncate=False,
             draft=None, num_draft_tokens=None):
        params = SamplingParams(temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p,
                                repetition_penalty=repetition_penalty, seed=seed)
        fitted = [fit_prompt(p, max_new_tokens, self.context_length, truncate=truncate) for p in prompts]
        prompts = [p for p, _ in fitted]
        budget = min(b for _, b in fitted)
        if isinstance(stop, str):
            stop = [stop]
        steps_factory = None
        if draft is not None:
            from .generation.speculative import steps_factory as speculative_factory

            steps_factory = speculative_factory(self, draft, num_draft_tokens, len(prompts))
        elif num_draft_tokens is not None:
            raise InvalidArgumentError("num_draft_tokens needs draft= (a draft model, 'self-int4' or 'prompt-lookup')")
        return run_generation(
            self.model, self.tokenizer, prompts, max_new_tokens=budget, params=params,
            eos_ids=self.eos_token_ids, stop=stop or (), ignore_eos=ignore_eos, logprobs=logprobs,
            results=results, decode_fn=self.decode_fn, cache_len=self._cache_len(prompts, budget),
            steps_factory=steps_factory,
        )

    def _cache_len(self, prompts: list[list[int]], max_new_tokens: int) -> int | None:
        if not self.cache_bucket:
            return None
        need = max(len(p) for p in prompts) + max_new_tokens
        size = -(-need // self.cache_bucket) * self.cache_bucket
        return min(size, max(need, self.context_length))

    def quantize(
        self, scheme: str, group_size: int = 32, *, include_lm_head: bool | str = "int8",
        dtype: str | torch.dtype | None = None,
    ) -> "LanguageModel":
        """Weight-only quantization in place ("int8" or "int4"), see leanformers.quantize.quantize_model.

        Call compile() (if wanted) after: a compiled step of the unquantized model is dropped.
        """
        from .quantize import quantize_model

        quantize_model(self.model, scheme, group_size=group_size, include_lm_head=include_lm_head,
                       dtype=parse_dtype(dtype))
        if uses_huge_pages(self.model):  # repack: the pages of the replaced float weights are freed
            move_to_huge_pages(self.model)
        self.quantization = scheme
        self.decode_fn = self.cache_bucket = None  # quantize_model retired the compiled step, if any
        return self

    def merge_adapter(self) -> "LanguageModel":
        """Fold the LoRA adapter into the weights (W += alpha/r * B @ A) and drop it (leanformers.train.lora)."""
        from .train.lora import merge_lora  # [finetune]

        merge_lora(self.model)
        self.decode_fn = self.cache_bucket = None  # a compiled step of the unmerged model is stale
        return self

    def compile(self, *, cache_bucket: int | None = None, **opts: Any) -> "LanguageModel":
        """Compile the one-token decode step (torch.compile; cached on disk), see leanformers.generation.compile.

        Compiles now (or loads the step from the disk cache), not at the first request. cache_bucket:
        KV-cache sizes are rounded up to a multiple of it so requests share one compiled graph (default
        1024, or the context length if smaller); a longer request compiles one more graph. Other options
        go to compile_decode (mode, cache_dir, batch_size, speculative=True to also build the graph that
        verifies drafted tokens, ...). Call after quantize(). If compiling is impossible or fails, a
        warning says why and decoding stays eager.
        """
        from .generation.compile import DEFAULT_CACHE_LEN, compile_decode

        bucket = cache_bucket or min(DEFAULT_CACHE_LEN, self.context_length)
        opts.setdefault("cache_len", bucket)
        opts.setdefault("huge_pages", self.huge_pages is not False)
        fn = compile_decode(self.model, **opts)
        if fn.failure is None:
            self.decode_fn, self.cache_bucket = fn, bucket
        return self

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
    quantize: str | None = None,
    group_size: int = 32,
    compile: bool = False,
    huge_pages: bool | None = None,
    adapter: str | os.PathLike | None = None,
) -> LanguageModel:
    """Load a model and its tokenizer from a reference: an alias, an HF directory, `org/name[@rev]` or a .gguf file.

    dtype: float32, bfloat16 or float16; default: the checkpoint's (bfloat16 instead of float16 on CPU,
    float32 for GGUF). progress: show progress bars (default: when stderr is a terminal).
    quantize: None, "int8" or "int4" (weight-only, see leanformers.quantize; group_size for int4).
    With quantize, dtype is the activation dtype (default: bfloat16 on CPU, logged). GGUF Q4_0/Q4_1
    weights map exactly onto the int4 kernels (group_size 32) without being dequantized.
    compile: compile the decode step now (LanguageModel.compile(); from the disk cache when possible).
    huge_pages: on CPU, copy the weights into transparent huge pages where Linux offers them
    (leanformers.memory: compiled decoding ran 11-53% faster here; the copy costs 0.1-0.8 s per
    540 MB). None (default): when compiling (here or by a later compile()); True: now; False: never.
    adapter: a LoRA adapter directory (PEFT format) applied on top of the base; a reference that IS an
    adapter directory loads the base named by its adapter_config.json (base_model_name_or_path) with it.
    """
    # [finetune] adapters: resolve an adapter directory to its base (leanformers.train.lora)
    if adapter is None:
        from .train.lora import adapter_base

        reference, adapter = adapter_base(reference)
    if progress is None:
        progress = sys.stderr.isatty()
    device = torch.device(device)
    wanted = parse_dtype(dtype)
    if huge_pages not in (None, True, False):
        raise InvalidArgumentError(f"huge_pages must be None, True or False, got {huge_pages!r}")
    if quantize is not None:
        from .quantize import check_scheme

        check_scheme(quantize, group_size)
    resolved = resolve(reference, revision=revision, offline=offline, progress=progress)
    config, tensors, files, gguf = read_checkpoint(resolved)
    if gguf is not None:
        tokenizer = load_tokenizer_from_gguf(gguf)
        generation_config: dict[str, Any] = {}
    else:
        tokenizer = load_tokenizer_from_dir(resolved.path)
        generation_config = read_generation_config(resolved.path)
    dtype_ = wanted or default_dtype(None if gguf is not None else config.torch_dtype, device)
    exact: dict[str, Any] = {}
    if quantize is not None:
        from .quantize import gguf_exact_int4_names

        # quantize from the checkpoint's own precision; quantize_model then picks the activation dtype
        dtype_ = torch.float32 if gguf is not None else DTYPE_NAMES.get(
            str(config.torch_dtype or "float32").removeprefix("torch."), torch.float32)
        if quantize == "int4" and gguf is not None:
            names = gguf_exact_int4_names(tensors, tie_word_embeddings=config.tie_word_embeddings)
            if names and group_size != 32:
                logger.info("GGUF Q4 weights map exactly onto int4 only with group_size 32; requantizing to %d",
                            group_size)
            elif names:
                exact = {n: tensors[n] for n in names}
    model = build_model(config, tensors, dtype=dtype_, device=device, source=str(resolved.path), progress=progress,
                        placeholders=exact.keys())
    lm = LanguageModel(
        model, tokenizer, config, source=resolved, files=files, generation_config=generation_config
    )
    if quantize is not None:
        from .quantize import quantize_model

        quantize_model(model, quantize, group_size=group_size, dtype=wanted, gguf_tensors=exact)
        lm.quantization = quantize
    if adapter is not None:  # [finetune] LoRA on top of the (possibly quantized) base, before any compile
        from .train.lora import load_adapter

        load_adapter(model, adapter)
    lm.huge_pages = huge_pages
    if huge_pages and device.type == "cpu":
        move_to_huge_pages(model)
    if compile:
        lm.compile()
    return lm


class TextStream:
    """Iterator over the text pieces of one generation; `.result` holds the GenerationResult afterwards."""

    def __init__(self, lm: LanguageModel, prompts: list[list[int]], kwargs: dict[str, Any]):
        self._results: list[GenerationResult] = []
        self._pieces = lm._run(prompts, self._results, **kwargs)
        self.result: GenerationResult | None = None

    def __iter__(self) -> Iterator[str]:
        yield from self._pieces
        self.result = self._results[0]
