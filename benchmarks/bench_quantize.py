"""Weight-only int8 / int4 (mllama.quantize): accuracy against bf16 and decode speed. Figures go to
benchmarks/RESULTS.md by hand (the machine is shared; ratios measured in one run, interleaved).

  python benchmarks/bench_quantize.py accuracy   # demo model: logit drift, answers changed, accuracy
  python benchmarks/bench_quantize.py kernels    # one linear: Gweights/s of each kernel, 1/4/16 rows
  python benchmarks/bench_quantize.py decode     # bench-shaped text decoder: tokens/s bf16 vs int8 / int4
"""

from __future__ import annotations

import argparse
import copy
import math
import statistics
import time

import torch
import torch.nn.functional as F

from mllama import cpu_kernels, quant_ops
from mllama.cli import default_model_dir
from mllama.quantize import QuantizationConfig, quantize_int4, quantize_int8, quantize_model

from bench_phases import read_rates

VARIANTS = {"int8": QuantizationConfig("int8"), "int4 g32": QuantizationConfig("int4", group_size=32),
            "int4 g64": QuantizationConfig("int4", group_size=64),
            "int4 g128": QuantizationConfig("int4", group_size=128),
            # the same, its int4 weights kept row-major (from_pretrained packs them in blocks of 32 rows)
            "int4 g128 row-major": QuantizationConfig("int4", group_size=128),
            "int4 g64, vision and lm_head too": QuantizationConfig("int4", group_size=64, vision=True, lm_head=True),
            "int4 g128, vision and lm_head too": QuantizationConfig("int4", group_size=128, vision=True, lm_head=True),
            "bf16 again": None,  # a second bf16 load, which should change nothing
            "float32": "float32"}  # the precision floor: the same weights in float32 (no quantization)


def accuracy(n_images: int, seed: int, variants: list[str], batch_size: int) -> None:
    from mllama.demo.recipe import eval_batches, score
    from mllama.demo.shapes import make_samples, parse_answer
    from mllama.int4_rows import unpack_int4_rows
    from mllama.model import MllamaForConditionalGeneration
    from mllama.processor import MllamaProcessor
    from mllama.train import generation_config_for

    directory = default_model_dir()
    processor = MllamaProcessor.from_pretrained(directory)
    samples = make_samples(n_images, seed=seed)
    batches = eval_batches(processor, samples, batch_size=batch_size)
    stops = generation_config_for(processor.tokenizer)["eos_token_id"]
    base = MllamaForConditionalGeneration.from_pretrained(directory, dtype=torch.bfloat16)

    def run(model):
        logits, answers, tokens, steps = [], [], [], []
        with torch.no_grad():
            for batch in batches:
                keys = ("attention_mask", "pixel_values", "aspect_ratio_ids", "aspect_ratio_mask", "cross_attention_mask")
                logits.append(model(batch["input_ids"], **{k: batch[k] for k in keys}).logits[:, -1].float())
                out = model.generate(batch["input_ids"], **{k: batch[k] for k in keys}, max_new_tokens=12,
                                     do_sample=False, repetition_penalty=1.0, eos_token_id=stops, pad_token_id=stops[0],
                                     output_logits=True)
                step_logits = torch.stack(out.logits, 1)  # (B, new tokens, V), as the model returned them
                for row, row_logits in zip(out.sequences[:, batch["input_ids"].shape[1]:].tolist(), step_logits):
                    end = next((i for i, t in enumerate(row) if t in stops), len(row))
                    answers.append(processor.tokenizer.decode(row[:end], skip_special_tokens=True))
                    tokens.append(row[:end + 1])  # the stop token is a choice too
                    steps.append(row_logits[:end + 1])
        return torch.cat(logits), answers, tokens, steps

    ref_logits, ref_answers, ref_tokens, ref_steps = run(base)
    print(f"bf16: accuracy (shape and colour) {score(ref_answers, samples).both:.1%} on {n_images} images (seed {seed})")
    for name in variants:
        config = VARIANTS[name]
        if config == "float32":
            model = MllamaForConditionalGeneration.from_pretrained(directory, dtype=torch.float32)
        else:
            model = MllamaForConditionalGeneration.from_pretrained(directory, dtype=torch.bfloat16, quantization=config)
            if name.endswith("row-major"):
                unpack_int4_rows(model)
        logits, answers, tokens, _ = run(model)
        drift = ((logits - ref_logits).abs().max() / ref_logits.abs().max()).item()
        kl = F.kl_div(logits.log_softmax(-1), ref_logits.log_softmax(-1), log_target=True, reduction="batchmean")
        changed = sum(a != b for a, b in zip(answers, ref_answers)) / n_images
        # The demo was trained on three phrasings of each answer, picked at random ("A red square." /
        # "... on a light background." / "I see ..."), so which phrasing greedy decoding takes is a
        # tie that any perturbation of the numbers can flip (float32 against bf16 flips several %):
        # "content changed" counts the answers whose shape or colour changed.
        content = sum(parse_answer(a) != parse_answer(b) for a, b in zip(answers, ref_answers)) / n_images
        ties = sum(at_bf16_tie(r, s, t) for r, s, t in zip(ref_tokens, ref_steps, tokens) if r != t) / n_images
        print(f"{name}: max|d|/max|logit| {drift:.4f}, mean KL(bf16 || q) {kl.item():.2e}, answers changed "
              f"{changed:.1%} (content changed {content:.1%}; at a bf16 tie {ties:.1%}, elsewhere {changed - ties:.1%}), "
              f"accuracy {score(answers, samples).both:.1%}", flush=True)


