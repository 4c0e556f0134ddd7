"""Image preprocessing for Llama 3.2-Vision: RGB conversion, tile-canvas choice, resize, pad, normalise, tiles.

Two processors share the configuration (field names and defaults of a checkpoint's
preprocessor_config.json) and the input handling:

* `MllamaImageProcessorPil` resizes with PIL and computes in numpy, step by step as the reference
  implementation does, so its output matches it to float32 rounding.
* `MllamaImageProcessor` (in `image_processing_torch`, importable from here) batches the resize with
  torch and fuses rescale, normalisation, padding and tiling; it agrees with the PIL one to within
  one uint8 level (0.0150 after normalisation) because PIL rounds between its resize passes.

Input nesting (the reference rule):
  * one image (PIL, HWC/CHW array or tensor, or a path/URL/data URL) -> one sample with one image;
  * a 4-D array or tensor (N, C, H, W) / (N, H, W, C) -> one sample with N images;
  * a flat list of images -> ONE sample holding all of them (not a batch of single-image samples);
  * a flat list of 4-D arrays -> one sample per array;
  * a list of lists -> one sample per inner list; inner lists may be empty (a sample without image).
A 2-D array is taken as a grayscale image. Float arrays are read as [0, 1] images when they are not
integer-valued, and as [0, 255] images otherwise; with `do_rescale` they are then rescaled again, as
the reference does.
"""

from __future__ import annotations

import copy
import json
import math
import os
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any, Literal, Sequence

import numpy as np
import torch
from PIL import Image

from mllama.batch import BatchFeature
from mllama.devices import check_device
from mllama.hub import resolve_file
from mllama.image_loading import decode_image, load_image, nest_images

PREPROCESSOR_CONFIG_NAME = "preprocessor_config.json"
IMAGE_PROCESSOR_TYPE = "MllamaImageProcessor"
_ACCEPTED_TYPES = (IMAGE_PROCESSOR_TYPE, "MllamaImageProcessorPil", "MllamaImageProcessorFast")
_RESAMPLE_FILTERS = {int(f) for f in Image.Resampling}
ReturnTensors = Literal["pt", "np"] | None


# ---------------------------------------------------------------------------------------------------
# Tile geometry
# ---------------------------------------------------------------------------------------------------


@lru_cache(maxsize=16)
def supported_aspect_ratios(max_image_tiles: int) -> tuple[tuple[int, int], ...]:
    """Tile grids (rows, cols) with at most `max_image_tiles` tiles; aspect-ratio id = index + 1."""
    return tuple((rows, cols) for rows in range(1, max_image_tiles + 1) for cols in range(1, max_image_tiles + 1)
                 if rows * cols <= max_image_tiles)


@lru_cache(maxsize=1024)
def optimal_tile_grid(height: int, width: int, max_image_tiles: int, tile_size: int) -> tuple[int, int]:
    """The grid (rows, cols) whose canvas needs the least upscaling, else the least downscaling.

    The image's scale for a canvas is the smaller of the two axis ratios. Among the canvases that can
    hold the image at scale >= 1 the smallest such scale wins; when none can, the largest scale
    below 1 wins. Ties go to the canvas with the smallest area, then to the first grid listed.
    """
    grids = supported_aspect_ratios(max_image_tiles)
    scales = [min(rows * tile_size / height, cols * tile_size / width) for rows, cols in grids]
    upscales = [s for s in scales if s >= 1]
    best = min(upscales) if upscales else max(scales)
    candidates = [grid for grid, s in zip(grids, scales) if s == best]
    return min(candidates, key=lambda grid: grid[0] * grid[1])


def size_on_canvas(height: int, width: int, canvas_height: int, canvas_width: int, tile_size: int) -> tuple[int, int]:
    """Aspect-preserving (height, width) for the image on its canvas; each side clamped to [tile, canvas]."""
    target_h = min(max(height, tile_size), canvas_height)
    target_w = min(max(width, tile_size), canvas_width)
    scale_h, scale_w = target_h / height, target_w / width
    if scale_w < scale_h:
        return min(math.floor(height * scale_w) or 1, target_h), target_w
    return target_h, min(math.floor(width * scale_h) or 1, target_w)


