"""Processor: prompts + images -> model inputs (ids, masks, tiles, dense cross-attention mask); chat template."""

from __future__ import annotations

import json
import os
import warnings
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

from mllama.chat_template import render_template
from mllama.control_tokens import control_tokens, encode_marked, mark_control_tokens
from mllama.hub import resolve_file
from mllama.image_processing import PREPROCESSOR_CONFIG_NAME, MllamaImageProcessor, MllamaImageProcessorPil, load_image
from mllama.tokenizer import (BatchEncoding, MllamaTokenizer, default_chat_template, read_json_object, to_tensors,
                              write_chat_template_json)
from mllama.tokenizer_extras import cut_after_final_message

_IMAGE_KEYS = ("image", "url", "path", "base64")  # where a chat content block may carry its image


def _is_image(x: Any) -> bool:
    if isinstance(x, (str, os.PathLike)):  # path, URL or data URL: the image processor loads it
        return True
    if type(x).__module__.startswith("PIL.") and hasattr(x, "convert"):
        return True
    return hasattr(x, "ndim") and hasattr(x, "shape") and x.ndim in (2, 3)


def _is_image_stack(x: Any) -> bool:
    return hasattr(x, "ndim") and x.ndim == 4


def nest_images(images: Any) -> list[list[Any]]:
    """One image -> [[image]]; a flat list -> one sample; a list of lists (or 4-D stacks) -> one list per sample."""
    if _is_image(images):
        return [[images]]
    if _is_image_stack(images):
        return [list(images)]
    if isinstance(images, (list, tuple)):
        if all(isinstance(s, (list, tuple)) or _is_image_stack(s) for s in images) and len(images) > 0:
            nested = [list(s) for s in images]
            for i, sample in enumerate(nested):
                for img in sample:
                    if not _is_image(img):
                        raise TypeError(f"images[{i}] holds a {type(img).__name__}, not an image "
                                        "(PIL image, HxWxC / CxHxW array or tensor, path, URL)")
            return nested
        if len(images) > 0 and all(_is_image(img) for img in images):
            return [list(images)]
    raise TypeError(f"images must be an image, a list of images or a list of per-sample lists of images; "
                    f"got {type(images).__name__}")


def cross_attention_spans(ids: Sequence[int], image_token_id: int) -> list[tuple[int, int]]:
    """[start, end) of the tokens that see each image: from its token to the next image's token, or to the end.

    A run of adjacent image tokens shares the span of the run's last image, so text after a group of images
    attends to the whole group; tokens before the first image see no image at all.
    """
    starts = [i for i, t in enumerate(ids) if t == image_token_id]
    ends = starts[1:] + [len(ids)]
    for k in range(len(starts) - 2, -1, -1):
        if starts[k + 1] == starts[k] + 1:
            ends[k] = ends[k + 1]
    return list(zip(starts, ends))


def dense_cross_attention_mask(input_ids: Sequence[Sequence[int]], num_tiles: Sequence[Sequence[int]], *,
                               image_token_id: int, max_num_tiles: int) -> np.ndarray:
    """(batch, seq, max_images, max_num_tiles) int64: 1 where a token may attend to a real tile of an image."""
    spans = [cross_attention_spans(ids, image_token_id) for ids in input_ids]
    length = max(len(ids) for ids in input_ids)
    mask = np.zeros((len(input_ids), length, max((len(s) for s in spans), default=0), max_num_tiles), np.int64)
    for b, (sample_spans, sample_tiles) in enumerate(zip(spans, num_tiles)):
        for j, ((start, end), tiles) in enumerate(zip(sample_spans, sample_tiles)):
            mask[b, start:end, j, :tiles] = 1
    return mask


