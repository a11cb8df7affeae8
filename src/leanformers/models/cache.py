"""A static, preallocated key/value cache: one (B, n_kv_heads, max_len, head_dim) buffer pair per layer.

Row b's token at position p is stored in slot p of row b: rows are independent sequences (a batch of
prompts of different lengths, or the slots of a serving engine), each written at its own positions.
Shapes never change, so a decode step over the cache compiles once.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class KVLayout:
    """What a model needs cached per token: layers x kv heads x head_dim (keys and values alike)."""

    n_layers: int
    n_kv_heads: int
    head_dim: int


class KVCache:
    """Per-layer K/V buffers written at explicit positions.

    `k[layer]`, `v[layer]`: (B, n_kv_heads, max_len, head_dim). `max_len` is the buffers' slot count
    (for a `window`, its length).
    """

    def __init__(self, k: list[torch.Tensor], v: list[torch.Tensor]):
        self.k, self.v = k, v

    @classmethod
    def allocate(cls, layout: KVLayout, batch_size: int, max_len: int, *, dtype: torch.dtype,
                 device: torch.device | str = "cpu") -> "KVCache":
        shape = (batch_size, layout.n_kv_heads, max_len, layout.head_dim)
        return cls([torch.zeros(shape, dtype=dtype, device=device) for _ in range(layout.n_layers)],
                   [torch.zeros(shape, dtype=dtype, device=device) for _ in range(layout.n_layers)])

    @property
    def batch_size(self) -> int:
        return self.k[0].shape[0]

    @property
    def max_len(self) -> int:
        return self.k[0].shape[2]

    @property
    def dtype(self) -> torch.dtype:
        return self.k[0].dtype

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.k + self.v)

    def update(self, layer: int, positions: torch.Tensor, k: torch.Tensor,
               v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Write k/v (B, n_kv_heads, T, head_dim) at `positions` (B, T) and return the layer's full buffers."""
        k_buf, v_buf = self.k[layer], self.v[layer]
        # index_copy_ or an indexed assignment, not scatter_: eager, torch's CPU scatter_ is ~100x slower for
        # bfloat16 buffers; compiled, a scatter_ into the cache window copies the whole window every step
        # (Inductor writes these two in place). bench/RESULTS.md, "Serving" and "After the redesign".
        if k.shape[0] == 1:  # one row (plain generation): the cheapest write
            k_buf.index_copy_(2, positions[0], k.to(k_buf.dtype))
            v_buf.index_copy_(2, positions[0], v.to(v_buf.dtype))
            return k_buf, v_buf
        rows = torch.arange(k.shape[0], device=positions.device).unsqueeze(1)  # (B, 1) with positions (B, T)
        k_buf[rows, :, positions] = k.transpose(1, 2).to(k_buf.dtype)  # indexed as (B, T, H, D)
        v_buf[rows, :, positions] = v.transpose(1, 2).to(v_buf.dtype)
        return k_buf, v_buf

    def window(self, length: int) -> "KVCache":
        """The first `length` slots of every row (views: writes go to this cache's buffers)."""
        return KVCache([t[:, :, :length] for t in self.k], [t[:, :, :length] for t in self.v])

    def rows(self, start: int, stop: int) -> "KVCache":
        """Rows start..stop-1 (views): e.g. one sequence slot of a serving engine's batch."""
        return KVCache([t[start:stop] for t in self.k], [t[start:stop] for t in self.v])
