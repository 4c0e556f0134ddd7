"""Text-decoder attention: causal self-attention with RoPE and gated cross-attention to vision tokens."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel

from mllama.cache import KVWindow
from mllama.config import MllamaTextConfig
from mllama.layers import RMSNorm, apply_rotary


# cuDNN's attention builds an execution plan for every new shape (about 12 ms on an H200), and
# eager decoding meets a new key length at every step; the other CUDA kernels need no plan.
_CUDA_BACKENDS = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]


def _sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None, is_causal: bool) -> torch.Tensor:
    if q.is_cuda and not torch.compiler.is_compiling():  # compiled steps have fixed shapes
        with sdpa_kernel(_CUDA_BACKENDS):
            return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=is_causal)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=is_causal)


def grouped_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None, *,
                      is_causal: bool = False) -> torch.Tensor:
    """SDPA for grouped-query attention without materialising repeated K/V.

    q (B, H, S, D), k/v (B, H_kv, T, D), mask bool (B, 1, S, T) or None. The G = H / H_kv query heads
    sharing a K/V head are folded into the query length, so the kernel sees H_kv heads.
    """
    b, h, s, d = q.shape
    h_kv = k.shape[1]
    groups = h // h_kv
    if s == 1 and q.dtype == torch.float32 and torch.compiler.is_compiling():
        return _decode_attention(q.reshape(b, h_kv, groups, d), k, v, mask).reshape(b, h, s, d)
    if groups == 1 or (is_causal and s > 1):
        if groups > 1:  # a causal mask cannot be folded; repeat K/V instead (prefill only)
            k = k.repeat_interleave(groups, dim=1)
            v = v.repeat_interleave(groups, dim=1)
        return _sdpa(q, k, v, mask, is_causal and mask is None)
    q = q.reshape(b, h_kv, groups * s, d)  # heads g*H_kv.. are contiguous per K/V head
    if mask is not None:
        mask = mask.unsqueeze(2).expand(b, 1, groups, s, mask.shape[-1]).reshape(b, 1, groups * s, -1)
    return _sdpa(q, k, v, mask, False).reshape(b, h, s, d)


def _decode_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """One query token per sequence, written out so inductor fuses the softmax into plain loops.

    q (B, H_kv, G, D) (the G heads sharing a K/V head), k/v (B, H_kv, T, D), mask bool (B, 1, 1, T).
    In a compiled decode step of a small model the library SDPA call (about 19 us) cost more than
    the rest of its attention; this took a tiny model's step from 305 to 283 us. float32 only: in
    bf16 the product below would round the scores to bf16, which the SDPA kernels do not.
    """
    scores = torch.matmul(q, k.transpose(-1, -2)).float() * q.shape[-1] ** -0.5  # (B, H_kv, G, T)
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    return torch.matmul(scores.softmax(dim=-1).to(v.dtype), v)


class _Projections(nn.Module):
    """q/k/v/o projections shared by both attention kinds (checkpoint names q_proj ... o_proj)."""

    def __init__(self, config: MllamaTextConfig) -> None:
        super().__init__()
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = config.num_key_value_heads
        self.head_dim = config.head_dim
        hidden = config.hidden_size
        self.q_proj = nn.Linear(hidden, self.num_heads * self.head_dim, bias=False)
        self.k_proj = nn.Linear(hidden, self.num_kv_heads * self.head_dim, bias=False)
        self.v_proj = nn.Linear(hidden, self.num_kv_heads * self.head_dim, bias=False)
        self.o_proj = nn.Linear(self.num_heads * self.head_dim, hidden, bias=False)

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None, *,
               is_causal: bool = False) -> torch.Tensor:
        """grouped_attention of q (B, H, S, D) over k, v (B, H_kv, T, D); a kernel backend overrides it
        (mllama.row_kernels)."""
        return grouped_attention(q, k, v, mask, is_causal=is_causal)


def join_parts(xs: list[torch.Tensor]) -> torch.Tensor:
    """Parts (B_i, S_i, F) -> (sum B_i S_i, F): one product over every part's rows."""
    return torch.cat([x.reshape(-1, x.shape[-1]) for x in xs])


