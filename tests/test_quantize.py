"""Weight-only int8 / int4 quantization (quantize.py, csrc/gemm_small.c): values against float64
references, the load-time transform, checkpoints, generation, bad input."""

from __future__ import annotations

import copy
import json

import pytest
import torch
import torch.nn.functional as F

from mllama import cpu_kernels, cpu_prefill, quant_ops
from mllama.cli import main as cli_main
from mllama.linear import cpu_has_native_bf16
from mllama.model import MllamaForCausalLM, MllamaForConditionalGeneration
from mllama.quantize import (Int4Linear, Int8Linear, QuantizationConfig, dequantize_model, quantize_int4,
                             quantize_model, quantize_weight, resolve_quantization)
from mllama.weights import CheckpointMismatchError
from tiny import randomize_, random_images, tiny_config

needs_kernels = pytest.mark.skipif(not cpu_kernels.quant_kernels_available(), reason="no AVX2 kernels here")


def _reference_weight(module: torch.nn.Module) -> torch.Tensor:
    """The dequantized weight in float64, computed here from the documented storage format."""
    if isinstance(module, Int8Linear):
        return module.weight.double() * module.weight_scale.double()[:, None]
    packed = module.weight_packed.long()
    n = packed.shape[0]
    blocks = packed.view(n, -1, 16)
    q = torch.cat((blocks & 15, blocks >> 4), dim=2).view(n, -1).double()  # per 32: low nibbles, then high
    g = module.group_size
    w = q * module.weight_scale.double().repeat_interleave(g, 1) + module.weight_offset.double().repeat_interleave(g, 1)
    return w[:, :module.in_features]


