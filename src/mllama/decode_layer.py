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
from mllama.text import CrossAttentionDecoderLayer, CrossInputs, SelfAttentionDecoderLayer

__all__ = ["ROW_KIND_INT4_ROWS", "ROW_KIND_SMALL", "RowKernel", "SOURCE", "cross_one_token", "one_token", "runs_hooks",
           "stack_one_token"]

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


class _CrossLayer(ctypes.Structure):
    _fields_ = ([(name, _RowLinear) for name in ("q", "o", "gate", "up", "down")]
                + [(name, ctypes.c_void_p) for name in ("norm_in", "norm_post", "q_norm", "attn_gate", "mlp_gate", "rms",
                                                        "attend")]
                + [(name, ctypes.c_int64) for name in ("hidden", "heads", "kv_heads", "head_dim")]
                + [(name, ctypes.c_float) for name in ("eps_in", "eps_post", "eps_q", "scale")])


@functools.cache
def _library() -> ctypes.CDLL | None:
    lib = load_x86_kernel(SOURCE, fallback="the one-call decode layer is unavailable", stacklevel=4)
    if lib is not None:
        lib.mllama_decode_layer.argtypes = ([ctypes.c_void_p] * 7 + [ctypes.c_int64] * 2 + [ctypes.c_void_p] * 2
                                            + [ctypes.c_int64] * 2 + [ctypes.c_void_p, ctypes.c_int])
        lib.mllama_decode_layer.restype = ctypes.c_int
        lib.mllama_decode_cross_layer.argtypes = [ctypes.c_void_p] * 5 + [ctypes.c_int64] * 2 + [ctypes.c_void_p] * 2 + [
            ctypes.c_int]
        lib.mllama_decode_cross_layer.restype = ctypes.c_int
        lib.mllama_decode_stack.argtypes = ([ctypes.c_void_p] * 2 + [ctypes.c_int64] + [ctypes.c_void_p] * 6
                                            + [ctypes.c_int64] * 2 + [ctypes.c_void_p] * 2 + [ctypes.c_int64] * 2
                                            + [ctypes.c_void_p] + [ctypes.c_int64] * 2 + [ctypes.c_void_p] * 2
                                            + [ctypes.c_int])
        lib.mllama_decode_stack.restype = ctypes.c_int
        lib.mllama_tanh_bf16.argtypes = [ctypes.c_uint16]
        lib.mllama_tanh_bf16.restype = ctypes.c_uint16
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


def _cross_parts(layer: CrossAttentionDecoderLayer) -> tuple[nn.Module, ...]:
    """A cross-attention layer's attention, MLP, three norms (q_norm the third) and the five linears a
    decode step runs (k_proj and v_proj made the image's K/V at the prompt)."""
    mods = layer._modules
    attn, mlp = mods["cross_attn"], mods["mlp"]
    a, m = attn._modules, mlp._modules
    return (attn, mlp, mods["input_layernorm"], mods["post_attention_layernorm"], a["q_norm"], a["q_proj"],
            a["o_proj"], m["gate_proj"], m["up_proj"], m["down_proj"])


def _linear_tensors(linears: tuple[nn.Module, ...]) -> list[torch.Tensor | None]:
    """The linears' buffers and parameters (a bias None included), in order."""
    tensors: list[torch.Tensor | None] = []
    for module in linears:
        tensors += module._buffers.values()
        tensors += module._parameters.values()
    return tensors


def _bf16_cpu(t: torch.Tensor | None) -> bool:
    return t is not None and t.dtype == torch.bfloat16 and t.is_cpu and t.is_contiguous()


