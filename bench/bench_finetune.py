"""Fine-tuning speed and memory: leanformers vs transformers' Trainer (+ peft), side by side in one run.

    python bench/bench_finetune.py                       # every mode, ~15 minutes on 2 cores
    python bench/bench_finetune.py --modes lf-lora-bf16,hf-lora-bf16 --steps 3
    python bench/bench_finetune.py --distributed --threads 1 --seq-len 128 --batch-size 4   # torchrun, accelerate

SmolLM2-135M-Instruct (the bundled GGUF, dequantized once into a float32 Hugging Face directory that both
libraries load), rows of --seq-len 512 tokens, batch 8, the same pre-tokenized examples for every library:
examples of mixed length (32-512 tokens, seeded) cut from the bundled English text. transformers pads each
batch of 8 to its longest example (its collator's usual dynamic padding); leanformers packs the examples
into full rows (segment-masked, see leanformers.train.data) -- and `*-padded` modes show leanformers padding
like transformers, so the gain from packing and the gain from the loop itself are both visible.
Same hyperparameters everywhere: AdamW (torch's fused kernel in both), lr 1e-4 constant, no weight decay,
grad norm clipped at 1.0, LoRA r 16 / alpha 32 / all linear layers but lm_head. Precision as named
(bf16 = bfloat16 autocast over float32 master weights; leanformers keeps a frozen LoRA base in bfloat16).
QLoRA: leanformers' int4 base straight from the GGUF's Q4_1 blocks, bfloat16 activations.

Each (mode, round) is its own process with --threads threads: one warm-up step, then --steps timed steps.
Reported: non-padding tokens per second (median over the timed steps of all rounds, with min-max) and the
process's peak RSS (ru_maxrss: model load, data, optimizer and the steps). Ratios compare each leanformers
mode with the transformers mode of the same method and precision.

--distributed (issue 13): leanformers.finetune, full fine-tuning in fp32, on 1 process without torchrun and
on 1 and 2 processes under `torchrun --standalone` with DDP and FSDP, --threads threads per process, the same
global batch of --batch-size packed rows per step (each of 2 processes takes half); and transformers' Trainer
under `accelerate launch` (CPU, 127.0.0.1 only, offline) on 1 process and on 2 with DDP, on the same packed
rows in the same order, attention masked per packed example as in leanformers (see trainer_rows), with the same
hyperparameters and threads (accelerate's FSDP plugin does not run on CPU processes: see ACC_MODES). Reported
per mode: global non-padding tokens per second (median over the timed steps, min-max), each rank's peak RSS
(VmHWM), and for leanformers modes both as ratios to the accelerate+Trainer mode of the same processes.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable

ROOT = Path(__file__).resolve().parents[1]
HF_MODES = {"hf-lora-fp32": ("lora", "fp32"), "hf-lora-bf16": ("lora", "bf16"), "hf-full-fp32": ("full", "fp32"),
            "hf-full-bf16": ("full", "bf16")}
# leanformers modes: (method, precision, packing); a "-ckpt" suffix adds gradient checkpointing
LF_MODES = {"lf-lora-fp32": ("lora", "fp32", True), "lf-lora-fp32-padded": ("lora", "fp32", False),
            "lf-lora-bf16": ("lora", "bf16-mixed", True), "lf-lora-bf16-padded": ("lora", "bf16-mixed", False),
            "lf-full-fp32": ("full", "fp32", True), "lf-full-bf16": ("full", "bf16-mixed", True),
            "lf-full-bf16-padded": ("full", "bf16-mixed", False), "lf-qlora-int4": ("qlora", "bf16-mixed", True)}
LF_MODES.update({f"{k}-ckpt": v for k, v in list(LF_MODES.items())})
DEFAULT_MODES = ["lf-lora-bf16", "hf-lora-bf16", "lf-lora-fp32", "hf-lora-fp32", "lf-full-bf16", "hf-full-bf16",
                 "lf-full-fp32", "hf-full-fp32", "lf-qlora-int4", "lf-qlora-int4-ckpt", "lf-lora-bf16-padded"]
PEER = {m: "hf-" + "-".join(m.split("-")[1:3]) for m in LF_MODES}
PEER.update({m: "hf-lora-bf16" for m in LF_MODES if "qlora" in m})
LR, R, ALPHA = 1e-4, 16, 32


# ------------------------------------------------------------------------------------------ preparation
def prepare(work: Path, seq_len: int, n_examples: int) -> tuple[Path, Path, Path]:
    """(float32 HF directory of SmolLM2, the GGUF, rows.json) under `work`, made once."""
    sys.path.insert(0, str(ROOT / "src"))
    import leanformers
    from leanformers.hub import resolve

    gguf = resolve("smollm2-135m-instruct").path
    model_dir = work / "smollm2-135m-f32"
    if not (model_dir / "model.safetensors").is_file():
        from leanformers.train.export import save_pretrained

        lm = leanformers.load(str(gguf), dtype="float32")
        save_pretrained(lm.model, lm.config, lm.tokenizer, model_dir)
    rows_file = work / f"rows-{seq_len}-{n_examples}.json"
    if not rows_file.is_file():
        from leanformers.eval.perplexity import perplexity_text

        lm = leanformers.load(str(model_dir))
        ids = lm.tokenizer.encode(perplexity_text(), add_special_tokens=False)
        rng = random.Random(0)
        examples, pos = [], 0
        while len(examples) < n_examples:
            n = rng.randint(32, seq_len)
            if pos + n > len(ids):
                pos = rng.randint(0, 1000)
            examples.append(ids[pos : pos + n])
            pos += n
        rows_file.write_text(json.dumps(examples))
    return model_dir, Path(gguf), rows_file


# ------------------------------------------------------------------------------------------ workers
def make_trainer(model, data: list[dict], collate: Callable[[list[dict]], dict], *, batch_size: int, n_steps: int,
                 bf16: bool, output_dir: Path) -> tuple[Any, list[float]]:
    """transformers' Trainer over `data` in its order (no shuffling), `batch_size` rows per process, the shared
    hyperparameters (AdamW fused, LR constant, no weight decay, grad norm clipped at 1.0), no checkpoints; DDP
    without the search for unused parameters (Trainer's default turns it on; leanformers' DDP has it off, and
    torch warns that it costs a traversal of the graph per step when nothing is unused).

    Returns the Trainer, not yet trained, and the list its callback fills: perf_counter() at the first step's
    start and at every step's end (on every process; under `accelerate launch` the Trainer's Accelerator shards
    the batches over the processes)."""
    from torch.utils.data import SequentialSampler
    from transformers import Trainer, TrainerCallback, TrainingArguments

    stamps: list[float] = []

    class Clock(TrainerCallback):
        def on_step_begin(self, args, state, control, **kw):
            if not stamps:
                stamps.append(time.perf_counter())

        def on_step_end(self, args, state, control, **kw):
            stamps.append(time.perf_counter())

    class InOrder(Trainer):
        def _get_train_sampler(self, *args, **kwargs):
            return SequentialSampler(self.train_dataset)

    targs = TrainingArguments(
        output_dir=str(output_dir), per_device_train_batch_size=batch_size, max_steps=n_steps,
        learning_rate=LR, lr_scheduler_type="constant", weight_decay=0.0, max_grad_norm=1.0, bf16=bf16,
        use_cpu=True, logging_steps=1, report_to=[], save_strategy="no", dataloader_num_workers=0,
        disable_tqdm=True, remove_unused_columns=False, optim="adamw_torch_fused", seed=0,
        ddp_find_unused_parameters=False)
    return InOrder(model=model, args=targs, train_dataset=data, data_collator=collate, callbacks=[Clock()]), stamps


def right_pad(batch: list[dict], columns: dict[str, tuple[str, int]], *, mask: bool = False) -> dict:
    """Long tensors (B, longest row) for the Trainer: output name -> (the row's key, padding value); with
    mask, an attention_mask of 1 on each row's tokens."""
    import torch

    T = max(len(r["input_ids"]) for r in batch)
    out = {name: torch.full((len(batch), T), fill, dtype=torch.long) for name, (_, fill) in columns.items()}
    if mask:
        out["attention_mask"] = torch.zeros((len(batch), T), dtype=torch.long)
    for b, r in enumerate(batch):
        n = len(r["input_ids"])
        for name, (key, _) in columns.items():
            out[name][b, :n] = torch.tensor(r[key])
        if mask:
            out["attention_mask"][b, :n] = 1
    return out


def worker_hf(mode: str, model_dir: Path, rows: list[list[int]], a: argparse.Namespace) -> dict:
    import torch
    from transformers import AutoModelForCausalLM

    method, prec = HF_MODES[mode]
    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32)
    if method == "lora":
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(model, LoraConfig(r=R, lora_alpha=ALPHA, target_modules="all-linear", lora_dropout=0.0,
                                                 task_type="CAUSAL_LM"))
    n_steps = a.warmup + a.steps
    data = [{"input_ids": r} for r in rows[: n_steps * a.batch_size]]
    tokens = [sum(len(r["input_ids"]) for r in data[i * a.batch_size : (i + 1) * a.batch_size]) for i in range(n_steps)]

    def collate(batch):  # labels = the inputs (the Trainer's model shifts them); padding masked
        return right_pad(batch, {"input_ids": ("input_ids", 0), "labels": ("input_ids", -100)}, mask=True)

    trainer, stamps = make_trainer(model, data, collate, batch_size=a.batch_size, n_steps=n_steps,
                                   bf16=prec == "bf16", output_dir=a.work / f"hf-out-{mode}")
    trainer.train()
    times = [b - a_ for a_, b in zip(stamps, stamps[1:])]
    return {"step_s": times[a.warmup :], "tokens": tokens[a.warmup :]}


