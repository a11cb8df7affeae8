"""Distributed fine-tuning on torch.distributed, launched by torchrun: DDP or FSDP2, sharded checkpoints,
elastic restarts. The same `leanformers finetune` options; the processes are torchrun's.

    torchrun --nproc-per-node 2 -m leanformers finetune -m MODEL --data train.jsonl --output out/ --strategy fsdp
    torchrun --nnodes 2 --nproc-per-node 8 --rdzv-backend c10d --rdzv-endpoint HOST:29500 -m leanformers finetune ...
    torchrun --nproc-per-node 2 --max-restarts 3 -m leanformers finetune ...   # a worker dies: all restart, resume

How a run goes (finetune_distributed): join the process group (gloo on CPU, NCCL on CUDA; every
collective times out after --dist-timeout seconds and says what waited); check that every rank has the
same options; find the checkpoint to resume; every rank reads the data and loads the model, and the ranks
agree that this worked (rank 0 reports any rank's failure) and that their data is the same; pick DDP or
FSDP (distributed/strategy.py); train (distributed/loop.py) on each rank's share of every global batch
(distributed/data.py), saving sharded checkpoints (distributed/checkpoint.py); gather the result on rank 0,
which writes the Hugging Face directory or PEFT adapter exactly as one process does.

Elastic restarts: when a worker dies, torchrun (with --max-restarts) stops the others and starts the group
again; a restarted run (TORCHELASTIC_RESTART_COUNT > 0) continues from the newest checkpoint in the output
directory, dropping the metrics of the steps after it, so every step appears once in metrics.jsonl. A run
that dies before its first checkpoint starts over (recognised by torchrun's run id, written at the start).
Multi-node: the output directory must be on a filesystem every node sees (each rank writes its shard there).
"""

from __future__ import annotations

import dataclasses
import logging
import resource
import shlex
from pathlib import Path
from typing import Any

import torch

from ...errors import CheckpointError, InvalidArgumentError
from ..args import FinetuneArgs, check_resumable
from ..checkpoint import STATE, checkpoint_dirs, find_checkpoint, read_state
from ..lora import PEFT_PREFIX
from ..loss import causal_lm_loss
from .checkpoint import is_sharded
from .data import RankShard
from .env import DistributedError, Group, PeerFailedError, launched
from .loop import DistributedTrainLoop
from .strategy import check_strategy, choose, gather_model, gather_trainable, inner_model, wrap

__all__ = ["wanted", "finetune_distributed", "DistributedError", "PeerFailedError", "launched"]

logger = logging.getLogger("leanformers.train.distributed")
RUN_ID_FILE = ".torchrun_run_id"  # torchrun's run id of the run that owns the output directory


def wanted(args: FinetuneArgs) -> bool:
    """Whether `finetune` runs distributed: under torchrun, or to resume a sharded checkpoint in one process."""
    if launched():
        return True
    if args.strategy != "auto" or args.cpu_offload:
        flag = f"--strategy {args.strategy}" if args.strategy != "auto" else "--cpu-offload"
        raise InvalidArgumentError(
            f"{flag} spreads training over processes that torchrun starts, and this process was not started by it "
            "(no RANK/WORLD_SIZE/MASTER_ADDR/MASTER_PORT in its environment); run: torchrun --nproc-per-node N "
            "-m leanformers finetune ...")
    if args.resume:
        try:
            return is_sharded(find_checkpoint(args.resume, Path(args.output_dir)))
        except CheckpointError:
            return False  # the single-process path reports it
    return False


def finetune_distributed(args: FinetuneArgs) -> Any:
    """Run `leanformers.finetune` as one rank of a torch.distributed group (see the module docstring)."""
    group = Group.start(args)
    failed = True
    try:
        result = _run(args, group)
        failed = False
        return result
    finally:
        group.close(failed=failed)


