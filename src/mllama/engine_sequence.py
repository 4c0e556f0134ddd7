"""Engine-side state of one request: its prompt, settings, generator, vision, cache length and
output so far, and the delivery of each token as an Event (logprobs, incremental text, stop checks)."""

from __future__ import annotations

import torch

from mllama.request import Event, RequestHandle, SamplingParams
from mllama.sampling import NgramBans
from mllama.tokenizer import StreamDetokenizer
from mllama.vision_cache import RequestVision, VisionJob


class Sequence:
    """Engine-side state of one request."""

    def __init__(self, handle: RequestHandle, prompt: torch.Tensor, params: SamplingParams,
                 generator: torch.Generator | None, vision_job: VisionJob | None,
                 detok: StreamDetokenizer | None) -> None:
        self.handle, self.prompt, self.params, self.generator = handle, prompt, params, generator
        self.vision_job = vision_job
        self.vision: RequestVision | None = None
        self.detok = detok
        self.tail = ""  # end of the text so far, where a stop string could have begun
        self.prefilled = 0  # prompt tokens whose K/V are in the slot
        self.cached = 0  # all tokens whose K/V are in the slot
        self.next_token = -1  # sampled, not yet in the cache
        self.generated = 0
        self.output: list[int] = []  # sampled ids: with the prompt, the tokens at the slot's positions
        self.presence: torch.Tensor | None = None  # (1, V) ids seen, for the repetition penalty
        n = params.no_repeat_ngram_size
        self.ngrams = NgramBans(n, prompt.tolist()) if n else None

    def banned(self) -> list[int]:
        """Ids this request may not choose next (min_tokens, no_repeat_ngram_size)."""
        ids = self.ngrams.banned() if self.ngrams is not None else []
        if self.generated < self.params.min_tokens:
            ids = ids + list(self.params.stop_token_ids)
        return ids

    @property
    def setting_row(self) -> tuple[float, int, float, float, float]:
        p = self.params
        return (p.temperature, p.top_k, p.top_p, p.min_p, p.repetition_penalty)

    def emit(self, token: int, logits: torch.Tensor, *, max_len: int) -> bool:
        """Record one sampled token and deliver its Event (text, logprobs, stop checks); returns
        whether the request has finished (a stop id or string, max_tokens, or the slot's max_len)."""
        params = self.params
        self.next_token = token
        self.generated += 1
        self.output.append(token)
        if self.ngrams is not None:
            self.ngrams.append(token)
        event = Event(token=token)
        if params.logprobs is not None:
            logprobs = logits.float().log_softmax(dim=-1)
            event.logprob = float(logprobs[token])
            if params.logprobs:
                top = torch.topk(logprobs, min(params.logprobs, logprobs.numel()))
                event.top_logprobs = list(zip(top.indices.tolist(), top.values.tolist()))
        if params.return_logits:
            event.logits = logits.float().clone()
        text = self.detok.put(token) if self.detok is not None else ""
        reason = None
        if token in params.stop_token_ids:
            reason = "stop"
        elif params.stop_strings:
            window = self.tail + text
            if any(stop in window for stop in params.stop_strings):
                reason = "stop"
            keep = max(len(stop) for stop in params.stop_strings) - 1
            self.tail = window[-keep:] if keep else ""
        if reason is None and (self.generated >= params.max_tokens or self.cached >= max_len):
            reason = "length"
        event.text = text
        if reason is not None:
            self.finish(reason, event)
        else:
            self.handle._push(event)
        return reason is not None

    def finish(self, reason: str, event: Event) -> None:
        if self.detok is not None:
            event.text += self.detok.finish()
        event.finish_reason = reason
        self.handle._push(event)
