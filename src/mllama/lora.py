"""LoRA on a built model, by swapping modules (mllama.linear.swap_linears' seam).

`apply_lora(model, r=, alpha=, ...)` wraps each targeted linear (a float `nn.Linear`, or an int8 /
int4 module of mllama.quantize: QLoRA) in a `LoraLinear`: y = base(x) + scale * B(A(dropout(x))),
with scale = alpha / r, A initialised like nn.Linear and B zero, so the wrapped model starts out
equal to the base. Only A and B train; the base is frozen.

The adapter files are peft's (adapter_config.json + adapter_model.safetensors, tensors named
`base_model.model.<module path>.lora_A.weight`), so transformers+peft loads them, and so does
mllama.adapters (merged, without peft). `merge_and_unload` folds the adapter into float linears.
"""

from __future__ import annotations

import json
import math
import os
import re
from pathlib import Path
from typing import Iterable, Sequence

import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from torch import nn

from mllama.adapters import ADAPTER_CONFIG_NAME, ADAPTER_WEIGHTS_NAME, lora_deltas
from mllama.int4_rows import unpack_int4_rows
from mllama.packed_linear import refuse_packed
from mllama.quantize import _QuantizedLinear
from mllama.safetensors_io import write_safetensors

ALL_LINEAR = "all-linear"
_PREFIX = "base_model.model."
# Never adapted by "all-linear": the output layer (as transformers+peft does for its models).
_OUTPUT_LAYERS = ("lm_head",)


class LoraLinear(nn.Module):
    """A frozen linear (float or quantized) plus a trainable low-rank update.

    A and B are kept in float32 whatever the base dtype, so bf16 training updates them precisely;
    the update is computed in float32 and added in the base output's dtype.
    """

    is_adapter_layer = True  # saving.save_pretrained refuses models that still hold these

    def __init__(self, base: nn.Module, *, r: int, alpha: float, dropout: float = 0.0) -> None:
        super().__init__()
        if r < 1:
            raise ValueError(f"LoRA rank r must be >= 1, got {r}")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"LoRA dropout must be in [0, 1), got {dropout}")
        self.base_layer = base
        self.in_features, self.out_features = base.in_features, base.out_features
        self.r, self.alpha = r, alpha
        self.scale = alpha / r
        device = next(iter(base.buffers()), None)
        device = device.device if device is not None else base.weight.device
        self.lora_A = nn.Linear(self.in_features, r, bias=False, device=device, dtype=torch.float32)
        self.lora_B = nn.Linear(r, self.out_features, bias=False, device=device, dtype=torch.float32)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.merged = False
        self.reset_lora()
        for param in base.parameters():
            param.requires_grad_(False)

    @torch.no_grad()
    def reset_lora(self) -> None:
        """A as nn.Linear's default init (kaiming-uniform), B zero: the update starts at exactly 0."""
        nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))
        nn.init.zeros_(self.lora_B.weight)

    @property
    def weight(self) -> torch.Tensor:
        """The base weight (float linears only): code that reads `.weight` of a linear still works."""
        return self.base_layer.weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.base_layer(x)
        if self.merged:
            return out
        a = self.lora_A.weight
        update = F.linear(F.linear(self.dropout(x).to(a.dtype), a), self.lora_B.weight)
        return out + (update * self.scale).to(out.dtype)

    def delta(self) -> torch.Tensor:
        """scale * B @ A, the (out, in) float32 update of the base weight."""
        return self.scale * (self.lora_B.weight.float() @ self.lora_A.weight.float())

    def extra_repr(self) -> str:
        return f"r={self.r}, alpha={self.alpha}"


def _is_linear(module: nn.Module) -> bool:
    return isinstance(module, (nn.Linear, _QuantizedLinear))


def _matches(name: str, targets: str | Sequence[str]) -> bool:
    """peft's rule: a string is a regex the whole module name must match; a list names modules
    by their last components (`q_proj` matches `...self_attn.q_proj`)."""
    if isinstance(targets, str):
        return re.fullmatch(targets, name) is not None
    return any(name == t or name.endswith("." + t) for t in targets)


