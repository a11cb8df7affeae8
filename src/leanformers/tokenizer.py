"""Tokenizers from a Hugging Face model directory or from GGUF metadata, plus chat templates.

`Tokenizer` wraps a `tokenizers.Tokenizer` and reproduces what transformers' `AutoTokenizer` does with
the same files: `encode` (special tokens included), `decode` and `apply_chat_template`.
GGUF files carry no `tokenizer.json`; their vocabulary is rebuilt as a byte-level BPE (`gpt2` kind,
split regexes chosen from `tokenizer.ggml.pre` as llama.cpp does) or a sentencepiece-style BPE with
byte fallback (`llama` kind, merges derived from the scores when the file lists none).

Where sources disagree we follow transformers 5, except for GGUF pre types transformers does not know
(e.g. `smollm`), where llama.cpp's split is used. In particular: a directory's BOS/EOS come from the
post-processor in tokenizer.json (transformers ignores tokenizer_config's add_bos_token/add_eos_token
then); the `llama` kind prepends "▁" to the start of the text only, not after special tokens.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import jinja2
from tokenizers import AddedToken, Regex, decoders, models, pre_tokenizers, processors
from tokenizers import Tokenizer as BackendTokenizer

from . import templates
from .errors import InvalidArgumentError, LeanformersError, TokenizerError
from .files import file_size, read_bytes, read_json

if TYPE_CHECKING:
    from .checkpoint.gguf import GGUFFile

logger = logging.getLogger(__name__)

# --- GGUF split regexes, by `tokenizer.ggml.pre` (the patterns llama.cpp applies one after another) ---
_GPT2 = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"
_LLAMA3 = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
           r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_QWEN2 = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
          r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_TEKKEN = (r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+"
           r"|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*"
           r"|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_GPT4O = (r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+(?i:'s|'t|'re|'ve|'m|'ll|'d)?"
          r"|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*(?i:'s|'t|'re|'ve|'m|'ll|'d)?"
          r"|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_SPLITS: dict[str, tuple[str, ...]] = {
    **dict.fromkeys(("default", "gpt-2", "gpt2", "mpt", "olmo", "jais", "trillion"), (_GPT2,)),
    **dict.fromkeys(("smollm", "starcoder", "refact", "command-r", "codeshell", "exaone", "minerva-7b"),
                    (r"\p{N}", _GPT2)),
    **dict.fromkeys(("llama3", "llama-v3", "llama-bpe", "falcon3", "falcon-h1", "pixtral", "dbrx",
                     "smaug-bpe", "lfm2", "midm-2.0"), (_LLAMA3,)),
    **dict.fromkeys(("qwen2", "deepseek-r1-qwen", "stablelm2", "megrez", "hunyuan"), (_QWEN2,)),
    "tekken": (_TEKKEN,),
    **dict.fromkeys(("gpt-4o", "llama4"), (_GPT4O,)),
}
_CONTROL, _USER_DEFINED = 3, 4  # GGUF token types
_CLEANUPS = ((" .", "."), (" ?", "?"), (" !", "!"), (" ,", ","), (" ' ", "'"), (" n't", "n't"),
             (" 'm", "'m"), (" 's", "'s"), (" 've", "'ve"), (" 're", "'re"))


class Tokenizer:
    """A `tokenizers.Tokenizer` plus the special tokens and chat template(s) of one model."""

    def __init__(self, backend: BackendTokenizer, *, bos_token: str | None = None, eos_token: str | None = None,
                 pad_token: str | None = None, unk_token: str | None = None, extra_eos_ids: Sequence[int] = (),
                 chat_template: str | None = None, named_templates: dict[str, str] | None = None,
                 clean_up_tokenization_spaces: bool = False, source: str = "<memory>",
                 template_source: str | None = None):
        self.backend = backend
        self.source = source
        self.template_source = template_source or source  # the file the chat template(s) came from
        self.bos_token, self.eos_token, self.pad_token, self.unk_token = bos_token, eos_token, pad_token, unk_token
        self.bos_token_id = self.token_to_id(bos_token) if bos_token is not None else None
        self.pad_token_id = self.token_to_id(pad_token) if pad_token is not None else None
        eos = [self.token_to_id(eos_token)] if eos_token is not None else []
        self.eos_token_ids: list[int] = list(dict.fromkeys(i for i in [*eos, *extra_eos_ids] if i is not None))
        self.eos_token_id: int | None = self.eos_token_ids[0] if self.eos_token_ids else None
        self.chat_template = chat_template
        self.named_templates = dict(named_templates or {})
        self._clean_up = clean_up_tokenization_spaces and not isinstance(backend.model, models.BPE)
        self._compiled: dict[str, jinja2.Template] = {}

    @property
    def vocab_size(self) -> int:
        """Number of ids, added tokens included."""
        return self.backend.get_vocab_size(with_added_tokens=True)

    @property
    def all_special_ids(self) -> set[int]:
        """Ids of every special added token and of bos/eos/pad/unk."""
        ids = {i for i, tok in self.backend.get_added_tokens_decoder().items() if tok.special}
        named = (self.bos_token_id, self.pad_token_id, self.token_to_id(self.unk_token or ""), *self.eos_token_ids)
        return ids | {i for i in named if i is not None}

    def token_to_id(self, token: str) -> int | None:
        return self.backend.token_to_id(token)

    def id_to_token(self, i: int) -> str | None:
        return self.backend.id_to_token(i) if 0 <= i < self.vocab_size else None

    def encode(self, text: str, *, add_special_tokens: bool = True) -> list[int]:
        """Token ids of `text`, with BOS/EOS added as the model's tokenizer files ask."""
        if not isinstance(text, str):
            raise InvalidArgumentError(f"encode() takes a str, got {type(text).__name__}")
        try:
            return self.backend.encode(text, add_special_tokens=add_special_tokens).ids
        except BaseException as exc:  # a tokenizer file the backend accepted but cannot apply
            if not _backend_failure(exc):
                raise
            raise TokenizerError(f"{self.source}: tokenizer failed to encode: {_first_line(exc)}") from None

    def decode(self, ids: Sequence[int], *, skip_special_tokens: bool = False) -> str:
        """Text of `ids` (ids outside the vocabulary are dropped, as transformers does)."""
        try:
            id_list = [int(i) for i in ids]
        except (TypeError, ValueError) as exc:
            raise InvalidArgumentError(f"decode() takes a sequence of ints: {exc}") from None
        if any(i < 0 for i in id_list):
            raise InvalidArgumentError(f"decode(): negative token id {min(id_list)}")
        text = self.backend.decode(id_list, skip_special_tokens=skip_special_tokens)
        if self._clean_up:
            for old, new in _CLEANUPS:
                text = text.replace(old, new)
        return text

    def apply_chat_template(self, messages: list[dict], *, add_generation_prompt: bool = False,
                            tokenize: bool = False, tools: list | None = None,
                            **template_kwargs: Any) -> str | list[int]:
        """Render `messages` with the model's chat template; token ids (no extra BOS) if `tokenize`."""
        template = self.chat_template
        if tools is not None and "tool_use" in self.named_templates:
            template = self.named_templates["tool_use"]
        if template is None:
            names = f" (named templates: {sorted(self.named_templates)})" if self.named_templates else ""
            raise TokenizerError(f"{self.template_source}: the model has no chat template{names}")
        if tools is not None and (not isinstance(tools, list) or not all(isinstance(t, dict) for t in tools)):
            raise InvalidArgumentError("tools must be a list of dicts (JSON schemas)")
        context = {name: tok for name, tok in (("bos_token", self.bos_token), ("eos_token", self.eos_token),
                                              ("unk_token", self.unk_token), ("pad_token", self.pad_token))
                   if tok is not None}
        context.update(template_kwargs)
        context.update(messages=_checked_messages(messages), tools=tools, add_generation_prompt=add_generation_prompt)
        context.setdefault("documents", None)
        where = self.template_source
        try:
            if template not in self._compiled:
                self._compiled[template] = templates.compile_template(template)
            text = templates.render(self._compiled[template], context)
        except LeanformersError:
            raise
        except templates.TemplateRaised as exc:
            raise TokenizerError(f"{where}: chat template raised an error: {exc}") from None
        except templates.TemplateLimitError as exc:
            raise TokenizerError(f"{where}: chat template stopped: {exc}") from None
        except jinja2.TemplateSyntaxError as exc:
            raise TokenizerError(f"{where}: chat template syntax error at line {exc.lineno}: {exc}") from None
        except (Exception, RecursionError, MemoryError) as exc:
            raise TokenizerError(f"{where}: chat template failed: {type(exc).__name__}: {_first_line(exc)}") from None
        return self.encode(text, add_special_tokens=False) if tokenize else text

    def __repr__(self) -> str:
        return f"Tokenizer(source={self.source!r}, vocab_size={self.vocab_size})"


