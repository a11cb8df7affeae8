"""Helpers for the fine-tuning tests: tiny data files and transformers' Trainer fed leanformers' exact batches."""

from __future__ import annotations

import contextlib
import json
import random
from pathlib import Path

import torch

WORDS = ("once upon a time there was a little model that wanted to generate text the quick brown fox jumps "
         "over the lazy dog hello world def add return").split()


@contextlib.contextmanager
def torch_threads(n: int):
    """torch's intra-op thread count set to n inside the block, restored after it."""
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def write_text_data(path: Path, n: int, *, seed: int = 0, min_words: int = 3, max_words: int = 30) -> Path:
    """n {"text": ...} records of varying length."""
    rng = random.Random(seed)
    lines = [json.dumps({"text": " ".join(rng.choice(WORDS) for _ in range(rng.randint(min_words, max_words)))})
             for _ in range(n)]
    path.write_text("\n".join(lines) + "\n")
    return path


def write_mixed_data(path: Path) -> Path:
    """One record of every JSON format."""
    recs = [
        {"messages": [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hello"},
                      {"role": "assistant", "content": "hello world"}, {"role": "user", "content": "again"},
                      {"role": "assistant", "content": "once upon a time"}]},
        {"prompt": "def add(a, b):", "completion": "\n    return a + b"},
        {"instruction": "Say hello", "input": "in French", "output": "Bonjour le monde."},
        {"instruction": "Say hello", "output": "Hello world!"},
        {"text": "The quick brown fox jumps over the lazy dog."},
    ]
    path.write_text("\n".join(json.dumps(r) for r in recs) + "\n")
    return path


def metrics(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def leanformers_rows(model_dir: Path, data: Path, *, seq_len: int, batch_size: int, grad_accum: int, seed: int,
                     steps: int) -> list[dict]:
    """The rows leanformers trains on, in the order its first `steps` steps consume them (one epoch)."""
    import leanformers
    from leanformers.train.data import build_dataset

    lm = leanformers.load(str(model_dir), dtype="float32")
    ds = build_dataset(data, lm.tokenizer, seq_len=seq_len, packing=False, batch_size=batch_size,
                       grad_accum=grad_accum, seed=seed)
    assert ds.steps_per_epoch >= steps
    order = ds.order(0)[: steps * batch_size * grad_accum]
    return [{"input_ids": ds.rows[i].input_ids, "labels": ds.rows[i].labels} for i in order], ds.pad_id


def trainer_losses(model, rows: list[dict], pad_id: int, tmp: Path, *, batch_size: int, grad_accum: int,
                   steps: int, lr: float, weight_decay: float, warmup: int, schedule: str,
                   collate_fn=None) -> list[float]:
    """Per-step training losses of transformers' Trainer on `rows` in this exact order (fp32, CPU).

    collate_fn: the batches' collator (default: causal-LM rows of input_ids and labels, right-padded)."""
    from torch.utils.data import SequentialSampler
    from transformers import Trainer, TrainerCallback, TrainingArguments

    class InOrder(Trainer):
        def _get_train_sampler(self, *args, **kwargs):
            return SequentialSampler(self.train_dataset)

    def collate(batch):
        T = max(len(r["input_ids"]) for r in batch)
        ids = torch.full((len(batch), T), pad_id)
        labels = torch.full((len(batch), T), -100)
        mask = torch.zeros((len(batch), T), dtype=torch.long)
        for b, r in enumerate(batch):
            n = len(r["input_ids"])
            ids[b, :n], labels[b, :n], mask[b, :n] = torch.tensor(r["input_ids"]), torch.tensor(r["labels"]), 1
        return {"input_ids": ids, "labels": labels, "attention_mask": mask}

    losses: list[float] = []

    class Record(TrainerCallback):
        def on_log(self, args, state, control, logs=None, **kw):
            if logs and "loss" in logs:
                losses.append(float(logs["loss"]))

    targs = TrainingArguments(
        output_dir=str(tmp), per_device_train_batch_size=batch_size, gradient_accumulation_steps=grad_accum,
        max_steps=steps, learning_rate=lr, weight_decay=weight_decay, warmup_steps=warmup, lr_scheduler_type=schedule,
        max_grad_norm=1.0, logging_steps=1, report_to=[], save_strategy="no", use_cpu=True, seed=42,
        dataloader_num_workers=0, disable_tqdm=True, remove_unused_columns=False,
    )
    trainer = InOrder(model=model, args=targs, train_dataset=rows, data_collator=collate_fn or collate,
                      callbacks=[Record()])
    trainer.train()
    return losses
