"""Tensor parallelism (mllama.tp, mllama.tp_load) in real torch.distributed gloo processes.

Two ranks are spawned per scenario (tests/tp_worker.py), each joining the group from torchrun's
environment variables; the parent builds the same tiny float32 model unsplit and compares: logits
within 1e-5 on image, multi-image, text-only and mixed batches, greedy tokens through generate()
and the Engine, the same with int8 weights, sliced loading from safetensors (float and a saved int8
checkpoint), per-rank bytes, and bad set-ups (clear errors, no hang when a rank dies).
"""

from __future__ import annotations

import socket
import sys
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

sys.path.insert(0, str(Path(__file__).parent))
import tp_worker  # noqa: E402

from mllama.model import MllamaForConditionalGeneration  # noqa: E402
from mllama.quantize import quantize_model  # noqa: E402
from mllama.tp import shard_plan  # noqa: E402

WORLD = 2
JOIN_TIMEOUT_S = 240
TOL = 1e-5


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _spawn(scenario: str, work: Path, *, timeout_s: float) -> list[dict]:
    ctx = mp.get_context("spawn")
    port = _free_port()
    procs = [ctx.Process(target=tp_worker.main, args=(rank, WORLD, port, scenario, str(work), timeout_s))
             for rank in range(WORLD)]
    for proc in procs:
        proc.start()
    for proc in procs:
        proc.join(JOIN_TIMEOUT_S)
    alive = [proc for proc in procs if proc.is_alive()]
    for proc in alive:
        proc.kill()
    assert not alive, f"{scenario}: {len(alive)} rank(s) still running after {JOIN_TIMEOUT_S}s (a hang)"
    results = []
    for rank in range(WORLD):
        file = work / f"{scenario}-rank{rank}.pt"
        assert file.is_file(), f"{scenario}: rank {rank} wrote no result (exit code {procs[rank].exitcode})"
        results.append(torch.load(file, weights_only=False))
    return results


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    work = tmp_path_factory.mktemp("tp")
    tp_worker.build().save_pretrained(work / "float")
    quantize_model(tp_worker.build(), "int8").save_pretrained(work / "int8")
    results = _spawn("main", work, timeout_s=120)
    for rank, result in enumerate(results):
        assert "crash" not in result, f"rank {rank} failed:\n{result['crash']}"
    torch.manual_seed(0)
    reference = tp_worker.run_model(tp_worker.build())
    reference_int8 = tp_worker.run_model(quantize_model(tp_worker.build(), "int8"))
    return results, reference, reference_int8


def _compare(split: dict, reference: dict, what: str, *, rel_tol: float | None = None) -> None:
    for key, ref in reference.items():
        got = split[key]
        if key.startswith("logits/"):
            assert got.shape == ref.shape, f"{what} {key}: shape {tuple(got.shape)} != {tuple(ref.shape)}"
            err = (got - ref).abs().max().item()
            tol = TOL if rel_tol is None else rel_tol * ref.abs().max().item()
            assert err <= tol, f"{what} {key}: max |TP=2 - TP=1| = {err:.2e} > {tol:.2e}"
        elif key.startswith("generate/"):
            assert torch.equal(got, ref), f"{what} {key}: tokens {got.tolist()} != {ref.tolist()}"
        else:
            assert got == ref, f"{what} {key}: {got} != {ref}"


@pytest.mark.parametrize("rank", range(WORLD))
def test_tp2_matches_tp1_logits_generate_engine(runs, rank):
    results, reference, _ = runs
    _compare(results[rank]["split"], reference, f"rank {rank}")
    assert results[rank]["kv_heads"] == 1  # 2 K/V heads split over 2 ranks: the cache holds one per rank


