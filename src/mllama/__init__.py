"""mllama: a standalone, faithful and fast implementation of Llama 3.2-Vision.

The public names are imported on first use (PEP 562), so `import mllama` does not import torch:
the `mllama` command starts in milliseconds and a Ctrl-C while torch loads reaches
`mllama.entry.run`, which exits quietly.
"""

from __future__ import annotations

from importlib import import_module
from typing import TYPE_CHECKING, Any

_SOURCES = {
    "mllama.config": ("MllamaConfig", "MllamaTextConfig", "MllamaVisionConfig", "GenerationConfig"),
    "mllama.engine": ("Engine",),
    "mllama.image_processing": ("MllamaImageProcessor", "MllamaImageProcessorPil"),
    "mllama.model": ("MllamaForCausalLM", "MllamaForConditionalGeneration", "MllamaModel"),
    "mllama.processor": ("AutoProcessor", "MllamaProcessor"),
    "mllama.request": ("Event", "Request", "RequestHandle", "SamplingParams"),
    "mllama.streamer": ("TextIteratorStreamer", "TextStreamer"),
    "mllama.text": ("MllamaTextModel",),
    "mllama.tokenizer": ("AutoTokenizer", "MllamaTokenizer"),
    "mllama.vision": ("MllamaVisionModel",),
}
# transformers' auto classes pick these for an mllama checkpoint: `AutoModelForImageTextToText.from_pretrained(...)`.
_ALIASES = {"AutoModelForImageTextToText": "MllamaForConditionalGeneration", "AutoModelForCausalLM": "MllamaForCausalLM",
            "AutoModel": "MllamaModel", "AutoConfig": "MllamaConfig"}
_MODULE_OF = {name: module for module, names in _SOURCES.items() for name in names}

__all__ = sorted([*_MODULE_OF, *_ALIASES])


def __getattr__(name: str) -> Any:
    target = _ALIASES.get(name, name)
    module = _MODULE_OF.get(target)
    if module is None:
        raise AttributeError(f"module 'mllama' has no attribute {name!r}")
    value = getattr(import_module(module), target)
    globals()[name] = value  # later lookups skip __getattr__
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})


if TYPE_CHECKING:  # what type checkers and IDEs see; at run time __getattr__ provides the same names
    from mllama.config import GenerationConfig, MllamaConfig, MllamaTextConfig, MllamaVisionConfig
    from mllama.engine import Engine
    from mllama.image_processing import MllamaImageProcessor, MllamaImageProcessorPil
    from mllama.model import MllamaForCausalLM, MllamaForConditionalGeneration, MllamaModel
    from mllama.processor import AutoProcessor, MllamaProcessor
    from mllama.request import Event, Request, RequestHandle, SamplingParams
    from mllama.streamer import TextIteratorStreamer, TextStreamer
    from mllama.text import MllamaTextModel
    from mllama.tokenizer import AutoTokenizer, MllamaTokenizer
    from mllama.vision import MllamaVisionModel

    AutoModelForImageTextToText = MllamaForConditionalGeneration
    AutoModelForCausalLM = MllamaForCausalLM
    AutoModel = MllamaModel
    AutoConfig = MllamaConfig
