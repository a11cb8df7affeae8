"""Exact resume: a run killed with SIGKILL after a checkpoint, resumed, gives bitwise the losses of a run never stopped."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

import leanformers
from finetune_utils import metrics, write_text_data

SCRIPT = r"""
import json, os, signal, sys
import torch
torch.set_num_threads(1)
import leanformers
model, data, out, kill_at, opts = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4]), json.loads(sys.argv[5])

def callback(row):
    if row["step"] == kill_at:
        os.kill(os.getpid(), signal.SIGKILL)   # no cleanup, no atexit: as hard as a crash

leanformers.finetune(model, data=data, output_dir=out, callback=callback, **opts)
"""


def _run(tmp: Path, model: Path, data: Path, out: Path, kill_at: int, opts: dict) -> int:
    src = str(Path(leanformers.__file__).parents[1])
    env = dict(os.environ, PYTHONPATH=src + os.pathsep + os.environ.get("PYTHONPATH", ""))
    script = tmp / "run.py"
    script.write_text(SCRIPT)
    p = subprocess.run([sys.executable, str(script), str(model), str(data), str(out), str(kill_at), json.dumps(opts)],
                       env=env, capture_output=True, text=True, timeout=600)
    if p.returncode not in (0, -9):
        raise AssertionError(p.stderr[-3000:])
    return p.returncode


@pytest.mark.parametrize("method,grad_accum", [("full", 1), ("full", 4), ("lora", 4)])
def test_resume_after_kill_is_bitwise_exact(tiny_models, tmp_path, method, grad_accum):
    steps = 10
    data = write_text_data(tmp_path / "train.jsonl", 2 * grad_accum * 4)  # 4 steps per epoch: crosses epochs
    opts = dict(method=method, max_steps=steps, batch_size=2, grad_accum=grad_accum, lr=2e-3, seq_len=48,
                precision="fp32", save_every=3, warmup_steps=2, weight_decay=0.01)
    if method == "lora":
        opts.update(lora_r=4, lora_dropout=0.1)  # dropout: the RNG state must be restored too
    model = tiny_models["llama3"]
    assert _run(tmp_path, model, data, tmp_path / "straight", 0, opts) == 0
    assert _run(tmp_path, model, data, tmp_path / "killed", 8, opts) == -9  # killed after checkpoint-6
    killed = tmp_path / "killed"
    assert sorted(p.name for p in killed.glob("checkpoint-*")) == ["checkpoint-3", "checkpoint-6"]
    assert [m["step"] for m in metrics(killed)] == list(range(1, 9))
    assert _run(tmp_path, model, data, killed, 0, dict(opts, resume=True)) == 0
    straight, resumed = metrics(tmp_path / "straight"), metrics(killed)
    assert [m["step"] for m in resumed] == list(range(1, steps + 1))  # every step once
    assert [m["loss"] for m in resumed] == [m["loss"] for m in straight]  # bitwise (JSON floats round-trip)
    assert [m["grad_norm"] for m in resumed] == [m["grad_norm"] for m in straight]
    assert [m["tokens"] for m in resumed] == [m["tokens"] for m in straight]
    name = "adapter_model.safetensors" if method == "lora" else "model.safetensors"
    assert (killed / name).read_bytes() == (tmp_path / "straight" / name).read_bytes()


def test_resume_skips_incomplete_and_refuses_corrupt(tiny_models, tmp_path):
    data = write_text_data(tmp_path / "train.jsonl", 16)
    opts = dict(method="lora", lora_r=2, max_steps=4, batch_size=2, seq_len=48, precision="fp32", save_every=2)
    out = tmp_path / "out"
    leanformers.finetune(str(tiny_models["smollm2"]), data=str(data), output_dir=str(out), **opts)
    # a save killed half-way leaves a temporary directory: never picked
    (out / ".checkpoint-5.tmp-123").mkdir()
    (out / ".checkpoint-5.tmp-123" / "trainable.safetensors").write_bytes(b"partial")
    res = leanformers.finetune(str(tiny_models["smollm2"]), data=str(data), output_dir=str(out), resume=True,
                               **dict(opts, max_steps=4))
    assert res.steps == 4 and res.checkpoint.name == "checkpoint-2"
    # a corrupt newest checkpoint is refused, naming the file
    (out / "checkpoint-2" / "trainer_state.json").write_text("{not json")
    with pytest.raises(leanformers.CheckpointError, match=r"checkpoint-2/trainer_state.json"):
        leanformers.finetune(str(tiny_models["smollm2"]), data=str(data), output_dir=str(out), resume=True, **opts)
    (out / "checkpoint-2" / "trainer_state.json").unlink()
    (out / "checkpoint-2").rename(out / "checkpoint-9")
    with pytest.raises(leanformers.CheckpointError, match=r"checkpoint-9/trainer_state.json: missing"):
        leanformers.finetune(str(tiny_models["smollm2"]), data=str(data), output_dir=str(out), resume=True, **opts)


def test_resume_refuses_other_options_and_data(tiny_models, tmp_path):
    data = write_text_data(tmp_path / "train.jsonl", 16)
    opts = dict(method="lora", lora_r=2, max_steps=4, batch_size=2, seq_len=48, precision="fp32", save_every=2)
    out = tmp_path / "out"
    leanformers.finetune(str(tiny_models["smollm2"]), data=str(data), output_dir=str(out), **opts)
    with pytest.raises(leanformers.InvalidArgumentError, match=r"trainer_state.json.*lora_r: 2 -> 8"):
        leanformers.finetune(str(tiny_models["smollm2"]), data=str(data), output_dir=str(out), resume=True,
                             **dict(opts, lora_r=8))
    write_text_data(data, 16, seed=5)  # same file name, other content
    with pytest.raises(leanformers.CheckpointError, match="other data"):
        leanformers.finetune(str(tiny_models["smollm2"]), data=str(data), output_dir=str(out), resume=True, **opts)
    # save_total_limit keeps only the newest
    out2 = tmp_path / "out2"
    leanformers.finetune(str(tiny_models["smollm2"]), data=str(data), output_dir=str(out2),
                         **dict(opts, max_steps=7, save_every=1, save_total_limit=2))
    assert sorted(p.name for p in out2.glob("checkpoint-*")) == ["checkpoint-5", "checkpoint-6"]
    state = json.loads((out2 / "checkpoint-6" / "trainer_state.json").read_text())
    assert state["step"] == 6 and state["epoch"] == 0 and state["step_in_epoch"] == 6
