"""Where an engine step's time goes on a GPU: per-step wall times of one text stream (first pass and a
repeat), generate() on the same prompt, and a torch.profiler table of a few steps.

    python benchmarks/gpu_profile_engine.py [--checkpoint bench] [--device cuda]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def request(text: dict, new: int):
    from mllama import Request, SamplingParams

    ids = torch.randint(3, min(text["vocab_size"], 128000), (32,), generator=torch.Generator().manual_seed(0))
    ids[0] = text["bos_token_id"]
    return Request(input_ids=ids, sampling=SamplingParams(max_tokens=new))


def step_times(engine, req, device: torch.device) -> list[float]:
    engine.submit(req)
    times = []
    while engine.has_work:
        sync(device)
        t = time.perf_counter()
        engine.step()
        sync(device)
        times.append(time.perf_counter() - t)
    return times


def summary(label: str, times: list[float]) -> None:
    print(f"{label}: {len(times)} steps, total {sum(times) * 1e3:.1f} ms, first {[round(t * 1e3, 2) for t in times[:4]]} ms, "
          f"median {statistics.median(times) * 1e3:.2f} ms, max {max(times) * 1e3:.2f} ms", flush=True)


@torch.inference_mode()
def main() -> None:
    import json

    from bench_checkpoints import ensure_checkpoint

    from mllama import Engine, MllamaForConditionalGeneration

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--checkpoint", default="bench")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--new-tokens", type=int, default=64)
    args = parser.parse_args()
    device = torch.device(args.device)
    path = ensure_checkpoint(args.checkpoint, processor_files=False, init_device=str(device))
    text = json.loads((path / "config.json").read_text())["text_config"]
    model = MllamaForConditionalGeneration.from_pretrained(path, dtype=torch.bfloat16, device=device)
    print(f"threads {torch.get_num_threads()}, linears: {sorted({type(m).__name__ for m in model.modules() if 'Linear' in type(m).__name__})}")
    engine = Engine(model, max_slots=1, max_len=32 + args.new_tokens + 8)
    summary("engine, warm-up (4 tokens)", step_times(engine, request(text, 4), device))
    summary("engine, first pass", step_times(engine, request(text, args.new_tokens), device))
    summary("engine, repeat", step_times(engine, request(text, args.new_tokens), device))
    ids = request(text, 1).input_ids[None].to(device)
    for label in ("generate, first", "generate, repeat"):
        sync(device)
        t = time.perf_counter()
        model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=args.new_tokens, do_sample=False)
        sync(device)
        print(f"{label}: {(time.perf_counter() - t) * 1e3:.1f} ms for {args.new_tokens} tokens", flush=True)
    fresh = Engine(model, max_slots=1, max_len=200)
    activities = [torch.profiler.ProfilerActivity.CPU] + ([torch.profiler.ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with torch.profiler.profile(activities=activities) as prof:
        summary("engine, profiled (new max_len)", step_times(fresh, request(text, 24), device))
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=18), flush=True)
    if device.type == "cuda":
        print(prof.key_averages().table(sort_by="self_cuda_time_total", row_limit=10), flush=True)


if __name__ == "__main__":
    main()
