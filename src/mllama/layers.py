"""Small building blocks of the text decoder: RMSNorm, the SwiGLU MLP and rotary embeddings."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from mllama.config import MllamaTextConfig


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Normalise in float32 and round once, as the model was trained.
        dtype = x.dtype
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(dtype)


class TextMLP(nn.Module):
    """SwiGLU feed-forward: down(silu(gate(x)) * up(x))."""

    def __init__(self, hidden_size: int, intermediate_size: int) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.up_proj = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.down_proj = nn.Linear(intermediate_size, hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.gated(x))

    def gated(self, x: torch.Tensor) -> torch.Tensor:
        """silu(gate(x)) * up(x), the input of down_proj; a kernel backend overrides it (mllama.row_kernels)."""
        return F.silu(self.gate_proj(x)) * self.up_proj(x)


def rope_inv_freq(config: MllamaTextConfig) -> torch.Tensor:
    """Inverse frequencies (head_dim / 2,) in float32, with Llama 3 long-context scaling if configured."""
    params = config.rope_parameters or {}
    dim = config.head_dim
    inv_freq = 1.0 / (params.get("rope_theta", config.rope_theta)
                      ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim))
    if params.get("rope_type", "default") != "llama3":
        return inv_freq
    # Llama 3 scaling: wavelengths shorter than original_len / high_freq_factor are kept, longer than
    # original_len / low_freq_factor are divided by `factor`, and the band between is interpolated.
    factor = params["factor"]
    low, high = params["low_freq_factor"], params["high_freq_factor"]
    original_len = params["original_max_position_embeddings"]
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > original_len / low, inv_freq / factor, inv_freq)
    smooth = (original_len / wavelen - low) / (high - low)
    blended = (1 - smooth) * scaled / factor + smooth * scaled
    in_band = (wavelen >= original_len / high) & (wavelen <= original_len / low)
    return torch.where(in_band, blended, scaled)


class RotaryEmbedding(nn.Module):
    def __init__(self, config: MllamaTextConfig) -> None:
        super().__init__()
        self.register_buffer("inv_freq", rope_inv_freq(config), persistent=False)

    @torch.no_grad()
    def forward(self, position_ids: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin of shape (B, S, head_dim), computed in float32 then rounded to `dtype`."""
        freqs = position_ids.float()[..., None] * self.inv_freq.float()  # (B, S, head_dim / 2)
        emb = torch.cat((freqs, freqs), dim=-1)
        return emb.cos().to(dtype), emb.sin().to(dtype)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate (B, H, S, D) queries or keys; half-split layout (the HF checkpoints' q/k permutation)."""
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos + rotated * sin
