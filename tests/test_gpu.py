"""The CUDA path against the CPU path on tiny random float32 models (TF32 off). Skipped without CUDA.

Run on a GPU machine by benchmarks/gpu_check.py's companion command (see benchmarks/RESULTS.md).
Covers: logits of image / multi-image / text-only / mixed batches, greedy generation eager and
compiled, left-padded batches against single requests, the engine with concurrent requests,
int8 and int4 weights, and that the CPU-only kernels are never reached with CUDA tensors.
"""

from __future__ import annotations

import copy

import pytest
import torch

from tiny import cross_mask, random_images, randomize_, tiny_config

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

CUDA = torch.device("cuda")


@pytest.fixture(scope="module", autouse=True)
def no_tf32():
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


def build(name: str = "a", seed: int = 0):
    from mllama import MllamaForConditionalGeneration

    config = tiny_config(name)
    cpu = MllamaForConditionalGeneration(config)
    randomize_(cpu, seed)
    cpu.eval()
    return config, cpu, copy.deepcopy(cpu).to(CUDA)


def batch(config, tiles: list[list[int]], positions: list[list[int]], seq: int = 10, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    vocab = config.text_config.vocab_size
    ids = torch.randint(3, vocab, (len(tiles), seq), generator=gen)
    ids[:, 0] = config.text_config.bos_token_id
    for i, pos in enumerate(positions):
        for p in pos:
            ids[i, p] = config.image_token_index
    inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    if any(tiles):
        inputs.update(random_images(config, tiles, seed))
        inputs["cross_attention_mask"] = cross_mask(tiles, positions, seq, config.vision_config.max_num_tiles)
    return inputs


def to(inputs: dict, device: torch.device) -> dict:
    return {k: v.to(device) for k, v in inputs.items()}


CASES = {
    "image": ([[2]], [[1]]),
    "two_images": ([[2, 1]], [[1, 5]]),
    "text_only": ([[]], [[]]),
    "mixed": ([[2], [1, 2]], [[3], [1, 2]]),
}


@pytest.mark.parametrize("case", sorted(CASES))
@torch.inference_mode()
def test_logits_match_cpu(case):
    config, cpu, gpu = build()
    tiles, positions = CASES[case]
    inputs = batch(config, tiles, positions)
    ref = cpu(**inputs).logits
    got = gpu(**to(inputs, CUDA)).logits.cpu()
    assert ref.abs().max() > 0.1
    torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("compile", [False, True])
@torch.inference_mode()
def test_greedy_generate_matches_cpu(compile):
    config, cpu, gpu = build()
    inputs = batch(config, [[2], [1]], [[1], [2]])
    ref = cpu.generate(**inputs, max_new_tokens=12, do_sample=False)
    got = gpu.generate(**to(inputs, CUDA), max_new_tokens=12, do_sample=False, compile=compile).cpu()
    assert torch.equal(got, ref)


@torch.inference_mode()
def test_left_padded_batch_matches_single_requests():
    config, _, gpu = build("b", seed=1)
    long = batch(config, [[2]], [[1]], seq=12, seed=3)
    short = batch(config, [[4]], [[1]], seq=7, seed=4)
    singles = [gpu.generate(**to(x, CUDA), max_new_tokens=8, do_sample=False)[0, x["input_ids"].shape[1]:].cpu()
               for x in (long, short)]
    pad = 12 - 7
    ids = torch.cat([long["input_ids"], torch.cat([torch.zeros(1, pad, dtype=torch.long), short["input_ids"]], 1)])
    mask = torch.cat([long["attention_mask"], torch.cat([torch.zeros(1, pad, dtype=torch.long), short["attention_mask"]], 1)])
    cross = torch.cat([long["cross_attention_mask"],
                       torch.cat([torch.zeros(1, pad, *short["cross_attention_mask"].shape[2:], dtype=torch.long),
                                  short["cross_attention_mask"]], 1)])
    both = {"input_ids": ids, "attention_mask": mask, "cross_attention_mask": cross,
            **{k: torch.cat([long[k], short[k]]) for k in ("pixel_values", "aspect_ratio_ids", "aspect_ratio_mask")}}
    out = gpu.generate(**to(both, CUDA), max_new_tokens=8, do_sample=False)[:, 12:].cpu()
    assert torch.equal(out[0], singles[0]) and torch.equal(out[1], singles[1])


@pytest.mark.parametrize("compile", [False, True])
@torch.inference_mode()
def test_engine_concurrent_matches_alone(compile):
    from mllama import Engine, Request, SamplingParams

    config, cpu, gpu = build()
    requests = []
    for i, (tiles, pos) in enumerate([([[2]], [[1]]), ([[]], [[]]), ([[1]], [[2]])]):
        x = batch(config, tiles, pos, seq=8 + i, seed=10 + i)
        images = {k: x[k][0] for k in ("pixel_values", "aspect_ratio_ids", "aspect_ratio_mask", "cross_attention_mask")
                  if k in x}
        requests.append(dict(input_ids=x["input_ids"][0], **images))
    alone = []
    for r in requests:
        engine = Engine(cpu, max_slots=1, max_len=32)
        alone.append(engine.submit(Request(**r, sampling=SamplingParams(max_tokens=10))).result())
    engine = Engine(gpu, max_slots=4, max_len=32, compile=compile)
    handles = [engine.submit(Request(**{k: v.to(CUDA) if torch.is_tensor(v) else v for k, v in r.items()},
                                     sampling=SamplingParams(max_tokens=10))) for r in requests]
    assert [h.result() for h in handles] == alone


@pytest.mark.parametrize("scheme", ["int8", "int4"])
@torch.inference_mode()
def test_quantized_matches_cpu(scheme):
    from mllama.quantize import quantize_model

    config, cpu, _ = build()
    q_cpu = quantize_model(copy.deepcopy(cpu), scheme)
    q_gpu = copy.deepcopy(q_cpu).to(CUDA)
    inputs = batch(config, [[2]], [[1]])
    torch.testing.assert_close(q_gpu(**to(inputs, CUDA)).logits.cpu(), q_cpu(**inputs).logits, rtol=1e-4, atol=1e-4)
    layer = q_gpu.model.language_model.layers[0].mlp.gate_proj
    assert not layer._use_kernel(torch.zeros(1, layer.in_features, device=CUDA))


def test_cpu_kernels_refuse_cuda_tensors():
    from mllama import cpu_kernels

    x = torch.zeros(1, 64, dtype=torch.bfloat16, device=CUDA)
    w = torch.zeros(64, 64, dtype=torch.bfloat16, device=CUDA)
    assert not cpu_kernels.use_gemv(x, w)


@pytest.mark.parametrize("scheme", ["int8", "int4"])
@torch.inference_mode()
def test_quantize_while_loading_onto_the_gpu(scheme, tmp_path):
    from mllama import MllamaForConditionalGeneration

    config, cpu, _ = build()
    cpu.save_pretrained(tmp_path)
    ref = MllamaForConditionalGeneration.from_pretrained(tmp_path, quantization=scheme)
    got = MllamaForConditionalGeneration.from_pretrained(tmp_path, quantization=scheme, device="cuda")
    inputs = batch(config, [[2]], [[1]])
    torch.testing.assert_close(got(**to(inputs, CUDA)).logits.cpu(), ref(**inputs).logits, rtol=1e-4, atol=1e-4)
