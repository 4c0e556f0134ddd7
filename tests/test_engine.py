"""The engine: requests batched at random steps equal each request alone; slots, queue, cancel,
seeded sampling, stop strings, image cache, prefix cache (chat follow-ups), chunked prefill, streams
from threads and asyncio."""

from __future__ import annotations

import asyncio
import random
import threading
from dataclasses import replace

import pytest
import torch

from mllama.engine import Engine
from mllama.engine_prepare import ENCODED_AHEAD
from mllama.request import Request, SamplingParams
from mllama.vision_cache import VisionJob
from mllama.vision_cache import ImageCache
from tiny import cross_mask, hf_pair, random_images, tiny_config

MAX_LEN = 64


@pytest.fixture(scope="module")
def models():
    return {name: hf_pair(name, seed=31)[1] for name in ("a", "b")}


def _request(name: str, *, length: int, tiles: list[int] = (), image_at: list[int] = (), seed: int = 0,
             extra_image_slot: bool = False, **params) -> Request:
    """A prompt of random ids (BOS first, <|image|> at image_at) with images of the given tile counts."""
    config = tiny_config(name)
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, config.text_config.vocab_size, (length,), generator=gen)
    ids[0] = 1
    for pos in image_at:
        ids[pos] = config.image_token_index
    params.setdefault("return_logits", True)
    request = Request(input_ids=ids, sampling=SamplingParams(**params))
    if tiles:
        images = random_images(config, [list(tiles)], seed=seed)
        cam = cross_mask([list(tiles)], [list(image_at)], length, config.vision_config.max_num_tiles)[0]
        pv, ar_ids, ar_mask = images["pixel_values"][0], images["aspect_ratio_ids"][0], images["aspect_ratio_mask"][0]
        if extra_image_slot:  # a padded image slot, as a batch with more images in another row has
            pv, ar_ids = torch.cat([pv, torch.zeros_like(pv[:1])]), torch.cat([ar_ids, torch.zeros(1, dtype=torch.long)])
            ar_mask, cam = torch.cat([ar_mask, torch.zeros_like(ar_mask[:1])]), torch.cat([cam, torch.zeros_like(cam[:, :1])], 1)
        request.pixel_values, request.aspect_ratio_ids, request.aspect_ratio_mask = pv, ar_ids, ar_mask
        request.cross_attention_mask = cam
    return request


def _alone(model, request: Request, **engine_kwargs) -> tuple[list[int], torch.Tensor]:
    kwargs = dict(max_slots=1, max_len=MAX_LEN, prefill_chunk=1000) | engine_kwargs
    events = list(Engine(model, **kwargs).submit(request))
    tokens = [e.token for e in events if e.token is not None]
    logits = torch.stack([e.logits for e in events if e.logits is not None]) if events[0].logits is not None else None
    return tokens, logits


def _run_schedule(engine: Engine, schedule: list[tuple[int, Request]]):
    """Submit each request at its step; step until all are done. Returns the handles in order."""
    pending = sorted(schedule, key=lambda x: x[0])
    handles, step = [], 0
    while pending or engine.has_work:
        while pending and pending[0][0] <= step:
            handles.append(engine.submit(pending.pop(0)[1]))
        engine.step()
        step += 1
    return handles


def _mixed_requests(name: str, rng: random.Random) -> list[Request]:
    max_tiles = tiny_config(name).vision_config.max_num_tiles
    out = []
    for i in range(7):
        length = rng.randint(3, 14)
        kind = i % 4
        tiles, at = [], []
        if kind == 1:  # one image, maybe with padded tiles, maybe after some text
            tiles, at = [rng.randint(1, max_tiles)], [rng.randint(1, length - 1)]
        elif kind == 2:  # two images
            first = rng.randint(1, length - 2)
            tiles, at = [rng.randint(1, max_tiles), rng.randint(1, max_tiles)], [first, rng.randint(first + 1, length - 1)]
        elif kind == 3 and length > 3:  # one image plus a padded image slot
            tiles, at = [max_tiles], [1]
        out.append(_request(name, length=length, tiles=tiles, image_at=at, seed=100 + i,
                            extra_image_slot=kind == 3, max_tokens=rng.randint(1, 12)))
    return out


@pytest.mark.parametrize("vision_threads", [None, 1])
@pytest.mark.parametrize("name", ["a", "b"])
def test_requests_at_random_steps_equal_each_request_alone(models, name, vision_threads):
    """vision_threads=1: the images encoded in a thread of their own beside the steps."""
    if vision_threads is not None and torch.get_num_threads() < 2:
        pytest.skip("vision_threads needs torch to have 2 or more threads here")
    model = models[name]
    rng = random.Random(7)
    requests = _mixed_requests(name, rng)
    schedule = [(rng.randint(0, 12), r) for r in requests]
    engine = Engine(model, max_slots=3, max_len=MAX_LEN, prefill_chunk=3, vision_threads=vision_threads)
    handles = _run_schedule(engine, schedule)
    by_request = {id(r): h for (_, r), h in zip(sorted(schedule, key=lambda x: x[0]), handles)}
    for request in requests:
        events = list(by_request[id(request)])
        tokens = [e.token for e in events]
        logits = torch.stack([e.logits for e in events])
        ref_tokens, ref_logits = _alone(model, request)
        assert tokens == ref_tokens
        assert len(tokens) == request.sampling.max_tokens
        assert (logits - ref_logits).abs().max().item() <= 1e-5
    assert engine.num_decoding == 0 and not engine.has_work
    assert not any(t.name == "mllama-vision" for t in threading.enumerate())
    assert torch.get_num_threads() == engine._threads  # the stepping thread has its threads back


def test_engine_alone_equals_full_uncached_forward(models):
    model = models["b"]
    request = _request("b", length=9, tiles=[3, 2], image_at=[2, 5], seed=3, max_tokens=6)
    tokens, logits = _alone(model, request, prefill_chunk=4)
    seq = torch.cat([request.input_ids, torch.tensor(tokens)])
    s = request.input_ids.numel()
    cam = request.cross_attention_mask
    for step in range(len(tokens)):
        n = s + step
        full_cam = torch.cat([cam, cam[-1:].expand(step, -1, -1)])
        with torch.no_grad():
            ref = model(seq[None, :n], pixel_values=request.pixel_values[None],
                        aspect_ratio_ids=request.aspect_ratio_ids[None],
                        aspect_ratio_mask=request.aspect_ratio_mask[None],
                        cross_attention_mask=full_cam[None]).logits[0, -1]
        assert (ref - logits[step]).abs().max().item() <= 1e-5


