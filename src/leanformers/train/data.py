"""Training data: read JSONL/JSON/.txt files, tokenize with loss masks, pack or pad rows, batch deterministically.

Formats (one per record, detected by its keys):
    {"messages": [{"role", "content"}, ...]}   chat, rendered with the model's chat template; loss on assistant turns
    {"prompt": ..., "completion": ...}           plain text; loss on the completion (+ EOS)
    {"instruction", "input"?, "output"}          Alpaca; the chat template when the model has one (instruction and
                                                 input as the user turn), else the Alpaca prompt; loss on the output
    {"text": ...}                                plain text; loss on every token (+ EOS)
    a .txt file                                  one text, tokenized and cut into blocks of seq_len tokens

Labels are Hugging Face's: aligned with input_ids (the model shifts them: position t predicts labels[t+1]),
-100 where no loss is taken. A packed row holds several examples, each with its own segment id (1, 2, ...)
and positions restarting at 0; padding has segment 0. The first token of each segment gets label -100, so
no position predicts across an example boundary.

Order: rows are shuffled once per epoch with a generator seeded by (seed, epoch), so the batch of any step
follows from (seed, epoch, step) alone; a checkpoint records that position and resumes exactly there.
`micro_batches(epoch, rank, world_size)` hands each rank a disjoint slice of every global batch.
"""

from __future__ import annotations

import bisect

import hashlib
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import torch

from ..errors import InvalidArgumentError, LeanformersError

logger = logging.getLogger(__name__)

IGNORE = -100
FORMATS = ("messages", "prompt/completion", "instruction/output", "text")
ALPACA_PROMPT = ("Below is an instruction that describes a task{ctx}. Write a response that appropriately "
                 "completes the request.\n\n### Instruction:\n{instruction}\n\n{input}### Response:\n")


class DataError(LeanformersError, ValueError):
    """A training data file is missing, malformed, empty or does not fit the options."""


@dataclass
class Record:
    """One raw example and where it came from (file:line or file[index]) for error messages."""

    kind: str  # one of FORMATS, or "txt"
    data: Any
    where: str


@dataclass
class Example:
    input_ids: list[int]
    labels: list[int]
    where: str = ""


@dataclass
class Row:
    """One row of a batch: tokens, labels, segment ids (0 = padding) and positions, all the same length."""

    input_ids: list[int]
    labels: list[int]
    segments: list[int]
    positions: list[int]

    @property
    def n_tokens(self) -> int:
        return sum(1 for s in self.segments if s)


