"""generate() in lockstep, for caller hooks: every row advances one token per step, as in
transformers' decoding loop, so `logits_processor`, `stopping_criteria` and
`prefix_allowed_tokens_fn` see the whole batch, (B, S + t) ids in transformers' layout (the left
padding included), at every step, and `output_scores` has a row for every sequence at every step.

The engine's rows are not in lockstep (each starts decoding as soon as its own prefill ends), so
generate() comes here only when a hook or `output_scores` asks for it. Each row still runs from its
own real tokens (padding never reaches the model), so a row equals itself alone. A finished row
goes on with the pad id, as in transformers: hooks and scores keep seeing it.

Per step, in transformers' order: repetition penalty, n-gram and min-length bans, the allowed-token
function, the caller's processors, then (sampling) temperature, top-k, top-p and min-p; the scores
are the result. Ids are drawn as the engine draws them (mllama.sampling), so with no hook a seeded
call gives the engine's tokens.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import nn

from mllama.beam_search import SlotDecoder, encode_prompt
from mllama.config import GenerationConfig
from mllama.generation_compat import GenerateDecoderOnlyOutput
from mllama.sampling import (NgramBans, SamplingTensors, apply_min_p, apply_repetition_penalty, apply_temperature,
                             apply_top_k, apply_top_p, ban_ids, draw, mark_seen)

HOOKS = ("logits_processor", "stopping_criteria", "prefix_allowed_tokens_fn")


def caller_hooks(config: GenerationConfig) -> dict[str, Any]:
    """The hooks set in the config's transformers fields (an empty list is no hook)."""
    found = {}
    for name in HOOKS:
        value = config.extra.get(name)
        if value is None or (isinstance(value, (list, tuple)) and not value):
            continue
        items = value if name != "prefix_allowed_tokens_fn" else [value]
        if not isinstance(items, Iterable) or not all(callable(item) for item in items):
            raise TypeError(f"{name} must be {'a callable' if name == 'prefix_allowed_tokens_fn' else 'a list of callables (e.g. transformers LogitsProcessorList / StoppingCriteriaList)'}, got {type(value).__name__}")
        found[name] = value
    return found


def _allowed_mask(fn: Callable[[int, torch.Tensor], list[int]], ids: torch.Tensor, vocab: int) -> torch.Tensor:
    """(B, V) additive mask: 0 for the ids fn(batch_id, row) allows, -inf elsewhere."""
    mask = torch.full((ids.shape[0], vocab), float("-inf"), device=ids.device)
    for row in range(ids.shape[0]):
        allowed = list(fn(row, ids[row]))
        if not allowed:
            raise ValueError(f"prefix_allowed_tokens_fn returned no allowed id for batch row {row}: at least one "
                             "id must stay possible")
        bad = [i for i in allowed if not 0 <= int(i) < vocab]
        if bad:
            raise ValueError(f"prefix_allowed_tokens_fn allowed ids outside the vocabulary (0..{vocab - 1}): {bad[:5]}")
        mask[row, allowed] = 0.0
    return mask


