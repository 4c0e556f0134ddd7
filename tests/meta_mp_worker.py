"""One rank of Meta's CrossAttentionTransformer under fairscale model parallelism (a test worker).

Run as `python tests/meta_mp_worker.py --rank R --world-size N --init-file F --out DIR` in N
processes (gloo, CPU, float32); tests/test_meta_model_parallel.py starts them. Every rank builds
Meta's model for meta_ref.PARAMS, fills it with its model-parallel slice of ONE deterministic
full-size weight set (see `fill_model_parallel_`: the same values whatever the world size), saves
its state dict as `consolidated.RR.pth` (what Meta's checkpoints hold per rank), runs Meta's
forward on a fixed batch (a photo + text row in Meta's chat format, a text-only row) and, on rank 0,
writes the logits to `logits.pt` and the params to `params.json`.

Test-only code: imports llama_models and fairscale (through meta_ref), never imported from src/.
"""

from __future__ import annotations

import argparse
import copy
import datetime
import io
import json
import math
import os
import sys
import time
import zlib
from pathlib import Path
from typing import Any

import torch

import meta_ref  # tests/ is sys.path[0] when this file runs as a script; the test imports it as a sibling

PROMPT = "If I had to write a haiku for this one, it would be"
TEXT_ONLY_PROMPT = "The quick brown fox jumps over the lazy dog"


# ---------------------------------------------------------------------------------------------------
# One full weight set, sliced per rank
# ---------------------------------------------------------------------------------------------------


BLOCKS = 8  # a split parameter's full value is drawn in 8 blocks along its split dim (MP sizes 1, 2, 4, 8)


def parallel_layout(owner: torch.nn.Module, leaf: str, local: tuple[int, ...]) -> tuple[tuple[int, ...], int | None]:
    """(the MP=1 shape of a parameter, the dim fairscale splits it on or None), from the layer type and
    the full sizes fairscale's layers keep as attributes: the same answer at every world size."""
    from fairscale.nn.model_parallel import layers as fs

    if isinstance(owner, fs.ColumnParallelLinear):
        return ((owner.out_features, owner.in_features) if leaf == "weight" else (owner.out_features,)), 0
    if isinstance(owner, fs.RowParallelLinear):
        return ((owner.out_features, owner.in_features), 1) if leaf == "weight" else ((owner.out_features,), None)
    if isinstance(owner, fs.VocabParallelEmbedding):
        return (owner.num_embeddings, owner.embedding_dim), 0
    if isinstance(owner, fs.ParallelEmbedding):
        return (owner.num_embeddings, owner.embedding_dim), 1
    return local, None


def _draw(name: str, shape: tuple[int, ...], *, fan_in: int, is_norm: bool, gen: torch.Generator) -> torch.Tensor:
    """meta_ref.randomize_meta_'s rules: linear weights U(+-sqrt(3 / fan_in)) (the FULL fan_in), norm
    weights 1 + 0.1 N and biases 0.1 N, embeddings 0.5 N, every gate +-U(0.5, 1.5) (no branch hidden)."""
    leaf = name.rpartition(".")[2]
    if meta_ref.is_gate(leaf):
        sign = torch.where(torch.rand(shape, generator=gen) < 0.5, -1.0, 1.0)
        return sign * (0.5 + torch.rand(shape, generator=gen))
    if is_norm:
        value = torch.randn(shape, generator=gen).mul_(0.1)
        return value.add_(1.0) if leaf == "weight" else value
    if leaf == "bias":
        return torch.randn(shape, generator=gen).mul_(0.1)
    if "embedding" in name or "tok_embeddings" in name:
        return torch.randn(shape, generator=gen).mul_(0.5)
    if len(shape) == 2:
        bound = math.sqrt(3.0 / fan_in)
        return torch.empty(shape).uniform_(-bound, bound, generator=gen)
    raise AssertionError(f"no init rule for {name} {shape}")


def _generator(*key: Any) -> torch.Generator:
    return torch.Generator().manual_seed(zlib.crc32("/".join(map(str, key)).encode()))


