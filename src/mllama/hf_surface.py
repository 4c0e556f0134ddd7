"""The transformers-model surface beyond forward/generate: from_pretrained's keywords, and the
training helpers tutorials call (gradient checkpointing, embeddings access and resizing, input
grads for adapters, parameter counts, memory footprint).

Lower layer: never imports mllama.model.
"""

from __future__ import annotations

import functools
import os
import types
import warnings
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from mllama.config import MllamaConfig, MllamaTextConfig

ATTN_IMPLEMENTATIONS = ("sdpa", "eager", "flash_attention_2", "flash_attention_3", "flex_attention",
                        "paged_attention", "sdpa_paged", "eager_paged")
_warned: set[str] = set()


def warn_once(key: str, message: str) -> None:
    if key not in _warned:
        _warned.add(key)
        warnings.warn(message, UserWarning, stacklevel=3)


@dataclass(frozen=True)
class LoadOptions:
    """from_pretrained's keywords reduced to what mllama's loader uses."""

    device: torch.device | str
    hub: dict[str, Any]


def _one_device(device_map: Any) -> torch.device | str:
    """transformers' device_map forms -> the one device mllama loads the whole model on."""
    default = "cuda" if torch.cuda.is_available() else "cpu"
    if device_map in ("auto", "sequential", "balanced", "balanced_low_0"):
        return default
    if isinstance(device_map, Mapping):
        devices = {d if d == "disk" else str(torch.device(f"cuda:{d}" if isinstance(d, int) else d))
                   for d in device_map.values()}
        if "disk" in devices or len(devices) != 1:
            raise ValueError(f"device_map {dict(device_map)} spreads the model over {sorted(devices)}; mllama "
                             "loads the whole model on one device (use tensor parallelism for several GPUs)")
        return devices.pop()
    if isinstance(device_map, int):
        return f"cuda:{device_map}"
    if isinstance(device_map, (str, torch.device)):
        return device_map
    raise TypeError(f"device_map must be a device, 'auto', 'sequential' or a dict, got {type(device_map).__name__}")


def load_options(*, device: torch.device | str, device_map: Any, attn_implementation: str | None,
                 low_cpu_mem_usage: bool | None, token: str | bool | None, cache_dir: Any,
                 local_files_only: bool, force_download: bool, max_memory: Any, use_safetensors: bool | None,
                 trust_remote_code: bool | None) -> LoadOptions:
    """Check transformers' loading keywords; each one mllama cannot apply warns once, saying why."""
    if attn_implementation is not None:
        if attn_implementation not in ATTN_IMPLEMENTATIONS:
            raise ValueError(f"attn_implementation {attn_implementation!r} is not one of {ATTN_IMPLEMENTATIONS}")
        if attn_implementation not in ("sdpa", "eager"):
            warn_once(f"attn:{attn_implementation}",
                      f"attn_implementation={attn_implementation!r} is ignored: mllama always runs its own "
                      "attention (torch SDPA and fused CPU kernels), which is numerically the 'sdpa' path")
    if low_cpu_mem_usage is False:
        warn_once("low_cpu_mem_usage", "low_cpu_mem_usage=False is ignored: mllama always builds the model "
                  "on the meta device and reads each tensor once, so memory stays near the model size")
    if max_memory is not None:
        warn_once("max_memory", "max_memory is ignored: mllama loads the whole model on one device and "
                  "does not offload layers to the CPU or disk")
    if use_safetensors is False:
        warn_once("use_safetensors", "use_safetensors=False is ignored: mllama reads only .safetensors "
                  "checkpoints (pickle .bin files are never loaded)")
    if trust_remote_code:
        warn_once("trust_remote_code", "trust_remote_code is ignored: mllama never runs code from a checkpoint")
    hub: dict[str, Any] = {}
    if token is not None:
        hub["token"] = token
    if cache_dir is not None:
        hub["cache_dir"] = str(cache_dir)
    if local_files_only:
        hub["local_files_only"] = True
    if force_download:
        hub["force_download"] = True
    return LoadOptions(device=_one_device(device_map) if device_map is not None else device, hub=hub)


def override_config(override: Any, raw_config: dict[str, Any], *,
                     text_only: bool) -> tuple[dict[str, Any], MllamaConfig | MllamaTextConfig]:
    """A caller's config in place of config.json (the checkpoint's quantization record is kept)."""
    if isinstance(override, Mapping):
        data = dict(override)
    elif hasattr(override, "to_dict"):
        data = override.to_dict()
    else:
        raise TypeError(f"config must be an MllamaConfig, a dict or a config with to_dict(), "
                        f"got {type(override).__name__}")
    if "quantization_config" in raw_config:
        data.setdefault("quantization_config", raw_config["quantization_config"])
    if text_only and data.get("model_type", "mllama") == "mllama" and "text_config" in data:
        text = dict(data["text_config"])
        return data, MllamaTextConfig.from_dict(text)
    if data.get("model_type", "mllama") == MllamaTextConfig.model_type:
        if not text_only:
            raise ValueError("config= is a text-only config; load it with MllamaForCausalLM")
        return data, MllamaTextConfig.from_dict(data)
    return data, MllamaConfig.from_dict(data)


