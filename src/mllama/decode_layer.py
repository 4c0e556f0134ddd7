"""A self-attention decoder layer's decode step for one token in one C call (csrc/decode_layer.c).

With quantized linears, a decode step of the bench model spent about a fifth of its time between its
kernel calls: Python and torch ops (views, the cache's index writes, empty outputs, the residual adds,
module calls), each run right after a weight had streamed through every cache (benchmarks/RESULTS.md).
mllama.row_kernels' KernelSelfAttentionDecoderLayer hands a one-token step (`one_token`) to one C
function that calls the same kernels the layer's modules call (RMSNorm and RoPE, the linears' one-row
products and their fused silu, the decode attention), in the same order and with the same arguments,
and rounds the residual adds as torch does: the same bits as the modules' route (tested). Anything else
(a batch, a prompt, autograd, hooks, LoRA or other linears, float32, torch.compile) takes the modules.
"""

from __future__ import annotations

import ctypes
import functools
import operator
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from torch.nn.modules import module as _module

from mllama import cpu_scans
from mllama.cache import KVWindow
from mllama.decode_attention import _GROUPS, _MAX_D
from mllama.decode_attention import _library as _attention_library
from mllama.kernel_cache import load_x86_kernel
from mllama.text import SelfAttentionDecoderLayer

__all__ = ["ROW_KIND_INT4_ROWS", "ROW_KIND_SMALL", "RowKernel", "SOURCE", "one_token", "runs_hooks", "stack_one_token"]

SOURCE = Path(__file__).parent / "csrc" / "decode_layer.c"


class _RowLinear(ctypes.Structure):
    _fields_ = [("row", ctypes.c_void_p), ("silu", ctypes.c_void_p)] + [
        (name, ctypes.c_int64) for name in ("kind", "fmt", "level", "scale_bf16", "group", "n", "k_in", "k")] + [
        (name, ctypes.c_void_p) for name in ("w", "scale", "offset")]


class _Layer(ctypes.Structure):
    _fields_ = ([(name, _RowLinear) for name in ("q", "k", "v", "o", "gate", "up", "down")]
                + [(name, ctypes.c_void_p) for name in ("norm_in", "norm_post", "rms", "rope", "attend")]
                + [(name, ctypes.c_int64) for name in ("hidden", "heads", "kv_heads", "head_dim")]
                + [(name, ctypes.c_float) for name in ("eps_in", "eps_post", "scale")])


@functools.cache
def _library() -> ctypes.CDLL | None:
    lib = load_x86_kernel(SOURCE, fallback="the one-call decode layer is unavailable", stacklevel=4)
    if lib is not None:
        lib.mllama_decode_layer.argtypes = ([ctypes.c_void_p] * 7 + [ctypes.c_int64] * 2 + [ctypes.c_void_p] * 2
                                            + [ctypes.c_int64] * 2 + [ctypes.c_void_p, ctypes.c_int])
        lib.mllama_decode_layer.restype = ctypes.c_int
        lib.mllama_decode_layers.argtypes = ([ctypes.c_void_p, ctypes.c_int64] + [ctypes.c_void_p] * 6
                                             + [ctypes.c_int64] * 2 + [ctypes.c_void_p] * 2 + [ctypes.c_int64] * 2
                                             + [ctypes.c_void_p, ctypes.c_int])
        lib.mllama_decode_layers.restype = ctypes.c_int
    return lib


def _address(fn: object) -> int:
    return ctypes.cast(fn, ctypes.c_void_p).value


@dataclass(frozen=True)
class RowKernel:
    """A linear's product of one bf16 row as the C function its forward calls and that call's arguments
    (the linears' `row_kernel()`; the kinds are decode_layer.c's)."""

    kind: int  # ROW_KIND_INT4_ROWS: int4_rows.h's entries; ROW_KIND_SMALL: gemm_small.c's
    row: ctypes._CFuncPtr  # the one-row product
    silu: ctypes._CFuncPtr  # the fused silu(gate) * up of the same kind
    fmt: int  # ROW_KIND_SMALL's format code (cpu_kernels.FORMAT_CODES)
    level: int  # ROW_KIND_SMALL's instruction level
    scale_bf16: bool
    group: int  # int4's group size (0 for int8)
    k: int  # values a stored weight row holds (int4: padded to whole groups)
    tensors: tuple[torch.Tensor, ...]  # weight, scale[, offset] as the call points at them


