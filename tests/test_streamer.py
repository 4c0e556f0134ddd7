"""Streamers: text chunks while generate() runs in another thread, never a split character."""

from __future__ import annotations

import io
import threading
from pathlib import Path

import pytest
import torch
from PIL import Image

from mllama import MllamaForConditionalGeneration, MllamaProcessor, TextIteratorStreamer, TextStreamer
from test_examples import PHOTOS, _checkpoint


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _checkpoint(tmp_path_factory.mktemp("stream"), add_bos=False)


def test_iterator_streamer_from_a_thread_equals_decode(checkpoint):
    model = MllamaForConditionalGeneration.from_pretrained(checkpoint, dtype=torch.float32)
    processor = MllamaProcessor.from_pretrained(checkpoint)
    inputs = processor(text="<|image|>Describe", images=Image.open(PHOTOS / "coffee.png"), return_tensors="pt")
    streamer = TextIteratorStreamer(processor, skip_prompt=True, skip_special_tokens=True, timeout=120)
    result: dict[str, torch.Tensor] = {}
    worker = threading.Thread(target=lambda: result.update(
        out=model.generate(**inputs, max_new_tokens=24, do_sample=False, streamer=streamer)))
    worker.start()
    chunks = list(streamer)
    worker.join()
    new = result["out"][0, inputs["input_ids"].shape[1]:]
    assert len(new) > 0
    assert "".join(chunks) == processor.decode(new, skip_special_tokens=True)

    printed = io.StringIO()
    model.generate(**inputs, max_new_tokens=24, do_sample=False,
                   streamer=TextStreamer(processor, skip_prompt=True, skip_special_tokens=True, file=printed))
    assert printed.getvalue() == "".join(chunks) + "\n"


def test_streamer_never_splits_a_multibyte_character(checkpoint):
    processor = MllamaProcessor.from_pretrained(checkpoint)
    text = "naïve café 🙂 日本語 ok"
    ids = processor.tokenizer.encode(text, add_special_tokens=False)
    streamer = TextIteratorStreamer(processor)
    streamer.put(torch.tensor([ids[0]]))  # the first put() is the prompt
    for token in ids[1:]:
        streamer.put(torch.tensor([token]))
    streamer.end()
    chunks = list(streamer)
    assert "".join(chunks) == text
    assert all("\ufffd" not in chunk for chunk in chunks)