def worker_lf(mode: str, model_dir: Path, gguf: Path, rows: list[list[int]], a: argparse.Namespace) -> dict:
    import torch

    sys.path.insert(0, str(ROOT / "src"))
    import leanformers
    from leanformers.train.args import FinetuneArgs
    from leanformers.train.data import Dataset, Example, make_rows
    from leanformers.train.lora import apply_lora
    from leanformers.train.loop import TrainLoop
    from leanformers.train.loss import causal_lm_loss, set_gradient_checkpointing
    from leanformers.train.optim import Precision

    method, prec, packing = LF_MODES[mode]
    if method == "qlora":
        lm = leanformers.load(str(gguf), quantize="int4")
    else:
        dtype = "bfloat16" if method == "lora" and prec == "bf16-mixed" else "float32"
        lm = leanformers.load(str(model_dir), dtype=dtype)
    torch.manual_seed(0)
    if method == "full":
        for p in lm.model.parameters():
            p.requires_grad_(True)
    else:
        apply_lora(lm.model, r=R, alpha=ALPHA, target_modules="all-linear")
    set_gradient_checkpointing(lm.model, a.grad_checkpointing or mode.endswith("-ckpt"))
    n_steps = a.warmup + a.steps
    examples = [Example(r, r) for r in rows]
    packed = make_rows(examples, seq_len=a.seq_len, packing=packing, seed=0)
    ds = Dataset(packed[: n_steps * a.batch_size], a.batch_size, 1, 0, 0)
    out = a.work / f"lf-out-{mode}"
    out.mkdir(parents=True, exist_ok=True)
    (out / "metrics.jsonl").unlink(missing_ok=True)
    stamps: list[float] = []
    tokens: list[int] = []

    def clock(row):
        stamps.append(time.perf_counter())
        tokens.append(row["tokens"])

    args = FinetuneArgs(model=str(model_dir), data="-", output_dir=str(out), method=method, max_steps=n_steps,
                        batch_size=a.batch_size, lr=LR, lr_schedule="constant", weight_decay=0.0, max_grad_norm=1.0,
                        precision=prec, save_every=None, seq_len=a.seq_len, callback=clock, progress=False).check()
    loop = TrainLoop(lm.model, causal_lm_loss, ds, args, Precision(prec, torch.device("cpu")), out)
    t0 = time.perf_counter()
    loop.run()
    stamps.insert(0, t0)
    tokens.insert(0, 0)
    times = [b - a_ for a_, b in zip(stamps, stamps[1:])]
    per_step = [b - a_ for a_, b in zip(tokens, tokens[1:])]
    return {"step_s": times[a.warmup :], "tokens": per_step[a.warmup :]}


