"""The LM heads' transformers-style forward surface: options mllama's forward cannot honour, the
hidden states it returns, the logits it keeps, and the training loss.

Lower layer: never imports mllama.model.
"""

from __future__ import annotations

from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import nn

from mllama.hf_surface import record_hidden_states
from mllama.outputs import CausalLMOutputWithPast
from mllama.text import MllamaTextModel

IGNORE_INDEX = -100


def check_forward_options(*, past_key_values: Any, output_attentions: bool | None) -> None:
    """transformers' forward options that mllama's full-sequence forward cannot honour, as errors."""
    if past_key_values is not None:
        raise ValueError("past_key_values: mllama's forward runs the whole sequence without a KV cache; pass "
                         "the full input_ids (generate() and Engine keep their own caches)")
    if output_attentions:
        raise ValueError("output_attentions=True is not supported: attention runs in fused kernels that never "
                         "materialise the attention weights")


def run_collecting(text_model: MllamaTextModel, run: Callable[[], torch.Tensor], *, inputs_embeds: torch.Tensor | None,
                   output_hidden_states: bool | None) -> tuple[torch.Tensor, tuple[torch.Tensor, ...] | None]:
    """Run the decoder; with output_hidden_states also (embeddings, each run layer's output, ..., final
    normed states) as transformers returns them (skipped cross-attention layers add no entry)."""
    if not output_hidden_states:
        return run(), None
    states, remove = record_hidden_states(text_model.layers, text_model.embed_tokens)
    try:
        hidden = run()
    finally:
        remove()
    if inputs_embeds is not None:
        states.insert(0, inputs_embeds)
    return hidden, tuple(states[:-1]) + (hidden,)


def lm_output(lm_head: nn.Module, hidden: torch.Tensor, states: tuple[torch.Tensor, ...] | None, *,
              labels: torch.Tensor | None, logits_to_keep: int | torch.Tensor, image_token_id: int | None,
              return_dict: bool | None) -> CausalLMOutputWithPast | tuple[torch.Tensor, ...]:
    """logits (of the last `logits_to_keep` positions, or those indexed; 0 = all), loss, the output object."""
    if isinstance(logits_to_keep, int):
        if logits_to_keep < 0:
            raise ValueError(f"logits_to_keep must be >= 0, got {logits_to_keep}")
        kept = hidden[:, -logits_to_keep:] if logits_to_keep else hidden
    else:
        kept = hidden[:, logits_to_keep]
    if labels is not None and kept.shape[1] != hidden.shape[1]:
        raise ValueError("labels need the logits of every position; leave logits_to_keep at 0 when training")
    logits = lm_head(kept)
    loss = causal_lm_loss(logits, labels, image_token_id=image_token_id) if labels is not None else None
    out = CausalLMOutputWithPast(loss=loss, logits=logits, hidden_states=states)
    return out if return_dict is not False else out.to_tuple()


def causal_lm_loss(logits: torch.Tensor, labels: torch.Tensor, *, image_token_id: int | None) -> torch.Tensor:
    """Mean next-token cross-entropy; -100 and the image token are never trained on."""
    vocab = logits.shape[-1]
    if not isinstance(labels, torch.Tensor) or labels.shape != logits.shape[:2]:
        raise ValueError(f"labels must be a tensor shaped like input_ids {tuple(logits.shape[:2])}, got "
                         f"{tuple(labels.shape) if isinstance(labels, torch.Tensor) else type(labels).__name__}")
    labels = labels.to(logits.device)
    if image_token_id is not None:
        labels = labels.masked_fill(labels == image_token_id, IGNORE_INDEX)
    bad = (labels != IGNORE_INDEX) & ((labels < 0) | (labels >= vocab))
    if bad.any():
        raise ValueError(f"labels contain ids outside [0, {vocab}) other than {IGNORE_INDEX}: "
                         f"{labels[bad].unique().tolist()[:8]}")
    shift_logits = logits[:, :-1].reshape(-1, vocab).float()
    shift_labels = labels[:, 1:].reshape(-1)
    return F.cross_entropy(shift_logits, shift_labels, ignore_index=IGNORE_INDEX)