def test_chunked_prefill_equals_monolithic_prefill(models):
    model = models["a"]
    request = _request("a", length=20, tiles=[2], image_at=[6], seed=4, max_tokens=5)
    tokens, logits = _alone(model, request, prefill_chunk=1000)
    for chunk in (1, 3, 7):
        chunked_tokens, chunked_logits = _alone(model, request, prefill_chunk=chunk)
        assert chunked_tokens == tokens
        assert (chunked_logits - logits).abs().max().item() <= 1e-5


def test_vision_in_layer_pieces_between_decode_steps_equals_whole_images(models):
    model = models["b"]
    running = _request("b", length=5, seed=40, max_tokens=30)
    request = _request("b", length=8, tiles=[3, 4], image_at=[1, 4], seed=41, max_tokens=5)
    whole_tokens, whole_logits = _alone(model, request, vision_piece_layers=None)
    engine = Engine(model, max_slots=2, max_len=MAX_LEN, vision_piece_layers=1, image_cache_bytes=0)
    first = engine.submit(running)
    engine.step()
    second = engine.submit(request)
    steps = 0
    while not second.tokens:
        before = len(first.tokens)
        engine.step()
        steps += 1
        assert len(first.tokens) == before + 1  # the running stream got a token at every step
    # 6 vision layers per image (4 local + 2 global), one per step, then one prompt chunk.
    assert steps == 2 * 6 + 1
    events = list(second)
    assert [e.token for e in events] == whole_tokens
    assert (torch.stack([e.logits for e in events]) - whole_logits).abs().max().item() <= 1e-5


def test_cancel_during_a_paused_vision_forward(models):
    model = models["b"]
    running = _request("b", length=5, seed=42, max_tokens=30)
    request = _request("b", length=8, tiles=[2], image_at=[1], seed=43, max_tokens=5)
    engine = Engine(model, max_slots=2, max_len=MAX_LEN, vision_piece_layers=1)
    first = engine.submit(running)
    engine.step()
    second = engine.submit(request)
    engine.step()
    engine.step()  # the image's vision forward is now paused after its first layers
    assert any(t.name == "mllama-vision" for t in threading.enumerate())
    second.cancel()
    engine.step()
    assert second.finish_reason == "cancelled" and second.tokens == []
    assert not any(t.name == "mllama-vision" for t in threading.enumerate())
    assert first.result() == _alone(model, running)[0]
    assert _alone(model, request)[0] == _alone(model, request, vision_piece_layers=None)[0]


@pytest.mark.parametrize("vision_threads", [None, 1])
@pytest.mark.parametrize("others_decoding", [True, False])
def test_a_failing_vision_piece_ends_only_its_own_request(models, monkeypatch, others_decoding, vision_threads):
    """An image whose vision work raises (in a piece between steps, in pieces back to back with nobody
    decoding, or in a thread of its own) ends its request with that error; the others decode on and
    equal themselves alone."""
    if vision_threads is not None and torch.get_num_threads() < 2:
        pytest.skip("vision_threads needs torch to have 2 or more threads here")
    model = models["b"]
    running = _request("b", length=5, seed=44, max_tokens=12)
    image = _request("b", length=8, tiles=[2], image_at=[1], seed=45, max_tokens=3)
    after = _request("b", length=6, seed=46, max_tokens=3)
    expected = [_alone(model, r)[0] for r in (running, after)]

    def broken(job, j):
        raise RuntimeError("the vision tower broke")

    monkeypatch.setattr(VisionJob, "_encode", broken)
    engine = Engine(model, max_slots=2, max_len=MAX_LEN, vision_piece_layers=1, image_cache_bytes=0,
                    vision_threads=vision_threads)
    first = engine.submit(running) if others_decoding else None
    engine.step()
    handle = engine.submit(image)
    while engine.has_work:
        engine.step()
    with pytest.raises(RuntimeError, match="the vision tower broke"):
        handle.result()
    assert handle.finish_reason == "error" and engine.num_waiting == 0
    assert not any(t.name == "mllama-vision" for t in threading.enumerate())
    if first is not None:
        assert first.result() == expected[0]
    assert engine.submit(after).result() == expected[1]  # the engine serves on
    assert torch.get_num_threads() == engine._threads


def test_text_requests_do_not_wait_behind_an_image(models):
    """A text request queued after one with an image starts (and decodes) while that image is still
    in the vision encoder, a piece per step; every request equals itself alone."""
    model = models["b"]
    running = _request("b", length=5, seed=50, max_tokens=30)
    image = _request("b", length=8, tiles=[2], image_at=[1], seed=51, max_tokens=5)
    text = _request("b", length=6, seed=52, max_tokens=5)
    engine = Engine(model, max_slots=3, max_len=MAX_LEN, vision_piece_layers=1)
    first = engine.submit(running)
    engine.step()
    with_image, text_only = engine.submit(image), engine.submit(text)
    engine.step()  # the image to the encoder, the text prompt into this decode step
    engine.step()
    assert len(text_only.tokens) >= 1 and engine.num_decoding == 2
    assert with_image.tokens == [] and engine.num_waiting == 1  # its vision forward is paused mid-way
    assert any(t.name == "mllama-vision" for t in threading.enumerate())
    for handle, request in ((first, running), (with_image, image), (text_only, text)):
        assert handle.result() == _alone(model, request)[0]


