"""`leanformers info`: what a model is, read from its files without building it."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

from .hub import resolve
from .loading import read_checkpoint
from .models.registry import family_for


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
    c = config
    kv_per_token = lambda: 2 * c.num_hidden_layers * c.num_key_value_heads * c.head_dim * 4  # noqa: E731
    fields = {  # label -> how to say it for a Llama-shaped config; a family's `describe` overrides or adds
        "model": lambda: resolved.reference,
        "source": lambda: f"{resolved.path} ({resolved.kind})",
        "architecture": lambda: f"{c.model_type} ({', '.join(c.architectures or []) or 'causal LM'})",
        "parameters": lambda: f"{n_params / 1e6:.1f} M",
        "layers": lambda: f"{c.num_hidden_layers}, hidden {c.hidden_size}, intermediate {c.intermediate_size}",
        "attention": lambda: f"{c.num_attention_heads} heads, {c.num_key_value_heads} kv heads, head_dim {c.head_dim}"
                             + (f", sliding window {c.sliding_window}" if c.sliding_window else ""),
        "rope": lambda: f"theta {c.rope_theta:g}, {c.rope_type}"
                        + (f" x{c.rope_scaling['factor']}" if c.rope_scaling else ""),
        "vocab": lambda: f"{c.vocab_size}, tied embeddings: {'yes' if c.tie_word_embeddings else 'no'}",
        "context length": lambda: f"{c.max_position_embeddings}",
        "weights dtype": lambda: ", ".join(f"{k} x{v}" for k, v in kinds.most_common()),
        "weights memory": lambda: f"{_human(weight_bytes)} on disk/mapped; {_human(n_params * 4)} as float32, "
                                  f"{_human(n_params * 2)} as bfloat16",
        "KV cache": lambda: f"{_human(kv_per_token())} per token in float32 "
                            f"({_human(kv_per_token() * c.max_position_embeddings)} for the full context)",
    }
    own_lines = getattr(family_for(config), "describe", None)
    own = own_lines(config) if own_lines is not None else {}
    texts = {label: own.get(label) or say() for label, say in fields.items()}
    extra = {label: text for label, text in own.items() if label not in fields}  # lines only this family has
    order = list(fields)
    order[order.index("rope") + 1:order.index("rope") + 1] = extra  # after the rope line (layer pattern, experts)
    texts = {label: texts.get(label) or extra[label] for label in order}
    lines = [f"{label + ':':17s} {text}" for label, text in texts.items()] + ["files:"]
    for f in files:
        lines.append(f"  {Path(f).name:40s} {_human(Path(f).stat().st_size)}")
    return "\n".join(lines)
