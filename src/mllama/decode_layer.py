"""A text decoder layer's decode step for one token in one C call (csrc/decode_layer.c), and a step's
whole stack of layers in one.

With quantized linears, a decode step of the bench model spent about a fifth of its time between its
kernel calls: Python and torch ops (views, the cache's index writes, empty outputs, the residual adds,
module calls), each run right after a weight had streamed through every cache (benchmarks/RESULTS.md).
mllama.row_kernels' KernelSelfAttentionDecoderLayer hands a one-token step (`one_token`) to one C
function that calls the same kernels the layer's modules call (RMSNorm and RoPE, the linears' one-row
products and their fused silu, the decode attention), in the same order and with the same arguments,
and rounds the residual adds as torch does: the same bits as the modules' route (tested). A
cross-attention layer's step (`cross_one_token`: q, its norm, the attention to the image's cached K/V,
o, the tanh gates, the MLP) likewise; `stack_one_token` runs every layer of a step in one call, the
cross-attention layers too when the step sees an image. Anything else (a batch, a prompt, autograd,
hooks, LoRA or other linears, float32, torch.compile) takes the modules.
"""

from __future__ import annotations

import ctypes
import functools
from pathlib import Path

import torch
from torch import nn

from mllama.cache import KVWindow
from mllama.decode_plan import CrossLayerDesc, LayerDesc, Plan, plan_for, runs_hooks
from mllama.kernel_cache import load_x86_kernel
from mllama.text import CrossAttentionDecoderLayer, CrossInputs, SelfAttentionDecoderLayer

__all__ = ["SOURCE", "cross_one_token", "one_token", "stack_one_token"]

SOURCE = Path(__file__).parent / "csrc" / "decode_layer.c"


@functools.cache
def _library() -> ctypes.CDLL | None:
    lib = load_x86_kernel(SOURCE, fallback="the one-call decode layer is unavailable", stacklevel=4)
    if lib is not None:
        lib.mllama_decode_layer.argtypes = ([ctypes.c_void_p] * 7 + [ctypes.c_int64] * 2 + [ctypes.c_void_p] * 2
                                            + [ctypes.c_int64] * 2 + [ctypes.c_void_p, ctypes.c_int])
        lib.mllama_decode_layer.restype = ctypes.c_int
        lib.mllama_decode_cross_layer.argtypes = ([ctypes.c_void_p] * 5 + [ctypes.c_int64] * 2
                                                  + [ctypes.c_void_p] * 2 + [ctypes.c_int])
        lib.mllama_decode_cross_layer.restype = ctypes.c_int
        lib.mllama_decode_stack.argtypes = ([ctypes.c_void_p] * 2 + [ctypes.c_int64] + [ctypes.c_void_p] * 6
                                            + [ctypes.c_int64] * 2 + [ctypes.c_void_p] * 2 + [ctypes.c_int64] * 2
                                            + [ctypes.c_void_p] + [ctypes.c_int64] * 2 + [ctypes.c_void_p] * 2
                                            + [ctypes.c_int])
        lib.mllama_decode_stack.restype = ctypes.c_int
        lib.mllama_tanh_bf16.argtypes = [ctypes.c_uint16]
        lib.mllama_tanh_bf16.restype = ctypes.c_uint16
    return lib


def _token_checks(x: torch.Tensor) -> bool:
    """What any one-call step needs of its token: one bf16 row on the CPU, contiguous, outside autograd."""
    return (x.dtype == torch.bfloat16 and x.is_cpu and x.is_contiguous() and x.shape[:2] == (1, 1)
            and not (torch.is_grad_enabled() and x.requires_grad))


def _step_checks(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, mask: torch.Tensor | None,
                 window: KVWindow) -> bool:
    """What a self-attention layer's one-call step needs of its token, RoPE, mask and cache window."""
    if not _token_checks(x):
        return False
    d = cos.shape[-1]
    for t in (cos, sin):
        if t.dtype != torch.bfloat16 or not t.is_cpu or not t.is_contiguous() or t.shape != (1, 1, d):
            return False
    if any(t.dtype != torch.int64 or not t.is_cpu or t.numel() != 1 for t in (window.slots, window.positions)):
        return False
    return mask is None or (mask.dtype == torch.bool and mask.shape == (1, 1, 1, window.length)
                            and mask.stride(-1) == 1)