def _run(args: FinetuneArgs, group: Group) -> Any:
    from ..run import FinetuneResult, prepare, save_outputs, start_output

    if group.launched:
        logger.info("torch.distributed: %d processes (%d on this node), %s on %s, collectives time out after %g s "
                    "(--dist-timeout)%s", group.world_size, group.local_world_size, group.backend, group.device,
                    group.timeout_s, f"; torchrun restart {group.restart} of {group.max_restarts}" if group.restart else "")
    else:
        logger.info("resuming a sharded checkpoint in this one process (a torch.distributed group of one)")

    # ---- before the model loads: every rank the same options, the strategy possible, the checkpoint
    group.same("comparing the options of the ranks", _comparable(args), _differences)
    group.agree("checking the strategy", lambda: check_strategy(args, group))
    args, ckpt = group.agree("checking the output directory and the checkpoint", lambda: _check_output(args, group))

    # ---- every rank reads the data and loads the model; all must succeed, with the same data
    load_device = str(group.device) if args.method == "qlora" else "cpu"  # sharding moves the rest to the device
    prep = group.agree("reading the data and loading the model",
                       lambda: prepare(args, group.device, load_device=load_device))
    group.same("comparing the data and model of the ranks", _identity(prep), _differences)

    # ---- strategy, output directory, loop
    strategy = choose(args, group, prep.lm.model)
    with group.collective(f"setting up {strategy.upper()}"):
        wrapped, sync = wrap(strategy, prep.lm.model, causal_lm_loss, group, prep.precision, args)
    model = inner_model(wrapped)
    out = Path(args.output_dir)
    if group.is_main:
        start_output(args)
        if group.run_id:
            (out / RUN_ID_FILE).write_text(group.run_id + "\n")
    group.barrier("starting the run")
    shard = RankShard(prep.dataset, group.rank, group.world_size)
    eval_shard = RankShard(prep.eval_set, group.rank, group.world_size) if prep.eval_set is not None else None
    write_adapter = prep.adapter_writer()

    def checkpoint_adapter(directory: Path) -> None:
        state = _peft_state(gather_trainable(model, group))
        if group.is_main and write_adapter is not None:
            write_adapter(directory, state)

    loop = DistributedTrainLoop(wrapped, model, shard, args, prep.precision, out, group=group, strategy=strategy,
                                sync=sync, eval_dataset=eval_shard,
                                adapter_writer=checkpoint_adapter if write_adapter is not None else None,
                                resume_hint=resume_command(args, group))
    if ckpt is None:
        torch.manual_seed(args.seed)
    result = loop.run(resume_from=ckpt)

    # ---- outputs: gathered on rank 0, written as by one process
    state = gather_model(model, group) if args.method == "full" else _peft_state(gather_trainable(model, group))
    if group.is_main:
        save_outputs(prep, out, state=state)
    group.barrier("writing the outputs")
    _log_peak_memory(group)
    return FinetuneResult(out, args.method, result.steps, result.loss, result.eval_loss, result.tokens,
                          out / "metrics.jsonl", result.checkpoint, rank=group.rank)


# ------------------------------------------------------------------------------------ checks
def _comparable(args: FinetuneArgs) -> dict[str, Any]:
    return {k: v for k, v in args.to_json().items() if k != "progress"}


def _differences(mine: dict[str, Any], other: dict[str, Any]) -> str:
    keys = [k for k in sorted(set(mine) | set(other)) if mine.get(k) != other.get(k)]
    diffs = "; ".join(f"{k}: {other.get(k)!r} there, {mine.get(k)!r} on rank 0" for k in keys)
    return f"{diffs} (every rank must run the same command on the same files)"


def _identity(prep: Any) -> dict[str, Any]:
    """What every rank must share: the data (path, content hash, rows, tokens) and the model (a checksum)."""
    ds, ev, m = prep.dataset, prep.eval_set, prep.lm.model
    emb = m.get_submodule(m.input_embedding).weight if isinstance(getattr(m, "input_embedding", None), str) else None
    return {
        "data": f"{prep.args.data} (sha256 {ds.fingerprint}..., {len(ds.rows)} rows, {ds.n_tokens} tokens)",
        "eval_data": None if ev is None else f"{prep.args.eval_data} (sha256 {ev.fingerprint}..., {len(ev.rows)} rows)",
        "model": f"{sum(p.numel() for p in m.parameters())} parameters, embedding checksum "
                 f"{float(emb.detach().double().sum()) if emb is not None else 0.0:.6e}",
    }


