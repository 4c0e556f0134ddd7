"""transformers' generate() options on top of mllama's: their GenerationConfig objects, fields
mllama does not implement (warned, or refused when they would change the result silently), the
output object of return_dict_in_generate, num_return_sequences.
"""

from __future__ import annotations

import dataclasses
import warnings
from typing import Any

import torch

from mllama.config import GenerationConfig
from mllama.outputs import ModelOutput

# transformers fields that do not change which tokens come out (or that mllama handles elsewhere).
HARMLESS = {"use_cache", "transformers_version", "_from_model_config", "output_attentions", "output_hidden_states",
            "output_scores", "output_logits", "return_dict_in_generate", "cache_implementation", "cache_config",
            "return_legacy_cache", "num_return_sequences", "stop_strings", "compile_config", "disable_compile",
            "decoder_start_token_id", "is_assistant", "low_memory", "prefill_chunk_size", "assistant_early_exit",
            "num_assistant_tokens", "num_assistant_tokens_schedule", "assistant_confidence_threshold",
            "prompt_lookup_num_tokens", "max_matching_ngram_size", "dola_layers", "token_healing",
            "trust_remote_code", "generation_kwargs", "streaming", "length_penalty", "early_stopping",
            "max_time", "remove_invalid_values", "target_lookbehind", "base_model_name_or_path"}
# Fields that change the output when set away from these neutral values: mllama does not implement them.
NEUTRAL = {"num_beams": 1, "num_beam_groups": 1, "no_repeat_ngram_size": 0, "min_new_tokens": None,
           "min_length": 0, "typical_p": 1.0, "epsilon_cutoff": 0.0, "eta_cutoff": 0.0, "diversity_penalty": 0.0,
           "encoder_repetition_penalty": 1.0, "encoder_no_repeat_ngram_size": 0, "bad_words_ids": None,
           "force_words_ids": None, "renormalize_logits": False, "constraints": None, "forced_bos_token_id": None,
           "forced_eos_token_id": None, "exponential_decay_length_penalty": None, "suppress_tokens": None,
           "begin_suppress_tokens": None, "sequence_bias": None, "guidance_scale": None, "watermarking_config": None,
           "penalty_alpha": None, "top_h": None, "top_n_sigma": None, "logits_processor": None,
           "stopping_criteria": None, "prefix_allowed_tokens_fn": None, "assistant_model": None}
# Fields of NEUTRAL that mllama implements (generate.token_rules, beam_search, lockstep): never warned about.
IMPLEMENTED = {"min_new_tokens", "min_length", "no_repeat_ngram_size", "num_beams", "logits_processor",
               "stopping_criteria", "prefix_allowed_tokens_fn"}
# Caller code that would silently not run: refused rather than warned about.
REFUSED = ("assistant_model",)


def as_generation_config(config: Any) -> GenerationConfig:
    """An mllama GenerationConfig from one of ours, a transformers GenerationConfig or a dict."""
    if isinstance(config, GenerationConfig):
        return config
    if isinstance(config, dict):
        return GenerationConfig.from_dict({k: v for k, v in config.items() if v is not None})
    if hasattr(config, "to_dict"):  # transformers.GenerationConfig (or any config object of the same fields)
        # transformers 5.x writes unset fields as None; they mean "the default" here too.
        return GenerationConfig.from_dict({k: v for k, v in config.to_dict().items() if v is not None})
    raise TypeError(f"generation_config must be a GenerationConfig (mllama's or transformers') or a dict, "
                    f"got {type(config).__name__}")


def with_model_tokens(config: GenerationConfig, *, model_default: GenerationConfig | None,
                      fallback_eos: list[int], fallback_pad: int | None) -> GenerationConfig:
    """An explicit config without eos/pad ids keeps the model's (as transformers does)."""
    eos, pad = config.eos_token_id, config.pad_token_id
    if eos is None:
        eos = (model_default.eos_token_id if model_default is not None else None) or fallback_eos or None
    if pad is None:
        pad = model_default.pad_token_id if model_default is not None else None
        pad = pad if pad is not None else fallback_pad
    return dataclasses.replace(config, eos_token_id=eos, pad_token_id=pad)


def unsupported_fields(config: GenerationConfig) -> dict[str, Any]:
    """Fields of the config mllama ignores that are set away from their neutral value."""
    found = {}
    for key, value in config.extra.items():
        if key in HARMLESS or key in IMPLEMENTED or key.startswith("_"):
            continue
        if key in NEUTRAL:
            empty = NEUTRAL[key] is None and isinstance(value, (list, tuple, dict)) and not value
            if value != NEUTRAL[key] and not empty:  # an empty LogitsProcessorList is no processor
                found[key] = value
        elif value not in (None, False, {}, []):
            found[key] = value
    return found


def check_unsupported(config: GenerationConfig) -> None:
    """Group beam search is refused (it would silently be plain beam search); other unimplemented
    fields warn."""
    fields = unsupported_fields(config)
    if fields.get("num_beam_groups", 1) != 1:
        raise NotImplementedError(f"num_beam_groups={fields['num_beam_groups']}: diverse (group) beam search is not "
                                  "implemented in mllama; use num_beam_groups=1")
    hooks = [key for key in REFUSED if key in fields]
    if hooks:
        raise NotImplementedError(f"{hooks}: assisted (speculative) decoding is not implemented in mllama; "
                                  "drop assistant_model")
    if fields:
        warnings.warn(f"generation options ignored by mllama (not implemented): {fields}", UserWarning, stacklevel=3)


class GenerateDecoderOnlyOutput(ModelOutput):
    """return_dict_in_generate=True: `.sequences`, and per step (B, V) `.logits` (raw, output_logits) and
    `.scores` (output_scores: transformers' processed scores, see mllama.lockstep)."""

    _fields = ("sequences", "scores", "logits", "attentions", "hidden_states", "past_key_values")
    sequences: torch.Tensor
    scores: tuple[torch.Tensor, ...] | None
    logits: tuple[torch.Tensor, ...] | None


def repeat_rows(count: int, *tensors: torch.Tensor | None) -> list[torch.Tensor | None]:
    """num_return_sequences: each row repeated `count` times in a row (transformers' order)."""
    if isinstance(count, bool) or not isinstance(count, int) or count < 1:
        raise ValueError(f"num_return_sequences must be an int >= 1, got {count!r}")
    return [t.repeat_interleave(count, dim=0) if t is not None and count > 1 else t for t in tensors]
