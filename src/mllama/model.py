"""The public model classes: vision tower + projector + text decoder, and the LM heads."""

from __future__ import annotations

import dataclasses
import os
from typing import Any

import torch
from torch import nn

from mllama.config import GenerationConfig, MllamaConfig, MllamaTextConfig
from mllama.generation_compat import (HARMLESS, NEUTRAL, GenerateDecoderOnlyOutput, as_generation_config,
                                      check_unsupported, repeat_rows,
                                      with_model_tokens)
from mllama.hf_surface import TrainingSurfaceMixin, load_options
from mllama.lm_output import IGNORE_INDEX, check_forward_options, lm_output, run_collecting
from mllama.outputs import BaseModelOutputWithPast, CausalLMOutput, CausalLMOutputWithPast
from mllama.text import CrossInputs, MllamaTextModel, cross_attention_inputs, seen_tiles, self_attention_mask
from mllama.checks import check_pixel_values
from mllama.text import check_forward_inputs
from mllama.vision import MllamaVisionModel

__all__ = ["IGNORE_INDEX", "CausalLMOutput", "CausalLMOutputWithPast", "BaseModelOutputWithPast", "MllamaModel",
           "MllamaForConditionalGeneration", "MllamaForCausalLM"]


class MllamaModel(TrainingSurfaceMixin, nn.Module):
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
        vision = self._vision_features(pixel_values, aspect_ratio_ids, aspect_ratio_mask)
        return self.multi_modal_projector(vision).reshape(vision.shape[0], -1, self.config.text_config.hidden_size)

    def encode_seen_images(self, pixel_values: torch.Tensor, aspect_ratio_ids: torch.Tensor,
                           aspect_ratio_mask: torch.Tensor,
                           cross_attention_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """encode_images for the tiles some text row of cross_attention_mask (B, S, N_images, N_tiles)
        sees: (B, K * num_patches, text hidden) tokens and their (B, S, 1, K) mask (see
        mllama.text.seen_tiles); the projector and the cross layers' K/V skip the others."""
        vision = self._vision_features(pixel_values, aspect_ratio_ids, aspect_ratio_mask)
        vision, cross_attention_mask = seen_tiles(vision, cross_attention_mask)
        hidden = self.config.text_config.hidden_size
        return self.multi_modal_projector(vision).reshape(vision.shape[0], -1, hidden), cross_attention_mask

    def _vision_features(self, pixel_values: torch.Tensor, aspect_ratio_ids: torch.Tensor,
                         aspect_ratio_mask: torch.Tensor) -> torch.Tensor:
        check_pixel_values(pixel_values, max_num_tiles=self.config.vision_config.max_num_tiles)
        dtype = self.vision_model.patch_embedding.weight.dtype  # the projector may be quantized
        return self.vision_model.features(pixel_values.to(dtype), aspect_ratio_ids, aspect_ratio_mask)

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike, **options: Any) -> "MllamaModel":
        """The backbone of a full checkpoint (no lm_head), as transformers' MllamaModel.from_pretrained;
        takes MllamaForConditionalGeneration.from_pretrained's keywords."""
        full = MllamaForConditionalGeneration.from_pretrained(path, **options)
        model = full.model
        model.name_or_path = full.name_or_path
        return model

    @classmethod
    def can_generate(cls) -> bool:
        return False

    def get_input_embeddings(self) -> nn.Embedding:
        return self.language_model.embed_tokens

    def set_input_embeddings(self, value: nn.Embedding) -> None:
        self.language_model.embed_tokens = value

    def get_output_embeddings(self) -> None:
        return None

    def forward(self, input_ids: torch.Tensor | None = None, pixel_values: torch.Tensor | None = None,
                aspect_ratio_mask: torch.Tensor | None = None, aspect_ratio_ids: torch.Tensor | None = None,
                attention_mask: torch.Tensor | None = None, cross_attention_mask: torch.Tensor | None = None,
                cross_attention_states: torch.Tensor | None = None, position_ids: torch.Tensor | None = None,
                past_key_values: Any = None, inputs_embeds: torch.Tensor | None = None,
                use_cache: bool | None = None, *, output_hidden_states: bool | None = None,
                output_attentions: bool | None = None,
                return_dict: bool | None = None) -> BaseModelOutputWithPast | tuple[torch.Tensor, ...]:
        """Full-sequence forward without cache; `.last_hidden_state` is the final normed (B, S, hidden).
        Positional arguments follow transformers' order. use_cache is accepted and has no effect."""
        check_forward_options(past_key_values=past_key_values, output_attentions=output_attentions)
        hidden, states = run_collecting(
            self.language_model, lambda: self.hidden(
                input_ids, attention_mask=attention_mask, pixel_values=pixel_values,
                aspect_ratio_ids=aspect_ratio_ids, aspect_ratio_mask=aspect_ratio_mask,
                cross_attention_mask=cross_attention_mask, position_ids=position_ids, inputs_embeds=inputs_embeds,
                cross_attention_states=cross_attention_states),
            inputs_embeds=inputs_embeds, output_hidden_states=output_hidden_states)
        out = BaseModelOutputWithPast(last_hidden_state=hidden, hidden_states=states)
        return out if return_dict is not False else out.to_tuple()

    def hidden(self, input_ids: torch.Tensor | None = None, *, attention_mask: torch.Tensor | None = None,
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
            if not pixel_values.is_floating_point():
                raise ValueError(f"pixel_values is an integer tensor of shape {tuple(pixel_values.shape)}; "
                                 "positional arguments follow transformers' order (input_ids, pixel_values, "
                                 "aspect_ratio_mask, aspect_ratio_ids, attention_mask): pass attention_mask=...")
            if aspect_ratio_ids is None or aspect_ratio_mask is None:
                raise ValueError("pixel_values needs aspect_ratio_ids and aspect_ratio_mask")
            if cross_attention_mask is not None and cross_attention_mask.dim() == 4 and (
                    cross_attention_mask.shape[0], *cross_attention_mask.shape[2:]) == tuple(pixel_values.shape[:3]):
                cross_attention_states, cross_attention_mask = self.encode_seen_images(
                    pixel_values, aspect_ratio_ids, aspect_ratio_mask, cross_attention_mask)
            else:  # a mask that does not fit the images is named by the checks below
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


class _PretrainedMixin(TrainingSurfaceMixin):
    """from_pretrained / save_pretrained / generate, delegated to their own modules."""

    config: MllamaConfig
    name_or_path: str = ""

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike, *, dtype: torch.dtype | str | None = None,
                        torch_dtype: torch.dtype | str | None = None, device: torch.device | str = "cpu",
                        device_map: Any = None, revision: str | None = None, progress: bool | None = None,
                        quantization: str | None = None, quantization_config: Any = None, config: Any = None,
                        attn_implementation: str | None = None, low_cpu_mem_usage: bool | None = None,
                        token: str | bool | None = None, cache_dir: str | os.PathLike | None = None,
                        local_files_only: bool = False, force_download: bool = False, max_memory: Any = None,
                        use_safetensors: bool | None = None, trust_remote_code: bool | None = None,
                        tp_plan: str | None = None, tp_size: int | None = None, mmap: bool = True):
        """Load a checkpoint directory or hub repo id (see weights.load_pretrained). quantization:
        'int8' or 'int4' (or a mllama.quantize.QuantizationConfig) quantizes the linears while
        loading; quantization_config takes the same as a dict or a transformers-style config.

        transformers' keywords: device_map ("auto", "sequential", a device, or a dict mapping
        everything to one device), config (used instead of config.json), token / cache_dir /
        local_files_only / force_download (hub downloads). attn_implementation, low_cpu_mem_usage,
        max_memory, use_safetensors=False and trust_remote_code are accepted; where they cannot
        apply, a warning (once) says why (see hf_surface.load_options).

        tp_plan="auto" (as transformers, under torchrun): joins the process group torchrun describes
        and loads this rank's slices of the model (mllama.tp_load); tp_size, if given, must equal
        the world size. mmap=False reads the weights into memory the process owns instead of mapping
        the files copy-on-write (see mllama.weights)."""
        from mllama.quantize import resolve_quantization
        from mllama.weights import load_pretrained

        options = load_options(device=device, device_map=device_map, attn_implementation=attn_implementation,
                               low_cpu_mem_usage=low_cpu_mem_usage, token=token, cache_dir=cache_dir,
                               local_files_only=local_files_only, force_download=force_download,
                               max_memory=max_memory, use_safetensors=use_safetensors,
                               trust_remote_code=trust_remote_code)
        quant = resolve_quantization(quantization, quantization_config)
        if tp_plan is not None:
            if tp_plan != "auto":
                raise ValueError(f"tp_plan must be 'auto' (mllama's split, see mllama.tp) or None, got {tp_plan!r}")
            if config is not None or revision is not None:
                raise ValueError("tp_plan='auto' loads config.json from a local checkpoint directory; "
                                 "config= and revision= are not supported with it")
            from mllama.tp_load import init_distributed, load_tensor_parallel

            init_distributed()
            model = load_tensor_parallel(cls, path, dtype=dtype if dtype is not None else torch_dtype,
                                         device=options.device, quantization=quant, world_size=tp_size)
            model.name_or_path = str(path)
            return model
        model = load_pretrained(cls, path, dtype=dtype if dtype is not None else torch_dtype, device=options.device,
                                revision=revision, progress=progress, quantization=quant, config=config,
                                hub=options.hub, mmap=mmap)
        model.name_or_path = str(path)
        return model

    def save_pretrained(self, save_directory: str | os.PathLike, *, max_shard_size: int | str = "5GB") -> None:
        from mllama.saving import save_pretrained

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
                 output_logits: bool = False, output_scores: bool = False, num_return_sequences: int | None = None,
                 compile: bool = False, fast_vision: bool = False, **generation_kwargs: Any):
        """Decode like transformers' generate: returns (B, prompt_len + new) token ids, or with
        return_dict_in_generate an object with `.sequences` and the per-step `.logits`.

        Defaults come from the checkpoint's generation_config.json; explicit arguments override them.
        `seed` (or a `generator`) makes sampling reproducible. `compile` runs the decode steps through
        torch.compile (the first call per batch size and cache length compiles, tens of seconds).
        `fast_vision` skips the padded tiles in the vision encoder: faster for images of fewer than
        max_num_tiles tiles, but not exact (benchmarks/RESULTS.md reports its logit drift).

        transformers compatibility: generation_config may be transformers' GenerationConfig (a config
        without eos/pad ids keeps the model's); num_return_sequences repeats each row (sampling only);
        output_scores gives `.scores`. logits_processor, stopping_criteria and prefix_allowed_tokens_fn
        run as in transformers' loop (see mllama.lockstep). min_new_tokens, min_length,
        no_repeat_ngram_size and beam search (num_beams > 1, length_penalty, early_stopping,
        num_return_sequences <= num_beams; see mllama.beam_search) follow transformers. Other
        transformers fields that would change the output warn that they are ignored.
        """
        from mllama.generate import generate, resolve_config

        if input_ids is None:
            raise ValueError("generate needs input_ids")
        text_config = self.config.text_config if isinstance(self.config, MllamaConfig) else self.config
        base = self.generation_config
        if generation_config is not None:  # transformers' or ours; without eos/pad ids it keeps the model's
            base = with_model_tokens(as_generation_config(generation_config), model_default=self.generation_config,
                                     fallback_eos=text_config.eos_token_ids, fallback_pad=text_config.pad_token_id)
        if generation_kwargs:
            unknown = sorted(set(generation_kwargs) - HARMLESS - set(NEUTRAL))
            if unknown:
                raise TypeError(f"generate() got unexpected keyword arguments {unknown}")
            if base is None:
                base = with_model_tokens(GenerationConfig(), model_default=None, fallback_eos=text_config.eos_token_ids,
                                         fallback_pad=text_config.pad_token_id)
            base = dataclasses.replace(base, extra={**base.extra, **generation_kwargs})
        config = resolve_config(base,
                                max_new_tokens=max_new_tokens, max_length=max_length, do_sample=do_sample,
                                temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p,
                                repetition_penalty=repetition_penalty,
                                eos_token_id=eos_token_id, pad_token_id=pad_token_id,
                                fallback_eos=text_config.eos_token_ids, fallback_pad=text_config.pad_token_id)
        check_unsupported(config)
        count = num_return_sequences if num_return_sequences is not None else config.extra.get("num_return_sequences", 1)
        from mllama.lockstep import caller_hooks

        hooks = caller_hooks(config)
        if config.extra.get("num_beams", 1) != 1:
            from mllama.beam_search import generate_beams

            if streamer is not None or stop_strings or compile or fast_vision:
                raise ValueError("beam search (num_beams > 1) takes no streamer, stop_strings, compile or fast_vision")
            if hooks:
                raise NotImplementedError(f"{sorted(hooks)} with beam search (num_beams > 1) is not implemented; "
                                          "use them with num_beams=1")
            return generate_beams(self, input_ids, attention_mask=attention_mask, pixel_values=pixel_values,
                                  aspect_ratio_ids=aspect_ratio_ids, aspect_ratio_mask=aspect_ratio_mask,
                                  cross_attention_mask=cross_attention_mask, config=config, num_return_sequences=count,
                                  return_dict=return_dict_in_generate, output_scores=output_scores,
                                  output_logits=output_logits,
                                  generator=generator if generator is not None or seed is None
                                  else torch.Generator(device=input_ids.device).manual_seed(seed))
        if count != 1 and not config.do_sample:
            raise ValueError(f"num_return_sequences={count} needs do_sample=True: greedy decoding would return "
                             "the same sequence each time (transformers refuses this too)")
        input_ids, attention_mask, pixel_values, aspect_ratio_ids, aspect_ratio_mask, cross_attention_mask = (
            repeat_rows(count, input_ids, attention_mask, pixel_values, aspect_ratio_ids, aspect_ratio_mask,
                        cross_attention_mask))
        if generator is None and seed is not None:
            generator = torch.Generator(device=input_ids.device).manual_seed(seed)
        if isinstance(stop_strings, str):
            stop_strings = [stop_strings]
        if pixel_values is not None and not hasattr(self.model, "vision_model"):
            raise ValueError("MllamaForCausalLM is text-only; use MllamaForConditionalGeneration for images")
        if hooks or output_scores:  # every row at every step: transformers' loop (mllama.lockstep)
            from mllama.lockstep import generate_lockstep

            if compile or fast_vision:
                raise ValueError(f"compile and fast_vision are engine options; generate with "
                                 f"{sorted(hooks) or ['output_scores']} runs without the engine")
            return generate_lockstep(self, input_ids, attention_mask=attention_mask, pixel_values=pixel_values,
                                     aspect_ratio_ids=aspect_ratio_ids, aspect_ratio_mask=aspect_ratio_mask,
                                     cross_attention_mask=cross_attention_mask, config=config, generator=generator,
                                     stop_strings=stop_strings, tokenizer=tokenizer, streamer=streamer,
                                     return_dict=return_dict_in_generate or output_logits or output_scores,
                                     output_scores=output_scores, output_logits=return_dict_in_generate or output_logits)
        out = generate(self, input_ids, attention_mask=attention_mask, pixel_values=pixel_values,
                       aspect_ratio_ids=aspect_ratio_ids, aspect_ratio_mask=aspect_ratio_mask,
                       cross_attention_mask=cross_attention_mask, config=config, stop_strings=stop_strings,
                       tokenizer=tokenizer, streamer=streamer, generator=generator,
                       output_logits=return_dict_in_generate or output_logits, compile=compile,
                       fast_vision=fast_vision)
        if isinstance(out, torch.Tensor):
            return out
        return GenerateDecoderOnlyOutput(sequences=out.sequences, logits=out.logits)

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

    def forward(self, input_ids: torch.Tensor | None = None, pixel_values: torch.Tensor | None = None,
                aspect_ratio_mask: torch.Tensor | None = None, aspect_ratio_ids: torch.Tensor | None = None,
                attention_mask: torch.Tensor | None = None, cross_attention_mask: torch.Tensor | None = None,
                cross_attention_states: torch.Tensor | None = None, position_ids: torch.Tensor | None = None,
                past_key_values: Any = None, inputs_embeds: torch.Tensor | None = None,
                labels: torch.Tensor | None = None, use_cache: bool | None = None,
                logits_to_keep: int | torch.Tensor = 0, *, output_hidden_states: bool | None = None,
                output_attentions: bool | None = None,
                return_dict: bool | None = None) -> CausalLMOutputWithPast | tuple[torch.Tensor, ...]:
        """Full-sequence forward, positional arguments in transformers' order. Returns a dict-like
        output (`out.logits`, `out["logits"]`, `out[0]`, `out.to_tuple()`), or its tuple with
        return_dict=False. use_cache is accepted and has no effect (no cache is returned)."""
        check_forward_options(past_key_values=past_key_values, output_attentions=output_attentions)
        hidden, states = run_collecting(
            self.model.language_model, lambda: self.model.hidden(
                input_ids, attention_mask=attention_mask, pixel_values=pixel_values,
                aspect_ratio_ids=aspect_ratio_ids, aspect_ratio_mask=aspect_ratio_mask,
                cross_attention_mask=cross_attention_mask, position_ids=position_ids, inputs_embeds=inputs_embeds,
                cross_attention_states=cross_attention_states),
            inputs_embeds=inputs_embeds, output_hidden_states=output_hidden_states)
        return lm_output(self.lm_head, hidden, states, labels=labels, logits_to_keep=logits_to_keep,
                         image_token_id=self.config.image_token_index, return_dict=return_dict)


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

    def forward(self, input_ids: torch.Tensor | None = None, attention_mask: torch.Tensor | None = None,
                position_ids: torch.Tensor | None = None, *, past_key_values: Any = None,
                inputs_embeds: torch.Tensor | None = None, labels: torch.Tensor | None = None,
                use_cache: bool | None = None, logits_to_keep: int | torch.Tensor = 0,
                output_hidden_states: bool | None = None, output_attentions: bool | None = None,
                return_dict: bool | None = None) -> CausalLMOutputWithPast | tuple[torch.Tensor, ...]:
        """Text-only forward (see MllamaForConditionalGeneration.forward for the output)."""
        check_forward_options(past_key_values=past_key_values, output_attentions=output_attentions)
        b, s = check_forward_inputs(input_ids, inputs_embeds, hidden_size=self.config.hidden_size,
                                    num_embeddings=self.model.embed_tokens.num_embeddings)
        ref = input_ids if input_ids is not None else inputs_embeds
        if position_ids is None:
            position_ids = torch.arange(s, device=ref.device)[None].expand(b, s)
        mask = self_attention_mask(attention_mask, query_len=s, batch=b, device=ref.device)
        hidden, states = run_collecting(
            self.model, lambda: self.model(input_ids, inputs_embeds=inputs_embeds, position_ids=position_ids,
                                           mask=mask),
            inputs_embeds=inputs_embeds, output_hidden_states=output_hidden_states)
        return lm_output(self.lm_head, hidden, states, labels=labels, logits_to_keep=logits_to_keep,
                         image_token_id=None, return_dict=return_dict)
