"""The GPU path, checked and measured in one run (under 5 minutes on one GPU):

    python benchmarks/gpu_check.py [--checkpoint bench|tiny] [--new-tokens 64] [--no-compile]

1. Parity: a tiny random float32 model on the GPU against the same model on the CPU (TF32 off):
   logits of an image batch and greedy tokens through generate(). Also checks that the GPU path
   calls none of mllama's CPU-only kernels (cpu_kernels is asked, and must say no, for CUDA tensors).
2. Speed on the bench checkpoint (benchmarks/bench_checkpoints.py, written on first use), bf16,
   mllama against transformers on the same GPU: vision encode of a 4-tile image, time to first token
   (prompt + that image), decode tokens/s (unless --no-compile, also mllama's compiled decode step).
3. Quantized (int8, int4 loaded from the bf16 checkpoint): decode tokens/s, eager and compiled, and
   whether the first greedy token matches bf16's.
4. The engine on the bench checkpoint: aggregate tokens/s with 1 and 16 concurrent text streams.
One table is printed (and, with --json, the figures written there). Each part reports its own
failure and the next one runs; parts that would start after --budget-s seconds are skipped.
Without CUDA it exits with status 2 and says so (`--device cpu` runs the same code on the CPU, for
checking the script itself).
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import time
import traceback
from pathlib import Path
from typing import Any, Callable

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def best_of(fn: Callable[[], Any], repeats: int, device: torch.device) -> float:
    times = []
    for _ in range(repeats):
        sync(device)
        start = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - start)
    return min(times)


class Clock:
    """A streamer recording when each put arrives, after the device has finished the work behind it."""

    def __init__(self, device: torch.device) -> None:
        self.device, self.times = device, []

    def put(self, value: torch.Tensor) -> None:
        sync(self.device)
        self.times.append(time.perf_counter())

    def end(self) -> None:
        pass


def timed_generate(model, inputs: dict[str, torch.Tensor], new_tokens: int, device: torch.device,
                   **extra: Any) -> tuple[float, float]:
    """(time to first token, decode tokens/s after it)."""
    clock = Clock(device)
    sync(device)
    start = time.perf_counter()
    model.generate(**inputs, max_new_tokens=new_tokens, do_sample=False, streamer=clock, **extra)
    ttft = clock.times[1] - start
    rate = (len(clock.times) - 2) / (clock.times[-1] - clock.times[1]) if len(clock.times) > 2 else float("nan")
    return ttft, rate


def parity(device: torch.device) -> dict[str, Any]:
    """Tiny float32 model: the device's logits and greedy tokens against the CPU's."""
    from bench_checkpoints import CONFIGS

    from mllama import MllamaConfig, MllamaForConditionalGeneration, cpu_kernels
    from mllama.linear import apply_cpu_kernels
    from mllama.quantize import quantize_model

    spec = dict(CONFIGS["tiny"])
    spec.pop("dtype")
    config = MllamaConfig.from_dict(spec)
    cpu = MllamaForConditionalGeneration(config)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in sorted(cpu.named_parameters()):
            p.copy_(torch.randn(p.shape, generator=gen) * 0.3 if "gate" not in name else 0.5 + torch.rand(p.shape, generator=gen))
    apply_cpu_kernels(cpu.eval())  # as from_pretrained does: the GPU copy must still avoid the CPU kernels
    gpu = copy.deepcopy(cpu).to(device)
    vc = config.vision_config
    ids = torch.randint(3, config.text_config.vocab_size, (2, 12), generator=gen)
    ids[:, 1] = config.image_token_index
    cross = torch.zeros(2, 12, 1, vc.max_num_tiles, dtype=torch.long)
    cross[0, 1:, 0, :2] = 1
    cross[1, 1:, 0, :1] = 1
    real = torch.tensor([[[1, 1, 0, 0]], [[1, 0, 0, 0]]])
    inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "cross_attention_mask": cross,
              "pixel_values": torch.randn(2, 1, vc.max_num_tiles, 3, vc.image_size, vc.image_size, generator=gen)
              * real[..., None, None, None],
              "aspect_ratio_ids": torch.tensor([[2], [1]]), "aspect_ratio_mask": real}
    on_device = {k: v.to(device) for k, v in inputs.items()}
    with torch.inference_mode():
        ref, got = cpu(**inputs).logits, gpu(**on_device).logits.cpu()
        tokens_ref = cpu.generate(**inputs, max_new_tokens=16, do_sample=False)
        tokens_got = gpu.generate(**on_device, max_new_tokens=16, do_sample=False).cpu()
    # The CPU-only kernels refuse device tensors (so the GPU path never reaches them).
    x = torch.zeros(1, 64, dtype=torch.bfloat16, device=device)
    w = torch.zeros(64, 64, dtype=torch.bfloat16, device=device)
    kernels_used = cpu_kernels.use_gemv(x, w) if device.type != "cpu" else False
    q = quantize_model(copy.deepcopy(cpu).to(torch.bfloat16), "int8").to(device)
    layer = q.model.language_model.layers[0].mlp.gate_proj
    kernels_used = kernels_used or (device.type != "cpu" and layer._use_kernel(x))
    return {"max_abs_logit_diff": (got - ref).abs().max().item(), "tokens_equal": torch.equal(tokens_ref, tokens_got),
            "cpu_kernels_on_device": kernels_used}


def vision_inputs(config: dict, device: torch.device, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    vc = config["vision_config"]
    tiles = vc["max_num_tiles"]
    gen = torch.Generator().manual_seed(1)
    pixels = torch.randn(1, 1, tiles, 3, vc["image_size"], vc["image_size"], generator=gen)
    ratio = {1: 1, 2: 2, 3: 4, 4: 6}.get(tiles, 1)  # 2x2 among the default aspect ratios for 4 tiles
    return {"pixel_values": pixels.to(device, dtype), "aspect_ratio_ids": torch.tensor([[ratio]], device=device),
            "aspect_ratio_mask": torch.ones(1, 1, tiles, dtype=torch.long, device=device)}


def prompt(config: dict, vision: dict[str, torch.Tensor], tokens: int, device: torch.device) -> dict[str, torch.Tensor]:
    text = config["text_config"]
    gen = torch.Generator().manual_seed(0)
    words = torch.randint(0, min(text["vocab_size"], 128000), (tokens,), generator=gen)
    ids = torch.cat([torch.tensor([text["bos_token_id"], config["image_token_index"]]), words])[None].to(device)
    cross = torch.zeros(1, ids.shape[1], 1, vision["aspect_ratio_mask"].shape[-1], dtype=torch.long, device=device)
    cross[:, 1:] = 1
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "cross_attention_mask": cross, **vision}


@torch.inference_mode()
def speed(impl: str, checkpoint: Path, device: torch.device, *, new_tokens: int, compile: bool) -> dict[str, Any]:
    import json

    if impl == "transformers":
        from transformers import MllamaForConditionalGeneration
        model = MllamaForConditionalGeneration.from_pretrained(checkpoint, dtype=torch.bfloat16,
                                                               device_map=str(device)).eval()
    else:
        from mllama import MllamaForConditionalGeneration
        model = MllamaForConditionalGeneration.from_pretrained(checkpoint, dtype=torch.bfloat16, device=device)
    config = json.loads((checkpoint / "config.json").read_text())
    dtype = next(model.parameters()).dtype
    vision = vision_inputs(config, device, dtype)
    encoder = model.model.vision_model
    encoder(**vision)  # kernel selection, allocator warm-up
    out: dict[str, Any] = {"vision_s": best_of(lambda: encoder(**vision), 3, device)}
    inputs = prompt(config, vision, 64, device)
    timed_generate(model, inputs, 2, device)
    runs = [timed_generate(model, inputs, new_tokens, device) for _ in range(2)]
    out["ttft_s"], out["decode_tps"] = min(r[0] for r in runs), max(r[1] for r in runs)
    out["decode_tps_first_run"] = runs[0][1]  # cache lengths not seen before: per-shape set-up costs show here
    if compile and impl == "mllama":
        start = time.perf_counter()
        timed_generate(model, inputs, 4, device, compile=True)
        out["compile_s"] = time.perf_counter() - start
        out["decode_tps_compiled"] = max(timed_generate(model, inputs, new_tokens, device, compile=True)[1]
                                         for _ in range(2))
    del model
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return out


@torch.inference_mode()
def quantized(scheme: str, checkpoint: Path, device: torch.device, *, new_tokens: int, compile: bool) -> dict[str, Any]:
    """Decode speed of the bf16 checkpoint quantized while loading, and its first greedy token against bf16's."""
    from mllama import MllamaForConditionalGeneration

    config = json.loads((checkpoint / "config.json").read_text())
    out: dict[str, Any] = {}
    firsts = {}
    for name in ("bfloat16", scheme):
        start = time.perf_counter()
        model = MllamaForConditionalGeneration.from_pretrained(
            checkpoint, dtype=torch.bfloat16, device=device, quantization=None if name == "bfloat16" else scheme)
        sync(device)
        load_s = time.perf_counter() - start
        inputs = prompt(config, vision_inputs(config, device, torch.bfloat16), 64, device)
        firsts[name] = model(**inputs).logits[0, -1].float().argmax().item()
        if name == scheme:
            out["load_s"] = load_s
            out["weight_bytes"] = sum(t.numel() * t.element_size()
                                      for t in list(model.parameters()) + list(model.buffers()))
            timed_generate(model, inputs, 2, device)
            out["decode_tps"] = max(timed_generate(model, inputs, new_tokens, device)[1] for _ in range(2))
            if compile:
                timed_generate(model, inputs, 4, device, compile=True)
                out["decode_tps_compiled"] = max(timed_generate(model, inputs, new_tokens, device, compile=True)[1]
                                                 for _ in range(2))
        del model
        if device.type == "cuda":
            torch.cuda.empty_cache()
    out["first_token_matches_bf16"] = firsts["bfloat16"] == firsts[scheme]
    return out


