"""RoBERTa, XLM-RoBERTa and CamemBERT: BERT's layers with fairseq's position numbering and their own heads.

What differs from bert.py:
- positions start at padding_idx + 1 and count the non-padding tokens (`pad_token_id` keeps position
  padding_idx), as fairseq's `make_positions`; the usable length is max_position_embeddings - padding_idx - 1;
- no segment embeddings in practice (type_vocab_size 1: every token has type 0);
- heads: `lm_head` (dense -> exact GELU -> layer_norm -> decoder tied to the word embeddings, + bias);
  `classifier.dense` -> tanh -> `classifier.out_proj` on the <s> token (no pooler);
  token classification as in BERT.
Parameter names are transformers' (`roberta.encoder.layer.0.attention.self.query.weight`); XLM-R and
CamemBERT checkpoints use the same `roberta.` prefix.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import ConfigError
from .bert import _REFUSED, _REQUIRED, BertConfig, BertModel, HeadMixin
from .encoder_common import config_from_dict as _from_dict
from .encoder_common import cumsum_in_segments

BASE_PREFIX = "roberta"


@dataclass
class RobertaConfig(BertConfig):
    """config.json of roberta / xlm-roberta / camembert (transformers' RobertaConfig defaults)."""

    model_type: str = "roberta"
    vocab_size: int = 50265
    pad_token_id: int | None = 1
    bos_token_id: int | None = 0
    eos_token_id: int | None = 2

    def __post_init__(self, _source: str) -> None:
        if self.pad_token_id is None:
            raise ConfigError(f"{_source}: pad_token_id is required: RoBERTa numbers positions from it")
        super().__post_init__(_source)
        if self.max_position_embeddings <= self.pad_token_id + 1:
            raise ConfigError(f"{_source}: max_position_embeddings ({self.max_position_embeddings}) leaves no "
                              f"positions after padding_idx {self.pad_token_id}")

    @classmethod
    def from_dict(cls, data: dict[str, Any], *, source: str = "config.json") -> "RobertaConfig":
        if isinstance(data, dict):
            missing = [k for k in _REQUIRED if k not in data]
            if missing:
                raise ConfigError(f"{source}: missing required keys {missing}")
        return _from_dict(cls, data, source, refused=_REFUSED, renamed={"dtype": "torch_dtype"})

    @property
    def max_tokens(self) -> int:
        return self.max_position_embeddings - self.pad_token_id - 1


class RobertaModel(BertModel):
    """BERT's encoder with positions padding_idx + 1, padding_idx + 2, ... over the non-padding tokens."""

    def positions_for(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None) -> torch.Tensor:
        pad = self.config.pad_token_id
        real = (input_ids != pad).long()
        return cumsum_in_segments(real, attention_mask) * real + pad


class RobertaLMHead(nn.Module):
    def __init__(self, config: RobertaConfig):
        super().__init__()
        self.dense = nn.Linear(config.hidden_size, config.hidden_size)
        self.layer_norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.decoder = nn.Linear(config.hidden_size, config.vocab_size, bias=False)  # its bias is `bias`
        self.bias = nn.Parameter(torch.zeros(config.vocab_size))


class RobertaClassificationHead(nn.Module):
    def __init__(self, config: RobertaConfig):
        super().__init__()
        self.dense = nn.Linear(config.hidden_size, config.hidden_size)
        self.dropout = nn.Dropout(config.classifier_dropout_prob)
        self.out_proj = nn.Linear(config.hidden_size, config.num_labels)


class RobertaForMaskedLM(HeadMixin, nn.Module):
    """Masked-LM head: logits (B, T, vocab)."""

    base = BASE_PREFIX

    def __init__(self, config: RobertaConfig):
        super().__init__()
        self.roberta = RobertaModel(config, pooler=False)
        self.lm_head = RobertaLMHead(config)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        h = self.lm_head
        x = h.layer_norm(F.gelu(h.dense(hidden)))  # exact GELU whatever hidden_act says, as transformers
        return F.linear(x, h.decoder.weight, h.bias)

    def tied_weights(self) -> dict[str, str]:
        if not self.config.tie_word_embeddings:
            return {}
        return {"lm_head.decoder.weight": "roberta.embeddings.word_embeddings.weight"}


class RobertaForSequenceClassification(HeadMixin, nn.Module):
    """Classification / regression on the first token (<s>): logits (B, num_labels)."""

    base = BASE_PREFIX

    def __init__(self, config: RobertaConfig):
        super().__init__()
        self.roberta = RobertaModel(config, pooler=False)
        self.classifier = RobertaClassificationHead(config)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        c = self.classifier
        x = torch.tanh(c.dense(c.dropout(hidden[:, 0])))
        return c.out_proj(c.dropout(x))


class RobertaForTokenClassification(HeadMixin, nn.Module):
    """Per-token classification: logits (B, T, num_labels)."""

    base = BASE_PREFIX

    def __init__(self, config: RobertaConfig):
        super().__init__()
        self.roberta = RobertaModel(config, pooler=False)
        self.dropout = nn.Dropout(config.classifier_dropout_prob)
        self.classifier = nn.Linear(config.hidden_size, config.num_labels)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.dropout(hidden))


_CLASSES: dict[str, tuple[type[nn.Module], str]] = {
    "Model": (RobertaModel, "base"),
    "ForMaskedLM": (RobertaForMaskedLM, "masked_lm"),
    "ForSequenceClassification": (RobertaForSequenceClassification, "sequence_classification"),
    "ForTokenClassification": (RobertaForTokenClassification, "token_classification"),
}
ARCHITECTURES = {f"{prefix}{suffix}": entry for prefix in ("Roberta", "XLMRoberta", "Camembert")
                 for suffix, entry in _CLASSES.items()}
IGNORED = ("position_ids", "lm_head.decoder.bias")


def config_from_dict(data: dict[str, Any], *, source: str = "config.json") -> RobertaConfig:
    return RobertaConfig.from_dict(data, source=source)


def build(config: RobertaConfig, architecture: str, *, pooler: bool = True) -> nn.Module:
    """An uninitialized model (call under torch.device('meta') and load weights after)."""
    cls = ARCHITECTURES[architecture][0]
    return cls(config, pooler=pooler) if cls is RobertaModel else cls(config)


def ignored_weights(model: nn.Module) -> tuple[str, ...]:
    base = model if isinstance(model, RobertaModel) else model.roberta
    return IGNORED + (("pooler.", "roberta.pooler.") if base.pooler is None else ())
