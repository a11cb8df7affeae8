"""BERT (and the checkpoints built on it: MiniLM, bge, e5, ...): a bidirectional post-LayerNorm encoder.

    tokens -> word + position (absolute, learned) + token type embeddings -> LayerNorm
    N x [ x = LN(x + Wo·attention(Wq x, Wk x, Wv x));  x = LN(x + W2·act(W1 x)) ]
    heads: pooler (tanh(W h[CLS])), masked LM, sequence classification (on the pooler), token classification

Module and parameter names are transformers' (`bert.encoder.layer.0.attention.self.query.weight`), so
checkpoints load without a mapping table. The model contract for encoders:
`hidden_states(input_ids, *, attention_mask=None, token_type_ids=None, positions=None) -> (B, T, hidden)`,
`logits(hidden)` (the head), `forward = logits(hidden_states(...))` (the base model's forward returns the
hidden states). attention_mask (B, T): 0 = padding, equal positive values = one sequence (packed rows);
padded positions of the result are zeros. positions default to each token's index in its sequence.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from ..errors import ConfigError
from .encoder_common import (
    EncoderConfigBase,
    Layout,
    activation,
    fused_linear,
    use_fused,
    attention,
    check_activation,
    check_eps,
    check_inputs,
    check_positions,
    check_int,
    check_prob,
    config_from_dict as _from_dict,
    segment_positions,
)

BASE_PREFIX = "bert"
_REQUIRED = ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads")
# keys whose other values change the architecture in ways not implemented here
_REFUSED = {"is_decoder": False, "add_cross_attention": False, "position_embedding_type": "absolute"}


@dataclass
class BertConfig(EncoderConfigBase):
    """BERT's config.json keys (transformers' BertConfig names and defaults)."""

    model_type: str = "bert"
    vocab_size: int = 30522
    hidden_size: int = 768
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    intermediate_size: int = 3072
    hidden_act: str = "gelu"
    hidden_dropout_prob: float = 0.1
    attention_probs_dropout_prob: float = 0.1
    max_position_embeddings: int = 512
    type_vocab_size: int = 2
    layer_norm_eps: float = 1e-12
    classifier_dropout: float | None = None
    position_embedding_type: str = "absolute"

    def __post_init__(self, _source: str) -> None:
        src = _source
        for name in ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size",
                     "max_position_embeddings", "type_vocab_size"):
            check_int(getattr(self, name), name, src)
        if self.hidden_size % self.num_attention_heads:
            raise ConfigError(f"{src}: hidden_size ({self.hidden_size}) must be a multiple of "
                              f"num_attention_heads ({self.num_attention_heads})")
        check_activation(self.hidden_act, "hidden_act", src)
        for name in ("hidden_dropout_prob", "attention_probs_dropout_prob", "classifier_dropout"):
            check_prob(getattr(self, name), name, src)
        check_eps(self.layer_norm_eps, "layer_norm_eps", src)
        if self.pad_token_id is not None and self.pad_token_id >= self.vocab_size:
            raise ConfigError(f"{src}: pad_token_id {self.pad_token_id} is outside the vocabulary ({self.vocab_size})")
        self.labels_and_problem(src)

    @classmethod
    def from_dict(cls, data: dict[str, Any], *, source: str = "config.json") -> "BertConfig":
        """Build from a config.json dict; `source` names the file in error messages."""
        if isinstance(data, dict):
            missing = [k for k in _REQUIRED if k not in data]
            if missing:
                raise ConfigError(f"{source}: missing required keys {missing}")
        return _from_dict(cls, data, source, refused=_REFUSED, renamed={"dtype": "torch_dtype"})

    @property
    def max_tokens(self) -> int:
        """The longest sequence the position table covers."""
        return self.max_position_embeddings

    @property
    def classifier_dropout_prob(self) -> float:
        return self.hidden_dropout_prob if self.classifier_dropout is None else self.classifier_dropout


# ------------------------------------------------------------------------------------------------ modules

class BertEmbeddings(nn.Module):
    def __init__(self, config: BertConfig):
        super().__init__()
        self.word_embeddings = nn.Embedding(config.vocab_size, config.hidden_size)
        self.position_embeddings = nn.Embedding(config.max_position_embeddings, config.hidden_size)
        self.token_type_embeddings = nn.Embedding(config.type_vocab_size, config.hidden_size)
        self.LayerNorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.dropout = nn.Dropout(config.hidden_dropout_prob)

    def forward(self, input_ids: torch.Tensor, token_type_ids: torch.Tensor | None,
                positions: torch.Tensor) -> torch.Tensor:
        x = self.word_embeddings(input_ids) + self.position_embeddings(positions)
        if token_type_ids is None:
            x = x + self.token_type_embeddings.weight[0]
        else:
            x = x + self.token_type_embeddings(token_type_ids)
        return self.dropout(self.LayerNorm(x))


class BertSelfAttention(nn.Module):
    def __init__(self, config: BertConfig):
        super().__init__()
        h = config.hidden_size
        self.n_heads = config.num_attention_heads
        self.dropout_p = config.attention_probs_dropout_prob
        self.query, self.key, self.value = nn.Linear(h, h), nn.Linear(h, h), nn.Linear(h, h)
        self.qkv: nn.Linear | None = None  # set by fuse_projections()

    def forward(self, x: torch.Tensor, layout: Layout) -> torch.Tensor:
        if self.qkv is not None:
            qkv = fused_linear(x, self.qkv)
        else:
            qkv = torch.cat([self.query(x), self.key(x), self.value(x)], dim=-1)
        return attention(qkv, layout, self.n_heads, self.dropout_p if self.training else 0.0)


class BertSelfOutput(nn.Module):
    def __init__(self, config: BertConfig, d_in: int):
        super().__init__()
        self.dense = nn.Linear(d_in, config.hidden_size)
        self.LayerNorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.dropout = nn.Dropout(config.hidden_dropout_prob)

    def forward(self, x: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        if use_fused(x, self.dense):  # inference: matmul + bias + residual in one call (dropout is off)
            return self.LayerNorm(fused_linear(x, self.dense, residual=residual))
        return self.LayerNorm(self.dropout(self.dense(x)) + residual)


class BertAttention(nn.Module):
    def __init__(self, config: BertConfig):
        super().__init__()
        self.self = BertSelfAttention(config)
        self.output = BertSelfOutput(config, config.hidden_size)


class BertIntermediate(nn.Module):
    def __init__(self, config: BertConfig):
        super().__init__()
        self.dense = nn.Linear(config.hidden_size, config.intermediate_size)
        self.act_name = config.hidden_act

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return fused_linear(x, self.dense, act=self.act_name)


class BertLayer(nn.Module):
    def __init__(self, config: BertConfig):
        super().__init__()
        self.attention = BertAttention(config)
        self.intermediate = BertIntermediate(config)
        self.output = BertSelfOutput(config, config.intermediate_size)  # "BertOutput": same shape of module

    def forward(self, x: torch.Tensor, layout: Layout) -> torch.Tensor:
        x = self.attention.output(self.attention.self(x, layout), x)
        return self.output(self.intermediate(x), x)


class BertEncoder(nn.Module):
    def __init__(self, config: BertConfig):
        super().__init__()
        self.layer = nn.ModuleList(BertLayer(config) for _ in range(config.num_hidden_layers))


class BertPooler(nn.Module):
    def __init__(self, config: BertConfig):
        super().__init__()
        self.dense = nn.Linear(config.hidden_size, config.hidden_size)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        """tanh(W h + b) of each row's first token ([CLS]): (B, T, hidden) -> (B, hidden)."""
        return torch.tanh(self.dense(hidden[:, 0]))


