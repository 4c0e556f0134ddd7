"""Checkpoint writing: config.json, generation_config.json and safetensors shards in the hub layout,
which transformers and mllama.weights load back. Files are put in place by rename (ShardWriter), so a
model mapped from a directory can be saved back into it."""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

import torch
from torch import nn

from mllama.checkpoint_keys import to_checkpoint_key
from mllama.config import CONFIG_NAME, GENERATION_CONFIG_NAME, MllamaConfig, MllamaTextConfig, write_json
from mllama.safetensors_io import ShardWriter

_SIZE_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
               "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}


def parse_size(size: int | str) -> int:
    """Bytes from an int or a string such as '500MB', '2GB' (powers of 10) or '1GiB' (powers of 2)."""
    if isinstance(size, int) and not isinstance(size, bool):
        value = size
    elif isinstance(size, str):
        match = re.fullmatch(r"\s*(\d+(?:\.\d*)?)\s*([KMGT]i?B|B)?\s*", size, flags=re.IGNORECASE)
        if match is None:
            raise ValueError(f"cannot read the size {size!r}; use bytes or e.g. '500MB', '5GB', '2GiB'")
        value = int(float(match[1]) * _SIZE_UNITS[(match[2] or "").upper()])
    else:
        raise TypeError(f"max_shard_size must be an int or a string, got {type(size).__name__}")
    if value <= 0:
        raise ValueError(f"max_shard_size must be positive, got {size!r}")
    return value


def save_pretrained(model: nn.Module, save_directory: str | os.PathLike, *,
                    max_shard_size: int | str = "5GB") -> None:
    """Write config.json, safetensors weights in the hub layout (see `ShardWriter`) and
    generation_config.json."""
    from mllama.model import MllamaForCausalLM, MllamaForConditionalGeneration

    if not isinstance(model, (MllamaForConditionalGeneration, MllamaForCausalLM)):
        raise TypeError(f"save_pretrained saves Mllama models, got {type(model).__name__}")
    if any(getattr(m, "is_adapter_layer", False) for m in model.modules()):
        raise ValueError("the model still holds LoRA layers, whose weights a checkpoint cannot name: merge them "
                         "first (mllama.lora.merge_and_unload) or save the adapter alone (mllama.lora.save_adapter)")
    text_only = isinstance(model, MllamaForCausalLM)
    limit = parse_size(max_shard_size)
    state = {to_checkpoint_key(k, text_only=text_only): _padded_embedding(k, t.detach(), model)
             for k, t in model.state_dict().items()}
    if any(t.is_meta for t in state.values()):
        raise ValueError("the model has tensors on the meta device; materialise it before saving")
    directory = Path(save_directory)
    directory.mkdir(parents=True, exist_ok=True)
    floating = [t.dtype for t in state.values() if t.is_floating_point()]
    quantization = getattr(model, "quantization_config", None)
    write_model_config(directory, model.config, dtype=floating[0] if floating else torch.get_default_dtype(),
                       architecture="MllamaForCausalLM" if text_only else "MllamaForConditionalGeneration",
                       quantization=quantization.to_dict() if quantization is not None else None)
    if getattr(model, "generation_config", None) is not None:
        generation = model.generation_config  # mllama.config.GenerationConfig, or a plain dict
        write_json(directory / GENERATION_CONFIG_NAME,
                   generation.to_dict() if hasattr(generation, "to_dict") else dict(generation))
    writer = ShardWriter(directory, max_shard_size=limit)
    for key, tensor in state.items():
        writer.add(key, tensor)
    writer.close()


def _padded_embedding(name: str, tensor: torch.Tensor, model: nn.Module) -> torch.Tensor:
    """The input embedding padded with zero rows to vocab_size + 8, the layout config.json implies
    for Mllama: resize_token_embeddings (ours and transformers') leaves vocab_size rows, which
    neither library could load back. Ids past the real rows are never looked up."""
    if not name.endswith("embed_tokens.weight"):
        return tensor
    config = getattr(model.config, "text_config", model.config)
    rows = config.vocab_size + 8
    if tensor.shape[0] >= rows:
        return tensor
    return torch.cat([tensor, tensor.new_zeros(rows - tensor.shape[0], *tensor.shape[1:])])


def write_model_config(directory: Path, config: MllamaConfig | MllamaTextConfig, *, dtype: torch.dtype,
                       architecture: str, quantization: dict[str, Any] | None = None) -> None:
    """config.json with the weights' dtype under both names that readers look for, and the
    quantized format (mllama.quantize) if the weights are quantized."""
    data = config.to_dict()
    data["dtype"] = data["torch_dtype"] = str(dtype).removeprefix("torch.")
    data["architectures"] = [architecture]
    data.pop("quantization_config", None)
    if quantization is not None:
        data["quantization_config"] = quantization
    write_json(Path(directory) / CONFIG_NAME, data)
