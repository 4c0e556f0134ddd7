"""The quantized linears' entry points into the C kernels: their weights dequantized whole
(csrc/gemm_small.c's row loops, the values of the torch reference in mllama.quant_format) and their
products as torch custom ops (mllama::linear_int8 / linear_int4), which keep a compiled decode step's
call opaque and take the routes eager Int8Linear / Int4Linear take (the AMX tiles, the chunked bf16
passes, the small-row kernels; mllama.cpu_kernels), so compiled or not a product has the same bits.
"""

from __future__ import annotations

import torch

from mllama import cpu_kernels

__all__ = ["dequantize_int4", "dequantize_int8", "linear_int4", "linear_int8"]


def dequantize_int4(packed: torch.Tensor, scale: torch.Tensor, offset: torch.Tensor, *, group_size: int,
                    in_features: int, dtype: torch.dtype, out: torch.Tensor | None = None,
                    level: int = 0) -> torch.Tensor | None:
    """int4 weights (see csrc/gemm_small.c) -> (N, in_features) float32 or bf16, equal to the torch
    reference quantize.dequantize_int4 (into `out`, contiguous, if given); None where the kernel does
    not run (then use that). level 1 keeps to AVX2 (tests); 0: AVX512-BF16 where the CPU has it."""
    lib = cpu_kernels.small_library()
    if (lib is None or dtype not in (torch.float32, torch.bfloat16) or packed.device.type != "cpu"
            or scale.dtype != offset.dtype or scale.dtype not in (torch.float32, torch.bfloat16)):
        return None
    packed, scale, offset = packed.contiguous(), scale.contiguous(), offset.contiguous()
    n = packed.shape[0]
    out = _output(out, (n, in_features), dtype)
    rc = lib.mllama_dequant_int4(packed.data_ptr(), scale.data_ptr(), offset.data_ptr(),
                                 int(scale.dtype == torch.bfloat16), n, cpu_kernels.row_length("int4", packed),
                                 group_size, in_features, out.data_ptr(), int(dtype == torch.bfloat16),
                                 torch.get_num_threads(), level)
    if rc != 0:
        raise ValueError(f"dequantize_int4: the kernel refused group size {group_size} for shape {tuple(packed.shape)}")
    return out


def dequantize_int8(weight: torch.Tensor, scale: torch.Tensor, *, dtype: torch.dtype,
                    out: torch.Tensor | None = None, level: int = 0) -> torch.Tensor | None:
    """int8 weights (N, K) with per-row scales -> float32 or bf16, equal to the torch reference
    quantize.dequantize_int8 (into `out`, contiguous, if given); None where the kernel does not run
    (then use that). level as for dequantize_int4."""
    lib = cpu_kernels.small_library()
    if (lib is None or dtype not in (torch.float32, torch.bfloat16) or weight.device.type != "cpu"
            or scale.dtype not in (torch.float32, torch.bfloat16) or weight.dtype != torch.int8):
        return None
    weight, scale = weight.contiguous(), scale.contiguous()
    out = _output(out, tuple(weight.shape), dtype)
    rc = lib.mllama_dequant_int8(weight.data_ptr(), scale.data_ptr(), int(scale.dtype == torch.bfloat16),
                                 weight.shape[0], weight.shape[1], out.data_ptr(), int(dtype == torch.bfloat16),
                                 torch.get_num_threads(), level)
    if rc != 0:
        raise ValueError(f"dequantize_int8: the kernel refused a weight of shape {tuple(weight.shape)}")
    return out


def _output(out: torch.Tensor | None, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    if out is None:
        return torch.empty(shape, dtype=dtype)
    if tuple(out.shape) != shape or out.dtype != dtype or not out.is_contiguous() or out.device.type != "cpu":
        raise ValueError(f"dequantize: out must be a contiguous CPU {dtype} tensor of shape {shape}, "
                         f"got {out.dtype} {tuple(out.shape)}")
    return out


def linear_int8(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """(..., K) float x int8 (N, K) with per-row scale (N,) -> (..., N) in x's dtype (the custom op
    mllama::linear_int8 under torch.compile, see cpu_kernels.gemv_bf16)."""
    if torch.compiler.is_compiling():
        return _linear_int8_op(x, weight, scale)
    return _linear_int8(x, weight, scale)


def _linear_int8(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    k = x.shape[-1]
    out = None
    if (x.dtype == torch.bfloat16 and x.shape[:-1].numel() >= cpu_kernels.AMX_INT8_MIN_ROWS
            and cpu_kernels.amx_int8_tiles(k)):
        # the route eager Int8Linear takes: the same bits compiled or not
        out = cpu_kernels.amx_product(x.reshape(-1, k), "int8", weight, scale)
    elif x.dtype == torch.bfloat16 and cpu_kernels.fused_quant_rows("int8", x.shape[:-1].numel()):
        out = cpu_kernels.quant_gemv(x.reshape(-1, k), "int8", weight, scale)
    if out is None:
        out = cpu_kernels.small_gemm(x.reshape(-1, k), "int8", weight, scale)
    return out.to(x.dtype).reshape(*x.shape[:-1], weight.shape[0])


_linear_int8_op = torch.library.custom_op("mllama::linear_int8", _linear_int8, mutates_args=())


@_linear_int8_op.register_fake
def _(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return x.new_empty(*x.shape[:-1], weight.shape[0])


def linear_int4(x: torch.Tensor, packed: torch.Tensor, scale: torch.Tensor, offset: torch.Tensor,
                group_size: int) -> torch.Tensor:
    """(..., K) float x int4 weights (packed as in csrc/gemm_small.c) -> (..., N) in x's dtype (the
    custom op mllama::linear_int4 under torch.compile, see cpu_kernels.gemv_bf16)."""
    if torch.compiler.is_compiling():
        return _linear_int4_op(x, packed, scale, offset, group_size)
    return _linear_int4(x, packed, scale, offset, group_size)


def _linear_int4(x: torch.Tensor, packed: torch.Tensor, scale: torch.Tensor, offset: torch.Tensor,
                 group_size: int) -> torch.Tensor:
    k = x.shape[-1]
    out = None
    if (x.dtype == torch.bfloat16 and x.shape[:-1].numel() >= cpu_kernels.AMX_INT8_MIN_ROWS
            and cpu_kernels.amx_int4_tiles(packed.shape[0], group_size)):  # as eager Int4Linear: the same bits
        out = cpu_kernels.amx_product(x.reshape(-1, k), "int4", packed, scale, offset, group_size=group_size)
    elif x.dtype == torch.bfloat16 and cpu_kernels.fused_quant_rows(
            "int4", x.shape[:-1].numel(), group_size=group_size, k_row=cpu_kernels.row_length("int4", packed)):
        out = cpu_kernels.quant_gemv(x.reshape(-1, k), "int4", packed, scale, offset, group_size=group_size)
    if out is None:
        out = cpu_kernels.small_gemm(x.reshape(-1, k), "int4", packed, scale, offset, group_size=group_size)
    return out.to(x.dtype).reshape(*x.shape[:-1], packed.shape[0])


_linear_int4_op = torch.library.custom_op("mllama::linear_int4", _linear_int4, mutates_args=())


@_linear_int4_op.register_fake
def _(x: torch.Tensor, packed: torch.Tensor, scale: torch.Tensor, offset: torch.Tensor,
      group_size: int) -> torch.Tensor:
    return x.new_empty(*x.shape[:-1], packed.shape[0])
