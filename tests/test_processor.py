"""Processor: parity with transformers' MllamaProcessor on the converted Llama 3 tokenizer + small tiles."""

from __future__ import annotations

import base64
import io
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import llama_models
from mllama.image_processing import MllamaImageProcessor, MllamaImageProcessorPil
from mllama.processor import (AutoProcessor, MllamaProcessor, cross_attention_spans, dense_cross_attention_mask)
from mllama.tokenizer import default_chat_template
from mllama.tokenizer_convert import convert_tiktoken_tokenizer

transformers = pytest.importorskip("transformers")

MODEL_FILE = Path(llama_models.__file__).parent / "llama3" / "tokenizer.model"
PHOTOS = Path(__import__("skimage").__file__).parent / "data"
HAIKU_WITH_IMAGE = [128256, 128000, 2746, 358, 1047, 311, 3350, 264, 6520, 39342, 369, 420, 832]  # published
DATE = "26 Jul 2024"
PREPROCESSOR = {"do_convert_rgb": True, "do_normalize": True, "do_pad": True, "do_rescale": True, "do_resize": True,
                "image_mean": [0.48145466, 0.4578275, 0.40821073], "image_processor_type": "MllamaImageProcessor",
                "image_std": [0.26862954, 0.26130258, 0.27577711], "max_image_tiles": 4, "resample": 2,
                "rescale_factor": 1 / 255, "size": {"height": 56, "width": 56}}


def _processor_dir(tmp_path_factory: pytest.TempPathFactory, name: str, *, add_bos: bool) -> Path:
    tok_dir = tmp_path_factory.getbasetemp() / name  # shared with test_tokenizer in one session
    if not (tok_dir / "tokenizer.json").exists():
        convert_tiktoken_tokenizer(MODEL_FILE, tok_dir, add_bos=add_bos)
    out = tmp_path_factory.mktemp("processor")
    shutil.copytree(tok_dir, out, dirs_exist_ok=True)
    (out / "preprocessor_config.json").write_text(json.dumps(PREPROCESSOR, indent=2))
    return out


@pytest.fixture(scope="session")
def pdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The parity tests' directory: a tokenizer that adds no BOS itself. With the published (BOS-adding)
    tokenizer.json, transformers' processor puts a second BOS in front of its prompts, a transformers bug we
    do not copy; `faithful_dir` shows our processor gives the published ids with that tokenizer."""
    return _processor_dir(tmp_path_factory, "llama3_tokenizer_nobos", add_bos=False)


@pytest.fixture(scope="session")
def faithful_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The converter's default, BOS-adding tokenizer.json, as published."""
    return _processor_dir(tmp_path_factory, "llama3_tokenizer", add_bos=True)


@pytest.fixture(scope="session")
def ours(pdir: Path) -> MllamaProcessor:
    return MllamaProcessor.from_pretrained(pdir, use_fast=False)


@pytest.fixture(scope="session")
def theirs(pdir: Path):
    return transformers.MllamaProcessor.from_pretrained(pdir, backend="pil")


@pytest.fixture(scope="session")
def photos() -> dict[str, Image.Image]:
    rng = np.random.default_rng(0)
    out = {name: Image.open(PHOTOS / f"{name}.png").convert("RGB") for name in ("astronaut", "coffee", "chelsea")}
    out["tall"] = Image.fromarray(rng.integers(0, 256, (150, 40, 3), dtype=np.uint8))
    out["wide"] = Image.fromarray(rng.integers(0, 256, (30, 170, 3), dtype=np.uint8))
    return out


def _to_np(value) -> np.ndarray:
    return value.numpy() if isinstance(value, torch.Tensor) else np.asarray(value)


def assert_same(a, b, *, atol: float = 0.0) -> None:
    """Same keys, same container types, same dtypes and values (pixel_values within atol)."""
    assert sorted(a) == sorted(b)
    for key in a:
        x, y = a[key], b[key]
        assert type(x) is type(y), (key, type(x), type(y))
        if isinstance(x, list):
            assert x == y, key
            continue
        assert x.dtype == y.dtype and tuple(x.shape) == tuple(y.shape), (key, x.dtype, y.dtype, x.shape, y.shape)
        tol = atol if key == "pixel_values" else 0.0
        assert np.allclose(_to_np(x), _to_np(y), rtol=0, atol=tol), (key, np.abs(_to_np(x) - _to_np(y)).max())


