"""Fine-tuning: data formats and loss masks, packing, memory savers, QLoRA, the loop's behaviours, bad input, CLI."""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import leanformers
from finetune_utils import metrics, write_mixed_data, write_text_data
from leanformers.cli import main
from leanformers.train import DataError, TrainingError
from leanformers.train.data import IGNORE, Example, build_dataset, collate, make_rows, read_records, tokenize_records
from leanformers.train.lora import apply_lora, lora_modules
from leanformers.train.loss import causal_lm_loss


@pytest.fixture(scope="module")
def tiny_lm(tiny_models):
    return leanformers.load(str(tiny_models["llama3"]), dtype="float32")


def _labelled(tok, ex) -> str:
    return tok.decode([t for t, lab in zip(ex.input_ids, ex.labels) if lab != IGNORE])


# ------------------------------------------------------------------------------------------ data
def test_formats_and_loss_masks(tiny_lm, tmp_path):
    tok = tiny_lm.tokenizer
    recs = read_records(write_mixed_data(tmp_path / "d.jsonl"))
    assert [r.kind for r in recs] == ["messages", "prompt/completion", "instruction/output", "instruction/output",
                                      "text"]
    chat, pc, alpaca, alpaca2, text = tokenize_records(recs, tok, seq_len=256)
    # chat: the rendered conversation, loss on both assistant turns (with their end-of-turn token) only
    assert tok.decode(chat.input_ids) == tok.apply_chat_template(recs[0].data["messages"])
    assert _labelled(tok, chat) == "hello world<|im_end|>\nonce upon a time<|im_end|>\n"
    # prompt/completion: loss on the completion + EOS
    assert tok.decode(pc.input_ids) == "def add(a, b):\n    return a + b<|im_end|>"
    assert _labelled(tok, pc) == "\n    return a + b<|im_end|>"
    # Alpaca through the chat template (the tiny tokenizer has one): instruction (+ input) as the user turn
    assert tok.decode(alpaca.input_ids).startswith("<|im_start|>user\nSay hello\n\nin French<|im_end|>")
    assert _labelled(tok, alpaca) == "Bonjour le monde.<|im_end|>\n"
    assert _labelled(tok, alpaca2) == "Hello world!<|im_end|>\n"
    assert text.labels == text.input_ids and tok.decode(text.input_ids).startswith("The quick brown fox")
    # without a chat template: the Alpaca prompt
    tok.chat_template, saved = None, tok.chat_template
    try:
        plain = tokenize_records([recs[2]], tok, seq_len=256)[0]
    finally:
        tok.chat_template = saved
    assert "### Instruction:\nSay hello\n\n### Input:\nin French\n\n### Response:\n" in tok.decode(plain.input_ids)
    assert _labelled(tok, plain) == "Bonjour le monde.<|im_end|>"


def test_txt_blocks_json_list_and_truncation(tiny_lm, tmp_path, caplog):
    tok = tiny_lm.tokenizer
    txt = tmp_path / "book.txt"
    txt.write_text("Once upon a time there was a little model. " * 40)
    blocks = tokenize_records(read_records(txt), tok, seq_len=32)
    n = len(tok.encode(txt.read_text()))
    assert [len(b.input_ids) for b in blocks[:-1]] == [32] * (len(blocks) - 1) and sum(len(b.input_ids) for b in blocks) == n
    js = tmp_path / "d.json"
    js.write_text(json.dumps([{"text": "hello world " * 30}, {"prompt": "a", "completion": "b"}]))
    with caplog.at_level(logging.WARNING):
        exs = tokenize_records(read_records(js), tok, seq_len=16, source=str(js))
    assert len(exs[0].input_ids) == 16
    assert "1 of 2 examples were longer than seq_len 16 and were truncated" in caplog.text
    with pytest.raises(DataError, match=r"d\.json\[0\]: the example has \d+ tokens, more than --seq-len 16"):
        tokenize_records(read_records(js), tok, seq_len=16, truncate=False)


