"""The usage examples of transformers' Mllama documentation page, run with only the import line changed.

Each example below is the page's code, written for a local checkpoint directory (model_id) and local
photos (Image.open on a path instead of requests / URLs), importing from `mllama`. The tests run it on a
tiny random checkpoint saved by our own save_pretrained, then run the identical source again with
`from transformers import` and compare token for token (greedy: the checkpoint's generation_config.json
is greedy, and the explicit do_sample=False of the base example stays).

Two things differ on the transformers side only, neither in the example's code:
- transformers without `accelerate` refuses any device_map, so `device_map="auto"` is dropped there
  (on a CPU-only machine "auto" means the CPU for both).
- rows before the first image (the chat template's BOS and user header) attend to every image in
  transformers, but to none in Meta's reference and here; the transformers model gets `MetaSemantics`
  hooks (tests/tiny.py) that zero those rows' cross-attention output.
The page loads the models in bfloat16; the parity runs swap in float32 in both (bf16 rounding differs
between any two implementations), and `test_examples_run_as_written` runs the bfloat16 code as written.
"""

from __future__ import annotations

import contextlib
import importlib.util
import inspect
import io
import json
import textwrap
from pathlib import Path
from typing import Any, Callable

import pytest
import torch

import llama_models
from mllama import MllamaConfig, MllamaForConditionalGeneration, MllamaImageProcessorPil, MllamaProcessor
from mllama.generate import GenerationConfig
from mllama.tokenizer_convert import convert_tiktoken_tokenizer
from tiny import CONFIGS, MetaSemantics, randomize_

transformers = pytest.importorskip("transformers")

PHOTOS = Path(__import__("skimage").__file__).parent / "data"
LLAMA3_MODEL = Path(llama_models.__file__).parent / "llama3" / "tokenizer.model"
BASE_VOCAB = 512  # the first 512 ranks of Llama 3's tiktoken file: a closed, real BPE vocabulary
VOCAB = BASE_VOCAB + 256  # + the 256 Llama 3 special tokens; <|image|> = VOCAB = image_token_index
BOS, EOS, PAD = BASE_VOCAB, [BASE_VOCAB + 1, BASE_VOCAB + 8, BASE_VOCAB + 9], BASE_VOCAB + 4


# ---- the examples ---------------------------------------------------------------------------------------------------
def instruct(model_id: str, image_file: str, other_file: str) -> dict[str, Any]:
    """Usage example, Instruct model."""
    import torch
    from PIL import Image

    from mllama import MllamaForConditionalGeneration, AutoProcessor

    model = MllamaForConditionalGeneration.from_pretrained(model_id, device_map="auto", dtype=torch.bfloat16)
    processor = AutoProcessor.from_pretrained(model_id)

    messages = [
        [
            {
                "role": "user",
                "content": [
                    {"type": "image"},
                    {"type": "text", "text": "What does the image show?"}
                ]
            }
        ],
    ]
    text = processor.apply_chat_template(messages, add_generation_prompt=True)

    image = Image.open(image_file)

    inputs = processor(text=text, images=image, return_tensors="pt").to(model.device)
    output = model.generate(**inputs, max_new_tokens=25)
    print(processor.decode(output[0]))
    return locals()


def instruct_vectorized(model_id: str, image_file: str, other_file: str) -> dict[str, Any]:
    """Usage example, Instruct model, with the image inside the message (transformers >= 4.49 form)."""
    import torch

    from mllama import MllamaForConditionalGeneration, AutoProcessor

    model = MllamaForConditionalGeneration.from_pretrained(model_id, device_map="auto", dtype=torch.bfloat16)
    processor = AutoProcessor.from_pretrained(model_id)

    messages = [
        [
            {
                "role": "user",
                "content": [
                    {"type": "image", "url": image_file},
                    {"type": "text", "text": "What does the image show?"}
                ]
            }
        ],
    ]
    inputs = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=True,
                                           return_tensors="pt").to(model.device)
    output = model.generate(**inputs, max_new_tokens=25)
    print(processor.decode(output[0]))
    return locals()


