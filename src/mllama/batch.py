"""The dict of model inputs returned by the tokenizer, image processors and processor."""

from __future__ import annotations

from typing import Any

import torch


class BatchFeature(dict):
    """A dict of model inputs with attribute access (`inputs.pixel_values`) and `.to(device, dtype=)`."""

    def __getattr__(self, name: str) -> Any:
        try:
            return self[name]
        except KeyError:
            raise AttributeError(name) from None

    @property
    def data(self) -> dict[str, Any]:
        """The plain dict of inputs (transformers' BatchFeature.data)."""
        return dict(self)

    def to(self, *args: str | torch.device | int | torch.dtype, device: str | torch.device | int | None = None,
           dtype: torch.dtype | None = None) -> "BatchFeature":
        """Move tensors to `device`; `dtype` applies to floating-point tensors only (ids stay integers).
        As in transformers, positional arguments may be a device, a dtype, or both:
        `.to("cuda")`, `.to(torch.bfloat16)`, `.to("cuda", torch.bfloat16)`."""
        for arg in args:
            if isinstance(arg, torch.dtype):
                if dtype is not None:
                    raise TypeError("BatchFeature.to got two dtypes")
                dtype = arg
            elif isinstance(arg, (str, torch.device, int)):
                if device is not None:
                    raise TypeError("BatchFeature.to got two devices")
                device = arg
            else:
                raise TypeError(f"BatchFeature.to takes a device and/or a torch.dtype, got {type(arg).__name__}")
        out = type(self)()
        for key, value in self.items():
            if isinstance(value, torch.Tensor):
                cast = dtype if dtype is not None and value.is_floating_point() else None
                value = value.to(device=device, dtype=cast)
            out[key] = value
        return out


# The tokenizer's name for the same thing, as in transformers.
BatchEncoding = BatchFeature
