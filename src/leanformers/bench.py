"""Decode/prefill benchmark: leanformers modes vs transformers and llama.cpp, each mode in its own process.

    leanformers bench                               # bundled SmolLM2-135M, every mode (~30 min on 2 cores)
    leanformers bench --modes eager-fp32,int4 --runs 5 --json out.json
    leanformers bench --quick -m TINY_MODEL_DIR     # a smoke test (CI)

Every measurement runs in a fresh process:
  cold  one process per mode: time to first token (TTFT, from process start: imports + load + compile +
        prefill + first token; compiled modes start from an empty compile cache) and the greedy
        answer to the chat prompt "What is the capital of France?" (first 10 tokens, EOS respected);
  warm  then `runs` rounds over all modes, one process per mode and round (compiled modes reuse the
        cold process's compile cache): TTFT again, a warm-up, and one timed decode (greedy,
        `new_tokens` tokens, EOS ignored; prefill excluded) and prefill (a `prefill_tokens`-token
        prompt). Medians over the rounds are reported, and the largest peak RSS (VmHWM) of a warm
        process. Rounds interleave the modes in time, so on a shared machine a busy spell hits every
        mode alike.
Every library gets the same prompt token ids (rendered and tokenized once by leanformers).
Ratios are decode tok/s over transformers float32's and over llama.cpp's.
"""

from __future__ import annotations

import argparse
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

# mode -> how to run it. lib: leanformers | transformers | llama_cpp
MODES: dict[str, dict[str, Any]] = {
    "eager-fp32": {"lib": "leanformers", "dtype": "float32"},
    "eager-bf16": {"lib": "leanformers", "dtype": "bfloat16"},
    "compiled-fp32": {"lib": "leanformers", "dtype": "float32", "compile": True},
    "compiled-bf16": {"lib": "leanformers", "dtype": "bfloat16", "compile": True},
    "int8": {"lib": "leanformers", "quantize": "int8", "compile": True},
    "int4": {"lib": "leanformers", "quantize": "int4", "compile": True},
    "int8-eager": {"lib": "leanformers", "quantize": "int8"},
    "int4-eager": {"lib": "leanformers", "quantize": "int4"},
    "transformers-fp32": {"lib": "transformers", "dtype": "float32"},
    "transformers-bf16": {"lib": "transformers", "dtype": "bfloat16"},
    "llama.cpp": {"lib": "llama_cpp"},
}
# the same with the weights left in ordinary 4 KiB pages (load(huge_pages=False)): the A/B of leanformers.memory
MODES.update({f"{m}-4k": dict(MODES[m], huge_pages=False) for m in ("compiled-fp32", "compiled-bf16", "int4")})
DEFAULT_MODES = ["eager-fp32", "eager-bf16", "compiled-fp32", "compiled-bf16", "int8", "int4",
                 "transformers-fp32", "transformers-bf16", "llama.cpp"]
QUICK_MODES = ["eager-fp32", "compiled-fp32", "transformers-fp32", "llama.cpp"]
BASELINE, LLAMA_CPP = "transformers-fp32", "llama.cpp"

COLUMNS = [
    ("mode", "mode"), ("decode_tok_s", "decode tok/s"), ("vs_transformers_fp32", "vs transformers fp32"),
    ("vs_llama_cpp", "vs llama.cpp"), ("prefill_tok_s", "prefill tok/s"), ("ttft_cold_s", "TTFT cold s"),
    ("ttft_warm_s", "TTFT warm s"), ("peak_rss_mb", "peak RSS MB"), ("answer", "answer (greedy, 10 tokens)"),
]

_FILLER = (
    "The history of computing is a story of people and machines. Early mechanical calculators could add and "
    "subtract; later, programmable machines read instructions from punched cards. Electronic computers "
    "replaced relays with vacuum tubes and then transistors, and integrated circuits packed ever more of them "
    "onto a single chip. Software grew from hand-written machine code to compilers, operating systems, "
    "databases and networks that connect billions of devices. "
)


