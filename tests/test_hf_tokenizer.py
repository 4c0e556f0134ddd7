"""Tokenizer methods transformers users call, against transformers' tokenizer (issue 13, item 7)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import mllama

DEMO = Path(mllama.__file__).parent / "assets" / "demo-model"
TEXT = "How many sides does a triangle have?"


@pytest.fixture()
def pair():
    import transformers

    return transformers.AutoTokenizer.from_pretrained(DEMO), mllama.AutoTokenizer.from_pretrained(DEMO)


def test_tokenize_encode_tensors_and_special_tokens(pair):
    theirs, ours = pair
    assert ours.tokenize(TEXT) == theirs.tokenize(TEXT)
    assert torch.equal(ours.encode(TEXT, return_tensors="pt"), theirs.encode(TEXT, return_tensors="pt"))
    assert ours.encode(TEXT, return_tensors="np").shape == (1, len(ours.encode(TEXT)))
    assert set(ours.all_special_tokens) >= {"<|begin_of_text|>", "<|eot_id|>", "<|image|>"}
    assert set(ours.all_special_tokens) == set(theirs.all_special_tokens) | (set(ours.all_special_tokens)
                                                                              - set(theirs.all_special_tokens))


def test_add_tokens_and_special_tokens_like_transformers(pair):
    theirs, ours = pair
    for tok in pair:
        assert tok.add_tokens(["<shape>", "zorblax"]) == 2
        assert tok.add_tokens(["zorblax"]) == 0
        assert tok.add_special_tokens({"additional_special_tokens": ["<|mine|>"]}) == 1
    assert len(ours) == len(theirs)
    text = "a <shape> zorblax <|mine|> b"
    assert ours.encode(text) == theirs.encode(text)
    assert "<|mine|>" in ours.all_special_tokens
    assert ours.decode(ours.encode(text), skip_special_tokens=True) == theirs.decode(theirs.encode(text),
                                                                                   skip_special_tokens=True)


@pytest.mark.parametrize("side", ["left", "right"])
def test_pad_like_transformers(pair, side):
    theirs, ours = pair
    rows = [{"input_ids": ours.encode("hi")}, {"input_ids": ours.encode(TEXT)}]
    got = ours.pad(rows, padding_side=side, return_tensors="pt")
    ref = theirs.pad(rows, padding_side=side, return_tensors="pt")
    assert torch.equal(got["input_ids"], ref["input_ids"]) and torch.equal(got["attention_mask"], ref["attention_mask"])
    as_dict = ours.pad({"input_ids": [r["input_ids"] for r in rows]}, padding="max_length", max_length=20,
                       padding_side=side)
    assert [len(r) for r in as_dict["input_ids"]] == [20, 20]


def test_tokenizer_apply_chat_template_like_transformers(pair):
    theirs, ours = pair
    chat = [{"role": "user", "content": "How many sides does a square have?"}]
    for kwargs in ({"tokenize": False, "add_generation_prompt": True}, {"add_generation_prompt": True},
                   {"tokenize": False, "continue_final_message": True}):
        ref = theirs.apply_chat_template(chat, date_string="26 Jul 2024", **kwargs)
        got = ours.apply_chat_template(chat, date_string="26 Jul 2024", **kwargs)
        if not isinstance(ref, str) and hasattr(ref, "keys"):
            ref = ref["input_ids"]
        assert got == ref, kwargs
    ids = ours.apply_chat_template(chat, add_generation_prompt=True, return_tensors="pt")
    assert ids.shape[0] == 1 and ids[0, 0].item() == ours.bos_token_id and (ids == ours.bos_token_id).sum() == 1


def test_text_target_and_offsets_like_transformers(pair):
    theirs, ours = pair
    for text, target in (("Question: sides?", "Three."), (["hi", "How many sides?"], ["A", "Four sides."])):
        got = ours(text, text_target=target, return_offsets_mapping=True)
        ref = theirs(text, text_target=target, return_offsets_mapping=True)
        assert got["labels"] == ref["labels"] and got["input_ids"] == ref["input_ids"]
        assert [list(map(tuple, r)) for r in ([got["offset_mapping"]] if isinstance(text, str) else got["offset_mapping"])] \
            == [list(map(tuple, r)) for r in ([ref["offset_mapping"]] if isinstance(text, str) else ref["offset_mapping"])]
    padded = ours(["hi", "How many sides?"], padding=True, padding_side="left", return_offsets_mapping=True,
                  return_tensors="pt")
    ref = theirs(["hi", "How many sides?"], padding=True, padding_side="left", return_offsets_mapping=True,
                 return_tensors="pt")
    assert torch.equal(padded["offset_mapping"], ref["offset_mapping"])
