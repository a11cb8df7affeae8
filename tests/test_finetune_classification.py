"""Classification fine-tuning of encoders: parity with transformers' Trainer, HF / PEFT outputs, resume, metrics,
bad input, and a real multi-label fine-tune of the bundled MiniLM (slow).

Tiny random encoders are built and saved by transformers (test_encoders.save_tiny_encoder) with dropout 0, so
that a training step is deterministic on both sides.
"""

from __future__ import annotations

import json
import random
import shutil
from pathlib import Path

import pytest
import torch

import leanformers
from finetune_utils import metrics, torch_threads, trainer_losses
from leanformers.cli import main
from leanformers.encoder import add_classification_head, load_encoder
from leanformers.errors import InvalidArgumentError
from leanformers.train import DataError
from test_encoders import LABELS, TEXTS, save_tiny_encoder

NAMES = LABELS["ForSequenceClassification"]  # negative, neutral, positive
WORDS = ("the quick brown fox jumps over the lazy dog while a small model learns short and long sentences "
         "about").split()
NO_DROPOUT = {"bert": dict(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0),
              "roberta": dict(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0),
              "distilbert": dict(dropout=0.0, attention_dropout=0.0, seq_classif_dropout=0.0)}
LR = 1e-3
COMMON = dict(task="classification", precision="fp32", seed=42, save_every=None, seq_len=64)


@pytest.fixture(scope="module")
def encoders(tmp_path_factory) -> dict[str, Path]:
    """Tiny random transformers encoders without dropout: bert classifier, and bert/roberta/distilbert bases."""
    root = tmp_path_factory.mktemp("cls")
    out = {"bert-cls": save_tiny_encoder("bert", "ForSequenceClassification", root / "bert-cls", **NO_DROPOUT["bert"])}
    for family in NO_DROPOUT:
        out[family] = save_tiny_encoder(family, "Model", root / family, **NO_DROPOUT[family])
    return out


def sentence(rng: random.Random) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(rng.randint(2, 14)))


def write_data(path: Path, n: int, *, kind: str = "label", pairs: bool = False, seed: int = 0,
               names=NAMES) -> Path:
    """n records: "label" (a name), "labels" (0-2 names), or "index" (a "label" index). Each label puts its own
    cue word into the text, so that the labels can be learned."""
    rng = random.Random(seed)
    cue = dict(zip(names, ["cats", "code", "weather", "numbers"]))
    recs = []
    for _ in range(n):
        chosen = rng.sample(list(names), rng.randint(0, 2) if kind == "labels" else 1)
        words = sentence(rng).split()
        for name in chosen:
            words.insert(rng.randrange(len(words) + 1), cue[name])
        rec = {"text": " ".join(words)}
        if pairs:
            rec["text_pair"] = sentence(rng)
        if kind == "label":
            rec["label"] = chosen[0]
        elif kind == "index":
            rec["label"] = list(names).index(chosen[0])
        else:
            rec["labels"] = chosen
        recs.append(rec)
    path.write_text("\n".join(json.dumps(r) for r in recs) + "\n")
    return path