def _cache_rows(plan: Plan, window: KVWindow, layer_idx: int) -> tuple[int, int, int, int] | None:
    """The layer's K and V cache buffers' addresses, slots and positions, where the buffers are as the
    plan's call takes them."""
    k_cache, v_cache = window.cache.k.get(layer_idx), window.cache.v.get(layer_idx)
    if k_cache is None or v_cache is None:
        return None
    desc = plan.desc
    for t in (k_cache, v_cache):
        if (t.dtype != torch.bfloat16 or not t.is_cpu or not t.is_contiguous() or t.dim() != 4
                or t.shape[1] != desc.kv_heads or t.shape[3] != desc.head_dim):
            return None
    if v_cache.shape != k_cache.shape:
        return None
    return k_cache.data_ptr(), v_cache.data_ptr(), k_cache.shape[0], k_cache.shape[2]


def _layer_call(layer: SelfAttentionDecoderLayer, layer_idx: int, window: KVWindow,
                kernel_types: tuple[type, ...]) -> tuple[LayerDesc, tuple[int, int, int, int]] | None:
    """The layer's descriptor and its cache rows (_cache_rows) where its one call applies (a plan, no
    forward hooks below it, its caches as the call takes them); else None."""
    plan = plan_for(layer, kernel_types)
    if plan.desc is None or runs_hooks(plan.modules):
        return None
    rows = _cache_rows(plan, window, layer_idx)
    return None if rows is None else (plan.desc, rows)


def one_token(layer: SelfAttentionDecoderLayer, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
              mask: torch.Tensor | None, window: KVWindow, layer_idx: int, *,
              kernel_types: tuple[type, ...]) -> torch.Tensor | None:
    """layer.forward(x, cos, sin, mask, cache=window, layer_idx=layer_idx) for one token x (1, 1, hidden)
    in one C call, where the layer's attention, MLP and two norms are of kernel_types (mllama.row_kernels'
    modules, whose kernels the call makes); None where the call does not apply (then nothing was changed
    that the modules' route does not write again)."""
    lib = _library()
    if lib is None or not _step_checks(x, cos, sin, mask, window):
        return None
    found = _layer_call(layer, layer_idx, window, kernel_types)
    if found is None:
        return None
    desc, rows = found
    if x.shape[2] != desc.hidden or cos.shape[-1] != desc.head_dim:
        return None
    out = torch.empty_like(x)
    rc = lib.mllama_decode_layer(ctypes.byref(desc), x.data_ptr(), out.data_ptr(), cos.data_ptr(), sin.data_ptr(),
                                 *rows, window.slots.data_ptr(),
                                 window.positions.data_ptr(), window.first, window.length,
                                 mask.data_ptr() if mask is not None else None, torch.get_num_threads())
    return out if rc == 0 else None


def _cross_checks(x: torch.Tensor, mask: torch.Tensor | None, text_row_mask: torch.Tensor) -> bool:
    """What a cross-attention layer's one-call step needs of its token, vision mask and row mask."""
    if not _token_checks(x):
        return False
    if text_row_mask.dtype != torch.bfloat16 or not text_row_mask.is_cpu or text_row_mask.numel() != 1:
        return False
    return mask is None or (mask.dtype == torch.bool and mask.dim() == 4 and mask.shape[:3] == (1, 1, 1)
                            and mask.stride(-1) == 1)


def _image_rows(desc: CrossLayerDesc, kv: tuple[torch.Tensor, torch.Tensor],
                mask: torch.Tensor | None) -> tuple[int, int, int, int] | None:
    """The image's K and V addresses, the stride of their heads and their token count, where both are
    (1, kv_heads, tokens, head_dim) bf16 with rows head_dim apart, laid out alike (and the mask as long)."""
    k, v = kv
    for t in (k, v):
        if (t.dtype != torch.bfloat16 or not t.is_cpu or t.dim() != 4 or t.shape[:2] != (1, desc.kv_heads)
                or t.shape[3] != desc.head_dim or t.stride(3) != 1 or t.stride(2) != desc.head_dim):
            return None
    if v.shape != k.shape or v.stride() != k.stride() or (mask is not None and mask.shape[3] != k.shape[2]):
        return None
    return k.data_ptr(), v.data_ptr(), k.stride(1), k.shape[2]


