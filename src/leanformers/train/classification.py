"""Sequence-classification fine-tuning of encoders (BERT, RoBERTa, XLM-R, DistilBERT) through the same loop.

    leanformers finetune -m ./bert-dir --task classification --data labels.jsonl --output out/ [--method lora]
    leanformers.finetune("./bert-dir", task="classification", data="labels.jsonl", output_dir="out/")

Data (.jsonl or .json, one record per example; every record uses the same label key):
    {"text": ..., "label": "positive"}             single-label: a name of the model's id2label, or its index
    {"text": ..., "labels": ["sports", "tech"]}    multi-label: names or indices (any number of them, none too)
    {"text": ..., "text_pair": ..., "label": ...}  a sentence pair (second segment; BERT gives it token type 1)
    {"text": ..., "label": 0.7}                    regression (problem_type regression; "labels": [..] for several)

Labels: a checkpoint with a classification head keeps its id2label (names in the data are checked against
it, with file:line and the known labels on error). A base encoder (BertModel, a sentence-transformers
directory, a masked LM) gets a new head (encoder.add_classification_head: transformers' init) whose labels
are `labels=[...]` (--labels a,b,c) or the data's names, sorted (indices: LABEL_0..LABEL_{max}).
problem_type: the option, else the checkpoint's, else the data's key ("label": single-label, "labels":
multi-label). The loss is transformers' for that problem type (encoder_common.classification_loss:
cross-entropy, BCE-with-logits, MSE), summed per batch and divided by the step's terms, as the loop does
for tokens.

Batches: one example per row, padded to the longest row of its batch (dynamic padding), in the loop's
seeded order. No packing: a classifier reads one [CLS] per row, and the encoder already runs its linear
layers on the real tokens only when a batch has much padding (encoder_common.Layout), so padding costs
only attention. Texts longer than min(--seq-len, the model's max_seq_length) are truncated (pairs longest
first; counted in the log) or refused with --no-truncate.

Outputs: full fine-tuning writes an AutoModelForSequenceClassification directory (config.json with
id2label / label2id / problem_type, model.safetensors, tokenizer files) that transformers and
leanformers.load(...).classify() read; LoRA writes a PEFT adapter (task_type SEQ_CLS) whose head is in
modules_to_save, plus classifier_config.json with its labels. Evaluation adds eval_accuracy
(single-label) or eval_micro_f1 (multi-label; a label is predicted when its sigmoid >= 0.5) to eval_loss.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

import torch
from torch import nn

from ..errors import InvalidArgumentError
from ..models.encoder_common import classification_loss
from .args import FinetuneArgs
from .data import DataError, Dataset, Record, read_records

logger = logging.getLogger(__name__)

SINGLE, MULTI, REGRESSION = "single_label_classification", "multi_label_classification", "regression"
_SHOW_LABELS = 20  # label names quoted in an error message


# ------------------------------------------------------------------------------------ records
def classification_kind(item: Any, where: str) -> str:
    """Check one record's fields and types; its kind is the label key it uses ("label" or "labels")."""
    if not isinstance(item, dict):
        raise DataError(f"{where}: expected a JSON object, got {type(item).__name__}")
    if "text" not in item:
        raise DataError(f"{where}: missing field 'text' (the record has {_fields(item)})")
    for key in ("text", "text_pair"):
        if key in item and not isinstance(item[key], str):
            raise DataError(f"{where}: field {key!r} must be a string, got {type(item[key]).__name__}")
    if "label" in item and "labels" in item:
        raise DataError(f"{where}: has both 'label' and 'labels'; use 'label' for one label (single-label) or "
                        "'labels' for a list (multi-label)")
    if "label" in item:
        value = item["label"]
        if isinstance(value, list):
            raise DataError(f"{where}: field 'label' is a list; a list of labels goes in 'labels' (multi-label)")
        if not _scalar(value):
            raise DataError(f"{where}: field 'label' must be a label name (string) or index (integer), got "
                            f"{type(value).__name__} {value!r}")
        return "label"
    if "labels" in item:
        values = item["labels"]
        if not isinstance(values, list):
            hint = " (one label goes in 'label')" if _scalar(values) else ""
            raise DataError(f"{where}: field 'labels' must be a list of label names or indices, got "
                            f"{type(values).__name__}{hint}")
        for i, value in enumerate(values):
            if not _scalar(value):
                raise DataError(f"{where}: labels[{i}] must be a label name (string) or index (integer), got "
                                f"{type(value).__name__} {value!r}")
        return "labels"
    raise DataError(f"{where}: missing field 'label' (single-label: a name or index) or 'labels' (multi-label: a "
                    f"list); the record has {_fields(item)}")