# ---- __call__ -------------------------------------------------------------------------------------------------------
def test_published_ids(ours: MllamaProcessor, photos) -> None:
    out = ours(text="<|image|>If I had to write a haiku for this one", images=photos["astronaut"])
    assert out["input_ids"] == [HAIKU_WITH_IMAGE]
    assert ours(text="If I had to write a haiku")["input_ids"] == [[128000, *HAIKU_WITH_IMAGE[2:10]]]
    assert ours(text="Hello world! This is a test.")["input_ids"] == [[128000, 9906, 1917, 0, 1115, 374, 264,
                                                                       1296, 13]]
    assert "num_tiles" not in out and sorted(out) == sorted(["input_ids", "attention_mask", "pixel_values",
                                                              "aspect_ratio_ids", "aspect_ratio_mask",
                                                              "cross_attention_mask"])


@pytest.mark.parametrize("return_tensors", [None, "pt", "np"])
def test_single_image_parity(ours, theirs, photos, return_tensors) -> None:
    kw = dict(text="<|image|>If I had to write a haiku for this one", images=photos["coffee"],
              return_tensors=return_tensors)
    assert_same(ours(**kw), theirs(**kw))


@pytest.mark.parametrize("padding_side", ["left", "right"])
@pytest.mark.parametrize("return_tensors", ["pt", "np"])
def test_mixed_batch_parity(ours, theirs, photos, padding_side, return_tensors) -> None:
    text = ["<|image|><|image|>Two pictures: compare them.",
            "Describe <|image|> this, then <|image|><|image|> these three, in order.",
            "Just text, no image at all here.",
            "<|begin_of_text|>Explicit BOS then <|image|>"]
    images = [[photos["astronaut"], photos["tall"]], [photos["wide"], photos["chelsea"], photos["coffee"]], [],
              [photos["wide"]]]
    kw = dict(text=text, images=images, padding=True, padding_side=padding_side, return_tensors=return_tensors)
    a, b = ours(**kw), theirs(**kw)
    assert_same(a, b)
    assert tuple(a["cross_attention_mask"].shape) == (4, a["input_ids"].shape[1], 3, 4)
    assert (a["input_ids"] == 128000).sum(1).tolist() == [1, 1, 1, 1]


@pytest.mark.parametrize("kwargs", [
    dict(add_special_tokens=False, padding=True), dict(truncation=True, max_length=12, padding="max_length"),
    dict(padding="max_length", max_length=40, padding_side="left"),
])
def test_tokenizer_options_parity(ours, theirs, photos, kwargs) -> None:
    kw = dict(text=["<|image|>A cat sits on the mat", "<|image|>hi"], images=[[photos["chelsea"]], [photos["tall"]]],
              return_tensors="pt", **kwargs)
    assert_same(ours(**kw), theirs(**kw))


def test_text_only_and_images_only_parity(ours, theirs, photos) -> None:
    kw = dict(text=["hello there", "a longer prompt, <|python_tag|> with specials<|eot_id|>"], padding=True)
    assert_same(ours(**kw), theirs(**kw))
    kw = dict(images=[[photos["coffee"]], [photos["tall"], photos["wide"]]], return_tensors="np")
    assert_same(ours(**kw), theirs(**kw))


def test_torch_image_processor_within_tolerance(pdir, theirs, photos) -> None:
    fast = AutoProcessor.from_pretrained(pdir)
    assert isinstance(fast.image_processor, MllamaImageProcessor)
    kw = dict(text=["<|image|>first", "x <|image|><|image|> second"],
              images=[[photos["astronaut"]], [photos["coffee"], photos["wide"]]], padding=True, return_tensors="pt")
    assert_same(fast(**kw), theirs(**kw), atol=2e-2)