def _cross_call(layer: CrossAttentionDecoderLayer, kv: tuple[torch.Tensor, torch.Tensor], mask: torch.Tensor | None,
                kernel_types: tuple[type, ...]) -> tuple[CrossLayerDesc, tuple[int, int, int, int]] | None:
    """The cross-attention layer's descriptor and its image rows (_image_rows) where its one call applies
    (a plan, no forward hooks below it, the image's K/V as the call takes them); else None."""
    plan = plan_for(layer, kernel_types)
    if plan.desc is None or runs_hooks(plan.modules):
        return None
    rows = _image_rows(plan.desc, kv, mask)
    return None if rows is None else (plan.desc, rows)


def cross_one_token(layer: CrossAttentionDecoderLayer, x: torch.Tensor, kv: tuple[torch.Tensor, torch.Tensor],
                    mask: torch.Tensor | None, text_row_mask: torch.Tensor, *,
                    kernel_types: tuple[type, ...]) -> torch.Tensor | None:
    """layer.forward(x, kv, mask, text_row_mask) for one token x (1, 1, hidden) in one C call, where the
    layer's attention, MLP and three norms are of kernel_types; None where the call does not apply."""
    lib = _library()
    if lib is None or not _cross_checks(x, mask, text_row_mask):
        return None
    found = _cross_call(layer, kv, mask, kernel_types)
    if found is None or x.shape[2] != found[0].hidden:
        return None
    desc, rows = found
    out = torch.empty_like(x)
    rc = lib.mllama_decode_cross_layer(ctypes.byref(desc), x.data_ptr(), out.data_ptr(), *rows,
                                       mask.data_ptr() if mask is not None else None, text_row_mask.data_ptr(),
                                       torch.get_num_threads())
    return out if rc == 0 else None


def stack_one_token(layers: nn.ModuleList, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                    mask: torch.Tensor | None, window: KVWindow, cross: CrossInputs | None, *, layer_type: type,
                    cross_type: type, kernel_types: tuple[type, ...],
                    cross_kernel_types: tuple[type, ...]) -> torch.Tensor | None:
    """MllamaTextModel.run_layers for one token in one C call through every layer: each self-attention
    layer of layer_type and each cross-attention layer of cross_type (skipped without cross inputs, as
    run_layers skips them; with them, their K/V stored in cross.kv) without forward hooks, where
    one_token's or cross_one_token's call applies to each, their caches alike; None where it does not
    (nothing changed that the layers' route does not write again)."""
    lib = _library()
    if lib is None or not _step_checks(x, cos, sin, mask, window):
        return None
    if cross is not None and (cross.kv is None or not _cross_checks(x, cross.mask, cross.text_row_mask)):
        return None
    descs, kinds, a_rows, b_rows = [], [], [], []
    shape = image = None
    for idx, layer in enumerate(layers):
        if isinstance(layer, cross_type) and cross is None:
            continue
        if layer._forward_hooks or layer._forward_pre_hooks:
            return None
        if isinstance(layer, cross_type):
            if type(layer) is not cross_type or idx not in cross.kv:
                return None
            found = _cross_call(layer, cross.kv[idx], cross.mask, cross_kernel_types)
            if found is None or (image is not None and found[1][2:] != image):
                return None
            image = found[1][2:]
        else:
            if type(layer) is not layer_type:
                return None
            found = _layer_call(layer, idx, window, kernel_types)
            if found is None or (shape is not None and found[1][2:] != shape):
                return None
            shape = found[1][2:]
        desc, rows = found
        descs.append(desc)
        kinds.append(int(isinstance(layer, cross_type)))
        a_rows.append(rows[0])
        b_rows.append(rows[1])
    # the layers' widths agree or the C call refuses them before writing anything
    if shape is None or x.shape[2] != descs[0].hidden or cos.shape[-1] != descs[0].head_dim:
        return None
    count = len(descs)
    out = torch.empty_like(x)
    rc = lib.mllama_decode_stack((ctypes.c_void_p * count)(*map(ctypes.addressof, descs)),
                                 (ctypes.c_int64 * count)(*kinds), count, x.data_ptr(), out.data_ptr(), cos.data_ptr(),
                                 sin.data_ptr(), (ctypes.c_void_p * count)(*a_rows), (ctypes.c_void_p * count)(*b_rows),
                                 *shape, window.slots.data_ptr(), window.positions.data_ptr(), window.first,
                                 window.length, mask.data_ptr() if mask is not None else None,
                                 *(image or (0, 0)),
                                 cross.mask.data_ptr() if cross is not None and cross.mask is not None else None,
                                 cross.text_row_mask.data_ptr() if cross is not None else None,
                                 torch.get_num_threads())
    return out if rc == 0 else None
