"""One measurement of `bench.py`, run in a fresh process so each starts cold and owns its peak RSS.

    python benchmarks/bench_phases.py PHASE IMPL '{"checkpoint": ..., ...}'

IMPL is "hf" (transformers, the reference) or "ours" (mllama); for "generate" and "tiny" also
"ours-compiled" (generate(compile=True)), for "preprocess" also "ours-pil".
Prints one JSON line with the results.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path
from typing import Any, Callable

import torch

PHOTOS = ["astronaut.png", "coffee.png", "chelsea.png", "rocket.jpg", "motorcycle_left.png",
          "hubble_deep_field.jpg", "retina.jpg"]
ONE_TILE_PHOTO = "astronaut.png"  # 512 x 512 -> one 560 px tile (3 padded tiles)
FOUR_TILE_PHOTO = "hubble_deep_field.jpg"  # 872 x 1000 -> a 2 x 2 grid


def status(key: str) -> int:
    """A /proc/self/status field in bytes (VmHWM = peak RSS, VmRSS = current RSS)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key):
                return int(line.split()[1]) * 1024
    raise KeyError(key)


def best_of(fn: Callable[[], Any], repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def photo(name: str):
    import skimage
    from PIL import Image

    return Image.open(Path(skimage.__file__).parent / "data" / name).convert("RGB")


def model_class(impl: str):
    if impl == "hf":
        from transformers import MllamaForConditionalGeneration
    else:
        from mllama import MllamaForConditionalGeneration
    return MllamaForConditionalGeneration


def load_model(impl: str, checkpoint: str):
    cls = model_class(impl)
    return cls.from_pretrained(checkpoint, dtype="auto").eval()


def image_inputs(checkpoint: str, name: str) -> dict[str, torch.Tensor]:
    """pixel_values, aspect_ratio_ids, aspect_ratio_mask of one photo, as the reference processor makes them."""
    from mllama.image_processing import MllamaImageProcessorPil

    config = json.loads(Path(checkpoint, "config.json").read_text())["vision_config"]
    processor = MllamaImageProcessorPil(size=config["image_size"], max_image_tiles=config["max_num_tiles"])
    features = processor([[photo(name)]], return_tensors="pt")
    return {k: features[k] for k in ("pixel_values", "aspect_ratio_ids", "aspect_ratio_mask")}


def prompt_inputs(checkpoint: str, *, text_tokens: int, photo_name: str) -> dict[str, torch.Tensor]:
    """What the processor gives for "<|begin_of_text|><|image|>" + `text_tokens` text tokens and one photo."""
    config = json.loads(Path(checkpoint, "config.json").read_text())
    text = config["text_config"]
    gen = torch.Generator().manual_seed(0)
    words = torch.randint(0, min(text["vocab_size"], 128000), (text_tokens,), generator=gen)
    ids = torch.cat([torch.tensor([text["bos_token_id"], config["image_token_index"]]), words])[None]
    inputs = image_inputs(checkpoint, photo_name)
    tiles = int(inputs["aspect_ratio_mask"].sum())
    max_tiles = inputs["aspect_ratio_mask"].shape[-1]
    cross = torch.zeros(1, ids.shape[1], 1, max_tiles, dtype=torch.long)
    cross[:, 1:, 0, :tiles] = 1  # every token from the image token on sees the image's real tiles
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "cross_attention_mask": cross, **inputs}


class TokenClock:
    """A streamer that only records when each put arrives (the prompt first, then each new token)."""

    def __init__(self) -> None:
        self.times: list[float] = []

    def put(self, value: torch.Tensor) -> None:
        self.times.append(time.perf_counter())

    def end(self) -> None:
        pass


def generate_kwargs(impl: str) -> dict[str, Any]:
    """"ours-compiled" is mllama with its torch.compile'd decode step."""
    return {"compile": True} if impl == "ours-compiled" else {}


