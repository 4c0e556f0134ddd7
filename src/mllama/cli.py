"""Command line: `mllama generate` (one answer, streamed), `mllama chat` (interactive) and
`mllama convert-meta` (Meta's original checkpoints to the HF layout), `mllama quantize`
(a checkpoint to int8 or int4 weights), `mllama finetune` (LoRA; mllama.cli_finetune) and
`mllama serve` (the OpenAI-compatible API and chat page; needs the `serve` extra)."""

from __future__ import annotations

import argparse
import os
import sys
from importlib import resources
from pathlib import Path
from typing import Any, Sequence

from mllama.cli_chat import CHAT_HELP, enable_line_editing, read_message
from mllama.cli_finetune import add_finetune_parser, apply_adapter
from mllama.cli_serve import (API_KEY_ENV, add_serve_arguments, check_vision_threads, default_vision_threads,
                              serve_bounds)

DEFAULT_MODEL = "demo"
DEFAULT_GROUP_SIZE = 128  # mllama.quantize.DEFAULT_GROUP_SIZE (not imported: the CLI starts without torch)


def default_model_dir() -> Path:
    return Path(str(resources.files("mllama") / "assets" / "demo-model"))


def example_image() -> Path:
    return Path(str(resources.files("mllama") / "assets" / "example.png"))


class CliError(Exception):
    """A problem with the user's input, reported as one line without a traceback."""


def _load(model: str, dtype: str, quantize: str | None = None, adapter: str | None = None, *,
          pack: str | None = None) -> tuple[Any, Any]:
    """The model and processor at `model`; pack: None, "vision" (the vision tower's linears) or "all"
    bf16 linears packed for oneDNN (mllama.packed_linear; not under tensor parallelism)."""
    if pack not in (None, "vision", "all"):  # before reading any weights
        raise ValueError(f"pack must be None, 'vision' or 'all', got {pack!r}")
    import torch

    from mllama.model import MllamaForConditionalGeneration
    from mllama.processor import MllamaProcessor

    path = default_model_dir() if model == DEFAULT_MODEL else model
    local = Path(path)
    if (local.exists() or str(path).startswith((".", "/", "~"))) and not (local / "config.json").is_file():
        raise CliError(f"{path} is not a model directory (no config.json found)")
    try:
        torch_dtype = {"auto": None, "float32": torch.float32, "bfloat16": torch.bfloat16,
                       "float16": torch.float16}[dtype]
        world = tp_world_size()
        if world > 1 and adapter is not None:
            raise CliError("--adapter cannot be merged into a model split by torchrun; merge it first "
                           "(mllama finetune --merge, or mllama.lora.merge_and_unload) and serve the merged directory")
        if world > 1:  # started by torchrun: every rank loads its slices of the model
            from mllama.tp_load import init_distributed, load_tensor_parallel

            init_distributed()
            model_obj = load_tensor_parallel(MllamaForConditionalGeneration, path, dtype=torch_dtype,
                                             quantization=quantize, world_size=world)
        else:
            model_obj = MllamaForConditionalGeneration.from_pretrained(path, dtype=torch_dtype, quantization=quantize)
        processor = MllamaProcessor.from_pretrained(path)
    except (OSError, ValueError, RuntimeError) as err:
        raise CliError(f"cannot load the model from {path}: {err}") from None
    if adapter is not None:
        apply_adapter(model_obj, adapter, CliError)
    if pack is not None and world == 1:  # bf16 CPU weights in oneDNN's layout; others stay
        from mllama.packed_linear import pack_linears

        try:
            pack_linears(model_obj, where=None if pack == "all" else _in_vision_tower)
        except MemoryError as err:  # the plain layout still works
            print(f"note: bf16 weights left unpacked ({err})", file=sys.stderr)
    return model_obj, processor


def _in_vision_tower(name: str) -> bool:
    return name.startswith(("model.vision_model.", "model.multi_modal_projector"))


