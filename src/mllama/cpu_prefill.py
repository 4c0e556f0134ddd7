"""Prompt-sized products against int8 / int4 weights: csrc/gemm_prefill.c's tiles on CPUs with AVX-512
BF16 and no AMX (built on first use like mllama.cpu_kernels' kernels), and the blocked route of the rest.

From PREFILL_MIN_ROWS to PREFILL_MAX_ROWS rows of bf16 x, `_QuantizedLinear.product` sends x here
instead of dequantizing the whole weight for the library GEMM (blocked_product, below): the
weight is dequantized a cache-sized block at a time and multiplied there, so its bf16 copy never goes
to memory and back (benchmarks/RESULTS.md). Fewer rows take the small-row kernels (cpu_kernels), AMX CPUs their tiles.
The result is the float32 product over the same dequantized weights, in another summation order than
the library's, rounded to bf16. Other prompts (more rows, float32 x, other CPUs) take blocked_product:
the weight dequantized in large blocks of output rows, each block through the library GEMM.
"""

from __future__ import annotations

import ctypes
import threading
from collections.abc import Callable
from pathlib import Path

import torch

from mllama import cpu_kernels
from mllama.host_memory import fresh_zeros
from mllama.kernel_cache import load_kernel

SOURCE = Path(__file__).parent / "csrc" / "gemm_prefill.c"
# Rows of x from which the kernel takes a product: at 64 rows it ran 0.99x (int8) / 0.98x (int4 g128) the
# bf16 GEMM's time against 1.32x / 1.29x for the whole-weight route; fewer rows go to the small-row kernels.
PREFILL_MIN_ROWS = cpu_kernels.MAX_QUANT_ROWS + 1
# From about 500 rows the whole-weight route ran as fast (its dequantization is a small share there), and
# past 1000 (an image's 1601 rows) faster: those rows keep it.
PREFILL_MAX_ROWS = 384
BLOCK_VALUES = 512  # csrc/gemm_prefill.c's KC: the k values a block dequantizes, a multiple of the int4 group

_lib: ctypes.CDLL | None = None
_tried = False


def _load() -> None:
    global _lib, _tried
    _tried = True
    if cpu_kernels.gemv_level() != 2:  # AVX-512 BF16 without AMX (0 also for MLLAMA_NO_KERNELS=1, no compiler)
        return
    lib = load_kernel(SOURCE, fallback="prefill kernel unavailable, dequantizing whole weights", stacklevel=3)
    if lib is None:
        return
    lib.mllama_prefill_quant.argtypes = ([ctypes.c_int, ctypes.c_void_p] + [ctypes.c_int64] * 4
                                         + [ctypes.c_void_p] * 3 + [ctypes.c_int, ctypes.c_int64, ctypes.c_void_p,
                                                                    ctypes.c_int])
    lib.mllama_prefill_quant.restype = ctypes.c_int
    lib.mllama_prefill_usable.restype = ctypes.c_int
    _lib = lib if lib.mllama_prefill_usable() else None


def prefill_available() -> bool:
    """Whether csrc/gemm_prefill.c runs here."""
    if not _tried:
        _load()
    return _lib is not None


def takes(x: torch.Tensor, fmt: str, group_size: int) -> bool:
    """Whether prefill_product takes bf16 x of this many rows against `fmt` weights of this group size."""
    return (x.dtype == torch.bfloat16 and PREFILL_MIN_ROWS <= x.shape[:-1].numel() <= PREFILL_MAX_ROWS
            and x.device.type == "cpu"
            and (fmt == "int8" or (group_size >= 32 and BLOCK_VALUES % group_size == 0)) and prefill_available())


