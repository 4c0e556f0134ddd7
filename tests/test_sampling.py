"""Per-row sampling: filter order, neutral values, greedy rows, repetition penalty from a presence
mask, each row of a batch equal to that row alone, draws from the row's own generator."""

from __future__ import annotations

import dataclasses
import math

import torch

from mllama.sampling import SamplingTensors, filtered_logits, mark_seen, select_next

NEUTRAL = (1.0, 0, 1.0, 0.0, 1.0)  # temperature, top_k, top_p, min_p, repetition_penalty


def _settings(*rows) -> SamplingTensors:
    return SamplingTensors.from_rows(list(rows))


def _kept(logits: torch.Tensor) -> set[int]:
    return set(torch.isfinite(logits[0]).nonzero().squeeze(1).tolist())


def test_top_k_runs_before_top_p():
    logits = torch.tensor([[3.0, 2.0, 1.0, 0.0]])
    # top_k=2 leaves probabilities (0.73, 0.27): top_p=0.7 then keeps id 0 alone. Run the other way
    # round, top_p would keep ids 0 and 1 (0.64 + 0.24 over all four).
    assert _kept(filtered_logits(logits, _settings((1.0, 2, 0.7, 0.0, 1.0)))) == {0}
    assert _kept(filtered_logits(logits, _settings((1.0, 0, 0.7, 0.0, 1.0)))) == {0, 1}


def test_temperature_runs_before_top_p_and_min_p():
    logits = torch.tensor([[2.0, 1.0, 0.0, -1.0]])
    # At temperature 1 top_p=0.6 keeps id 0 (p=0.64); flattened by temperature 4 (p=0.35, 0.27,
    # 0.21, 0.17) it needs ids 0 and 1.
    assert _kept(filtered_logits(logits, _settings((1.0, 0, 0.6, 0.0, 1.0)))) == {0}
    assert _kept(filtered_logits(logits, _settings((4.0, 0, 0.6, 0.0, 1.0)))) == {0, 1}
    # min_p=0.3: ids within 0.3 of the top probability; more of them at a higher temperature.
    assert _kept(filtered_logits(logits, _settings((1.0, 0, 1.0, 0.3, 1.0)))) == {0, 1}
    assert _kept(filtered_logits(logits, _settings((4.0, 0, 1.0, 0.3, 1.0)))) == {0, 1, 2, 3}


def test_min_p_threshold_is_relative_to_the_top_probability():
    probs = torch.tensor([[0.5, 0.3, 0.15, 0.05]])
    out = filtered_logits(probs.log(), _settings((1.0, 0, 1.0, 0.31, 1.0)))
    assert _kept(out) == {0, 1}  # 0.15 < 0.31 * 0.5 <= 0.3
    out = filtered_logits(probs.log(), _settings((1.0, 0, 1.0, 0.2, 1.0)))
    assert _kept(out) == {0, 1, 2}  # 0.05 < 0.2 * 0.5 <= 0.15


def test_neutral_values_change_nothing():
    logits = torch.randn(3, 50, generator=torch.Generator().manual_seed(0))
    out = filtered_logits(logits, _settings(NEUTRAL, NEUTRAL, (1.0, 50, 1.0, 0.0, 1.0)))  # top_k = V: off too
    assert torch.equal(out, logits)


def test_temperature_zero_rows_are_greedy_whatever_else_is_set():
    logits = torch.randn(4, 40, generator=torch.Generator().manual_seed(1))
    settings = _settings((0.0, 5, 0.5, 0.1, 1.0), (1.0, 0, 1.0, 0.0, 1.0), (0.0, 0, 1.0, 0.0, 1.0),
                         (2.0, 3, 0.9, 0.0, 1.0))
    for seed in range(5):
        gens = [torch.Generator().manual_seed(seed + i) for i in range(4)]
        out = select_next(logits, settings, generators=gens)
        assert out[0] == logits[0].argmax() and out[2] == logits[2].argmax()
        assert out[3] in logits[3].topk(3).indices


def _reference_penalty(logits: torch.Tensor, history: list[list[int]], penalty: list[float]) -> torch.Tensor:
    out = logits.clone()
    for row, ids in enumerate(history):
        for i in set(ids):
            if i < logits.shape[1]:
                value = logits[row, i]
                out[row, i] = value * penalty[row] if value < 0 else value / penalty[row]
    return out


