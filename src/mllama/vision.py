"""The Mllama vision encoder: tiles of an image -> one feature vector per patch position.

Each tile is cut into patches plus a class token; every image (all of its tiles at once) goes
through 32 plain ("local") layers and 8 tanh-gated ("global") layers. The output concatenates the
global encoder's last state with the inputs of a few chosen local layers (`intermediate_layers_indices`:
index i is what local layer i receives, index 0 the embedded tiles). Meta's reference taps layer
inputs, and so did the transformers version that wrote the published configs; transformers 5.x
taps layer outputs, one layer late.

Padding, as trained: every tile's positions are zero-padded to a multiple of 8 after
`layernorm_pre`, and the tiles beyond an image's tile count are padding as a whole. Attention is
masked only between two padding positions: real queries see padding keys, padding queries see
real keys. The trained model used a dense additive mask over all positions for this; here the
same attention is computed exactly without one (mllama.tile_attention). An image whose padded tiles
enter the encoder equal (the published checkpoints with the processor's zero tiles) runs one of
them for all: exact, and half the work for a one-tile image (see mllama.tile_attention).
"""

from __future__ import annotations

import math
import os
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import nn

from .config import MllamaVisionConfig
from .outputs import BaseModelOutput
from .tile_attention import TileAttentionCore, TileLayout, tile_attention

__all__ = ["MllamaVisionAttention", "MllamaVisionEncoder", "MllamaVisionEncoderLayer", "MllamaVisionMLP",
           "MllamaVisionModel", "TileAttentionCore", "TileLayout", "tile_attention"]

# `layernorm_pre`/`layernorm_post` were trained with PyTorch's default eps, not `norm_eps`.
_OUTER_NORM_EPS = 1e-5
# Positions per tile are padded to a multiple of this.
_PAD_MULTIPLE = 8


