"""LanguageModel: a model, its tokenizer and config, with generate / stream / chat; and `load()`."""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator, Sequence

import torch

from .config import ModelConfig
from .errors import InvalidArgumentError
from .generation.config import DRAFT_NAMES, FALLBACK, GenerationConfig
from .generation.decode import DecodeStep
from .generation.run import GenerationResult, GenerationRun
from .hub import ResolvedModel, resolve
from .loading import DTYPE_NAMES, build_model, default_dtype, parse_dtype, read_checkpoint, read_generation_config
from .models.base import DecoderModel
from .tokenizer import Tokenizer, load_tokenizer_from_dir, load_tokenizer_from_gguf

if TYPE_CHECKING:
    from typing_extensions import Unpack

    from .generation.config import GenerationKwargs

logger = logging.getLogger("leanformers")

Prompt = str | Sequence[int] | Sequence[str] | Sequence[Sequence[int]]


class LanguageModel:
    """A loaded causal LM: `.model` (a DecoderModel), `.tokenizer`, `.config`, `.step` (how it decodes).

    `.defaults` is the GenerationConfig generate() starts from: the model's generation_config.json where
    it has one, else generation.config.FALLBACK (greedy, 256 new tokens, repetition penalty 1.1).
    """

    def __init__(self, model: DecoderModel, tokenizer: Tokenizer, config: ModelConfig, *,
                 source: ResolvedModel | None = None, files: list[Path] | None = None,
                 generation_config: dict[str, Any] | None = None):
        self.model = model
        self.tokenizer = tokenizer
        self.config = config
        self.source = source
        self.files = files or []
        self.generation_config = generation_config or {}
        self.defaults = GenerationConfig.from_hf(self.generation_config) if self.generation_config else FALLBACK
        self.step: DecodeStep = DecodeStep(model)  # compile() hands in a compiled step
        self.huge_pages: bool | None = None  # CPU weights into huge pages: at compile() (None), at load (True), never
        self._self_drafts: dict[str, DecodeStep] = {}  # "int4"/"int8" -> the quantized copy's step, built once

    @property
    def device(self) -> torch.device:
        return self.model.device

    @property
    def dtype(self) -> torch.dtype:
        return self.model.dtype

    @property
    def quantization(self) -> str | None:
        return self.model.quantization

    @property
    def eos_token_ids(self) -> list[int]:
        """Every id that ends generation: tokenizer, generation_config.json and config, deduplicated."""
        gen_eos = self.generation_config.get("eos_token_id")
        gen_eos = gen_eos if isinstance(gen_eos, list) else ([gen_eos] if gen_eos is not None else [])
        ids = [*self.tokenizer.eos_token_ids, *gen_eos, *self.config.eos_token_ids]
        return list(dict.fromkeys(i for i in ids if isinstance(i, int) and not isinstance(i, bool)))

    @property
    def context_length(self) -> int:
        return self.config.max_position_embeddings

    # ------------------------------------------------------------------------------ generation
    def generate(self, prompt: Prompt, config: GenerationConfig | None = None, *, add_special_tokens: bool = True,
                 **kwargs: "Unpack[GenerationKwargs]") -> GenerationResult | list[GenerationResult]:
        """Generate a continuation of `prompt` with `config` (default: `self.defaults`), fields overridden by kwargs.

        prompt: a string or token ids -> one GenerationResult; a list of strings or of id lists -> a list.
        See GenerationConfig for every parameter (sampling order, stop strings, draft=, ...).
        """
        cfg = self._config(config, kwargs)
        prompts, single = self._prompts(prompt, add_special_tokens)
        results = self._run(prompts, cfg).results
        return results[0] if single else results

    def stream(self, prompt: str | Sequence[int], config: GenerationConfig | None = None, *,
               add_special_tokens: bool = True, **kwargs: "Unpack[GenerationKwargs]") -> "TextStream":
        """Like generate() for one prompt, but yields text pieces as they are final; `.result` at the end."""
        cfg = self._config(config, kwargs)
        prompts, single = self._prompts(prompt, add_special_tokens)
        if not single:
            raise InvalidArgumentError("stream() takes one prompt; use generate() for batches")
        return TextStream(self._run(prompts, cfg))

    def chat(self, messages: list[dict[str, Any]], config: GenerationConfig | None = None, *, stream: bool = False,
             **kwargs: "Unpack[GenerationKwargs]") -> "GenerationResult | TextStream":
        """Answer a conversation: render the chat template (with the generation prompt) and generate."""
        cfg = self._config(config, kwargs)
        text = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True)
        ids = self.tokenizer.encode(text, add_special_tokens=False)
        return self.stream(ids, cfg) if stream else self.generate(ids, cfg)

    def _config(self, config: GenerationConfig | None, kwargs: dict[str, Any]) -> GenerationConfig:
        if config is not None and not isinstance(config, GenerationConfig):
            raise InvalidArgumentError(f"config must be a GenerationConfig, got {type(config).__name__}")
        base = config if config is not None else self.defaults
        return base.replace(**kwargs) if kwargs else base

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
        if isinstance(prompt, str) or (isinstance(prompt, Sequence) and prompt
                                       and not isinstance(prompt[0], (str, list, tuple))):
            return [encode(prompt)], True
        if isinstance(prompt, Sequence) and prompt:
            return [encode(p) for p in prompt], False
        raise InvalidArgumentError("the prompt is empty")

    def _run(self, prompts: list[list[int]], cfg: GenerationConfig) -> GenerationRun:
        return GenerationRun(self.step, self.tokenizer, prompts, cfg, eos_ids=self.eos_token_ids,
                             context=self.context_length, strategy=self._strategy(cfg, len(prompts)))

    def _strategy(self, cfg: GenerationConfig, n_prompts: int):
        """None (plain decoding) or the speculative strategy that `cfg.draft` asks for."""
        if cfg.draft is None:
            return None
        from .speculative import PromptLookupDrafter, SpeculativeDecoding, check_same_vocabulary, model_drafter

        if n_prompts != 1:
            raise InvalidArgumentError(f"speculative decoding (draft=) takes one prompt at a time, got a batch of {n_prompts}")
        draft = cfg.draft
        if draft == "prompt-lookup":
            drafter: Any = PromptLookupDrafter()
        elif draft in ("self-int4", "self-int8"):
            step, used = self._self_draft(draft.removeprefix("self-"))
            drafter = model_drafter(self.step, step, draft if used == draft[5:] else f"{draft} ({used})")
        elif isinstance(draft, LanguageModel):
            check_same_vocabulary(self.tokenizer, draft.tokenizer)
            ref = draft.source.reference if draft.source else "model"
            drafter = model_drafter(self.step, draft.step, f"model:{ref}")
        else:
            raise InvalidArgumentError(
                f"draft must be a LanguageModel or one of {', '.join(DRAFT_NAMES)}, got {type(draft).__name__}")
        return SpeculativeDecoding(drafter, num_draft_tokens=cfg.num_draft_tokens)

    def _self_draft(self, scheme: str) -> tuple[DecodeStep, str]:
        """This model quantized to `scheme` as a draft (built once), stepped like the target (compiled or not)."""
        if scheme not in self._self_drafts:
            from .speculative import self_draft

            self._self_drafts[scheme] = self.step.for_model(self_draft(self.model, scheme))
        step = self._self_drafts[scheme]
        return step, step.model.quantization or scheme

    # ------------------------------------------------------------------------------ speed
    def quantize(self, scheme: str, group_size: int = 32, *, include_lm_head: bool | str = "int8",
                 dtype: str | torch.dtype | None = None) -> "LanguageModel":
        """Weight-only quantization in place ("int8" or "int4"), see leanformers.quantize.quantize_model.

        A compiled step of the unquantized model is dropped (with a warning): call compile() after.
        """
        from .compile.memory import move_to_huge_pages, uses_huge_pages
        from .quantize import quantize_model

        was_compiled = self.step.is_compiled
        quantize_model(self.model, scheme, group_size=group_size, include_lm_head=include_lm_head,
                       dtype=parse_dtype(dtype))
        if uses_huge_pages(self.model):  # repack: the pages of the replaced float weights are freed
            move_to_huge_pages(self.model)
        if was_compiled:
            logger.warning("leanformers: the model was quantized (%s) after compiling: the compiled decode step "
                           "is dropped; compile again", scheme)
        self.step = DecodeStep(self.model)
        self._self_drafts.clear()
        return self

    def merge_adapter(self) -> "LanguageModel":
        """Fold the LoRA adapter into the weights (W += alpha/r * B @ A) and drop it (leanformers.train.lora)."""
        from .train.lora import merge_lora

        merge_lora(self.model)
        self.step = DecodeStep(self.model)  # a compiled step of the unmerged model is stale
        self._self_drafts.clear()
        return self

    def compile(self, *, cache_bucket: int | None = None, speculative: bool = False, **opts: Any) -> "LanguageModel":
        """Compile the one-token decode step (cached on disk), see leanformers.compile.compile_decode.

        Compiles now (or loads the step from the disk cache), not at the first request. cache_bucket: KV
        cache sizes are rounded up to a multiple of it so requests share one graph (default 1024, or the
        context length if smaller). speculative: also build (or load) now the graph that verifies drafted
        tokens (otherwise the first speculative request builds it). Other options go to compile_decode.
        Call after quantize(). If compiling is impossible or fails, a warning says why and decoding stays eager.
        """
        from .compile import DEFAULT_CACHE_LEN, compile_decode
        from .speculative.costs import default_verify_rows

        opts.setdefault("huge_pages", self.huge_pages is not False)
        if "verify_rows" not in opts and self.device.type == "cpu":
            opts["verify_rows"] = default_verify_rows(self.model.weight_kind)
        step = compile_decode(self.model, cache_bucket=cache_bucket or min(DEFAULT_CACHE_LEN, self.context_length),
                              speculative=speculative, **opts)
        self.step = step if step.failure is None else DecodeStep(self.model)
        self._self_drafts.clear()
        return self

    def embed(self, *args: Any, **kwargs: Any) -> Any:
        """Decoders do not embed: raises UnsupportedTaskError saying what this model can do."""
        from .errors import UnsupportedTaskError

        ref = self.source.reference if self.source else "this model"
        raise UnsupportedTaskError(
            f"{ref} is a decoder ({self.config.model_type}): it can generate(), stream() and chat(), not embed(); "
            "sentence embeddings need an encoder (BERT, RoBERTa, XLM-R, DistilBERT), e.g. all-minilm-l6-v2")

    def __repr__(self) -> str:
        ref = self.source.reference if self.source else "?"
        return f"LanguageModel({ref!r}, {self.config.model_type}, {self.dtype}, {self.device})"