def test_cross_attention_mask_semantics(ours, photos) -> None:
    assert cross_attention_spans([5, 9, 1, 9, 9, 2, 3, 9, 4], 9) == [(1, 3), (3, 7), (4, 7), (7, 9)]
    assert cross_attention_spans([1, 2], 9) == []
    mask = dense_cross_attention_mask([[9, 1, 9, 9, 2], [1, 9, 2]], [[2, 1, 4], [3]], image_token_id=9,
                                      max_num_tiles=4)
    assert mask.shape == (2, 5, 3, 4) and mask.dtype == np.int64
    assert mask[0, :, 0].tolist() == [[1, 1, 0, 0]] * 2 + [[0] * 4] * 3
    assert mask[0, :, 1].tolist() == [[0] * 4] * 2 + [[1, 0, 0, 0]] * 3  # runs on with its group to the end
    assert mask[0, :, 2].tolist() == [[0] * 4] * 3 + [[1, 1, 1, 1]] * 2
    # The shorter (unpadded) sample's last span ends with its own ids.
    assert mask[1, :, 0].tolist() == [[0] * 4] + [[1, 1, 1, 0]] * 2 + [[0] * 4] * 2 and mask[1, :, 1:].sum() == 0
    out = ours(text="Before the image <|image|> after it", images=photos["astronaut"], return_tensors="np")
    first = int(np.argmax(out["input_ids"][0] == 128256))
    assert out["cross_attention_mask"][0, :first].sum() == 0
    tiles = int(out["aspect_ratio_mask"][0, 0].sum())
    assert (out["cross_attention_mask"][0, first:, 0, :tiles] == 1).all()


def test_faithful_tokenizer_gives_published_ids(faithful_dir, pdir, photos) -> None:
    """With the published, BOS-adding tokenizer.json: exactly one BOS, the published ids, and the same
    inputs as the no-BOS variant, whatever the prompt (transformers prepends a second BOS here)."""
    proc = MllamaProcessor.from_pretrained(faithful_dir, use_fast=False)
    assert proc.tokenizer.adds_bos_token
    assert proc.tokenizer.encode("If I had to write a haiku") == HAIKU_WITH_IMAGE[1:10]
    kw = dict(text="<|image|>If I had to write a haiku for this one", images=photos["tall"])
    assert proc(**kw)["input_ids"] == [HAIKU_WITH_IMAGE]
    hf = transformers.MllamaProcessor.from_pretrained(faithful_dir, backend="pil")
    assert hf(**kw)["input_ids"] == [[128000, *HAIKU_WITH_IMAGE]]  # documents transformers' double BOS
    plain = MllamaProcessor.from_pretrained(pdir, use_fast=False)
    assert not plain.tokenizer.adds_bos_token
    text = ["<|image|><|image|>Two pictures", "Text first <|image|> then", "no image", "<|begin_of_text|>x <|image|>"]
    images = [[photos["tall"], photos["wide"]], [photos["coffee"]], [], [photos["wide"]]]
    for extra in [dict(padding=True), dict(padding="max_length", max_length=12, truncation=True),
                  dict(padding=True, padding_side="left", add_special_tokens=False)]:
        assert_same(proc(text=text, images=images, return_tensors="pt", **extra),
                    plain(text=text, images=images, return_tensors="pt", **extra))
    messages = [{"role": "user", "content": [{"type": "image", "image": photos["tall"]},
                                             {"type": "text", "text": "Hi"}]}]
    ids = proc.apply_chat_template(messages, tokenize=True)
    assert ids == plain.apply_chat_template(messages, tokenize=True) == hf.apply_chat_template(messages, tokenize=True)
    assert ids[0].count(128000) == 1


