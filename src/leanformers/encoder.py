"""Encoder: a BERT-family model with its tokenizer, for sentence embeddings and text classification.

    enc = leanformers.load("all-minilm-l6-v2")            # or load_encoder(directory)
    vecs = enc.embed(["a sentence", "another one"])       # torch.Tensor [N, dim], float32
    enc.similarity(vecs[:1], vecs)                        # cosine, [1, N]
    res = leanformers.load("./bert-classifier").classify(["text one", "text two"])
    res.labels, res.scores, res.logits

Directories are read as sentence-transformers writes them (modules.json, pooling, Normalize,
max_seq_length, prompts; see sentence_layout.py) or as plain transformers encoders (BertModel,
*ForSequenceClassification, ...: mean pooling, as sentence-transformers does for them).

How embed() is fast (bench/RESULTS.md, "Embeddings"): texts are tokenized in one `encode_batch`,
sorted by token count and cut into batches of similar length; on CPU the matmuls apply their bias,
GELU and residual add in oneDNN epilogues (models/encoder_common.fused_linear), q/k/v come from one
fused matmul, batches with much padding run their linear layers on the real tokens only
(models/encoder_common.Layout); everything runs under torch.inference_mode.
"""

from __future__ import annotations

import logging
import warnings
from dataclasses import dataclass
from importlib import import_module
from pathlib import Path
from types import ModuleType
from typing import Any, Sequence

import torch
import torch.nn.functional as F
from tokenizers import Tokenizer as BackendTokenizer
from tokenizers import normalizers
from torch import nn

from .errors import (
    CheckpointError,
    ConfigError,
    InvalidArgumentError,
    LeanformersError,
    ModelNotFoundError,
    UnsupportedModelError,
    UnsupportedTaskError,
)
from .files import read_json
from .models.encoder_common import ENCODER_FAMILIES, load_weights
from .sentence_layout import Pooling, SentenceLayout, pooling_dimension_key, read_layout
from .tokenizer import Tokenizer, load_tokenizer_from_dir

logger = logging.getLogger(__name__)

_DECODER_METHODS = ("generate", "stream", "chat")


@dataclass
class ClassificationResult:
    """classify()'s answer for N texts.

    labels: single-label: the best label's name per text; multi-label (sigmoid): the list of labels
    whose score >= threshold per text; regression: None.
    scores: [N, num_labels] probabilities (softmax or sigmoid by problem_type; the logits for regression).
    logits: [N, num_labels] float32.
    """

    labels: list[str] | list[list[str]] | None
    scores: torch.Tensor
    logits: torch.Tensor
    function: str  # "softmax" | "sigmoid" | "none"


