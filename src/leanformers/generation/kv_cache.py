"""A static, preallocated key/value cache: one (B, n_kv_heads, max_len, head_dim) buffer pair per layer."""

from __future__ import annotations

import torch


class KVCache:
    """Per-layer K/V buffers written at explicit slots; shapes never change, so decode steps compile once."""

    def __init__(
        self,
        n_layers: int,
        batch_size: int,
        n_kv_heads: int,
        max_len: int,
        head_dim: int,
        *,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str = "cpu",
    ):
        shape = (batch_size, n_kv_heads, max_len, head_dim)
        self.k = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(n_layers)]
        self.v = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(n_layers)]
        self.batch_size = batch_size
        self.max_len = max_len

    def update(
        self, layer: int, slots: torch.Tensor, k: torch.Tensor, v: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Write k/v (B, n_kv_heads, T, head_dim) at `slots` (T,) and return the layer's full buffers."""
        k_buf, v_buf = self.k[layer], self.v[layer]
        k_buf.index_copy_(2, slots, k.to(k_buf.dtype))
        v_buf.index_copy_(2, slots, v.to(v_buf.dtype))
        return k_buf, v_buf

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.k + self.v)
