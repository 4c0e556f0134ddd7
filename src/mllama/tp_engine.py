"""Serving a tensor-parallel model: rank 0 schedules, the other ranks replay its steps.

Every rank holds an Engine over its slices of the model (mllama.tp). Each collective inside a
forward must be entered by all ranks with the same shapes, so all engines must take the same steps
over the same requests. Rank 0's `LockstepEngine` is the one the server talks to; before each step
it broadcasts what changed since the last one (new requests, cancellations) and the followers
(`follow`) apply exactly that, then step too. Everything else an engine decides (admission, slot
order, prompt chunks, sampling) is deterministic given those inputs, because:
- requests submitted after a broadcast are not admitted by rank 0 until the next one has carried
  them, and cancellations are applied at the start of a step on every rank;
- a sampled request without a seed gets one drawn on rank 0 (generators cannot be broadcast), so
  every rank draws the same token from the same (all-reduced) logits;
- prefill_budget_s and prefill_budget_ratio are refused: chunk sizes from measured time would differ between ranks;
  so is vision_threads: when an image's encode ends would differ too.
While idle, rank 0 broadcasts a heartbeat every `heartbeat_s`, so followers waiting in a collective
with a timeout do not fail when nobody sends requests.
"""

from __future__ import annotations

import dataclasses
import random
import threading
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from mllama.engine import Engine
from mllama.request import Request, RequestHandle

DEFAULT_HEARTBEAT_S = 1.0


def _broadcast(message: dict[str, Any] | None, group: dist.ProcessGroup | None, device: torch.device) -> dict[str, Any]:
    box = [message]
    dist.broadcast_object_list(box, src=dist.get_global_rank(group, 0) if group is not None else 0, group=group,
                               device=device if device.type == "cuda" else None)
    return box[0]


def _check_options(options: dict[str, Any]) -> None:
    for name in ("prefill_budget_s", "prefill_budget_ratio"):
        if options.get(name) is not None:
            raise ValueError(f"{name} cannot be used with tensor parallelism: prompt chunks sized from "
                             "measured time would differ between ranks")
    if options.get("vision_threads") is not None:
        raise ValueError("vision_threads cannot be used with tensor parallelism: when an image's encode ends "
                         "would differ between ranks")


class LockstepEngine(Engine):
    """Rank 0's engine of a tensor-parallel model (see the module docstring); takes Engine's options."""

    def __init__(self, model: nn.Module, *, group: dist.ProcessGroup | None = None,
                 heartbeat_s: float = DEFAULT_HEARTBEAT_S, **options: Any) -> None:
        _check_options(options)
        super().__init__(model, **options)
        if dist.get_rank(group) != 0:
            raise ValueError("LockstepEngine runs on rank 0 of its group; other ranks call mllama.tp_engine.follow")
        self.group, self.heartbeat_s = group, heartbeat_s
        self._outbox: list[tuple[str, Any]] = []
        self._outbox_lock = threading.Lock()  # submit/cancel order == the order followers apply them
        self._released = -1  # highest request id the followers have been sent
        self._broken: BaseException | None = None

    def submit(self, request: Request) -> RequestHandle:
        if self._broken is not None:
            raise RuntimeError(f"the tensor-parallel group failed, no new requests: {self._broken}")
        if request.generator is not None:
            raise ValueError("a torch.Generator cannot be shared between tensor-parallel ranks; set "
                             "sampling.seed instead")
        if request.sampling.temperature > 0 and request.sampling.seed is None:
            request = dataclasses.replace(request, sampling=dataclasses.replace(
                request.sampling, seed=random.SystemRandom().randrange(1 << 62)))
        with self._outbox_lock:
            handle = super().submit(request)
            self._outbox.append(("submit", request))
        return handle

    def cancel(self, handle: RequestHandle) -> None:
        with self._outbox_lock:
            self._outbox.append(("cancel", handle.id))
        with self._lock:
            self._wake.notify_all()

    @property
    def has_work(self) -> bool:
        return super().has_work or bool(self._outbox)

    def step(self) -> bool:
        with self._step_lock:
            with self._outbox_lock:
                changes, self._outbox = self._outbox, []
                self._send({"changes": changes, "step": True})
                # Ids are handed out in submit order under _outbox_lock: the ones sent are the oldest.
                self._released += sum(kind == "submit" for kind, _ in changes)
            for kind, value in changes:
                if kind == "cancel":
                    with self._lock:
                        self._cancels.add(value)
            return super().step()

    def _send(self, message: dict[str, Any]) -> None:
        """Broadcast to the followers; if that fails (a rank died or timed out) every request fails with
        the error and the engine takes no new ones, instead of each step waiting out the timeout again."""
        if self._broken is not None:
            raise RuntimeError(f"the tensor-parallel group failed: {self._broken}")
        try:
            _broadcast(message, self.group, self.device)
        except Exception as error:
            self._broken = error
            self._fail_all(error)
            raise

    def _may_admit(self, seq) -> bool:
        return seq.handle.id <= self._released  # else the followers have not been sent it yet

    def _loop(self) -> None:
        while True:
            with self._lock:
                if not self._stopping and not self.has_work:
                    self._wake.wait(self.heartbeat_s)
                if self._stopping or self._broken is not None:
                    return
                idle = not self.has_work
            try:
                if idle:
                    with self._step_lock:
                        self._send({"changes": [], "step": False})
                else:
                    self.step()
            except Exception:  # delivered to the requests' handles (or, for a failed group, to all)
                pass

    def stop(self) -> None:
        """Stop the step thread, then release the followers (their `follow` returns)."""
        super().stop()
        if self._broken is None:
            with self._step_lock:
                self._send({"stop": True})


def follow(model: nn.Module, *, group: dist.ProcessGroup | None = None, **options: Any) -> None:
    """On ranks other than 0: build the same engine as rank 0's LockstepEngine (same options) and
    replay its steps until it stops. Errors in a step are the requests' (rank 0 reports them)."""
    _check_options(options)
    engine = Engine(model, **options)
    handles: dict[int, RequestHandle] = {}
    while True:
        message = _broadcast(None, group, engine.device)
        if message.get("stop"):
            return
        for kind, value in message["changes"]:
            if kind == "submit":
                handle = engine.submit(value)
                handles[handle.id] = handle
            elif value in handles:
                engine.cancel(handles[value])
        if message["step"]:
            try:
                engine.step()
            except Exception:  # noqa: BLE001 - rank 0 meets the same error and reports it
                pass
        for request_id, handle in list(handles.items()):
            handle.poll()  # events are rank 0's to deliver; drop them here
            if handle.finished:
                del handles[request_id]
