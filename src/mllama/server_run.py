"""`mllama serve`: load a model, start its engine and serve the API with uvicorn.

Shutdown on SIGTERM or Ctrl-C: the server keeps its socket but answers new generation requests
with 503 (and /health with 503) while the requests in flight finish; after `shutdown_timeout`
seconds those still running are cancelled (their clients get an error event or a 503). Then
uvicorn closes the connections, the engine thread stops and the process exits with status 0. A
second signal exits at once.
"""

from __future__ import annotations

import logging
import signal
import time
from types import FrameType
from typing import Any

import uvicorn

from mllama.engine import Engine
from mllama.image_fetch import ImagePolicy
from mllama.processor import MllamaProcessor
from mllama.server import ApiServer, ServerOptions

log = logging.getLogger("mllama.server")


class _Uvicorn(uvicorn.Server):
    """uvicorn with a draining phase before its own shutdown (see the module docstring)."""

    def __init__(self, config: uvicorn.Config, api: ApiServer, shutdown_timeout: float) -> None:
        super().__init__(config)
        self.api, self.shutdown_timeout = api, shutdown_timeout
        self.drain_started: float | None = None
        self.cancelled = False

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        if self.drain_started is None:  # only flags here: this runs in a signal handler
            self.drain_started = time.monotonic()
            self.api.draining = True
        else:
            self.should_exit = True
            self.force_exit = sig == signal.SIGINT

    async def on_tick(self, counter: int) -> bool:
        if await super().on_tick(counter):
            return True
        if self.drain_started is None:
            return False
        if not self.api.active:
            return True
        late = time.monotonic() - self.drain_started > self.shutdown_timeout
        if late and not self.cancelled:
            log.warning("shutdown: cancelling %d requests still running", len(self.api.active))
            for handle in list(self.api.active):
                handle.cancel()
            self.cancelled = True
        return late and time.monotonic() - self.drain_started > self.shutdown_timeout + 5.0


def default_sampling(model: Any) -> tuple[dict[str, Any], tuple[int, ...]]:
    """(SamplingParams defaults, stop ids) from the checkpoint's generation_config: its sampling
    settings when it samples (the Instruct models do), else greedy decoding."""
    config = getattr(model, "generation_config", None)
    if config is None:
        return {"temperature": 0.0}, ()
    defaults: dict[str, Any] = {"temperature": 0.0}
    if config.do_sample:
        defaults = {"temperature": config.temperature, "top_p": config.top_p, "top_k": config.top_k or 0}
        if config.min_p:
            defaults["min_p"] = config.min_p
    if config.repetition_penalty != 1.0:
        defaults["repetition_penalty"] = config.repetition_penalty
    return defaults, tuple(config.eos_token_ids)


def engine_options(model: Any, processor: MllamaProcessor, *, max_slots: int = 8, max_len: int | None = None,
                   compile: bool = False, fast_vision: bool = False, image_cache_bytes: int = 1 << 30,
                   prefix_cache_bytes: int = 1 << 30) -> dict[str, Any]:
    """The Engine options of `serve` (shared with the follower ranks of a tensor-parallel server, whose
    engines must be built the same way). max_len: default 4096 or the model's limit."""
    positions = model.config.text_config.max_position_embeddings
    return {"max_slots": max_slots, "max_len": min(max_len or 4096, positions), "tokenizer": processor.tokenizer,
            "compile": compile, "fast_vision": fast_vision, "image_cache_bytes": image_cache_bytes,
            "prefix_cache_bytes": prefix_cache_bytes}


def _describe_budget(seconds: float | None, ratio: float | None) -> str:
    bounds = ([f"{seconds} s"] if seconds else []) + ([f"{ratio}x the decode step"] if ratio else [])
    return " and ".join(bounds) or "off"


def serve(model: Any, processor: MllamaProcessor, *, host: str = "127.0.0.1", port: int = 8000, max_slots: int = 8,
          max_len: int | None = None, model_name: str = "mllama", api_key: str | None = None, max_queue: int = 256,
          max_body_bytes: int = 64 * 1024 * 1024, images: ImagePolicy | None = None, shutdown_timeout: float = 30.0,
          compile: bool = False, fast_vision: bool = False, log_level: str = "info",
          tensor_parallel: bool = False, step_budget_s: float | None = None, image_cache_bytes: int = 1 << 30,
          prefix_cache_bytes: int = 1 << 30, step_budget_ratio: float | None = None,
          vision_threads: int | None = None) -> None:
    """Serve a loaded model until SIGTERM or Ctrl-C (see the module docstring and ServerOptions).
    max_len: tokens per request, prompt and answer (default: 4096 or the model's limit).
    tensor_parallel: this is rank 0 of a model split by mllama.tp; the other ranks run
    `follow_server` with the same options (mllama.tp_engine). step_budget_s, step_budget_ratio: the
    engine's prefill_budget_s and prefill_budget_ratio (None under tensor parallelism); vision_threads:
    the engine's (None under tensor parallelism)."""
    logging.basicConfig(level=log_level.upper(), format="%(levelname)s:     %(name)s: %(message)s")
    options = engine_options(model, processor, max_slots=max_slots, max_len=max_len, compile=compile,
                             fast_vision=fast_vision, image_cache_bytes=image_cache_bytes,
                             prefix_cache_bytes=prefix_cache_bytes)
    max_len = options["max_len"]
    budgets = {"prefill_budget_s": step_budget_s, "prefill_budget_ratio": step_budget_ratio,
               "vision_threads": vision_threads}
    if tensor_parallel:
        from mllama.tp_engine import LockstepEngine

        engine: Engine = LockstepEngine(model, **options, **budgets)  # refuses the budgets, naming them
    else:
        engine = Engine(model, **options, **budgets)
    defaults, stop_ids = default_sampling(model)
    options = ServerOptions(model_name=model_name, api_key=api_key, max_queue=max_queue, max_body_bytes=max_body_bytes,
                            images=images or ImagePolicy(), defaults=defaults, stop_token_ids=stop_ids)
    api = ApiServer(engine, processor, options=options)
    config = uvicorn.Config(api.app, host=host, port=port, log_level=log_level, timeout_graceful_shutdown=5,
                            access_log=log_level == "debug")
    server = _Uvicorn(config, api, shutdown_timeout)
    engine.start()
    log.info("serving %s on http://%s:%d (%d slots, context %d, step budget %s, images encoded %s)%s", model_name,
             host, port, max_slots, max_len, _describe_budget(step_budget_s, step_budget_ratio),
             f"on {vision_threads} thread(s) of their own" if vision_threads else "in pieces between steps",
             ", API key required" if api_key else "")
    try:
        server.run()
    finally:
        engine.stop()


def follow_server(model: Any, processor: MllamaProcessor, *, max_slots: int = 8, max_len: int | None = None,
                  compile: bool = False, fast_vision: bool = False, image_cache_bytes: int = 1 << 30,
                  prefix_cache_bytes: int = 1 << 30) -> None:
    """A tensor-parallel server's rank > 0: replay rank 0's engine steps until it stops. Signals are
    left to rank 0 (torchrun sends them to every rank): it drains, then tells the followers to stop."""
    from mllama.tp_engine import follow

    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    follow(model, **engine_options(model, processor, max_slots=max_slots, max_len=max_len, compile=compile,
                                   fast_vision=fast_vision, image_cache_bytes=image_cache_bytes,
                                   prefix_cache_bytes=prefix_cache_bytes))
