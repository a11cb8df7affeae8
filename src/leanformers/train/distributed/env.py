"""The process group of a distributed run: started from torchrun's environment, with collectives that
fail after `--dist-timeout` seconds and say which step of the run waited, and agreement between ranks.

    group = Group.start(args)          # torchrun's env:// variables (or a world of one), gloo or NCCL
    prep = group.agree("loading the model", lambda: prepare(...))   # every rank's error, reported by rank 0
    with group.collective("training step 12"): ...                   # a timeout names what waited

Agreement: each rank runs the same phase locally, then one collective exchanges how it went. A rank
that fails (its data file missing on another node, a model it cannot load) does not leave the others
waiting in the next collective: all of them stop, rank 0 raising the error that names the failing rank
and why, the other ranks a short `PeerFailedError`. Control messages go over a gloo group (also on NCCL
runs), so agreeing never touches the GPU.
"""

from __future__ import annotations

import contextlib
import datetime
import logging
import os
import socket
from dataclasses import dataclass
from typing import Any, Callable, Iterator, TypeVar

import torch
import torch.distributed as dist

from ...errors import InvalidArgumentError, LeanformersError

logger = logging.getLogger("leanformers.train.distributed")

ENV_VARS = ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")  # what init_process_group's env:// reads
T = TypeVar("T")


class DistributedError(LeanformersError, RuntimeError):
    """A distributed run cannot start or go on: ranks disagree, a rank failed, a collective timed out."""


class PeerFailedError(DistributedError):
    """Raised on ranks other than 0 when a phase failed somewhere: rank 0 reports what and where."""


def launched() -> bool:
    """Whether this process was started by torchrun (or another launcher setting the env:// variables)."""
    return all(v in os.environ for v in ENV_VARS)


def _timeout_like(exc: BaseException) -> bool:
    text = str(exc).lower()
    return any(k in text for k in ("timed out", "timeout", "connection closed", "connection reset", "pair closure",
                                   "broken pipe", "connection refused"))