# --- chat templates ---------------------------------------------------------------------------------------

def _checked_messages(messages: Any) -> list[dict]:
    """Copies of the messages, None-valued keys dropped, after checking roles and contents."""
    if not isinstance(messages, list):
        raise InvalidArgumentError(f"messages must be a list of dicts, got {type(messages).__name__}")
    if not messages:
        raise InvalidArgumentError("messages is empty: a conversation needs at least one message")
    out = []
    for n, msg in enumerate(messages):
        if not isinstance(msg, dict):
            raise InvalidArgumentError(f"messages[{n}] must be a dict, got {type(msg).__name__}")
        msg = {k: v for k, v in msg.items() if v is not None}
        if "role" not in msg:
            raise InvalidArgumentError(f"messages[{n}] has no 'role'")
        if not isinstance(msg["role"], str):
            raise InvalidArgumentError(f"messages[{n}]: 'role' must be a str, got {type(msg['role']).__name__}")
        content = msg.get("content")
        if content is None and "tool_calls" not in msg:
            raise InvalidArgumentError(f"messages[{n}] has no 'content'")
        if isinstance(content, list):
            for k, part in enumerate(content):
                if not isinstance(part, dict) or not isinstance(part.get("type"), str):
                    raise InvalidArgumentError(f"messages[{n}]['content'][{k}] must be a dict with a str 'type'")
                if part["type"] == "text" and not isinstance(part.get("text"), str):
                    raise InvalidArgumentError(f"messages[{n}]['content'][{k}] is a text part without a str 'text'")
        elif content is not None and not isinstance(content, str):
            raise InvalidArgumentError(
                f"messages[{n}]: 'content' must be a str or a list of parts, got {type(content).__name__}")
        reasoning = next((msg[k] for k in ("reasoning_content", "thinking", "reasoning") if k in msg), None)
        if reasoning is not None:
            msg = {"thinking": reasoning, **msg, "reasoning_content": reasoning}
        out.append(msg)
    return out


