"""The training loop: a model, a loss function and a Dataset in; optimizer steps, metrics and checkpoints out.

    loop = TrainLoop(model, loss_fn, dataset, args, precision, output_dir, save_extra=...)
    loop.run(resume_from=None)   # -> LoopResult

`loss_fn(model, micro_batch) -> (sum of per-target losses, number of targets)`: the loop divides every
micro-batch's sum by the number of targets in the whole optimizer step (all accumulated micro-batches),
so a step's gradient is that of the token-mean loss over the step, however the rows are split (transformers'
Trainer does the same with `num_items_in_batch`). Any model and loss fit: a classifier's cross-entropy as
well as the causal LM's. The dataset says what a batch holds: `collate(rows)`, `targets_in(batch)` (the loss
terms) and `tokens_in(batch)` (non-padding tokens, for the metrics).

Evaluation: by default the target-mean loss over the eval set (`eval_loss`); an `evaluator(model, batches)`
returns that and more (a classifier's `eval_accuracy` or `eval_micro_f1`), all logged with the step.

Each optimizer step appends one line to `metrics.jsonl` (step, epoch, loss, lr, grad_norm, tokens,
tokens_per_s, eval_loss on evaluation steps), updates a tqdm bar on a terminal and, with
log="tensorboard", writes TensorBoard scalars. Ctrl-C finishes the current step, saves a checkpoint and
prints the command that resumes; a second Ctrl-C stops at once. A NaN/inf loss stops before the optimizer
step (weights untouched) with the step number and the last good checkpoint.
"""

from __future__ import annotations

import json
import math
import signal
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable

import torch
from torch import nn

from ..errors import CheckpointError, LeanformersError
from .allocator import memory_first
from .args import FinetuneArgs
from .checkpoint import checkpoint_dirs, load_checkpoint, save_checkpoint
from .data import Dataset
from .optim import Precision, make_optimizer, make_scheduler

LossFn = Callable[[nn.Module, dict[str, torch.Tensor]], "tuple[torch.Tensor, int]"]
# evaluator(model, batches on the device, autocast context factory) -> {"eval_loss": ..., other "eval_*" scores}
Evaluator = Callable[[nn.Module, Iterable[dict[str, torch.Tensor]], Callable[[], Any]], "dict[str, float]"]


class TrainingError(LeanformersError, RuntimeError):
    """Training cannot go on (a NaN/inf loss); the message says where and what is kept."""


@dataclass
class LoopResult:
    steps: int
    loss: float | None
    eval_loss: float | None
    tokens: int
    interrupted: bool = False
    checkpoint: Path | None = None
    eval_metrics: dict[str, float] | None = None  # the last evaluation's eval_* values