def tp_world_size() -> int:
    """The number of ranks torchrun started (WORLD_SIZE), 1 for a plain run."""
    import os

    try:
        return int(os.environ.get("WORLD_SIZE", "1"))
    except ValueError:
        raise CliError(f"WORLD_SIZE={os.environ['WORLD_SIZE']!r} is not a number") from None


def _load_images(paths: Sequence[str]) -> list[Any]:
    from mllama.image_processing import load_image

    images = []
    for path in paths:
        if not path.startswith(("http://", "https://", "data:")) and not Path(path).is_file():
            raise CliError(f"image not found: {path}")
        try:
            images.append(load_image(path))
        except (OSError, ValueError) as err:
            raise CliError(f"cannot read the image {path}: {err}") from None
    return images


def _answer(model: Any, processor: Any, messages: list[dict[str, Any]], images: list[Any], args: argparse.Namespace,
            *, raw_prompt: str | None = None) -> str:
    """Stream one reply to stdout and return its text."""
    from mllama.streamer import TextStreamer

    if raw_prompt is not None:
        text = raw_prompt
    else:
        try:
            text = processor.apply_chat_template(messages, add_generation_prompt=True)
        except ValueError as err:
            raise CliError(str(err)) from None
    try:
        inputs = processor(text=text, images=images or None, return_tensors="pt")
    except (TypeError, ValueError) as err:
        raise CliError(str(err)) from None
    streamer = TextStreamer(processor, skip_prompt=True, skip_special_tokens=True)
    do_sample = args.temperature > 0
    output = model.generate(**inputs, max_new_tokens=args.max_new_tokens, do_sample=do_sample,
                            temperature=args.temperature if do_sample else None,
                            top_p=args.top_p if do_sample else None, seed=args.seed, streamer=streamer,
                            compile=args.compile, fast_vision=args.fast_vision)
    return processor.decode(output[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True)


def _user_message(text: str, n_images: int) -> dict[str, Any]:
    return {"role": "user", "content": [{"type": "image"}] * n_images + [{"type": "text", "text": text}]}


def _packs(args: argparse.Namespace) -> str | None:
    """Which bf16 weights to pack for oneDNN (see _load): none with --no-pack or --compile (torch.compile
    traces the plain linears); `serve` all of them (its steps carry a row per client); `generate` and
    `chat` the vision tower's (whose products take an image's 1601+ rows), while the text decoder, one
    row a step, keeps the plain layout that mllama's decode kernel streams faster (benchmarks/RESULTS.md)."""
    if args.no_pack or args.compile:
        return None
    return "all" if args.command == "serve" else "vision"


def cmd_generate(args: argparse.Namespace) -> None:
    if args.prompt == "-":  # the prompt from stdin: `echo "..." | mllama generate -`
        args.prompt = sys.stdin.read().strip()
        if not args.prompt:
            raise CliError("the prompt read from stdin is empty")
    images = _load_images(args.image or [])
    model, processor = _load(args.model, args.dtype, args.quantize, args.adapter, pack=_packs(args))
    if args.raw:
        prompt = args.prompt
        if images and prompt.count("<|image|>") == 0:
            prompt = "<|image|>" * len(images) + prompt
        _answer(model, processor, [], images, args, raw_prompt=prompt)
    else:
        _answer(model, processor, [_user_message(args.prompt, len(images))], images, args)


def cmd_chat(args: argparse.Namespace) -> None:
    model, processor = _load(args.model, args.dtype, args.quantize, args.adapter, pack=_packs(args))
    images: list[Any] = []
    pending: list[Any] = []
    messages: list[dict[str, Any]] = []
    enable_line_editing()
    print(CHAT_HELP, file=sys.stderr)
    for path in args.image or []:
        pending += _load_images([path])
    while True:
        try:
            line = read_message()
        except EOFError:
            print(file=sys.stderr)
            return
        except KeyboardInterrupt:
            print("\n(use Ctrl-D or /bye to leave)", file=sys.stderr)
            continue
        if not line:
            continue
        if line in ("/quit", "/exit", "/bye"):
            return
        if line in ("/help", "/?"):
            print(CHAT_HELP, file=sys.stderr)
            continue
        if line == "/reset":
            images, pending, messages = [], [], []
            print("(conversation cleared)", file=sys.stderr)
            continue
        if line.startswith("/image"):
            path = line[len("/image"):].strip()
            try:
                pending += _load_images([path]) if path else []
                print(f"(attached {path})" if path else "usage: /image PATH", file=sys.stderr)
            except CliError as err:
                print(f"error: {err}", file=sys.stderr)
            continue
        if line.startswith("/"):
            print(CHAT_HELP, file=sys.stderr)
            continue
        messages.append(_user_message(line, len(pending)))
        images += pending
        pending = []
        sys.stdout.write("assistant> ")
        try:
            reply = _answer(model, processor, messages, images, args)
        except CliError as err:
            messages.pop()
            print(f"error: {err}", file=sys.stderr)
            continue
        except KeyboardInterrupt:  # stops this reply; the conversation goes on without the question
            messages.pop()
            print("\n(stopped)", file=sys.stderr)
            continue
        messages.append({"role": "assistant", "content": [{"type": "text", "text": reply}]})


def cmd_convert_meta(args: argparse.Namespace) -> None:
    from mllama.convert_meta import convert_meta_checkpoint

    try:
        convert_meta_checkpoint(args.input_dir, args.output_dir, instruct=args.instruct, image_size=args.image_size,
                                dtype=None if args.dtype == "auto" else args.dtype,
                                max_shard_size=args.max_shard_size)
    except (OSError, ValueError) as err:
        raise CliError(str(err)) from None


def cmd_quantize(args: argparse.Namespace) -> None:
    """Load IN quantizing while reading (never the whole float model in memory), save the quantized
    tensors and config to OUT, and copy the tokenizer and processor files alongside."""
    import json
    import shutil

    from mllama.model import MllamaForCausalLM, MllamaForConditionalGeneration
    from mllama.quantize import QuantizationConfig

    source, target = Path(args.input_dir), Path(args.output_dir)
    if not (source / "config.json").is_file():
        raise CliError(f"{source} is not a model directory (no config.json found)")
    if target.exists() and (not target.is_dir() or any(target.iterdir())):
        raise CliError(f"{target} exists and is not an empty directory")
    try:
        config = QuantizationConfig(mode=args.mode, group_size=args.group_size, vision=args.vision,
                                    lm_head=args.lm_head)
        text_only = json.loads((source / "config.json").read_text()).get("model_type") == "mllama_text_model"
        cls = MllamaForCausalLM if text_only else MllamaForConditionalGeneration
        model = cls.from_pretrained(source, dtype=None if args.dtype == "auto" else args.dtype,
                                    quantization=config)
        model.save_pretrained(target, max_shard_size=args.max_shard_size)
    except (OSError, ValueError) as err:
        raise CliError(str(err)) from None
    for file in sorted(source.iterdir()):
        weights = file.suffix == ".safetensors" or file.name.endswith(".index.json") or file.name == "config.json"
        if file.is_file() and not weights and not (target / file.name).exists():
            shutil.copy2(file, target / file.name)


def cmd_serve(args: argparse.Namespace) -> None:
    import os

    try:
        from mllama.image_fetch import ImagePolicy
        from mllama.server_run import serve
    except ImportError as err:
        raise CliError(f"mllama serve needs the serve extra: pip install 'mllama[serve]' ({err})") from None
    world = tp_world_size()
    bounds = serve_bounds(args, world=world, error=CliError)
    check_vision_threads(args.vision_threads, error=CliError)  # before a long load
    model, processor = _load(args.model, args.dtype, args.quantize, args.adapter, pack=_packs(args))
    device = next(model.parameters()).device.type
    vision_threads = None if world > 1 else default_vision_threads(args.vision_threads, device=device, error=CliError)
    if world > 1 and int(os.environ.get("RANK", "0")) != 0:
        from mllama.server_run import follow_server

        follow_server(model, processor, max_slots=args.max_slots, max_len=args.max_len, compile=args.compile,
                      fast_vision=args.fast_vision, image_cache_bytes=bounds.image_cache_bytes,
                      prefix_cache_bytes=bounds.prefix_cache_bytes)
        return
    serve(model, processor, host=args.host, port=args.port, max_slots=args.max_slots, max_len=args.max_len,
          model_name=args.served_model_name or ("mllama-demo" if args.model == DEFAULT_MODEL else args.model),
          api_key=args.api_key or os.environ.get(API_KEY_ENV) or None, max_queue=args.max_queue,
          max_body_bytes=args.max_body_bytes,
          images=ImagePolicy(max_bytes=args.max_image_bytes, timeout=args.image_timeout,
                             allow_private=args.allow_private_image_urls),
          shutdown_timeout=args.shutdown_timeout, compile=args.compile, fast_vision=args.fast_vision,
          log_level=args.log_level, tensor_parallel=world > 1, vision_threads=vision_threads,
          image_cache_bytes=bounds.image_cache_bytes, prefix_cache_bytes=bounds.prefix_cache_bytes,
          step_budget_s=bounds.step_budget_s, step_budget_ratio=bounds.step_budget_ratio)


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("mllama")
    except PackageNotFoundError:
        return "unknown (not installed)"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mllama", description="Llama 3.2-Vision: images + text in, text out.")
    parser.add_argument("--version", action="version", version=f"mllama {_version()}")
    sub = parser.add_subparsers(dest="command", required=True)
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--model", default=DEFAULT_MODEL,
                        help="checkpoint directory or hub id (default: the tiny demo model shipped with mllama)")
    common.add_argument("--image", action="append", metavar="PATH|URL", help="an image (repeatable)")
    common.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"])
    common.add_argument("--max-new-tokens", type=int, default=64)
    common.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    common.add_argument("--top-p", type=float, default=0.9)
    common.add_argument("--seed", type=int, default=None)
    common.add_argument("--compile", action="store_true",
                        help="torch.compile the decode step (slow first call, faster decoding after)")
    common.add_argument("--no-pack", action="store_true",
                        help="keep bf16 weights in their plain layout (default on a CPU with native bf16: packed "
                             "once for oneDNN, faster products, the same values; generate and chat pack the "
                             "vision tower only, serve all)")
    common.add_argument("--fast-vision", action="store_true",
                        help="skip padded tiles in the vision encoder (faster, not exact)")
    common.add_argument("--quantize", choices=["int8", "int4"], default=None,
                        help="quantize the linear weights while loading (less memory, faster decoding)")
    common.add_argument("--adapter", default=None, metavar="DIR",
                        help="a LoRA adapter directory (peft format, e.g. from mllama finetune) to apply")
    gen = sub.add_parser("generate", parents=[common], help="answer one prompt, streaming to stdout")
    gen.add_argument("prompt", help='the question; "-" reads it from stdin')
    gen.add_argument("--raw", action="store_true", help="use the prompt as is, without the chat template")
    gen.set_defaults(func=cmd_generate)
    chat = sub.add_parser("chat", parents=[common], help="interactive multi-turn chat")
    chat.set_defaults(func=cmd_chat)
    convert = sub.add_parser("convert-meta", help="convert Meta's original checkpoint (consolidated.*.pth, params.json, "
                                                  "tokenizer.model) into an HF-layout directory")
    convert.add_argument("input_dir")
    convert.add_argument("output_dir", help="created; must not exist or be empty")
    kind = convert.add_mutually_exclusive_group()
    kind.add_argument("--instruct", dest="instruct", action="store_const", const=True, default=None,
                      help="an Instruct model: its eos ids, sampling defaults and chat template")
    kind.add_argument("--base", dest="instruct", action="store_const", const=False,
                      help="a base model (default: guessed from the directory name)")
    convert.add_argument("--image-size", type=int, default=None,
                         help="tile size in pixels (default: the checkpoint's; another one resizes the position tables)")
    convert.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"])
    convert.add_argument("--max-shard-size", default="5GB")
    convert.set_defaults(func=cmd_convert_meta)
    quant = sub.add_parser("quantize", help="write an int8 or int4 copy of a checkpoint (loads without re-quantizing)")
    quant.add_argument("input_dir")
    quant.add_argument("output_dir", help="created; must not exist or be empty")
    mode = quant.add_mutually_exclusive_group(required=True)
    mode.add_argument("--int8", dest="mode", action="store_const", const="int8",
                      help="int8 weights, one scale per output channel")
    mode.add_argument("--int4", dest="mode", action="store_const", const="int4",
                      help="int4 weights, a scale and offset per group of --group-size values")
    quant.add_argument("--group-size", type=int, default=DEFAULT_GROUP_SIZE, help="int4 group size: 32, 64, 128 or 256")
    quant.add_argument("--vision", action="store_true", help="quantize the vision encoder's linears too")
    quant.add_argument("--lm-head", action="store_true", help="quantize lm_head too")
    quant.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"],
                       help="dtype of scales, embeddings and everything not quantized")
    quant.add_argument("--max-shard-size", default="5GB")
    quant.set_defaults(func=cmd_quantize)
    serve = sub.add_parser("serve", help="OpenAI-compatible HTTP API and a web chat page (needs mllama[serve])")
    for flag in ("--model", "--dtype", "--compile", "--no-pack", "--fast-vision", "--quantize", "--adapter"):
        action = next(a for a in common._actions if flag in a.option_strings)
        serve._add_action(action)
    add_serve_arguments(serve)
    serve.set_defaults(func=cmd_serve)
    add_finetune_parser(sub, CliError)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if getattr(args, "max_new_tokens", 1) < 1:
        print("error: --max-new-tokens must be at least 1", file=sys.stderr)
        return 2
    try:
        if tp_world_size() > 1:
            return _main_tensor_parallel(args)
        args.func(args)
    except CliError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:  # piped into `head`: stop quietly, and keep Python's exit flush quiet too
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141
    except Exception as err:  # noqa: BLE001 - one line for the user; MLLAMA_TRACEBACK=1 for developers
        if os.environ.get("MLLAMA_TRACEBACK"):
            raise
        message = " ".join(str(err).split())[:1000] or type(err).__name__
        print(f"error: {message} ({type(err).__name__}; MLLAMA_TRACEBACK=1 shows the traceback)", file=sys.stderr)
        return 1
    return 0


def _main_tensor_parallel(args: argparse.Namespace) -> int:
    """`torchrun --nproc-per-node N -m mllama generate ...`: every rank runs the same command on its
    slices of the model (mllama.tp); only rank 0 writes the answer."""
    import os

    if args.command not in ("generate", "serve"):
        raise CliError(f"`mllama {args.command}` does not run under torchrun yet; tensor parallelism supports "
                       "`generate` and `serve` (and the Python API: mllama.tp_load.load_tensor_parallel)")
    rank = int(os.environ.get("RANK", "0"))
    quiet = open(os.devnull, "w") if rank != 0 else None
    stdout = sys.stdout
    try:
        if quiet is not None:
            sys.stdout = quiet
        args.func(args)
    finally:
        sys.stdout = stdout
        if quiet is not None:
            quiet.close()
        import torch.distributed as dist

        if dist.is_initialized():
            dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
