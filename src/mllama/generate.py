"""The generation engine: one prefill, then single-token decode steps over preallocated caches.

Kept apart from the model: the model classes only run forwards; this module owns the caches, the
vision K/V computed once per image set, the positions of a left-padded batch, sampling and stopping.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any, Protocol

import torch
from torch import nn

from mllama.cache import DecoderCache
from mllama.cpu_kernels import gemv_available
from mllama.model import _check_ids, cross_attention_inputs, self_attention_mask
from mllama.sampling import select_next
from mllama.text import CrossInputs, MllamaTextModel

GENERATION_CONFIG_NAME = "generation_config.json"


@dataclass
class GenerationConfig:
    """Decoding defaults, read from a checkpoint's generation_config.json (transformers' field names)."""

    max_new_tokens: int | None = None
    max_length: int = 20
    do_sample: bool = False
    temperature: float = 1.0
    top_k: int | None = 50
    top_p: float = 1.0
    min_p: float | None = None
    repetition_penalty: float = 1.0
    bos_token_id: int | None = None
    eos_token_id: int | list[int] | None = None
    pad_token_id: int | None = None
    extra: dict[str, Any] = field(default_factory=dict, repr=False)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "GenerationConfig":
        names = {f.name for f in fields(cls)} - {"extra"}
        return cls(**{k: v for k, v in data.items() if k in names},
                   extra={k: v for k, v in data.items() if k not in names})

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike) -> "GenerationConfig":
        return cls.from_dict(json.loads((Path(path) / GENERATION_CONFIG_NAME).read_text()))

    def to_dict(self) -> dict[str, Any]:
        out = dict(self.extra)
        out.update({f.name: getattr(self, f.name) for f in fields(self) if f.name != "extra"})
        return {k: v for k, v in out.items() if v is not None}

    def save_pretrained(self, directory: str | os.PathLike) -> None:
        Path(directory, GENERATION_CONFIG_NAME).write_text(json.dumps(self.to_dict(), indent=2) + "\n")

    @property
    def eos_token_ids(self) -> list[int]:
        eos = self.eos_token_id
        return [] if eos is None else [eos] if isinstance(eos, int) else list(eos)


@dataclass
class GenerateOutput:
    sequences: torch.Tensor
    logits: tuple[torch.Tensor, ...]


class Streamer(Protocol):
    def put(self, value: torch.Tensor) -> None: ...
    def end(self) -> None: ...


class _Decoder(Protocol):
    def decode(self, ids: list[int], *, skip_special_tokens: bool = ...) -> str: ...


@dataclass
class VisionContext:
    """Vision tokens of the tiles some text row can see, packed per row.

    states (B, K * P, hidden): only tiles visible to at least one token (padded tiles, padded image
    slots and unseen tiles carry no information under the mask, so dropping them is exact).
    tile_mask (B, S, K): which packed tile each prompt token may see.
    """

    states: torch.Tensor
    tile_mask: torch.Tensor


def encode_vision(model: nn.Module, pixel_values: torch.Tensor, aspect_ratio_ids: torch.Tensor,
                  aspect_ratio_mask: torch.Tensor, cross_attention_mask: torch.Tensor, *,
                  fast_vision: bool = False) -> VisionContext | None:
    b, s, n_img, n_tiles = cross_attention_mask.shape
    if pixel_values.shape[:3] != (b, n_img, n_tiles):
        raise ValueError(f"pixel_values has shape {tuple(pixel_values.shape)} but cross_attention_mask "
                         f"{tuple(cross_attention_mask.shape)} implies ({b}, {n_img}, {n_tiles}, C, H, W)")
    visible = cross_attention_mask.bool().any(dim=1) & aspect_ratio_mask.bool()  # (B, N_img, N_tiles)
    counts = visible.flatten(1).sum(1)
    packed = int(counts.max())
    if packed == 0:
        return None
    used_images = visible.any(-1)  # (B, N_img): only these go through the vision tower
    mm = model.model
    dtype = mm.multi_modal_projector.weight.dtype
    vision = mm.vision_model(pixel_values[used_images].unsqueeze(1).to(dtype),  # (n, 1, T, C, H, W)
                             aspect_ratio_ids[used_images].unsqueeze(1),
                             aspect_ratio_mask[used_images].unsqueeze(1),
                             skip_padded_tiles=fast_vision)[:, 0]  # (n, T, P, D_vision)
    # Per row, the flat (image * N_tiles + tile) indices of its visible tiles, padded to `packed`.
    tile_index = torch.zeros(b, packed, dtype=torch.long, device=visible.device)
    image_rows = torch.full((b, n_img), -1, dtype=torch.long, device=visible.device)
    image_rows[used_images] = torch.arange(int(used_images.sum()), device=visible.device)
    source = []
    for row in range(b):
        flat = visible[row].flatten().nonzero().squeeze(1)
        tile_index[row, : len(flat)] = flat
        source.append(torch.stack([image_rows[row, flat // n_tiles], flat % n_tiles], dim=1))
    source = torch.cat(source)
    tiles = mm.multi_modal_projector(vision[source[:, 0], source[:, 1]])  # (sum(counts), P, hidden)
    patches, hidden = tiles.shape[1], tiles.shape[2]
    states = tiles.new_zeros(b, packed, patches, hidden)
    slot = torch.arange(packed, device=visible.device)[None] < counts[:, None]  # (B, K)
    states[slot] = tiles
    tile_mask = cross_attention_mask.reshape(b, s, -1).gather(2, tile_index[:, None].expand(b, s, packed))
    tile_mask = tile_mask.bool() & slot[:, None]
    return VisionContext(states=states.reshape(b, packed * patches, hidden), tile_mask=tile_mask)


def _decode_step(text_model: MllamaTextModel, lm_head: nn.Module, token: torch.Tensor, position: torch.Tensor,
                 slot: torch.Tensor, valid: torch.Tensor, cache: DecoderCache,
                 cross: CrossInputs | None) -> torch.Tensor:
    """One decode step with shapes that never change: token, position (B, 1); slot a 0-d tensor.

    Attends over the whole preallocated cache; slots after `slot` (and left padding) are masked.
    """
    mask = valid[:, None, None, :] & (torch.arange(valid.shape[1], device=valid.device) <= slot)
    hidden = text_model(token, position_ids=position, mask=mask, cross=cross, cache=cache, cache_start=slot)
    return lm_head(hidden[:, -1])


# A compiled decode step sees a cache rounded up to a multiple of this, so prompts of similar
# length reuse one compiled graph instead of compiling a new one per length.
COMPILED_CACHE_MULTIPLE = 256


def _step_with_cpp_wrapper(*args):
    return _decode_step(*args)


def _step_with_python_wrapper(*args):
    return _decode_step(*args)


_compiled_steps: dict[bool, Any] = {}


def compiled_decode_step(*, uses_kernel: bool):
    """_decode_step through torch.compile (inductor), built on first use and shared by all calls.

    Inductor's C++ wrapper calls the graph's kernels from generated C++ instead of Python, which
    took a tiny float32 model's decode step from about 400 to 300 us on the project's machine; but
    it calls a Python custom op (the bf16 decode kernel) so slowly that bf16 decoding of the bench
    model fell from 12.7 to 8.8 tokens/s. So models that decode through the kernel get the Python
    wrapper. The two wrappers are separate functions because torch.compile caches per function.
    """
    if uses_kernel not in _compiled_steps:
        fn = _step_with_python_wrapper if uses_kernel else _step_with_cpp_wrapper
        _compiled_steps[uses_kernel] = torch.compile(fn, dynamic=False, fullgraph=True,
                                                     options={"cpp_wrapper": not uses_kernel})
    return _compiled_steps[uses_kernel]


def _stop_string_hit(text: str, stop_strings: list[str]) -> bool:
    return any(stop in text for stop in stop_strings)


@torch.inference_mode()
def generate(model: nn.Module, input_ids: torch.Tensor, *, attention_mask: torch.Tensor | None = None,
             pixel_values: torch.Tensor | None = None, aspect_ratio_ids: torch.Tensor | None = None,
             aspect_ratio_mask: torch.Tensor | None = None, cross_attention_mask: torch.Tensor | None = None,
             config: GenerationConfig, stop_strings: list[str] | None = None, tokenizer: _Decoder | None = None,
             streamer: Streamer | None = None, generator: torch.Generator | None = None,
             output_logits: bool = False, compile: bool = False,
             fast_vision: bool = False) -> torch.Tensor | GenerateOutput:
    """Prompt (B, S) -> (B, S + new) token ids; finished rows are filled with the pad id.

    With output_logits, returns a GenerateOutput that also holds the raw (B, V) logits of each step.
    With compile, the decode steps run through torch.compile: the first call for a given batch
    size and cache length compiles (tens of seconds), later ones reuse the graph. fast_vision encodes
    only the real tiles of each image (not exact; see MllamaVisionModel.forward).
    """
    text_model: MllamaTextModel = model.model.language_model if hasattr(model.model, "language_model") \
        else model.model
    if input_ids.dim() != 2:
        raise ValueError(f"input_ids must be (batch, seq), got shape {tuple(input_ids.shape)}")
    _check_ids(input_ids, text_model.embed_tokens.num_embeddings)
    b, s = input_ids.shape
    device = input_ids.device
    if s == 0:
        raise ValueError("the prompt is empty")
    max_new = config.max_new_tokens if config.max_new_tokens is not None else max(config.max_length - s, 0)
    eos = torch.tensor(config.eos_token_ids or [-1], device=device)
    pad_id = config.pad_token_id if config.pad_token_id is not None else (config.eos_token_ids or [0])[0]
    if stop_strings and tokenizer is None:
        raise ValueError("stop_strings need a tokenizer= to decode the output")
    if streamer is not None and b != 1:
        raise ValueError("a streamer supports batch size 1 only")
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    if attention_mask.shape != input_ids.shape:
        raise ValueError(f"attention_mask shape {tuple(attention_mask.shape)} != input_ids {tuple(input_ids.shape)}")
    if max_new == 0:
        return GenerateOutput(input_ids.clone(), ()) if output_logits else input_ids.clone()

    vision = None
    if pixel_values is not None:
        if aspect_ratio_ids is None or aspect_ratio_mask is None or cross_attention_mask is None:
            raise ValueError("pixel_values needs aspect_ratio_ids, aspect_ratio_mask and cross_attention_mask")
        if cross_attention_mask.shape[:2] != (b, s):
            raise ValueError(f"cross_attention_mask has shape {tuple(cross_attention_mask.shape)}, "
                             f"expected ({b}, {s}, N_images, N_tiles)")
        vision = encode_vision(model, pixel_values, aspect_ratio_ids, aspect_ratio_mask, cross_attention_mask,
                               fast_vision=fast_vision)

    dtype = text_model.embed_tokens.weight.dtype
    max_len = s + max_new
    if compile:
        max_len = -(-max_len // COMPILED_CACHE_MULTIPLE) * COMPILED_CACHE_MULTIPLE
    cache = DecoderCache(text_model.config, batch=b, max_len=max_len, dtype=dtype, device=device)
    cache.rope = text_model.rotary_emb.table(max_len, dtype)
    valid = torch.ones(b, max_len, dtype=torch.bool, device=device)
    valid[:, :s] = attention_mask.bool()
    padded = not bool(valid[:, :s].all())
    positions = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)

    cross = None
    if vision is not None:
        patches = vision.states.shape[1] // vision.tile_mask.shape[-1]
        mask, rows = cross_attention_inputs(vision.tile_mask[..., None], num_patches=patches, dtype=dtype)
        cross = CrossInputs(states=vision.states.to(dtype), mask=mask, text_row_mask=rows)
        # Generated tokens see what the last prompt token sees, as transformers extends the mask.
        cache.cross_mask, cache.text_row_mask = mask[:, :, -1:], rows[:, -1:]

    step_mask = self_attention_mask(valid if padded else None, query_len=s, batch=b, device=device)
    hidden = text_model(input_ids, position_ids=positions, mask=step_mask, cross=cross, cache=cache)
    logits = model.lm_head(hidden[:, -1])
    if streamer is not None:
        streamer.put(input_ids.cpu())

    out = torch.full((b, max_new), pad_id, dtype=input_ids.dtype, device=device)
    finished = torch.zeros(b, dtype=torch.bool, device=device)
    seen = input_ids
    next_pos = positions[:, -1:] + 1
    decode_cross = None
    if cross is not None:
        # Usually every row sees every packed vision token: then the decode steps need no mask.
        sees_all = bool(cache.cross_mask.all())
        decode_cross = CrossInputs(states=None, mask=None if sees_all else cache.cross_mask,
                                   text_row_mask=cache.text_row_mask)
    step_fn, slot_tensor = None, None
    if compile:
        step_fn = compiled_decode_step(uses_kernel=dtype == torch.bfloat16 and gemv_available())
        slot_tensor = torch.zeros((), dtype=torch.long, device=device)  # refilled in place each step
    steps = 0
    all_logits = []
    for step in range(max_new):
        if output_logits:
            all_logits.append(logits.float())
        token = select_next(logits, seen=seen, do_sample=config.do_sample, temperature=config.temperature,
                            top_k=config.top_k, top_p=config.top_p, min_p=config.min_p,
                            repetition_penalty=config.repetition_penalty, generator=generator)
        token = torch.where(finished, torch.full_like(token, pad_id), token)
        out[:, step] = token
        steps = step + 1
        if streamer is not None:
            streamer.put(token.cpu())
        finished |= torch.isin(token, eos)
        if stop_strings:
            for row in range(b):
                if not finished[row] and _stop_string_hit(tokenizer.decode(out[row, :steps].tolist()), stop_strings):
                    finished[row] = True
        if bool(finished.all()) or step == max_new - 1:
            break
        if config.repetition_penalty != 1.0:
            seen = torch.cat([input_ids, out[:, :steps]], dim=1)
        slot = s + step
        if step_fn is not None and slot_tensor is not None:
            slot_tensor.fill_(slot)
            logits = step_fn(text_model, model.lm_head, token[:, None], next_pos, slot_tensor, valid, cache,
                             decode_cross)
        else:
            step_mask = valid[:, None, None, : slot + 1] if padded else None
            hidden = text_model(token[:, None], position_ids=next_pos, mask=step_mask, cross=decode_cross,
                                cache=cache, cache_start=slot)
            logits = model.lm_head(hidden[:, -1])
        next_pos = next_pos + 1
    if streamer is not None:
        streamer.end()
    sequences = torch.cat([input_ids, out[:, :steps]], dim=1)
    return GenerateOutput(sequences, tuple(all_logits)) if output_logits else sequences


def resolve_config(base: GenerationConfig | None, *, max_new_tokens: int | None, do_sample: bool | None,
                   temperature: float | None, top_k: int | None, top_p: float | None, min_p: float | None,
                   repetition_penalty: float | None, eos_token_id: int | list[int] | None,
                   pad_token_id: int | None, fallback_eos: list[int], fallback_pad: int | None,
                   max_length: int | None = None) -> GenerationConfig:
    """The checkpoint's defaults overridden by whatever the caller passed explicitly."""
    config = base if base is not None else GenerationConfig(eos_token_id=fallback_eos or None,
                                                            pad_token_id=fallback_pad)
    overrides = {"max_new_tokens": max_new_tokens, "max_length": max_length, "do_sample": do_sample,
                 "temperature": temperature, "top_k": top_k, "top_p": top_p, "min_p": min_p,
                 "repetition_penalty": repetition_penalty, "eos_token_id": eos_token_id, "pad_token_id": pad_token_id}
    return replace(config, **{k: v for k, v in overrides.items() if v is not None})
