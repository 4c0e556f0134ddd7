"""Bad inputs get named errors (ValueError/TypeError naming the argument and the rule), never hangs,
crashes deep inside torch, or allocations sized by a absurd argument (issue 14)."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch

from mllama import MllamaConfig, MllamaForCausalLM, MllamaForConditionalGeneration
from tiny import CONFIGS


def _model(max_positions: int = 32) -> MllamaForConditionalGeneration:
    config = copy.deepcopy(CONFIGS["a"])
    config["text_config"]["max_position_embeddings"] = max_positions
    torch.manual_seed(0)
    return MllamaForConditionalGeneration(MllamaConfig.from_dict(config)).eval()


@pytest.fixture(scope="module")
def model() -> MllamaForConditionalGeneration:
    return _model()


IDS = torch.tensor([[1, 5, 6, 7]])


@pytest.mark.parametrize("kwargs, error, match", [
    (dict(max_new_tokens=-1), ValueError, "max_new_tokens must be >= 0"),
    (dict(max_new_tokens=1.5), TypeError, "max_new_tokens must be an int"),
    (dict(max_new_tokens=10**9), ValueError, "max_new_tokens=1000000000 can never be reached"),
    (dict(max_new_tokens=2, do_sample=True, top_k=-1), ValueError, "top_k must be >= 0"),
    (dict(max_new_tokens=2, do_sample=True, min_p=1.5), ValueError, r"min_p must be in \[0, 1\]"),
    (dict(max_new_tokens=2, do_sample=True, min_p=-0.1), ValueError, r"min_p must be in \[0, 1\]"),
    (dict(max_new_tokens=2, do_sample=True, top_p=0.0), ValueError, r"top_p must be in \(0, 1\]"),
    (dict(max_new_tokens=2, do_sample=True, top_p=1.5), ValueError, r"top_p must be in \(0, 1\]"),
    (dict(max_new_tokens=2, do_sample=True, temperature=0.0), ValueError, "temperature must be > 0"),
    (dict(max_new_tokens=2, do_sample=True, temperature=-1.0), ValueError, "temperature must be > 0"),
    (dict(max_new_tokens=2, repetition_penalty=0.0), ValueError, "repetition_penalty must be > 0"),
    (dict(max_new_tokens=2, repetition_penalty=-1.0), ValueError, "repetition_penalty must be > 0"),
    (dict(max_new_tokens=2, top_k=2.5, do_sample=True), TypeError, "top_k must be an int"),
    (dict(max_length=3), ValueError, "the prompt has 4 tokens but max_length is 3"),
    (dict(max_length=4), ValueError, "the prompt has 4 tokens but max_length is 4"),
])
def test_generate_rejects_bad_arguments(model, kwargs, error, match):
    with pytest.raises(error, match=match):
        model.generate(IDS, **kwargs)


@pytest.mark.parametrize("ids, error, match", [
    ([[1, 5, 6]], TypeError, "input_ids must be a torch.Tensor"),
    (torch.zeros(1, 0, dtype=torch.long), ValueError, "input_ids is empty"),
    (torch.zeros(0, 3, dtype=torch.long), ValueError, "input_ids is empty"),
    (torch.tensor([1, 5, 6]), ValueError, r"input_ids must be \(batch, seq\)"),
    (torch.ones(1, 3), TypeError, "integer tensor"),
])
def test_generate_rejects_bad_input_ids(model, ids, error, match):
    with pytest.raises(error, match=match):
        model.generate(ids, max_new_tokens=2)


def test_generate_refuses_prompts_longer_than_the_positions_and_trims_output_to_them(model):
    with pytest.raises(ValueError, match="more than the model's max_position_embeddings"):
        model.generate(torch.ones(1, 33, dtype=torch.long), max_new_tokens=1)
    prompt = torch.ones(1, 30, dtype=torch.long)
    with pytest.warns(UserWarning, match="generating at most 2 tokens"):
        out = model.generate(prompt, max_new_tokens=20, eos_token_id=[])
    assert out.shape == (1, 32)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert model.generate(prompt, max_new_tokens=2, eos_token_id=[]).shape == (1, 32)


def test_huge_max_new_tokens_sizes_the_cache_by_the_positions(monkeypatch):
    big = _model(max_positions=64)
    seen = []
    from mllama import generate as generate_module

    real = generate_module.Engine

    def spy(*args, **kwargs):
        seen.append(kwargs["max_len"])
        return real(*args, **kwargs)

    monkeypatch.setattr(generate_module, "Engine", spy)
    with pytest.warns(UserWarning, match="exceeds max_position_embeddings"):
        out = big.generate(IDS, max_new_tokens=64, eos_token_id=[])
    assert seen == [64] and out.shape == (1, 64)


@pytest.mark.parametrize("kwargs, error, match", [
    (dict(input_ids=torch.zeros(1, 0, dtype=torch.long)), ValueError, "input_ids is empty"),
    (dict(input_ids=torch.zeros(0, 4, dtype=torch.long)), ValueError, "input_ids is empty"),
    (dict(input_ids=torch.tensor([1, 2, 3])), ValueError, "input_ids must be 2-D"),
    (dict(input_ids=[[1, 2, 3]]), TypeError, "input_ids must be a torch.Tensor"),
    (dict(inputs_embeds=torch.zeros(1, 3, 7)), ValueError, r"inputs_embeds must be \(batch, seq, hidden_size=64\)"),
    (dict(inputs_embeds=torch.zeros(1, 3, 64, dtype=torch.long)), TypeError, "floating-point"),
    (dict(input_ids=IDS, labels=torch.tensor([[1, 2]])), ValueError, r"labels must be a tensor shaped like input_ids \(1, 4\)"),
])
@pytest.mark.parametrize("causal", [False, True])
def test_forward_rejects_bad_inputs(model, kwargs, error, match, causal):
    target = MllamaForCausalLM(model.config) if causal else model
    with pytest.raises(error, match=match):
        target(**kwargs)
