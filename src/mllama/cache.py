"""Inference caches, allocated once per request batch.

Self-attention K/V live in fixed (B, H_kv, max_len, D) buffers indexed by slot; every row of a
left-padded batch shares the slot index, so a step writes one contiguous slice. Cross-attention
K/V are computed once per image set (from the projected vision states) and reused at every step.
"""

from __future__ import annotations

import torch

from mllama.config import MllamaTextConfig


class KVCache:
    def __init__(self, batch: int, heads: int, max_len: int, head_dim: int, *,
                 dtype: torch.dtype, device: torch.device | str) -> None:
        shape = (batch, heads, max_len, head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)

    def update(self, start: int | torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Write (B, H_kv, S, D) at slots [start, start + S) and return the filled prefix.

        With `start` a 0-d tensor (the compiled decode step, whose shapes must not change from step
        to step) the whole buffer is returned; the caller's mask hides the slots not yet written.
        """
        if isinstance(start, torch.Tensor):
            index = start + torch.arange(k.shape[2], device=k.device)
            self.k.index_copy_(2, index, k)
            self.v.index_copy_(2, index, v)
            return self.k, self.v
        end = start + k.shape[2]
        if end > self.k.shape[2]:
            raise ValueError(f"KV cache overflow: {end} slots needed, {self.k.shape[2]} allocated")
        self.k[:, :, start:end] = k
        self.v[:, :, start:end] = v
        return self.k[:, :, :end], self.v[:, :, :end]


class DecoderCache:
    """Everything the text decoder keeps between steps of one request batch.

    `cross_kv` maps a cross-attention layer index to its (k, v) of shape (B, H_kv, N_vision, D);
    `cross_mask` (B, 1, 1, N_vision) says which vision tokens the rows may see during decoding
    (None: all of them), `text_row_mask` (B, 1, 1) whether they see any. `rope` holds cos, sin
    (max_len, head_dim) per position, filled by the engine.
    """

    def __init__(self, config: MllamaTextConfig, *, batch: int, max_len: int,
                 dtype: torch.dtype, device: torch.device | str) -> None:
        cross = set(config.cross_attention_layers)
        self.self_kv = {
            i: KVCache(batch, config.num_key_value_heads, max_len, config.head_dim, dtype=dtype, device=device)
            for i in range(config.num_hidden_layers) if i not in cross
        }
        self.cross_kv: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        self.cross_mask: torch.Tensor | None = None
        self.text_row_mask: torch.Tensor | None = None
        self.rope: tuple[torch.Tensor, torch.Tensor] | None = None
