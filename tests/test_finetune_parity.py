"""Fine-tuning parity with the field: transformers' Trainer (full), peft + Trainer (LoRA), files both ways."""

from __future__ import annotations

import pytest
import torch

import leanformers
from finetune_utils import leanformers_rows, metrics, trainer_losses, write_text_data

COMMON = dict(lr=1e-3, weight_decay=0.01, warmup_steps=2, lr_schedule="cosine", seq_len=64, precision="fp32",
              seed=42, save_every=None)


@pytest.mark.parametrize("grad_accum", [1, 2])
def test_full_losses_equal_trainer(tiny_models, tmp_path, grad_accum):
    from transformers import AutoModelForCausalLM

    steps, bs = 10, 4
    data = write_text_data(tmp_path / "train.jsonl", steps * bs * grad_accum)
    res = leanformers.finetune(str(tiny_models["llama3"]), data=str(data), output_dir=str(tmp_path / "out"),
                               method="full", max_steps=steps, batch_size=bs, grad_accum=grad_accum, **COMMON)
    ours = [m["loss"] for m in metrics(res.output_dir)]
    rows, pad = leanformers_rows(tiny_models["llama3"], data, seq_len=64, batch_size=bs, grad_accum=grad_accum,
                                 seed=42, steps=steps)
    hf = AutoModelForCausalLM.from_pretrained(str(tiny_models["llama3"]), dtype=torch.float32)
    theirs = trainer_losses(hf, rows, pad, tmp_path / "hf", batch_size=bs, grad_accum=grad_accum, steps=steps,
                            lr=1e-3, weight_decay=0.01, warmup=2, schedule="cosine")
    assert len(ours) == len(theirs) == steps
    print("leanformers", ours, "\ntransformers", theirs)
    for a, b in zip(ours, theirs):
        assert abs(a - b) <= 1e-4 * abs(b), (ours, theirs)
    assert ours[-1] < ours[0] - 0.1  # it learns (lr 1e-3 on a tiny random model)


def test_lora_losses_equal_peft_trainer(tiny_models, tmp_path):
    from peft import LoraConfig, get_peft_model, set_peft_model_state_dict
    from transformers import AutoModelForCausalLM

    from leanformers.train.lora import adapter_state, apply_lora

    steps, bs, targets = 10, 4, ["q_proj", "v_proj", "down_proj"]
    data = write_text_data(tmp_path / "train.jsonl", steps * bs)
    res = leanformers.finetune(str(tiny_models["llama3"]), data=str(data), output_dir=str(tmp_path / "out"),
                               method="lora", lora_r=4, lora_alpha=8, target_modules=targets, max_steps=steps,
                               batch_size=bs, **COMMON)
    ours = [m["loss"] for m in metrics(res.output_dir)]
    # the initial adapter finetune() made (seeded), handed to peft
    lm = leanformers.load(str(tiny_models["llama3"]), dtype="float32")
    torch.manual_seed(42)
    apply_lora(lm.model, r=4, alpha=8, target_modules=targets)
    init = {k.removeprefix("base_model.model."): v for k, v in adapter_state(lm.model).items()}
    hf = AutoModelForCausalLM.from_pretrained(str(tiny_models["llama3"]), dtype=torch.float32)
    peft_model = get_peft_model(hf, LoraConfig(r=4, lora_alpha=8, target_modules=targets, lora_dropout=0.0,
                                               task_type="CAUSAL_LM"))
    result = set_peft_model_state_dict(peft_model, {f"base_model.model.{k}": v for k, v in init.items()})
    assert not result.unexpected_keys
    rows, pad = leanformers_rows(tiny_models["llama3"], data, seq_len=64, batch_size=bs, grad_accum=1, seed=42,
                                 steps=steps)
    theirs = trainer_losses(peft_model, rows, pad, tmp_path / "hf", batch_size=bs, grad_accum=1, steps=steps,
                            lr=1e-3, weight_decay=0.01, warmup=2, schedule="cosine")
    print("leanformers", ours, "\npeft", theirs)
    for a, b in zip(ours, theirs):
        assert abs(a - b) <= 1e-4 * abs(b), (ours, theirs)
    assert ours[-1] < ours[0]


def _trained_adapter(tiny_models, tmp_path, kind="llama3", **kw):
    data = write_text_data(tmp_path / "train.jsonl", 24)
    opts = dict(method="lora", lora_r=4, lora_alpha=16, max_steps=6, batch_size=4, lr=5e-3, seq_len=64,
                precision="fp32", save_every=None)
    opts.update(kw)
    return leanformers.finetune(str(tiny_models[kind]), data=str(data), output_dir=str(tmp_path / "out"), **opts)


