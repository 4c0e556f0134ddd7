"""Fine-tuning data: JSONL conversations with image paths, and their collator.

One conversation per line:

    {"messages": [{"role": "user", "content": [{"type": "image", "path": "a.png"},
                                              {"type": "text", "text": "How many sides?"}]},
                  {"role": "assistant", "content": "It has 4 sides."}]}

Image paths are relative to the JSONL file (or absolute). Content may be a string or a list of
items; a system turn and several user/assistant exchanges are allowed. Every assistant turn is
trained on (its text and its `<|eot_id|>`); everything else is masked with -100, as
mllama.train.VQACollator masks the prompt.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import torch
from PIL import Image

from mllama.model import IGNORE_INDEX
from mllama.train import Batch, Processor

_ROLES = ("system", "user", "assistant")
_CACHE_LIMIT = 1 << 16


class DataError(ValueError):
    """A problem in the dataset file, naming the file and line."""


@dataclass(frozen=True)
class Conversation:
    """One line of the dataset: messages in chat-template form (image items without paths) and the
    image files, in the order their `<|image|>` tokens appear."""

    messages: tuple[dict[str, Any], ...]
    images: tuple[Path, ...]
    line: int


def _content_items(content: Any, where: str, base: Path) -> tuple[list[dict[str, Any]], list[Path]]:
    if isinstance(content, str):
        return [{"type": "text", "text": content}], []
    if not isinstance(content, list):
        raise DataError(f"{where}: content must be a string or a list of items, got {type(content).__name__}")
    items, images = [], []
    for item in content:
        kind = item.get("type") if isinstance(item, dict) else None
        if kind == "text":
            if not isinstance(item.get("text"), str):
                raise DataError(f"{where}: a text item needs a string 'text'")
            items.append({"type": "text", "text": item["text"]})
        elif kind == "image":
            path = item.get("path", item.get("image"))
            if not isinstance(path, str) or not path:
                raise DataError(f"{where}: an image item needs a 'path' (relative to the JSONL file)")
            file = (base / path).expanduser()
            if not file.is_file():
                raise DataError(f"{where}: image not found: {file}")
            try:
                with Image.open(file):  # reads the header only: catches non-images early
                    pass
            except (OSError, ValueError) as err:
                raise DataError(f"{where}: cannot read the image {file}: {err}") from None
            items.append({"type": "image"})
            images.append(file)
        else:
            raise DataError(f"{where}: content items must have type 'text' or 'image', got {item!r:.80}")
    return items, images


def parse_line(text: str, *, line: int, source: str, base: Path) -> Conversation:
    """One JSONL line -> Conversation; DataError (naming `source`:`line`) if it is not one."""
    where = f"{source}:{line}"
    try:
        data = json.loads(text)
    except json.JSONDecodeError as err:
        raise DataError(f"{where}: not valid JSON ({err.msg} at column {err.colno})") from None
    messages = data.get("messages") if isinstance(data, dict) else None
    if not isinstance(messages, list) or not messages:
        raise DataError(f"{where}: expected an object with a non-empty 'messages' list")
    out, images = [], []
    for i, message in enumerate(messages):
        role = message.get("role") if isinstance(message, dict) else None
        if role not in _ROLES:
            raise DataError(f"{where}: message {i} needs a role among {list(_ROLES)}, got {role!r}")
        items, found = _content_items(message.get("content"), f"{where}: message {i}", base)
        if role == "assistant":
            if found:
                raise DataError(f"{where}: message {i}: assistant turns cannot hold images")
            if not "".join(item["text"] for item in items).strip():
                raise DataError(f"{where}: message {i}: the assistant turn is empty")
        out.append({"role": role, "content": items})
        images += found
    if not any(m["role"] == "assistant" for m in out):
        raise DataError(f"{where}: no assistant turn: nothing to train on")
    return Conversation(messages=tuple(out), images=tuple(images), line=line)


def read_jsonl(path: str | os.PathLike) -> list[Conversation]:
    """Every conversation of a JSONL file (blank lines skipped). Raises DataError naming the line."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"dataset not found: {path}")
    conversations = []
    with path.open(encoding="utf-8") as handle:
        for number, text in enumerate(handle, start=1):
            if text.strip():
                conversations.append(parse_line(text, line=number, source=str(path), base=path.parent))
    if not conversations:
        raise DataError(f"{path}: no conversations (the file is empty)")
    return conversations


class ConversationCollator:
    """Conversations -> one right-padded batch with labels on the assistant turns only."""

    def __init__(self, processor: Processor) -> None:
        self.processor = processor
        self.tokenizer = processor.tokenizer
        # Many lines share their wording (only the image differs): cache the rendered text and spans.
        self._cache: dict[str, tuple[str, list[int], list[tuple[int, int]]]] = {}

    def _render(self, messages: Sequence[dict[str, Any]], *, add_generation_prompt: bool) -> list[int]:
        text = self.processor.apply_chat_template(list(messages), add_generation_prompt=add_generation_prompt,
                                                  tokenize=False)
        return self.tokenizer.encode(text, add_special_tokens=False)

    def _spans(self, conversation: Conversation) -> tuple[str, list[int], list[tuple[int, int]]]:
        """(full text, its ids, [start, end) token spans of the assistant turns) of a conversation."""
        key = json.dumps(conversation.messages, sort_keys=True)
        if key not in self._cache:
            if len(self._cache) > _CACHE_LIMIT:
                self._cache.clear()
            messages = list(conversation.messages)
            text = self.processor.apply_chat_template(messages, add_generation_prompt=False, tokenize=False)
            ids = self.tokenizer.encode(text, add_special_tokens=False)
            spans = []
            for i, message in enumerate(messages):
                if message["role"] != "assistant":
                    continue
                start = len(self._render(messages[:i], add_generation_prompt=True))
                upto = self._render(messages[:i + 1], add_generation_prompt=False)
                if ids[:len(upto)] != upto or start >= len(upto):
                    raise DataError(f"line {conversation.line}: the chat template does not render assistant turn "
                                    f"{i} as a prefix of the conversation; cannot mask the prompt")
                spans.append((start, len(upto)))
            self._cache[key] = (text, ids, spans)
        return self._cache[key]

    def __call__(self, conversations: Sequence[Conversation]) -> Batch:
        from mllama.image_loading import load_image

        if not conversations:
            raise ValueError("cannot collate an empty batch")
        rendered = [self._spans(c) for c in conversations]
        images = [[load_image(str(p)) for p in c.images] for c in conversations]
        batch = self.processor(images=images if any(images) else None, text=[r[0] for r in rendered],
                               padding=True, return_tensors="pt")
        batch = {k: v for k, v in dict(batch).items() if isinstance(v, torch.Tensor)}
        ids, mask = batch["input_ids"], batch["attention_mask"]
        labels = torch.full_like(ids, IGNORE_INDEX)
        for row, (conversation, (_, full, spans)) in enumerate(zip(conversations, rendered)):
            real = mask[row].nonzero().flatten()
            # The processor may prepend a BOS the template lacked: align on the end of the row.
            offset = len(real) - len(full)
            if offset < 0 or ids[row, real[offset:]].tolist() != full:
                raise DataError(f"line {conversation.line}: the processor's ids differ from the chat template's")
            for start, end in spans:
                positions = real[offset + start:offset + end]
                labels[row, positions] = ids[row, positions]
        batch["labels"] = labels
        return batch