def _check_output(args: FinetuneArgs, group: Group) -> tuple[FinetuneArgs, Path | None]:
    """(the options, adjusted on a torchrun restart, and the checkpoint to resume or None)."""
    from ..run import _previous_run

    out = Path(args.output_dir)
    if group.restart > 0:
        if checkpoint_dirs(out):
            logger.info("torchrun restart %d: continuing from the newest checkpoint in %s", group.restart, out)
            args = dataclasses.replace(args, resume=True, overwrite=False)
        elif group.run_id and (out / RUN_ID_FILE).is_file() and \
                (out / RUN_ID_FILE).read_text().strip() == group.run_id:
            logger.info("torchrun restart %d: no checkpoint was saved yet; starting the run over", group.restart)
            args = dataclasses.replace(args, resume=False, overwrite=True)
    if not args.resume:
        previous = _previous_run(out)
        if previous and not args.overwrite:
            raise InvalidArgumentError(
                f"{out}: holds a previous run ({', '.join(previous[:4])}); pass --resume to continue it or "
                "--overwrite to replace it")
        return args, None
    ckpt = find_checkpoint(args.resume, out)
    state = read_state(ckpt)
    if not is_sharded(ckpt):
        raise CheckpointError(
            f"{ckpt}: written by a single process (weights in one file, AdamW state by parameter position, one "
            f"random stream), a format that is not resharded, so {group.world_size} torch.distributed process"
            f"{'es' if group.world_size > 1 else ''} cannot resume it: resume it without torchrun; runs started "
            "under torchrun write sharded checkpoints that resume at any world size")
    saved = dict(state["args"])
    now = args.batch_size * args.grad_accum * group.world_size
    then = state.get("global_batch")
    if then != now:
        raise InvalidArgumentError(
            f"{ckpt / STATE}: the checkpoint was trained with a global batch of {then} rows per step "
            f"(batch {saved.get('batch_size')} x grad-accum {saved.get('grad_accum')} x {state.get('world_size')} "
            f"processes); now batch {args.batch_size} x grad-accum {args.grad_accum} x {group.world_size} processes "
            f"= {now}. Keep the global batch so the data position carries over: choose --batch-size and "
            "--grad-accum whose product with the number of processes is " + str(then))
    saved.update(batch_size=args.batch_size, grad_accum=args.grad_accum)  # free to change with the world size
    check_resumable(saved, args, str(ckpt / STATE))
    return args, ckpt


# ------------------------------------------------------------------------------------ helpers
def _peft_state(trainable: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """LoRA parameters by name -> PEFT's adapter keys."""
    return {PEFT_PREFIX + name: t for name, t in trainable.items()}


def _log_peak_memory(group: Group) -> None:
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux -> MiB
    cuda = torch.cuda.max_memory_allocated(group.device) / 2**30 if group.device.type == "cuda" else None
    peaks = group.gather((rss, cuda), "reporting peak memory")
    text = "peak RSS per rank (MiB): " + ", ".join(f"{r:.0f}" for r, _ in peaks)
    if cuda is not None:
        text += "; peak CUDA memory per rank (GiB): " + ", ".join(f"{c:.2f}" for _, c in peaks)
    logger.info(text)


def resume_command(args: FinetuneArgs, group: Group) -> str:
    """The torchrun command that continues this run."""
    from ..run import resume_command as single

    nodes = group.world_size // max(1, group.local_world_size)
    launcher = ["torchrun", "--nproc-per-node", str(group.local_world_size)]
    if nodes > 1:
        launcher += ["--nnodes", str(nodes), "--rdzv-backend", "c10d", "--rdzv-endpoint", "HOST:PORT"]
    parts = shlex.split(single(args))
    return shlex.join(launcher + ["-m"] + parts)
