"""Prompts for the server: chat messages or a raw prompt, with their images, to an engine Request.

Text that a user typed never becomes a control token. The chat template is rendered with every
message text wrapped in two marker characters; the markers give the spans of user text in the
rendered prompt. Special tokens are then recognised only outside those spans, and every stretch
between two recognised special tokens is encoded with special-token parsing off. A tokenizer
splits its input at special tokens before its normal encoding, so a prompt without special tokens
in its texts gets exactly the ids the processor gives it; `<|eot_id|>` typed in a message becomes
the plain text `<|eot_id|>`, several ordinary tokens.

A raw prompt (`/v1/completions`, for base models) is tokenized as the processor does: special
tokens written in it, `<|image|>` first of all, are meant as such.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Sequence

import torch
from PIL import Image
from tokenizers import Tokenizer

from mllama.processor import MllamaProcessor, dense_cross_attention_mask
from mllama.request import Request, SamplingParams

OPEN, CLOSE = "\ufdd0", "\ufdd1"  # Unicode noncharacters: never part of interchanged text
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
        tokenizer = processor.tokenizer
        backend = tokenizer.backend_tokenizer
        self._plain = Tokenizer.from_str(backend.to_str())
        self._plain.encode_special_tokens = True  # a private copy: the flag is per tokenizer object
        specials = sorted({t.content for t in backend.get_added_tokens_decoder().values() if t.special},
                          key=len, reverse=True)
        self._special_ids = {token: backend.token_to_id(token) for token in specials}
        self._special_re = re.compile("|".join(re.escape(t) for t in specials)) if specials else None

    # ---- chat --------------------------------------------------------------------------------------------------
    def chat(self, messages: Sequence[dict[str, Any]], images: Sequence[Image.Image]) -> Prompt:
        """messages: {"role", "content": str | [{"type": "text", "text"} | {"type": "image"}]}, with
        `images` in the order of their parts."""
        for index, message in enumerate(messages):
            for text in _texts(message):
                if OPEN in text or CLOSE in text:
                    raise PromptError("message text must not contain the Unicode noncharacters U+FDD0/U+FDD1",
                                      param=f"messages[{index}].content")
        plain = self._render(messages)
        marked = self._render([_wrap(m) for m in messages])
        if _unmark(marked) != plain:
            raise PromptError("the chat template changes message texts in a way the server cannot follow",
                              param="messages")
        ids = self._encode_marked(marked)
        return self._with_images(ids, list(images))

    def _render(self, messages: Sequence[dict[str, Any]]) -> str:
        try:
            return self.processor.apply_chat_template(list(messages), add_generation_prompt=True)
        except (ValueError, TypeError) as err:  # includes the template's own raise_exception
            raise PromptError(str(err), param="messages") from None

    def _encode_marked(self, marked: str) -> list[int]:
        ids: list[int] = []
        text_start = 0  # start of the pending ordinary text, in `marked`
        pos = 0
        while pos < len(marked):
            if marked[pos] == OPEN:  # skip to the end of the user span: no special tokens there
                end = marked.index(CLOSE, pos)
                pos = end + 1
                continue
            match = self._special_re.match(marked, pos) if self._special_re is not None else None
            if match is None:
                pos += 1
                continue
            ids += self._encode_plain(_unmark(marked[text_start:pos]))
            ids.append(self._special_ids[match.group()])
            pos = text_start = match.end()
        ids += self._encode_plain(_unmark(marked[text_start:]))
        if ids[:1] != [self.processor.tokenizer.bos_token_id]:  # a template without BOS: add it as the processor does
            ids.insert(0, self.processor.tokenizer.bos_token_id)
        return ids

    def _encode_plain(self, text: str) -> list[int]:
        return self._plain.encode(text, add_special_tokens=False).ids if text else []

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

    # ---- images ------------------------------------------------------------------------------------------------
    def _with_images(self, ids: list[int], images: list[Image.Image]) -> Prompt:
        processor = self.processor
        if ids.count(processor.image_token_id) != len(images):
            raise PromptError(f"{len(images)} images but {ids.count(processor.image_token_id)} image tokens in "
                              "the prompt", param="messages")
        if not images:
            return Prompt(ids)
        try:
            features = dict(processor.image_processor([images], return_tensors="pt"))
        except (TypeError, ValueError) as err:
            raise PromptError(f"cannot preprocess an image: {err}", param="messages") from None
        num_tiles = features.pop("num_tiles")
        num_tiles = num_tiles.tolist() if hasattr(num_tiles, "tolist") else num_tiles
        mask = dense_cross_attention_mask([ids], num_tiles, image_token_id=processor.image_token_id,
                                          max_num_tiles=processor.image_processor.max_image_tiles)
        return Prompt(ids, {"pixel_values": features["pixel_values"][0],
                            "aspect_ratio_ids": features["aspect_ratio_ids"][0],
                            "aspect_ratio_mask": features["aspect_ratio_mask"][0],
                            "cross_attention_mask": torch.from_numpy(mask[0])})


def _texts(message: dict[str, Any]) -> list[str]:
    content = message.get("content")
    if isinstance(content, str):
        return [content]
    return [part["text"] for part in content or [] if part.get("type") == "text"]


def _wrap(message: dict[str, Any]) -> dict[str, Any]:
    def mark(text: str) -> str:  # markers inside the outer whitespace, which a template may trim
        core = text.strip()
        if not core:
            return text
        start = text.index(core)
        return text[:start] + OPEN + core + CLOSE + text[start + len(core):]

    content = message.get("content")
    if isinstance(content, str):
        return {**message, "content": mark(content)}
    parts = [{**p, "text": mark(p["text"])} if p.get("type") == "text" else p for p in content or []]
    return {**message, "content": parts}


def _unmark(text: str) -> str:
    return text.replace(OPEN, "").replace(CLOSE, "")