def alternate(a: argparse.Namespace, model_dir: Path, rounds: int = 3, batch: int = 2) -> str:
    """LoRA bf16-mixed forward+backward of leanformers and transformers+peft on one identical batch of full
    (unpadded) rows, alternating in one process: the loop's own speed, without packing, under the same
    machine load for both (the shared CPU's load drifts between processes)."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    sys.path.insert(0, str(ROOT / "src"))
    import leanformers
    from leanformers.train.lora import apply_lora
    from leanformers.train.loss import causal_lm_loss

    torch.set_num_threads(a.threads)
    ids = torch.randint(0, 49152, (batch, a.seq_len), generator=torch.Generator().manual_seed(0))
    lm = leanformers.load(str(model_dir), dtype="bfloat16")
    apply_lora(lm.model, r=R, alpha=ALPHA)
    lm.model.train()
    hf = get_peft_model(AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32),
                        LoraConfig(r=R, lora_alpha=ALPHA, target_modules="all-linear", task_type="CAUSAL_LM"))
    hf.train()
    b = {"input_ids": ids, "labels": ids, "segments": torch.ones_like(ids),
         "positions": torch.arange(a.seq_len).expand(batch, a.seq_len)}

    def lf_step():
        with torch.autocast("cpu", dtype=torch.bfloat16):
            s, n = causal_lm_loss(lm.model, b)
        (s / n).backward()

    def hf_step():
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = hf(input_ids=ids, labels=ids, attention_mask=torch.ones_like(ids)).loss
        loss.backward()

    times: dict[str, list[float]] = {"leanformers": [], "transformers+peft": []}
    for r in range(rounds + 1):
        for name, fn in (("leanformers", lf_step), ("transformers+peft", hf_step)):
            t = time.perf_counter()
            fn()
            if r:  # round 0 warms up
                times[name].append(time.perf_counter() - t)
    lf, hf_ = statistics.median(times["leanformers"]), statistics.median(times["transformers+peft"])
    return (f"Alternating in one process, LoRA bf16-mixed forward+backward, {batch} full rows of {a.seq_len} tokens, "
            f"{a.threads} thread(s), median of {rounds}:\n\n| library | s per step | tokens/s | runs |\n|---|---:|---:|---|\n"
            + "".join(f"| {k} | {statistics.median(v):.1f} | {batch * a.seq_len / statistics.median(v):.0f} | "
                      f"{', '.join(f'{x:.1f}' for x in v)} |\n" for k, v in times.items())
            + f"\nleanformers / transformers tokens/s: {hf_ / lf:.2f}x\n")


# ------------------------------------------------------------------------------------------ distributed
DIST_MODES = {"single": (1, None), "ddp-1": (1, "ddp"), "fsdp-1": (1, "fsdp"), "ddp-2": (2, "ddp"),
              "fsdp-2": (2, "fsdp")}  # mode: (processes, strategy; None = no torchrun)
# transformers' Trainer under `accelerate launch`: mode -> (processes, the distributed type the Trainer's
# Accelerator must run, the launcher's flags). One process: the simple launcher (--cpu), no torch.distributed.
# Two: accelerate's torch-elastic launcher (--multi_gpu), its only local multi-process launcher besides mpirun
# (`--cpu` with 2 processes starts one process unless given an MPI hostfile); on a machine without GPUs the
# Trainer (use_cpu) runs its 2 processes as MULTI_CPU over gloo, with DDP. --use_fsdp asks for FSDP2, which
# accelerate 1.15 enables only for GPU-like distributed types, not MULTI_CPU (accelerate/state.py,
# AcceleratorState): the worker checks and reports it instead of training DDP under an FSDP name.
ACC_MODES: dict[str, tuple[int, str, list[str]]] = {
    "hf-accel-1": (1, "NO", ["--cpu"]),
    "hf-accel-ddp-2": (2, "MULTI_CPU", ["--multi_gpu"]),
    "hf-accel-fsdp-2": (2, "FSDP", ["--use_fsdp", "--fsdp_version", "2",
                                    "--fsdp_auto_wrap_policy", "TRANSFORMER_BASED_WRAP",
                                    "--fsdp_transformer_layer_cls_to_wrap", "LlamaDecoderLayer",
                                    "--fsdp_reshard_after_forward", "true",
                                    "--fsdp_state_dict_type", "FULL_STATE_DICT"]),
}
# the accelerate+Trainer mode each leanformers mode is compared with: the first of these that was measured
# (fsdp-2 against DDP, the Trainer's only 2-process strategy on CPU, when its FSDP cannot run)
ACC_PEER = {"single": ("hf-accel-1",), "ddp-1": ("hf-accel-1",), "fsdp-1": ("hf-accel-1",),
            "ddp-2": ("hf-accel-ddp-2",), "fsdp-2": ("hf-accel-fsdp-2", "hf-accel-ddp-2")}


def peak_rss_mb() -> float:
    """This process's peak RSS in MB: VmHWM, which starts afresh at exec (ru_maxrss would carry the launcher's
    peak over fork + exec: torchrun's, accelerate's or this driver's); ru_maxrss where /proc is missing."""
    try:
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) for line in f if line.startswith("VmHWM:")) / 1024
    except (OSError, StopIteration):
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def dist_data(work: Path, n_records: int) -> Path:
    """A JSONL of {"text": ...} records cut from the bundled English text (packed into full rows by finetune)."""
    sys.path.insert(0, str(ROOT / "src"))
    from leanformers.eval.perplexity import perplexity_text

    words = perplexity_text().split()
    rng = random.Random(0)
    path = work / f"dist-train-{n_records}.jsonl"
    with path.open("w") as f:
        for _ in range(n_records):
            n, at = rng.randint(40, 300), rng.randint(0, len(words) - 301)
            f.write(json.dumps({"text": " ".join(words[at : at + n])}) + "\n")
    return path


