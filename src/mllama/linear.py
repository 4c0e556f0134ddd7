"""Backends for the model's linear layers, applied to a built model by swapping modules.

The model code builds plain `nn.Linear`s. A backend replaces some of them afterwards with a module
of the same interface: `DecodeLinear` (the bf16 CPU decode kernel, below; `apply_cpu_kernels`) or
the int8 / int4 modules of mllama.quantize. `swap_linears` is the one mechanism they share, so a
later backend (tensor parallelism, LoRA) plugs in the same way, on a real model or on one built on
the meta device before its weights are read (weights.load_pretrained does that for quantization).
"""

from __future__ import annotations

import functools
import platform
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from mllama.cpu_attention import apply_cpu_attention
from mllama.cpu_kernels import MAX_ROWS, gemv_available, gemv_bf16, gemv_max_rows, use_gemv
from mllama.row_kernels import apply_row_kernels


def swap_linears(model: nn.Module, replace: Callable[[str, nn.Module], nn.Module | None], *,
                 kind: type[nn.Module] = nn.Linear) -> list[str]:
    """Offer every module of `kind` (default: every `nn.Linear`) of `model` (by its module name) to
    `replace`; where it returns a module, that module takes the linear's place. Returns the names of
    the replaced linears."""
    swapped = []
    # names, not modules: a replaced module (and its weights) is freed as soon as it is swapped out,
    # so a transform that copies weights holds the old and the new copy of one module at a time
    for name in [name for name, module in model.named_modules() if isinstance(module, kind)]:
        module = model.get_submodule(name)
        new = replace(name, module)
        if new is None or new is module:
            continue
        if not name:
            raise ValueError("swap_linears: the model itself is a Linear; wrap it in a module first")
        parent, _, attr = name.rpartition(".")
        setattr(model.get_submodule(parent), attr, new)
        swapped.append(name)
    return swapped


class PackedWeights:
    """A module whose weights are held in a kernel's own layout (packed_linear.PackedLinear,
    int4_rows.Int4RowsLinear): transforms that rebuild linears from their weights refuse it
    (packed_linear.refuse_packed), naming `unpack_hint`, the way back to plain modules."""

    unpack_hint: str


WIDE_MIN_ROWS = 112  # bf16 products of at least this many rows may go through float32 (see use_wide_fp32)
WIDE_BLOCK = 1024  # output features whose weights are converted to float32 at a time


@functools.cache
@torch.compiler.assume_constant_result  # a fact of the machine: torch.compile takes the value, not the file read
def cpu_has_native_bf16() -> bool:
    """Whether this CPU multiplies bf16 matrices in hardware (AVX512_BF16 or AMX on x86). On x86
    without them torch's bf16 GEMM is several times slower than float32 (benchmarks/RESULTS.md).
    Other architectures, and machines whose flags cannot be read, are left to torch."""
    if platform.machine().lower() not in ("x86_64", "amd64"):
        return True
    try:
        with open("/proc/cpuinfo", encoding="ascii", errors="replace") as info:
            flags = next((line for line in info if line.startswith("flags")), "")
    except OSError:
        return True
    return not flags or any(f in flags.split() for f in ("avx512_bf16", "amx_bf16"))


def _slow_bf16_rows(x: torch.Tensor, weight: torch.Tensor) -> int | None:
    """The row count of a bf16 product that torch would run slowly: on a CPU without native bf16,
    outside autograd and outside torch.compile (inductor compiles its own GEMMs); else None."""
    if (torch.compiler.is_compiling() or x.dtype != torch.bfloat16 or weight.dtype != torch.bfloat16
            or x.device.type != "cpu" or weight.device.type != "cpu"
            or (torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad)) or cpu_has_native_bf16()):
        return None
    return x.shape[:-1].numel()


