"""mllama: a standalone, faithful and fast implementation of Llama 3.2-Vision."""

from mllama.config import MllamaConfig, MllamaTextConfig, MllamaVisionConfig
from mllama.generate import GenerationConfig
from mllama.model import MllamaForCausalLM, MllamaForConditionalGeneration, MllamaModel
from mllama.streamer import TextIteratorStreamer, TextStreamer
from mllama.text import MllamaTextModel
from mllama.vision import MllamaVisionModel

__all__ = [
    "GenerationConfig",
    "MllamaConfig",
    "MllamaForCausalLM",
    "MllamaForConditionalGeneration",
    "MllamaModel",
    "MllamaTextConfig",
    "MllamaTextModel",
    "MllamaVisionConfig",
    "MllamaVisionModel",
    "TextIteratorStreamer",
    "TextStreamer",
]