class EncoderModelMixin:
    """The contract's common surface: device/dtype, gradient checkpointing, fused projections."""

    gradient_checkpointing = False
    quantization = None

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.parameters()).dtype

    def run_layers(self, layers: nn.ModuleList, x: torch.Tensor, layout: Layout) -> torch.Tensor:
        for layer in layers:
            if self.gradient_checkpointing and self.training and torch.is_grad_enabled():
                x = checkpoint(layer, x, layout, use_reentrant=False)
            else:
                x = layer(x, layout)
        return x


class BertModel(EncoderModelMixin, nn.Module):
    """The bare encoder (+ pooler when the checkpoint has one): forward -> last hidden states (B, T, hidden)."""

    def __init__(self, config: BertConfig, *, pooler: bool = True):
        super().__init__()
        self.config = config
        self.embeddings = BertEmbeddings(config)
        self.encoder = BertEncoder(config)
        self.pooler = BertPooler(config) if pooler else None

    def positions_for(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None) -> torch.Tensor:
        B, T = input_ids.shape
        return segment_positions(attention_mask, B, T, input_ids.device)

    def hidden_states(self, input_ids: torch.Tensor, *, attention_mask: torch.Tensor | None = None,
                      token_type_ids: torch.Tensor | None = None, positions: torch.Tensor | None = None,
                      unpad: bool | None = None) -> torch.Tensor:
        """Last hidden states (B, T, hidden); zeros at padded positions. unpad: force a Layout mode."""
        check_inputs(input_ids, attention_mask, positions, token_type_ids)
        B, T = input_ids.shape
        if positions is None:
            positions = self.positions_for(input_ids, attention_mask)
        check_positions(positions, self.embeddings.position_embeddings.num_embeddings, self.config.max_tokens)
        layout = Layout.build(attention_mask, B, T, unpad=unpad)
        types = None if token_type_ids is None else layout.pack(token_type_ids)
        x = self.embeddings(layout.pack(input_ids), types, layout.pack(positions))
        x = self.run_layers(self.encoder.layer, x, layout)
        return layout.unpack(x)

    def forward(self, input_ids: torch.Tensor, *, attention_mask: torch.Tensor | None = None,
                token_type_ids: torch.Tensor | None = None, positions: torch.Tensor | None = None) -> torch.Tensor:
        return self.hidden_states(input_ids, attention_mask=attention_mask, token_type_ids=token_type_ids,
                                  positions=positions)

    @torch.no_grad()
    def fuse_projections(self) -> None:
        """query/key/value -> one `qkv` linear per layer (one larger matmul; for inference, not LoRA)."""
        for layer in self.encoder.layer:
            fuse_qkv(layer.attention.self, ("query", "key", "value"), "qkv")


