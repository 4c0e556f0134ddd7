"""int4 linears with their weights in blocks of 32 rows for the CPU's products (a module swap).

gemm_small.c's int4 products read the row-major int4 format (quant_format: a weight row after
another), in which every group of every row ends in a conversion, a scale shuffle and an FMA of its
own. csrc/int4_rows.h holds 32 rows in a block instead, a vector's lanes being 16 weight rows: per
128 weights a load, two masks and two vpdpbusd, the group's float work shared by 16 rows: about half
the instructions a weight, which is what held the one-row product below the memory's rate
(benchmarks/RESULTS.md). Prompts gain most: many rows of x against weights unpacked once in registers.

`pack_int4_rows(model)` swaps a model's `Int4Linear`s (out_features a multiple of 32, on the CPU) for
`Int4RowsLinear`, whose weight then exists only in the blocked layout (no second copy);
`unpack_int4_rows` swaps them back. from_pretrained does it on the CPU for bf16 models (`pack_loaded`).
bf16 x on the CPU outside autograd takes the blocked kernel, any number of rows: decode steps and
prompts alike, each row of x rounded to int8 per group as the one-row kernels (and the AMX tiles)
round it, so a row gets the same bits in any batch, though not the row-major kernels' bits (the sums
run in another order). float32 x and autograd go through an Int4Linear unpacked for the call. The
state dict holds the row-major format, so checkpoints save and load unchanged. LoRA and tensor
parallelism unpack first (training and sharding read row-major weights); moving the model to another
device is refused, naming unpack_int4_rows.
"""

from __future__ import annotations

import ctypes
import functools
from collections.abc import Callable

import torch
from torch import nn

from mllama import cpu_kernels
from mllama.decode_plan import ROW_KIND_INT4_ROWS, RowKernel
from mllama.host_memory import fresh_params, fresh_zeros
from mllama.linear import PackedWeights, swap_linears
from mllama.quantize import Int4Linear, _QuantizedLinear

ROWS_BLOCK = 32  # csrc/int4_rows.h's ROWS_BLOCK


@functools.cache
def _lib() -> ctypes.CDLL | None:
    lib = cpu_kernels.small_library()
    if lib is None or cpu_kernels.small_kernel_level() != 2:
        return None
    ptr, i64, c_int = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int
    lib.mllama_int4_rows.argtypes = [ptr, i64, i64, i64, i64, ptr, ptr, ptr, c_int, i64, ptr, c_int]
    lib.mllama_int4_rows_row_bf16.argtypes = [ptr, i64, i64, i64, ptr, ptr, ptr, c_int, i64, ptr, c_int]
    lib.mllama_int4_rows_silu_bf16.argtypes = [ptr, i64, i64, i64] + [ptr] * 6 + [c_int, i64, ptr, c_int]
    lib.mllama_int4_rows_pack.argtypes = [ptr, i64, i64, ptr, c_int, c_int]
    for fn in (lib.mllama_int4_rows, lib.mllama_int4_rows_row_bf16, lib.mllama_int4_rows_silu_bf16,
               lib.mllama_int4_rows_pack):
        fn.restype = c_int
    return lib


def rows_available() -> bool:
    """Whether the blocked int4 kernels run here (csrc/gemm_small.c with 512-bit VNNI)."""
    return _lib() is not None


def can_pack(module: nn.Module) -> bool:
    """An Int4Linear (exactly) on the CPU, out_features a multiple of 32, float32 or bf16 scales, on a
    machine where rows_available()."""
    return (type(module) is Int4Linear and module.out_features % ROWS_BLOCK == 0
            and module.weight_packed.device.type == "cpu" and not module.weight_packed.is_meta
            and module.weight_scale.dtype in (torch.float32, torch.bfloat16) and rows_available())


