"""What the encoder families (bert.py, roberta.py, distilbert.py) share.

- `EncoderConfigBase`: the config.json keys every encoder family has (labels, problem_type, dtype),
  and validators that name the file and the key.
- `Layout` + `attention()`: bidirectional attention over a batch with padding or packed sequences.
  In the "unpadded" mode the linear layers, norms and MLP see only the real tokens, (N, hidden),
  and attention scatters q/k/v into a (B, T) grid for F.scaled_dot_product_attention and gathers
  the result back; padded tokens then cost nothing outside attention.
- `activation()`: `hidden_act` -> function (exact erf GELU, the tanh GELUs, ReLU).
- `load_weights()`: checkpoint tensors with Hugging Face names -> a model built on the meta device
  (the legacy `LayerNorm.gamma/beta` names, the base-model prefix added or removed as transformers
  does, tied decoder weights).
- `classification_loss()`: the loss transformers' *ForSequenceClassification computes for a
  problem_type, for the training loop.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Mapping

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import CheckpointError, ConfigError, UnsupportedModelError

# model_type -> family module in leanformers.models (encoders only; decoders live in models/registry.py)
ENCODER_FAMILIES = {
    "bert": "bert",
    "roberta": "roberta",
    "xlm-roberta": "roberta",
    "camembert": "roberta",
    "distilbert": "distilbert",
}

PROBLEM_TYPES = ("regression", "single_label_classification", "multi_label_classification")

# Fraction of padded positions from which the layers run on the real tokens only (see Layout).
UNPAD_MIN_FRACTION = 0.15


# --------------------------------------------------------------------------------------------- activations

def _gelu_tanh(x: torch.Tensor) -> torch.Tensor:
    return F.gelu(x, approximate="tanh")


ACTIVATIONS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "gelu": F.gelu,  # exact (erf)
    "gelu_new": _gelu_tanh,  # the tanh approximation, as transformers' NewGELUActivation
    "gelu_pytorch_tanh": _gelu_tanh,
    "gelu_fast": _gelu_tanh,
    "relu": F.relu,
}


# the same activations as oneDNN post-ops: (attr, algorithm) of torch.ops.mkldnn._linear_pointwise
_ONEDNN_ACTIVATIONS = {"gelu": ("gelu", "none"), "gelu_new": ("gelu", "tanh"), "gelu_pytorch_tanh": ("gelu", "tanh"),
                       "gelu_fast": ("gelu", "tanh"), "relu": ("relu", "")}


def activation(name: str) -> Callable[[torch.Tensor], torch.Tensor]:
    """The activation function named by config.json's hidden_act / activation."""
    return ACTIVATIONS[name]


def _onednn_linear_available() -> bool:
    return torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")


_ONEDNN = _onednn_linear_available()


def use_fused(x: torch.Tensor, module: nn.Module) -> bool:
    """True for CPU inference (no autograd, eval mode) in float32/bfloat16, where oneDNN fuses epilogues."""
    return (_ONEDNN and x.device.type == "cpu" and not module.training and not torch.is_grad_enabled()
            and x.dtype in (torch.float32, torch.bfloat16) and type(module) is nn.Linear)


def fused_linear(x: torch.Tensor, linear: nn.Linear, *, act: str | None = None,
                 residual: torch.Tensor | None = None) -> torch.Tensor:
    """act(linear(x)) or linear(x) + residual as ONE oneDNN call (CPU inference; see use_fused).

    Eager PyTorch runs the bias, the activation and the residual add as separate passes over the
    output; an exact-erf GELU alone took as long as half of the matmul before it (bench/RESULTS.md,
    "Embeddings"). oneDNN applies them in the matmul's epilogue. Elsewhere: the plain ops.
    """
    if not use_fused(x, linear):
        y = linear(x)
        if act is not None:
            y = ACTIVATIONS[act](y)
        return y if residual is None else y + residual
    shape = x.shape
    x2 = x.reshape(-1, shape[-1])
    if residual is not None:
        y = torch.ops.mkldnn._linear_pointwise.binary(x2, residual.reshape(-1, residual.shape[-1]), linear.weight,
                                                      linear.bias, "add")
    else:
        attr, algorithm = _ONEDNN_ACTIVATIONS[act] if act is not None else ("none", "")
        y = torch.ops.mkldnn._linear_pointwise(x2, linear.weight, linear.bias, attr, [], algorithm)
    return y.view(*shape[:-1], y.shape[-1])


