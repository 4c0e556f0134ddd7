"""Tensor parallelism on this machine: TP=1 (one plain process) against TP=N (N gloo processes).

    python benchmarks/bench_tp.py [--checkpoint bench|tiny] [--worlds 1,2] [--new-tokens 16] [--dtype bfloat16] [--no-image]

Each rank loads its slices (mllama.tp_load), then rank by rank we record the load time, peak RSS
(above the process's RSS before loading), the bytes of parameters and buffers it holds, the vision
encode of one 4-tile image, time to first token (66-token prompt with that image) and decode
tokens/s. Rows are printed as a markdown table. All ranks share this machine's cores and memory
bus, so on a small CPU box expect no speed-up, only the memory split.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import socket
import sys
import time
from pathlib import Path
from typing import Any

import torch
import torch.multiprocessing as mp

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))


def _rss_mib() -> float:
    for line in open("/proc/self/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def _rank(rank: int, world: int, port: int, checkpoint: str, dtype: str, new_tokens: int, image: bool,
          out: str) -> None:
    from gpu_check import prompt, timed_generate, vision_inputs

    torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))
    from mllama import MllamaForConditionalGeneration
    from mllama.tp_load import init_distributed, load_tensor_parallel

    device = torch.device("cpu")
    before = _rss_mib()
    start = time.perf_counter()

    if world > 1:
        os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                          MASTER_PORT=str(port))
        init_distributed(timeout_s=600)
        model = load_tensor_parallel(MllamaForConditionalGeneration, checkpoint, dtype=dtype)
    else:
        model = MllamaForConditionalGeneration.from_pretrained(checkpoint, dtype=dtype)
    result: dict[str, Any] = {"load_s": time.perf_counter() - start}
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    result["peak_rss_mib"] = peak - before
    result["held_mib"] = sum(t.numel() * t.element_size() for t in [*model.parameters(), *model.buffers()]) / 2**20
    config = json.loads((Path(checkpoint) / "config.json").read_text())
    with torch.inference_mode():
        vision = vision_inputs(config, device, model.dtype)
        inputs = prompt(config, vision, 64, device)
        result["vision_s"] = float("nan")
        if image:
            start = time.perf_counter()
            model.model.vision_model(**vision)
            result["vision_s"] = time.perf_counter() - start
        else:  # the same 66-token prompt, its image token an ordinary one and no image
            inputs = {"input_ids": inputs["input_ids"], "attention_mask": inputs["attention_mask"]}
        result["ttft_s"], result["decode_tps"] = timed_generate(model, inputs, new_tokens, device)
    Path(out, f"rank{rank}.json").write_text(json.dumps(result))
    if world > 1:
        import torch.distributed as dist

        dist.barrier()
        dist.destroy_process_group()


def run(world: int, checkpoint: str, dtype: str, new_tokens: int, image: bool, work: Path) -> list[dict[str, Any]]:
    for file in work.glob("rank*.json"):
        file.unlink()
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    ctx = mp.get_context("spawn")
    procs = [ctx.Process(target=_rank, args=(r, world, port, checkpoint, dtype, new_tokens, image, str(work)))
             for r in range(world)]
    for proc in procs:
        proc.start()
    for proc in procs:
        proc.join()
    if any(proc.exitcode for proc in procs):
        raise RuntimeError(f"TP={world}: a rank failed (exit codes {[p.exitcode for p in procs]})")
    return [json.loads((work / f"rank{r}.json").read_text()) for r in range(world)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", default="bench", choices=["bench", "tiny"])
    parser.add_argument("--worlds", default="1,2")
    parser.add_argument("--new-tokens", type=int, default=16)
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--no-image", action="store_true", help="text-only prompt, no vision encode (quicker)")
    args = parser.parse_args()
    from bench_checkpoints import ensure_checkpoint

    checkpoint = ensure_checkpoint(args.checkpoint)
    work = HERE / "_work" / "tp"
    work.mkdir(parents=True, exist_ok=True)
    what = "66-token prompt" if args.no_image else "66-token prompt + one 4-tile image (vision: one cold encode)"
    print(f"{args.checkpoint} checkpoint, {args.dtype}, {os.cpu_count()} cores; {what}, {args.new_tokens} new tokens")
    print("| TP | rank | load (s) | peak RSS (MiB) | held (MiB) | vision (s) | TTFT (s) | decode (tok/s) |")
    print("|---:|---:|---:|---:|---:|---:|---:|---:|")
    for world in [int(w) for w in args.worlds.split(",")]:
        for rank, r in enumerate(run(world, str(checkpoint), args.dtype, args.new_tokens, not args.no_image, work)):
            print(f"| {world} | {rank} | {r['load_s']:.1f} | {r['peak_rss_mib']:.0f} | {r['held_mib']:.0f} | "
                  f"{r['vision_s']:.2f} | {r['ttft_s']:.2f} | {r['decode_tps']:.2f} |", flush=True)


if __name__ == "__main__":
    main()