def test_packing_isolates_examples(tiny_lm, tmp_path):
    """A packed row gives every example exactly the logits and loss it gets alone (segment mask + positions)."""
    data = write_text_data(tmp_path / "d.jsonl", 12, max_words=12)
    tok = tiny_lm.tokenizer
    exs = tokenize_records(read_records(data), tok, seq_len=64)
    packed = make_rows(exs, seq_len=64, packing=True, seed=0)
    assert len(packed) < len(exs) and max(len(r.input_ids) for r in packed) <= 64
    assert sum(r.n_tokens for r in packed) == sum(len(e.input_ids) for e in exs)
    row = packed[0]
    batch = collate([row], 0, pad_to=64)
    with torch.no_grad():
        logits = tiny_lm.model(batch["input_ids"], positions=batch["positions"], attention_mask=batch["segments"])
        start = 0
        for seg in range(1, max(row.segments) + 1):
            n = row.segments.count(seg)
            alone = tiny_lm.model(torch.tensor([row.input_ids[start:start + n]]))
            assert (logits[0, start:start + n] - alone[0]).abs().max() <= 1e-5
            start += n
        # the loss over packed rows equals the loss over one row per example
        unpacked = make_rows(exs, seq_len=64, packing=False, seed=0)
        lp = sum(causal_lm_loss(tiny_lm.model, collate([r], 0))[0] for r in packed)
        lu = sum(causal_lm_loss(tiny_lm.model, collate([r], 0))[0] for r in unpacked)
        np_ = sum(causal_lm_loss(tiny_lm.model, collate([r], 0))[1] for r in packed)
        nu = sum(causal_lm_loss(tiny_lm.model, collate([r], 0))[1] for r in unpacked)
    assert np_ == nu
    assert abs(float(lp) - float(lu)) <= 1e-5 * abs(float(lu))


def test_packing_fills_rows_best_fit_decreasing():
    """Examples of lengths spread evenly up to seq_len fill packed rows to within a few percent (next fit,
    in order, left them about 75% full); each example lands whole in one row, once; seeded, deterministic."""
    import random

    rng = random.Random(0)
    exs = [Example(list(range(1, n + 1)), list(range(1, n + 1))) for n in (rng.randint(8, 64) for _ in range(400))]
    rows = make_rows(exs, seq_len=64, packing=True, seed=3)
    fill = sum(len(e.input_ids) for e in exs) / (64 * len(rows))
    assert fill >= 0.95, fill
    assert max(len(r.input_ids) for r in rows) <= 64
    pieces = sorted(len(r.input_ids[i:i + r.segments.count(s)]) for r in rows
                    for s, i in ((s, r.segments.index(s)) for s in set(r.segments)))
    assert pieces == sorted(len(e.input_ids) for e in exs)  # whole examples, each once
    for r in rows:  # positions restart at each example, labels never cross into the next one
        for s in set(r.segments):
            i, n = r.segments.index(s), r.segments.count(s)
            assert r.positions[i:i + n] == list(range(n)) and r.labels[i] == IGNORE
    again = make_rows(exs, seq_len=64, packing=True, seed=3)
    assert [r.input_ids for r in again] == [r.input_ids for r in rows]


