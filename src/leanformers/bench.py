"""`leanformers bench`: decode/prefill speed, time to first token and memory of leanformers' modes.

    leanformers bench                               # bundled SmolLM2-135M, every leanformers mode
    leanformers bench --modes eager-fp32,int4 --runs 5 --json out.json
    leanformers bench --quick -m TINY_MODEL_DIR     # a smoke test

Side by side with transformers and llama.cpp: `python bench/bench_decode.py` (this harness plus the peers'
workers; peers are never imported by the library). Every measurement runs in a fresh process:
  cold  one process per mode: time to first token (TTFT, from process start: imports + load + compile +
        prefill + first token; compiled modes start from an empty compile cache) and the greedy answer to
        the chat prompt "What is the capital of France?" (first 10 tokens, EOS respected);
  warm  then `runs` rounds over all modes, one process per mode and round (compiled modes reuse the cold
        process's compile cache): TTFT again, a warm-up, one timed decode (greedy, `new_tokens` tokens, EOS
        ignored, prefill excluded) and one prefill (a `prefill_tokens`-token prompt, the last position's
        logits only, as every library computes them). Rounds interleave the modes in time, so a busy spell
        on a shared machine hits every mode alike. Reported: the median over rounds and the range (the
        spread), ratios as the median of the per-round ratios (same round = same machine state) and their
        range, the largest peak RSS (VmHWM) of a warm process.
Every library gets the same prompt token ids (rendered and tokenized once by leanformers).
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Sequence

QUESTION = "What is the capital of France?"
ANSWER_TOKENS = 10
WORKER = "leanformers.bench:worker_leanformers"

# mode -> how to run it: `worker` is "module:function" (run in a child process), the rest is its spec
MODES: dict[str, dict[str, Any]] = {
    "eager-fp32": {"dtype": "float32"},
    "eager-bf16": {"dtype": "bfloat16"},
    "compiled-fp32": {"dtype": "float32", "compile": True},
    "compiled-bf16": {"dtype": "bfloat16", "compile": True},
    "int8": {"quantize": "int8", "compile": True},
    "int4": {"quantize": "int4", "compile": True},
    "int8-eager": {"quantize": "int8"},
    "int4-eager": {"quantize": "int4"},
}
# the same with the weights left in ordinary 4 KiB pages (load(huge_pages=False)): the A/B of compile.memory
MODES.update({f"{m}-4k": dict(MODES[m], huge_pages=False) for m in ("compiled-fp32", "compiled-bf16", "int4")})
for _spec in MODES.values():
    _spec.setdefault("worker", WORKER)
DEFAULT_MODES = ["eager-fp32", "eager-bf16", "compiled-fp32", "compiled-bf16", "int8", "int4"]
QUICK_MODES = ["eager-fp32", "compiled-fp32"]

COLUMNS = [
    ("mode", "mode"), ("decode_tok_s", "decode tok/s"), ("decode_range", "range"),
    ("prefill_tok_s", "prefill tok/s"), ("ttft_cold_s", "TTFT cold s"), ("ttft_warm_s", "TTFT warm s"),
    ("peak_rss_mb", "peak RSS MB"), ("answer", "answer (greedy, 10 tokens)"),
]

_FILLER = (
    "The history of computing is a story of people and machines. Early mechanical calculators could add and "
    "subtract; later, programmable machines read instructions from punched cards. Electronic computers "
    "replaced relays with vacuum tubes and then transistors, and integrated circuits packed ever more of them "
    "onto a single chip. Software grew from hand-written machine code to compilers, operating systems, "
    "databases and networks that connect billions of devices. "
)


# ------------------------------------------------------------------------------------------------ parent
def prepare_prompts(model: str | None, prefill_tokens: int) -> dict[str, Any]:
    """Resolve the model and tokenize the prompts once (every library gets the same ids)."""
    from .hub import resolve
    from .tokenizer import load_tokenizer_from_dir, load_tokenizer_from_gguf

    resolved = resolve(model, offline=None, progress=False)
    if resolved.kind == "gguf":
        from .checkpoint.gguf import GGUFFile

        tokenizer = load_tokenizer_from_gguf(GGUFFile(resolved.path))
    else:
        tokenizer = load_tokenizer_from_dir(resolved.path)
    text = tokenizer.apply_chat_template([{"role": "user", "content": QUESTION}], add_generation_prompt=True)
    chat = tokenizer.encode(text, add_special_tokens=False)
    long: list[int] = []
    while len(long) < prefill_tokens:
        long += tokenizer.encode(_FILLER, add_special_tokens=False)
    return {"model_path": str(resolved.path), "kind": resolved.kind, "chat_ids": chat,
            "prefill_ids": long[:prefill_tokens], "tokenizer": tokenizer, "eos": tokenizer.eos_token_ids}


def _spawn(spec: dict[str, Any], env: dict[str, str], timeout: float) -> dict[str, Any]:
    with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as f:
        json.dump(spec, f)
        path = f.name
    try:
        env = dict(env, LEANFORMERS_BENCH_T0=repr(time.time()))
        proc = subprocess.run([sys.executable, "-m", "leanformers.bench", "--worker", path], env=env,
                              capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {timeout:.0f}s"}
    finally:
        os.unlink(path)
    for line in reversed(proc.stdout.splitlines()):
        if line.startswith("BENCH_RESULT "):
            return json.loads(line[len("BENCH_RESULT "):])
    tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
    return {"error": f"worker exited with status {proc.returncode}: {' | '.join(tail)[:400]}"}


def run_bench(
    model: str | None = None,
    *,
    modes: dict[str, dict[str, Any]],
    runs: int = 3,
    new_tokens: int = 256,
    prefill_tokens: int = 512,
    threads: int = 2,
    timeout: float = 3600.0,
    baselines: Sequence[str] = ("eager-fp32",),
    skip: Callable[[str, dict[str, Any], dict[str, Any]], str | None] | None = None,
    log: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """Run every mode of `modes` (name -> spec with a `worker`); returns {"meta": ..., "rows": [...]}.

    baselines: modes every row's decode speed is compared with (`vs_<mode>` ratios). skip(mode, spec,
    prompts): a reason not to run a mode here (a peer not installed), or None.
    """
    log = log or (lambda s: print(s, file=sys.stderr, flush=True))
    prompts = prepare_prompts(model, prefill_tokens)
    tokenizer = prompts.pop("tokenizer")
    rows: list[dict[str, Any]] = []
    base_env = dict(os.environ, TOKENIZERS_PARALLELISM="false", PYTHONUNBUFFERED="1")
    src = str(Path(__file__).resolve().parent.parent)
    base_env["PYTHONPATH"] = src + (os.pathsep + base_env["PYTHONPATH"] if base_env.get("PYTHONPATH") else "")
    active: list[tuple[dict[str, Any], dict[str, Any], dict[str, str]]] = []  # (row, spec, env)
    caches: list[str] = []
    try:
        # cold: one process per mode, an empty compile cache
        for mode, mode_spec in modes.items():
            spec = dict(mode_spec, mode=mode, threads=threads, runs=1, new_tokens=new_tokens,
                        answer_tokens=ANSWER_TOKENS, **prompts)
            row: dict[str, Any] = {"mode": mode}
            rows.append(row)
            reason = skip(mode, spec, prompts) if skip else None
            if reason:
                row["error"] = f"skipped: {reason}"
                log(f"[bench] {mode}: {row['error']}")
                continue
            caches.append(tempfile.mkdtemp(prefix="lf-bench-cache-"))
            env = dict(base_env, LEANFORMERS_CACHE=caches[-1])
            log(f"[bench] {mode}: cold process ...")
            cold = _spawn(dict(spec, phase="cold"), env, timeout)
            if "error" in cold:
                row["error"] = cold["error"]
                log(f"[bench] {mode}: {row['error']}")
                continue
            ids = cold.get("answer_ids") or []
            row.update(ttft_cold_s=cold.get("ttft_s"), peak_rss_cold_mb=cold.get("peak_rss_mb"), answer_ids=ids,
                       answer=tokenizer.decode([i for i in ids if i not in prompts["eos"]]).strip())
            for key in ("dtype", "compiled", "compile_info"):
                if key in cold:
                    row[f"cold_{key}" if key == "compile_info" else key] = cold[key]
            log(f"[bench] {mode}: TTFT cold {row['ttft_cold_s']} s, answer {row['answer']!r}")
            active.append((row, spec, env))
        # warm: `runs` rounds over the modes, one process per mode and round, interleaved in time
        for r in range(runs):
            for row, spec, env in active:
                log(f"[bench] {row['mode']}: warm process {r + 1}/{runs} ...")
                warm = _spawn(dict(spec, phase="warm"), env, timeout)
                if "error" in warm:
                    row.setdefault("warm_errors", []).append(warm["error"])
                    log(f"[bench] {row['mode']}: {warm['error']}")
                    warm = {}
                for key in ("decode_tok_s", "prefill_tok_s", "ttft_s", "peak_rss_mb"):
                    row.setdefault(f"{key}_runs", []).append(warm.get(key))  # None: that round failed
                for key in ("compile_info", "eager_fallbacks", "compiled_calls"):
                    if key in warm:
                        row[key] = warm[key]
        for row, _, _ in active:
            dec = [x for x in row.get("decode_tok_s_runs", []) if x is not None]
            if not dec:
                row["error"] = "; ".join(row.get("warm_errors", ["no warm run"]))[:300]
                continue
            row.update(decode_tok_s=_median(dec), decode_range=[min(dec), max(dec)],
                       prefill_tok_s=_median([x for x in row["prefill_tok_s_runs"] if x is not None]),
                       ttft_warm_s=_median([x for x in row["ttft_s_runs"] if x is not None]),
                       peak_rss_mb=max(x for x in row["peak_rss_mb_runs"] if x is not None))
            log(f"[bench] {row['mode']}: decode {row['decode_tok_s']} tok/s {row['decode_range']}, prefill "
                f"{row['prefill_tok_s']} tok/s, TTFT {row.get('ttft_cold_s')}/{row['ttft_warm_s']} s, "
                f"RSS {row['peak_rss_mb']} MB")
    finally:
        for c in caches:
            shutil.rmtree(c, ignore_errors=True)
    ratios(rows, baselines)
    import torch

    from .compile.memory import huge_pages_unavailable

    meta = {
        "model": model or "smollm2-135m-instruct", "model_path": prompts["model_path"], "runs": runs,
        "new_tokens": new_tokens, "prefill_tokens": len(prompts["prefill_ids"]),
        "chat_prompt_tokens": len(prompts["chat_ids"]), "threads": threads, "torch": torch.__version__,
        "python": platform.python_version(), "machine": platform.machine(), "cpus": os.cpu_count(),
        "date": time.strftime("%Y-%m-%d %H:%M:%S"), "load_average": _loadavg(), "baselines": list(baselines),
        "huge_pages": huge_pages_unavailable() or "weights in transparent huge pages (modes without -4k)",
    }
    return {"meta": meta, "rows": rows}


def ratios(rows: list[dict[str, Any]], baselines: Sequence[str]) -> None:
    """`vs_<baseline>`: the median of per-round decode ratios (rounds interleave the modes), and its range."""
    by = {r["mode"]: r for r in rows}
    for base in baselines:
        b = by.get(base)
        if not b or not b.get("decode_tok_s"):
            continue
        for r in rows:
            if not r.get("decode_tok_s"):
                continue
            pairs = [x / y for x, y in zip(r.get("decode_tok_s_runs", []), b.get("decode_tok_s_runs", []))
                     if x is not None and y]
            if not pairs:
                pairs = [r["decode_tok_s"] / b["decode_tok_s"]]
            r[f"vs_{base}"] = round(statistics.median(pairs), 2)
            r[f"vs_{base}_range"] = [round(min(pairs), 2), round(max(pairs), 2)]


def _loadavg() -> list[float] | None:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


def _cell(key: str, value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, list):
        return f"{value[0]:g}-{value[1]:g}" if len(value) == 2 else ""
    if key.startswith("vs_"):
        return f"{value:.2f}x"
    if isinstance(value, float):
        return f"{value:.2f}" if key.startswith("ttft") else f"{value:.1f}"
    if key == "answer":
        return repr(value)[1:-1].replace("|", "\\|")
    return str(value)


def format_table(result: list[dict[str, Any]] | dict[str, Any], baselines: Sequence[str] | None = None) -> str:
    """A Markdown table of run_bench's rows: the speed columns plus `vs <baseline>` ratio columns."""
    rows = result["rows"] if isinstance(result, dict) else result
    if baselines is None:
        baselines = result["meta"]["baselines"] if isinstance(result, dict) else ()
    columns = COLUMNS[:2] + [(f"vs_{b}", f"vs {b}") for b in baselines] + COLUMNS[2:]
    lines = ["| " + " | ".join(title for _, title in columns) + " |",
             "|" + "|".join("---" if k in ("mode", "answer") else "---:" for k, _ in columns) + "|"]
    for r in rows:
        if r.get("error"):
            cells = [r["mode"], f"({r['error'][:120]})"] + [""] * (len(columns) - 2)
        else:
            cells = [_cell(k, r.get(k)) for k, _ in columns]
            for i, (k, _) in enumerate(columns):
                if k.startswith("vs_") and r.get(f"{k}_range"):
                    cells[i] += f" ({_cell(k, r[f'{k}_range'])})"
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------------ worker
def peak_rss_mb() -> float:
    """Peak RSS of this process: VmHWM on Linux (ru_maxrss would include the parent's peak at fork)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return round(int(line.split()[1]) / 1024, 1)
    except OSError:
        pass
    import resource

    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return round(rss / (1024 * 1024 if sys.platform == "darwin" else 1024), 1)


def _median(xs: list[float]) -> float:
    return round(statistics.median(xs), 2)


def worker_leanformers(spec: dict[str, Any], t0: float) -> dict[str, Any]:
    import torch

    torch.set_num_threads(spec["threads"])
    import leanformers

    kwargs: dict[str, Any] = {"progress": False}
    for key in ("dtype", "quantize", "compile", "huge_pages"):
        if key in spec:
            kwargs[key] = spec[key]
    lm = leanformers.load(spec["model_path"], **kwargs)
    chat, long = spec["chat_ids"], spec["prefill_ids"]
    # plain greedy decoding, the peers' workload: no repetition penalty (the default for a model without
    # generation_config.json is 1.1, which transformers and llama.cpp are not asked to apply here)
    greedy = {"temperature": 0.0, "repetition_penalty": 1.0}
    lm.generate(chat, max_new_tokens=1, **greedy)
    out: dict[str, Any] = {"ttft_s": round(time.time() - t0, 2), "dtype": str(lm.dtype).removeprefix("torch.")}
    step = lm.step
    if spec.get("compile"):
        out["compiled"] = bool(getattr(step, "graphs", None))
        out["compile_info"] = [dict(v) for v in getattr(step, "info", {}).values()]
    if spec["phase"] == "cold":
        out["answer_ids"] = lm.generate(chat, max_new_tokens=spec["answer_tokens"], **greedy).token_ids
        return out
    n = spec["new_tokens"]
    lm.generate(chat, max_new_tokens=min(n, 32), ignore_eos=True, **greedy)  # warm-up
    lm.generate(long, max_new_tokens=1, **greedy)
    dec, pre = [], []
    for _ in range(spec["runs"]):
        r = lm.generate(chat, max_new_tokens=n, ignore_eos=True, **greedy)
        dec.append(r.stats["decode_tokens_per_s"])
        r = lm.generate(long, max_new_tokens=1, **greedy)
        pre.append(len(long) / r.stats["prefill_s"])
    out.update(decode_tok_s=_median(dec), prefill_tok_s=_median(pre))
    if getattr(step, "eager", None):
        out["eager_fallbacks"] = list(step.eager.values())
    if hasattr(step, "calls"):
        out["compiled_calls"] = dict(step.calls)
    return out


def _worker(path: str) -> int:
    t0 = float(os.environ.get("LEANFORMERS_BENCH_T0", time.time()))
    spec = json.loads(Path(path).read_text())
    try:
        sys.path[:0] = spec.get("sys_path", [])
        module, _, name = spec["worker"].partition(":")
        out = getattr(importlib.import_module(module), name)(spec, t0)
    except Exception as exc:  # reported in the table, not a crash of the whole bench
        import traceback

        traceback.print_exc()
        out = {"error": f"{type(exc).__name__}: {str(exc).strip().splitlines()[0] if str(exc).strip() else ''}"[:300]}
    out["peak_rss_mb"] = peak_rss_mb()
    print("BENCH_RESULT " + json.dumps(out), flush=True)
    return 0


# ------------------------------------------------------------------------------------------------ CLI
def build_parser(prog: str = "leanformers bench", modes: dict[str, dict[str, Any]] = MODES,
                 default_modes: Sequence[str] = DEFAULT_MODES) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=prog, description=__doc__.splitlines()[0])
    p.add_argument("-m", "--model", default=None, help="model reference (default: the bundled smollm2-135m-instruct)")
    p.add_argument("--modes", default=None,
                   help=f"comma-separated modes (default: {','.join(default_modes)}); all: {','.join(modes)}")
    p.add_argument("--runs", type=int, default=None, help="rounds (one process per mode each), median reported "
                                                          "(default 3; --quick 1)")
    p.add_argument("--new-tokens", type=int, default=None, help="decode tokens per run (default 256; --quick 8)")
    p.add_argument("--prefill-tokens", type=int, default=None, help="prefill prompt length (default 512; --quick 32)")
    p.add_argument("--threads", type=int, default=min(2, os.cpu_count() or 1), help="CPU threads per library (default 2)")
    p.add_argument("--quick", action="store_true", help="a smoke test: few tokens, one run, fewer modes")
    p.add_argument("--json", default=None, help="write the results as JSON to this file")
    p.add_argument("--timeout", type=float, default=None, help="seconds per worker process (default 3600; --quick 900)")
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    return p


def main(argv: Sequence[str] | None = None, *, modes: dict[str, dict[str, Any]] = MODES,
         default_modes: Sequence[str] = DEFAULT_MODES, quick_modes: Sequence[str] = QUICK_MODES,
         baselines: Sequence[str] = ("eager-fp32",), skip=None, prog: str = "leanformers bench") -> int:
    """The command line; bench/bench_decode.py calls it with the peers' modes added."""
    args = build_parser(prog, modes, default_modes).parse_args(list(argv) if argv is not None else None)
    if args.worker:
        return _worker(args.worker)
    q = args.quick
    names = [m.strip() for m in args.modes.split(",") if m.strip()] if args.modes else \
        list(quick_modes if q else default_modes)
    bad = [m for m in names if m not in modes]
    if bad:
        print(f"{prog}: error: unknown mode(s) {', '.join(bad)}; choose from {', '.join(modes)}", file=sys.stderr)
        return 2
    result = run_bench(
        args.model, modes={m: modes[m] for m in names}, runs=args.runs or (1 if q else 3),
        new_tokens=args.new_tokens or (8 if q else 256), prefill_tokens=args.prefill_tokens or (32 if q else 512),
        threads=args.threads, timeout=args.timeout or (900 if q else 3600),
        baselines=[b for b in baselines if b in names], skip=skip,
    )
    m = result["meta"]
    print(f"\n{m['model']}: decode {m['new_tokens']} new tokens (greedy, EOS ignored) after a "
          f"{m['chat_prompt_tokens']}-token chat prompt; prefill {m['prefill_tokens']} tokens; median of "
          f"{m['runs']} rounds (range); ratios: median of per-round ratios (range); {m['threads']} threads; "
          f"torch {m['torch']}\n")
    print(format_table(result))
    if args.json:
        out = Path(args.json)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(result, indent=2, default=str))
        print(f"\nwrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
