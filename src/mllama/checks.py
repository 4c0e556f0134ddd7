"""Cheap finiteness and dtype checks at load and input time, so NaN/Inf or raw bytes never turn
silently into garbage output."""

from __future__ import annotations

import torch
from torch import nn

from mllama.cpu_scans import count_not_finite

__all__ = ["check_finite_parameters", "check_pixel_values"]


def check_pixel_values(pixel_values: torch.Tensor, *, max_num_tiles: int | None = None) -> None:
    """pixel_values as the image processor makes them: a finite floating-point tensor with the
    model's max_num_tiles tiles per image (B, N_images, N_tiles, C, H, W)."""
    if not isinstance(pixel_values, torch.Tensor):
        raise TypeError(f"pixel_values must be a torch.Tensor, got {type(pixel_values).__name__}")
    if max_num_tiles is not None and (pixel_values.dim() != 6 or pixel_values.shape[2] != max_num_tiles):
        raise ValueError(f"pixel_values of shape {tuple(pixel_values.shape)} must be (batch, images, "
                         f"max_num_tiles={max_num_tiles}, channels, height, width): the image processor's "
                         "max_image_tiles must equal the model's vision_config.max_num_tiles, or the aspect-ratio "
                         "ids mean different tile layouts")
    if not pixel_values.is_floating_point():
        raise TypeError(f"pixel_values must be the image processor's normalized floats, got {pixel_values.dtype} "
                        "(raw image bytes?); pass the images through MllamaProcessor or MllamaImageProcessor")
    if not bool(torch.isfinite(pixel_values).all()):
        bad = int((~torch.isfinite(pixel_values)).sum())
        raise ValueError(f"pixel_values holds {bad} NaN/Inf values")


# Elements per isfinite call: its temporaries on a whole embedding (half a billion bf16 values) would
# be gigabytes on top of the model, the peak of a quantized load.
_FINITE_CHUNK = 1 << 24


def _count_not_finite(tensor: torch.Tensor) -> int:
    fast = count_not_finite(tensor)  # one pass at memory speed where csrc/scans.c runs
    if fast is not None:
        return fast
    flat = tensor.reshape(-1)
    bad = 0
    for i in range(0, flat.numel(), _FINITE_CHUNK):
        part = flat[i:i + _FINITE_CHUNK]
        # One reading pass: a NaN or an infinity makes the sum non-finite (so could an overflow, which
        # the exact count below then clears).
        if not bool(torch.isfinite(part.sum(dtype=torch.float32))):
            bad += int((~torch.isfinite(part)).sum())
    return bad


@torch.no_grad()
def check_finite_parameters(model: nn.Module, *, source: object) -> None:
    """Every floating parameter and buffer finite (checked in bounded chunks); names the bad ones otherwise."""
    bad = []
    for name, tensor in [*model.named_parameters(), *model.named_buffers()]:
        if tensor.is_floating_point() and not tensor.is_meta:
            count = _count_not_finite(tensor.detach())
            if count:
                bad.append(f"{name} ({count} of {tensor.numel()})")
    if bad:
        raise ValueError(f"{source}: NaN/Inf values in {', '.join(bad[:8])}{' ...' if len(bad) > 8 else ''}; "
                         "the checkpoint is corrupt")
