"""The vision encoder's attention in a CPU kernel (csrc/attention_cpu.c), swapped into a built model.

An image is 6432 positions (4 tiles of 1608) attending to each other in every vision layer: on a
CPU that is about half of encoding an image. The kernel keeps each head's keys and values packed
once and reuses them for 256 query rows, its products on AMX-BF16 tiles where the CPU has them and
with AVX-512 BF16 elsewhere (speed: benchmarks/RESULTS.md). It computes the same softmax attention
in float32 sums with the probabilities rounded to bf16 before the second product, as torch's kernel
does; results agree with it within bf16 rounding.

`apply_cpu_attention` swaps every `TileAttentionCore` of a model for a `KernelTileAttentionCore`,
whose attention calls go to the kernel where it applies (CPU, bf16, no autograd, head_dim <= 96,
AMX-BF16 granted by the OS or AVX-512 BF16, not under torch.compile) and to SDPA everywhere else.
Without a C compiler or with MLLAMA_NO_KERNELS=1 it is SDPA throughout.
"""

from __future__ import annotations

import ctypes
from pathlib import Path

import torch
from torch import nn

from mllama.cpu_kernels import amx_available, gemv_level
from mllama.kernel_cache import load_kernel
from mllama.tile_attention import KeyCopies, TileAttentionCore, TileLayout, sdpa_attend, tile_attention

SOURCE = Path(__file__).parent / "csrc" / "attention_cpu.c"
MAX_HEAD_DIM = 96  # attention_cpu.c's MAX_D: six result tiles of 16

_lib: ctypes.CDLL | None = None
_tried = False


def _load() -> None:
    global _lib, _tried
    _tried = True
    if gemv_level() < 2:  # neither AVX-512 BF16 nor AMX (or MLLAMA_NO_KERNELS=1, off x86-64, no compiler)
        return
    lib = load_kernel(SOURCE, fallback="the CPU attention kernel is unavailable, using SDPA", stacklevel=3)
    if lib is None:
        return
    lib.mllama_attention.argtypes = ([ctypes.c_void_p] * 4 + [ctypes.c_int64] * 5
                                     + [ctypes.c_void_p, ctypes.c_float, ctypes.c_int64, ctypes.c_float,
                                        ctypes.c_int, ctypes.c_int])
    lib.mllama_attention.restype = ctypes.c_int
    _lib = lib


def attention_kernel_available() -> bool:
    """Whether the kernel runs here (x86-64 with AVX-512 BF16 or AMX-BF16 the OS grants, a C compiler,
    kernels on)."""
    if not _tried:
        _load()
    return _lib is not None


def kernel_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, key_copies: KeyCopies | None = None,
                     tiles: bool | None = None) -> torch.Tensor | None:
    """softmax(q k^T / sqrt(head_dim) [+ key_copies]) v for (batch, heads, length, head_dim) bf16 tensors
    through the kernel; None where it does not apply (then call SDPA). tiles: the products on AMX
    tiles (None: where this CPU has them; True without them: None), False: with AVX-512 BF16."""
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4 or not attention_kernel_available():
        return None
    if tiles is None:
        tiles = amx_available()
    elif tiles and not amx_available():
        return None
    if any(t.dtype != torch.bfloat16 or t.device.type != "cpu" or t.stride(-1) != 1 for t in (q, k, v)):
        return None
    if torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad):
        return None
    n1, n2, lq, d = q.shape
    lk = k.shape[2]
    if (k.shape[:2] != (n1, n2) or k.shape[3] != d or v.shape != k.shape or not 1 <= d <= MAX_HEAD_DIM
            or 0 in (n1, n2, lq, lk)):
        return None
    out = torch.empty(n1, n2, lq, d, dtype=torch.bfloat16)
    strides = (ctypes.c_int64 * 12)(*q.stride()[:3], *k.stride()[:3], *v.stride()[:3], *out.stride()[:3])
    bias_from, bias = (key_copies.start, key_copies.log_weight) if key_copies is not None else (lk, 0.0)
    rc = _lib.mllama_attention(q.data_ptr(), k.data_ptr(), v.data_ptr(), out.data_ptr(), n1, n2, lq, lk, d,
                               strides, d ** -0.5, bias_from, bias, int(tiles), torch.get_num_threads())
    return out if rc == 0 else None


def _attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, key_copies: KeyCopies | None = None) -> torch.Tensor:
    out = None if torch.compiler.is_compiling() else kernel_attention(q, k, v, key_copies=key_copies)
    return out if out is not None else sdpa_attend(q, k, v, key_copies=key_copies)


class KernelTileAttentionCore(TileAttentionCore):
    """TileAttentionCore whose unmasked attention calls go through the CPU kernel where it applies."""

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layout: TileLayout) -> torch.Tensor:
        return tile_attention(q, k, v, layout, attend=_attend)


def apply_cpu_attention(model: nn.Module) -> nn.Module:
    """Swap every plain TileAttentionCore of `model` for a KernelTileAttentionCore, in place; returns
    `model`. Harmless where the kernel does not run (the calls then go to SDPA as before)."""
    for name, module in list(model.named_modules()):
        if type(module) is TileAttentionCore and name:
            parent, _, attr = name.rpartition(".")
            setattr(model.get_submodule(parent), attr, KernelTileAttentionCore())
    return model