# ---- chat template ----------------------------------------------------------------------------------------------
def _conversations(photos, image_file: Path) -> dict[str, list]:
    png = io.BytesIO()
    photos["wide"].save(png, format="PNG")
    data_url = "data:image/png;base64," + base64.b64encode(png.getvalue()).decode()
    return {
        "image": [{"role": "user", "content": [{"type": "image", "image": photos["coffee"]},
                                               {"type": "text", "text": "What is in this image?"}]}],
        "multi_turn": [
            {"role": "user", "content": [{"type": "text", "text": "Describe"},
                                         {"type": "image", "path": str(image_file)},
                                         {"type": "text", "text": " and "}, {"type": "image", "url": data_url}]},
            {"role": "assistant", "content": [{"type": "text", "text": "A cup and some noise."}]},
            {"role": "user", "content": "And now?"}],
        "text": [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Hello!"}],
        "string": [{"role": "user", "content": "Just a string message"}],
    }


@pytest.mark.parametrize("name", ["image", "multi_turn", "text", "string"])
@pytest.mark.parametrize("add_generation_prompt", [False, True])
def test_chat_template_text_parity(ours, theirs, photos, tmp_path, name, add_generation_prompt) -> None:
    photos["tall"].save(tmp_path / "tall.png")
    conv = _conversations(photos, tmp_path / "tall.png")[name]
    kw = dict(add_generation_prompt=add_generation_prompt)
    text = ours.apply_chat_template(conv, date_string=DATE, **kw)
    assert text == theirs.apply_chat_template(conv, date_string=DATE, **kw)
    assert text.startswith("<|begin_of_text|>") and text.count("<|begin_of_text|>") == 1
    assert ("Today Date: 26 Jul 2024" in text) == (name in ("text", "string"))
    # Without date_string the template asks strftime_now for today's date (retry once across midnight).
    mine, hf = ours.apply_chat_template(conv, **kw), theirs.apply_chat_template(conv, **kw)
    assert hf in (mine, ours.apply_chat_template(conv, **kw))


@pytest.mark.parametrize("return_tensors", [None, "pt"])
def test_chat_template_tokenized_parity(ours, theirs, photos, tmp_path, return_tensors) -> None:
    photos["tall"].save(tmp_path / "tall.png")
    convs = _conversations(photos, tmp_path / "tall.png")
    batch = [convs["image"], convs["multi_turn"], convs["text"]]
    kw = dict(add_generation_prompt=True, tokenize=True, date_string=DATE, return_tensors=return_tensors,
              padding=True)
    hf_kw = dict(kw, processor_kwargs={"padding": True})
    del hf_kw["padding"]
    assert_same(ours.apply_chat_template(batch, return_dict=True, **kw),
                theirs.apply_chat_template(batch, return_dict=True, **hf_kw))
    ids = ours.apply_chat_template(convs["image"], add_generation_prompt=True, tokenize=True)
    assert ids == theirs.apply_chat_template(convs["image"], add_generation_prompt=True, tokenize=True)
    assert ids[0][:6] == [128000, 128006, 882, 128007, 271, 128256]  # one BOS, then the user header


def test_chat_template_batched_text_and_errors(ours, theirs, photos) -> None:
    convs = [[{"role": "user", "content": "one"}], [{"role": "user", "content": [{"type": "text", "text": "two"}]}]]
    assert ours.apply_chat_template(convs, date_string=DATE) == theirs.apply_chat_template(convs, date_string=DATE)
    with_system = [{"role": "system", "content": "sys"},
                   {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "hi"}]}]
    with pytest.raises(ValueError, match="incompatible with system messages"):
        ours.apply_chat_template(with_system)
    with pytest.raises(ValueError, match="no images were passed"):
        ours.apply_chat_template([{"role": "user", "content": [{"type": "image"}]}], tokenize=True)
    with pytest.raises(TypeError, match="list of messages"):
        ours.apply_chat_template("hello")  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="'role'"):
        ours.apply_chat_template([{"content": "no role"}])
    custom = "{% for m in messages %}[{{ m['role'] }}]{{ m['content'] }}{% endfor %}"
    assert ours.apply_chat_template([{"role": "user", "content": "x"}], chat_template=custom) == "[user]x"


