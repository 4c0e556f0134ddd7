"""Self-attention K/V of finished requests, kept so a later prompt that starts the same way skips
prefilling that start (a chat follow-up is the previous prompt + its answer + a new question).

In Mllama the self-attention K/V at position p depend on the tokens at [0, p] and on what the cross
attention of those positions saw: which tiles of which images, through each row of the tile mask.
So a stored prefix is reusable for a prompt only over the leading positions where both agree: the
same token and a tile-mask row that selects the same tiles of the same images (identified by the
image hash the image cache computes, the image's index in the request and the tile index). A
text-only prefix thus matches a prompt with images up to the first position that sees an image.

Matching runs on CPU copies of the tokens and rows (no device syncs); the K/V stay on the cache's
device and cost one copy out when a request finishes and one copy in on a hit.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

import torch

from mllama.cache import KVCache
from mllama.vision_cache import RequestVision

Columns = tuple[tuple[int, bytes, int], ...]  # (image index, image hash, tile index) of each tile column


@dataclass
class _Prefix:
    """Positions [0, L): tokens (L,) and tile rows (L, K) on CPU, K/V per layer (H_kv, L, D)."""

    tokens: torch.Tensor
    columns: Columns
    rows: torch.Tensor
    kv: dict[int, tuple[torch.Tensor, torch.Tensor]]
    nbytes: int

    def __len__(self) -> int:
        return self.tokens.numel()


def _cross_of(vision: RequestVision | None, prompt_len: int, length: int) -> tuple[Columns, torch.Tensor]:
    """Columns and tile rows (length, K) on CPU of positions [0, length); generated positions (from
    prompt_len on) see what the last prompt token sees, as they do in decode steps."""
    if vision is None:
        return (), torch.zeros(length, 0, dtype=torch.bool)
    mask = vision.tile_mask.cpu()
    rows = mask[:min(length, prompt_len)]
    if length > prompt_len:
        rows = torch.cat([rows, mask[-1:].expand(length - prompt_len, -1)])
    return tuple(vision.columns), rows


def _leading_true(ok: torch.Tensor) -> int:
    bad = (~ok).nonzero()
    return ok.numel() if bad.numel() == 0 else int(bad[0])


def _agreement(a: _Prefix, tokens: torch.Tensor, columns: Columns, rows: torch.Tensor, limit: int) -> int:
    """How many leading positions (at most limit) `a` and (tokens, columns, rows) have the same token
    and see the same tiles at."""
    n = min(limit, len(a), tokens.numel())
    if n <= 0 or a.tokens[0] != tokens[0]:
        return 0
    n = _leading_true(a.tokens[:n] == tokens[:n])
    if n == 0:
        return 0
    if columns == a.columns:
        same = (rows[:n] == a.rows[:n]).all(dim=-1)
    else:  # different images or tiles: compare rows in terms of a's columns
        index = {column: i for i, column in enumerate(a.columns)}
        where = [index.get(column, -1) for column in columns]
        known = [c for c, w in enumerate(where) if w >= 0]
        unknown = [c for c, w in enumerate(where) if w < 0]
        projected = torch.zeros(n, len(a.columns), dtype=torch.bool)
        projected[:, [where[c] for c in known]] = rows[:n, known]
        same = (projected == a.rows[:n]).all(dim=-1) & ~rows[:n, unknown].any(dim=-1)
    return _leading_true(same)


class PrefixCache:
    """LRU of stored prefixes within a byte budget (0 disables it). hits / misses count lookups of
    admitted requests; tokens_reused the prompt positions whose prefill a hit skipped."""

    def __init__(self, max_bytes: int) -> None:
        if isinstance(max_bytes, bool) or not isinstance(max_bytes, int) or max_bytes < 0:
            raise ValueError(f"prefix cache budget must be an int >= 0 bytes, got {max_bytes!r}")
        self.max_bytes = max_bytes
        self.bytes = 0
        self.hits = 0
        self.misses = 0
        self.tokens_reused = 0
        self._items: OrderedDict[int, _Prefix] = OrderedDict()
        self._next = 0

    def __len__(self) -> int:
        return len(self._items)

    def clear(self) -> None:
        """Drop every prefix (the model's weights changed, e.g. an adapter was merged)."""
        self._items.clear()
        self.bytes = 0

    def store(self, kv: KVCache, slot: int, *, prompt: torch.Tensor, output: list[int], length: int,
              vision: RequestVision | None) -> None:
        """Keep positions [0, length) of `slot`: prompt then output tokens, K/V already written."""
        if not self.max_bytes or length < 1:
            return
        prompt = prompt.cpu()
        tokens = prompt[:length]
        if length > prompt.numel():
            tokens = torch.cat([prompt, torch.tensor(output[:length - prompt.numel()], dtype=prompt.dtype)])
        columns, rows = _cross_of(vision, prompt.numel(), length)
        size = sum(2 * buf[slot, :, :length].nbytes for buf in kv.k.values())
        if size > self.max_bytes:
            return
        for key, old in list(self._items.items()):
            common = _agreement(old, tokens, columns, rows, max(len(old), length))
            if common == length:  # already held (as a prefix of a longer one): just make it recent
                self._items.move_to_end(key)
                return
            if common == len(old):  # the new one extends it: the old one can never match longer
                self._drop(key)
        while self.bytes + size > self.max_bytes:
            self._drop(next(iter(self._items)))
        copies = {i: (kv.k[i][slot, :, :length].clone(), kv.v[i][slot, :, :length].clone()) for i in kv.k}
        self._items[self._next] = _Prefix(tokens, columns, rows, copies, size)
        self._next += 1
        self.bytes += size

    def reusable(self, prompt: torch.Tensor, vision: RequestVision | None) -> tuple[int | None, int]:
        """(key, positions) of the longest stored prefix this prompt may reuse, without using it.
        At most len(prompt) - 1 positions: the last prompt token's forward gives the first logits."""
        if not self._items or prompt.numel() < 2:
            return None, 0
        prompt = prompt.cpu()
        columns, rows = _cross_of(vision, prompt.numel(), prompt.numel())
        best, best_len = None, 0
        for key, item in reversed(self._items.items()):  # most recent first wins ties
            if len(item) <= best_len:
                continue
            n = _agreement(item, prompt, columns, rows, prompt.numel() - 1)
            if n > best_len:
                best, best_len = key, n
        return best, best_len

    def restore(self, kv: KVCache, slot: int, *, prompt: torch.Tensor, vision: RequestVision | None) -> int:
        """Copy the longest reusable prefix into `slot`; returns how many positions it filled."""
        if not self.max_bytes:
            return 0
        key, n = self.reusable(prompt, vision)
        if key is None:
            self.misses += 1
            return 0
        item = self._items[key]
        self._items.move_to_end(key)
        for i, (k, v) in item.kv.items():
            kv.k[i][slot, :, :n] = k[:, :n]
            kv.v[i][slot, :, :n] = v[:, :n]
        self.hits += 1
        self.tokens_reused += n
        return n

    def _drop(self, key: int) -> None:
        self.bytes -= self._items.pop(key).nbytes
