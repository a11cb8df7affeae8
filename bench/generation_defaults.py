"""Why models without generation_config.json decode with repetition_penalty=1.1 by default.

    python bench/generation_defaults.py          # bundled SmolLM2-135M-Instruct, 10 ordinary chat questions

Each configuration answers the same 10 questions (greedy, up to 256 new tokens); an answer "loops" when an
8-token sequence occurs twice in it. Prints one line per configuration: seconds, tokens, answers that ended
on their own (EOS), answers that looped.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "src"))
import leanformers  # noqa: E402

QUESTIONS = ["What is the capital of France?", "How do I make a cup of tea?", "What is photosynthesis?",
             "Write a haiku about the sea.", "Why is the sky blue?", "Give me three tips for learning Python.",
             "Who wrote Romeo and Juliet?", "What is 12 times 7?", "Explain what a neural network is.",
             "What should I cook for dinner tonight?"]
CONFIGS = {"greedy": dict(repetition_penalty=None), "greedy + repetition_penalty 1.1": dict(repetition_penalty=1.1),
           "greedy + repetition_penalty 1.2": dict(repetition_penalty=1.2)}


def loops(ids: list[int], n: int = 8) -> bool:
    grams = [tuple(ids[i:i + n]) for i in range(len(ids) - n + 1)]
    return len(grams) != len(set(grams))


def main() -> None:
    torch.set_num_threads(1)
    lm = leanformers.load("smollm2-135m-instruct", progress=False)
    print("| configuration | seconds | new tokens | ended with EOS | looping |\n|---|---:|---:|---:|---:|")
    for name, kw in CONFIGS.items():
        t, tokens, ended, looping = time.time(), 0, 0, 0
        for q in QUESTIONS:
            r = lm.chat([{"role": "user", "content": q}], max_new_tokens=256, temperature=0.0, **kw)
            tokens += len(r.token_ids)
            ended += r.finish_reason == "stop"
            looping += loops(r.token_ids)
        print(f"| {name} | {time.time() - t:.0f} | {tokens} | {ended}/10 | {looping}/10 |", flush=True)


if __name__ == "__main__":
    main()