def select_targets(model: nn.Module, target_modules: str | Sequence[str] = ALL_LINEAR) -> list[str]:
    """Module names of the linears `target_modules` selects: "all-linear" (every linear but
    lm_head: vision, projector, self- and cross-attention, MLPs), a regex, or a list of names
    (which may hold "all-linear": ["all-linear", "lm_head"] adds the output layer)."""
    names = [n for n, m in model.named_modules() if _is_linear(m) and not isinstance(m, LoraLinear)]
    extra: str | Sequence[str] = target_modules
    if not isinstance(target_modules, str) and ALL_LINEAR in target_modules:  # ["all-linear", "lm_head"]
        extra = [t for t in target_modules if t != ALL_LINEAR]
    if target_modules == ALL_LINEAR or extra is not target_modules:
        picked = [n for n in names if n.rsplit(".", 1)[-1] not in _OUTPUT_LAYERS or _matches(n, extra)]
    else:
        picked = [n for n in names if _matches(n, target_modules)]
    if not picked:
        raise ValueError(f"target_modules {target_modules!r} selects no linear layer of this model")
    return picked


def apply_lora(model: nn.Module, *, r: int = 8, alpha: float = 16, dropout: float = 0.0,
               target_modules: str | Sequence[str] = ALL_LINEAR, seed: int | None = 0) -> list[str]:
    """Freeze `model` and wrap its target linears in LoraLinear, in place; returns their names.

    `seed` makes the A matrices reproducible (None: the global RNG)."""
    if any(isinstance(m, LoraLinear) for m in model.modules()):
        raise ValueError("the model has LoRA layers already (merge_and_unload or reload the base first)")
    unpack_int4_rows(model)  # trained through autograd, which the blocked int4 kernel does not take
    refuse_packed(model, "apply_lora")
    targets = set(select_targets(model, target_modules))
    model.requires_grad_(False)
    with torch.random.fork_rng(devices=[], enabled=seed is not None):
        if seed is not None:
            torch.manual_seed(seed)
        for name in sorted(targets):
            parent, _, attr = name.rpartition(".")
            owner = model.get_submodule(parent)
            setattr(owner, attr, LoraLinear(getattr(owner, attr), r=r, alpha=alpha, dropout=dropout))
    model.lora_config = {"r": r, "lora_alpha": alpha, "lora_dropout": dropout}
    return sorted(targets)


def lora_layers(model: nn.Module) -> dict[str, LoraLinear]:
    return {n: m for n, m in model.named_modules() if isinstance(m, LoraLinear)}


def _saved_targets(model: nn.Module, names: Iterable[str]) -> list[str] | str:
    """target_modules for adapter_config.json: the short leaf-name list when it selects exactly the
    adapted linears (what peft itself writes), else a regex naming each of them."""
    names = sorted(names)
    wrapped = set(lora_layers(model))
    # The linears a peft user's model has: LoRA layers count as their base, their insides not at all.
    every = [n for n, m in model.named_modules() if n in wrapped or _is_linear(m)
             and n.rpartition(".")[0] not in wrapped]
    leaves = sorted({n.rsplit(".", 1)[-1] for n in names})
    if sorted(n for n in every if _matches(n, leaves)) == names:
        return leaves
    return "|".join(re.escape(n) for n in names)


