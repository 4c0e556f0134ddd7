"""The public model classes: vision tower + projector + text decoder, and the LM heads."""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from mllama.config import MllamaConfig, MllamaTextConfig
from mllama.text import CrossInputs, MllamaTextModel, cross_attention_inputs, self_attention_mask
from mllama.text import check_forward_inputs
from mllama.vision import MllamaVisionModel

IGNORE_INDEX = -100


@dataclass
class CausalLMOutput:
    logits: torch.Tensor
    loss: torch.Tensor | None = None


class MllamaModel(nn.Module):
    def __init__(self, config: MllamaConfig) -> None:
        super().__init__()
        self.config = config
        self.vision_model = MllamaVisionModel(config.vision_config)
        self.multi_modal_projector = nn.Linear(config.vision_config.vision_output_dim,
                                               config.text_config.hidden_size, bias=True)
        self.language_model = MllamaTextModel(config.text_config)

    def encode_images(self, pixel_values: torch.Tensor, aspect_ratio_ids: torch.Tensor,
                      aspect_ratio_mask: torch.Tensor) -> torch.Tensor:
        """Pixels -> projected vision tokens (B, N_images * N_tiles * num_patches, text hidden)."""
        dtype = self.vision_model.patch_embedding.weight.dtype  # the projector may be quantized
        vision = self.vision_model(pixel_values.to(dtype), aspect_ratio_ids, aspect_ratio_mask)
        b = vision.shape[0]
        return self.multi_modal_projector(vision).reshape(b, -1, self.config.text_config.hidden_size)

    def forward(self, input_ids: torch.Tensor | None = None, *, attention_mask: torch.Tensor | None = None,
                pixel_values: torch.Tensor | None = None, aspect_ratio_ids: torch.Tensor | None = None,
                aspect_ratio_mask: torch.Tensor | None = None, cross_attention_mask: torch.Tensor | None = None,
                position_ids: torch.Tensor | None = None, inputs_embeds: torch.Tensor | None = None,
                cross_attention_states: torch.Tensor | None = None) -> torch.Tensor:
        """Full-sequence forward without cache; returns final hidden states (B, S, hidden)."""
        b, s = check_forward_inputs(input_ids, inputs_embeds, hidden_size=self.config.text_config.hidden_size,
                                    num_embeddings=self.language_model.embed_tokens.num_embeddings)
        if pixel_values is not None and cross_attention_states is not None:
            raise ValueError("pass pixel_values or cross_attention_states, not both")
        ref = input_ids if input_ids is not None else inputs_embeds
        if pixel_values is not None:
            if aspect_ratio_ids is None or aspect_ratio_mask is None:
                raise ValueError("pixel_values needs aspect_ratio_ids and aspect_ratio_mask")
            cross_attention_states = self.encode_images(pixel_values, aspect_ratio_ids, aspect_ratio_mask)
        cross = None
        if cross_attention_states is not None:
            if cross_attention_mask is None:
                raise ValueError("images were given without a cross_attention_mask")
            if cross_attention_mask.shape[:2] != (b, s):
                raise ValueError(f"cross_attention_mask has shape {tuple(cross_attention_mask.shape)}, "
                                 f"expected ({b}, {s}, N_images, N_tiles)")
            n_tiles = cross_attention_mask.shape[2] * cross_attention_mask.shape[3]
            if cross_attention_states.shape[1] % n_tiles:
                raise ValueError(f"{cross_attention_states.shape[1]} vision tokens do not split into the "
                                 f"{n_tiles} image tiles of cross_attention_mask")
            dtype = cross_attention_states.dtype
            mask, rows = cross_attention_inputs(cross_attention_mask, dtype=dtype,
                                                num_patches=cross_attention_states.shape[1] // n_tiles)
            cross = CrossInputs(states=cross_attention_states, mask=mask, text_row_mask=rows)
        if position_ids is None:
            position_ids = torch.arange(s, device=ref.device)[None].expand(b, s)
        mask = self_attention_mask(attention_mask, query_len=s, batch=b, device=ref.device)
        return self.language_model(input_ids, inputs_embeds=inputs_embeds, position_ids=position_ids,
                                   mask=mask, cross=cross)


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


class _PretrainedMixin:
    """from_pretrained / save_pretrained / generate, delegated to their own modules."""

    config: MllamaConfig

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike, *, dtype: torch.dtype | str | None = None,
                        torch_dtype: torch.dtype | str | None = None, device: torch.device | str = "cpu",
                        device_map: str | None = None, revision: str | None = None, progress: bool | None = None,
                        quantization: str | None = None, quantization_config: Any = None):
        """Load a checkpoint directory or hub repo id (see weights.load_pretrained). quantization:
        'int8' or 'int4' (or a mllama.quantize.QuantizationConfig) quantizes the linears while
        loading; quantization_config takes the same as a dict or a transformers-style config."""
        from mllama.quantize import resolve_quantization
        from mllama.weights import load_pretrained

        if device_map == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        elif device_map is not None:
            device = device_map
        return load_pretrained(cls, path, dtype=dtype if dtype is not None else torch_dtype, device=device,
                               revision=revision, progress=progress,
                               quantization=resolve_quantization(quantization, quantization_config))

    def save_pretrained(self, save_directory: str | os.PathLike, *, max_shard_size: int | str = "5GB") -> None:
        from mllama.weights import save_pretrained

        save_pretrained(self, save_directory, max_shard_size=max_shard_size)

    def generate(self, input_ids: torch.Tensor | None = None, *, attention_mask: torch.Tensor | None = None,
                 pixel_values: torch.Tensor | None = None, aspect_ratio_ids: torch.Tensor | None = None,
                 aspect_ratio_mask: torch.Tensor | None = None, cross_attention_mask: torch.Tensor | None = None,
                 max_new_tokens: int | None = None, max_length: int | None = None, do_sample: bool | None = None,
                 temperature: float | None = None, top_k: int | None = None, top_p: float | None = None,
                 min_p: float | None = None, repetition_penalty: float | None = None,
                 eos_token_id: int | list[int] | None = None, pad_token_id: int | None = None,
                 stop_strings: str | list[str] | None = None, tokenizer=None, streamer=None,
                 generator: torch.Generator | None = None, seed: int | None = None,
                 generation_config=None, return_dict_in_generate: bool = False,
                 output_logits: bool = False, compile: bool = False, fast_vision: bool = False):
        """Decode like transformers' generate: returns (B, prompt_len + new) token ids, or with
        return_dict_in_generate an object with `.sequences` and the per-step `.logits`.

        Defaults come from the checkpoint's generation_config.json; explicit arguments override them.
        `seed` (or a `generator`) makes sampling reproducible. `compile` runs the decode steps through
        torch.compile (the first call per batch size and cache length compiles, tens of seconds).
        `fast_vision` skips the padded tiles in the vision encoder: faster for images of fewer than
        max_num_tiles tiles, but not exact (benchmarks/RESULTS.md reports its logit drift).
        """
        from mllama.generate import generate, resolve_config

        if input_ids is None:
            raise ValueError("generate needs input_ids")
        text_config = self.config.text_config if isinstance(self.config, MllamaConfig) else self.config
        config = resolve_config(generation_config if generation_config is not None else self.generation_config,
                                max_new_tokens=max_new_tokens, max_length=max_length, do_sample=do_sample,
                                temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p,
                                repetition_penalty=repetition_penalty,
                                eos_token_id=eos_token_id, pad_token_id=pad_token_id,
                                fallback_eos=text_config.eos_token_ids, fallback_pad=text_config.pad_token_id)
        if generator is None and seed is not None:
            generator = torch.Generator(device=input_ids.device).manual_seed(seed)
        if isinstance(stop_strings, str):
            stop_strings = [stop_strings]
        if pixel_values is not None and not isinstance(self, MllamaForConditionalGeneration):
            raise ValueError("MllamaForCausalLM is text-only; use MllamaForConditionalGeneration for images")
        return generate(self, input_ids, attention_mask=attention_mask, pixel_values=pixel_values,
                        aspect_ratio_ids=aspect_ratio_ids, aspect_ratio_mask=aspect_ratio_mask,
                        cross_attention_mask=cross_attention_mask, config=config, stop_strings=stop_strings,
                        tokenizer=tokenizer, streamer=streamer, generator=generator,
                        output_logits=return_dict_in_generate or output_logits, compile=compile,
                        fast_vision=fast_vision)

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device  # type: ignore[attr-defined]

    @property
    def dtype(self) -> torch.dtype:
        return next(self.parameters()).dtype  # type: ignore[attr-defined]


