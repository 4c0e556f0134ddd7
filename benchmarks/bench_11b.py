"""The real 11B shapes on this machine: a random-weight bf16 checkpoint with Llama 3.2-11B-Vision's
configuration (../shared/reference/config-11b.json), loaded quantized (int4, int8; "-all": vision
encoder and lm_head too) in a fresh process each: load time, peak RSS, text decode tokens/s; optionally the time to first token with a
1-tile and a 4-tile image and the decode rate after each (and the decode attention kernel against SDPA).

    python benchmarks/bench_11b.py [--modes int4 int8] [--new-tokens 16] [--images] [--attention-ab] [--layer-ab]

The checkpoint (21 GB) is written once under benchmarks/_work/11b-random, a shard at a time (the
writer never holds more than one 2 GB shard). Weights ~ N(0, 0.02), norm scales ~ 1, gates 0.3-0.8,
as bench_checkpoints.py draws them (the tile tables' empty slots zero, as published).
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
DIRECTORY = HERE / "_work" / "11b-random"
CONFIG = HERE.parent.parent / "shared" / "reference" / "config-11b.json"


def write_checkpoint(directory: Path, config_path: Path) -> None:
    from mllama import MllamaConfig, MllamaForConditionalGeneration
    from mllama.safetensors_io import ShardWriter

    from bench_checkpoints import LAYOUT_VERSION, zero_empty_tile_slots

    stamp = directory / "bench_spec.json"
    spec = json.loads(config_path.read_text())
    want = {**spec, "layout_version": LAYOUT_VERSION}
    if stamp.exists() and json.loads(stamp.read_text()) == want:
        return
    start = time.perf_counter()
    config = MllamaConfig.from_dict(spec)
    with torch.device("meta"):
        model = MllamaForConditionalGeneration(config)
    gen = torch.Generator().manual_seed(0)
    writer = ShardWriter(directory, max_shard_size=2 * 10**9)
    for name, p in model.state_dict().items():
        data = torch.empty(p.shape, dtype=torch.bfloat16)
        if "gate" in name and p.numel() == 1:
            data.fill_(0.3 + 0.5 * torch.rand(1, generator=gen).item())
        elif "norm" in name and name.endswith("weight"):
            data.copy_(1 + 0.05 * torch.randn(p.shape, generator=gen))
        else:
            data.normal_(0, 0.02, generator=gen)
        writer.add(name, zero_empty_tile_slots(name, data, config.vision_config))
    writer.close()
    config.save_pretrained(directory)
    stamp.write_text(json.dumps(want))
    print(f"wrote {directory} in {time.perf_counter() - start:.0f} s", flush=True)


class _Alternating:
    """A streamer that sets `owner`'s attributes `names` to their own values and to `off` in turns, every
    `block` tokens of one generation (one prefill for both), and records each step's time under its setting."""

    def __init__(self, block: int, owner: object, names: tuple[str, ...], off: object) -> None:
        self.owner, self.names, self.off, self.block = owner, names, off, block
        self.on = {name: getattr(owner, name) for name in names}
        self.steps: dict[bool, list[float]] = {True: [], False: []}
        self.last: float | None = None
        self.count = 0

    def put(self, value: torch.Tensor) -> None:
        now = time.perf_counter()
        using = getattr(self.owner, self.names[0]) is self.on[self.names[0]]
        if self.last is not None and self.count > 1:  # the prompt's put, then the first token's
            self.steps[using].append(now - self.last)
        self.count += 1
        self.last = now
        on = (self.count // self.block) % 2 == 0
        for name in self.names:
            setattr(self.owner, name, self.on[name] if on else self.off)

    def end(self) -> None:
        for name in self.names:
            setattr(self.owner, name, self.on[name])


LONG_PROMPT = 2000  # tokens of text before the decode of --attention-ab's long chat


def _ab(model, ids: torch.Tensor, inputs: dict, new_tokens: int, owner: object, names: tuple[str, ...]) -> float:
    """Decode after this prompt (`inputs`: an image's tensors and generate's options) with `owner`'s
    `names` (kernels' entries, None meaning "does not apply") switched on and off every 4 tokens of one
    generation: the median step without them over the median step with them."""
    clock = _Alternating(4, owner, names, lambda *args, **kwargs: None)
    model.generate(ids, **inputs, max_new_tokens=max(new_tokens, 32) + 1, streamer=clock)
    return round(statistics.median(clock.steps[False]) / statistics.median(clock.steps[True]), 3)


def _attention_ab(model, ids: torch.Tensor, inputs: dict, new_tokens: int) -> float:
    """_ab of the decode attention kernel (its route back to SDPA)."""
    from mllama import row_kernels

    return _ab(model, ids, inputs, new_tokens, row_kernels, ("decode_attention",))


def _layer_ab(model, ids: torch.Tensor, inputs: dict, new_tokens: int,
              names: tuple[str, ...] = ("stack_one_token", "one_token", "cross_one_token")) -> float:
    """_ab of the layers' one-call decode steps (mllama.decode_layer: the whole stack's call and each
    layer's; their route back to the layers' modules), or of those of `names`."""
    from mllama import decode_layer

    return _ab(model, ids, inputs, new_tokens, decode_layer, names)


def measure(directory: Path, mode: str, new_tokens: int, images: bool, attention_ab: bool = False,
            layer_ab: bool = False) -> dict:
    """In this (fresh) process: load quantized, then decode and optionally image TTFTs."""
    from bench_phases import TokenClock
    from mllama import MllamaForConditionalGeneration

    torch.set_grad_enabled(False)
    start = time.perf_counter()
    from mllama.quantize import QuantizationConfig

    quantization = None if mode == "bf16" else QuantizationConfig(mode.split("-")[0], vision=mode.endswith("-all"),
                                                                  lm_head=mode.endswith("-all"))
    model = MllamaForConditionalGeneration.from_pretrained(directory, torch_dtype=torch.bfloat16,
                                                           quantization=quantization)
    result = {"mode": mode, "load_s": time.perf_counter() - start,
              "peak_rss_gb_after_load": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20}
    ids = torch.randint(3, 120000, (1, 32), generator=torch.Generator().manual_seed(1))
    ids[0, 0] = 128000
    model.generate(ids, max_new_tokens=2, eos_token_id=[], pad_token_id=0)  # warm-up (kernel builds)
    clock = TokenClock()
    start = time.perf_counter()
    model.generate(ids, max_new_tokens=new_tokens + 1, eos_token_id=[], pad_token_id=0, streamer=clock)
    # the first token ends the prefill; the decode rate is that of the steps after it, timed as they
    # come (a separately timed prefill subtracted from the whole moved it by tens of percent here)
    result["text_ttft_s"] = clock.times[1] - start
    result["decode_tokens_s"] = new_tokens / (clock.times[-1] - clock.times[1])
    if layer_ab:
        result["decode_one_call_over_modules"] = _layer_ab(model, ids, dict(eos_token_id=[], pad_token_id=0), new_tokens)
    if images:
        size = model.config.vision_config.image_size
        for tiles, ratio_id in ((1, 1), (4, 6)):
            pixels = torch.randn(1, 1, 4, 3, size, size, generator=torch.Generator().manual_seed(tiles))
            pixels[:, :, tiles:] = 0  # padded tiles, as the image processor fills them
            mask = torch.zeros(1, 4, dtype=torch.long)
            mask[0, :tiles] = 1
            cam = torch.zeros(1, 32, 1, 4, dtype=torch.long)
            cam[0, 1:, 0, :tiles] = 1
            img_ids = ids.clone()
            img_ids[0, 1] = model.config.image_token_index
            image = dict(pixel_values=pixels.bfloat16(), aspect_ratio_ids=torch.tensor([[ratio_id]]),
                         aspect_ratio_mask=mask[None], cross_attention_mask=cam, eos_token_id=[], pad_token_id=0)
            clock = TokenClock()
            t = time.perf_counter()
            model.generate(img_ids, **image, max_new_tokens=new_tokens + 1, streamer=clock)
            result[f"ttft_{tiles}_tile_s"] = clock.times[1] - t
            result[f"decode_{tiles}_tile_tokens_s"] = new_tokens / (clock.times[-1] - clock.times[1])
            if attention_ab:
                result[f"decode_{tiles}_tile_kernel_over_sdpa"] = _attention_ab(model, img_ids, image, new_tokens)
            if layer_ab:
                result[f"decode_{tiles}_tile_one_call_over_modules"] = _layer_ab(model, img_ids, image, new_tokens)
                # the stack through the cross-attention layers too, over one call per self-attention layer
                # and the cross-attention layers' modules (the route before the stack took images)
                result[f"decode_{tiles}_tile_stack_over_self_layer_calls"] = _layer_ab(
                    model, img_ids, image, new_tokens, ("stack_one_token", "cross_one_token"))
    if attention_ab:  # a long chat: every self-attention layer reads LONG_PROMPT cached keys a step
        long_ids = torch.randint(3, 120000, (1, LONG_PROMPT), generator=torch.Generator().manual_seed(2))
        long_ids[0, 0] = 128000
        result[f"decode_{LONG_PROMPT}_cached_kernel_over_sdpa"] = _attention_ab(
            model, long_ids, dict(eos_token_id=[], pad_token_id=0), new_tokens)
    result["peak_rss_gb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--modes", nargs="+", default=["int4", "int4-all", "int8"],
                        choices=["int4", "int4-all", "int8", "int8-all", "bf16"],
                        help="-all: the vision encoder and lm_head quantized too")
    parser.add_argument("--new-tokens", type=int, default=16)
    parser.add_argument("--images", action="store_true",
                        help="also the TTFT and decode tokens/s with a 1-tile and a 4-tile image")
    parser.add_argument("--attention-ab", action="store_true",
                        help="decode speed with the decode attention kernel over SDPA, one generation each: after each image "
                             "(with --images) and after a 2000-token text prompt")
    parser.add_argument("--layer-ab", action="store_true",
                        help="decode speed with the layers' one-call steps over their modules, one generation each: after "
                             "the text prompt (and each image with --images, where also the stack through every layer "
                             "over one call per self-attention layer and the cross-attention layers' modules)")
    parser.add_argument("--config", type=Path, default=CONFIG)
    parser.add_argument("--measure", default=None, help=argparse.SUPPRESS)  # internal: one mode, this process
    args = parser.parse_args()
    if args.measure:
        print(json.dumps(measure(DIRECTORY, args.measure, args.new_tokens, args.images, args.attention_ab,
                                 args.layer_ab)), flush=True)
        return
    write_checkpoint(DIRECTORY, args.config)
    weights = sum(f.stat().st_size for f in DIRECTORY.glob("*.safetensors"))
    print(f"checkpoint: {weights / 1e9:.1f} GB of bf16 weights; machine RAM "
          f"{Path('/proc/meminfo').read_text().split()[1]} kB", flush=True)
    for mode in args.modes:
        cmd = [sys.executable, __file__, "--measure", mode, "--new-tokens", str(args.new_tokens)]
        if args.images:
            cmd.append("--images")
        if args.attention_ab:
            cmd.append("--attention-ab")
        if args.layer_ab:
            cmd.append("--layer-ab")
        proc = subprocess.run(cmd, capture_output=True, text=True)
        line = next((ln for ln in reversed(proc.stdout.splitlines()) if ln.startswith("{")), None)
        print(line or f"{mode}: failed (exit {proc.returncode}): {proc.stderr[-2000:]}", flush=True)


if __name__ == "__main__":
    main()