def test_chat_template_sources(pdir, tmp_path) -> None:
    d = tmp_path / "d"
    shutil.copytree(pdir, d)
    (d / "chat_template.json").write_text(json.dumps({"chat_template": "from json"}))
    (d / "chat_template.jinja").write_text("from jinja")
    assert MllamaProcessor.from_pretrained(d, use_fast=False).chat_template == "from json"
    (d / "chat_template.json").unlink()
    assert MllamaProcessor.from_pretrained(d, use_fast=False).chat_template == "from jinja"
    (d / "chat_template.jinja").unlink()
    config = json.loads((d / "tokenizer_config.json").read_text())
    assert MllamaProcessor.from_pretrained(d, use_fast=False).chat_template == config["chat_template"]
    del config["chat_template"]
    (d / "tokenizer_config.json").write_text(json.dumps(config))
    assert MllamaProcessor.from_pretrained(d, use_fast=False).chat_template == default_chat_template()


# ---- I/O, decoding, errors --------------------------------------------------------------------------------------
def test_save_load_round_trip(ours, photos, tmp_path) -> None:
    ours.save_pretrained(tmp_path / "saved")
    again = MllamaProcessor.from_pretrained(tmp_path / "saved", use_fast=False)
    assert isinstance(again.image_processor, MllamaImageProcessorPil)
    assert again.chat_template == ours.chat_template
    kw = dict(text=["<|image|>one", "two <|image|>"], images=[[photos["tall"]], [photos["wide"]]], padding=True,
              return_tensors="pt")
    assert_same(again(**kw), ours(**kw))
    hf = transformers.MllamaProcessor.from_pretrained(tmp_path / "saved", backend="pil")
    assert_same(hf(**kw), ours(**kw))
    messages = [{"role": "user", "content": "hi"}]
    assert hf.apply_chat_template(messages, date_string=DATE) == again.apply_chat_template(messages, date_string=DATE)


def test_decode(ours, theirs, photos) -> None:
    ids = ours(text="<|image|>If I had to write a haiku for this one", images=photos["tall"],
               return_tensors="pt")["input_ids"]
    for skip in (False, True):
        assert ours.batch_decode(ids, skip_special_tokens=skip) == theirs.batch_decode(ids, skip_special_tokens=skip)
        assert ours.decode(ids[0], skip_special_tokens=skip) == theirs.decode(ids[0], skip_special_tokens=skip)
    assert ours.post_process_image_text_to_text(ids) == ["If I had to write a haiku for this one"]


def test_bad_inputs(ours, photos) -> None:
    img = photos["tall"]
    with pytest.raises(ValueError, match="needs text, images or both"):
        ours()
    with pytest.raises(ValueError, match=r"found \[1, 0\] <\|image\|> tokens per prompt and \[1, 1\] images"):
        ours(text=["<|image|>a", "b"], images=[[img], [img]])
    with pytest.raises(ValueError, match=r"found \[0\] <\|image\|> tokens per prompt and \[1\] images"):
        ours(text="an image but no image token", images=img)
    with pytest.raises(ValueError, match="no images were passed"):
        ours(text="<|image|>where is it?")
    with pytest.raises(ValueError, match=r"\[1, 1\] <\|image\|> tokens per prompt and \[2\] images"):
        ours(text=["<|image|>a", "<|image|>b"], images=[img, img])  # a flat list is ONE sample
    with pytest.raises(TypeError, match="text must be"):
        ours(text=42)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="images must be"):
        ours(text="<|image|>a", images=3.5)
    with pytest.raises(TypeError, match=r"images\[0\] holds a int"):
        ours(text="<|image|>a", images=[[1]])
    with pytest.raises(ValueError, match="return_tensors"):
        ours(text="a", return_tensors="tf")
    with pytest.raises(ValueError, match="different lengths"):
        ours(text=["a", "a b c d"], return_tensors="pt")
    with pytest.raises(ValueError, match="truncation"):
        ours(text="some words before the <|image|>", images=img, truncation=True, max_length=3)
    with pytest.raises(TypeError, match="MllamaTokenizer"):
        MllamaProcessor(ours.image_processor, object())  # type: ignore[arg-type]