@pytest.mark.parametrize("cancel_encoded", [False, True])
def test_the_encoder_goes_on_while_encoded_requests_wait_for_a_slot(models, monkeypatch, cancel_encoded):
    """With the one slot busy, queued image requests are encoded meanwhile, ENCODED_AHEAD of them (each
    holds its cross K/V until its turn); then each takes the slot in turn and equals itself alone. One
    cancelled while it waits encoded ends at once; the others are unaffected."""
    model = models["a"]
    started: list[VisionJob] = []
    real_encode = VisionJob._encode

    def encode(job, j):
        started.append(job)
        return real_encode(job, j)

    monkeypatch.setattr(VisionJob, "_encode", encode)
    running = _request("a", length=5, seed=90, max_tokens=40)
    images = [_request("a", length=6, tiles=[1 + i % 2], image_at=[2], seed=91 + i, max_tokens=3)
              for i in range(ENCODED_AHEAD + 1)]
    expected = [_alone(model, r)[0] for r in (running, *images)]
    started.clear()
    engine = Engine(model, max_slots=1, max_len=MAX_LEN, vision_piece_layers=None)
    first = engine.submit(running)
    engine.step()
    handles = [engine.submit(r) for r in images]
    for _ in range(8):
        engine.step()
    assert len(first.tokens) < 40 and engine.num_decoding == 1  # the slot is still busy
    assert len(started) == ENCODED_AHEAD and all(job.finished for job in started)
    assert engine.num_waiting == len(images)
    if cancel_encoded:
        handles[0].cancel()
        engine.step()
        assert handles[0].finish_reason == "cancelled" and handles[0].tokens == []
        assert len(started) == ENCODED_AHEAD + 1  # the next image took the place it left
    while engine.has_work:
        engine.step()
    assert first.result() == expected[0]
    for i, (handle, tokens) in enumerate(zip(handles, expected[1:])):
        if not (cancel_encoded and i == 0):
            assert handle.result() == tokens
    assert engine.num_waiting == 0 and len({id(job) for job in started}) == len(images)


def test_an_image_and_arriving_prompts_take_turns(models, monkeypatch):
    """While text requests keep arriving, an image's vision pieces and their prompts take turns (two
    vision pieces to one prompt): neither waits for the other to end. Results equal each alone."""
    model = models["b"]
    pieces = []
    real = VisionJob.run_piece
    monkeypatch.setattr(VisionJob, "run_piece", lambda self, **kw: pieces.append(1) or real(self, **kw))
    running = _request("b", length=5, seed=60, max_tokens=40)
    image = _request("b", length=8, tiles=[2], image_at=[1], seed=61, max_tokens=4)
    texts = [_request("b", length=5 + i, seed=62 + i, max_tokens=3) for i in range(6)]
    engine = Engine(model, max_slots=10, max_len=MAX_LEN, vision_piece_layers=1)
    first = engine.submit(running)
    engine.step()
    handles = [engine.submit(image)]
    for text in texts:  # a text request arrives at every step: prompt work is never missing
        handles.append(engine.submit(text))
        engine.step()
    assert len(pieces) == 4  # prompt, vision, vision, prompt, vision, vision
    assert sum(bool(h.tokens) for h in handles[1:]) >= 2 and not handles[0].tokens
    for handle, request in zip([first] + handles, [running, image] + texts):
        assert handle.result() == _alone(model, request)[0]


def test_prefill_sized_by_a_time_budget_equals_alone(models):
    model = models["a"]
    running = _request("a", length=4, seed=44, max_tokens=40)
    request = _request("a", length=40, tiles=[2], image_at=[3], seed=45, max_tokens=6)
    engine = Engine(model, max_slots=2, max_len=MAX_LEN, prefill_budget_s=1e-9)  # smallest chunks: 8 tokens
    first = engine.submit(running)
    engine.step()
    second = engine.submit(request)
    steps = 0
    while not second.tokens:
        before = len(first.tokens)
        engine.step()
        steps += 1
        assert len(first.tokens) == before + 1  # the running stream got a token at every step
    # The vision forward pauses at every module boundary (the budget is always spent): more steps
    # than its 3 + 1 layers, then 8-token chunks (the rate was measured on the first prefill).
    layers = 4
    assert steps > 2 * layers + 40 // 8
    events = list(second)
    ref_tokens, ref_logits = _alone(model, request)
    assert [e.token for e in events] == ref_tokens
    assert (torch.stack([e.logits for e in events]) - ref_logits).abs().max().item() <= 1e-5
    first.cancel()
    with pytest.raises(ValueError, match="prefill_budget_s"):
        Engine(model, max_slots=1, max_len=8, prefill_budget_s=0.0)


def test_budget_ratio_follows_the_decode_step(models):
    """prefill_budget_ratio bounds a new request's work per step by a multiple of that step's decode
    (at least MIN_BUDGET_S), prefill_budget_s still caps it; an image request prepared under the
    ratio gives what it gives alone while the running stream gets a token every step."""
    from mllama.engine_prepare import MIN_BUDGET_S

    model = models["a"]
    running = _request("a", length=4, seed=46, max_tokens=60)
    request = _request("a", length=30, tiles=[2], image_at=[3], seed=47, max_tokens=6)
    engine = Engine(model, max_slots=2, max_len=MAX_LEN, prefill_budget_s=5.0, prefill_budget_ratio=3.0)
    assert engine._budget_s() is None  # nobody decoding: nothing to keep waiting
    first = engine.submit(running)
    engine.step()
    engine.step()
    assert engine._decode_s is not None and engine._decode_s > 0
    assert engine._budget_s() == max(MIN_BUDGET_S, 3.0 * engine._decode_s)
    engine.prefill_budget_ratio = 1e9
    assert engine._budget_s() == 5.0
    engine.prefill_budget_ratio = 1e-9
    assert engine._budget_s() == MIN_BUDGET_S
    second = engine.submit(request)
    while not second.tokens:
        before = len(first.tokens)
        engine.step()
        assert len(first.tokens) == before + 1
    events = list(second)
    ref_tokens, ref_logits = _alone(model, request)
    assert [e.token for e in events] == ref_tokens
    assert (torch.stack([e.logits for e in events]) - ref_logits).abs().max().item() <= 1e-5
    first.cancel()
    for bad in (0.0, -1.0):
        with pytest.raises(ValueError, match="prefill_budget_ratio"):
            Engine(model, max_slots=1, max_len=8, prefill_budget_ratio=bad)


def test_seeded_sampling_is_independent_of_the_batch(models):
    model = models["a"]
    sampled = dict(temperature=1.3, top_k=30, top_p=0.9, min_p=0.02, repetition_penalty=1.3, max_tokens=12)
    target = _request("a", length=6, tiles=[1], image_at=[1], seed=5, **sampled)
    target.sampling.seed = 1234
    alone, _ = _alone(model, target)
    others = [_request("a", length=4 + i, seed=50 + i, temperature=1.0, max_tokens=8 + i) for i in range(3)]
    others.append(_request("a", length=5, tiles=[2], image_at=[2], seed=60, max_tokens=10))
    engine = Engine(model, max_slots=4, max_len=MAX_LEN, prefill_chunk=2)
    handles = _run_schedule(engine, [(0, others[0]), (1, others[1]), (2, target), (3, others[2]), (9, others[3])])
    assert handles[2].result() == alone
    other_seed = replace(target, sampling=replace(target.sampling, seed=999))
    assert _alone(model, other_seed)[0] != alone