def save_adapter(model: nn.Module, save_directory: str | os.PathLike, *,
                 base_model_name_or_path: str | None = None) -> Path:
    """Write the LoRA layers of `model` as a peft adapter directory; returns it."""
    layers = lora_layers(model)
    if not layers:
        raise ValueError("the model has no LoRA layers to save (apply_lora first)")
    first = next(iter(layers.values()))
    out = Path(save_directory)
    out.mkdir(parents=True, exist_ok=True)
    tensors = {}
    for name, layer in layers.items():
        if layer.merged:
            raise ValueError(f"{name} is merged into its base; save the adapter before merging")
        if (layer.r, layer.alpha) != (first.r, first.alpha):
            raise ValueError("every LoRA layer must share r and alpha to be saved in one peft config")
        tensors[f"{_PREFIX}{name}.lora_A.weight"] = layer.lora_A.weight.detach().float().cpu().contiguous()
        tensors[f"{_PREFIX}{name}.lora_B.weight"] = layer.lora_B.weight.detach().float().cpu().contiguous()
    config = {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": base_model_name_or_path,
        "r": first.r, "lora_alpha": first.alpha, "lora_dropout": getattr(model, "lora_config", {}).get("lora_dropout", 0.0),
        "target_modules": _saved_targets(model, layers), "bias": "none", "fan_in_fan_out": False,
        "inference_mode": True, "init_lora_weights": True, "use_rslora": False, "use_dora": False,
        "modules_to_save": None, "layers_to_transform": None, "layers_pattern": None,
        "rank_pattern": {}, "alpha_pattern": {},
    }
    (out / ADAPTER_CONFIG_NAME).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    write_safetensors(out / ADAPTER_WEIGHTS_NAME, tensors)
    return out


def load_lora(model: nn.Module, directory: str | os.PathLike) -> list[str]:
    """Apply a peft LoRA adapter directory as LoraLinear layers (kept apart from the base, which
    may be quantized); returns the adapted module names. `merge_and_unload` folds them in."""
    directory = Path(directory)
    config = json.loads((directory / ADAPTER_CONFIG_NAME).read_text(encoding="utf-8"))
    deltas = lora_deltas(directory)  # validates the config and the A/B pairs
    tensors = load_file(str(directory / ADAPTER_WEIGHTS_NAME))
    modules = dict(model.named_modules())
    missing = sorted(n for n in deltas if not _is_linear(modules.get(n, nn.Identity())))
    if missing:
        raise ValueError(f"the adapter targets modules that are not linears of this model: {missing[:8]}")
    r = int(config["r"])
    alpha = float(config.get("lora_alpha", r))
    if config.get("use_rslora"):  # rank-stabilised scale alpha / sqrt(r), written as the plain alpha / r
        alpha *= math.sqrt(r)
    apply_lora(model, r=r, alpha=alpha, target_modules="|".join(map(re.escape, deltas)))
    layers = lora_layers(model)
    with torch.no_grad():
        for name, layer in layers.items():
            for part in ("lora_A", "lora_B"):
                weight = tensors[f"{_PREFIX}{name}.{part}.weight"]
                target = getattr(layer, part).weight
                if weight.shape != target.shape:
                    raise ValueError(f"{name}.{part}: adapter shape {tuple(weight.shape)} != {tuple(target.shape)}")
                target.copy_(weight)
    return sorted(layers)


@torch.no_grad()
def merge_and_unload(model: nn.Module) -> nn.Module:
    """Fold every LoRA update into its base weight and put the base linear back; returns `model`.

    A quantized base cannot hold the update exactly: it becomes a float nn.Linear (dequantized +
    update, in the scales' dtype), and the model is no longer marked quantized if none remain."""
    for name, layer in lora_layers(model).items():
        base = layer.base_layer
        if isinstance(base, _QuantizedLinear):
            base = base.to_linear()
        weight = base.weight
        weight.copy_((weight.float() + layer.delta().to(weight.device)).to(weight.dtype))
        parent, _, attr = name.rpartition(".")
        setattr(model.get_submodule(parent), attr, base)
    if getattr(model, "quantization_config", None) is not None and not any(
            isinstance(m, _QuantizedLinear) for m in model.modules()):
        model.quantization_config = None
    model.__dict__.pop("lora_config", None)
    return model


def trainable_parameters(model: nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts."""
    params = list(model.parameters())
    return sum(p.numel() for p in params if p.requires_grad), sum(p.numel() for p in params)