def hf_rows(model_dir: Path, data: Path, order: list[int], names: list[str], multi: bool) -> list[dict]:
    """The records in `order`, tokenized by transformers' tokenizer, with transformers' label tensors."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(model_dir))
    recs = [json.loads(line) for line in data.read_text().splitlines()]
    rows = []
    for i in order:
        r = recs[i]
        enc = tok(r["text"], r.get("text_pair"), return_token_type_ids=True)
        if multi:
            label = [1.0 if n in r["labels"] else 0.0 for n in names]
        else:
            label = names.index(r["label"])
        rows.append({"input_ids": enc["input_ids"], "token_type_ids": enc["token_type_ids"], "labels": label})
    return rows


def collate_cls(pad_id: int):
    def collate(batch):
        T = max(len(r["input_ids"]) for r in batch)
        ids = torch.full((len(batch), T), pad_id)
        types = torch.zeros((len(batch), T), dtype=torch.long)
        mask = torch.zeros((len(batch), T), dtype=torch.long)
        for b, r in enumerate(batch):
            n = len(r["input_ids"])
            ids[b, :n], types[b, :n], mask[b, :n] = torch.tensor(r["input_ids"]), torch.tensor(r["token_type_ids"]), 1
        return {"input_ids": ids, "token_type_ids": types, "attention_mask": mask,
                "labels": torch.tensor([r["labels"] for r in batch])}
    return collate


def our_dataset(model_dir: Path, data: Path, **options):
    """The classification Dataset finetune() builds (same loading, labels and tokenization)."""
    from leanformers.train.args import FinetuneArgs
    from leanformers.train.classification import (build_classification_dataset, read_classification_records,
                                                  resolve_labels)

    args = FinetuneArgs(model=str(model_dir), data=str(data), output_dir="unused", **{**COMMON, **options}).check()
    enc = load_encoder(model_dir, dtype="float32", fuse=False, task="sequence_classification")
    records = read_classification_records(data)
    space = resolve_labels(records, enc, args, str(data))
    return build_classification_dataset(data, records, enc, space, seq_len=64, batch_size=args.batch_size,
                                        grad_accum=args.grad_accum, seed=42)


# --------------------------------------------------------------------------------------------- parity

@pytest.mark.parametrize("problem,grad_accum", [("single", 1), ("multi", 2)])
def test_losses_equal_trainer(encoders, tmp_path, problem, grad_accum):
    """10 steps of full fine-tuning (fp32, AdamW, warmup + cosine, clipping): the same per-step losses as
    transformers' Trainer given the same initial weights and the same batches (tokenized by transformers)."""
    from transformers import AutoModelForSequenceClassification

    steps, bs, multi = 10, 4, problem == "multi"
    model_dir = encoders["bert-cls"]
    data = write_data(tmp_path / "train.jsonl", steps * bs * grad_accum, kind="labels" if multi else "label",
                      pairs=not multi)
    opts = dict(method="full", max_steps=steps, batch_size=bs, grad_accum=grad_accum, lr=LR, weight_decay=0.01,
                warmup_steps=2, lr_schedule="cosine")
    res = leanformers.finetune(str(model_dir), data=str(data), output_dir=str(tmp_path / "out"), **COMMON, **opts)
    ours = [m["loss"] for m in metrics(res.output_dir)]
    ds = our_dataset(model_dir, data, batch_size=bs, grad_accum=grad_accum)
    assert ds.token_types and ds.problem_type == ("multi_label_classification" if multi else
                                                  "single_label_classification")
    order = ds.order(0)[: steps * bs * grad_accum]
    rows = hf_rows(model_dir, data, order, NAMES, multi)
    for i, row in zip(order, rows):  # our tokenization (pairs and token types included) is transformers'
        assert (ds.rows[i].input_ids, ds.rows[i].token_type_ids) == (row["input_ids"], row["token_type_ids"])
    hf = AutoModelForSequenceClassification.from_pretrained(
        str(model_dir), dtype=torch.float32, problem_type="multi_label_classification" if multi else None)
    # transformers' sequence-classification heads declare **kwargs but drop num_items_in_batch, so Trainer skips
    # its 1/grad_accum scaling and trains on grad_accum times the mean loss (huggingface/transformers#47688);
    # this is Trainer's documented switch for a head that averages per micro-batch itself
    hf.accepts_loss_kwargs = False
    theirs = trainer_losses(hf, rows, ds.pad_id, tmp_path / "hf", batch_size=bs, grad_accum=grad_accum, steps=steps,
                            lr=LR, weight_decay=0.01, warmup=2, schedule="cosine",
                            collate_fn=collate_cls(ds.pad_id))
    print("leanformers", ours, "\ntransformers", theirs)
    assert len(ours) == len(theirs) == steps
    for a, b in zip(ours, theirs):
        assert abs(a - b) <= 1e-5 * abs(b), (ours, theirs)
    trained = leanformers.load(str(res.output_dir)).model.classifier.weight
    assert (trained - hf.classifier.weight.detach()).abs().max() < 1e-5  # the same weights at the end, too
    assert (trained - load_encoder(model_dir).model.classifier.weight).abs().max() > 1e-3  # and they moved


