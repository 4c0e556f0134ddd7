"""Host memory for weights: fresh tensors on transparent huge pages, and handing the C heap's free
pages back to the OS after many temporaries (loading, quantizing)."""

from __future__ import annotations

import ctypes
import functools
import math
import mmap
import threading

import torch

# Tensors at least this large get their own huge-page mapping (one transparent huge page is 2 MiB).
HUGE_PAGE_MIN_BYTES = 2 * 2**20
# Smaller long-lived tensors (a quantized linear's scales and offsets) share mappings of this size.
SHARED_CHUNK_BYTES = 32 * 2**20
_SHARED_ALIGN = 64  # bytes: each tensor starts on its own cache line


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


class _SharedHugePages:
    """Bump allocation of small tensors out of shared MADV_HUGEPAGE mappings. Space is never reused:
    a mapping is unmapped when its last tensor is gone (the tensors hold it; the allocator also holds
    the one it is filling, at most SHARED_CHUNK_BYTES), so it suits tensors that live as long as a
    model, not per-request temporaries."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._chunk: torch.Tensor | None = None  # uint8, the mapping now being filled
        self._used = 0

    def take(self, nbytes: int) -> torch.Tensor:
        with self._lock:
            if self._chunk is None or self._used + nbytes > self._chunk.numel():
                memory = mmap.mmap(-1, SHARED_CHUNK_BYTES, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
                memory.madvise(mmap.MADV_HUGEPAGE)
                self._chunk, self._used = torch.frombuffer(memory, dtype=torch.uint8), 0
            start = self._used
            self._used = -(-(start + nbytes) // _SHARED_ALIGN) * _SHARED_ALIGN
            return self._chunk[start:start + nbytes]


_shared = _SharedHugePages()


def fresh_params(shape: tuple[int, ...] | torch.Size, dtype: torch.dtype) -> torch.Tensor:
    """A new zero CPU tensor for a weight's scales or offsets, on transparent huge pages: small ones
    (below HUGE_PAGE_MIN_BYTES, most of them) share mappings with others, large ones get their own
    (fresh_zeros). A one-row int4 product reads its weight's scales and offsets beside the packed
    weights, 8 more streams a thread: from huge pages the product alone ran 0-13% faster (most when
    the machine read fast), a decode neutral to 10% (benchmarks/RESULTS.md). The tensor is a view: its storage may hold other tensors (a
    safetensors file gets the view's own bytes; torch.save would write the whole storage)."""
    nbytes = math.prod(shape) * dtype.itemsize
    if nbytes >= HUGE_PAGE_MIN_BYTES or nbytes == 0 or not hasattr(mmap, "MADV_HUGEPAGE"):
        return fresh_zeros(shape, dtype)
    return _shared.take(nbytes).view(dtype).view(shape)


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
