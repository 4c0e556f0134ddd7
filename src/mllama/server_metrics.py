"""Prometheus metrics of one server (its own registry, so several servers can live in one process)."""

from __future__ import annotations

from typing import Any, Callable, Iterator

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, disable_created_metrics, generate_latest
from prometheus_client.core import CounterMetricFamily
from prometheus_client.exposition import CONTENT_TYPE_LATEST

disable_created_metrics()  # no *_created samples: they double the page and nobody graphs them

CONTENT_TYPE = CONTENT_TYPE_LATEST
_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
_STEP_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)


class _CacheCounters:
    """The engine's image and prefix cache counters, read when scraped: the engine counts them
    itself (also without a server), so they are exposed as they are rather than mirrored."""

    def __init__(self, engine: Any) -> None:
        self.engine = engine

    def collect(self) -> Iterator[CounterMetricFamily]:
        images, prefixes = self.engine.image_cache, self.engine.prefix_cache
        for name, doc, value in (
                ("mllama_image_cache_hits", "Images whose vision K/V came from the image cache", images.hits),
                ("mllama_image_cache_misses", "Images encoded by the vision model", images.misses),
                ("mllama_prefix_cache_hits", "Prompts that started from a stored prefix's K/V", prefixes.hits),
                ("mllama_prefix_cache_tokens_reused", "Prompt tokens not prefilled thanks to the prefix cache",
                 prefixes.tokens_reused)):
            yield CounterMetricFamily(name, doc, value=value)


class ServerMetrics:
    """Counters and histograms updated by the request handlers; slot and queue gauges and the
    engine's cache counters (if an engine is given) read the engine when scraped."""

    def __init__(self, *, slots_in_use: Callable[[], float], queue_depth: Callable[[], float],
                 active: Callable[[], float], max_slots: int, engine: Any = None) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        if engine is not None:
            r.register(_CacheCounters(engine))
        self.requests = Counter("mllama_requests", "HTTP API requests by endpoint and status code",
                                ["endpoint", "status"], registry=r)
        self.finished = Counter("mllama_generations_finished", "Generations ended, by finish reason",
                                ["reason"], registry=r)
        self.prompt_tokens = Counter("mllama_prompt_tokens", "Prompt tokens of accepted generations", registry=r)
        self.generation_tokens = Counter("mllama_generation_tokens", "Tokens generated", registry=r)
        Gauge("mllama_generations_active", "Generations submitted by the API and not yet ended (waiting, being "
              "prepared or decoding)", registry=r).set_function(active)
        Gauge("mllama_slots_in_use", "Engine slots holding a decoding request", registry=r
              ).set_function(slots_in_use)
        Gauge("mllama_queue_depth", "Generations waiting for a slot", registry=r).set_function(queue_depth)
        Gauge("mllama_slots", "Engine slots in all", registry=r).set(max_slots)
        self.ttft = Histogram("mllama_time_to_first_token_seconds", "From request arrival to its first token",
                              buckets=_LATENCY_BUCKETS, registry=r)
        self.inter_token = Histogram("mllama_inter_token_latency_seconds", "Between consecutive tokens of a generation",
                                     buckets=_STEP_BUCKETS, registry=r)
        self.e2e = Histogram("mllama_request_duration_seconds", "From request arrival to its last token",
                             buckets=_LATENCY_BUCKETS, registry=r)

    def render(self) -> bytes:
        return generate_latest(self.registry)