def test_lora_losses_equal_peft_trainer(encoders, tmp_path):
    """10 LoRA steps on a classifier (LoRA on query/value, the head trained whole): the same per-step losses as
    peft (task_type SEQ_CLS, whose modules_to_save is the classifier) under transformers' Trainer, from the same
    initial adapter and head, on the same batches; the trained head ends up the same too."""
    from peft import LoraConfig, get_peft_model, set_peft_model_state_dict
    from safetensors.torch import load_file
    from transformers import AutoModelForSequenceClassification

    from leanformers.train.args import FinetuneArgs
    from leanformers.train.classification import prepare_model, read_classification_records, resolve_labels
    from leanformers.train.lora import adapter_state

    steps, bs, targets = 10, 4, ["query", "value"]
    model_dir = encoders["bert-cls"]
    data = write_data(tmp_path / "train.jsonl", steps * bs, pairs=True)
    opts = dict(method="lora", lora_r=4, lora_alpha=8, target_modules=targets, max_steps=steps, batch_size=bs,
                lr=5e-3, weight_decay=0.01, warmup_steps=2, lr_schedule="cosine")
    res = leanformers.finetune(str(model_dir), data=str(data), output_dir=str(tmp_path / "out"), **COMMON, **opts)
    ours = [m["loss"] for m in metrics(res.output_dir)]
    # the initial adapter and head finetune() made (seeded), handed to peft
    args = FinetuneArgs(model=str(model_dir), data=str(data), output_dir="unused", **COMMON, **opts).check()
    enc = load_encoder(model_dir, dtype="float32", fuse=False, task="sequence_classification")
    space = resolve_labels(read_classification_records(data), enc, args, str(data))
    prepared = prepare_model(enc, space, args, torch.float32)
    assert prepared.modules_to_save == ["classifier"] and len(prepared.lora_targets) == 4  # 2 layers x q, v
    init = adapter_state(enc.model, prepared.modules_to_save)
    hf = AutoModelForSequenceClassification.from_pretrained(str(model_dir), dtype=torch.float32)
    peft_model = get_peft_model(hf, LoraConfig(r=4, lora_alpha=8, target_modules=targets, lora_dropout=0.0,
                                               task_type="SEQ_CLS"))
    result = set_peft_model_state_dict(peft_model, init)
    assert not result.unexpected_keys
    head = peft_model.base_model.model.classifier.modules_to_save["default"]
    assert torch.equal(head.weight, init["base_model.model.classifier.weight"])
    trainable = sorted(n for n, p in peft_model.named_parameters() if p.requires_grad)
    assert len(trainable) == 2 * 4 + 2, trainable  # lora_A/B of 4 linears + the head's weight and bias
    ds = our_dataset(model_dir, data, batch_size=bs)
    order = ds.order(0)[: steps * bs]
    rows = hf_rows(model_dir, data, order, NAMES, False)
    theirs = trainer_losses(peft_model, rows, ds.pad_id, tmp_path / "hf", batch_size=bs, grad_accum=1, steps=steps,
                            lr=5e-3, weight_decay=0.01, warmup=2, schedule="cosine", collate_fn=collate_cls(ds.pad_id))
    print("leanformers", ours, "\npeft", theirs)
    assert len(ours) == len(theirs) == steps
    for a, b in zip(ours, theirs):
        assert abs(a - b) <= 1e-5 * abs(b), (ours, theirs)
    saved = load_file(str(res.output_dir / "adapter_model.safetensors"))
    trained = saved["base_model.model.classifier.weight"]
    assert (trained - head.weight.detach()).abs().max() < 1e-5
    assert (trained - init["base_model.model.classifier.weight"]).abs().max() > 1e-3  # and it moved


def test_new_head_is_initialized_as_transformers(encoders, tmp_path):
    """A base checkpoint gets transformers' head: new linears ~ normal(0, initializer_range), zero bias; the
    checkpoint's pooler kept; a pooler-less checkpoint gets a new pooler (transformers initializes it too)."""
    from safetensors.torch import load_file, save_file
    from transformers import AutoModelForSequenceClassification

    labels = {0: "a", 1: "b", 2: "c"}
    hf = AutoModelForSequenceClassification.from_pretrained(str(encoders["bert"]), num_labels=3)
    enc = load_encoder(encoders["bert"], fuse=False)
    torch.manual_seed(0)
    new = add_classification_head(enc, labels, None)
    assert new == ["classifier"] and enc.task == "sequence_classification"
    assert enc.architecture == "BertForSequenceClassification" and enc.config.id2label == labels
    for ours, theirs in ((enc.model.classifier, hf.classifier),):
        for t in (ours.weight, theirs.weight):
            t = t.detach()
            assert abs(float(t.mean())) < 0.01 and 0.012 < float(t.std()) < 0.028  # std 0.02 on 96 values
        assert not ours.bias.any() and not theirs.bias.any()
    assert torch.equal(enc.model.bert.pooler.dense.weight, hf.bert.pooler.dense.weight)  # from the checkpoint
    # without a pooler in the file: a new one, initialized the same way
    d = tmp_path / "nopooler"
    shutil.copytree(encoders["bert"], d)
    state = {k: v for k, v in load_file(str(d / "model.safetensors")).items() if "pooler" not in k}
    save_file(state, str(d / "model.safetensors"), metadata={"format": "pt"})
    enc = load_encoder(d, fuse=False)
    assert enc.model.pooler is None
    new = add_classification_head(enc, labels, "multi_label_classification")
    assert new == ["bert.pooler.dense", "classifier"] and enc.config.problem_type == "multi_label_classification"
    w = enc.model.bert.pooler.dense.weight
    assert 0.015 < float(w.std()) < 0.025 and not enc.model.bert.pooler.dense.bias.any()
    assert enc.classify(TEXTS).function == "sigmoid"


