"""Decode/prefill benchmark side by side: leanformers' modes, transformers and llama.cpp (llama-cpp-python),
each mode in its own process, rounds interleaved (the harness is `leanformers bench`'s, src/leanformers/bench.py).

    python bench/bench_decode.py                 # every default mode; writes bench/results/decode.json
    python bench/bench_decode.py --modes compiled-fp32,transformers-fp32 --runs 5
    python bench/bench_decode.py --quick -m DIR  # smoke test

Equal work for every library: the same prompt ids; decode is greedy with EOS ignored (every library decodes
`--new-tokens` tokens); prefill computes the logits of the last position only (transformers with
`logits_to_keep=1`, as leanformers and llama.cpp do). Ratios are medians of per-round ratios with their range.
"""

from __future__ import annotations

import importlib.util
import statistics
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "src"))

from leanformers import bench  # noqa: E402

HERE = str(Path(__file__).resolve().parent)
PEERS = {
    "transformers-fp32": {"lib": "transformers", "dtype": "float32", "worker": "bench_decode:worker_transformers"},
    "transformers-bf16": {"lib": "transformers", "dtype": "bfloat16", "worker": "bench_decode:worker_transformers"},
    "llama.cpp": {"lib": "llama_cpp", "worker": "bench_decode:worker_llama_cpp"},
}
for _spec in PEERS.values():
    _spec["sys_path"] = [HERE]
MODES = {**bench.MODES, **PEERS}
DEFAULT_MODES = [*bench.DEFAULT_MODES, "transformers-fp32", "transformers-bf16", "llama.cpp"]
QUICK_MODES = ["eager-fp32", "compiled-fp32", "transformers-fp32", "llama.cpp"]
BASELINES = ("transformers-fp32", "llama.cpp")


def skip(mode: str, spec: dict[str, Any], prompts: dict[str, Any]) -> str | None:
    lib = spec.get("lib")
    if lib and importlib.util.find_spec(lib) is None:
        return f"{lib} is not installed"
    if lib == "llama_cpp" and prompts["kind"] != "gguf":
        return "llama.cpp needs a .gguf model"
    return None


def _measure(spec: dict[str, Any], t0: float, dtype: str, answer, decode, prefill) -> dict[str, Any]:
    """The protocol every peer follows. answer(n): greedy ids up to n, stopping at EOS; decode(n): (ids,
    seconds from the first new token to the last), EOS ignored; prefill(): seconds for the long prompt's
    last-position logits."""
    answer(1)
    out: dict[str, Any] = {"ttft_s": round(time.time() - t0, 2), "dtype": dtype}
    if spec["phase"] == "cold":
        out["answer_ids"] = answer(spec["answer_tokens"])
        return out
    n = spec["new_tokens"]
    decode(min(n, 32))  # warm-up
    dec, pre = [], []
    for _ in range(spec["runs"]):
        ids, seconds = decode(n)
        dec.append((len(ids) - 1) / max(seconds, 1e-9))
        pre.append(len(spec["prefill_ids"]) / prefill())
    out.update(decode_tok_s=round(statistics.median(dec), 2), prefill_tok_s=round(statistics.median(pre), 2))
    return out


def worker_transformers(spec: dict[str, Any], t0: float) -> dict[str, Any]:
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

    def decode(n: int) -> tuple[list[int], float]:
        _, t1 = gen(1, True)  # transformers' time to the first token, subtracted
        ids, tn = gen(n, True)
        return ids, tn - t1

    def prefill() -> float:
        t = time.perf_counter()
        with torch.inference_mode():
            model(long, logits_to_keep=1)  # the last position's logits only, as the other libraries
        return time.perf_counter() - t

    return _measure(spec, t0, spec["dtype"], lambda n: gen(n, False)[0], decode, prefill)


def worker_llama_cpp(spec: dict[str, Any], t0: float) -> dict[str, Any]:
    from llama_cpp import Llama

    no_amx_repack()

    chat, long = spec["chat_ids"], spec["prefill_ids"]
    n_ctx = max(len(chat) + spec["new_tokens"], len(long)) + 16
    llm = Llama(model_path=spec["model_path"], n_ctx=n_ctx, n_batch=512, n_threads=spec["threads"],
                n_threads_batch=spec["threads"], verbose=False)
    eos = llm.token_eos()

    def tokens(n: int, stop_at_eos: bool) -> tuple[list[int], float]:
        """(ids, seconds from the first token to the last)."""
        llm.reset()  # no prefix reuse between runs
        ids: list[int] = []
        t_first = 0.0
        for tok in llm.generate(chat, top_k=1, top_p=1.0, min_p=0.0, temp=0.0, repeat_penalty=1.0):
            if not ids:
                t_first = time.perf_counter()
            ids.append(tok)
            if len(ids) >= n or (stop_at_eos and tok == eos):
                break
        return ids, time.perf_counter() - t_first

    def prefill() -> float:
        llm.reset()
        t = time.perf_counter()
        llm.eval(long)
        return time.perf_counter() - t

    return _measure(spec, t0, "Q (gguf)", lambda n: tokens(n, True)[0], lambda n: tokens(n, False), prefill)


def no_amx_repack() -> None:
    """Load models without llama.cpp's "extra buffer types" (the AMX weight repacking): on this machine's
    AMX-capable Xeon, a llama-cpp-python 0.3.36 built with the defaults segfaults in its first multi-token
    decode with them (bench/RESULTS.md). Without them llama.cpp runs its ordinary AVX-512 CPU kernels."""
    import llama_cpp
    import llama_cpp.llama

    if getattr(llama_cpp.llama_model_default_params, "_no_extra_bufts", False):
        return
    default = llama_cpp.llama_model_default_params

    def params():
        p = default()
        p.use_extra_bufts = False
        return p

    params._no_extra_bufts = True  # type: ignore[attr-defined]
    llama_cpp.llama_model_default_params = llama_cpp.llama.llama_cpp.llama_model_default_params = params


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not any(a == "--json" or a.startswith("--json=") for a in argv) and "--quick" not in argv \
            and "--worker" not in argv:
        argv += ["--json", str(ROOT / "bench" / "results" / "decode.json")]
    return bench.main(argv, modes=MODES, default_modes=DEFAULT_MODES, quick_modes=QUICK_MODES, baselines=BASELINES,
                      skip=skip, prog="bench/bench_decode.py")


if __name__ == "__main__":
    sys.exit(main())
