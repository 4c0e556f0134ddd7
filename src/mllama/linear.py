"""Backends for the model's linear layers, applied to a built model by swapping modules.

The model code builds plain `nn.Linear`s. A backend replaces some of them afterwards with a module
of the same interface: `DecodeLinear` (the bf16 CPU decode kernel, below; `apply_cpu_kernels`) or
the int8 / int4 modules of mllama.quantize. `swap_linears` is the one mechanism they share, so a
later backend (tensor parallelism, LoRA) plugs in the same way, on a real model or on one built on
the meta device before its weights are read (weights.load_pretrained does that for quantization).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from mllama.cpu_kernels import gemv_bf16, use_gemv


def swap_linears(model: nn.Module, replace: Callable[[str, nn.Linear], nn.Module | None]) -> list[str]:
    """Offer every `nn.Linear` of `model` (by its module name) to `replace`; where it returns a
    module, that module takes the linear's place. Returns the names of the replaced linears."""
    swapped = []
    for name, module in list(model.named_modules()):
        if not isinstance(module, nn.Linear):
            continue
        new = replace(name, module)
        if new is None or new is module:
            continue
        if not name:
            raise ValueError("swap_linears: the model itself is a Linear; wrap it in a module first")
        parent, _, attr = name.rpartition(".")
        setattr(model.get_submodule(parent), attr, new)
        swapped.append(name)
    return swapped


class DecodeLinear(nn.Linear):
    """nn.Linear (same parameters, same state-dict names) whose decode steps use the bf16 CPU kernel.

    A product with at most cpu_kernels.MAX_ROWS rows in bf16 on the CPU, outside autograd, runs
    through cpu_kernels.gemv_bf16, which streams the weight about twice as fast as F.linear with few
    rows; everything else (prefill, float32, autograd, no kernel here) calls F.linear.
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
        return F.linear(x, self.weight, self.bias)

    def product(self, x: torch.Tensor) -> torch.Tensor:
        """x @ weight.T without the bias (a row-parallel layer adds it once, after its all-reduce)."""
        return gemv_bf16(x, self.weight) if use_gemv(x, self.weight) else F.linear(x, self.weight)


def apply_cpu_kernels(model: nn.Module) -> nn.Module:
    """Swap every plain nn.Linear of `model` for a DecodeLinear, in place; returns `model`.

    from_pretrained does this for every model it loads. The swap is harmless where the kernel is
    unused (float32, GPU, prefill): DecodeLinear then calls F.linear exactly as nn.Linear does.
    """
    swap_linears(model, lambda _, linear: DecodeLinear.from_linear(linear) if type(linear) is nn.Linear else None)
    return model
