"""What a decoder layer's one-call decode step (mllama.decode_layer, csrc/decode_layer.c) points at:
a descriptor per layer with its linears' one-row kernel calls (`RowKernel`, each linear's
`row_kernel()`), its norms' weights and the kernels it calls, and a plan that keeps the descriptor
while the layer's modules, classes and tensors stay the ones it points at (checked at every step
through the module dicts)."""

from __future__ import annotations

import ctypes
import operator
from dataclasses import dataclass

import torch
from torch import nn
from torch.nn.modules import module as _module

from mllama import cpu_scans
from mllama.decode_attention import _GROUPS, _MAX_D
from mllama.decode_attention import _library as _attention_library
from mllama.text import CrossAttentionDecoderLayer, SelfAttentionDecoderLayer

__all__ = ["CrossLayerDesc", "LayerDesc", "Plan", "ROW_KIND_INT4_ROWS", "ROW_KIND_SMALL", "RowKernel", "plan_for",
           "runs_hooks"]


class _RowLinear(ctypes.Structure):
    _fields_ = [("row", ctypes.c_void_p), ("silu", ctypes.c_void_p)] + [
        (name, ctypes.c_int64) for name in ("kind", "fmt", "level", "scale_bf16", "group", "n", "k_in", "k")] + [
        (name, ctypes.c_void_p) for name in ("w", "scale", "offset")]


class LayerDesc(ctypes.Structure):
    _fields_ = ([(name, _RowLinear) for name in ("q", "k", "v", "o", "gate", "up", "down")]
                + [(name, ctypes.c_void_p) for name in ("norm_in", "norm_post", "rms", "rope", "attend")]
                + [(name, ctypes.c_int64) for name in ("hidden", "heads", "kv_heads", "head_dim")]
                + [(name, ctypes.c_float) for name in ("eps_in", "eps_post", "scale")])


class CrossLayerDesc(ctypes.Structure):
    _fields_ = ([(name, _RowLinear) for name in ("q", "o", "gate", "up", "down")]
                + [(name, ctypes.c_void_p)
                   for name in ("norm_in", "norm_post", "q_norm", "attn_gate", "mlp_gate", "rms", "attend")]
                + [(name, ctypes.c_int64) for name in ("hidden", "heads", "kv_heads", "head_dim")]
                + [(name, ctypes.c_float) for name in ("eps_in", "eps_post", "eps_q", "scale")])


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


class Plan:
    """A self-attention layer's LayerDesc (None where the call does not apply), with what must stay as it
    was for its pointers to hold: the modules, their classes, the linears' tensors and the memory of the
    norms' weights (and of a cross-attention layer's gates: CrossPlan)."""

    norms = 2  # parts[2:2 + norms] are RMSNorms, the linears follow
    linear_names = ("q", "k", "v", "o", "gate", "up", "down")
    parts = staticmethod(_parts)

    def __init__(self, layer: nn.Module, kernel_types: tuple[type, ...]) -> None:
        self.desc: LayerDesc | CrossLayerDesc | None = None
        self.modules = self.parts(layer)
        self.types = tuple(map(type, self.modules))
        scalars = self.scalars(layer)
        self.tensors = _linear_tensors(self.modules[2 + self.norms:]) + scalars
        weights = [n._parameters.get("weight") for n in self.modules[2:2 + self.norms]] + scalars
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

    @staticmethod
    def scalars(layer: nn.Module) -> list[torch.Tensor]:
        return []

    def describe(self, linears: dict[str, _RowLinear], norms: tuple[nn.Module, ...], attn: nn.Module, *, rms: int,
                 scans: ctypes.CDLL, attend: int) -> LayerDesc:
        d = attn.head_dim
        return LayerDesc(**linears, norm_in=self.pointers[0], norm_post=self.pointers[1], rms=rms,
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


class CrossPlan(Plan):
    """A cross-attention layer's CrossLayerDesc: as Plan, with q_norm and the two tanh gates (bf16 scalars,
    read by the call at every step)."""

    norms = 3
    linear_names = ("q", "o", "gate", "up", "down")
    parts = staticmethod(_cross_parts)

    @staticmethod
    def scalars(layer: nn.Module) -> list[torch.Tensor]:
        params = layer._parameters
        return [params["cross_attn_attn_gate"], params["cross_attn_mlp_gate"]]

    def describe(self, linears: dict[str, _RowLinear], norms: tuple[nn.Module, ...], attn: nn.Module, *, rms: int,
                 scans: ctypes.CDLL, attend: int) -> CrossLayerDesc | None:
        if any(t.numel() != 1 for t in self.tensors[-2:]):
            return None
        d = attn.head_dim
        return CrossLayerDesc(**linears, norm_in=self.pointers[0], norm_post=self.pointers[1], q_norm=self.pointers[2],
                              attn_gate=self.pointers[3], mlp_gate=self.pointers[4], rms=rms, attend=attend,
                              hidden=norms[0].weight.shape[0], heads=attn.num_heads, kv_heads=attn.num_kv_heads,
                              head_dim=d, eps_in=norms[0].eps, eps_post=norms[1].eps, eps_q=norms[2].eps,
                              scale=d ** -0.5)


def runs_hooks(modules: tuple[nn.Module, ...]) -> bool:
    """Whether calling these modules runs forward hooks (theirs or global): a fused call skips their
    forward, so hooks (a profiler's, a benchmark's module trace) keep the modules' route."""
    if _module._global_forward_hooks or _module._global_forward_pre_hooks:
        return True
    return any(m._forward_hooks or m._forward_pre_hooks for m in modules)


def plan_for(layer: nn.Module, kernel_types: tuple[type, ...]) -> Plan:
    plan = layer.__dict__.get("_decode_plan")
    if plan is None or not plan.holds(layer):
        kind = CrossPlan if isinstance(layer, CrossAttentionDecoderLayer) else Plan
        plan = kind(layer, kernel_types)
        layer.__dict__["_decode_plan"] = plan  # not a submodule or buffer: outside state_dict and .to()
    return plan