@pytest.mark.parametrize("kind", ["llama3", "smollm2"])
def test_adapter_loads_in_peft_with_same_logits(tiny_models, tmp_path, kind):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    res = _trained_adapter(tiny_models, tmp_path, kind)
    lm = leanformers.load(str(res.output_dir), dtype="float32")  # the base via adapter_config.json
    ids = torch.randint(0, lm.config.vocab_size, (2, 17), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ours = lm.model(ids)
        base = leanformers.load(str(tiny_models[kind]), dtype="float32").model(ids)
        hf = AutoModelForCausalLM.from_pretrained(str(tiny_models[kind]), dtype=torch.float32)
        theirs = PeftModel.from_pretrained(hf, str(res.output_dir)).eval()(ids).logits
    assert (ours - base).abs().max() > 1e-3  # the adapter changes the model
    assert (ours - theirs).abs().max() <= 1e-5
    # load(base, adapter=DIR) is the same model
    again = leanformers.load(str(tiny_models[kind]), dtype="float32", adapter=str(res.output_dir))
    with torch.no_grad():
        assert torch.equal(again.model(ids), ours)


def test_merge_adapter_keeps_logits(tiny_models, tmp_path):
    res = _trained_adapter(tiny_models, tmp_path)
    lm = leanformers.load(str(tiny_models["llama3"]), dtype="float32", adapter=str(res.output_dir))
    ids = torch.randint(0, lm.config.vocab_size, (2, 17), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        before = lm.model(ids)
        lm.merge_adapter()
        after = lm.model(ids)
    assert not any("lora" in n for n, _ in lm.model.named_parameters())
    assert (before - after).abs().max() <= 1e-5
    out = lm.generate("hello", max_new_tokens=4)  # the merged model still generates
    assert out.token_ids


@pytest.mark.parametrize("kind,shard", [("llama3", False), ("smollm2", True), ("qwen2", False)])
def test_full_model_loads_in_transformers(tiny_models, tmp_path, kind, shard, monkeypatch):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if shard:
        monkeypatch.setattr("leanformers.train.export.DEFAULT_MAX_SHARD", 60_000)
    data = write_text_data(tmp_path / "train.jsonl", 16)
    res = leanformers.finetune(str(tiny_models[kind]), data=str(data), output_dir=str(tmp_path / "out"),
                               method="full", max_steps=3, batch_size=4, lr=1e-3, seq_len=64, precision="fp32",
                               save_every=None)
    out = res.output_dir
    assert (out / "model.safetensors.index.json").is_file() == shard
    ids = torch.randint(0, 300, (2, 13), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        ours = leanformers.load(str(out), dtype="float32").model(ids)
        theirs = AutoModelForCausalLM.from_pretrained(str(out), dtype=torch.float32)(ids).logits
        base = leanformers.load(str(tiny_models[kind]), dtype="float32").model(ids)
    assert (ours - base).abs().max() > 1e-4  # trained
    assert (ours - theirs).abs().max() <= 1e-5
    tok = AutoTokenizer.from_pretrained(str(out))
    assert tok.chat_template is not None


def test_full_model_from_gguf_base_loads_in_transformers(tiny_models, tmp_path):
    from gguf_utils import write_gguf_from_hf_dir
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf = write_gguf_from_hf_dir(tiny_models["llama3"], tmp_path / "tiny.gguf")
    data = write_text_data(tmp_path / "train.jsonl", 16)
    res = leanformers.finetune(str(gguf), data=str(data), output_dir=str(tmp_path / "out"), method="full",
                               max_steps=3, batch_size=4, lr=1e-3, seq_len=64, precision="fp32", save_every=None)
    out = res.output_dir
    assert (out / "config.json").is_file() and (out / "tokenizer.json").is_file()
    ids = torch.randint(0, 300, (2, 13), generator=torch.Generator().manual_seed(3))
    lm = leanformers.load(str(out), dtype="float32")
    with torch.no_grad():
        ours = lm.model(ids)
        theirs = AutoModelForCausalLM.from_pretrained(str(out), dtype=torch.float32)(ids).logits
    assert (ours - theirs).abs().max() <= 1e-5
    tok = AutoTokenizer.from_pretrained(str(out))
    gguf_lm = leanformers.load(str(gguf), dtype="float32")
    for text in ("Once upon a time there was", "def add(a, b):\n    return a + b", "Hello world! 你好"):
        assert tok(text)["input_ids"] == gguf_lm.tokenizer.encode(text) == lm.tokenizer.encode(text)