class _Plan:
    """A self-attention layer's _Layer (None where the call does not apply), with what must stay as it
    was for its pointers to hold: the modules, their classes, the linears' tensors and the memory of the
    norms' weights (and of a cross-attention layer's gates: _CrossPlan)."""

    norms = 2  # parts[2:2 + norms] are RMSNorms, the linears follow

    def __init__(self, layer: nn.Module, kernel_types: tuple[type, ...]) -> None:
        self.desc: _Layer | _CrossLayer | None = None
        self.modules = self.parts(layer)
        self.types = tuple(map(type, self.modules))
        self.tensors = _linear_tensors(self.modules[2 + self.norms:]) + self.scalars(layer)
        weights = [n._parameters.get("weight") for n in self.modules[2:2 + self.norms]] + self.scalars(layer)
        self.pointers = [w.data_ptr() if w is not None else 0 for w in weights]
        scans, attention = cpu_scans._library(), _attention_library()
        attn, mlp = self.modules[:2]
        if (self.types[:2 + self.norms] != kernel_types or not all(map(_bf16_cpu, weights)) or scans is None
                or attention is None or attn.num_heads % attn.num_kv_heads
                or attn.num_heads // attn.num_kv_heads not in _GROUPS or attn.head_dim > _MAX_D or attn.head_dim % 2
                or not hasattr(mlp.gate_proj, "fuses_silu_with") or not mlp.gate_proj.fuses_silu_with(mlp.up_proj)):
            return
        linears = {}
        for name, module in zip(self.linear_names, self.modules[2 + self.norms:]):
            found = _row_linear(module)
            if found is None:
                return
            linears[name] = found
        norms = self.modules[2:2 + self.norms]
        self.desc = self.describe(linears, norms, attn, rms=_address(scans.mllama_rms_norm_bf16), scans=scans,
                                  attend=_address(attention.mllama_decode_attention))

    linear_names = ("q", "k", "v", "o", "gate", "up", "down")
    parts = staticmethod(_parts)

    @staticmethod
    def scalars(layer: nn.Module) -> list[torch.Tensor]:
        return []

    def describe(self, linears: dict[str, _RowLinear], norms: tuple[nn.Module, ...], attn: nn.Module, *, rms: int,
                 scans: ctypes.CDLL, attend: int) -> _Layer:
        d = attn.head_dim
        return _Layer(**linears, norm_in=self.pointers[0], norm_post=self.pointers[1], rms=rms,
                      rope=_address(scans.mllama_rope_bf16), attend=attend, hidden=norms[0].weight.shape[0],
                      heads=attn.num_heads, kv_heads=attn.num_kv_heads, head_dim=d, eps_in=norms[0].eps,
                      eps_post=norms[1].eps, scale=d ** -0.5)

    def holds(self, layer: nn.Module) -> bool:
        """Whether the layer still has the modules, classes and weights this plan points at (a module, a
        linear's buffer or parameter replaced, a class swapped, a norm's weight or a gate given new
        memory: a new plan)."""
        now = self.parts(layer)
        if now != self.modules or tuple(map(type, now)) != self.types:  # modules compare by identity
            return False
        scalars = self.scalars(layer)
        tensors = _linear_tensors(now[2 + self.norms:]) + scalars
        if len(tensors) != len(self.tensors) or not all(map(operator.is_, tensors, self.tensors)):
            return False
        return [n._parameters["weight"].data_ptr() for n in now[2:2 + self.norms]] + [
            t.data_ptr() for t in scalars] == self.pointers


class _CrossPlan(_Plan):
    """A cross-attention layer's _CrossLayer: as _Plan, with q_norm and the two tanh gates (bf16 scalars,
    read by the call at every step)."""

    norms = 3
    linear_names = ("q", "o", "gate", "up", "down")
    parts = staticmethod(_cross_parts)

    @staticmethod
    def scalars(layer: nn.Module) -> list[torch.Tensor]:
        params = layer._parameters
        return [params["cross_attn_attn_gate"], params["cross_attn_mlp_gate"]]

    def describe(self, linears: dict[str, _RowLinear], norms: tuple[nn.Module, ...], attn: nn.Module, *, rms: int,
                 scans: ctypes.CDLL, attend: int) -> _CrossLayer | None:
        if any(t.numel() != 1 for t in self.tensors[-2:]):
            return None
        d = attn.head_dim
        return _CrossLayer(**linears, norm_in=self.pointers[0], norm_post=self.pointers[1], q_norm=self.pointers[2],
                           attn_gate=self.pointers[3], mlp_gate=self.pointers[4], rms=rms, attend=attend,
                           hidden=norms[0].weight.shape[0], heads=attn.num_heads, kv_heads=attn.num_kv_heads,
                           head_dim=d, eps_in=norms[0].eps, eps_post=norms[1].eps, eps_q=norms[2].eps, scale=d ** -0.5)


