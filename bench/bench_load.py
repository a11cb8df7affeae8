"""Load cost: peak RSS of loading a float32 safetensors model vs its weight bytes, and `import leanformers` time.

    python bench/bench_load.py            # ~270 MB random Llama (built with transformers in a temp dir)
    python bench/bench_load.py --small    # ~25 MB (tests)

Each measurement runs in a fresh subprocess:
  - leanformers.load(dir, dtype=float32): peak RSS (ru_maxrss) over the weight bytes, and the same
    after subtracting the RSS the process had before loading (python + torch + leanformers imported).
    Target: <= 1.3x.
  - transformers AutoModelForCausalLM.from_pretrained(dir) the same way, for reference (when installed).
  - `import leanformers`: wall time (median of 5 processes; target < 1 s) and whether it imported torch
    (it must not).
Prints a Markdown table; --json writes the numbers.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SRC = ROOT / "src"

MODEL = dict(vocab_size=32000, hidden_size=768, intermediate_size=2048, num_hidden_layers=6, num_attention_heads=12,
             num_key_value_heads=4, max_position_embeddings=2048, tie_word_embeddings=False)
SMALL = dict(vocab_size=4096, hidden_size=256, intermediate_size=768, num_hidden_layers=4, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=512, tie_word_embeddings=False)

_RSS = """
import resource, sys
def rss_mb():  # VmHWM: peak of this process image (ru_maxrss would include the parent's peak at fork)
    with open('/proc/self/status') as f:
        for line in f:
            if line.startswith('VmHWM:'):
                return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
def cur_mb():
    with open('/proc/self/statm') as f:
        return int(f.read().split()[1]) * 4096 / 2**20
"""

LF_LOAD = _RSS + """
import torch, leanformers, leanformers.lm, leanformers.loading, leanformers.tokenizer, safetensors, tokenizers, jinja2
before = cur_mb()
lm = leanformers.load(sys.argv[1], dtype="float32", progress=False)
peak = rss_mb()
with torch.no_grad():
    s = sum(float(p.float().sum()) for p in lm.model.parameters())  # page every weight in
import json; print(json.dumps({"before_mb": before, "peak_mb": peak, "touched_mb": rss_mb()}))
"""

HF_LOAD = _RSS + """
import torch, transformers
before = cur_mb()
m = transformers.AutoModelForCausalLM.from_pretrained(sys.argv[1], dtype=torch.float32)
peak = rss_mb()
with torch.no_grad():
    s = sum(float(p.float().sum()) for p in m.parameters())  # page every weight in
import json; print(json.dumps({"before_mb": before, "peak_mb": peak, "touched_mb": rss_mb()}))
"""

IMPORT = """
import time, sys
t = time.perf_counter()
import leanformers
dt = time.perf_counter() - t
import json; print(json.dumps({"seconds": dt, "torch_imported": "torch" in sys.modules}))
"""


def make_model(directory: Path, cfg: dict) -> int:
    """Save a random float32 Llama (safetensors) + a small tokenizer; returns the weight bytes."""
    import torch
    import transformers
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    config = transformers.LlamaConfig(**cfg)
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(config).to(torch.float32)
    model.save_pretrained(directory)
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(["hello world, a small tokenizer for a load benchmark"] * 4, trainer)
    tok.save(str(directory / "tokenizer.json"))
    (directory / "tokenizer_config.json").write_text(json.dumps({"bos_token": "<s>", "eos_token": "</s>"}))
    return sum(p.numel() * p.element_size() for p in model.state_dict().values())


def run(code: str, *args: str) -> dict:
    env = dict(os.environ, PYTHONPATH=str(SRC) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    out = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, env=env, timeout=900)
    if out.returncode != 0:
        raise RuntimeError(f"subprocess failed: {out.stderr.strip().splitlines()[-1:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--small", action="store_true", help="a ~25 MB model (quick)")
    p.add_argument("--imports", type=int, default=5, help="import-time processes (median)")
    p.add_argument("--json", default=None, help="write the numbers as JSON here")
    args = p.parse_args(argv)
    rows = []
    with tempfile.TemporaryDirectory(prefix="lf-bench-load-") as tmp:
        d = Path(tmp) / "model"
        d.mkdir()
        weight_bytes = make_model(d, SMALL if args.small else MODEL)
        wmb = weight_bytes / 2**20
        libs = [("leanformers.load", LF_LOAD)]
        try:
            import transformers  # noqa: F401

            libs.append(("transformers from_pretrained", HF_LOAD))
        except ImportError:
            pass
        for name, code in libs:
            r = run(code, str(d))
            rows.append({"what": name, "weights_mb": round(wmb, 1), "rss_before_mb": round(r["before_mb"], 1),
                         "peak_rss_mb": round(r["peak_mb"], 1), "peak_over_weights": round(r["peak_mb"] / wmb, 2),
                         "load_delta_over_weights": round((r["peak_mb"] - r["before_mb"]) / wmb, 2),
                         "touched_peak_mb": round(r["touched_mb"], 1),
                         "touched_delta_over_weights": round((r["touched_mb"] - r["before_mb"]) / wmb, 2)})
    imports = [run(IMPORT) for _ in range(args.imports)]
    imp = {"import_s": round(statistics.median(i["seconds"] for i in imports), 3),
           "torch_imported": any(i["torch_imported"] for i in imports)}

    print(f"\n### Load: float32 safetensors, {wmb:.0f} MB of weights (peak RSS in a fresh process)\n")
    print("| loader | weights MB | RSS before load MB | peak RSS after load MB | (peak - before) / weights "
          "| peak RSS once every weight is read MB | (that - before) / weights |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['what']} | {r['weights_mb']} | {r['rss_before_mb']} | {r['peak_rss_mb']} | "
              f"{r['load_delta_over_weights']}x | {r['touched_peak_mb']} | {r['touched_delta_over_weights']}x |")
    print("\n(safetensors are memory-mapped: a float32 checkpoint loaded as float32 is paged in when first read, "
          "so the last two columns are the real footprint; target <= 1.3x)")
    print(f"\n`import leanformers`: {imp['import_s'] * 1000:.0f} ms (median of {len(imports)} processes; target < 1 s); "
          f"imports torch: {'YES (bad)' if imp['torch_imported'] else 'no'}")
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps({"load": rows, "import": imp}, indent=2))
    ok = imp["import_s"] < 1.0 and not imp["torch_imported"]
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