def _stops(criteria: Any, ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
    """(B,) bool: which rows the caller's stopping criteria end (a list of them, or one callable)."""
    items = criteria if isinstance(criteria, (list, tuple)) else [criteria]
    done = torch.zeros(ids.shape[0], dtype=torch.bool, device=ids.device)
    for criterion in items:
        result = torch.as_tensor(criterion(ids, scores), device=ids.device)
        if result.dtype != torch.bool or result.numel() not in (1, ids.shape[0]):
            raise ValueError(f"a stopping criterion must return a bool or a (batch,) bool tensor, got "
                             f"{result.dtype} of shape {tuple(result.shape)}")
        done |= result.reshape(-1).expand(ids.shape[0])
    return done


@torch.inference_mode()
def generate_lockstep(model: nn.Module, input_ids: torch.Tensor, *, attention_mask: torch.Tensor | None = None,
                      pixel_values: torch.Tensor | None = None, aspect_ratio_ids: torch.Tensor | None = None,
                      aspect_ratio_mask: torch.Tensor | None = None, cross_attention_mask: torch.Tensor | None = None,
                      config: GenerationConfig, generator: torch.Generator | None = None,
                      stop_strings: list[str] | None = None, tokenizer: Any = None, streamer: Any = None,
                      return_dict: bool = False, output_scores: bool = False,
                      output_logits: bool = False) -> torch.Tensor | GenerateDecoderOnlyOutput:
    """transformers' generate() loop for greedy decoding and sampling with the caller's hooks (see the
    module docstring); the hooks come from config.extra (HOOKS)."""
    from mllama.generate import check_generate_inputs, token_rules

    hooks = caller_hooks(config)
    b, s, max_new, attention_mask, images = check_generate_inputs(
        model, input_ids, attention_mask=attention_mask, pixel_values=pixel_values, aspect_ratio_ids=aspect_ratio_ids,
        aspect_ratio_mask=aspect_ratio_mask, cross_attention_mask=cross_attention_mask, config=config)
    if config.do_sample and config.temperature <= 0:
        raise ValueError(f"temperature must be > 0 when sampling, got {config.temperature}")
    if stop_strings and tokenizer is None:
        raise ValueError("stop_strings need a tokenizer= to decode the output")
    if streamer is not None and b != 1:
        raise ValueError("a streamer supports batch size 1 only")
    pad = config.pad_token_id if config.pad_token_id is not None else (config.eos_token_ids or [0])[0]
    if max_new == 0:
        return GenerateDecoderOnlyOutput(sequences=input_ids.clone()) if return_dict else input_ids.clone()
    min_tokens, ngram = token_rules(config, prompt_len=s)
    eos = torch.tensor(list(config.eos_token_ids), dtype=torch.long, device=input_ids.device)
    real = attention_mask.bool()
    device = getattr(model.model, "language_model", model.model).embed_tokens.weight.device
    prompts = []
    for row in range(b):
        keep = real[row]
        row_images = (images[0][row], images[1][row], images[2][row], images[3][row][keep]) if images else None
        prompts.append(encode_prompt(model, input_ids[row][keep].to(device), row_images))
    decoder = SlotDecoder(model, prompts, 1, max_new)
    logits = decoder.prefill()
    vocab = logits.shape[-1]
    settings = SamplingTensors.from_rows([(config.temperature if config.do_sample else 0.0, config.top_k or 0,
                                           config.top_p if config.top_p is not None else 1.0, config.min_p or 0.0,
                                           config.repetition_penalty)] * b, device=device)
    presence = None
    if config.repetition_penalty != 1.0:
        presence = torch.zeros(b, vocab, dtype=torch.bool, device=device)
        for row, prompt in enumerate(prompts):
            mark_seen(presence[row:row + 1], prompt.ids[None])
    bans = [NgramBans(ngram, p.ids.tolist()) for p in prompts] if ngram else None
    ids = input_ids.clone()
    unfinished = torch.ones(b, dtype=torch.bool, device=input_ids.device)
    texts = [[] for _ in range(b)]  # generated ids per row, for stop strings
    kept_scores, kept_logits = [], []
    if streamer is not None:
        streamer.put(input_ids.cpu())
    for t in range(max_new):
        scores = logits.float()
        if presence is not None:
            scores = apply_repetition_penalty(scores, presence, settings.repetition_penalty)
        banned = [g.banned() for g in bans] if bans is not None else [[] for _ in range(b)]
        if t < min_tokens:
            banned = [row + eos.tolist() for row in banned]
        scores = ban_ids(scores, banned)
        if "prefix_allowed_tokens_fn" in hooks:
            scores = scores + _allowed_mask(hooks["prefix_allowed_tokens_fn"], ids, vocab).to(scores.device)
        for processor in hooks.get("logits_processor", ()):
            scores = processor(ids.to(scores.device), scores)
            if not isinstance(scores, torch.Tensor) or scores.shape != (b, vocab):
                raise ValueError(f"a logits processor must return the (batch, vocab) = ({b}, {vocab}) scores, got "
                                 f"{type(scores).__name__} {tuple(getattr(scores, 'shape', ()))}")
        if config.do_sample:
            scores = apply_temperature(scores, settings.temperature)
            scores = apply_min_p(apply_top_p(apply_top_k(scores, settings.top_k), settings.top_p), settings.min_p)
            chosen = draw(scores, [generator] * b)
        else:
            chosen = scores.argmax(dim=-1)
        if output_scores:
            kept_scores.append(scores.to(input_ids.device))
        if output_logits:
            kept_logits.append(logits.to(input_ids.device))
        chosen = torch.where(unfinished, chosen.to(input_ids.device), torch.full_like(chosen, pad, device=input_ids.device))
        ids = torch.cat([ids, chosen[:, None]], dim=1)
        if streamer is not None:
            streamer.put(chosen.cpu())
        ended = torch.isin(chosen, eos)
        if "stopping_criteria" in hooks:
            ended |= _stops(hooks["stopping_criteria"], ids, scores.to(input_ids.device))
        if stop_strings:
            for row in range(b):
                if unfinished[row]:
                    texts[row].append(int(chosen[row]))
                    text = tokenizer.decode(texts[row], skip_special_tokens=False)
                    ended[row] |= any(stop in text for stop in stop_strings)
        unfinished &= ~ended
        if not bool(unfinished.any()) or t + 1 == max_new:
            break
        if presence is not None:
            mark_seen(presence, chosen[:, None].to(device))
        if bans is not None:
            for g, token in zip(bans, chosen.tolist()):
                g.append(token)
        logits = decoder.step(chosen.to(device))
    if streamer is not None:
        streamer.end()
    if not return_dict:
        return ids
    return GenerateDecoderOnlyOutput(sequences=ids, scores=tuple(kept_scores) if output_scores else None,
                                     logits=tuple(kept_logits) if output_logits else None)
