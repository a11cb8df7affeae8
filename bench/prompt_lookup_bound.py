"""The most any prompt-lookup policy could gain on the benchmark's prompts, given verification costs.

    python bench/prompt_lookup_bound.py --threads 2

For each prompt of bench/prompts/<group>/ (chat template, greedy, up to 256 new tokens, EOS ends) the
greedy output is generated once. Then, at every position of the output, an *oracle* drafter looks at all
earlier occurrences of the text's last 1-3 tokens and takes the one whose continuation matches the true
output longest (the real drafter must guess: the most recent, or the one its last proposal came from).
A dynamic program then picks, per position, a plain step (cost 1) or a verification of T = 2..8 tokens
(cost costs.json's compiled_verify[kind][T] one-token steps, the measured compiled costs, as if a graph of every size
existed), advancing by the accepted drafts + 1, to minimize the total cost. tokens / cost is an upper
bound on prompt lookup's speedup over plain decoding of the same compiled mode: it ignores drafting and
Python time per round and knows the future. Eager float32 costs (EAGER_F32_COST, T <= 8) give the bound
of the eager mode.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent
sys.path.insert(0, str(ROOT))


def oracle_matches(seq: list[int], start: int, max_ngram: int = 3, max_k: int = 24) -> list[int]:
    """m[i] for i >= start: the longest prefix of seq[i:] an earlier n-gram continuation (n <= max_ngram) predicts."""
    out = []
    for i in range(start, len(seq)):
        best = 0
        for n in range(1, max_ngram + 1):
            if i - n < 0:
                break
            gram = seq[i - n:i]
            for j in range(0, i - n):  # an occurrence ending before the text's last n tokens
                if seq[j:j + n] != gram:
                    continue
                m, src = 0, j + n
                while m < max_k and i + m < len(seq):
                    # LZ77-style: a continuation running into the end of the known text repeats itself
                    tok = seq[src + m % (i - src)]
                    if tok != seq[i + m]:
                        break
                    m += 1
                best = max(best, m)
        out.append(best)
    return out


def min_cost(m: list[int], cost: dict[int, float]) -> float:
    """Least total cost (in one-token steps) to produce len(m) tokens: plain steps or verifications of T rows."""
    n = len(m)
    f = [0.0] * (n + 1)
    for i in range(n - 1, -1, -1):
        best = 1.0 + f[i + 1]
        for T, c in cost.items():
            if T < 2:
                continue
            adv = min(m[i], T - 1) + 1
            best = min(best, c + f[min(n, i + adv)])
        f[i] = best
    return f[0]


def interpolate(table: dict[int, float], rows: range) -> dict[int, float]:
    ts = sorted(table)
    out = {}
    for T in rows:
        lo = max(t for t in ts if t <= T)
        hi = min((t for t in ts if t >= T), default=lo)
        out[T] = table[lo] if hi == lo else table[lo] + (T - lo) * (table[hi] - table[lo]) / (hi - lo)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--group", default="grounded")
    ap.add_argument("--max-new-tokens", type=int, default=256)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    import leanformers
    from bench_speculative import gguf_path
    from leanformers.speculative import costs

    lm = leanformers.load(str(gguf_path()), dtype="float32", progress=False)
    tables = {f"compiled {k}": interpolate({int(t): c for t, c in v.items()}, range(1, 9))
              for k, v in costs.table()["compiled_verify"].items()}
    # measured eager float32 forwards (bench/results/verify_costs.md)
    eager = {2: 1.61, 3: 1.94, 4: 1.36, **costs.eager_float32_padding()[1]}
    tables["eager float32"] = eager
    rows = []
    total_tokens, total_cost = 0, {k: 0.0 for k in tables}
    for path in sorted((ROOT / "prompts" / args.group).glob("*.txt")):
        text = path.read_text()
        ids = lm.tokenizer.encode(lm.tokenizer.apply_chat_template([{"role": "user", "content": text}],
                                                                   add_generation_prompt=True), add_special_tokens=False)
        out = lm.generate(ids, max_new_tokens=args.max_new_tokens).token_ids
        seq = ids + out
        m = oracle_matches(seq, len(ids) + 1)  # the first new token comes from the prefill
        n = len(m)
        costs = {k: min_cost(m, t) for k, t in tables.items()}
        rows.append((path.stem, n, sum(1 for x in m if x) / max(n, 1), costs))
        total_tokens += n
        for k in tables:
            total_cost[k] += costs[k]
    names = list(tables)
    print(f"| prompt | decode tokens | positions with a match | " + " | ".join(f"bound, {k}" for k in names) + " |")
    print("|---|---:|---:|" + "---:|" * len(names))
    for name, n, frac, costs in rows:
        print(f"| {name} | {n} | {frac:.0%} | " + " | ".join(f"{n / costs[k]:.2f}x" for k in names) + " |")
    print(f"| all | {total_tokens} | | " + " | ".join(f"{total_tokens / total_cost[k]:.2f}x" for k in names) + " |")


if __name__ == "__main__":
    main()
