"""mllama: a standalone, faithful and fast implementation of Llama 3.2-Vision."""

from mllama.config import MllamaConfig, MllamaTextConfig, MllamaVisionConfig
from mllama.config import GenerationConfig
from mllama.engine import Engine
from mllama.image_processing import MllamaImageProcessor, MllamaImageProcessorPil
from mllama.model import MllamaForCausalLM, MllamaForConditionalGeneration, MllamaModel
from mllama.processor import AutoProcessor, MllamaProcessor
from mllama.request import Event, Request, RequestHandle, SamplingParams
from mllama.streamer import TextIteratorStreamer, TextStreamer
from mllama.text import MllamaTextModel
from mllama.tokenizer import AutoTokenizer, MllamaTokenizer
from mllama.vision import MllamaVisionModel

# transformers' auto classes pick these for an mllama checkpoint: `AutoModelForImageTextToText.from_pretrained(...)`.
AutoModelForImageTextToText = MllamaForConditionalGeneration
AutoModelForCausalLM = MllamaForCausalLM
AutoModel = MllamaModel
AutoConfig = MllamaConfig

__all__ = [
    "AutoConfig",
    "AutoModel",
    "AutoModelForCausalLM",
    "AutoModelForImageTextToText",
    "AutoProcessor",
    "AutoTokenizer",
    "Engine",
    "Event",
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
    "Request",
    "RequestHandle",
    "SamplingParams",
    "TextIteratorStreamer",
    "TextStreamer",
]
