"""A function run in a worker thread that stops at module boundaries of the model it calls: how the
engine does an image's vision work a piece at a time between decode steps, or beside them in a
thread of its own (mllama.vision_cache.VisionJob)."""

from __future__ import annotations

import functools
import threading
import time
from collections.abc import Callable

import torch
from torch import nn


class PausableRun:
    """Runs fn() in a worker thread that pauses at module boundaries of the vision forward, so the
    vision work of one image can be done a piece at a time between decode steps without
    restructuring the vision model. With resume() only one of the two threads runs at a time (a
    handoff, not parallelism); run_free() runs them in parallel.

    resume(layers, seconds) lets the worker run until it is about to start its (layers+1)-th encoder
    layer from here, or fn() returns, or (seconds) it reaches a module boundary (any submodule of the
    layers, or of `units`: the projector, the cross-attention K/V projections) where the next module
    would end past the time limit, judged by how long a module of the same kind took before (a kind
    not seen yet: the longest so far); every piece runs at least one module. None lifts either limit.
    Returns whether fn() has returned. abort() unwinds a paused worker (a free one at its next
    module boundary).

    run_free() instead lets the worker run to the end in parallel with the caller, on `threads` torch
    threads (changed at the next module boundary when set again), and calls on_done when it ends;
    `done` then says so, and collect() gives the result.
    """

    class _Aborted(Exception):
        pass

    def __init__(self, fn, layers: list[nn.Module], units: list[nn.Module] = ()) -> None:
        self._fn = fn
        self._cond = threading.Condition()
        self._layers_left: int | None = None
        self._deadline: float | None = None
        self._ran = False  # a module ran since the last resume
        self._last: tuple[tuple, float] | None = None  # the kind of module that started last, and when
        self._took: dict[tuple, float] = {}  # seconds from a module's start to the next boundary, per kind
        self._worker_turn = False
        self._aborted = False
        self.threads: int | None = None  # torch threads the worker uses (run_free); None: as it is
        self._on_done: Callable[[], None] | None = None
        self.done = False
        self.result = None
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._main, name="mllama-vision", daemon=True)
        layer_ids = {id(layer) for layer in layers}
        modules = {id(m): m for root in [*layers, *units] for m in root.modules()}
        self._hooks = [m.register_forward_pre_hook(functools.partial(self._pause_point, id(m) in layer_ids))
                       for m in modules.values()]

    def _pause_point(self, is_layer: bool, module: nn.Module, args) -> None:
        if threading.current_thread() is not self._thread:
            return  # the model used elsewhere meanwhile: not ours to pause
        self._use_threads()
        # The same kind of module in another layer (same class, same parameter shapes) takes as long.
        kind = (type(module).__name__, tuple(tuple(p.shape) for p in module.parameters(recurse=False)))
        with self._cond:
            now = time.perf_counter()
            if self._last is not None:
                self._took[self._last[0]] = now - self._last[1]
            due = (is_layer and self._layers_left == 0) or (
                self._deadline is not None and self._ran
                and now + self._took.get(kind, max(self._took.values(), default=0.0)) >= self._deadline)
            if due:
                self._worker_turn = False
                self._cond.notify_all()
                self._cond.wait_for(lambda: self._worker_turn)
            if self._aborted:
                raise self._Aborted
            if is_layer and self._layers_left is not None:
                self._layers_left -= 1
            self._ran, self._last = True, (kind, time.perf_counter())

    def _use_threads(self) -> None:
        threads = self.threads  # torch's thread count is the calling thread's own (OpenMP)
        if threads is not None and torch.get_num_threads() != threads:
            torch.set_num_threads(threads)

    def _main(self) -> None:
        try:
            self._use_threads()
            with torch.inference_mode():
                self.result = self._fn()
        except self._Aborted:
            pass
        except BaseException as error:  # handed to the engine's thread by resume() or collect()
            self._error = error
        finally:
            with self._cond:
                self.done, self._worker_turn = True, False
                self._cond.notify_all()
            if self._on_done is not None:
                self._on_done()

    def run_free(self, threads: int, on_done: Callable[[], None] | None = None) -> None:
        """Let the worker run to the end without pausing, in parallel with the caller (see the class
        docstring); returns at once."""
        with self._cond:
            self.threads, self._on_done = threads, on_done
            self._layers_left, self._deadline, self._worker_turn, self._ran = None, None, True, False
            if not self._thread.is_alive() and not self.done:
                self._thread.start()
            self._cond.notify_all()

    def collect(self):
        """The result of a run that is done (its error raised here)."""
        if not self.done:
            raise RuntimeError("the vision worker has not finished")
        self._thread.join()
        self._close()
        if self._error is not None:
            raise self._error
        return self.result

    def resume(self, layers: int | None, seconds: float | None = None) -> bool:
        with self._cond:
            self._layers_left, self._worker_turn, self._ran = layers, True, False
            self._deadline = time.perf_counter() + seconds if seconds is not None else None
            if not self._thread.is_alive() and not self.done:
                self._thread.start()
            self._cond.notify_all()
            self._cond.wait_for(lambda: not self._worker_turn)
        if self.done:
            self._close()
            if self._error is not None:
                raise self._error
        return self.done

    def abort(self) -> None:
        with self._cond:
            self._aborted, self._worker_turn = True, True
            self._cond.notify_all()
        if self._thread.is_alive():
            self._thread.join()
        self._close()

    def _close(self) -> None:
        for hook in self._hooks:
            hook.remove()
        self._hooks = []