def runs_hooks(modules: tuple[nn.Module, ...]) -> bool:
    """Whether calling these modules runs forward hooks (theirs or global): a fused call skips their
    forward, so hooks (a profiler's, a benchmark's module trace) keep the modules' route."""
    if _module._global_forward_hooks or _module._global_forward_pre_hooks:
        return True
    return any(m._forward_hooks or m._forward_pre_hooks for m in modules)


def _plan(layer: nn.Module, kernel_types: tuple[type, ...]) -> _Plan:
    plan = layer.__dict__.get("_decode_plan")
    if plan is None or not plan.holds(layer):
        kind = _CrossPlan if isinstance(layer, CrossAttentionDecoderLayer) else _Plan
        plan = kind(layer, kernel_types)
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


def _cross_checks(x: torch.Tensor, mask: torch.Tensor | None, text_row_mask: torch.Tensor) -> bool:
    """What a one-call step of a cross-attention layer needs of its token, vision mask and row mask."""
    if x.dtype != torch.bfloat16 or not x.is_cpu or not x.is_contiguous() or x.shape[:2] != (1, 1):
        return False
    if torch.is_grad_enabled() and x.requires_grad:
        return False
    if text_row_mask.dtype != torch.bfloat16 or not text_row_mask.is_cpu or text_row_mask.numel() != 1:
        return False
    return mask is None or (mask.dtype == torch.bool and mask.dim() == 4 and mask.shape[:3] == (1, 1, 1)
                            and mask.stride(-1) == 1)


def _image_rows(desc: _CrossLayer, kv: tuple[torch.Tensor, torch.Tensor],
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


def cross_one_token(layer: CrossAttentionDecoderLayer, x: torch.Tensor, kv: tuple[torch.Tensor, torch.Tensor],
                    mask: torch.Tensor | None, text_row_mask: torch.Tensor, *,
                    kernel_types: tuple[type, ...]) -> torch.Tensor | None:
    """layer.forward(x, kv, mask, text_row_mask) for one token x (1, 1, hidden) in one C call, where the
    layer's attention, MLP and three norms are of kernel_types; None where the call does not apply."""
    lib = _library()
    if lib is None or not _cross_checks(x, mask, text_row_mask):
        return None
    plan = _plan(layer, kernel_types)
    if plan.desc is None or runs_hooks(plan.modules) or x.shape[2] != plan.desc.hidden:
        return None
    rows = _image_rows(plan.desc, kv, mask)
    if rows is None:
        return None
    out = torch.empty_like(x)
    rc = lib.mllama_decode_cross_layer(ctypes.byref(plan.desc), x.data_ptr(), out.data_ptr(), *rows,
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
            plan = _plan(layer, cross_kernel_types)
            if plan.desc is None or runs_hooks(plan.modules):
                return None
            rows = _image_rows(plan.desc, cross.kv[idx], cross.mask)
            if rows is None or (image is not None and rows[2:] != image):
                return None
            image = rows[2:]
            descs.append(plan.desc)
        else:
            if type(layer) is not layer_type:
                return None
            found = _layer_call(layer, idx, window, kernel_types)
            if found is None or (shape is not None and found[1][2:] != shape):
                return None
            descs.append(found[0])
            rows = found[1]
            shape = rows[2:]
        kinds.append(int(isinstance(layer, cross_type)))
        a_rows.append(rows[0])
        b_rows.append(rows[1])
    if (shape is None or x.shape[2] != descs[0].hidden or cos.shape[-1] != descs[0].head_dim
            or any(d.hidden != descs[0].hidden for d in descs)):
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
