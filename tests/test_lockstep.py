"""generate() with caller hooks (logits_processor, stopping_criteria, prefix_allowed_tokens_fn) and
sampled scores, against transformers' generate and against mllama's engine path (issue 13)."""

from __future__ import annotations

import pytest
import torch
from test_generate import _mixed_batch
from tiny import hf_pair

IDS = torch.tensor([[1, 5, 6, 7], [1, 9, 4, 3]])
EOS = [2, 3]


@pytest.fixture(scope="module")
def pair():
    return hf_pair("b", seed=3)


class NextIdBoost:
    """Raises the id after each row's last id: depends on the batch's ids, so it must see every row."""

    def __init__(self, vocab: int, amount: float) -> None:
        self.vocab, self.amount, self.calls = vocab, amount, []

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        self.calls.append(tuple(input_ids.shape))
        boosted = scores.clone()
        rows = torch.arange(input_ids.shape[0])
        boosted[rows, (input_ids[:, -1] + 1) % self.vocab] += self.amount
        return boosted


def _hf(hf, **kwargs):
    with torch.no_grad():
        return hf.generate(input_ids=IDS, attention_mask=torch.ones_like(IDS), eos_token_id=EOS, pad_token_id=0,
                           **kwargs)


def test_logits_processor_matches_transformers_greedy(pair):
    import transformers

    hf, ours = pair
    vocab = ours.config.text_config.vocab_size
    plain = ours.generate(IDS, max_new_tokens=10)
    ref = _hf(hf, max_new_tokens=10, do_sample=False, output_scores=True, return_dict_in_generate=True,
              logits_processor=transformers.LogitsProcessorList([NextIdBoost(vocab, 4.0)]))
    boost = NextIdBoost(vocab, 4.0)
    out = ours.generate(IDS, max_new_tokens=10, logits_processor=[boost], output_scores=True,
                        return_dict_in_generate=True)
    assert torch.equal(out.sequences, ref.sequences)
    assert not torch.equal(out.sequences[:, :plain.shape[1]], plain)  # the processor changed the tokens
    assert boost.calls[0] == (2, 4) and boost.calls[1] == (2, 5)  # the whole batch, one column per step
    for a, b in zip(out.scores, ref.scores):
        assert (a - b).abs().max() <= 1e-4


def test_logits_processor_runs_before_the_sampling_warpers(pair):
    """top_k=1 makes sampling deterministic: tokens and the processed scores (temperature, top-k,
    top-p applied after the caller's processor, -inf where filtered) match transformers'."""
    import transformers

    hf, ours = pair
    vocab = ours.config.text_config.vocab_size
    options = dict(do_sample=True, temperature=0.7, top_k=1, top_p=0.9, max_new_tokens=8, output_scores=True,
                   return_dict_in_generate=True)
    ref = _hf(hf, logits_processor=transformers.LogitsProcessorList([NextIdBoost(vocab, 3.0)]), **options)
    out = ours.generate(IDS, logits_processor=[NextIdBoost(vocab, 3.0)], seed=0, **options)
    assert torch.equal(out.sequences, ref.sequences)
    for a, b in zip(out.scores, ref.scores):
        assert torch.equal(a.isfinite(), b.isfinite())
        assert (a[a.isfinite()] - b[b.isfinite()]).abs().max() <= 1e-4


def test_sampled_scores_are_transformers_warpers_of_the_raw_logits(pair):
    import transformers

    _, ours = pair
    out = ours.generate(IDS, max_new_tokens=6, do_sample=True, temperature=0.8, top_k=20, top_p=0.9, seed=5,
                        output_scores=True, output_logits=True, return_dict_in_generate=True)
    warpers = transformers.LogitsProcessorList([transformers.TemperatureLogitsWarper(0.8),
                                                transformers.TopKLogitsWarper(20), transformers.TopPLogitsWarper(0.9)])
    filtered = 0
    for t, (scores, raw) in enumerate(zip(out.scores, out.logits)):
        ref = warpers(out.sequences[:, :4 + t], raw.clone())
        assert torch.equal(scores.isfinite(), ref.isfinite())
        assert (scores[ref.isfinite()] - ref[ref.isfinite()]).abs().max() <= 1e-5
        filtered += int((~ref.isfinite()).sum())
        chosen = out.sequences[:, 4 + t]
        assert scores[torch.arange(2), chosen].isfinite().all()  # the drawn id survived the filters
    assert filtered > 0
    # The same seed without scores (the engine path) draws the same tokens.
    assert torch.equal(out.sequences, ours.generate(IDS, max_new_tokens=6, do_sample=True, temperature=0.8,
                                                    top_k=20, top_p=0.9, seed=5))


class StopAfter:
    """Ends row r once it has generated stops[r] tokens (a per-row (B,) answer)."""

    def __init__(self, prompt_len: int, stops: list[int]) -> None:
        self.prompt_len, self.stops = prompt_len, torch.tensor(stops)

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor, **kwargs) -> torch.Tensor:
        return (input_ids.shape[1] - self.prompt_len) >= self.stops


