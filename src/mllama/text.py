"""The Llama 3.1 text decoder with tanh-gated cross-attention layers interleaved."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from mllama.attention import TextCrossAttention, TextSelfAttention, join_parts, split_parts
from mllama.cache import KVWindow
from mllama.config import MllamaTextConfig
from mllama.layers import RMSNorm, RotaryEmbedding, TextMLP


@dataclass
class CrossInputs:
    """What the cross-attention layers see for one forward.

    states: projected vision tokens (B, N, hidden) from which each layer computes its K/V, or None
    when `kv` holds them already: cross layer index -> (k, v) of shape (B, H_kv, N, D).
    mask: bool (B, 1, S, N), True where a text row may attend to a vision token; None when every row
    may attend to every vision token (then text_row_mask is all ones).
    text_row_mask: (B, S, 1) in the activation dtype, 0 for rows that see no vision token at all.
    """

    states: torch.Tensor | None
    mask: torch.Tensor | None
    text_row_mask: torch.Tensor
    kv: dict[int, tuple[torch.Tensor, torch.Tensor]] | None = None

    def layer_kv(self, idx: int, layer: CrossAttentionDecoderLayer) -> tuple[torch.Tensor, torch.Tensor]:
        """Cross layer idx's (k, v): stored, or computed from the vision states."""
        return self.kv[idx] if self.kv is not None else layer.cross_attn.vision_kv(self.states)


@dataclass
class TextPart:
    """One batch of a MllamaTextModel.forward_parts call: input_ids and position_ids (B, S), mask and
    cross as for forward, and the cache window its K/V go through."""

    input_ids: torch.Tensor
    position_ids: torch.Tensor
    mask: torch.Tensor | None
    cross: CrossInputs | None
    cache: KVWindow


def check_ids(input_ids: torch.Tensor, num_embeddings: int) -> None:
    if not isinstance(input_ids, torch.Tensor):
        raise TypeError(f"input_ids must be a torch.Tensor of shape (batch, seq), got {type(input_ids).__name__} "
                        "(wrap a list with torch.tensor([...]))")
    if input_ids.dtype not in (torch.int32, torch.int64):
        raise TypeError(f"input_ids must be an integer tensor, got {input_ids.dtype}")
    if input_ids.numel() and (input_ids.min() < 0 or input_ids.max() >= num_embeddings):
        raise ValueError(f"input_ids out of range: ids must lie in [0, {num_embeddings})")


def check_forward_inputs(input_ids: torch.Tensor | None, inputs_embeds: torch.Tensor | None, *,
                         num_embeddings: int, hidden_size: int) -> tuple[int, int]:
    """Exactly one of input_ids (B, S) or inputs_embeds (B, S, hidden), non-empty; returns (B, S)."""
    if (input_ids is None) == (inputs_embeds is None):
        raise ValueError("pass exactly one of input_ids or inputs_embeds")
    if input_ids is not None:
        check_ids(input_ids, num_embeddings)
        if input_ids.dim() != 2:
            raise ValueError(f"input_ids must be 2-D (batch, seq), got shape {tuple(input_ids.shape)}; "
                             "add a batch dimension with input_ids[None]")
        ref = input_ids
    else:
        if not isinstance(inputs_embeds, torch.Tensor) or not inputs_embeds.is_floating_point():
            raise TypeError("inputs_embeds must be a floating-point torch.Tensor (batch, seq, hidden)")
        if inputs_embeds.dim() != 3 or inputs_embeds.shape[-1] != hidden_size:
            raise ValueError(f"inputs_embeds must be (batch, seq, hidden_size={hidden_size}), "
                             f"got shape {tuple(inputs_embeds.shape)}")
        ref = inputs_embeds
    b, s = ref.shape[:2]
    if b == 0 or s == 0:
        raise ValueError(f"{'input_ids' if input_ids is not None else 'inputs_embeds'} is empty "
                         f"(shape {tuple(ref.shape)}); need at least one sequence of at least one token")
    return b, s


