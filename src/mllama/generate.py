"""transformers-style generate(): a fixed batch of prompts run to completion through the Engine.

Each row of a (possibly left-padded) batch becomes one engine request with its padding removed,
so rows are exactly what they would be alone; the outputs are put back into one padded tensor.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, replace
from typing import Protocol

import torch
from torch import nn

from mllama.checks import check_pixel_values
from mllama.config import GENERATION_CONFIG_NAME, GenerationConfig
from mllama.engine import Engine
from mllama.request import Request, SamplingParams
from mllama.text import check_ids

__all__ = ["GENERATION_CONFIG_NAME", "GenerateOutput", "GenerationConfig", "generate", "resolve_config"]


@dataclass
class GenerateOutput:
    sequences: torch.Tensor
    logits: tuple[torch.Tensor, ...]


class Streamer(Protocol):
    def put(self, value: torch.Tensor) -> None: ...
    def end(self) -> None: ...


class _Decoder(Protocol):
    def decode(self, ids: list[int], *, skip_special_tokens: bool = ...) -> str: ...


# With compile, the cache length is rounded up to a multiple of this, so prompts of similar length
# reuse one compiled graph instead of compiling one per length.
COMPILED_CACHE_MULTIPLE = 256


def token_rules(config: GenerationConfig, *, prompt_len: int) -> tuple[int, int]:
    """(min_tokens, no_repeat_ngram_size) from transformers' fields. min_length counts the prompt
    (its padded length in a batch, as transformers counts it); min_new_tokens does not."""
    extra = config.extra
    values = {k: extra.get(k) for k in ("min_new_tokens", "min_length", "no_repeat_ngram_size")}
    for name, value in values.items():
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 0):
            raise ValueError(f"{name} must be an int >= 0, got {value!r}")
    min_tokens = max(values["min_new_tokens"] or 0, (values["min_length"] or 0) - prompt_len, 0)
    return min_tokens, values["no_repeat_ngram_size"] or 0


def _sampling(config: GenerationConfig, *, max_new: int, stop_strings: list[str] | None,
              output_logits: bool, prompt_len: int) -> SamplingParams:
    if config.do_sample and config.temperature <= 0:
        raise ValueError(f"temperature must be > 0 when sampling, got {config.temperature}")
    min_tokens, ngram = token_rules(config, prompt_len=prompt_len)
    return SamplingParams(min_tokens=min_tokens, no_repeat_ngram_size=ngram, max_tokens=max_new, temperature=config.temperature if config.do_sample else 0.0,
                          top_k=config.top_k or 0, top_p=config.top_p if config.top_p is not None else 1.0,
                          min_p=config.min_p or 0.0, repetition_penalty=config.repetition_penalty,
                          stop_token_ids=tuple(config.eos_token_ids), stop_strings=tuple(stop_strings or ()),
                          return_logits=output_logits, skip_special_tokens=False)


@torch.inference_mode()
def generate(model: nn.Module, input_ids: torch.Tensor, *, attention_mask: torch.Tensor | None = None,
             pixel_values: torch.Tensor | None = None, aspect_ratio_ids: torch.Tensor | None = None,
             aspect_ratio_mask: torch.Tensor | None = None, cross_attention_mask: torch.Tensor | None = None,
             config: GenerationConfig, stop_strings: list[str] | None = None, tokenizer: _Decoder | None = None,
             streamer: Streamer | None = None, generator: torch.Generator | None = None,
             output_logits: bool = False, compile: bool = False,
             fast_vision: bool = False) -> torch.Tensor | GenerateOutput:
    """Prompt (B, S) -> (B, S + new) token ids; finished rows are filled with the pad id.

    With output_logits, returns a GenerateOutput that also holds the raw (B, V) logits of each step
    (zeros for rows that had finished). With compile, the decode steps run through torch.compile:
    the first call for a given batch size and cache length compiles (tens of seconds), later ones
    reuse the graph. fast_vision encodes only the real tiles of each image (not exact; see
    MllamaVisionModel.forward).

    A streamer with a `fail(error)` method is told of any error (so a consumer in another thread is
    not left waiting); one whose `cancelled` attribute turns true ends generation at the next step.
    """
    try:
        return _generate(model, input_ids, attention_mask=attention_mask, pixel_values=pixel_values,
                         aspect_ratio_ids=aspect_ratio_ids, aspect_ratio_mask=aspect_ratio_mask,
                         cross_attention_mask=cross_attention_mask, config=config, stop_strings=stop_strings,
                         tokenizer=tokenizer, streamer=streamer, generator=generator, output_logits=output_logits,
                         compile=compile, fast_vision=fast_vision)
    except BaseException as error:
        if streamer is not None and hasattr(streamer, "fail"):
            streamer.fail(error)
        raise


def _generate(model: nn.Module, input_ids: torch.Tensor, *, attention_mask: torch.Tensor | None,
              pixel_values: torch.Tensor | None, aspect_ratio_ids: torch.Tensor | None,
              aspect_ratio_mask: torch.Tensor | None, cross_attention_mask: torch.Tensor | None,
              config: GenerationConfig, stop_strings: list[str] | None, tokenizer: _Decoder | None,
              streamer: Streamer | None, generator: torch.Generator | None, output_logits: bool, compile: bool,
              fast_vision: bool) -> torch.Tensor | GenerateOutput:
    text_model = getattr(model.model, "language_model", model.model)
    b, s, max_new, attention_mask, images = check_generate_inputs(
        model, input_ids, attention_mask=attention_mask, pixel_values=pixel_values, aspect_ratio_ids=aspect_ratio_ids,
        aspect_ratio_mask=aspect_ratio_mask, cross_attention_mask=cross_attention_mask, config=config)
    pad_id = config.pad_token_id if config.pad_token_id is not None else (config.eos_token_ids or [0])[0]
    if stop_strings and tokenizer is None:
        raise ValueError("stop_strings need a tokenizer= to decode the output")
    if streamer is not None and b != 1:
        raise ValueError("a streamer supports batch size 1 only")
    if max_new == 0:
        return GenerateOutput(input_ids.clone(), ()) if output_logits else input_ids.clone()

    real = attention_mask.bool()
    lengths = real.sum(dim=1)
    if b > 1 and bool((~real[:, -1]).any()):
        warnings.warn("right padding detected in attention_mask: each row is still generated from its own real "
                      "tokens, but its new tokens follow the padding in the returned sequences; pad on the "
                      "left (padding_side='left') for the transformers layout", stacklevel=3)
    max_len = min(int(lengths.max()) + max_new, text_model.config.max_position_embeddings)
    if compile:
        max_len = -(-max_len // COMPILED_CACHE_MULTIPLE) * COMPILED_CACHE_MULTIPLE
    params = _sampling(config, max_new=max_new, stop_strings=stop_strings, output_logits=output_logits,
                       prompt_len=s)
    params.validate()  # before the cache is allocated
    engine = Engine(model, max_slots=b, max_len=max_len, tokenizer=tokenizer if stop_strings else None, prefill_chunk=max(s, 1),
                    vision_piece_layers=None, image_cache_bytes=0, prefix_cache_bytes=0, fast_vision=fast_vision,
                    compile=compile)
    handles = []
    for row in range(b):
        keep = real[row]
        request = Request(input_ids=input_ids[row][keep], sampling=params, generator=generator)
        if images is not None:
            request.pixel_values, request.aspect_ratio_ids, request.aspect_ratio_mask = (
                images[0][row], images[1][row], images[2][row])
            request.cross_attention_mask = images[3][row][keep]
        handles.append(engine.submit(request))
    if streamer is not None:
        streamer.put(input_ids.cpu())
    events: list[list] = [[] for _ in range(b)]
    cancelled = False
    while engine.has_work:
        if not cancelled and getattr(streamer, "cancelled", False):
            cancelled = True
            for handle in handles:
                handle.cancel()
        engine.step()
        for row, handle in enumerate(handles):
            for event in handle.poll():
                if event.token is not None:
                    events[row].append(event)
                    if streamer is not None:
                        streamer.put(torch.tensor([event.token]))
    if streamer is not None:
        streamer.end()
    steps = max(len(e) for e in events)
    out = torch.full((b, steps), pad_id, dtype=input_ids.dtype, device=input_ids.device)
    for row, row_events in enumerate(events):
        out[row, :len(row_events)] = torch.tensor([e.token for e in row_events], dtype=input_ids.dtype)
    sequences = torch.cat([input_ids, out], dim=1)
    if not output_logits:
        return sequences
    zero = next((torch.zeros_like(e[0].logits) for e in events if e), None)
    logits = []
    for step in range(steps):
        rows = [e[step].logits if step < len(e) else zero for e in events]
        logits.append(torch.stack(rows).to(input_ids.device))
    return GenerateOutput(sequences, tuple(logits))


def check_generate_inputs(model: nn.Module, input_ids: torch.Tensor, *, attention_mask: torch.Tensor | None,
                          pixel_values: torch.Tensor | None, aspect_ratio_ids: torch.Tensor | None,
                          aspect_ratio_mask: torch.Tensor | None, cross_attention_mask: torch.Tensor | None,
                          config: GenerationConfig) -> tuple[int, int, int, torch.Tensor, tuple[torch.Tensor, ...] | None]:
    """Validated (batch, prompt length, new-token budget, attention_mask, images or None)."""
    text_model = getattr(model.model, "language_model", model.model)
    check_ids(input_ids, text_model.embed_tokens.num_embeddings)
    if input_ids.dim() != 2:
        raise ValueError(f"input_ids must be (batch, seq), got shape {tuple(input_ids.shape)}")
    b, s = input_ids.shape
    if s == 0 or b == 0:
        raise ValueError(f"input_ids is empty (shape {tuple(input_ids.shape)}): need a prompt of at least one token")
    max_new = new_token_budget(config, prompt_len=s, max_positions=text_model.config.max_position_embeddings)
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    if attention_mask.shape != input_ids.shape:
        raise ValueError(f"attention_mask shape {tuple(attention_mask.shape)} != input_ids {tuple(input_ids.shape)}")
    if not bool(attention_mask.bool().any(dim=1).all()):
        raise ValueError("a row of attention_mask has no real token")
    images = None
    if pixel_values is not None:
        check_pixel_values(pixel_values, max_num_tiles=getattr(model.config, "vision_config", None)
                           and model.config.vision_config.max_num_tiles)
        if aspect_ratio_ids is None or aspect_ratio_mask is None or cross_attention_mask is None:
            raise ValueError("pixel_values needs aspect_ratio_ids, aspect_ratio_mask and cross_attention_mask")
        if cross_attention_mask.shape[:2] != (b, s):
            raise ValueError(f"cross_attention_mask has shape {tuple(cross_attention_mask.shape)}, "
                             f"expected ({b}, {s}, N_images, N_tiles)")
        if pixel_values.shape[:3] != (b, *cross_attention_mask.shape[2:]):
            raise ValueError(f"pixel_values has shape {tuple(pixel_values.shape)} but cross_attention_mask "
                             f"{tuple(cross_attention_mask.shape)} implies ({b}, {cross_attention_mask.shape[2]}, "
                             f"{cross_attention_mask.shape[3]}, C, H, W)")
        images = (pixel_values, aspect_ratio_ids, aspect_ratio_mask, cross_attention_mask)
    return b, s, max_new, attention_mask, images


def new_token_budget(config: GenerationConfig, *, prompt_len: int, max_positions: int) -> int:
    """How many tokens generate() may add: max_new_tokens, else max_length - prompt_len, refusing
    impossible values and trimmed (with a warning) to the model's max_position_embeddings, so the cache
    is never sized for tokens that cannot be generated."""
    max_new, max_length = config.max_new_tokens, config.max_length
    if prompt_len > max_positions:
        raise ValueError(f"the prompt has {prompt_len} tokens, more than the model's max_position_embeddings "
                         f"({max_positions}); shorten it")
    if max_new is not None:
        if isinstance(max_new, bool) or not isinstance(max_new, int):
            raise TypeError(f"max_new_tokens must be an int, got {type(max_new).__name__} {max_new!r}")
        if max_new < 0:
            raise ValueError(f"max_new_tokens must be >= 0, got {max_new}")
        if max_new > max_positions:
            raise ValueError(f"max_new_tokens={max_new} can never be reached: the model has "
                             f"max_position_embeddings={max_positions} positions for prompt and output together")
    else:
        if isinstance(max_length, bool) or not isinstance(max_length, int):
            raise TypeError(f"max_length must be an int, got {type(max_length).__name__} {max_length!r}")
        if prompt_len >= max_length:  # transformers raises the same
            raise ValueError(f"the prompt has {prompt_len} tokens but max_length is {max_length} (prompt + "
                             "output): raise max_length, or better set max_new_tokens")
        max_new = max_length - prompt_len
    if prompt_len + max_new > max_positions:
        warnings.warn(f"prompt ({prompt_len} tokens) + max_new_tokens ({max_new}) exceeds max_position_embeddings "
                      f"({max_positions}); generating at most {max_positions - prompt_len} tokens", stacklevel=3)
        max_new = max_positions - prompt_len
    return max_new


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