class Encoder:
    """A loaded encoder: `.model`, `.tokenizer`, `.config`, pooling, normalize flag, max_seq_length, prompts."""

    def __init__(self, model: nn.Module, tokenizer: Tokenizer, config: Any, *, task: str, layout: SentenceLayout,
                 max_seq_length: int, source: str = "<memory>", architecture: str | None = None):
        self.model = model
        self.tokenizer = tokenizer
        self.config = config
        self.task = task  # "base" | "masked_lm" | "sequence_classification" | "token_classification"
        self.pooling: Pooling = layout.pooling
        self.normalize: bool = layout.normalize
        self.max_seq_length = max_seq_length
        self.prompts: dict[str, str] = dict(layout.prompts)
        self.default_prompt_name = layout.default_prompt_name
        self.source = source  # the directory
        self.reference = source  # what the user passed to leanformers.load (set by it), for messages
        self.architecture = architecture or type(model).__name__
        self.pad_token_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (config.pad_token_id or 0)
        # A private copy of the tokenizer that truncates to max_seq_length, as sentence-transformers calls it.
        backend = BackendTokenizer.from_str(tokenizer.backend.to_str())
        backend.no_padding()
        backend.enable_truncation(max_seq_length)
        if layout.do_lower_case and not _lowercases(backend.normalizer):
            steps = [normalizers.Lowercase()] + ([backend.normalizer] if backend.normalizer is not None else [])
            backend.normalizer = normalizers.Sequence(steps)
        self._backend = backend
        self._prompt_lengths: dict[str, int] = {}

    # ------------------------------------------------------------------------------ properties
    @property
    def device(self) -> torch.device:
        return self.model.device

    @property
    def dtype(self) -> torch.dtype:
        return self.model.dtype

    @property
    def dimension(self) -> int:
        """Width of embed()'s vectors."""
        return self.config.hidden_size * len(self.pooling.modes)

    # ------------------------------------------------------------------------------ embeddings
    def embed(self, texts: str | Sequence[str], *, normalize: bool | None = None, batch_size: int = 64,
              prompt: str | None = None, prompt_name: str | None = None, truncate: bool = True) -> torch.Tensor:
        """Sentence embeddings: [N, dim] float32 for a list of N texts ([dim] for a single string).

        normalize: unit length (default: what the model's directory says, i.e. a Normalize module).
        prompt / prompt_name: text put before every input (prompt_name picks one of the directory's
        prompts; by default its default_prompt_name, if any). Texts longer than max_seq_length tokens
        are truncated with a warning, or raise InvalidArgumentError with truncate=False.
        """
        items, single = _check_texts(texts)
        _check_batch_size(batch_size)
        if normalize is not None and not isinstance(normalize, bool):
            raise InvalidArgumentError(f"normalize must be True, False or None, got {normalize!r}")
        prefix = self._prompt(prompt, prompt_name)
        if prefix:
            items = [prefix + t for t in items]
        ids = self._tokenize(items, truncate)
        prompt_length = self._prompt_length(prefix) if prefix and not self.pooling.include_prompt else 0
        out = torch.empty(len(ids), self.dimension, dtype=torch.float32)
        for rows, batch, mask in self._batches(ids, batch_size):
            hidden = self._hidden_states(batch, mask)
            out[rows] = self.pooling(hidden, mask, prompt_length).cpu()
        if self.normalize if normalize is None else normalize:
            out = F.normalize(out, p=2, dim=1)
        return out[0] if single else out

    @staticmethod
    def similarity(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        """Cosine similarity of every row of a ([Na, d] or [d]) with every row of b: [Na, Nb]."""
        for name, t in (("a", a), ("b", b)):
            if not isinstance(t, torch.Tensor) or t.dim() not in (1, 2):
                raise InvalidArgumentError(f"similarity(): {name} must be a [N, dim] or [dim] tensor of embeddings")
        a2, b2 = a.reshape(-1, a.shape[-1]).float(), b.reshape(-1, b.shape[-1]).float()
        if a2.shape[1] != b2.shape[1]:
            raise InvalidArgumentError(f"similarity(): dimensions differ ({a2.shape[1]} vs {b2.shape[1]})")
        return F.normalize(a2, dim=1) @ F.normalize(b2, dim=1).T

    # ------------------------------------------------------------------------------ classification
    def classify(self, texts: str | Sequence[str], *, batch_size: int = 64, truncate: bool = True,
                 threshold: float = 0.5) -> ClassificationResult:
        """Classify texts with a *ForSequenceClassification checkpoint.

        Softmax over the labels for single-label models; sigmoid per label for multi_label_classification
        (and single-logit) models, whose `labels` are those with score >= threshold; regression models
        return their raw outputs as scores. As transformers' text-classification pipeline decides.
        """
        if self.task != "sequence_classification":
            raise UnsupportedTaskError(
                f"{self.reference} is a {self.architecture} without a sequence classification head: it can "
                f"{self._abilities()}; classify() needs a *ForSequenceClassification checkpoint")
        items, _ = _check_texts(texts)
        _check_batch_size(batch_size)
        problem = self.config.problem_type
        if problem != "regression" and not self.config.labels_given:
            raise ConfigError(f"{Path(self.source) / 'config.json'}: no id2label: classify() needs the label names "
                              "(add \"id2label\": {\"0\": \"name\", ...} to config.json)")
        if not 0 <= threshold <= 1:
            raise InvalidArgumentError(f"threshold must be in [0, 1], got {threshold!r}")
        ids = self._tokenize(items, truncate)
        logits = torch.empty(len(ids), self.config.num_labels, dtype=torch.float32)
        for rows, batch, mask in self._batches(ids, batch_size):
            with torch.inference_mode():
                hidden = self._hidden_states(batch, mask)
                logits[rows] = self.model.logits(hidden).float().cpu()
        names = self.config.id2label
        if problem == "regression":
            return ClassificationResult(None, logits.clone(), logits, "none")
        if problem == "multi_label_classification" or self.config.num_labels == 1:
            scores = torch.sigmoid(logits)
            labels = [[names[j] for j in range(scores.shape[1]) if scores[i, j] >= threshold]
                      for i in range(scores.shape[0])]
            return ClassificationResult(labels, scores, logits, "sigmoid")
        scores = torch.softmax(logits, dim=-1)
        return ClassificationResult([names[int(i)] for i in scores.argmax(dim=-1)], scores, logits, "softmax")

    # ------------------------------------------------------------------------------ internals
    def _prompt(self, prompt: str | None, prompt_name: str | None) -> str:
        if prompt is not None and prompt_name is not None:
            raise InvalidArgumentError("pass prompt= or prompt_name=, not both")
        if prompt is not None:
            if not isinstance(prompt, str):
                raise InvalidArgumentError(f"prompt must be a str, got {type(prompt).__name__}")
            return prompt
        name = prompt_name if prompt_name is not None else self.default_prompt_name
        if name is None:
            return ""
        if name not in self.prompts:
            known = ", ".join(sorted(self.prompts)) or "none"
            raise InvalidArgumentError(f"prompt_name {name!r} is not one of the model's prompts ({known})")
        return self.prompts[name]

    def _prompt_length(self, prompt: str) -> int:
        """Tokens of the prompt at the start of each input (its trailing special token not counted)."""
        if prompt not in self._prompt_lengths:
            ids = self._backend.encode(prompt).ids
            n = len(ids) - (1 if ids and ids[-1] in self.tokenizer.all_special_ids else 0)
            self._prompt_lengths[prompt] = n
        return self._prompt_lengths[prompt]

    def _tokenize(self, texts: list[str], truncate: bool) -> list[list[int]]:
        encodings = self._backend.encode_batch(texts, add_special_tokens=True)
        long = [i for i, e in enumerate(encodings) if e.overflowing]
        if long:
            if not truncate:
                i = long[0]
                full = len(self.tokenizer.backend.encode(texts[i]).ids)
                raise InvalidArgumentError(
                    f"texts[{i}] has {full} tokens, more than max_seq_length={self.max_seq_length} "
                    f"({len(long)} of {len(texts)} texts are too long); pass truncate=True to cut them")
            warnings.warn(f"{len(long)} of {len(texts)} texts are longer than max_seq_length={self.max_seq_length} "
                          "tokens and were truncated (truncate=False raises instead)", stacklevel=3)
        return [e.ids for e in encodings]

    def _batches(self, ids: list[list[int]], batch_size: int):
        """(rows, input_ids (B, T), mask (B, T)) of texts sorted by length, each batch padded to its longest."""
        order = sorted(range(len(ids)), key=lambda i: -len(ids[i]))
        for start in range(0, len(order), batch_size):
            rows = order[start:start + batch_size]
            length = max(len(ids[i]) for i in rows)
            batch = torch.full((len(rows), length), self.pad_token_id, dtype=torch.long)
            mask = torch.zeros((len(rows), length), dtype=torch.long)
            for r, i in enumerate(rows):
                batch[r, :len(ids[i])] = torch.tensor(ids[i], dtype=torch.long)
                mask[r, :len(ids[i])] = 1
            yield torch.tensor(rows), batch.to(self.device), mask.to(self.device)

    def _hidden_states(self, input_ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """The one call into the model (the encoder contract: hidden_states with a padding mask)."""
        with torch.inference_mode():
            return self.model.hidden_states(input_ids, attention_mask=mask)

    def _abilities(self) -> str:
        can = "embed() and similarity()"
        return can.replace(" and", ",") + " and classify()" if self.task == "sequence_classification" else can

    def __getattr__(self, name: str) -> Any:
        if name in _DECODER_METHODS:
            from .hub import DEFAULT_MODEL

            d = self.__dict__
            raise UnsupportedTaskError(
                f"{d.get('reference', 'this model')} is an encoder ({d.get('architecture', '?')}): it can "
                f"{self._abilities()}, not {name}(); text generation needs a decoder (a causal language "
                f"model such as {DEFAULT_MODEL})")
        raise AttributeError(f"{type(self).__name__!r} object has no attribute {name!r}")

    def __repr__(self) -> str:
        return (f"Encoder({self.reference!r}, {self.architecture}, dim={self.dimension}, "
                f"pooling={'+'.join(self.pooling.modes)}, normalize={self.normalize}, {self.dtype}, {self.device})")


# ---------------------------------------------------------------------------------------------- loading

def encoder_family(model_type: Any) -> ModuleType | None:
    """The models.<family> module of an encoder model_type, None for anything else."""
    name = ENCODER_FAMILIES.get(model_type) if isinstance(model_type, str) else None
    return import_module(f"leanformers.models.{name}") if name else None


def is_encoder_dir(directory: str | Path) -> bool:
    """True when `directory` holds an encoder checkpoint (config.json's model_type is an encoder family)."""
    directory = Path(directory)
    try:
        layout_dir = read_layout(directory).model_dir if (directory / "modules.json").is_file() else directory
        data = read_json(layout_dir / "config.json", ConfigError, "config")
    except (OSError, ValueError, LeanformersError):
        return False
    return isinstance(data, dict) and encoder_family(data.get("model_type")) is not None


def load_encoder(directory: str | Path, *, dtype: str | torch.dtype | None = None,
                 device: str | torch.device = "cpu", fuse: bool = True) -> Encoder:
    """Load an encoder from a sentence-transformers or transformers directory.

    dtype: float32, bfloat16 or float16 (default: the checkpoint's; bfloat16 instead of float16 on CPU).
    fuse: concatenate query/key/value into one linear per layer (faster inference). fuse=False keeps
    transformers' parameter names throughout, as training, LoRA targeting and saving need; parameters
    are loaded with requires_grad=False either way.
    A sentence-transformers directory loads its base model (as sentence-transformers does); a plain
    directory loads config.json's architecture (BertModel, *ForMaskedLM, *ForSequenceClassification,
    *ForTokenClassification of BERT, RoBERTa, XLM-RoBERTa, CamemBERT and DistilBERT).
    """
    from .loading import default_dtype, parse_dtype

    root = Path(directory).expanduser()
    if not root.is_dir():
        raise ModelNotFoundError(f"{root}: not a directory (an encoder is loaded from a model directory)")
    device = torch.device(device)
    wanted = parse_dtype(dtype)
    layout = read_layout(root)
    model_dir = layout.model_dir
    config_file = model_dir / "config.json"
    data = _read_config_json(config_file)
    family = encoder_family(data.get("model_type"))
    if family is None:
        raise UnsupportedModelError(f"{config_file}: model_type {data.get('model_type')!r} is not an encoder "
                                    f"family (supported: {', '.join(sorted(ENCODER_FAMILIES))})")
    config = family.config_from_dict(data, source=str(config_file))
    arch = _architecture(family, config, layout, config_file)
    tensors = _read_weights(model_dir)
    if layout.is_sentence_transformers:
        pooling_file = next((p for p in sorted(root.glob("*/config.json")) if "Pooling" in p.parent.name), None)
        declared = pooling_dimension_key(pooling_file) if pooling_file else None
        if declared is not None and declared != config.hidden_size:
            raise ConfigError(f"{pooling_file}: embedding dimension {declared} does not match the model's "
                              f"hidden size {config.hidden_size} ({config_file})")
    has_pooler = any(k.endswith("pooler.dense.weight") for k in tensors)
    with torch.device("meta"):
        model = family.build(config, arch, pooler=has_pooler)
    dtype_ = wanted or default_dtype(config.torch_dtype, device)
    load_weights(model, tensors, source=str(model_dir), dtype=dtype_, device=device,
                 base_prefix=family.BASE_PREFIX, ignored=family.ignored_weights(model))
    if fuse:
        model.fuse_projections()
    tokenizer = load_tokenizer_from_dir(model_dir)
    limit = config.max_tokens
    max_len = layout.max_seq_length or min(_model_max_length(model_dir) or limit, limit)
    if max_len > limit:
        logger.warning("%s: max_seq_length %d exceeds the model's %d positions; using %d",
                       model_dir / "sentence_bert_config.json", max_len, limit, limit)
        max_len = limit
    task = family.ARCHITECTURES[arch][1]
    return Encoder(model, tokenizer, config, task=task, layout=layout, max_seq_length=max_len, source=str(root),
                   architecture=arch)


def load_encoder_reference(reference: Any, *, dtype: Any = None, device: Any = "cpu", revision: str | None = None,
                           offline: bool | None = None, progress: bool | None = None, quantize: Any = None,
                           compile: bool = False, huge_pages: Any = None) -> Encoder | None:
    """leanformers.load()'s encoder branch: an Encoder when `reference` resolves to an encoder directory, else None.

    The decoder-only options (quantize, compile, huge_pages) are refused for encoders.
    """
    from .hub import resolve

    resolved = resolve(reference, revision=revision, offline=offline, progress=progress)
    if resolved.kind != "dir" or not is_encoder_dir(resolved.path):
        return None
    given = [name for name, value in (("quantize", quantize), ("compile", compile), ("huge_pages", huge_pages))
             if value not in (None, False)]
    if given:
        raise InvalidArgumentError(f"{', '.join(given)} only apply to decoders; {resolved.reference!r} is an encoder")
    encoder = load_encoder(resolved.path, dtype=dtype, device=device)
    encoder.reference = resolved.reference
    return encoder


def _architecture(family: ModuleType, config: Any, layout: SentenceLayout, config_file: Path) -> str:
    """Which model class to build: the base model for sentence-transformers, else config.json's architecture."""
    arch = config.architecture
    if layout.is_sentence_transformers or arch is None:
        return next(name for name, (_, task) in family.ARCHITECTURES.items() if task == "base")
    if arch not in family.ARCHITECTURES:
        raise UnsupportedModelError(f"{config_file}: architecture {arch!r} is not supported "
                                    f"(supported: {', '.join(family.ARCHITECTURES)})")
    return arch


def _read_config_json(path: Path) -> dict[str, Any]:
    if not path.exists():
        raise ModelNotFoundError(f"{path}: config file not found")
    data = read_json(path, ConfigError, "config")
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a JSON object")
    return data


def _read_weights(directory: Path) -> dict[str, torch.Tensor]:
    """The checkpoint's tensors, chosen as for decoders (index or the conventional file, never a glob)."""
    from .loading import read_weights_dir

    return dict(read_weights_dir(directory)[0])


def _model_max_length(directory: Path) -> int | None:
    """tokenizer_config.json's model_max_length, when it is a real limit (not transformers' 1e30 sentinel)."""
    try:
        cfg = read_json(directory / "tokenizer_config.json", ConfigError, "tokenizer config")
    except (OSError, ValueError, LeanformersError):
        return None
    value = cfg.get("model_max_length") if isinstance(cfg, dict) else None
    return value if isinstance(value, int) and 0 < value < 10**9 else None


def _lowercases(normalizer: Any) -> bool:
    if isinstance(normalizer, normalizers.Lowercase):
        return True
    if isinstance(normalizer, normalizers.Sequence):
        return any(isinstance(n, normalizers.Lowercase) for n in normalizer)
    return False


def _check_texts(texts: Any) -> tuple[list[str], bool]:
    if isinstance(texts, str):
        return [texts], True
    if isinstance(texts, torch.Tensor) or not isinstance(texts, Sequence):
        raise InvalidArgumentError(f"texts must be a string or a list of strings, got {type(texts).__name__}")
    if len(texts) == 0:
        raise InvalidArgumentError("texts is empty: pass at least one string")
    for i, t in enumerate(texts):
        if not isinstance(t, str):
            raise InvalidArgumentError(f"texts[{i}] is a {type(t).__name__}, expected a string")
    return list(texts), False


def _check_batch_size(batch_size: Any) -> None:
    if not isinstance(batch_size, int) or isinstance(batch_size, bool) or batch_size < 1:
        raise InvalidArgumentError(f"batch_size must be a positive integer, got {batch_size!r}")
