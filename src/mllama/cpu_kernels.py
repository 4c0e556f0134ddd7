"""A bf16 matrix-vector kernel for CPU decoding, built from csrc/gemv_bf16.c on first use.

Decoding one token reads every weight once, so tokens/s is set by how fast the weights stream from
memory. On the project's AMD EPYC (AVX-512 BF16) torch 2.13's bf16 `F.linear` with one row streams
them at 16-17 GB/s, csrc/gemv_bf16.c at 30-38 GB/s (the machine reads 33-51 GB/s; see
benchmarks/RESULTS.md). The C file is compiled with the system C compiler into a per-user cache
the first time it is needed (about a second) and called through ctypes. Without a compiler, on a CPU with neither AVX-512 BF16 nor AVX2,
or with MLLAMA_NO_KERNELS=1, everything falls back to `F.linear`.

`gemv_bf16` is a torch custom op, so a torch.compile'd decode step keeps it as one opaque call.
"""

from __future__ import annotations

import ctypes
import hashlib
import math
import mmap
import os
import platform
import shutil
import subprocess
import tempfile
import warnings
from pathlib import Path

import torch

SOURCE = Path(__file__).parent / "csrc" / "gemv_bf16.c"
MAX_ROWS = 4  # beyond a few rows the GEMM kernels win (weights are reused from cache there)

_lib: ctypes.CDLL | None = None
_level = 0
_tried = False


def _cache_dir() -> Path:
    root = os.environ.get("MLLAMA_CACHE") or os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(root) / "mllama" / "kernels"


def _build(source: Path) -> Path:
    """Compile `source` into the cache (keyed by its hash) unless already there; returns the .so path."""
    digest = hashlib.sha256(source.read_bytes()).hexdigest()[:16]
    target = _cache_dir() / f"gemv_bf16-{digest}-{platform.machine()}.so"
    if target.exists():
        return target
    compiler = os.environ.get("CC") or shutil.which("gcc") or shutil.which("cc")
    if compiler is None:
        raise RuntimeError("no C compiler (gcc or cc) on PATH")
    target.parent.mkdir(parents=True, exist_ok=True)
    # Build under a temporary name and rename, so concurrent first uses never load a partial file.
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        partial = Path(tmp) / target.name
        cmd = [compiler, "-O3", "-shared", "-fPIC", "-fopenmp", str(source), "-o", str(partial)]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd)} failed:\n{proc.stderr[-2000:]}")
        os.replace(partial, target)
    return target


def _load() -> None:
    global _lib, _level, _tried
    _tried = True
    if os.environ.get("MLLAMA_NO_KERNELS") or platform.machine() not in ("x86_64", "AMD64"):
        return
    try:
        lib = ctypes.CDLL(str(_build(SOURCE)))
    except (OSError, RuntimeError) as err:
        warnings.warn(f"mllama: bf16 decode kernel unavailable, using F.linear ({err})", RuntimeWarning,
                      stacklevel=3)
        return
    lib.mllama_gemv_bf16.argtypes = [ctypes.c_void_p] * 3 + [ctypes.c_int64] * 3 + [ctypes.c_int] * 2
    lib.mllama_gemv_bf16.restype = None
    _level = lib.mllama_gemv_level()
    _lib = lib if _level > 0 else None


def gemv_available() -> bool:
    if not _tried:
        _load()
    return _lib is not None


def use_gemv(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """Whether `x @ weight.T` should go through the kernel: few rows, bf16, CPU, no autograd."""
    return (x.dtype == torch.bfloat16 and weight.dtype == torch.bfloat16 and x.device.type == "cpu"
            and weight.device.type == "cpu" and x.shape[:-1].numel() <= MAX_ROWS
            and not torch.is_grad_enabled() and gemv_available())


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


@torch.library.custom_op("mllama::gemv_bf16", mutates_args=())
def gemv_bf16(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """(..., K) bf16 x (N, K) bf16 -> (..., N) bf16, accumulated in float32 and rounded once."""
    if not gemv_available():
        raise RuntimeError("the bf16 decode kernel is not available on this machine")
    k = x.shape[-1]
    if weight.dim() != 2 or weight.shape[1] != k:
        raise ValueError(f"gemv_bf16: x has {k} features but weight has shape {tuple(weight.shape)}")
    out = gemv_float32(x.reshape(-1, k), weight, level=_level)
    return out.to(torch.bfloat16).reshape(*x.shape[:-1], weight.shape[0])


def gemv_float32(rows: torch.Tensor, weight: torch.Tensor, *, level: int) -> torch.Tensor:
    """(M, K) bf16 x (N, K) bf16 -> (M, N) float32 with the given instruction set (2 or 1; tests use both)."""
    if _lib is None or level > _level or level < 1:
        raise RuntimeError(f"kernel level {level} not available (this CPU: {_level})")
    rows, weight = rows.contiguous(), weight.contiguous()
    out = torch.empty(rows.shape[0], weight.shape[0], dtype=torch.float32)
    _lib.mllama_gemv_bf16(rows.data_ptr(), weight.data_ptr(), out.data_ptr(), rows.shape[0], weight.shape[0],
                          rows.shape[1], torch.get_num_threads(), level)
    return out


@gemv_bf16.register_fake
def _(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    return x.new_empty(*x.shape[:-1], weight.shape[0])