def pil_nearest_indices(in_size: int, out_size: int) -> np.ndarray:
    """Source indices PIL's NEAREST resize reads: a running sum of the step from half a step on."""
    step = in_size / out_size
    positions = np.cumsum(np.r_[step * 0.5, np.full(out_size - 1, step)])  # sequential adds, as PIL accumulates
    return np.minimum(positions.astype(np.int64), in_size - 1)


# ---------------------------------------------------------------------------------------------------
# Configuration
# ---------------------------------------------------------------------------------------------------

_FIELDS = ("do_convert_rgb", "do_normalize", "do_pad", "do_rescale", "do_resize", "image_mean", "image_std",
           "max_image_tiles", "resample", "rescale_factor", "size")


@dataclass(frozen=True)
class Settings:
    """Validated, per-call processing settings."""

    do_convert_rgb: bool
    tile_size: int
    resample: int
    rescale_factor: float  # 1.0 when do_rescale is off
    mean: tuple[float, float, float]  # zeros when do_normalize is off
    std: tuple[float, float, float]  # ones when do_normalize is off
    max_image_tiles: int
    do_rescale: bool
    do_normalize: bool


def _tile_size(size: Any) -> int:
    if isinstance(size, int) and not isinstance(size, bool):
        size = {"height": size, "width": size}
    if not isinstance(size, dict) or set(size) != {"height", "width"}:
        raise ValueError(f"size must be an int or a dict with keys 'height' and 'width', got {size!r}")
    if size["height"] != size["width"] or not isinstance(size["height"], int) or size["height"] <= 0:
        raise ValueError(f"size must be square with a positive integer side (tiles are square), got {size!r}")
    return size["height"]


def _triple(value: Any, name: str) -> tuple[float, float, float]:
    values = [value] * 3 if isinstance(value, (int, float)) else value
    numbers = isinstance(values, (list, tuple)) and all(isinstance(v, (int, float)) for v in values)
    if not numbers or len(values) != 3:
        raise ValueError(f"{name} must be a number or a list of 3 numbers (one per RGB channel), got {value!r}")
    return tuple(float(v) for v in values)  # type: ignore[return-value]