def bf16_spacing(value: float) -> float:
    """The gap between `value` and the next bf16 of larger magnitude (8 significant bits)."""
    return 2.0 ** (math.floor(math.log2(abs(value))) - 7) if value else 2.0 ** -133


def at_bf16_tie(ref_tokens: list[int], ref_logits: torch.Tensor, tokens: list[int]) -> bool:
    """Whether a changed answer left bf16's at a step where bf16 itself hardly chose: the token it took there
    has a bf16 logit at most one bf16 step above the token the variant took (equal logits go to the lower
    id). The demo was trained on several phrasings of each answer, so its greedy answers pass such ties."""
    step = next((i for i, (a, b) in enumerate(zip(ref_tokens, tokens)) if a != b), None)
    if step is None:
        return False  # one answer is a prefix of the other, cut at max_new_tokens: not counted as a tie
    chosen, other = ref_logits[step, ref_tokens[step]].item(), ref_logits[step, tokens[step]].item()
    return chosen - other <= bf16_spacing(chosen)


def _best(fn, reps: int) -> float:
    fn()
    best = float("inf")
    for _ in range(3):
        start = time.perf_counter()
        for _ in range(reps):
            fn()
        best = min(best, (time.perf_counter() - start) / reps)
    return best


def kernels(n: int, k: int, rounds: int) -> None:
    gen = torch.Generator().manual_seed(0)
    w = (torch.randn(n, k, generator=gen) * 0.02).bfloat16()
    q8, q4 = quantize_int8(w), quantize_int4(w, group_size=64)
    torch_int4 = torch.ops.aten._convert_weight_to_int4pack_for_cpu(torch.randint(0, 16, (n, k), dtype=torch.int32), 2)
    scales_zeros = torch.rand(k // 64, n, 2).bfloat16()
    print(f"weight {n} x {k}, {torch.get_num_threads()} threads; G weights/s (best of 3 x reps), {rounds} rounds interleaved")
    for rows in (1, 4, 16):
        x = torch.randn(rows, k, generator=gen).bfloat16()
        cases = {
            "bf16 F.linear": lambda: F.linear(x, w),
            "bf16 kernel": lambda: cpu_kernels.gemv_bf16(x, w),
            "int8 ours": lambda: quant_ops.linear_int8(x, q8["weight"], q8["weight_scale"]),
            "int8 small-row kernel": lambda: cpu_kernels.small_gemm(x, "int8", q8["weight"], q8["weight_scale"]),
            "int8 torch": lambda: torch.ops.aten._weight_int8pack_mm(x, q8["weight"], q8["weight_scale"]),
            "int4 ours": lambda: quant_ops.linear_int4(x, q4["weight_packed"], q4["weight_scale"],
                                                         q4["weight_offset"], 64),
            "int4 torch": lambda: torch.ops.aten._weight_int4pack_mm_for_cpu(x, torch_int4, 64, scales_zeros),
        }
        rates = {name: [] for name in cases}
        for _ in range(rounds):
            for name, fn in cases.items():
                rates[name].append(n * k / _best(fn, 5) / 1e9)
        base = max(rates["bf16 kernel"])
        print(f"  {rows:2d} rows: " + ", ".join(f"{name} {max(r):.2f} ({max(r) / base:.2f}x)" for name, r in rates.items()),
              flush=True)


def decode_step_modules(model, prompt: torch.Tensor) -> list[torch.nn.Module]:
    """The leaf modules that one decode step calls, in order, but the embedding (a text-only prompt
    skips the cross-attention layers)."""
    order: list[torch.nn.Module] = []
    embed = model.get_input_embeddings()
    hooks = [module.register_forward_hook(lambda mod, args, out: order.append(mod))
             for module in model.modules() if not list(module.children()) and module is not embed]
    hooks.append(embed.register_forward_pre_hook(lambda mod, args: order.clear()))  # each forward starts there
    model.generate(prompt, max_new_tokens=2, eos_token_id=[], pad_token_id=0)  # the prompt, then one decode step
    for hook in hooks:
        hook.remove()
    return list(order)


def _tensors(module: torch.nn.Module) -> list[torch.Tensor]:
    return [*module.parameters(recurse=False), *module.buffers(recurse=False)]


def weight_matrices(modules: list[torch.nn.Module]) -> list[torch.nn.Module]:
    """Those of `modules` that hold a weight matrix (the linears, quantized or not), in order."""
    return [m for m in modules if any(t.dim() == 2 for t in _tensors(m))]


def linears_alone(modules: list[torch.nn.Module], rounds: int) -> float:
    """Seconds for one pass over a decode step's linears called back to back through their modules
    (one bf16 row each, no other work between them): the best of `rounds` passes."""
    xs = [torch.randn(1, 1, m.in_features, dtype=torch.bfloat16) for m in modules]
    best = float("inf")
    with torch.inference_mode():
        for _ in range(rounds):
            start = time.perf_counter()
            for module, x in zip(modules, xs):
                module(x)
            best = min(best, time.perf_counter() - start)
    return best


def decode_step_bytes(model, modules: list[torch.nn.Module]) -> int:
    """Bytes of the weights (and scales) that one decode step reads: every module that runs in it
    (`decode_step_modules`) and one embedding row."""
    called = {id(m): m for m in modules}
    tensors = [t for module in called.values() for t in _tensors(module)]
    embed = model.get_input_embeddings()
    return sum(t.numel() * t.element_size() for t in tensors if t.dim() >= 1) + embed.weight[0].numel() * embed.weight.element_size()


def sustained_read(nbytes: int, buffer: torch.Tensor) -> float:
    """GB/s of torch's float32 sum over `buffer` for about `nbytes` (whole passes, at least one): the
    machine's read rate over about as long as a decode that streams `nbytes` (on a shared machine the
    rate moves within seconds, and the best 1 GiB read of a round can come from a moment no decode saw)."""
    size = buffer.numel() * buffer.element_size()
    passes = max(1, round(nbytes / size))
    start = time.perf_counter()
    for _ in range(passes):
        buffer.sum()
    return passes * size / (time.perf_counter() - start) / 1e9


class ReadsBetweenTokens:
    """A streamer that reads `nbytes` of `buffer` (torch's float32 sum, whole passes then a part) after
    each token: the decode steps' times (from the end of one read to the next token) and the reads'
    times, pair by pair, a few milliseconds apart (the machine's rate moves within seconds)."""

    def __init__(self, nbytes: int, buffer: torch.Tensor) -> None:
        self.values, self.buffer = nbytes // 4, buffer
        self.steps: list[float] = []
        self.reads: list[float] = []
        self.last: float | None = None

    def put(self, value: torch.Tensor) -> None:
        now = time.perf_counter()
        if self.last is not None:
            self.steps.append(now - self.last)
        left = self.values
        while left > 0:
            self.buffer[:min(left, self.buffer.numel())].sum()
            left -= self.buffer.numel()
        self.last = time.perf_counter()
        self.reads.append(self.last - now)

    def end(self) -> None:
        pass

    def ratio(self) -> float:
        """The median over the decode steps of the read right after a step over the step's time (the first
        token's step, the prompt's, excluded): the decode's rate as a share of the reads'."""
        return statistics.median(read / step for read, step in zip(self.reads[2:], self.steps[1:]))


DECODE_VARIANTS = {"int8": QuantizationConfig("int8"), "int4 g64": QuantizationConfig("int4", group_size=64),
                   "int4 g128": QuantizationConfig("int4", group_size=128),
                   "int8 + lm_head": QuantizationConfig("int8", lm_head=True),
                   "int4 g64 + lm_head": QuantizationConfig("int4", group_size=64, lm_head=True),
                   "int4 g128 + lm_head": QuantizationConfig("int4", group_size=128, lm_head=True),
                   # the same weights in blocks of 32 rows (mllama.int4_rows.pack_int4_rows)
                   "int4 g128 + lm_head, rows of 32": QuantizationConfig("int4", group_size=128, lm_head=True)}


def decode_bench(layers: int, new_tokens: int, rounds: int, prompt_tokens: list[int], streams: int,
                 variants: list[str]) -> None:
    from mllama.config import MllamaTextConfig
    from mllama.int4_rows import pack_int4_rows
    from mllama.linear import apply_cpu_kernels
    from mllama.model import MllamaForCausalLM
    from mllama.weights import _rebuild_buffers

    config = MllamaTextConfig.from_dict({
        "hidden_size": 4096, "num_attention_heads": 32, "num_key_value_heads": 8, "intermediate_size": 14336,
        "num_hidden_layers": layers, "cross_attention_layers": [1], "vocab_size": 128256, "rope_theta": 500000.0,
        "bos_token_id": 128000, "eos_token_id": None, "pad_token_id": 128004})
    with torch.device("meta"):
        base = MllamaForCausalLM(config)
    gen = torch.Generator().manual_seed(0)
    state = {name: (torch.randn(t.shape, generator=gen) * 0.02).bfloat16() for name, t in base.state_dict().items()}
    base.load_state_dict(state, assign=True)
    del state
    _rebuild_buffers(base, torch.device("cpu"))  # rope's inv_freq is not in the state dict
    base = apply_cpu_kernels(base.eval())
    models = {"bf16": base}
    for name in variants:
        config_ = DECODE_VARIANTS[name]
        shared = {id(p): p for p in (base.model.embed_tokens.weight, base.lm_head.weight)}  # not copied
        models[name] = quantize_model(copy.deepcopy(base, shared), config_)
        if name.endswith("rows of 32"):
            pack_int4_rows(models[name])
    prompt = torch.randint(0, 128000, (1, 16), generator=gen)
    batch = torch.randint(0, 128000, (streams, 16), generator=gen)
    rates = {name: [] for name in models}
    batch_rates = {name: [] for name in models}
    ttfts = {(name, n): [] for name in models for n in prompt_tokens}

    def decode_rate(ids: torch.Tensor, model) -> float:  # new tokens per second after the prompt
        start = time.perf_counter()
        model.generate(ids, max_new_tokens=1, eos_token_id=[], pad_token_id=0)
        first = time.perf_counter() - start
        start = time.perf_counter()
        model.generate(ids, max_new_tokens=new_tokens + 1, eos_token_id=[], pad_token_id=0)
        return ids.shape[0] * new_tokens / (time.perf_counter() - start - first)

    # the step apart: its linears alone, back to back, right after each step rate (the rest of the
    # step: attention, norms, the cache, sampling, Python); the read limit once a round (the machine drifts)
    step_modules = {name: decode_step_modules(model, prompt) for name, model in models.items()}
    step_linears = {name: weight_matrices(modules) for name, modules in step_modules.items()}
    alone = {name: [] for name in models}
    limits = []
    step_bytes = {name: decode_step_bytes(model, step_modules[name]) for name, model in models.items()}
    buffer = torch.ones(2**30 // 4)
    beside = {name: [] for name in models}  # GB/s of reads of the decode's bytes right before and after it
    between = {name: [] for name in models}  # ReadsBetweenTokens.ratio of a decode
    for _ in range(rounds):
        limits.append(max(read_rates(2).values()))  # GB/s
        for name, model in models.items():
            before = sustained_read(new_tokens * step_bytes[name], buffer)
            rates[name].append(decode_rate(prompt, model))
            beside[name].append((before + sustained_read(new_tokens * step_bytes[name], buffer)) / 2)
            reads = ReadsBetweenTokens(step_bytes[name], buffer)
            model.generate(prompt, max_new_tokens=new_tokens + 1, eos_token_id=[], pad_token_id=0, streamer=reads)
            between[name].append(reads.ratio())
            alone[name].append(linears_alone(step_linears[name], 3))
            if streams > 1:
                batch_rates[name].append(decode_rate(batch, model))
            for n in prompt_tokens:  # a fresh prompt each time: nothing cached
                fresh = torch.randint(0, 128000, (1, n), generator=gen)
                start = time.perf_counter()
                model.generate(fresh, max_new_tokens=1, eos_token_id=[], pad_token_id=0)
                ttfts[name, n].append(time.perf_counter() - start)

    read_limit = max(limits)

    def ratio(values: list[float], base: list[float]) -> str:  # the median of the rounds' own ratios
        return f"{statistics.median(v / b for v, b in zip(values, base)):.2f}x"

    print(f"text decoder {layers} layers (full width, vocab 128256), {new_tokens} tokens, {rounds} interleaved rounds; "
          f"best figure, and the median of each round's ratio to bf16; read limit {read_limit:.1f} GB/s (the fastest "
          f"full read of 1 GiB in any round, benchmarks/bench_phases.py; {min(limits):.1f} in the slowest round); "
          f"reads beside it: torch's float32 sum over the bytes the decode streamed, right before and after it; "
          f"reads between its tokens: a read of a step's bytes after each token (ReadsBetweenTokens), the median "
          f"over the rounds of each decode's median step")
    for name, r in rates.items():
        streamed = max(r) * step_bytes[name] / 1e9
        line = (f"  {name}: {max(r):.2f} tok/s ({ratio(r, rates['bf16'])} bf16; {step_bytes[name] / 1e9:.2f} GB a token, "
                f"{streamed:.1f} GB/s = {streamed / read_limit:.0%} of the read limit; median "
                f"{statistics.median(v * step_bytes[name] / 1e9 / b for v, b in zip(r, beside[name])):.0%} of reads beside it, "
                f"{statistics.median(between[name]):.0%} of reads between its tokens)")
        if streams > 1:
            b = batch_rates[name]
            line += f"; {streams} streams {max(b):.1f} tok/s ({ratio(b, batch_rates['bf16'])})"
        line += "".join(f"; TTFT {n} tokens {min(ttfts[name, n]) * 1e3:.0f} ms ({ratio(ttfts[name, n], ttfts['bf16', n])})"
                        for n in prompt_tokens)
        print(line, flush=True)
    print("  the step apart: its linears alone, back to back through their modules (best pass), and the rest of the "
          "step (the median over the rounds of the step less its linears, each measured right after the other)")
    for name, r in rates.items():
        linears = min(alone[name])
        rest = statistics.median(1 / step_rate - linears_s for step_rate, linears_s in zip(r, alone[name]))
        print(f"    {name}: step {1e3 / max(r):.1f} ms, {len(step_linears[name])} linears alone {linears * 1e3:.1f} ms "
              f"({step_bytes[name] / linears / 1e9:.1f} GB/s = {step_bytes[name] / linears / 1e9 / read_limit:.0%} of the "
              f"read limit), the rest {rest * 1e3:.1f} ms", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("what", choices=["accuracy", "kernels", "decode"])
    parser.add_argument("--images", type=int, default=200)
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS),
                        help="accuracy: the quantized variants to compare with bf16")
    parser.add_argument("--batch-size", type=int, default=100,
                        help="accuracy: images per batch (<= 32: decode steps run the small-row kernels)")
    parser.add_argument("--seed", type=int, default=20261130, help="fresh images (not the training seeds)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--new-tokens", type=int, default=16)
    parser.add_argument("--prompt-tokens", type=int, nargs="*", default=[32, 300],
                        help="decode: also the time to first token of fresh prompts of these lengths")
    parser.add_argument("--streams", type=int, default=16,
                        help="decode: also the tokens/s of this many prompts decoded together (1: not measured)")
    parser.add_argument("--decode-variants", nargs="+", default=list(DECODE_VARIANTS), choices=list(DECODE_VARIANTS),
                        help="decode: the quantized variants beside bf16 (fewer: more rounds in the same minutes)")
    parser.add_argument("--n", type=int, default=14336)
    parser.add_argument("--k", type=int, default=4096)
    args = parser.parse_args()
    if args.what == "accuracy":
        accuracy(args.images, args.seed, args.variants, args.batch_size)
    elif args.what == "kernels":
        kernels(args.n, args.k, args.rounds)
    else:
        decode_bench(args.layers, args.new_tokens, args.rounds, args.prompt_tokens, args.streams, args.decode_variants)


if __name__ == "__main__":
    main()