@pytest.mark.parametrize("family", ["bert", "roberta", "distilbert"])
def test_full_finetune_of_a_base_saves_a_transformers_classifier(encoders, tmp_path, family):
    """A base encoder + labels from the data -> an AutoModelForSequenceClassification directory: transformers
    loads every tensor (nothing missing or new) with the same logits, and leanformers.load(out).classify works."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    data = write_data(tmp_path / "train.jsonl", 24, names=["sports", "food", "music"])
    res = leanformers.finetune(str(encoders[family]), data=str(data), output_dir=str(tmp_path / "out"),
                               method="full", max_steps=4, batch_size=6, lr=1e-3, **COMMON)
    out = res.output_dir
    config = json.loads((out / "config.json").read_text())
    assert config["id2label"] == {"0": "food", "1": "music", "2": "sports"}  # the data's names, sorted
    assert config["problem_type"] == "single_label_classification"
    hf, info = AutoModelForSequenceClassification.from_pretrained(str(out), dtype=torch.float32,
                                                                  output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    tok = AutoTokenizer.from_pretrained(str(out))
    with torch.no_grad():
        theirs = hf.eval()(**tok(TEXTS, padding=True, return_tensors="pt")).logits
    clf = leanformers.load(str(out))
    res_cls = clf.classify(TEXTS, batch_size=2)
    assert (res_cls.logits - theirs).abs().max() <= 1e-5
    assert res_cls.labels == [hf.config.id2label[int(i)] for i in theirs.argmax(-1)]
    before = load_encoder(encoders[family]).embed(TEXTS, normalize=False)
    after = clf.embed(TEXTS, normalize=False)
    assert (before - after).abs().max() > 1e-4  # the encoder itself was trained (full fine-tuning)


@pytest.mark.parametrize("family", ["bert", "roberta", "distilbert"])
def test_lora_adapter_loads_in_peft_with_same_logits(encoders, tmp_path, family):
    """LoRA on a base encoder: a PEFT SEQ_CLS adapter (head in modules_to_save) that peft applies over
    transformers' classifier (built with classifier_config.json) with leanformers' logits."""
    from peft import PeftModel
    from safetensors.torch import load_file
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    data = write_data(tmp_path / "train.jsonl", 24, kind="labels")
    res = leanformers.finetune(str(encoders[family]), data=str(data), output_dir=str(tmp_path / "out"),
                               method="lora", lora_r=4, lora_alpha=8, max_steps=4, batch_size=6, lr=5e-3, **COMMON)
    out = res.output_dir
    cfg = json.loads((out / "adapter_config.json").read_text())
    head = {"bert": ["classifier"], "roberta": ["classifier"], "distilbert": ["pre_classifier", "classifier"]}
    assert cfg["task_type"] == "SEQ_CLS" and sorted(cfg["modules_to_save"]) == sorted(head[family])
    assert not any("classifier" in t for t in cfg["target_modules"])  # the head trains whole, without LoRA
    state = load_file(str(out / "adapter_model.safetensors"))
    assert any(k.endswith("lora_B.weight") and v.abs().sum() > 0 for k, v in state.items())  # trained
    assert "base_model.model.classifier.weight" in state or "base_model.model.classifier.out_proj.weight" in state
    labels = json.loads((out / "classifier_config.json").read_text())
    assert labels["problem_type"] == "multi_label_classification" and labels["num_labels"] == 3
    hf = AutoModelForSequenceClassification.from_pretrained(str(encoders[family]), dtype=torch.float32, **labels)
    peft_model = PeftModel.from_pretrained(hf, str(out)).eval()
    tok = AutoTokenizer.from_pretrained(str(encoders[family]))
    batch = tok(TEXTS, padding=True, return_tensors="pt")
    if family != "bert":
        batch.pop("token_type_ids", None)
    with torch.no_grad():
        theirs = peft_model(**batch).logits
    clf = leanformers.load(str(out))  # the base named by adapter_config.json, the head, the adapter
    ours = clf.classify(TEXTS).logits
    assert (ours - theirs).abs().max() <= 1e-5
    again = leanformers.load(str(encoders[family]), adapter=str(out)).classify(TEXTS).logits
    assert torch.equal(again, ours)


def test_gradient_checkpointing_and_bf16_train(encoders, tmp_path):
    data = write_data(tmp_path / "train.jsonl", 12)
    opts = dict(method="full", max_steps=3, batch_size=4, lr=1e-3, **COMMON)
    plain = leanformers.finetune(str(encoders["bert"]), data=str(data), output_dir=str(tmp_path / "a"), **opts)
    ckpt = leanformers.finetune(str(encoders["bert"]), data=str(data), output_dir=str(tmp_path / "b"),
                                grad_checkpointing=True, **opts)
    a, b = [m["loss"] for m in metrics(plain.output_dir)], [m["loss"] for m in metrics(ckpt.output_dir)]
    assert max(abs(x - y) for x, y in zip(a, b)) <= 1e-6
    bf16 = leanformers.finetune(str(encoders["bert"]), data=str(data), output_dir=str(tmp_path / "c"),
                                **{**opts, "precision": "bf16-mixed"})
    assert all(abs(x - y) < 0.05 for x, y in zip(a, [m["loss"] for m in metrics(bf16.output_dir)]))


# --------------------------------------------------------------------------------------------- loop features

@pytest.mark.parametrize("method", ["full", "lora"])
def test_resume_is_exact(encoders, tmp_path, method):
    """A run resumed from its step-3 checkpoint gives bitwise the losses of the run that never stopped
    (dropout on: the random states are restored too)."""
    data = write_data(tmp_path / "train.jsonl", 20, kind="index")
    model = tmp_path / "dropout"
    shutil.copytree(encoders["bert"], model)
    config = json.loads((model / "config.json").read_text())
    (model / "config.json").write_text(json.dumps({**config, "hidden_dropout_prob": 0.1}))
    opts = dict(COMMON, method=method, max_steps=7, batch_size=4, lr=1e-3, save_every=3, lora_r=4, lora_dropout=0.1)
    straight = leanformers.finetune(str(model), data=str(data), output_dir=str(tmp_path / "a"), **opts)
    assert sorted(p.name for p in straight.output_dir.glob("checkpoint-*")) == ["checkpoint-3", "checkpoint-6"]
    shutil.copytree(straight.output_dir, tmp_path / "b")
    resumed = leanformers.finetune(str(model), data=str(data), output_dir=str(tmp_path / "b"),
                                   **{**opts, "resume": str(tmp_path / "b" / "checkpoint-3")})
    assert resumed.steps == 7
    rows = metrics(resumed.output_dir)
    assert [m["step"] for m in rows] == list(range(1, 8))
    assert [m["loss"] for m in rows] == [m["loss"] for m in metrics(straight.output_dir)]
    config = json.loads(((tmp_path / "b") / ("config.json" if method == "full" else "classifier_config.json"))
                        .read_text())
    assert config["id2label"] == {"0": "LABEL_0", "1": "LABEL_1", "2": "LABEL_2"}  # indices in the data


def test_eval_metrics_and_cli(encoders, tmp_path, capsys):
    """metrics.jsonl has eval_loss and eval_accuracy on eval steps; the accuracy is classify()'s on the eval set."""
    data = write_data(tmp_path / "train.jsonl", 24, pairs=True)
    val = write_data(tmp_path / "val.jsonl", 10, pairs=True, seed=1)
    out = tmp_path / "out"
    rc = main(["finetune", "-m", str(encoders["bert-cls"]), "--task", "classification", "--data", str(data),
               "--eval-data", str(val), "--output", str(out), "--method", "full", "--max-steps", "4",
               "--batch-size", "6", "--eval-every", "2", "--lr", "1e-3", "--precision", "fp32"])
    assert rc == 0
    assert "eval accuracy" in capsys.readouterr().err
    rows = metrics(out)
    assert [("eval_accuracy" in r, "eval_loss" in r) for r in rows] == [(False, False), (True, True)] * 2
    recs = [json.loads(line) for line in val.read_text().splitlines()]
    res = leanformers.load(str(out)).classify([r["text"] for r in recs], text_pairs=[r["text_pair"] for r in recs])
    accuracy = sum(p == r["label"] for p, r in zip(res.labels, recs)) / len(recs)
    assert rows[-1]["eval_accuracy"] == pytest.approx(accuracy)
    mean_ce = torch.nn.functional.cross_entropy(res.logits, torch.tensor([NAMES.index(r["label"]) for r in recs]))
    assert rows[-1]["eval_loss"] == pytest.approx(float(mean_ce), abs=1e-5)


