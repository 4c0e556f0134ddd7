"""The engine with vision_threads: a new image is encoded in a thread of its own, beside the decode
steps, on its share of torch's threads; every request still equals itself alone (requests at random
steps: tests/test_engine.py)."""

from __future__ import annotations

import threading
import time

import pytest
import torch
from test_engine import MAX_LEN, _alone, _request
from tiny import hf_pair

from mllama.engine import Engine
from mllama.vision_cache import VisionJob

THREADS = torch.get_num_threads()
needs_two = pytest.mark.skipif(THREADS < 2, reason="vision_threads needs torch to have 2 or more threads here")


@pytest.fixture(scope="module")
def models():
    return {name: hf_pair(name, seed=31)[1] for name in ("a", "b")}


def _vision_threads_alive() -> int:
    return sum(t.name == "mllama-vision" for t in threading.enumerate())


class _HeldEncode:
    """VisionJob._encode held at its start until released; records the worker's torch threads."""

    def __init__(self, monkeypatch) -> None:
        self.release, self.started = threading.Event(), threading.Event()
        self.threads: list[int] = []
        real = VisionJob._encode

        def held(job, j):
            self.threads.append(torch.get_num_threads())
            self.started.set()
            assert self.release.wait(30), "the test never released the encode"
            return real(job, j)

        monkeypatch.setattr(VisionJob, "_encode", held)


@needs_two
def test_decode_steps_go_on_while_an_image_encodes_in_its_thread(models, monkeypatch):
    """While the image is held in its thread the running stream gets a token at every step, on the
    threads the vision thread leaves; then the image request starts and equals itself alone."""
    model = models["b"]
    running = _request("b", length=5, seed=60, max_tokens=30)
    image = _request("b", length=8, tiles=[3, 2], image_at=[1, 4], seed=61, max_tokens=5)
    ref = _alone(model, image)
    held = _HeldEncode(monkeypatch)
    engine = Engine(model, max_slots=2, max_len=MAX_LEN, vision_threads=1, image_cache_bytes=0)
    first = engine.submit(running)
    engine.step()
    second = engine.submit(image)
    engine.step()  # admitted to the encoder
    engine.step()  # its thread started
    assert held.started.wait(30) and held.threads == [1]
    for _ in range(5):
        before = len(first.tokens)
        engine.step()
        assert len(first.tokens) == before + 1 and second.tokens == []
        assert torch.get_num_threads() == THREADS - 1 and _vision_threads_alive() == 1
    held.release.set()
    while not second.tokens:
        engine.step()
    assert torch.get_num_threads() == THREADS
    events = list(second)
    assert [e.token for e in events] == ref[0]
    assert (torch.stack([e.logits for e in events]) - ref[1]).abs().max().item() <= 1e-5
    assert first.result() == _alone(model, running)[0]


@needs_two
def test_stop_halts_an_image_encoding_in_its_thread(models, monkeypatch):
    """stop() does not return with the vision thread still working: the encode stops at its next
    module boundary, and the request, left queued, is encoded again once the engine runs again and
    equals itself alone."""
    model = models["a"]
    image = _request("a", length=6, tiles=[2], image_at=[1], seed=64, max_tokens=4)
    ref = _alone(model, image)
    held = _HeldEncode(monkeypatch)
    engine = Engine(model, max_slots=2, max_len=MAX_LEN, vision_threads=1, image_cache_bytes=0)
    engine.start()
    handle = engine.submit(image)
    assert held.started.wait(30)
    threading.Timer(0.2, held.release.set).start()  # while stop() waits for the vision thread
    engine.stop()
    assert _vision_threads_alive() == 0 and handle.tokens == []
    assert engine.num_waiting == 1 and not engine._encoding.vision_job.finished
    engine.start()
    try:
        events = list(handle)
    finally:
        engine.stop()
    assert len(held.threads) == 2  # encoded again from the start
    assert [e.token for e in events] == ref[0]
    assert (torch.stack([e.logits for e in events]) - ref[1]).abs().max().item() <= 1e-5


@needs_two
def test_an_idle_engine_lends_the_vision_thread_every_thread(models, monkeypatch):
    """Nobody decoding: a step waits for the image (no busy loop) and the vision thread runs on all
    of torch's threads; a text request arriving meanwhile starts at once."""
    model = models["b"]
    image = _request("b", length=8, tiles=[2], image_at=[1], seed=62, max_tokens=3)
    text = _request("b", length=6, seed=63, max_tokens=3)
    seen: list[int] = []
    layer = model.model.vision_model.transformer.layers[0]
    hook = layer.register_forward_hook(lambda m, a, out: seen.append(torch.get_num_threads())
                                       if threading.current_thread().name == "mllama-vision" else None)
    held = _HeldEncode(monkeypatch)
    try:
        engine = Engine(model, max_slots=2, max_len=MAX_LEN, vision_threads=1, image_cache_bytes=0)
        with_image = engine.submit(image)
        engine.step()  # admitted and started: nobody to decode, so this step waits for it
        assert held.started.wait(30)
        threading.Timer(0.3, held.release.set).start()
        engine.step()  # returns when the encode ends
        assert seen and seen[0] == THREADS  # lent every thread by its first layer
        text_only = engine.submit(text)
        with_image.result(), text_only.result()
        for handle, request in ((with_image, image), (text_only, text)):
            assert handle.tokens == _alone(model, request)[0]
    finally:
        hook.remove()