def test_repetition_penalty_from_a_presence_mask_marked_step_by_step():
    gen = torch.Generator().manual_seed(2)
    logits = torch.randn(2, 30, generator=gen)
    history = [[3, 7, 7, 29, 30], [0, 5]]  # 30 lies past the logits (the <|image|> id): ignored
    presence = torch.zeros(2, 30, dtype=torch.bool)
    mark_seen(presence[:1], torch.tensor([history[0][:2]]))
    for token in history[0][2:]:
        mark_seen(presence[:1], torch.tensor([[token]]))
    mark_seen(presence[1:], torch.tensor([history[1]]))
    assert presence.sum().item() == 5
    settings = _settings((0.0, 0, 1.0, 0.0, 1.5), (0.0, 0, 1.0, 0.0, 1.0))
    out = filtered_logits(logits, settings, presence)
    assert torch.allclose(out, _reference_penalty(logits, history, [1.5, 1.0]))
    assert torch.equal(out[1], logits[1])  # penalty 1: the row's presence is ignored


def test_each_row_samples_as_it_would_alone():
    gen = torch.Generator().manual_seed(3)
    logits = torch.randn(3, 64, generator=gen)
    rows = [(0.7, 10, 0.9, 0.0, 1.2), (1.5, 0, 0.8, 0.05, 1.0), (1.0, 0, 1.0, 0.0, 1.0)]
    presence = torch.rand(3, 64, generator=gen) < 0.2
    batch = select_next(logits, _settings(*rows), presence=presence,
                        generators=[torch.Generator().manual_seed(10 + i) for i in range(3)])
    for i, row in enumerate(rows):
        alone = select_next(logits[i:i + 1], _settings(row), presence=presence[i:i + 1],
                            generators=[torch.Generator().manual_seed(10 + i)])
        assert alone.item() == batch[i].item()
        assert torch.equal(filtered_logits(logits[i:i + 1], _settings(row), presence[i:i + 1]),
                           filtered_logits(logits, _settings(*rows), presence)[i:i + 1])


def test_draws_follow_the_distribution_and_skip_zero_probability_ids():
    probs = torch.tensor([[0.5, 0.0, 0.3, 0.2, 0.0]])
    logits = probs.log()  # zero probability -> -inf logit
    gen = torch.Generator().manual_seed(4)
    draws = [select_next(logits, _settings(NEUTRAL), generators=[gen]).item() for _ in range(3000)]
    counts = [draws.count(i) / len(draws) for i in range(5)]
    assert counts[1] == 0 and counts[4] == 0
    for i in (0, 2, 3):  # three standard deviations of a binomial at n=3000
        assert abs(counts[i] - probs[0, i].item()) < 3 * math.sqrt(0.25 / 3000)


def test_ngram_bans_follow_every_earlier_occurrence_of_the_prefix():
    from mllama.sampling import NgramBans, ban_ids

    bans = NgramBans(3, [4, 5, 6, 4, 5, 7, 9, 4])
    assert bans.banned() == []  # prefix (9, 4) never seen
    bans.append(5)
    assert bans.banned() == [6, 7]  # (4, 5) was followed by 6 and by 7
    assert NgramBans(1, [3, 8]).banned() == [3, 8]
    assert NgramBans(4, [1, 2]).banned() == []  # too short to complete any 4-gram
    fork = bans.copy()
    fork.append(6)
    assert bans.history[-1] == 5 and fork.banned() == [4]
    logits = torch.zeros(2, 10)
    out = ban_ids(logits, [[6, 7, 12], []])  # 12 has no logit: skipped
    assert out[0].isinf().tolist() == [i in (6, 7) for i in range(10)] and not out[1].isinf().any()
    assert not logits.isinf().any()


def test_greedy_rows_are_known_on_the_host():
    """from_rows records whether every row is greedy, so a decode step asks no tensor; settings built
    without it (all_greedy None) read the temperatures and choose the same ids."""
    greedy = _settings((0.0, 0, 1.0, 0.0, 1.0), (0.0, 5, 0.9, 0.0, 1.0))
    mixed = _settings((0.0, 0, 1.0, 0.0, 1.0), (0.7, 0, 1.0, 0.0, 1.0))
    assert greedy.all_greedy is True and mixed.all_greedy is False
    logits = torch.randn(2, 50, generator=torch.Generator().manual_seed(0))
    for settings in (greedy, mixed):
        unknown = dataclasses.replace(settings, all_greedy=None)
        gens = [torch.Generator().manual_seed(1), torch.Generator().manual_seed(1)]
        want = select_next(logits, settings, generators=[torch.Generator().manual_seed(1) for _ in range(2)])
        assert torch.equal(select_next(logits, unknown, generators=gens), want)
    assert torch.equal(select_next(logits, greedy), logits.argmax(dim=-1))