def test_classify_text_pairs_match_transformers(encoders):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    d = encoders["bert-cls"]
    firsts, seconds = TEXTS, TEXTS[::-1]
    tok = AutoTokenizer.from_pretrained(str(d))
    with torch.no_grad():
        ref = AutoModelForSequenceClassification.from_pretrained(str(d)).eval()(
            **tok(firsts, seconds, padding=True, return_token_type_ids=True, return_tensors="pt")).logits
    res = leanformers.load(str(d)).classify(firsts, text_pairs=seconds, batch_size=2)
    assert (res.logits - ref).abs().max() <= 1e-5
    with pytest.raises(InvalidArgumentError, match="text_pairs has 1 items for 5 texts"):
        leanformers.load(str(d)).classify(firsts, text_pairs=["x"])


# --------------------------------------------------------------------------------------------- bad input

@pytest.mark.parametrize("lines,message", [
    (['{"text": "a", "label": "negative"}', '{"text": "b", "label": "happy"}'],
     r"train\.jsonl:2: unknown label 'happy'; the labels are 'negative', 'neutral', 'positive' \(.*config\.json id2label\)"),
    (['{"text": "a", "label": 7}'], r"train\.jsonl:1: label index 7 is out of range: there are 3 labels"),
    (['{"label": "negative"}'], r"train\.jsonl:1: missing field 'text'"),
    (['{"text": "a"}'], r"train\.jsonl:1: missing field 'label' \(single-label: a name or index\) or 'labels'"),
    (['{"sentence": "a", "label": "negative"}'], r"train\.jsonl:1: missing field 'text' \(the record has the fields "
                                               r"'sentence', 'label'\)"),
    (['{"text": "a", "class": "negative"}'], r"train\.jsonl:1: missing field 'label' .*; the record has the fields "
                                            r"'text', 'class'"),
    (['{"text": "a", "label": true}'], r"train\.jsonl:1: field 'label' must be a label name \(string\) or index"),
    (['{"text": "a", "label": {"x": 1}}'], r"train\.jsonl:1: field 'label' must be a label name"),
    (['{"text": "a", "label": ["negative"]}'], r"train\.jsonl:1: field 'label' is a list; a list of labels goes in"),
    (['{"text": "a", "labels": "negative"}'], r"train\.jsonl:1: field 'labels' must be a list .* \(one label goes in"),
    (['{"text": "a", "labels": [null]}'], r"train\.jsonl:1: labels\[0\] must be a label name"),
    (['{"text": 3, "label": "negative"}'], r"train\.jsonl:1: field 'text' must be a string, got int"),
    (['{"text": "a", "label": "negative"}', '{"text": "b", "labels": ["neutral"]}'],
     r"train\.jsonl:2: uses 'labels' but .*train\.jsonl:1 uses 'label'"),
    (['{"text": "a", "label": 0.5}'], r"train\.jsonl:1: label 0\.5 is not a label name or index; for regression pass"),
    (['{"text": "a", "label": "negative", "labels": []}'], r"train\.jsonl:1: has both 'label' and 'labels'"),
    (['{"text": "a", "label": "negative"', ], r"train\.jsonl:1: not valid JSON"),
])
def test_bad_data_names_file_line_and_labels(encoders, tmp_path, lines, message):
    data = tmp_path / "train.jsonl"
    data.write_text("\n".join(lines) + "\n")
    with pytest.raises(DataError, match=message):
        leanformers.finetune(str(encoders["bert-cls"]), data=str(data), output_dir=str(tmp_path / "out"),
                             method="full", max_steps=1, **COMMON)
    assert not (tmp_path / "out").exists()  # nothing written


