"""The engine serving concurrent streams, against transformers serving the same requests one at a time.

    python benchmarks/bench_engine.py [--new-tokens 48] [--dtype bfloat16]

A small random model built in memory (text: 1024 wide, 8 layers, 2 of them cross-attention,
32k vocabulary; vision: 512 wide, 4 + 1 layers, 224-pixel tiles, up to 4 tiles), so that it runs
in a minute or two on a 2-core machine. Reports:
1. aggregate generated tokens/s with 1, 4 and 16 concurrent text streams (all submitted at once,
   wall time from submit to the last token), and the steady decode rate (steps where all streams
   decode); transformers' `generate` runs the same requests one after another (its rate does not
   depend on how many are waiting, so it is measured once).
2. stall and time to first token: 4 streams decode; a request with a 4-tile image and a 300-token
   prompt arrives. The longest decode step while it is prepared against the median step before,
   and its time to first token against the same request on an idle engine.
3. chat follow-up: the first request's prompt + its answer + a new 20-token question about the same
   image, as a chat client sends it; its time to first token against the first question's (the
   image cache gives the image's cross-attention K/V, the prefix cache the first turn's K/V).
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

CONFIG = {
    "text_config": dict(vocab_size=32000, hidden_size=1024, num_hidden_layers=8, num_attention_heads=16,
                        num_key_value_heads=4, intermediate_size=3584, cross_attention_layers=[3, 7],
                        rope_theta=500000.0, bos_token_id=1, eos_token_id=2, pad_token_id=0),
    "vision_config": dict(hidden_size=512, num_hidden_layers=4, num_global_layers=1, attention_heads=8,
                          intermediate_size=2048, vision_output_dim=2560, image_size=224, patch_size=14,
                          intermediate_layers_indices=[0, 1, 2, 3], max_num_tiles=4),
    "image_token_index": 32000,
}


def load(checkpoint: str, dtype: torch.dtype):
    """mllama and transformers models of a checkpoint directory (e.g. bench_checkpoints.py's); the
    requests follow its image size and image token."""
    import json
    from pathlib import Path

    import transformers

    from mllama import MllamaForConditionalGeneration

    config = json.loads((Path(checkpoint) / "config.json").read_text())
    CONFIG["vision_config"]["image_size"] = config["vision_config"]["image_size"]
    CONFIG["image_token_index"] = config["image_token_index"]
    ours = MllamaForConditionalGeneration.from_pretrained(checkpoint, torch_dtype=dtype)
    hf = transformers.MllamaForConditionalGeneration.from_pretrained(checkpoint, dtype=dtype)
    return ours.eval(), hf.eval()


def build(dtype: torch.dtype):
    import transformers

    from mllama import MllamaConfig, MllamaForConditionalGeneration
    from mllama.linear import apply_cpu_kernels

    config = MllamaConfig.from_dict(CONFIG)
    torch.manual_seed(0)
    ours = MllamaForConditionalGeneration(config)
    with torch.no_grad():
        for name, p in ours.named_parameters():
            p.copy_(torch.randn_like(p) * 0.02 if "gate" not in name else torch.full_like(p, 0.7))
    hf = transformers.MllamaForConditionalGeneration(transformers.MllamaConfig.from_dict(config.to_dict()))
    hf.load_state_dict(ours.state_dict(), strict=True)
    return apply_cpu_kernels(ours.to(dtype).eval()), hf.to(dtype).eval()


def text_request(i: int, *, length: int, new: int):
    from mllama import Request, SamplingParams

    ids = torch.randint(3, 32000, (length,), generator=torch.Generator().manual_seed(i))
    ids[0] = 1
    return Request(input_ids=ids, sampling=SamplingParams(max_tokens=new))


def image_request(seed: int, *, length: int, new: int, question_seed: int = 0):
    vc = CONFIG["vision_config"]
    request = text_request(1000 + question_seed, length=length, new=new)
    request.input_ids[1] = CONFIG["image_token_index"]
    gen = torch.Generator().manual_seed(seed)
    request.pixel_values = torch.randn(1, 4, 3, vc["image_size"], vc["image_size"], generator=gen)
    request.aspect_ratio_ids = torch.tensor([6])  # 2x2 in the default table
    request.aspect_ratio_mask = torch.ones(1, 4, dtype=torch.long)
    request.cross_attention_mask = torch.zeros(length, 1, 4, dtype=torch.long)
    request.cross_attention_mask[1:] = 1
    return request


def chat_follow_up(first, answer: list[int], *, question: int, new: int):
    """first's prompt + its answer + `question` new tokens, seeing the same image as first's last token."""
    from mllama import Request, SamplingParams

    ids = torch.randint(3, 32000, (question,), generator=torch.Generator().manual_seed(2000))
    ids = torch.cat([first.input_ids, torch.tensor(answer), ids])
    cam = first.cross_attention_mask
    cam = torch.cat([cam, cam[-1:].expand(ids.numel() - cam.shape[0], -1, -1)])
    return Request(input_ids=ids, sampling=SamplingParams(max_tokens=new), pixel_values=first.pixel_values,
                   aspect_ratio_ids=first.aspect_ratio_ids, aspect_ratio_mask=first.aspect_ratio_mask,
                   cross_attention_mask=cam)


def engine_throughput(model, streams: int, *, length: int, new: int) -> tuple[float, float]:
    from mllama import Engine

    engine = Engine(model, max_slots=streams, max_len=length + new + 8, prefill_chunk=512)
    start = time.perf_counter()
    handles = [engine.submit(text_request(i, length=length, new=new)) for i in range(streams)]
    full_steps, full_time = 0, 0.0
    while engine.has_work:
        t = time.perf_counter()
        all_decoding = engine.num_decoding == streams
        engine.step()
        if all_decoding:
            full_steps += 1
            full_time += time.perf_counter() - t
    total = time.perf_counter() - start
    assert all(len(h.tokens) == new for h in handles)
    return streams * new / total, streams * full_steps / full_time if full_time else float("nan")


def hf_one_at_a_time(hf, *, requests: int, length: int, new: int) -> float:
    start = time.perf_counter()
    for i in range(requests):
        ids = text_request(i, length=length, new=new).input_ids[None]
        with torch.inference_mode():
            out = hf.generate(input_ids=ids, max_new_tokens=new, min_new_tokens=new, do_sample=False,
                              eos_token_id=None, pad_token_id=0)
        assert out.shape[1] == length + new
    return requests * new / (time.perf_counter() - start)


def ttft_alone(model, request) -> float:
    from mllama import Engine

    engine = Engine(model, max_slots=1, max_len=1024, image_cache_bytes=0)
    start = time.perf_counter()
    handle = engine.submit(request)
    while not handle.tokens:
        engine.step()
    return time.perf_counter() - start


def stall(model, *, new: int, budget: float | None) -> dict:
    from mllama import Engine

    engine = Engine(model, max_slots=8, max_len=1024, prefill_budget_s=budget)
    for i in range(4):
        engine.submit(text_request(i, length=32, new=10_000 // 10))
    steps = []
    while engine.num_decoding < 4 or len(steps) < 10:
        t = time.perf_counter()
        engine.step()
        steps.append(time.perf_counter() - t)
    before = statistics.median(steps[-8:])
    first = image_request(7, length=300, new=new)
    t0 = time.perf_counter()
    handle = engine.submit(first)
    during = []
    while not handle.tokens:
        t = time.perf_counter()
        engine.step()
        during.append(time.perf_counter() - t)
    ttft = time.perf_counter() - t0
    while not handle.finished:
        engine.step()
    reused = engine.prefix_cache.tokens_reused  # the BOS of the streams
    request = chat_follow_up(first, handle.tokens, question=20, new=new)
    t0 = time.perf_counter()
    follow = engine.submit(request)
    while not follow.tokens:
        engine.step()
    ttft_follow = time.perf_counter() - t0
    return {"median_step": before, "max_step_during": max(during), "steps_during": len(during), "ttft": ttft,
            "ttft_follow_up": ttft_follow, "cache_hits": engine.image_cache.hits,
            "follow_up_tokens": request.input_ids.numel(), "reused": engine.prefix_cache.tokens_reused - reused}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--new-tokens", type=int, default=48)
    parser.add_argument("--prompt-tokens", type=int, default=32)
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    parser.add_argument("--parts", default="streams,stall", help="comma-separated: streams, stall")
    parser.add_argument("--prefill-budget", type=float, default=1.0,
                        help="Engine(prefill_budget_s=) in the stall part; 0 for fixed 128-token chunks")
    parser.add_argument("--checkpoint", default=None,
                        help="a checkpoint directory instead of the in-memory model (e.g. benchmarks/_work/bench-checkpoint)")
    args = parser.parse_args()
    torch.set_grad_enabled(False)
    dtype = getattr(torch, args.dtype)
    ours, hf = load(args.checkpoint, dtype) if args.checkpoint else build(dtype)
    length, new = args.prompt_tokens, args.new_tokens
    engine_throughput(ours, 1, length=length, new=4)  # warm-up
    print(f"model: {sum(p.numel() for p in ours.parameters()) / 1e6:.0f}M parameters, {args.dtype}, "
          f"{torch.get_num_threads()} threads; prompts {length} tokens, {new} new tokens each")
    parts = args.parts.split(",")
    if "streams" in parts:
        streams_part(ours, hf, length=length, new=new)
    if "stall" in parts:
        stall_part(ours, new=new, budget=args.prefill_budget or None)


def streams_part(ours, hf, *, length: int, new: int) -> None:
    hf_rate = hf_one_at_a_time(hf, requests=3, length=length, new=new)
    print(f"transformers, one request at a time: {hf_rate:.1f} tokens/s")
    one = None
    for streams in (1, 4, 16):
        rate, steady = engine_throughput(ours, streams, length=length, new=new)
        one = one or rate
        print(f"engine, {streams:2d} streams: {rate:6.1f} tokens/s aggregate ({rate / hf_rate:4.1f}x transformers, "
              f"{rate / one:4.1f}x one stream); steady decode {steady:6.1f} tokens/s")


def stall_part(ours, *, new: int, budget: float | None) -> None:
    alone = ttft_alone(ours, image_request(7, length=300, new=new))
    s = stall(ours, new=new, budget=budget)
    print(f"prefill_budget_s={budget}: 4 streams decoding, median step {s['median_step'] * 1e3:.0f} ms; "
          f"a 4-tile image request with a 300-token prompt arrives: longest step while it is prepared {s['max_step_during'] * 1e3:.0f} ms "
          f"({s['steps_during']} steps); its time to first token {s['ttft']:.2f} s vs {alone:.2f} s on an idle "
          f"engine ({s['ttft'] / alone - 1:+.0%})")
    print(f"chat follow-up about the same image ({s['follow_up_tokens']} tokens; image cache {s['cache_hits']} hit, "
          f"prefix cache {s['reused']} tokens reused): time to first token {s['ttft_follow_up']:.2f} s = "
          f"{s['ttft_follow_up'] / s['ttft']:.0%} of the first question's")


if __name__ == "__main__":
    main()
