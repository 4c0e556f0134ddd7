"""`mllama serve`'s options: the parser's arguments, their checks, and the serving bounds and thread
split derived from them (mllama.cli loads the model and hands these to mllama.server_run.serve).
Imports no torch at module level: the CLI starts without it."""

from __future__ import annotations

import argparse
from dataclasses import dataclass

API_KEY_ENV = "MLLAMA_API_KEY"  # mllama serve reads the API key from it when --api-key is not given

# While an image arrives, a stream's steps stay within about 1 + 1.2 = 2.2x their idle time, for a
# longer time to first token of the image request (RESULTS.md, serving: with 1.5, 16 clients saw
# inter-token p99 of 3.2-4.5x the idle latency).
DEFAULT_STEP_BUDGET_S = 1.0
DEFAULT_STEP_BUDGET_RATIO = 0.8


@dataclass(frozen=True)
class ServeBounds:
    image_cache_bytes: int
    prefix_cache_bytes: int
    step_budget_s: float | None
    step_budget_ratio: float | None


def serve_bounds(args: argparse.Namespace, *, world: int, error: type[Exception] = ValueError) -> ServeBounds:
    """The caches' budgets and the step bounds of serve, from its options checked (world: the ranks
    under torchrun, where the step bounds and a vision thread are refused)."""
    for name in ("max_slots", "max_queue", "max_len", "max_body_bytes", "max_image_bytes"):
        value = getattr(args, name)
        if value is not None and value < 1:
            raise error(f"--{name.replace('_', '-')} must be at least 1, got {value}")
    for name in ("image_cache_bytes", "prefix_cache_bytes"):
        if getattr(args, name) < 0:
            raise error(f"--{name.replace('_', '-')} must be >= 0 (0 turns the cache off), got {getattr(args, name)}")
    for name in ("step_budget", "step_budget_ratio"):
        if getattr(args, name) is not None and getattr(args, name) < 0:
            raise error(f"--{name.replace('_', '-')} must be >= 0 (0: no such bound), got {getattr(args, name)}")
    if world > 1 and (args.step_budget or args.step_budget_ratio):
        raise error("--step-budget and --step-budget-ratio cannot be used under torchrun: pieces timed on each "
                    "rank would differ")
    budget = None if world > 1 else (DEFAULT_STEP_BUDGET_S if args.step_budget is None else args.step_budget or None)
    ratio = None if world > 1 else (DEFAULT_STEP_BUDGET_RATIO if args.step_budget_ratio is None
                                    else args.step_budget_ratio or None)
    if args.vision_threads is not None and args.vision_threads < 0:
        raise error(f"--vision-threads must be >= 0 (0: vision pieces take turns with the steps), got "
                    f"{args.vision_threads}")
    if world > 1 and args.vision_threads:
        raise error("--vision-threads cannot be used under torchrun: when an image's encode ends would differ "
                    "between ranks")
    return ServeBounds(image_cache_bytes=args.image_cache_bytes, prefix_cache_bytes=args.prefix_cache_bytes,
                       step_budget_s=budget, step_budget_ratio=ratio)


def check_vision_threads(given: int | None, *, error: type[Exception] = ValueError) -> None:
    import torch

    threads = torch.get_num_threads()
    if given is not None and given >= threads:
        raise error(f"--vision-threads must be below torch's {threads} threads (the decode steps keep the "
                    f"rest), got {given}")


def default_vision_threads(given: int | None, *, device: str, error: type[Exception] = ValueError) -> int | None:
    """serve's vision_threads: given (0: None, pieces taking turns), else, for a model on the CPU, half of
    torch's threads where it has two or more. An image encodes beside the decode steps then: on 2 cores
    its vision work went 1.2-1.5x faster than pieces taking turns at a similar inter-token latency
    (RESULTS.md). On a GPU both threads would queue on one stream: the pieces stay."""
    import torch

    check_vision_threads(given, error=error)
    if given is not None:
        return given or None
    threads = torch.get_num_threads()
    return threads // 2 if threads >= 2 and device == "cpu" else None


def add_serve_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of `mllama serve` (read by mllama.server_run.serve)."""
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (default: 127.0.0.1, this machine only)")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--max-slots", type=int, default=8, help="requests decoded together")
    parser.add_argument("--max-len", type=int, default=None,
                        help="tokens per request, prompt and answer (default: 4096 or the model's limit)")
    parser.add_argument("--max-queue", type=int, default=256, help="requests that may wait for a slot (then 429)")
    for cache, what in (("image", "encoded images"), ("prefix", "ended requests' K/V, reused by follow-ups")):
        parser.add_argument(f"--{cache}-cache-bytes", type=int, default=1 << 30, metavar="N",
                            help=f"LRU budget of {what} (default 1 GiB; 0 turns it off)")
    parser.add_argument("--step-budget", type=float, default=None, metavar="SECONDS",
                        help=f"work on a new request (a prompt chunk, a piece of an image's vision forward) between "
                             f"two decode steps of the others (default {DEFAULT_STEP_BUDGET_S}; 0: no bound in "
                             f"seconds; with neither bound, a prompt chunk or 4 vision layers; not under torchrun)")
    parser.add_argument("--step-budget-ratio", type=float, default=None, metavar="X",
                        help=f"the same work bounded by X times the decode step it follows, so the others' "
                             f"inter-token latency stays within about 1 + X times its idle value (default "
                             f"{DEFAULT_STEP_BUDGET_RATIO}; 0: off; the smaller of the two bounds holds)")
    parser.add_argument("--vision-threads", type=int, default=None, metavar="N",
                        help="encode a new image in a thread of its own on N of torch's threads, beside the decode "
                             "steps (default for a model on the CPU: half of them where there are 2 or more; 0: "
                             "pieces of its vision work take turns with the steps instead; not under torchrun)")
    parser.add_argument("--api-key", default=None,
                        help=f"require 'Authorization: Bearer KEY' on /v1/* (or set {API_KEY_ENV})")
    parser.add_argument("--served-model-name", default=None, help="the model id reported by /v1/models")
    parser.add_argument("--allow-private-image-urls", action="store_true",
                        help="let image URLs point at loopback, private and link-local addresses")
    parser.add_argument("--max-image-bytes", type=int, default=20 * 1024 * 1024)
    parser.add_argument("--image-timeout", type=float, default=10.0, help="seconds to fetch one image URL")
    parser.add_argument("--max-body-bytes", type=int, default=64 * 1024 * 1024)
    parser.add_argument("--shutdown-timeout", type=float, default=30.0,
                        help="seconds to let running requests finish after SIGTERM before cancelling them")
    parser.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