def test_queue_beyond_max_slots_is_fifo(models):
    model = models["a"]
    requests = [_request("a", length=5 + i, seed=70 + i, max_tokens=4) for i in range(4)]
    engine = Engine(model, max_slots=2, max_len=MAX_LEN)
    handles = [engine.submit(r) for r in requests]
    assert engine.num_waiting == 4
    first_token_step = {}
    step = 0
    while engine.has_work:
        engine.step()
        step += 1
        assert engine.num_decoding <= 2
        for i, h in enumerate(handles):
            if h.tokens and i not in first_token_step:
                first_token_step[i] = step
    assert [first_token_step[i] for i in range(4)] == sorted(first_token_step.values())
    assert first_token_step[2] > first_token_step[1]
    for r, h in zip(requests, handles):
        assert h.result() == _alone(model, r)[0]


def test_cancel_frees_the_slot_within_one_step(models):
    model = models["b"]
    requests = [_request("b", length=6 + i, tiles=[i + 1] if i % 2 else [], image_at=[1] if i % 2 else [],
                         seed=80 + i, max_tokens=20) for i in range(3)]
    engine = Engine(model, max_slots=2, max_len=MAX_LEN)
    handles = [engine.submit(r) for r in requests]
    for _ in range(6):
        engine.step()
    assert engine.num_decoding == 2 and engine.num_waiting == 1
    handles[0].cancel()
    engine.step()
    assert handles[0].finish_reason == "cancelled"
    assert engine.num_waiting == 0  # the queued request took the freed slot in that same step
    # The request moved into the freed slot and the newcomer still decode exactly as alone.
    for r, h in zip(requests[1:], handles[1:]):
        assert h.result() == _alone(model, r)[0]
    assert len(handles[0].tokens) < 20
    handles[0].cancel()  # cancelling a finished request is harmless
    assert not engine.step()


def test_stop_ids_and_max_len_finish_requests(models):
    model = models["a"]
    request = _request("a", length=5, seed=90, max_tokens=12)
    free, _ = _alone(model, request)
    stop = free[4]
    stopped = replace(request, sampling=replace(request.sampling, stop_token_ids=(stop,)))
    handle = Engine(model, max_slots=1, max_len=MAX_LEN).submit(stopped)
    assert handle.result() == free[:free.index(stop) + 1] and handle.finish_reason == "stop"
    short = Engine(model, max_slots=1, max_len=8).submit(request)
    assert short.result() == free[:4] and short.finish_reason == "length"  # 5 prompt + 3 decoded fill 8