# --- shared helpers ---------------------------------------------------------------------------------------

_MAX_TOKENIZER_BYTES = 1 << 30


def _backend_failure(exc: BaseException) -> bool:
    """An error of the Rust backend: an Exception, or pyo3's PanicException (a BaseException)."""
    return isinstance(exc, Exception) or type(exc).__name__ == "PanicException"


def _first_line(exc: BaseException) -> str:
    return (str(exc).splitlines() or [""])[0][:300]


def _add_specials(backend: BackendTokenizer, tokens: Sequence[str | None], *, special: bool = True) -> None:
    """Register tokens as added tokens (never split) unless they already are."""
    present = {t.content for t in backend.get_added_tokens_decoder().values()}
    new = [AddedToken(t, special=special, normalized=False) for t in dict.fromkeys(tokens) if t and t not in present]
    if new:
        backend.add_special_tokens(new) if special else backend.add_tokens(new)


def _set_post_processor(backend: BackendTokenizer, bos: str | None, eos: str | None, add_bos: bool,
                        add_eos: bool) -> None:
    """BOS/EOS around every encoded sequence, as transformers' `update_post_processor` does."""
    add_bos, add_eos = add_bos and bos is not None, add_eos and eos is not None
    single = f"{bos + ':0 ' if add_bos else ''}$A:0{' ' + eos + ':0' if add_eos else ''}"
    pair = f"{single}{' ' + bos + ':1' if add_bos else ''} $B:1{' ' + eos + ':1' if add_eos else ''}"
    specials = [(t, backend.token_to_id(t)) for t, on in ((bos, add_bos), (eos, add_eos)) if on]
    backend.post_processor = processors.TemplateProcessing(single=single, pair=pair, special_tokens=specials)


def _read_json(path: Path) -> dict | None:
    """A JSON object file (strict: see files.parse_json), None if absent."""
    if not os.path.lexists(path):
        return None
    data = read_json(path, TokenizerError, "tokenizer file")
    if not isinstance(data, dict):
        raise TokenizerError(f"{path}: expected a JSON object, got {type(data).__name__}")
    return data


def _token_text(value: Any, where: str) -> str | None:
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, dict) and isinstance(value.get("content"), str):
        return value["content"]
    raise TokenizerError(f"{where}: a special token must be a string or a dict with 'content', got {value!r}")


# --- HF directories ---------------------------------------------------------------------------------------