def prefill_product(x: torch.Tensor, fmt: str, weight: torch.Tensor, scale: torch.Tensor,
                    offset: torch.Tensor | None = None, *, group_size: int = 0) -> torch.Tensor:
    """(..., K) bf16 x against int8 (weight (N, K), scale (N,)) or int4 (cpu_kernels.small_gemm's
    format) weights -> (..., N) bf16: the float32 product over the dequantized weights
    (quantize.dequantize_int8 / _int4's values), rounded once. Check `takes` first."""
    k = x.shape[-1]
    k_row = cpu_kernels.row_length(fmt, weight)
    if k > k_row or (fmt == "int8" and k != k_row):
        raise ValueError(f"prefill_product: input of {k} features against an {fmt} weight of shape "
                         f"{tuple(weight.shape)}")
    rows = x.reshape(-1, k).contiguous()
    weight, scale = weight.contiguous(), scale.contiguous()
    offset = offset.contiguous() if offset is not None else None
    scale_bf16 = cpu_kernels.scales_bf16(scale, offset)
    if scale_bf16 is None:
        raise ValueError("prefill_product: scales and offsets must be all float32 or all bf16")
    n = weight.shape[0]
    out = torch.empty(rows.shape[0], n, dtype=torch.bfloat16)
    rc = _lib.mllama_prefill_quant(cpu_kernels.FORMAT_CODES[fmt], rows.data_ptr(), rows.shape[0], k, n, k_row,
                                   *cpu_kernels.weight_pointers(weight, scale, offset), int(scale_bf16), group_size,
                                   out.data_ptr(), torch.get_num_threads())
    if rc == -2:
        raise MemoryError(f"prefill_product: could not allocate the kernel's buffers for {rows.shape[0]} rows")
    if rc != 0:
        raise ValueError(f"prefill_product: the kernel refused {fmt} (group size {group_size}) for a weight of "
                         f"shape {tuple(weight.shape)}")
    return out.view(*x.shape[:-1], n)


# The weight block each GEMM of blocked_product takes. Large: every (dequantize, GEMM) pair pays a
# fixed cost (the library packs each block afresh, and each call starts on caches the other just
# filled), which blocks small enough to stay in cache paid dozens of times a weight.
PREFILL_BLOCK_BYTES = 64 * 2**20

_scratch = threading.local()


def _scratch_rows(rows: int, k: int, dtype: torch.dtype) -> torch.Tensor:
    """A (rows, k) buffer of this thread's, kept between calls (memory a process has not touched yet
    faults in a page at a time, slower than the dequantization that fills it) and on huge pages where
    the OS grants them (host_memory.fresh_zeros: fewer TLB misses for the GEMM that reads it); grown as
    needed, at most about PREFILL_BLOCK_BYTES (or one 16-row block) a thread and dtype."""
    buffers = _scratch.__dict__.setdefault("buffers", {})
    flat = buffers.get(dtype)
    if flat is None or flat.numel() < rows * k:
        flat = buffers[dtype] = fresh_zeros((rows * k,), dtype)
    return flat[:rows * k].view(rows, k)


def blocked_product(x: torch.Tensor, out_features: int,
                    dequantize_rows: Callable[[int, int, torch.Tensor], torch.Tensor | None], *,
                    compute_dtype: torch.dtype) -> torch.Tensor | None:
    """(M, K) x -> (M, N) = x @ W.T in compute_dtype, W dequantized a block of output rows at a time
    (PREFILL_BLOCK_BYTES; the whole weight where it fits) by `dequantize_rows(r0, r1, out)` (None: it
    cannot) into a buffer kept per thread (_scratch_rows), each block through the library GEMM. None
    where dequantize_rows declines."""
    m, k = x.shape
    x = x.to(compute_dtype).contiguous()
    block = min(out_features, max(16, PREFILL_BLOCK_BYTES // (k * compute_dtype.itemsize) // 16 * 16))
    scratch = _scratch_rows(block, k, compute_dtype)
    if block == out_features:
        w = dequantize_rows(0, block, scratch)
        return None if w is None else x @ w.T
    part = torch.empty(m, block, dtype=compute_dtype)
    out = torch.empty(m, out_features, dtype=compute_dtype)
    for r0 in range(0, out_features, block):
        r1 = min(out_features, r0 + block)
        w = dequantize_rows(r0, r1, scratch[:r1 - r0])
        if w is None:
            return None
        if r1 - r0 == block:
            out[:, r0:r1] = torch.mm(x, w.T, out=part)
        else:
            out[:, r0:r1] = x @ w.T
    return out
