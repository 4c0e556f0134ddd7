"""`mllama convert-meta` on a real model-parallel checkpoint: Meta's own model run with MP = 2.

Run alone with `pytest tests/test_meta_model_parallel.py` (every test name has `model_parallel`).

1. Two worker processes (tests/meta_mp_worker.py; gloo, world size 2, file:// rendezvous in the
   test's temporary directory) each run fairscale's `initialize_model_parallel(2)`, build Meta's
   `CrossAttentionTransformer` for meta_ref.PARAMS (tiny text model, Meta's 0.8B vision encoder) in
   float32, and fill it with their fairscale slice of ONE deterministic full weight set (drawn per
   parameter and block from seeded generators, so no rank ever holds the whole model). Each saves
   its `model.state_dict()` as consolidated.0R.pth (what Meta's MP checkpoints are) and rank 0 the
   logits of Meta's forward on a batch of a photo + text row (ChatFormat) and a text-only row.
2. In this process, the same full weights at world size 1 (Meta's MP = 1 model) give the same
   logits: the harness slices as fairscale does. The shards hold what fairscale's layers hold
   (column-parallel and vocab-parallel tensors, text_model.learnable_embedding included, split in
   rows; row-parallel weights in columns; the rest replicated) and put back together are the MP = 1
   state dict.
3. `convert_meta_checkpoint` merges the two shards; the result equals converting the MP = 1 state
   dict tensor for tensor, and mllama loaded from it gives Meta MP = 2's logits within
       max |mllama - Meta| <= 1e-4 * max |Meta|.

Resources: about 2 GB of memory per worker, then about 3.5 GB in this process (the MP = 1 model,
later mllama's, one at a time); 3.3 GB of shards and 3.3 GB of converted weights on disk in a
temporary directory that is removed at the end. Subprocesses and collectives have timeouts.
"""

from __future__ import annotations

import concurrent.futures
import gc
import json
import os
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import torch

import meta_ref

TOL = 1e-4  # relative to the logit scale max |Meta logits|
WORLD_SIZE = 2
SEED = 20240925
PAD = 128004  # <|finetune_right_pad_id|>: Meta's pad_id, and mllama's
WORKER = Path(__file__).with_name("meta_mp_worker.py")
WORKER_TIMEOUT_S = 420  # the whole MP = 2 run: about 30 s on two idle cores, 80 s on a loaded box
COLLECTIVE_TIMEOUT_S = 300
SHARD_SIZE = "500MB"  # several output files, and the converter holds at most one in memory

# Meta's model.py calls a torch API that torch deprecates; nothing to do with what is tested.
pytestmark = pytest.mark.filterwarnings("ignore:.*all_gather_tensor.* is deprecated:FutureWarning")


def _worker_module():
    import meta_mp_worker

    return meta_mp_worker


# ---------------------------------------------------------------------------------------------------
# Launching the model-parallel workers
# ---------------------------------------------------------------------------------------------------


def _tail(path: Path, limit: int = 4000) -> str:
    try:
        text = path.read_text(errors="replace")
    except OSError as err:
        return f"<{path}: {err}>"
    return text[-limit:]


def run_meta_model_parallel(out: Path, work: Path, *, world_size: int, seed: int) -> None:
    """Run world_size worker processes to completion; pytest.fail (with every rank's exit status
    and log tail) when one fails or the run passes WORKER_TIMEOUT_S. The others are then killed."""
    init_file = work / "rendezvous"
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    if sys.platform.startswith("linux") and Path("/sys/class/net/lo").exists():
        env.setdefault("GLOO_SOCKET_IFNAME", "lo")  # both ranks on this machine: loopback
    logs = [work / f"worker{rank}.log" for rank in range(world_size)]
    procs: list[subprocess.Popen] = []
    failure = None
    try:
        for rank in range(world_size):
            cmd = [sys.executable, str(WORKER), "--rank", str(rank), "--world-size", str(world_size),
                   "--init-file", str(init_file), "--out", str(out), "--seed", str(seed),
                   "--threads", "1", "--timeout", str(COLLECTIVE_TIMEOUT_S)]
            with open(logs[rank], "wb") as log:
                procs.append(subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                              env=env, cwd=str(WORKER.parent)))
        deadline = time.monotonic() + WORKER_TIMEOUT_S
        while True:
            codes = [p.poll() for p in procs]
            if all(c == 0 for c in codes):
                break
            if any(c not in (None, 0) for c in codes):
                failure = "a worker failed"
                break
            if time.monotonic() > deadline:
                failure = f"the workers did not finish within {WORKER_TIMEOUT_S} s"
                break
            time.sleep(0.2)
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
            p.wait()
    if failure is not None:
        report = "\n".join(f"--- rank {rank}: exit status {p.returncode}\n{_tail(logs[rank])}"
                           for rank, p in enumerate(procs))
        pytest.fail(f"Meta's model-parallel run (world size {world_size}): {failure}\n{report}", pytrace=False)