class _PairDecoder:
    """Every id decodes to two letters, so a two-letter stop string can straddle two tokens."""

    def decode(self, ids, *, skip_special_tokens: bool = False) -> str:
        return "".join("abcdefgh"[i % 8] + "ABCDEFGH"[(i // 8) % 8] for i in ids)


def test_stop_string_split_across_tokens(models):
    model = models["a"]
    request = _request("a", length=5, seed=91, max_tokens=12, skip_special_tokens=False)
    free, _ = _alone(model, request)
    text = _PairDecoder().decode(free)
    stop = text[5:7]  # second letter of token 2, first of token 3
    first = text.index(stop)
    assert first % 2 == 1, "test needs a stop string that straddles two tokens"
    end_token = (first + 1) // 2 + 1
    engine = Engine(model, max_slots=2, max_len=MAX_LEN, tokenizer=_PairDecoder())
    handle = engine.submit(replace(request, sampling=replace(request.sampling, stop_strings=(stop,))))
    events = list(handle)
    assert [e.token for e in events] == free[:end_token]
    assert events[-1].finish_reason == "stop"
    assert "".join(e.text for e in events) == _PairDecoder().decode(free[:end_token])


def test_logprobs_of_chosen_and_top_tokens(models):
    model = models["a"]
    request = _request("a", length=6, seed=92, max_tokens=4, logprobs=3)
    for event in Engine(model, max_slots=1, max_len=MAX_LEN).submit(request):
        reference = event.logits.log_softmax(-1)
        assert event.logprob == pytest.approx(reference[event.token].item(), abs=1e-6)
        assert [i for i, _ in event.top_logprobs] == reference.topk(3).indices.tolist()
        assert event.top_logprobs[0][0] == event.token  # greedy picks the most likely id


def test_image_cache_reuses_encoded_images_exactly(models):
    model = models["b"]
    first = _request("b", length=7, tiles=[3], image_at=[1], seed=93, max_tokens=6)
    follow_up = _request("b", length=10, tiles=[3], image_at=[1], seed=93, max_tokens=6)
    follow_up.input_ids[3:] = torch.arange(10, 17)  # another question about the same image
    engine = Engine(model, max_slots=2, max_len=MAX_LEN)
    engine.submit(first).result()
    assert engine.image_cache.misses == 1 and len(engine.image_cache) == 1
    tokens, logits = [], []
    for event in engine.submit(follow_up):
        tokens.append(event.token)
        logits.append(event.logits)
    assert engine.image_cache.hits == 1
    fresh_tokens, fresh_logits = _alone(model, follow_up, image_cache_bytes=0)
    assert tokens == fresh_tokens
    assert (torch.stack(logits) - fresh_logits).abs().max().item() <= 1e-5


def test_image_cache_evicts_least_recently_used_within_budget():
    kv = {0: (torch.zeros(10), torch.zeros(10))}  # 80 bytes an entry
    cache = ImageCache(max_bytes=200)
    cache.put(b"a", kv)
    cache.put(b"b", kv)
    assert cache.get(b"a") is kv  # a is now the most recent
    cache.put(b"c", kv)
    assert cache.get(b"b") is None and cache.get(b"a") is kv and cache.get(b"c") is kv
    assert cache.bytes == 160
    cache.put(b"huge", {0: (torch.zeros(100), torch.zeros(100))})  # over the budget: not kept
    assert cache.get(b"huge") is None and len(cache) == 2
    with pytest.raises(ValueError, match="budget"):
        ImageCache(-1)


def test_streams_from_threads_and_asyncio(models):
    model = models["a"]
    requests = [_request("a", length=4 + i, tiles=[1] if i == 1 else [], image_at=[1] if i == 1 else [],
                         seed=94 + i, max_tokens=6 + i) for i in range(3)]
    expected = [_alone(model, r)[0] for r in requests]
    engine = Engine(model, max_slots=2, max_len=MAX_LEN)
    engine.start()
    try:
        results: dict[int, list[int]] = {}
        threads = [threading.Thread(target=lambda i=i: results.update({i: [e.token for e in engine.submit(requests[i])]}))
                   for i in range(3)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=120)
        assert [results[i] for i in range(3)] == expected

        async def consume(request: Request) -> list[int]:
            return [event.token async for event in engine.submit(request)]

        async def main():
            return await asyncio.gather(*(consume(r) for r in requests))

        assert asyncio.run(main()) == expected
    finally:
        engine.stop()
    assert not engine.running


def test_asyncio_without_a_thread_drives_the_engine(models):
    model = models["a"]
    request = _request("a", length=5, seed=97, max_tokens=5)
    engine = Engine(model, max_slots=1, max_len=MAX_LEN)

    async def main():
        return [event.token async for event in engine.submit(request)]

    assert asyncio.run(main()) == _alone(model, request)[0]


def test_bad_requests(models):
    from mllama import MllamaForCausalLM

    model = models["a"]
    engine = Engine(model, max_slots=1, max_len=16)
    with pytest.raises(ValueError, match="non-empty"):
        engine.submit(Request(input_ids=[]))
    with pytest.raises(ValueError, match="1-d"):
        engine.submit(Request(input_ids=torch.ones(2, 3, dtype=torch.long)))
    with pytest.raises(TypeError, match="integer"):
        engine.submit(Request(input_ids=torch.ones(3)))
    with pytest.raises(ValueError, match="out of range"):
        engine.submit(Request(input_ids=[1, 500]))
    with pytest.raises(ValueError, match="max_len"):
        engine.submit(Request(input_ids=list(range(1, 18))))
    for bad in (dict(temperature=-1.0), dict(top_p=0.0), dict(top_k=-1), dict(max_tokens=0), dict(min_p=2.0),
                dict(repetition_penalty=0.0), dict(logprobs=-1)):
        with pytest.raises(ValueError, match=next(iter(bad))):
            engine.submit(Request(input_ids=[1, 2], sampling=SamplingParams(**bad)))
    with pytest.raises(ValueError, match="tokenizer"):
        engine.submit(Request(input_ids=[1, 2], sampling=SamplingParams(stop_strings=("x",))))
    good = _request("a", length=6, tiles=[2], image_at=[1], seed=98)
    with pytest.raises(ValueError, match="cross_attention_mask"):
        engine.submit(replace(good, cross_attention_mask=good.cross_attention_mask[:3]))
    with pytest.raises(ValueError, match="aspect_ratio"):
        engine.submit(replace(good, aspect_ratio_ids=None))
    with pytest.raises(ValueError, match="images of a request"):
        engine.submit(replace(good, pixel_values=good.pixel_values[:, :1]))
    lm = MllamaForCausalLM(tiny_config("a"))
    with pytest.raises(ValueError, match="text-only"):
        Engine(lm, max_slots=1, max_len=16).submit(good)
    with pytest.raises(ValueError, match="max_slots"):
        Engine(model, max_slots=0, max_len=16)
    assert not engine.has_work  # nothing bad was queued


def test_text_only_model_serves_requests(models):
    from mllama import MllamaForCausalLM

    full = models["a"]
    lm = MllamaForCausalLM(tiny_config("a")).eval()
    lm.load_state_dict({k.replace("model.language_model.", "model."): v for k, v in full.state_dict().items()
                        if k.startswith("model.language_model.") or k == "lm_head.weight"})
    request = _request("a", length=7, seed=99, max_tokens=6)
    assert _alone(lm, request)[0] == _alone(full, request)[0]


def _repeats_an_ngram(ids: list[int], n: int) -> bool:
    grams = [tuple(ids[i:i + n]) for i in range(len(ids) - n + 1)]
    return len(grams) != len(set(grams))


def test_min_tokens_and_no_repeat_ngram_rules_batched_equal_alone(models):
    model = models["a"]
    base = [_request("a", length=n, tiles=t, image_at=at, seed=120 + i, max_tokens=14)
            for i, (n, t, at) in enumerate([(5, [], []), (7, [2], [1]), (4, [], []), (9, [1], [3])])]
    free = [_alone(model, r)[0] for r in base]
    ruled = []
    for i, (request, tokens) in enumerate(zip(base, free)):
        stop = tokens[1]  # unconstrained, the request would stop after two tokens
        if i % 2:
            params = replace(request.sampling, stop_token_ids=(stop,), min_tokens=6, no_repeat_ngram_size=2)
        else:
            params = replace(request.sampling, stop_token_ids=(stop,), min_tokens=6)
        ruled.append(replace(request, sampling=params))
    alone = [_alone(model, r)[0] for r in ruled]
    for request, tokens, before in zip(ruled, alone, free):
        stop = request.sampling.stop_token_ids[0]
        assert before[1] == stop and len(tokens) >= 6 and stop not in tokens[:6]  # unconstrained it stops at 2
        assert len(tokens) == 14 or tokens[-1] == stop
        if request.sampling.no_repeat_ngram_size:
            assert not _repeats_an_ngram(request.input_ids.tolist() + tokens, 2)
    # the unconstrained odd requests do repeat a bigram, so the ban was exercised
    assert any(_repeats_an_ngram(r.input_ids.tolist() + _alone(model, replace(
        r, sampling=replace(r.sampling, no_repeat_ngram_size=0, min_tokens=6)))[0], 2) for r in ruled[1::2])
    engine = Engine(model, max_slots=3, max_len=MAX_LEN, prefill_chunk=3)
    handles = _run_schedule(engine, [(0, ruled[0]), (0, ruled[1]), (2, ruled[2]), (3, ruled[3])])
    assert [h.tokens for h in handles] == alone


def test_bad_rule_params(models):
    engine = Engine(models["a"], max_slots=1, max_len=MAX_LEN)
    with pytest.raises(ValueError, match="min_tokens"):
        engine.submit(Request(input_ids=[1, 5], sampling=SamplingParams(min_tokens=-1)))
    with pytest.raises(ValueError, match="no_repeat_ngram_size"):
        engine.submit(Request(input_ids=[1, 5], sampling=SamplingParams(no_repeat_ngram_size=-2)))


def test_queued_text_prompts_prefill_together_and_equal_each_alone(models, monkeypatch):
    """Text-only requests waiting together are prefilled in one padded forward (different lengths,
    one that ends at its first token, a penalty, a seeded sample), while others decode; each equals
    the request alone: tokens and every step's logits."""
    model = models["a"]
    requests = [
        _request("a", length=9, seed=70, max_tokens=7),
        _request("a", length=3, seed=71, max_tokens=1),  # finishes at its first token: the next row moves up
        _request("a", length=6, seed=72, max_tokens=9, repetition_penalty=1.4),
        _request("a", length=5, seed=73, max_tokens=8, temperature=1.1, top_p=0.9),
        _request("a", length=7, tiles=[2], image_at=[1], seed=74, max_tokens=6),  # an image: prepared alone
        _request("a", length=4, seed=75, max_tokens=6),
    ]
    requests[3].sampling.seed = 77
    groups = []
    real = Engine._prefill_group
    monkeypatch.setattr(Engine, "_prefill_group", lambda self, group: groups.append(len(group)) or real(self, group))
    alone = [_alone(model, r) for r in requests]
    assert groups == []  # a request alone is prepared as before
    engine = Engine(model, max_slots=6, max_len=MAX_LEN, prefill_chunk=16)
    starter = _request("a", length=4, seed=76, max_tokens=12)
    handles = _run_schedule(engine, [(0, starter)] + [(2, r) for r in requests])
    # All five text prompts: the image request goes to the vision encoder and holds back no one.
    assert groups and groups[0] == 5, groups
    for handle, (tokens, logits) in zip(handles[1:], alone):
        events = list(handle)
        assert handle.tokens == tokens
        got = torch.stack([e.logits for e in events if e.logits is not None]) if logits is not None else None
        torch.testing.assert_close(got, logits, rtol=1e-5, atol=1e-5)


def test_time_budget_groups_queued_prompts_only_within_the_budget(models, monkeypatch):
    """With prefill_budget_s, text prompts that wait together are still prefilled in one forward when
    nobody decodes (there is nobody to stall); while others decode, only as many padded tokens as
    the measured prefill rate fits in the budget (a tiny budget: none)."""
    model = models["a"]
    groups = []
    real = Engine._prefill_group
    monkeypatch.setattr(Engine, "_prefill_group", lambda self, group: groups.append(len(group)) or real(self, group))
    requests = [_request("a", length=5 + i, seed=80 + i, max_tokens=4) for i in range(3)]
    engine = Engine(model, max_slots=6, max_len=MAX_LEN, prefill_budget_s=10.0)
    handles = [engine.submit(r) for r in requests]
    engine.step()
    assert groups == [3]
    for handle, request in zip(handles, requests):
        assert handle.result() == _alone(model, request)[0]
    groups.clear()
    engine = Engine(model, max_slots=6, max_len=MAX_LEN, prefill_budget_s=1e-9)
    first = engine.submit(_request("a", length=4, seed=90, max_tokens=20))
    engine.step()  # prefilled alone (and the rate measured); it decodes from now on
    later = [engine.submit(r) for r in requests]
    while not all(h.tokens for h in later):
        engine.step()
    assert groups == [] and first.tokens
    for handle, request in zip(later, requests):
        assert handle.result() == _alone(model, request)[0]


# ---- prefix cache: a chat follow-up reuses the previous turn's self-attention K/V --------------------------
def _follow_up(name: str, first: Request, answer: list[int], *, new: int, tiles: list[int] = (),
               image_at: list[int] = (), seed: int = 0, **params) -> Request:
    """first's prompt + its answer + `new` question tokens; images drawn from `seed` at image_at."""
    s = first.input_ids.numel()
    request = _request(name, length=s + len(answer) + new, tiles=tiles, image_at=image_at, seed=seed, **params)
    request.input_ids[:s] = first.input_ids
    request.input_ids[s:s + len(answer)] = torch.tensor(answer)
    return request


def _events(handle) -> tuple[list[int], torch.Tensor]:
    events = list(handle)
    return [e.token for e in events], torch.stack([e.logits for e in events])


def _assert_equals_fresh(model, request: Request, tokens: list[int], logits: torch.Tensor) -> None:
    fresh_tokens, fresh_logits = _alone(model, request, prefix_cache_bytes=0)
    assert tokens == fresh_tokens
    assert (logits - fresh_logits).abs().max().item() <= 1e-5


@pytest.mark.parametrize("tiles", [[], [3]])
def test_chat_follow_up_reuses_the_previous_turn_exactly(models, tiles):
    model = models["b"]
    at = [2] if tiles else []
    first = _request("b", length=9, tiles=tiles, image_at=at, seed=120, max_tokens=7)
    engine = Engine(model, max_slots=2, max_len=MAX_LEN, prefill_chunk=4)
    answer = engine.submit(first).result()
    assert len(answer) == 7 and len(engine.prefix_cache) == 1
    follow_up = _follow_up("b", first, answer, new=5, tiles=tiles, image_at=at, seed=120, max_tokens=6)
    tokens, logits = _events(engine.submit(follow_up))
    # Prompt and answer but the last answer token, whose K/V the first request never wrote.
    assert engine.prefix_cache.hits == 1 and engine.prefix_cache.tokens_reused == 9 + 7 - 1
    _assert_equals_fresh(model, follow_up, tokens, logits)
    # The follow-up's entry contains the first one's: it replaced it.
    assert len(engine.prefix_cache) == 1
    third = _follow_up("b", follow_up, tokens, new=3, tiles=tiles, image_at=at, seed=120, max_tokens=4)
    third_tokens, third_logits = _events(engine.submit(third))
    assert engine.prefix_cache.hits == 2 and engine.prefix_cache.tokens_reused == 15 + 21 + 6 - 1
    _assert_equals_fresh(model, third, third_tokens, third_logits)


@pytest.mark.parametrize("image_at", [0, 3])
def test_another_image_reuses_only_the_positions_before_it(models, image_at):
    model = models["a"]
    first = _request("a", length=8, tiles=[2], image_at=[image_at], seed=121, max_tokens=5)
    engine = Engine(model, max_slots=2, max_len=MAX_LEN)
    answer = engine.submit(first).result()
    other = _follow_up("a", first, answer, new=4, tiles=[2], image_at=[image_at], seed=122, max_tokens=5)
    assert torch.equal(other.input_ids[:8], first.input_ids)
    assert not torch.equal(other.pixel_values, first.pixel_values)
    tokens, logits = _events(engine.submit(other))
    # Every position from the image token on sees the other image: its K/V differ.
    assert engine.prefix_cache.tokens_reused == image_at
    assert engine.prefix_cache.hits == (1 if image_at else 0)
    _assert_equals_fresh(model, other, tokens, logits)


def test_same_image_other_tile_rows_reuse_only_up_to_the_first_different_row(models):
    model = models["b"]
    first = _request("b", length=8, tiles=[3], image_at=[1], seed=123, max_tokens=5)
    engine = Engine(model, max_slots=2, max_len=MAX_LEN)
    answer = engine.submit(first).result()
    follow_up = _follow_up("b", first, answer, new=4, tiles=[3], image_at=[1], seed=123, max_tokens=5)
    follow_up.cross_attention_mask[6:, 0, 2] = 0  # from position 6 on, the third tile is hidden
    tokens, logits = _events(engine.submit(follow_up))
    assert engine.prefix_cache.hits == 1 and engine.prefix_cache.tokens_reused == 6
    _assert_equals_fresh(model, follow_up, tokens, logits)
    # A text-only prompt with the same tokens: only the positions before the image token.
    text = replace(follow_up, pixel_values=None, aspect_ratio_ids=None, aspect_ratio_mask=None,
                   cross_attention_mask=None)
    tokens, logits = _events(engine.submit(text))
    assert engine.prefix_cache.hits == 2 and engine.prefix_cache.tokens_reused == 6 + 1
    _assert_equals_fresh(model, text, tokens, logits)


def test_a_stored_prefix_covering_the_whole_prompt_still_prefills_its_last_token(models):
    model = models["b"]
    first = _request("b", length=7, tiles=[2], image_at=[1], seed=124, max_tokens=6)
    engine = Engine(model, max_slots=1, max_len=MAX_LEN)
    answer, first_logits = _events(engine.submit(first))
    again, again_logits = _events(engine.submit(first))  # all 7 prompt positions are stored
    assert engine.prefix_cache.tokens_reused == 6
    assert again == answer and (again_logits - first_logits).abs().max().item() <= 1e-5
    exact = _follow_up("b", first, answer[:-1], new=0, tiles=[2], image_at=[1], seed=124, max_tokens=3)
    tokens, logits = _events(engine.submit(exact))  # exactly the 12 cached positions
    assert engine.prefix_cache.tokens_reused == 6 + 11 and tokens[0] == answer[-1]
    _assert_equals_fresh(model, exact, tokens, logits)


def test_prefix_cache_evicts_least_recently_used_within_budget(models):
    model = models["a"]
    per_position = sum(2 * buf[0, :, :1].nbytes for buf in Engine(model, max_slots=1, max_len=MAX_LEN).kv.k.values())
    engine = Engine(model, max_slots=1, max_len=MAX_LEN, prefix_cache_bytes=40 * per_position)
    cache = engine.prefix_cache
    prompts = [_request("a", length=10, seed=125 + i, max_tokens=6) for i in range(3)]  # 15 positions stored each
    for i, request in enumerate(prompts):
        request.input_ids[1] = 3 + i  # no two share more than the BOS
    answers = [engine.submit(request).result() for request in prompts[:2]]
    assert len(cache) == 2 and cache.bytes == 30 * per_position
    again = replace(prompts[0], sampling=SamplingParams(max_tokens=1))
    assert engine.submit(again).result() == answers[0][:1]  # a prefix of the first entry: only touches it
    assert len(cache) == 2 and cache.tokens_reused == 1 + 9  # the second prompt reused the BOS
    engine.submit(prompts[2]).result()  # 45 positions do not fit: the least recently used one goes
    assert len(cache) == 2 and cache.bytes == 30 * per_position
    follow_ups = [_follow_up("a", r, a, new=2, seed=130) for r, a in zip(prompts, answers)]
    assert [cache.reusable(f.input_ids, None)[1] for f in follow_ups] == [15, 1]
    huge = _request("a", length=45, seed=128, max_tokens=1)
    huge.input_ids[1] = 50
    engine.submit(huge).result()  # 45 positions: over the whole budget, not kept
    assert len(cache) == 2 and cache.bytes == 30 * per_position
    with pytest.raises(ValueError, match="budget"):
        Engine(model, max_slots=1, max_len=MAX_LEN, prefix_cache_bytes=-1)


def test_prefix_hit_while_others_decode_and_finish_equals_fresh(models):
    """The follow-up's copied prefix and its chunks move slots when a decoding request ends under it."""
    model = models["b"]
    first = _request("b", length=9, tiles=[2], image_at=[1], seed=131, max_tokens=6)
    engine = Engine(model, max_slots=3, max_len=MAX_LEN, prefill_chunk=3)
    answer = engine.submit(first).result()
    short = _request("b", length=5, seed=132, max_tokens=4)
    long = _request("b", length=6, tiles=[3], image_at=[2], seed=133, max_tokens=25)
    handles = [engine.submit(long)]
    for _ in range(20):
        if engine.num_decoding == 1:
            break
        engine.step()
    handles.insert(0, engine.submit(short))
    for _ in range(20):
        if engine.num_decoding == 2:
            break
        engine.step()
    assert engine.num_decoding == 2 and len(handles[0].tokens) == 1
    follow_up = _follow_up("b", first, answer, new=12, tiles=[2], image_at=[1], seed=131, max_tokens=8)
    handle = engine.submit(follow_up)
    before = engine.prefix_cache.tokens_reused  # the BOS of the two others
    moved_under_it = False
    for _ in range(30):
        if handle.tokens:
            break
        decoding, incoming = engine.num_decoding, engine._incoming
        engine.step()
        moved_under_it |= incoming is not None and incoming.prefilled > 0 and engine.num_decoding < decoding
    assert moved_under_it
    assert engine.prefix_cache.tokens_reused - before == 9 + 6 - 1
    tokens, logits = _events(handle)
    _assert_equals_fresh(model, follow_up, tokens, logits)
    for request, h in zip((short, long), handles):
        assert h.result() == _alone(model, request)[0]


def test_cancelled_answer_is_a_reusable_prefix_and_zero_budget_disables(models):
    model = models["a"]
    first = _request("a", length=8, tiles=[2], image_at=[2], seed=134, max_tokens=30)
    for budget, reused in ((1 << 20, 8 + 4 - 1), (0, 0)):
        engine = Engine(model, max_slots=2, max_len=MAX_LEN, prefix_cache_bytes=budget)
        handle = engine.submit(first)
        while len(handle.tokens) < 4:
            engine.step()
        handle.cancel()
        engine.step()
        assert handle.finish_reason == "cancelled" and len(handle.tokens) == 4
        follow_up = _follow_up("a", first, handle.tokens, new=3, tiles=[2], image_at=[2], seed=134, max_tokens=5)
        tokens, logits = _events(engine.submit(follow_up))
        cache = engine.prefix_cache
        assert cache.tokens_reused == reused and cache.hits == (1 if budget else 0)
        assert len(cache) == (1 if budget else 0) and (cache.misses == 1 or not budget)
        _assert_equals_fresh(model, follow_up, tokens, logits)


def test_queued_follow_up_goes_alone_to_reuse_its_prefix(models, monkeypatch):
    model = models["a"]
    first = _request("a", length=6, seed=135, max_tokens=4)
    engine = Engine(model, max_slots=4, max_len=MAX_LEN, prefill_chunk=16)
    answer = engine.submit(first).result()
    groups = []
    real = Engine._prefill_group
    monkeypatch.setattr(Engine, "_prefill_group", lambda self, group: groups.append(len(group)) or real(self, group))
    follow_up = _follow_up("a", first, answer, new=3, seed=136, max_tokens=4)
    others = [_request("a", length=5 + i, seed=137 + i, max_tokens=4) for i in range(2)]
    for request in others:
        request.input_ids[1] = first.input_ids[1] % 70 + 4  # only the BOS in common with the stored prompt
    handles = [engine.submit(r) for r in [follow_up] + others]
    while engine.has_work:
        engine.step()
    assert groups == [2]  # the two others together; the follow-up alone, reusing 6 + 4 - 1 positions
    assert engine.prefix_cache.tokens_reused == 9 and engine.prefix_cache.hits == 1
    _assert_equals_fresh(model, follow_up, *_events(handles[0]))
    for request, h in zip(others, handles[1:]):
        assert h.result() == _alone(model, request)[0]


@pytest.mark.parametrize("option", ["prefill_budget_s", "prefill_budget_ratio"])
def test_lockstep_engine_refuses_time_budgets(models, option):
    """Under tensor parallelism every rank must cut the same pieces: budgets timed per rank would not."""
    from mllama.tp_engine import LockstepEngine, follow

    for build in (LockstepEngine, follow):
        with pytest.raises(ValueError, match=f"{option} cannot be used with tensor parallelism"):
            build(models["a"], max_slots=1, max_len=8, **{option: 1.0})


def test_an_encoded_prompt_of_one_chunk_joins_the_decode_forward(models, monkeypatch):
    """An image request whose prompt is one chunk has it in a decode step's forward once its image is
    encoded (a prompt forward of its own would pass over the weights a second time that step), with
    its cross-attention rows; it and the decoding request equal themselves alone."""
    model = models["b"]
    text_model = model.model.language_model
    parts_seen = []
    real = text_model.forward_parts
    monkeypatch.setattr(text_model, "forward_parts",
                        lambda parts: parts_seen.append([p.cross is not None for p in parts]) or real(parts))
    steady = _request("b", length=4, seed=6, max_tokens=12)
    image = _request("b", length=7, tiles=[2], image_at=[1], seed=7, max_tokens=4)
    engine = Engine(model, max_slots=2, max_len=MAX_LEN, vision_piece_layers=None)
    handles = _run_schedule(engine, [(0, steady), (1, image)])
    assert parts_seen == [[False, True]]  # the decoding row without images, the image prompt with them
    for request, handle in zip((steady, image), handles):
        tokens, logits = _events(handle)
        ref_tokens, ref_logits = _alone(model, request)
        assert tokens == ref_tokens and (logits - ref_logits).abs().max().item() <= 1e-5


@pytest.mark.parametrize("fuse", [True, False])
def test_prompt_chunks_in_the_decode_forward_equal_each_request_alone(models, fuse, monkeypatch):
    """With fuse_prefill a prompt's chunks run in the decode steps' forward (forward_parts: one pass
    over the weights), an image prompt's once its image is encoded (its chunks after the image token
    with their cross-attention rows). Requests that finish while a prompt is half prefilled move its
    K/V with the slots. Each equals the request alone, fused or not."""
    model = models["a"]
    text_model = model.model.language_model
    calls = []
    real = text_model.forward_parts
    monkeypatch.setattr(text_model, "forward_parts", lambda parts: calls.append([p.cross is not None for p in parts]) or real(parts))
    # Which step each forward_parts and lm_head call is in: a fused step passes over lm_head once,
    # also when its chunk ends a prompt (the first token's row joins the decoding rows).
    step_of, heads, parts_steps = [0], [], []
    real_head, real_parts = model.lm_head.forward, text_model.forward_parts
    monkeypatch.setattr(model.lm_head, "forward", lambda x: heads.append(step_of[0]) or real_head(x))
    monkeypatch.setattr(text_model, "forward_parts", lambda parts: parts_steps.append(step_of[0]) or real_parts(parts))
    short = _request("a", length=5, seed=1, max_tokens=2)
    image = _request("a", length=12, tiles=[2], image_at=[4], seed=2, max_tokens=9)
    long = _request("a", length=14, seed=3, max_tokens=6)  # 5 chunks of 3, two of them fused after short ends
    other = _request("a", length=9, seed=4, max_tokens=4)
    steady = _request("a", length=4, seed=5, max_tokens=30)  # decodes while the others prefill
    engine = Engine(model, max_slots=4, max_len=MAX_LEN, prefill_chunk=3, fuse_prefill=fuse)
    real_step = engine.step
    monkeypatch.setattr(engine, "step", lambda: step_of.__setitem__(0, step_of[0] + 1) or real_step())
    schedule = [(0, steady), (0, short), (0, image), (2, long), (3, other)]
    handles = _run_schedule(engine, schedule)
    assert all(heads.count(step) == 1 for step in parts_steps)
    for (_, request), handle in zip(schedule, handles):
        tokens, logits = _events(handle)
        ref_tokens, ref_logits = _alone(model, request)
        assert tokens == ref_tokens
        assert (logits - ref_logits).abs().max().item() <= 1e-5
    if fuse:  # chunks of both text and image prompts (with cross-attention rows) went through forward_parts
        assert len(calls) >= 8 and any(chunk for _, chunk in calls) and not all(chunk for _, chunk in calls)
    else:
        assert not calls
    assert engine.num_decoding == 0 and not engine.has_work