def _x_rounding_bound(module: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    """What the kernels' rounding of x may add (csrc/gemm_small.c). int4: each x is off by at most half
    its group's step, max |x| / 127 (int8, groups of a multiple of 64) or max |x| / 32767 (int16,
    other groups), and meets a weight term |q - 8| * scale <= 8 * scale. int8, one row of x with
    AVX512-VNNI: x rounded to int16 per run of 128 values (the last k % 128 exact), meeting |w|; bf16
    x through the AMX-INT8 tiles: each row rounded to int16 on its own grid (step max|x| / 32767)."""
    if _int8_tiles(module, x):
        return _int8_tiles_bound(module, x)
    if isinstance(module, Int8Linear):
        kq = x.shape[-1] // 128 * 128
        if x.shape[0] != 1 or kq == 0 or cpu_kernels.small_kernel_level() != 2:
            return torch.zeros(x.shape[0], module.out_features, dtype=torch.float64)
        half_step = x[:, :kq].double().reshape(1, -1, 128).abs().amax(-1) / 32767 / 2 * (1 + 1e-3)  # (1, runs)
        w = module.weight.double().abs()[:, :kq] * module.weight_scale.double().abs()[:, None]
        return half_step @ w.reshape(module.out_features, -1, 128).sum(-1).T  # (1, n)
    if not isinstance(module, Int4Linear):
        return torch.zeros(x.shape[0], module.out_features, dtype=torch.float64)
    g = module.group_size
    padded = torch.zeros(x.shape[0], module.weight_scale.shape[1] * g, dtype=torch.float64)
    padded[:, :x.shape[-1]] = x.double()
    levels = 127 if g % 64 == 0 else 32767
    half_step = padded.view(x.shape[0], -1, g).abs().amax(-1) / levels / 2 * (1 + 1e-3)  # (rows, groups)
    return half_step @ (8 * g * module.weight_scale.double().abs()).T  # (rows, n)


def _int8_tiles(module: torch.nn.Module, x: torch.Tensor) -> bool:
    """Whether `module(x)` takes the AMX-INT8 tiles (csrc/gemm_amx.c) with int8 weights here."""
    return (isinstance(module, Int8Linear) and x.dtype == torch.bfloat16 and not x.requires_grad
            and x.shape[:-1].numel() >= cpu_kernels.AMX_INT8_MIN_ROWS and cpu_kernels.amx_int8_tiles(module.in_features))


def _int4_tiles(module: torch.nn.Module, x: torch.Tensor) -> bool:
    """Whether `module(x)` takes the AMX-INT8 tiles with int4 weights here (x rounded as the kernels do)."""
    return (isinstance(module, Int4Linear) and x.dtype == torch.bfloat16 and not x.requires_grad
            and x.shape[:-1].numel() >= cpu_kernels.AMX_INT8_MIN_ROWS
            and cpu_kernels.amx_int4_tiles(module.out_features, module.group_size))


def _int8_tiles_bound(module: Int8Linear, x: torch.Tensor) -> torch.Tensor:
    """The int8 tiles' rounding of x: each row to int16 on its own grid (half a step of max|x| / 32767)."""
    half_step = x.double().abs().amax(-1, keepdim=True) / 32767 / 2 * (1 + 1e-3)  # (rows, 1)
    return half_step * (module.weight.double().abs().sum(1) * module.weight_scale.double().abs())[None]


def _quantized_linear(mode: str, n: int, k: int, *, group_size: int = 64, dtype=torch.float32, bias=False, seed=0):
    gen = torch.Generator().manual_seed(seed)
    linear = torch.nn.Linear(k, n, bias=bias).to(dtype)
    with torch.no_grad():
        linear.weight.copy_(torch.randn(n, k, generator=gen) * 0.1 + 0.02 * torch.randn(n, 1, generator=gen))
        if bias:
            linear.bias.copy_(torch.randn(n, generator=gen))
    holder = torch.nn.Sequential(linear)
    quantize_model(holder, QuantizationConfig(mode=mode, group_size=group_size))
    return linear, holder[0]


@pytest.mark.parametrize("mode,group", [("int8", 64), ("int4", 32), ("int4", 64), ("int4", 128)])
@pytest.mark.parametrize("n,k", [(7, 33), (29, 100), (50, 1030), (24, 64), (3, 300)])
def test_quantization_error_is_within_half_a_step(mode, group, n, k):
    linear, q = _quantized_linear(mode, n, k, group_size=group, seed=n + k)
    w = linear.weight.double()
    err = (w - _reference_weight(q)).abs()
    if mode == "int8":
        step = q.weight_scale.double()[:, None].expand(n, k)
        assert q.weight.abs().max() <= 127
    else:
        step = q.weight_scale.double().repeat_interleave(group, 1)[:, :k]
        assert q.weight_packed.shape == (n, -(-k // group) * group // 2)
    assert (err <= step * 0.5 * (1 + 1e-3) + 1e-7).all()
    # the module's own dequantize (used for prefill) is the same weight
    assert torch.allclose(q.dequantize(torch.float64), _reference_weight(q), rtol=0, atol=1e-6)


@pytest.mark.parametrize("mode,group", [("int8", 64), ("int4", 32), ("int4", 64), ("int4", 128)])
@pytest.mark.parametrize("n,k", [(7, 33), (29, 100), (50, 1030), (25, 256), (40, 1152), (24, 4736), (777, 256)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_quantized_linear_matches_float64_reference(mode, group, n, k, dtype):
    """Odd shapes: k not a multiple of the group or the 32-value block, n not a multiple of any tile
    (777: past the one-row loops' work items of 256 rows, with 9 left);
    1..32 rows go through the kernel (bf16 x on a CPU with native bf16: fewer), more rows through the
    prefill kernel (bf16 x, AVX-512 BF16 without AMX) or the blocked dequantize + GEMM, autograd through
    dequantize + F.linear."""
    _, q = _quantized_linear(mode, n, k, group_size=group, dtype=dtype, bias=True, seed=3)
    w = _reference_weight(q)
    gen = torch.Generator().manual_seed(n * k)
    for rows in (1, 2, 3, 4, 5, 16, 17, 32, 33, 70):
        x = torch.randn(rows, k, generator=gen).to(dtype)
        ref = x.double() @ w.T + q.bias.double()
        bound = 1e-5 * (x.double().abs() @ w.abs().T + q.bias.double().abs()) + 1e-30
        # else the AMX tiles, the bf16 passes over weights dequantized a chunk at a time (bf16 x, AVX-512
        # BF16 without AMX) or the blocked dequantize + GEMM (fewer kernel rows with native bf16)
        fused = dtype == torch.bfloat16 and q._fused_rows(rows)
        kernel = q._use_kernel(x) and not q._use_amx(x) and not fused
        assert kernel == (rows <= cpu_kernels.MAX_QUANT_ROWS) or dtype == torch.bfloat16
        tiles = _int8_tiles(q, x) or _int4_tiles(q, x)
        if kernel or tiles:
            bound = bound + _x_rounding_bound(q, x)
        if dtype == torch.bfloat16:  # the output is rounded to bf16 once (and the bias added in bf16)
            bound = bound + ref.abs() * 2**-7 + q.bias.double().abs() * 2**-8
            if not kernel and not tiles:  # prefill, AMX-BF16, fused: the weight may be dequantized to bf16
                bound = bound + 2**-8 * (x.double().abs() @ w.abs().T)
        with torch.no_grad():
            out = q(x)
        assert out.dtype == dtype and out.shape == (rows, n)
        assert ((out.double() - ref).abs() <= bound).all(), f"{rows} rows"
    x = torch.randn(2, 3, k, generator=gen).to(dtype).requires_grad_()
    out = q(x)  # autograd: the dequantized path, differentiable in x
    out.float().sum().backward()
    assert x.grad is not None and out.shape == (2, 3, n)


@needs_kernels
@pytest.mark.parametrize("mode", ["int8", "int4"])
def test_kernel_is_used_for_decode_rows(mode, monkeypatch):
    _, q = _quantized_linear(mode, 40, 96)
    op = quant_ops.linear_int8 if mode == "int8" else quant_ops.linear_int4
    calls = []
    monkeypatch.setattr(quant_ops, f"linear_{mode}", lambda *a: calls.append(1) or op(*a))
    with torch.no_grad():
        q(torch.randn(1, 96))
        q(torch.randn(cpu_kernels.MAX_QUANT_ROWS, 96))
        assert len(calls) == 2
        q(torch.randn(cpu_kernels.MAX_QUANT_ROWS + 1, 96))
    assert len(calls) == 2


def _tiny_model(name: str = "a", *, seed: int = 0, dtype=torch.float32) -> MllamaForConditionalGeneration:
    model = MllamaForConditionalGeneration(tiny_config(name))
    randomize_(model, seed)
    return model.to(dtype).eval()


def test_targets_text_and_projector_not_vision_or_lm_head_by_default():
    model = quantize_model(_tiny_model(), "int4")
    text = model.model.language_model
    for module in (text.layers[0].self_attn.q_proj, text.layers[0].mlp.down_proj, text.layers[1].cross_attn.k_proj,
                   text.layers[1].mlp.gate_proj, model.model.multi_modal_projector):
        assert isinstance(module, Int4Linear)
    assert type(model.lm_head) is torch.nn.Linear
    assert type(model.model.vision_model.transformer.layers[0].self_attn.q_proj) is torch.nn.Linear
    assert text.embed_tokens.weight.dtype == torch.float32
    full = quantize_model(_tiny_model(), QuantizationConfig(mode="int8", vision=True, lm_head=True))
    assert not [n for n, m in full.named_modules() if isinstance(m, torch.nn.Linear)]
    with pytest.raises(ValueError, match="already quantized"):
        quantize_model(full, "int4")


@pytest.mark.parametrize("mode", ["int8", "int4"])
def test_save_load_round_trip_and_quantize_on_load(mode, tmp_path, monkeypatch):
    source, out = tmp_path / "float", tmp_path / "quant"
    _tiny_model("b", seed=1).save_pretrained(source)  # hidden 48: int4 rows padded to the group
    on_load = MllamaForConditionalGeneration.from_pretrained(source, quantization=mode)
    after = quantize_model(MllamaForConditionalGeneration.from_pretrained(source), mode)
    assert on_load.state_dict().keys() == after.state_dict().keys()
    for key, value in after.state_dict().items():
        assert torch.equal(on_load.state_dict()[key], value), key
    on_load.save_pretrained(out)
    config = json.loads((out / "config.json").read_text())
    assert config["quantization_config"]["mode"] == mode

    import mllama.quantize

    def no_requantizing(*args, **kwargs):
        raise AssertionError("a quantized checkpoint was quantized again")

    monkeypatch.setattr(mllama.quantize, "quantize_weight", no_requantizing)
    loaded = MllamaForConditionalGeneration.from_pretrained(out)
    assert loaded.quantization_config == on_load.quantization_config
    for key, value in on_load.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value), key
    ids = torch.tensor([[1, 5, 9, 22, 40, 7]])
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, on_load(ids).logits)
    text = MllamaForCausalLM.from_pretrained(out)  # the text half of the quantized checkpoint
    assert text.quantization_config.mode == mode
    with pytest.raises(ValueError, match="already quantized"):
        MllamaForConditionalGeneration.from_pretrained(out, quantization="int8" if mode == "int4" else "int4")


@pytest.mark.parametrize("mode,dtype", [("int4", torch.bfloat16), ("int8", torch.float32)])
def test_quantize_on_load_reads_weights_a_chunk_of_rows_at_a_time(mode, dtype, tmp_path, monkeypatch):
    """A weight to be quantized is read from its file a chunk of rows at a time into one buffer (an
    lm_head is 1 GB of bf16: held whole, it was the peak of a quantized load), converted to the load
    dtype per chunk; the result is bit for bit that of quantizing the loaded float model."""
    import mllama.quant_format
    import mllama.weights

    _tiny_model("b", seed=2, dtype=torch.bfloat16).save_pretrained(tmp_path)
    monkeypatch.setattr(mllama.quant_format, "_CHUNK_ROWS", 5)
    reads: list[tuple[int, torch.dtype]] = []
    read_rows = mllama.weights._FileRows.__getitem__

    def spy(self, rows):
        out = read_rows(self, rows)
        reads.append((out.shape[0], out.dtype))
        return out

    monkeypatch.setattr(mllama.weights._FileRows, "__getitem__", spy)
    on_load = MllamaForConditionalGeneration.from_pretrained(tmp_path, quantization=mode, torch_dtype=dtype)
    assert reads and max(n for n, _ in reads) == 5 and {d for _, d in reads} == {dtype}
    assert len(reads) > len([m for m in on_load.modules() if isinstance(m, (Int8Linear, Int4Linear))])
    after = quantize_model(MllamaForConditionalGeneration.from_pretrained(tmp_path, torch_dtype=dtype), mode)
    assert on_load.state_dict().keys() == after.state_dict().keys()
    for key, value in after.state_dict().items():
        assert torch.equal(on_load.state_dict()[key], value), key


@pytest.mark.parametrize("mode,name,dtype", [("int8", "a", torch.float32), ("int4", "a", torch.float32),
                                             ("int4", "c", torch.float32), ("int4", "a", torch.bfloat16),
                                             ("int8", "a", torch.bfloat16)])
def test_generate_matches_eager_dequantized_weights(mode, name, dtype):
    """Decode through the kernels vs the same quantized weights dequantized into plain nn.Linear."""
    quantized = quantize_model(_tiny_model(name, seed=5, dtype=dtype), mode)
    reference = dequantize_model(copy.deepcopy(quantized))
    assert not any(isinstance(m, (Int8Linear, Int4Linear)) for m in reference.modules())
    config = quantized.config
    images = random_images(config, [[1], [2]], seed=3)
    images["pixel_values"] = images["pixel_values"].to(dtype)
    image_token = config.image_token_index
    ids = torch.tensor([[image_token, 5, 9, 11, 3, 4], [image_token, 7, 8, 6, 12, 13]])
    cross = torch.zeros(2, 6, 1, config.vision_config.max_num_tiles, dtype=torch.long)
    cross[0, :, 0, :1] = 1
    cross[1, :, 0, :2] = 1
    kwargs = dict(max_new_tokens=10, eos_token_id=[], pad_token_id=0, return_dict_in_generate=True)
    a = quantized.generate(ids, cross_attention_mask=cross, **images, **kwargs)
    b = reference.generate(ids, cross_attention_mask=cross, **images, **kwargs)
    assert torch.equal(a.sequences, b.sequences)
    # int4 with groups of 64 or more rounds each linear's input to int8 per group in the kernel (a step of
    # max|x| / 127; the exact bound is tested per linear above), which the eager reference does not.
    tol = 0.05 if dtype != torch.float32 else 2e-2 if mode == "int4" else 1e-4
    for x, y in zip(a.logits, b.logits):
        assert (x - y).abs().max().item() <= tol * y.abs().max().item()


def test_cli_quantize_writes_a_checkpoint_that_loads_as_quantized(tmp_path, capsys):
    source = tmp_path / "float"
    _tiny_model("a", seed=2).save_pretrained(source)
    (source / "tokenizer.json").write_text("{}")
    assert cli_main(["quantize", str(source), str(tmp_path / "q"), "--int4", "--group-size", "32", "--lm-head"]) == 0
    assert (tmp_path / "q" / "tokenizer.json").read_text() == "{}"
    loaded = MllamaForConditionalGeneration.from_pretrained(tmp_path / "q")
    assert loaded.quantization_config == QuantizationConfig(mode="int4", group_size=32, lm_head=True)
    assert isinstance(loaded.lm_head, Int4Linear)
    expected = MllamaForConditionalGeneration.from_pretrained(source, quantization=loaded.quantization_config)
    for key, value in expected.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value), key
    assert cli_main(["quantize", str(source), str(tmp_path / "q"), "--int8"]) == 1
    assert "not an empty directory" in capsys.readouterr().err
    assert cli_main(["quantize", str(source), str(tmp_path / "r"), "--int4", "--group-size", "48"]) == 1
    assert "group_size" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        cli_main(["quantize", str(source), str(tmp_path / "s")])  # neither --int8 nor --int4


def test_bad_input_is_named(tmp_path):
    with pytest.raises(ValueError, match="unknown quantization mode 'int3'"):
        QuantizationConfig(mode="int3")
    with pytest.raises(ValueError, match="group_size must be one of"):
        QuantizationConfig(mode="int4", group_size=48)
    with pytest.raises(ValueError, match="not both"):
        resolve_quantization("int8", {"quant_method": "mllama", "mode": "int8"})
    with pytest.raises(ValueError, match="quant_method 'gptq'"):
        resolve_quantization(None, {"quant_method": "gptq", "bits": 4})
    with pytest.raises(TypeError, match="quantization must be"):
        resolve_quantization(8, None)
    with pytest.raises(ValueError, match="2-D floating"):
        quantize_weight(torch.ones(4, 4, dtype=torch.int32), QuantizationConfig("int8"))
    source, broken = tmp_path / "float", tmp_path / "broken"
    model = _tiny_model("a")
    model.save_pretrained(source)
    with pytest.raises(ValueError, match="unknown quantization mode"):
        MllamaForConditionalGeneration.from_pretrained(source, quantization="int2")
    quantize_model(model, "int8").save_pretrained(broken)
    from safetensors.torch import load_file, save_file

    state = load_file(broken / "model.safetensors")
    del state["language_model.model.layers.0.self_attn.q_proj.weight_scale"]
    save_file(state, broken / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(CheckpointMismatchError, match=r"missing: .*q_proj\.weight_scale"):
        MllamaForConditionalGeneration.from_pretrained(broken)


def test_transformers_style_configs_map():
    assert resolve_quantization(None, {"quant_method": "torchao", "quant_type": "int4_weight_only",
                                       "quant_type_kwargs": {"group_size": 128}}) == QuantizationConfig("int4", group_size=128)
    assert resolve_quantization(None, {"quant_method": "torchao", "quant_type": "int8_weight_only"}).mode == "int8"
    assert resolve_quantization(None, {"quant_method": "bitsandbytes", "load_in_8bit": True}).mode == "int8"
    assert resolve_quantization(None, {"quant_method": "bitsandbytes", "load_in_4bit": True}).mode == "int4"

    class TransformersLike:
        def to_dict(self):
            return {"quant_method": "torchao", "quant_type": "int4_weight_only", "quant_type_kwargs": {"group_size": 32}}

    assert resolve_quantization(None, TransformersLike()) == QuantizationConfig("int4", group_size=32)
    config = QuantizationConfig("int4", group_size=256, vision=True)
    assert QuantizationConfig.from_dict(config.to_dict()) == config
    with pytest.raises(ValueError, match="does not map"):
        resolve_quantization(None, {"quant_method": "torchao", "quant_type": "float8_weight_only"})


@pytest.mark.skipif(cpu_kernels.small_kernel_level() < 2, reason="no VNNI on this CPU")
@pytest.mark.parametrize("n,k,group", [(29, 100, 64), (50, 1030, 128), (40, 4096, 64), (9, 300, 256), (24, 4736, 128),
                                        (75, 4736, 64), (11, 1000, 64), (11, 4160, 64), (266, 1024, 128),
                                        (70, 8192, 128)])
def test_vnni_int4_path_equals_the_avx2_one(n, k, group):
    """vpdpbusd forms the same int32 sums as vpmaddubsw + vpmaddwd (which never saturate on nibbles
    times int8 x), so the VNNI path's output is the AVX2 path's bit for bit, for every tile shape;
    groups of a multiple of 128 (or of 64 in padded rows of a multiple of 128: a pair of groups per
    run) take the 512-bit tiles, which turn the same sums to float lane by lane: equal within float32
    rounding of the terms' magnitudes (4736 = 37 groups of 128: two whole vectors of 16 groups' scales
    and a part of one; 4736 in groups of 64: 74, two vectors and 5 pairs), and every row of a batch
    (two rows of x a tile) exactly as it comes out alone (266 rows: two work items of 128 rows and
    a partial one of 10; one row of x: work items of 256 rows, 64 apart; 8192 values: work items of 64 rows,
    16 apart, from 4 rows of x on)."""
    _, q = _quantized_linear("int4", n, k, group_size=group, seed=k)
    w = _reference_weight(q)
    gen = torch.Generator().manual_seed(n)
    for rows in (1, 2, 3, 4, 6, 16, 17, 32):
        x = torch.randn(rows, k, generator=gen) * torch.rand(1, k, generator=gen) * 4
        args = (x, "int4", q.weight_packed, q.weight_scale, q.weight_offset)
        vnni = cpu_kernels.small_gemm(*args, group_size=group)
        avx2 = cpu_kernels.small_gemm(*args, group_size=group, level=1)
        padded = q.weight_packed.shape[1] * 2
        if group % 128 == 0 or (group == 64 and padded % 128 == 0):
            assert cpu_kernels.int4_tile512(group, padded)
            bound = 1e-6 * (x.double().abs() @ w.abs().T)
            assert ((vnni.double() - avx2.double()).abs() <= bound).all(), f"{rows} rows, 512-bit tiles"
            assert not torch.equal(vnni, avx2) or k < 2 * group  # it did take the other path
            alone = torch.cat([cpu_kernels.small_gemm(x[j:j + 1], *args[1:], group_size=group) for j in range(rows)])
            assert torch.equal(vnni, alone), f"{rows} rows: each row's bits as alone"
        else:
            assert not cpu_kernels.int4_tile512(group, padded)
            assert torch.equal(vnni, avx2), f"{rows} rows"
    with pytest.raises(RuntimeError, match="level 7 not available"):
        cpu_kernels.small_gemm(*args, group_size=group, level=7)


@needs_kernels
@pytest.mark.parametrize("mode", ["int8", "int4"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_prefill_dequantizes_in_blocks_of_rows(mode, dtype, monkeypatch):
    """Prefill rows dequantize the weight a block of output rows at a time (here 16, the last block
    short) into one buffer; the product equals F.linear over the whole dequantized weight."""
    monkeypatch.setattr(cpu_prefill, "PREFILL_BLOCK_BYTES", 1)  # the smallest block: 16 rows
    monkeypatch.setattr(cpu_prefill, "takes", lambda *a: False)  # the blocked route on any CPU
    _, q = _quantized_linear(mode, 50, 200, group_size=64, dtype=dtype, bias=True, seed=5)
    blocks = []
    original = type(q)._dequantize_rows
    monkeypatch.setattr(type(q), "_dequantize_rows", lambda self, r0, r1, dtype, out=None: blocks.append((r0, r1))
                        or original(self, r0, r1, dtype, out))
    x = torch.randn(2, 20, 200).to(dtype)
    with torch.no_grad():
        out = q(x)
        assert blocks == [(0, 16), (16, 32), (32, 48), (48, 50)]
        compute = torch.float32 if dtype == torch.float32 or not cpu_has_native_bf16() else dtype
        expected = (F.linear(x.to(compute), q.dequantize(compute)) + q.bias.to(compute)).to(dtype)
    assert out.shape == (2, 20, 50) and out.dtype == dtype
    torch.testing.assert_close(out, expected, rtol=1e-5 if dtype == torch.float32 else 2**-7, atol=1e-5)
    monkeypatch.setattr(type(q), "_dequantize_rows", lambda self, r0, r1, dtype, out=None: None)  # declined
    with torch.no_grad():
        torch.testing.assert_close(q(x), expected, rtol=1e-5 if dtype == torch.float32 else 2**-7, atol=1e-5)


@needs_kernels
def test_prefill_buffer_is_kept_per_thread(monkeypatch):
    """Prefill rows dequantize the whole weight (where it fits PREFILL_BLOCK_BYTES) into a buffer of
    the calling thread's, the same one call after call; another thread gets its own (the engine's image
    thread prefills beside the text one)."""
    import threading

    _, q = _quantized_linear("int4", 50, 200, group_size=64, dtype=torch.bfloat16, seed=6)
    monkeypatch.setattr(type(q), "_use_amx", lambda self, x: False)  # the blocked route on any CPU
    monkeypatch.setattr(cpu_prefill, "takes", lambda *a: False)
    calls = []  # holding each buffer, so a fresh one could not reuse a freed one's address
    original = type(q)._dequantize_rows
    monkeypatch.setattr(type(q), "_dequantize_rows", lambda self, r0, r1, dtype, out=None: calls.append(
        (r0, r1, out, threading.get_ident())) or original(self, r0, r1, dtype, out))
    x = torch.randn(40, 200).bfloat16()  # more rows than the small-row kernels take
    compute = torch.bfloat16 if cpu_has_native_bf16() else torch.float32
    expected = F.linear(x.to(compute), q.dequantize(compute)).bfloat16()
    results = []
    with torch.no_grad():
        results += [q(x), q(x)]
        worker = threading.Thread(target=lambda: results.append(q(x)))
        worker.start()
        worker.join()
    assert [c[:2] for c in calls] == [(0, 50)] * 3, "the whole weight in one block"
    assert calls[0][2].data_ptr() == calls[1][2].data_ptr(), "the same buffer in one thread"
    assert calls[2][3] != calls[0][3] and calls[2][2].data_ptr() != calls[0][2].data_ptr(), "another thread's own"
    for out in results:
        assert torch.equal(out, expected)


@pytest.mark.skipif(cpu_kernels.small_kernel_level() < 2, reason="no AVX-512 int8 path on this CPU")
@pytest.mark.parametrize("n,k", [(7, 33), (29, 100), (50, 1030), (24, 4096)])
def test_int8_one_row_avx512_path_matches_the_reference(n, k):
    """One row of x against int8 weights takes a 512-bit VNNI loop where the CPU has it (level 2: x
    rounded to int16 per 128 values); it stays within float32 rounding plus that rounding's bound of the
    float64 product, the AVX2 loop (level 1, float x) within float32 rounding."""
    _, q = _quantized_linear("int8", n, k, seed=k)
    x = torch.randn(1, k, generator=torch.Generator().manual_seed(n)) * torch.rand(1, k, generator=torch.Generator().manual_seed(k)) * 4
    w = _reference_weight(q)
    ref = x.double() @ w.T
    bound = 1e-5 * (x.double().abs() @ w.abs().T) + 1e-30
    for level in (None, 1):
        out = cpu_kernels.small_gemm(x, "int8", q.weight, q.weight_scale, level=level)
        extra = _x_rounding_bound(q, x) if level is None else 0
        assert ((out.double() - ref).abs() <= bound + extra).all(), f"level {level}"
    if k >= 128:  # the VNNI loop did round x: its result is not the float loop's
        assert not torch.equal(cpu_kernels.small_gemm(x, "int8", q.weight, q.weight_scale),
                               cpu_kernels.small_gemm(x, "int8", q.weight, q.weight_scale, level=1))


def test_int4_packing_layout_is_the_documented_one():
    values = (torch.arange(64) // 2) % 16  # one group of 64 per row, every level 0..15 used
    out = quantize_int4(values.float().repeat(2, 1), group_size=64)
    assert torch.equal(out["weight_scale"], torch.ones(2, 1)) and torch.equal(out["weight_offset"], torch.zeros(2, 1))
    packed = out["weight_packed"][0].tolist()
    # byte j of each 32-value run: value j in the low nibble, value 16 + j in the high nibble
    expected = [int(values[32 * r + j]) | int(values[32 * r + 16 + j]) << 4 for r in range(2) for j in range(16)]
    assert packed == expected


def test_quantize_on_load_hands_conversion_temporaries_back(tmp_path, monkeypatch):
    """The C heap is trimmed as converted bytes add up (float32 temporaries of each quantized weight
    would otherwise stay resident: 3x an int4 model's bytes in benchmarks/load_memory.py); a load
    without conversion never trims."""
    import mllama.weights

    _tiny_model("b", seed=1).save_pretrained(tmp_path)
    calls = []
    monkeypatch.setattr(mllama.weights, "trim_heap", lambda: calls.append(1))
    monkeypatch.setattr(mllama.weights, "TRIM_EVERY_BYTES", 1)
    MllamaForConditionalGeneration.from_pretrained(tmp_path)
    assert calls == []
    MllamaForConditionalGeneration.from_pretrained(tmp_path, quantization="int4")
    from mllama.safetensors_io import checkpoint_tensors

    assert len(calls) == len(checkpoint_tensors(tmp_path))  # each tensor passes the convert hook
    from mllama.host_memory import trim_heap

    trim_heap()  # callable here (glibc) or a no-op elsewhere


@pytest.mark.parametrize("out_dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("scale_dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("n,k,group", [(7, 33, 32), (64, 4096, 64), (5, 200, 64), (3, 300, 128), (9, 256, 256), (4, 90, 32)])
@pytest.mark.parametrize("level", [0, 1])
def test_c_dequantizer_equals_the_torch_reference(out_dtype, scale_dtype, n, k, group, level, monkeypatch):
    """Prefill and vision dequantize int4 weights in C (csrc/gemm_small.c): bit for bit the torch
    reference (multiply then add, rounded to bf16 to nearest even), padded rows cut to in_features,
    with AVX-512 BF16 where the CPU has it (level 0) and AVX2 (level 1); Int4Linear uses it outside
    autograd, and the torch reference with autograd."""
    if not cpu_kernels.quant_kernels_available():
        pytest.skip("no AVX2 kernels on this machine")
    from mllama.quantize import dequantize_int4

    gen = torch.Generator().manual_seed(n * k)
    q = quantize_int4((torch.randn(n, k, generator=gen) * 0.02).to(scale_dtype), group_size=group)
    args = (q["weight_packed"], q["weight_scale"], q["weight_offset"])
    ref = dequantize_int4(*args, in_features=k, dtype=out_dtype)
    got = quant_ops.dequantize_int4(*args, group_size=group, in_features=k, dtype=out_dtype, level=level)
    assert got.dtype == out_dtype and got.shape == (n, k) and torch.equal(got, ref)
    module = Int4Linear(k, n, bias=False, dtype=scale_dtype, group_size=group)
    module.weight_packed, module.weight_scale, module.weight_offset = args
    calls = []
    real = quant_ops.dequantize_int4
    monkeypatch.setattr(quant_ops, "dequantize_int4", lambda *a, **kw: calls.append(1) or real(*a, **kw))
    with torch.no_grad():
        assert torch.equal(module.dequantize(out_dtype), ref) and calls == [1]
    assert torch.equal(module.dequantize(out_dtype), ref) and calls == [1]  # autograd: the torch reference


@pytest.mark.parametrize("out_dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("scale_dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("n,k", [(7, 33), (64, 4096), (5, 3), (3, 47)])
@pytest.mark.parametrize("level", [0, 1])
def test_c_int8_dequantizer_equals_the_torch_reference(out_dtype, scale_dtype, n, k, level):
    """The same for int8 (a tail of k % 8 columns included); Int8Linear uses it outside autograd."""
    if not cpu_kernels.quant_kernels_available():
        pytest.skip("no AVX2 kernels on this machine")
    from mllama.quantize import dequantize_int8, quantize_int8

    gen = torch.Generator().manual_seed(n * k)
    q = quantize_int8((torch.randn(n, k, generator=gen) * 0.02).to(scale_dtype))
    ref = dequantize_int8(q["weight"], q["weight_scale"], dtype=out_dtype)
    got = quant_ops.dequantize_int8(q["weight"], q["weight_scale"], dtype=out_dtype, level=level)
    assert got.dtype == out_dtype and torch.equal(got, ref)
    module = Int8Linear(k, n, bias=False, dtype=scale_dtype)
    module.weight, module.weight_scale = q["weight"], q["weight_scale"]
    with torch.no_grad():
        assert torch.equal(module.dequantize(out_dtype), ref)


def test_cli_default_group_size_is_the_library_default():
    """cli.py keeps its own copy (it starts without importing torch): the two must not drift."""
    import mllama.cli
    import mllama.quantize

    assert mllama.cli.DEFAULT_GROUP_SIZE == mllama.quantize.DEFAULT_GROUP_SIZE
    assert QuantizationConfig("int4").group_size == mllama.quantize.DEFAULT_GROUP_SIZE == 128


@pytest.mark.skipif(not cpu_kernels.amx_available(), reason="no AMX-BF16 on this CPU")
@pytest.mark.parametrize("mode,group", [("int8", 0), ("int4", 32), ("int4", 128)])
@pytest.mark.parametrize("n,k", [(70, 288), (33, 1056), (31, 96)])
def test_amx_product_is_the_dequantized_weight_through_the_tiles(mode, group, n, k):
    """The fused AMX path dequantizes a block of rows into the thread's buffer and runs the tiles on
    it: bit for bit what dequantize_* then the bf16 tiles give (n past the 32-row blocks, int4 rows
    padded past k), and within float rounding of a float64 product over the bf16 weight. (int8 rows
    of a multiple of 64 values take the int8 tiles instead: the next test.)"""
    assert not cpu_kernels.amx_int8_tiles(k)
    _, q = _quantized_linear(mode, n, k, group_size=group or 64, dtype=torch.bfloat16, seed=n + k)
    wq = q.dequantize(torch.bfloat16)
    gen = torch.Generator().manual_seed(k)
    for rows in (2, 15, 17, 33, cpu_kernels.MAX_AMX_ROWS):
        x = torch.randn(rows, k, generator=gen).bfloat16()
        out = q._amx_product(x)
        assert out is not None and out.shape == (rows, n) and out.dtype == torch.float32
        assert torch.equal(out, cpu_kernels.gemv_float32(x, wq, level=3)), rows
        ref = x.double() @ wq.double().T
        assert ((out.double() - ref).abs() <= 1e-6 * (x.double().abs() @ wq.double().abs().T) + 1e-30).all()
    assert q._amx_product(torch.randn(1, k).bfloat16()) is None  # one row: the small-row kernel
    assert q._amx_product(torch.randn(cpu_kernels.MAX_AMX_ROWS + 1, k).bfloat16()) is None
    from mllama.quantize import AMX_MIN_ROWS

    with torch.no_grad():  # the module routes AMX_MIN_ROWS rows there
        x = torch.randn(AMX_MIN_ROWS[mode], k, generator=gen).bfloat16()
        assert torch.equal(q(x), q._amx_product(x).bfloat16())


@pytest.mark.skipif(not cpu_kernels.quant_kernels_available() or cpu_kernels.gemv_level() < 2,
                    reason="no AVX-512 BF16 on this CPU")
@pytest.mark.parametrize("mode,group", [("int8", 0), ("int4", 32), ("int4", 64), ("int4", 128), ("int4", 256)])
@pytest.mark.parametrize("n,k", [(37, 300), (19, 1000), (9, 2080), (24, 96)])
@pytest.mark.parametrize("scale_dtype", [torch.float32, torch.bfloat16])
def test_fused_quant_gemv_is_the_bf16_kernel_on_the_dequantized_weight(mode, group, n, k, scale_dtype):
    """quant_gemv dequantizes each chunk of 1024 values of 8 weight rows into L1 and runs the bf16
    kernel's passes over it: bit for bit gemv_bf16 on the weight dequantize_* gives (odd n, k past one
    chunk and not a multiple of the group or of 32, int4 rows padded), every row the same alone as in
    a batch, and within float32 rounding of a float64 product over that weight."""
    _, q = _quantized_linear(mode, n, k, group_size=group or 64, dtype=scale_dtype, seed=n + k)
    wq = q.dequantize(torch.bfloat16)
    args = ((q.weight, q.weight_scale) if mode == "int8"
            else (q.weight_packed, q.weight_scale, q.weight_offset))
    gen = torch.Generator().manual_seed(k)
    x = torch.randn(cpu_kernels.MAX_AVX512_ROWS, k, generator=gen).bfloat16()
    alone = [cpu_kernels.quant_gemv(x[j:j + 1], mode, *args, group_size=group) for j in range(x.shape[0])]
    for rows in (1, 2, 3, 4, 7, 16, 17, cpu_kernels.MAX_AVX512_ROWS):
        out = cpu_kernels.quant_gemv(x[:rows], mode, *args, group_size=group)
        assert out is not None and out.shape == (rows, n) and out.dtype == torch.float32
        assert torch.equal(out, cpu_kernels.gemv_float32(x[:rows], wq, level=2)), rows
        assert torch.equal(out, torch.cat(alone[:rows])), rows
        ref = x[:rows].double() @ wq.double().T
        assert ((out.double() - ref).abs() <= 1e-6 * (x[:rows].double().abs() @ wq.double().abs().T) + 1e-30).all()
    assert cpu_kernels.quant_gemv(x[:2].float(), mode, *args, group_size=group) is None  # bf16 x only
    too_many = torch.zeros(cpu_kernels.MAX_AVX512_ROWS + 1, k, dtype=torch.bfloat16)
    assert cpu_kernels.quant_gemv(too_many, mode, *args, group_size=group) is None
    with pytest.raises(ValueError, match="features"):
        cpu_kernels.quant_gemv(x[:2, :k - 1] if mode == "int8" else torch.zeros(2, k + 300, dtype=torch.bfloat16),
                               mode, *args, group_size=group)


@pytest.mark.skipif(not any(cpu_kernels.fused_quant_rows("int4", r, group_size=32, k_row=96) for r in (8, 16)),
                    reason="the fused quantized passes do not run here (no AVX-512 BF16, or AMX tiles)")
@pytest.mark.parametrize("mode,group,k", [("int8", 64, 96), ("int4", 32, 96), ("int4", 64, 96), ("int4", 128, 200)])
def test_modules_take_the_fused_passes_for_batched_decode_rows(mode, group, k, monkeypatch):
    """On a CPU with AVX-512 BF16 and no AMX, bf16 decode batches of FUSED_MIN_ROWS to MAX_AVX512_ROWS
    rows go through quant_gemv (eager and through the custom op), fewer through gemm_small.c; int4
    rows that gemm_small.c's 512-bit tiles take (groups of 64 in rows padded to 128, groups of 128)
    from FUSED_MIN_ROWS_INT4_TILE512 rows. Only past MAX_AVX512_ROWS the prefill kernel (cpu_prefill)."""
    _, q = _quantized_linear(mode, 40, k, group_size=group, dtype=torch.bfloat16, bias=True)
    tile512 = mode == "int4" and cpu_kernels.int4_tile512(group, q.weight_packed.shape[1] * 2)
    assert tile512 == (mode == "int4" and group >= 64)  # 96 values padded to 128 for groups of 64
    lo = cpu_kernels.FUSED_MIN_ROWS_INT4_TILE512 if tile512 else cpu_kernels.FUSED_MIN_ROWS[mode]
    hi = cpu_kernels.MAX_AVX512_ROWS
    calls, larger = [], []
    real, real_blocked = cpu_kernels.quant_gemv, cpu_prefill.blocked_product
    monkeypatch.setattr(cpu_kernels, "quant_gemv", lambda x, *a, **kw: calls.append(x.shape[0]) or real(x, *a, **kw))
    monkeypatch.setattr(cpu_prefill, "blocked_product",
                        lambda x, *a, **kw: larger.append(x.shape[0]) or real_blocked(x, *a, **kw))
    real_prefill = cpu_prefill.prefill_product  # the same CPUs (AVX-512 BF16, no AMX) have it
    monkeypatch.setattr(cpu_prefill, "prefill_product",
                        lambda x, *a, **kw: larger.append(x.shape[0]) or real_prefill(x, *a, **kw))
    with torch.no_grad():
        for rows in (1, lo - 1, lo, hi, hi + 1):
            x = torch.randn(rows, k).bfloat16()
            out = q(x)
            if lo <= rows <= hi:
                expected = real(x, mode, *((q.weight, q.weight_scale) if mode == "int8" else
                                           (q.weight_packed, q.weight_scale, q.weight_offset)), group_size=group)
                assert torch.equal(out, expected.bfloat16() + q.bias), rows
    assert calls == [lo, hi]
    assert larger == [hi + 1]  # below lo the small-row kernel, not the prefill kernel


def _int8_tiles_reference(x: torch.Tensor, q: Int8Linear) -> torch.Tensor:
    """What the AMX-INT8 route computes, in torch: each row of x rounded to int16 on its own grid and
    split into a signed high and an unsigned low byte, exact integer sums, one float32 formula."""
    xf = x.float()
    top = xf.abs().amax(1, keepdim=True)
    step = torch.where(top > 0, top / 32767, torch.zeros_like(top))
    inv = torch.where(top > 0, torch.full_like(top, 32767) / top, torch.zeros_like(top))  # (not 32767 / top: a reciprocal)
    x16 = torch.round(xf * inv).long()
    hi, lo = torch.div(x16, 256, rounding_mode="floor"), x16 % 256
    w = q.weight.long()
    sums_hi, sums_lo = (hi @ w.T).float(), (lo @ w.T).float()
    return (q.weight_scale.float()[None] * step) * (256 * sums_hi + sums_lo)


@pytest.mark.skipif(not cpu_kernels.amx_int8_tiles(64), reason="no AMX-INT8 on this CPU")
@pytest.mark.parametrize("n,k", [(70, 256), (33, 1088), (31, 64), (96, 4096)])
def test_amx_int8_tiles_are_exact_integer_sums(n, k):
    """int8 weights through the int8 tiles: bit for bit the integer reference above for 1 to 130 rows
    (one row, a partial tile of x, several 64-row chunks; n past the 32-row blocks), within the x
    rounding bound of a float64 product; an all-zero row and a row with one huge value included;
    the module sends bf16 x of 2 or more rows there (one row: the one-row kernel, a finer x grid)."""
    _, q = _quantized_linear("int8", n, k, dtype=torch.bfloat16, seed=n + k)
    w = q.weight.double() * q.weight_scale.double()[:, None]
    gen = torch.Generator().manual_seed(k)
    for rows in (1, 2, 15, 17, 64, 65, 130):
        x = torch.randn(rows, k, generator=gen).bfloat16()
        if rows > 2:
            x[1] = 0
            x[2, k // 3] = 3e4
        out = q._amx_product(x)
        assert out is not None and out.shape == (rows, n) and out.dtype == torch.float32
        assert torch.equal(out, _int8_tiles_reference(x, q)), rows
        ref = x.double() @ w.T
        bound = _int8_tiles_bound(q, x) + 1e-6 * (x.double().abs() @ w.abs().T) + 1e-30
        assert ((out.double() - ref).abs() <= bound).all(), rows
        with torch.no_grad():  # the module sends 2 or more rows there, one row to the one-row kernel
            assert q._use_amx(x) == (rows >= cpu_kernels.AMX_INT8_MIN_ROWS)
            if rows >= cpu_kernels.AMX_INT8_MIN_ROWS:
                assert torch.equal(q(x), out.bfloat16()), rows
    assert not cpu_kernels.amx_int8_tiles(k + 32) and not cpu_kernels.amx_int8_tiles(2**17)


@pytest.mark.skipif(not cpu_kernels.amx_int4_tiles(32, 64), reason="no AMX-INT8 on this CPU")
@pytest.mark.parametrize("n,k,group", [(64, 256, 64), (96, 1056, 128), (32, 4096, 128), (64, 512, 256), (32, 192, 64),
                                        (224, 512, 128)])
def test_amx_int4_tiles_round_x_as_the_small_row_kernels(n, k, group):
    """int4 weights through the int8 tiles, group by group: within the x rounding bound of a float64
    product over the dequantized weight (k past the last group included), equal up to float summation
    order to the small-row kernel that rounds x the same way (int8 per group); the module sends bf16 x
    of 2 rows or more there (several chunks of 64 rows), one row to the one-row kernel. n = 96 and 224:
    blocks of 32 rows two apart in 64-row work items, then a block of 32 consecutive rows."""
    _, q = _quantized_linear("int4", n, k, group_size=group, dtype=torch.bfloat16, seed=n + k)
    w = q.dequantize(torch.float64)
    gen = torch.Generator().manual_seed(k)
    for rows in (2, 15, 17, 32, 64, 65, 130):
        x = torch.randn(rows, k, generator=gen).bfloat16()
        x[1] = 0
        out = q._amx_product(x)
        assert out is not None and out.shape == (rows, n) and out.dtype == torch.float32
        ref = x.double() @ w.T
        scale = x.double().abs() @ w.abs().T
        assert ((out.double() - ref).abs() <= _x_rounding_bound(q, x) + 1e-6 * scale + 1e-30).all(), rows
        small = torch.cat([cpu_kernels.small_gemm(x[i:i + cpu_kernels.MAX_QUANT_ROWS], "int4", q.weight_packed,
                                                  q.weight_scale, q.weight_offset, group_size=group)
                           for i in range(0, rows, cpu_kernels.MAX_QUANT_ROWS)])
        assert ((out.double() - small.double()).abs() <= 1e-5 * scale + 1e-30).all(), rows
        with torch.no_grad():
            assert q._use_amx(x) and torch.equal(q(x), out.bfloat16()), rows
    assert not q._use_amx(torch.randn(1, k).bfloat16())
    assert not cpu_kernels.amx_int4_tiles(n + 16, group) and not cpu_kernels.amx_int4_tiles(n, 32)


@needs_kernels
@pytest.mark.parametrize("mode", ["int8", "int4"])
def test_quantized_linears_compile_into_one_graph(mode):
    """Under torch.compile the kernels are opaque custom ops and the routing reads no file: a quantized
    linear and a DecodeLinear trace with fullgraph=True and give the eager bits (1 and 3 rows)."""
    from mllama.linear import DecodeLinear

    _, q = _quantized_linear(mode, 48, 256, group_size=128, dtype=torch.bfloat16, bias=True, seed=11)
    d = DecodeLinear.from_linear(torch.nn.Linear(48, 32, bias=False).to(torch.bfloat16))

    def stack(x):
        return d(q(x))

    with torch.no_grad():
        for rows in (1, 3):
            x = torch.randn(1, rows, 256).to(torch.bfloat16)
            torch._dynamo.reset()
            assert torch.equal(torch.compile(stack, fullgraph=True)(x), stack(x)), f"{rows} rows"


@needs_kernels
@pytest.mark.parametrize("mode,group", [("int8", 0), ("int4", 32), ("int4", 64), ("int4", 128), ("int4", 256)])
@pytest.mark.parametrize("n,k", [(7, 33), (29, 100), (300, 1030), (24, 4096)])
@pytest.mark.parametrize("scale_dtype", [torch.float32, torch.bfloat16])
def test_one_bf16_row_is_small_gemm_rounded_to_bf16(mode, group, n, k, scale_dtype):
    """A decode step's call (one bf16 row: cpu_kernels.small_gemm_row, the conversions in C) gives the
    bits of the route it bypasses (small_gemm, then torch's .to(bfloat16)), on every instruction
    path, for 1-, 2- and 3-D rows, with infinities and NaNs in x (NaNs where torch has them)."""
    _, q = _quantized_linear(mode, n, k, group_size=group or 64, dtype=scale_dtype, seed=n + k)
    weights = q._weights()
    gen = torch.Generator().manual_seed(k)
    rows = [torch.randn(k, generator=gen).bfloat16() * 10 for _ in range(3)]
    rows[1][k // 2] = float("inf")
    rows[2][k // 3] = float("nan")
    for level in sorted({1, cpu_kernels.small_kernel_level()}):
        for x in rows:
            want = cpu_kernels.small_gemm(x[None], mode, *weights, group_size=group, level=level).to(torch.bfloat16)
            got = cpu_kernels.small_gemm_row(x, mode, *weights, group_size=group, level=level)
            assert got.shape == (n,) and got.dtype == torch.bfloat16
            nan = want[0].isnan()  # torch's own NaN bits differ between its loops; a NaN stays a NaN
            assert torch.equal(got.isnan(), nan)
            assert torch.equal(got[~nan].view(torch.int16), want[0][~nan].view(torch.int16))
    with torch.no_grad():
        for shape in [(k,), (1, k), (1, 1, k)]:
            x = rows[0].reshape(shape)
            out = q(x)
            assert out.shape == (*shape[:-1], n)
            assert torch.equal(out.view(torch.int16), q.product(x).view(torch.int16))


@needs_kernels
def test_one_bf16_row_takes_the_kernel_call_only_where_product_would(monkeypatch):
    _, q = _quantized_linear("int4", 40, 96, dtype=torch.bfloat16)
    calls = []
    row = cpu_kernels.small_gemm_row
    monkeypatch.setattr(cpu_kernels, "small_gemm_row", lambda *a, **k: calls.append(1) or row(*a, **k))
    x = torch.randn(1, 96).bfloat16()
    with torch.no_grad():
        q(x)
        assert calls == [1]
        q(torch.randn(96, 2).bfloat16().t()[:1])  # not contiguous
        q(x.float())
        q(torch.randn(2, 96).bfloat16())
    q(x.clone().requires_grad_())  # autograd: the dequantized weight through F.linear
    assert calls == [1]
    for rows, dtype in [(1, torch.bfloat16), (3, torch.float32), (40, torch.bfloat16)]:
        with pytest.raises(ValueError, match="input of 64 features, the weight takes 96"):
            q(torch.randn(rows, 64, dtype=dtype))  # the int4 kernels would have padded it with zeros
