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

    def to(self, device: str | torch.device | None = None, *, dtype: torch.dtype | None = None) -> "BatchFeature":
        """Move tensors to `device`; `dtype` applies to floating-point tensors only (ids stay integers)."""
        out = type(self)()
        for key, value in self.items():
            if isinstance(value, torch.Tensor):
                cast = dtype if dtype is not None and value.is_floating_point() else None
                value = value.to(device=device, dtype=cast)
            out[key] = value
        return out


# The tokenizer's name for the same thing, as in transformers.
BatchEncoding = BatchFeature
