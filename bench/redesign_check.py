"""Did the architecture redesign (issue 11) slow anything down? Old and new code side by side, in one run.

    git worktree add --detach /tmp/lf-old 5995172      # the last commit before the redesign
    python bench/redesign_check.py --old /tmp/lf-old/src --runs 3

Runs the decode benchmark's modes twice, once with this checkout's leanformers ("new-<mode>") and once
with the source tree given by --old ("old-<mode>"), plus transformers and llama.cpp, every mode in its own
process and the rounds interleaved (the harness of `leanformers bench`). Each mode's decode ratio to
transformers at the same precision is the median of the per-round ratios, so old and new are compared
under the same machine load. Writes bench/results/redesign_check.json.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(ROOT / "bench"))

import bench_decode  # noqa: E402
from leanformers import bench  # noqa: E402

MODES = ("eager-fp32", "eager-bf16", "compiled-fp32", "compiled-bf16", "int8", "int4")
HERE = str(Path(__file__).resolve().parent)


def worker_old(spec: dict[str, Any], t0: float) -> dict[str, Any]:
    """The pre-redesign API (lm.decode_fn), the same protocol as leanformers.bench.worker_leanformers."""
    import torch

    torch.set_num_threads(spec["threads"])
    # the worker process started from this checkout's leanformers.bench: forget that package so the import
    # below reads the old tree (first on sys.path)
    for name in [m for m in sys.modules if m == "leanformers" or m.startswith("leanformers.")]:
        del sys.modules[name]
    sys.path.insert(0, str(Path(spec["old_src"]).resolve()))  # before this script's own src/ entry
    import leanformers

    assert str(Path(leanformers.__file__).resolve()).startswith(str(Path(spec["old_src"]).resolve())), \
        f"imported {leanformers.__file__}, not the old tree"
    kwargs: dict[str, Any] = {"progress": False}
    for key in ("dtype", "quantize", "compile", "huge_pages"):
        if key in spec:
            kwargs[key] = spec[key]
    lm = leanformers.load(spec["model_path"], **kwargs)
    chat, long = spec["chat_ids"], spec["prefill_ids"]
    lm.generate(chat, max_new_tokens=1)
    out: dict[str, Any] = {"ttft_s": round(time.time() - t0, 2), "dtype": str(lm.dtype).removeprefix("torch.")}
    if spec["phase"] == "cold":
        out["answer_ids"] = lm.generate(chat, max_new_tokens=spec["answer_tokens"]).token_ids
        return out
    n = spec["new_tokens"]
    lm.generate(chat, max_new_tokens=min(n, 32), ignore_eos=True)
    lm.generate(long, max_new_tokens=1)
    dec, pre = [], []
    for _ in range(spec["runs"]):
        dec.append(lm.generate(chat, max_new_tokens=n, ignore_eos=True).stats["decode_tokens_per_s"])
        pre.append(len(long) / lm.generate(long, max_new_tokens=1).stats["prefill_s"])
    out.update(decode_tok_s=round(statistics.median(dec), 2), prefill_tok_s=round(statistics.median(pre), 2))
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--old", required=True, help="the pre-redesign source tree (its src/ directory)")
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--new-tokens", type=int, default=256)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--modes", default=",".join(MODES))
    ap.add_argument("--json", default=str(ROOT / "bench" / "results" / "redesign_check.json"))
    args = ap.parse_args()
    modes: dict[str, dict[str, Any]] = {}
    for m in args.modes.split(","):
        modes[f"new-{m}"] = dict(bench.MODES[m])
        modes[f"old-{m}"] = dict(bench.MODES[m], worker="redesign_check:worker_old",
                                 sys_path=[str(Path(args.old).resolve()), HERE], old_src=args.old)
    for peer in ("transformers-fp32", "transformers-bf16", "llama.cpp"):
        modes[peer] = bench_decode.PEERS[peer]
    result = bench.run_bench(None, modes=modes, runs=args.runs, new_tokens=args.new_tokens, threads=args.threads,
                             baselines=("transformers-fp32", "transformers-bf16", "llama.cpp"), skip=bench_decode.skip)
    rows = {r["mode"]: r for r in result["rows"]}
    lines = ["| mode | old tok/s | new tok/s | new / old (per-round median) | old vs transformers | "
             "new vs transformers | change |", "|---|---:|---:|---:|---:|---:|---:|"]
    for m in args.modes.split(","):
        o, n = rows.get(f"old-{m}", {}), rows.get(f"new-{m}", {})
        base = "transformers-bf16" if m in ("eager-bf16", "compiled-bf16") else "transformers-fp32"
        pairs = [a / b for a, b in zip(n.get("decode_tok_s_runs", []), o.get("decode_tok_s_runs", [])) if a and b]
        ro, rn = o.get(f"vs_{base}"), n.get(f"vs_{base}")
        change = f"{(rn / ro - 1) * 100:+.0f}%" if ro and rn else ""
        lines.append(f"| {m} | {o.get('decode_tok_s', '')} | {n.get('decode_tok_s', '')} | "
                     f"{statistics.median(pairs):.2f}x | {ro}x ({base}) | {rn}x | {change} |" if pairs else
                     f"| {m} | {o.get('error', '')} | {n.get('error', '')} | | | | |")
    table = "\n".join(lines)
    print(bench.format_table(result))
    print()
    print(table)
    Path(args.json).write_text(json.dumps(dict(result, comparison=table), indent=2, default=str))
    print(f"\nwrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