class TrainLoop:
    # False on the ranks of a distributed run other than 0: they train but write no metrics, bar or TensorBoard
    main_process = True

    def __init__(self, model: nn.Module, loss_fn: LossFn, dataset: Dataset, args: FinetuneArgs, precision: Precision,
                 output_dir: Path, *, eval_dataset: Dataset | None = None,
                 save_extra: Callable[[Path], None] | None = None, resume_hint: str = "",
                 evaluator: Evaluator | None = None):
        self.model, self.loss_fn, self.data, self.args = model, loss_fn, dataset, args
        self.precision, self.output_dir, self.eval_data = precision, output_dir, eval_dataset
        self.save_extra, self.resume_hint, self.evaluator = save_extra, resume_hint, evaluator
        self.params = [p for p in model.parameters() if p.requires_grad]
        if args.max_steps is not None:
            self.total_steps = args.max_steps
        else:
            self.total_steps = max(1, math.ceil(args.epochs * dataset.steps_per_epoch))
        self.optimizer = make_optimizer(model, lr=args.lr, weight_decay=args.weight_decay)
        self.scheduler = make_scheduler(self.optimizer, schedule=args.lr_schedule, warmup=args.warmup_steps,
                                        total=self.total_steps)
        self.step = 0
        self.tokens = 0
        self._stop = False
        self._last_ckpt: Path | None = None

    # ------------------------------------------------------------------------------ state
    def _state(self) -> dict[str, Any]:
        epoch, in_epoch = divmod(self.step, self.data.steps_per_epoch)
        return {"step": self.step, "epoch": epoch, "step_in_epoch": in_epoch, "tokens": self.tokens,
                "data": {"fingerprint": self.data.fingerprint, "rows": len(self.data.rows),
                         "steps_per_epoch": self.data.steps_per_epoch},
                "total_steps": self.total_steps, "args": self.args.to_json()}

    def save(self) -> Path:
        self._last_ckpt = save_checkpoint(
            self.output_dir, self.step, model=self.model, optimizer=self.optimizer, scheduler=self.scheduler,
            scaler=self.precision.scaler, state=self._state(), extra_writer=self.save_extra,
            save_total_limit=self.args.save_total_limit)
        return self._last_ckpt

    def restore(self, ckpt: Path) -> None:
        state = self._load(ckpt)
        data = state.get("data", {})
        if data.get("fingerprint") != self.data.fingerprint or data.get("rows") != len(self.data.rows):
            raise CheckpointError(f"{ckpt}: the checkpoint was trained on other data (fingerprint "
                                   f"{data.get('fingerprint')}, {data.get('rows')} rows; now {self.data.fingerprint}, "
                                   f"{len(self.data.rows)} rows)")
        self.step, self.tokens, self._last_ckpt = state["step"], state.get("tokens", 0), ckpt
        if self.main_process:
            _truncate_metrics(self.output_dir / "metrics.jsonl", self.step)

    def _load(self, ckpt: Path) -> dict[str, Any]:
        """Restore weights, optimizer, scheduler and RNG states from `ckpt`; returns its trainer state."""
        return load_checkpoint(ckpt, model=self.model, optimizer=self.optimizer, scheduler=self.scheduler,
                               scaler=self.precision.scaler)

    # ------------------------------------------------------------------------------ loop
    def run(self, resume_from: Path | None = None) -> LoopResult:
        if resume_from is not None:
            self.restore(resume_from)
        self.model.train()
        metrics_file = open(self.output_dir / "metrics.jsonl", "a", encoding="utf-8") if self.main_process else None
        tb = self._tensorboard()
        bar = self._bar()
        old_handler = self._install_sigint()
        loss = eval_loss = scores = None
        memory = memory_first("memory first (--method qlora or --grad-checkpointing, on CPU)",
                              self.precision.device.type == "cpu" and (
                                  getattr(self.args, "method", None) == "qlora"
                                  or bool(getattr(self.model, "gradient_checkpointing", False))))
        memory.__enter__()
        try:
            while self.step < self.total_steps:
                row = self._train_step()
                loss = row["loss"]
                every = self.args.eval_every
                if self.eval_data is not None and ((every and self.step % every == 0) or self.step == self.total_steps):
                    scores = self.evaluate()
                    row.update(scores)
                    eval_loss = scores["eval_loss"]
                if metrics_file is not None:
                    metrics_file.write(json.dumps(row) + "\n")
                    metrics_file.flush()
                if tb is not None:
                    for k, v in row.items():
                        if k != "step":
                            tb.add_scalar(f"eval/{k[5:]}" if k.startswith("eval_") else f"train/{k}", v, self.step)
                if bar is not None:
                    bar.update(1)
                    bar.set_postfix(loss=f"{row['loss']:.4f}", lr=f"{row['lr']:.2e}",
                                    tok_s=f"{row['tokens_per_s']:.0f}")
                if self.args.callback is not None:
                    self.args.callback(dict(row))
                if self.args.save_every and self.step % self.args.save_every == 0 and self.step < self.total_steps:
                    self.save()
                if self._stop_now() and self.step < self.total_steps:
                    ckpt = self.save()
                    if self.main_process:
                        print(f"\nInterrupted at step {self.step}/{self.total_steps}; checkpoint saved to {ckpt}.\n"
                              f"Resume with: {self.resume_hint}", file=sys.stderr, flush=True)
                    raise KeyboardInterrupt
        finally:
            if metrics_file is not None:
                metrics_file.close()
            if bar is not None:
                bar.close()
            if tb is not None:
                tb.close()
            if old_handler is not None:
                signal.signal(signal.SIGINT, old_handler)
            memory.__exit__(None, None, None)
        return LoopResult(self.step, loss, eval_loss, self.tokens, checkpoint=self._last_ckpt, eval_metrics=scores)

    def _train_step(self) -> dict[str, Any]:
        epoch, in_epoch = divmod(self.step, self.data.steps_per_epoch)
        batches = self.data.step_batches(epoch, in_epoch)
        n_targets = sum(self.data.targets_in(b) for b in batches)
        n_tokens = sum(self.data.tokens_in(b) for b in batches)
        lr = self.scheduler.get_last_lr()[0]
        t0 = time.perf_counter()
        total = 0.0
        device = self.precision.device
        for b in batches:
            b = {k: v.to(device, non_blocking=True) for k, v in b.items()}
            with self.precision.autocast():
                loss_sum, _ = self.loss_fn(self.model, b)
            value = float(loss_sum.detach())
            if not math.isfinite(value):
                self.optimizer.zero_grad(set_to_none=True)
                saved = checkpoint_dirs(self.output_dir)
                kept = self._last_ckpt or (saved[-1][1] if saved else None)
                raise TrainingError(
                    f"the loss is {value} at step {self.step + 1} (epoch {epoch}); training stopped before that "
                    f"step's update. " + (f"The last good checkpoint is {kept}; resume from it with a lower --lr "
                                          "or without the offending data." if kept else "No checkpoint was saved yet."))
            self.precision.backward(loss_sum / max(1, n_targets))
            total += value
        grad_norm = self.precision.step(self.optimizer, self.params, self.args.max_grad_norm)
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        dt = time.perf_counter() - t0
        self.step += 1
        self.tokens += n_tokens
        return {"step": self.step, "epoch": round(self.step / self.data.steps_per_epoch, 6),
                "loss": total / max(1, n_targets), "lr": lr, "grad_norm": float(grad_norm),
                "tokens": self.tokens, "tokens_per_s": n_tokens / dt if dt > 0 else 0.0}

    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        """{"eval_loss": target-mean loss over the whole eval set} (the evaluator's scores, when one was given)."""
        self.model.eval()
        device = self.precision.device
        batches = ({k: v.to(device) for k, v in b.items()} for b in self.eval_data.eval_batches())
        try:
            if self.evaluator is not None:
                return self.evaluator(self.model, batches, self.precision.autocast)
            total, count = 0.0, 0
            for b in batches:
                with self.precision.autocast():
                    loss_sum, n = self.loss_fn(self.model, b)
                total += float(loss_sum)
                count += n
            return {"eval_loss": total / max(1, count)}
        finally:
            self.model.train()

    # ------------------------------------------------------------------------------ helpers
    def _stop_now(self) -> bool:
        """Whether Ctrl-C asked to save and stop after this step (a distributed loop asks every rank)."""
        return self._stop

    def _install_sigint(self):
        if threading.current_thread() is not threading.main_thread():
            return None

        def handler(signum, frame):
            if self._stop:  # second Ctrl-C: stop now
                raise KeyboardInterrupt
            self._stop = True
            print("\nCtrl-C: finishing this step, then saving a checkpoint (Ctrl-C again to stop at once)",
                  file=sys.stderr, flush=True)

        return signal.signal(signal.SIGINT, handler)

    def _bar(self):
        show = self.args.progress if self.args.progress is not None else sys.stderr.isatty()
        if not show or not self.main_process:
            return None
        from tqdm.auto import tqdm

        return tqdm(total=self.total_steps, initial=self.step, desc="finetune", unit="step", file=sys.stderr,
                    dynamic_ncols=True)

    def _tensorboard(self):
        if self.args.log != "tensorboard" or not self.main_process:
            return None
        from torch.utils.tensorboard import SummaryWriter

        return SummaryWriter(log_dir=str(self.output_dir / "runs"), purge_step=self.step + 1 if self.step else None)


def _truncate_metrics(path: Path, step: int) -> None:
    """Drop metrics of steps after `step` (logged by a run that died before its next checkpoint)."""
    if not path.is_file():
        return
    keep = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            if json.loads(line).get("step", 0) <= step:
                keep.append(line)
        except json.JSONDecodeError:
            continue  # a line cut by a kill
    path.write_text("".join(k + "\n" for k in keep), encoding="utf-8")
