"""The forward an engine runs at each decode step, eager or through torch.compile.

The engine owns caches, slots and sampling; this is the one model call of a decode step: new tokens
(B, 1) at their positions through the text decoder and the output layer, writing K/V through the
step's KVWindow.
"""

from __future__ import annotations

import torch
from torch import nn

from mllama.cache import KVWindow
from mllama.text import CrossInputs, MllamaTextModel


def forward_step(text_model: MllamaTextModel, lm_head: nn.Module, tokens: torch.Tensor, positions: torch.Tensor,
             mask: torch.Tensor | None, cross: CrossInputs | None, window: KVWindow) -> torch.Tensor:
    """One decode forward: tokens, positions (B, 1) -> logits (B, V)."""
    hidden = text_model(tokens, position_ids=positions, mask=mask, cross=cross, cache=window)
    return lm_head(hidden[:, -1])


def _forward_cpp_wrapper(*args):
    return forward_step(*args)


def _forward_python_wrapper(*args):
    return forward_step(*args)


_compiled: dict[bool, object] = {}


def compiled_step(uses_kernel: bool):
    """forward_step through torch.compile (inductor), built on first use and shared by all engines.

    Inductor's C++ wrapper calls the graph's kernels from generated C++ instead of Python (a tiny
    float32 model's step went from about 400 to 300 us), but calls a Python custom op (the bf16
    decode kernel) so slowly that bf16 decoding of the bench model fell from 12.7 to 8.8 tokens/s;
    so models that decode through the kernel get the Python wrapper. Two functions, because
    torch.compile caches per function.
    """
    if uses_kernel not in _compiled:
        # One graph per (model, slot bucket, dtype): a process serving one model with 64 slots needs 7,
        # but one that builds several models or engines (a benchmark, a notebook) passes dynamo's
        # default of 8 and fullgraph=True turns that into a hard failure.
        torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 64)
        fn = _forward_python_wrapper if uses_kernel else _forward_cpp_wrapper
        _compiled[uses_kernel] = torch.compile(fn, dynamic=False, fullgraph=True,
                                               options={"cpp_wrapper": not uses_kernel})
    return _compiled[uses_kernel]
