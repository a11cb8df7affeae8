"""Fine-tuning speed and memory: leanformers vs transformers' Trainer (+ peft), side by side in one run.

    python bench/bench_finetune.py                       # every mode, ~15 minutes on 2 cores
    python bench/bench_finetune.py --modes lf-lora-bf16,hf-lora-bf16 --steps 3

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
        from leanformers.perplexity import perplexity_text

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
def worker_hf(mode: str, model_dir: Path, rows: list[list[int]], a: argparse.Namespace) -> dict:
    import torch
    from torch.utils.data import SequentialSampler
    from transformers import AutoModelForCausalLM, Trainer, TrainerCallback, TrainingArguments

    method, prec = HF_MODES[mode]
    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32)
    if method == "lora":
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(model, LoraConfig(r=R, lora_alpha=ALPHA, target_modules="all-linear", lora_dropout=0.0,
                                                 task_type="CAUSAL_LM"))
    n_steps = a.warmup + a.steps
    data = [{"input_ids": r} for r in rows[: n_steps * a.batch_size]]
    tokens = [sum(len(r["input_ids"]) for r in data[i * a.batch_size : (i + 1) * a.batch_size]) for i in range(n_steps)]

    def collate(batch):
        T = max(len(r["input_ids"]) for r in batch)
        ids = torch.zeros((len(batch), T), dtype=torch.long)
        labels = torch.full((len(batch), T), -100)
        mask = torch.zeros((len(batch), T), dtype=torch.long)
        for b, r in enumerate(batch):
            n = len(r["input_ids"])
            ids[b, :n] = labels[b, :n] = torch.tensor(r["input_ids"])
            mask[b, :n] = 1
        return {"input_ids": ids, "labels": labels, "attention_mask": mask}

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
        output_dir=str(a.work / f"hf-out-{mode}"), per_device_train_batch_size=a.batch_size, max_steps=n_steps,
        learning_rate=LR, lr_scheduler_type="constant", weight_decay=0.0, max_grad_norm=1.0, bf16=prec == "bf16",
        use_cpu=True, logging_steps=1, report_to=[], save_strategy="no", dataloader_num_workers=0,
        disable_tqdm=True, remove_unused_columns=False, optim="adamw_torch_fused", seed=0)
    InOrder(model=model, args=targs, train_dataset=data, data_collator=collate, callbacks=[Clock()]).train()
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
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    p.add_argument("--model-dir", default=None, help=argparse.SUPPRESS)
    p.add_argument("--gguf", default=None, help=argparse.SUPPRESS)
    p.add_argument("--rows", default=None, help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.worker:
        return run_worker(a)
    a.work.mkdir(parents=True, exist_ok=True)
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
