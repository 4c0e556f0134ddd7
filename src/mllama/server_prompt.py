"""Prompts for the server: chat messages or a raw prompt, with their images, to an engine Request.

Text that a user typed never becomes a control token: chats go through the processor's
`apply_chat_template(..., sanitize_control_tokens=True)` (mllama.control_tokens), so `<|eot_id|>`
typed in a message is the plain text `<|eot_id|>`, several ordinary tokens, and a typed `<|image|>`
asks for no image.

A raw prompt (`/v1/completions`, for base models) is tokenized as the processor does: special
tokens written in it, `<|image|>` first of all, are meant as such.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import torch
from PIL import Image

from mllama.processor import MllamaProcessor
from mllama.request import Request, SamplingParams

_IMAGE_INPUTS = ("pixel_values", "aspect_ratio_ids", "aspect_ratio_mask", "cross_attention_mask")


class PromptError(ValueError):
    """Input that cannot make a prompt; `param` names the request field at fault."""

    def __init__(self, message: str, *, param: str | None = None) -> None:
        super().__init__(message)
        self.param = param


@dataclass
class Prompt:
    """Token ids and, with images, the processor's image tensors for one sample."""

    input_ids: list[int]
    images: dict[str, torch.Tensor] | None = None

    def request(self, sampling: SamplingParams) -> Request:
        extra = {} if self.images is None else self.images
        return Request(input_ids=torch.tensor(self.input_ids), sampling=sampling, **extra)


class PromptBuilder:
    """Turns chat messages (plain dicts, OpenAI content parts already replaced by decoded images)
    or raw prompts into `Prompt`s for one processor."""

    def __init__(self, processor: MllamaProcessor) -> None:
        self.processor = processor

    # ---- chat --------------------------------------------------------------------------------------------------
    def chat(self, messages: Sequence[dict[str, Any]], images: Sequence[Image.Image]) -> Prompt:
        """messages: {"role", "content": str | [{"type": "text", "text"} | {"type": "image"}]}, with
        `images` in the order of their parts."""
        pending = list(images)
        try:
            with_images = [_attach(m, pending) for m in messages]
        except IndexError:
            raise PromptError(f"more image parts than the {len(images)} images given", param="messages") from None
        if pending:
            raise PromptError(f"{len(pending)} images without an image part", param="messages")
        try:
            out = self.processor.apply_chat_template(with_images, add_generation_prompt=True, tokenize=True,
                                                     return_dict=True, return_tensors="pt",
                                                     sanitize_control_tokens=True)
        except (ValueError, TypeError) as err:  # includes the template's own raise_exception
            raise PromptError(str(err), param="messages") from None
        tensors = {k: out[k][0] for k in _IMAGE_INPUTS} if images else None
        return Prompt(out["input_ids"][0].tolist(), tensors)

    # ---- raw prompts -------------------------------------------------------------------------------------------
    def raw(self, prompt: str, images: Sequence[Image.Image]) -> Prompt:
        """A prompt written with the model's own tokens (`<|image|>` once per image, in order)."""
        image_token = self.processor.image_token
        if prompt.count(image_token) != len(images):
            raise PromptError(f"the prompt holds {prompt.count(image_token)} {image_token} tokens but "
                              f"{len(images)} images were given: write one {image_token} per image", param="prompt")
        try:
            out = self.processor(text=prompt, images=[list(images)] if images else None, return_tensors="pt")
        except (TypeError, ValueError) as err:
            raise PromptError(str(err), param="prompt") from None
        tensors = {k: out[k][0] for k in _IMAGE_INPUTS} if images else None
        return Prompt(out["input_ids"][0].tolist(), tensors)


def _attach(message: dict[str, Any], pending: list[Image.Image]) -> dict[str, Any]:
    """The message with the next of `pending` in each image part, where the processor reads images."""
    content = message.get("content")
    if not isinstance(content, list):
        return message
    parts = [{**p, "image": pending.pop(0)} if p.get("type") == "image" else p for p in content]
    return {**message, "content": parts}