def test_order_is_deterministic_and_ranks_are_disjoint(tiny_lm, tmp_path):
    data = write_text_data(tmp_path / "d.jsonl", 40)
    kw = dict(seq_len=64, packing=False, batch_size=2, grad_accum=2)
    a = build_dataset(data, tiny_lm.tokenizer, seed=1, **kw)
    b = build_dataset(data, tiny_lm.tokenizer, seed=1, **kw)
    c = build_dataset(data, tiny_lm.tokenizer, seed=2, **kw)
    assert a.order(0) == b.order(0) != c.order(0) and a.order(0) != a.order(1)
    assert sorted(a.order(0)) == list(range(40))
    for x, y in zip(a.step_batches(1, 3), b.step_batches(1, 3)):
        assert all(torch.equal(x[k], y[k]) for k in x)
    # two ranks split every global batch without overlap (room for torchrun)
    seen = []
    for step in range(a.steps_per_epoch // 2):
        for rank in (0, 1):
            for mb in a.step_batches(0, step, rank=rank, world_size=2):
                seen += [tuple(r[r != a.pad_id].tolist()) for r in mb["input_ids"]]
    assert len(seen) == len(set(seen)) == 40


@pytest.mark.parametrize("kind", ["llama3", "smollm2"])  # untied and tied (embedding = lm_head) heads
def test_chunked_loss_equals_full_logits_loss(tiny_models, tmp_path, kind):
    """Chunked cross-entropy (loss and every gradient) equals the plain full-logits computation."""
    from leanformers.train import loss as loss_mod

    tiny_lm = leanformers.load(str(tiny_models[kind]), dtype="float32")
    model = tiny_lm.model
    data = write_text_data(tmp_path / "d.jsonl", 6)
    ds = build_dataset(data, tiny_lm.tokenizer, seq_len=64, packing=True, batch_size=4, grad_accum=1, seed=0)
    batch = collate(ds.rows[:4], ds.pad_id)
    for p in model.parameters():
        p.requires_grad_(True)
    try:
        old = loss_mod.CHUNK_ELEMENTS
        loss_mod.CHUNK_ELEMENTS = 7 * tiny_lm.config.vocab_size  # 7 rows per chunk: many chunks
        s, n = causal_lm_loss(model, batch)
        loss_mod.CHUNK_ELEMENTS = old
        s.backward()
        ours = {k: p.grad.clone() for k, p in model.named_parameters()}
        model.zero_grad()
        logits = model(batch["input_ids"], positions=batch["positions"], attention_mask=batch["segments"])
        ref = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]),
                                                batch["labels"][:, 1:].reshape(-1), reduction="sum")
        ref.backward()
        assert abs(float(s.detach()) - float(ref.detach())) <= 1e-5 * float(ref.detach())
        for k, p in model.named_parameters():
            assert (ours[k] - p.grad).abs().max() <= 1e-5 * max(1.0, p.grad.abs().max()), k
    finally:
        loss_mod.CHUNK_ELEMENTS = old
        model.zero_grad(set_to_none=True)
        for p in model.parameters():
            p.requires_grad_(False)


@pytest.mark.parametrize("method,precision", [("full", "bf16-mixed"), ("full", "bf16-true"), ("lora", "bf16-mixed"),
                                              ("lora", "bf16-true")])
def test_precisions_train(tiny_models, tmp_path, method, precision):
    data = write_text_data(tmp_path / "d.jsonl", 16)
    res = leanformers.finetune(str(tiny_models["llama3"]), data=str(data), output_dir=str(tmp_path / "out"),
                               method=method, precision=precision, max_steps=6, batch_size=4, seq_len=48,
                               lr=5e-3 if method == "lora" else 1e-3, save_every=None)
    losses = [m["loss"] for m in metrics(res.output_dir)]
    assert all(map(lambda x: x == x, losses)) and losses[-1] < losses[0]
    if method == "full":
        cfg = json.loads((res.output_dir / "config.json").read_text())
        assert cfg["torch_dtype"] == ("bfloat16" if precision == "bf16-true" else "float32")


# ------------------------------------------------------------------------------------------ memory savers
_PEAK = r"""
import sys, torch
sys.path.insert(0, sys.argv[1])
torch.set_num_threads(1)
from leanformers.config import ModelConfig
from leanformers.models.llama import build
from leanformers.train.loss import causal_lm_loss, set_gradient_checkpointing
torch.manual_seed(0)
cfg = ModelConfig(vocab_size=512, hidden_size=256, intermediate_size=1024, num_hidden_layers=16,
                  num_attention_heads=4, max_position_embeddings=1024)
model = build(cfg)
set_gradient_checkpointing(model, sys.argv[2] == "1")
model.train()
B, T = 8, 512
ids = torch.randint(0, 512, (B, T))
batch = {"input_ids": ids, "labels": ids, "segments": torch.ones_like(ids), "positions": torch.arange(T).expand(B, T)}
def status(key):  # kB; ru_maxrss would carry the parent's (pytest's) peak over fork and exec
    return next(int(line.split()[1]) for line in open("/proc/self/status") if line.startswith(key))
with open("/proc/self/clear_refs", "w") as f:
    f.write("5")  # reset the peak (VmHWM) to the current RSS
before = status("VmRSS:")
loss, n = causal_lm_loss(model, batch)
(loss / n).backward()
print((status("VmHWM:") - before) / 1024)
"""