def base(model_id: str, image_file: str, other_file: str) -> dict[str, Any]:
    """Usage example, base model."""
    import torch
    from PIL import Image

    from mllama import MllamaForConditionalGeneration, AutoProcessor

    model = MllamaForConditionalGeneration.from_pretrained(model_id, device_map="auto", dtype=torch.bfloat16)
    processor = AutoProcessor.from_pretrained(model_id)

    prompt = "<|image|>If I had to write a haiku for this one"
    raw_image = Image.open(image_file)

    inputs = processor(text=prompt, images=raw_image, return_tensors="pt").to(model.device)
    output = model.generate(**inputs, do_sample=False, max_new_tokens=25)
    print(processor.decode(output[0], skip_special_tokens=True))
    return locals()


def model_card(model_id: str, image_file: str, other_file: str) -> dict[str, Any]:
    """The Instruct model card's example: template text, then the processor with add_special_tokens=False."""
    import torch
    from PIL import Image

    from mllama import MllamaForConditionalGeneration, AutoProcessor

    model = MllamaForConditionalGeneration.from_pretrained(model_id, torch_dtype=torch.bfloat16, device_map="auto")
    processor = AutoProcessor.from_pretrained(model_id)

    image = Image.open(image_file)

    messages = [
        {"role": "user", "content": [
            {"type": "image"},
            {"type": "text", "text": "If I had to write a haiku for this one, it would be: "}
        ]}
    ]
    input_text = processor.apply_chat_template(messages, add_generation_prompt=True)
    inputs = processor(
        image,
        input_text,
        add_special_tokens=False,
        return_tensors="pt"
    ).to(model.device)

    output = model.generate(**inputs, max_new_tokens=30)
    print(processor.decode(output[0]))
    return locals()


def forward_docstring(model_id: str, image_file: str, other_file: str) -> dict[str, Any]:
    """MllamaForConditionalGeneration.forward's example (rendered on the page by autodoc)."""
    from PIL import Image

    from mllama import AutoProcessor, MllamaForConditionalGeneration

    checkpoint = model_id
    model = MllamaForConditionalGeneration.from_pretrained(checkpoint)
    processor = AutoProcessor.from_pretrained(checkpoint)

    prompt = "<|image|>If I had to write a haiku for this one"
    image = Image.open(image_file)

    inputs = processor(text=prompt, images=image, return_tensors="pt")

    # Generate
    output = model.generate(**inputs, max_new_tokens=15)

    prompt_len = inputs.input_ids.shape[-1]
    generated_ids = output[:, prompt_len:]
    generated_text = processor.batch_decode(generated_ids, skip_special_tokens=True,
                                            clean_up_tokenization_spaces=False)
    print(generated_text)
    return locals()


def batched(model_id: str, image_file: str, other_file: str) -> dict[str, Any]:
    """Not on the Mllama page: batched generation with left padding, in transformers' usual form."""
    import torch

    from mllama import MllamaForConditionalGeneration, AutoProcessor

    model = MllamaForConditionalGeneration.from_pretrained(model_id, device_map="auto", dtype=torch.bfloat16)
    processor = AutoProcessor.from_pretrained(model_id)
    processor.tokenizer.padding_side = "left"

    messages = [
        [{"role": "user", "content": [{"type": "image", "path": image_file},
                                      {"type": "text", "text": "What does the image show?"}]}],
        [{"role": "user", "content": [{"type": "image", "path": other_file},
                                      {"type": "text", "text": "Write a haiku about this picture, in English please."}]}],
    ]
    inputs = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=True,
                                           padding=True, return_tensors="pt").to(model.device)
    output = model.generate(**inputs, max_new_tokens=20)
    print(processor.batch_decode(output[:, inputs["input_ids"].shape[1]:], skip_special_tokens=True))
    return locals()


def causal_lm_docstring(model_id: str, image_file: str, other_file: str) -> dict[str, Any]:
    """MllamaForCausalLM.forward's example (rendered on the page by autodoc); it samples."""
    from mllama import AutoTokenizer, MllamaForCausalLM

    model = MllamaForCausalLM.from_pretrained(model_id)
    tokenizer = AutoTokenizer.from_pretrained(model_id)

    prompt = "If I had to write a haiku, it would be:"
    inputs = tokenizer(prompt, return_tensors="pt")

    # Generate
    generate_ids = model.generate(inputs.input_ids, max_length=40, do_sample=True, temperature=0.6)
    result = tokenizer.batch_decode(generate_ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)[0]
    print(result)
    return locals()


