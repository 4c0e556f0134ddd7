"""Meta's original checkpoint layout: the one table from its tensor names to the HF layout, the
tensor transforms, and the HF config a checkpoint implies. Merging and writing: convert_meta.py.

Meta publishes Llama 3.2-Vision as the state dict of llama-models' `CrossAttentionTransformer`,
split over model-parallel ranks (1 shard for the 11B, 8 for the 90B). Every rename and tensor
transform lives in `CONVERSION_TABLE`; the shards are merged along the dimension their fairscale
layer splits (column-parallel: dim 0, row-parallel: dim 1, vocabulary-parallel embeddings: dim 0;
everything else is replicated and must be equal on every rank).

Facts the table encodes:
- Meta runs cross-attention block c just before self-attention layer `fusion[c]`
  (`fusion_schedule`); HF interleaves both into one decoder stack, so block c is layer
  `fusion[c] + c` and self layer i is layer `i + #{c : fusion[c] <= i}`.
- Self-attention wq/wk rows are interleaved rotary pairs in Meta's layout; HF rotates the two
  halves of each head, so those rows are permuted per head. Cross-attention has no rotary.
- `embed_tokens` is `tok_embeddings` followed by the 8 rows of `learnable_embedding` (`<|image|>`
  and 7 unused ones); `lm_head` is `output`.
- The patch convolution is stored as a linear over unfolded patches (C, kh, kw order).
- Tile tables ([T, T, ...] indexed by tile row and column) become one row per aspect-ratio id:
  row 0 (padding id) zeros, row i + 1 the tiles of supported aspect ratio i in row-major order.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from mllama.config import MllamaConfig
from mllama.image_processing import supported_aspect_ratios
from mllama.safetensors_io import CheckpointError

PARAMS_NAME = "params.json"
# Hard-coded in Meta's vision encoder rather than recorded in params.json.
META_VISION_HEADS = 16
META_INTERMEDIATE_LAYERS = [3, 7, 15, 23, 30]
LLAMA3_ROPE_SCALING = {"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                       "original_max_position_embeddings": 8192, "rope_type": "llama3"}
INSTRUCT_EOS = [128001, 128008, 128009]
CLIP_MEAN = [0.48145466, 0.4578275, 0.40821073]
CLIP_STD = [0.26862954, 0.26130258, 0.27577711]
# The generic fields transformers 4.45 wrote into both sub-configs of the published config.json.
_GENERIC = {
    "_name_or_path": "", "add_cross_attention": False, "architectures": None, "bad_words_ids": None,
    "begin_suppress_tokens": None, "chunk_size_feed_forward": 0, "cross_attention_hidden_size": None,
    "decoder_start_token_id": None, "diversity_penalty": 0.0, "do_sample": False, "early_stopping": False,
    "encoder_no_repeat_ngram_size": 0, "exponential_decay_length_penalty": None, "finetuning_task": None,
    "forced_bos_token_id": None, "forced_eos_token_id": None, "id2label": {"0": "LABEL_0", "1": "LABEL_1"},
    "is_decoder": False, "is_encoder_decoder": False, "label2id": {"LABEL_0": 0, "LABEL_1": 1},
    "length_penalty": 1.0, "max_length": 20, "min_length": 0, "no_repeat_ngram_size": 0, "num_beam_groups": 1,
    "num_beams": 1, "num_return_sequences": 1, "output_attentions": False, "output_hidden_states": False,
    "output_scores": False, "prefix": None, "problem_type": None, "pruned_heads": {},
    "remove_invalid_values": False, "repetition_penalty": 1.0, "return_dict": True,
    "return_dict_in_generate": False, "sep_token_id": None, "suppress_tokens": None,
    "task_specific_params": None, "temperature": 1.0, "tf_legacy_loss": False, "tie_encoder_decoder": False,
    "tokenizer_class": None, "top_k": 50, "top_p": 1.0, "torchscript": False, "typical_p": 1.0,
    "use_bfloat16": False,
}

# How a fairscale layer splits a tensor over model-parallel ranks: the dimension the shards are
# concatenated on, or None for a tensor every rank holds whole.
COLUMN, ROW, REPLICATED = 0, 1, None


@dataclass(frozen=True)
class Rule:
    """Meta key pattern -> HF (hub layout) key, with its split and transform.

    Named groups `self` and `cross` are Meta layer indices, renumbered into HF's interleaved
    decoder; other groups are copied. Several rules with one target are concatenated on dim 0.
    """

    pattern: str
    target: str
    split: int | None
    transform: str | None = None


_VE = r"vision_model\.vision_encoder\."
_XL = r"text_model\.cross_attention_layers\.(?P<cross>\d+)\."
_TL = r"text_model\.layers\.(?P<self>\d+)\."
_HL = "language_model.model.layers."
_ENC = r"(?P<enc>transformer|global_transformer)\.resblocks\.(?P<n>\d+)\."
CONVERSION_TABLE: list[Rule] = [
    Rule(r"text_model\.tok_embeddings\.weight", "language_model.model.embed_tokens.weight", COLUMN),
    Rule(r"text_model\.learnable_embedding\.weight", "language_model.model.embed_tokens.weight", COLUMN),
    Rule(r"text_model\.norm\.weight", "language_model.model.norm.weight", REPLICATED),
    Rule(r"text_model\.output\.weight", "language_model.lm_head.weight", COLUMN),
    Rule(_TL + r"attention\.wq\.weight", _HL + "{self}.self_attn.q_proj.weight", COLUMN, "rope_q"),
    Rule(_TL + r"attention\.wk\.weight", _HL + "{self}.self_attn.k_proj.weight", COLUMN, "rope_k"),
    Rule(_TL + r"attention\.wv\.weight", _HL + "{self}.self_attn.v_proj.weight", COLUMN),
    Rule(_TL + r"attention\.wo\.weight", _HL + "{self}.self_attn.o_proj.weight", ROW),
    Rule(_TL + r"attention_norm\.weight", _HL + "{self}.input_layernorm.weight", REPLICATED),
    Rule(_TL + r"ffn_norm\.weight", _HL + "{self}.post_attention_layernorm.weight", REPLICATED),
    Rule(_TL + r"feed_forward\.w1\.weight", _HL + "{self}.mlp.gate_proj.weight", COLUMN),
    Rule(_TL + r"feed_forward\.w2\.weight", _HL + "{self}.mlp.down_proj.weight", ROW),
    Rule(_TL + r"feed_forward\.w3\.weight", _HL + "{self}.mlp.up_proj.weight", COLUMN),
    Rule(_XL + r"attention\.w(?P<p>[qkv])\.weight", _HL + "{cross}.cross_attn.{p}_proj.weight", COLUMN),
    Rule(_XL + r"attention\.wo\.weight", _HL + "{cross}.cross_attn.o_proj.weight", ROW),
    Rule(_XL + r"attention\.(?P<p>[qk])_norm\.weight", _HL + "{cross}.cross_attn.{p}_norm.weight", REPLICATED),
    Rule(_XL + r"attention_norm\.weight", _HL + "{cross}.input_layernorm.weight", REPLICATED),
    Rule(_XL + r"ffn_norm\.weight", _HL + "{cross}.post_attention_layernorm.weight", REPLICATED),
    Rule(_XL + r"feed_forward\.w1\.weight", _HL + "{cross}.mlp.gate_proj.weight", COLUMN),
    Rule(_XL + r"feed_forward\.w2\.weight", _HL + "{cross}.mlp.down_proj.weight", ROW),
    Rule(_XL + r"feed_forward\.w3\.weight", _HL + "{cross}.mlp.up_proj.weight", COLUMN),
    Rule(_XL + r"gate_attn", _HL + "{cross}.cross_attn_attn_gate", REPLICATED),
    Rule(_XL + r"gate_ffwd", _HL + "{cross}.cross_attn_mlp_gate", REPLICATED),
    Rule(r"vision_model\.vision_projection\.(?P<p>weight|bias)", "multi_modal_projector.{p}", COLUMN),
    Rule(_VE + r"conv1\._linear\.weight", "vision_model.patch_embedding.weight", COLUMN, "patch_conv"),
    Rule(_VE + r"class_embedding", "vision_model.class_embedding", REPLICATED),
    Rule(_VE + r"positional_embedding", "vision_model.gated_positional_embedding.embedding", REPLICATED,
         "position_grid"),
    Rule(_VE + r"gated_positional_embedding", "vision_model.gated_positional_embedding.tile_embedding.weight",
         REPLICATED, "position_tiles"),
    Rule(_VE + r"gated_positional_embedding_gate", "vision_model.gated_positional_embedding.gate", REPLICATED),
    Rule(_VE + r"(?P<w>pre|post)_tile_pos_embed\.embedding", "vision_model.{w}_tile_positional_embedding.embedding.weight",
         REPLICATED, "tile_table"),
    Rule(_VE + r"(?P<w>pre|post)_tile_pos_embed\.gate", "vision_model.{w}_tile_positional_embedding.gate", REPLICATED),
    Rule(_VE + r"ln_(?P<w>pre|post)\.(?P<p>weight|bias)", "vision_model.layernorm_{w}.{p}", REPLICATED),
    Rule(_VE + _ENC + r"attn\.w(?P<p>[qkv])\.weight", "vision_model.{enc}.layers.{n}.self_attn.{p}_proj.weight", COLUMN),
    Rule(_VE + _ENC + r"attn\.wo\.weight", "vision_model.{enc}.layers.{n}.self_attn.o_proj.weight", ROW),
    Rule(_VE + _ENC + r"ln_1\.(?P<p>weight|bias)", "vision_model.{enc}.layers.{n}.input_layernorm.{p}", REPLICATED),
    Rule(_VE + _ENC + r"ln_2\.(?P<p>weight|bias)", "vision_model.{enc}.layers.{n}.post_attention_layernorm.{p}",
         REPLICATED),
    Rule(_VE + _ENC + r"mlp\.c_fc\.(?P<p>weight|bias)", "vision_model.{enc}.layers.{n}.mlp.fc1.{p}", COLUMN),
    Rule(_VE + _ENC + r"mlp\.c_proj\.weight", "vision_model.{enc}.layers.{n}.mlp.fc2.weight", ROW),
    Rule(_VE + _ENC + r"mlp\.c_proj\.bias", "vision_model.{enc}.layers.{n}.mlp.fc2.bias", REPLICATED),
    Rule(_VE + _ENC + r"gate_(?P<p>attn|ffn)", "vision_model.{enc}.layers.{n}.gate_{p}", REPLICATED),
]
_COMPILED = [(re.compile(rule.pattern), rule) for rule in CONVERSION_TABLE]


class MetaCheckpointError(CheckpointError):
    """A Meta original checkpoint that cannot be converted as it is."""


def fusion_schedule(n_layers: int, n_cross: int) -> list[int]:
    """The self-attention layers that Meta's cross-attention blocks precede: spread evenly, last layer included."""
    step = math.ceil(n_layers / n_cross)
    return sorted(range(n_layers - 1, -1, -step))[-n_cross:]