def trainer_rows(a: argparse.Namespace, model_dir: Path, data: Path) -> Path:
    """The packed rows leanformers.finetune trains on from `data`, in the order it takes them, as JSON for the
    Trainer, so that both libraries train on the same tokens: the same tokenizer, packing and seed (finetune's
    default), and rows [i*B, (i+1)*B) form global step i's batch of B = --batch-size rows in both. Each of 2
    processes also gets the same half: leanformers hands rank k the k-th slice of the global batch, accelerate
    the k-th per-process batch in turn. Each row keeps its positions (restarting at 0 in every packed example),
    from which transformers masks attention to each example, as leanformers' segment mask does."""
    sys.path.insert(0, str(ROOT / "src"))
    from leanformers.tokenizer import load_tokenizer_from_dir
    from leanformers.train.args import FinetuneArgs
    from leanformers.train.data import build_dataset

    need = (a.warmup + a.steps) * a.batch_size
    ds = build_dataset(data, load_tokenizer_from_dir(model_dir), seq_len=a.seq_len, packing=True,
                       batch_size=a.batch_size, grad_accum=1, seed=FinetuneArgs.seed)
    if need > len(ds.rows):  # a second epoch would reshuffle: keep to the first
        raise SystemExit(f"{data}: {len(ds.rows)} packed rows of {a.seq_len} tokens, fewer than the {need} of "
                         f"{a.warmup + a.steps} steps x batch {a.batch_size}")
    rows = [ds.rows[i] for i in ds.order(0)[:need]]
    path = a.work / f"trainer-rows-{a.seq_len}-{need}.json"
    path.write_text(json.dumps([{"input_ids": r.input_ids, "labels": r.labels, "positions": r.positions}
                                for r in rows]))
    return path


