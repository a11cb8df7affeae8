"""`leanformers info`: what a model is, read from its files without building it."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

from .hub import resolve
from .loading import read_checkpoint


def _human(n: float, unit: str = "B") -> str:
    for prefix in ("", "Ki", "Mi", "Gi", "Ti"):
        if abs(n) < 1024 or prefix == "Ti":
            return f"{n:.1f} {prefix}{unit}" if prefix else f"{int(n)} {unit}"
        n /= 1024
    return f"{n:.1f} {unit}"


def describe(reference: str | None, *, revision: str | None = None, offline: bool | None = None) -> str:
    """A human-readable summary: architecture, parameters, dtype, context, files, memory."""
    resolved = resolve(reference, revision=revision, offline=offline, progress=False)
    config, tensors, files, gguf = read_checkpoint(resolved)
    n_params = 0
    weight_bytes = 0
    kinds: Counter[str] = Counter()
    for t in tensors.values():
        numel = 1
        for d in t.shape:
            numel *= d
        n_params += numel
        if gguf is not None:
            kinds[t.qtype] += 1
            weight_bytes += t.raw.nbytes
        else:
            kinds[str(t.dtype).removeprefix("torch.")] += 1
            weight_bytes += numel * t.element_size()
    kv_per_token = 2 * config.num_hidden_layers * config.num_key_value_heads * config.head_dim * 4
    rope = config.rope_type + (f" x{config.rope_scaling['factor']}" if config.rope_scaling else "")
    lines = [
        f"model:            {resolved.reference}",
        f"source:           {resolved.path} ({resolved.kind})",
        f"architecture:     {config.model_type} ({', '.join(config.architectures or []) or 'causal LM'})",
        f"parameters:       {n_params / 1e6:.1f} M",
        f"layers:           {config.num_hidden_layers}, hidden {config.hidden_size}, "
        f"intermediate {config.intermediate_size}",
        f"attention:        {config.num_attention_heads} heads, {config.num_key_value_heads} kv heads, "
        f"head_dim {config.head_dim}" + (f", sliding window {config.sliding_window}" if config.sliding_window else ""),
        f"rope:             theta {config.rope_theta:g}, {rope}",
        f"vocab:            {config.vocab_size}, tied embeddings: {'yes' if config.tie_word_embeddings else 'no'}",
        f"context length:   {config.max_position_embeddings}",
        f"weights dtype:    {', '.join(f'{k} x{v}' for k, v in kinds.most_common())}",
        f"weights memory:   {_human(weight_bytes)} on disk/mapped; {_human(n_params * 4)} as float32, "
        f"{_human(n_params * 2)} as bfloat16",
        f"KV cache:         {_human(kv_per_token)} per token in float32 "
        f"({_human(kv_per_token * config.max_position_embeddings)} for the full context)",
    ]
    describe_family = getattr(config, "describe", None)  # a family's own switches (layer pattern, ...)
    if callable(describe_family):
        after_rope = next(i for i, line in enumerate(lines) if line.startswith("rope:")) + 1
        lines[after_rope:after_rope] = describe_family()
    lines.append("files:")
    for f in files:
        lines.append(f"  {Path(f).name:40s} {_human(Path(f).stat().st_size)}")
    return "\n".join(lines)
