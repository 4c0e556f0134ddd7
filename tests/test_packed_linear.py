"""bf16 weights packed once for oneDNN (mllama.packed_linear): the bits of F.linear, every row of a
batch as alone, state dicts and checkpoints unchanged, the fallbacks and the errors; a packed model in
the engine equals each request alone; the CLI packs by default."""

from __future__ import annotations

import copy
import random

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from mllama.engine import Engine
from mllama.linear import DecodeLinear, apply_cpu_kernels
from mllama.packed_linear import PackedLinear, pack_linears, packing_available, unpack_linears
from tiny import hf_pair

pytestmark = pytest.mark.skipif(not packing_available(), reason="needs oneDNN and a CPU with native bf16")


def _linear(n: int, k: int, *, bias: bool, seed: int = 0) -> nn.Linear:
    gen = torch.Generator().manual_seed(seed)
    linear = nn.Linear(k, n, bias=bias)
    with torch.no_grad():
        linear.weight.copy_(torch.randn(n, k, generator=gen))
        if bias:
            linear.bias.copy_(torch.randn(n, generator=gen))
    return linear.bfloat16()


@pytest.mark.parametrize("n,k,bias", [(77, 130, True), (256, 4096, False), (40, 96, True)])
def test_products_equal_f_linear_and_each_row_alone(n, k, bias):
    linear = _linear(n, k, bias=bias)
    packed = PackedLinear.from_linear(linear)
    x = torch.randn(40, k, generator=torch.Generator().manual_seed(1)).bfloat16()
    with torch.no_grad():
        batch = packed(x)
        assert batch.dtype == torch.bfloat16 and batch.shape == (40, n)
        assert torch.equal(batch, F.linear(x, linear.weight, linear.bias))
        for rows in (1, 2, 3, 17, 33):
            assert torch.equal(packed(x[:rows]), batch[:rows])
        for i in range(40):  # one row alone: the bits it has in any batch
            assert torch.equal(packed(x[i:i + 1]), batch[i:i + 1])
        assert torch.equal(packed(x.view(4, 10, k)), batch.view(4, 10, n))
        assert torch.equal(packed.product(x), F.linear(x, linear.weight))


def test_fallbacks_float32_and_gradients():
    linear = _linear(24, 40, bias=True)
    packed = PackedLinear.from_linear(linear)
    x = torch.randn(5, 40)
    with torch.no_grad():
        assert torch.equal(packed(x), F.linear(x, linear.weight.float(), linear.bias.float()))
    xb = x.bfloat16().requires_grad_()
    packed(xb).float().sum().backward()
    xr = x.bfloat16().requires_grad_()
    F.linear(xr, linear.weight.detach(), linear.bias.detach()).float().sum().backward()
    assert torch.equal(xb.grad, xr.grad)


def test_state_dict_weight_property_and_loading():
    linear = _linear(33, 64, bias=True)
    packed = PackedLinear.from_linear(linear)
    state = packed.state_dict()
    assert set(state) == {"weight", "bias"} and torch.equal(state["weight"], linear.weight)
    assert torch.equal(packed.weight, linear.weight)
    other = _linear(33, 64, bias=True, seed=5)
    packed.load_state_dict(other.state_dict())
    x = torch.randn(3, 64).bfloat16()
    with torch.no_grad():
        assert torch.equal(packed(x), F.linear(x, other.weight, other.bias))
    with pytest.raises(RuntimeError, match="Missing key.*weight"):
        packed.load_state_dict({"bias": other.bias})
    with pytest.raises(RuntimeError, match="size mismatch for weight"):
        packed.load_state_dict({"weight": torch.zeros(32, 64, dtype=torch.bfloat16), "bias": other.bias})
    clone = copy.deepcopy(packed)
    assert torch.equal(clone.weight, packed.weight) and clone.packed is not packed.packed