def test_tp2_shares_the_padded_tile_as_tp1(runs):
    """Heads split over 2 ranks with one padded tile standing for two (the 1-tile image) beside an
    image that runs every slot, in one batch: the same logits as one process."""
    results, _, _ = runs
    model = tp_worker.build_published()
    seen: list[int] = []
    vision = model.model.vision_model
    vision.transformer.layers[0].register_forward_pre_hook(lambda _m, args: seen.append(args[0].shape[1] // vision.tile_len))
    reference = tp_worker.shared_tile_logits(model)
    assert sorted(seen) == [2, 3]  # the shared path (1 real + 1 padded tile) and the full one ran
    for rank in range(WORLD):
        _compare(results[rank]["shared"], reference, f"shared tile, rank {rank}")


def test_tp2_int8_matches_tp1_int8(runs):
    results, _, reference_int8 = runs
    for rank in range(WORLD):
        _compare(results[rank]["int8"], reference_int8, f"int8 rank {rank}")


def test_tp2_int4_matches_tp1_int4(runs):
    results, _, _ = runs
    reference = tp_worker.logits_only(tp_worker.build_int4_friendly())
    for rank in range(WORLD):
        # The int4 kernel rounds each group of a linear's input to int16 (a step of max|x| / 32767),
        # so the all-reduces' other summation order upstream can move an input across a rounding
        # step: a few steps of drift, not float32's 1e-5.
        _compare(results[rank]["int4"], reference, f"int4 rank {rank}", rel_tol=2e-4)
        assert "int4 groups must not straddle ranks" in results[rank]["err/int4"]


def test_sliced_loading_matches(runs):
    results, reference, reference_int8 = runs
    for rank in range(WORLD):
        _compare(results[rank]["loaded"], reference, f"loaded rank {rank}")
        _compare(results[rank]["loaded_int8"], reference_int8, f"loaded int8 rank {rank}")


def test_replicated_kv_heads(runs):
    """One K/V head cannot be split over 2 ranks: each keeps it, and the logits still match."""
    results, _, _ = runs
    config = tp_worker.tiny_config("a")
    config.text_config.num_key_value_heads = 1
    model = MllamaForConditionalGeneration(config)
    tp_worker.randomize_(model, tp_worker.SEED)
    with torch.inference_mode():
        for name, inputs in tp_worker.batches(config).items():
            ref = model.eval()(**inputs).logits
            for rank in range(WORLD):
                err = (results[rank]["mqa"][f"logits/{name}"] - ref).abs().max().item()
                assert err <= TOL, f"rank {rank} {name}: {err:.2e}"
    assert results[0]["mqa_kv_heads"] == 1


def test_per_rank_bytes(runs):
    """Each rank holds the replicated tensors plus exactly half of every split linear."""
    results, _, _ = runs
    model = tp_worker.build()
    shards, _ = shard_plan(model, world_size=WORLD, rank=0)
    split = sum(p.numel() * p.element_size() for path in shards
                for p in model.get_submodule(path).parameters())
    bias_kept = sum(model.get_submodule(path).bias.numel() * 4 for path, s in shards.items()
                    if s.kind == "row" and model.get_submodule(path).bias is not None)
    whole = tp_worker.tensor_bytes(model)
    expected = whole - split + (split - bias_kept) // WORLD + bias_kept
    for rank in range(WORLD):
        assert results[rank]["bytes"] == expected, (rank, results[rank]["bytes"], expected, whole)
        assert results[rank]["loaded_bytes"] == expected
    assert split > 0.5 * whole  # the linears dominate even this tiny model
    assert expected < 0.75 * whole


def test_bad_setups(runs):
    results, _, _ = runs
    for rank in range(WORLD):
        assert "vision attention heads divisible by 2, got 3" in results[rank]["err/heads"]
        assert results[rank]["err/world"].startswith("ValueError: tensor parallelism over 4 ranks was asked for")
        assert "split already" in results[rank]["err/twice"]


def test_shard_plan_errors_without_processes():
    model = tp_worker.build()
    with pytest.raises(ValueError, match="attention heads divisible by 3"):
        shard_plan(model, world_size=3, rank=0)
    config = tp_worker.tiny_config("c")
    config.text_config.num_key_value_heads = 3  # 6 heads, 3 K/V heads: 2 ranks can neither split nor replicate them
    with pytest.raises(ValueError, match="key/value heads can be neither split"):
        shard_plan(MllamaForConditionalGeneration(config), world_size=2, rank=0)


def test_dead_rank_fails_instead_of_hanging(tmp_path):
    results = _spawn("dead", tmp_path, timeout_s=15)
    assert "crash" not in results[0], results[0].get("crash")
    assert results[0]["err/dead"] != "no error"
    assert results[0]["dead_seconds"] < 60


def test_torchrun_generate_matches_single_process(capsys):
    """`torchrun --nproc-per-node 2 -m mllama generate` on the demo model (its 4 heads, 2 K/V heads and
    MLPs split; 743-token vocabulary replicated): rank 0 prints the answer of a plain run, once."""
    import os
    import subprocess

    from mllama.cli import example_image, main

    args = ["generate", "Describe the image.", "--image", str(example_image()), "--max-new-tokens", "10",
            "--dtype", "float32"]
    assert main(args) == 0
    expected = capsys.readouterr().out
    assert expected.strip()
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")}
    run = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
                          "--master-port", str(_free_port()), "-m", "mllama", *args],
                         capture_output=True, text=True, timeout=JOIN_TIMEOUT_S, env=env)
    assert run.returncode == 0, run.stderr[-3000:]
    assert run.stdout == expected