# ------------------------------------------------------------------------------------------------ parent
def _available(lib: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(lib) is not None


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
        spec_t0 = time.time()
        env = dict(env, LEANFORMERS_BENCH_T0=repr(spec_t0))
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
    modes: Sequence[str] | None = None,
    runs: int = 3,
    new_tokens: int = 256,
    prefill_tokens: int = 512,
    threads: int = 2,
    quick: bool = False,
    timeout: float = 3600.0,
    log: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """Run every mode (two processes each); returns {"meta": ..., "rows": [...]} (see format_table)."""
    log = log or (lambda s: print(s, file=sys.stderr, flush=True))
    modes = list(modes or (QUICK_MODES if quick else DEFAULT_MODES))
    unknown = [m for m in modes if m not in MODES]
    if unknown:
        raise ValueError(f"unknown modes {unknown}; choose from {', '.join(MODES)}")
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
        for mode in modes:
            spec = dict(MODES[mode], mode=mode, threads=threads, runs=1, new_tokens=new_tokens,
                        answer_tokens=ANSWER_TOKENS, **prompts)
            row: dict[str, Any] = {"mode": mode, "lib": spec["lib"]}
            rows.append(row)
            skip = None
            if spec["lib"] != "leanformers" and not _available(spec["lib"]):
                skip = f"{spec['lib']} is not installed"
            elif spec["lib"] == "llama_cpp" and prompts["kind"] != "gguf":
                skip = "llama.cpp needs a .gguf model"
            if skip:
                row["error"] = f"skipped: {skip}"
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
        # warm: `runs` rounds over the modes, one process per mode and round (interleaved in time, so a
        # busy spell on a shared machine hits every mode alike rather than one of them)
        samples: dict[str, dict[str, list]] = {row["mode"]: {} for row, _, _ in active}
        for r in range(runs):
            for row, spec, env in active:
                log(f"[bench] {row['mode']}: warm process {r + 1}/{runs} ...")
                warm = _spawn(dict(spec, phase="warm"), env, timeout)
                if "error" in warm:
                    samples[row["mode"]].setdefault("errors", []).append(warm["error"])
                    log(f"[bench] {row['mode']}: {warm['error']}")
                    continue
                for key in ("decode_tok_s", "prefill_tok_s", "ttft_s", "peak_rss_mb"):
                    samples[row["mode"]].setdefault(key, []).append(warm[key])
                for key in ("compile_info", "eager_fallbacks"):
                    if key in warm:
                        row[key] = warm[key]
        for row, _, _ in active:
            got = samples[row["mode"]]
            if not got.get("decode_tok_s"):
                row["error"] = "; ".join(got.get("errors", ["no warm run"]))[:300]
                continue
            row.update(decode_tok_s=_median(got["decode_tok_s"]), prefill_tok_s=_median(got["prefill_tok_s"]),
                       ttft_warm_s=_median(got["ttft_s"]), peak_rss_mb=max(got["peak_rss_mb"]),
                       decode_runs=got["decode_tok_s"], prefill_runs=got["prefill_tok_s"],
                       ttft_warm_runs=got["ttft_s"])
            if got.get("errors"):
                row["warm_errors"] = got["errors"]
            log(f"[bench] {row['mode']}: decode {row['decode_tok_s']} tok/s, prefill {row['prefill_tok_s']} tok/s, "
                f"TTFT {row.get('ttft_cold_s')}/{row['ttft_warm_s']} s, RSS {row['peak_rss_mb']} MB")
    finally:
        for c in caches:
            shutil.rmtree(c, ignore_errors=True)
    _ratios(rows)
    import torch

    from .memory import huge_pages_unavailable

    meta = {
        "model": model or "smollm2-135m-instruct", "model_path": prompts["model_path"], "runs": runs,
        "new_tokens": new_tokens, "prefill_tokens": len(prompts["prefill_ids"]),
        "chat_prompt_tokens": len(prompts["chat_ids"]), "threads": threads, "torch": torch.__version__,
        "python": platform.python_version(), "machine": platform.machine(), "cpus": os.cpu_count(),
        "date": time.strftime("%Y-%m-%d %H:%M:%S"), "load_average": _loadavg(),
        "huge_pages": huge_pages_unavailable() or "weights in transparent huge pages (modes without -4k)",
    }
    return {"meta": meta, "rows": rows}


def _loadavg() -> list[float] | None:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


def _ratios(rows: list[dict[str, Any]]) -> None:
    by = {r["mode"]: r.get("decode_tok_s") for r in rows}
    for key, base in (("vs_transformers_fp32", by.get(BASELINE)), ("vs_llama_cpp", by.get(LLAMA_CPP))):
        for r in rows:
            if base and r.get("decode_tok_s"):
                r[key] = round(r["decode_tok_s"] / base, 2)


def _cell(key: str, value: Any) -> str:
    if value is None:
        return ""
    if key.startswith("vs_"):
        return f"{value:.2f}x"
    if isinstance(value, float):
        return f"{value:.1f}" if key != "ttft_warm_s" and key != "ttft_cold_s" else f"{value:.2f}"
    if key == "answer":
        return repr(value)[1:-1].replace("|", "\\|")
    return str(value)


def format_table(rows: list[dict[str, Any]] | dict[str, Any]) -> str:
    """A Markdown table of run_bench's rows (or of its whole result)."""
    if isinstance(rows, dict):
        rows = rows["rows"]
    lines = ["| " + " | ".join(title for _, title in COLUMNS) + " |",
             "|" + "|".join("---" if k in ("mode", "answer") else "---:" for k, _ in COLUMNS) + "|"]
    for r in rows:
        if r.get("error"):
            cells = [r["mode"], f"({r['error'][:120]})"] + [""] * (len(COLUMNS) - 2)
        else:
            cells = [_cell(k, r.get(k)) for k, _ in COLUMNS]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------------ worker
def _peak_rss_mb() -> float:
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


def _worker_leanformers(spec: dict[str, Any], t0: float) -> dict[str, Any]:
    import torch

    torch.set_num_threads(spec["threads"])
    import leanformers

    kwargs: dict[str, Any] = {"progress": False}
    if spec.get("dtype"):
        kwargs["dtype"] = spec["dtype"]
    if spec.get("quantize"):
        kwargs["quantize"] = spec["quantize"]
    if spec.get("compile"):
        kwargs["compile"] = True
    if "huge_pages" in spec:
        kwargs["huge_pages"] = spec["huge_pages"]
    lm = leanformers.load(spec["model_path"], **kwargs)
    chat, long = spec["chat_ids"], spec["prefill_ids"]
    lm.generate(chat, max_new_tokens=1)
    out: dict[str, Any] = {"ttft_s": round(time.time() - t0, 2), "dtype": str(lm.dtype).removeprefix("torch.")}
    fn = lm.decode_fn
    if spec.get("compile"):
        out["compiled"] = bool(fn is not None and getattr(fn, "graphs", None))
        if fn is not None:
            out["compile_info"] = [dict(v) for v in fn.info.values()]
    if spec["phase"] == "cold":
        r = lm.generate(chat, max_new_tokens=spec["answer_tokens"])
        out["answer_ids"] = r.token_ids
        return out
    n = spec["new_tokens"]
    lm.generate(chat, max_new_tokens=min(n, 32), ignore_eos=True)  # warm-up
    lm.generate(long, max_new_tokens=1)
    dec, pre = [], []
    for _ in range(spec["runs"]):
        r = lm.generate(chat, max_new_tokens=n, ignore_eos=True)
        dec.append(r.stats["decode_tokens_per_s"])
        r = lm.generate(long, max_new_tokens=1)
        pre.append(len(long) / r.stats["prefill_s"])
    out.update(decode_tok_s=_median(dec), prefill_tok_s=_median(pre), decode_runs=[round(x, 2) for x in dec])
    if fn is not None and getattr(fn, "eager", None):
        out["eager_fallbacks"] = list(fn.eager.values())
    return out


def _worker_transformers(spec: dict[str, Any], t0: float) -> dict[str, Any]:
    import torch

    torch.set_num_threads(spec["threads"])
    import transformers

    path = Path(spec["model_path"])
    dtype = getattr(torch, spec["dtype"])
    if spec["kind"] == "gguf":
        model = transformers.AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=dtype)
    else:
        model = transformers.AutoModelForCausalLM.from_pretrained(str(path), dtype=dtype)
    model.eval()
    chat = torch.tensor([spec["chat_ids"]])
    long = torch.tensor([spec["prefill_ids"]])
    eos = model.generation_config.eos_token_id
    pad = eos[0] if isinstance(eos, list) else eos

    def gen(n: int, ignore_eos: bool) -> tuple[list[int], float]:
        kw = dict(max_new_tokens=n, do_sample=False, pad_token_id=pad, attention_mask=torch.ones_like(chat))
        if ignore_eos:
            kw["min_new_tokens"] = n
        t = time.perf_counter()
        with torch.inference_mode():
            ids = model.generate(chat, **kw)
        return ids[0, chat.shape[1]:].tolist(), time.perf_counter() - t

    gen(1, False)
    out: dict[str, Any] = {"ttft_s": round(time.time() - t0, 2), "dtype": spec["dtype"]}
    if spec["phase"] == "cold":
        out["answer_ids"] = gen(spec["answer_tokens"], False)[0]
        return out
    n = spec["new_tokens"]
    gen(min(n, 32), True)  # warm-up
    dec, pre = [], []
    for _ in range(spec["runs"]):
        _, t1 = gen(1, True)
        ids, tn = gen(n, True)
        dec.append((len(ids) - 1) / max(tn - t1, 1e-9))
        t = time.perf_counter()
        with torch.inference_mode():
            model(long)
        pre.append(long.shape[1] / (time.perf_counter() - t))
    out.update(decode_tok_s=_median(dec), prefill_tok_s=_median(pre), decode_runs=[round(x, 2) for x in dec])
    return out


