"""The weight-only quantization formats and their arithmetic (mllama.quantize builds on them).

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
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import KW_ONLY, dataclass
from typing import Any

import torch
import torch.nn.functional as F

from mllama.host_memory import fresh_params, fresh_zeros

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
    q = fresh_zeros((n, k), torch.int8)  # huge pages stream faster through the kernel
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
    packed = fresh_zeros((n, kp // 2), torch.uint8)
    scale = fresh_params((n, groups), weight.dtype)  # read beside the packed weights: huge pages too
    offset = fresh_params((n, groups), weight.dtype)
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