def test_torchrun_rejects_chat():
    import os
    import subprocess

    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE")}
    env.update(RANK="0", WORLD_SIZE="2")  # what torchrun sets; rejected before any process group is joined
    run = subprocess.run([sys.executable, "-m", "mllama", "chat"], capture_output=True, text=True, timeout=60,
                         env=env, stdin=subprocess.DEVNULL)
    assert run.returncode == 1
    assert "does not run under torchrun yet" in run.stderr


TP_PLAN_SCRIPT = """
import sys, torch, torch.distributed as dist
from mllama import MllamaForConditionalGeneration
from mllama.cli import default_model_dir
model = MllamaForConditionalGeneration.from_pretrained(default_model_dir(), dtype=torch.float32, tp_plan="auto", tp_size=2)
ids = torch.tensor([[1, 5, 9, 22, 7, 3]])
with torch.inference_mode():
    logits = model(input_ids=ids).logits
    tokens = model.generate(input_ids=ids, max_new_tokens=6, do_sample=False)
if dist.get_rank() == 0:
    torch.save({"logits": logits, "tokens": tokens,
                "rows": model.model.language_model.layers[0].mlp.gate_proj.weight.shape[0]}, sys.argv[1])
dist.barrier()  # neither rank tears the group down while the other still uses it
dist.destroy_process_group()
# Skip the interpreter's teardown: on a loaded machine a c10d/gloo thread still winding down when
# static destructors run aborts the process ("terminate called without an active exception").
sys.stdout.flush()
sys.stderr.flush()
import os
os._exit(0)
"""


def test_from_pretrained_tp_plan_auto_under_torchrun(tmp_path):
    """transformers' idiom `from_pretrained(..., tp_plan="auto")` under torchrun: each rank loads its
    slices; logits within 1e-5 of the unsplit model and the same greedy tokens."""
    import os
    import subprocess

    from mllama.cli import default_model_dir

    script, out = tmp_path / "tp_plan.py", tmp_path / "out.pt"
    script.write_text(TP_PLAN_SCRIPT)
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")}
    run = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
                          "--master-port", str(_free_port()), str(script), str(out)],
                         capture_output=True, text=True, timeout=JOIN_TIMEOUT_S, env=env)
    assert run.returncode == 0, run.stderr[-3000:]
    got = torch.load(out)
    full = MllamaForConditionalGeneration.from_pretrained(default_model_dir(), dtype=torch.float32)
    ids = torch.tensor([[1, 5, 9, 22, 7, 3]])
    with torch.inference_mode():
        torch.testing.assert_close(got["logits"], full(input_ids=ids).logits, rtol=TOL, atol=TOL)
        assert torch.equal(got["tokens"], full.generate(input_ids=ids, max_new_tokens=6, do_sample=False))
    assert got["rows"] * 2 == full.model.language_model.layers[0].mlp.gate_proj.weight.shape[0]  # really split


def test_tp_plan_rejects_other_plans():
    from mllama.cli import default_model_dir

    with pytest.raises(ValueError, match="tp_plan must be 'auto'"):
        MllamaForConditionalGeneration.from_pretrained(default_model_dir(), tp_plan="colwise")