def test_bad_eval_data_names_its_file_and_line(encoders, tmp_path):
    """The eval file's labels are checked against the run's label set, and its label key against the training
    data's, before any step is trained."""
    data = write_data(tmp_path / "train.jsonl", 8)
    val = tmp_path / "val.jsonl"
    run = dict(data=str(data), eval_data=str(val), output_dir=str(tmp_path / "out"), method="full", max_steps=1)
    val.write_text('{"text": "a", "label": "positive"}\n{"text": "b", "label": "happy"}\n')
    with pytest.raises(DataError, match=r"val\.jsonl:2: unknown label 'happy'; the labels are 'negative', "
                                        r"'neutral', 'positive'"):
        leanformers.finetune(str(encoders["bert-cls"]), **run, **COMMON)
    val.write_text('{"text": "a", "labels": ["positive"]}\n')
    with pytest.raises(DataError, match=r"val\.jsonl:1: uses 'labels' but the training data uses 'label'"):
        leanformers.finetune(str(encoders["bert-cls"]), **run, **COMMON)
    assert not (tmp_path / "out").exists()


def test_bad_options_and_model_kinds(encoders, tiny_models, tmp_path):
    data = write_data(tmp_path / "train.jsonl", 8)
    out = str(tmp_path / "out")
    run = dict(data=str(data), output_dir=out, max_steps=1)
    with pytest.raises(InvalidArgumentError, match=r"task classification \(--task classification\) trains an "
                                                   r"encoder's classifier .* is not an encoder"):
        leanformers.finetune(str(tiny_models["llama3"]), task="classification", **run)
    with pytest.raises(InvalidArgumentError, match=r"is an encoder: task causal-lm \(--task causal-lm, the default\) "
                                                   r"trains decoders .* pass task='classification'"):
        leanformers.finetune(str(encoders["bert"]), **run)
    with pytest.raises(InvalidArgumentError, match=r"task \(--task\) must be one of causal-lm, classification"):
        leanformers.finetune(str(encoders["bert"]), task="regression", **run)
    with pytest.raises(InvalidArgumentError, match=r"labels \(--labels\) only applies to task='classification'"):
        leanformers.finetune(str(tiny_models["llama3"]), labels=["a", "b"], **run)
    with pytest.raises(InvalidArgumentError, match=r"method qlora .* use method full or lora"):
        leanformers.finetune(str(encoders["bert"]), task="classification", method="qlora", **run)
    with pytest.raises(InvalidArgumentError, match=r"packing \(--packing\) does not apply to task classification"):
        leanformers.finetune(str(encoders["bert"]), task="classification", packing=True, **run)
    with pytest.raises(InvalidArgumentError, match=r"labels \(--labels\) \['b', 'a'\] differ from the checkpoint's "
                                                   r"id2label \['negative', 'neutral', 'positive'\]"):
        leanformers.finetune(str(encoders["bert-cls"]), task="classification", labels="b,a", **run)
    txt = tmp_path / "plain.txt"
    txt.write_text("some text")
    with pytest.raises(DataError, match=r"plain\.txt: a \.txt file has no labels"):
        leanformers.finetune(str(encoders["bert"]), task="classification", **{**run, "data": str(txt)})
    multi = write_data(tmp_path / "multi.jsonl", 4, kind="labels")
    with pytest.raises(DataError, match=r"multi\.jsonl:1: 'labels' is a list \(multi-label\), but the problem type "
                                        r"is single_label_classification \(problem_type \(--problem-type\)\)"):
        leanformers.finetune(str(encoders["bert"]), task="classification", problem_type="single_label_classification",
                             **{**run, "data": str(multi)})
    one = tmp_path / "one.jsonl"
    one.write_text('{"text": "a", "label": "x"}\n{"text": "b", "label": "x"}\n')
    with pytest.raises(DataError, match=r"one\.jsonl: every record has the label 'x'; single-label classification "
                                        r"needs at least two labels"):
        leanformers.finetune(str(encoders["bert"]), task="classification", **{**run, "data": str(one)})
    assert not Path(out).exists()
    # the CLI: one line naming the option
    rc = main(["finetune", "-m", str(tiny_models["llama3"]), "--task", "classification", "--data", str(data),
               "--output", out])
    assert rc == 1


