"""Per-choice bookkeeping of the server: stop strings cut out of the text, logprobs in OpenAI's two
shapes, and merging the event streams of several choices."""

from __future__ import annotations

import asyncio
from typing import Any, AsyncIterator, Sequence, TypeVar

from mllama.request import Event, RequestHandle

T = TypeVar("T")
Entry = tuple[int, float, list[tuple[int, float]]]  # token, its logprob, the top (token, logprob) pairs


class StopText:
    """Text released as it streams, minus any stop string and what follows it (OpenAI's rule).

    Text that could be the start of a stop string is held back until it cannot be any more."""

    def __init__(self, stops: Sequence[str]) -> None:
        self.stops = [s for s in stops if s]
        self.pending = ""
        self.stopped = False

    def feed(self, text: str, *, final: bool = False) -> str:
        if self.stopped:
            return ""
        self.pending += text
        found = [i for i in (self.pending.find(s) for s in self.stops) if i >= 0]
        if found:
            out, self.pending, self.stopped = self.pending[:min(found)], "", True
            return out
        keep = 0 if final else self._partial()
        out = self.pending[:len(self.pending) - keep]
        self.pending = self.pending[len(self.pending) - keep:]
        return out

    def _partial(self) -> int:
        """Length of the longest end of the pending text that begins a stop string."""
        best = 0
        for stop in self.stops:
            for size in range(min(len(stop) - 1, len(self.pending)), best, -1):
                if self.pending.endswith(stop[:size]):
                    best = size
                    break
        return best


class Choice:
    """One generated answer of a request: its handle, text so far, logprob entries and finish reason."""

    def __init__(self, handle: RequestHandle, index: int, stops: StopText) -> None:
        self.handle, self.index, self.stops = handle, index, stops
        self.text = ""
        self.finish: str | None = None
        self.logprobs: list[Entry] = []

    def take(self, event: Event) -> tuple[str, list[Entry]]:
        """The event's contribution: (new text, new logprob entries); sets `finish` at the end."""
        entries: list[Entry] = []
        if event.token is not None and event.logprob is not None:
            entries = [(event.token, event.logprob, list(event.top_logprobs or []))]
            self.logprobs += entries
        final = event.finish_reason is not None
        text = self.stops.feed(event.text, final=final)
        if self.stops.stopped:
            self.finish = "stop"
        elif final:
            self.finish = event.finish_reason
        self.text += text
        return text, entries


def _token_text(tokenizer: Any, token: int) -> str:
    return tokenizer.decode([token], skip_special_tokens=False)


def chat_logprobs(tokenizer: Any, entries: list[Entry]) -> dict[str, Any]:
    """{"content": [{"token", "logprob", "bytes", "top_logprobs": [...]}]} (chat completions)."""
    def item(token: int, logprob: float) -> dict[str, Any]:
        text = _token_text(tokenizer, token)
        return {"token": text, "logprob": logprob, "bytes": list(text.encode("utf-8"))}
    return {"content": [{**item(token, lp), "top_logprobs": [item(t, v) for t, v in top]}
                        for token, lp, top in entries]}


def completion_logprobs(tokenizer: Any, entries: list[Entry], offset: int) -> dict[str, Any]:
    """{"tokens", "token_logprobs", "top_logprobs", "text_offset"} (legacy completions); `offset` is
    where the first entry's text starts in the answer."""
    tokens = [_token_text(tokenizer, token) for token, _, _ in entries]
    offsets = []
    for text in tokens:
        offsets.append(offset)
        offset += len(text)
    return {"tokens": tokens, "token_logprobs": [lp for _, lp, _ in entries],
            "top_logprobs": [{_token_text(tokenizer, t): v for t, v in top} for _, _, top in entries],
            "text_offset": offsets}


async def merge(streams: list[AsyncIterator[T]]) -> AsyncIterator[tuple[int, T]]:
    """(index of the stream, item) from several async iterators as items come; an exception in one
    stream ends the merge with that exception. Cancelling the merge cancels every stream."""
    if len(streams) == 1:
        async for item in streams[0]:
            yield 0, item
        return
    queue: asyncio.Queue[tuple[int, Any, BaseException | None, bool]] = asyncio.Queue()

    async def pump(index: int, stream: AsyncIterator[T]) -> None:
        try:
            async for item in stream:
                await queue.put((index, item, None, False))
        except Exception as err:  # noqa: BLE001 - handed to the consumer
            await queue.put((index, None, err, True))
            return
        await queue.put((index, None, None, True))

    tasks = [asyncio.ensure_future(pump(i, s)) for i, s in enumerate(streams)]
    try:
        left = len(tasks)
        while left:
            index, item, error, done = await queue.get()
            if error is not None:
                raise error
            if done:
                left -= 1
                continue
            yield index, item
    finally:
        for task in tasks:
            task.cancel()