def _repack(packed: torch.Tensor, *, unpack: bool) -> torch.Tensor:
    n, half = packed.shape
    out = fresh_zeros(packed.shape, packed.dtype)  # either layout may be kept: on huge pages, as quantize_int4's
    if _lib().mllama_int4_rows_pack(packed.contiguous().data_ptr(), n, 2 * half, out.data_ptr(), int(unpack),
                                    torch.get_num_threads()) != 0:
        raise ValueError(f"int4 rows: cannot repack a weight of shape {tuple(packed.shape)}")
    return out


def _block_params(params: torch.Tensor) -> torch.Tensor:  # (n, groups) -> (n / 32, groups, 32)
    n, groups = params.shape
    out = fresh_params((n // ROWS_BLOCK, groups, ROWS_BLOCK), params.dtype)  # read beside the weights
    return out.copy_(params.view(n // ROWS_BLOCK, ROWS_BLOCK, groups).transpose(1, 2))


def _row_params(params: torch.Tensor) -> torch.Tensor:  # (n / 32, groups, 32) -> (n, groups)
    blocks, groups, _ = params.shape
    out = fresh_params((blocks * ROWS_BLOCK, groups), params.dtype)
    out.view(blocks, ROWS_BLOCK, groups).copy_(params.transpose(1, 2))
    return out


def rows_product(x: torch.Tensor, packed: torch.Tensor, scale: torch.Tensor, offset: torch.Tensor,
                 group_size: int) -> torch.Tensor:
    """(..., K) bf16 x (CPU) against int4 weights in blocks of 32 rows (packed (N, Kp / 2) uint8, scale and
    offset (N / 32, groups, 32), all contiguous) -> (..., N) bf16. Under torch.compile the custom op
    mllama::int4_rows_linear (the same call, opaque to the graph)."""
    if torch.compiler.is_compiling():
        return _rows_product_op(x, packed, scale, offset, group_size)
    return _rows_product(x, packed, scale, offset, group_size)


def _rows_product(x: torch.Tensor, packed: torch.Tensor, scale: torch.Tensor, offset: torch.Tensor,
                  group_size: int) -> torch.Tensor:
    k_in = x.shape[-1]
    flat = x.reshape(-1, k_in).contiguous()  # (rows, K)
    (rows, _), (n, half) = flat.shape, packed.shape
    pointers = (packed.data_ptr(), scale.data_ptr(), offset.data_ptr(), int(scale.dtype == torch.bfloat16), group_size)
    if rows == 1:  # a decode step's call: rounded to bf16 in C
        out = torch.empty(1, n, dtype=torch.bfloat16)
        rc = _lib().mllama_int4_rows_row_bf16(flat.data_ptr(), k_in, n, 2 * half, *pointers, out.data_ptr(),
                                              torch.get_num_threads())
    else:
        out = torch.empty(rows, n, dtype=torch.float32)
        rc = _lib().mllama_int4_rows(flat.data_ptr(), rows, k_in, n, 2 * half, *pointers, out.data_ptr(),
                                     torch.get_num_threads())
    if rc != 0:
        raise ValueError(f"int4 rows: the kernel refused {rows} rows of {k_in} features against a weight of "
                         f"shape {tuple(packed.shape)} (group size {group_size})")
    return out.to(torch.bfloat16).view(*x.shape[:-1], n)


_rows_product_op = torch.library.custom_op("mllama::int4_rows_linear", _rows_product, mutates_args=())


@_rows_product_op.register_fake
def _(x: torch.Tensor, packed: torch.Tensor, scale: torch.Tensor, offset: torch.Tensor,
      group_size: int) -> torch.Tensor:
    return x.new_empty(*x.shape[:-1], packed.shape[0])


class Int4RowsLinear(PackedWeights, _QuantizedLinear):
    """An Int4Linear whose weight, scales and offsets are held in blocks of 32 rows (see the module
    docstring). `weight_packed`, `weight_scale` and `weight_offset` read as row-major copies."""

    mode = "int4"
    unpack_hint = "call mllama.int4_rows.unpack_int4_rows(model) first"

    def __init__(self, linear: Int4Linear) -> None:
        super().__init__()
        if not can_pack(linear):
            raise ValueError(f"Int4RowsLinear: needs an Int4Linear on the CPU with out_features a multiple of "
                             f"{ROWS_BLOCK} on a CPU with AVX512-VNNI; got {linear}")
        self.in_features, self.out_features, self.group_size = linear.in_features, linear.out_features, linear.group_size
        # not in the state dict, which holds the row-major format (_save_to_state_dict)
        self.register_buffer("rows_packed", _repack(linear.weight_packed, unpack=False), persistent=False)
        self.register_buffer("rows_scale", _block_params(linear.weight_scale), persistent=False)
        self.register_buffer("rows_offset", _block_params(linear.weight_offset), persistent=False)
        self.register_parameter("bias", linear.bias)

    @property
    def weight_packed(self) -> torch.Tensor:
        return _repack(self.rows_packed, unpack=True)

    @property
    def weight_scale(self) -> torch.Tensor:
        return _row_params(self.rows_scale)

    @property
    def weight_offset(self) -> torch.Tensor:
        return _row_params(self.rows_offset)

    def to_int4(self) -> Int4Linear:
        """The same weights as a row-major Int4Linear (new tensors; the bias shared)."""
        linear = Int4Linear(self.in_features, self.out_features, bias=False, dtype=self.rows_scale.dtype,
                            group_size=self.group_size, device="meta")
        linear.weight_packed, linear.weight_scale, linear.weight_offset = (self.weight_packed, self.weight_scale,
                                                                           self.weight_offset)
        linear.bias = self.bias
        return linear

    def _takes(self, x: torch.Tensor) -> bool:
        return (x.dtype == torch.bfloat16 and x.device.type == "cpu" and x.shape[:-1].numel() > 0
                and not (torch.is_grad_enabled() and x.requires_grad))

    def _weights(self) -> tuple[torch.Tensor, ...]:
        return self.rows_packed, self.rows_scale, self.rows_offset

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] != self.in_features:
            raise ValueError(f"{type(self).__name__}: input of {x.shape[-1]} features, the weight takes "
                             f"{self.in_features} (input shape {tuple(x.shape)})")
        out = self.product(x)
        return out if self.bias is None else out + self.bias.to(out.dtype)

    def product(self, x: torch.Tensor) -> torch.Tensor:
        """x @ W.T without the bias (the row-major module's for what the blocked kernel does not take)."""
        return rows_product(x, *self._weights(), self.group_size) if self._takes(x) else self.to_int4().product(x)

    def silu_product(self, up: nn.Module, x: torch.Tensor) -> torch.Tensor | None:
        """silu(self(x)) * up(x) (an MLP's gate and up) in one kernel call for one bf16 row, where
        fuses_silu_with(up); else None."""
        if (x.shape[-1] != self.in_features or x.numel() != self.in_features or not self._takes(x)
                or torch.compiler.is_compiling() or not self.fuses_silu_with(up)):
            return None
        flat = x.contiguous()
        out = torch.empty(*x.shape[:-1], self.out_features, dtype=torch.bfloat16)
        pointers = [t.data_ptr() for t in (*self._weights(), *up._weights())]
        rc = _lib().mllama_int4_rows_silu_bf16(flat.data_ptr(), self.in_features, self.out_features,
                                               self.rows_packed.shape[1] * 2, *pointers,
                                               int(self.rows_scale.dtype == torch.bfloat16), self.group_size,
                                               out.data_ptr(), torch.get_num_threads())
        return out if rc == 0 else None

    def fuses_silu_with(self, up: nn.Module) -> bool:
        """Whether `up` is an Int4RowsLinear of the same shape, group size and scale dtype and neither has
        a bias: the pair that silu_product (and mllama.decode_layer) multiply in one call."""
        return (type(up) is Int4RowsLinear and self.bias is None and up.bias is None
                and (up.in_features, up.out_features, up.group_size) == (self.in_features, self.out_features,
                                                                        self.group_size)
                and up.rows_scale.dtype == self.rows_scale.dtype)

    def row_kernel(self) -> RowKernel | None:
        """The C call `product` makes for one bf16 row (mllama.decode_layer makes it from C); None where
        the kernel is not loaded."""
        lib = _lib()
        if lib is None or self.rows_scale.device.type != "cpu":
            return None
        return RowKernel(kind=ROW_KIND_INT4_ROWS, row=lib.mllama_int4_rows_row_bf16, silu=lib.mllama_int4_rows_silu_bf16,
                         fmt=cpu_kernels.FORMAT_CODES["int4"], level=0,
                         scale_bf16=self.rows_scale.dtype == torch.bfloat16, group=self.group_size,
                         k=self.rows_packed.shape[1] * 2, tensors=self._weights())

    def dequantize(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        return self.to_int4().dequantize(dtype)

    def _save_to_state_dict(self, destination, prefix, keep_vars):  # type: ignore[no-untyped-def]
        super()._save_to_state_dict(destination, prefix, keep_vars)  # the bias
        destination[prefix + "weight_packed"] = self.weight_packed
        destination[prefix + "weight_scale"] = self.weight_scale
        destination[prefix + "weight_offset"] = self.weight_offset

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys,  # type: ignore[no-untyped-def]
                              unexpected_keys, error_msgs):
        blocks, groups, _ = self.rows_scale.shape
        params = (blocks * ROWS_BLOCK, groups)
        shapes = {"weight_packed": tuple(self.rows_packed.shape), "weight_scale": params, "weight_offset": params}
        given = {}
        for name, shape in shapes.items():
            key = prefix + name
            if key not in state_dict:
                missing_keys.append(key)
            elif tuple(state_dict[key].shape) != shape:
                error_msgs.append(f"size mismatch for {key}: copying a param with shape {tuple(state_dict[key].shape)}, "
                                  f"the shape in current model is {shape}.")
            else:
                given[name] = state_dict[key]
        if len(given) == len(shapes):
            self.rows_packed = _repack(given["weight_packed"].to("cpu", torch.uint8), unpack=False)
            self.rows_scale = _block_params(given["weight_scale"].to("cpu", self.rows_scale.dtype))
            self.rows_offset = _block_params(given["weight_offset"].to("cpu", self.rows_offset.dtype))
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)
        for name in shapes:  # not buffers here, but taken above
            if prefix + name in unexpected_keys:
                unexpected_keys.remove(prefix + name)

    def _apply(self, fn, recurse=True):  # type: ignore[no-untyped-def]
        probe = fn(torch.empty(0, dtype=torch.uint8))
        if probe.device.type != "cpu":
            raise RuntimeError(f"int4 weights in blocks of 32 rows stay on the CPU ({probe.device} asked); "
                               f"{self.unpack_hint}")
        return super()._apply(fn, recurse)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"group_size={self.group_size}, rows of 32")


def pack_int4_rows(model: nn.Module, *, where: Callable[[Int4Linear], bool] | None = None) -> list[str]:
    """Swap every Int4Linear of `model` that can_pack() (and that `where` accepts) for an Int4RowsLinear,
    in place, one at a time; returns their names (none where rows_available() is false)."""
    if not rows_available():
        return []

    def replace(_: str, module: nn.Module) -> nn.Module | None:
        return Int4RowsLinear(module) if can_pack(module) and (where is None or where(module)) else None

    return swap_linears(model, replace, kind=Int4Linear)


def pack_loaded(model: nn.Module) -> list[str]:
    """from_pretrained's last step on the CPU: pack_int4_rows for int4 linears with bf16 scales (a bf16
    model, whose activations take the blocked kernel; float32 ones would go row-major every call), on
    machines without a CUDA GPU (a model loaded on the CPU there is usually moved to the GPU next,
    which packed weights refuse)."""
    if torch.cuda.is_available():
        return []
    return pack_int4_rows(model, where=lambda module: module.weight_scale.dtype == torch.bfloat16)


def unpack_int4_rows(model: nn.Module) -> list[str]:
    """Swap every Int4RowsLinear of `model` back for a row-major Int4Linear; returns their names."""
    return swap_linears(model, lambda _, module: module.to_int4(), kind=Int4RowsLinear)
