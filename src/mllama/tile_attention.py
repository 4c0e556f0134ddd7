"""The vision encoder's self-attention over an image's tiles, with the trained padding pattern.

Each image is num_tiles * tile_len positions: its real tiles first, each with `real_len` real
positions and zero padding up to tile_len, then whole padded tiles. As trained, attention is masked
only between two padding positions: real queries see padding keys, padding queries see real keys.
`tile_attention` computes exactly that without a dense mask, as unmasked attention calls.

Identical padded tiles: in the published checkpoints the tile tables hold zeros for the tile slots
an aspect ratio leaves empty, and the processor fills those tiles with zero pixels, so all padded
tiles of an image enter the encoder equal. A padded query sees only real keys, so they stay equal
through every layer, and c equal keys (with their equal values) weigh in a softmax like one key
with log(c) added to its score. An encoder may then run one padded tile for all of them (`TileLayout.padded_copies`); the
attention below gives that tile's keys the log(c) and the result is the one of c tiles.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Protocol

import torch
import torch.nn.functional as F
from torch import nn


@dataclass(frozen=True)
class KeyCopies:
    """Each key (and value) from index `start` on stands for `copies` equal ones: log(copies) is
    added to its scaled score."""

    start: int
    copies: int

    @property
    def log_weight(self) -> float:
        return math.log(self.copies)


class Attend(Protocol):
    def __call__(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *,
                 key_copies: KeyCopies | None = None) -> torch.Tensor: ...


def _float_mask_exact(q: torch.Tensor) -> bool:
    """Whether SDPA takes a float32 (float64) additive mask with q: on the CPU even for a bf16 q, where
    log(c) rounded to bf16 would weigh c keys as 1.003 c."""
    return q.device.type == "cpu" or q.dtype in (torch.float32, torch.float64)


def sdpa_attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *,
                key_copies: KeyCopies | None = None) -> torch.Tensor:
    """softmax(q k^T / sqrt(d)) v through torch's SDPA, the keys from key_copies.start on counted
    key_copies.copies times."""
    if key_copies is None:
        return F.scaled_dot_product_attention(q, k, v)
    if _float_mask_exact(q):
        dtype = torch.float64 if q.dtype == torch.float64 else torch.float32
        mask = torch.zeros(k.shape[-2], dtype=dtype, device=q.device)
        mask[key_copies.start:] = key_copies.log_weight
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask.view(1, 1, 1, -1))
    # Elsewhere some backends refuse a float32 mask with 16-bit q (or misread it): write the copies out.
    start, c = key_copies.start, key_copies.copies
    k = torch.cat([k[:, :, :start]] + [k[:, :, start:]] * c, dim=2)
    v = torch.cat([v[:, :, :start]] + [v[:, :, start:]] * c, dim=2)
    return F.scaled_dot_product_attention(q, k, v)


@dataclass(frozen=True)
class TileLayout:
    """Where the real positions of a batch of images are.

    Sequences are (images, num_tiles * tile_len). Each image's real tiles come first; in a real
    tile the first `real_len` positions are real, the rest padding; later tiles are all padding.
    `runs` are (start, stop, real_tiles) for consecutive images sharing one real-tile count.
    padded_copies > 1: every image has num_tiles - 1 real tiles and its last (padded) tile stands
    for that many identical padded tiles (see the module docstring).
    """

    num_tiles: int
    tile_len: int
    real_len: int
    runs: tuple[tuple[int, int, int], ...]
    padded_copies: int = 1

    @classmethod
    def from_counts(cls, real_tiles: list[int], *, num_tiles: int, tile_len: int, real_len: int,
                    padded_copies: int = 1) -> "TileLayout":
        if not real_tiles or min(real_tiles) < 1 or max(real_tiles) > num_tiles:
            raise ValueError(f"every image needs 1..{num_tiles} real tiles, got {real_tiles}")
        if not 0 < real_len <= tile_len:
            raise ValueError(f"real_len {real_len} must be in 1..tile_len={tile_len}")
        if padded_copies < 1 or (padded_copies > 1 and set(real_tiles) != {num_tiles - 1}):
            raise ValueError(f"padded_copies={padded_copies} needs every image to have num_tiles - 1 = "
                             f"{num_tiles - 1} real tiles, got {real_tiles}")
        runs: list[tuple[int, int, int]] = []
        for i, n in enumerate(real_tiles):
            if runs and runs[-1][2] == n:
                runs[-1] = (runs[-1][0], i + 1, n)
            else:
                runs.append((i, i + 1, n))
        return cls(num_tiles, tile_len, real_len, tuple(runs), padded_copies)


def tile_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layout: TileLayout, *,
                   attend: Attend = sdpa_attend) -> torch.Tensor:
    """Self-attention where only padding<->padding pairs are masked, without a dense mask.

    q, k, v: (images, heads, num_tiles * tile_len, head_dim). Real query rows attend to every key,
    so they take one unmasked call; padding rows attend to the real keys only, so they take a second
    unmasked call over the gathered real keys. Both are exact. attend: the unmasked attention
    (mllama.cpu_attention swaps in its CPU kernel).
    """
    if len(layout.runs) == 1:
        return _attend_run(q, k, v, layout, layout.runs[0][2], attend)
    out = torch.empty_like(q)
    for start, stop, n in layout.runs:
        out[start:stop] = _attend_run(q[start:stop], k[start:stop], v[start:stop], layout, n, attend)
    return out


def _attend_run(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layout: TileLayout, n: int,
                attend: Attend) -> torch.Tensor:
    """`tile_attention` for images that all have `n` real tiles."""
    m, h, _, d = q.shape
    t, tile_len, real = layout.num_tiles, layout.tile_len, layout.real_len
    pad = tile_len - real
    real_block = n * tile_len  # positions of the real tiles, their padding rows included

    def tiles(x: torch.Tensor) -> torch.Tensor:
        return x.view(m, h, t, tile_len, d)

    # (m, h, n * real, d): the keys/values every padding query may see.
    k_real = tiles(k)[:, :, :n, :real].reshape(m, h, n * real, d)
    v_real = tiles(v)[:, :, :n, :real].reshape(m, h, n * real, d)
    # Padding queries: the `pad` tail rows of each real tile, then all rows of the padded tiles.
    q_pad = tiles(q)[:, :, :n, real:].reshape(m, h, n * pad, d)
    if n < t:
        q_pad = torch.cat([q_pad, q[:, :, real_block:]], dim=2)
    pad_out = attend(q_pad, k_real, v_real)

    if n == t:  # the common case: no padded tile, one plain call over everything
        out = attend(q, k, v)
        if out.requires_grad:  # SDPA saved its output for backward; overwrite a copy
            out = out.clone()
    else:
        copies = KeyCopies(real_block, layout.padded_copies) if layout.padded_copies > 1 else None
        out = torch.empty_like(q)
        out[:, :, :real_block] = attend(q[:, :, :real_block], k, v, key_copies=copies)
        out[:, :, real_block:] = pad_out[:, :, n * pad:]
    # The real tiles' padding rows were computed unmasked above; overwrite them.
    tiles(out)[:, :, :n, real:] = pad_out[:, :, : n * pad].view(m, h, n, pad, d)
    return out


class TileAttentionCore(nn.Module):
    """tile_attention as a module: each call is a boundary where a paused vision forward may stop
    (mllama.vision_cache), so attention over thousands of tokens can be split by heads."""

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layout: TileLayout) -> torch.Tensor:
        return tile_attention(q, k, v, layout)
