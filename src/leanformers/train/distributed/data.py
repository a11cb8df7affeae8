"""Each rank's share of the training rows: the single-process order, every global micro-batch split by rank.

A step's global batch is batch_size x grad_accum x world_size rows: micro-batch m of an epoch is
`order[m*b*W : (m+1)*b*W]` (the epoch's seeded shuffle, as for one process), rank r takes rows
`[r*b, (r+1)*b)` of it (`Dataset.step_batches(..., rank=, world_size=)`). So the ranks never share a row,
no row is left out, the split depends only on (seed, epoch, world size), and W processes at batch b train
on exactly the rows one process trains on at batch W*b. The last micro-batch of an epoch may leave some
ranks without rows: they run a stand-in row with weight 0 (no loss, zero gradient), so every rank does the
same forward and backward passes (DDP and FSDP communicate inside them).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator

import torch

from ..data import IGNORE, Dataset, Row, collate


@dataclass
class RankShard:
    """This rank's view of a Dataset in a world of `world_size` processes (what TrainLoop reads)."""

    data: Dataset
    rank: int
    world_size: int

    @property
    def rows(self) -> list[Row]:
        return self.data.rows

    @property
    def fingerprint(self) -> str:
        return self.data.fingerprint

    @property
    def global_micro_batch(self) -> int:
        return self.data.batch_size * self.world_size

    @property
    def global_batch(self) -> int:
        return self.global_micro_batch * self.data.grad_accum

    @property
    def steps_per_epoch(self) -> int:
        micro = -(-len(self.rows) // self.global_micro_batch)
        return max(1, -(-micro // self.data.grad_accum))

    def _micro_range(self, step_in_epoch: int) -> range:
        first = step_in_epoch * self.data.grad_accum
        return range(first, min(first + self.data.grad_accum, -(-len(self.rows) // self.global_micro_batch)))

    def step_batches(self, epoch: int, step_in_epoch: int) -> list[tuple[dict[str, torch.Tensor], bool]]:
        """This rank's micro-batches of one step as (batch, real); stand-ins (real=False) fill the count."""
        real = self.data.step_batches(epoch, step_in_epoch, rank=self.rank, world_size=self.world_size)
        out = [(b, True) for b in real]
        micro = self._micro_range(step_in_epoch)
        if len(out) < len(micro):
            order = self.data.order(epoch)
            stand_in = collate([self.rows[order[micro[0] * self.global_micro_batch]]], self.data.pad_id)
            out += [(stand_in, False)] * (len(micro) - len(out))
        return out

    def step_rows(self, epoch: int, step_in_epoch: int) -> list[Row]:
        """Every row of the step's global batch (all ranks)."""
        micro = self._micro_range(step_in_epoch)
        order = self.data.order(epoch)
        per = self.global_micro_batch
        return [self.rows[i] for i in order[micro.start * per : micro.stop * per]]

    def step_counts(self, epoch: int, step_in_epoch: int) -> tuple[int, int]:
        """(labelled targets, non-padding tokens) of the step's global batch: every rank computes them alone."""
        rows = self.step_rows(epoch, step_in_epoch)
        targets = sum(sum(1 for lab in r.labels[1:] if lab != IGNORE) for r in rows)
        return targets, sum(r.n_tokens for r in rows)

    def eval_batches(self) -> Iterator[tuple[dict[str, torch.Tensor], bool]]:
        """This rank's evaluation batches (every world_size-th one), stand-ins filling the count."""
        n = -(-len(self.rows) // self.data.batch_size)
        count = 0
        for i, batch in enumerate(self.data.eval_batches()):
            if i % self.world_size == self.rank:
                count += 1
                yield batch, True
        for _ in range(-(-n // self.world_size) - count):
            yield collate(self.rows[:1], self.data.pad_id), False