def test_labels_option_and_regression(encoders, tmp_path):
    """labels=[...] fixes a new head's label order (indices in the data refer to it); regression trains with MSE."""
    data = write_data(tmp_path / "train.jsonl", 12, kind="index")
    res = leanformers.finetune(str(encoders["distilbert"]), data=str(data), output_dir=str(tmp_path / "a"),
                               labels="low,mid,high", method="full", max_steps=2, batch_size=6, **COMMON)
    clf = leanformers.load(str(res.output_dir))
    assert clf.config.id2label == {0: "low", 1: "mid", 2: "high"}
    reg = tmp_path / "reg.jsonl"
    rng = random.Random(0)
    reg.write_text("".join(json.dumps({"text": sentence(rng), "label": rng.random() * 5}) + "\n" for _ in range(12)))
    res = leanformers.finetune(str(encoders["bert"]), data=str(reg), output_dir=str(tmp_path / "b"),
                               problem_type="regression", method="full", max_steps=3, batch_size=6, lr=1e-3, **COMMON)
    clf = leanformers.load(str(res.output_dir))
    assert clf.config.problem_type == "regression" and clf.config.num_labels == 1
    out = clf.classify(TEXTS)
    assert out.function == "none" and out.logits.shape == (len(TEXTS), 1)
    assert metrics(res.output_dir)[-1]["loss"] < metrics(res.output_dir)[0]["loss"]