def load_tokenizer_from_dir(path: str | Path) -> Tokenizer:
    """The tokenizer of a Hugging Face model directory (tokenizer.json + tokenizer_config.json & co)."""
    root = Path(path)
    if not root.is_dir():
        raise TokenizerError(f"{root}: not a directory, cannot look for tokenizer.json")
    tok_file = root / "tokenizer.json"
    if not os.path.lexists(tok_file):
        spm = (root / "tokenizer.model").exists()
        raise TokenizerError(f"{root}: no tokenizer.json found"
                             + (" (tokenizer.model alone, sentencepiece, is not supported)" if spm else ""))
    size = file_size(tok_file, TokenizerError, "tokenizer file")
    if size > _MAX_TOKENIZER_BYTES:
        raise TokenizerError(
            f"{tok_file}: {size} bytes, more than the {_MAX_TOKENIZER_BYTES} a tokenizer file may have")
    try:
        backend = BackendTokenizer.from_file(str(tok_file))
    except BaseException as exc:  # the Rust parser reports bad JSON, types and nesting (depth 128)
        if not _backend_failure(exc):
            raise
        raise TokenizerError(f"{tok_file}: cannot parse tokenizer file: {_first_line(exc)}") from None
    # tokenizer.json may switch on padding / truncation (e.g. sentence-transformers' MiniLM pads every
    # text to 128 tokens); transformers turns them off for a plain call, and so do we: callers that
    # want them (leanformers.encoder) set them on a copy.
    backend.no_padding()
    backend.no_truncation()
    cfg = _read_json(root / "tokenizer_config.json") or {}
    smap = _read_json(root / "special_tokens_map.json") or {}
    gen = _read_json(root / "generation_config.json") or {}

    def special(name: str) -> str | None:
        if name in cfg:
            return _token_text(cfg[name], f"{root / 'tokenizer_config.json'} [{name}]")
        return _token_text(smap.get(name), f"{root / 'special_tokens_map.json'} [{name}]")

    bos, eos, pad, unk = special("bos_token"), special("eos_token"), special("pad_token"), special("unk_token")
    extras: list[str | None] = []
    for src, name in ((cfg, "tokenizer_config.json"), (smap, "special_tokens_map.json")):
        for key in ("additional_special_tokens", "extra_special_tokens"):
            value = src.get(key) or []
            if not isinstance(value, (list, dict)):
                raise TokenizerError(f"{root / name}: {key} must be a list or a dict of tokens")
            extras += [_token_text(t, f"{root / name} [{key}]") for t in
                       (value.values() if isinstance(value, dict) else value)]
    others = [special(name) for name in ("cls_token", "sep_token", "mask_token")]
    _add_specials(backend, [bos, eos, unk, pad, *others, *extras])
    # BOS/EOS come from tokenizer.json's post-processor alone: transformers (5.x) ignores the
    # add_bos_token / add_eos_token keys of tokenizer_config.json whenever tokenizer.json exists.

    gen_eos = gen.get("eos_token_id")
    gen_eos = [gen_eos] if type(gen_eos) is int else gen_eos if gen_eos is not None else []
    if not isinstance(gen_eos, list) or not all(type(i) is int and i >= 0 for i in gen_eos):
        raise TokenizerError(f"{root / 'generation_config.json'}: eos_token_id must be an int or a list of ints")
    clean_up = cfg.get("clean_up_tokenization_spaces", False)
    if clean_up is not None and type(clean_up) is not bool:
        raise TokenizerError(f"{root / 'tokenizer_config.json'}: clean_up_tokenization_spaces must be true or false, "
                             f"got {clean_up!r:.40}")

    template, named, where = _dir_chat_template(root, cfg)
    return Tokenizer(backend, bos_token=bos, eos_token=eos, pad_token=pad, unk_token=unk, extra_eos_ids=gen_eos,
                     chat_template=template, named_templates=named, source=str(root), template_source=str(where),
                     clean_up_tokenization_spaces=bool(clean_up))


