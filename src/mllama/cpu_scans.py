"""Scans over CPU arrays in C (csrc/scans.c, built on first use like mllama.cpu_kernels' kernels):
the NaN / infinity count of the load-time weight check (mllama.checks), the model's RMSNorm and RoPE of
bf16 rows (mllama.row_kernels) and the greedy argmax of logits (mllama.sampling).

Each reads its input once. In a decode step torch needs several ops for each of these, and each op costs
tens of microseconds right after the weights have streamed through every cache (benchmarks/RESULTS.md).
Without the library (no compiler, not x86-64, MLLAMA_NO_KERNELS=1, an unsafe kernel cache) the callers
use torch: count_not_finite answers None, row_kernels_available False, argmax_rows torch.argmax.
"""

from __future__ import annotations

import ctypes
from pathlib import Path

import torch

from mllama.kernel_cache import load_x86_kernel

__all__ = ["SOURCE", "argmax_rows", "count_not_finite", "rms_norm_bf16", "rope_bf16", "row_kernels_available"]

SOURCE = Path(__file__).parent / "csrc" / "scans.c"

_lib: ctypes.CDLL | None = None
_tried = False
_FINITE_KINDS = {torch.bfloat16: 0, torch.float16: 1, torch.float32: 2}


def _load() -> None:
    global _lib, _tried
    _tried = True
    lib = load_x86_kernel(SOURCE, fallback="scan kernels unavailable, counting and normalising with torch", stacklevel=4)
    if lib is None:
        return
    lib.mllama_count_nonfinite.argtypes = [ctypes.c_void_p, ctypes.c_int64, ctypes.c_int, ctypes.c_int]
    lib.mllama_count_nonfinite.restype = ctypes.c_int64
    lib.mllama_argmax_rows.argtypes = [ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64, ctypes.c_void_p, ctypes.c_int,
                                       ctypes.c_int, ctypes.c_int]
    lib.mllama_argmax_rows.restype = ctypes.c_int
    lib.mllama_rms_norm_bf16.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64,
                                         ctypes.c_float, ctypes.c_void_p, ctypes.c_int]
    lib.mllama_rms_norm_bf16.restype = ctypes.c_int
    lib.mllama_rope_bf16.argtypes = [ctypes.c_void_p] * 2 + [ctypes.c_int64] * 4 + [ctypes.c_void_p] * 4 + [ctypes.c_int]
    lib.mllama_rope_bf16.restype = ctypes.c_int
    _lib = lib


def _library() -> ctypes.CDLL | None:
    if not _tried:
        _load()
    return _lib


def count_not_finite(tensor: torch.Tensor) -> int | None:
    """The number of NaN and infinite values of a contiguous CPU bf16, fp16 or float32 tensor, read
    once at memory speed; None where that does not run (then count with torch)."""
    lib = _library()
    kind = _FINITE_KINDS.get(tensor.dtype)
    if lib is None or kind is None or tensor.device.type != "cpu" or not tensor.is_contiguous():
        return None
    count = lib.mllama_count_nonfinite(tensor.data_ptr(), tensor.numel(), kind, torch.get_num_threads())
    return None if count < 0 else int(count)


def row_kernels_available() -> bool:
    """Whether the RMSNorm and RoPE of bf16 rows (rms_norm_bf16, rope_bf16) run here."""
    return _library() is not None


def rms_norm_bf16(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """(..., D) contiguous bf16 CPU rows and a (D,) contiguous bf16 weight -> (..., D) bf16: the model's
    RMSNorm in one C call (see csrc/scans.c for its order of sums). The caller checks the layout and
    row_kernels_available()."""
    out = torch.empty_like(x)
    d = x.shape[-1]
    if _lib.mllama_rms_norm_bf16(x.data_ptr(), weight.data_ptr(), x.numel() // d, d, eps, out.data_ptr(),
                                 torch.get_num_threads()) != 0:
        raise ValueError(f"rms_norm_bf16: the kernel refused rows of shape {tuple(x.shape)}")
    return out


def rope_bf16(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Contiguous bf16 CPU q (B, S, H, D), k (B, S, H_kv, D), cos and sin (B, S, D) -> rotated q, k in
    the same layout: layers.apply_rotary's bits in one C call. The caller checks the layout and
    row_kernels_available()."""
    q_out, k_out = torch.empty_like(q), torch.empty_like(k)
    b, s, hq, d = q.shape
    if _lib.mllama_rope_bf16(q.data_ptr(), k.data_ptr(), b * s, hq, k.shape[2], d, cos.data_ptr(), sin.data_ptr(),
                             q_out.data_ptr(), k_out.data_ptr(), torch.get_num_threads()) != 0:
        raise ValueError(f"rope_bf16: the kernel refused q {tuple(q.shape)}, k {tuple(k.shape)}")
    return q_out, k_out


def argmax_rows(logits: torch.Tensor, *, plain_c: bool = False) -> torch.Tensor:
    """(B, V) float32 or bf16 logits -> (B,) int64: each row's argmax as torch.argmax gives it (the first
    of equal maxima; a NaN counts as the largest), in C on CPU; torch.argmax elsewhere.
    plain_c: the C loop of CPUs without AVX-512 even where the CPU has it (tests)."""
    lib = _library()
    if (lib is None or torch.compiler.is_compiling() or logits.dim() != 2
            or logits.dtype not in (torch.float32, torch.bfloat16) or logits.device.type != "cpu"
            or not logits.is_contiguous()):
        return logits.argmax(dim=-1)
    out = torch.empty(logits.shape[0], dtype=torch.int64)
    if lib.mllama_argmax_rows(logits.data_ptr(), logits.shape[0], logits.shape[1], out.data_ptr(),
                              torch.get_num_threads(), int(plain_c), int(logits.dtype == torch.bfloat16)) != 0:
        return logits.argmax(dim=-1)
    return out