def _worker_llama_cpp(spec: dict[str, Any], t0: float) -> dict[str, Any]:
    from llama_cpp import Llama

    chat, long = spec["chat_ids"], spec["prefill_ids"]
    n_ctx = max(len(chat) + spec["new_tokens"], len(long)) + 16
    llm = Llama(model_path=spec["model_path"], n_ctx=n_ctx, n_batch=512, n_threads=spec["threads"],
                n_threads_batch=spec["threads"], verbose=False)
    eos = llm.token_eos()

    def tokens(n: int, stop_at_eos: bool) -> tuple[list[int], float, float]:
        """(ids, seconds to the first token, seconds from the first to the last)."""
        llm.reset()  # no prefix reuse between runs
        t = time.perf_counter()
        ids: list[int] = []
        t_first = 0.0
        for tok in llm.generate(chat, top_k=1, top_p=1.0, min_p=0.0, temp=0.0, repeat_penalty=1.0):
            if not ids:
                t_first = time.perf_counter()
            ids.append(tok)
            if len(ids) >= n or (stop_at_eos and tok == eos):
                break
        return ids, t_first - t, time.perf_counter() - t_first

    tokens(1, True)
    out: dict[str, Any] = {"ttft_s": round(time.time() - t0, 2), "dtype": "Q (gguf)"}
    if spec["phase"] == "cold":
        out["answer_ids"] = tokens(spec["answer_tokens"], True)[0]
        return out
    n = spec["new_tokens"]
    tokens(min(n, 32), False)  # warm-up
    dec, pre = [], []
    for _ in range(spec["runs"]):
        ids, _, t = tokens(n, False)
        dec.append((len(ids) - 1) / max(t, 1e-9))
        llm.reset()
        t = time.perf_counter()
        llm.eval(long)
        pre.append(len(long) / (time.perf_counter() - t))
    out.update(decode_tok_s=_median(dec), prefill_tok_s=_median(pre), decode_runs=[round(x, 2) for x in dec])
    return out