def test_gradient_checkpointing_same_gradients_less_memory(tiny_models, tmp_path):
    lm = leanformers.load(str(tiny_models["mistral"]), dtype="float32")  # sliding window: masks go through too
    model = lm.model
    model.train()
    for p in model.parameters():
        p.requires_grad_(True)
    data = write_text_data(tmp_path / "d.jsonl", 8)
    ds = build_dataset(data, lm.tokenizer, seq_len=64, packing=True, batch_size=4, grad_accum=1, seed=0)
    batch = collate(ds.rows[:4], ds.pad_id)
    grads = []
    for flag in (False, True):
        model.gradient_checkpointing = flag
        model.zero_grad()
        s, n = causal_lm_loss(model, batch)
        (s / n).backward()
        grads.append({k: p.grad.clone() for k, p in model.named_parameters()})
    for k in grads[0]:
        assert (grads[0][k] - grads[1][k]).abs().max() <= 1e-6, k
    # peak memory of one training step, measured in fresh processes (16 layers, 8 x 512 tokens; with 8 the
    # layer-independent part (embeddings, loss chunks) kept the ratio at 0.66-0.73). Since RMSNorm and the
    # SwiGLU product keep less for backward (models/ops.py) the run without checkpointing is leaner too:
    # 2019 vs 1473 MiB (0.73) where it was 0.6-0.65
    script = tmp_path / "peak.py"
    script.write_text(_PEAK)
    src = str(Path(leanformers.__file__).parents[1])
    peaks = [float(subprocess.run([sys.executable, str(script), src, flag], capture_output=True, text=True,
                                  check=True, timeout=600).stdout.split()[-1]) for flag in ("0", "1")]
    print(f"\npeak RSS growth of one step: {peaks[0]:.0f} MiB without, {peaks[1]:.0f} MiB with gradient checkpointing")
    assert peaks[1] < 0.8 * peaks[0]


# a checkpointed fp32 run of a small Llama (activations in the MiB range) that prints its peak RSS
_ALLOC_PEAK = r"""import logging, sys, torch
sys.path.insert(0, sys.argv[1])
torch.set_num_threads(1)
logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s")
from pathlib import Path
from leanformers.config import ModelConfig
from leanformers.models.llama import build
from leanformers.train.args import FinetuneArgs
from leanformers.train.data import Dataset, Example, make_rows
from leanformers.train.loop import TrainLoop
from leanformers.train.loss import causal_lm_loss, set_gradient_checkpointing
from leanformers.train.optim import Precision
torch.manual_seed(0)
cfg = ModelConfig(vocab_size=2048, hidden_size=256, intermediate_size=1024, num_hidden_layers=8,
                  num_attention_heads=4, max_position_embeddings=1024)
model = build(cfg)
for p in model.parameters():
    p.requires_grad_(True)
set_gradient_checkpointing(model, True)
g = torch.Generator().manual_seed(0)
exs = [Example(ids, ids) for ids in (torch.randint(0, 2048, (int(n),), generator=g).tolist()
                                     for n in torch.randint(64, 512, (64,), generator=g))]
ds = Dataset(make_rows(exs, seq_len=512, packing=True, seed=0), 8, 1, 0, 0)
out = Path(sys.argv[2]); out.mkdir(exist_ok=True)
args = FinetuneArgs(model="-", data="-", output_dir=str(out), method="full", max_steps=4, batch_size=8, lr=1e-4,
                    save_every=None, seq_len=512, progress=False, grad_checkpointing=True).check()
TrainLoop(model, causal_lm_loss, ds, args, Precision("fp32", torch.device("cpu")), out).run()
print(next(int(l.split()[1]) for l in open("/proc/self/status") if l.startswith("VmHWM:")) / 1024)
"""


