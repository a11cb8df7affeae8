"""DistilBERT: BERT's post-LayerNorm encoder with its own names, no token types and no pooler.

    tokens -> word + position embeddings -> LayerNorm(eps 1e-12)
    N x [ x = sa_layer_norm(x + out_lin·attention(q_lin x, k_lin x, v_lin x));
          x = output_layer_norm(x + lin2·act(lin1 x)) ]
    heads: masked LM (vocab_transform -> act -> vocab_layer_norm -> vocab_projector, tied),
           sequence classification (pre_classifier -> ReLU -> classifier on the first token),
           token classification.

Config keys are DistilBERT's own (dim, n_layers, n_heads, hidden_dim, activation, ...); `hidden_size`
etc. are provided as properties, as transformers' attribute_map does. Sinusoidal position tables
(sinusoidal_pos_embds) are read from the checkpoint like learned ones. Contract as in bert.py.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import ConfigError, InvalidArgumentError
from .bert import EncoderModelMixin, HeadMixin, fuse_qkv
from .encoder_common import (
    EncoderConfigBase,
    Layout,
    activation,
    attention,
    check_activation,
    check_bool,
    check_inputs,
    check_positions,
    check_int,
    check_prob,
    config_from_dict as _from_dict,
    fused_linear,
    segment_positions,
    use_fused,
)

BASE_PREFIX = "distilbert"
_REQUIRED = ("vocab_size", "dim", "n_layers", "n_heads")
_EPS = 1e-12  # fixed in DistilBERT


@dataclass
class DistilBertConfig(EncoderConfigBase):
    """DistilBERT's config.json keys (transformers' DistilBertConfig names and defaults)."""

    model_type: str = "distilbert"
    vocab_size: int = 30522
    max_position_embeddings: int = 512
    sinusoidal_pos_embds: bool = False
    n_layers: int = 6
    n_heads: int = 12
    dim: int = 768
    hidden_dim: int = 3072
    dropout: float = 0.1
    attention_dropout: float = 0.1
    activation: str = "gelu"
    qa_dropout: float = 0.1
    seq_classif_dropout: float = 0.2

    def __post_init__(self, _source: str) -> None:
        src = _source
        for name in ("vocab_size", "max_position_embeddings", "n_layers", "n_heads", "dim", "hidden_dim"):
            check_int(getattr(self, name), name, src)
        if self.dim % self.n_heads:
            raise ConfigError(f"{src}: dim ({self.dim}) must be a multiple of n_heads ({self.n_heads})")
        check_activation(self.activation, "activation", src)
        check_bool(self.sinusoidal_pos_embds, "sinusoidal_pos_embds", src)
        for name in ("dropout", "attention_dropout", "qa_dropout", "seq_classif_dropout"):
            check_prob(getattr(self, name), name, src)
        self.labels_and_problem(src)

    @classmethod
    def from_dict(cls, data: dict[str, Any], *, source: str = "config.json") -> "DistilBertConfig":
        if isinstance(data, dict):
            missing = [k for k in _REQUIRED if k not in data]
            if missing:
                raise ConfigError(f"{source}: missing required keys {missing}")
        return _from_dict(cls, data, source, renamed={"dtype": "torch_dtype", "tie_weights_": "tie_word_embeddings"})

    # transformers' attribute_map
    @property
    def hidden_size(self) -> int:
        return self.dim

    @property
    def num_hidden_layers(self) -> int:
        return self.n_layers

    @property
    def num_attention_heads(self) -> int:
        return self.n_heads

    @property
    def max_tokens(self) -> int:
        return self.max_position_embeddings


class Embeddings(nn.Module):
    def __init__(self, config: DistilBertConfig):
        super().__init__()
        self.word_embeddings = nn.Embedding(config.vocab_size, config.dim)
        self.position_embeddings = nn.Embedding(config.max_position_embeddings, config.dim)
        self.LayerNorm = nn.LayerNorm(config.dim, eps=_EPS)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        return self.dropout(self.LayerNorm(self.word_embeddings(input_ids) + self.position_embeddings(positions)))


class MultiHeadSelfAttention(nn.Module):
    def __init__(self, config: DistilBertConfig):
        super().__init__()
        d = config.dim
        self.n_heads = config.n_heads
        self.dropout_p = config.attention_dropout
        self.q_lin, self.k_lin, self.v_lin, self.out_lin = (nn.Linear(d, d) for _ in range(4))
        self.qkv_lin: nn.Linear | None = None  # set by fuse_projections()

    def forward(self, x: torch.Tensor, layout: Layout) -> torch.Tensor:
        """out_lin(attention) + x (the residual, added in out_lin's epilogue on CPU inference)."""
        if self.qkv_lin is not None:
            qkv = fused_linear(x, self.qkv_lin)
        else:
            qkv = torch.cat([self.q_lin(x), self.k_lin(x), self.v_lin(x)], dim=-1)
        out = attention(qkv, layout, self.n_heads, self.dropout_p if self.training else 0.0)
        return fused_linear(out, self.out_lin, residual=x)


class FFN(nn.Module):
    def __init__(self, config: DistilBertConfig):
        super().__init__()
        self.lin1 = nn.Linear(config.dim, config.hidden_dim)
        self.lin2 = nn.Linear(config.hidden_dim, config.dim)
        self.act_name = config.activation
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """lin2(act(lin1 x)) + x (activation and residual in the matmuls' epilogues on CPU inference)."""
        h = fused_linear(x, self.lin1, act=self.act_name)
        if use_fused(h, self.lin2):
            return fused_linear(h, self.lin2, residual=x)
        return self.dropout(self.lin2(h)) + x


class TransformerBlock(nn.Module):
    def __init__(self, config: DistilBertConfig):
        super().__init__()
        self.attention = MultiHeadSelfAttention(config)
        self.sa_layer_norm = nn.LayerNorm(config.dim, eps=_EPS)
        self.ffn = FFN(config)
        self.output_layer_norm = nn.LayerNorm(config.dim, eps=_EPS)

    def forward(self, x: torch.Tensor, layout: Layout) -> torch.Tensor:
        x = self.sa_layer_norm(self.attention(x, layout))
        return self.output_layer_norm(self.ffn(x))


class Transformer(nn.Module):
    def __init__(self, config: DistilBertConfig):
        super().__init__()
        self.layer = nn.ModuleList(TransformerBlock(config) for _ in range(config.n_layers))


class DistilBertModel(EncoderModelMixin, nn.Module):
    """The bare encoder: forward -> last hidden states (B, T, dim)."""

    def __init__(self, config: DistilBertConfig, *, pooler: bool = False):
        super().__init__()
        self.config = config
        self.embeddings = Embeddings(config)
        self.transformer = Transformer(config)

    def hidden_states(self, input_ids: torch.Tensor, *, attention_mask: torch.Tensor | None = None,
                      token_type_ids: torch.Tensor | None = None, positions: torch.Tensor | None = None,
                      unpad: bool | None = None) -> torch.Tensor:
        """Last hidden states (B, T, dim); zeros at padded positions. token_type_ids must be None or zeros."""
        check_inputs(input_ids, attention_mask, positions, token_type_ids)
        if token_type_ids is not None and bool(token_type_ids.any()):
            raise InvalidArgumentError("DistilBERT has no token types: token_type_ids must be None or all zeros")
        B, T = input_ids.shape
        if positions is None:
            positions = segment_positions(attention_mask, B, T, input_ids.device)
        check_positions(positions, self.embeddings.position_embeddings.num_embeddings, self.config.max_tokens)
        layout = Layout.build(attention_mask, B, T, unpad=unpad)
        x = self.embeddings(layout.pack(input_ids), layout.pack(positions))
        x = self.run_layers(self.transformer.layer, x, layout)
        return layout.unpack(x)

    def forward(self, input_ids: torch.Tensor, *, attention_mask: torch.Tensor | None = None,
                token_type_ids: torch.Tensor | None = None, positions: torch.Tensor | None = None) -> torch.Tensor:
        return self.hidden_states(input_ids, attention_mask=attention_mask, token_type_ids=token_type_ids,
                                  positions=positions)

    @torch.no_grad()
    def fuse_projections(self) -> None:
        """q_lin/k_lin/v_lin -> one `qkv_lin` linear per layer."""
        for layer in self.transformer.layer:
            fuse_qkv(layer.attention, ("q_lin", "k_lin", "v_lin"), "qkv_lin")


class DistilBertForMaskedLM(HeadMixin, nn.Module):
    """Masked-LM head: logits (B, T, vocab); vocab_projector shares the word embeddings unless untied."""

    base = BASE_PREFIX

    def __init__(self, config: DistilBertConfig):
        super().__init__()
        self.act = activation(config.activation)
        self.distilbert = DistilBertModel(config)
        self.vocab_transform = nn.Linear(config.dim, config.dim)
        self.vocab_layer_norm = nn.LayerNorm(config.dim, eps=_EPS)
        self.vocab_projector = nn.Linear(config.dim, config.vocab_size)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.vocab_projector(self.vocab_layer_norm(self.act(self.vocab_transform(hidden))))

    def tied_weights(self) -> dict[str, str]:
        if not self.config.tie_word_embeddings:
            return {}
        return {"vocab_projector.weight": "distilbert.embeddings.word_embeddings.weight"}


class DistilBertForSequenceClassification(HeadMixin, nn.Module):
    """Classification / regression on the first token: pre_classifier -> ReLU -> classifier, (B, num_labels)."""

    base = BASE_PREFIX

    def __init__(self, config: DistilBertConfig):
        super().__init__()
        self.distilbert = DistilBertModel(config)
        self.pre_classifier = nn.Linear(config.dim, config.dim)
        self.classifier = nn.Linear(config.dim, config.num_labels)
        self.dropout = nn.Dropout(config.seq_classif_dropout)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.dropout(F.relu(self.pre_classifier(hidden[:, 0]))))