def test_stopping_criteria_match_transformers(pair):
    import transformers

    hf, ours = pair
    ref = _hf(hf, max_new_tokens=12, do_sample=False, min_new_tokens=12,
              stopping_criteria=transformers.StoppingCriteriaList([StopAfter(4, [3, 7])]))
    out = ours.generate(IDS, max_new_tokens=12, min_new_tokens=12, stopping_criteria=[StopAfter(4, [3, 7])])
    assert torch.equal(out, ref)
    assert out.shape[1] == 4 + 7 and (out[0, 4 + 3:] == 0).all() and (out[1, 4 + 3:] != 0).any()
    # A plain callable returning one bool ends every row.
    one = ours.generate(IDS, max_new_tokens=12, stopping_criteria=[lambda ids, scores: ids.shape[1] >= 6])
    assert one.shape[1] == 6


def test_prefix_allowed_tokens_fn_matches_transformers(pair):
    hf, ours = pair

    def allowed(batch_id: int, ids: torch.Tensor) -> list[int]:
        last = int(ids[-1])
        return [10 + batch_id, 20 + last % 7, 30] if len(ids) % 2 else list(range(40, 60))

    ref = _hf(hf, max_new_tokens=9, do_sample=False, prefix_allowed_tokens_fn=allowed)
    out = ours.generate(IDS, max_new_tokens=9, prefix_allowed_tokens_fn=allowed)
    assert torch.equal(out, ref)
    for t in range(4, out.shape[1]):
        for row in range(2):
            if int(out[row, t]) not in (2, 3, 0):
                assert int(out[row, t]) in allowed(row, out[row, :t])


def test_hooked_generate_equals_the_engine_on_a_padded_batch_with_images():
    """A processor that changes nothing: the lockstep loop gives the engine's greedy tokens, with and
    without penalty and n-gram rules, on rows of different lengths, images and a text-only row.
    (Seeded sampling of a batch draws from one generator in a different order on the two paths.)"""
    _, ours = hf_pair("b", seed=13)
    inputs, _ = _mixed_batch()
    seen = []

    def identity(ids, scores):
        seen.append(ids.shape)
        return scores

    for options in (dict(), dict(repetition_penalty=1.3, no_repeat_ngram_size=2)):
        engine = ours.generate(**inputs, max_new_tokens=10, eos_token_id=[], pad_token_id=0, **options)
        hooked = ours.generate(**inputs, max_new_tokens=10, eos_token_id=[], pad_token_id=0,
                               logits_processor=[identity], **options)
        assert torch.equal(hooked, engine), options
    assert seen[0] == (3, 8)


def test_hook_errors_are_named(pair):
    _, ours = pair
    with pytest.raises(ValueError, match="logits processor must return"):
        ours.generate(IDS, max_new_tokens=3, logits_processor=[lambda ids, scores: scores[:1]])
    with pytest.raises(ValueError, match="no allowed id"):
        ours.generate(IDS, max_new_tokens=3, prefix_allowed_tokens_fn=lambda b, ids: [])
    with pytest.raises(ValueError, match="outside the vocabulary"):
        ours.generate(IDS, max_new_tokens=3, prefix_allowed_tokens_fn=lambda b, ids: [10 ** 9])
    with pytest.raises(ValueError, match="stopping criterion must return"):
        ours.generate(IDS, max_new_tokens=3, stopping_criteria=[lambda ids, scores: ids.float()])
    with pytest.raises(TypeError, match="logits_processor must be"):
        ours.generate(IDS, max_new_tokens=3, logits_processor=[1])
    with pytest.raises(NotImplementedError, match="beam search"):
        ours.generate(IDS, max_new_tokens=3, num_beams=2, logits_processor=[lambda ids, scores: scores])
    with pytest.raises(ValueError, match="compile"):
        ours.generate(IDS, max_new_tokens=3, compile=True, logits_processor=[lambda ids, scores: scores])


def test_hooked_generate_streams_and_stops_on_strings(pair):
    _, ours = pair

    class Collect:
        def __init__(self):
            self.chunks, self.ended = [], False

        def put(self, value):
            self.chunks.append(value.flatten().tolist())

        def end(self):
            self.ended = True

    class Digits:
        def decode(self, ids, *, skip_special_tokens=False):
            return " ".join(str(i) for i in ids)

    streamer = Collect()
    out = ours.generate(IDS[:1], max_new_tokens=6, streamer=streamer, logits_processor=[lambda ids, s: s])
    assert streamer.ended and streamer.chunks[0] == IDS[0].tolist()
    assert sum(streamer.chunks[1:], []) == out[0, 4:].tolist()
    free = ours.generate(IDS, max_new_tokens=8, eos_token_id=[])
    stop = Digits().decode(free[0, 4:7].tolist())  # row 0's first three new tokens, as text
    cut = ours.generate(IDS, max_new_tokens=8, eos_token_id=[], stop_strings=[stop], tokenizer=Digits(),
                        logits_processor=[lambda ids, s: s])
    assert torch.equal(cut[0, :7], free[0, :7]) and (cut[0, 7:] == 0).all()  # row 0 ends at the string
    assert torch.equal(cut[1], free[1, :cut.shape[1]])  # row 1 goes on