@pytest.mark.slow
def test_memory_first_runs_give_freed_memory_back(tmp_path):
    """Gradient-checkpointed (and QLoRA) CPU runs fix malloc's mmap threshold for the run (train/allocator.py):
    peak RSS against the same run under glibc's settled default (MALLOC_MMAP_THRESHOLD_=32 MiB, which the
    library leaves alone as the user's choice). Measured 604 vs 1143 MiB."""
    script = tmp_path / "peak.py"
    script.write_text(_ALLOC_PEAK)
    src = str(Path(leanformers.__file__).parents[1])
    runs = {}
    for name, extra in (("library", {}), ("glibc", {"MALLOC_MMAP_THRESHOLD_": str(32 * 1024 * 1024)})):
        env = {k: v for k, v in os.environ.items() if k != "MALLOC_MMAP_THRESHOLD_"} | extra
        p = subprocess.run([sys.executable, str(script), src, str(tmp_path / name)], capture_output=True, text=True,
                           check=True, timeout=600, env=env)
        runs[name] = (float(p.stdout.split()[-1]), "mmap threshold fixed at 64 KiB" in p.stderr)
    print(f"\npeak RSS of a checkpointed run: {runs['library'][0]:.0f} MiB, under glibc's default rule "
          f"{runs['glibc'][0]:.0f} MiB")
    assert runs["library"][1] and not runs["glibc"][1]  # logged when set; the user's setting left alone
    assert runs["library"][0] < 0.75 * runs["glibc"][0]

# ------------------------------------------------------------------------------------------ QLoRA
@pytest.mark.parametrize("scheme", ["int8", "int4"])
def test_qlora_gradients_match_dense_reference(tiny_models, scheme):
    """LoRA over a frozen quantized base: gradients equal those through the dequantized (dense) weights."""
    from leanformers.train.lora import dense_weight

    lm = leanformers.load(str(tiny_models["llama3"]), quantize=scheme)
    torch.manual_seed(0)
    apply_lora(lm.model, r=4, alpha=8)
    for m in lora_modules(lm.model).values():
        torch.nn.init.normal_(m.lora_B.weight, std=0.02)
    x = torch.randn(3, 5, 64, dtype=torch.bfloat16)
    mod = lm.model.model.layers[0].self_attn.q_proj
    xq = x.clone().requires_grad_(True)
    mod(xq).float().square().sum().backward()
    w = dense_weight(mod.base_layer, torch.float32)
    xr = x.float().clone().requires_grad_(True)
    ref = torch.nn.functional.linear(xr, w) + mod.lora_B(mod.lora_A(xr)) * mod.scaling
    ref.square().sum().backward()
    rel = (xq.grad.float() - xr.grad).abs().max() / xr.grad.abs().max()
    assert rel < 3e-2, rel  # bfloat16 activations in the quantized path


@pytest.mark.parametrize("scheme", ["int8", "int4"])
@pytest.mark.parametrize("rows", [3, 40])  # the int8 layer takes its kernel below 16 rows, a matmul above
def test_gradients_pass_through_frozen_quantized_linears(scheme, rows):
    """A quantized linear that is not adapted (QLoRA's lm_head, layers outside --target-modules) passes the
    gradient to its input: dy @ W with the dequantized weight, whatever the row count (the kernels have no
    derivative; a loss chunk of fewer than 16 rows used to fail in backward)."""
    from leanformers.quantize import Int4Linear, Int8Linear

    torch.manual_seed(0)
    q = (Int8Linear if scheme == "int8" else Int4Linear).from_float(torch.randn(96, 128), dtype=torch.bfloat16)
    x = torch.randn(rows, 128, dtype=torch.bfloat16, requires_grad=True)
    y = q(x)
    with torch.no_grad():
        assert torch.equal(y, q(x))  # the forward is the inference path's
    g = torch.randn_like(y)
    (gx,) = torch.autograd.grad(y, x, g)
    ref = g.float() @ q.dequantize_weight(torch.float32)
    assert gx.dtype == x.dtype and (gx.float() - ref).abs().max() <= 1e-2 * ref.abs().max()


