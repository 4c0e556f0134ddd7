"""The fast Mllama image processor: batched torch resize, then rescale, normalisation and tiling in one pass.

Images of one size are resized together by `torch.nn.functional.interpolate` (bilinear, antialiased
so that downscaling averages like PIL's filter does), on uint8 pixels as PIL does: torch's uint8
kernel is several times faster than its float one. Its fixed-point weights round differently from
PIL's, which keeps it within one uint8 level of PIL, i.e. within 1/255/min(image_std) (0.0150 for
the published checkpoints) after normalisation. NEAREST
reads exactly the pixels PIL reads. BICUBIC, LANCZOS, BOX and HAMMING are resized by PIL, image
by image, since torch has no kernel that stays within one level of them.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from mllama.host_memory import fresh_zeros
from mllama.image_processing import MllamaImageProcessorBase, Settings, pil_nearest_indices, size_on_canvas

_BILINEAR, _NEAREST = int(Image.Resampling.BILINEAR), int(Image.Resampling.NEAREST)


def _resize_group(arrays: list[np.ndarray], height: int, width: int, resample: int,
                  device: torch.device) -> torch.Tensor:
    """Same-sized uint8 (H, W, 3) arrays -> uint8 (N, 3, height, width)."""
    if resample not in (_BILINEAR, _NEAREST):
        arrays = [np.asarray(Image.fromarray(a).resize((width, height), resample=resample)) for a in arrays]
    batch = torch.from_numpy(np.stack(arrays)).to(device).permute(0, 3, 1, 2)  # (N, 3, H, W) view of (N, H, W, 3)
    in_height, in_width = batch.shape[-2:]
    if (in_height, in_width) == (height, width):
        return batch
    if resample == _NEAREST:
        rows = torch.from_numpy(pil_nearest_indices(in_height, height)).to(device)
        cols = torch.from_numpy(pil_nearest_indices(in_width, width)).to(device)
        return batch.index_select(2, rows).index_select(3, cols)
    # `batch` is channels-last, the layout of torch's vectorised uint8 antialiased kernel.
    return F.interpolate(batch, size=(height, width), mode="bilinear", align_corners=False, antialias=True)


def _write_tiles(dest: torch.Tensor, canvas: torch.Tensor, scale: list[float], shift: list[torch.Tensor]) -> None:
    """Normalise the zero-padded `canvas` (3, rows*S, cols*S) into its tiles `dest` (rows*cols, 3, S, S).

    Three per-channel calls with scalar operands: torch's fastest elementwise path, and few enough
    calls that a busy machine's thread scheduling does not dominate.
    """
    tile = dest.shape[-1]
    rows, cols = canvas.shape[1] // tile, canvas.shape[2] // tile
    # (rows*cols, 3, S, S) seen as (3, rows, S, cols, S), the canvas's own layout
    tiles = dest.view(rows, cols, 3, tile, tile).permute(2, 0, 3, 1, 4)
    for channel in range(3):
        source = canvas[channel].view(rows, tile, cols, tile)
        torch.add(shift[channel], source, alpha=scale[channel], out=tiles[channel])


class MllamaImageProcessor(MllamaImageProcessorBase):
    """Batched torch implementation of the Mllama preprocessing; outputs torch tensors by default."""

    default_tensors = "pt"

    def _pixels(self, decoded: list[list[tuple[np.ndarray, float]]], grids: list[list[tuple[int, int]]],
                max_images: int, s: Settings, *, device: str | torch.device | None) -> torch.Tensor:
        target = torch.device(device) if device is not None else torch.device("cpu")
        tile = s.tile_size
        shape = (len(decoded), max_images, s.max_image_tiles, 3, tile, tile)
        if target.type == "cpu":
            # Fresh huge-page memory: tiles no image uses are never touched, and the writes
            # fault in 2 MiB at a time (7-photo batch: 17 -> 13 ms of writes).
            pixels = fresh_zeros(shape, torch.float32)
        else:
            pixels = torch.zeros(shape, device=target)

        # Images of one size (and value range) are resized by one call.
        groups: dict[tuple[int, int, float], list[tuple[int, int]]] = {}
        for b, sample in enumerate(decoded):
            for j, (array, value_scale) in enumerate(sample):
                groups.setdefault((array.shape[0], array.shape[1], value_scale), []).append((b, j))
        # One affine map per channel from 0..255 levels to normalised values.
        shift = [torch.tensor(-m / d, dtype=torch.float32, device=target) for m, d in zip(s.mean, s.std)]
        for (in_height, in_width, value_scale), members in groups.items():
            grid = grids[members[0][0]][members[0][1]]
            height, width = size_on_canvas(in_height, in_width, grid[0] * tile, grid[1] * tile, tile)
            resized = _resize_group([decoded[b][j][0] for b, j in members], height, width, s.resample, target)
            # Zero padding at the bottom and right, before normalisation as in the reference.
            canvas = F.pad(resized, (0, grid[1] * tile - width, 0, grid[0] * tile - height))
            scale = [value_scale * s.rescale_factor / d for d in s.std]
            for k, (b, j) in enumerate(members):
                _write_tiles(pixels[b, j, : grid[0] * grid[1]], canvas[k], scale, shift)
        return pixels