def _dir_chat_template(root: Path, cfg: dict) -> tuple[str | None, dict[str, str], Path]:
    """(default template, named templates, their file): chat_template.jinja > chat_template.json >
    tokenizer_config.json."""
    jinja_file = root / "chat_template.jinja"
    if os.path.lexists(jinja_file):
        raw = read_bytes(jinja_file, TokenizerError, "chat template", limit=4 * templates.MAX_TEMPLATE_CHARS)
        try:
            return raw.decode("utf-8"), {}, jinja_file
        except UnicodeDecodeError as exc:
            raise TokenizerError(f"{jinja_file}: chat template is not valid UTF-8 ({exc.reason})") from None
    json_cfg = _read_json(root / "chat_template.json")
    where, value = ((root / "chat_template.json", json_cfg.get("chat_template")) if json_cfg is not None
                    else (root / "tokenizer_config.json", cfg.get("chat_template")))
    if value is None or isinstance(value, str):
        return value, {}, where
    if isinstance(value, list) and all(isinstance(t, dict) and isinstance(t.get("name"), str)
                                       and isinstance(t.get("template"), str) for t in value):
        named = {t["name"]: t["template"] for t in value}
        return named.get("default"), named, where
    raise TokenizerError(f"{where}: chat_template must be a string or a list of {{name, template}} dicts")


# --- GGUF -------------------------------------------------------------------------------------------------

def _byte_chars() -> list[str]:
    """GPT-2's byte -> printable character table (the alphabet byte-level BPE vocabularies are written in)."""
    printable = {*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)}
    shifted = iter(range(256, 512))
    return [chr(b) if b in printable else chr(next(shifted)) for b in range(256)]


def _merges(meta: dict, src: str) -> list[tuple[str, str]] | None:
    raw = meta.get("tokenizer.ggml.merges")
    if raw is None:
        return None
    if not isinstance(raw, list):
        raise TokenizerError(f"{src}: tokenizer.ggml.merges must be an array of strings")
    out = []
    for n, merge in enumerate(raw):
        parts = merge.split(" ") if isinstance(merge, str) else []
        if len(parts) != 2:
            raise TokenizerError(f"{src}: tokenizer.ggml.merges[{n}] is not two tokens separated by a space: {merge!r}")
        out.append((parts[0], parts[1]))
    return out


def _merges_from_scores(tokens: list[str], scores: list[float]) -> list[tuple[str, str]]:
    """BPE merges implied by a sentencepiece vocabulary: best-scoring merged piece first, then longer left part."""
    ids = {tok: i for i, tok in enumerate(tokens)}  # a duplicated token keeps its last id, as in llama.cpp
    ranked = []
    for token, i in ids.items():
        for cut in range(1, len(token)):
            left, right = token[:cut], token[cut:]
            if left in ids and right in ids:
                ranked.append((-scores[i], -len(left), -len(right), i, left, right))
    ranked.sort()
    return [(left, right) for *_, left, right in ranked]


def load_tokenizer_from_gguf(gguf_file: GGUFFile) -> Tokenizer:
    """The tokenizer described by a GGUF file's `tokenizer.*` metadata."""
    meta, src = gguf_file.metadata, str(getattr(gguf_file, "path", "<gguf>"))
    tokens = meta.get("tokenizer.ggml.tokens")
    if not isinstance(tokens, list) or not tokens or not all(isinstance(t, str) for t in tokens):
        raise TokenizerError(f"{src}: GGUF metadata lacks a token list (tokenizer.ggml.tokens)")
    types = meta.get("tokenizer.ggml.token_type") or [1] * len(tokens)
    if not isinstance(types, list) or not all(type(t) is int for t in types):
        raise TokenizerError(f"{src}: tokenizer.ggml.token_type must be an array of integers")
    if len(types) != len(tokens):
        raise TokenizerError(f"{src}: tokenizer.ggml.token_type has {len(types)} entries for {len(tokens)} tokens")
    for key in ("model", "pre", "chat_template"):
        value = meta.get(f"tokenizer.{'' if key == 'chat_template' else 'ggml.'}{key}")
        if value is not None and not isinstance(value, str):
            raise TokenizerError(f"{src}: tokenizer metadata {key!r} must be a string, got {type(value).__name__}")

    def flag(key: str, default: bool) -> bool:
        value = meta.get(f"tokenizer.ggml.{key}", default)
        if type(value) is not bool:
            raise TokenizerError(f"{src}: tokenizer.ggml.{key} must be a boolean, got {value!r:.40}")
        return value

    def token_of(key: str) -> str | None:
        i = meta.get(f"tokenizer.ggml.{key}")
        if i is None:
            return None
        if type(i) is not int or not 0 <= i < len(tokens):
            raise TokenizerError(f"{src}: tokenizer.ggml.{key} = {i!r} is not a token id (vocab of {len(tokens)})")
        return tokens[i]

    bos, eos, unk, pad = (token_of(k) for k in ("bos_token_id", "eos_token_id", "unknown_token_id", "padding_token_id"))
    kind = meta.get("tokenizer.ggml.model")
    try:
        if kind == "gpt2":
            backend = _byte_level_backend(tokens, types, _merges(meta, src), meta.get("tokenizer.ggml.pre"), src)
            add_bos_default = False
        elif kind == "llama":
            backend = _sentencepiece_backend(meta, tokens, unk, src)
            add_bos_default = True
        else:
            raise TokenizerError(f"{src}: unsupported tokenizer.ggml.model {kind!r} (supported: 'gpt2', 'llama')")
    except LeanformersError:
        raise
    except Exception as exc:
        raise TokenizerError(f"{src}: cannot build the {kind} tokenizer from GGUF metadata: {exc}") from None
    control = [t for t, ty in zip(tokens, types) if ty == _CONTROL]
    _add_specials(backend, [*control, bos, eos, unk, pad])
    _add_specials(backend, [t for t, ty in zip(tokens, types) if ty == _USER_DEFINED], special=False)
    _set_post_processor(backend, bos, eos, flag("add_bos_token", add_bos_default), flag("add_eos_token", False))
    prefix = "tokenizer.chat_template."
    named = {k[len(prefix):]: v for k, v in meta.items() if k.startswith(prefix) and isinstance(v, str)}
    return Tokenizer(backend, bos_token=bos, eos_token=eos, pad_token=pad, unk_token=unk,
                     chat_template=meta.get("tokenizer.chat_template"), named_templates=named, source=src)