ROW_KIND_INT4_ROWS, ROW_KIND_SMALL = 0, 1


def _row_linear(module: nn.Module) -> _RowLinear | None:
    """A linear's RowKernel as decode_layer.c takes it; None for a linear without a bias-free one-row
    kernel call (nn.Linear, LoRA, tensor-parallel and other modules)."""
    row_kernel = getattr(module, "row_kernel", None)
    call = row_kernel() if row_kernel is not None and getattr(module, "bias", None) is None else None
    if call is None:
        return None
    tensors = call.tensors
    desc = _RowLinear(row=_address(call.row), silu=_address(call.silu), kind=call.kind, fmt=call.fmt, level=call.level,
                      scale_bf16=int(call.scale_bf16), group=call.group, n=module.out_features,
                      k_in=module.in_features, k=call.k, w=tensors[0].data_ptr(), scale=tensors[1].data_ptr(),
                      offset=tensors[2].data_ptr() if len(tensors) > 2 else None)
    return desc


def _parts(layer: SelfAttentionDecoderLayer) -> tuple[nn.Module, ...]:
    """The layer's attention, MLP, two norms and seven linears, read from the module dicts (each
    Module.__getattr__ costs about a microsecond, and one_token runs for every layer of every step)."""
    mods = layer._modules
    attn, mlp = mods["self_attn"], mods["mlp"]
    a, m = attn._modules, mlp._modules
    return (attn, mlp, mods["input_layernorm"], mods["post_attention_layernorm"], a["q_proj"], a["k_proj"],
            a["v_proj"], a["o_proj"], m["gate_proj"], m["up_proj"], m["down_proj"])


def _linear_tensors(parts: tuple[nn.Module, ...]) -> list[torch.Tensor | None]:
    """The linears' buffers and parameters (a bias None included), in order."""
    tensors: list[torch.Tensor | None] = []
    for module in parts[4:]:
        tensors += module._buffers.values()
        tensors += module._parameters.values()
    return tensors


class _Plan:
    """A layer's _Layer (None where the call does not apply), with what must stay as it was for its
    pointers to hold: the modules, their classes, the linears' tensors and the norms' weights' memory."""

    def __init__(self, layer: SelfAttentionDecoderLayer, kernel_types: tuple[type, ...]) -> None:
        self.desc: _Layer | None = None
        self.modules = _parts(layer)
        self.types = tuple(map(type, self.modules))
        self.tensors = _linear_tensors(self.modules)
        attn, mlp, *norms = self.modules[:4]
        weights = [n._parameters.get("weight") for n in norms]
        self.norm_pointers = [w.data_ptr() if w is not None else 0 for w in weights]
        if self.types[:4] != kernel_types or any(
                w is None or w.dtype != torch.bfloat16 or not w.is_cpu or not w.is_contiguous() for w in weights):
            return
        heads, kv_heads, d = attn.num_heads, attn.num_kv_heads, attn.head_dim
        scans, attention = cpu_scans._library(), _attention_library()
        if (scans is None or attention is None or heads % kv_heads or heads // kv_heads not in _GROUPS
                or d > _MAX_D or d % 2 or not hasattr(mlp.gate_proj, "fuses_silu_with")
                or not mlp.gate_proj.fuses_silu_with(mlp.up_proj)):
            return
        linears = {}
        for name, module in zip(("q", "k", "v", "o", "gate", "up", "down"), self.modules[4:]):
            found = _row_linear(module)
            if found is None:
                return
            linears[name] = found
        self.desc = _Layer(**linears, norm_in=self.norm_pointers[0], norm_post=self.norm_pointers[1],
                           rms=_address(scans.mllama_rms_norm_bf16), rope=_address(scans.mllama_rope_bf16),
                           attend=_address(attention.mllama_decode_attention), hidden=weights[0].shape[0],
                           heads=heads, kv_heads=kv_heads, head_dim=d, eps_in=norms[0].eps, eps_post=norms[1].eps,
                           scale=d ** -0.5)

    def holds(self, layer: SelfAttentionDecoderLayer) -> bool:
        """Whether the layer still has the modules, classes and weights this plan points at (a module, a
        linear's buffer or parameter replaced, a class swapped, a norm's weight given new memory: a new plan)."""
        now = _parts(layer)
        if now != self.modules or tuple(map(type, now)) != self.types:  # modules compare by identity
            return False
        tensors = _linear_tensors(now)
        if len(tensors) != len(self.tensors) or not all(map(operator.is_, tensors, self.tensors)):
            return False
        return [n._parameters["weight"].data_ptr() for n in now[2:4]] == self.norm_pointers