# ------------------------------------------------------------------------------------ reading
def read_records(path: str | Path, *, item_kind: Callable[[Any, str], str] | None = None) -> list[Record]:
    """Parse and validate a data file without tokenizing (so bad data fails before a model loads).

    item_kind(item, where) -> kind: checks one JSON record and names its format (default: the language-model
    formats); with another one (classification), .txt files are refused.
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: data file not found")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise DataError(f"{path}: not UTF-8 text ({exc.reason} at byte {exc.start})") from None
    except OSError as exc:
        raise DataError(f"{path}: cannot read: {exc.strerror}") from None
    suffix = path.suffix.lower()
    kind = item_kind or _kind
    if suffix == ".txt" and item_kind is not None:
        raise DataError(f"{path}: a .txt file has no labels; use .jsonl or .json records")
    if suffix == ".txt":
        if not text.strip():
            raise DataError(f"{path}: the text file is empty")
        return [Record("txt", text, str(path))]
    records: list[Record] = []
    if suffix == ".json":
        try:
            items = json.loads(text)
        except json.JSONDecodeError as exc:
            raise DataError(f"{path}:{exc.lineno}: not valid JSON ({exc.msg}, column {exc.colno})") from None
        if isinstance(items, dict) and isinstance(items.get("data"), list):
            items = items["data"]
        if not isinstance(items, list):
            raise DataError(f"{path}: a .json data file must hold a list of objects (or {{\"data\": [...]}})")
        for i, item in enumerate(items):
            where = f"{path}[{i}]"
            records.append(Record(kind(item, where), item, where))
    elif suffix in (".jsonl", ".ndjson"):
        for n, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            where = f"{path}:{n}"
            try:
                item = json.loads(line)
            except json.JSONDecodeError as exc:
                raise DataError(f"{where}: not valid JSON ({exc.msg}, column {exc.colno})") from None
            records.append(Record(kind(item, where), item, where))
    else:
        raise DataError(f"{path}: unknown data file type {suffix!r}; use .jsonl, .json or .txt")
    if not records:
        raise DataError(f"{path}: the dataset is empty (no examples)")
    return records


def _kind(item: Any, where: str) -> str:
    """The record's format, after checking its fields' types."""
    if not isinstance(item, dict):
        raise DataError(f"{where}: expected a JSON object, got {type(item).__name__}")

    def need_str(*keys: str, optional: Sequence[str] = ()) -> None:
        for k in keys:
            if k not in item:
                raise DataError(f"{where}: missing field {k!r}")
        for k in (*keys, *optional):
            if k in item and not isinstance(item[k], str):
                raise DataError(f"{where}: field {k!r} must be a string, got {type(item[k]).__name__}")

    if "messages" in item:
        msgs = item["messages"]
        if not isinstance(msgs, list) or not msgs:
            raise DataError(f"{where}: 'messages' must be a non-empty list of {{role, content}} objects")
        for i, m in enumerate(msgs):
            if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
                raise DataError(f"{where}: messages[{i}] must be an object with string 'role' and 'content'")
        if not any(m["role"] == "assistant" for m in msgs):
            raise DataError(f"{where}: no assistant message (the loss is taken on assistant turns)")
        return "messages"
    if "prompt" in item or "completion" in item:
        need_str("prompt", "completion")
        return "prompt/completion"
    if "instruction" in item or "output" in item:
        need_str("instruction", "output", optional=("input",))
        return "instruction/output"
    if "text" in item:
        need_str("text")
        return "text"
    raise DataError(f"{where}: unknown example format with keys {sorted(item)[:6]}; expected 'messages', "
                    "'prompt' + 'completion', 'instruction' + 'output', or 'text'")


# ------------------------------------------------------------------------------------ tokenizing
def tokenize_records(records: list[Record], tokenizer: Any, *, seq_len: int, truncate: bool = True,
                     source: str = "data") -> list[Example]:
    """Examples with loss masks; longer than seq_len: truncated (counted, logged) or refused (truncate=False)."""
    examples: list[Example] = []
    truncated = no_loss = 0
    for rec in records:
        if rec.kind == "txt":
            examples.extend(_text_blocks(rec, tokenizer, seq_len))
            continue
        ids, labels = _tokenize(rec, tokenizer)
        if len(ids) > seq_len:
            if not truncate:
                raise DataError(f"{rec.where}: the example has {len(ids)} tokens, more than --seq-len {seq_len} "
                                "(--no-truncate was given; raise --seq-len or shorten the example)")
            ids, labels = ids[:seq_len], labels[:seq_len]
            truncated += 1
        if all(lab == IGNORE for lab in labels[1:]):
            no_loss += 1
            continue
        examples.append(Example(ids, labels, rec.where))
    if truncated:
        logger.warning("%s: %d of %d examples were longer than seq_len %d and were truncated", source, truncated,
                       len(records), seq_len)
    if no_loss:
        logger.warning("%s: %d examples had no tokens to learn from after truncation and were dropped",
                       source, no_loss)
    if not examples:
        raise DataError(f"{source}: the dataset is empty after tokenization (every example lost its loss tokens)")
    return examples


def _eos(tokenizer: Any) -> list[int]:
    return [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []


def _tokenize(rec: Record, tokenizer: Any) -> tuple[list[int], list[int]]:
    d = rec.data
    try:
        if rec.kind == "messages":
            return _chat(d["messages"], tokenizer, rec.where)
        if rec.kind == "instruction/output":
            user = d["instruction"] + (f"\n\n{d['input']}" if d.get("input") else "")
            if tokenizer.chat_template is not None:
                return _chat([{"role": "user", "content": user}, {"role": "assistant", "content": d["output"]}],
                             tokenizer, rec.where)
            prompt = ALPACA_PROMPT.format(
                ctx=", paired with an input that provides further context" if d.get("input") else "",
                instruction=d["instruction"], input=f"### Input:\n{d['input']}\n\n" if d.get("input") else "")
            return _prompt_completion(prompt, d["output"], tokenizer)
        if rec.kind == "prompt/completion":
            return _prompt_completion(d["prompt"], d["completion"], tokenizer)
        ids = tokenizer.encode(d["text"]) + _eos(tokenizer)
        return ids, list(ids)
    except DataError:
        raise
    except LeanformersError as exc:
        raise DataError(f"{rec.where}: {exc}") from None


def _prompt_completion(prompt: str, completion: str, tokenizer: Any) -> tuple[list[int], list[int]]:
    p = tokenizer.encode(prompt)
    c = tokenizer.encode(completion, add_special_tokens=False) + _eos(tokenizer)
    return p + c, [IGNORE] * len(p) + c


def _chat(messages: list[dict], tokenizer: Any, where: str) -> tuple[list[int], list[int]]:
    """Render the whole conversation once; mark the characters of each assistant turn (as the template
    renders it, end-of-turn tokens included) by rendering the prefixes before and after that turn."""
    full = tokenizer.apply_chat_template(messages)
    spans = []
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        before = tokenizer.apply_chat_template(messages[:i], add_generation_prompt=True) if i else ""
        after = tokenizer.apply_chat_template(messages[: i + 1])
        if not (full.startswith(after) and after.startswith(before)):
            raise DataError(f"{where}: the chat template does not render conversations prefix by prefix, so the "
                            "assistant turns cannot be located; use prompt/completion records instead")
        spans.append((len(before), len(after)))
    enc = tokenizer.backend.encode(full, add_special_tokens=False)
    labels = [IGNORE] * len(enc.ids)
    for t, (start, end) in enumerate(enc.offsets):
        if end > start and any(a <= start < b for a, b in spans):
            labels[t] = enc.ids[t]
    return list(enc.ids), labels


def _text_blocks(rec: Record, tokenizer: Any, seq_len: int) -> list[Example]:
    ids = tokenizer.encode(rec.data)
    blocks = [ids[i : i + seq_len] for i in range(0, len(ids), seq_len)]
    blocks = [b for b in blocks if len(b) > 1]
    return [Example(b, list(b), f"{rec.where} tokens {i * seq_len}-{i * seq_len + len(b)}") for i, b in enumerate(blocks)]


# ------------------------------------------------------------------------------------ rows
def make_rows(examples: list[Example], *, seq_len: int, packing: bool, seed: int) -> list[Row]:
    """One row per example (padded at batch time), or examples packed into rows of at most seq_len tokens.

    Packing is best-fit decreasing: the examples, longest first (equal lengths in a seeded order), each go
    into the open row with the least room left that still holds them, else a new row. Taking examples in
    their order and starting a new row when the next one does not fit (next fit) leaves rows about 70% full
    for lengths spread evenly up to seq_len; best fit decreasing fills them to within a few percent, so a
    step trains on that many more tokens for the same work. Examples are never split. The rows come out in
    the order they were opened; the dataset's seeded per-epoch order shuffles them.
    """
    if not packing:
        return [Row(e.input_ids, e.labels, [1] * len(e.input_ids), list(range(len(e.input_ids)))) for e in examples]
    order = torch.randperm(len(examples), generator=torch.Generator().manual_seed(seed)).tolist()
    order.sort(key=lambda i: -len(examples[i].input_ids))  # stable: ties keep the seeded order
    rows: list[Row] = []
    by_room: dict[int, list[int]] = {}  # room left -> the open rows with that much room
    rooms: list[int] = []  # the keys of by_room, ascending
    for i in order:
        e = examples[i]
        n = len(e.input_ids)
        at = bisect.bisect_left(rooms, n)
        if at < len(rooms):  # the fullest open row that still holds this example
            room = rooms[at]
            r = by_room[room].pop()
            if not by_room[room]:
                del by_room[room]
                rooms.pop(at)
        else:
            rows.append(Row([], [], [], []))
            r, room = len(rows) - 1, seq_len
        cur = rows[r]
        seg = (cur.segments[-1] if cur.segments else 0) + 1
        cur.input_ids += e.input_ids
        cur.labels += [IGNORE] + e.labels[1:]
        cur.segments += [seg] * n
        cur.positions += list(range(n))
        left = room - n
        if left > 0:
            if left not in by_room:
                bisect.insort(rooms, left)
                by_room[left] = []
            by_room[left].append(r)
    return rows


def collate(rows: Sequence[Row], pad_id: int, *, pad_to: int | None = None) -> dict[str, torch.Tensor]:
    """Right-padded tensors (B, T): input_ids, labels (-100 on padding), segments (0 on padding), positions."""
    T = pad_to or max(len(r.input_ids) for r in rows)
    out = {k: torch.full((len(rows), T), fill, dtype=torch.long)
           for k, fill in (("input_ids", pad_id), ("labels", IGNORE), ("segments", 0), ("positions", 0))}
    for b, r in enumerate(rows):
        n = len(r.input_ids)
        out["input_ids"][b, :n] = torch.tensor(r.input_ids)
        out["labels"][b, :n] = torch.tensor(r.labels)
        out["segments"][b, :n] = torch.tensor(r.segments)
        out["positions"][b, :n] = torch.tensor(r.positions)
    return out


@dataclass
class Dataset:
    """Rows plus the deterministic order in which they are batched."""

    rows: list[Row]
    batch_size: int
    grad_accum: int
    seed: int
    pad_id: int
    fingerprint: str = ""
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def micro_batches_per_epoch(self) -> int:
        return -(-len(self.rows) // self.batch_size)

    @property
    def steps_per_epoch(self) -> int:
        """Optimizer steps per epoch; the last one may take fewer micro-batches (as transformers' Trainer)."""
        return max(1, -(-self.micro_batches_per_epoch // self.grad_accum))

    def order(self, epoch: int) -> list[int]:
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
        return torch.randperm(len(self.rows), generator=g).tolist()

    def step_batches(self, epoch: int, step_in_epoch: int, *, rank: int = 0,
                     world_size: int = 1) -> list[dict[str, torch.Tensor]]:
        """The micro-batches of one optimizer step (this rank's share of each global micro-batch)."""
        order = self.order(epoch)
        per = self.batch_size * world_size
        first = step_in_epoch * self.grad_accum
        out = []
        for m in range(first, min(first + self.grad_accum, -(-len(order) // per))):
            idx = order[m * per : (m + 1) * per][rank * self.batch_size : (rank + 1) * self.batch_size]
            if idx:
                out.append(self.collate([self.rows[i] for i in idx]))
        return out

    def eval_batches(self) -> Iterator[dict[str, torch.Tensor]]:
        for i in range(0, len(self.rows), self.batch_size):
            yield self.collate(self.rows[i : i + self.batch_size])

    # what a batch holds: the causal LM's; a classification dataset (classification.py) overrides these
    def collate(self, rows: Sequence[Row]) -> dict[str, torch.Tensor]:
        return collate(rows, self.pad_id)

    def targets_in(self, batch: dict[str, torch.Tensor]) -> int:
        """Terms of the loss in `batch` (the loop divides a step's summed loss by their number): predicted tokens."""
        return int((batch["labels"][:, 1:] != IGNORE).sum())

    def tokens_in(self, batch: dict[str, torch.Tensor]) -> int:
        """Non-padding tokens in `batch` (for tokens and tokens/s in the metrics)."""
        return int((batch["segments"] != 0).sum())

    @property
    def n_tokens(self) -> int:
        return sum(r.n_tokens for r in self.rows)


def build_dataset(path: str | Path, tokenizer: Any, *, seq_len: int, packing: bool, batch_size: int,
                  grad_accum: int, seed: int, truncate: bool = True,
                  records: list[Record] | None = None) -> Dataset:
    """Read (unless `records` are given), tokenize and arrange a data file into a Dataset."""
    records = records if records is not None else read_records(path)
    examples = tokenize_records(records, tokenizer, seq_len=seq_len, truncate=truncate, source=str(path))
    rows = make_rows(examples, seq_len=seq_len, packing=packing, seed=seed)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (tokenizer.eos_token_id or 0)
    digest = hashlib.sha256(Path(path).read_bytes()).hexdigest()[:16]
    logger.info("%s: %d examples -> %d rows (%s), %d tokens", path, len(examples), len(rows),
                "packed" if packing else "padded per batch", sum(r.n_tokens for r in rows))
    return Dataset(rows, batch_size, grad_accum, seed, pad_id, fingerprint=digest,
                   meta={"examples": len(examples), "rows": len(rows)})


def check_vocab(dataset: Dataset, vocab_size: int, source: str) -> None:
    """Token ids must fit the model's embedding (a tokenizer/model mismatch otherwise fails deep inside)."""
    top = max(max(r.input_ids) for r in dataset.rows)
    if top >= vocab_size:
        raise InvalidArgumentError(f"{source}: token id {top} is outside the model's vocabulary of {vocab_size}")