class MllamaForConditionalGeneration(_PretrainedMixin, nn.Module):
    def __init__(self, config: MllamaConfig) -> None:
        super().__init__()
        self.config = config
        self.model = MllamaModel(config)
        self.lm_head = nn.Linear(config.text_config.hidden_size, config.text_config.vocab_size, bias=False)
        self.generation_config = None

    def forward(self, input_ids: torch.Tensor | None = None, *, attention_mask: torch.Tensor | None = None,
                pixel_values: torch.Tensor | None = None, aspect_ratio_ids: torch.Tensor | None = None,
                aspect_ratio_mask: torch.Tensor | None = None, cross_attention_mask: torch.Tensor | None = None,
                labels: torch.Tensor | None = None, position_ids: torch.Tensor | None = None,
                inputs_embeds: torch.Tensor | None = None,
                cross_attention_states: torch.Tensor | None = None) -> CausalLMOutput:
        hidden = self.model(input_ids, attention_mask=attention_mask, pixel_values=pixel_values,
                            aspect_ratio_ids=aspect_ratio_ids, aspect_ratio_mask=aspect_ratio_mask,
                            cross_attention_mask=cross_attention_mask, position_ids=position_ids,
                            inputs_embeds=inputs_embeds, cross_attention_states=cross_attention_states)
        logits = self.lm_head(hidden)
        loss = None
        if labels is not None:
            loss = causal_lm_loss(logits, labels, image_token_id=self.config.image_token_index)
        return CausalLMOutput(logits=logits, loss=loss)