# --------------------------------------------------------------------------------------------- configs

@dataclass
class EncoderConfigBase:
    """Keys every encoder config.json may carry besides the architecture (HF names).

    Family configs subclass it and validate in __post_init__(source), where `source` (the file, for
    messages) comes through the `_source` init-only argument.
    """

    model_type: str = ""
    architectures: list[str] | None = None
    id2label: dict[int, str] | None = None
    label2id: dict[str, int] | None = None
    num_labels: int | None = None  # derived from id2label when that is given
    problem_type: str | None = None
    pad_token_id: int | None = 0
    tie_word_embeddings: bool = True
    torch_dtype: str | None = None
    _source: dataclasses.InitVar[str] = "config.json"
    labels_given: bool = dataclasses.field(default=False, init=False, repr=False)  # id2label was in the file

    @property
    def architecture(self) -> str | None:
        """config.json's first `architectures` entry (what transformers' Auto classes would build)."""
        return self.architectures[0] if self.architectures else None

    def labels_and_problem(self, source: str) -> None:
        """Validate id2label / label2id / num_labels / problem_type (called by each family's __post_init__)."""
        self.labels_given = self.id2label is not None
        if self.id2label is not None:
            if not isinstance(self.id2label, dict) or not self.id2label:
                raise ConfigError(f"{source}: id2label must be a non-empty object {{\"0\": \"label\", ...}}")
            labels: dict[int, str] = {}
            for key, value in self.id2label.items():
                try:
                    index = int(key)
                except (TypeError, ValueError):
                    raise ConfigError(f"{source}: id2label key {key!r} is not an integer") from None
                if not isinstance(value, str):
                    raise ConfigError(f"{source}: id2label[{key!r}] must be a string, got {value!r}")
                labels[index] = value
            if sorted(labels) != list(range(len(labels))):
                raise ConfigError(f"{source}: id2label keys must be 0..{len(labels) - 1}, got {sorted(labels)}")
            if self.num_labels is not None and self.num_labels != len(labels):
                raise ConfigError(f"{source}: num_labels={self.num_labels} but id2label has {len(labels)} entries")
            self.id2label = labels
            self.num_labels = len(labels)
        else:
            if self.num_labels is None:
                self.num_labels = 2  # transformers' default when a config names no labels
            check_int(self.num_labels, "num_labels", source, minimum=1)
            self.id2label = {i: f"LABEL_{i}" for i in range(self.num_labels)}
        if self.label2id is None:
            self.label2id = {v: k for k, v in self.id2label.items()}
        if self.problem_type is not None and self.problem_type not in PROBLEM_TYPES:
            raise ConfigError(f"{source}: problem_type {self.problem_type!r} is not one of {PROBLEM_TYPES}")
        if self.problem_type == "single_label_classification" and self.num_labels == 1:
            raise ConfigError(f"{source}: problem_type single_label_classification needs at least 2 labels")
        if self.architectures is not None and (not isinstance(self.architectures, list)
                                               or not all(isinstance(a, str) for a in self.architectures)):
            raise ConfigError(f"{source}: architectures must be a list of strings, got {self.architectures!r}")
        if self.torch_dtype is not None and not isinstance(self.torch_dtype, str):
            raise ConfigError(f"{source}: torch_dtype must be a string, got {self.torch_dtype!r}")
        if self.pad_token_id is not None:
            check_int(self.pad_token_id, "pad_token_id", source, minimum=0)
        check_bool(self.tie_word_embeddings, "tie_word_embeddings", source)


def check_int(value: Any, name: str, source: str, *, minimum: int = 1) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
        raise ConfigError(f"{source}: {name} must be an integer >= {minimum}, got {value!r}")


def check_prob(value: Any, name: str, source: str) -> None:
    if value is None:
        return
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not 0 <= value < 1:
        raise ConfigError(f"{source}: {name} must be a probability in [0, 1), got {value!r}")


