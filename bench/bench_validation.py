"""What validating hostile files costs, and how fast oversize models are refused: `python bench/bench_validation.py`.

1. Parsing + validating the bundled SmolLM2 GGUF header (GGUFFile) vs the gguf package's GGUFReader (the peer,
   which validates little), medians over --rounds with min-max.
2. Dequantizing every SmolLM2 tensor with and without the NaN/inf check (CPU time).
3. Time from leanformers.load() to the error for models whose declared size is out of proportion to the file
   (tiny files with GGUF block_count / config num_hidden_layers / head_dim set huge).
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT / "src"))

import leanformers  # noqa: E402
from conftest import save_tiny_model, smollm2_gguf_path  # noqa: E402
from fuzz_mutations import RawGGUF, gguf_value  # noqa: E402
from leanformers.checkpoint import gguf as lf_gguf  # noqa: E402
from leanformers.errors import LeanformersError  # noqa: E402


def timed(fn, rounds: int) -> tuple[float, float, float]:
    times = []
    for _ in range(rounds):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times), min(times), max(times)


def row(name: str, stats: tuple[float, float, float], ref: float | None = None) -> str:
    med, lo, hi = stats
    ratio = f"{med / ref:.2f}x" if ref else ""
    return f"| {name} | {med * 1000:.1f} ms | {lo * 1000:.1f}-{hi * 1000:.1f} ms | {ratio} |"


def check_cost(smol: Path, rounds: int) -> tuple[tuple[float, float, float], tuple[float, float, float]]:
    """CPU seconds to dequantize every SmolLM2 tensor without and with the NaN/inf check (the same tensors,
    interleaved, so that a busy machine slows both alike)."""
    f = lf_gguf.GGUFFile(smol)
    tensors = list(f.tensors(f.config()).values())
    plain, checked = [], []
    for _ in range(rounds):
        p = c = 0.0
        for t in tensors:
            t0 = time.process_time()
            lf_gguf._dequantize(t.raw, t.qtype, t.shape)
            t1 = time.process_time()
            lf_gguf._dequantize(t.raw, t.qtype, t.shape, t._check_finite)
            p, c = p + t1 - t0, c + time.process_time() - t1
        plain.append(p)
        checked.append(c)
    stats = lambda v: (statistics.median(v), min(v), max(v))  # noqa: E731
    return stats(plain), stats(checked)


def refusal(path: Path) -> tuple[float, str]:
    t0 = time.perf_counter()
    try:
        leanformers.load(str(path), progress=False)
        return time.perf_counter() - t0, "LOADED"
    except LeanformersError as exc:
        return time.perf_counter() - t0, f"{type(exc).__name__}: {str(exc).split(': ', 1)[-1][:70]}"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=5)
    args = ap.parse_args()
    smol = smollm2_gguf_path()
    print("| step | median | min-max | vs peer |\n|---|---:|---:|---:|")
    if smol:
        from gguf import GGUFReader

        peer = timed(lambda: GGUFReader(str(smol)), args.rounds)
        ours = timed(lambda: lf_gguf.GGUFFile(smol), args.rounds)
        print(row("SmolLM2 header: gguf.GGUFReader (peer)", peer))
        print(row("SmolLM2 header: leanformers GGUFFile (validated)", ours, peer[0]))
        dequant, check = check_cost(smol, args.rounds)
        print(row("SmolLM2: dequantize every tensor, no check (CPU time)", dequant))
        print(row("SmolLM2: dequantize every tensor with the NaN/inf check (CPU time)", check, dequant[0]))

    work = Path(tempfile.mkdtemp(prefix="lf-refuse-"))
    try:
        hf = save_tiny_model("llama3", work / "hf")
        from gguf import GGMLQuantizationType

        from gguf_utils import write_gguf_from_hf_dir

        g = write_gguf_from_hf_dir(hf, work / "t.gguf", qtype=GGMLQuantizationType.Q4_1)
        cases = {}
        for label, key, vtype, value in [("GGUF block_count=100000", "llama.block_count", 4, 100000),
                                         ("GGUF block_count=1000", "llama.block_count", 4, 1000),
                                         ("GGUF rope.dimension_count=2**31", "llama.rope.dimension_count", 4, 2**31)]:
            raw = RawGGUF.parse(g.read_bytes())
            raw.set_kv(key, vtype, gguf_value(vtype, value))
            path = work / f"{len(cases)}.gguf"
            path.write_bytes(raw.to_bytes())
            cases[label] = path
        for label, key, value in [("config num_hidden_layers=10**6", "num_hidden_layers", 10**6),
                                  ("config num_hidden_layers=1000", "num_hidden_layers", 1000),
                                  ("config head_dim=2**31", "head_dim", 2**31)]:
            d = work / f"d{len(cases)}"
            shutil.copytree(hf, d)
            cfg = json.loads((d / "config.json").read_text())
            cfg[key] = value
            (d / "config.json").write_text(json.dumps(cfg))
            cases[label] = d
        refusal(cases["GGUF block_count=1000"])  # warm imports
        print("\n| oversize model (tiny file) | time to the error | error |\n|---|---:|---|")
        for label, path in cases.items():
            seconds, what = refusal(path)
            print(f"| {label} | {seconds * 1000:.1f} ms | {what} |")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
