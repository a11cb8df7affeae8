"""GPU check for leanformers: CPU-vs-CUDA parity (eager and compiled), a ~1B decode benchmark, the training loop.

Needs: torch with CUDA (>= 2.5; tested with 2.11/2.13) and Triton (ships with CUDA torch wheels),
numpy. No download: every model here is a random-weight ModelConfig built in memory. Run from the repo
root (it puts src/ on sys.path), normally through bench/gpu_check.sh:

    python bench/gpu_check.py                      # on a CUDA machine, < 5 minutes
    python bench/gpu_check.py --device cpu --tiny  # its CPU-side logic (the test suite runs this)

(a) parity, on a tiny random model: logits and greedy tokens of CPU fp32 eager (the reference) vs
    DEVICE fp32 eager and compiled (must match token for token) and DEVICE bf16 eager and compiled
    (logits close, greedy agreement reported).
(b) decode speed, batch 1, of a random ~1B Llama (hidden 2048, 16 layers, 32 heads, 8 kv heads,
    intermediate 8192, vocab 32000; --tiny: a small one): eager vs compiled bf16, plus int8/int4 when
    leanformers.quantize is present and works on the device.
(c) fine-tuning loop (leanformers.train): full fine-tuning steps of a tiny random model in fp32,
    bf16-mixed, fp16-mixed (GradScaler) and bf16-true, losses against CPU fp32 (--skip-train to skip).
(d) when more than one GPU is visible (or --dist N): the same run under torchrun on 2 processes with DDP
    and with FSDP2 (NCCL; gloo with --device cpu), losses against one CPU fp32 process with the whole batch.

Prints Markdown tables; writes gpu_check.json to --out or $OUT (when set). Exit status 1 when a parity
check fails.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "src"))

try:
    import torch
except ImportError:  # pragma: no cover - the machine lacks torch
    sys.exit("gpu_check: torch is not installed (pip install torch>=2.5 with CUDA)")

from leanformers.config import ModelConfig  # noqa: E402
from leanformers.compile import compile_decode  # noqa: E402
from leanformers.generation.decode import DecodeStep, generate_tokens  # noqa: E402
from leanformers.generation.sampling import Sampler, SamplingParams  # noqa: E402
from leanformers.models.llama import LlamaForCausalLM  # noqa: E402

TINY = dict(vocab_size=512, hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=1024, rope_theta=10000.0, tie_word_embeddings=False)
ONE_B = dict(vocab_size=32000, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
             num_key_value_heads=8, max_position_embeddings=4096, rope_theta=500000.0, tie_word_embeddings=False)
SMALL = dict(vocab_size=2048, hidden_size=256, intermediate_size=512, num_hidden_layers=4, num_attention_heads=8,
             num_key_value_heads=2, max_position_embeddings=1024, rope_theta=10000.0, tie_word_embeddings=False)


def random_model(cfg: dict, *, seed: int, device: str, dtype: torch.dtype) -> LlamaForCausalLM:
    """Random weights scaled so activations stay O(1) and logits are peaked (no near-ties)."""
    config = ModelConfig(**cfg)
    with torch.device("meta"):
        model = LlamaForCausalLM(config)
    model.to_empty(device=device)
    g = torch.Generator(device=device).manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(1.0 + 0.1 * torch.randn(p.shape, generator=g, device=device))
            elif name.endswith("bias"):
                p.copy_(0.02 * torch.randn(p.shape, generator=g, device=device))
            elif "embed_tokens" in name:
                p.copy_(torch.randn(p.shape, generator=g, device=device))
            else:
                scale = (4.0 if name.startswith("lm_head") else 1.0) / p.shape[-1] ** 0.5
                p.copy_(scale * torch.randn(p.shape, generator=g, device=device))
    from leanformers.models.ops import rope_inv_freq

    model = model.to(dtype).eval()
    model.inv_freq = rope_inv_freq(config.head_dim, config.rope_theta, config.rope_scaling).to(device)  # float32
    model.requires_grad_(False)
    return model


def greedy(model, prompt: list[int], n: int, *, step=None):
    """Greedy tokens of `prompt` through `step` (default: the eager step); a compiled step must run compiled."""
    step = step or DecodeStep(model)
    before = dict(getattr(step, "calls", {}))
    steps = generate_tokens(step, [prompt], max_new_tokens=n, sampler=Sampler(SamplingParams()))
    tokens = [s.tokens[0] for s in steps]
    if hasattr(step, "calls") and step.calls["eager"] != before.get("eager", 0):
        raise RuntimeError(f"the compiled step fell back to eager: {step.eager or step.failure}")
    return tokens


def full_logits(model, ids: list[int]) -> torch.Tensor:
    device = model.device
    with torch.inference_mode():
        return model(torch.tensor([ids], device=device))[0].float().cpu()


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


# ------------------------------------------------------------------------------------------- (a) parity
def parity(device: str, mode: str | None, n_tokens: int) -> tuple[list[dict], bool]:
    rows: list[dict] = []
    ok = True
    g = torch.Generator().manual_seed(1)
    prompt = torch.randint(3, TINY["vocab_size"], (24,), generator=g).tolist()
    ref_model = random_model(TINY, seed=0, device="cpu", dtype=torch.float32)
    ref_logits = full_logits(ref_model, prompt)
    ref_tokens = greedy(ref_model, prompt, n_tokens)
    scale = ref_logits.abs().max().item()

    for dtype in (torch.float32, torch.bfloat16):
        for compiled in (False, True):
            name = f"{device} {str(dtype).removeprefix('torch.')} {'compiled' if compiled else 'eager'}"
            row: dict = {"check": name}
            try:
                model = random_model(TINY, seed=0, device="cpu", dtype=torch.float32).to(device=device, dtype=dtype)
                fn = None
                if compiled:
                    t0 = time.perf_counter()
                    fn = compile_decode(model, mode=mode, cache_bucket=256, cache_dir=os.environ.get("GPU_CHECK_CACHE"))
                    row["compile_s"] = round(time.perf_counter() - t0, 1)
                    if fn.failure:
                        raise RuntimeError(f"compile fell back to eager: {fn.failure}")
                logits = full_logits(model, prompt)
                tokens = greedy(model, prompt, n_tokens, step=fn)
                if fn is not None:
                    row["compiled_steps"] = fn.calls["compiled"]
                diff = (logits - ref_logits).abs().max().item() / scale
                same = sum(a == b for a, b in zip(tokens, ref_tokens))
                first_diff = next((i for i, (a, b) in enumerate(zip(tokens, ref_tokens)) if a != b), None)
                teacher_top1 = (logits.argmax(-1) == ref_logits.argmax(-1)).float().mean().item()
                row.update(max_rel_logit_diff=f"{diff:.2e}", greedy_match=f"{same}/{n_tokens}",
                           first_divergence=first_diff, prefill_top1_agree=f"{teacher_top1:.3f}")
                if dtype == torch.float32:
                    passed = diff < 1e-3 and tokens == ref_tokens
                else:  # bf16: close, not identical
                    passed = diff < 0.08 and teacher_top1 >= 0.85
                row["ok"] = passed
                ok &= passed
            except Exception as exc:  # report, keep going
                row.update(ok=False, error=f"{type(exc).__name__}: {exc}"[:300])
                traceback.print_exc()
                ok = False
            rows.append(row)
            print(f"  {row}", flush=True)
    return rows, ok


# ------------------------------------------------------------------------------------------- (b) speed
def decode_speed(model, device: str, *, prompt_len: int, new_tokens: int, step=None) -> float:
    """Decode tok/s of one greedy request (prefill excluded), EOS ignored."""
    g = torch.Generator().manual_seed(2)
    prompt = torch.randint(3, model.config.vocab_size, (prompt_len,), generator=g).tolist()
    steps = generate_tokens(step or DecodeStep(model), [prompt], max_new_tokens=new_tokens,
                            sampler=Sampler(SamplingParams()))
    next(steps)  # prefill + first token
    sync(device)
    t0 = time.perf_counter()
    n = 0
    for _ in steps:
        n += 1
    sync(device)
    return n / (time.perf_counter() - t0)


def speed(device: str, cfg: dict, mode: str | None, new_tokens: int, runs: int, quant: bool,
          deadline: float = float("inf")) -> list[dict]:
    rows: list[dict] = []
    dtype = torch.bfloat16 if device.startswith("cuda") else torch.float32
    prompt_len = 32
    cache_len = -(-(prompt_len + new_tokens) // 256) * 256
    n_params = None
    variants: list[tuple[str, str | None]] = [("eager", None), ("compiled", None)]
    if quant:
        variants += [("compiled", "int4"), ("compiled", "int8")]
    for kind, q in variants:
        name = f"{kind} {str(dtype).removeprefix('torch.')}" + (f" {q}" if q else "")
        row: dict = {"mode": name}
        model = None
        if time.perf_counter() > deadline:
            row["error"] = "skipped: time budget (--budget) used up"
            rows.append(row)
            print(f"  {row}", flush=True)
            continue
        try:
            t0 = time.perf_counter()
            model = random_model(cfg, seed=0, device=device, dtype=dtype)
            n_params = n_params or sum(p.numel() for p in model.parameters())
            if q:
                from leanformers.quantize import quantize_model

                model.fuse_projections()
                quantize_model(model, q)
                row["mode"] = f"{kind} {q} (activations {str(model.dtype).removeprefix('torch.')})"
            fn = None
            if kind == "compiled":
                fn = compile_decode(model, mode=mode, cache_bucket=cache_len, cache_dir=os.environ.get("GPU_CHECK_CACHE"))
                if fn.failure:
                    raise RuntimeError(f"compile fell back to eager: {fn.failure}")
            row["setup_s"] = round(time.perf_counter() - t0, 1)
            decode_speed(model, device, prompt_len=prompt_len, new_tokens=8, step=fn)
            speeds = sorted(decode_speed(model, device, prompt_len=prompt_len, new_tokens=new_tokens, step=fn)
                            for _ in range(runs))
            row["decode_tok_s"] = round(speeds[len(speeds) // 2], 1)
            if fn is not None:  # every timed step ran compiled (a fallback would time eager decoding)
                row["eager_steps"] = fn.calls["eager"]
                if fn.calls["eager"] or fn.failure:
                    raise RuntimeError(f"the compiled step fell back to eager: {fn.eager or fn.failure}")
            if device.startswith("cuda"):
                row["peak_gpu_mem_gb"] = round(torch.cuda.max_memory_allocated() / 1e9, 2)
        except Exception as exc:
            row["error"] = f"{type(exc).__name__}: {exc}"[:300]
            if not isinstance(exc, ImportError):
                traceback.print_exc()
        rows.append(row)
        print(f"  {row}", flush=True)
        del model
        if device.startswith("cuda"):
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
    base = next((r.get("decode_tok_s") for r in rows if r["mode"].startswith("eager")), None)
    for r in rows:
        if base and r.get("decode_tok_s"):
            r["vs_eager"] = f"{r['decode_tok_s'] / base:.2f}x"
    if n_params:
        for r in rows:
            r["params_m"] = round(n_params / 1e6)
    return rows


def training_rows(steps: int) -> list:
    """4 rows per step of random token ids, 16-127 tokens each (the same for every check and process)."""
    from leanformers.train.data import Row

    g = torch.Generator().manual_seed(0)
    rows = []
    for _ in range(steps * 4):
        n = int(torch.randint(16, 128, (1,), generator=g))
        ids = torch.randint(0, TINY["vocab_size"], (n,), generator=g).tolist()
        rows.append(Row(ids, ids, [1] * n, list(range(n))))
    return rows


def training_check(device: str, steps: int = 6) -> tuple[list[dict], bool]:
    """(c) The fine-tuning loop (leanformers.train) on DEVICE: a few full fine-tuning steps of a tiny random
    model per precision, losses against CPU fp32 (the same initial weights and batches)."""
    from leanformers.train.args import FinetuneArgs
    from leanformers.train.data import Dataset
    from leanformers.train.loop import TrainLoop
    from leanformers.train.loss import causal_lm_loss
    from leanformers.train.optim import Precision

    rows = training_rows(steps)

    def run(dev: str, precision: str) -> tuple[list[float], float]:
        model = random_model(TINY, seed=3, device=dev, dtype=torch.float32)
        model.requires_grad_(True)
        losses: list[float] = []
        with tempfile.TemporaryDirectory() as out:
            args = FinetuneArgs(model="random", data="-", output_dir=out, method="full", max_steps=steps,
                                batch_size=4, lr=1e-3, lr_schedule="constant", precision=precision, save_every=None,
                                device=dev, progress=False, callback=lambda r: losses.append(r["loss"])).check()
            loop = TrainLoop(model, causal_lm_loss, Dataset(rows, 4, 1, 0, 0), args,
                             Precision(precision, torch.device(dev)), Path(out))
            t0 = time.perf_counter()
            res = loop.run()
            sync(dev)
            return losses, res.tokens / (time.perf_counter() - t0)

    ref, _ = run("cpu", "fp32")
    modes = ["fp32"] + (["bf16-mixed", "fp16-mixed", "bf16-true"] if device.startswith("cuda") else [])
    out_rows, ok = [], True
    for precision in modes:
        try:
            losses, tps = run(device, precision)
        except Exception as exc:  # report and go on
            out_rows.append({"precision": precision, "error": f"{type(exc).__name__}: {str(exc)[:120]}"})
            ok = False
            continue
        rel = max(abs(a - b) / abs(b) for a, b in zip(losses, ref))
        tol = 1e-3 if precision == "fp32" else 5e-2
        passed = rel <= tol and losses[-1] < losses[0]
        ok &= passed
        out_rows.append({"precision": precision, "first_loss": round(losses[0], 4), "last_loss": round(losses[-1], 4),
                         "max_rel_vs_cpu_fp32": f"{rel:.1e}", "tokens_per_s": round(tps), "pass": passed})
    return out_rows, ok


def dist_worker(strategy: str, device: str, steps: int) -> None:
    """One rank of distributed_check (under torchrun): training_check's model and rows, full fp32 fine-tuning
    with DDP or FSDP2, global batch 4 split over the ranks; rank 0 prints the per-step losses."""
    from leanformers.train.args import FinetuneArgs
    from leanformers.train.data import Dataset
    from leanformers.train.distributed.data import RankShard
    from leanformers.train.distributed.env import Group
    from leanformers.train.distributed.loop import DistributedTrainLoop
    from leanformers.train.distributed.strategy import check_strategy, inner_model, wrap
    from leanformers.train.loss import causal_lm_loss
    from leanformers.train.optim import Precision

    world = int(os.environ["WORLD_SIZE"])
    losses: list[float] = []
    with tempfile.TemporaryDirectory() as out:  # each rank its own; no checkpoints
        args = FinetuneArgs(model="random", data="-", output_dir=out, method="full", max_steps=steps,
                            batch_size=4 // world, lr=1e-3, lr_schedule="constant", precision="fp32", save_every=None,
                            device=device, progress=False, strategy=strategy, dist_timeout=120.0,
                            callback=lambda r: losses.append(r["loss"])).check()
        group = Group.start(args)
        try:
            check_strategy(args, group)
            model = random_model(TINY, seed=3, device="cpu", dtype=torch.float32)  # moved by the wrapper
            model.requires_grad_(True)
            precision = Precision("fp32", group.device)
            wrapped, sync = wrap(strategy, model, causal_lm_loss, group, precision, args)
            shard = RankShard(Dataset(training_rows(steps), 4 // world, 1, 0, 0), group.rank, group.world_size)
            DistributedTrainLoop(wrapped, inner_model(wrapped), shard, args, precision, Path(out), group=group,
                                 strategy=strategy, sync=sync).run()
        finally:
            group.close()
    if group.rank == 0:
        print("DIST_LOSSES " + json.dumps(losses), flush=True)


def distributed_check(device: str, procs: int = 2, steps: int = 6) -> tuple[list[dict], bool]:
    """(d) DDP and FSDP2 on `procs` processes (torchrun; NCCL on GPUs, gloo on CPU): the per-step losses of
    training_check's run against one CPU fp32 process with the whole batch."""
    from leanformers.train.args import FinetuneArgs
    from leanformers.train.data import Dataset
    from leanformers.train.loop import TrainLoop
    from leanformers.train.loss import causal_lm_loss
    from leanformers.train.optim import Precision

    ref: list[float] = []
    model = random_model(TINY, seed=3, device="cpu", dtype=torch.float32)
    model.requires_grad_(True)
    with tempfile.TemporaryDirectory() as out:
        args = FinetuneArgs(model="random", data="-", output_dir=out, method="full", max_steps=steps, batch_size=4,
                            lr=1e-3, lr_schedule="constant", precision="fp32", save_every=None, device="cpu",
                            progress=False, callback=lambda r: ref.append(r["loss"])).check()
        TrainLoop(model, causal_lm_loss, Dataset(training_rows(steps), 4, 1, 0, 0), args,
                  Precision("fp32", torch.device("cpu")), Path(out)).run()
    rows, ok = [], True
    env = dict(os.environ, PYTHONPATH=str(ROOT / "src") + os.pathsep + os.environ.get("PYTHONPATH", ""),
               OMP_NUM_THREADS="1")
    for strategy in ("ddp", "fsdp"):
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(procs),
               str(Path(__file__).resolve()), "--dist-worker", strategy, "--device", device, "--dist-steps", str(steps)]
        t0 = time.perf_counter()
        try:
            p = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240)
            found = [json.loads(x.split("DIST_LOSSES ", 1)[1]) for x in p.stdout.splitlines() if "DIST_LOSSES " in x]
            if p.returncode or not found:
                raise RuntimeError(f"exit {p.returncode}: {(p.stderr.strip().splitlines() or ['?'])[-1][:160]}")
        except Exception as exc:  # report and go on
            rows.append({"strategy": strategy, "processes": procs, "error": f"{type(exc).__name__}: {str(exc)[:200]}"})
            ok = False
            continue
        losses = found[0]
        rel = max(abs(a - b) / abs(b) for a, b in zip(losses, ref))
        passed = len(losses) == len(ref) and rel <= 1e-3
        ok &= passed
        rows.append({"strategy": strategy, "processes": procs, "first_loss": round(losses[0], 4),
                     "last_loss": round(losses[-1], 4), "max_rel_vs_1_cpu_process": f"{rel:.1e}",
                     "seconds": round(time.perf_counter() - t0, 1), "pass": passed})
    return rows, ok