def self_attention_mask(attention_mask: torch.Tensor | None, *, query_len: int, start: int = 0,
                        batch: int, device: torch.device) -> torch.Tensor | None:
    """Bool (B, 1, S, T) causal mask over slots [0, start + S) that also hides padded keys.

    Returns None when plain causal attention is exact (no padding, nothing cached). Every query may
    always see itself, so padded rows stay finite and never poison other rows with NaNs.
    """
    total = start + query_len
    if attention_mask is None and start == 0:
        return None
    query_slots = torch.arange(start, total, device=device)[:, None]
    key_slots = torch.arange(total, device=device)[None, :]
    mask = (key_slots <= query_slots)[None, None].expand(batch, 1, query_len, total)
    if attention_mask is not None:
        if attention_mask.shape[-1] < total:
            raise ValueError(f"attention_mask covers {attention_mask.shape[-1]} tokens, {total} needed")
        valid = attention_mask[:, None, None, :total].bool()
        mask = mask & (valid | (key_slots == query_slots)[None, None])
    return mask


def seen_tiles(features: torch.Tensor, cross_attention_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Only the tiles some text row may see: (B, I, T, P, D) vision features and (B, S, I, T) 0/1 mask
    -> (B, K, P, D) features and (B, S, 1, K) mask, K the most tiles any batch row sees (rows with fewer
    are zero-padded and masked; at least one). Exact: a tile no row sees adds nothing to any row, and
    the processor's padded tiles are such tiles, so the projector and every cross layer's K/V skip them."""
    b, i, t, p, d = features.shape
    seen = cross_attention_mask.bool().any(dim=1).reshape(b, i * t)  # (B, I * T)
    if bool(seen.all()):
        return features.reshape(b, i * t, p, d), cross_attention_mask.reshape(b, -1, 1, i * t)
    counts = seen.sum(dim=1)
    k = max(int(counts.max()), 1)
    # (B, K): each row's seen tiles first, in order; the rest point at tiles whose mask column is zeroed.
    order = torch.argsort((~seen).to(torch.int8), dim=1, stable=True)[:, :k]
    rows = torch.arange(b, device=features.device)[:, None]
    kept = features.reshape(b, i * t, p, d)[rows, order]
    mask = cross_attention_mask.reshape(b, -1, i * t).gather(2, order[:, None].expand(-1, cross_attention_mask.shape[1], -1))
    mask = mask.masked_fill((torch.arange(k, device=mask.device)[None] >= counts[:, None])[:, None], 0)
    return kept, mask[:, :, None]


def cross_attention_inputs(cross_attention_mask: torch.Tensor, *, num_patches: int,
                           dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, S, N_images, N_tiles) 0/1 tile mask -> bool (B, 1, S, N_images * N_tiles * num_patches)
    token mask and (B, S, 1) text-row mask (0 for rows that see no tile)."""
    b, s = cross_attention_mask.shape[:2]
    tiles = cross_attention_mask.bool().reshape(b, s, -1)
    mask = tiles.repeat_interleave(num_patches, dim=-1).unsqueeze(1)
    rows = tiles.any(dim=-1, keepdim=True).to(dtype)
    return mask, rows


class SelfAttentionDecoderLayer(nn.Module):
    def __init__(self, config: MllamaTextConfig) -> None:
        super().__init__()
        self.self_attn = TextSelfAttention(config)
        self.mlp = TextMLP(config.hidden_size, config.intermediate_size)
        self.input_layernorm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, mask: torch.Tensor | None, *,
                cache: KVWindow | None, layer_idx: int) -> torch.Tensor:
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, mask, cache=cache, layer_idx=layer_idx)
        return x + self.mlp(self.post_attention_layernorm(x))

    def forward_parts(self, xs: list[torch.Tensor], rope: list[tuple[torch.Tensor, torch.Tensor]],
                      masks: list[torch.Tensor | None], caches: list[KVWindow], *, layer_idx: int) -> list[torch.Tensor]:
        """forward for several batches at once: every linear runs once over all their rows."""
        attn = self.self_attn.forward_parts([self.input_layernorm(x) for x in xs], rope, masks, caches,
                                            layer_idx=layer_idx)
        xs = [x + a for x, a in zip(xs, attn)]
        mlp = self.mlp(join_parts([self.post_attention_layernorm(x) for x in xs]))
        return [x + m for x, m in zip(xs, split_parts(mlp, xs))]


class CrossAttentionDecoderLayer(nn.Module):
    def __init__(self, config: MllamaTextConfig) -> None:
        super().__init__()
        self.cross_attn = TextCrossAttention(config)
        self.input_layernorm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.cross_attn_attn_gate = nn.Parameter(torch.zeros(1))
        self.mlp = TextMLP(config.hidden_size, config.intermediate_size)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.cross_attn_mlp_gate = nn.Parameter(torch.zeros(1))

    def forward(self, x: torch.Tensor, kv: tuple[torch.Tensor, torch.Tensor], mask: torch.Tensor | None,
                text_row_mask: torch.Tensor) -> torch.Tensor:
        attn = self.cross_attn(self.input_layernorm(x), kv, mask, text_row_mask)
        x = x + self.cross_attn_attn_gate.tanh() * attn
        mlp = self.mlp(self.post_attention_layernorm(x)) * text_row_mask
        return x + self.cross_attn_mlp_gate.tanh() * mlp


