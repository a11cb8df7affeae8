"""Time of a compiled speculative verification forward over T tokens, in compiled one-token steps.

    python bench/verify_costs.py --threads 2 --modes fp32,bf16,int8,int4 --rows 2,4,6,8

For each mode and T: SmolLM2-135M (bundled GGUF) compiled with `verify_rows=T`; then, at cache
position ~300 of a 1024-slot cache, the median of 40 calls of the compiled one-token step and of the
compiled verification (T tokens), calls interleaved. Prints a Markdown table; the compiled_verify /
compiled_verify_rows entries of src/leanformers/speculative/costs.json come from it. Compiles each T once
(cached on disk afterwards).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent
sys.path.insert(0, str(ROOT.parent / "src"))
sys.path.insert(0, str(ROOT))

import leanformers  # noqa: E402
from bench_speculative import gguf_path  # noqa: E402

MODES = {"fp32": dict(dtype="float32"), "bf16": dict(dtype="bfloat16"),
         "int8": dict(quantize="int8"), "int4": dict(quantize="int4")}


def median_ms(fs, n: int = 40) -> list[float]:
    """Median time of each function, calls interleaved (a shared machine's load changes hit all alike)."""
    for f in fs:
        for _ in range(3):
            f()
    ts: list[list[float]] = [[] for _ in fs]
    for _ in range(n):
        for f, t_ in zip(fs, ts):
            t = time.perf_counter()
            f()
            t_.append(time.perf_counter() - t)
    return [statistics.median(t_) * 1e3 for t_ in ts]


def measure(mode: str, rows: list[int]) -> list[tuple[int, float, float]]:
    out = []
    for T in rows:
        lm = leanformers.load(str(gguf_path()), progress=False, **MODES[mode])
        lm.compile(cache_bucket=1024, verify_rows=T)
        fn, model = lm.step, lm.model
        with torch.inference_mode(False):
            cache = fn.make_cache(1, 1024)
        pos = 300
        with torch.inference_mode():
            model(torch.randint(0, 1000, (1, pos)), cache=cache, positions=torch.arange(pos))
            tok, tok_pos = torch.tensor([[42]]), torch.tensor([[pos]])
            toks, toks_pos = torch.randint(0, 1000, (1, T)), torch.arange(pos, pos + T).unsqueeze(0)
            assert fn.can_verify(T, 1024, pos)
            step, verify = median_ms([lambda: fn(tok, tok_pos, cache), lambda: fn.verify(toks, toks_pos, cache)])
        assert not fn.eager, fn.eager
        out.append((T, step, verify))
        print(f"| {mode} | {T} | {step:.2f} | {verify:.2f} | {verify / step:.2f} |", flush=True)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--modes", default="fp32,bf16,int8,int4")
    ap.add_argument("--rows", default="2,4,6,8")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    print(f"threads {args.threads}, torch {torch.__version__}")
    print("| mode | T (tokens) | step ms | verify ms | verify / step |\n|---|---:|---:|---:|---:|", flush=True)
    for mode in args.modes.split(","):
        measure(mode, [int(r) for r in args.rows.split(",")])


if __name__ == "__main__":
    main()
