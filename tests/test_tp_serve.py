"""`torchrun --nproc-per-node 2 -m mllama serve`: rank 0 serves and schedules, rank 1 replays its
steps (mllama.tp_engine), over real gloo processes, queried with the real `openai` client.

The demo model splits over 2 ranks (4 heads, 2 K/V heads, MLPs); answers must equal a plain
one-process server's, for concurrent requests with images, greedy and seeded sampling, and stop
strings; unseeded sampling and client disconnects must keep the ranks in step; SIGTERM stops both.
"""

from __future__ import annotations

import asyncio
import signal
import subprocess
import sys
import time
from pathlib import Path

import openai
import pytest

sys.path.insert(0, str(Path(__file__).parent))
from test_server import EXAMPLE_URI, KEY, MODEL, QUESTION, Server, _ask, _free_port, _shape_uri  # noqa: E402

FLAGS = ("--api-key", KEY, "--max-slots", "4", "--dtype", "float32")

KINDS = [
    {"messages": _ask(EXAMPLE_URI), "temperature": 0},
    {"messages": _ask(_shape_uri("square", "green", 3), "What color is the shape?"), "temperature": 0},
    {"messages": [{"role": "user", "content": "Tell me a story."}], "temperature": 0},
    {"messages": _ask(_shape_uri("circle", "blue", 4), "Describe the image."), "temperature": 0.9, "seed": 7},
    {"messages": [{"role": "user", "content": "hello"}], "temperature": 1.0, "top_p": 0.9, "seed": 123},
    {"messages": _ask(_shape_uri("triangle", "red", 5), QUESTION), "temperature": 0, "stop": ["triangle"]},
]


def _launcher() -> tuple[str, ...]:
    return (sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port",
            str(_free_port()), "-m", "mllama")


def _answers(server: Server, kinds: list[dict], *, concurrent: bool) -> list[str]:
    common = {"model": MODEL, "max_tokens": 12}
    if not concurrent:
        client = server.client()
        return [client.chat.completions.create(**common, **kind).choices[0].message.content for kind in kinds]

    async def run() -> list[str]:
        client = openai.AsyncOpenAI(base_url=server.base + "/v1", api_key=KEY, max_retries=0, timeout=300)
        try:
            replies = await asyncio.gather(*(client.chat.completions.create(**common, **kind) for kind in kinds))
        finally:
            await client.close()
        return [reply.choices[0].message.content for reply in replies]

    return asyncio.run(run())


@pytest.fixture(scope="module")
def expected():
    plain = Server(*FLAGS)
    try:
        yield _answers(plain, KINDS, concurrent=False)
    finally:
        plain.stop()


@pytest.fixture(scope="module")
def tp_server():
    server = Server(*FLAGS, launcher=_launcher())
    yield server
    server.stop()


def test_tp_server_answers_as_one_process(tp_server, expected):
    assert all(expected)
    assert _answers(tp_server, KINDS, concurrent=False) == expected
    # Concurrent: the requests share decode steps on both ranks.
    assert _answers(tp_server, KINDS + KINDS[:2], concurrent=True) == expected + expected[:2]


def test_unseeded_sampling_and_disconnects_keep_the_ranks_in_step(tp_server, expected):
    client = tp_server.client()
    unseeded = {"messages": [{"role": "user", "content": "Why?"}], "temperature": 1.0}
    assert all(isinstance(text, str) for text in _answers(tp_server, [unseeded] * 3, concurrent=True))
    stream = client.completions.create(model=MODEL, prompt="hello", max_tokens=500, stream=True,
                                       extra_body={"ignore_eos": True})
    for _, _ in zip(range(3), stream):
        pass
    stream.close()
    tp_server.wait_idle(timeout=10)
    # Still in step: a greedy image request answers as before.
    assert _answers(tp_server, KINDS[:1], concurrent=False) == expected[:1]


def test_idle_longer_than_a_heartbeat_then_answers(tp_server, expected):
    time.sleep(2.5)  # the followers wait in a broadcast; rank 0's heartbeats keep it alive
    assert _answers(tp_server, KINDS[2:3], concurrent=False) == expected[2:3]


def test_sigterm_stops_every_rank(expected):
    """torchrun passes SIGTERM to both ranks: rank 0 drains (a stream in flight finishes) and then
    releases rank 1, which ignores the signal itself. (torchrun then reports the signal it got, with
    exit status 1: its own behaviour.)"""
    server = Server(*FLAGS, launcher=_launcher())
    try:
        assert _answers(server, KINDS[:1], concurrent=False) == expected[:1]
        stream = server.client().completions.create(model=MODEL, prompt="hello", max_tokens=60, stream=True,
                                                    extra_body={"ignore_eos": True})
        chunks = [next(stream), next(stream)]
        server.proc.send_signal(signal.SIGTERM)
        start = time.monotonic()
        chunks += list(stream)
        assert chunks[-1].choices[0].finish_reason == "length"
        server.proc.wait(60)
        assert time.monotonic() - start < 25, "torchrun had to kill a rank (its grace period is 30 s)"
        log = server.output()
        assert "mllama/" not in log, log[-3000:]  # no traceback from a rank
    finally:
        if server.proc.poll() is None:
            server.proc.kill()
    leftover = subprocess.run(["pgrep", "-f", f"--port {server.port}"], capture_output=True, text=True).stdout
    assert not leftover.strip(), f"ranks still running: {leftover}"
    server.stop()