def _byte_level_backend(tokens: list[str], types: list[int], merges: list[tuple[str, str]] | None,
                        pre: str | None, src: str) -> BackendTokenizer:
    """Byte-level BPE (GPT-2 style) from a GGUF `gpt2` vocabulary."""
    if merges is None:
        raise TokenizerError(f"{src}: GGUF metadata lacks tokenizer.ggml.merges, needed by a 'gpt2' tokenizer")
    chars = _byte_chars()
    alphabet = set(chars)
    vocab: dict[str, int] = {}
    for i, (tok, ty) in enumerate(zip(tokens, types)):
        if ty not in (_CONTROL, _USER_DEFINED) and not set(tok) <= alphabet:
            tok = "".join(chars[b] for b in tok.encode("utf-8"))  # stored as plain text: respell in bytes
        vocab[tok] = i  # a duplicated token keeps its last id, as in llama.cpp
    backend = BackendTokenizer(models.BPE(vocab=vocab, merges=merges))
    splits = _SPLITS.get(pre or "default")
    if splits is None:
        logger.warning("%s: unknown tokenizer.ggml.pre %r; splitting text with the GPT-2 regex", src, pre)
        splits = (_GPT2,)
    backend.pre_tokenizer = pre_tokenizers.Sequence(
        [*(pre_tokenizers.Split(Regex(rx), behavior="isolated") for rx in splits),
         pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    backend.decoder = decoders.ByteLevel()
    return backend


def _sentencepiece_backend(meta: dict, tokens: list[str], unk: str | None, src: str) -> BackendTokenizer:
    """Sentencepiece-style BPE with byte fallback from a GGUF `llama` vocabulary."""
    merges = _merges(meta, src)
    if merges is None:
        scores = meta.get("tokenizer.ggml.scores")
        if not isinstance(scores, list) or len(scores) != len(tokens) or not all(
                isinstance(s, (int, float)) and not isinstance(s, bool) for s in scores):
            raise TokenizerError(f"{src}: a 'llama' tokenizer needs tokenizer.ggml.scores (one per token) or merges")
        merges = _merges_from_scores(tokens, scores)
    vocab = {tok: i for i, tok in enumerate(tokens)}
    backend = BackendTokenizer(models.BPE(vocab=vocab, merges=merges, unk_token=unk, fuse_unk=True,
                                          byte_fallback=True))
    space_prefix = meta.get("tokenizer.ggml.add_space_prefix", True)
    if type(space_prefix) is not bool:
        raise TokenizerError(f"{src}: tokenizer.ggml.add_space_prefix must be a boolean, got {space_prefix!r:.40}")
    backend.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first" if space_prefix else
                                                     "never", split=False)
    steps = [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()]
    backend.decoder = decoders.Sequence(steps + [decoders.Strip(" ", 1, 0)] if space_prefix else steps)
    return backend
