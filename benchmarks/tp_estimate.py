"""Paper estimate for Llama 3.2-90B-Vision under tensor parallelism (mllama.tp's split), no hardware:

    python benchmarks/tp_estimate.py [--bandwidth-TBps 3.35] [--allreduce-us 15] [--link-GBps 150]

Bytes each rank holds for TP = 1/2/4/8 in bf16, int8 and int4 (group 64), following mllama.tp
(every linear split, lm_head by vocabulary; embeddings, norms and vision embeddings replicated)
and mllama.quantize's defaults (text linears and projector quantized; vision encoder, lm_head
and embeddings stay bf16). Then the decode limit per token: the bytes a decode step reads per
rank over the memory bandwidth, plus the all-reduces (two per decoder layer, each of one token's
hidden state) as latency + volume over the link, plus the logits all-gather.
"""

from __future__ import annotations

import argparse

TEXT = dict(hidden=8192, layers=100, cross_every=5, heads=64, kv_heads=8, head_dim=128, inter=28672, vocab=128256)
VISION = dict(hidden=1280, layers=40, inter=5120, out_dim=7680, patches=1601, tiles=4, ratios=8)


def parts() -> dict[str, int]:
    """Parameter counts by how they are split and quantized."""
    t, v = TEXT, VISION
    h, d = t["hidden"], t["head_dim"]
    qo = 2 * h * t["heads"] * d
    kv = 2 * h * t["kv_heads"] * d
    mlp = 3 * h * t["inter"]
    cross = t["layers"] // t["cross_every"]
    self_ = t["layers"] - cross
    text_linear = t["layers"] * (qo + kv + mlp)  # cross layers have q/k/v/o and an MLP too
    decode_linear = t["layers"] * (qo + mlp) + self_ * kv  # cross k/v run once per image, not per token
    vision_linear = v["layers"] * (4 * v["hidden"] ** 2 + 2 * v["hidden"] * v["inter"])
    projector = v["out_dim"] * h
    lm_head = t["vocab"] * h
    embed = (t["vocab"] + 8) * h
    vision_embed = ((v["ratios"] + 1) * v["tiles"] * (v["patches"] + 2) * v["hidden"]
                    + v["patches"] * v["hidden"] + 3 * 14 * 14 * v["hidden"])
    norms = t["layers"] * 2 * h + cross * 2 * d + h + v["layers"] * 4 * v["hidden"]
    return dict(text_linear=text_linear, decode_linear=decode_linear, vision_linear=vision_linear,
                projector=projector, lm_head=lm_head, embed=embed, replicated_small=vision_embed + norms,
                self_layers=self_)


def bytes_per_param(mode: str) -> float:
    return {"bf16": 2.0, "int8": 1.0 + 2 / 8192, "int4": 0.5 + 4 / 64}[mode]  # + scales (and int4 offsets)


def per_rank_bytes(world: int, mode: str) -> float:
    p = parts()
    q = bytes_per_param(mode)
    split = (p["text_linear"] + p["projector"]) * q + (p["vision_linear"] + p["lm_head"]) * 2
    return split / world + (p["embed"] + p["replicated_small"]) * 2


def decode_ms(world: int, mode: str, *, bandwidth: float, allreduce_us: float, link: float, context: int) -> tuple[float, float]:
    """(memory-bound time, communication time) per decode token, ms."""
    p, t = parts(), TEXT
    q = bytes_per_param(mode)
    weights = (p["decode_linear"] * q + p["lm_head"] * 2) / world + t["hidden"] * 2 * (t["layers"] * 2 + 2)
    kv_heads = max(t["kv_heads"] // world, 1)
    cache = p["self_layers"] * 2 * kv_heads * t["head_dim"] * context * 2
    memory = (weights + cache) / bandwidth * 1e3
    if world == 1:
        return memory, 0.0
    hidden_bytes = t["hidden"] * 2
    ring = 2 * (world - 1) / world * hidden_bytes  # bytes a rank sends per all-reduce
    reduces = 2 * t["layers"]
    comm = reduces * (allreduce_us * 1e-3 + ring / link * 1e3) + allreduce_us * 1e-3  # + logits all-gather
    return memory, comm


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--bandwidth-TBps", type=float, default=3.35, help="HBM bandwidth per GPU (H100 SXM: 3.35)")
    parser.add_argument("--allreduce-us", type=float, default=15.0, help="latency of one small NCCL all-reduce")
    parser.add_argument("--link-GBps", type=float, default=150.0, help="per-GPU all-reduce bus bandwidth (NVLink)")
    parser.add_argument("--context", type=int, default=4096)
    args = parser.parse_args()
    p = parts()
    total = sum(v for k, v in p.items() if k not in ("decode_linear", "self_layers"))
    print(f"90B: {total / 1e9:.1f}B parameters; split {100 * (total - p['embed'] - p['replicated_small']) / total:.1f}%")
    print("\nGB held per rank:\n\n| TP | bf16 | int8 | int4 (g64) |\n|---:|---:|---:|---:|")
    for world in (1, 2, 4, 8):
        cells = " | ".join(f"{per_rank_bytes(world, m) / 1e9:.1f}" for m in ("bf16", "int8", "int4"))
        print(f"| {world} | {cells} |")
    print(f"\nDecode limit per token (batch 1, {args.context}-token context, {args.bandwidth_TBps} TB/s per GPU, "
          f"all-reduce {args.allreduce_us} us + {args.link_GBps} GB/s): memory ms + communication ms = tokens/s\n")
    print("| TP | bf16 | int8 | int4 (g64) |\n|---:|---|---|---|")
    for world in (1, 2, 4, 8):
        cells = []
        for mode in ("bf16", "int8", "int4"):
            memory, comm = decode_ms(world, mode, bandwidth=args.bandwidth_TBps * 1e12, allreduce_us=args.allreduce_us,
                                     link=args.link_GBps * 1e9, context=args.context)
            cells.append(f"{memory:.1f} + {comm:.1f} ms = {1e3 / (memory + comm):.0f}/s")
        print(f"| {world} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