class MllamaTextModel(nn.Module):
    """Token embeddings -> decoder layers -> final norm. Returns hidden states (B, S, hidden)."""

    def __init__(self, config: MllamaTextConfig) -> None:
        super().__init__()
        self.config = config
        # vocab_size + 8 rows: row vocab_size is the learnable <|image|> embedding.
        self.embed_tokens = nn.Embedding(config.vocab_size + 8, config.hidden_size)
        cross = set(config.cross_attention_layers)
        self.layers = nn.ModuleList(
            CrossAttentionDecoderLayer(config) if i in cross else SelfAttentionDecoderLayer(config)
            for i in range(config.num_hidden_layers)
        )
        self.norm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.rotary_emb = RotaryEmbedding(config)

    def forward(self, input_ids: torch.Tensor | None = None, *, inputs_embeds: torch.Tensor | None = None,
                position_ids: torch.Tensor, mask: torch.Tensor | None = None, cross: CrossInputs | None = None,
                cache: KVWindow | None = None) -> torch.Tensor:
        """Run the decoder.

        position_ids (B, S) are RoPE positions. mask: bool (B, 1, S, T) with T the keys the forward
        sees (`cache.length` with a cache, else S), True = attend; None means plain causal attention
        (only valid when nothing precedes these tokens). cross: None skips the cross-attention
        layers, which is exact for text that sees no image. With a cache window, K/V of the new
        tokens are written where it says and attention reads the window.
        """
        x = self.embed_tokens(input_ids) if inputs_embeds is None else inputs_embeds
        if mask is None and cache is not None and x.shape[1] > 1 and cache.length > x.shape[1]:
            raise ValueError("a mask is required when several new tokens attend to cached ones")
        if cross is not None and cross.states is None and cross.kv is None:
            raise ValueError("cross-attention needs vision states or their K/V")
        cos, sin = self.rotary_emb(position_ids, x.dtype)
        return self.norm(self.run_layers(x, cos, sin, mask, cross, cache))

    def run_layers(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, mask: torch.Tensor | None,
                   cross: CrossInputs | None, cache: KVWindow | None) -> torch.Tensor:
        """The decoder layers of forward, in order (cross-attention layers skipped without cross); a
        kernel backend overrides it (mllama.row_kernels)."""
        for idx, layer in enumerate(self.layers):
            if isinstance(layer, CrossAttentionDecoderLayer):
                if cross is None:
                    continue
                x = layer(x, cross.layer_kv(idx, layer), cross.mask, cross.text_row_mask)
            else:
                x = layer(x, cos, sin, mask, cache=cache, layer_idx=idx)
        return x

    def forward_parts(self, parts: list[TextPart]) -> list[torch.Tensor]:
        """forward for several batches at once, each with its own positions, mask, cross inputs and
        cache window (an engine's decode rows and a new prompt's chunk): the self-attention layers'
        linears run once over all their rows, so the weights stream once for all; cross-attention
        layers run per part (skipped where its cross is None). Returns each part's hidden states."""
        xs = [self.embed_tokens(p.input_ids) for p in parts]
        rope = [self.rotary_emb(p.position_ids, x.dtype) for p, x in zip(parts, xs)]
        for idx, layer in enumerate(self.layers):
            if isinstance(layer, CrossAttentionDecoderLayer):
                for i, p in enumerate(parts):
                    if p.cross is not None:
                        xs[i] = layer(xs[i], p.cross.layer_kv(idx, layer), p.cross.mask, p.cross.text_row_mask)
            else:
                xs = layer.forward_parts(xs, rope, [p.mask for p in parts], [p.cache for p in parts], layer_idx=idx)
        return [self.norm(x) for x in xs]

    def cross_kv(self, states: torch.Tensor) -> dict[int, tuple[torch.Tensor, torch.Tensor]]:
        """Projected vision tokens (B, N, hidden) -> every cross layer's (k, v) (B, H_kv, N, D)."""
        return {idx: layer.cross_attn.vision_kv(states) for idx, layer in enumerate(self.layers)
                if isinstance(layer, CrossAttentionDecoderLayer)}
