"""The text decoder's attention for one new token per sequence in a CPU kernel (csrc/decode_attention.c).

A decode step attends from one query per head to every cached key: a self-attention layer to the
chat so far, a cross-attention layer to an image's 1601-6404 vision tokens. torch's CPU attention
streams those keys and values at 5-13 GB/s; the kernel splits them into chunks of 256 keys per K/V head
across threads and reads each key and value once for the query heads that share it (speed:
benchmarks/RESULTS.md). Its float32 sums agree with torch's within bf16 rounding; a row's result does
not depend on the other rows of its batch (fixed chunks, masked keys exactly zero).

row_kernels.apply_row_kernels gives the model's attention modules an `attend` that calls
`decode_attention` first (under torch.compile through the custom op mllama::decode_attention); None
(a prompt, float32, autograd, no AVX-512, no compiler, MLLAMA_NO_KERNELS=1) sends the call to torch's
SDPA as before.
"""

from __future__ import annotations

import ctypes
import functools
from pathlib import Path

import torch

from mllama.kernel_cache import load_x86_kernel

__all__ = ["SOURCE", "decode_attention", "decode_attention_available"]

SOURCE = Path(__file__).parent / "csrc" / "decode_attention.c"
_GROUPS = (1, 2, 4, 8, 16)  # query heads a K/V head: the kernel's instances
_MAX_D = 256


@functools.cache
def _library() -> ctypes.CDLL | None:
    lib = load_x86_kernel(SOURCE, fallback="the decode attention kernel is unavailable, using SDPA", stacklevel=4)
    if lib is not None:
        lib.mllama_decode_attention.argtypes = ([ctypes.c_void_p] * 5 + [ctypes.c_int64] * 5
                                                + [ctypes.c_float, ctypes.c_void_p, ctypes.c_int, ctypes.c_int])
        lib.mllama_decode_attention.restype = ctypes.c_int
    return lib


def decode_attention_available() -> bool:
    """Whether the kernel is built and loaded here (it still answers None on a CPU without AVX-512)."""
    return _library() is not None


def decode_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None, *,
                     plain: bool = False) -> torch.Tensor | None:
    """softmax(q k^T / sqrt(D)) v for one query token: q (B, H, 1, D), k and v (B, H_kv, T, D) bf16 CPU
    tensors (any strides but a contiguous last dimension, e.g. views of a KV cache), H / H_kv query heads
    sharing each K/V head; mask None or bool (B or 1, 1, 1, T), True where a key is visible. Returns
    (B, H, 1, D) bf16 (zeros for a row that sees no key), or None where the kernel does not apply.
    plain: the scores as float32 FMAs even on a CPU with AVX-512 BF16 (tests)."""
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4 or q.shape[2] != 1 or not decode_attention_available():
        return None
    b, h, _, d = q.shape
    h_kv, t = k.shape[1], k.shape[2]
    if (k.shape != (b, h_kv, t, d) or v.shape != k.shape or t == 0 or b == 0 or h % h_kv
            or h // h_kv not in _GROUPS or d > _MAX_D):
        return None
    if any(x.dtype != torch.bfloat16 or x.device.type != "cpu" or x.stride(-1) != 1 for x in (q, k, v)):
        return None
    if torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad):
        return None
    rows = None
    if mask is not None:
        if mask.dtype != torch.bool or mask.dim() != 4 or mask.shape[1:3] != (1, 1) or mask.shape[3] != t \
                or mask.shape[0] not in (1, b):
            return None
        rows = mask[:, 0, 0].expand(b, t)
        if rows.stride(1) != 1:
            rows = rows.contiguous()
    out = torch.empty(b, h, 1, d, dtype=torch.bfloat16)
    strides = (ctypes.c_int64 * 9)(q.stride(0), q.stride(1), *k.stride()[:3], *v.stride()[:3],
                                   rows.stride(0) if rows is not None else 0)
    rc = _library().mllama_decode_attention(q.data_ptr(), k.data_ptr(), v.data_ptr(),
                                            rows.data_ptr() if rows is not None else None, strides, b, h, h_kv,
                                            t, d, d ** -0.5, out.data_ptr(), int(plain), torch.get_num_threads())
    return out if rc == 0 else None
