"""Processor files and BatchFeature behaviour shared with transformers (issue 13, items 2 and 6)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import mllama

DEMO = Path(mllama.__file__).parent / "assets" / "demo-model"
PROMPT = "<|begin_of_text|><|image|>hi"  # with add_special_tokens=False both libraries keep it as it is
IMAGE = Image.fromarray(np.random.default_rng(0).integers(0, 255, (40, 30, 3), dtype=np.uint8))


def _same(a, b) -> None:
    assert set(a) == set(b)
    for key in a:
        x, y = np.asarray(a[key], dtype=np.float64), np.asarray(b[key], dtype=np.float64)
        assert x.shape == y.shape and np.allclose(x, y, atol=2e-2), key  # torch resize vs PIL: test_image_processing


def test_processor_saved_by_transformers_loads(tmp_path):
    import transformers

    transformers.AutoProcessor.from_pretrained(DEMO).save_pretrained(tmp_path)
    assert (tmp_path / "processor_config.json").exists() and not (tmp_path / "preprocessor_config.json").exists()
    ours = mllama.AutoProcessor.from_pretrained(tmp_path)
    ref = mllama.AutoProcessor.from_pretrained(DEMO)
    _same(ours(images=IMAGE, text="<|image|>hi", return_tensors="pt"),
          ref(images=IMAGE, text="<|image|>hi", return_tensors="pt"))
    (tmp_path / "processor_config.json").unlink()
    with pytest.raises(FileNotFoundError, match="processor_config.json"):
        mllama.AutoProcessor.from_pretrained(tmp_path)


def test_processor_saved_by_mllama_loads_in_transformers_as_a_processor(tmp_path):
    import transformers

    mllama.AutoProcessor.from_pretrained(DEMO).save_pretrained(tmp_path)
    theirs = transformers.AutoProcessor.from_pretrained(tmp_path)
    assert type(theirs).__name__ == "MllamaProcessor"
    _same(theirs(images=IMAGE, text="<|image|>hi", return_tensors="pt"),
          transformers.AutoProcessor.from_pretrained(DEMO)(images=IMAGE, text="<|image|>hi", return_tensors="pt"))
    assert type(mllama.AutoProcessor.from_pretrained(tmp_path)).__name__ == "MllamaProcessor"


def test_return_tensors_none_gives_lists_and_numpy_like_transformers():
    import transformers

    ours = mllama.AutoProcessor.from_pretrained(DEMO)(images=IMAGE, text=PROMPT, return_tensors=None,
                                                      add_special_tokens=False)
    ref = transformers.AutoProcessor.from_pretrained(DEMO)(images=IMAGE, text=PROMPT, return_tensors=None,
                                                      add_special_tokens=False)
    assert {k: type(v) for k, v in ours.items()} == {k: type(v) for k, v in ref.items()}
    _same(ours, ref)


def test_batch_feature_to_dtype_device_and_data():
    inputs = mllama.AutoProcessor.from_pretrained(DEMO)(images=IMAGE, text="<|image|>hi", return_tensors="pt")
    for moved in (inputs.to(torch.bfloat16), inputs.to("cpu", torch.bfloat16), inputs.to(dtype=torch.bfloat16),
                  inputs.to(torch.device("cpu"), dtype=torch.bfloat16)):
        assert moved.pixel_values.dtype == torch.bfloat16 and moved.input_ids.dtype == torch.long
        assert moved["aspect_ratio_ids"].dtype == inputs["aspect_ratio_ids"].dtype
    assert inputs.to("cpu").pixel_values.dtype == torch.float32
    assert isinstance(inputs.data, dict) and type(inputs.data) is dict and set(inputs.data) == set(inputs)
    with pytest.raises(TypeError, match="two dtypes"):
        inputs.to(torch.bfloat16, torch.float16)
    with pytest.raises(TypeError, match="device"):
        inputs.to(1.5)


CONVERSATION = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What shape is this?"}]},
                {"role": "assistant", "content": [{"type": "text", "text": "It is a"}]}]


def test_chat_template_options_like_transformers():
    import transformers

    ours = mllama.AutoProcessor.from_pretrained(DEMO)
    theirs = transformers.AutoProcessor.from_pretrained(DEMO)
    kwargs = {"continue_final_message": True}
    assert ours.apply_chat_template(CONVERSATION, **kwargs) == theirs.apply_chat_template(CONVERSATION, **kwargs)
    assert ours.apply_chat_template(CONVERSATION, **kwargs).endswith("It is a")
    with pytest.raises(ValueError, match="continue_final_message"):
        ours.apply_chat_template(CONVERSATION, continue_final_message=True, add_generation_prompt=True)
    batch = [[{"role": "user", "content": [{"type": "text", "text": "hi"}]}],
             [{"role": "user", "content": [{"type": "text", "text": "How many sides does a square have?"}]}]]
    for side in ("left", "right"):
        got = ours.apply_chat_template(batch, add_generation_prompt=True, tokenize=True, return_dict=True,
                                       padding=True, padding_side=side, return_tensors="pt")
        ref = theirs.apply_chat_template(batch, add_generation_prompt=True, tokenize=True, return_dict=True,
                                         padding=True, padding_side=side, return_tensors="pt")
        assert torch.equal(got["input_ids"], ref["input_ids"]), side
        assert torch.equal(got["attention_mask"], ref["attention_mask"]), side
    left = mllama.AutoProcessor.from_pretrained(DEMO, padding_side="left")
    assert left.tokenizer.padding_side == "left"
    no_mask = ours(text=["hi", "a longer text"], padding=True, return_attention_mask=False, return_tensors="pt")
    assert "attention_mask" not in no_mask and no_mask["input_ids"].shape[0] == 2


def test_images_kwargs_like_transformers():
    import transformers

    ours = mllama.AutoProcessor.from_pretrained(DEMO)
    theirs = transformers.AutoProcessor.from_pretrained(DEMO)
    big = Image.fromarray(np.random.default_rng(1).integers(0, 255, (200, 90, 3), dtype=np.uint8))
    options = {"images_kwargs": {"max_image_tiles": 2}, "add_special_tokens": False, "return_tensors": "pt"}
    got, ref = ours(images=big, text=PROMPT, **options), theirs(images=big, text=PROMPT, **options)
    assert got["pixel_values"].shape == ref["pixel_values"].shape and got["pixel_values"].shape[2] == 2
    # transformers keeps the configured 4 tiles in cross_attention_mask (extra columns all zero); mllama
    # sizes it like pixel_values, so the two always agree.
    assert not ref["cross_attention_mask"][..., 2:].any()
    ref["cross_attention_mask"] = ref["cross_attention_mask"][..., :2]
    _same(got, ref)
    with pytest.raises(TypeError):
        ours(images=big, text=PROMPT, images_kwargs={"not_an_option": 1})
