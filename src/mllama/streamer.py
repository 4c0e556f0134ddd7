"""Streamers for generate(): text chunks as tokens arrive, never splitting a multi-byte character."""

from __future__ import annotations

import queue
import sys
from typing import Any, TextIO

import torch


class TextStreamer:
    """Receives token ids from generate() via put()/end() and emits decoded text chunks.

    `tokenizer` is an MllamaTokenizer or anything with a `.tokenizer` attribute holding one (a
    processor). The first put() carries the prompt, which is skipped when skip_prompt is set.
    """

    def __init__(self, tokenizer: Any, skip_prompt: bool = False, *, skip_special_tokens: bool = False,
                 file: TextIO | None = None) -> None:
        self.tokenizer = getattr(tokenizer, "tokenizer", tokenizer)
        self.skip_prompt = skip_prompt
        self.skip_special_tokens = skip_special_tokens
        self.file = file
        self._detok = self.tokenizer.stream(skip_special_tokens=skip_special_tokens)
        self._prompt_pending = True
        self.cancelled = False

    def put(self, value: torch.Tensor) -> None:
        ids = value.reshape(-1).tolist()
        if self._prompt_pending:
            self._prompt_pending = False
            if self.skip_prompt:
                return
        text = self._detok.put(ids)
        if text:
            self.on_text(text, final=False)

    def end(self) -> None:
        self.on_text(self._detok.finish(), final=True)
        self._detok = self.tokenizer.stream(skip_special_tokens=self.skip_special_tokens)
        self._prompt_pending = True

    def on_text(self, text: str, *, final: bool) -> None:
        out = self.file or sys.stdout
        out.write(text + ("\n" if final else ""))
        out.flush()


class TextIteratorStreamer(TextStreamer):
    """Iterate over text chunks while generate() runs in another thread."""

    _STOP = object()

    def __init__(self, tokenizer: Any, skip_prompt: bool = False, *, timeout: float | None = None,
                 skip_special_tokens: bool = False) -> None:
        super().__init__(tokenizer, skip_prompt, skip_special_tokens=skip_special_tokens)
        self.timeout = timeout
        self._queue: queue.Queue = queue.Queue()

    def on_text(self, text: str, *, final: bool) -> None:
        if text:
            self._queue.put(text)
        if final:
            self._queue.put(self._STOP)

    def fail(self, error: BaseException) -> None:
        """Called by generate() when it fails: the consumer's next() raises that error instead of
        waiting forever (or raising queue.Empty) for text that will never come."""
        self._queue.put(_Failure(error))

    def cancel(self) -> None:
        """Ask the generate() feeding this streamer to stop at its next step (for a consumer that
        stops reading early); the iteration then ends normally."""
        self.cancelled = True

    def __iter__(self) -> "TextIteratorStreamer":
        return self

    def __next__(self) -> str:
        item = self._queue.get(timeout=self.timeout)
        if item is self._STOP:
            raise StopIteration
        if isinstance(item, _Failure):
            raise item.error  # the generate thread's own exception, e.g. a ValueError naming an argument
        return item


class _Failure:
    def __init__(self, error: BaseException) -> None:
        self.error = error
