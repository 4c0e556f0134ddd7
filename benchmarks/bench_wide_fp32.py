"""bf16 prefill and vision on a CPU without native bf16: mllama's routes (the decode kernel in
16-row blocks, blocked float32 GEMMs; mllama.linear) against torch's bf16 GEMM and transformers.

    python benchmarks/bench_wide_fp32.py [--tokens 128] [--tiles 0] [--repeats 2]

Bench checkpoint (benchmarks/bench_checkpoints.py), bf16. Measures the vision encoder on a
`--tiles`-tile image and a text-only prefill forward of `--tokens` tokens, each the best of
`--repeats` (--tiles 0 skips the vision encoder: every tile slot is encoded, padded or not, which
takes minutes per call in bf16 on 2 cores), for transformers, mllama with the float32 route switched off, and mllama as shipped.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))


@torch.inference_mode()
def main() -> None:
    import transformers

    from bench_checkpoints import ensure_checkpoint
    from bench_phases import best_of as best

    import mllama.linear
    from mllama import MllamaForConditionalGeneration

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--tiles", type=int, default=0, choices=[0, 1, 2, 4])
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()
    path = ensure_checkpoint("bench")
    ours = MllamaForConditionalGeneration.from_pretrained(path, dtype=torch.bfloat16)
    hf = transformers.MllamaForConditionalGeneration.from_pretrained(path, dtype=torch.bfloat16).eval()
    config = ours.config
    vc = config.vision_config
    gen = torch.Generator().manual_seed(0)
    pixels = torch.zeros(1, 1, vc.max_num_tiles, 3, vc.image_size, vc.image_size, dtype=torch.bfloat16)
    pixels[:, :, :args.tiles] = torch.randn(1, 1, args.tiles, 3, vc.image_size, vc.image_size, generator=gen)
    ratio_id = {0: 1, 1: 1, 2: 2, 4: 6}[args.tiles]
    vision = {"pixel_values": pixels, "aspect_ratio_ids": torch.tensor([[ratio_id]]),
              "aspect_ratio_mask": (torch.arange(vc.max_num_tiles) < args.tiles).long()[None, None]}
    ids = torch.randint(3, 128000, (1, args.tokens), generator=gen)
    ids[0, 0] = 128000
    rows = {}
    native = mllama.linear.cpu_has_native_bf16
    for label, model, wide in (("transformers", hf, None), ("mllama, bf16 GEMM", ours, False),
                               ("mllama, as shipped", ours, True)):
        if wide is not None:
            mllama.linear.cpu_has_native_bf16 = (lambda: False) if wide else (lambda: True)
        encoder = model.model.vision_model
        rows[label] = (best(lambda: encoder(**vision), args.repeats) if args.tiles else float("nan"),
                       best(lambda: model(input_ids=ids, attention_mask=torch.ones_like(ids)), args.repeats))
        print(f"{label:24s} vision {rows[label][0]:7.2f} s   prefill {rows[label][1]:7.2f} s", flush=True)
    mllama.linear.cpu_has_native_bf16 = native
    hf_v, hf_p = rows["transformers"]
    print(f"\nbench checkpoint, bf16, {torch.get_num_threads()} threads, vision {args.tiles} tile(s), "
          f"prefill {args.tokens} tokens (ratio: transformers' time / this one's)")
    for label, (v, p) in rows.items():
        print(f"| {label:24s} | vision {v:6.2f} s ({hf_v / v:4.2f}x) | prefill {p:6.2f} s ({hf_p / p:4.2f}x) |")


if __name__ == "__main__":
    main()