def _worker(path: str) -> int:
    t0 = float(os.environ.get("LEANFORMERS_BENCH_T0", time.time()))
    spec = json.loads(Path(path).read_text())
    try:
        fn = {"leanformers": _worker_leanformers, "transformers": _worker_transformers,
              "llama_cpp": _worker_llama_cpp}[spec["lib"]]
        out = fn(spec, t0)
    except Exception as exc:  # reported in the table, not a crash of the whole bench
        import traceback

        traceback.print_exc()
        out = {"error": f"{type(exc).__name__}: {str(exc).strip().splitlines()[0] if str(exc).strip() else ''}"[:300]}
    out["peak_rss_mb"] = _peak_rss_mb()
    print("BENCH_RESULT " + json.dumps(out), flush=True)
    return 0


# ------------------------------------------------------------------------------------------------ CLI
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="leanformers bench", description=__doc__.splitlines()[0])
    p.add_argument("-m", "--model", default=None, help="model reference (default: the bundled smollm2-135m-instruct)")
    p.add_argument("--modes", default=None,
                   help=f"comma-separated modes (default: {','.join(DEFAULT_MODES)}); all: {','.join(MODES)}")
    p.add_argument("--runs", type=int, default=None, help="timed runs per mode, median reported (default 3; --quick 1)")
    p.add_argument("--new-tokens", type=int, default=None, help="decode tokens per run (default 256; --quick 8)")
    p.add_argument("--prefill-tokens", type=int, default=None, help="prefill prompt length (default 512; --quick 32)")
    p.add_argument("--threads", type=int, default=min(2, os.cpu_count() or 1), help="CPU threads per library (default 2)")
    p.add_argument("--quick", action="store_true", help="a smoke test: few tokens, one run, fewer modes")
    p.add_argument("--json", default=None, help="write the results as JSON to this file")
    p.add_argument("--timeout", type=float, default=None, help="seconds per worker process (default 3600; --quick 900)")
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(list(argv) if argv is not None else None)
    if args.worker:
        return _worker(args.worker)
    q = args.quick
    modes = [m.strip() for m in args.modes.split(",") if m.strip()] if args.modes else None
    bad = [m for m in modes or [] if m not in MODES]
    if bad:
        print(f"leanformers bench: error: unknown mode(s) {', '.join(bad)}; choose from {', '.join(MODES)}",
              file=sys.stderr)
        return 2
    result = run_bench(
        args.model, modes=modes, runs=args.runs or (1 if q else 3), new_tokens=args.new_tokens or (8 if q else 256),
        prefill_tokens=args.prefill_tokens or (32 if q else 512), threads=args.threads, quick=q,
        timeout=args.timeout or (900 if q else 3600),
    )
    m = result["meta"]
    print(f"\n{m['model']}: decode {m['new_tokens']} new tokens (greedy, EOS ignored) after a "
          f"{m['chat_prompt_tokens']}-token chat prompt; prefill {m['prefill_tokens']} tokens; "
          f"median of {m['runs']}; {m['threads']} threads; torch {m['torch']}\n")
    print(format_table(result))
    if args.json:
        out = Path(args.json)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(result, indent=2, default=str))
        print(f"\nwrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