@needs_two
def test_cancel_of_an_image_in_its_thread(models, monkeypatch):
    """(A failing one: tests/test_engine.py.)"""
    model = models["b"]
    running = _request("b", length=5, seed=64, max_tokens=20)
    image = _request("b", length=8, tiles=[2], image_at=[1], seed=65, max_tokens=3)
    held = _HeldEncode(monkeypatch)
    engine = Engine(model, max_slots=2, max_len=MAX_LEN, vision_threads=1, image_cache_bytes=0)
    first = engine.submit(running)
    engine.step()
    second = engine.submit(image)
    engine.step()
    engine.step()
    assert held.started.wait(30) and _vision_threads_alive() == 1
    second.cancel()
    held.release.set()
    engine.step()
    assert second.finish_reason == "cancelled" and second.tokens == []
    assert _vision_threads_alive() == 0 and engine.num_waiting == 0
    engine.step()
    assert torch.get_num_threads() == THREADS
    assert first.result() == _alone(model, running)[0]


@needs_two
@pytest.mark.parametrize("cancel_next", [False, True])
def test_the_vision_thread_goes_on_to_the_next_image_without_a_step(models, monkeypatch, cancel_next):
    """Two image requests queued behind a decoding one: the second waits staged while the first
    encodes, and the vision thread starts it as the first ends, with no engine step in between.
    Cancelled while staged, it ends and is never encoded. Every request equals itself alone."""
    model = models["a"]
    running = _request("a", length=5, seed=66, max_tokens=40)
    images = [_request("a", length=6, tiles=[1 + i], image_at=[2], seed=67 + i, max_tokens=3) for i in range(2)]
    expected = [_alone(model, r)[0] for r in (running, *images)]
    release, encodes = threading.Event(), []
    real = VisionJob._encode

    def encode(job, j):
        encodes.append(job)
        if len(encodes) == 1:
            assert release.wait(30), "the test never released the first encode"
        return real(job, j)

    monkeypatch.setattr(VisionJob, "_encode", encode)
    engine = Engine(model, max_slots=3, max_len=MAX_LEN, vision_threads=1, image_cache_bytes=0)
    first = engine.submit(running)
    engine.step()
    handles = [engine.submit(r) for r in images]
    engine.step()  # the first image starts in its thread, the second is staged behind it
    assert engine.num_waiting == 2 and len(first.tokens) < 40
    if cancel_next:
        handles[1].cancel()
        engine.step()
        assert handles[1].finish_reason == "cancelled" and handles[1].tokens == []
    release.set()
    deadline = time.monotonic() + 30
    while len(encodes) < (1 if cancel_next else 2) or not encodes[-1].poll_ready:
        assert time.monotonic() < deadline, "the second image did not start without a step"
        time.sleep(0.01)
    time.sleep(0.1)
    assert len(encodes) == (1 if cancel_next else 2)
    while engine.has_work:
        engine.step()
    assert first.result() == expected[0] and handles[0].result() == expected[1]
    if not cancel_next:
        assert handles[1].result() == expected[2]
    assert _vision_threads_alive() == 0 and engine.num_waiting == 0
    assert torch.get_num_threads() == THREADS


@needs_two
def test_an_image_being_encoded_is_not_staged_twice(models, monkeypatch):
    """A request with the image the vision thread is encoding is not staged behind it: it waits for
    the image cache, so the image is encoded once; both equal themselves alone."""
    model = models["a"]
    running = _request("a", length=5, seed=68, max_tokens=30)
    first = _request("a", length=6, tiles=[2], image_at=[2], seed=69, max_tokens=3)
    again = _request("a", length=8, seed=70, max_tokens=3)
    again.input_ids[3] = first.input_ids[2]  # the same image at another place in another prompt
    for name in ("pixel_values", "aspect_ratio_ids", "aspect_ratio_mask"):
        setattr(again, name, getattr(first, name))
    again.cross_attention_mask = torch.zeros(8, *first.cross_attention_mask.shape[1:], dtype=torch.long)
    again.cross_attention_mask[3:] = first.cross_attention_mask[2]
    expected = [_alone(model, r)[0] for r in (running, first, again)]
    encodes = []
    real = VisionJob._encode
    monkeypatch.setattr(VisionJob, "_encode", lambda job, j: encodes.append(job) or real(job, j))
    engine = Engine(model, max_slots=3, max_len=MAX_LEN, vision_threads=1)
    handles = [engine.submit(running)]
    engine.step()
    handles += [engine.submit(first), engine.submit(again)]
    while engine.has_work:
        engine.step()
    assert [h.result() for h in handles] == expected
    assert len(encodes) == 1


def test_bad_vision_threads(models):
    from mllama import MllamaForConditionalGeneration
    from mllama.cli_serve import default_vision_threads
    from mllama.tp_engine import LockstepEngine

    for bad in (0, -1, THREADS):
        with pytest.raises(ValueError, match="vision_threads must be None or"):
            Engine(models["a"], max_slots=1, max_len=8, vision_threads=bad)
    with pytest.raises(ValueError, match="vision_threads cannot be used with tensor parallelism"):
        LockstepEngine(models["a"], max_slots=1, max_len=8, vision_threads=1)
    if THREADS >= 2:
        with torch.device("meta"):  # a model off the CPU
            elsewhere = MllamaForConditionalGeneration(models["a"].config)
        with pytest.raises(ValueError, match="this model is on meta"):
            Engine(elsewhere, max_slots=1, max_len=8, vision_threads=1)
    # serve's default: half the threads for a model on the CPU, the pieces elsewhere or when told 0
    assert default_vision_threads(None, device="cpu") == (THREADS // 2 or None)
    assert default_vision_threads(None, device="cuda") is None
    assert default_vision_threads(0, device="cpu") is None