GREEDY = [instruct, instruct_vectorized, base, model_card, forward_docstring, batched]


def run(example: Callable[..., dict[str, Any]], library: str, model_id: Path, *, dtype: str | None = None,
        images: tuple[str, str] = ("astronaut.png", "coffee.png")) -> tuple[dict[str, Any], str]:
    """Execute the example's own source, importing from `library`; returns its locals and what it printed."""
    source = textwrap.dedent(inspect.getsource(example))
    assert "from mllama import" in source
    if library == "transformers":
        source = source.replace("from mllama import", "from transformers import")
        if importlib.util.find_spec("accelerate") is None:  # needed by transformers for any device_map
            source = source.replace('device_map="auto"', "device_map=None")
    if dtype is not None:
        source = source.replace("torch.bfloat16", dtype)
    namespace: dict[str, Any] = {"__name__": f"example_{library}"}
    exec(compile(source, f"<{example.__name__} from {library}>", "exec"), namespace)
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        scope = namespace[example.__name__](str(model_id), *(str(PHOTOS / name) for name in images))
    return scope, printed.getvalue()


# ---- the checkpoint -------------------------------------------------------------------------------------------------
def _checkpoint(out: Path, *, add_bos: bool) -> Path:
    """Tiny random model + processor + greedy generation_config.json, saved as a hub checkpoint directory."""
    (out.parent / "tiny.model").write_text("\n".join(LLAMA3_MODEL.read_text().splitlines()[:BASE_VOCAB]) + "\n")
    tokenizer = convert_tiktoken_tokenizer(out.parent / "tiny.model", out, add_bos=add_bos)
    assert tokenizer.image_token_id == VOCAB and tokenizer.bos_token_id == BOS
    raw = json.loads(json.dumps(CONFIGS["a"]))  # 2 tiles of 28 px, GQA, cross-attention layers 1 and 4
    raw["text_config"].update(vocab_size=VOCAB, bos_token_id=BOS, eos_token_id=EOS, pad_token_id=PAD)
    raw["image_token_index"] = VOCAB
    model = MllamaForConditionalGeneration(MllamaConfig.from_dict(raw))
    randomize_(model, seed=1, scale=0.05)  # every gate non-zero; small enough for varied greedy output
    model.save_pretrained(out)
    GenerationConfig(bos_token_id=BOS, eos_token_id=EOS, pad_token_id=PAD, do_sample=False).save_pretrained(out)
    image_processor = MllamaImageProcessorPil(size={"height": 28, "width": 28}, max_image_tiles=2,
                                              image_mean=[0.48145466, 0.4578275, 0.40821073],
                                              image_std=[0.26862954, 0.26130258, 0.27577711])
    MllamaProcessor(image_processor, tokenizer).save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The parity checkpoint: its tokenizer adds no BOS itself, since transformers' processor would put a
    second BOS in front of every prompt with the published, BOS-adding tokenizer.json."""
    return _checkpoint(tmp_path_factory.mktemp("plain") / "model", add_bos=False)


@pytest.fixture(scope="module")
def faithful_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _checkpoint(tmp_path_factory.mktemp("faithful") / "model", add_bos=True)


@pytest.fixture()
def meta_transformers(monkeypatch: pytest.MonkeyPatch) -> None:
    """transformers' from_pretrained returns models with Meta's semantics for rows before the first image."""
    cls = transformers.MllamaForConditionalGeneration
    original = cls.from_pretrained.__func__

    def from_pretrained(klass, *args, **kwargs):
        model = original(klass, *args, **kwargs)
        meta = MetaSemantics(model)

        def record_mask(module, args, kwargs) -> None:  # generate passes the rows being processed
            if kwargs.get("cross_attention_mask") is not None:
                meta.cross_attention_mask = kwargs["cross_attention_mask"]

        model.register_forward_pre_hook(record_mask, with_kwargs=True)
        return model

    monkeypatch.setattr(cls, "from_pretrained", classmethod(from_pretrained))


# ---- tests ----------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("example", GREEDY, ids=lambda f: f.__name__)
def test_example_matches_transformers(example, checkpoint, meta_transformers) -> None:
    ours, ours_printed = run(example, "mllama", checkpoint, dtype="torch.float32")
    theirs, theirs_printed = run(example, "transformers", checkpoint, dtype="torch.float32")
    assert type(ours["model"]).__module__.startswith("mllama.")
    assert type(theirs["model"]).__module__.startswith("transformers.")
    for key in ("input_ids", "attention_mask", "cross_attention_mask", "aspect_ratio_ids", "aspect_ratio_mask"):
        assert torch.equal(ours["inputs"][key], theirs["inputs"][key]), key
    # Our default is the batched torch image processor; transformers (without torchvision) uses PIL.
    torch.testing.assert_close(ours["inputs"]["pixel_values"], theirs["inputs"]["pixel_values"], rtol=0, atol=2e-2)
    assert ours["output"].tolist() == theirs["output"].tolist()
    assert ours_printed == theirs_printed
    prompt_len = ours["inputs"]["input_ids"].shape[1]
    assert ours["output"].shape[1] > prompt_len
    assert (ours["inputs"]["input_ids"] == BOS).sum(1).tolist() == [1] * ours["output"].shape[0]


@pytest.mark.parametrize("example", [instruct, base, batched], ids=lambda f: f.__name__)
def test_examples_run_as_written(example, checkpoint) -> None:
    """The page's bfloat16 code unchanged: bfloat16 weights, float32 pixels cast inside, prompt kept."""
    scope, printed = run(example, "mllama", checkpoint)
    model, inputs, output = scope["model"], scope["inputs"], scope["output"]
    assert model.dtype == torch.bfloat16 and inputs["pixel_values"].dtype == torch.float32
    prompt_len = inputs["input_ids"].shape[1]
    assert torch.equal(output[:, :prompt_len], inputs["input_ids"])
    assert prompt_len < output.shape[1] <= prompt_len + 25 and printed.strip()


