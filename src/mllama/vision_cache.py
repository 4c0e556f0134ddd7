"""Cross-attention K/V of one request's images, encoded image by image and kept in an LRU cache.

Only tiles that some prompt token can see are kept: padded tiles, images nobody looks at and tiles
the cross-attention mask hides carry no information, so dropping them is exact. K/V are per vision
token (a linear map and a norm), so the K/V of a request are the concatenation of its images' K/V:
an image seen before (same preprocessed tiles) costs no vision encode and no K/V projection.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from mllama.text import CrossAttentionDecoderLayer, CrossInputs
from mllama.vision_worker import PausableRun

KV = dict[int, tuple[torch.Tensor, torch.Tensor]]
# Vision tokens per projector call of a paused encode: the projector is the widest GEMM of the image
# path, and a tile's 1601 rows through it would be one of the longest unbreakable pieces.
PROJECTOR_ROWS_PER_CALL = 512


@dataclass
class RequestVision:
    """kv: cross layer -> (k, v) (1, H_kv, K * P, D) for the K visible tiles of P tokens each.
    tile_mask (S, K) bool: which tile each prompt token sees; decode tokens see what the last sees.
    columns: what each of the K tiles is, (image index, image hash, tile index), so that two requests
    can tell whether a prompt position sees the same K/V in both (the prefix cache)."""

    kv: KV
    tile_mask: torch.Tensor
    patches: int
    columns: tuple[tuple[int, bytes, int], ...] = ()

    def cross_rows(self, start: int, end: int, dtype: torch.dtype) -> tuple[torch.Tensor | None, torch.Tensor]:
        """(mask (1, 1, S', K * P) or None when every row sees every token, text_row_mask (1, S', 1))
        for prompt rows [start, end)."""
        tiles = self.tile_mask[start:end]
        rows = tiles.any(dim=-1)[None, :, None].to(dtype)
        if bool(tiles.all()):
            return None, rows
        return tiles.repeat_interleave(self.patches, dim=-1)[None, None], rows

    @property
    def decode_tiles(self) -> torch.Tensor:
        return self.tile_mask[-1]

    @property
    def tokens(self) -> int:
        return self.tile_mask.shape[1] * self.patches

    def nbytes(self) -> int:
        return sum(k.nbytes + v.nbytes for k, v in self.kv.values())


def decode_cross(visions: list[RequestVision | None], *, dtype: torch.dtype,
                 device: torch.device | str) -> CrossInputs | None:
    """CrossInputs for one decode token per row (row i sees visions[i]; None: no image), K/V padded
    to the widest row; None when no row sees an image (skipping the cross layers is then exact)."""
    n = len(visions)
    sees = [v is not None and bool(v.decode_tiles.any()) for v in visions]
    if not any(sees):
        return None
    width = max(v.tokens for v, see in zip(visions, sees) if see)
    kv: KV = {}
    mask = torch.zeros(n, width, dtype=torch.bool, device=device)
    for row, (v, see) in enumerate(zip(visions, sees)):
        if not see:
            continue
        mask[row, :v.tokens] = v.decode_tiles.repeat_interleave(v.patches)
        for layer, (k, val) in v.kv.items():
            if layer not in kv:
                shape = (n, k.shape[1], width, k.shape[3])
                kv[layer] = (k.new_zeros(shape), val.new_zeros(shape))
            kv[layer][0][row, :, :v.tokens] = k[0]
            kv[layer][1][row, :, :v.tokens] = val[0]
    rows = torch.tensor(sees, dtype=dtype, device=device)[:, None, None]
    return CrossInputs(states=None, mask=None if bool(mask.all()) else mask[:, None, None], text_row_mask=rows, kv=kv)


class ImageCache:
    """LRU map from an image's hash to its per-layer K/V (H_kv, T_real * P, D), within a byte budget."""

    def __init__(self, max_bytes: int) -> None:
        if max_bytes < 0:
            raise ValueError(f"image cache budget must be >= 0 bytes, got {max_bytes}")
        self.max_bytes = max_bytes
        self.bytes = 0
        self.hits = 0
        self.misses = 0
        self._items: OrderedDict[bytes, tuple[KV, int]] = OrderedDict()

    def get(self, key: bytes) -> KV | None:
        item = self._items.get(key)
        if item is None:
            self.misses += 1
            return None
        self.hits += 1
        self._items.move_to_end(key)
        return item[0]

    def put(self, key: bytes, kv: KV) -> None:
        size = sum(k.nbytes + v.nbytes for k, v in kv.values())
        if size > self.max_bytes or key in self._items:
            return
        while self.bytes + size > self.max_bytes:
            _, (_, old) = self._items.popitem(last=False)
            self.bytes -= old
        self._items[key] = (kv, size)
        self.bytes += size

    def __len__(self) -> int:
        return len(self._items)


