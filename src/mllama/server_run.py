"""`mllama serve`: load a model, start its engine and serve the API with uvicorn.

Shutdown on SIGTERM or Ctrl-C: the server keeps its socket but answers new generation requests
with 503 (and /health with 503) while the requests in flight finish; after `shutdown_timeout`
seconds those still running are cancelled (their clients get an error event or a 503). Then
uvicorn closes the connections, the engine thread stops and the process exits with status 0. A
second signal exits at once.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import time
from types import FrameType
from typing import Any

import uvicorn

from mllama.engine import Engine
from mllama.image_fetch import ImagePolicy
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


def serve(args: argparse.Namespace) -> None:
    """Run the server until a signal; `args` as parsed by `mllama serve` (see mllama.cli)."""
    from mllama.cli import API_KEY_ENV, DEFAULT_MODEL, CliError, _load

    api_key = args.api_key or os.environ.get(API_KEY_ENV) or None
    for name in ("max_slots", "max_queue", "max_len", "max_body_bytes", "max_image_bytes"):
        value = getattr(args, name)
        if value is not None and value < 1:
            raise CliError(f"--{name.replace('_', '-')} must be at least 1, got {value}")
    logging.basicConfig(level=args.log_level.upper(), format="%(levelname)s:     %(name)s: %(message)s")
    model, processor = _load(args.model, args.dtype, args.quantize)
    positions = model.config.text_config.max_position_embeddings
    max_len = min(args.max_len or 4096, positions)
    engine = Engine(model, max_slots=args.max_slots, max_len=max_len, tokenizer=processor.tokenizer,
                    compile=args.compile, fast_vision=args.fast_vision)
    defaults, stop_ids = default_sampling(model)
    name = args.served_model_name or ("mllama-demo" if args.model == DEFAULT_MODEL else args.model)
    options = ServerOptions(model_name=name, api_key=api_key, max_queue=args.max_queue,
                            max_body_bytes=args.max_body_bytes,
                            images=ImagePolicy(max_bytes=args.max_image_bytes, timeout=args.image_timeout,
                                               allow_private=args.allow_private_image_urls),
                            defaults=defaults, stop_token_ids=stop_ids)
    api = ApiServer(engine, processor, options=options)
    config = uvicorn.Config(api.app, host=args.host, port=args.port, log_level=args.log_level,
                            timeout_graceful_shutdown=5, access_log=args.log_level == "debug")
    server = _Uvicorn(config, api, args.shutdown_timeout)
    engine.start()
    log.info("serving %s on http://%s:%d (%d slots, context %d)%s", name, args.host, args.port, args.max_slots,
             max_len, ", API key required" if api_key else "")
    try:
        server.run()
    finally:
        engine.stop()