def _fields(item: dict) -> str:
    names = [repr(k) for k in list(item)[:8]]
    return "the fields " + ", ".join(names) + (", ..." if len(item) > 8 else "") if names else "no fields"


def _scalar(value: Any) -> bool:
    if isinstance(value, bool):
        return False
    return isinstance(value, (str, int)) or (isinstance(value, float) and math.isfinite(value))


def read_classification_records(path: str | Path) -> list[Record]:
    """Parse and check a classification data file (before any model loads); one label key throughout."""
    records = read_records(path, item_kind=classification_kind)
    first = records[0]
    for rec in records:
        if rec.kind != first.kind:
            raise DataError(f"{rec.where}: uses '{rec.kind}' but {first.where} uses '{first.kind}'; a dataset is "
                            "either single-label ('label') or multi-label ('labels')")
    return records


# ------------------------------------------------------------------------------------ labels
@dataclass
class LabelSpace:
    """The head's labels and problem type, and where they came from (for messages)."""

    id2label: dict[int, str]
    problem_type: str
    source: str

    @property
    def num_labels(self) -> int:
        return len(self.id2label)

    def known(self) -> str:
        names = [self.id2label[i] for i in range(self.num_labels)]
        more = f", ... ({len(names)} in all)" if len(names) > _SHOW_LABELS else ""
        return ", ".join(repr(n) for n in names[:_SHOW_LABELS]) + more


