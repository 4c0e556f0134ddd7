"""Weight-only int8 and int4 quantization of the model's linear layers, after loading or while loading.

Formats, configuration and the arithmetic: mllama.quant_format (its names are importable from
here too).

What is quantized: every linear of the text decoder (self- and cross-attention q/k/v/o, MLPs) and
the multi-modal projector; the vision encoder and lm_head only on request. Embeddings, norms, gates
and the vision encoder's convolution stay in the model's dtype.

Compute: decode steps (up to cpu_kernels.MAX_QUANT_ROWS rows, on the CPU, outside autograd) run the
small-row kernels of csrc/gemm_small.c on the packed bytes (where the CPU has AMX, AMX_MIN_ROWS to
cpu_kernels.MAX_AMX_ROWS rows of bf16 x dequantize blocks of rows into cache for the tiles). With
AMX-INT8, int8 weights take the int8 tiles for bf16 x from cpu_kernels.AMX_INT8_MIN_ROWS rows up
(batched decode and prefill), never dequantized: each row of x is rounded to int16 on its own grid
(cpu_kernels.amx_int8_tiles); int4 weights take them too from that many rows up, x rounded to int8
per group as the small-row kernels do (cpu_kernels.amx_int4_tiles). On a CPU with AVX-512 BF16 and
no AMX, bf16 x of cpu_kernels.FUSED_MIN_ROWS (int4 in gemm_small.c's 512-bit tiles:
FUSED_MIN_ROWS_INT4_TILE512) to MAX_AVX512_ROWS rows (batched decode) takes
cpu_kernels.quant_gemv: the bf16 kernel's passes over the weight dequantized a chunk at a time into
L1 (the values of the bf16 dequantization, x not rounded). Anything
else (prefill, vision, GPU, no kernel) dequantizes the weight to the input's dtype, a block of rows at
a time on the CPU, and multiplies with the library GEMM. On CPUs with AVX512-VNNI, from_pretrained
then moves bf16 models' int4 linears into blocks of 32 rows (mllama.int4_rows), whose kernel takes
every bf16 product on the CPU.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from mllama import cpu_kernels, cpu_prefill, quant_ops
from mllama.decode_plan import ROW_KIND_SMALL, RowKernel
from mllama.linear import cpu_has_native_bf16, swap_linears
from mllama.packed_linear import refuse_packed
from mllama.quant_format import (  # noqa: F401  (re-exported: mllama.quantize is the public module)
    DEFAULT_GROUP_SIZE, FORMAT_VERSION, GROUP_SIZES, MODES, QUANT_METHOD, QuantizationConfig, dequantize_int4,
    dequantize_int8, quantize_int4, quantize_int8, resolve_quantization, unpack_int4)

# ----------------------------------------------------------------------------------------------
# The modules swapped in for nn.Linear.

# On a CPU with native bf16, the blocked dequantize + GEMM overtakes the small-row kernels from about
# this many rows of bf16 x (benchmarks/RESULTS.md); elsewhere they win up to MAX_QUANT_ROWS. (Where
# cpu_kernels.fused_quant_rows holds, the fused passes take the kernel's rows up to MAX_QUANT_ROWS, and
# so do gemm_small.c's 512-bit int4 tiles where they apply: _QuantizedLinear._outruns_gemm.)
NATIVE_BF16_KERNEL_ROWS = {"int8": 12, "int4": 12}
# Where the CPU has AMX tiles, bf16 x of this many rows (up to cpu_kernels.MAX_AMX_ROWS) goes through
# them instead, the weights dequantized a block at a time (faster than the small-row kernels from
# here; benchmarks/RESULTS.md). int8 rows of a multiple of 64 values on a CPU with AMX-INT8 take the
# int8 tiles from cpu_kernels.AMX_INT8_MIN_ROWS rows, with no upper limit, and int4 with groups of a
# multiple of 64 too (_QuantizedLinear._use_amx).
AMX_MIN_ROWS = {"int8": 6, "int4": 8}


class _QuantizedLinear(nn.Module):
    mode: str
    in_features: int
    out_features: int
    bias: nn.Parameter | None
    group_size: int = 0  # int4's (int8 scales whole rows)

    def _init_bias(self, bias: bool, dtype: torch.dtype, device: torch.device | str | None) -> None:
        self.bias = nn.Parameter(torch.empty(self.out_features, dtype=dtype, device=device),
                                 requires_grad=False) if bias else None

    def _on_cpu_kernels(self, x: torch.Tensor) -> bool:
        return (x.device.type == "cpu" and x.is_floating_point() and not (torch.is_grad_enabled() and x.requires_grad)
                and self._kernels_take_weights())

    def _kernels_take_weights(self) -> bool:
        """Whether the small-row kernels run here and take these weights (on the CPU, float32 or bf16 scales)."""
        scale = self.weight_scale
        return (scale.device.type == "cpu" and scale.dtype in (torch.float32, torch.bfloat16)
                and cpu_kernels.quant_kernels_available())

    def _use_kernel(self, x: torch.Tensor) -> bool:
        """The small-row kernels: up to MAX_QUANT_ROWS rows, fewer for bf16 x where the CPU has native bf16."""
        rows = x.shape[:-1].numel()
        limit = cpu_kernels.MAX_QUANT_ROWS
        if x.dtype == torch.bfloat16 and cpu_has_native_bf16() and not self._outruns_gemm(rows):
            limit = NATIVE_BF16_KERNEL_ROWS[self.mode]
        return 0 < rows <= limit and self._on_cpu_kernels(x)

    def _fused_rows(self, rows: int) -> bool:
        """Whether `rows` rows of bf16 x take cpu_kernels.quant_gemv (cpu_kernels.fused_quant_rows)."""
        return cpu_kernels.fused_quant_rows(self.mode, rows)

    def _outruns_gemm(self, rows: int) -> bool:
        """Whether the kernel route for `rows` rows of bf16 x beats the blocked dequantize + library GEMM
        on a CPU with native bf16 past NATIVE_BF16_KERNEL_ROWS."""
        return self._fused_rows(rows)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] != self.in_features:  # the int4 kernels would pad a shorter row with zeros
            raise ValueError(f"{type(self).__name__}: input of {x.shape[-1]} features, the weight takes "
                             f"{self.in_features} (input shape {tuple(x.shape)})")
        out = self._one_row(x) if x.dtype == torch.bfloat16 and x.numel() == self.in_features else None
        if out is None:
            out = self.product(x)
        return out if self.bias is None else out + self.bias.to(out.dtype)

    def _one_row(self, x: torch.Tensor) -> torch.Tensor | None:
        """One bf16 row (a decode step's call) through cpu_kernels.small_gemm_row: product()'s route for
        it (small_gemm, then .to(bfloat16)) and its bits, without the torch conversions around the call.
        None where product() would take another route."""
        if not self._takes_row(x):
            return None
        return cpu_kernels.small_gemm_row(x, self.mode, *self._weights(), group_size=self.group_size)

    def _takes_row(self, x: torch.Tensor) -> bool:
        return (x.is_contiguous() and not torch.compiler.is_compiling() and self._on_cpu_kernels(x)
                and all(t.is_contiguous() for t in self._weights()))

    def silu_product(self, up: nn.Module, x: torch.Tensor) -> torch.Tensor | None:
        """silu(self(x)) * up(x) (an MLP's gate and up) in one kernel call for one bf16 row x, where both
        would take _one_row and fuses_silu_with(up) (cpu_kernels.small_gemm_silu_row: F.silu and the
        product's roundings, e^x aside); else None."""
        if (x.dtype != torch.bfloat16 or x.shape[-1] != self.in_features or x.numel() != self.in_features
                or not self.fuses_silu_with(up) or not self._takes_row(x) or not up._takes_row(x)):
            return None
        return cpu_kernels.small_gemm_silu_row(x, self.mode, self._weights(), up._weights(), group_size=self.group_size)

    def fuses_silu_with(self, up: nn.Module) -> bool:
        """Whether `up` is quantized as this one (type, shape, group size, scale dtype) and neither has a
        bias: the pair that silu_product (and mllama.decode_layer) multiply in one call."""
        return (type(up) is type(self) and self.bias is None and up.bias is None
                and (up.in_features, up.out_features) == (self.in_features, self.out_features)
                and up.group_size == self.group_size and up.weight_scale.dtype == self.weight_scale.dtype)

    def row_kernel(self) -> RowKernel | None:
        """The C call _one_row makes for a bf16 row (mllama.decode_layer makes it from C); None where the
        weights would not take it."""
        weights = self._weights()
        entries = cpu_kernels.row_entry_points()
        if entries is None or not self._kernels_take_weights() or not all(t.is_contiguous() for t in weights):
            return None
        row, silu, level = entries
        return RowKernel(kind=ROW_KIND_SMALL, row=row, silu=silu, fmt=cpu_kernels.FORMAT_CODES[self.mode], level=level,
                         scale_bf16=self.weight_scale.dtype == torch.bfloat16, group=self.group_size,
                         k=cpu_kernels.row_length(self.mode, weights[0]), tensors=weights)

    def _weights(self) -> tuple[torch.Tensor, ...]:
        """The weight, its scales (and offsets), as small_gemm takes them."""
        raise NotImplementedError

    def _use_amx(self, x: torch.Tensor) -> bool:
        rows = x.shape[:-1].numel()
        # the row count first: a decode step's one row (most calls) skips the checks below
        if rows < cpu_kernels.AMX_INT8_MIN_ROWS or x.dtype != torch.bfloat16 or torch.compiler.is_compiling():
            return False
        if not self._on_cpu_kernels(x):
            return False
        if self._int8_tiles():  # any number of rows from AMX_INT8_MIN_ROWS (checked above)
            return True
        return AMX_MIN_ROWS[self.mode] <= rows <= cpu_kernels.MAX_AMX_ROWS and cpu_kernels.amx_available()

    def _int8_tiles(self) -> bool:
        """Whether this weight takes the AMX-INT8 tiles here (cpu_kernels.amx_int8_tiles / amx_int4_tiles)."""
        raise NotImplementedError

    def product(self, x: torch.Tensor) -> torch.Tensor:
        """x @ W.T without the bias: the AMX tiles or the small-row kernel, else csrc/gemm_prefill.c
        (cpu_prefill) or the blocked dequantize + GEMM, else (autograd, torch.compile, no kernels)
        F.linear over the whole dequantized weight."""
        if self._use_amx(x):
            out = self._amx_product(x.reshape(-1, self.in_features))
            if out is not None:
                return out.to(x.dtype).view(*x.shape[:-1], self.out_features)
        if self._use_kernel(x):
            return self._kernel_product(x)
        if x.shape[:-1].numel() > 0 and not torch.compiler.is_compiling() and self._on_cpu_kernels(x):
            if cpu_prefill.takes(x, self.mode, self.group_size):
                return cpu_prefill.prefill_product(x, self.mode, *self._weights(), group_size=self.group_size)
            # bf16 GEMMs are slow on a CPU without native bf16 (and fp16 on most): those go in float32
            native = x.dtype == torch.float32 or (x.dtype == torch.bfloat16 and cpu_has_native_bf16())
            compute = x.dtype if native else torch.float32
            out = cpu_prefill.blocked_product(x.reshape(-1, self.in_features), self.out_features,
                                              lambda r0, r1, out: self._dequantize_rows(r0, r1, compute, out),
                                              compute_dtype=compute)
            if out is not None:
                return out.to(x.dtype).view(*x.shape[:-1], self.out_features)
        return F.linear(x, self.dequantize(x.dtype))

    def _kernel_product(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def _amx_product(self, x: torch.Tensor) -> torch.Tensor | None:
        """(M, in_features) bf16 -> (M, out_features) float32 by cpu_kernels.amx_product (None: declined)."""
        raise NotImplementedError

    def _dequantize_rows(self, r0: int, r1: int, dtype: torch.dtype,
                         out: torch.Tensor | None = None) -> torch.Tensor | None:
        """Output rows r0:r1 of the dequantized weight by the C dequantizer (into `out` if given;
        None where it does not run)."""
        raise NotImplementedError

    def _reference_dequantize(self, dtype: torch.dtype) -> torch.Tensor:
        """The whole dequantized weight by torch ops (differentiable, any device)."""
        raise NotImplementedError

    def dequantize(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        dtype = dtype or self.weight_scale.dtype
        if not torch.is_grad_enabled():  # the C dequantizer (same values) is not differentiable
            fast = self._dequantize_rows(0, self.out_features, dtype)
            if fast is not None:
                return fast
        return self._reference_dequantize(dtype)

    def to_linear(self) -> nn.Linear:
        """A plain nn.Linear holding the dequantized weights (in the scales' dtype)."""
        dtype = self.weight_scale.dtype
        linear = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None, device="meta")
        linear.weight = nn.Parameter(self.dequantize(dtype), requires_grad=False)
        if self.bias is not None:
            linear.bias = nn.Parameter(self.bias.detach().clone(), requires_grad=False)
        return linear

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}"


class Int8Linear(_QuantizedLinear):
    """Weight-only int8 linear (symmetric per output channel); see the module docstring."""

    mode = "int8"

    def __init__(self, in_features: int, out_features: int, *, bias: bool, dtype: torch.dtype,
                 device: torch.device | str | None = None) -> None:
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.register_buffer("weight", torch.empty(out_features, in_features, dtype=torch.int8, device=device))
        self.register_buffer("weight_scale", torch.empty(out_features, dtype=dtype, device=device))
        self._init_bias(bias, dtype, device)

    def _weights(self) -> tuple[torch.Tensor, ...]:
        return self.weight, self.weight_scale

    def _kernel_product(self, x: torch.Tensor) -> torch.Tensor:
        return quant_ops.linear_int8(x, self.weight, self.weight_scale)

    def _amx_product(self, x: torch.Tensor) -> torch.Tensor | None:
        return cpu_kernels.amx_product(x, "int8", self.weight, self.weight_scale)

    def _int8_tiles(self) -> bool:
        return cpu_kernels.amx_int8_tiles(self.in_features)

    def _dequantize_rows(self, r0: int, r1: int, dtype: torch.dtype,
                         out: torch.Tensor | None = None) -> torch.Tensor | None:
        return quant_ops.dequantize_int8(self.weight[r0:r1], self.weight_scale[r0:r1], dtype=dtype, out=out)

    def _reference_dequantize(self, dtype: torch.dtype) -> torch.Tensor:
        return dequantize_int8(self.weight, self.weight_scale, dtype=dtype)


class Int4Linear(_QuantizedLinear):
    """Weight-only int4 linear (asymmetric, per group along K); see the module docstring."""

    mode = "int4"

    def __init__(self, in_features: int, out_features: int, *, bias: bool, dtype: torch.dtype, group_size: int,
                 device: torch.device | str | None = None) -> None:
        super().__init__()
        if group_size not in GROUP_SIZES:
            raise ValueError(f"int4 group_size must be one of {list(GROUP_SIZES)}, got {group_size!r}")
        self.in_features, self.out_features, self.group_size = in_features, out_features, group_size
        groups = math.ceil(in_features / group_size)
        self.register_buffer("weight_packed", torch.empty(out_features, groups * group_size // 2, dtype=torch.uint8,
                                                          device=device))
        self.register_buffer("weight_scale", torch.empty(out_features, groups, dtype=dtype, device=device))
        self.register_buffer("weight_offset", torch.empty(out_features, groups, dtype=dtype, device=device))
        self._init_bias(bias, dtype, device)

    def _fused_rows(self, rows: int) -> bool:
        return cpu_kernels.fused_quant_rows("int4", rows, group_size=self.group_size,
                                            k_row=cpu_kernels.row_length("int4", self.weight_packed))

    def _outruns_gemm(self, rows: int) -> bool:  # gemm_small.c's 512-bit int4 tiles do, up to 32 rows
        return self._fused_rows(rows) or cpu_kernels.int4_tile512(self.group_size,
                                                                  cpu_kernels.row_length("int4", self.weight_packed))

    def _weights(self) -> tuple[torch.Tensor, ...]:
        return self.weight_packed, self.weight_scale, self.weight_offset

    def _kernel_product(self, x: torch.Tensor) -> torch.Tensor:
        return quant_ops.linear_int4(x, self.weight_packed, self.weight_scale, self.weight_offset, self.group_size)

    def _amx_product(self, x: torch.Tensor) -> torch.Tensor | None:
        return cpu_kernels.amx_product(x, "int4", self.weight_packed, self.weight_scale, self.weight_offset,
                                       group_size=self.group_size)

    def _int8_tiles(self) -> bool:
        return cpu_kernels.amx_int4_tiles(self.out_features, self.group_size)

    def _dequantize_rows(self, r0: int, r1: int, dtype: torch.dtype,
                         out: torch.Tensor | None = None) -> torch.Tensor | None:
        return quant_ops.dequantize_int4(self.weight_packed[r0:r1], self.weight_scale[r0:r1],
                                         self.weight_offset[r0:r1], group_size=self.group_size,
                                         in_features=self.in_features, dtype=dtype, out=out)

    def _reference_dequantize(self, dtype: torch.dtype) -> torch.Tensor:
        return dequantize_int4(self.weight_packed, self.weight_scale, self.weight_offset,
                               in_features=self.in_features, dtype=dtype)

    def extra_repr(self) -> str:
        return super().extra_repr() + f", group_size={self.group_size}"


def empty_quantized(linear: nn.Linear, config: QuantizationConfig, *, dtype: torch.dtype,
                    device: torch.device | str | None = None) -> _QuantizedLinear:
    """An unfilled quantized module of `linear`'s shape (on the meta device for loading)."""
    bias = linear.bias is not None
    if config.mode == "int8":
        return Int8Linear(linear.in_features, linear.out_features, bias=bias, dtype=dtype, device=device)
    return Int4Linear(linear.in_features, linear.out_features, bias=bias, dtype=dtype,
                      group_size=config.group_size, device=device)


def quantize_weight(weight: torch.Tensor, config: QuantizationConfig) -> dict[str, torch.Tensor]:
    """A float (N, K) weight -> the named tensors of its quantized module (without the bias).
    `weight` may also be anything with a tensor's shape, dtype and device whose row slices
    (`weight[a:b]`) are tensors, read on demand (the loader's rows of a file): the quantizers read it
    quant_format's chunks of rows at a time and hold no slice past the next."""
    if not weight.dtype.is_floating_point or len(weight.shape) != 2:
        raise ValueError(f"can only quantize a 2-D floating weight, got {weight.dtype} {tuple(weight.shape)}")
    if config.mode == "int8":
        return quantize_int8(weight)
    return quantize_int4(weight, group_size=config.group_size)


# ----------------------------------------------------------------------------------------------
# Which linears, and applying it to a model (after loading, or on the meta device before reading).

def is_target(name: str, config: QuantizationConfig) -> bool:
    """Whether the linear at module path `name` is quantized under `config`."""
    if name == "lm_head":
        return config.lm_head
    if name.startswith("model.vision_model."):
        return config.vision
    return True  # the text decoder (model.language_model. / model.) and the projector


def quantize_model(model: nn.Module, config: QuantizationConfig | str) -> nn.Module:
    """Quantize a loaded model's linears in place (see is_target); returns the model."""
    if isinstance(config, str):
        config = QuantizationConfig(mode=config)
    if getattr(model, "quantization_config", None) is not None:
        raise ValueError(f"the model is already quantized ({model.quantization_config.mode})")
    if getattr(model, "tensor_parallel", None) is not None:
        raise ValueError("quantize the model before splitting it with mllama.tp.tensor_parallel, not after")
    refuse_packed(model, "quantize_model")

    def replace(name: str, linear: nn.Linear) -> nn.Module | None:
        if isinstance(linear, _QuantizedLinear) or not is_target(name, config):
            return None
        module = empty_quantized(linear, config, dtype=linear.weight.dtype, device="meta")
        state = quantize_weight(linear.weight.detach().cpu(), config)
        if linear.bias is not None:
            state["bias"] = linear.bias.detach()
        module.load_state_dict({k: v.to(linear.weight.device) for k, v in state.items()}, assign=True)
        return module

    swap_linears(model, replace)
    model.quantization_config = config
    return model


def prepare_for_loading(model: nn.Module, config: QuantizationConfig, *,
                        dtype: torch.dtype) -> "QuantizeOnLoad":
    """The load-time transform: swap the target linears of a meta-device model for empty quantized
    modules, and return the per-tensor convert hook that turns a float checkpoint weight of one of
    them (its in-memory name, read in `dtype`) into the quantized module's tensors."""
    targets: set[str] = set()

    def replace(name: str, linear: nn.Linear) -> nn.Module | None:
        if not is_target(name, config):
            return None
        targets.add(f"{name}.weight")
        return empty_quantized(linear, config, dtype=dtype, device="meta")

    swap_linears(model, replace)
    model.quantization_config = config

    return QuantizeOnLoad(targets, config)


class QuantizeOnLoad:
    """The convert hook of a quantized load: a checkpoint weight of a quantized linear (its
    in-memory name) -> the quantized module's tensors; any other tensor passes through.
    `takes_rows(name)`: the loader may hand that weight over as rows read on demand (see
    quantize_weight), so the float weight is never held whole."""

    def __init__(self, targets: set[str], config: QuantizationConfig) -> None:
        self.targets, self.config = targets, config

    def takes_rows(self, name: str) -> bool:
        return name in self.targets

    def __call__(self, name: str, tensor: torch.Tensor) -> dict[str, torch.Tensor]:
        if name not in self.targets:
            return {name: tensor}
        prefix = name.removesuffix("weight")
        return {prefix + key: value for key, value in quantize_weight(tensor, self.config).items()}


def dequantize_model(model: nn.Module) -> nn.Module:
    """Replace every quantized linear by a plain nn.Linear with its dequantized weights (the eager
    reference the tests compare against); returns the model."""
    for name, module in list(model.named_modules()):
        if isinstance(module, _QuantizedLinear):
            parent, _, attr = name.rpartition(".")
            setattr(model.get_submodule(parent), attr, module.to_linear())
    model.quantization_config = None
    return model