def test_pack_unpack_and_moves():
    model = nn.Sequential(_linear(16, 8, bias=True), nn.ReLU(), _linear(4, 16, bias=False), nn.Linear(4, 2))
    reference = copy.deepcopy(model)
    assert pack_linears(model) == ["0", "2"]  # the float32 linear stays
    assert isinstance(model[0], PackedLinear) and type(model[3]) is nn.Linear
    x = torch.randn(3, 8).bfloat16()
    with torch.no_grad():
        assert torch.equal(model[:3](x), reference[:3](x))
    model.to(torch.bfloat16)  # nothing to change: fine
    model.cpu()
    with pytest.raises(RuntimeError, match="unpack_linears"):
        model.to(torch.float32)
    assert unpack_linears(model) == ["0", "2"]
    assert type(model[0]) is DecodeLinear and torch.equal(model[0].weight, reference[0].weight)
    model.to(torch.float32)  # now it can


def test_packed_model_in_the_engine_equals_each_request_alone_and_saves_unchanged(tmp_path):
    from test_engine import _mixed_requests, _run_schedule

    oracle, plain = hf_pair("a", seed=31)  # transformers in float32
    plain = apply_cpu_kernels(plain.bfloat16())
    model = copy.deepcopy(plain)
    names = pack_linears(model)
    assert any(n.startswith("model.vision_model") for n in names) and "lm_head" in names
    assert not any(type(m) in (nn.Linear, DecodeLinear) for m in model.modules())
    rng = random.Random(7)
    requests = _mixed_requests("a", rng)
    schedule = [(rng.randint(0, 12), r) for r in requests]
    engine = Engine(model, max_slots=3, max_len=64, prefill_chunk=3)
    handles = _run_schedule(engine, schedule)
    by_request = {id(r): h for (_, r), h in zip(sorted(schedule, key=lambda x: x[0]), handles)}
    for request in requests:
        events = list(by_request[id(request)])
        alone = list(Engine(model, max_slots=1, max_len=64, prefill_chunk=1000).submit(request))
        assert [e.token for e in events] == [e.token for e in alone]
        assert torch.equal(torch.stack([e.logits for e in events]), torch.stack([e.logits for e in alone]))
    # against float32 transformers: no further from it than the plain bf16 layout (other kernels' rounding)
    ids = requests[0].input_ids[None]
    with torch.no_grad():
        ref = oracle(ids).logits.float()
        packed_error = (model(ids).logits.float() - ref).abs().max() / ref.abs().max()
        plain_error = (plain(ids).logits.float() - ref).abs().max() / ref.abs().max()
    assert 0 < packed_error <= 1.25 * plain_error + 1e-3
    model.save_pretrained(tmp_path)
    from mllama import MllamaForConditionalGeneration

    loaded = MllamaForConditionalGeneration.from_pretrained(tmp_path, dtype=torch.bfloat16)
    saved = loaded.state_dict()
    for name, tensor in plain.state_dict().items():
        assert torch.equal(saved[name], tensor), name


def test_cli_packs_bf16_weights_unless_told_not_to(tmp_path):
    """serve packs every bf16 linear; generate and chat the vision tower's and the projector (image
    rows), not the text decoder's (one row a step: the plain layout's decode kernel); --no-pack and
    --compile none."""
    import shutil

    from mllama import MllamaForConditionalGeneration, cli

    directory = tmp_path / "demo-bf16"
    shutil.copytree(cli.default_model_dir(), directory)
    MllamaForConditionalGeneration.from_pretrained(directory, dtype=torch.bfloat16).save_pretrained(directory)

    def packed(command: str, *flags: str) -> set[str]:
        words = [command, "--model", str(directory), *flags] + (["hi"] if command == "generate" else [])
        args = cli.build_parser().parse_args(words)
        model = cli._load(args.model, args.dtype, pack=cli._packs(args))[0]
        return {name for name, m in model.named_modules() if isinstance(m, PackedLinear)}

    linears = {name for name, m in MllamaForConditionalGeneration.from_pretrained(directory).named_modules()
               if isinstance(m, nn.Linear)}
    vision = {name for name in linears if name.startswith(("model.vision_model.", "model.multi_modal_projector"))}
    assert "model.multi_modal_projector" in vision and len(vision) < len(linears)
    assert packed("serve") == linears
    assert packed("generate") == vision
    assert packed("chat") == vision
    for flag in ("--no-pack", "--compile"):
        assert packed("generate", flag) == set()
        assert packed("serve", flag) == set()
    with pytest.raises(ValueError, match="pack must be"):
        cli._load(str(directory), "auto", pack=True)


