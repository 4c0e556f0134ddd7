"""One rank of the tensor-parallel tests (tests/test_tp.py): spawned as a real process that joins a
gloo group from torchrun's environment variables, runs a scenario and saves what it saw to
OUT/rank<r>.pt (errors included, as text), for the parent to compare with an unsplit model."""

from __future__ import annotations

import os
import time
import traceback
from pathlib import Path
from typing import Any

import torch

from tiny import cross_mask, publish_tile_tables_, randomize_, random_images, tiny_config

SEED = 3


def build(name: str = "a"):
    from mllama import MllamaForConditionalGeneration

    model = MllamaForConditionalGeneration(tiny_config(name))
    randomize_(model, SEED)
    return model.eval()


def build_published():
    """Config "c" (3 tile slots, 4 vision heads) with the published zero rows for the 1x1 aspect ratio
    only: its 1-tile image runs one padded tile for two, the 2-tile image of the same batch every slot."""
    model = build("c")
    publish_tile_tables_(model, model.config.vision_config, ratios=[(1, 1)])
    return model


def shared_tile_logits(model) -> dict[str, torch.Tensor]:
    with torch.inference_mode():
        return {"logits/shared": model(**batches(model.config)["image"]).logits}


def build_int4_friendly(group_size: int = 32):
    """Config "a" resized so that every row-split input (64-wide o_proj / projector halves, the
    128-wide MLP halves) holds whole int4 groups of 32 on each of 2 ranks; quantized to int4."""
    from mllama import MllamaForConditionalGeneration
    from mllama.quantize import QuantizationConfig, quantize_model

    config = tiny_config("a")
    config.text_config.intermediate_size = 128
    config.vision_config.intermediate_layers_indices = [0]
    config.vision_config.vision_output_dim = 64
    model = MllamaForConditionalGeneration(config)
    randomize_(model, SEED)
    return quantize_model(model.eval(), QuantizationConfig("int4", group_size=group_size))


def logits_only(model) -> dict[str, torch.Tensor]:
    with torch.inference_mode():
        return {f"logits/{name}": model(**inputs).logits for name, inputs in batches(model.config).items()}


def batches(config) -> dict[str, dict[str, torch.Tensor]]:
    """The forward inputs compared between TP=1 and TP=2: one image each, several images, text
    only, and a mixed batch (a padded text-only row beside a row with two images)."""
    vocab, image = config.text_config.vocab_size, config.image_token_index
    tiles = config.vision_config.max_num_tiles
    gen = torch.Generator().manual_seed(5)
    out = {}
    ids = torch.randint(3, vocab, (2, 9), generator=gen)
    ids[:, 1] = image
    out["image"] = dict(input_ids=ids, attention_mask=torch.ones_like(ids),
                        cross_attention_mask=cross_mask([[2], [1]], [[1], [1]], 9, tiles),
                        **random_images(config, [[2], [1]], seed=1))
    ids = torch.randint(3, vocab, (1, 11), generator=gen)
    ids[0, [1, 5]] = image
    out["multi_image"] = dict(input_ids=ids, attention_mask=torch.ones_like(ids),
                              cross_attention_mask=cross_mask([[1, 2]], [[1, 5]], 11, tiles),
                              **random_images(config, [[1, 2]], seed=2))
    ids = torch.randint(3, vocab, (3, 7), generator=gen)
    out["text"] = dict(input_ids=ids, attention_mask=torch.ones_like(ids))
    ids = torch.randint(3, vocab, (2, 10), generator=gen)
    ids[0, [2, 3]] = image
    mask = torch.ones_like(ids)
    mask[1, :4] = 0
    ids[1, :4] = 0
    out["mixed"] = dict(input_ids=ids, attention_mask=mask,
                        cross_attention_mask=cross_mask([[2, 1], []], [[2, 3], []], 10, tiles),
                        **random_images(config, [[2, 1], []], seed=3))
    return out