def _checkpointed_forward(layer: nn.Module, *args: Any, **kwargs: Any) -> Any:
    forward = type(layer).forward
    if layer.training and torch.is_grad_enabled():
        return checkpoint(forward, layer, *args, use_reentrant=False, **kwargs)
    return forward(layer, *args, **kwargs)


def _checkpoint_layers(model: nn.Module) -> list[nn.Module]:
    """The repeated blocks whose activations are recomputed: decoder and vision encoder layers."""
    found = []
    for module in model.modules():
        if isinstance(module, nn.ModuleList) and module is not model:
            found.extend(m for m in module if type(m).__name__.endswith("Layer"))
    return found


class TrainingSurfaceMixin:
    """transformers' PreTrainedModel helpers for training, on an nn.Module with `.config`."""

    supports_gradient_checkpointing = True
    main_input_name = "input_ids"

    # ---- gradient checkpointing ----
    def gradient_checkpointing_enable(self, gradient_checkpointing_kwargs: dict[str, Any] | None = None) -> None:
        """Recompute each decoder/vision layer's activations in the backward pass (training mode only).
        `gradient_checkpointing_kwargs` is accepted for transformers' signature; use_reentrant=True is
        not supported (the non-reentrant form is used, which also works with frozen inputs)."""
        if (gradient_checkpointing_kwargs or {}).get("use_reentrant"):
            warn_once("reentrant", "use_reentrant=True is ignored: mllama checkpoints with use_reentrant=False")
        for layer in _checkpoint_layers(self):  # type: ignore[arg-type]
            layer.forward = types.MethodType(_checkpointed_forward, layer)  # type: ignore[method-assign]

    def gradient_checkpointing_disable(self) -> None:
        for layer in _checkpoint_layers(self):  # type: ignore[arg-type]
            layer.__dict__.pop("forward", None)

    @property
    def is_gradient_checkpointing(self) -> bool:
        layers = _checkpoint_layers(self)  # type: ignore[arg-type]
        return bool(layers) and all("forward" in layer.__dict__ for layer in layers)

    # ---- embeddings ----
    def _text_model(self) -> nn.Module:
        inner = self.model  # type: ignore[attr-defined]
        return getattr(inner, "language_model", inner)

    def get_input_embeddings(self) -> nn.Embedding:
        return self._text_model().embed_tokens

    def set_input_embeddings(self, value: nn.Embedding) -> None:
        self._text_model().embed_tokens = value

    def get_output_embeddings(self) -> nn.Module:
        return self.lm_head  # type: ignore[attr-defined]

    def set_output_embeddings(self, value: nn.Module) -> None:
        self.lm_head = value

    def tie_weights(self) -> None:
        """Nothing to tie: Llama 3.2-Vision keeps separate input and output embeddings."""

    def resize_token_embeddings(self, new_num_tokens: int | None = None, pad_to_multiple_of: int | None = None,
                                mean_resizing: bool = True) -> nn.Embedding:
        """Resize the input embedding to `new_num_tokens` rows and lm_head to the same number of
        outputs, as transformers does for Mllama (text_config.vocab_size becomes the new count).
        New rows start at the mean of the old ones (mean_resizing) or zero; old rows are kept."""
        embed = self.get_input_embeddings()
        if new_num_tokens is None:
            return embed
        if pad_to_multiple_of is not None:
            new_num_tokens = -(-new_num_tokens // pad_to_multiple_of) * pad_to_multiple_of
        config = getattr(self.config, "text_config", self.config)  # type: ignore[attr-defined]
        image_token = getattr(self.config, "image_token_index", None)  # type: ignore[attr-defined]
        if image_token is not None and new_num_tokens <= image_token:
            raise ValueError(f"new_num_tokens {new_num_tokens} would drop the <|image|> embedding row "
                             f"{image_token}; it must be at least {image_token + 1}")
        if new_num_tokens <= 0:
            raise ValueError(f"new_num_tokens must be positive, got {new_num_tokens}")
        self.set_input_embeddings(_resized_embedding(embed, new_num_tokens, mean_resizing))
        self.set_output_embeddings(_resized_head(self.get_output_embeddings(), new_num_tokens, mean_resizing))
        config.vocab_size = new_num_tokens
        return self.get_input_embeddings()

    def enable_input_require_grads(self) -> None:
        """Make the embedding output require grad, so checkpointed layers of a frozen base (adapters)
        still propagate gradients to trainable weights inside them."""
        def hook(module: nn.Module, args: Any, output: torch.Tensor) -> None:
            output.requires_grad_(True)

        self.disable_input_require_grads()
        self._require_grads_hook = self.get_input_embeddings().register_forward_hook(hook)

    def disable_input_require_grads(self) -> None:
        handle = self.__dict__.pop("_require_grads_hook", None)
        if handle is not None:
            handle.remove()

    def load_adapter(self, peft_model_id: str | os.PathLike, adapter_name: str | None = None) -> list[str]:
        """Merge a LoRA adapter saved by peft (a local directory) into the weights; returns the merged
        module names. Unlike transformers' load_adapter the adapter is not kept apart: it cannot be
        disabled (load the base model again for that)."""
        from mllama.adapters import merge_lora

        return merge_lora(self, peft_model_id)  # type: ignore[arg-type]

    # ---- bookkeeping ----
    def num_parameters(self, only_trainable: bool = False, exclude_embeddings: bool = False) -> int:
        skip = set()
        if exclude_embeddings:
            skip = {id(p) for m in self.modules() if isinstance(m, nn.Embedding)  # type: ignore[attr-defined]
                    for p in m.parameters()}
        return sum(p.numel() for p in self.parameters()  # type: ignore[attr-defined]
                   if id(p) not in skip and (p.requires_grad or not only_trainable))

    def get_memory_footprint(self, return_buffers: bool = True) -> int:
        """Bytes held by parameters (and buffers): what the model occupies on its device."""
        total = sum(p.nelement() * p.element_size() for p in self.parameters())  # type: ignore[attr-defined]
        if return_buffers:
            total += sum(b.nelement() * b.element_size() for b in self.buffers())  # type: ignore[attr-defined]
        return total

    @classmethod
    def can_generate(cls) -> bool:
        return hasattr(cls, "generate")

    def prepare_inputs_for_generation(self, input_ids: torch.Tensor, **kwargs: Any) -> dict[str, Any]:
        """The model inputs of one step, for libraries that wrap generate (peft's CAUSAL_LM task).
        mllama's generate keeps its own cache and does not call this; it returns the inputs as given."""
        return {"input_ids": input_ids, **{k: v for k, v in kwargs.items() if v is not None}}


def _new_rows(old: torch.Tensor, count: int, mean_resizing: bool) -> torch.Tensor:
    if mean_resizing:
        return old.float().mean(0, keepdim=True).to(old.dtype).expand(count, -1).clone()
    return old.new_zeros(count, old.shape[1])


def _resized_embedding(embed: nn.Embedding, rows: int, mean_resizing: bool) -> nn.Embedding:
    old = embed.weight.data
    out = nn.Embedding(rows, old.shape[1], padding_idx=embed.padding_idx, device=old.device, dtype=old.dtype)
    keep = min(rows, old.shape[0])
    with torch.no_grad():
        out.weight[:keep] = old[:keep]
        if rows > keep:
            out.weight[keep:] = _new_rows(old, rows - keep, mean_resizing)
    out.weight.requires_grad_(embed.weight.requires_grad)
    return out


def _resized_head(head: nn.Module, rows: int, mean_resizing: bool) -> nn.Linear:
    if type(head) is not nn.Linear:
        raise TypeError(f"cannot resize a {type(head).__name__} lm_head (quantized?); resize the float model")
    old = head.weight.data
    out = nn.Linear(old.shape[1], rows, bias=head.bias is not None, device=old.device, dtype=old.dtype)
    keep = min(rows, old.shape[0])
    with torch.no_grad():
        out.weight[:keep] = old[:keep]
        if rows > keep:
            out.weight[keep:] = _new_rows(old, rows - keep, mean_resizing)
        if head.bias is not None:
            out.bias.zero_()
            out.bias[:keep] = head.bias[:keep]
    out.weight.requires_grad_(head.weight.requires_grad)
    return out


def record_hidden_states(layers: nn.ModuleList, embed: nn.Module) -> tuple[list[torch.Tensor], Any]:
    """Hooks that collect (embedding output, each executed layer's output); returns (list, remover)."""
    states: list[torch.Tensor] = []

    def keep(module: nn.Module, args: Any, output: Any) -> None:
        states.append(output[0] if isinstance(output, tuple) else output)

    handles = [embed.register_forward_hook(keep)] + [layer.register_forward_hook(keep) for layer in layers]
    return states, functools.partial(_remove_all, handles)


def _remove_all(handles: list[Any]) -> None:
    for handle in handles:
        handle.remove()