class DistilBertForTokenClassification(HeadMixin, nn.Module):
    """Per-token classification: logits (B, T, num_labels)."""

    base = BASE_PREFIX

    def __init__(self, config: DistilBertConfig):
        super().__init__()
        self.distilbert = DistilBertModel(config)
        self.dropout = nn.Dropout(config.dropout)
        self.classifier = nn.Linear(config.dim, config.num_labels)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.dropout(hidden))


ARCHITECTURES: dict[str, tuple[type[nn.Module], str]] = {
    "DistilBertModel": (DistilBertModel, "base"),
    "DistilBertForMaskedLM": (DistilBertForMaskedLM, "masked_lm"),
    "DistilBertForSequenceClassification": (DistilBertForSequenceClassification, "sequence_classification"),
    "DistilBertForTokenClassification": (DistilBertForTokenClassification, "token_classification"),
}
IGNORED = ("position_ids",)


def config_from_dict(data: dict[str, Any], *, source: str = "config.json") -> DistilBertConfig:
    return DistilBertConfig.from_dict(data, source=source)


def build(config: DistilBertConfig, architecture: str, *, pooler: bool = True) -> nn.Module:
    """An uninitialized model (call under torch.device('meta') and load weights after); no pooler exists."""
    return ARCHITECTURES[architecture][0](config)


def ignored_weights(model: nn.Module) -> tuple[str, ...]:
    return IGNORED