def match_rule(key: str) -> tuple[Rule, dict[str, str]] | None:
    for pattern, rule in _COMPILED:
        found = pattern.fullmatch(key)
        if found:
            return rule, found.groupdict()
    return None


def hf_key(key: str, *, n_layers: int, n_cross: int) -> str:
    """The HF hub-layout name a Meta key converts into (raises MetaCheckpointError for unknown keys)."""
    found = match_rule(key)
    if found is None:
        raise MetaCheckpointError(f"unknown tensor {key!r}: not a Llama 3.2-Vision (CrossAttentionTransformer) key")
    rule, groups = found
    fusion = fusion_schedule(n_layers, n_cross)
    if "self" in groups:
        i = int(groups["self"])
        groups["self"] = str(i + sum(f <= i for f in fusion))
    if "cross" in groups:
        c = int(groups["cross"])
        if c >= n_cross:
            raise MetaCheckpointError(f"{key!r}: params.json has only {n_cross} cross-attention layers")
        groups["cross"] = str(fusion[c] + c)
    return rule.target.format(**groups)


# ---- tensor transforms ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class TransformShapes:
    """What the transforms need to know of the model."""

    n_heads: int
    n_kv_heads: int
    patch_size: int
    grid: int  # patches per tile side after conversion
    max_num_tiles: int


