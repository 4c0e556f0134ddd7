"""Device arguments checked up front: a named error instead of a crash deep inside torch."""

from __future__ import annotations

import torch

__all__ = ["check_device"]


def check_device(device: str | torch.device, *, name: str = "device") -> torch.device:
    """`device` as a torch.device that exists on this machine; ValueError naming `name` otherwise."""
    try:
        resolved = torch.device(device)
    except (RuntimeError, TypeError) as err:
        raise ValueError(f"{name}={device!r} is not a device: {err}") from None
    if resolved.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"{name}={str(device)!r} but CUDA is not available here (torch.cuda.is_available() "
                             "is False: no GPU, or a CPU-only torch); use device='cpu'")
        if resolved.index is not None and resolved.index >= torch.cuda.device_count():
            raise ValueError(f"{name}={str(device)!r} but this machine has {torch.cuda.device_count()} CUDA devices")
    elif resolved.type == "mps" and not torch.backends.mps.is_available():
        raise ValueError(f"{name}={str(device)!r} but MPS is not available here; use device='cpu'")
    return resolved
