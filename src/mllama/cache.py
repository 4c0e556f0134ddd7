"""Self-attention K/V storage with an explicit contract: rows are slots, writes name their positions.

The cache only stores. Which slot a sequence owns, how long it is and which keys a query may see
belong to whoever drives the model (the engine): a forward gets a `KVWindow` that says where its
new keys go (a slot per row, a position per token) and which part of the buffers it reads.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


class KVCache:
    """K/V buffers (slots, H_kv, max_len, D) for each self-attention layer index in `layers`.

    Head counts and head size are given by the caller (read from the attention modules), so a model
    whose heads are split across devices allocates only its share.
    """

    def __init__(self, *, layers: list[int], slots: int, heads: int, max_len: int, head_dim: int,
                 dtype: torch.dtype, device: torch.device | str) -> None:
        if slots < 1 or max_len < 1:
            raise ValueError(f"a KV cache needs at least one slot and one position, got {slots} x {max_len}")
        shape = (slots, heads, max_len, head_dim)
        self.k = {i: torch.zeros(shape, dtype=dtype, device=device) for i in layers}
        self.v = {i: torch.zeros(shape, dtype=dtype, device=device) for i in layers}
        self.slots, self.max_len = slots, max_len

    def write(self, layer: int, slots: torch.Tensor, positions: torch.Tensor, k: torch.Tensor,
              v: torch.Tensor) -> None:
        """Store k, v (B, H_kv, S, D): row b goes to slot slots[b] at positions[b] (B, S)."""
        rows = slots[:, None]  # (B, 1) broadcast against positions (B, S)
        # Advanced indices around a slice put their broadcast dims first: the target is (B, S, H_kv, D).
        self.k[layer][rows, :, positions] = k.transpose(1, 2)
        self.v[layer][rows, :, positions] = v.transpose(1, 2)

    def read(self, layer: int, first: int, count: int, length: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Views of slots [first, first + count) over positions [0, length)."""
        return (self.k[layer][first:first + count, :, :length], self.v[layer][first:first + count, :, :length])

    def move(self, src: int, dst: int, length: int) -> None:
        """Copy positions [0, length) of slot src into slot dst (compacting the active slots)."""
        for buffers in (self.k, self.v):
            for buf in buffers.values():
                buf[dst, :, :length] = buf[src, :, :length]


@dataclass
class KVWindow:
    """Where one decoder forward writes and reads self-attention K/V.

    slots (B,): the slot each row writes; positions (B, S): the position of each new token.
    Rows read slots [first, first + B) over positions [0, length); the caller's mask hides what a
    row must not see (other rows' lengths, later tokens).
    """

    cache: KVCache
    slots: torch.Tensor
    positions: torch.Tensor
    first: int
    length: int

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        self.cache.write(layer, self.slots, self.positions, k, v)
        return self.cache.read(layer, self.first, k.shape[0], self.length)
