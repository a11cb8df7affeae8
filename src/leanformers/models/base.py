"""The model contract: what every decoder family implements and every layer above `models/` uses.

    logits = model(input_ids, cache=cache, positions=positions)       # (B, T) -> (B, T, vocab)

A family subclasses `DecoderModel` and implements `hidden_states`, `logits`, `kv_layout` and `dtype`;
it may override `fuse_projections` and `quantizable_linears`. Code outside `models/` (generation,
compile, quantize, speculative decoding, training, serving) uses only this class's methods and
attributes, never a family's attribute tree, so a new family works with all of them by implementing
this file's abstract methods.

Positions and the cache: `positions` (B, T) are each token's absolute position (rotary angle or learned
position row). With a cache they are also the cache slots its keys/values are written to, row by row,
and a query attends to the slots at positions <= its own (within a sliding window where the family has
one). Rows are independent sequences: a batch of prompts of different lengths is right-padded, each
row decoding at its own positions, which is also how a serving engine's slots work.
"""

from __future__ import annotations

from typing import Any, Iterator

import torch
from torch import nn

from ..errors import InvalidArgumentError
from .cache import KVCache, KVLayout


class DecoderModel(nn.Module):
    """Base class of decoder-only LMs (HF parameter names; see the module docstring for the contract).

    Attributes every layer above may read or set:
      config                  the family's config dataclass (HF keys)
      quantization            None, "int8" or "int4": set by leanformers.quantize, a field, not a class-name guess
      gradient_checkpointing  recompute each block's activations in backward (training)
      structure_version       bumped by `replace_module` / `fuse_projections`: a compiled step bound to
                              the old modules sees that it is stale
    """

    #: name of the output projection (None if the family computes logits otherwise)
    output_head: str | None = "lm_head"
    #: name of the input token embedding
    input_embedding: str = "model.embed_tokens"

    def __init__(self, config: Any):
        super().__init__()
        self.config = config
        self.quantization: str | None = None
        self.gradient_checkpointing = False
        self.structure_version = 0

    # ------------------------------------------------------------------------------ to implement
    def hidden_states(self, input_ids: torch.Tensor, *, cache: KVCache | None = None,
                      positions: torch.Tensor | None = None,
                      attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Final hidden states (B, T, hidden), after the last norm."""
        raise NotImplementedError

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Logits (..., vocab) from final hidden states (..., hidden)."""
        raise NotImplementedError

    def kv_layout(self) -> KVLayout:
        """What the KV cache holds per token."""
        raise NotImplementedError

    @property
    def dtype(self) -> torch.dtype:
        """The dtype activations flow in (float norms stay float when linears are quantized)."""
        raise NotImplementedError

    # ------------------------------------------------------------------------------ provided
    def forward(self, input_ids: torch.Tensor, *, cache: KVCache | None = None,
                positions: torch.Tensor | None = None, attention_mask: torch.Tensor | None = None,
                logits_to_keep: int = 0) -> torch.Tensor:
        """Logits (B, T, vocab) for input_ids (B, T); only the last `logits_to_keep` positions if > 0.

        cache: write this chunk's keys/values at `positions` (required with a cache) and attend over the
        cached slots. positions (B, T) or (T,): default 0..T-1. attention_mask (B, T), without a cache:
        0 = padding, equal positive values = one sequence (packed rows).
        """
        h = self.hidden_states(input_ids, cache=cache, positions=positions, attention_mask=attention_mask)
        if logits_to_keep:
            h = h[:, -logits_to_keep:]
        return self.logits(h)

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    @property
    def weight_kind(self) -> str:
        """"int4" / "int8" when quantized, else "float32" or "bfloat16" (any 16-bit activation dtype)."""
        if self.quantization:
            return self.quantization
        return "float32" if self.dtype == torch.float32 else "bfloat16"

    def make_cache(self, batch_size: int, max_len: int, *, dtype: torch.dtype | None = None) -> KVCache:
        """A static KV cache for `batch_size` rows of up to `max_len` positions."""
        return KVCache.allocate(self.kv_layout(), batch_size, max_len, dtype=dtype or self.dtype, device=self.device)

    def fuse_projections(self) -> None:
        """Concatenate projections that read the same input (q/k/v, gate/up) into single linears. Default: none."""

    def quantizable_linears(self) -> Iterator[tuple[str, nn.Module]]:
        """(name, module) of the linears weight-only quantization may swap: every nn.Linear but the head."""
        for name, mod in self.named_modules():
            if isinstance(mod, nn.Linear) and name != self.output_head:
                yield name, mod

    def fused_projections(self) -> list[str]:
        """Names of the linears `fuse_projections()` made (concatenations, not checkpoint tensors): LoRA
        refuses a model that has any. Projections a family's checkpoints store fused (Phi-3's qkv_proj)
        are not listed. Default: none."""
        return []

    def adapter_target(self, name: str) -> bool:
        """Whether LoRA may wrap the linear `name` ("all-linear" also leaves out the output head). An adapter
        must name modules that transformers' model has too, so that PEFT loads it. Default: every linear."""
        return True

    @property
    def tied_embeddings(self) -> bool:
        """True when the output head shares the input embedding's weight."""
        if self.output_head is None:
            return False
        head = self.get_submodule(self.output_head)
        emb = self.get_submodule(self.input_embedding)
        return getattr(head, "weight", None) is getattr(emb, "weight", 0)

    def tie_weights(self) -> None:
        """Point the output head at the input embedding's weight when the config ties them."""
        if self.output_head is not None and getattr(self.config, "tie_word_embeddings", False):
            self.get_submodule(self.output_head).weight = self.get_submodule(self.input_embedding).weight

    def replace_module(self, name: str, module: nn.Module) -> None:
        """Swap the submodule `name` (quantization, LoRA); compiled steps of the old structure go stale."""
        parent, _, child = name.rpartition(".")
        setattr(self.get_submodule(parent) if parent else self, child, module)
        self.structure_version += 1

    # ------------------------------------------------------------------------------ helpers for families
    def run_layer(self, layer: nn.Module, *args: Any) -> torch.Tensor:
        """layer(*args); its activations are recomputed in backward when gradient checkpointing is on."""
        if self.gradient_checkpointing and self.training and torch.is_grad_enabled():
            from torch.utils.checkpoint import checkpoint

            return checkpoint(layer, *args, use_reentrant=False)
        return layer(*args)

    def attention_masks(self, input_ids: torch.Tensor, cache: KVCache | None, positions: torch.Tensor | None,
                        attention_mask: torch.Tensor | None, windows: Any = (None,)
                        ) -> tuple[torch.Tensor, int | None, dict[int | None, torch.Tensor]]:
        """(positions validated as (B, T), kv_len, {window: mask}) for one forward: one mask per sliding
        window (None = full attention), shared by the layers with that window. Eager decoding with a cache
        attends over the filled prefix only (kv_len = the highest position + 1); a compiled step, whose
        shapes are static, over the whole cache (kv_len None)."""
        from .ops import attention_mask as make_mask

        positions = self.check_inputs(input_ids, cache, positions, attention_mask)
        kv_len = None
        if cache is not None and not torch.compiler.is_compiling():
            kv_len = int(positions.max()) + 1
        n_keys = input_ids.shape[1] if cache is None else (kv_len if kv_len is not None else cache.max_len)
        segments = attention_mask if cache is None else None
        if segments is not None and bool((segments == 1).all()):
            segments = None  # an all-ones padding mask changes nothing
        masks = {w: make_mask(positions, n_keys, window=w, segments=segments, cached=cache is not None)
                 for w in windows}
        return positions, kv_len, masks

    @staticmethod
    def check_inputs(input_ids: torch.Tensor, cache: KVCache | None, positions: torch.Tensor | None,
                     attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """positions as (B, T), validated; a cache needs explicit positions and takes no attention_mask."""
        if input_ids.dim() != 2:
            raise InvalidArgumentError(f"input_ids must be 2-D (batch, seq), got shape {tuple(input_ids.shape)}")
        if cache is not None and attention_mask is not None:
            raise InvalidArgumentError("attention_mask is for calls without a cache; with a cache every row "
                                       "attends to its own positions")
        if attention_mask is not None and tuple(attention_mask.shape) != tuple(input_ids.shape):
            raise InvalidArgumentError(f"attention_mask must have the shape of input_ids {tuple(input_ids.shape)}, "
                                       f"got {tuple(attention_mask.shape)}")
        B, T = input_ids.shape
        if positions is None:
            if cache is not None:
                raise InvalidArgumentError("positions are required with a cache (they are the cache slots)")
            return torch.arange(T, device=input_ids.device).expand(B, T)
        if positions.dim() == 1:
            positions = positions.expand(B, T)
        if tuple(positions.shape) != (B, T):
            raise InvalidArgumentError(f"positions must have shape {(B, T)}, got {tuple(positions.shape)}")
        return positions