def full_value_slice(name: str, full: tuple[int, ...], split: int | None, *, is_norm: bool, seed: int,
                     rank: int = 0, world_size: int = 1) -> torch.Tensor:
    """Chunk `rank` of `world_size` along `split` of a parameter's full (MP=1) value.

    The full value depends only on (seed, name, full shape): a replicated parameter is drawn from a
    generator seeded by (seed, name); a split one is the concatenation along its split dim of BLOCKS
    blocks, block b drawn from a generator seeded by (seed, name, b), so a rank draws only its own
    blocks and never holds more than one full tensor (nor ever the whole model)."""
    fan_in = full[1] if len(full) == 2 else 0
    if split is None:
        return _draw(name, full, fan_in=fan_in, is_norm=is_norm, gen=_generator(seed, name))
    if full[split] % BLOCKS or BLOCKS % world_size:
        raise AssertionError(f"{name}: {full[split]} rows on dim {split} do not fall into {BLOCKS} blocks "
                             f"for {world_size} ranks")
    per_rank = BLOCKS // world_size
    block_shape = full[:split] + (full[split] // BLOCKS,) + full[split + 1:]
    blocks = [_draw(name, block_shape, fan_in=fan_in, is_norm=is_norm, gen=_generator(seed, name, b))
              for b in range(rank * per_rank, (rank + 1) * per_rank)]
    return blocks[0] if len(blocks) == 1 else torch.cat(blocks, dim=split)


def fill_model_parallel_(model: torch.nn.Module, seed: int, rank: int, world_size: int) -> dict[str, Any]:
    """Give every parameter this rank's slice of its full value. The local shape must be the full
    shape (replicated), or differ from it in exactly the layer's split dim, by the factor world_size
    (fairscale's layout: equal chunks in rank order; this rank holds chunk `rank`).
    Returns {name: {"full": full shape, "split": the dim split at this world size, or None}}."""
    modules = dict(model.named_modules())
    layout: dict[str, Any] = {}
    with torch.no_grad():
        for name, p in model.named_parameters():
            owner_name, _, leaf = name.rpartition(".")
            owner = modules[owner_name]
            local = tuple(p.shape)
            full, split = parallel_layout(owner, leaf, local)
            differ = [d for d in range(len(full)) if len(full) == len(local) and full[d] != local[d]]
            expected = [split] if split is not None and world_size > 1 else []
            if len(full) != len(local) or differ != expected or any(full[d] != local[d] * world_size for d in differ):
                raise AssertionError(f"{name}: local shape {local} is not fairscale's 1/{world_size} slice of "
                                     f"{full} on dim {split}")
            is_norm = isinstance(owner, torch.nn.LayerNorm) or type(owner).__name__ == "RMSNorm"
            p.copy_(full_value_slice(name, full, split, is_norm=is_norm, seed=seed, rank=rank,
                                     world_size=world_size))
            layout[name] = {"full": list(full), "split": split if world_size > 1 else None}
    return layout


def _skip_affine_init(*args: Any, **kwargs: Any) -> None:
    """fairscale's _initialize_affine_weight builds and splits a full-size master weight per layer
    (0.8B floats per rank, slow and memory-hungry); every parameter is overwritten, so skip it."""


# ---------------------------------------------------------------------------------------------------
# The fixed inputs and Meta's forward
# ---------------------------------------------------------------------------------------------------


def photo():
    """scikit-image's cat photo (300 x 451): a 2x2 tile grid with padding inside the tiles."""
    from PIL import Image
    from skimage import data

    return Image.fromarray(data.chelsea())


def build_inputs() -> list[Any]:
    """Meta's LLMInputs: [photo, PROMPT] through ChatFormat.encode_content (BOS, <|image|> -> 128256,
    the vision mask), and a text-only row. Used by the workers and, for mllama's side, by the test."""
    meta = meta_ref.import_meta()
    dt = meta["datatypes"]
    tokenizer = meta["tokenizer"].Tokenizer.get_instance()
    formatter = meta["chat_format"].ChatFormat(tokenizer)
    png = io.BytesIO()
    photo().save(png, format="PNG")  # lossless
    with_image = formatter.encode_content([dt.RawMediaItem(data=png.getvalue()), dt.RawTextItem(text=PROMPT)])
    text = formatter._model_input_from_tokens_images(tokenizer.encode(TEXT_ONLY_PROMPT, bos=True, eos=False), [])
    return [with_image, text]


@torch.inference_mode()
def meta_logits(model: torch.nn.Module, inputs: list[Any], pad_id: int) -> list[torch.Tensor]:
    """As Llama3.generate's prefill (and meta_ref.MetaReference.logits): rows right-padded, vision
    masks from compute_vision_tokens_masks, forward over position_ids = arange(0, S)."""
    total_len = max(len(inp.tokens) for inp in inputs)
    tokens = torch.full((len(inputs), total_len), pad_id, dtype=torch.long)
    for row, inp in enumerate(inputs):
        tokens[row, : len(inp.tokens)] = torch.tensor(inp.tokens, dtype=torch.long)
    images = [inp.vision.images if inp.vision is not None else [] for inp in inputs]
    masks = [copy.deepcopy(inp.vision.mask) if inp.vision is not None else [] for inp in inputs]
    xattn_caches, cross_masks, row_mask = model.compute_vision_tokens_masks(
        batch_images=images, batch_masks=masks, total_len=total_len, device=tokens.device)
    text_only = all(inp.vision is None for inp in inputs)
    logits = model.forward(torch.arange(0, total_len, dtype=torch.long), tokens, cross_masks, row_mask,
                           xattn_caches, text_only)
    return [logits[row, : len(inp.tokens)].float().clone() for row, inp in enumerate(inputs)]


# ---------------------------------------------------------------------------------------------------
# main
# ---------------------------------------------------------------------------------------------------


def _log(rank: int, start: float, what: str) -> None:
    print(f"[rank {rank} {time.monotonic() - start:6.1f}s] {what}", file=sys.stderr, flush=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rank", type=int, required=True)
    parser.add_argument("--world-size", type=int, required=True)
    parser.add_argument("--init-file", required=True, help="file:// rendezvous file (must not exist yet)")
    parser.add_argument("--out", required=True, help="directory for consolidated.RR.pth, params.json, logits.pt")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--timeout", type=float, default=300.0, help="seconds a collective may wait")
    args = parser.parse_args(argv)
    start = time.monotonic()

    def log(what: str) -> None:
        _log(args.rank, start, what)

    import torch.distributed as dist

    torch.set_num_threads(args.threads)
    torch.set_default_dtype(torch.float32)
    meta = meta_ref.import_meta()
    fs_init = meta["fs_init"]
    log("imported Meta's modules")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    dist.init_process_group("gloo", init_method=f"file://{args.init_file}", rank=args.rank,
                            world_size=args.world_size, timeout=datetime.timedelta(seconds=args.timeout))
    try:
        log("process group up")
        fs_init.initialize_model_parallel(args.world_size)
        assert fs_init.get_model_parallel_world_size() == args.world_size
        assert fs_init.get_model_parallel_rank() == args.rank
        model_args = meta["args"].ModelArgs(max_seq_len=meta_ref.MAX_SEQ_LEN, max_batch_size=meta_ref.MAX_BATCH_SIZE,
                                            **meta_ref.PARAMS)
        from fairscale.nn.model_parallel import layers as fs_layers

        fs_layers._initialize_affine_weight = _skip_affine_init
        model = meta["model"].CrossAttentionTransformer(model_args)
        log("model built")
        layout = fill_model_parallel_(model, args.seed, args.rank, args.world_size)
        log("weights filled")
        state = model.state_dict()
        assert list(state) == [n for n, _ in model.named_parameters()], "state dict holds more than parameters"
        assert all(t.dtype == torch.float32 for t in state.values())
        torch.save(state, out / f"consolidated.{args.rank:02d}.pth")
        del state
        log("state dict saved")

        model.eval()
        model.setup_cache(meta_ref.MAX_BATCH_SIZE, device=torch.device("cpu"), dtype=torch.float32)
        inputs = build_inputs()
        pad_id = meta["tokenizer"].Tokenizer.get_instance().pad_id
        logits = meta_logits(model, inputs, pad_id)
        log("forward done")
        if args.rank == 0:
            torch.save({"logits": logits, "tokens": [list(inp.tokens) for inp in inputs],
                        "vision_masks": [inp.vision.mask if inp.vision is not None else None for inp in inputs],
                        "layout": layout, "world_size": args.world_size},
                       out / "logits.pt")
            (out / "params.json").write_text(json.dumps(meta_ref.PARAMS, indent=2))
        dist.barrier()
        log("done")
    finally:
        if fs_init.model_parallel_is_initialized():
            fs_init.destroy_model_parallel()
        dist.destroy_process_group()
    log("process group destroyed")
    return 0


if __name__ == "__main__":
    code = main()
    # Everything is written and closed and the process group is gone: skip the interpreter's
    # teardown of ~2 GB of tensors (seconds on a loaded machine). Errors exit through the traceback.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