def test_packing_that_would_not_fit_in_memory_is_refused(monkeypatch, tmp_path, capsys):
    import shutil

    import mllama.packed_linear as packed_linear
    from mllama import MllamaForConditionalGeneration, cli

    model = nn.Sequential(_linear(64, 32, bias=False), _linear(8, 64, bias=False))  # 2048 + 512 weights: 5120 bytes
    monkeypatch.setattr(packed_linear, "memory_for_packing", lambda: 5119)
    with pytest.raises(MemoryError, match="packing 0.0 GiB of bf16 weights"):
        pack_linears(model)
    assert all(type(m) is nn.Linear for m in model)  # nothing packed
    monkeypatch.setattr(packed_linear, "memory_for_packing", lambda: 5120)
    assert pack_linears(model) == ["0", "1"]
    directory = tmp_path / "demo-bf16"
    shutil.copytree(cli.default_model_dir(), directory)
    MllamaForConditionalGeneration.from_pretrained(directory, dtype=torch.bfloat16).save_pretrained(directory)
    monkeypatch.setattr(packed_linear, "memory_for_packing", lambda: 0)
    loaded, _ = cli._load(str(directory), "auto", pack="all")  # the CLI goes on with the plain layout
    assert not any(isinstance(m, PackedLinear) for m in loaded.modules())
    assert "bf16 weights left unpacked" in capsys.readouterr().err


def test_transforms_that_need_plain_linears_refuse_packed_ones():
    from mllama.lora import apply_lora
    from mllama.quantize import quantize_model
    from mllama.tp import tensor_parallel

    _, model = hf_pair("b", seed=3)
    pack_linears(model.bfloat16())
    for transform, name in ((lambda m: quantize_model(m, "int8"), "quantize_model"), (apply_lora, "apply_lora"),
                            (tensor_parallel, "tensor_parallel")):
        with pytest.raises(ValueError, match=f"{name} needs plain linears.*unpack_linears"):
            transform(model)
    unpack_linears(model)
    quantize_model(model, "int8")  # then it can


def test_served_packed_model_answers_concurrent_requests_as_alone(tmp_path):
    """`mllama serve` packs a bf16 model by default: concurrent chat requests (images encoded in the
    vision thread beside the decode steps, both through oneDNN) equal each request sent alone."""
    import shutil
    from concurrent.futures import ThreadPoolExecutor

    pytest.importorskip("openai")
    pytest.importorskip("uvicorn")
    from mllama import MllamaForConditionalGeneration, cli
    from test_server import Server, _ask, _shape_uri

    directory = tmp_path / "demo-bf16"
    shutil.copytree(cli.default_model_dir(), directory)
    MllamaForConditionalGeneration.from_pretrained(directory, dtype=torch.bfloat16).save_pretrained(directory)
    server = Server("--model", str(directory), "--served-model-name", "m", "--max-slots", "4")
    try:
        client = server.client(None)
        messages = [_ask(_shape_uri("circle", "red", 3)), [{"role": "user", "content": "Tell me a story."}],
                    _ask(_shape_uri("square", "blue", 4)), [{"role": "user", "content": "What do you see?"}]]

        def ask(m):
            return client.chat.completions.create(model="m", messages=m, temperature=0,
                                                  max_tokens=12).choices[0].message.content

        alone = [ask(m) for m in messages]
        with ThreadPoolExecutor(4) as pool:
            together = list(pool.map(ask, messages))
        assert together == alone
        assert "circle" in alone[0] and "square" in alone[2]
    finally:
        server.stop()
