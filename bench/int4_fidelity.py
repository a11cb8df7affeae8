"""How close leanformers' int4 model stays to the float32 one on a GGUF file, with and without mapping the
file's Q4_0/Q4_1/Q4_K blocks exactly onto the int4 kernels (instead of dequantizing and requantizing them).

    python bench/int4_fidelity.py -m gemma3-270m --positions 512

Over the first `--positions` tokens of the bundled perplexity text: top-1 agreement of int4 with float32,
mean KL(float32 || int4) per position, and both perplexities. Prints a markdown table.
"""

from __future__ import annotations

import argparse
import sys
from importlib.resources import files
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "src"))

import leanformers  # noqa: E402
import leanformers.quantize as Q  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("-m", "--model", default="gemma3-270m")
    ap.add_argument("--positions", type=int, default=512)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    text = (files("leanformers") / "data" / "perplexity.txt").read_text()
    ref = leanformers.load(args.model, progress=False)
    ids = torch.tensor([ref.tokenizer.encode(text)[: args.positions + 1]])
    n = ids.shape[1] - 1
    with torch.inference_mode():
        base = ref.model(ids[:, :n]).float()
    del ref
    target = ids[0, 1:]
    rows = [("float32", 1.0, 0.0, F.cross_entropy(base[0], target).exp().item())]
    for exact in (False, True):
        real = Q._exact_q4
        if not exact:
            Q._exact_q4 = lambda t: False  # every weight dequantized, then requantized
        try:
            lm = leanformers.load(args.model, quantize="int4", progress=False)
        finally:
            Q._exact_q4 = real
        with torch.inference_mode():
            logits = lm.model(ids[:, :n]).float()
        top1 = (logits.argmax(-1) == base.argmax(-1)).float().mean().item()
        kl = F.kl_div(logits.log_softmax(-1), base.log_softmax(-1), log_target=True,
                      reduction="none").sum(-1).mean().item()
        label = "int4, Q4 blocks exact" if exact else "int4, all requantized"
        rows.append((label, top1, kl, F.cross_entropy(logits[0], target).exp().item()))
        del lm
    print(f"{args.model}: {n} positions of the bundled perplexity text; torch {torch.__version__}\n")
    print("| model | top-1 agreement with float32 | mean KL(float32 ‖ model) | perplexity |")
    print("|---|---:|---:|---:|")
    for label, top1, kl, ppl in rows:
        print(f"| {label} | {top1:.4f} | {kl:.4f} | {ppl:.3f} |")


if __name__ == "__main__":
    main()