def fuse_qkv(module: nn.Module, names: tuple[str, str, str], fused: str) -> None:
    """Replace three nn.Linear attributes of `module` by their concatenation (the attribute `fused`)."""
    linears = [getattr(module, n) for n in names]
    if getattr(module, fused) is not None or not all(type(m) is nn.Linear for m in linears):
        return
    w = torch.cat([m.weight for m in linears], dim=0)
    b = torch.cat([m.bias for m in linears], dim=0)
    lin = nn.Linear(w.shape[1], w.shape[0], device="meta")
    lin.weight, lin.bias = nn.Parameter(w, requires_grad=False), nn.Parameter(b, requires_grad=False)
    lin.train(module.training)
    setattr(module, fused, lin)
    for n in names:
        delattr(module, n)
        setattr(module, n, None)


# ------------------------------------------------------------------------------------------------ heads

class HeadMixin(EncoderModelMixin):
    """forward = logits(hidden_states(...)) for the models with a head on `self.<base_prefix>`."""

    base: str = BASE_PREFIX

    @property
    def config(self):
        return getattr(self, self.base).config

    def hidden_states(self, input_ids: torch.Tensor, **kwargs: Any) -> torch.Tensor:
        return getattr(self, self.base).hidden_states(input_ids, **kwargs)

    def forward(self, input_ids: torch.Tensor, *, attention_mask: torch.Tensor | None = None,
                token_type_ids: torch.Tensor | None = None, positions: torch.Tensor | None = None) -> torch.Tensor:
        return self.logits(self.hidden_states(input_ids, attention_mask=attention_mask,
                                              token_type_ids=token_type_ids, positions=positions))

    def fuse_projections(self) -> None:
        getattr(self, self.base).fuse_projections()