def _add_(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """x + y, reusing x's storage unless autograd may still need x."""
    if torch.is_grad_enabled() and (x.requires_grad or y.requires_grad):
        return x + y
    return x.add_(y)


def _rows(indices: list[int]) -> slice | list[int]:
    """Consecutive (non-empty) indices as a slice: written through, a plain strided copy, where a list
    of rows takes index_put, several times slower on an image's 98 MB of features; else the list."""
    if indices == list(range(indices[0], indices[-1] + 1)):
        return slice(indices[0], indices[-1] + 1)
    return indices


def _equal_tiles(x: torch.Tensor) -> bool:
    """Whether every tile of x (tiles, ...) equals the first."""
    return bool(torch.equal(x[1:], x[:1].expand_as(x[1:])))


def _mul_(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    if torch.is_grad_enabled() and (x.requires_grad or y.requires_grad):
        return x * y
    return x.mul_(y)


class MllamaVisionAttention(nn.Module):
    HEADS_PER_CALL = 1  # heads are independent: attention in groups of them gives the same result

    def __init__(self, config: MllamaVisionConfig) -> None:
        super().__init__()
        dim = config.hidden_size
        self.num_heads = config.attention_heads
        self.head_dim = dim // self.num_heads
        self.q_proj = nn.Linear(dim, dim, bias=False)
        self.k_proj = nn.Linear(dim, dim, bias=False)
        self.v_proj = nn.Linear(dim, dim, bias=False)
        self.o_proj = nn.Linear(dim, dim, bias=False)
        self.core = TileAttentionCore()

    def forward(self, x: torch.Tensor, layout: TileLayout) -> torch.Tensor:
        m, length, _ = x.shape

        def heads(y: torch.Tensor) -> torch.Tensor:  # (m, L, D) -> (m, heads, L, head_dim)
            # Contiguous per head: the CPU flash kernel runs ~10% faster than on the strided view,
            # far more than the copy costs.
            return y.view(m, length, self.num_heads, self.head_dim).transpose(1, 2).contiguous()

        q, k, v = heads(self.q_proj(x)), heads(self.k_proj(x)), heads(self.v_proj(x))
        g = self.HEADS_PER_CALL
        out = torch.cat([self.core(q[:, h:h + g], k[:, h:h + g], v[:, h:h + g], layout)
                         for h in range(0, self.num_heads, g)], dim=1)  # (m, heads, L, head_dim)
        return self.o_proj(out.transpose(1, 2).reshape(m, length, -1))


class MllamaVisionMLP(nn.Module):
    # Rows are independent: in chunks of at most this many, the 4x wider hidden state stays small,
    # and each call is a boundary where a paused vision forward may stop (mllama.vision_cache); the
    # chunks are of equal size, so the pauser's estimate of one from the last holds.
    ROWS_PER_CALL = 2048

    def __init__(self, config: MllamaVisionConfig) -> None:
        super().__init__()
        self.fc1 = nn.Linear(config.hidden_size, config.intermediate_size)
        self.fc2 = nn.Linear(config.intermediate_size, config.hidden_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.reshape(-1, x.shape[-1])  # (images * positions, hidden)
        if rows.shape[0] <= self.ROWS_PER_CALL:
            return self.fc2(F.gelu(self.fc1(x)))
        chunks = rows.tensor_split(-(-rows.shape[0] // self.ROWS_PER_CALL))
        out = torch.cat([self.fc2(F.gelu(self.fc1(chunk))) for chunk in chunks])
        return out.view(*x.shape[:-1], out.shape[-1])


class MllamaVisionEncoderLayer(nn.Module):
    """Pre-norm block; in the global encoder both branches are scaled by tanh of a learned gate."""

    def __init__(self, config: MllamaVisionConfig, *, gated: bool) -> None:
        super().__init__()
        self.gated = gated
        self.self_attn = MllamaVisionAttention(config)
        self.mlp = MllamaVisionMLP(config)
        self.input_layernorm = nn.LayerNorm(config.hidden_size, eps=config.norm_eps)
        self.post_attention_layernorm = nn.LayerNorm(config.hidden_size, eps=config.norm_eps)
        if gated:
            self.gate_attn = nn.Parameter(torch.full((1,), math.pi / 4))
            self.gate_ffn = nn.Parameter(torch.full((1,), math.pi / 4))

    def forward(self, x: torch.Tensor, layout: TileLayout) -> torch.Tensor:
        """x: (images, positions, hidden). Updated in place when autograd allows."""
        branch = self.self_attn(self.input_layernorm(x), layout)
        if self.gated:
            branch = _mul_(branch, self.gate_attn.tanh())
        x = _add_(x, branch)
        branch = self.mlp(self.post_attention_layernorm(x))
        if self.gated:
            branch = _mul_(branch, self.gate_ffn.tanh())
        return _add_(x, branch)


class MllamaVisionEncoder(nn.Module):
    def __init__(self, config: MllamaVisionConfig, num_layers: int, *, gated: bool) -> None:
        super().__init__()
        self.layers = nn.ModuleList(MllamaVisionEncoderLayer(config, gated=gated) for _ in range(num_layers))

    def forward(self, x: torch.Tensor, layout: TileLayout, *,
                before_layer: Callable[[int, torch.Tensor], None] | None = None) -> torch.Tensor:
        """`before_layer(i, x)` sees what layer i receives, before that layer may overwrite it in place."""
        for i, layer in enumerate(self.layers):
            if before_layer is not None:
                before_layer(i, x)
            x = layer(x, layout)
        return x


class MllamaTileEmbedding(nn.Module):
    """One learned vector per tile slot for each aspect-ratio id, scaled by tanh(gate)."""

    def __init__(self, config: MllamaVisionConfig) -> None:
        super().__init__()
        self.max_num_tiles = config.max_num_tiles
        self.hidden_size = config.hidden_size
        self.embedding = nn.Embedding(config.max_aspect_ratio_id + 1, config.max_num_tiles * config.hidden_size)
        self.gate = nn.Parameter(torch.zeros(1))

    def forward(self, aspect_ratio_ids: torch.Tensor) -> torch.Tensor:
        """(images,) ids -> (images, max_num_tiles, 1, hidden), ready to broadcast over positions."""
        table = self.embedding(aspect_ratio_ids).view(-1, self.max_num_tiles, 1, self.hidden_size)
        return table * self.gate.tanh()


class MllamaGatedPositionalEmbedding(nn.Module):
    """A shared per-position table blended by tanh(gate) with a per-aspect-ratio, per-tile one."""

    def __init__(self, config: MllamaVisionConfig) -> None:
        super().__init__()
        self.max_num_tiles = config.max_num_tiles
        self.num_patches = config.num_patches
        self.hidden_size = config.hidden_size
        self.gate = nn.Parameter(torch.zeros(1))
        self.embedding = nn.Parameter(torch.randn(self.num_patches, self.hidden_size) * self.hidden_size**-0.5)
        self.tile_embedding = nn.Embedding(config.max_aspect_ratio_id + 1,
                                           self.max_num_tiles * self.num_patches * self.hidden_size)

    def forward(self, x: torch.Tensor, aspect_ratio_ids: torch.Tensor) -> torch.Tensor:
        """x: (images, max_num_tiles, num_patches, hidden); updated in place when autograd allows."""
        gate = self.gate.tanh()
        x = _add_(x, (1 - gate) * self.embedding)
        tile = self.tile_embedding(aspect_ratio_ids).view(x.shape)
        return _add_(x, gate * tile)


class MllamaVisionModel(nn.Module):
    """pixel_values (B, images, tiles, C, H, W) -> (B, images, tiles, num_patches, vision_output_dim).

    The last dimension is [global encoder output (hidden) | intermediate local states (hidden *
    len(intermediate_layers_indices)), interleaved feature-major: index hidden + d * K + j holds
    feature d of the input of local layer intermediate_layers_indices[j]], the layout the trained
    projector expects.
    """

    def __init__(self, config: MllamaVisionConfig) -> None:
        super().__init__()
        self.config = config
        dim = config.hidden_size
        self.num_patches = config.num_patches
        self.tile_len = -(-self.num_patches // _PAD_MULTIPLE) * _PAD_MULTIPLE
        self.patch_embedding = nn.Conv2d(config.num_channels, dim, kernel_size=config.patch_size,
                                         stride=config.patch_size, bias=False)
        self.class_embedding = nn.Parameter(torch.randn(dim) * dim**-0.5)
        self.gated_positional_embedding = MllamaGatedPositionalEmbedding(config)
        self.pre_tile_positional_embedding = MllamaTileEmbedding(config)
        self.post_tile_positional_embedding = MllamaTileEmbedding(config)
        self.layernorm_pre = nn.LayerNorm(dim, eps=_OUTER_NORM_EPS)
        self.layernorm_post = nn.LayerNorm(dim, eps=_OUTER_NORM_EPS)
        self.transformer = MllamaVisionEncoder(config, config.num_hidden_layers, gated=False)
        self.global_transformer = MllamaVisionEncoder(config, config.num_global_layers, gated=True)
        # local layer index -> the slots j its input fills among the intermediate outputs
        self._taps: dict[int, list[int]] = {}
        for j, layer in enumerate(config.intermediate_layers_indices):
            self._taps.setdefault(layer, []).append(j)

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike, **options: Any) -> "MllamaVisionModel":
        """The vision tower of a full checkpoint, for feature extraction (transformers'
        MllamaVisionModel.from_pretrained); takes MllamaForConditionalGeneration.from_pretrained's
        keywords. forward returns transformers' output object; `features` the tensor itself."""
        # Imported at call time, as weights.load_pretrained does.
        from mllama.model import MllamaForConditionalGeneration

        full = MllamaForConditionalGeneration.from_pretrained(path, **options)
        vision = full.model.vision_model
        vision.name_or_path = full.name_or_path
        return vision

    def forward(self, pixel_values: torch.Tensor, aspect_ratio_ids: torch.Tensor,
                aspect_ratio_mask: torch.Tensor, *, skip_padded_tiles: bool = False,
                return_dict: bool | None = None) -> BaseModelOutput | tuple[torch.Tensor]:
        """transformers' output object: `.last_hidden_state` (= `out[0]`) is the (B, images, tiles,
        patches, vision_output_dim) tensor of `features` (see there); return_dict=False gives its tuple."""
        out = BaseModelOutput(last_hidden_state=self.features(pixel_values, aspect_ratio_ids, aspect_ratio_mask,
                                                              skip_padded_tiles=skip_padded_tiles))
        return out if return_dict is not False else out.to_tuple()

    def features(self, pixel_values: torch.Tensor, aspect_ratio_ids: torch.Tensor,
                 aspect_ratio_mask: torch.Tensor, *, skip_padded_tiles: bool = False,
                 padded_tiles: bool = True) -> torch.Tensor:
        """The tensor itself (what mllama's own code calls: no output object on its hot path).
        skip_padded_tiles: encode each image's real tiles only (padded tiles' outputs are zeros).
        Not exact: as trained, real patches also attend to the padded tiles' positions. The speed-up
        and the logit drift it causes are measured by benchmarks/bench_fast_vision.py.
        padded_tiles=False: exact, but the padded tiles' slots of the output may hold anything (for a
        caller that reads the real tiles only: writing an image's padded features is a 98 MB copy)."""
        batch, images, tiles = self._check_inputs(pixel_values, aspect_ratio_ids, aspect_ratio_mask)
        cfg = self.config
        weight = self.patch_embedding.weight
        m = batch * images
        out_shape = (batch, images, tiles, self.num_patches, cfg.vision_output_dim)
        real_tiles = aspect_ratio_mask.reshape(m, tiles) != 0
        pixels = pixel_values.reshape(m, tiles, *pixel_values.shape[3:])
        ids = aspect_ratio_ids.reshape(m).to(torch.long)
        # Image slots without a real tile are padding: nothing downstream reads them, skip them.
        keep = real_tiles.any(dim=1)
        if m and bool(keep.all()):
            out = self._encode(pixels, ids, real_tiles, skip_padded_tiles, padded_tiles)
            return out[:, :tiles].contiguous().view(out_shape)
        out = torch.zeros(m, tiles, self.num_patches, cfg.vision_output_dim, dtype=weight.dtype, device=weight.device)
        kept = keep.nonzero().squeeze(1)
        if kept.numel():
            encoded = self._encode(pixels[kept], ids[kept], real_tiles[kept], skip_padded_tiles, padded_tiles)
            out[kept] = encoded[:, :tiles]
        return out.reshape(out_shape)

    def _encode(self, pixels: torch.Tensor, ids: torch.Tensor, real_tiles: torch.Tensor,
                skip_padded_tiles: bool, padded_tiles: bool = True) -> torch.Tensor:
        """(m, tiles, C, H, W) -> (m, max_num_tiles, num_patches, vision_output_dim).

        Fewer tiles than max_num_tiles are padded with zero tiles, as the image processor does.
        """
        cfg = self.config
        weight = self.patch_embedding.weight
        m, tiles = pixels.shape[:2]
        max_tiles, dim, positions, tile_len = cfg.max_num_tiles, cfg.hidden_size, self.num_patches, self.tile_len
        ids = ids.to(weight.device)

        patches = self.patch_embedding(pixels.reshape(m * tiles, *pixels.shape[2:]).to(weight.device, weight.dtype))
        x = patches.new_empty(m, max_tiles, positions, dim)
        x[:, :tiles, 1:] = patches.flatten(2).transpose(1, 2).view(m, tiles, positions - 1, dim)
        x[:, tiles:, 1:] = 0
        # The pre-tile embedding goes on the patches only; the class token is prepended after it.
        x[:, :, 1:] += self.pre_tile_positional_embedding(ids)
        x[:, :, 0] = self.class_embedding
        x = self.gated_positional_embedding(x, ids)
        x = self.layernorm_pre(x)
        x = F.pad(x, (0, 0, 0, tile_len - positions))  # (m, max_tiles, tile_len, dim), padding rows = 0

        # Attention only cares which positions are real, so real tiles can be moved to the front
        # (what tile_attention expects) and moved back at the end. The processor already puts them
        # there, so this costs nothing in practice.
        real_tiles = F.pad(real_tiles.to(torch.int8), (0, max_tiles - tiles)).to(x.device)
        counts = real_tiles.sum(dim=1)
        order = None
        if not bool((real_tiles == (torch.arange(max_tiles, device=x.device) < counts[:, None])).all()):
            order = torch.argsort(1 - real_tiles, dim=1, stable=True)  # (m, max_tiles)
            rows = torch.arange(m, device=x.device)[:, None]
            x = x[rows, order]
        post = self.post_tile_positional_embedding(ids)  # (m, max_tiles, 1, dim)
        if order is not None:
            post = post[rows, order]
        if not skip_padded_tiles:
            out = self._encode_exact(x, post, counts, padded_tiles=padded_tiles)
        else:
            out = x.new_zeros(m, max_tiles, positions, cfg.vision_output_dim)
            for n in counts.unique().tolist():  # images with n real tiles: encode those n tiles alone
                group = (counts == n).nonzero().squeeze(1)
                layout = TileLayout.from_counts([n] * len(group), num_tiles=n, tile_len=tile_len, real_len=positions)
                out[group, :n] = self._encoders(x[group, :n], post[group, :n], layout)
        if order is not None:
            out[rows, order] = out.clone()
        return out

    def _encode_exact(self, x: torch.Tensor, post: torch.Tensor, counts: torch.Tensor, *,
                      padded_tiles: bool) -> torch.Tensor:
        """Embedded tiles x (m, t, tile_len, dim), real ones first, -> (m, t, num_patches, vision_output_dim).
        Images whose padded tiles are equal run one of them for all (exact: mllama.tile_attention);
        without padded_tiles the others' slots are left unwritten."""
        m, t = x.shape[:2]
        positions, tile_len = self.num_patches, self.tile_len
        counts_list = counts.tolist()
        # Under autograd for x, one tile standing for several would pass all their gradient to one
        # slot's table rows (and pixels); gradients of the layers' weights alone would be exact.
        sharing = not (torch.is_grad_enabled() and x.requires_grad)
        shared = [sharing and n <= t - 2 and _equal_tiles(x[i, n:]) and _equal_tiles(post[i, n:])
                  for i, n in enumerate(counts_list)]
        if not any(shared):
            layout = TileLayout.from_counts(counts_list, num_tiles=t, tile_len=tile_len, real_len=positions)
            return self._encoders(x, post, layout)
        out = x.new_empty(m, t, positions, self.config.vision_output_dim)
        full = [i for i in range(m) if not shared[i]]
        if full:
            layout = TileLayout.from_counts([counts_list[i] for i in full], num_tiles=t, tile_len=tile_len,
                                            real_len=positions)
            rows = _rows(full)
            out[rows] = self._encoders(x[rows], post[rows], layout)
        for n in sorted({n for n, s in zip(counts_list, shared) if s}):
            group = [i for i, (c, s) in enumerate(zip(counts_list, shared)) if s and c == n]
            layout = TileLayout.from_counts([n] * len(group), num_tiles=n + 1, tile_len=tile_len,
                                            real_len=positions, padded_copies=t - n)
            rows = _rows(group)
            if isinstance(rows, slice):  # encoded straight into its place
                encoded = self._encoders(x[rows, :n + 1], post[rows, :n + 1], layout, out=out[rows, :n + 1])
            else:
                out[rows, :n + 1] = encoded = self._encoders(x[rows, :n + 1], post[rows, :n + 1], layout)
            if padded_tiles:  # (g, n + 1, P, out): the padded tiles' equal features
                out[rows, n + 1:] = encoded[:, n:]
        return out

    def _encoders(self, x: torch.Tensor, post: torch.Tensor, layout: TileLayout, *,
                  out: torch.Tensor | None = None) -> torch.Tensor:
        """Embedded tiles x (m, t, tile_len, dim) -> (m, t, num_patches, vision_output_dim), written into
        `out` where given (a view of that shape whose last dim is contiguous)."""
        cfg = self.config
        m, t, tile_len, dim = x.shape
        positions = self.num_patches
        if out is None:
            out = x.new_empty(m, t, positions, cfg.vision_output_dim)
        # (m, t, positions, dim, K): intermediate slot j of feature d sits at dim + d * K + j.
        intermediate = out[..., dim:].unflatten(-1, (dim, len(cfg.intermediate_layers_indices)))

        def tap(i: int, h: torch.Tensor) -> None:
            for j in self._taps.get(i, ()):
                intermediate[..., j] = h.view(m, t, tile_len, dim)[:, :, :positions]

        h = self.transformer(x.reshape(m, t * tile_len, dim), layout, before_layer=tap)
        h = self.layernorm_post(h).view(m, t, tile_len, dim)
        h = _add_(h, post).view(m, t * tile_len, dim)
        h = self.global_transformer(h, layout)
        out[..., :dim] = h.view(m, t, tile_len, dim)[:, :, :positions]
        return out

    def _check_inputs(self, pixel_values: torch.Tensor, aspect_ratio_ids: torch.Tensor,
                      aspect_ratio_mask: torch.Tensor) -> tuple[int, int, int]:
        cfg = self.config
        for name, value in (("pixel_values", pixel_values), ("aspect_ratio_ids", aspect_ratio_ids),
                            ("aspect_ratio_mask", aspect_ratio_mask)):
            if not isinstance(value, torch.Tensor):
                raise TypeError(f"{name} must be a torch.Tensor, got {type(value).__name__}")
        if pixel_values.dim() != 6:
            raise ValueError("pixel_values must have 6 dims (batch, images, tiles, channels, height, width), "
                             f"got shape {tuple(pixel_values.shape)}")
        if not pixel_values.is_floating_point():
            raise ValueError(f"pixel_values must be a floating-point tensor, got {pixel_values.dtype}")
        batch, images, tiles, channels, height, width = pixel_values.shape
        if not 1 <= tiles <= cfg.max_num_tiles:
            raise ValueError(f"pixel_values has {tiles} tiles per image; expected 1..max_num_tiles={cfg.max_num_tiles}")
        if channels != cfg.num_channels:
            raise ValueError(f"pixel_values has {channels} channels; expected num_channels={cfg.num_channels}")
        if (height, width) != (cfg.image_size, cfg.image_size):
            raise ValueError(f"pixel_values tiles are {height}x{width}; expected image_size "
                             f"{cfg.image_size}x{cfg.image_size}")
        if tuple(aspect_ratio_ids.shape) != (batch, images):
            raise ValueError(f"aspect_ratio_ids must have shape (batch, images) = {(batch, images)}, "
                             f"got {tuple(aspect_ratio_ids.shape)}")
        if aspect_ratio_ids.is_floating_point() or aspect_ratio_ids.is_complex() or aspect_ratio_ids.dtype == torch.bool:
            raise ValueError(f"aspect_ratio_ids must be an integer tensor, got {aspect_ratio_ids.dtype}")
        if tuple(aspect_ratio_mask.shape) != (batch, images, tiles):
            raise ValueError(f"aspect_ratio_mask must have shape (batch, images, tiles) = {(batch, images, tiles)}, "
                             f"got {tuple(aspect_ratio_mask.shape)}")
        if torch.compiler.is_compiling():  # value checks read tensors on the host: a graph break each
            return batch, images, tiles
        if aspect_ratio_ids.numel():
            low, high = int(aspect_ratio_ids.min()), int(aspect_ratio_ids.max())
            if low < 0 or high > cfg.max_aspect_ratio_id:
                raise ValueError(f"aspect_ratio_ids must be in 0..{cfg.max_aspect_ratio_id} (0 = padded image), "
                                 f"got values in {low}..{high}")
        if aspect_ratio_mask.numel() and not bool(((aspect_ratio_mask == 0) | (aspect_ratio_mask == 1)).all()):
            raise ValueError("aspect_ratio_mask must hold only 0 (padded tile) and 1 (real tile)")
        return batch, images, tiles
