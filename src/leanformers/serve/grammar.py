"""`response_format` json_object / json_schema: the output constrained to valid JSON, with llguidance.

llguidance (the constrained-decoding library of vLLM and llama.cpp) compiles a JSON schema into a grammar
and, at every step, gives the set of tokens that can still lead to a string of that grammar. The engine
sets every other token's logit to -inf before sampling (serve/sequence.py), feeds the chosen token back
to the matcher, and the grammar allows the end-of-sequence token only once the JSON is complete. So the
text is valid JSON (matching the schema) unless max_tokens cuts it first (finish_reason "length", as with
the OpenAI API). JSON is generated compact (no whitespace between tokens): a model is never steered into
runs of spaces and newlines.

json_object is the schema {"type": "object"}: any JSON object.
"""

from __future__ import annotations

import json
import threading
from typing import Any

import torch

from ..errors import InvalidArgumentError

_COMPILE_OPTIONS = {"whitespace_flexible": False}


class JsonGrammars:
    """Builds llguidance matchers for one tokenizer (the tokenizer table is built once, on first use)."""

    def __init__(self, tokenizer: Any, eos_ids: list[int], vocab_size: int):
        self.tokenizer, self.eos_ids, self.vocab_size = tokenizer, eos_ids, vocab_size
        self._ll: Any = None
        self._lock = threading.Lock()

    @staticmethod
    def available() -> bool:
        try:
            import llguidance  # noqa: F401
        except ImportError:
            return False
        return True

    def ll_tokenizer(self) -> Any:
        with self._lock:
            if self._ll is None:
                import llguidance

                self._ll = llguidance.LLTokenizer(self.tokenizer.backend.to_str(), n_vocab=self.vocab_size,
                                                  eos_token=list(self.eos_ids))
            return self._ll

    def grammar(self, kind: str, json_schema: dict[str, Any] | None) -> str:
        """The grammar of a response_format; InvalidArgumentError naming what is wrong with the schema."""
        import llguidance

        if kind == "json_object":
            schema: Any = {"type": "object"}
        else:
            if not isinstance(json_schema, dict) or not isinstance(json_schema.get("schema", {}), dict):
                raise InvalidArgumentError("response_format.json_schema must be an object with a `schema` object")
            schema = json_schema.get("schema", {})
        try:
            grammar = llguidance.LLMatcher.grammar_from_json_schema(json.dumps(schema), defaults=_COMPILE_OPTIONS)
        except (ValueError, TypeError) as exc:
            raise InvalidArgumentError(f"response_format: invalid JSON schema: {exc}") from None
        error = llguidance.LLMatcher.validate_grammar(grammar, self.ll_tokenizer())
        if error and not error.startswith("WARNING"):
            raise InvalidArgumentError(f"response_format: unsupported JSON schema: {error.splitlines()[0][:300]}")
        return grammar

    def matcher(self, grammar: str) -> Any:
        import llguidance

        return llguidance.LLMatcher(self.ll_tokenizer(), grammar, log_level=0)


def allowed_tokens(matcher: Any, vocab_size: int) -> torch.Tensor:
    """(vocab_size,) bool: the tokens the matcher allows next (bit t of its little-endian bitmask)."""
    raw = torch.frombuffer(bytearray(matcher.compute_bitmask()), dtype=torch.uint8)
    bits = (raw.unsqueeze(-1) >> torch.arange(8, dtype=torch.uint8)) & 1  # (bytes, 8): token 8 * byte + bit
    return bits.flatten()[:vocab_size].bool()