class MllamaImageProcessorBase:
    """Configuration, validation and output assembly shared by the two processors."""

    def __init__(self, *, do_convert_rgb: bool = True, do_resize: bool = True,
                 size: dict[str, int] | int | None = None, resample: int = 2, do_rescale: bool = True,
                 rescale_factor: float = 1 / 255, do_normalize: bool = True,
                 image_mean: float | Sequence[float] = (0.5, 0.5, 0.5),
                 image_std: float | Sequence[float] = (0.5, 0.5, 0.5), do_pad: bool = True,
                 max_image_tiles: int = 4, extra: dict[str, Any] | None = None) -> None:
        size = {"height": 224, "width": 224} if size is None else size
        self.do_convert_rgb = do_convert_rgb
        self.do_resize = do_resize
        self.size = {"height": size, "width": size} if isinstance(size, int) else dict(size)
        self.resample = int(resample)
        self.do_rescale = do_rescale
        self.rescale_factor = rescale_factor
        self.do_normalize = do_normalize
        self.image_mean = list(image_mean) if isinstance(image_mean, (list, tuple)) else image_mean
        self.image_std = list(image_std) if isinstance(image_std, (list, tuple)) else image_std
        self.do_pad = do_pad
        self.max_image_tiles = max_image_tiles
        self.extra = dict(extra or {})  # unknown preprocessor_config.json keys, kept for round trips
        self.settings()

    # -- configuration I/O ------------------------------------------------------------------------

    @classmethod
    def from_dict(cls, config: dict[str, Any]) -> "MllamaImageProcessorBase":
        kind = config.get("image_processor_type")
        if kind is not None and kind not in _ACCEPTED_TYPES:
            raise ValueError(f"image_processor_type is {kind!r}, expected one of {_ACCEPTED_TYPES}")
        known = {key: copy.deepcopy(value) for key, value in config.items() if key in _FIELDS}
        extra = {key: copy.deepcopy(value) for key, value in config.items()
                 if key not in _FIELDS and key != "image_processor_type"}
        return cls(**known, extra=extra)

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike, *, revision: str | None = None) -> "MllamaImageProcessorBase":
        """Load from a checkpoint directory, a preprocessor_config.json file or a hub repo id."""
        config_file = resolve_file(path, PREPROCESSOR_CONFIG_NAME, revision=revision)
        try:
            data = json.loads(Path(config_file).read_text())
        except json.JSONDecodeError as err:
            raise ValueError(f"{config_file} is not valid JSON: {err}") from None
        if not isinstance(data, dict):
            raise ValueError(f"{config_file} must hold a JSON object")
        return cls.from_dict(data)

    def to_dict(self) -> dict[str, Any]:
        out = copy.deepcopy(self.extra)
        out.update({name: copy.deepcopy(getattr(self, name)) for name in _FIELDS})
        out["image_processor_type"] = IMAGE_PROCESSOR_TYPE
        return out

    def to_json_string(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n"

    def save_pretrained(self, save_directory: str | os.PathLike) -> Path:
        """Write preprocessor_config.json into `save_directory`; returns the file's path."""
        path = Path(save_directory)
        path.mkdir(parents=True, exist_ok=True)
        target = path / PREPROCESSOR_CONFIG_NAME
        target.write_text(self.to_json_string())
        return target

    def __repr__(self) -> str:
        return f"{type(self).__name__} {self.to_json_string()}"

    # -- validation ---------------------------------------------------------------------------------

    def settings(self, *, do_convert_rgb: bool | None = None, size: dict[str, int] | int | None = None,
                 resample: int | None = None, do_rescale: bool | None = None, rescale_factor: float | None = None,
                 do_normalize: bool | None = None, image_mean: float | Sequence[float] | None = None,
                 image_std: float | Sequence[float] | None = None, max_image_tiles: int | None = None,
                 do_resize: bool | None = None, do_pad: bool | None = None) -> Settings:
        """The instance's settings with any per-call overrides applied, validated."""
        def pick(value: Any, default: Any) -> Any:
            return default if value is None else value

        if not pick(do_resize, self.do_resize):
            raise ValueError("do_resize=False is not supported: images must be resized onto their tile canvas")
        if not pick(do_pad, self.do_pad):
            raise ValueError("do_pad=False is not supported: images must be padded to whole tiles")
        tiles = pick(max_image_tiles, self.max_image_tiles)
        if not isinstance(tiles, int) or isinstance(tiles, bool) or tiles <= 0:
            raise ValueError(f"max_image_tiles must be a positive integer, got {tiles!r}")
        filter_id = pick(resample, self.resample)
        if int(filter_id) not in _RESAMPLE_FILTERS:
            raise ValueError(f"resample must be a PIL resampling filter id {sorted(_RESAMPLE_FILTERS)}, "
                             f"got {filter_id!r}")
        factor = pick(rescale_factor, self.rescale_factor)
        if not isinstance(factor, (int, float)):
            raise ValueError(f"rescale_factor must be a number, got {factor!r}")
        mean = _triple(pick(image_mean, self.image_mean), "image_mean")
        std = _triple(pick(image_std, self.image_std), "image_std")
        if 0.0 in std:
            raise ValueError(f"image_std must not contain zeros, got {std}")
        rescale, normalize = bool(pick(do_rescale, self.do_rescale)), bool(pick(do_normalize, self.do_normalize))
        return Settings(do_convert_rgb=bool(pick(do_convert_rgb, self.do_convert_rgb)),
                        tile_size=_tile_size(pick(size, self.size)), resample=int(filter_id),
                        rescale_factor=float(factor) if rescale else 1.0,
                        mean=mean if normalize else (0.0, 0.0, 0.0), std=std if normalize else (1.0, 1.0, 1.0),
                        max_image_tiles=tiles, do_rescale=rescale, do_normalize=normalize)

    # -- shared pipeline pieces -----------------------------------------------------------------------

    @staticmethod
    def _decode_batch(images: Any, settings: Settings, data_format: str | None
                      ) -> list[list[tuple[np.ndarray, float]]]:
        samples = nest_images(images)
        decoded = [[decode_image(image, do_convert_rgb=settings.do_convert_rgb, data_format=data_format,
                                 where=f"sample {b}, image {j}")
                    for j, image in enumerate(sample)] for b, sample in enumerate(samples)]
        if not any(decoded):
            raise ValueError("no images to process: every sample is empty")
        return decoded

    @staticmethod
    def _layout(decoded: list[list[tuple[np.ndarray, float]]], settings: Settings
                ) -> tuple[list[list[tuple[int, int]]], np.ndarray, np.ndarray]:
        """Tile grid per image, aspect-ratio ids (B, I) and tile mask (B, I, T)."""
        grids = [[optimal_tile_grid(array.shape[0], array.shape[1], settings.max_image_tiles, settings.tile_size)
                  for array, _ in sample] for sample in decoded]
        max_images = max(len(sample) for sample in grids)
        ratios = supported_aspect_ratios(settings.max_image_tiles)
        ids = np.zeros((len(grids), max_images), dtype=np.int64)
        mask = np.zeros((len(grids), max_images, settings.max_image_tiles), dtype=np.int64)
        mask[:, :, 0] = 1  # the reference marks tile 0 of every slot, padded image slots included
        for b, sample in enumerate(grids):
            for j, (rows, cols) in enumerate(sample):
                ids[b, j] = ratios.index((rows, cols)) + 1
                mask[b, j, : rows * cols] = 1
        return grids, ids, mask

    @staticmethod
    def _check_return_tensors(return_tensors: str | None) -> None:
        if return_tensors not in (None, "pt", "np"):
            raise ValueError(f"return_tensors must be 'pt', 'np' or None, got {return_tensors!r}")

    def preprocess(self, images: Any, *, return_tensors: ReturnTensors = None, do_convert_rgb: bool | None = None,
                   size: dict[str, int] | int | None = None, resample: int | None = None,
                   do_rescale: bool | None = None, rescale_factor: float | None = None,
                   do_normalize: bool | None = None, image_mean: float | Sequence[float] | None = None,
                   image_std: float | Sequence[float] | None = None, max_image_tiles: int | None = None,
                   do_resize: bool | None = None, do_pad: bool | None = None,
                   input_data_format: str | None = None, device: str | torch.device | None = None) -> BatchFeature:
        """Images -> pixel_values (B, I, T, 3, S, S) float32, aspect_ratio_ids (B, I), aspect_ratio_mask
        (B, I, T), num_tiles (per-sample lists); I = most images in a sample, T = max_image_tiles.
        `device` (torch class only) is where the resize and normalisation run and the tensors end up."""
        self._check_return_tensors(return_tensors)
        if device is not None:
            device = check_device(device)
        s = self.settings(do_convert_rgb=do_convert_rgb, size=size, resample=resample, do_rescale=do_rescale,
                          rescale_factor=rescale_factor, do_normalize=do_normalize, image_mean=image_mean,
                          image_std=image_std, max_image_tiles=max_image_tiles, do_resize=do_resize, do_pad=do_pad)
        decoded = self._decode_batch(images, s, input_data_format)
        grids, ids, mask = self._layout(decoded, s)
        pixels = self._pixels(decoded, grids, ids.shape[1], s, device=device)
        return _features(pixels, ids, mask, grids, return_tensors or self.default_tensors)

    __call__ = preprocess

    default_tensors = "np"

    def _pixels(self, decoded: list[list[tuple[np.ndarray, float]]], grids: list[list[tuple[int, int]]],
                max_images: int, s: Settings, *, device: str | torch.device | None) -> np.ndarray | torch.Tensor:
        """(B, max_images, max_image_tiles, 3, S, S) normalised tiles: what the two classes do differently."""
        raise NotImplementedError


class MllamaImageProcessorPil(MllamaImageProcessorBase):
    """The reference pipeline with PIL and numpy, one image at a time; outputs numpy by default."""

    def _pixels(self, decoded: list[list[tuple[np.ndarray, float]]], grids: list[list[tuple[int, int]]],
                max_images: int, s: Settings, *, device: str | torch.device | None) -> np.ndarray:
        if device is not None:
            raise ValueError("MllamaImageProcessorPil runs on the CPU; use MllamaImageProcessor for device=")
        tile = s.tile_size
        pixels = np.zeros((len(decoded), max_images, s.max_image_tiles, 3, tile, tile), dtype=np.float32)
        mean = np.asarray(s.mean, dtype=np.float32)[:, None, None]
        std = np.asarray(s.std, dtype=np.float32)[:, None, None]
        for b, sample in enumerate(decoded):
            for j, (array, value_scale) in enumerate(sample):
                rows, cols = grids[b][j]
                height, width = size_on_canvas(array.shape[0], array.shape[1], rows * tile, cols * tile, tile)
                image = np.asarray(Image.fromarray(array).resize((width, height), resample=s.resample))
                image = image.transpose(2, 0, 1)
                # Same dtype sequence as the reference: back to the input's range in float32, zero padding,
                # rescale through float64, normalise in float32.
                if value_scale != 1.0:
                    image = (image.astype(np.float64) * value_scale).astype(np.float32)
                image = np.pad(image, ((0, 0), (0, rows * tile - height), (0, cols * tile - width)))
                if s.do_rescale:
                    image = (image.astype(np.float64) * s.rescale_factor).astype(np.float32)
                if s.do_normalize:
                    image = (image.astype(np.float32, copy=False) - mean) / std
                # (3, rows*S, cols*S) -> (rows*cols, 3, S, S), tiles in row-major order
                tiles = image.reshape(3, rows, tile, cols, tile).transpose(1, 3, 0, 2, 4)
                pixels[b, j, : rows * cols] = tiles.reshape(rows * cols, 3, tile, tile)
        return pixels


def _features(pixels: np.ndarray | torch.Tensor, ids: np.ndarray, mask: np.ndarray,
              grids: list[list[tuple[int, int]]], return_tensors: str) -> BatchFeature:
    num_tiles = [[rows * cols for rows, cols in sample] for sample in grids]
    if return_tensors == "pt":
        device = pixels.device if isinstance(pixels, torch.Tensor) else None
        as_tensor = lambda x: x if isinstance(x, torch.Tensor) else torch.from_numpy(x).to(device)  # noqa: E731
        return BatchFeature(pixel_values=as_tensor(pixels), aspect_ratio_ids=as_tensor(ids),
                            aspect_ratio_mask=as_tensor(mask), num_tiles=num_tiles)
    if isinstance(pixels, torch.Tensor):
        pixels = pixels.cpu().numpy()
    return BatchFeature(pixel_values=pixels, aspect_ratio_ids=ids, aspect_ratio_mask=mask, num_tiles=num_tiles)


def __getattr__(name: str) -> Any:
    # The torch processor's module imports this one, so it is imported on first use.
    if name == "MllamaImageProcessor":
        from mllama.image_processing_torch import MllamaImageProcessor
        return MllamaImageProcessor
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = ["BatchFeature", "MllamaImageProcessor", "MllamaImageProcessorBase", "MllamaImageProcessorPil",
           "load_image", "optimal_tile_grid", "size_on_canvas", "supported_aspect_ratios"]
