"""Weight-only int8 and int4 quantization of the model's linear layers, after loading or while loading.

Formats (the tensors of a quantized linear, in memory and in a quantized checkpoint):
- int8, symmetric per output channel: `weight` int8 (N, K) and `weight_scale` (N,), w = q * scale,
  q in [-127, 127], scale = max |w| of the row / 127.
- int4, per group of `group_size` values along K (32, 64, 128 or 256), asymmetric:
  `weight_packed` uint8 (N, Kp / 2), `weight_scale` and `weight_offset` (N, Kp / group_size), with
  Kp = K rounded up to the group size; w = q * scale + offset, q in 0..15, offset = the group's
  minimum, scale = its range / 15. Each run of 32 values is 16 bytes: byte j holds value j in its
  low nibble and value 16 + j in its high nibble (the layout csrc/gemm_small.c reads directly).
Scales and offsets have the model's dtype. Biases stay floating. A checkpoint's config.json records
the format as `quantization_config` (QuantizationConfig.to_dict), so it loads without re-quantizing.

What is quantized: every linear of the text decoder (self- and cross-attention q/k/v/o, MLPs) and
the multi-modal projector; the vision encoder and lm_head only on request. Embeddings, norms, gates
and the vision encoder's convolution stay in the model's dtype.

Compute: decode steps (up to cpu_kernels.MAX_QUANT_ROWS rows, on the CPU, outside autograd) run the
small-row kernels of csrc/gemm_small.c on the packed bytes; anything else (prefill, vision, GPU,
no kernel) dequantizes the weight to the input's dtype and calls F.linear.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import KW_ONLY, dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from mllama import cpu_kernels
from mllama.linear import cpu_has_native_bf16, swap_linears

MODES = ("int8", "int4")
GROUP_SIZES = (32, 64, 128, 256)
DEFAULT_GROUP_SIZE = 128  # benchmarks/RESULTS.md: faster than 64 with as few answers changed (also torchao's default)
QUANT_METHOD = "mllama"
FORMAT_VERSION = 1
_CHUNK_ROWS = 4096  # rows quantized at a time, bounding the float32 temporaries


@dataclass(frozen=True)
class QuantizationConfig:
    """How to quantize: mode 'int8' or 'int4', the int4 group size, and whether the vision encoder
    and lm_head are quantized too (the text decoder and projector always are)."""

    mode: str
    _: KW_ONLY
    group_size: int = DEFAULT_GROUP_SIZE
    vision: bool = False
    lm_head: bool = False

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"unknown quantization mode {self.mode!r}; use one of {list(MODES)}")
        if self.mode == "int4" and self.group_size not in GROUP_SIZES:
            raise ValueError(f"int4 group_size must be one of {list(GROUP_SIZES)} (a multiple of the kernel's "
                             f"32-value block), got {self.group_size!r}")

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"quant_method": QUANT_METHOD, "format_version": FORMAT_VERSION, "mode": self.mode,
                               "quantize_vision": self.vision, "quantize_lm_head": self.lm_head}
        if self.mode == "int4":
            out["group_size"] = self.group_size
        return out

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "QuantizationConfig":
        """Ours (quant_method 'mllama'), or the transformers-style configs that map onto it:
        torchao (quant_type 'int8_weight_only' / 'int4_weight_only', group_size) and bitsandbytes
        (load_in_8bit / load_in_4bit; quantized here with mllama's int8 / int4, not nf4)."""
        method = data.get("quant_method", QUANT_METHOD)
        if method == QUANT_METHOD:
            version = data.get("format_version", FORMAT_VERSION)
            if version != FORMAT_VERSION:
                raise ValueError(f"quantization format_version {version} is not supported (this mllama reads "
                                 f"{FORMAT_VERSION})")
            return cls(mode=data.get("mode"), group_size=data.get("group_size", DEFAULT_GROUP_SIZE),
                       vision=bool(data.get("quantize_vision", False)),
                       lm_head=bool(data.get("quantize_lm_head", False)))
        if method == "torchao":
            kind = data.get("quant_type")
            kind = kind if isinstance(kind, str) else (kind or {}).get("default", {}).get("_type", kind)
            modes = {"int8_weight_only": "int8", "int4_weight_only": "int4",
                     "Int8WeightOnlyConfig": "int8", "Int4WeightOnlyConfig": "int4"}
            if kind not in modes:
                raise ValueError(f"torchao quant_type {kind!r} does not map onto mllama's int8/int4 weight-only modes")
            group = (data.get("quant_type_kwargs") or {}).get("group_size", data.get("group_size"))
            return cls(mode=modes[kind], group_size=group or DEFAULT_GROUP_SIZE)
        if method == "bitsandbytes":
            if data.get("load_in_8bit"):
                return cls(mode="int8")
            if data.get("load_in_4bit"):
                return cls(mode="int4")
            raise ValueError("bitsandbytes quantization_config sets neither load_in_8bit nor load_in_4bit")
        raise ValueError(f"quant_method {method!r} is not supported; use 'mllama', 'torchao' or 'bitsandbytes'")


def resolve_quantization(quantization: str | QuantizationConfig | None,
                         quantization_config: Mapping[str, Any] | Any | None) -> QuantizationConfig | None:
    """from_pretrained's two spellings -> one config or None. `quantization` is 'int8', 'int4' or a
    QuantizationConfig; `quantization_config` a dict or any object with to_dict() (transformers')."""
    if quantization is not None and quantization_config is not None:
        raise ValueError("pass quantization or quantization_config, not both")
    if isinstance(quantization, QuantizationConfig) or quantization is None and quantization_config is None:
        return quantization
    if quantization is not None:
        if not isinstance(quantization, str):
            raise TypeError(f"quantization must be 'int8', 'int4' or a QuantizationConfig, got {quantization!r}")
        return QuantizationConfig(mode=quantization)
    if isinstance(quantization_config, QuantizationConfig):
        return quantization_config
    data = quantization_config.to_dict() if hasattr(quantization_config, "to_dict") else quantization_config
    if not isinstance(data, Mapping):
        raise TypeError(f"quantization_config must be a dict or have to_dict(), got {type(quantization_config).__name__}")
    return QuantizationConfig.from_dict(data)


# ----------------------------------------------------------------------------------------------
# The arithmetic: quantize a float weight, and dequantize it back.

def quantize_int8(weight: torch.Tensor) -> dict[str, torch.Tensor]:
    """(N, K) float -> {'weight': int8 (N, K), 'weight_scale': (N,) in weight's dtype}."""
    n, k = weight.shape
    q = cpu_kernels.fresh_zeros((n, k), torch.int8)  # huge pages stream faster through the kernel
    scale = torch.empty(n, dtype=weight.dtype)
    for start in range(0, n, _CHUNK_ROWS):
        w = weight[start:start + _CHUNK_ROWS].float()
        amax = w.abs().amax(dim=1)
        s = torch.where(amax > 0, amax / 127, torch.ones_like(amax)).to(weight.dtype)
        scale[start:start + len(w)] = s
        # Divide by the scale as stored, so dequantizing reproduces the nearest grid value.
        q[start:start + len(w)] = torch.round(w / s.float()[:, None]).clamp_(-127, 127).to(torch.int8)
    return {"weight": q, "weight_scale": scale}


def dequantize_int8(weight: torch.Tensor, scale: torch.Tensor, *, dtype: torch.dtype) -> torch.Tensor:
    return (weight.float() * scale.float()[:, None]).to(dtype)


def quantize_int4(weight: torch.Tensor, *, group_size: int) -> dict[str, torch.Tensor]:
    """(N, K) float -> {'weight_packed': uint8 (N, Kp / 2), 'weight_scale', 'weight_offset': (N, Kp / G)}."""
    n, k = weight.shape
    groups = math.ceil(k / group_size)
    kp = groups * group_size
    packed = cpu_kernels.fresh_zeros((n, kp // 2), torch.uint8)
    scale = torch.empty(n, groups, dtype=weight.dtype)
    offset = torch.empty(n, groups, dtype=weight.dtype)
    # Padding beyond K is left out of min/max. On the weight's device: loading onto a GPU quantizes there.
    real = (torch.arange(kp, device=weight.device) < k).view(groups, group_size)
    for start in range(0, n, _CHUNK_ROWS):
        w = F.pad(weight[start:start + _CHUNK_ROWS].float(), (0, kp - k)).view(-1, groups, group_size)
        lo = torch.where(real, w, torch.inf).amin(dim=2)
        hi = torch.where(real, w, -torch.inf).amax(dim=2)
        s = torch.where(hi > lo, (hi - lo) / 15, torch.ones_like(lo)).to(weight.dtype)
        o = lo.to(weight.dtype)
        q = torch.round((w - o.float()[..., None]) / s.float()[..., None]).clamp_(0, 15).to(torch.uint8)
        q = q.masked_fill_(~real, 0).view(len(w), kp // 32, 2, 16)
        packed[start:start + len(w)] = (q[:, :, 0] | (q[:, :, 1] << 4)).view(len(w), kp // 2)
        scale[start:start + len(w)], offset[start:start + len(w)] = s, o
    return {"weight_packed": packed, "weight_scale": scale, "weight_offset": offset}


def unpack_int4(packed: torch.Tensor) -> torch.Tensor:
    """uint8 (N, Kp / 2) -> the 4-bit values (N, Kp) as uint8."""
    n = packed.shape[0]
    blocks = packed.view(n, -1, 16)
    return torch.stack((blocks & 0x0F, blocks >> 4), dim=2).view(n, -1)


def dequantize_int4(packed: torch.Tensor, scale: torch.Tensor, offset: torch.Tensor, *, in_features: int,
                    dtype: torch.dtype) -> torch.Tensor:
    n, groups = scale.shape
    q = unpack_int4(packed).float().view(n, groups, -1)
    w = q * scale.float()[..., None] + offset.float()[..., None]
    return w.view(n, -1)[:, :in_features].to(dtype)


# ----------------------------------------------------------------------------------------------
# The modules swapped in for nn.Linear.

# On a CPU with native bf16, the blocked dequantize + GEMM overtakes the small-row kernels from about
# this many rows of bf16 x (benchmarks/RESULTS.md); elsewhere they win up to MAX_QUANT_ROWS.
NATIVE_BF16_KERNEL_ROWS = {"int8": 12, "int4": 12}
# Where the CPU has AMX tiles, bf16 x of this many rows (up to cpu_kernels.MAX_AMX_ROWS) goes through
# them instead, the weights dequantized a block at a time (faster than the small-row kernels from
# here; benchmarks/RESULTS.md).
AMX_MIN_ROWS = {"int8": 6, "int4": 8}


class _QuantizedLinear(nn.Module):
    mode: str
    in_features: int
    out_features: int
    bias: nn.Parameter | None

    def _init_bias(self, bias: bool, dtype: torch.dtype, device: torch.device | str | None) -> None:
        self.bias = nn.Parameter(torch.empty(self.out_features, dtype=dtype, device=device),
                                 requires_grad=False) if bias else None

    def _on_cpu_kernels(self, x: torch.Tensor) -> bool:
        scale = self.weight_scale
        return (x.device.type == "cpu" and scale.device.type == "cpu" and x.is_floating_point()
                and scale.dtype in (torch.float32, torch.bfloat16)
                and not (torch.is_grad_enabled() and x.requires_grad) and cpu_kernels.quant_kernels_available())

    def _use_kernel(self, x: torch.Tensor) -> bool:
        """The small-row kernels: up to MAX_QUANT_ROWS rows, fewer for bf16 x where the CPU has native bf16."""
        rows = x.shape[:-1].numel()
        limit = cpu_kernels.MAX_QUANT_ROWS
        if x.dtype == torch.bfloat16 and cpu_has_native_bf16():
            limit = NATIVE_BF16_KERNEL_ROWS[self.mode]
        return 0 < rows <= limit and self._on_cpu_kernels(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.product(x)
        return out if self.bias is None else out + self.bias.to(out.dtype)

    def _use_amx(self, x: torch.Tensor) -> bool:
        rows = x.shape[:-1].numel()
        return (x.dtype == torch.bfloat16 and AMX_MIN_ROWS[self.mode] <= rows <= cpu_kernels.MAX_AMX_ROWS
                and not torch.compiler.is_compiling() and self._on_cpu_kernels(x) and cpu_kernels.amx_available())

    def product(self, x: torch.Tensor) -> torch.Tensor:
        """x @ W.T without the bias: the AMX tiles or the small-row kernel, else the blocked dequantize
        + GEMM, else (autograd, torch.compile, no kernels) F.linear over the whole dequantized weight."""
        if self._use_amx(x):
            out = self._amx_product(x.reshape(-1, self.in_features))
            if out is not None:
                return out.to(x.dtype).view(*x.shape[:-1], self.out_features)
        if self._use_kernel(x):
            return self._kernel_product(x)
        if x.shape[:-1].numel() > 0 and not torch.compiler.is_compiling() and self._on_cpu_kernels(x):
            # bf16 GEMMs are slow on a CPU without native bf16 (and fp16 on most): those go in float32
            native = x.dtype == torch.float32 or (x.dtype == torch.bfloat16 and cpu_has_native_bf16())
            compute = x.dtype if native else torch.float32
            out = cpu_kernels.blocked_product(x.reshape(-1, self.in_features), self.out_features,
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

    def _kernel_product(self, x: torch.Tensor) -> torch.Tensor:
        return cpu_kernels.linear_int8(x, self.weight, self.weight_scale)

    def _amx_product(self, x: torch.Tensor) -> torch.Tensor | None:
        return cpu_kernels.amx_product(x, "int8", self.weight, self.weight_scale)

    def _dequantize_rows(self, r0: int, r1: int, dtype: torch.dtype,
                         out: torch.Tensor | None = None) -> torch.Tensor | None:
        return cpu_kernels.dequantize_int8(self.weight[r0:r1], self.weight_scale[r0:r1], dtype=dtype, out=out)

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

    def _kernel_product(self, x: torch.Tensor) -> torch.Tensor:
        return cpu_kernels.linear_int4(x, self.weight_packed, self.weight_scale, self.weight_offset, self.group_size)

    def _amx_product(self, x: torch.Tensor) -> torch.Tensor | None:
        return cpu_kernels.amx_product(x, "int4", self.weight_packed, self.weight_scale, self.weight_offset,
                                       group_size=self.group_size)

    def _dequantize_rows(self, r0: int, r1: int, dtype: torch.dtype,
                         out: torch.Tensor | None = None) -> torch.Tensor | None:
        return cpu_kernels.dequantize_int4(self.weight_packed[r0:r1], self.weight_scale[r0:r1],
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
    _CHUNK_ROWS rows at a time and hold no slice past the next."""
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