# ---------------------------------------------------------------------------------------------------
# The pipeline: everything heavy runs once, in an order that keeps one big model in memory at a time
# ---------------------------------------------------------------------------------------------------


@dataclass
class Results:
    tokens: list[list[int]]
    mp2_logits: list[torch.Tensor]
    mp1_logits: list[torch.Tensor] = field(default_factory=list)
    mp1_blind: torch.Tensor | None = None  # the image row's tokens without its image, MP = 1
    first_image_row: int = 0
    layout: dict[str, Any] = field(default_factory=dict)  # per key: full shape, split dim at MP = 2
    shard_shapes: dict[str, list[tuple[int, ...]]] = field(default_factory=dict)
    shard_problems: list[str] = field(default_factory=list)
    convert_error: BaseException | None = None
    converted_files: list[str] = field(default_factory=list)
    checkpoint_problems: list[str] = field(default_factory=list)
    checkpoint_tensors: int = 0
    mllama_error: BaseException | None = None
    mllama_logits: list[torch.Tensor] = field(default_factory=list)
    timings: dict[str, float] = field(default_factory=dict)
    memory: dict[str, float] = field(default_factory=dict)


def _timed(fn, *args: Any, **kwargs: Any) -> float:
    start = time.monotonic()
    fn(*args, **kwargs)
    return time.monotonic() - start