def use_wide_fp32(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """A bf16 product of many rows (prefill, vision) on a CPU without native bf16, outside autograd."""
    rows = _slow_bf16_rows(x, weight)
    return rows is not None and rows >= WIDE_MIN_ROWS


def use_blocked_kernel(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """Between the decode kernel's rows and the float32 route, on a CPU without native bf16, the kernel
    over blocks of MAX_ROWS rows beats both (benchmarks/RESULTS.md); outside autograd."""
    rows = _slow_bf16_rows(x, weight)
    return rows is not None and MAX_ROWS < rows < WIDE_MIN_ROWS and gemv_available()


def blocked_kernel_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """x @ weight.T (+ bias) through the decode kernel, MAX_ROWS rows at a time."""
    flat = x.reshape(-1, x.shape[-1])  # (rows, in)
    out = torch.cat([gemv_bf16(flat[i:i + MAX_ROWS], weight) for i in range(0, flat.shape[0], MAX_ROWS)])
    out = out.view(*x.shape[:-1], weight.shape[0])
    return out if bias is None else out + bias


def wide_fp32_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """x @ weight.T (+ bias) for bf16 x and weight, computed as float32 GEMMs over blocks of output
    features and rounded to bf16 once, as a bf16 GEMM accumulating in float32 does. Converting a block
    of weights costs far less than the GEMM it feeds; blocks bound the float32 copy's memory."""
    flat = x.reshape(-1, x.shape[-1]).float()  # (rows, in)
    out = torch.empty(flat.shape[0], weight.shape[0], dtype=torch.bfloat16)
    for start in range(0, weight.shape[0], WIDE_BLOCK):
        stop = start + WIDE_BLOCK
        part_bias = bias[start:stop].float() if bias is not None else None
        out[:, start:stop] = F.linear(flat, weight[start:stop].float(), part_bias)
    return out.view(*x.shape[:-1], weight.shape[0])


@functools.cache
def onednn_bias_available() -> bool:
    """Whether oneDNN's linear (`torch.ops.mkldnn._linear_pointwise`, the op inductor's CPU linears call)
    takes a plain bf16 weight here and adds the bias as part of its product."""
    if not torch.backends.mkldnn.is_available():
        return False
    try:
        out = torch.ops.mkldnn._linear_pointwise(torch.ones(8, 32, dtype=torch.bfloat16),
                                                 torch.ones(16, 32, dtype=torch.bfloat16),
                                                 torch.ones(16, dtype=torch.bfloat16), "none", [], "")
    except (AttributeError, RuntimeError):
        return False
    return out.shape == (8, 16) and bool((out == 33).all())


def use_onednn_bias(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> bool:
    """A bf16 product with a bias and more rows than the decode kernel takes (the vision MLP and the
    projector), on a CPU with native bf16, where no gradient is needed. torch's F.linear runs it as
    addmm, whose bias handling costs 5-15% of the GEMM on the vision MLP's shapes; oneDNN's linear
    adds the bias inside its product, with the same values (benchmarks/RESULTS.md)."""
    return (bias is not None and x.dim() >= 2 and x.shape[-1] == weight.shape[-1] and weight.dim() == 2
            and x.dtype == torch.bfloat16 and weight.dtype == torch.bfloat16
            and bias.dtype == torch.bfloat16 and x.device.type == "cpu" and weight.device.type == "cpu"
            and bias.device.type == "cpu" and x.shape[:-1].numel() > gemv_max_rows()
            and not torch.compiler.is_compiling()
            and not (torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad or bias.requires_grad))
            and cpu_has_native_bf16() and onednn_bias_available())


def onednn_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """x @ weight.T + bias through oneDNN's linear (see use_onednn_bias); no autograd."""
    flat = x.reshape(-1, x.shape[-1]).contiguous()  # (rows, in)
    out = torch.ops.mkldnn._linear_pointwise(flat, weight, bias, "none", [], "")
    return out.view(*x.shape[:-1], weight.shape[0])


class DecodeLinear(nn.Linear):
    """nn.Linear (same parameters, same state-dict names) with faster bf16 products on CPUs.

    A product with at most cpu_kernels.gemv_max_rows() rows (16 with AVX2, 32 with AVX-512 BF16, 64
    on AMX tiles) in bf16 on the CPU, outside autograd, runs through cpu_kernels.gemv_bf16, which streams the
    weight faster than F.linear with few rows. On a CPU without native bf16, more rows go through that kernel MAX_ROWS at a time
    (blocked_kernel_linear), and WIDE_MIN_ROWS or more as float32 GEMMs (wide_fp32_linear); with
    native bf16, more rows with a bias go to oneDNN's linear (onednn_linear); everything else
    (float32, autograd, GPU) calls F.linear.
    """

    @classmethod
    def from_linear(cls, linear: nn.Linear) -> "DecodeLinear":
        """A DecodeLinear sharing `linear`'s parameters (no copy; works on the meta device too)."""
        new = cls.__new__(cls)
        nn.Module.__init__(new)
        new.in_features, new.out_features = linear.in_features, linear.out_features
        new.weight = linear.weight
        new.bias = linear.bias
        return new

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if use_gemv(x, self.weight):
            out = gemv_bf16(x, self.weight)
            return out if self.bias is None else out + self.bias
        if use_blocked_kernel(x, self.weight):
            return blocked_kernel_linear(x, self.weight, self.bias)
        if use_wide_fp32(x, self.weight):
            return wide_fp32_linear(x, self.weight, self.bias)
        if use_onednn_bias(x, self.weight, self.bias):
            return onednn_linear(x, self.weight, self.bias)
        return F.linear(x, self.weight, self.bias)

    def product(self, x: torch.Tensor) -> torch.Tensor:
        """x @ weight.T without the bias (a row-parallel layer adds it once, after its all-reduce)."""
        if use_gemv(x, self.weight):
            return gemv_bf16(x, self.weight)
        if use_blocked_kernel(x, self.weight):
            return blocked_kernel_linear(x, self.weight)
        return wide_fp32_linear(x, self.weight) if use_wide_fp32(x, self.weight) else F.linear(x, self.weight)


class Float32Conv2d(nn.Conv2d):
    """nn.Conv2d (same parameters and names) whose bf16 convolution, on a CPU without native bf16 and
    outside autograd, runs in float32 and is rounded to bf16 once: torch's bf16 convolution there is
    over 20x slower (the vision patch embedding: benchmarks/RESULTS.md)."""

    @classmethod
    def from_conv(cls, conv: nn.Conv2d) -> "Float32Conv2d":
        new = cls.__new__(cls)
        new.__dict__.update(conv.__dict__)  # parameters, buffers, hooks and conv settings, shared
        return new

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if _slow_bf16_rows(x, self.weight) is None or self.padding_mode != "zeros":
            return super().forward(x)
        bias = self.bias.float() if self.bias is not None else None
        out = F.conv2d(x.float(), self.weight.float(), bias, self.stride, self.padding, self.dilation, self.groups)
        return out.to(torch.bfloat16)


def apply_cpu_kernels(model: nn.Module) -> nn.Module:
    """Swap every plain nn.Linear of `model` for a DecodeLinear, every plain nn.Conv2d for a
    Float32Conv2d, every vision attention core for mllama.cpu_attention's and every RMSNorm and text
    self-attention for mllama.row_kernels', in place; returns `model`.

    from_pretrained does this for every model it loads. The swap is harmless where the kernel is
    unused (float32, GPU, prefill): the modules then call F.linear / conv2d exactly as torch's do.
    """
    swap_linears(model, lambda _, linear: DecodeLinear.from_linear(linear) if type(linear) is nn.Linear else None)
    apply_cpu_attention(model)
    apply_row_kernels(model)
    for name, module in list(model.named_modules()):
        if type(module) is nn.Conv2d and name:
            parent, _, attr = name.rpartition(".")
            setattr(model.get_submodule(parent), attr, Float32Conv2d.from_conv(module))
    return model