def runs_hooks(modules: tuple[nn.Module, ...]) -> bool:
    """Whether calling these modules runs forward hooks (theirs or global): a fused call skips their
    forward, so hooks (a profiler's, a benchmark's module trace) keep the modules' route."""
    if _module._global_forward_hooks or _module._global_forward_pre_hooks:
        return True
    return any(m._forward_hooks or m._forward_pre_hooks for m in modules)


def _plan(layer: SelfAttentionDecoderLayer, kernel_types: tuple[type, ...]) -> _Plan:
    plan = layer.__dict__.get("_decode_plan")
    if plan is None or not plan.holds(layer):
        plan = _Plan(layer, kernel_types)
        layer.__dict__["_decode_plan"] = plan  # not a submodule or buffer: outside state_dict and .to()
    return plan


def _step_checks(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, mask: torch.Tensor | None,
                 window: KVWindow) -> bool:
    """What a one-call step needs of its token, RoPE, mask and cache window (of any layer)."""
    if x.dtype != torch.bfloat16 or not x.is_cpu or not x.is_contiguous() or x.shape[:2] != (1, 1):
        return False
    if torch.is_grad_enabled() and x.requires_grad:
        return False
    d = cos.shape[-1]
    for t in (cos, sin):
        if t.dtype != torch.bfloat16 or not t.is_cpu or not t.is_contiguous() or t.shape != (1, 1, d):
            return False
    if any(t.dtype != torch.int64 or not t.is_cpu or t.numel() != 1 for t in (window.slots, window.positions)):
        return False
    return mask is None or (mask.dtype == torch.bool and mask.shape == (1, 1, 1, window.length)
                            and mask.stride(-1) == 1)


def _cache_rows(plan: _Plan, window: KVWindow, layer_idx: int) -> tuple[int, int, int, int] | None:
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
                kernel_types: tuple[type, ...]) -> tuple[_Layer, tuple[int, int, int, int]] | None:
    """The layer's descriptor and its cache rows (_cache_rows) where its one call applies (a plan, no
    forward hooks below it, its caches as the call takes them); else None."""
    plan = _plan(layer, kernel_types)
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


def stack_one_token(layers: nn.ModuleList, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                    mask: torch.Tensor | None, window: KVWindow, *, layer_type: type, skip_type: type,
                    kernel_types: tuple[type, ...]) -> torch.Tensor | None:
    """MllamaTextModel.run_layers for one token without cross-attention inputs (layers of skip_type
    skipped, as it skips them) in one C call through every other layer, where each is of layer_type
    without forward hooks and one_token's call applies to it, their caches alike; None where it does not
    (nothing changed that the layers' route does not write again)."""
    lib = _library()
    if lib is None or not _step_checks(x, cos, sin, mask, window):
        return None
    plans, k_rows, v_rows = [], [], []
    shape: tuple[int, int] = (0, 0)
    for idx, layer in enumerate(layers):
        if isinstance(layer, skip_type):
            continue
        if type(layer) is not layer_type or layer._forward_hooks or layer._forward_pre_hooks:
            return None
        found = _layer_call(layer, idx, window, kernel_types)
        if found is None or (k_rows and found[1][2:] != shape):
            return None
        desc, rows = found
        shape = rows[2:]
        plans.append(desc)
        k_rows.append(rows[0])
        v_rows.append(rows[1])
    if not plans or x.shape[2] != plans[0].hidden or cos.shape[-1] != plans[0].head_dim:
        return None
    descs = (ctypes.c_void_p * len(plans))(*(ctypes.addressof(p) for p in plans))
    out = torch.empty_like(x)
    rc = lib.mllama_decode_layers(descs, len(plans), x.data_ptr(), out.data_ptr(), cos.data_ptr(), sin.data_ptr(),
                                  (ctypes.c_void_p * len(plans))(*k_rows), (ctypes.c_void_p * len(plans))(*v_rows),
                                  *shape, window.slots.data_ptr(), window.positions.data_ptr(),
                                  window.first, window.length, mask.data_ptr() if mask is not None else None,
                                  torch.get_num_threads())
    return out if rc == 0 else None