class TextStream:
    """Iterator over the text pieces of one generation; `.result` holds the GenerationResult afterwards."""

    def __init__(self, run: GenerationRun):
        self._run = run
        self.result: GenerationResult | None = None

    def __iter__(self) -> Iterator[str]:
        yield from self._run
        self.result = self._run.results[0]


def parse_device(device: str | torch.device) -> torch.device:
    """A torch device that exists here, or InvalidArgumentError naming what is wrong."""
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as exc:
        raise InvalidArgumentError(f"invalid device {device!r}; use e.g. cpu, cuda or cuda:1") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise InvalidArgumentError(f"device {device!r}: CUDA is not available in this torch build or machine "
                                   f"(torch {torch.__version__}); use --device cpu")
    if dev.type not in ("cpu", "cuda", "mps", "xpu"):
        raise InvalidArgumentError(f"device {device!r} is not supported; use cpu or cuda")
    if dev.type == "mps" and not torch.backends.mps.is_available():
        raise InvalidArgumentError(f"device {device!r}: MPS is not available here")
    return dev


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

    Encoder checkpoints (BERT, RoBERTa, XLM-R, DistilBERT; sentence-transformers directories) load as a
    leanformers.encoder.Encoder (embed / similarity / classify) instead; see load_encoder.

    dtype: float32, bfloat16 or float16; default: the checkpoint's (bfloat16 instead of float16 on CPU,
    float32 for GGUF). progress: show progress bars (default: when stderr is a terminal).
    quantize: None, "int8" or "int4" (weight-only, see leanformers.quantize; group_size for int4).
    With quantize, dtype is the activation dtype (default: bfloat16 on CPU, logged). GGUF Q4_0/Q4_1
    weights map exactly onto the int4 kernels (group_size 32) without being dequantized.
    compile: compile the decode step now (LanguageModel.compile(); from the disk cache when possible).
    huge_pages: on CPU, copy the weights into transparent huge pages where Linux offers them
    (leanformers.compile.memory). None (default): when compiling; True: now; False: never.
    adapter: a LoRA adapter directory (PEFT format) applied on top of the base; a reference that IS an
    adapter directory loads the base named by its adapter_config.json (base_model_name_or_path) with it.
    """
    if adapter is None:  # an adapter directory given as the model: its base, with the adapter
        from .train.lora import adapter_base

        reference, adapter = adapter_base(reference)
    # --- encoders (issue 15): BERT-family checkpoints load as a leanformers.encoder.Encoder ---------------
    from .encoder import load_encoder_reference

    encoder = load_encoder_reference(reference, dtype=dtype, device=device, revision=revision, offline=offline,
                                     progress=progress, quantize=quantize, compile=compile, huge_pages=huge_pages,
                                     adapter=adapter)
    if encoder is not None:
        return encoder
    # --- end of the encoder block -----------------------------------------------------------------------
    if progress is None:
        progress = sys.stderr.isatty()
    dev = parse_device(device)
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
    dtype_ = wanted or default_dtype(None if gguf is not None else config.torch_dtype, dev)
    deferred: dict[str, Any] = {}
    if quantize is not None:
        # quantize from the checkpoint's own precision; quantize_model then picks the activation dtype
        dtype_ = torch.float32 if gguf is not None else DTYPE_NAMES.get(
            str(config.torch_dtype or "float32").removeprefix("torch."), torch.float32)
        if gguf is not None:
            deferred = _deferred_gguf(config, tensors, quantize, group_size)
    model = build_model(config, tensors, dtype=dtype_, device=dev, source=str(resolved.path), progress=progress,
                        placeholders=deferred.keys())
    lm = LanguageModel(model, tokenizer, config, source=resolved, files=files, generation_config=generation_config)
    if quantize is not None:
        from .quantize import quantize_model

        quantize_model(model, quantize, group_size=group_size, dtype=wanted, gguf_tensors=deferred)
    if adapter is not None:  # LoRA on top of the (possibly quantized) base, before any compile
        from .train.lora import load_adapter

        load_adapter(model, adapter)
    lm.huge_pages = huge_pages
    if huge_pages and dev.type == "cpu":
        from .compile.memory import move_to_huge_pages

        move_to_huge_pages(model)
    if compile:
        lm.compile()
    return lm


def _deferred_gguf(config: ModelConfig, tensors: Any, scheme: str, group_size: int) -> dict[str, Any]:
    """The GGUF tensors that quantize_model replaces, left unread by build_model and read one at a time
    by quantize_model (the model is never whole in float32: a 7B Q4_K_M file would need 28 GB)."""
    from .models.registry import family_for
    from .quantize import gguf_exact_int4_names, quantized_weight_names

    with torch.device("meta"):
        skeleton = family_for(config).build(config)
    if scheme == "int4" and group_size != 32 and gguf_exact_int4_names(skeleton, tensors):
        logger.info("GGUF Q4_0/Q4_1/Q4_K weights map exactly onto int4 only with group_size 32; requantizing to %d", group_size)
    return {n: tensors[n] for n in quantized_weight_names(skeleton, scheme) if n in tensors}