@torch.inference_mode()
def engine_streams(checkpoint: Path, device: torch.device, *, new_tokens: int, compile: bool) -> dict[str, Any]:
    """Aggregate tokens/s of the engine with 1 and 16 concurrent 32-token text prompts."""
    from mllama import Engine, MllamaForConditionalGeneration, Request, SamplingParams

    model = MllamaForConditionalGeneration.from_pretrained(checkpoint, dtype=torch.bfloat16, device=device)
    text = json.loads((checkpoint / "config.json").read_text())["text_config"]
    out: dict[str, Any] = {}
    for label, use_compile in (("eager", False), ("compiled", True)) if compile else (("eager", False),):
        for streams in (1, 16):
            engine = Engine(model, max_slots=streams, max_len=32 + new_tokens + 8, compile=use_compile)
            for warm in (True, False):  # the same requests twice: every length and slot bucket is seen warm
                start = time.perf_counter()
                handles = []
                for i in range(streams):
                    ids = torch.randint(3, min(text["vocab_size"], 128000), (32,),
                                        generator=torch.Generator().manual_seed(i))
                    ids[0] = text["bos_token_id"]
                    handles.append(engine.submit(Request(input_ids=ids,
                                                         sampling=SamplingParams(max_tokens=new_tokens))))
                while engine.has_work:
                    engine.step()
                sync(device)
                if not warm:
                    assert all(len(h.tokens) == new_tokens for h in handles)
                    out[f"{label}_{streams}_streams_tps"] = streams * new_tokens / (time.perf_counter() - start)
    del model
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--checkpoint", default="bench", choices=["bench", "tiny"])
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--no-compile", action="store_true")
    parser.add_argument("--parts", default="parity,speed,int8,int4,engine",
                        help="comma-separated, run in this order: parity, speed, int8, int4, engine")
    parser.add_argument("--budget-s", type=float, default=240.0, help="parts that would start later are skipped")
    parser.add_argument("--json", type=Path, help="also write every figure here")
    args = parser.parse_args()
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("gpu_check: no CUDA device here (torch.cuda.is_available() is False); run it on a GPU machine "
              "(or with --device cpu to check the script itself)", file=sys.stderr)
        return 2
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    started = time.perf_counter()
    compile = not args.no_compile
    results: dict[str, Any] = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
                               "torch": torch.__version__, "checkpoint": args.checkpoint, "new_tokens": args.new_tokens}
    failed = []

    def part(name: str, fn: Callable[[], Any]) -> None:
        if time.perf_counter() - started > args.budget_s:
            results[name] = "skipped: over --budget-s"
            print(f"{name}: skipped (over the {args.budget_s:.0f} s budget)", flush=True)
            return
        t = time.perf_counter()
        try:
            results[name] = fn()
            print(f"{name} ({time.perf_counter() - t:.0f} s): {results[name]}", flush=True)
        except Exception as exc:  # one broken part must not cost the figures of the others
            traceback.print_exc()
            results[name] = f"failed: {type(exc).__name__}: {exc}"
            failed.append(name)
        if args.json:
            args.json.write_text(json.dumps(results, indent=1, default=str))

    parts = args.parts.split(",")
    if "parity" in parts:
        part("parity", lambda: parity(device))
    from bench_checkpoints import ensure_checkpoint

    checkpoint = ensure_checkpoint(args.checkpoint, processor_files=False, init_device=str(device))
    if "speed" in parts:
        part("speed", lambda: {impl: speed(impl, checkpoint, device, new_tokens=args.new_tokens, compile=compile)
                               for impl in ("mllama", "transformers")})
    for scheme in ("int8", "int4"):
        if scheme in parts:
            part(scheme, lambda: quantized(scheme, checkpoint, device, new_tokens=args.new_tokens, compile=compile))
    if "engine" in parts:
        part("engine", lambda: engine_streams(checkpoint, device, new_tokens=args.new_tokens, compile=compile))
    print_table(results, args, time.perf_counter() - started)
    check = results.get("parity")
    ok = not failed and (not isinstance(check, dict) or (check["max_abs_logit_diff"] <= 1e-4 and check["tokens_equal"]
                                                         and not check["cpu_kernels_on_device"]))
    return 0 if ok else 1