@dataclass
class Group:
    rank: int
    world_size: int
    local_rank: int
    local_world_size: int
    device: torch.device
    backend: str
    timeout_s: float
    restart: int  # torchrun's TORCHELASTIC_RESTART_COUNT: 0 on the first attempt
    max_restarts: int
    run_id: str | None
    launched: bool  # False: a world of one in this process (resuming a sharded checkpoint without torchrun)
    _owned: bool = False
    _ctrl: Any = None  # our gloo group for objects, barriers and CPU sums (see `control_group`)
    _log_level: int | None = None

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    # ------------------------------------------------------------------------------ start / stop
    @classmethod
    def start(cls, args: Any) -> "Group":
        """Join (or, for a world of one, make) the process group for `args.device`: gloo on CPU, NCCL on CUDA."""
        env = os.environ
        is_launched = launched()
        rank = int(env.get("RANK", 0)) if is_launched else 0
        world = int(env.get("WORLD_SIZE", 1)) if is_launched else 1
        local_rank = int(env.get("LOCAL_RANK", 0)) if is_launched else 0
        local_world = int(env.get("LOCAL_WORLD_SIZE", 1)) if is_launched else 1
        device = _rank_device(str(args.device), local_rank, local_world)
        backend = "nccl" if device.type == "cuda" else "gloo"
        timeout = datetime.timedelta(seconds=float(args.dist_timeout))
        owned = False
        if not dist.is_initialized():
            if device.type == "cuda":
                torch.cuda.set_device(device)
            if is_launched:
                # torchrun's store outlives a restart of the workers: without a per-attempt prefix, a restarted
                # group would read the dead workers' addresses (gloo: "connectFullMesh failed")
                store, rank, world = next(dist.rendezvous("env://", timeout=timeout))
                attempt = int(env.get("TORCHELASTIC_RESTART_COUNT", 0) or 0)
                dist.init_process_group(backend, store=dist.PrefixStore(f"leanformers/attempt-{attempt}", store),
                                        rank=rank, world_size=world, timeout=timeout,
                                        device_id=device if device.type == "cuda" else None)
            else:
                dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1, timeout=timeout)
            owned = True
        else:  # the caller made the group (leanformers.finetune() called from the user's torchrun script)
            rank, world = dist.get_rank(), dist.get_world_size()
        ctrl = dist.new_group(backend="gloo", timeout=timeout) if world > 1 else None
        group = cls(rank, world, local_rank, local_world, device, backend, float(args.dist_timeout),
                    int(env.get("TORCHELASTIC_RESTART_COUNT", 0) or 0), int(env.get("TORCHELASTIC_MAX_RESTARTS", 0) or 0),
                    env.get("TORCHELASTIC_RUN_ID"), is_launched, owned, ctrl)
        if rank != 0:  # the run's log is rank 0's: the other ranks log errors only
            pkg = logging.getLogger("leanformers")
            group._log_level = pkg.level
            pkg.setLevel(logging.ERROR)
        return group

    def close(self, *, failed: bool = False) -> None:
        """Leave the group (only one this run made; after a failure only gloo's, which cannot hang)."""
        if self._log_level is not None:
            logging.getLogger("leanformers").setLevel(self._log_level)
            self._log_level = None
        try:
            if not failed and self.world_size > 1 and self.backend == "gloo" and dist.is_initialized():
                # a last collective on the default group while this thread waits without the GIL: its worker
                # threads (which outlive the run, see `control_group`) finish releasing FSDP's last tensors now
                with self.collective("finishing the run"):
                    dist.barrier()
        finally:
            ctrl, self._ctrl = self._ctrl, None
            if self._owned and dist.is_initialized() and not (failed and self.backend == "nccl"):
                del ctrl  # our last reference: destroying the groups joins its worker threads
                dist.destroy_process_group()
            elif ctrl is not None and dist.is_initialized() and not failed:
                dist.destroy_process_group(ctrl)  # the caller's group stays; ours goes
            self._owned = False

    @property
    def control_group(self) -> Any:
        """The gloo group that carries every collective of ours with tensors made in Python (objects,
        barriers, CPU sums, checkpoint planning); DDP and FSDP use the default group.

        DDP's reducer and FSDP's device mesh keep the default group alive after `destroy_process_group()`
        (torch 2.13), so its gloo worker threads outlive the run. A worker still releasing the tensors of a
        collective when the interpreter finalizes takes the GIL and aborts the process ("terminate called
        without an active exception"; 1 run in 30 under load when the run's last collective was on the
        default group). This group is ours alone: `close()` drops it and its threads are joined."""
        return self._ctrl

    # ------------------------------------------------------------------------------ collectives
    @contextlib.contextmanager
    def collective(self, what: str) -> Iterator[None]:
        """Turn a collective's timeout or a lost peer into a DistributedError that says what was waiting."""
        try:
            yield
        except LeanformersError:
            raise
        except (RuntimeError, dist.DistError) as exc:
            if not _timeout_like(exc):
                raise
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            if "timed out" in first.lower() or "timeout" in first.lower():
                why = (f"another rank did not answer within {self.timeout_s:g} s (--dist-timeout): it hangs, died or "
                       "is far slower")
            else:
                why = "the connection to another rank was lost: it died (torchrun's log shows which rank failed first)"
            raise DistributedError(f"rank {self.rank}: {what}: {why} [{first[:240]}]") from None

    def gather(self, obj: Any, what: str) -> list[Any]:
        """Every rank's `obj` (small, picklable), in rank order, over the control group."""
        if self.world_size == 1:
            return [obj]
        out: list[Any] = [None] * self.world_size
        with self.collective(what):
            dist.all_gather_object(out, obj, group=self._ctrl)
        return out

    def all_reduce(self, tensor: torch.Tensor, what: str) -> torch.Tensor:
        """Sum `tensor` over the ranks in place (on the run's device)."""
        if self.world_size > 1:
            with self.collective(what):
                dist.all_reduce(tensor, group=self._ctrl if tensor.device.type == "cpu" else None)
        return tensor

    def barrier(self, what: str) -> None:
        if self.world_size > 1:
            with self.collective(what):
                dist.barrier(group=self._ctrl)

    def agree(self, what: str, fn: Callable[[], T]) -> T:
        """Run `fn` on every rank, then stop every rank if it failed on any: rank 0 raises the error
        naming the failing rank(s) (its own exception as it is when all ranks failed alike)."""
        result: T | None = None
        error: BaseException | None = None
        try:
            result = fn()
        except Exception as exc:  # noqa: BLE001 - any failure must reach the other ranks, not strand them
            error = exc
        report = None if error is None else (socket.gethostname(), _describe(error))
        reports = self.gather(report, what)
        failed = [(r, rep) for r, rep in enumerate(reports) if rep is not None]
        if not failed:
            return result  # type: ignore[return-value]
        if not self.is_main:
            if error is not None and not isinstance(error, LeanformersError):
                logger.error("rank %d: %s failed", self.rank, what, exc_info=error)
            raise PeerFailedError(f"rank {self.rank}: stopped while {what}; rank 0 reports why")
        if error is not None and all(rep[1] == report[1] for _, rep in failed):
            if isinstance(error, LeanformersError):
                raise error
            raise DistributedError(f"{what}: {report[1]}") from error
        lines = "; ".join(f"rank {r} ({host}): {msg}" for r, (host, msg) in failed)
        raise DistributedError(f"{what} failed on {len(failed)} of {self.world_size} ranks: {lines}")

    def same(self, what: str, value: Any, describe: Callable[[Any, Any], str]) -> None:
        """Every rank must hold rank 0's `value`; rank 0 raises `describe(rank 0's, other's)` naming the first
        rank that differs, the others PeerFailedError."""
        values = self.gather(value, what)
        for r, v in enumerate(values):
            if v != values[0]:
                if self.is_main:
                    raise DistributedError(f"{what}: rank {r} differs from rank 0: {describe(values[0], v)}")
                raise PeerFailedError(f"rank {self.rank}: stopped while {what}; rank 0 reports why")


def _describe(exc: BaseException) -> str:
    if isinstance(exc, LeanformersError):
        return str(exc)
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    return f"{type(exc).__name__}: {text}"[:500]


def _rank_device(device: str, local_rank: int, local_world: int) -> torch.device:
    """This rank's device: cuda -> cuda:LOCAL_RANK (one GPU per process), cpu -> cpu."""
    try:
        d = torch.device(device)
    except RuntimeError:
        raise InvalidArgumentError(f"device (--device) {device!r} is not a torch device") from None
    if d.type == "cpu":
        return d
    if d.type != "cuda":
        raise InvalidArgumentError(f"device (--device) {device}: torch.distributed has a backend for cpu (gloo) and "
                                   "cuda (NCCL) only")
    if not torch.cuda.is_available():
        raise InvalidArgumentError(f"device (--device) {device}: CUDA is not available to this torch build/machine")
    if d.index is not None and local_world > 1:
        raise InvalidArgumentError(f"device (--device) {device} names one GPU, but torchrun starts {local_world} "
                                   "processes on this node; pass --device cuda (each process takes cuda:LOCAL_RANK)")
    index = d.index if d.index is not None else local_rank
    if index >= torch.cuda.device_count():
        raise InvalidArgumentError(f"device (--device) {device}: process {local_rank} of this node needs GPU {index}, "
                                   f"but {torch.cuda.device_count()} are visible; start at most that many processes "
                                   "per node (--nproc-per-node)")
    return torch.device("cuda", index)