def check_eps(value: Any, name: str, source: str) -> None:
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not (0 < value < 1 and math.isfinite(value)):
        raise ConfigError(f"{source}: {name} must be a small positive number, got {value!r}")


def check_bool(value: Any, name: str, source: str) -> None:
    if not isinstance(value, bool):
        raise ConfigError(f"{source}: {name} must be true or false, got {value!r}")


def check_activation(value: Any, name: str, source: str) -> None:
    if value not in ACTIVATIONS:
        raise UnsupportedModelError(f"{source}: {name} {value!r} is not supported (supported: {sorted(ACTIVATIONS)})")


def config_from_dict(cls: type, data: Mapping[str, Any], source: str, *, refused: Mapping[str, Any] = {},
                     renamed: Mapping[str, str] = {}) -> Any:
    """Build a family config dataclass from a config.json dict.

    refused: keys whose only supported value is the given one (e.g. is_decoder: False); any other value
    raises UnsupportedModelError naming the key. renamed: old key -> field (e.g. torch's `dtype`).
    Keys that are not fields are ignored (training-only settings, metadata).
    """
    if not isinstance(data, Mapping):
        raise ConfigError(f"{source}: expected a JSON object, got {type(data).__name__}")
    for key, supported in refused.items():
        if key in data and data[key] is not None and data[key] != supported:
            raise UnsupportedModelError(f"{source}: {key}={data[key]!r} is not supported (only {supported!r})")
    names = {f.name for f in dataclasses.fields(cls)}
    kwargs = {k: v for k, v in data.items() if k in names}
    for old, new in renamed.items():
        if old in data and new not in data:
            kwargs[new] = data[old]
    try:
        return cls(**kwargs, _source=source)
    except TypeError as exc:  # a key of the wrong kind reaching a dataclass field
        raise ConfigError(f"{source}: {exc}") from None


# --------------------------------------------------------------------------------------------- batches

class Layout:
    """Where the real tokens of a (B, T) batch are, and which keys each query may attend to.

    attention_mask (B, T): None = all tokens real, one sequence per row; 0 = padding; equal positive
    values = one sequence (several may share a row: packed). Two modes with the same results:
    - padded (`index` None): activations stay (B, T, hidden); padded positions are computed but never
      attended to.
    - unpadded (`index` set): activations are (N, hidden) for the N real tokens. Only attention needs
      the grid: q/k/v go into a zero (B*T, .) buffer and the output comes back with index_select.
    Chosen automatically: unpadded when at least UNPAD_MIN_FRACTION of the positions are padding.
    """

    def __init__(self, batch: int, length: int, index: torch.Tensor | None, mask: torch.Tensor | None):
        self.batch, self.length = batch, length
        self.index = index  # (N,) flat positions of the real tokens in B*T, or None
        self.mask = mask  # SDPA bool mask (B, 1, 1, T) or (B, 1, T, T), True = attend; None = all

    @classmethod
    def build(cls, attention_mask: torch.Tensor | None, batch: int, length: int, *,
              unpad: bool | None = None) -> "Layout":
        if attention_mask is None:
            return cls(batch, length, None, None)
        m = attention_mask
        real = m != 0
        same_as_first = (m == m[:, :1]) | ~real
        right_padded = real[:, 1:] <= real[:, :-1]
        one_sequence = bool(same_as_first.all()) and bool(right_padded.all())
        if one_sequence and bool(real.all()):
            return cls(batch, length, None, None)
        if one_sequence:  # right padding: a key mask is enough
            mask = real[:, None, None, :]
        else:  # packed sequences (or holes): block-diagonal; a padded query sees itself only (finite, unused)
            same = (m[:, :, None] == m[:, None, :]) & real[:, None, :]
            eye = torch.eye(length, dtype=torch.bool, device=m.device)
            mask = (same | (eye & ~real[:, :, None]))[:, None]
        padded = 1.0 - float(real.sum()) / real.numel()
        if unpad is None:
            unpad = padded >= UNPAD_MIN_FRACTION
        index = real.flatten().nonzero().squeeze(1) if unpad else None
        return cls(batch, length, index, mask)

    def pack(self, x: torch.Tensor) -> torch.Tensor:
        """(B, T, ...) -> (N, ...) in unpadded mode; unchanged otherwise."""
        if self.index is None:
            return x
        return x.reshape(self.batch * self.length, *x.shape[2:]).index_select(0, self.index)

    def unpack(self, x: torch.Tensor) -> torch.Tensor:
        """Back to (B, T, ...): zeros at padded positions in unpadded mode."""
        if self.index is None:
            return x
        out = x.new_zeros(self.batch * self.length, *x.shape[1:])
        out.index_copy_(0, self.index, x)
        return out.view(self.batch, self.length, *x.shape[1:])


