"""The mutants tools/mutate.py applies: small semantic bugs that the fast tests must catch.

One row per mutant: `file` (relative to src/leanformers), `original` (an exact snippet that must occur
exactly once in that file), `replacement`, and `tests` (pytest arguments: modules, node ids, -k
expressions; "not slow" is added by the runner). When the code moves, update the snippet here: the runner
refuses to run while any snippet is missing or ambiguous. Snippets are kept to one line where possible
and without their indentation, so re-indenting code does not break them.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class Mutant:
    name: str
    area: str
    file: str
    original: str
    replacement: str
    tests: tuple[str, ...]
    issue: bool = field(default=False)  # named in issue 17 (a mutant that once survived)


SAMPLING = ("tests/test_sampling.py",)
TEXT = ("tests/test_text.py",)
PARITY = ("tests/test_loading.py", "-k", "logits_match_transformers or carry_signal")
GGUF = ("tests/test_loading.py", "-k", "gguf")
GENERATION = ("tests/test_generation.py", "-k", "cached_equals_uncached or batch_equals_single or chunked_prefill")

MUTANTS: list[Mutant] = [
    # ------------------------------------------------------------------ sampling
    Mutant(
        "temperature applied after top-k/top-p/min-p", "sampling", "generation/sampling.py",
        "    logits = logits / params.temperature\n    if params.top_k:\n        logits = apply_top_k(logits, params.top_k)\n"
        "    if params.top_p is not None:\n        logits = apply_top_p(logits, params.top_p)\n"
        "    if params.min_p is not None:\n        logits = apply_min_p(logits, params.min_p)\n    return logits\n",
        "    if params.top_k:\n        logits = apply_top_k(logits, params.top_k)\n"
        "    if params.top_p is not None:\n        logits = apply_top_p(logits, params.top_p)\n"
        "    if params.min_p is not None:\n        logits = apply_min_p(logits, params.min_p)\n"
        "    return logits / params.temperature\n",
        SAMPLING, issue=True,
    ),
    Mutant(
        "top-p boundary: a token whose mass before reaches p exactly is kept (>= became >)", "sampling",
        "generation/sampling.py", "(tail > 1.0 - p)", "(tail >= 1.0 - p)", SAMPLING, issue=True,
    ),
    Mutant(
        "top-p nucleus widened by 0.01 of probability", "sampling", "generation/sampling.py",
        "(tail > 1.0 - p)", "(tail > 1.0 - p - 0.01)", SAMPLING, issue=True,
    ),
    Mutant(
        "top-p nucleus narrowed by 0.01 of probability", "sampling", "generation/sampling.py",
        "(tail > 1.0 - p)", "(tail > 1.0 - p + 0.01)", SAMPLING,
    ),
    Mutant(
        "top-p keeps only as many tied tokens as the mass needs (order-dependent)", "sampling",
        "generation/sampling.py",
        "return logits.masked_fill(logits < boundary, float(\"-inf\"))",
        "keep = torch.zeros_like(logits, dtype=torch.bool).scatter(-1, torch.sort(logits, dim=-1, descending=True)"
        ".indices, torch.arange(logits.shape[-1]).expand_as(logits) < n_keep)\n"
        "    return logits.masked_fill(~keep, float(\"-inf\"))",
        SAMPLING,
    ),
    Mutant(
        "top-k drops tokens tied with the k-th", "sampling", "generation/sampling.py",
        "return logits.masked_fill(logits < kth, float(\"-inf\"))",
        "keep = torch.zeros_like(logits, dtype=torch.bool).scatter(-1, torch.topk(logits, k, dim=-1).indices, True)\n"
        "    return logits.masked_fill(~keep, float(\"-inf\"))",
        SAMPLING,
    ),
    Mutant(
        "min-p drops the token exactly at the threshold", "sampling", "generation/sampling.py",
        "probs < threshold", "probs <= threshold", SAMPLING,
    ),
    Mutant(
        "repetition penalty divides negative logits too (raising them)", "sampling", "generation/sampling.py",
        "torch.where(seen > 0, seen / penalty, seen * penalty)", "seen / penalty", SAMPLING,
    ),
    Mutant(
        "greedy decoding skips the repetition penalty", "sampling", "generation/sampling.py",
        "    logits = logits.float()\n    if params.repetition_penalty is not None and history is not None:",
        "    logits = logits.float()\n    if params.greedy:\n        return logits\n"
        "    if params.repetition_penalty is not None and history is not None:",
        SAMPLING,
    ),
    Mutant(
        "generated tokens left out of the repetition-penalty history", "sampling", "generation/decode.py",
        "if self._history is None or self._history.shape[1] != n:", "if self._history is None:",
        ("tests/test_sampling.py", "-k", "repetition_penalty"), issue=True,
    ),
    # ------------------------------------------------------------------ stop strings and streaming
    Mutant(
        "stop holdback keeps the shortest instead of the longest matching prefix", "stop", "generation/text.py",
        "for n in range(min(len(s) - 1, len(text)), best, -1):",
        "for n in range(1, min(len(s) - 1, len(text)) + 1):", TEXT, issue=True,
    ),
    Mutant(
        "of two stops completed by one token, the later one cuts", "stop", "generation/text.py",
        "return min(hits) if hits else None", "return max(hits) if hits else None", TEXT,
    ),
    Mutant(
        "incomplete UTF-8 characters are streamed", "stop", "generation/text.py",
        "while safe > self.emitted and text[safe - 1] == \"\\ufffd\":",
        "while False:", TEXT,
    ),
    Mutant(
        "stop prefixes are not held back at all", "stop", "generation/text.py",
        "safe -= self._stop_prefix_len(text[:safe])", "safe -= 0", TEXT,
    ),
    # ------------------------------------------------------------------ rope
    Mutant(
        "rope base 50x too large", "rope", "models/ops.py",
        "inv_freq = 1.0 / (theta ** (", "inv_freq = 1.0 / ((50 * theta) ** (", PARITY,
    ),
    Mutant(
        "rotate_half rotates the other way", "rope", "models/ops.py",
        "torch.cat((-x2, x1), dim=-1)", "torch.cat((x2, -x1), dim=-1)", PARITY,
    ),
    Mutant(
        "llama3 rope: smooth factor measured from the high-frequency end", "rope", "models/ops.py",
        "smooth = (old_len / wavelen - low) / (high - low)", "smooth = (old_len / wavelen - high) / (high - low)",
        PARITY,
    ),
    Mutant(
        "linear rope scaling multiplies the frequencies", "rope", "models/ops.py",
        "inv_freq = inv_freq / scaling[\"factor\"]", "inv_freq = inv_freq * scaling[\"factor\"]", PARITY,
    ),
    # ------------------------------------------------------------------ GQA head mapping
    Mutant(
        "GQA: KV heads tiled (h -> h mod n_kv) instead of grouped, unmasked attention", "gqa", "models/ops.py",
        "scaled_dot_product_attention(q, k, v, is_causal=q.shape[2] > 1, scale=scale,",
        "scaled_dot_product_attention(q, k.repeat(1, q.shape[1] // k.shape[1], 1, 1), "
        "v.repeat(1, q.shape[1] // k.shape[1], 1, 1), is_causal=q.shape[2] > 1, scale=scale,",
        PARITY,
    ),
    Mutant(
        "GQA: KV heads tiled instead of grouped, masked attention (cache, window, padding)", "gqa", "models/ops.py",
        "return torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale, enable_gqa=gqa)",
        "r = q.shape[1] // k.shape[1]\n"
        "    return torch.nn.functional.scaled_dot_product_attention(q, k.repeat(1, r, 1, 1), v.repeat(1, r, 1, 1), "
        "attn_mask=mask, scale=scale)",
        ("tests/test_loading.py", "-k", "logits_match_transformers"),
    ),
    Mutant(
        "GQA: compiled decode attention groups query heads by stride", "gqa", "models/ops.py",
        "qf = q.float().reshape(B, Hkv, H // Hkv, T, 1, D)",
        "qf = q.float().reshape(B, H // Hkv, Hkv, T, 1, D).transpose(1, 2)",
        ("tests/test_ops.py", "-k", "decode_attention_matches_sdpa"),
    ),
    # ------------------------------------------------------------------ GGUF q/k permutation
    Mutant(
        "GGUF: no q/k un-permutation for the mistral architecture", "gguf", "checkpoint/gguf.py",
        "if arch in (\"llama\", \"mistral\"):", "if arch in (\"llama\",):", GGUF, issue=True,
    ),
    Mutant(
        "GGUF: qwen2 q/k rows un-permuted too (qwen2 is stored unpermuted)", "gguf", "checkpoint/gguf.py",
        "if arch in (\"llama\", \"mistral\"):", "if arch in (\"llama\", \"mistral\", \"qwen2\"):", GGUF,
    ),
    Mutant(
        "GGUF: k rows un-permuted with the query head count", "gguf", "checkpoint/gguf.py",
        "heads = config.num_key_value_heads", "heads = config.num_attention_heads", GGUF,
    ),
    Mutant(
        "GGUF: the permutation applied again instead of undone", "gguf", "checkpoint/gguf.py",
        "w.reshape(n_head, rows // n_head // 2, 2, *rest)", "w.reshape(n_head, 2, rows // n_head // 2, *rest)", GGUF,
    ),
    # ------------------------------------------------------------------ KV cache
    Mutant(
        "KV cache: decode writes one position too far", "kv-cache", "generation/decode.py",
        "positions = torch.tensor([[len(r) - 1] for r in self.rows], device=self.device)",
        "positions = torch.tensor([[len(r)] for r in self.rows], device=self.device)", GENERATION,
    ),
    Mutant(
        "KV cache: the new token does not attend to itself", "kv-cache", "models/llama.py",
        "kv_len = int(positions.max()) + 1", "kv_len = int(positions.max())", GENERATION,
    ),
    Mutant(
        "KV cache: values of a prefill chunk written in reverse slot order", "kv-cache", "models/cache.py",
        "v_buf.scatter_(2, index, v.to(v_buf.dtype))", "v_buf.scatter_(2, index.flip(2), v.to(v_buf.dtype))",
        GENERATION,
    ),
    Mutant(
        "ragged batch: a short row's first token read from the padded end of its prefill", "kv-cache",
        "generation/decode.py", "picked = hidden[rows, [lengths[r] - 1 - a for r in rows]]",
        "picked = hidden[rows, [b - 1 - a for r in rows]]", GENERATION,
    ),
]