def test_qlora_trains_and_adapter_loads(tiny_models, tmp_path):
    data = write_text_data(tmp_path / "d.jsonl", 16)
    res = leanformers.finetune(str(tiny_models["llama3"]), data=str(data), output_dir=str(tmp_path / "out"),
                               method="qlora", lora_r=4, max_steps=8, batch_size=4, lr=1e-2, seq_len=48,
                               save_every=None)
    losses = [m["loss"] for m in metrics(res.output_dir)]
    assert losses[-1] < losses[0]
    cfg = json.loads((res.output_dir / "adapter_config.json").read_text())
    assert cfg["r"] == 4 and "q_proj" in cfg["target_modules"] and "lm_head" not in cfg["target_modules"]
    lm = leanformers.load(str(tiny_models["llama3"]), quantize="int4", adapter=str(res.output_dir))
    assert len(lora_modules(lm.model)) == 14  # 7 linears x 2 layers
    with pytest.raises(leanformers.InvalidArgumentError, match="quantized base"):
        lm.merge_adapter()


# ------------------------------------------------------------------------------------------ loop
def test_metrics_eval_tensorboard(tiny_models, tmp_path):
    pytest.importorskip("tensorboard")
    data = write_text_data(tmp_path / "d.jsonl", 24)
    ev = write_text_data(tmp_path / "e.jsonl", 6, seed=9)
    res = leanformers.finetune(str(tiny_models["smollm2"]), data=str(data), eval_data=str(ev),
                               output_dir=str(tmp_path / "out"), method="full", max_steps=5, batch_size=4,
                               eval_every=2, seq_len=64, lr=1e-3, log="tensorboard", packing=True,
                               grad_checkpointing=True, save_every=None)
    rows = metrics(res.output_dir)
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5]
    for r in rows:
        assert {"step", "epoch", "loss", "lr", "grad_norm", "tokens", "tokens_per_s"} <= set(r)
    assert [("eval_loss" in r) for r in rows] == [False, True, False, True, True]  # every 2 steps and at the end
    assert res.eval_loss == rows[-1]["eval_loss"] and res.loss == rows[-1]["loss"]
    assert rows[-1]["tokens"] == res.tokens > rows[0]["tokens"]
    assert list((res.output_dir / "runs").glob("events.out.tfevents.*"))


def test_nan_loss_stops_and_keeps_last_checkpoint(tiny_models, tmp_path, monkeypatch):
    from leanformers.train import api

    calls = {"n": 0}
    real = api.causal_lm_loss

    def poisoned(model, batch):
        calls["n"] += 1
        s, n = real(model, batch)
        return (s * float("nan") if calls["n"] == 5 else s), n

    monkeypatch.setattr(api, "causal_lm_loss", poisoned)
    data = write_text_data(tmp_path / "d.jsonl", 24)
    out = tmp_path / "out"
    with pytest.raises(TrainingError, match=r"loss is nan at step 5 .*last good checkpoint is .*checkpoint-4"):
        leanformers.finetune(str(tiny_models["smollm2"]), data=str(data), output_dir=str(out), method="lora",
                             max_steps=8, batch_size=2, seq_len=48, save_every=2)
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-2", "checkpoint-4"]
    assert [m["step"] for m in metrics(out)] == [1, 2, 3, 4]