def image_key(pixels: torch.Tensor, aspect_ratio_id: int, real: torch.Tensor, *, fast_vision: bool) -> bytes:
    """Hash of one preprocessed image: its real tiles' pixels, aspect ratio and tile mask."""
    h = hashlib.blake2b(digest_size=20)
    h.update(f"{aspect_ratio_id}|{real.int().tolist()}|{fast_vision}|{pixels.dtype}|{tuple(pixels.shape)}".encode())
    h.update(pixels[real].contiguous().view(torch.uint8).numpy().tobytes() if pixels.device.type == "cpu"
             else pixels[real].contiguous().view(torch.uint8).cpu().numpy().tobytes())
    return h.digest()


class VisionJob:
    """The vision work of one request, done a piece per `run_piece()` call so an engine can
    interleave it with decode steps: at most `piece_layers` vision encoder layers of one image, and
    (`piece_s`) no more than the first module boundary after that many seconds; with neither, a whole
    image. `result()` assembles the request's RequestVision."""

    def __init__(self, model: nn.Module, pixel_values: torch.Tensor, aspect_ratio_ids: torch.Tensor,
                 aspect_ratio_mask: torch.Tensor, cross_attention_mask: torch.Tensor, *,
                 cache: ImageCache | None, fast_vision: bool, piece_layers: int | None = None,
                 piece_s: float | None = None) -> None:
        n_img, n_tiles = cross_attention_mask.shape[1:]
        if pixel_values.shape[:2] != (n_img, n_tiles) or aspect_ratio_mask.shape != (n_img, n_tiles) \
                or aspect_ratio_ids.shape != (n_img,):
            raise ValueError(f"images of a request must be pixel_values ({n_img}, {n_tiles}, C, H, W), "
                             f"aspect_ratio_ids ({n_img},), aspect_ratio_mask ({n_img}, {n_tiles}) to match "
                             f"cross_attention_mask {tuple(cross_attention_mask.shape)}; got "
                             f"{tuple(pixel_values.shape)}, {tuple(aspect_ratio_ids.shape)}, "
                             f"{tuple(aspect_ratio_mask.shape)}")
        self.model, self.cache, self.fast_vision = model, cache, fast_vision
        if piece_layers is not None and piece_layers < 1:
            raise ValueError(f"piece_layers must be >= 1 or None, got {piece_layers}")
        if piece_s is not None and not piece_s > 0:
            raise ValueError(f"piece_s must be > 0 or None, got {piece_s}")
        self.piece_layers, self.piece_s = piece_layers, piece_s
        self._run: PausableRun | None = None
        self.pixels, self.ids = pixel_values, aspect_ratio_ids
        self.real = aspect_ratio_mask.bool()
        self.cross_mask = cross_attention_mask.bool()
        self.visible = self.cross_mask.any(dim=0) & self.real  # (N_img, N_tiles)
        self.images = self.visible.any(dim=-1).nonzero().squeeze(1).tolist()
        self.keys = {j: image_key(pixel_values[j], int(aspect_ratio_ids[j]), self.real[j], fast_vision=fast_vision)
                     for j in self.images}
        self.done: dict[int, KV] = {}
        self.pending = list(self.images)

    def lookup(self) -> None:
        """Take what the image cache holds; done when the job starts, so that a request queued behind
        another with the same image finds it encoded."""
        for j in self.pending:
            hit = self.cache.get(self.keys[j]) if self.cache is not None else None
            if hit is not None:
                self.done[j] = hit
        self.pending = [j for j in self.pending if j not in self.done]

    @property
    def finished(self) -> bool:
        return not self.pending

    def run_piece(self, *, seconds: float | None = None) -> None:
        """Advance the next image not found in the cache by one piece (seconds: this piece's time
        limit instead of piece_s)."""
        j = self.pending[0]
        limit = self.piece_s if seconds is None else seconds
        if self.piece_layers is None and limit is None:
            self.done[j] = self._encode(j)
        else:
            if self._run is None:
                self._run = self._pausable(lambda: self._encode(j))
            if not self._run.resume(self.piece_layers, limit):
                return
            self.done[j], self._run = self._run.result, None
        self.pending.pop(0)
        if self.cache is not None:
            self.cache.put(self.keys[j], self.done[j])

    def _pausable(self, fn) -> PausableRun:
        mm = self.model.model
        vision = mm.vision_model
        layers = list(vision.transformer.layers) + list(vision.global_transformer.layers)
        units = [mm.multi_modal_projector] + [layer.cross_attn for layer in mm.language_model.layers
                                              if isinstance(layer, CrossAttentionDecoderLayer)]
        return PausableRun(fn, layers, units)

    @property
    def in_background(self) -> bool:
        """Its images are being encoded in a thread of their own (run_background: the only run given
        a thread count)."""
        return self._run is not None and self._run.threads is not None

    def run_background(self, threads: int, on_done: Callable[[], None] | None = None) -> None:
        """Encode every pending image in a thread of its own on `threads` torch threads (set_threads
        changes that at the next module boundary), in parallel with the caller; on_done is called from
        that thread when it ends. poll() collects the result. Not after run_piece has started one."""
        if self._run is not None:
            raise RuntimeError("this vision job is already running in pieces")
        images = list(self.pending)
        self._run = self._pausable(lambda: {j: self._encode(j) for j in images})
        self._run.run_free(threads, on_done)

    @property
    def poll_ready(self) -> bool:
        """Whether poll() would find the background encode ended (no side effects: any thread)."""
        return self._run is None or self._run.done

    def set_threads(self, threads: int) -> None:
        if self._run is not None:
            self._run.threads = threads

    def poll(self) -> bool:
        """Whether the background encode has ended; when it has, its images are done (and cached),
        or its error is raised here."""
        if self._run is None or not self._run.done:
            return self._run is None
        run, self._run = self._run, None
        for j, kv in run.collect().items():
            self.done[j] = kv
            if self.cache is not None:
                self.cache.put(self.keys[j], kv)
        self.pending = []
        return True

    def abort(self) -> None:
        """Stop a vision forward paused half way or running in the background (the request was
        cancelled); a background one stops at its next module boundary."""
        if self._run is not None:
            self._run.abort()
            self._run = None

    def _encode(self, j: int) -> KV:
        """Vision tower, projector and every cross layer's K/V of image j's real tiles."""
        mm = self.model.model
        dtype = mm.vision_model.patch_embedding.weight.dtype  # the projector may be quantized
        vision = mm.vision_model.features(self.pixels[j][None, None].to(dtype), self.ids[j].view(1, 1),
                                 self.real[j].long()[None, None], skip_padded_tiles=self.fast_vision,
                                 padded_tiles=False)  # only the real tiles are read below
        # K/V are per vision token: in chunks of rows, each projection is a short place to pause.
        tokens = vision[0, 0][self.real[j]].flatten(0, 1)  # (T_real * P, vision_output_dim)
        parts = tokens.tensor_split(-(-tokens.shape[0] // PROJECTOR_ROWS_PER_CALL))  # equal: see PausableRun
        chunks = [mm.language_model.cross_kv(mm.multi_modal_projector(part[None])) for part in parts]
        return {i: (torch.cat([kv[i][0][0] for kv in chunks], dim=1), torch.cat([kv[i][1][0] for kv in chunks], dim=1))
                for i in chunks[0]}  # (H_kv, T_real * P, D)

    def result(self) -> RequestVision | None:
        if self.pending:
            raise RuntimeError("vision job not finished")
        if not self.images:
            return None
        patches = self.model.model.vision_model.num_patches
        pieces: dict[int, list[tuple[torch.Tensor, torch.Tensor]]] = {}
        flat, columns = [], []
        n_tiles = self.visible.shape[1]
        for j in self.images:
            real_index = self.real[j].long().cumsum(0) - 1  # tile -> its row among the image's real tiles
            for t in self.visible[j].nonzero().squeeze(1).tolist():
                r = int(real_index[t])
                for i, (k, v) in self.done[j].items():
                    pieces.setdefault(i, []).append((k[:, r * patches:(r + 1) * patches],
                                                     v[:, r * patches:(r + 1) * patches]))
                flat.append(j * n_tiles + t)
                columns.append((j, self.keys[j], t))
        kv = {i: (torch.cat([k for k, _ in p], dim=1)[None], torch.cat([v for _, v in p], dim=1)[None])
              for i, p in pieces.items()}
        tile_mask = self.cross_mask.reshape(self.cross_mask.shape[0], -1)[:, flat]
        return RequestVision(kv=kv, tile_mask=tile_mask, patches=patches, columns=tuple(columns))