def _rope_rows(w: torch.Tensor, heads: int) -> torch.Tensor:
    # (heads * head_dim, dim): per head, rows (0, 1), (2, 3), ... -> even rows first, then odd rows.
    rows, dim = w.shape
    return w.view(heads, rows // heads // 2, 2, dim).transpose(1, 2).reshape(rows, dim)


def _resize_grid(grid: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """(h, w, D) -> (size[0], size[1], D), bilinear with aligned corners as Meta's load hooks resize."""
    if tuple(grid.shape[:2]) == size:
        return grid
    out = F.interpolate(grid.permute(2, 0, 1)[None].float(), size=size, mode="bilinear", align_corners=True)
    return out[0].permute(1, 2, 0).to(grid.dtype)


def _per_aspect_ratio(table: torch.Tensor, max_num_tiles: int) -> torch.Tensor:
    """(T, T, ...) indexed by tile row and column -> (1 + #aspect ratios, T * prod(...)); row 0 zeros."""
    rows = [torch.zeros(max_num_tiles, *table.shape[2:], dtype=table.dtype)]
    for r, c in supported_aspect_ratios(max_num_tiles):
        tiles = table[:r, :c].reshape(r * c, *table.shape[2:])
        rows.append(torch.cat([tiles, rows[0][r * c:]]))
    return torch.stack(rows).flatten(1)


def _position_tiles(table: torch.Tensor, s: TransformShapes) -> torch.Tensor:
    """gated_positional_embedding (T, T, 1 + g*g, D) at another grid g' -> per aspect ratio rows."""
    t, _, positions, dim = table.shape
    g = math.isqrt(positions - 1)
    if g != s.grid:  # one image of T x T tiles resized as a whole; the class rows are resized over tiles
        patches = table[:, :, 1:].reshape(t, t, g, g, dim).permute(0, 2, 1, 3, 4).reshape(t * g, t * g, dim)
        patches = _resize_grid(patches, (t * s.grid, t * s.grid))
        patches = patches.view(t, s.grid, t, s.grid, dim).permute(0, 2, 1, 3, 4).reshape(t, t, s.grid**2, dim)
        table = torch.cat([table[:, :, :1], patches], dim=2)
    return _per_aspect_ratio(table, s.max_num_tiles)


def _position_grid(table: torch.Tensor, s: TransformShapes) -> torch.Tensor:
    """positional_embedding (1 + g*g, D): the class row stays, the patch grid is resized to g'."""
    g = math.isqrt(table.shape[0] - 1)
    patches = _resize_grid(table[1:].view(g, g, -1), (s.grid, s.grid)).reshape(s.grid**2, -1)
    return torch.cat([table[:1], patches])


TRANSFORMS: dict[str, Callable[[torch.Tensor, TransformShapes], torch.Tensor]] = {
    "rope_q": lambda w, s: _rope_rows(w, s.n_heads),
    "rope_k": lambda w, s: _rope_rows(w, s.n_kv_heads),
    "patch_conv": lambda w, s: w.reshape(w.shape[0], -1, s.patch_size, s.patch_size),
    "tile_table": lambda w, s: _per_aspect_ratio(w, s.max_num_tiles),
    "position_tiles": _position_tiles,
    "position_grid": _position_grid,
}


# ---- config ---------------------------------------------------------------------------------------------------------
def cross_layer_count(params: Mapping[str, Any]) -> int:
    count = params.get("vision_num_cross_attention_layers")
    if count is None:  # the nested form ModelArgs also accepts
        count = ((params.get("vision_model") or {}).get("cross_attention_adapter") or {}).get("num_layers")
    if not isinstance(count, int) or count < 1:
        raise MetaCheckpointError(f"{PARAMS_NAME}: vision_num_cross_attention_layers must be a positive integer, "
                                  f"got {count!r} (is this a Llama 3.2-Vision checkpoint?)")
    return count


def read_param(params: Mapping[str, Any], name: str, kind: type | tuple[type, ...], default: Any = None) -> Any:
    value = params.get(name, default)
    if value is None or isinstance(value, bool) and kind is not bool or not isinstance(value, kind):
        raise MetaCheckpointError(f"{PARAMS_NAME}: {name} must be {getattr(kind, '__name__', kind)}, got {value!r}")
    return value


def meta_config(params: Mapping[str, Any], shapes: Mapping[str, Sequence[int]], *, instruct: bool = True,
                image_size: int | None = None, dtype: torch.dtype = torch.bfloat16) -> MllamaConfig:
    """The HF config (published format) of a Meta checkpoint from its params.json and merged tensor shapes."""
    dim, n_layers, n_heads = (read_param(params, k, int) for k in ("dim", "n_layers", "n_heads"))
    n_kv_heads = params.get("n_kv_heads") or n_heads
    n_cross = cross_layer_count(params)
    vocab = read_param(params, "vocab_size", int)
    chunk = read_param(params, "vision_chunk_size", int)
    counted = {kind: len({k.split(".")[2] for k in shapes if k.startswith(f"text_model.{kind}.")})
               for kind in ("layers", "cross_attention_layers")}
    if counted != {"layers": n_layers, "cross_attention_layers": n_cross}:
        raise MetaCheckpointError(f"{PARAMS_NAME} says {n_layers} layers and {n_cross} cross-attention layers, "
                                  f"the weights have {counted['layers']} and {counted['cross_attention_layers']}")

    def shape(key: str) -> Sequence[int]:
        if key not in shapes:
            raise MetaCheckpointError(f"the checkpoint has no {key!r}")
        return shapes[key]

    width = shape("vision_model.vision_encoder.class_embedding")[0]
    patch = math.isqrt(shape("vision_model.vision_encoder.conv1._linear.weight")[1] // 3)
    tiles = shape("vision_model.vision_encoder.pre_tile_pos_embed.embedding")[0]
    size = chunk if image_size is None else image_size
    if size % patch:
        raise MetaCheckpointError(f"image_size {size} is not a multiple of the patch size {patch}")
    output_dim = shape("vision_model.vision_projection.weight")[1]
    if output_dim != width * (len(META_INTERMEDIATE_LAYERS) + 1):
        raise MetaCheckpointError(f"vision_projection takes {output_dim} features; Meta's encoder gives "
                                  f"{width} x {len(META_INTERMEDIATE_LAYERS) + 1}")
    if shape("text_model.learnable_embedding.weight")[0] != 8:
        raise MetaCheckpointError("learnable_embedding must have 8 rows (<|image|> and 7 unused)")
    fusion = fusion_schedule(n_layers, n_cross)
    name = str(dtype).removeprefix("torch.")
    encoder_layers = {enc: len({k.split(".")[4] for k in shapes
                                if k.startswith(f"vision_model.vision_encoder.{enc}.resblocks.")})
                      for enc in ("transformer", "global_transformer")}
    text = {**_GENERIC, "torch_dtype": name, "vocab_size": vocab, "hidden_size": dim, "hidden_act": "silu",
            "num_hidden_layers": n_layers + n_cross, "num_attention_heads": n_heads, "num_key_value_heads": n_kv_heads,
            "intermediate_size": shape("text_model.layers.0.feed_forward.w1.weight")[0],
            "rope_theta": float(params.get("rope_theta", 500000.0)),
            "rope_scaling": dict(LLAMA3_ROPE_SCALING) if params.get("use_scaled_rope") else None,
            "rms_norm_eps": float(params.get("norm_eps", 1e-5)), "max_position_embeddings": 131072,
            "initializer_range": 0.02, "use_cache": True, "tie_word_embeddings": False, "dropout": 0.0,
            "cross_attention_layers": [f + c for c, f in enumerate(fusion)],
            "bos_token_id": 128000, "eos_token_id": list(INSTRUCT_EOS) if instruct else 128001, "pad_token_id": 128004}
    vision = {**_GENERIC, "torch_dtype": name, "hidden_size": width, "hidden_act": "gelu",
              "num_hidden_layers": encoder_layers["transformer"], "num_global_layers": encoder_layers["global_transformer"],
              "num_channels": 3, "attention_heads": META_VISION_HEADS,
              "intermediate_size": shape("vision_model.vision_encoder.transformer.resblocks.0.mlp.c_fc.weight")[0],
              "vision_output_dim": output_dim, "image_size": size, "patch_size": patch, "norm_eps": 1e-5,
              "max_num_tiles": tiles, "intermediate_layers_indices": list(META_INTERMEDIATE_LAYERS),
              "supported_aspect_ratios": [list(r) for r in supported_aspect_ratios(tiles)], "tie_word_embeddings": True,
              "bos_token_id": None, "eos_token_id": None, "pad_token_id": None}
    try:
        return MllamaConfig.from_dict({"text_config": text, "vision_config": vision, "image_token_index": vocab,
                                       "torch_dtype": name})
    except ValueError as err:
        raise MetaCheckpointError(f"{PARAMS_NAME} and the weights give an invalid config: {err}") from err