# --------------------------------------------------------------------------------------------- the real model

TOPICS = {
    "sports": ["the match went to extra time", "she scored twice in the final", "the team won the league",
               "our goalkeeper saved a penalty", "he ran the marathon in three hours", "the coach picked a new captain",
               "fans filled the stadium", "the referee showed a red card", "they lost the semifinal on penalties",
               "the striker signed a new contract"],
    "food": ["the pasta was delicious", "we baked fresh bread this morning", "the soup needs more salt",
             "she ordered a spicy curry", "the chef grilled the salmon", "dessert was a chocolate cake",
             "he chopped onions for the stew", "the cafe serves great pancakes", "we shared a large pizza",
             "the salad had too much dressing"],
    "weather": ["it rained all afternoon", "a storm is coming tonight", "the forecast promises sunshine",
                "snow covered the roads", "the wind knocked down a tree", "it was freezing this morning",
                "a heatwave hit the city", "thick fog delayed the flights", "the sky cleared after lunch",
                "thunder woke us at night"],
    "tech": ["the new phone has a faster chip", "he fixed the bug in the code", "the server crashed again",
             "she installed the latest update", "the laptop battery died", "our app now supports dark mode",
             "the database query was slow", "they released an open source library", "the router needs a reboot",
             "the robot vacuum got stuck"],
    "music": ["the band played their new album", "she practiced the piano for hours", "the concert sold out",
              "he sang the chorus off key", "the orchestra tuned their violins", "we danced to the old songs",
              "the drummer broke a stick", "the festival lineup was announced", "a jazz trio played in the bar",
              "the guitar solo was amazing"],
}


def topic_examples(n: int, rng: random.Random, phrases: dict[str, list[str]]) -> list[dict]:
    """Sentences of one or two topic phrases (from `phrases`), labelled with their topics."""
    names = sorted(phrases)
    out = []
    for _ in range(n):
        topics = rng.sample(names, rng.choice([1, 1, 2]))
        parts = [rng.choice(phrases[t]) for t in topics]
        out.append({"text": (" and " if rng.random() < 0.5 else ", while ").join(parts) + ".", "labels": topics})
    return out


@pytest.fixture
def two_threads():
    with torch_threads(2):
        yield


@pytest.mark.slow
def test_minilm_learns_multi_label_topics(tmp_path, two_threads):
    """The bundled all-MiniLM-L6-v2 (a base encoder: a head is added) fine-tuned on 240 multi-label sentences
    labels held-out sentences (unseen phrases) with a micro-F1 well above chance."""
    rng = random.Random(0)
    train_phr = {t: p[:7] for t, p in TOPICS.items()}
    test_phr = {t: p[7:] for t, p in TOPICS.items()}  # held-out phrases: the model must generalize
    train, val = topic_examples(240, rng, train_phr), topic_examples(60, rng, test_phr)
    (tmp_path / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in train))
    (tmp_path / "val.jsonl").write_text("".join(json.dumps(r) + "\n" for r in val))
    res = leanformers.finetune("all-minilm-l6-v2", task="classification", data=str(tmp_path / "train.jsonl"),
                               eval_data=str(tmp_path / "val.jsonl"), output_dir=str(tmp_path / "out"),
                               method="full", epochs=3, batch_size=16, lr=5e-4, warmup_steps=5, precision="fp32",
                               save_every=None, seed=0)
    f1 = res.eval_metrics["eval_micro_f1"]
    density = sum(len(r["labels"]) for r in val) / (len(val) * len(TOPICS))
    chance = 2 * density / (1 + density)  # micro-F1 of predicting every label (beats any random guess)
    print(f"MiniLM multi-label: held-out micro-F1 {f1:.3f} (chance {chance:.3f}), {res.steps} steps, "
          f"losses {metrics(res.output_dir)[0]['loss']:.3f} -> {res.loss:.3f}")
    assert f1 >= 0.85 and f1 > chance + 0.4
    clf = leanformers.load(str(res.output_dir))
    predicted = clf.classify([r["text"] for r in val]).labels
    tp = sum(len(set(p) & set(r["labels"])) for p, r in zip(predicted, val))
    fp = sum(len(set(p) - set(r["labels"])) for p, r in zip(predicted, val))
    fn = sum(len(set(r["labels"]) - set(p)) for p, r in zip(predicted, val))
    assert 2 * tp / (2 * tp + fp + fn) == pytest.approx(f1)  # classify() agrees with the loop's evaluation