@pytest.mark.parametrize("example", [instruct, base], ids=lambda f: f.__name__)
def test_published_tokenizer_gives_the_same_outputs(example, checkpoint, faithful_checkpoint) -> None:
    """With the published, BOS-adding tokenizer.json our processor makes the very same inputs (one BOS)."""
    plain, plain_printed = run(example, "mllama", checkpoint, dtype="torch.float32")
    faithful, faithful_printed = run(example, "mllama", faithful_checkpoint, dtype="torch.float32")
    assert faithful["processor"].tokenizer.adds_bos_token and not plain["processor"].tokenizer.adds_bos_token
    assert faithful["output"].tolist() == plain["output"].tolist() and faithful_printed == plain_printed


def test_causal_lm_example(checkpoint) -> None:
    """Text-only, sampled: not comparable token for token, but the same prompt and the same budget."""
    scope, printed = run(causal_lm_docstring, "mllama", checkpoint)
    theirs = transformers.AutoTokenizer.from_pretrained(checkpoint)
    prompt = "If I had to write a haiku, it would be:"
    ids = scope["inputs"].input_ids
    assert ids.tolist() == theirs(prompt, return_tensors="pt").input_ids.tolist()
    assert type(scope["model"]).__name__ == "MllamaForCausalLM" and not hasattr(scope["model"].model, "vision_model")
    out = scope["generate_ids"]
    assert torch.equal(out[:, :ids.shape[1]], ids)
    assert out.shape[1] == 40 or out[0, -1].item() in EOS
    # max_length counts the prompt, as in transformers (greedy here, so the two budgets can be compared).
    greedy = scope["model"].generate(ids, max_length=ids.shape[1] + 6, do_sample=False)
    assert greedy.tolist() == scope["model"].generate(ids, max_new_tokens=6, do_sample=False).tolist()
    assert greedy.shape[1] <= ids.shape[1] + 6
    assert printed == scope["result"] + "\n" and scope["result"].startswith(prompt)