def table(rows: list[dict]) -> str:
    cols: list[str] = []
    for r in rows:
        cols += [k for k in r if k not in cols]
    lines = ["| " + " | ".join(cols) + " |", "|" + "|".join("---" for _ in cols) + "|"]
    for r in rows:
        lines.append("| " + " | ".join("" if r.get(c) is None else str(r.get(c)) for c in cols) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda", help="cuda (default) or cpu")
    p.add_argument("--tiny", action="store_true", help="small benchmark model and few tokens (CPU-side test)")
    p.add_argument("--mode", default=None, help="torch.compile mode (default: reduce-overhead on CUDA)")
    p.add_argument("--new-tokens", type=int, default=None, help="decode tokens per run (default 256; --tiny 16)")
    p.add_argument("--runs", type=int, default=None, help="timed runs per mode, median reported (default 3; --tiny 1)")
    p.add_argument("--no-quant", action="store_true", help="skip the int8/int4 rows")
    p.add_argument("--skip-speed", action="store_true", help="parity only")
    p.add_argument("--skip-train", action="store_true", help="skip the fine-tuning loop check")
    p.add_argument("--budget", type=float, default=240.0,
                   help="seconds after which remaining speed rows are skipped (default 240: ends within 5 minutes)")
    p.add_argument("--out", default=os.environ.get("OUT"), help="directory for gpu_check.json (default: $OUT)")
    p.add_argument("--dist", type=int, default=None,
                   help="processes for the DDP/FSDP check (default: 2 when more than one GPU is visible, else none; "
                        "with --device cpu it runs on gloo)")
    p.add_argument("--dist-worker", default=None, help=argparse.SUPPRESS)  # one rank of the check (torchrun)
    p.add_argument("--dist-steps", type=int, default=6, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.dist_worker:
        dist_worker(args.dist_worker, args.device, args.dist_steps)
        return 0

    if args.device.startswith("cuda") and not torch.cuda.is_available():
        print(f"gpu_check: CUDA is not available (torch {torch.__version__}, built for CUDA {torch.version.cuda})")
        return 2
    os.environ.setdefault("GPU_CHECK_CACHE", tempfile.mkdtemp(prefix="lf-gpu-check-"))
    new_tokens = args.new_tokens or (16 if args.tiny else 256)
    runs = args.runs or (1 if args.tiny else 3)
    info = {"torch": torch.__version__, "device": args.device,
            "name": torch.cuda.get_device_name() if args.device.startswith("cuda") else "cpu",
            "mode": args.mode or ("reduce-overhead" if args.device.startswith("cuda") else "max-autotune-no-cudagraphs")}
    print(f"# gpu_check: {info}", flush=True)
    t0 = time.perf_counter()
    torch.backends.cuda.matmul.allow_tf32 = False  # fp32 parity means real fp32
    print("## (a) parity vs CPU fp32 eager", flush=True)
    parity_rows, ok = parity(args.device, args.mode, n_tokens=16 if args.tiny else 32)
    speed_rows: list[dict] = []
    if not args.skip_speed:
        print("## (b) decode speed, batch 1", flush=True)
        speed_rows = speed(args.device, SMALL if args.tiny else ONE_B, args.mode, new_tokens, runs,
                           quant=not args.no_quant, deadline=t0 + args.budget)
    train_rows: list[dict] = []
    if not args.skip_train:
        print("## (c) fine-tuning loop", flush=True)
        train_rows, train_ok = training_check(args.device)
        ok = ok and train_ok
    dist_rows: list[dict] = []
    procs = args.dist if args.dist is not None else (
        2 if args.device.startswith("cuda") and torch.cuda.device_count() > 1 else 0)
    if procs > 1 and not args.skip_train:
        print(f"## (d) DDP and FSDP on {procs} processes", flush=True)
        dist_rows, dist_ok = distributed_check("cuda" if args.device.startswith("cuda") else "cpu", procs)
        ok = ok and dist_ok
    elapsed = time.perf_counter() - t0
    print("\n### Parity (reference: CPU float32 eager)\n")
    print(table(parity_rows))
    if speed_rows:
        print(f"\n### Decode speed ({'small' if args.tiny else '~1B'} random Llama, batch 1, {new_tokens} new tokens, "
              f"median of {runs})\n")
        print(table(speed_rows))
    if train_rows:
        print("\n### Fine-tuning loop (tiny random model, full, 6 steps; reference: CPU fp32 losses)\n")
        print(table(train_rows))
    if dist_rows:
        print(f"\n### DDP and FSDP2 on {procs} processes (tiny random model, full fp32, 6 steps, global batch 4; "
              "reference: 1 CPU process)\n")
        print(table(dist_rows))
    print(f"\nparity: {'PASS' if ok else 'FAIL'}; total {elapsed:.0f}s")
    result = {"info": info, "parity": parity_rows, "parity_ok": ok, "speed": speed_rows, "train": train_rows,
              "distributed": dist_rows,
              "seconds": round(elapsed, 1)}
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "gpu_check.json").write_text(json.dumps(result, indent=2, default=str))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