def print_table(results: dict[str, Any], args: argparse.Namespace, seconds: float) -> None:
    print(f"\n{args.checkpoint} checkpoint, bf16, {results['device']}, torch {results['torch']}, prompt 66 tokens + "
          f"one 4-tile image, {args.new_tokens} new tokens ({seconds:.0f} s in all)")
    print(f"| {'':38s} | {'mllama':>10s} | {'transformers':>12s} | ratio |")
    print(f"|{'-' * 40}|{'-' * 12}|{'-' * 14}|-------|")

    def row(label: str, ours: Any, theirs: Any = None, better_low: bool = False) -> None:
        if not isinstance(ours, (int, float)):
            return
        if isinstance(theirs, (int, float)):
            ratio = theirs / ours if better_low else ours / theirs
            print(f"| {label:38s} | {ours:10.4g} | {theirs:12.4g} | {ratio:4.2f}x |")
        else:
            print(f"| {label:38s} | {ours:10.4g} | {'':12s} |       |")

    speed = results.get("speed")
    hf_tps = None
    if isinstance(speed, dict):
        ours, theirs = speed["mllama"], speed["transformers"]
        hf_tps = theirs["decode_tps"]
        row("vision encode, 4 tiles (s)", ours["vision_s"], theirs["vision_s"], True)
        row("time to first token (s)", ours["ttft_s"], theirs["ttft_s"], True)
        row("decode (tokens/s)", ours["decode_tps"], hf_tps)
        row("decode, first run (tokens/s)", ours.get("decode_tps_first_run"), theirs.get("decode_tps_first_run"))
        row("decode, compiled (tokens/s)", ours.get("decode_tps_compiled"), hf_tps)
    for scheme in ("int8", "int4"):
        q = results.get(scheme)
        if isinstance(q, dict):
            row(f"{scheme} decode (tokens/s)", q["decode_tps"], hf_tps)
            row(f"{scheme} decode, compiled (tokens/s)", q.get("decode_tps_compiled"), hf_tps)
            row(f"{scheme} weights (GB)", q["weight_bytes"] / 1e9)
            print(f"| {scheme + ' first token = bf16':38s} | {str(q['first_token_matches_bf16']):>10s} | {'':12s} |       |")
    engine = results.get("engine")
    if isinstance(engine, dict):
        for key, value in engine.items():
            row("engine " + key.replace("_", " ").replace(" tps", " (tokens/s)"), value, hf_tps)
    check = results.get("parity")
    if isinstance(check, dict):
        row("parity: max |logit diff|", check["max_abs_logit_diff"])
        for key, label in (("tokens_equal", "parity: greedy tokens equal"), ("cpu_kernels_on_device", "CPU kernels on the device")):
            print(f"| {label:38s} | {str(check[key]):>10s} | {'':12s} |       |")
    for name, value in results.items():
        if isinstance(value, str) and (value.startswith("failed") or value.startswith("skipped")):
            print(f"{name}: {value}")


if __name__ == "__main__":
    sys.exit(main())