def test_ctrl_c_saves_and_prints_resume_command(tiny_models, tmp_path, capsys):
    data = write_text_data(tmp_path / "d.jsonl", 24)
    out = tmp_path / "out"

    def interrupt(row):
        if row["step"] == 3:
            os.kill(os.getpid(), signal.SIGINT)

    opts = dict(method="lora", lora_r=2, max_steps=8, batch_size=2, seq_len=48, save_every=None)
    with pytest.raises(KeyboardInterrupt):
        leanformers.finetune(str(tiny_models["smollm2"]), data=str(data), output_dir=str(out), callback=interrupt,
                             **opts)
    err = capsys.readouterr().err
    assert (out / "checkpoint-3" / "trainer_state.json").is_file()
    assert "Resume with: leanformers finetune -m" in err and "--lora-r 2" in err and err.rstrip().endswith("--resume")
    res = leanformers.finetune(str(tiny_models["smollm2"]), data=str(data), output_dir=str(out), resume=True, **opts)
    assert res.steps == 8 and [m["step"] for m in metrics(out)] == list(range(1, 9))


# ------------------------------------------------------------------------------------------ bad input
def _ft(tiny_models, tmp_path, data, **kw):
    opts = dict(method="lora", max_steps=2, batch_size=2, seq_len=48, save_every=None)
    opts.update(kw)
    return leanformers.finetune(str(tiny_models["smollm2"]), data=str(data), output_dir=str(tmp_path / "out"), **opts)


@pytest.mark.parametrize("lines,message", [
    (['{"text": "a b"}', '{"text": "ok"', '{"text": "c"}'], r"d\.jsonl:2: not valid JSON"),
    (['{"text": "a b"}', '{"prompt": "only a prompt"}'], r"d\.jsonl:2: missing field 'completion'"),
    (['{"messages": [{"role": "user", "content": "hi"}]}'], r"d\.jsonl:1: no assistant message"),
    (['{"question": "?", "answer": "!"}'], r"d\.jsonl:1: unknown example format with keys \['answer', 'question'\]"),
    (['{"text": 5}'], r"d\.jsonl:1: field 'text' must be a string, got int"),
    (['', '   '], r"d\.jsonl: the dataset is empty"),
])
def test_bad_data_names_file_and_line(tiny_models, tmp_path, lines, message):
    data = tmp_path / "d.jsonl"
    data.write_text("\n".join(lines) + "\n")
    with pytest.raises(DataError, match=message):  # the data is checked before the model is looked up
        leanformers.finetune("no/such-model", data=str(data), output_dir=str(tmp_path / "out"))


def test_bad_options_are_refused_before_loading(tmp_path):
    data = write_text_data(tmp_path / "d.jsonl", 4)
    missing = "no/such-model"  # options are checked before any model is looked up
    for kw, message in [
        (dict(lora_r=0), r"lora_r \(--lora-r\) must be a positive integer, got 0"),
        (dict(method="adapter"), r"method \(--method\) must be one of full, lora, qlora"),
        (dict(precision="fp8"), r"precision \(--precision\)"),
        (dict(precision="fp16-mixed"), r"fp16-mixed .* needs a CUDA device.*bf16-mixed"),
        (dict(lr=-1.0), r"lr \(--lr\) must be a number > 0"),
        (dict(lora_dropout=1.0), r"lora_dropout \(--lora-dropout\)"),
        (dict(quantize="int4"), r"use method='qlora'"),
        (dict(eval_every=5), r"needs eval_data"),
        (dict(resume=True, overwrite=True), r"exclude each other"),
        (dict(bogus=1), r"unknown option\(s\) \['bogus'\]"),
    ]:
        with pytest.raises(leanformers.InvalidArgumentError, match=message):
            leanformers.finetune(missing, data=str(data), output_dir=str(tmp_path / "out"), **kw)


def test_unknown_target_module_lists_names(tiny_models, tmp_path):
    data = write_text_data(tmp_path / "d.jsonl", 4)
    with pytest.raises(leanformers.InvalidArgumentError,
                       match=r"no linear module named 'qkv'; available: all-linear, down_proj, gate_proj, k_proj, "
                             r"lm_head, o_proj, q_proj, up_proj, v_proj"):
        _ft(tiny_models, tmp_path, data, target_modules=["qkv"])


