"""Reading images: `load_image` for files, URLs and base64, and the decoding of every accepted input.

`decode_image` turns a PIL image, numpy array or torch tensor into uint8 RGB (H, W, 3), the form
both processors resize from; `nest_images` arranges the accepted input forms into samples of images.
The rules (channel-axis guess, alpha onto white, float ranges, nesting) are those of the reference
Mllama image processor; see `mllama.image_processing` for a summary.
"""

from __future__ import annotations

import base64
import binascii
import os
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageOps

from mllama.image_guard import ImageLimits, default_limits, fetch_image_bytes, open_limited
from mllama.image_guard import is_url

ImageLike = Any  # PIL.Image.Image | np.ndarray | torch.Tensor | str | os.PathLike



def load_image(source: str | os.PathLike | bytes | Image.Image, *, timeout: float = 10.0,
               limits: ImageLimits | None = None) -> Image.Image:
    """Open an image from a PIL image, a local path, an http(s) URL, a data URL or base64 text.

    Like the reference loader, the EXIF orientation is applied and the result is converted to RGB
    (an alpha channel is dropped, not composited). `limits` (mllama.image_guard.ImageLimits) bounds
    what is read: URLs to public addresses only, one deadline (`timeout` when limits is None), a byte
    limit while downloading, a pixel budget checked before decoding, PNG/JPEG/WebP/GIF/BMP/TIFF only,
    local paths unless allow_local=False.
    """
    limits = limits if limits is not None else default_limits(timeout=timeout)
    if isinstance(source, Image.Image):
        return ImageOps.exif_transpose(source).convert("RGB")
    if isinstance(source, bytes):
        return open_limited(source, what="the given bytes", limits=limits)
    if isinstance(source, (str, os.PathLike)):
        text = os.fspath(source)
        if not isinstance(text, str):
            raise TypeError(f"load_image: bytes paths are not supported, got {source!r}")
        return _open_source(text, limits=limits, may_be_text=isinstance(source, str))
    raise TypeError(f"load_image: expected a PIL image, a path, a URL or base64 text, got {type(source).__name__}")


def _open_source(text: str, *, limits: ImageLimits, may_be_text: bool) -> Image.Image:
    short = text if len(text) <= 80 else text[:77] + "..."
    if may_be_text and is_url(text):
        return open_limited(fetch_image_bytes(text, limits), what=short, limits=limits)
    if may_be_text and text[:5].lower() == "data:":
        header, _, payload = text.partition(",")
        if not header.endswith(";base64"):
            raise ValueError(f"load_image: only base64 data URLs are supported, got {short!r}")
        try:
            data = base64.b64decode(payload)
        except (binascii.Error, ValueError) as err:
            raise ValueError(f"load_image: the data URL's base64 payload does not decode: {err}") from None
        return open_limited(data, what="the data URL", limits=limits)
    if not limits.allow_local:  # never touch the file system, so the error tells nothing about it
        if may_be_text and (image := _open_base64(text, limits)) is not None:
            return image
        raise ValueError(f"load_image: {short!r} is not an http(s) URL, a data URL or base64 image data "
                         "(local paths are not allowed here)")
    path = Path(text)
    try:
        is_file, exists = path.is_file(), path.exists()
    except OSError:  # e.g. base64 text longer than a file name may be
        is_file = exists = False
    if is_file:
        return open_limited(path, what=str(path), limits=limits)
    if exists:
        raise ValueError(f"load_image: {text} is not a file")
    if may_be_text and (image := _open_base64(text, limits)) is not None:
        return image
    raise FileNotFoundError(f"load_image: {short!r} is neither an existing file, an http(s) URL, "
                            "a data URL nor base64-encoded image data")


def _open_base64(text: str, limits: ImageLimits) -> Image.Image | None:
    """The image in base64 text, or None when the text does not decode as base64 or its bytes are
    refused as an image (the caller then reports the input as unrecognised)."""
    try:
        return open_limited(base64.b64decode(text, validate=True), what="base64 text", limits=limits)
    except (binascii.Error, ValueError):
        return None


def _pil_to_rgb_array(image: Image.Image) -> np.ndarray:
    """RGB uint8 (H, W, 3); transparency (alpha band or a transparent palette entry) goes onto white."""
    if image.mode in ("I", "F") or image.mode.startswith("I;16"):
        # transformers converts these the same way (PIL clips to 0..255, no scaling); kept for
        # compatibility, but a 16-bit scan or float image comes out mostly black or white.
        warnings.warn(f"a PIL image of mode {image.mode!r} is converted to RGB by clipping its values to 0..255, "
                      "not by scaling them (as transformers does); scale it to 8 bits first", stacklevel=4)
    try:
        if "A" in image.getbands() or image.info.get("transparency") is not None:
            rgba = image.convert("RGBA")
            white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
            image = Image.alpha_composite(white, rgba)
        # convert() copies even an RGB image; np.asarray copies anyway, so skip the extra copy.
        return np.asarray(image if image.mode == "RGB" else image.convert("RGB"))
    except (ValueError, OSError) as err:
        raise ValueError(f"cannot convert a PIL image of mode {image.mode!r} to RGB: {err}") from None


def _array_to_hwc(array: np.ndarray, data_format: str | None, where: str) -> np.ndarray:
    if array.ndim == 2:
        return array[:, :, None]
    if array.ndim != 3:
        raise ValueError(f"{where}: an image array must have 2 or 3 dimensions, got shape {tuple(array.shape)}")
    if data_format == "channels_first":
        return np.moveaxis(array, 0, -1)
    if data_format == "channels_last":
        return array
    if data_format is not None:
        raise ValueError(f"input_data_format must be 'channels_first', 'channels_last' or None, got {data_format!r}")
    # Channels-first wins when both ends could be channels, as in the reference.
    if array.shape[0] in (1, 3, 4):
        return np.moveaxis(array, 0, -1)
    if array.shape[-1] in (1, 3, 4):
        return array
    raise ValueError(f"{where}: cannot find the channel axis of shape {tuple(array.shape)}; "
                     "expected 1, 3 or 4 channels first or last")


