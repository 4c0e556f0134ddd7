"""mllama: a standalone, faithful and fast implementation of Llama 3.2-Vision."""

from mllama.config import MllamaConfig, MllamaTextConfig, MllamaVisionConfig
from mllama.generate import GenerationConfig
from mllama.image_processing import MllamaImageProcessor, MllamaImageProcessorPil
from mllama.model import MllamaForCausalLM, MllamaForConditionalGeneration, MllamaModel
from mllama.processor import AutoProcessor, MllamaProcessor
from mllama.streamer import TextIteratorStreamer, TextStreamer
from mllama.text import MllamaTextModel
from mllama.tokenizer import AutoTokenizer, MllamaTokenizer
from mllama.vision import MllamaVisionModel

__all__ = [
    "AutoProcessor",
    "AutoTokenizer",
    "GenerationConfig",
    "MllamaConfig",
    "MllamaForCausalLM",
    "MllamaForConditionalGeneration",
    "MllamaImageProcessor",
    "MllamaImageProcessorPil",
    "MllamaModel",
    "MllamaProcessor",
    "MllamaTextConfig",
    "MllamaTextModel",
    "MllamaTokenizer",
    "MllamaVisionConfig",
    "MllamaVisionModel",
    "TextIteratorStreamer",
    "TextStreamer",
]
