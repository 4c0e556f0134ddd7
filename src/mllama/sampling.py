"""Next-token selection over (B, V) logits with settings per row.

Every setting is a (B,) tensor so one batched step serves requests with different settings; a
neutral value turns a filter off for its row (temperature 0: greedy, top_k 0, top_p 1, min_p 0,
repetition_penalty 1). The filters run in transformers' order: repetition penalty, temperature,
top-k, top-p, min-p. Randomness comes from one uniform number per sampled row and step, drawn from
that row's own generator, so a seeded request samples the same tokens whatever else is batched.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from mllama.cpu_scans import argmax_rows


@dataclass
class SamplingTensors:
    """Per-row settings (B,) on the logits' device; build with `from_rows`."""

    temperature: torch.Tensor
    top_k: torch.Tensor
    top_p: torch.Tensor
    min_p: torch.Tensor
    repetition_penalty: torch.Tensor
    # whether every row is greedy (temperature 0), known on the host: a decode step then needs no
    # device op to find out; None: select_next reads `temperature`
    all_greedy: bool | None = None

    @classmethod
    def from_rows(cls, rows: list[tuple[float, int, float, float, float]], *,
                  device: torch.device | str = "cpu") -> "SamplingTensors":
        """rows: (temperature, top_k, top_p, min_p, repetition_penalty) per row."""
        cols = list(zip(*rows)) if rows else [(), (), (), (), ()]
        floats = [torch.tensor(c, dtype=torch.float32, device=device) for c in cols]
        return cls(temperature=floats[0], top_k=torch.tensor(cols[1], dtype=torch.long, device=device),
                   top_p=floats[2], min_p=floats[3], repetition_penalty=floats[4],
                   all_greedy=not any(t > 0 for t in cols[0]))


def mark_seen(presence: torch.Tensor, ids: torch.Tensor) -> None:
    """Set presence[b, id] for every id of row b in ids (B, T) that has a logit (the <|image|> id
    lies past the lm_head and has none)."""
    ids = ids.reshape(presence.shape[0], -1)
    in_vocab = ids < presence.shape[1]
    rows = torch.arange(ids.shape[0], device=ids.device)[:, None].expand_as(ids)
    presence.index_put_((rows[in_vocab], ids[in_vocab]), torch.ones((), dtype=torch.bool, device=ids.device))


def apply_repetition_penalty(logits: torch.Tensor, presence: torch.Tensor, penalty: torch.Tensor) -> torch.Tensor:
    """CTRL-style penalty on every id a row has seen (presence (B, V) bool): positive logits are
    divided by the row's penalty, negative ones multiplied."""
    p = penalty[:, None]
    penalized = torch.where(logits < 0, logits * p, logits / p)
    return torch.where(presence & (p != 1.0), penalized, logits)


def apply_temperature(logits: torch.Tensor, temperature: torch.Tensor) -> torch.Tensor:
    """Rows with temperature 0 are greedy and left as they are."""
    t = temperature[:, None]
    return torch.where(t > 0, logits / torch.where(t > 0, t, 1.0), logits)