def attention(qkv: torch.Tensor, layout: Layout, n_heads: int, dropout_p: float = 0.0) -> torch.Tensor:
    """Bidirectional multi-head attention; qkv (..., 3*hidden) = [q | k | v] per token -> (..., hidden)."""
    x = layout.unpack(qkv)  # (B, T, 3*hidden)
    B, T, C = x.shape
    hidden = C // 3
    q, k, v = x.view(B, T, 3, n_heads, hidden // n_heads).permute(2, 0, 3, 1, 4)  # 3 x (B, heads, T, head_dim)
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=layout.mask, dropout_p=dropout_p)
    return layout.pack(out.transpose(1, 2).reshape(B, T, hidden))


def segment_positions(attention_mask: torch.Tensor | None, batch: int, length: int,
                      device: torch.device) -> torch.Tensor:
    """Position of each token inside its sequence (0 at each sequence's first token), (B, T)."""
    idx = torch.arange(length, device=device).expand(batch, length)
    if attention_mask is None:
        return idx
    m = attention_mask
    change = torch.ones_like(m, dtype=torch.bool)
    change[:, 1:] = m[:, 1:] != m[:, :-1]
    start = torch.cummax(torch.where(change, idx, torch.zeros_like(idx)), dim=1).values
    return idx - start


def cumsum_in_segments(x: torch.Tensor, attention_mask: torch.Tensor | None) -> torch.Tensor:
    """Inclusive running sum of x (B, T) that restarts at every sequence of the mask."""
    total = torch.cumsum(x, dim=1)
    if attention_mask is None:
        return total
    B, T = x.shape
    start = torch.arange(T, device=x.device).expand(B, T) - segment_positions(attention_mask, B, T, x.device)
    return total - (total - x).gather(1, start)


def check_inputs(input_ids: torch.Tensor, attention_mask: torch.Tensor | None, positions: torch.Tensor | None,
                 token_type_ids: torch.Tensor | None) -> None:
    """Shapes of a forward call's tensors (errors here beat an index error deep in an embedding)."""
    from ..errors import InvalidArgumentError

    if input_ids.dim() != 2:
        raise InvalidArgumentError(f"input_ids must be (batch, tokens), got shape {list(input_ids.shape)}")
    for name, t in (("attention_mask", attention_mask), ("positions", positions), ("token_type_ids", token_type_ids)):
        if t is not None and t.shape != input_ids.shape:
            raise InvalidArgumentError(f"{name} has shape {list(t.shape)}, input_ids {list(input_ids.shape)}")


def check_positions(positions: torch.Tensor, table: int, max_tokens: int) -> None:
    """Positions must index the position table: a longer sequence is an error, not an index crash."""
    from ..errors import InvalidArgumentError

    if positions.numel() and (int(positions.max()) >= table or int(positions.min()) < 0):
        raise InvalidArgumentError(f"a sequence is longer than the model's {max_tokens} positions "
                                   f"(positions must be in [0, {table}))")


# --------------------------------------------------------------------------------------------- weights

