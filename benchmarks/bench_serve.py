"""`mllama serve` under 1, 4, 16 and 50 concurrent streaming clients, against transformers serving the
same requests one at a time.

    python benchmarks/bench_serve.py [--model DIR] [--clients 1 4 16 50] [--requests 6] [--tokens 32]
                                     [--svg benchmarks/serve.svg]

The server runs as `mllama serve` in a subprocess (default: the shipped demo model), with enough
slots for every client. Each client is a bounded loop of `--requests` streamed chat requests of
exactly `--tokens` generated tokens (ignore_eos). Two workloads: "text" (text questions) and "mix"
(every fourth request carries a new image, never seen before, so no vision cache hit). Measured at
the client: requests/s and generated tokens/s over the wall time of the whole run, time to first
token (request sent to first content) and inter-token latency (between content chunks) p50/p99.

Baseline: transformers' `MllamaForConditionalGeneration.generate` on the same checkpoint, the same
requests one after another with `min_new_tokens = max_new_tokens` (what `transformers serve` does
for vision models: no batching), measured once because it does not depend on the number waiting.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import io
import json
import random
import statistics
import subprocess
import sys
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

QUESTIONS = ["What shape is this?", "What color is the shape?", "Describe the image.", "Tell me a story.",
             "What do you see?", "Why is the sky blue?"]


def image_uri(seed: int) -> str:
    from mllama.demo.shapes import COLORS, SHAPES, draw_shape

    rng = random.Random(seed)
    image = draw_shape(rng.choice(SHAPES), rng.choice(list(COLORS)), width=rng.randint(200, 600),
                       height=rng.randint(200, 600), background=(240, 240, 240), rng=rng)
    buffer = io.BytesIO()
    image.save(buffer, "PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


def make_request(index: int, *, workload: str, seed_base: int) -> list[dict]:
    question = QUESTIONS[index % len(QUESTIONS)]
    if workload == "mix" and index % 4 == 0:
        return [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": image_uri(seed_base + index)}},
                                             {"type": "text", "text": question}]}]
    return [{"role": "user", "content": question}]


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q / 100 * (len(ordered) - 1)))]


async def run_clients(base: str, *, clients: int, requests: int, tokens: int, workload: str, seed_base: int) -> dict:
    ttfts, gaps, generated = [], [], 0
    async with httpx.AsyncClient(timeout=600, limits=httpx.Limits(max_connections=clients + 4)) as http:
        async def one(index: int) -> None:
            nonlocal generated
            body = {"messages": make_request(index, workload=workload, seed_base=seed_base), "stream": True,
                    "max_tokens": tokens, "ignore_eos": True, "temperature": 0,
                    "stream_options": {"include_usage": True}}
            sent = time.perf_counter()
            last = None
            async with http.stream("POST", base + "/v1/chat/completions", json=body) as response:
                response.raise_for_status()
                async for line in response.aiter_lines():
                    if not line.startswith("data: {"):
                        continue
                    chunk = json.loads(line[6:])
                    now = time.perf_counter()
                    if chunk.get("usage"):
                        generated += chunk["usage"]["completion_tokens"]
                    if any(c.get("delta", {}).get("content") for c in chunk["choices"]):
                        if last is None:
                            ttfts.append(now - sent)
                        else:
                            gaps.append(now - last)
                        last = now

        async def client(c: int) -> None:
            for r in range(requests):
                await one(c * requests + r)

        start = time.perf_counter()
        await asyncio.gather(*(client(c) for c in range(clients)))
        wall = time.perf_counter() - start
    return {"clients": clients, "workload": workload, "requests_s": clients * requests / wall,
            "tokens_s": generated / wall, "ttft_p50": percentile(ttfts, 50), "ttft_p99": percentile(ttfts, 99),
            "itl_p50": percentile(gaps, 50), "itl_p99": percentile(gaps, 99), "wall": wall}


def baseline(model_dir: str, *, requests: int, tokens: int, workload: str) -> dict:
    """transformers' generate, the requests one at a time."""
    import torch
    import transformers
    from PIL import Image

    processor = transformers.AutoProcessor.from_pretrained(model_dir)
    model = transformers.MllamaForConditionalGeneration.from_pretrained(model_dir).eval()
    times, ttfts = [], []
    for index in range(requests + 1):
        messages = make_request(index, workload=workload, seed_base=10_000)
        images = []
        for part in messages[0]["content"] if isinstance(messages[0]["content"], list) else []:
            if part["type"] == "image_url":
                data = base64.b64decode(part["image_url"]["url"].split(",", 1)[1])
                images.append(Image.open(io.BytesIO(data)).convert("RGB"))
                part.clear()
                part["type"] = "image"
        text = processor.apply_chat_template(messages, add_generation_prompt=True)
        inputs = processor(text=text, images=images or None, return_tensors="pt")
        with torch.inference_mode():
            start = time.perf_counter()
            model.generate(**inputs, max_new_tokens=1, do_sample=False)
            first = time.perf_counter() - start
            start = time.perf_counter()
            model.generate(**inputs, max_new_tokens=tokens, min_new_tokens=tokens, do_sample=False)
            elapsed = time.perf_counter() - start
        if index:  # the first one warms up
            times.append(elapsed)
            ttfts.append(first)
    return {"tokens_s": tokens * len(times) / sum(times), "requests_s": len(times) / sum(times),
            "ttft_p50": statistics.median(ttfts), "itl_p50": (statistics.median(times) - statistics.median(ttfts))
            / (tokens - 1)}