def dist_worker(a: argparse.Namespace) -> None:
    """One process of a distributed mode (under torchrun, or alone for "single"): train, print RESULT."""
    if a.dist_worker in ACC_MODES:
        return accelerate_worker(a)
    import torch

    torch.set_num_threads(a.threads)
    sys.path.insert(0, str(ROOT / "src"))
    import leanformers

    procs, strategy = DIST_MODES[a.dist_worker]
    stamps: list[float] = []
    tokens: list[int] = []
    losses: list[float] = []

    def clock(row):
        stamps.append(time.perf_counter())
        tokens.append(row["tokens"])
        losses.append(row["loss"])

    out = a.work / f"dist-out-{a.dist_worker}"
    extra = {"strategy": strategy} if strategy else {}
    stamps.append(time.perf_counter())
    tokens.append(0)
    leanformers.finetune(a.model_dir, data=a.rows, output_dir=str(out), method="full", precision="fp32",
                         max_steps=a.warmup + a.steps, batch_size=a.batch_size // procs, seq_len=a.seq_len,
                         packing=True, lr=LR, lr_schedule="constant", weight_decay=0.0, save_every=None,
                         overwrite=True, progress=False, callback=clock, **extra)
    times = [y - x for x, y in zip(stamps, stamps[1:])]
    per_step = [y - x for x, y in zip(tokens, tokens[1:])]
    rank = int(os.environ.get("RANK", 0))
    res = {"rank": rank, "peak_rss_mb": peak_rss_mb()}
    if rank == 0:
        res.update(step_s=times[a.warmup :], tokens=per_step[a.warmup :], loss=losses)
    print("RESULT " + json.dumps(res), flush=True)


def accelerate_worker(a: argparse.Namespace) -> None:
    """One process of an ACC_MODES mode (under `accelerate launch`): transformers' Trainer, full fine-tuning in
    fp32 of the rows trainer_rows wrote, --batch-size / processes rows per process, then the model saved (as
    leanformers.finetune saves it, so both peaks include the save); print RESULT. A run whose Accelerator is not
    of the mode's distributed type reports that as its error, untrained."""
    import accelerate
    import torch
    from transformers import AutoModelForCausalLM

    torch.set_num_threads(a.threads)
    procs, kind, flags = ACC_MODES[a.dist_worker]
    rows = json.loads(Path(a.rows).read_text())
    n_steps = a.warmup + a.steps
    model = AutoModelForCausalLM.from_pretrained(a.model_dir, dtype=torch.float32)
    model.config.use_cache = False  # no KV cache in training; with one, transformers ignores the packed positions

    def collate(batch: list[dict]) -> dict:
        """No attention mask, so that transformers derives one causal mask per packed example from where the
        positions restart."""
        return right_pad(batch, {"input_ids": ("input_ids", 0), "labels": ("labels", -100),
                                 "position_ids": ("positions", 0)})

    trainer, stamps = make_trainer(model, rows, collate, batch_size=a.batch_size // procs, n_steps=n_steps,
                                   bf16=False, output_dir=a.work / f"dist-out-{a.dist_worker}")
    rank = int(os.environ.get("RANK", 0))
    res: dict[str, Any] = {"rank": rank, "world_size": trainer.args.world_size}
    got = trainer.accelerator.distributed_type.value
    if got != kind:
        res["error"] = (f"`accelerate launch {flags[0]}` asked for {kind}, but the Trainer's Accelerator runs {got} "
                        f"(accelerate {accelerate.__version__}, {'a' if torch.cuda.is_available() else 'no'} GPU)")
        if kind == "FSDP" and got == "MULTI_CPU":
            res["error"] += (": accelerate enables its FSDP plugin only for GPU-like distributed types (MULTI_GPU, "
                             "MULTI_XPU, ...), not for CPU processes (AcceleratorState in accelerate/state.py), so "
                             "training on would be DDP under an FSDP name")
        print("RESULT " + json.dumps(res), flush=True)
        return
    trainer.train()
    trainer.save_model()
    res.update(peak_rss_mb=peak_rss_mb(), wrapper=type(trainer.model_wrapped).__name__)
    if rank == 0:
        times = [y - x for x, y in zip(stamps, stamps[1:])]
        tokens = [sum(len(r["input_ids"]) for r in rows[i * a.batch_size : (i + 1) * a.batch_size])
                  for i in range(n_steps)]
        res.update(step_s=times[a.warmup :], tokens=tokens[a.warmup :],
                   loss=[h["loss"] for h in trainer.state.log_history if "loss" in h])
    print("RESULT " + json.dumps(res), flush=True)