def run_model(model) -> dict[str, Any]:
    """Logits of every batch, greedy tokens from generate(), and tokens from the Engine."""
    from mllama.engine import Engine
    from mllama.request import Request, SamplingParams

    result: dict[str, Any] = {}
    with torch.inference_mode():
        for name, inputs in batches(model.config).items():
            result[f"logits/{name}"] = model(**inputs).logits
    for name in ("mixed", "multi_image"):
        inputs = batches(model.config)[name]
        result[f"generate/{name}"] = model.generate(**inputs, max_new_tokens=6, do_sample=False)
    inputs = batches(model.config)["image"]
    engine = Engine(model, max_slots=2, max_len=32, vision_piece_layers=2, prefill_chunk=4)
    handles = []
    for row in range(2):
        request = Request(input_ids=inputs["input_ids"][row], sampling=SamplingParams(max_tokens=5, temperature=0.0))
        if row == 0:  # one request with its image, one text only
            request.pixel_values, request.aspect_ratio_ids, request.aspect_ratio_mask = (
                inputs["pixel_values"][row], inputs["aspect_ratio_ids"][row], inputs["aspect_ratio_mask"][row])
            request.cross_attention_mask = inputs["cross_attention_mask"][row]
        handles.append(engine.submit(request))
    tokens: list[list[int]] = [[], []]
    while engine.has_work:
        engine.step()
        for row, handle in enumerate(handles):
            tokens[row] += [e.token for e in handle.poll() if e.token is not None]
    result["engine"] = tokens
    return result


def tensor_bytes(model) -> int:
    return sum(t.numel() * t.element_size() for t in list(model.parameters()) + list(model.buffers()))


def _error(fn) -> str:
    try:
        fn()
    except (ValueError, RuntimeError, TypeError) as err:
        return f"{type(err).__name__}: {err}"
    return "no error"


def scenario_main(out: dict[str, Any], work: Path) -> None:
    from mllama.model import MllamaForConditionalGeneration
    from mllama.quantize import quantize_model
    from mllama.tp import tensor_parallel
    from mllama.tp_load import load_tensor_parallel

    model = tensor_parallel(build())
    out["split"] = run_model(model)
    out["bytes"] = tensor_bytes(model)
    out["kv_heads"] = model.model.language_model.layers[0].self_attn.num_kv_heads
    out["shared"] = shared_tile_logits(tensor_parallel(build_published()))
    out["int8"] = run_model(tensor_parallel(quantize_model(build(), "int8")))
    loaded = load_tensor_parallel(MllamaForConditionalGeneration, work / "float", dtype=torch.float32)
    out["loaded"] = run_model(loaded)
    out["loaded_bytes"] = tensor_bytes(loaded)
    out["loaded_int8"] = run_model(load_tensor_parallel(MllamaForConditionalGeneration, work / "int8"))
    # Bad set-ups, each must fail with a clear error on every rank before any collective.
    out["err/heads"] = _error(lambda: tensor_parallel(build("b")))  # 3 vision heads over 2 ranks
    out["err/world"] = _error(lambda: load_tensor_parallel(MllamaForConditionalGeneration, work / "float",
                                                           world_size=4))
    out["err/twice"] = _error(lambda: tensor_parallel(model))
    out["int4"] = logits_only(tensor_parallel(build_int4_friendly()))
    out["err/int4"] = _error(lambda: tensor_parallel(build_int4_friendly(group_size=64)))  # 32 | 64 straddles
    mqa = tiny_config("a")
    mqa.text_config.num_key_value_heads = 1  # one K/V head: replicated on both ranks
    replicated = MllamaForConditionalGeneration(mqa)
    randomize_(replicated, SEED)
    tensor_parallel(replicated.eval())
    out["mqa"] = {k: v for k, v in run_model(replicated).items() if k.startswith("logits/")}
    out["mqa_kv_heads"] = replicated.model.language_model.layers[0].self_attn.num_kv_heads


def scenario_dead(out: dict[str, Any], work: Path) -> None:
    """Rank 1 leaves after splitting; rank 0's next forward must fail, not hang."""
    import torch.distributed as dist

    from mllama.tp import tensor_parallel

    model = tensor_parallel(build())
    if dist.get_rank() == 1:
        torch.save({"left": True}, work / "dead-rank1.pt")
        os._exit(0)
    start = time.monotonic()
    out["err/dead"] = _error(lambda: model(**batches(model.config)["text"]))
    out["dead_seconds"] = time.monotonic() - start


def main(rank: int, world: int, port: int, scenario: str, work: str, timeout_s: float) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    torch.set_num_threads(1)
    from mllama.tp_load import init_distributed

    out: dict[str, Any] = {}
    try:
        init_distributed(timeout_s=timeout_s)
        {"main": scenario_main, "dead": scenario_dead}[scenario](out, Path(work))
    except Exception:  # reported to the parent, which fails the test with it
        out["crash"] = traceback.format_exc()
    torch.save(out, Path(work) / f"{scenario}-rank{rank}.pt")
    os._exit(0)  # a dead peer must not make the process group's shutdown hang