def _composite_rgba(array: np.ndarray, where: str) -> np.ndarray:
    if np.issubdtype(array.dtype, np.floating):
        if array.min() < 0.0 or array.max() > 1.0:
            raise ValueError(f"{where}: a float RGBA image must lie in [0, 1], got [{array.min()}, {array.max()}]")
        alpha = array[..., 3:4]
        return (alpha * array[..., :3] + (1 - alpha)).astype(array.dtype)
    alpha = array[..., 3:4] / 255
    return np.round(alpha * array[..., :3] + (1 - alpha) * 255).astype(array.dtype)


def decode_image(image: ImageLike, *, do_convert_rgb: bool, data_format: str | None = None,
                 where: str = "image") -> tuple[np.ndarray, float]:
    """Any accepted image -> (uint8 RGB (H, W, 3), factor back to the input's value range).

    The factor is 1/255 for a [0, 1] float image (quantised here, as the reference does before its
    PIL resize) and 1 otherwise.
    """
    if isinstance(image, (str, os.PathLike)):
        image = load_image(image)
    if isinstance(image, Image.Image):
        if image.width == 0 or image.height == 0:
            raise ValueError(f"{where}: the image is empty ({image.width}x{image.height})")
        array = _pil_to_rgb_array(image) if do_convert_rgb else _array_to_hwc(np.asarray(image), "channels_last", where)
    else:
        if isinstance(image, torch.Tensor):
            tensor = image.detach().cpu()
            image = (tensor.float() if tensor.dtype in (torch.bfloat16, torch.float16) else tensor).numpy()
        if not isinstance(image, np.ndarray):
            raise TypeError(f"{where}: expected a PIL image, numpy array, torch tensor or path, "
                            f"got {type(image).__name__}")
        if image.dtype.kind not in "uif":
            raise TypeError(f"{where}: unsupported image dtype {image.dtype}; use uint8, integer or float")
        if image.size == 0:
            raise ValueError(f"{where}: the image is empty (shape {tuple(image.shape)})")
        array = _array_to_hwc(image, data_format, where)
        if do_convert_rgb and array.shape[-1] == 1:
            array = np.repeat(array, 3, axis=-1)
        elif do_convert_rgb and array.shape[-1] == 4:
            array = _composite_rgba(array, where)
    if array.shape[-1] != 3:
        raise ValueError(f"{where}: expected 3 (RGB) channels, got {array.shape[-1]}; "
                         "keep do_convert_rgb=True for grayscale or RGBA input")
    return _quantize(array, where)


def _quantize(array: np.ndarray, where: str) -> tuple[np.ndarray, float]:
    if array.dtype == np.uint8:
        return np.ascontiguousarray(array), 1.0
    if not np.isfinite(array).all():
        raise ValueError(f"{where}: the image contains NaN or infinite values")
    low, high = array.min(), array.max()
    if np.allclose(array, array.astype(np.int64)):  # integer-valued: read as 0..255 (reference tolerance)
        if low < 0 or high > 255:
            raise ValueError(f"{where}: integer-valued pixels must lie in [0, 255], got [{low}, {high}]")
        return np.ascontiguousarray(array.astype(np.uint8)), 1.0
    if low < 0 or high > 1:
        raise ValueError(f"{where}: float pixels must lie in [0, 1] (or be integers in [0, 255]), got [{low}, {high}]")
    # Truncation after a float32 round trip, exactly as the reference converts to uint8 for PIL.
    return np.ascontiguousarray((array.astype(np.float64) * 255).astype(np.float32).astype(np.uint8)), 1 / 255


def _is_image(value: Any) -> bool:
    return isinstance(value, (Image.Image, np.ndarray, torch.Tensor))


def _load_sources(images: Any) -> Any:
    if isinstance(images, (list, tuple)):
        return [_load_sources(item) for item in images]
    if isinstance(images, (str, os.PathLike)):
        return load_image(images)
    return images


def _single_image(value: Any) -> bool:
    return isinstance(value, Image.Image) or value.ndim in (2, 3)


def nest_images(images: Any) -> list[list[Any]]:
    """Arrange the accepted input forms into samples -> images (see the module docstring)."""
    images = _load_sources(images)
    if _is_image(images):
        if _single_image(images):
            return [[images]]
        if images.ndim == 4:
            return [list(images)]
        raise ValueError(f"an image array must have 2, 3 or 4 (a stack) dimensions, got shape {tuple(images.shape)}")
    if not isinstance(images, list):
        raise TypeError(f"images must be an image, a list of images or a list of lists of images, "
                        f"got {type(images).__name__}")
    if all(isinstance(sample, list) for sample in images):
        for b, sample in enumerate(images):
            for j, image in enumerate(sample):
                if not _is_image(image):
                    raise TypeError(f"sample {b}, image {j}: expected a PIL image, numpy array, torch tensor or "
                                    f"path, got {type(image).__name__}")
        return images
    if not all(_is_image(image) for image in images):
        kinds = sorted({type(image).__name__ for image in images})
        raise TypeError(f"a list of images must hold only images or only lists of images, got {kinds}")
    if _single_image(images[0]):
        return [images]
    if not all(isinstance(stack, (np.ndarray, torch.Tensor)) and stack.ndim == 4 for stack in images):
        raise ValueError("a list starting with a 4-D stack of images must hold only 4-D stacks (one per sample)")
    return [list(stack) for stack in images]
