"""Host memory for weights: fresh tensors on transparent huge pages, and handing the C heap's free
pages back to the OS after many temporaries (loading, quantizing)."""

from __future__ import annotations

import ctypes
import functools
import math
import mmap

import torch

# Tensors at least this large get their own huge-page mapping (one transparent huge page is 2 MiB).
HUGE_PAGE_MIN_BYTES = 2 * 2**20


def fresh_zeros(shape: tuple[int, ...] | torch.Size, dtype: torch.dtype) -> torch.Tensor:
    """A new CPU tensor in its own zero-filled anonymous mapping, backed by transparent huge pages
    where the kernel grants them on request (MADV_HUGEPAGE). Small or elsewhere: torch.zeros.

    Streaming a weight matrix through the decode kernel is 5-20% faster from huge pages (fewer TLB
    misses; measured interleaved on the project's machine), and writing into fresh memory costs
    fewer page faults. Pages never written are never allocated.
    """
    nbytes = math.prod(shape) * dtype.itemsize
    if nbytes < HUGE_PAGE_MIN_BYTES or not hasattr(mmap, "MADV_HUGEPAGE"):
        return torch.zeros(shape, dtype=dtype)
    memory = mmap.mmap(-1, nbytes, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    memory.madvise(mmap.MADV_HUGEPAGE)
    return torch.frombuffer(memory, dtype=dtype).view(shape)  # the tensor keeps `memory` alive


@functools.cache
def _libc() -> ctypes.CDLL | None:
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return None
    return libc if hasattr(libc, "malloc_trim") else None


def trim_heap() -> None:
    """Hand the C allocator's free pages back to the OS (glibc's malloc_trim; elsewhere a no-op).
    Freed float32 temporaries of a quantization stay mapped in glibc's heap when later allocations
    pin it, and over hundreds of tensors they add up to several times an int4 model's bytes."""
    libc = _libc()
    if libc is not None:
        libc.malloc_trim(0)