def _rss_anon_gib() -> float:
    """This process's anonymous resident memory (mapped checkpoint files not counted), or -1."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("RssAnon:"):
                return round(int(line.split()[1]) / 2**20, 2)
    except OSError:
        pass
    return -1.0


def _check_shards(files: list[Path], mp1: dict[str, torch.Tensor], layout: dict[str, Any], results: Results) -> None:
    """Every shard tensor is fairscale's slice of the MP = 1 tensor: put back together it is the MP = 1
    tensor exactly, the shards differ where split and are equal where replicated."""
    shards = [torch.load(f, map_location="cpu", weights_only=True, mmap=True) for f in files]
    problems = results.shard_problems
    for file, shard in zip(files, shards):
        if set(shard) != set(mp1):
            problems.append(f"{file.name}: keys differ from the MP = 1 state dict: missing "
                            f"{sorted(set(mp1) - set(shard))[:5]}, extra {sorted(set(shard) - set(mp1))[:5]}")
    for key, full in mp1.items():
        pieces = [s[key] for s in shards if key in s]
        if len(pieces) != len(shards):
            continue
        results.shard_shapes[key] = [tuple(p.shape) for p in pieces]
        split = layout[key]["split"]
        if split is None:
            if not all(torch.equal(p, full) for p in pieces):
                problems.append(f"{key}: replicated but not equal to the MP = 1 tensor on every rank")
            continue
        if any(p.shape[split] * len(pieces) != full.shape[split] for p in pieces):
            problems.append(f"{key}: shard shapes {[tuple(p.shape) for p in pieces]}, MP = 1 {tuple(full.shape)}")
            continue
        if not torch.equal(torch.cat(pieces, dim=split), full):
            problems.append(f"{key}: the shards concatenated on dim {split} are not the MP = 1 tensor")
        if torch.equal(pieces[0], pieces[1]):
            problems.append(f"{key}: split on dim {split} but equal on both ranks")
    del shards


def _check_checkpoint(hf_dir: Path, mp1: dict[str, torch.Tensor], params: dict[str, Any], results: Results) -> None:
    """The merged MP = 2 conversion == the conversion of the MP = 1 state dict, tensor for tensor."""
    from safetensors import safe_open

    from mllama.convert_meta import plan_conversion

    _, stream = plan_conversion([mp1], params, instruct=False)
    where: dict[str, Path] = {}
    for path in sorted(hf_dir.glob("*.safetensors")):
        with safe_open(str(path), framework="pt") as f:
            where.update({k: path for k in f.keys()})
    seen = set()
    for name, expected in stream:
        seen.add(name)
        if name not in where:
            results.checkpoint_problems.append(f"{name}: missing from the merged checkpoint")
            continue
        with safe_open(str(where[name]), framework="pt") as f:
            got = f.get_tensor(name)
        results.checkpoint_tensors += 1
        if got.dtype != expected.dtype or got.shape != expected.shape:
            results.checkpoint_problems.append(f"{name}: merged {got.dtype} {tuple(got.shape)}, "
                                               f"MP = 1 {expected.dtype} {tuple(expected.shape)}")
        elif not torch.equal(got, expected):
            diff = (got.float() - expected.float()).abs().max().item()
            results.checkpoint_problems.append(f"{name}: differs from the MP = 1 conversion (max |diff| {diff:.3g})")
    extra = sorted(set(where) - seen)
    if extra:
        results.checkpoint_problems.append(f"tensors the MP = 1 conversion does not have: {extra[:8]}")


def _mllama_logits(hf_dir: Path, inputs: list[Any], memory: dict[str, float]) -> list[torch.Tensor]:
    """mllama from the converted directory (its own preprocessor_config.json, read by the PIL image
    processor, which follows Meta's transform to float32 rounding) on the same token ids: right
    padding, the processor's cross-attention mask rule."""
    from mllama import MllamaForConditionalGeneration, MllamaImageProcessorPil
    from mllama.processor import dense_cross_attention_mask

    model = MllamaForConditionalGeneration.from_pretrained(hf_dir)
    model.eval()
    assert next(model.parameters()).dtype == torch.float32
    processor = MllamaImageProcessorPil.from_pretrained(hf_dir)
    rows = [list(inp.tokens) for inp in inputs]
    length = max(len(r) for r in rows)
    ids = [r + [PAD] * (length - len(r)) for r in rows]
    valid = [[1] * len(r) + [0] * (length - len(r)) for r in rows]
    images = [list(inp.vision.images) if inp.vision is not None else [] for inp in inputs]
    features = processor(images, return_tensors="pt")
    config = model.config
    mask = dense_cross_attention_mask(ids, features["num_tiles"], image_token_id=config.image_token_index,
                                      max_num_tiles=config.vision_config.max_num_tiles)
    with torch.no_grad():
        logits = model(input_ids=torch.tensor(ids), attention_mask=torch.tensor(valid),
                       pixel_values=features["pixel_values"], aspect_ratio_ids=features["aspect_ratio_ids"],
                       aspect_ratio_mask=features["aspect_ratio_mask"],
                       cross_attention_mask=torch.from_numpy(mask)).logits.float()
    out = [logits[row, : len(r)].clone() for row, r in enumerate(rows)]
    memory["mllama model"] = _rss_anon_gib()
    del model, logits
    return out


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    try:
        meta = meta_ref.import_meta()
    except meta_ref.Unavailable as err:
        pytest.skip(str(err))
    pytest.importorskip("skimage.data")
    if torch.get_default_dtype() != torch.float32:
        pytest.skip("needs float32 as the default dtype")
    worker = _worker_module()
    from mllama.convert_meta import convert_meta_checkpoint

    work = tmp_path_factory.mktemp("meta_mp")
    try:
        mp2_dir, hf_dir = work / "meta_mp2", work / "hf"
        clock = time.monotonic()

        # 1. Meta, MP = 2, in two processes.
        run_meta_model_parallel(mp2_dir, work, world_size=WORLD_SIZE, seed=SEED)
        saved = torch.load(mp2_dir / "logits.pt", weights_only=True)
        assert saved["world_size"] == WORLD_SIZE
        res = Results(tokens=saved["tokens"], mp2_logits=saved["logits"], layout=saved["layout"])
        res.timings["meta MP=2 workers"] = time.monotonic() - clock
        shard_files = [mp2_dir / f"consolidated.{rank:02d}.pth" for rank in range(WORLD_SIZE)]
        params = json.loads((mp2_dir / "params.json").read_text())
        assert params == meta_ref.PARAMS

        # 2. convert-meta on the two shards, in a thread (it mostly reads and writes files) while
        # 3. Meta's MP = 1 model runs here on the same full weights and inputs (mostly compute).
        inputs = worker.build_inputs()
        assert [list(inp.tokens) for inp in inputs] == res.tokens
        own_group = meta_ref.init_model_parallel()
        try:
            model_args = meta["args"].ModelArgs(max_seq_len=meta_ref.MAX_SEQ_LEN,
                                                max_batch_size=meta_ref.MAX_BATCH_SIZE, **meta_ref.PARAMS)
            with torch.random.fork_rng(devices=[]):  # construction draws from the global generator
                model = meta["model"].CrossAttentionTransformer(model_args)
            with concurrent.futures.ThreadPoolExecutor(1) as pool:
                converting = pool.submit(_timed, convert_meta_checkpoint, mp2_dir, hf_dir, instruct=False,
                                         max_shard_size=SHARD_SIZE, log=lambda line: None)
                clock = time.monotonic()
                mp1_layout = worker.fill_model_parallel_(model, SEED, 0, 1)
                assert ({k: v["full"] for k, v in mp1_layout.items()} ==
                        {k: v["full"] for k, v in res.layout.items()})
                res.timings["meta MP=1 fill"] = time.monotonic() - clock
                model.eval()
                model.setup_cache(meta_ref.MAX_BATCH_SIZE, device=torch.device("cpu"), dtype=torch.float32)
                pad_id = meta["tokenizer"].Tokenizer.get_instance().pad_id
                assert pad_id == PAD
                res.mp1_logits = worker.meta_logits(model, inputs, pad_id)
                res.first_image_row = min(start for start, _ in inputs[0].vision.mask)
                blind = type(inputs[0])(tokens=list(inputs[0].tokens), vision=None)
                res.mp1_blind = worker.meta_logits(model, [blind], pad_id)[0]
                res.timings["meta MP=1 forward"] = time.monotonic() - clock - res.timings["meta MP=1 fill"]
                try:
                    res.timings["convert_meta_checkpoint"] = converting.result()
                    res.converted_files = sorted(p.name for p in hf_dir.iterdir())
                except Exception as err:  # noqa: BLE001 - reported by the tests that need the output
                    res.convert_error = err
            res.memory["MP=1 model"] = _rss_anon_gib()
            mp1_state = model.state_dict()
            clock = time.monotonic()
            _check_shards(shard_files, mp1_state, res.layout, res)
            res.timings["shards vs MP=1"] = time.monotonic() - clock
            if res.convert_error is None:
                clock = time.monotonic()
                _check_checkpoint(hf_dir, mp1_state, params, res)
                res.timings["merged checkpoint vs MP=1 conversion"] = time.monotonic() - clock
            res.memory["after the checks"] = _rss_anon_gib()
            del mp1_state, model
        finally:
            if own_group:
                meta_ref.shutdown_model_parallel()
        gc.collect()
        shutil.rmtree(mp2_dir, ignore_errors=True)  # 3.3 GB no longer needed

        # 4. mllama from the converted directory.
        if res.convert_error is None:
            clock = time.monotonic()
            try:
                res.mllama_logits = _mllama_logits(hf_dir, inputs, res.memory)
            except Exception as err:  # noqa: BLE001 - reported by the test
                res.mllama_error = err
            res.timings["mllama load + forward"] = time.monotonic() - clock
        gc.collect()
        print("timings (s):", {k: round(v, 1) for k, v in res.timings.items()})  # shown with -s
        print("this process, anonymous memory (GiB):", res.memory)
        yield res
    finally:
        shutil.rmtree(work, ignore_errors=True)


# ---------------------------------------------------------------------------------------------------
# Helpers
# ---------------------------------------------------------------------------------------------------


def assert_close(ours: torch.Tensor, ref: torch.Tensor, what: str) -> float:
    """max |ours - ref| <= TOL * max |ref|, on a tensor that is not near zero. Returns the scale."""
    assert ours.shape == ref.shape, (what, ours.shape, ref.shape)
    assert torch.isfinite(ref).all() and torch.isfinite(ours).all(), what
    scale = ref.abs().max().item()
    assert scale > 0.5, f"{what}: reference values are near zero (max {scale:.3g}); the comparison proves nothing"
    err = (ours - ref).abs().max().item()
    print(f"{what}: max |diff| {err:.3g}, scale {scale:.3g}, ratio {err / scale:.2g}")  # shown with -s
    assert err <= TOL * scale, f"{what}: max |diff| {err:.3g} > {TOL} * {scale:.3g}"
    return scale


def _raise_if(error: BaseException | None, what: str) -> None:
    if error is not None:
        raise AssertionError(f"{what} raised {type(error).__name__}: {error}") from error


# ---------------------------------------------------------------------------------------------------
# The harness: real model-parallel shards of one full weight set
# ---------------------------------------------------------------------------------------------------


# (MP = 2 shape per rank, MP = 1 shape) for tensors of each fairscale layout.
EXPECTED_SHAPES = {
    "text_model.layers.0.attention.wq.weight": ((32, 64), (64, 64)),  # column parallel: rows
    "text_model.layers.0.attention.wk.weight": ((16, 64), (32, 64)),  # 2 kv heads: one per rank
    "text_model.layers.0.attention.wo.weight": ((64, 32), (64, 64)),  # row parallel: columns
    "text_model.layers.0.feed_forward.w2.weight": ((64, 112), (64, 224)),
    "text_model.cross_attention_layers.0.attention.wv.weight": ((16, 64), (32, 64)),
    "text_model.cross_attention_layers.0.feed_forward.w1.weight": ((112, 64), (224, 64)),
    "text_model.tok_embeddings.weight": ((64128, 64), (128256, 64)),  # vocab parallel: rows
    "text_model.output.weight": ((64128, 64), (128256, 64)),
    "text_model.learnable_embedding.weight": ((4, 64), (8, 64)),  # vocab parallel, 8 rows
    "text_model.norm.weight": ((64,), (64,)),  # replicated
    "text_model.cross_attention_layers.0.gate_attn": ((1,), (1,)),
    "vision_model.vision_encoder.conv1._linear.weight": ((640, 588), (1280, 588)),
    "vision_model.vision_encoder.transformer.resblocks.0.mlp.c_fc.bias": ((2560,), (5120,)),
    "vision_model.vision_encoder.transformer.resblocks.0.mlp.c_proj.weight": ((1280, 2560), (1280, 5120)),
    "vision_model.vision_encoder.transformer.resblocks.0.mlp.c_proj.bias": ((1280,), (1280,)),
    "vision_model.vision_encoder.global_transformer.resblocks.7.attn.wo.weight": ((1280, 640), (1280, 1280)),
    "vision_model.vision_projection.weight": ((32, 7680), (64, 7680)),
    "vision_model.vision_projection.bias": ((32,), (64,)),
    "vision_model.vision_encoder.gated_positional_embedding": ((4, 4, 5, 1280), (4, 4, 5, 1280)),
}


def test_model_parallel_shards_are_fairscale_slices(results):
    assert not results.shard_problems, "\n".join(results.shard_problems[:20])
    for key, (local, full) in EXPECTED_SHAPES.items():
        assert results.shard_shapes[key] == [local] * WORLD_SIZE, key
        assert tuple(results.layout[key]["full"]) == full, key
    splits = [v["split"] for v in results.layout.values()]
    # 40 vision blocks: wq wk wv c_fc.weight c_fc.bias on dim 0, wo c_proj on dim 1; 7 text blocks
    # (5 self + 2 cross): wq wk wv w1 w3 / wo w2; conv1, projection weight + bias, tok_embeddings,
    # output, learnable_embedding on dim 0.
    assert splits.count(0) == 40 * 5 + 7 * 5 + 6
    assert splits.count(1) == 40 * 2 + 7 * 2
    assert splits.count(None) == len(splits) - splits.count(0) - splits.count(1) > 200


def test_model_parallel_meta_mp2_matches_mp1(results):
    """Meta's forward at MP = 2 (all-reduces, all-gathers, a vocab-parallel embedding) on the shards
    == Meta's forward at MP = 1 on the full weights: the harness slices as fairscale does."""
    assert len(results.mp2_logits) == len(results.mp1_logits) == 2
    for row, (mp2, mp1) in enumerate(zip(results.mp2_logits, results.mp1_logits)):
        assert mp2.shape == (len(results.tokens[row]), meta_ref.PARAMS["vocab_size"])
        assert_close(mp2, mp1, f"Meta MP=2 vs MP=1, row {row}")
    # The image matters: rows from the image on move far more than the tolerance without it.
    first = results.first_image_row
    scale = results.mp1_logits[0].abs().max().item()
    effect = (results.mp1_logits[0][first:] - results.mp1_blind[first:]).abs().amax(dim=-1)
    print(f"image effect on logits, smallest row {effect.min().item():.3g}")
    assert effect.min().item() > 100 * TOL * scale, "a row that sees the image hardly depends on it"


# ---------------------------------------------------------------------------------------------------
# The converter and mllama
# ---------------------------------------------------------------------------------------------------


def test_model_parallel_merged_checkpoint_equals_mp1_conversion(results):
    _raise_if(results.convert_error, "convert_meta_checkpoint on the MP = 2 shards")
    # 500 MB shards: several weight files and an index.
    assert "model.safetensors.index.json" in results.converted_files
    assert {"config.json", "generation_config.json", "preprocessor_config.json"} <= set(results.converted_files)
    assert not results.checkpoint_problems, "\n".join(results.checkpoint_problems[:20])
    assert results.checkpoint_tensors > 500


def test_model_parallel_mllama_matches_meta_mp2(results):
    _raise_if(results.convert_error, "convert_meta_checkpoint on the MP = 2 shards")
    _raise_if(results.mllama_error, "mllama on the converted checkpoint")
    assert len(results.mllama_logits) == 2
    for row, (ours, meta) in enumerate(zip(results.mllama_logits, results.mp2_logits)):
        assert_close(ours, meta, f"mllama vs Meta MP=2, row {row}")