class MllamaForCausalLM(_PretrainedMixin, nn.Module):
    """The text decoder alone; loading a full checkpoint skips the vision tower entirely."""

    def __init__(self, config: MllamaTextConfig | MllamaConfig) -> None:
        super().__init__()
        if isinstance(config, MllamaConfig):
            config = config.text_config
        self.config = config
        self.model = MllamaTextModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.generation_config = None

    def forward(self, input_ids: torch.Tensor | None = None, *, attention_mask: torch.Tensor | None = None,
                labels: torch.Tensor | None = None, position_ids: torch.Tensor | None = None,
                inputs_embeds: torch.Tensor | None = None) -> CausalLMOutput:
        b, s = check_forward_inputs(input_ids, inputs_embeds, hidden_size=self.config.hidden_size,
                                    num_embeddings=self.model.embed_tokens.num_embeddings)
        ref = input_ids if input_ids is not None else inputs_embeds
        if position_ids is None:
            position_ids = torch.arange(s, device=ref.device)[None].expand(b, s)
        mask = self_attention_mask(attention_mask, query_len=s, batch=b, device=ref.device)
        hidden = self.model(input_ids, inputs_embeds=inputs_embeds, position_ids=position_ids, mask=mask)
        logits = self.lm_head(hidden)
        loss = causal_lm_loss(logits, labels, image_token_id=None) if labels is not None else None
        return CausalLMOutput(logits=logits, loss=loss)