def resolve_labels(records: list[Record], encoder: Any, args: FinetuneArgs, data: str) -> LabelSpace:
    """The label set and problem type of this run (see the module docstring), checked against the data's key."""
    kind = records[0].kind
    cfg = encoder.config
    headed = encoder.task == "sequence_classification"
    config_file = str(Path(encoder.model_dir) / "config.json")
    # --- problem type
    if args.problem_type is not None:
        problem, said = args.problem_type, "problem_type (--problem-type)"
    elif headed and cfg.problem_type is not None:
        problem, said = cfg.problem_type, f"{config_file} problem_type"
    elif headed and cfg.num_labels == 1:
        problem, said = REGRESSION, f"{config_file}: one output (num_labels 1)"
    else:
        problem, said = (SINGLE if kind == "label" else MULTI), f"the data's '{kind}' records"
    if problem == SINGLE and kind == "labels":
        raise DataError(f"{records[0].where}: 'labels' is a list (multi-label), but the problem type is {SINGLE} "
                        f"({said}); give one 'label' per record, or pass problem_type={MULTI} (--problem-type)")
    if problem == MULTI and kind == "label":
        raise DataError(f"{records[0].where}: 'label' names one label, but the problem type is {MULTI} ({said}); "
                        "give 'labels': [...] lists")
    # --- label names
    if headed:
        if cfg.labels_given:
            names = dict(cfg.id2label)
            if args.labels is not None and args.labels != [names[i] for i in range(len(names))]:
                raise InvalidArgumentError(
                    f"labels (--labels) {args.labels} differ from the checkpoint's id2label "
                    f"{[names[i] for i in range(len(names))]} ({config_file}); a new label set needs a new head: "
                    "fine-tune the base model instead")
            return LabelSpace(names, problem, f"{config_file} id2label")
        if args.labels is not None:
            if len(args.labels) != cfg.num_labels:
                raise InvalidArgumentError(f"labels (--labels) names {len(args.labels)} labels; the checkpoint's "
                                           f"head has {cfg.num_labels} ({config_file})")
            return LabelSpace(dict(enumerate(args.labels)), problem, "labels (--labels)")
        return LabelSpace(dict(cfg.id2label), problem, f"{config_file}, which has no id2label")
    if args.labels is not None:
        return LabelSpace(dict(enumerate(args.labels)), problem, "labels (--labels)")
    values = [v for rec in records for v in _values(rec)]
    if problem == REGRESSION:
        widths = {len(_values(rec)) for rec in records}
        if len(widths) > 1:
            bad = next(r for r in records if len(_values(r)) != len(_values(records[0])))
            raise DataError(f"{bad.where}: {len(_values(bad))} regression targets, {records[0].where} has "
                            f"{len(_values(records[0]))}")
        n = widths.pop()
        if n == 0:
            raise DataError(f"{records[0].where}: an empty 'labels' list has no regression target")
        return LabelSpace({i: f"LABEL_{i}" for i in range(n)}, problem, "the data's regression targets")
    strings = sorted({v for v in values if isinstance(v, str)})
    numbers = [v for v in values if not isinstance(v, str)]
    if strings and numbers:
        rec = next(r for r in records if any(not isinstance(v, str) for v in _values(r)))
        raise DataError(f"{rec.where}: the data mixes label names and indices; pass labels=[...] (--labels a,b,c) "
                        "to fix which index is which name")
    if numbers:
        for rec in records:
            for v in _values(rec):
                if isinstance(v, float) or v < 0:
                    raise DataError(f"{rec.where}: label {v!r} is not a label index (an integer >= 0); for "
                                    f"regression pass problem_type={REGRESSION} (--problem-type)")
        n = max(max(numbers) + 1, 2 if problem == SINGLE else 1)
        return LabelSpace({i: f"LABEL_{i}" for i in range(n)}, problem, "the data's label indices")
    if not strings:
        raise DataError(f"{data}: no record names a label (every 'labels' list is empty); pass labels=[...] "
                        "(--labels a,b,c)")
    if problem == SINGLE and len(strings) < 2:
        raise DataError(f"{data}: every record has the label {strings[0]!r}; single-label classification needs "
                        "at least two labels (pass labels=[...] (--labels a,b) to name them all)")
    return LabelSpace(dict(enumerate(strings)), problem, f"the labels found in {data}")


def _values(rec: Record) -> list[Any]:
    return [rec.data["label"]] if rec.kind == "label" else list(rec.data["labels"])


def encode_target(rec: Record, space: LabelSpace) -> int | float | list[float]:
    """A record's label(s) as the loss wants them: a class index, a multi-hot vector, or regression values."""
    values = _values(rec)
    n = space.num_labels
    if space.problem_type == REGRESSION:
        for v in values:
            if isinstance(v, str):
                raise DataError(f"{rec.where}: regression needs numbers, got the label {v!r}")
        if len(values) != n:
            raise DataError(f"{rec.where}: {len(values)} regression targets; the model has {n} outputs")
        return float(values[0]) if n == 1 else [float(v) for v in values]
    label2id = {name: i for i, name in space.id2label.items()}
    ids = []
    for v in values:
        if isinstance(v, str):
            if v not in label2id:
                raise DataError(f"{rec.where}: unknown label {v!r}; the labels are {space.known()} ({space.source})")
            ids.append(label2id[v])
        elif isinstance(v, float):
            raise DataError(f"{rec.where}: label {v!r} is not a label name or index; for regression pass "
                            f"problem_type={REGRESSION} (--problem-type)")
        elif not 0 <= v < n:
            raise DataError(f"{rec.where}: label index {v} is out of range: there are {n} labels ({space.known()}; "
                            f"{space.source})")
        else:
            ids.append(v)
    if space.problem_type == SINGLE:
        return ids[0]
    hot = [0.0] * n
    for i in ids:
        hot[i] = 1.0
    return hot