def apply_top_k(logits: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    vocab = logits.shape[-1]
    active = (k > 0) & (k < vocab)
    if not bool(active.any()):
        return logits
    k_max = int(torch.where(active, k, 1).max())
    top = torch.topk(logits, k_max, dim=-1).values  # (B, k_max), descending
    kth = top.gather(1, (torch.where(active, k, 1) - 1)[:, None])
    return logits.masked_fill(active[:, None] & (logits < kth), float("-inf"))


def apply_top_p(logits: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
    """Keep the smallest set of most likely ids whose probability reaches p (at least one id)."""
    active = p < 1.0
    if not bool(active.any()):
        return logits
    sorted_logits, order = torch.sort(logits, dim=-1, descending=False)
    cumulative = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
    drop = (cumulative <= (1 - p)[:, None]) & active[:, None]
    drop[..., -1] = False
    return logits.masked_fill(drop.scatter(1, order, drop), float("-inf"))


def apply_min_p(logits: torch.Tensor, min_p: torch.Tensor) -> torch.Tensor:
    """Drop ids whose probability is below min_p times the row's top probability."""
    active = min_p > 0
    if not bool(active.any()):
        return logits
    probs = logits.softmax(dim=-1)
    threshold = min_p[:, None] * probs.max(dim=-1, keepdim=True).values
    return logits.masked_fill(active[:, None] & (probs < threshold), float("-inf"))


def filtered_logits(logits: torch.Tensor, settings: SamplingTensors,
                    presence: torch.Tensor | None = None) -> torch.Tensor:
    """Penalty, temperature and the three filters applied to float32 copies of (B, V) logits."""
    logits = logits.float()
    if presence is not None:
        logits = apply_repetition_penalty(logits, presence, settings.repetition_penalty)
    logits = apply_temperature(logits, settings.temperature)
    return apply_min_p(apply_top_p(apply_top_k(logits, settings.top_k), settings.top_p), settings.min_p)


def select_next(logits: torch.Tensor, settings: SamplingTensors, *, presence: torch.Tensor | None = None,
                generators: list[torch.Generator | None] | None = None) -> torch.Tensor:
    """(B, V) logits -> (B,) next ids: argmax for rows with temperature 0, else a draw from the
    filtered distribution with the row's generator (None: torch's default generator)."""
    greedy = settings.all_greedy
    if greedy is None:
        greedy = not bool((settings.temperature > 0).any())
    if greedy:  # temperature and the filters cannot change the argmax
        if presence is not None:
            logits = apply_repetition_penalty(logits.float(), presence, settings.repetition_penalty)
        elif logits.dtype != torch.bfloat16:  # bf16 logits: argmax_rows reads them as they are
            logits = logits.float()
        return argmax_rows(logits.contiguous())
    logits = filtered_logits(logits, settings, presence)
    out = argmax_rows(logits.contiguous())
    rows = (settings.temperature > 0).nonzero().squeeze(1)
    gens = generators if generators is not None else [None] * logits.shape[0]
    out[rows] = draw(logits[rows], [gens[r] for r in rows.tolist()])
    return out


def draw(logits: torch.Tensor, generators: list[torch.Generator | None]) -> torch.Tensor:
    """One id per row of filtered (B, V) logits, from the row's generator (None: torch's default):
    one uniform number per row, in row order, through the inverse CDF."""
    u = torch.stack([torch.rand((), generator=g, dtype=torch.float64, device=logits.device) for g in generators])
    # The first id whose cumulative probability exceeds u (right=True skips ids of probability
    # zero, which add nothing to the sum).
    cdf = logits.double().softmax(dim=-1).cumsum(dim=-1)
    drawn = torch.searchsorted(cdf, (u * cdf[:, -1])[:, None], right=True).squeeze(1)
    return torch.minimum(drawn, (cdf < cdf[:, -1:]).sum(dim=-1))  # rounding at the top end


class NgramBans:
    """no_repeat_ngram_size for one sequence: the ids that would complete an n-gram that already
    occurs in the sequence (prompt and generated ids alike, as transformers counts them).

    Kept incrementally (prefix of n-1 ids -> ids that followed it), so a step costs one lookup
    instead of a rescan of the whole history. `copy()` lets beams fork their history."""

    def __init__(self, n: int, ids: list[int]) -> None:
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise ValueError(f"no_repeat_ngram_size must be an int >= 1, got {n!r}")
        self.n = n
        self.history: list[int] = []
        self.followers: dict[tuple[int, ...], set[int]] = {}
        for token in ids:
            self.append(token)

    def append(self, token: int) -> None:
        self.history.append(token)
        if len(self.history) >= self.n:
            gram = self.history[-self.n:]
            self.followers.setdefault(tuple(gram[:-1]), set()).add(gram[-1])

    def banned(self) -> list[int]:
        """Ids the next token must not be. The newest n-1 ids are the prefix a next token would
        complete; fewer than n-1 ids so far cannot complete any n-gram."""
        if len(self.history) + 1 < self.n:
            return []
        prefix = tuple(self.history[len(self.history) - self.n + 1:])
        return sorted(self.followers.get(prefix, ()))

    def copy(self) -> "NgramBans":
        other = NgramBans.__new__(NgramBans)
        other.n, other.history = self.n, list(self.history)
        other.followers = {k: set(v) for k, v in self.followers.items()}
        return other


def ban_ids(logits: torch.Tensor, bans: list[list[int]]) -> torch.Tensor:
    """A copy of (B, V) logits with bans[b] set to -inf in row b. Ids past the logits (the
    <|image|> id has no logit) cannot be chosen anyway and are skipped."""
    vocab = logits.shape[-1]
    rows = [b for b, ids in enumerate(bans) for i in ids if i < vocab]
    cols = [i for ids in bans for i in ids if i < vocab]
    if not rows:
        return logits
    out = logits.clone()
    out[torch.tensor(rows, device=logits.device), torch.tensor(cols, device=logits.device)] = float("-inf")
    return out