def test_previous_run_refused_then_overwritten(tiny_models, tmp_path):
    data = write_text_data(tmp_path / "d.jsonl", 8)
    _ft(tiny_models, tmp_path, data)
    out = tmp_path / "out"
    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    with pytest.raises(leanformers.InvalidArgumentError, match=r"out: holds a previous run .*--resume.*--overwrite"):
        _ft(tiny_models, tmp_path, data, lr=1e-3)
    assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file()} == before  # nothing touched
    _ft(tiny_models, tmp_path, data, lr=1e-3, overwrite=True)
    assert json.loads((out / "finetune_args.json").read_text())["lr"] == 1e-3


def test_bad_adapter_directory(tiny_models, tmp_path):
    d = tmp_path / "adapter"
    d.mkdir()
    (d / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 4, "lora_alpha": 8,
                                                       "target_modules": ["q_proj"]}))
    with pytest.raises(leanformers.CheckpointError, match="no base_model_name_or_path"):
        leanformers.load(str(d))
    with pytest.raises(leanformers.CheckpointError, match=r"adapter_model.safetensors is missing"):
        leanformers.load(str(tiny_models["smollm2"]), adapter=str(d))
    (d / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 4, "lora_alpha": 8,
                                                       "target_modules": ["wq"]}))
    (d / "adapter_model.safetensors").write_bytes(b"junk")
    with pytest.raises(leanformers.CheckpointError, match=r"adapter_model.safetensors: cannot read"):
        leanformers.load(str(tiny_models["smollm2"]), adapter=str(d))


# ------------------------------------------------------------------------------------------ CLI
def test_cli_finetune_and_generate_with_adapter(tiny_models, tmp_path, capsys):
    data = write_mixed_data(tmp_path / "d.jsonl")
    out = tmp_path / "out"
    base = str(tiny_models["smollm2"])
    rc = main(["finetune", "-m", base, "--data", str(data), "--output", str(out), "--max-steps", "3",
               "--batch-size", "2", "--seq-len", "64", "--target-modules", "q_proj,v_proj", "--lora-r", "4",
               "--packing", "--lr", "1e-2"])
    assert rc == 0
    assert "saved the LoRA adapter to" in capsys.readouterr().err
    assert json.loads((out / "adapter_config.json").read_text())["target_modules"] == ["q_proj", "v_proj"]
    assert main(["generate", "-m", base, "--adapter", str(out), "hello", "--max-new-tokens", "3", "--no-stream",
                 "--ignore-eos"]) == 0
    assert capsys.readouterr().out.strip()
    rc = main(["finetune", "-m", base, "--data", str(data), "--output", str(out), "--lora-r", "0"])
    assert rc == 1 and "leanformers: error: lora_r (--lora-r) must be a positive integer, got 0" in capsys.readouterr().err
    rc = main(["finetune", "-m", base, "--data", str(data), "--output", str(out)])
    assert rc == 1 and "holds a previous run" in capsys.readouterr().err


def test_cli_ctrl_c_in_a_subprocess(tiny_models, tmp_path):
    data = write_text_data(tmp_path / "d.jsonl", 64)
    out = tmp_path / "out"
    src = str(Path(leanformers.__file__).parents[1])
    env = dict(os.environ, PYTHONPATH=src)
    cmd = [sys.executable, "-m", "leanformers.cli", "finetune", "-m", str(tiny_models["smollm2"]), "--data", str(data),
           "--output", str(out), "--max-steps", "100000", "--batch-size", "2", "--seq-len", "48", "--save-every", "100000"]
    p = subprocess.Popen(cmd, env=env, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 300
    while time.time() < deadline and not ((out / "metrics.jsonl").is_file() and (out / "metrics.jsonl").read_text()):
        time.sleep(0.2)
    p.send_signal(signal.SIGINT)
    _, err = p.communicate(timeout=300)
    assert p.returncode == 130, err
    ckpts = list(out.glob("checkpoint-*"))
    assert len(ckpts) == 1 and (ckpts[0] / "trainer_state.json").is_file()
    assert "Resume with: leanformers finetune" in err and "--resume" in err