# ------------------------------------------------------------------------------------ dataset
@dataclass
class ClassRow:
    input_ids: list[int]
    token_type_ids: list[int]
    target: int | float | list[float]

    @property
    def n_tokens(self) -> int:
        return len(self.input_ids)


@dataclass
class ClassificationDataset(Dataset):
    """Rows of (tokens, token types, target) in the loop's order; a batch pads to its longest row."""

    problem_type: str = SINGLE
    token_types: bool = False  # whether batches carry token_type_ids (BERT)

    def collate(self, rows: Sequence[ClassRow]) -> dict[str, torch.Tensor]:
        """input_ids (B, T) right-padded, attention_mask (B, T), token_type_ids (B, T) for BERT, labels:
        (B,) class ids, (B, L) multi-hot floats, or (B,) / (B, L) regression values."""
        T = max(len(r.input_ids) for r in rows)
        ids = torch.full((len(rows), T), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(rows), T), dtype=torch.long)
        types = torch.zeros((len(rows), T), dtype=torch.long)
        for b, r in enumerate(rows):
            n = len(r.input_ids)
            ids[b, :n] = torch.tensor(r.input_ids)
            mask[b, :n] = 1
            types[b, :n] = torch.tensor(r.token_type_ids)
        if self.problem_type == SINGLE:
            labels = torch.tensor([r.target for r in rows], dtype=torch.long)
        else:
            labels = torch.tensor([r.target for r in rows], dtype=torch.float32)
        out = {"input_ids": ids, "attention_mask": mask, "labels": labels}
        if self.token_types:
            out["token_type_ids"] = types
        return out

    def targets_in(self, batch: dict[str, torch.Tensor]) -> int:
        """The loss's terms: examples (cross-entropy), or label entries (BCE, MSE), as transformers averages."""
        return batch["labels"].numel()

    def tokens_in(self, batch: dict[str, torch.Tensor]) -> int:
        return int(batch["attention_mask"].sum())


def build_classification_dataset(path: str | Path, records: list[Record], encoder: Any, space: LabelSpace, *,
                                 seq_len: int, batch_size: int, grad_accum: int, seed: int,
                                 truncate: bool = True) -> ClassificationDataset:
    """Tokenize the records as the encoder's classify() does and arrange them for the loop."""
    limit = min(seq_len, encoder.max_seq_length)
    targets = [encode_target(rec, space) for rec in records]  # label errors before tokenizing
    inputs = [rec.data["text"] if "text_pair" not in rec.data else (rec.data["text"], rec.data["text_pair"])
              for rec in records]
    full = encoder.text_tokenizer(None).encode_batch(inputs, add_special_tokens=True)
    long = [i for i, e in enumerate(full) if len(e.ids) > limit]
    if long and not truncate:
        i = long[0]
        raise DataError(f"{records[i].where}: the example has {len(full[i].ids)} tokens, more than {limit} "
                        f"(--seq-len {seq_len}, the model's max_seq_length {encoder.max_seq_length}); "
                        "--no-truncate was given: shorten the example or drop --no-truncate")
    if long:
        cut = encoder.text_tokenizer(limit).encode_batch([inputs[i] for i in long], add_special_tokens=True)
        for i, e in zip(long, cut):
            full[i] = e
        logger.warning("%s: %d of %d examples were longer than %d tokens and were truncated", path, len(long),
                       len(records), limit)
    rows = [ClassRow(list(e.ids), list(e.type_ids), t) for e, t in zip(full, targets)]
    digest = hashlib.sha256(Path(path).read_bytes()).hexdigest()[:16]
    logger.info("%s: %d examples, %d tokens, %d labels (%s)", path, len(rows), sum(r.n_tokens for r in rows),
                space.num_labels, space.problem_type)
    return ClassificationDataset(rows, batch_size, grad_accum, seed, encoder.pad_token_id, fingerprint=digest,
                                 meta={"examples": len(rows), "rows": len(rows)}, problem_type=space.problem_type,
                                 token_types=encoder.uses_token_types)


