"""The Llama 3.1 text decoder with tanh-gated cross-attention layers interleaved."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from mllama.attention import TextCrossAttention, TextSelfAttention
from mllama.cache import DecoderCache
from mllama.config import MllamaTextConfig
from mllama.layers import RMSNorm, RotaryEmbedding, TextMLP


@dataclass
class CrossInputs:
    """What the cross-attention layers see for one forward.

    states: projected vision tokens (B, N, hidden), or None when K/V are already in the cache.
    mask: bool (B, 1, S, N), True where a text row may attend to a vision token; None when every row
    may attend to every vision token (then text_row_mask is all ones).
    text_row_mask: (B, S, 1) in the activation dtype, 0 for rows that see no vision token at all.
    """

    states: torch.Tensor | None
    mask: torch.Tensor | None
    text_row_mask: torch.Tensor


class SelfAttentionDecoderLayer(nn.Module):
    def __init__(self, config: MllamaTextConfig) -> None:
        super().__init__()
        self.self_attn = TextSelfAttention(config)
        self.mlp = TextMLP(config.hidden_size, config.intermediate_size)
        self.input_layernorm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, mask: torch.Tensor | None, *,
                cache: DecoderCache | None, layer_idx: int, cache_start: int | torch.Tensor) -> torch.Tensor:
        kv = cache.self_kv[layer_idx] if cache is not None else None
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, mask, cache=kv, cache_start=cache_start)
        return x + self.mlp(self.post_attention_layernorm(x))


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
                cache: DecoderCache | None = None, cache_start: int | torch.Tensor = 0) -> torch.Tensor:
        """Run the decoder.

        position_ids (B, S) are RoPE positions. mask: bool (B, 1, S, cache_start + S), True = attend;
        None means plain causal attention (only valid when nothing precedes these tokens).
        cross: None skips the cross-attention layers, which is exact for text that sees no image.
        With a cache, K/V are written at slots [cache_start, cache_start + S) and cross-attention K/V
        computed from `cross.states` are stored for later steps.
        """
        x = self.embed_tokens(input_ids) if inputs_embeds is None else inputs_embeds
        if x.shape[1] > 1 and mask is None and cache_start > 0:
            raise ValueError("a mask is required when several new tokens attend to cached ones")
        if cache is not None and cache.rope is not None:
            cos, sin = cache.rope[0][position_ids], cache.rope[1][position_ids]  # (B, S, head_dim)
        else:
            cos, sin = self.rotary_emb(position_ids, x.dtype)
        for idx, layer in enumerate(self.layers):
            if isinstance(layer, CrossAttentionDecoderLayer):
                if cross is None:
                    continue
                kv = self._cross_kv(layer, idx, cross, cache)
                x = layer(x, kv, cross.mask, cross.text_row_mask)
            else:
                x = layer(x, cos, sin, mask, cache=cache, layer_idx=idx, cache_start=cache_start)
        return self.norm(x)

    @staticmethod
    def _cross_kv(layer: CrossAttentionDecoderLayer, idx: int, cross: CrossInputs,
                  cache: DecoderCache | None) -> tuple[torch.Tensor, torch.Tensor]:
        if cross.states is not None:
            kv = layer.cross_attn.vision_kv(cross.states)
            if cache is not None:
                cache.cross_kv[idx] = kv
            return kv
        if cache is None or idx not in cache.cross_kv:
            raise ValueError("cross-attention needs vision states or cached vision K/V")
        return cache.cross_kv[idx]
