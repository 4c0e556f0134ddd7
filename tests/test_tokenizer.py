"""Tokenizer: conversion from Meta's tiktoken file, parity with tiktoken and transformers, streaming, I/O."""

from __future__ import annotations

import base64
import json
import random
from pathlib import Path

import numpy as np
import pytest
import torch

import llama_models
from mllama.tokenizer import IMAGE_TOKEN, LLAMA3_SPLIT_PATTERN, MllamaTokenizer, StreamDetokenizer, default_chat_template
from mllama.tokenizer_convert import convert_tiktoken_tokenizer

MODEL_FILE = Path(llama_models.__file__).parent / "llama3" / "tokenizer.model"
REFERENCE = Path("/work/shared/reference")
BOS = "<|begin_of_text|>"
HAIKU = [128000, 2746, 358, 1047, 311, 3350, 264, 6520, 39342]  # "If I had to write a haiku", published
HELLO = [128000, 9906, 1917, 0, 1115, 374, 264, 1296, 13]  # "Hello world! This is a test.", published

TEXTS = [
    "Hello world! This is a test.", "If I had to write a haiku", "  leading spaces and trailing   ",
    "tabs\tand\nnewlines\r\n\n\nend", "12345678901234 3.14159 1,000,000 0x7fff", "数字と日本語、中文字符 한국어",
    "def f(x):\n    return x ** 2  # comment\n\n\tif x: pass\n", "emoji 🤖🎉👩‍👩‍👧 done", "naïve façade Ünïcödé",
    "I'm you're they'll we've it's I'D YOU'LL", "a" * 300, " " * 40 + "x", "\u00a0nbsp\u2003emsp",
    "مرحبا بالعالم", "Привет, мир!", "https://example.com/a?b=c&d=e#f", "$$\\frac{a}{b}$$", "x\n\n\n\n\ny", "",
]


