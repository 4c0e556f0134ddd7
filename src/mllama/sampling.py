"""Next-token selection as small pure functions over (B, V) logits."""

from __future__ import annotations

import torch


def apply_repetition_penalty(logits: torch.Tensor, seen: torch.Tensor, penalty: float) -> torch.Tensor:
    """CTRL-style penalty on every id in `seen` (B, T): positive logits divided, negative multiplied.

    Ids past the logits (the <|image|> token lives beyond the lm_head) are ignored.
    """
    if penalty == 1.0:
        return logits
    vocab = logits.shape[-1]
    in_vocab = seen < vocab
    present = torch.zeros_like(logits, dtype=torch.bool)
    present.scatter_(1, torch.where(in_vocab, seen, 0), in_vocab)
    if not bool(in_vocab.all()):  # id 0 was a stand-in above: mark it only where it really occurs
        present[:, 0] = (seen == 0).any(dim=1)
    penalized = torch.where(logits < 0, logits * penalty, logits / penalty)
    return torch.where(present, penalized, logits)


def apply_temperature(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    return logits if temperature == 1.0 else logits / temperature


def apply_top_k(logits: torch.Tensor, k: int | None) -> torch.Tensor:
    if not k or k >= logits.shape[-1]:
        return logits
    kth = torch.topk(logits, k, dim=-1).values[..., -1:]
    return logits.masked_fill(logits < kth, float("-inf"))


def apply_top_p(logits: torch.Tensor, p: float | None) -> torch.Tensor:
    """Keep the smallest set of most likely ids whose probability reaches p (at least one id)."""
    if p is None or p >= 1.0:
        return logits
    sorted_logits, order = torch.sort(logits, dim=-1, descending=False)
    cumulative = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
    drop = cumulative <= (1 - p)
    drop[..., -1] = False
    return logits.masked_fill(drop.scatter(1, order, drop), float("-inf"))


def apply_min_p(logits: torch.Tensor, min_p: float | None) -> torch.Tensor:
    """Drop ids whose probability is below min_p times the top probability."""
    if not min_p:
        return logits
    probs = logits.softmax(dim=-1)
    threshold = min_p * probs.max(dim=-1, keepdim=True).values
    return logits.masked_fill(probs < threshold, float("-inf"))


def select_next(logits: torch.Tensor, *, seen: torch.Tensor | None = None, do_sample: bool = False,
                temperature: float = 1.0, top_k: int | None = None, top_p: float | None = None,
                min_p: float | None = None, repetition_penalty: float = 1.0,
                generator: torch.Generator | None = None) -> torch.Tensor:
    """(B, V) logits -> (B,) next ids. Greedy unless do_sample; the order of filters follows transformers."""
    logits = logits.float()
    if seen is not None:
        logits = apply_repetition_penalty(logits, seen, repetition_penalty)
    if not do_sample:
        return logits.argmax(dim=-1)
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0 when sampling, got {temperature}")
    logits = apply_min_p(apply_top_p(apply_top_k(apply_temperature(logits, temperature), top_k), top_p), min_p)
    probs = logits.softmax(dim=-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(1)