def free_port() -> int:
    """A TCP port free on 127.0.0.1 now (for accelerate's --main_process_port)."""
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def dist_command(m: str, a: argparse.Namespace, model_dir: Path, data: Path) -> list[str]:
    """The launch of mode `m`: python alone, torchrun, or `accelerate launch` (local only: 127.0.0.1)."""
    worker = [__file__, "--dist-worker", m, "--model-dir", str(model_dir), "--rows", str(data), "--steps",
              str(a.steps), "--warmup", str(a.warmup), "--threads", str(a.threads), "--seq-len", str(a.seq_len),
              "--batch-size", str(a.batch_size), "--work", str(a.work)]
    if m in ACC_MODES:
        procs, _, flags = ACC_MODES[m]
        return [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", str(procs),
                "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
                "--num_cpu_threads_per_process", str(a.threads), "--main_process_ip", "127.0.0.1",
                "--main_process_port", str(free_port()), *flags, *worker]
    procs, strategy = DIST_MODES[m]
    if strategy is None:
        return [sys.executable, *worker]
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(procs), *worker]


def first_error(stderr: str) -> str:
    """The line of a failed launch's stderr that names the error (the last 'SomethingError: ...' line)."""
    lines = [x.strip() for x in stderr.splitlines() if x.strip()]
    named = [x for x in lines if x.split(":", 1)[0].endswith(("Error", "Exception")) and ":" in x]
    return (named or lines or ["(no output)"])[-1][:400]