# ------------------------------------------------------------------------------------ loss and metrics
def _logits(model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    hidden = model.hidden_states(batch["input_ids"], attention_mask=batch["attention_mask"],
                                 token_type_ids=batch.get("token_type_ids"))
    return model.logits(hidden).float()  # (B, num_labels)


def classification_loss_fn(model: nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, int]:
    """(sum of the loss terms of transformers' head for the model's problem_type, their number)."""
    cfg = model.config
    labels = batch["labels"]
    loss = classification_loss(_logits(model, batch), labels, problem_type=cfg.problem_type,
                               num_labels=cfg.num_labels, reduction="sum")
    return loss, labels.numel()


@torch.no_grad()
def evaluate_classification(model: nn.Module, batches: Iterable[dict[str, torch.Tensor]],
                            autocast: Callable[[], Any]) -> dict[str, float]:
    """eval_loss, plus eval_accuracy (single-label) or eval_micro_f1 (multi-label, sigmoid >= 0.5)."""
    cfg = model.config
    total, terms, correct, examples, tp, fp, fn = 0.0, 0, 0, 0, 0, 0, 0
    for b in batches:
        with autocast():
            logits = _logits(model, b)
        labels = b["labels"]
        total += float(classification_loss(logits, labels, problem_type=cfg.problem_type, num_labels=cfg.num_labels,
                                           reduction="sum"))
        terms += labels.numel()
        if cfg.problem_type == SINGLE:
            correct += int((logits.argmax(-1) == labels).sum())
            examples += labels.shape[0]
        elif cfg.problem_type == MULTI:
            pred, gold = logits >= 0, labels > 0.5
            tp += int((pred & gold).sum())
            fp += int((pred & ~gold).sum())
            fn += int((~pred & gold).sum())
    out = {"eval_loss": total / max(1, terms)}
    if cfg.problem_type == SINGLE:
        out["eval_accuracy"] = correct / max(1, examples)
    elif cfg.problem_type == MULTI:
        out["eval_micro_f1"] = 2 * tp / (2 * tp + fp + fn) if tp + fp + fn else 0.0
    return out


# ------------------------------------------------------------------------------------ model
@dataclass
class Prepared:
    """What the run trains and saves besides the encoder's weights."""

    lora_targets: list[str]  # full module names wrapped in LoRA (empty for full fine-tuning)
    modules_to_save: list[str]  # the head, trained whole (PEFT's modules_to_save)


def prepare_model(encoder: Any, space: LabelSpace, args: FinetuneArgs, param_dtype: torch.dtype) -> Prepared:
    """Head (new, or the checkpoint's with this problem type), trainable parameters, LoRA, checkpointing."""
    from ..encoder import add_classification_head, encoder_family
    from ..models.bert import EncoderModelMixin
    from .lora import apply_lora, lora_modules

    family = encoder_family(encoder.config.model_type)
    new: list[str] = []
    torch.manual_seed(args.seed)  # a new head's and LoRA's initial weights are the seed's
    if encoder.task != "sequence_classification":
        new = add_classification_head(encoder, space.id2label, space.problem_type)
    else:
        cfg = encoder.config
        if cfg.problem_type != space.problem_type:
            logger.info("problem_type: %s (the checkpoint's: %s)", space.problem_type, cfg.problem_type)
        cfg.problem_type = space.problem_type
        if not cfg.labels_given and space.source == "labels (--labels)":  # names for a head without id2label
            cfg.id2label, cfg.label2id = dict(space.id2label), {v: k for k, v in space.id2label.items()}
            cfg.labels_given = True
    model = encoder.model
    # the head trains whole: the model's own head modules, and a new pooler under the base (BERT without one)
    head = [n for n, m in model.named_children() if n != family.BASE_PREFIX and any(True for _ in m.parameters())]
    saved = head + [n for n in new if not any(n == h or n.startswith(h + ".") for h in head)]
    for m in model.modules():
        if isinstance(m, EncoderModelMixin):
            m.gradient_checkpointing = args.grad_checkpointing
    if args.method == "full":
        for p in model.parameters():
            p.requires_grad_(True)
        return Prepared([], saved)
    apply_lora(model, r=args.lora_r, alpha=args.lora_alpha, dropout=args.lora_dropout,
               target_modules=args.target_modules, dtype=param_dtype, exclude=saved)
    targets = sorted(lora_modules(model))
    for name in saved:
        for p in model.get_submodule(name).parameters():
            p.requires_grad_(True)
    return Prepared(targets, saved)


# ------------------------------------------------------------------------------------ the run
def finetune_classification(args: FinetuneArgs, out: Path, ckpt: Path | None, model_dir: Path, records: list[Record],
                            eval_records: list[Record] | None, mode: str) -> Any:
    """finetune(task="classification") once the options, output directory, checkpoint and data files are checked."""
    from ..encoder import load_encoder
    from .run import FinetuneResult, _base_reference, _clear_run, resume_command
    from .loop import TrainLoop
    from .lora import save_adapter
    from .optim import Precision

    device = torch.device(args.device)
    precision = Precision(mode, device)
    # float32 weights unless bf16-true: the head trains whole, and an encoder's frozen base is small
    encoder = load_encoder(model_dir, dtype="bfloat16" if mode == "bf16-true" else "float32", device=device,
                           fuse=False, task="sequence_classification")
    space = resolve_labels(records, encoder, args, str(args.data))
    if eval_records is not None and eval_records[0].kind != records[0].kind:
        raise DataError(f"{eval_records[0].where}: uses '{eval_records[0].kind}' but the training data uses "
                        f"'{records[0].kind}'")
    common = dict(seq_len=args.seq_len, batch_size=args.batch_size, seed=args.seed)
    dataset = build_classification_dataset(args.data, records, encoder, space, grad_accum=args.grad_accum,
                                           truncate=args.truncate, **common)
    eval_set = None
    if eval_records is not None:
        eval_set = build_classification_dataset(args.eval_data, eval_records, encoder, space, grad_accum=1,
                                                **common)
    prepared = prepare_model(encoder, space, args, precision.param_dtype)
    logger.info("%s: %s, %d labels (%s; %s)%s", args.model, encoder.architecture, space.num_labels,
                space.problem_type, space.source,
                f"; LoRA on {len(prepared.lora_targets)} linears, trained whole: {', '.join(prepared.modules_to_save)}"
                if args.method == "lora" else "")

    if args.overwrite:
        _clear_run(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "finetune_args.json").write_text(json.dumps(args.to_json(), indent=2) + "\n")
    cfg = encoder.config
    head_config = {"num_labels": cfg.num_labels, "id2label": {str(i): n for i, n in sorted(cfg.id2label.items())},
                   "label2id": {n: i for i, n in sorted(cfg.id2label.items())}, "problem_type": cfg.problem_type}

    def write_adapter(directory: Path) -> None:
        save_adapter(encoder.model, directory, base_model=_base_reference(args.model), r=args.lora_r,
                     alpha=args.lora_alpha, dropout=args.lora_dropout, target_modules=prepared.lora_targets,
                     task_type="SEQ_CLS", modules_to_save=prepared.modules_to_save, head_config=head_config)

    loop = TrainLoop(encoder.model, classification_loss_fn, dataset, args, precision, out, eval_dataset=eval_set,
                     save_extra=write_adapter if args.method != "full" else None, resume_hint=resume_command(args),
                     evaluator=evaluate_classification)
    if ckpt is None:
        torch.manual_seed(args.seed)
    result = loop.run(resume_from=ckpt)
    encoder.model.eval()
    if args.method == "full":
        from .export import save_encoder_pretrained

        save_encoder_pretrained(encoder, out)
    else:
        write_adapter(out)
    return FinetuneResult(out, args.method, result.steps, result.loss, result.eval_loss, result.tokens,
                          out / "metrics.jsonl", result.checkpoint, eval_metrics=result.eval_metrics)