def _plain(value: Any) -> Any:
    """What a chat template may see: JSON-like data only (images and other objects become '<TypeName>')."""
    if value is None or type(value) in (str, int, float, bool):
        return value
    for base in (bool, str, int, float):  # subclasses (enums, numpy scalars) lose their extra methods
        if isinstance(value, base):
            return base(value)
    if isinstance(value, np.generic):
        return _plain(value.item())
    if isinstance(value, Mapping):
        return {_plain(k): _plain(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_plain(v) for v in value]
    if isinstance(value, tuple):
        return tuple(_plain(v) for v in value)
    return f"<{type(value).__name__}>"


PROCESSOR_CONFIG_NAME = "processor_config.json"


class MllamaProcessor:
    """Pairs the image processor with the tokenizer, mirroring transformers' MllamaProcessor semantics."""

    def __init__(self, image_processor: Any, tokenizer: MllamaTokenizer, chat_template: str | None = None) -> None:
        if not isinstance(tokenizer, MllamaTokenizer):
            raise TypeError(f"tokenizer must be an MllamaTokenizer, got {type(tokenizer).__name__}")
        if tokenizer.image_token_id is None:
            raise ValueError(f"the tokenizer has no {tokenizer.image_token!r} token")
        if tokenizer.bos_token is None:
            raise ValueError("the tokenizer has no bos_token")
        self.image_processor = image_processor
        self.tokenizer = tokenizer
        self.chat_template = chat_template or tokenizer.chat_template or default_chat_template()
        self.image_token, self.image_token_id = tokenizer.image_token, tokenizer.image_token_id
        self.bos_token = tokenizer.bos_token
        self.python_token = "<|python_tag|>"
        self.python_token_id = tokenizer.convert_tokens_to_ids(self.python_token)

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike, *, revision: str | None = None, use_fast: bool = True,
                        padding_side: str | None = None) -> "MllamaProcessor":
        """`use_fast=False` picks the PIL/numpy image processor (transformers' flag); default is the torch one.
        padding_side ('left'/'right') sets the tokenizer's default, as transformers' keyword does."""
        image_cls = MllamaImageProcessor if use_fast else MllamaImageProcessorPil
        tokenizer = MllamaTokenizer.from_pretrained(path, revision=revision)
        template = None
        if resolve_file(path, PREPROCESSOR_CONFIG_NAME, revision=revision, required=False) is not None:
            image_processor = image_cls.from_pretrained(path, revision=revision)
        else:  # transformers 5.x saves the processor as one processor_config.json
            combined = resolve_file(path, PROCESSOR_CONFIG_NAME, revision=revision, required=False)
            if combined is None:
                raise FileNotFoundError(f"{path} has neither {PREPROCESSOR_CONFIG_NAME} nor {PROCESSOR_CONFIG_NAME}")
            data = read_json_object(combined)
            if not isinstance(data.get("image_processor"), dict):
                raise ValueError(f"{combined} has no \"image_processor\" object")
            image_processor = image_cls.from_dict(data["image_processor"])
            template = data.get("chat_template")
        # Same priority as transformers: legacy chat_template.json, then chat_template.jinja, then the tokenizer's.
        legacy = resolve_file(path, "chat_template.json", revision=revision, required=False)
        raw = resolve_file(path, "chat_template.jinja", revision=revision, required=False)
        if legacy is not None:
            template = read_json_object(legacy).get("chat_template")
            if not isinstance(template, str):
                raise ValueError(f"{legacy} must hold {{\"chat_template\": \"<jinja text>\"}}, got {template!r:.80}")
        elif raw is not None:
            template = raw.read_text(encoding="utf-8")
        if padding_side is not None:
            if padding_side not in ("left", "right"):
                raise ValueError(f"padding_side must be 'left' or 'right', got {padding_side!r}")
            tokenizer.padding_side = padding_side
        return cls(image_processor, tokenizer, chat_template=template)

    def save_pretrained(self, save_directory: str | os.PathLike) -> None:
        out = Path(save_directory)
        out.mkdir(parents=True, exist_ok=True)
        self.tokenizer.save_pretrained(out)
        saved = self.image_processor.save_pretrained(out)
        # transformers' AutoProcessor reads processor_class to build the full processor, not a bare tokenizer.
        data = read_json_object(saved)
        data["processor_class"] = "MllamaProcessor"
        saved.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n", encoding="utf-8")
        (out / "chat_template.jinja").write_text(self.chat_template, encoding="utf-8")
        if (out / "chat_template.json").exists():  # would shadow the .jinja file on load
            write_chat_template_json(out, self.chat_template)

    # ---- prompts + images -> inputs ----------------------------------------------------------------------------
    def _with_bos(self, prompt: str) -> str:
        """Exactly one BOS: keep a prompt that has one, else insert it after any leading image tokens."""
        if self.bos_token in prompt:
            head = prompt
            while head.startswith(self.image_token):
                head = head[len(self.image_token):]
            if not head.startswith(self.bos_token):  # transformers keeps such a prompt as it is, too
                warnings.warn(f"the prompt contains {self.bos_token} but does not start with it, so no BOS is "
                              f"added in front (as in transformers): {prompt[:60]!r}", stacklevel=3)
            return prompt
        body, lead = prompt, 0
        while body.startswith(self.image_token):
            body, lead = body[len(self.image_token):], lead + 1
        return self.image_token * lead + self.bos_token + body

    def _ids_with_bos(self, texts: Sequence[str], mode: str) -> list[list[int]]:
        """Ids of texts whose special tokens are not (all) tokens, with exactly one BOS, placed as `_with_bos`
        places it; a BOS counts only where it is the token."""
        rows = []
        for text in texts:
            ids = (encode_marked(self.tokenizer, text) if mode == "marked" else
                   self.tokenizer.encode(text, add_special_tokens=False, split_special_tokens=True))
            if self.tokenizer.bos_token_id not in ids:
                lead = next((i for i, t in enumerate(ids) if t != self.image_token_id), len(ids))
                ids.insert(lead, self.tokenizer.bos_token_id)
            rows.append(ids)
        return rows

    def _pad(self, ids: list[list[int]], *, padding: bool | str, padding_side: str | None, truncation: bool | str,
             max_length: int | None) -> dict[str, Any]:
        """Truncation and padding of ready ids, as the tokenizer applies them to text."""
        if truncation not in (True, False, "longest_first", "only_first", "do_not_truncate"):
            raise ValueError(f"unsupported truncation {truncation!r}")
        if truncation not in (False, "do_not_truncate"):
            limit = max_length if max_length is not None else self.tokenizer.model_max_length
            if limit is None:
                raise ValueError("truncation needs max_length")
            left = self.tokenizer.truncation_side == "left"
            ids = [row[len(row) - limit:] if left and len(row) > limit else row[:limit] for row in ids]
        if padding in (False, "do_not_pad"):
            return {"input_ids": ids, "attention_mask": [[1] * len(row) for row in ids]}
        return dict(self.tokenizer.pad({"input_ids": ids}, padding=padding, max_length=max_length,
                                       padding_side=padding_side))

    def __call__(self, images: Any = None, text: str | Sequence[str] | None = None, *,
                 padding: bool | str = False, padding_side: str | None = None, truncation: bool | str = False,
                 max_length: int | None = None, return_tensors: str | None = None,
                 add_special_tokens: bool = True, return_attention_mask: bool = True,
                 split_special_tokens: bool = False, images_kwargs: Mapping[str, Any] | None = None) -> BatchEncoding:
        """input_ids, attention_mask and, with images, pixel_values, aspect_ratio_ids, aspect_ratio_mask and
        cross_attention_mask (batch, seq, images, tiles). `images` is one image, a flat list (one sample) or one
        list per prompt (empty for a text-only prompt); each prompt needs one <|image|> per image.
        split_special_tokens (the tokenizer's option): special-token text in `text`, `<|image|>` included, is
        encoded as ordinary text, for prompts that are untrusted text as a whole (the BOS is still the token);
        for chats see apply_chat_template(sanitize_control_tokens=True)."""
        return self._process(images, text, mode="plain" if split_special_tokens else "parse", padding=padding,
                             padding_side=padding_side, truncation=truncation, max_length=max_length,
                             return_tensors=return_tensors, add_special_tokens=add_special_tokens,
                             return_attention_mask=return_attention_mask, images_kwargs=images_kwargs)

    def _process(self, images: Any, text: str | Sequence[str] | None, *, mode: str, padding: bool | str,
                 padding_side: str | None, truncation: bool | str, max_length: int | None,
                 return_tensors: str | None, add_special_tokens: bool, return_attention_mask: bool,
                 images_kwargs: Mapping[str, Any] | None) -> BatchEncoding:
        """mode: "parse" (special tokens written in the text are tokens), "plain" (none are) or "marked" (text
        rendered from inputs marked by mllama.control_tokens)."""
        if images is None and text is None:
            raise ValueError("MllamaProcessor needs text, images or both")
        if return_tensors not in (None, "pt", "np"):
            raise ValueError(f"return_tensors must be None, 'pt' or 'np', got {return_tensors!r}")
        if text is not None:
            if isinstance(text, str):
                text = [text]
            if not isinstance(text, (list, tuple)) or not text or not all(isinstance(t, str) for t in text):
                raise TypeError(f"text must be a str or a non-empty list of str, got {type(text).__name__}")
        nested = nest_images(images) if images is not None else None
        if nested is not None and text is not None and not any(nested):
            nested = None  # images=[[]] (or [[], []]): text-only prompts, as documented

        data: dict[str, Any] = {}
        if text is not None:
            ids = None if mode == "parse" else self._ids_with_bos(text, mode)
            # Only image tokens that are tokens count: typed `<|image|>` text is none in the other modes.
            in_text = ([t.count(self.image_token) for t in text] if ids is None else
                       [row.count(self.image_token_id) for row in ids])
            if nested is None and any(in_text):
                raise ValueError(f"the prompts hold {in_text} {self.image_token} tokens but no images were passed")
            if nested is not None and in_text != [len(s) for s in nested]:
                raise ValueError(f"each prompt needs one {self.image_token} token per image: found {in_text} "
                                 f"{self.image_token} tokens per prompt and {[len(s) for s in nested]} images "
                                 "per sample" + (" (split_special_tokens=True encodes the text's <|image|> as "
                                                 "text)" if mode == "plain" else ""))
            if ids is None:
                # The BOS is already in the text; a tokenizer.json that prepends one itself would double it.
                special = add_special_tokens and not self.tokenizer.adds_bos_token
                data.update(self.tokenizer([self._with_bos(t) for t in text], add_special_tokens=special,
                                           padding=padding, padding_side=padding_side, truncation=truncation,
                                           max_length=max_length))
            else:
                data.update(self._pad(ids, padding=padding, padding_side=padding_side, truncation=truncation,
                                      max_length=max_length))
            kept = [row.count(self.image_token_id) for row in data["input_ids"]]
            if kept != in_text:
                raise ValueError(f"{self.image_token} token counts changed from {in_text} to {kept} during "
                                 "tokenization (truncation?): raise max_length or disable truncation")
        if nested is not None:
            # images_kwargs: the image processor's own options for this call (max_image_tiles, size, ...).
            features = dict(self.image_processor(nested, return_tensors=return_tensors, **dict(images_kwargs or {})))
            if return_tensors is None:  # transformers gives numpy image arrays here, lists only for text
                features = {k: v.numpy() if hasattr(v, "numpy") and not isinstance(v, np.ndarray) else v
                            for k, v in features.items()}
            num_tiles = features.pop("num_tiles")
            num_tiles = num_tiles.tolist() if hasattr(num_tiles, "tolist") else num_tiles
            if text is not None:
                data["cross_attention_mask"] = dense_cross_attention_mask(
                    data["input_ids"], num_tiles, image_token_id=self.image_token_id,
                    max_num_tiles=(images_kwargs or {}).get("max_image_tiles") or self.image_processor.max_image_tiles)
            data.update(features)
        if not return_attention_mask:
            data.pop("attention_mask", None)
        return to_tensors(data, return_tensors)

    # ---- chat template -----------------------------------------------------------------------------------------
    def apply_chat_template(self, conversation: Sequence[Mapping[str, Any]] | Sequence[Sequence[Mapping[str, Any]]],
                            *, add_generation_prompt: bool = False, tokenize: bool = False,
                            return_dict: bool = False, return_tensors: str | None = None,
                            padding: bool | str = False, chat_template: str | None = None,
                            tools: list[dict[str, Any]] | None = None, date_string: str | None = None,
                            template_kwargs: Mapping[str, Any] | None = None, continue_final_message: bool = False,
                            padding_side: str | None = None, return_attention_mask: bool = True,
                            sanitize_control_tokens: bool = False) -> Any:
        """Render one conversation (-> str) or a batch (-> list[str]); with tokenize=True, run the processor
        on the rendered prompts and the conversation's images (ids, or the full inputs when return_dict).
        continue_final_message: end the prompt right after the last message's text (no end of turn), so
        the model continues it, e.g. a prefilled assistant answer.
        sanitize_control_tokens (transformers' option; needs tokenize=True): control tokens written in the
        messages, tools and template variables are encoded as ordinary text, so only the template's own are
        tokens; a typed `<|image|>` is text and needs no image (mllama.control_tokens)."""
        if continue_final_message and add_generation_prompt:
            raise ValueError("continue_final_message and add_generation_prompt cannot both be set: the first "
                             "continues the last message, the second starts a new one")
        if sanitize_control_tokens and not tokenize:
            raise ValueError("sanitize_control_tokens=True needs tokenize=True: the markers it puts in the prompt "
                             "only mean something to its encoding")
        conversations, batched = self._normalize(conversation)
        source = chat_template or self.chat_template
        extra = dict(template_kwargs or {})
        if date_string is not None:
            extra["date_string"] = date_string
        rendered, rendered_tools = conversations, tools
        if sanitize_control_tokens:  # the tokenizer's own variables (bos_token, ...) stay tokens
            tokens = control_tokens(self.tokenizer, source)
            rendered = [mark_control_tokens(conv, tokens) for conv in conversations]
            rendered_tools, extra = mark_control_tokens(tools, tokens), mark_control_tokens(extra, tokens)
        variables = _plain({**self.tokenizer.special_tokens_map, **extra})
        # Sandboxed, under a time and size budget; every failure is a ValueError (mllama.chat_template).
        prompts = [render_template(source, messages=_plain(conv), tools=_plain(rendered_tools), documents=None,
                                   add_generation_prompt=add_generation_prompt, **variables)
                   for conv in rendered]
        if continue_final_message:
            prompts = [cut_after_final_message(prompt, conv) for prompt, conv in zip(prompts, rendered)]
        if not tokenize:
            return prompts if batched else prompts[0]
        images = [[load_image(blk[k]) for m in conv if isinstance(m.get("content"), list) for blk in m["content"]
                   if isinstance(blk, Mapping) and blk.get("type") == "image" for k in _IMAGE_KEYS if k in blk]
                  for conv in conversations]
        # A template that writes the BOS itself must not get another one from the tokenizer.
        add_special = not prompts[0].startswith(self.bos_token)
        out = self._process(images if any(images) else None, prompts,
                            mode="marked" if sanitize_control_tokens else "parse", padding=padding,
                            padding_side=padding_side, truncation=False, max_length=None,
                            return_tensors=return_tensors, add_special_tokens=add_special,
                            return_attention_mask=return_attention_mask, images_kwargs=None)
        return out if return_dict else out["input_ids"]

    @staticmethod
    def _normalize(conversation: Any) -> tuple[list[list[dict[str, Any]]], bool]:
        if not isinstance(conversation, (list, tuple)) or not conversation:
            raise TypeError("conversation must be a non-empty list of messages or a list of conversations")
        batched = isinstance(conversation[0], (list, tuple))
        conversations = list(conversation) if batched else [conversation]
        out = []
        for conv in conversations:
            messages = []
            for msg in conv:
                if not isinstance(msg, Mapping) or "role" not in msg:
                    raise TypeError(f"each message must be a dict with a 'role', got {msg!r:.80}")
                msg = {k: v for k, v in msg.items() if v is not None}
                if isinstance(msg.get("content"), list):  # OpenAI image_url blocks -> {"type": "image", "url"}
                    msg["content"] = [
                        {"type": "image", "url": b["image_url"].get("url", "") if isinstance(b["image_url"], Mapping)
                         else b["image_url"]} if isinstance(b, Mapping) and b.get("type") == "image_url"
                        and "image_url" in b else b for b in msg["content"]]
                messages.append(msg)
            out.append(messages)
        return out, batched

    # ---- decoding ----------------------------------------------------------------------------------------------
    def decode(self, ids: Any, *, skip_special_tokens: bool = False,
               clean_up_tokenization_spaces: bool | None = None) -> str:
        """clean_up_tokenization_spaces is accepted for transformers' examples and ignored (see the tokenizer)."""
        return self.tokenizer.decode(ids, skip_special_tokens=skip_special_tokens)

    def batch_decode(self, sequences: Any, *, skip_special_tokens: bool = False,
                     clean_up_tokenization_spaces: bool | None = None) -> list[str]:
        return self.tokenizer.batch_decode(sequences, skip_special_tokens=skip_special_tokens)

    def post_process_image_text_to_text(self, generated: Any, *, skip_special_tokens: bool = True) -> list[str]:
        return self.batch_decode(generated, skip_special_tokens=skip_special_tokens)

    @property
    def model_input_names(self) -> list[str]:
        return ["input_ids", "attention_mask", "pixel_values", "aspect_ratio_ids", "aspect_ratio_mask",
                "cross_attention_mask"]


AutoProcessor = MllamaProcessor