def timed_generate(model, inputs: dict[str, torch.Tensor], new_tokens: int, impl: str) -> tuple[float, float, int]:
    """(time to first new token, decode tokens/s after it, tokens generated)."""
    clock = TokenClock()
    start = time.perf_counter()
    out = model.generate(**inputs, max_new_tokens=new_tokens, do_sample=False, streamer=clock,
                         **generate_kwargs(impl))
    generated = out.shape[1] - inputs["input_ids"].shape[1]
    ttft = clock.times[1] - start
    decode = (len(clock.times) - 2) / (clock.times[-1] - clock.times[1]) if len(clock.times) > 2 else float("nan")
    return ttft, decode, generated


# ------------------------------------------------------------------------------------------------------
# Phases
# ------------------------------------------------------------------------------------------------------


def phase_bandwidth(impl: str, args: dict[str, Any]) -> dict[str, Any]:
    """Memory read bandwidth: the fastest of several full reads of 1 GiB (far larger than the caches),
    best of N each. No single reader is fastest every time on this machine, and the decode kernel
    itself sometimes streams faster than torch's sum, so the limit is the best of them all."""
    rates = read_rates(args.get("repeats", 10))
    x = torch.ones(2**30 // 2, dtype=torch.bfloat16)
    y = torch.empty_like(x)
    t_copy = best_of(lambda: y.copy_(x), args.get("repeats", 10))
    return {"read_GBps": max(rates.values()), "readers_GBps": rates, "copy_GBps": 2 * x.numel() * 2 / t_copy / 1e9}


def read_rates(repeats: int) -> dict[str, float]:
    """GB/s of several full reads of 1 GiB, best of `repeats` each."""
    x = torch.ones(2**30 // 2, dtype=torch.bfloat16)
    readers = {"sum_bf16": lambda: x.sum(), "sum_fp32": lambda: x.view(torch.float32).sum(),
               "amax_int8": lambda: x.view(torch.int8).amax()}
    from mllama import cpu_kernels

    if cpu_kernels.gemv_available():
        matrix, vector = x.view(-1, 4096), torch.ones(1, 4096, dtype=torch.bfloat16)
        readers["decode_kernel"] = lambda: cpu_kernels.gemv_bf16(vector, matrix)
    rates = {}
    for name, read in readers.items():
        read()
        rates[name] = x.numel() * 2 / best_of(read, repeats) / 1e9
    return rates


def phase_load(impl: str, args: dict[str, Any]) -> dict[str, Any]:
    cls = model_class(impl)
    # The first meta-device ops import torch's meta kernels: a fixed one-off, kept out of the peak.
    with torch.device("meta"):
        torch.nn.Embedding(4, 4).weight.mul(2)
    base = status("VmHWM")
    start = time.perf_counter()
    model = cls.from_pretrained(args["checkpoint"], dtype="auto")
    seconds = time.perf_counter() - start
    peak_load = status("VmHWM") - base
    # transformers maps the safetensors files and reads a page at its first use: time until every
    # weight has been read once, so both sides have the weights in memory.
    with torch.inference_mode():
        for t in model.state_dict().values():
            t.sum()
    touched = time.perf_counter() - start
    weights = sum(t.numel() * t.element_size() for t in model.state_dict().values())
    return {"seconds": seconds, "seconds_touched": touched, "weights": weights, "peak_over_baseline": peak_load,
            "peak_after_touch": status("VmHWM") - base, "rss_after_over_baseline": status("VmRSS") - base}


@torch.inference_mode()
def phase_vision(impl: str, args: dict[str, Any]) -> dict[str, Any]:
    model = load_model(impl, args["checkpoint"])
    vision = model.model.vision_model
    repeats = args.get("repeats", 2)
    out: dict[str, Any] = {}
    for label, name in (("1tile", ONE_TILE_PHOTO), ("4tile", FOUR_TILE_PHOTO)):
        inputs = image_inputs(args["checkpoint"], name)
        inputs["pixel_values"] = inputs["pixel_values"].to(torch.bfloat16)
        out[f"tiles_{label}"] = int(inputs["aspect_ratio_mask"].sum())
        if label == "1tile":
            vision(**inputs)  # first-call kernel selection and allocations, for both implementations
        out[f"seconds_{label}"] = best_of(lambda: vision(**inputs), repeats)
    return out


@torch.inference_mode()
def phase_generate(impl: str, args: dict[str, Any]) -> dict[str, Any]:
    model = load_model(impl, args["checkpoint"])
    inputs = prompt_inputs(args["checkpoint"], text_tokens=args["prompt_tokens"], photo_name=args["photo"])
    result: dict[str, Any] = {}
    if args.get("warmup") or impl == "ours-compiled":
        start = time.perf_counter()
        timed_generate(model, inputs, 2, impl)  # the compiled variant compiles its decode step here
        result["warmup_seconds"] = time.perf_counter() - start
    ttfts, rates = [], []
    for _ in range(args.get("repeats", 2)):
        ttft, rate, generated = timed_generate(model, inputs, args["new_tokens"], impl)
        ttfts.append(ttft)
        rates.append(rate)
    # The machine's read bandwidth right after decoding, in this process: on a shared machine it
    # moves by 1.5x from one minute to the next, so the limit is taken under the same conditions.
    result["read_GBps"] = max(read_rates(5).values())
    result.update({"ttft": min(ttfts), "decode_tps": max(rates), "generated": generated,
                   "prompt_len": int(inputs["input_ids"].shape[1]), "tiles": int(inputs["aspect_ratio_mask"].sum())})
    if impl != "ours-compiled":
        # Time to first token with a one-tile image as well (three padded tiles go through the encoder).
        small = prompt_inputs(args["checkpoint"], text_tokens=args["prompt_tokens"], photo_name=ONE_TILE_PHOTO)
        result["ttft_1tile"] = min(timed_generate(model, small, 1, impl)[0] for _ in range(args.get("repeats", 2)))
    return result


@torch.inference_mode()
def phase_tiny(impl: str, args: dict[str, Any]) -> dict[str, Any]:
    model = load_model(impl, args["checkpoint"])
    inputs = prompt_inputs(args["checkpoint"], text_tokens=args["prompt_tokens"], photo_name=ONE_TILE_PHOTO)
    kwargs = {"max_new_tokens": args["new_tokens"], "do_sample": False, **generate_kwargs(impl)}
    start = time.perf_counter()
    model.generate(**inputs, **kwargs)  # warm-up (and compilation for "ours-compiled")
    warmup = time.perf_counter() - start
    generated = model.generate(**inputs, **kwargs).shape[1] - inputs["input_ids"].shape[1]
    seconds = best_of(lambda: model.generate(**inputs, **kwargs), args.get("repeats", 5))
    return {"seconds": seconds, "generated": generated, "tokens_per_s": generated / seconds, "warmup_seconds": warmup}


def phase_preprocess(impl: str, args: dict[str, Any]) -> dict[str, Any]:
    if impl == "hf":
        from transformers import MllamaImageProcessorPil as Processor
        kwargs: dict[str, Any] = {"return_tensors": "pt"}
    elif impl == "ours-pil":
        from mllama.image_processing import MllamaImageProcessorPil as Processor
        kwargs = {"return_tensors": "pt"}
    else:
        from mllama.image_processing import MllamaImageProcessor as Processor
        kwargs = {}
    processor = Processor(size={"height": 560, "width": 560}, max_image_tiles=4)
    batch = [[photo(name)] for name in PHOTOS]
    processor(batch, **kwargs)  # warm-up
    seconds = best_of(lambda: processor(batch, **kwargs), args.get("repeats", 5))
    return {"images_per_s": len(batch) / seconds, "images": len(batch)}


PHASES = {"bandwidth": phase_bandwidth, "load": phase_load, "vision": phase_vision, "generate": phase_generate,
          "tiny": phase_tiny, "preprocess": phase_preprocess}


def main() -> None:
    phase, impl, args = sys.argv[1], sys.argv[2], json.loads(sys.argv[3])
    torch.set_num_threads(args.get("threads") or os.cpu_count() or 1)
    result = PHASES[phase](impl, args)
    result["threads"] = torch.get_num_threads()
    print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