class BertPredictionHeadTransform(nn.Module):
    def __init__(self, config: BertConfig):
        super().__init__()
        self.dense = nn.Linear(config.hidden_size, config.hidden_size)
        self.act = activation(config.hidden_act)
        self.LayerNorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)


class BertLMPredictionHead(nn.Module):
    def __init__(self, config: BertConfig):
        super().__init__()
        self.transform = BertPredictionHeadTransform(config)
        self.decoder = nn.Linear(config.hidden_size, config.vocab_size, bias=False)  # its bias is `bias`
        self.bias = nn.Parameter(torch.zeros(config.vocab_size))


class BertOnlyMLMHead(nn.Module):
    def __init__(self, config: BertConfig):
        super().__init__()
        self.predictions = BertLMPredictionHead(config)


class BertForMaskedLM(HeadMixin, nn.Module):
    """Masked-LM head: logits (B, T, vocab). The decoder shares the word embeddings unless untied."""

    def __init__(self, config: BertConfig):
        super().__init__()
        self.bert = BertModel(config, pooler=False)
        self.cls = BertOnlyMLMHead(config)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        p = self.cls.predictions
        t = p.transform
        h = t.LayerNorm(t.act(t.dense(hidden)))
        return F.linear(h, p.decoder.weight, p.bias)

    def tied_weights(self) -> dict[str, str]:
        if not self.config.tie_word_embeddings:
            return {}
        return {"cls.predictions.decoder.weight": "bert.embeddings.word_embeddings.weight"}


class BertForSequenceClassification(HeadMixin, nn.Module):
    """Sequence classification / regression on the pooled [CLS] token: logits (B, num_labels)."""

    def __init__(self, config: BertConfig):
        super().__init__()
        self.bert = BertModel(config, pooler=True)
        self.dropout = nn.Dropout(config.classifier_dropout_prob)
        self.classifier = nn.Linear(config.hidden_size, config.num_labels)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.dropout(self.bert.pooler(hidden)))


class BertForTokenClassification(HeadMixin, nn.Module):
    """Per-token classification: logits (B, T, num_labels)."""

    def __init__(self, config: BertConfig):
        super().__init__()
        self.bert = BertModel(config, pooler=False)
        self.dropout = nn.Dropout(config.classifier_dropout_prob)
        self.classifier = nn.Linear(config.hidden_size, config.num_labels)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.dropout(hidden))


# ------------------------------------------------------------------------------------------------ building

# HF architecture name -> (class, task); BertForPreTraining checkpoints load as masked LMs (NSP head dropped)
ARCHITECTURES: dict[str, tuple[type[nn.Module], str]] = {
    "BertModel": (BertModel, "base"),
    "BertForMaskedLM": (BertForMaskedLM, "masked_lm"),
    "BertForPreTraining": (BertForMaskedLM, "masked_lm"),
    "BertForSequenceClassification": (BertForSequenceClassification, "sequence_classification"),
    "BertForTokenClassification": (BertForTokenClassification, "token_classification"),
}
IGNORED = ("position_ids", "cls.seq_relationship.", "cls.predictions.decoder.bias")


def config_from_dict(data: dict[str, Any], *, source: str = "config.json") -> BertConfig:
    return BertConfig.from_dict(data, source=source)


def build(config: BertConfig, architecture: str, *, pooler: bool = True) -> nn.Module:
    """An uninitialized model (call under torch.device('meta') and load weights after).

    pooler: for the base model, whether to include the pooler (checkpoints without one exist).
    """
    cls = ARCHITECTURES[architecture][0]
    return cls(config, pooler=pooler) if cls is BertModel else cls(config)


def ignored_weights(model: nn.Module) -> tuple[str, ...]:
    """Checkpoint tensors a model of this family does not use (its pooler when it has none, ...)."""
    base = model if isinstance(model, BertModel) else model.bert
    return IGNORED + (("pooler.", "bert.pooler.") if base.pooler is None else ())

