"""mllama: a standalone, faithful and fast implementation of Llama 3.2-Vision."""

from mllama.config import MllamaConfig, MllamaTextConfig, MllamaVisionConfig

__all__ = ["MllamaConfig", "MllamaTextConfig", "MllamaVisionConfig"]