def split_parts(flat: torch.Tensor, like: list[torch.Tensor]) -> list[torch.Tensor]:
    """The inverse of join_parts: (sum B_i S_i, F) -> parts (B_i, S_i, F), shaped as `like`'s parts."""
    sizes = [x.shape[0] * x.shape[1] for x in like]
    return [p.view(x.shape[0], x.shape[1], -1) for p, x in zip(flat.split(sizes), like)]


class TextSelfAttention(_Projections):
    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, mask: torch.Tensor | None, *,
                cache: KVWindow | None = None, layer_idx: int = 0) -> torch.Tensor:
        """x (B, S, hidden); mask bool (B, 1, S, T) over the keys the cache window reads, or None for
        plain causal attention over x alone (nothing cached before it)."""
        return self.o_proj(self._attend(self.q_proj(x), self.k_proj(x), self.v_proj(x), cos, sin, mask, cache,
                                        layer_idx))

    def forward_parts(self, xs: list[torch.Tensor], rope: list[tuple[torch.Tensor, torch.Tensor]],
                      masks: list[torch.Tensor | None], caches: list[KVWindow], *, layer_idx: int) -> list[torch.Tensor]:
        """Several batches at once (e.g. a decode step's rows and a new prompt's chunk): the projections
        run once over all their rows, attention per part, each as forward would."""
        flat = join_parts(xs)
        qs, ks, vs = (split_parts(proj(flat), xs) for proj in (self.q_proj, self.k_proj, self.v_proj))
        outs = [self._attend(q, k, v, cos, sin, mask, cache, layer_idx)
                for q, k, v, (cos, sin), mask, cache in zip(qs, ks, vs, rope, masks, caches)]
        return split_parts(self.o_proj(join_parts(outs)), xs)

    def rotate(self, q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor,
               sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """RoPE of q (B, H, S, D) and k (B, H_kv, S, D) with cos, sin (B, S, D); a kernel backend
        overrides it (mllama.row_kernels)."""
        return apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)

    def _attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                mask: torch.Tensor | None, cache: KVWindow | None, layer_idx: int) -> torch.Tensor:
        """Projected q, k, v (B, S, heads * D) -> attention output (B, S, H * D), before o_proj."""
        b, s, _ = q.shape
        q = q.view(b, s, self.num_heads, self.head_dim).transpose(1, 2)
        k = k.view(b, s, self.num_kv_heads, self.head_dim).transpose(1, 2)
        v = v.view(b, s, self.num_kv_heads, self.head_dim).transpose(1, 2)
        q, k = self.rotate(q, k, cos, sin)
        if cache is not None:
            k, v = cache.update(layer_idx, k, v)
        out = self.attend(q, k, v, mask, is_causal=mask is None and s > 1)
        return out.transpose(1, 2).reshape(b, s, -1)


class TextCrossAttention(_Projections):
    def __init__(self, config: MllamaTextConfig) -> None:
        super().__init__(config)
        self.q_norm = RMSNorm(self.head_dim, eps=config.rms_norm_eps)
        self.k_norm = RMSNorm(self.head_dim, eps=config.rms_norm_eps)

    def vision_kv(self, vision_states: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, N, hidden) projected vision tokens -> k, v (B, H_kv, N, D); computed once per image set."""
        b, n, _ = vision_states.shape
        k = self.k_proj(vision_states).view(b, n, self.num_kv_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(vision_states).view(b, n, self.num_kv_heads, self.head_dim).transpose(1, 2)
        return self.k_norm(k), v

    def forward(self, x: torch.Tensor, kv: tuple[torch.Tensor, torch.Tensor], mask: torch.Tensor | None,
                text_row_mask: torch.Tensor) -> torch.Tensor:
        """x (B, S, hidden); mask bool (B, 1, S, N), or None when every row sees every vision token;
        text_row_mask (B, S, 1), 0 where a row sees no image.

        Rows that may see no vision token get a zero output (Meta's reference semantics): their mask
        row is opened so the kernel stays finite, and the result is zeroed before o_proj.
        """
        b, s, _ = x.shape
        q = self.q_norm(self.q_proj(x).view(b, s, self.num_heads, self.head_dim).transpose(1, 2))
        if mask is not None:
            mask = mask | (text_row_mask == 0).view(b, 1, s, 1)
        out = self.attend(q, kv[0], kv[1], mask)
        out = out.transpose(1, 2).reshape(b, s, -1) * text_row_mask
        return self.o_proj(out)