def _random_texts(n: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    alphabet = "abcXYZ 0123456789 \n\t\r.,!?'\"éü中文😀🤖-_/\\()[]{}<>|"
    return ["".join(rng.choice(alphabet) for _ in range(rng.randint(1, 60))) for _ in range(n)]


@pytest.fixture(scope="session")
def llama3_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.getbasetemp() / "llama3_tokenizer"  # shared with test_processor in one session
    if not (out / "tokenizer.json").exists():
        convert_tiktoken_tokenizer(MODEL_FILE, out)
    return out


@pytest.fixture(scope="session")
def tok(llama3_dir: Path) -> MllamaTokenizer:
    return MllamaTokenizer.from_pretrained(llama3_dir)


@pytest.fixture(scope="session")
def hf_tok(llama3_dir: Path):
    transformers = pytest.importorskip("transformers")
    return transformers.AutoTokenizer.from_pretrained(llama3_dir)


def _tiny_tiktoken(path: Path) -> Path:
    """256 byte tokens + a few merges, in tiktoken's file format (base64 token, rank)."""
    tokens = [bytes([b]) for b in range(256)] + [b"he", b"ll", b"hell", b"hello", b" w", b" wo", b"or", b" wor"]
    path.write_text("".join(f"{base64.b64encode(t).decode()} {i}\n" for i, t in enumerate(tokens)))
    return path


# ---- conversion -------------------------------------------------------------------------------------------------
def test_published_ids_and_special_layout(tok: MllamaTokenizer) -> None:
    # Like the published tokenizer.json, encoding prepends BOS (a TemplateProcessing post-processor).
    assert tok.adds_bos_token
    assert tok.encode("If I had to write a haiku") == HAIKU
    assert tok.encode("Hello world! This is a test.") == HELLO
    assert tok.encode("If I had to write a haiku", add_special_tokens=False) == HAIKU[1:]
    assert tok.encode(BOS + "Hello world! This is a test.", add_special_tokens=False) == HELLO
    assert tok("If I had to write a haiku")["input_ids"] == HAIKU
    # The published pair template puts a BOS before each sequence.
    assert tok.backend_tokenizer.encode("Hello", "If").ids == [128000, 9906, 128000, 2746]
    expected = {"<|begin_of_text|>": 128000, "<|end_of_text|>": 128001, "<|finetune_right_pad_id|>": 128004,
                "<|step_id|>": 128005, "<|start_header_id|>": 128006, "<|end_header_id|>": 128007,
                "<|eom_id|>": 128008, "<|eot_id|>": 128009, "<|python_tag|>": 128010,
                "<|reserved_special_token_2|>": 128011, "<|reserved_special_token_246|>": 128255, IMAGE_TOKEN: 128256}
    assert {t: tok.convert_tokens_to_ids(t) for t in expected} == expected
    assert (tok.bos_token_id, tok.eos_token_id, tok.pad_token_id, tok.image_token_id) == (128000, 128009, 128004,
                                                                                          128256)
    assert tok.vocab_size == 128000 and len(tok) == 128257
    assert tok.all_special_ids == list(range(128000, 128257))
    assert tok.chat_template == default_chat_template()
    # Meta's own tokenizer calls 128011 <|image|>; here it is a reserved token and <|image|> is one token.
    assert tok.encode("<|image|><|reserved_special_token_2|>", add_special_tokens=False) == [128256, 128011]


def test_converted_files_match_published_layout(llama3_dir: Path) -> None:
    if not (REFERENCE / "tokenizer_config-instruct.json").exists():
        pytest.skip("reference files not available")
    for ours, published in [("tokenizer_config.json", "tokenizer_config-instruct.json"),
                            ("special_tokens_map.json", "special_tokens_map-instruct.json"),
                            ("chat_template.json", "chat_template.json")]:
        assert json.loads((llama3_dir / ours).read_text()) == json.loads((REFERENCE / published).read_text()), ours
    assert (llama3_dir / "chat_template.json").read_bytes() == (REFERENCE / "chat_template.json").read_bytes()
    assert default_chat_template().encode() == (REFERENCE / "chat_template.jinja").read_bytes()


def test_base_conversion_and_tiny_model(tmp_path: Path) -> None:
    tiny = _tiny_tiktoken(tmp_path / "tokenizer.model")
    base = convert_tiktoken_tokenizer(tiny, tmp_path / "base", instruct=False)
    assert base.eos_token == "<|end_of_text|>" and base.chat_template is None
    assert base.bos_token_id == 264 and base.image_token_id == 264 + 256
    assert base.adds_bos_token and base.encode("hello") == [264, 259]
    assert not (tmp_path / "base" / "chat_template.json").exists()
    assert "chat_template" not in json.loads((tmp_path / "base" / "tokenizer_config.json").read_text())
    tiktoken = pytest.importorskip("tiktoken")
    from tiktoken.load import load_tiktoken_bpe

    enc = tiktoken.Encoding("tiny", pat_str=LLAMA3_SPLIT_PATTERN, mergeable_ranks=load_tiktoken_bpe(str(tiny)),
                            special_tokens={})
    for text in ["hello world", "hell hello  wor world", *_random_texts(50, 1)]:
        assert base.encode(text, add_special_tokens=False) == enc.encode(text), text


def test_matches_tiktoken_on_varied_text(tok: MllamaTokenizer) -> None:
    tiktoken = pytest.importorskip("tiktoken")
    from tiktoken.load import load_tiktoken_bpe

    enc = tiktoken.Encoding("llama3", pat_str=LLAMA3_SPLIT_PATTERN,
                            mergeable_ranks=load_tiktoken_bpe(str(MODEL_FILE)), special_tokens={})
    for text in TEXTS + _random_texts(200, 0):
        assert tok.encode(text, add_special_tokens=False) == enc.encode(text), repr(text)


def test_conversion_errors(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="tiktoken model"):
        convert_tiktoken_tokenizer(tmp_path / "missing.model", tmp_path / "out")
    bad = tmp_path / "bad.model"
    bad.write_text("IQ== 0\nnot-base64!! 1\n")
    with pytest.raises(ValueError, match="bad.model:2"):
        convert_tiktoken_tokenizer(bad, tmp_path / "out")
    gap = tmp_path / "gap.model"
    gap.write_text("IQ== 0\nIg== 5\n")
    with pytest.raises(ValueError, match="contiguous"):
        convert_tiktoken_tokenizer(gap, tmp_path / "out")


# ---- parity with transformers -------------------------------------------------------------------------------------
def test_encode_decode_match_transformers(tok: MllamaTokenizer, hf_tok) -> None:
    texts = TEXTS + ["<|image|>Describe<|eot_id|>", "a<|begin_of_text|>b", "<|python_tag|>{\"x\": 1}"]
    for text in texts:
        for special in (True, False):
            assert tok.encode(text, add_special_tokens=special) == hf_tok.encode(text, add_special_tokens=special)
        ids = tok.encode(text)
        for skip in (True, False):
            assert tok.decode(ids, skip_special_tokens=skip) == hf_tok.decode(ids, skip_special_tokens=skip)
    assert tok.convert_ids_to_tokens([9906, 128256]) == hf_tok.convert_ids_to_tokens([9906, 128256])


@pytest.mark.parametrize("kwargs", [
    dict(padding=True), dict(padding=True, padding_side="left"), dict(padding="max_length", max_length=24),
    dict(truncation=True, max_length=5), dict(truncation=True, max_length=5, padding=True, padding_side="left"),
    dict(padding=True, add_special_tokens=False), dict(padding=True, return_tensors="pt"),
    dict(padding=True, return_tensors="np"),
])
def test_batch_call_matches_transformers(tok: MllamaTokenizer, hf_tok, kwargs: dict) -> None:
    texts = ["Hello world! This is a test.", "hi", "<|image|>If I had to write a haiku for this one"]
    ours, theirs = tok(texts, **kwargs), hf_tok(texts, **kwargs)
    assert list(ours) == ["input_ids", "attention_mask"]
    for key in ours:
        a, b = ours[key], theirs[key]
        assert type(a) is type(b), key
        assert (a == b) if isinstance(a, list) else np.array_equal(np.asarray(a), np.asarray(b)), key
        if hasattr(a, "dtype"):
            assert a.dtype == b.dtype
    single = tok("Hello world!")
    assert single["input_ids"] == hf_tok("Hello world!")["input_ids"] and single.attention_mask == [1, 1, 1, 1]
    for return_tensors in ("pt", "np"):  # a single text still gets a batch dimension
        ours, theirs = tok("Hello world!", return_tensors=return_tensors), hf_tok("Hello world!",
                                                                              return_tensors=return_tensors)
        assert ours["input_ids"].shape == theirs["input_ids"].shape == (1, 4)
        assert ours["attention_mask"].tolist() == theirs["attention_mask"].tolist()


def test_bos_follows_tokenizer_json(tok: MllamaTokenizer, hf_tok, tmp_path: Path) -> None:
    """Whether encode() adds BOS is decided by tokenizer.json's post-processor, as in transformers."""
    assert hf_tok.encode("Hello world! This is a test.") == HELLO
    batch = tok(["Hello world! This is a test.", "hi"], truncation=True, max_length=3)
    assert batch["input_ids"] == hf_tok(["Hello world! This is a test.", "hi"], truncation=True,
                                        max_length=3)["input_ids"] == [[128000, 9906, 1917], [128000, 6151]]
    # The add_bos=False variant differs from the faithful files only in the post-processor.
    tiny = _tiny_tiktoken(tmp_path / "tokenizer.model")
    faithful = convert_tiktoken_tokenizer(tiny, tmp_path / "bos")
    plain = convert_tiktoken_tokenizer(tiny, tmp_path / "plain", add_bos=False)
    assert not plain.adds_bos_token and plain.encode("hello world") == [259, 263, 108, 100]
    assert faithful.encode("hello world") == [264, 259, 263, 108, 100]
    hf_plain = type(hf_tok).from_pretrained(tmp_path / "plain")
    assert hf_plain.encode("hello world") == [259, 263, 108, 100] and hf_plain("hi")["input_ids"] == plain("hi")["input_ids"]
    files = {}
    for name in ("bos", "plain"):
        data = json.loads((tmp_path / name / "tokenizer.json").read_text())
        files[name] = (data.pop("post_processor"), data)
    assert files["bos"][1] == files["plain"][1]
    assert files["plain"][0] == {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": False,
                                 "use_regex": True}
    assert files["bos"][0]["processors"][0] == files["plain"][0]
    assert [(p.name, p.read_bytes()) for p in sorted((tmp_path / "bos").iterdir()) if p.name != "tokenizer.json"] \
        == [(p.name, p.read_bytes()) for p in sorted((tmp_path / "plain").iterdir()) if p.name != "tokenizer.json"]


# ---- decoding and streaming -----------------------------------------------------------------------------------------
def test_decode_round_trip_and_input_types(tok: MllamaTokenizer) -> None:
    for text in TEXTS + _random_texts(50, 2):
        assert tok.decode(tok.encode(text, add_special_tokens=False)) == text
    ids = tok.encode(BOS + "<|image|>Hi there<|eot_id|>", add_special_tokens=False)
    assert tok.decode(ids) == BOS + "<|image|>Hi there<|eot_id|>"
    assert tok.decode(ids, skip_special_tokens=True) == "Hi there"
    assert tok.decode(torch.tensor(ids)) == tok.decode(np.array(ids)) == tok.decode(ids)
    assert tok.decode(9906) == "Hello"
    batch = torch.tensor([ids, ids])
    assert tok.batch_decode(batch, skip_special_tokens=True) == ["Hi there", "Hi there"]
    with pytest.raises(TypeError, match="flat sequence"):
        tok.decode([[1, 2], [3]])
    with pytest.raises(TypeError, match="list of id sequences"):
        tok.batch_decode(5)


def test_stream_detokenizer_never_splits_characters(tok: MllamaTokenizer) -> None:
    text = "Emoji 🤖🎉👩‍👩‍👧 and CJK 中文字符 日本語 𝔘𝔫𝔦 done."
    ids = tok.encode(text, add_special_tokens=False)
    # The text must really put multi-byte characters across token boundaries for this test to mean anything.
    assert any("\ufffd" in tok.decode([i]) for i in ids)
    for skip in (False, True):
        stream = tok.stream(skip_special_tokens=skip)
        full = [tok.bos_token_id, *ids, tok.eos_token_id]
        chunks = [stream.put(i) for i in full] + [stream.finish()]
        assert "" in chunks[:-1]  # something was held back
        assert all("\ufffd" not in c for c in chunks)
        assert "".join(chunks) == tok.decode(full, skip_special_tokens=skip)
    # Several ids at once, a tensor, and a genuinely invalid byte (a lone continuation byte) at the end.
    lone = tok.convert_tokens_to_ids("\u0100")  # byte 0x00 in the byte-level alphabet; valid, control char
    broken = tok.convert_tokens_to_ids("Ģ")  # byte 0x80 alone: decodes to U+FFFD
    stream = StreamDetokenizer(tok)
    parts = [stream.put(torch.tensor(ids[:5])), stream.put(ids[5:]), stream.put([lone, broken])]
    parts.append(stream.finish())
    assert "".join(parts) == tok.decode(ids + [lone, broken]) and parts[-1].endswith("\ufffd")


# ---- I/O ------------------------------------------------------------------------------------------------------------
def test_save_load_round_trip(tok: MllamaTokenizer, tmp_path: Path, hf_tok) -> None:
    tok.save_pretrained(tmp_path / "saved")
    again = MllamaTokenizer.from_pretrained(tmp_path / "saved")
    assert {p.name for p in (tmp_path / "saved").iterdir()} == {"tokenizer.json", "tokenizer_config.json",
                                                                "special_tokens_map.json"}
    for text in TEXTS:
        assert again.encode(text) == tok.encode(text)
    assert (again.bos_token, again.eos_token, again.pad_token, again.image_token_id) == (
        tok.bos_token, tok.eos_token, tok.pad_token, tok.image_token_id)
    assert again.chat_template == tok.chat_template and again.model_max_length == 131072
    theirs = type(hf_tok).from_pretrained(tmp_path / "saved")
    assert theirs.encode("Hello <|image|> world") == again.encode("Hello <|image|> world")
    assert theirs.eos_token_id == again.eos_token_id and theirs.chat_template == again.chat_template


def test_special_tokens_come_from_the_files(tok: MllamaTokenizer, tmp_path: Path) -> None:
    tok.save_pretrained(tmp_path / "d")
    config_file = tmp_path / "d" / "tokenizer_config.json"
    config = json.loads(config_file.read_text())
    config["eos_token"] = {"content": "<|eom_id|>"}  # the older AddedToken-dict form
    del config["bos_token"]  # then special_tokens_map.json supplies it
    config["padding_side"] = "left"
    config_file.write_text(json.dumps(config))
    (tmp_path / "d" / "chat_template.jinja").write_text("{{ bos_token }}custom")
    loaded = MllamaTokenizer.from_pretrained(tmp_path / "d")
    assert (loaded.eos_token_id, loaded.bos_token_id, loaded.padding_side) == (128008, 128000, "left")
    assert loaded.chat_template == "{{ bos_token }}custom"  # the .jinja file wins over the config entry
    assert loaded(["a", "a b c"], padding=True)["input_ids"][0][:2] == [128004, 128004]


def test_tokenizer_errors(tok: MllamaTokenizer, tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        MllamaTokenizer.from_pretrained(tmp_path / "nowhere")
    with pytest.raises(TypeError, match="encode expects a str"):
        tok.encode(["a"])  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="list of str"):
        tok([1, 2])  # type: ignore[list-item]
    with pytest.raises(ValueError, match="padding must be"):
        tok(["a"], padding="sideways")
    with pytest.raises(ValueError, match="padding_side"):
        tok(["a"], padding=True, padding_side="middle")
    with pytest.raises(ValueError, match="different lengths"):
        tok(["a", "a b c"], return_tensors="pt")
    with pytest.raises(ValueError, match="return_tensors"):
        tok(["a"], return_tensors="tf")
    with pytest.raises(ValueError, match="not in the tokenizer vocabulary"):
        MllamaTokenizer(tok.backend_tokenizer, bos_token="<s>", eos_token=None)
    no_pad = MllamaTokenizer(tok.backend_tokenizer, bos_token=BOS, eos_token=None, pad_token=None)
    with pytest.raises(ValueError, match="pad_token"):
        no_pad(["a", "a b"], padding=True)
