"""LoRA adapters in peft's file format (adapter_config.json + adapter_model.safetensors), merged
into a loaded model: `model.load_adapter(path)` as with transformers' PeftAdapterMixin, without
peft. Each targeted linear gets W += scale * B @ A (scale = lora_alpha / r, or / sqrt(r) with
use_rslora), computed in float32. Lower layer: never imports mllama.model.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file
from torch import nn

ADAPTER_CONFIG_NAME = "adapter_config.json"
ADAPTER_WEIGHTS_NAME = "adapter_model.safetensors"
_PREFIX = "base_model.model."


def _read_config(directory: Path) -> dict[str, Any]:
    file = directory / ADAPTER_CONFIG_NAME
    if not file.is_file():
        raise FileNotFoundError(f"{directory} has no {ADAPTER_CONFIG_NAME}: not a peft adapter directory")
    config = json.loads(file.read_text(encoding="utf-8"))
    if not isinstance(config, dict):
        raise ValueError(f"{file} must hold a JSON object")
    if config.get("peft_type", "LORA") != "LORA":
        raise ValueError(f"{file}: only LoRA adapters can be loaded, not {config.get('peft_type')!r}")
    unsupported = {key: config[key] for key in ("use_dora", "rank_pattern", "alpha_pattern", "modules_to_save",
                                                "layers_to_transform", "fan_in_fan_out")
                   if config.get(key) not in (None, False, {}, [])}
    if config.get("bias", "none") != "none":
        unsupported["bias"] = config["bias"]
    if unsupported:
        raise ValueError(f"{file}: adapter options mllama cannot merge: {unsupported}")
    return config


def lora_deltas(directory: str | Path) -> dict[str, torch.Tensor]:
    """{module name: float32 weight delta (out, in)} of a peft LoRA adapter directory."""
    directory = Path(directory)
    config = _read_config(directory)
    weights_file = directory / ADAPTER_WEIGHTS_NAME
    if not weights_file.is_file():
        raise FileNotFoundError(f"{directory} has no {ADAPTER_WEIGHTS_NAME}")
    tensors = load_file(str(weights_file))
    r = int(config["r"])
    scale = config.get("lora_alpha", r) / (math.sqrt(r) if config.get("use_rslora") else r)
    pairs: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in tensors.items():
        name = key.removeprefix(_PREFIX)
        for part in ("lora_A", "lora_B"):
            marker = f".{part}."
            if marker in name:
                pairs.setdefault(name.split(marker)[0], {})[part] = tensor
                break
        else:
            raise ValueError(f"{weights_file}: unexpected tensor {key!r} (only lora_A/lora_B weights are merged)")
    deltas = {}
    for module, pair in pairs.items():
        if set(pair) != {"lora_A", "lora_B"}:
            raise ValueError(f"{weights_file}: {module} has {sorted(pair)} but needs both lora_A and lora_B")
        deltas[module] = scale * (pair["lora_B"].float() @ pair["lora_A"].float())
    return deltas


def merge_lora(model: nn.Module, directory: str | Path) -> list[str]:
    """Merge the adapter into `model`'s linears in place; returns the merged module names."""
    modules = dict(model.named_modules())
    deltas = lora_deltas(directory)
    missing = sorted(name for name in deltas if not isinstance(modules.get(name), nn.Linear))
    if missing:
        raise ValueError(f"the adapter targets modules that are not float linears of this model: {missing[:8]}")
    with torch.no_grad():
        for name, delta in deltas.items():
            weight = modules[name].weight
            if tuple(weight.shape) != tuple(delta.shape):
                raise ValueError(f"{name}: adapter delta {tuple(delta.shape)} != weight {tuple(weight.shape)}")
            weight.copy_((weight.float() + delta.to(weight.device)).to(weight.dtype))
    return sorted(deltas)
