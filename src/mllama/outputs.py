"""Model output objects that behave like transformers' ModelOutput.

An output is a dict of its non-None fields, in field order, that also exposes every field as an
attribute: `out.logits`, `out["logits"]`, `out[0]` (the first non-None field, so `loss` when labels
were given, else `logits`), `out.to_tuple()`, `dict(out)`. transformers' Trainer reads
`outputs["loss"]` from such a dict, so it trains mllama models unchanged.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any, ClassVar

import torch


class ModelOutput(dict):
    """Base of the output classes: subclasses list their `_fields` in transformers' order."""

    _fields: ClassVar[tuple[str, ...]] = ()

    def __init__(self, *args: Any, **values: Any) -> None:
        super().__init__()
        if len(args) > len(self._fields):
            raise TypeError(f"{type(self).__name__} takes at most {len(self._fields)} positional values")
        for name, value in zip(self._fields, args):
            if name in values:
                raise TypeError(f"{type(self).__name__} got {name!r} twice")
            values[name] = value
        unknown = sorted(set(values) - set(self._fields))
        if unknown:
            raise TypeError(f"{type(self).__name__} has no field(s) {unknown}; fields: {list(self._fields)}")
        for name in self._fields:
            object.__setattr__(self, name, values.get(name))
        self._sync()

    def _sync(self) -> None:
        dict.clear(self)
        for name in self._fields:
            value = object.__getattribute__(self, name)
            if value is not None:
                dict.__setitem__(self, name, value)

    def __getitem__(self, key: str | int | slice) -> Any:
        if isinstance(key, str):
            return dict.__getitem__(self, key)
        return self.to_tuple()[key]

    def __setattr__(self, name: str, value: Any) -> None:
        if name not in self._fields:
            raise AttributeError(f"{type(self).__name__} has no field {name!r}; fields: {list(self._fields)}")
        object.__setattr__(self, name, value)
        self._sync()

    def __setitem__(self, key: str, value: Any) -> None:
        self.__setattr__(key, value)

    def __delitem__(self, key: str) -> None:
        raise TypeError(f"fields of {type(self).__name__} cannot be deleted; set them to None")

    def __iter__(self) -> Iterator[str]:
        return iter(list(dict.keys(self)))

    def __reduce__(self) -> Any:
        return (type(self), (), self.__getstate__())

    def __getstate__(self) -> dict[str, Any]:
        return {name: object.__getattribute__(self, name) for name in self._fields}

    def __setstate__(self, state: dict[str, Any]) -> None:
        for name in self._fields:
            object.__setattr__(self, name, state.get(name))
        self._sync()

    def __repr__(self) -> str:
        inner = ", ".join(f"{k}={_short(v)}" for k, v in dict.items(self))
        return f"{type(self).__name__}({inner})"

    def to_tuple(self) -> tuple[Any, ...]:
        """The non-None fields in order, as transformers' `return_dict=False` returns them."""
        return tuple(dict.values(self))


def _short(value: Any) -> str:
    if isinstance(value, torch.Tensor):
        return f"Tensor{tuple(value.shape)}"
    if isinstance(value, tuple):
        return f"tuple[{len(value)}]"
    return repr(value)


class CausalLMOutputWithPast(ModelOutput):
    """What the LM heads return. `past_key_values` is always None: the forward pass runs the full
    sequence without a cache (generate and Engine keep their own caches); `attentions` is never
    filled (attention runs in fused kernels that do not materialise the weights)."""

    _fields = ("loss", "logits", "past_key_values", "hidden_states", "attentions")
    loss: torch.Tensor | None
    logits: torch.Tensor
    past_key_values: Any
    hidden_states: tuple[torch.Tensor, ...] | None
    attentions: tuple[torch.Tensor, ...] | None


class BaseModelOutputWithPast(ModelOutput):
    """What MllamaModel returns: the decoder's final (normed) hidden states."""

    _fields = ("last_hidden_state", "past_key_values", "hidden_states", "attentions")
    last_hidden_state: torch.Tensor
    past_key_values: Any
    hidden_states: tuple[torch.Tensor, ...] | None
    attentions: tuple[torch.Tensor, ...] | None


class BaseModelOutput(ModelOutput):
    """What MllamaVisionModel returns, as transformers does: `last_hidden_state` (B, images, tiles,
    patches, vision_output_dim), also `out[0]`; transformers leaves the other two fields empty too."""

    _fields = ("last_hidden_state", "hidden_states", "attentions")
    last_hidden_state: torch.Tensor
    hidden_states: tuple[torch.Tensor, ...] | None
    attentions: tuple[torch.Tensor, ...] | None


# The name earlier releases used.
CausalLMOutput = CausalLMOutputWithPast