def load_weights(model: nn.Module, tensors: Mapping[str, torch.Tensor], *, source: str, dtype: torch.dtype,
                 device: torch.device, base_prefix: str, ignored: Iterable[str] = ()) -> None:
    """Assign checkpoint tensors (HF names) to `model`, built on the meta device; no copies when dtypes match.

    As transformers does: `LayerNorm.gamma/beta` read as `LayerNorm.weight/bias`; a base model takes a
    headed checkpoint's `{base_prefix}.` tensors (dropping its heads) and a headed model takes a base
    checkpoint's tensors under `{base_prefix}.` (its head must then be in the checkpoint too: weights
    are never left random). `model.tied_weights()` ({name: name it shares}) lists the tied parameters:
    they need not be in the file and end up shared.
    ignored: name prefixes/suffixes the model does not use (old position_ids buffers, NSP heads, ...).
    """
    expected = model.state_dict()
    renamed: dict[str, torch.Tensor] = {}
    for name, value in tensors.items():
        name = name.replace("LayerNorm.gamma", "LayerNorm.weight").replace("LayerNorm.beta", "LayerNorm.bias")
        renamed[name] = value
    prefix = base_prefix + "."
    headed = any(k.startswith(prefix) for k in expected)
    in_file = any(k.startswith(prefix) for k in renamed)
    if not headed and in_file:
        renamed = {k[len(prefix):]: v for k, v in renamed.items() if k.startswith(prefix)}
    elif headed and not in_file:
        head_names = {k.split(".")[0] for k in expected if not k.startswith(prefix)}
        renamed = {k if k.split(".")[0] in head_names else prefix + k: v for k, v in renamed.items()}
    ignored = tuple(ignored)
    tied: dict[str, str] = model.tied_weights() if hasattr(model, "tied_weights") else {}
    unexpected = [k for k in renamed if k not in expected and not _matches(k, ignored) and k not in tied]
    if unexpected:
        raise CheckpointError(f"{source}: {len(unexpected)} tensors do not belong to a {type(model).__name__} "
                              f"with this config, e.g. {sorted(unexpected)[:4]}")
    missing = [k for k in expected if k not in renamed and k not in tied]
    if missing:
        raise CheckpointError(f"{source}: {len(missing)} tensors of {type(model).__name__} are missing, "
                              f"e.g. {missing[:4]}")
    state: dict[str, torch.Tensor] = {}
    for name, meta in expected.items():
        if name not in renamed:
            continue  # tied: filled below
        value = renamed[name]
        if tuple(value.shape) != tuple(meta.shape):
            raise CheckpointError(f"{source}: tensor {name!r} has shape {list(value.shape)}, "
                                  f"the model expects {list(meta.shape)}")
        if not value.is_floating_point():
            raise CheckpointError(f"{source}: tensor {name!r} has dtype {value.dtype}, expected a float type")
        t = value if value.dtype == dtype else value.to(dtype)
        state[name] = t if t.device == device else t.to(device)
    model.load_state_dict(state, strict=False, assign=True)
    for target, origin in tied.items():  # shared, as transformers ties them (even when the file has a copy)
        module, _, attr = target.rpartition(".")
        setattr(model.get_submodule(module), attr, model.get_parameter(origin))
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)


def _matches(name: str, patterns: tuple[str, ...]) -> bool:
    return any(name.startswith(p) or name.endswith(p) for p in patterns)


# --------------------------------------------------------------------------------------------- training

def classification_loss(logits: torch.Tensor, labels: torch.Tensor, *, problem_type: str | None,
                        num_labels: int) -> torch.Tensor:
    """The loss transformers' *ForSequenceClassification uses (problem_type inferred the same way when None).

    regression: MSE (logits squeezed when num_labels == 1); single_label_classification: cross-entropy
    over class ids; multi_label_classification: BCE-with-logits over 0/1 (float) label vectors.
    """
    if problem_type is None:
        if num_labels == 1:
            problem_type = "regression"
        elif labels.dtype in (torch.long, torch.int):
            problem_type = "single_label_classification"
        else:
            problem_type = "multi_label_classification"
    if problem_type == "regression":
        if num_labels == 1:
            return F.mse_loss(logits.squeeze(), labels.squeeze().to(logits.dtype))
        return F.mse_loss(logits, labels.to(logits.dtype))
    if problem_type == "single_label_classification":
        return F.cross_entropy(logits.view(-1, num_labels), labels.view(-1))
    return F.binary_cross_entropy_with_logits(logits, labels.to(logits.dtype))
