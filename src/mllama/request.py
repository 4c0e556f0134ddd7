"""What a caller gives the engine (Request, SamplingParams) and what it gets back (a RequestHandle
streaming Events), usable from plain threads and from asyncio."""

from __future__ import annotations

import asyncio
import collections
import threading
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, AsyncIterator, Iterator

import torch

if TYPE_CHECKING:
    from mllama.engine import Engine

FINISH_REASONS = ("stop", "length", "cancelled", "error")


@dataclass
class SamplingParams:
    """Per-request decoding settings.

    temperature 0 is greedy; top_k 0, top_p 1, min_p 0 and repetition_penalty 1 turn those off.
    seed gives the request its own generator (same tokens whatever else is batched). Generation ends
    at one of stop_token_ids (the id is returned), when the text contains one of stop_strings, after
    max_tokens, or when the engine's max_len is reached. logprobs: None for none, 0 for the chosen
    token's log-probability, k > 0 for the k most likely ids too (of the model's raw distribution,
    before penalty, temperature and filters). return_logits attaches each step's raw logits.
    min_tokens: stop_token_ids cannot be chosen before this many tokens were generated (stop
    strings and max_tokens still end a request). no_repeat_ngram_size n > 0: no n-gram of ids
    occurs twice in prompt + output.
    """

    max_tokens: int = 16
    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    seed: int | None = None
    stop_token_ids: tuple[int, ...] = ()
    stop_strings: tuple[str, ...] = ()
    logprobs: int | None = None
    return_logits: bool = False
    skip_special_tokens: bool = True
    min_tokens: int = 0
    no_repeat_ngram_size: int = 0

    def validate(self) -> None:
        for name in ("max_tokens", "top_k", "min_tokens", "no_repeat_ngram_size"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int):
                raise TypeError(f"{name} must be an int, got {type(value).__name__} {value!r}")
        for name in ("temperature", "top_p", "min_p", "repetition_penalty"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or value != value:
                raise TypeError(f"{name} must be a real number, got {type(value).__name__} {value!r}")
        checks = [
            (self.max_tokens >= 1, f"max_tokens must be >= 1, got {self.max_tokens}"),
            (self.temperature >= 0, f"temperature must be >= 0 (0 is greedy), got {self.temperature}"),
            (self.top_k >= 0, f"top_k must be >= 0 (0 turns it off), got {self.top_k}"),
            (self.min_tokens >= 0, f"min_tokens must be >= 0, got {self.min_tokens}"),
            (self.no_repeat_ngram_size >= 0,
             f"no_repeat_ngram_size must be >= 0 (0 turns it off), got {self.no_repeat_ngram_size}"),
            (0 < self.top_p <= 1, f"top_p must be in (0, 1], got {self.top_p}"),
            (0 <= self.min_p <= 1, f"min_p must be in [0, 1], got {self.min_p}"),
            (self.repetition_penalty > 0, f"repetition_penalty must be > 0, got {self.repetition_penalty}"),
            (self.logprobs is None or self.logprobs >= 0, f"logprobs must be None or >= 0, got {self.logprobs}"),
            (all(isinstance(s, str) and s for s in self.stop_strings),
             f"stop_strings must be non-empty strings, got {self.stop_strings!r}"),
        ]
        for ok, message in checks:
            if not ok:
                raise ValueError(message)


@dataclass
class Request:
    """One prompt: input_ids (S,), and optionally its images as the processor gives them for one
    sample: pixel_values (N_images, N_tiles, C, H, W), aspect_ratio_ids (N_images,),
    aspect_ratio_mask (N_images, N_tiles), cross_attention_mask (S, N_images, N_tiles).
    generator, if given, is used instead of one seeded from sampling.seed."""

    input_ids: torch.Tensor | list[int]
    pixel_values: torch.Tensor | None = None
    aspect_ratio_ids: torch.Tensor | None = None
    aspect_ratio_mask: torch.Tensor | None = None
    cross_attention_mask: torch.Tensor | None = None
    sampling: SamplingParams = field(default_factory=SamplingParams)
    generator: torch.Generator | None = None


@dataclass
class Event:
    """One step of one request: a new token (None only in a final event without one), the text it
    completed (may be empty: a character can span tokens), and finish_reason on the last event."""

    token: int | None
    text: str = ""
    finish_reason: str | None = None
    logprob: float | None = None
    top_logprobs: list[tuple[int, float]] | None = None
    logits: torch.Tensor | None = None


class RequestHandle:
    """A submitted request: iterate it (or `async for`) to receive its Events as they come.

    Without a background engine thread, iterating drives `engine.step()` itself, so a plain loop
    works in a single thread. `result()` waits for the end and returns all token ids.
    """

    def __init__(self, engine: "Engine", request_id: int) -> None:
        self._engine = engine
        self.id = request_id
        self.tokens: list[int] = []
        self.text = ""
        self.finish_reason: str | None = None
        self.error: BaseException | None = None
        self._events: collections.deque[Event] = collections.deque()
        self._cond = threading.Condition()
        self._waiters: list[tuple[asyncio.AbstractEventLoop, asyncio.Event]] = []

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None

    def cancel(self) -> None:
        self._engine.cancel(self)

    def _push(self, event: Event) -> None:
        with self._cond:
            if event.token is not None:
                self.tokens.append(event.token)
            self.text += event.text
            if event.finish_reason is not None:
                self.finish_reason = event.finish_reason
            self._events.append(event)
            self._cond.notify_all()
            waiters = list(self._waiters)
        for loop, flag in waiters:
            loop.call_soon_threadsafe(flag.set)

    def _fail(self, error: BaseException) -> None:
        self.error = error
        self._push(Event(token=None, finish_reason="error"))

    def poll(self) -> list[Event]:
        """Every event not yet read, without waiting (for a caller that steps the engine itself)."""
        with self._cond:
            events, self._events = list(self._events), collections.deque()
        return events

    def _next_ready(self) -> Event | None:
        if self._events:
            return self._events.popleft()
        return None

    def __iter__(self) -> Iterator[Event]:
        while True:
            with self._cond:
                event = self._next_ready()
                if event is None and self._engine.running:
                    self._cond.wait(timeout=0.1)
                    event = self._next_ready()
            if event is None:
                if self.finished:  # its events were read already
                    return
                if not self._engine.running and not self._engine.step():
                    raise RuntimeError(f"request {self.id} is unfinished but the engine has no work")
                continue
            yield event
            if event.finish_reason is not None:
                if self.error is not None:
                    raise self.error
                return

    async def _aiter(self) -> AsyncIterator[Event]:
        loop = asyncio.get_running_loop()
        flag = asyncio.Event()
        with self._cond:
            self._waiters.append((loop, flag))
        try:
            while True:
                with self._cond:
                    event = self._next_ready()
                    if event is None:
                        flag.clear()
                if event is None:
                    if self.finished:
                        return
                    if self._engine.running:
                        await flag.wait()
                    else:
                        self._engine.step()
                        await asyncio.sleep(0)
                    continue
                yield event
                if event.finish_reason is not None:
                    if self.error is not None:
                        raise self.error
                    return
        finally:
            with self._cond:
                self._waiters.remove((loop, flag))

    def __aiter__(self) -> AsyncIterator[Event]:
        return self._aiter()

    def result(self) -> list[int]:
        """Block until the request ends (driving the engine if it has no thread); all its token ids."""
        for _ in self:
            pass
        return list(self.tokens)
