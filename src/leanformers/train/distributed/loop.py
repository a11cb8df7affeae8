"""The training loop on many processes: TrainLoop with each rank's share of the batch and the averaged loss.

Per optimizer step every rank runs its micro-batches through the wrapped model (DDP or FSDP, whose
hooks reduce the gradients), then the ranks sum one small tensor (loss, NaN/inf, Ctrl-C) and step.
The gradient is that of one process training on the whole global batch: every rank knows the step's total
number of labelled targets N (it has every row), scales its loss sums by world_size / N (DDP and FSDP
average over the ranks), and the logged loss is the sum over ranks / N. Rank 0 alone writes metrics.jsonl,
the progress bar and TensorBoard; checkpoints are sharded (distributed/checkpoint.py).
"""

from __future__ import annotations

import contextlib
import math
import time
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from ..args import FinetuneArgs
from ..checkpoint import checkpoint_dirs
from ..loop import TrainingError, TrainLoop
from ..optim import Precision
from .checkpoint import FORMAT, load_sharded, save_sharded
from .data import RankShard
from .env import Group, PeerFailedError


def _call(wrapped: nn.Module, batch: dict[str, torch.Tensor]) -> Any:
    return wrapped(batch)


class DistributedTrainLoop(TrainLoop):
    def __init__(self, wrapped: nn.Module, model: nn.Module, dataset: RankShard, args: FinetuneArgs,
                 precision: Precision, output_dir: Path, *, group: Group, strategy: str,
                 sync: Callable[[bool], contextlib.AbstractContextManager], eval_dataset: RankShard | None = None,
                 adapter_writer: Callable[[Path], None] | None = None, resume_hint: str = ""):
        self.main_process = group.is_main
        super().__init__(wrapped, _call, dataset, args, precision, output_dir,  # type: ignore[arg-type]
                         eval_dataset=eval_dataset, resume_hint=resume_hint)
        self.inner, self.group, self.strategy, self.sync = model, group, strategy, sync
        self.adapter_writer = adapter_writer
        self._stop_agreed = False

    # ------------------------------------------------------------------------------ state
    def _state(self) -> dict[str, Any]:
        state = super()._state()
        state.update(format=FORMAT, world_size=self.group.world_size, global_batch=self.data.global_batch,
                     strategy=self.strategy)
        return state

    def save(self) -> Path:
        self._last_ckpt = save_sharded(
            self.group, self.output_dir, self.step, model=self.inner, optimizer=self.optimizer,
            scheduler=self.scheduler, scaler=self.precision.scaler, state=self._state(),
            adapter_writer=self.adapter_writer, save_total_limit=self.args.save_total_limit)
        return self._last_ckpt

    def _load(self, ckpt: Path) -> dict[str, Any]:
        return load_sharded(self.group, ckpt, model=self.inner, optimizer=self.optimizer, scheduler=self.scheduler,
                            scaler=self.precision.scaler)

    def _stop_now(self) -> bool:
        return self._stop_agreed

    # ------------------------------------------------------------------------------ steps
    def _train_step(self) -> dict[str, Any]:
        with self.group.collective(f"training step {self.step + 1}"):
            return self._step()

    def _step(self) -> dict[str, Any]:
        epoch, in_epoch = divmod(self.step, self.data.steps_per_epoch)
        work = self.data.step_batches(epoch, in_epoch)
        n_targets, n_tokens = self.data.step_counts(epoch, in_epoch)
        scale = self.group.world_size / max(1, n_targets)  # DDP / FSDP average the ranks' gradients
        lr = self.scheduler.get_last_lr()[0]
        device = self.precision.device
        t0 = time.perf_counter()
        total = torch.zeros((), dtype=torch.float64)
        for i, (b, real) in enumerate(work):
            b = {k: v.to(device, non_blocking=True) for k, v in b.items()}
            with self.sync(i == len(work) - 1):
                with self.precision.autocast():
                    loss_sum, _ = self.model(b)
                if real:
                    total += loss_sum.detach().to("cpu", torch.float64)
                self.precision.backward(loss_sum * (scale if real else 0.0))
        # one small sum over the ranks: the step's loss, and whether any rank was interrupted (Ctrl-C)
        flags = torch.tensor([float(total), float(self._stop)], dtype=torch.float64)
        flags = self._all_reduce_cpu(flags, f"step {self.step + 1}: summing the loss over the ranks")
        value = float(flags[0])
        self._stop_agreed = bool(flags[1] > 0)
        if not math.isfinite(value):
            self.optimizer.zero_grad(set_to_none=True)
            saved = checkpoint_dirs(self.output_dir)
            kept = self._last_ckpt or (saved[-1][1] if saved else None)
            message = (f"the loss is {value} at step {self.step + 1} (epoch {epoch}); training stopped before that "
                       f"step's update. " + (f"The last good checkpoint is {kept}; resume from it with a lower --lr "
                                             "or without the offending data." if kept else "No checkpoint was saved yet."))
            raise TrainingError(message) if self.group.is_main else PeerFailedError(
                f"rank {self.group.rank}: stopped at step {self.step + 1} (non-finite loss); rank 0 reports it")
        grad_norm = self.precision.step(self.optimizer, self.params, self.args.max_grad_norm)
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        dt = time.perf_counter() - t0
        self.step += 1
        self.tokens += n_tokens
        return {"step": self.step, "epoch": round(self.step / self.data.steps_per_epoch, 6),
                "loss": value / max(1, n_targets), "lr": lr, "grad_norm": float(grad_norm),
                "tokens": self.tokens, "tokens_per_s": n_tokens / dt if dt > 0 else 0.0}

    def _all_reduce_cpu(self, t: torch.Tensor, what: str) -> torch.Tensor:
        """Sum a small CPU tensor over the ranks (through the run's device for NCCL)."""
        device = self.precision.device
        moved = t.to(device) if device.type == "cuda" else t
        self.group.all_reduce(moved, what)
        return moved.cpu()

    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        """{"eval_loss": token-mean loss over the whole eval set}, each rank taking every world_size-th batch."""
        self.model.eval()
        sums = torch.zeros(2, dtype=torch.float64)
        try:
            with self.group.collective(f"evaluating at step {self.step}"):
                for b, real in self.eval_data.eval_batches():
                    b = {k: v.to(self.precision.device) for k, v in b.items()}
                    with self.precision.autocast():
                        loss_sum, n = self.model(b)
                    if real:
                        sums += torch.tensor([float(loss_sum), float(n)], dtype=torch.float64)
                sums = self._all_reduce_cpu(sums, f"step {self.step}: summing the eval loss over the ranks")
        finally:
            self.model.train()
        return {"eval_loss": float(sums[0]) / max(1.0, float(sums[1]))}
