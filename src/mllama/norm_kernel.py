"""RMSNorm through csrc/scans.c for bf16 rows on the CPU, applied to a built model by swapping modules.

The model's RMSNorm (layers.py) is eight torch ops. In a decode step each op comes right after a
weight matrix has streamed through every cache, and then costs tens of microseconds whatever its
size; the C call does the same arithmetic (float32, rounded to bf16, times the weight) in one
(benchmarks/RESULTS.md). Its sums of squares run in one fixed order for every row count, so a batch's
rows equal the same rows alone; torch's formula may differ from it in the last bit of a sum.
"""

from __future__ import annotations

import torch
from torch import nn

from mllama import cpu_kernels
from mllama.layers import RMSNorm


def _rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    return cpu_kernels.rms_norm_bf16(x, weight, eps)


_rms_norm_op = torch.library.custom_op("mllama::rms_norm_bf16", _rms_norm, mutates_args=())


@_rms_norm_op.register_fake
def _(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    return torch.empty_like(x)


class KernelRMSNorm(RMSNorm):
    """RMSNorm whose bf16 CPU rows (outside autograd) go through cpu_kernels.rms_norm_bf16, the custom
    op mllama::rms_norm_bf16 under torch.compile; everything else through RMSNorm.forward."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = self.weight
        if (x.dtype == torch.bfloat16 and weight.dtype == torch.bfloat16 and x.device.type == "cpu"
                and weight.device.type == "cpu" and x.is_contiguous() and weight.is_contiguous()
                and x.shape[-1:] == weight.shape and x.numel() > 0
                and not (torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad))
                and cpu_kernels.rms_norm_available()):
            if torch.compiler.is_compiling():
                return _rms_norm_op(x, weight, self.eps)
            return _rms_norm(x, weight, self.eps)
        return super().forward(x)


def apply_norm_kernel(model: nn.Module) -> nn.Module:
    """Swap every plain RMSNorm of `model` for a KernelRMSNorm (the same weight), in place; returns
    `model`. Harmless where the kernel does not run (float32, GPU, training): RMSNorm.forward then."""
    for module in model.modules():
        if type(module) is RMSNorm:
            module.__class__ = KernelRMSNorm  # the same module, parameters and hooks: only forward differs
    return model