def run_distributed(a: argparse.Namespace, model_dir: Path) -> str:
    """Every DIST_MODES and ACC_MODES mode as its own launch, interleaved over --rounds; a markdown table."""
    data = dist_data(a.work, 200)
    env = dict(os.environ, PYTHONPATH=str(ROOT / "src"), TOKENIZERS_PARALLELISM="false",
               OMP_NUM_THREADS=str(a.threads), HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1")
    known = {**DIST_MODES, **ACC_MODES}
    modes = [m for m in a.modes.split(",") if m in known] or list(known)
    rows_file = trainer_rows(a, model_dir, data) if any(m in ACC_MODES for m in modes) else None
    results: dict[str, list[dict]] = {m: [] for m in modes}
    errors: dict[str, str] = {}
    for r in range(a.rounds):
        for m in modes:
            procs = known[m][0]
            cmd = dist_command(m, a, model_dir, rows_file if m in ACC_MODES else data)
            t0 = time.time()
            proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
            res = [json.loads(x[7:]) for x in proc.stdout.splitlines() if x.startswith("RESULT ")]
            reported = next((x["error"] for x in res if "error" in x), None)
            sizes = [x.get("world_size", procs) for x in res]
            if proc.returncode or reported or len(res) != procs or any(n != procs for n in sizes):
                errors[m] = reported or (first_error(proc.stderr) if proc.returncode else
                                         f"{len(res)} of {procs} processes reported, world sizes {sizes}")
                print(f"{m}: failed: {errors[m]}\n{proc.stderr[-3000:] if proc.returncode else ''}", file=sys.stderr)
                continue
            res.sort(key=lambda x: x["rank"])
            run = dict(res[0], rss=[x["peak_rss_mb"] for x in res])
            results[m].append(run)
            tps = [t / s for t, s in zip(run["tokens"], run["step_s"])]
            print(f"round {r + 1} {m:15s} {statistics.median(tps):8.0f} tok/s  peak RSS per rank "
                  f"{', '.join(f'{x:.0f}' for x in run['rss'])} MB ({time.time() - t0:.0f} s)"
                  + (f", the Trainer's model: {run['wrapper']}" if "wrapper" in run else ""), file=sys.stderr,
                  flush=True)
    return dist_table(a, results, errors)


def dist_table(a: argparse.Namespace, results: dict[str, list[dict]], errors: dict[str, str]) -> str:
    """The markdown table of run_distributed: per mode the median tokens/s, each rank's median peak RSS, and
    for leanformers modes both against the accelerate+Trainer mode of the same processes and strategy."""
    summary: dict[str, tuple[float, float, float, list[float]]] = {}  # mode: (median, min, max tokens/s, rss)
    for m, runs in results.items():
        if runs:
            tps = [t / s for run in runs for t, s in zip(run["tokens"], run["step_s"])]
            rss = [statistics.median(run["rss"][k] for run in runs) for k in range(len(runs[0]["rss"]))]
            summary[m] = (statistics.median(tps), min(tps), max(tps), rss)
    lines = [f"full fine-tuning fp32, seq-len {a.seq_len}, global batch {a.batch_size} packed rows, {a.threads} "
             f"thread(s) per process, {a.steps} timed steps x {a.rounds} round(s) per mode", "",
             "| mode | processes | tokens/s (median) | min-max | vs single | peak RSS per rank MB (median) | "
             "tokens/s vs accelerate+Trainer | peak RSS vs accelerate+Trainer |",
             "|---|---:|---:|---:|---:|---|---:|---:|"]
    peers = {m: next((p for p in ACC_PEER[m] if p in summary), None) for m in summary if m in ACC_PEER}
    for m, (med, lo, hi, rss) in summary.items():
        base = summary.get("hf-accel-1" if m in ACC_MODES else "single")
        peer = summary.get(peers.get(m) or "")
        procs = ACC_MODES[m][0] if m in ACC_MODES else DIST_MODES[m][0]
        lines.append(f"| {m} | {procs} | {med:.0f} | {lo:.0f}-{hi:.0f} | {f'{med / base[0]:.2f}x' if base else ''} | "
                     f"{', '.join(f'{x:.0f}' for x in rss)} | {f'{med / peer[0]:.2f}x' if peer else ''} | "
                     f"{f'{max(rss) / max(peer[3]):.2f}x' if peer else ''} |")
    lines += ["", "hf-accel-*: transformers' Trainer under `accelerate launch` (same model directory, packed rows, "
              "per-process batch, lr, AdamW, steps and threads). Peak RSS: each rank's VmHWM over the whole process "
              "(load, data, steps, final save). vs single: against the same library's 1-process mode (`single`, "
              "`hf-accel-1`). The last two columns: leanformers / accelerate+Trainer ("
              + (", ".join(f"{m} against {p}" for m, p in peers.items() if p) or "none measured")
              + "), peak RSS as the maximum over ranks."]
    runs0 = {m: runs[0]["tokens"] for m, runs in results.items() if runs}
    if len(set(map(tuple, runs0.values()))) > 1:
        lines.append(f"Tokens per timed step differ between modes: {runs0}")
    elif runs0:
        lines.append(f"Every mode trained on the same tokens per timed step: {next(iter(runs0.values()))}.")
    diffs = {m: max(abs(x - y) for x, y in zip(results[m][0]["loss"], results[p][0]["loss"]))
             for m, p in peers.items() if p}
    if diffs:  # the same data, model and hyperparameters give the same training losses (to float noise)
        lines.append("Per-step training losses against accelerate+Trainer, largest difference: "
                     + ", ".join(f"{m} {d:.1e}" for m, d in diffs.items()) + ".")
    lines += [f"{m}: not measured: {err}" for m, err in errors.items() if not results.get(m)]
    return "\n".join(lines) + "\n"


def run_worker(a: argparse.Namespace) -> None:
    import torch

    torch.set_num_threads(a.threads)
    model_dir, gguf, rows_file = Path(a.model_dir), Path(a.gguf), Path(a.rows)
    rows = json.loads(rows_file.read_text())
    if a.worker in HF_MODES:
        res = worker_hf(a.worker, model_dir, rows, a)
    else:
        res = worker_lf(a.worker, model_dir, gguf, rows, a)
    res["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print("RESULT " + json.dumps(res), flush=True)


# ------------------------------------------------------------------------------------------ driver
def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--modes", default=",".join(DEFAULT_MODES))
    p.add_argument("--steps", type=int, default=3, help="timed steps per process")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--rounds", type=int, default=1, help="processes per mode (interleaved)")
    p.add_argument("--threads", type=int, default=2, help="torch threads per process (default 2)")
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--grad-checkpointing", action="store_true", help="leanformers modes only")
    p.add_argument("--work", type=Path, default=Path(os.environ.get("TMPDIR", "/tmp")) / "lf-bench-finetune")
    p.add_argument("--out", type=Path, default=None, help="also write the markdown table here")
    p.add_argument("--alternate", action="store_true",
                   help="instead: LoRA bf16 forward+backward of both libraries alternating in one process")
    p.add_argument("--distributed", action="store_true",
                   help="instead: leanformers on 1 and 2 processes, DDP and FSDP (torchrun), and transformers' "
                        "Trainer under `accelerate launch`; --modes from " + ",".join([*DIST_MODES, *ACC_MODES]))
    p.add_argument("--dist-worker", default=None, help=argparse.SUPPRESS)
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    p.add_argument("--model-dir", default=None, help=argparse.SUPPRESS)
    p.add_argument("--gguf", default=None, help=argparse.SUPPRESS)
    p.add_argument("--rows", default=None, help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.worker:
        return run_worker(a)
    if a.dist_worker:
        return dist_worker(a)
    a.work.mkdir(parents=True, exist_ok=True)
    if a.distributed:
        model_dir, _, _ = prepare(a.work, a.seq_len, 8)
        text = run_distributed(a, model_dir)
        print(text)
        if a.out:
            a.out.write_text(text)
        return
    modes = [m for m in a.modes.split(",") if m]
    bad = [m for m in modes if m not in HF_MODES and m not in LF_MODES]
    if bad:
        p.error(f"unknown modes {bad}; known: {sorted({**HF_MODES, **LF_MODES})}")
    model_dir, gguf, rows = prepare(a.work, a.seq_len, 4 * a.batch_size * (a.warmup + a.steps) + 64)
    if a.alternate:
        text = alternate(a, model_dir)
        print(text)
        if a.out:
            a.out.write_text(text)
        return
    results: dict[str, list[dict]] = {m: [] for m in modes}
    env = dict(os.environ, PYTHONPATH=str(ROOT / "src"), TOKENIZERS_PARALLELISM="false",
               OMP_NUM_THREADS=str(a.threads))
    t_start = time.time()
    for r in range(a.rounds):
        for m in modes:
            cmd = [sys.executable, __file__, "--worker", m, "--model-dir", str(model_dir), "--gguf", str(gguf),
                   "--rows", str(rows), "--steps", str(a.steps), "--warmup", str(a.warmup), "--threads",
                   str(a.threads), "--seq-len", str(a.seq_len), "--batch-size", str(a.batch_size), "--work", str(a.work)]
            if a.grad_checkpointing:
                cmd.append("--grad-checkpointing")
            t0 = time.time()
            proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
            line = next((x for x in proc.stdout.splitlines() if x.startswith("RESULT ")), None)
            if proc.returncode or line is None:
                print(f"{m}: failed\n{proc.stderr[-3000:]}", file=sys.stderr)
                continue
            res = json.loads(line[7:])
            results[m].append(res)
            tps = [t / s for t, s in zip(res["tokens"], res["step_s"])]
            print(f"round {r + 1} {m:22s} {statistics.median(tps):8.0f} tok/s  peak RSS {res['peak_rss_mb']:6.0f} MB "
                  f"({time.time() - t0:.0f} s)", file=sys.stderr, flush=True)
    table = render(results, a, time.time() - t_start)
    print(table)
    if a.out:
        a.out.write_text(table)


def render(results: dict[str, list[dict]], a: argparse.Namespace, wall: float) -> str:
    summary = {}
    for m, runs in results.items():
        if not runs:
            continue
        tps = [t / s for r in runs for t, s in zip(r["tokens"], r["step_s"])]
        rss = [r["peak_rss_mb"] for r in runs]
        summary[m] = (statistics.median(tps), min(tps), max(tps), statistics.median(rss))
    lines = [f"seq-len {a.seq_len}, batch {a.batch_size}, {a.threads} threads, {a.steps} timed steps x {a.rounds} "
             f"round(s) per mode, total {wall / 60:.1f} min",
             "", "| mode | tokens/s (median) | min-max | peak RSS MB | vs transformers tokens/s | vs transformers RSS |",
             "|---|---:|---:|---:|---:|---:|"]
    for m, (med, lo, hi, rss) in summary.items():
        peer = summary.get(PEER.get(m, ""))
        ratio = f"{med / peer[0]:.2f}x" if peer else ""
        rratio = f"{rss / peer[3]:.2f}x" if peer else ""
        lines.append(f"| {m} | {med:.0f} | {lo:.0f}-{hi:.0f} | {rss:.0f} | {ratio} | {rratio} |")
    for q in ("lf-qlora-int4", "lf-qlora-int4-ckpt"):
        if q in summary and "lf-lora-bf16" in summary:
            lines.append(f"\n{q} peak RSS / lf-lora-bf16 peak RSS: {summary[q][3] / summary['lf-lora-bf16'][3]:.2f}x")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