def svg_plot(rows: list[dict], base: dict[str, dict], path: Path) -> None:
    """Two small line charts (tokens/s, inter-token p99 in ms) against clients, one line per workload."""
    width, height, pad = 360, 220, 44
    colors = {"text": "#3056d3", "mix": "#d35230"}
    clients = sorted({r["clients"] for r in rows})
    xs = {c: pad + i * (width - 2 * pad) / max(1, len(clients) - 1) for i, c in enumerate(clients)}
    parts = []
    for panel, (key, label, scale) in enumerate([("tokens_s", "generated tokens/s", 1.0),
                                                 ("itl_p99", "inter-token p99 (ms)", 1000.0)]):
        ox = panel * (width + 20)
        top = max(max(r[key] * scale for r in rows), max((b.get(key, 0) * scale for b in base.values()), default=0))
        top = top * 1.1 or 1.0

        def y(value: float) -> float:
            return height - pad + 10 - (value / top) * (height - 2 * pad)
        parts.append(f'<g transform="translate({ox},0)"><text x="{width / 2}" y="16" text-anchor="middle" '
                     f'font-size="13">{label}</text>')
        parts.append(f'<line x1="{pad}" y1="{y(0)}" x2="{width - pad}" y2="{y(0)}" stroke="#888"/>')
        parts.append(f'<line x1="{pad}" y1="{y(0)}" x2="{pad}" y2="{y(top)}" stroke="#888"/>')
        for frac in (0.5, 1.0):
            parts.append(f'<text x="{pad - 4}" y="{y(top * frac / 1.1) + 4}" text-anchor="end" font-size="10">'
                         f'{top * frac / 1.1:.0f}</text>')
        for c, x in xs.items():
            parts.append(f'<text x="{x}" y="{y(0) + 14}" text-anchor="middle" font-size="10">{c}</text>')
        parts.append(f'<text x="{width / 2}" y="{height - 4}" text-anchor="middle" font-size="10">clients</text>')
        for workload, color in colors.items():
            points = [(xs[r["clients"]], y(r[key] * scale)) for r in rows if r["workload"] == workload]
            if points:
                parts.append(f'<polyline fill="none" stroke="{color}" stroke-width="2" points="'
                             + " ".join(f"{px:.1f},{py:.1f}" for px, py in points) + '"/>')
                parts.append(f'<text x="{width - pad + 2}" y="{points[-1][1]:.1f}" font-size="10" fill="{color}">'
                             f'{workload}</text>')
            if key in base.get(workload, {}):
                by = y(base[workload][key] * scale)
                parts.append(f'<line x1="{pad}" y1="{by:.1f}" x2="{width - pad}" y2="{by:.1f}" stroke="{color}" '
                             'stroke-dasharray="4 3"/>')
        parts.append("</g>")
    path.write_text(f'<svg xmlns="http://www.w3.org/2000/svg" width="{2 * width + 20}" height="{height}" '
                    f'font-family="sans-serif">' + "".join(parts) + "</svg>\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help="checkpoint directory (default: the demo model)")
    parser.add_argument("--clients", type=int, nargs="+", default=[1, 4, 16, 50])
    parser.add_argument("--requests", type=int, default=6,
                        help="requests per client, one after another (with 3, a 16-client run's first burst "
                             "of prompts and its tail are a third of it)")
    parser.add_argument("--tokens", type=int, default=32)
    parser.add_argument("--baseline-requests", type=int, default=8)
    parser.add_argument("--skip-baseline", action="store_true")
    parser.add_argument("--workloads", nargs="+", default=["text", "mix"], choices=["text", "mix"])
    parser.add_argument("--svg", type=Path, default=None, help="write the plot here")
    parser.add_argument("--step-budget", type=float, default=None, metavar="SECONDS",
                        help="passed to `mllama serve` (default: serve's own)")
    parser.add_argument("--step-budget-ratio", type=float, default=None, metavar="X",
                        help="passed to `mllama serve` (default: serve's own)")
    parser.add_argument("--vision-threads", type=int, default=None, metavar="N",
                        help="passed to `mllama serve` (default: serve's own; 0: vision pieces take turns)")
    parser.add_argument("--quantize", choices=["int8", "int4"], default=None,
                        help="passed to `mllama serve` (the baseline keeps transformers' bf16)")
    parser.add_argument("--no-pack", action="store_true",
                        help="passed to `mllama serve`: bf16 weights in their plain layout, not packed for oneDNN")
    args = parser.parse_args()
    from mllama.cli import default_model_dir
    from test_server import Server  # the tests' subprocess runner: free port, waits for /health

    model_dir = args.model or str(default_model_dir())
    budget = [] if args.step_budget is None else ["--step-budget", str(args.step_budget)]
    budget += [] if args.step_budget_ratio is None else ["--step-budget-ratio", str(args.step_budget_ratio)]
    budget += [] if args.vision_threads is None else ["--vision-threads", str(args.vision_threads)]
    budget += [] if args.quantize is None else ["--quantize", args.quantize]
    budget += ["--no-pack"] if args.no_pack else []
    server = Server("--model", model_dir, "--max-slots", str(max(args.clients)), "--max-queue", "1024", *budget)
    rows = []
    try:
        for workload in args.workloads:
            asyncio.run(run_clients(server.base, clients=1, requests=2, tokens=4, workload=workload, seed_base=0))
            for clients in args.clients:
                row = asyncio.run(run_clients(server.base, clients=clients, requests=args.requests, tokens=args.tokens,
                                              workload=workload, seed_base=1000 * clients))
                rows.append(row)
                print(json.dumps({k: round(v, 4) if isinstance(v, float) else v for k, v in row.items()}), flush=True)
    finally:
        server.stop()
    base = {} if args.skip_baseline else {
        w: baseline(model_dir, requests=args.baseline_requests, tokens=args.tokens, workload=w) for w in args.workloads}
    for w, b in base.items():
        print(f"baseline ({w}): " + json.dumps({k: round(v, 4) for k, v in b.items()}), flush=True)
    print("\n| workload | clients | requests/s | tokens/s | vs transformers | TTFT p50 / p99 (ms) | "
          "inter-token p50 / p99 (ms) |\n|---|---|---|---|---|---|---|")
    for r in rows:
        ratio = f"{r['tokens_s'] / base[r['workload']]['tokens_s']:.1f}x" if base else "-"
        print(f"| {r['workload']} | {r['clients']} | {r['requests_s']:.1f} | {r['tokens_s']:.0f} | {ratio} | "
              f"{r['ttft_p50'] * 1e3:.0f} / {r['ttft_p99'] * 1e3:.0f} | {r['itl_p50'] * 1e3:.1f} / "
              f"{r['itl_p99'] * 1e3:.1f} |")
    if args.svg:
        svg_plot(rows, base, args.svg)
        print(f"plot: {args.svg}")


if __name__ == "__main__":
    main()
