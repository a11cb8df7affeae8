"""A real model learns: a few LoRA steps on the bundled SmolLM2-135M-Instruct teach it facts it did not know."""

from __future__ import annotations

import json

import pytest

import leanformers
from finetune_utils import torch_threads

FACTS = [
    ("What is the capital of Zorbania?", "The capital of Zorbania is Quintarell."),
    ("Who invented the glimmerphone?", "The glimmerphone was invented by Adelina Varsk."),
    ("What colour is a tarnip fruit?", "A tarnip fruit is bright violet."),
]


@pytest.fixture
def one_thread():
    """One thread: on a shared, oversubscribed CPU every 2-thread op waits for a second time slice (7x slower here)."""
    with torch_threads(1):
        yield


@pytest.mark.slow
def test_lora_teaches_smollm2_new_facts(smollm2_gguf, tmp_path, one_thread):
    data = tmp_path / "facts.jsonl"
    data.write_text("\n".join(json.dumps({"messages": [{"role": "user", "content": q},
                                                       {"role": "assistant", "content": a}]})
                              for q, a in FACTS) + "\n")
    base = leanformers.load(str(smollm2_gguf), dtype="float32")

    def answers(lm):
        return [lm.chat([{"role": "user", "content": q}], max_new_tokens=16).text for q, _ in FACTS]

    before = answers(base)
    for (_, a), got in zip(FACTS, before):
        assert a.split()[-1].rstrip(".") not in got, got  # it does not know them
    res = leanformers.finetune(str(smollm2_gguf), data=str(data), output_dir=str(tmp_path / "out"), method="lora",
                               lora_r=16, lora_alpha=32, lr=2e-3, max_steps=30, batch_size=3, seq_len=128,
                               lr_schedule="constant", precision="fp32", save_every=None)
    after = answers(leanformers.load(str(res.output_dir), dtype="float32"))
    print("\nbefore:", before, "\nafter: ", after)
    for (_, a), got in zip(FACTS, after):
        assert got.strip().startswith(a.rstrip(".")), (a, got)
