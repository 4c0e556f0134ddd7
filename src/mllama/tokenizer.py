"""Llama 3 byte-level BPE tokenizer (HF `tokenizer.json` layout) and streaming detokenizer (Meta's tiktoken
`tokenizer.model` converts to this layout through mllama.tokenizer_convert)."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np
from tokenizers import Tokenizer

from mllama.batch import BatchEncoding
from mllama.hub import resolve_file
from mllama.tokenizer_extras import TokenizerSurfaceMixin

# Llama 3 pre-tokenizer split pattern (a fact shared by tiktoken's `tokenizer.model` and the HF files).
LLAMA3_SPLIT_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)
IMAGE_TOKEN = "<|image|>"
_NUM_RESERVED = 256
_NAMED_SPECIALS = [
    "<|begin_of_text|>", "<|end_of_text|>", "<|reserved_special_token_0|>", "<|reserved_special_token_1|>",
    "<|finetune_right_pad_id|>", "<|step_id|>", "<|start_header_id|>", "<|end_header_id|>",
    "<|eom_id|>", "<|eot_id|>", "<|python_tag|>",
]
TEMPLATE_PATH = Path(__file__).with_name("templates") / "chat_template.jinja"


def llama3_special_tokens() -> list[str]:
    """Names of ids vocab+0 .. vocab+255 in the HF layout (Meta's `<|image|>` slot is a reserved token here)."""
    reserved = [f"<|reserved_special_token_{i}|>" for i in range(2, 2 + _NUM_RESERVED - len(_NAMED_SPECIALS))]
    return _NAMED_SPECIALS + reserved


def default_chat_template() -> str:
    return TEMPLATE_PATH.read_text(encoding="utf-8")


def write_chat_template_json(directory: Path, template: str) -> None:
    """chat_template.json, the older layout of a processor's template (transformers reads it first)."""
    (directory / "chat_template.json").write_text(json.dumps({"chat_template": template}, indent=2), encoding="utf-8")


def to_tensors(data: dict[str, Any], return_tensors: str | None) -> BatchEncoding:
    """Convert ragged-free nested lists / arrays to "pt" or "np" (int lists become int64)."""
    if return_tensors not in (None, "pt", "np"):
        raise ValueError(f"return_tensors must be None, 'pt' or 'np', got {return_tensors!r}")
    if return_tensors is None:
        return BatchEncoding(data)
    out = BatchEncoding()
    for key, value in data.items():
        if isinstance(value, list):
            lengths = {len(row) for row in value if isinstance(row, list)}
            if len(lengths) > 1:
                raise ValueError(f"cannot make a tensor of {key!r}: sequences have different lengths "
                                 f"{sorted(lengths)}; pass padding=True")
        if return_tensors == "np":
            out[key] = value.numpy() if hasattr(value, "numpy") else np.asarray(value)
            if out[key].dtype.kind in "iub" and key != "pixel_values":
                out[key] = out[key].astype(np.int64)
        else:
            import torch

            out[key] = value if isinstance(value, torch.Tensor) else torch.as_tensor(np.asarray(value))
    return out


def _token_content(value: Any) -> str | None:
    """Special tokens are stored either as plain strings or as AddedToken dicts ({"content": ...})."""
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, dict) and isinstance(value.get("content"), str):
        return value["content"]
    raise ValueError(f"unreadable special token entry {value!r}")


def read_json_object(file: Path) -> dict[str, Any]:
    """A JSON object from `file`; a ValueError naming the file when it is not valid UTF-8 JSON or not an object."""
    try:
        data = json.loads(Path(file).read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ValueError(f"{file} is not valid JSON: {err}") from None
    if not isinstance(data, dict):
        raise ValueError(f"{file} must hold a JSON object, got {type(data).__name__}")
    return data


def check_text(text: str, *, name: str = "text") -> None:
    """Text the tokenizer can encode: a str that is valid Unicode (no lone surrogates)."""
    if not isinstance(text, str):
        raise TypeError(f"{name} must be a str, got {type(text).__name__}")
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as err:
        raise ValueError(f"{name} contains a lone surrogate {text[err.start]!r} at index {err.start}, which is "
                         "not valid Unicode; decode your bytes with errors='replace' first") from None


def _check_id_range(ids: list[int], size: int) -> list[int]:
    if ids and (min(ids) < 0 or max(ids) >= size):
        bad = [i for i in ids if not 0 <= i < size][:5]
        raise ValueError(f"token ids must lie in [0, {size}) (the vocabulary), got {bad}")
    return ids


def _as_id_list(ids: Any) -> list[int]:
    if isinstance(ids, (int, np.integer)):
        return [int(ids)]
    if hasattr(ids, "tolist"):
        ids = ids.tolist()
    if isinstance(ids, int):
        return [ids]
    if not isinstance(ids, (list, tuple)) or not all(isinstance(i, int) for i in ids):
        raise TypeError(f"expected a flat sequence of token ids, got {type(ids).__name__}: {str(ids)[:80]}")
    return list(ids)


class MllamaTokenizer(TokenizerSurfaceMixin):
    """Wraps a `tokenizers.Tokenizer`; special tokens come from the checkpoint files, never from hard-coded ids."""

    def __init__(self, tokenizer: Tokenizer, *, bos_token: str | None, eos_token: str | None,
                 pad_token: str | None = None, image_token: str = IMAGE_TOKEN, chat_template: str | None = None,
                 padding_side: str = "right", truncation_side: str = "right",
                 model_max_length: int | None = None, config: dict[str, Any] | None = None) -> None:
        self._tok = tokenizer
        self.config = dict(config or {})
        for name, token in (("bos_token", bos_token), ("eos_token", eos_token), ("pad_token", pad_token),
                            ("image_token", image_token)):
            if token is not None and tokenizer.token_to_id(token) is None:
                raise ValueError(f"{name} {token!r} is not in the tokenizer vocabulary")
        self.bos_token, self.eos_token, self.pad_token = bos_token, eos_token, pad_token
        self.image_token = image_token
        self.chat_template = chat_template
        if padding_side not in ("left", "right") or truncation_side not in ("left", "right"):
            raise ValueError(f"padding_side/truncation_side must be 'left' or 'right', "
                             f"got {padding_side!r}/{truncation_side!r}")
        self.padding_side, self.truncation_side = padding_side, truncation_side
        self.model_max_length = model_max_length
        self._special_ids = {i for i, t in tokenizer.get_added_tokens_decoder().items() if t.special}

    # ---- loading / saving -------------------------------------------------------------------------------------
    @classmethod
    def from_pretrained(cls, path: str | os.PathLike, *, revision: str | None = None) -> "MllamaTokenizer":
        tok_file = resolve_file(path, "tokenizer.json", revision=revision)
        cfg_file = resolve_file(path, "tokenizer_config.json", revision=revision, required=False)
        map_file = resolve_file(path, "special_tokens_map.json", revision=revision, required=False)
        jinja_file = resolve_file(path, "chat_template.jinja", revision=revision, required=False)
        config = read_json_object(cfg_file) if cfg_file else {}
        special_map = read_json_object(map_file) if map_file else {}
        try:
            backend = Tokenizer.from_file(str(tok_file))
        except Exception as err:  # the tokenizers library raises plain Exception for a malformed file
            raise ValueError(f"{tok_file} is not a valid tokenizer.json: {str(err)[:200]}") from None
        try:
            tokens = {k: _token_content(config.get(k, special_map.get(k))) for k in ("bos_token", "eos_token", "pad_token")}
        except ValueError as err:
            raise ValueError(f"{cfg_file} / {map_file}: {err}") from None
        # BOS/EOS insertion is whatever tokenizer.json's post-processor does; like transformers >= 5 we ignore
        # add_bos_token/add_eos_token in the config when a tokenizer.json is present.
        chat_template = config.get("chat_template")
        if isinstance(chat_template, list):  # [{"name": ..., "template": ...}]
            chat_template = {t["name"]: t["template"] for t in chat_template}.get("default")
        if jinja_file is not None:  # a standalone template file takes priority over the config entry
            chat_template = jinja_file.read_text(encoding="utf-8")
        return cls(backend, **tokens, image_token=_token_content(config.get("image_token")) or IMAGE_TOKEN,
                   chat_template=chat_template, padding_side=config.get("padding_side", "right"),
                   truncation_side=config.get("truncation_side", "right"),
                   model_max_length=config.get("model_max_length"), config=config)

    def save_pretrained(self, save_directory: str | os.PathLike) -> None:
        out = Path(save_directory)
        out.mkdir(parents=True, exist_ok=True)
        self._tok.save(str(out / "tokenizer.json"))
        config = dict(self.config)
        config["added_tokens_decoder"] = {
            str(i): {"content": t.content, "lstrip": t.lstrip, "normalized": t.normalized, "rstrip": t.rstrip,
                     "single_word": t.single_word, "special": t.special}
            for i, t in sorted(self._tok.get_added_tokens_decoder().items())}
        config.update(bos_token=self.bos_token, eos_token=self.eos_token, pad_token=self.pad_token)
        for key in ("padding_side", "truncation_side"):  # the published files leave the default out
            config.pop(key, None)
            if getattr(self, key) != "right":
                config[key] = getattr(self, key)
        config.setdefault("tokenizer_class", "PreTrainedTokenizerFast")
        config.setdefault("model_input_names", ["input_ids", "attention_mask"])
        if self.model_max_length is not None:
            config["model_max_length"] = self.model_max_length
        config.pop("chat_template", None)
        if self.chat_template is not None:
            config["chat_template"] = self.chat_template
        (out / "tokenizer_config.json").write_text(json.dumps(dict(sorted(config.items())), indent=2,
                                                              ensure_ascii=False) + "\n", encoding="utf-8")
        special_map = {k: {"content": v, "lstrip": False, "normalized": False, "rstrip": False, "single_word": False}
                       for k, v in (("bos_token", self.bos_token), ("eos_token", self.eos_token),
                                    ("pad_token", self.pad_token)) if v is not None}
        (out / "special_tokens_map.json").write_text(json.dumps(special_map, indent=2) + "\n", encoding="utf-8")

    # ---- vocabulary ---------------------------------------------------------------------------------------------
    @property
    def backend_tokenizer(self) -> Tokenizer:
        return self._tok

    def _id(self, token: str | None) -> int | None:
        return None if token is None else self._tok.token_to_id(token)

    bos_token_id = property(lambda self: self._id(self.bos_token))
    eos_token_id = property(lambda self: self._id(self.eos_token))
    pad_token_id = property(lambda self: self._id(self.pad_token))
    image_token_id = property(lambda self: self._id(self.image_token))

    @property
    def vocab_size(self) -> int:
        """Size of the base BPE vocabulary, without added tokens (transformers' meaning)."""
        return self._tok.get_vocab_size(with_added_tokens=False)

    def __len__(self) -> int:
        return self._tok.get_vocab_size(with_added_tokens=True)

    def get_vocab(self) -> dict[str, int]:
        return self._tok.get_vocab(with_added_tokens=True)

    @property
    def all_special_ids(self) -> list[int]:
        return sorted(self._special_ids)

    @property
    def special_tokens_map(self) -> dict[str, str]:
        return {k: v for k, v in (("bos_token", self.bos_token), ("eos_token", self.eos_token),
                                  ("pad_token", self.pad_token)) if v is not None}

    @property
    def adds_bos_token(self) -> bool:
        """Whether `encode(..., add_special_tokens=True)` prepends BOS (tokenizer.json's post-processor decides)."""
        ids = self._tok.encode("", add_special_tokens=True).ids
        return bool(ids) and ids[0] == self.bos_token_id

    def convert_tokens_to_ids(self, tokens: str | Sequence[str]) -> int | None | list[int | None]:
        if isinstance(tokens, str):
            return self._tok.token_to_id(tokens)
        return [self._tok.token_to_id(t) for t in tokens]

    def convert_ids_to_tokens(self, ids: int | Sequence[int]) -> str | None | list[str | None]:
        if isinstance(ids, (int, np.integer)):
            return self._tok.id_to_token(int(ids))
        return [self._tok.id_to_token(i) for i in _as_id_list(ids)]

    # ---- encoding -----------------------------------------------------------------------------------------------
    def _backend(self, split_special_tokens: bool) -> Tokenizer:
        """The tokenizer, or a private copy that encodes special-token text as plain text."""
        if not split_special_tokens:
            return self._tok
        plain = getattr(self, "_plain_tok", None)
        if plain is None:
            plain = Tokenizer.from_str(self._tok.to_str())
            plain.encode_special_tokens = True
            self._plain_tok = plain
        return plain

    def encode(self, text: str, *, add_special_tokens: bool = True, return_tensors: str | None = None,
               split_special_tokens: bool = False) -> Any:
        """Token ids; with return_tensors ("pt"/"np") a (1, n) tensor/array, as in transformers.
        split_special_tokens (as in transformers): special-token text such as `<|eot_id|>` written in
        `text` is encoded as ordinary text, so user-typed text cannot inject control tokens."""
        if not isinstance(text, str):
            raise TypeError(f"encode expects a str, got {type(text).__name__}")
        check_text(text)
        ids = self._backend(split_special_tokens).encode(text, add_special_tokens=add_special_tokens).ids
        return ids if return_tensors is None else to_tensors({"input_ids": [ids]}, return_tensors)["input_ids"]

    def __call__(self, text: str | Sequence[str], *, add_special_tokens: bool = True,
                 padding: bool | str = False, padding_side: str | None = None,
                 truncation: bool | str = False, max_length: int | None = None,
                 return_tensors: str | None = None, return_attention_mask: bool = True,
                 split_special_tokens: bool = False, text_target: str | Sequence[str] | None = None,
                 return_offsets_mapping: bool = False) -> BatchEncoding:
        """transformers' tokenizer call. text_target adds `labels` (the targets' ids, encoded alike);
        return_offsets_mapping adds each token's (start, end) characters ((0, 0) for special/padding)."""
        single = isinstance(text, str)
        if text_target is not None and isinstance(text_target, str) != single:
            raise ValueError("text and text_target must both be one str or both lists")
        texts = [text] if single else text
        if not isinstance(texts, (list, tuple)) or not all(isinstance(t, str) for t in texts):
            raise TypeError("text must be a str or a list of str")
        for t in texts:
            check_text(t)
        pad_mode = {True: "longest", False: None, "longest": "longest", "max_length": "max_length",
                    "do_not_pad": None}.get(padding, "bad")
        if pad_mode == "bad":
            raise ValueError(f"padding must be True, False, 'longest', 'max_length' or 'do_not_pad', got {padding!r}")
        do_truncate = {True: True, False: False, "longest_first": True, "only_first": True,
                       "do_not_truncate": False}.get(truncation)
        if do_truncate is None:
            raise ValueError(f"unsupported truncation {truncation!r}")
        side = padding_side or self.padding_side
        if side not in ("left", "right"):
            raise ValueError(f"padding_side must be 'left' or 'right', got {side!r}")
        limit = max_length if max_length is not None else self.model_max_length
        if (do_truncate or pad_mode == "max_length") and limit is None:
            raise ValueError("truncation / padding='max_length' need max_length")

        encodings = self._backend(split_special_tokens).encode_batch(list(texts), add_special_tokens=False)
        ids_list, offsets = [], []
        for enc in encodings:
            if do_truncate:
                budget = limit - (self._tok.num_special_tokens_to_add(False) if add_special_tokens else 0)
                if budget < 0:
                    raise ValueError(f"max_length={limit} is smaller than the special tokens added")
                enc.truncate(budget, direction=self.truncation_side)
            if add_special_tokens:
                enc = self._tok.post_process(enc, add_special_tokens=True)
            ids_list.append(enc.ids)
            offsets.append([tuple(o) for o in enc.offsets])
        masks = [[1] * len(ids) for ids in ids_list]
        if pad_mode is not None:
            target = limit if pad_mode == "max_length" else max(len(ids) for ids in ids_list)
            if self.pad_token_id is None and any(len(ids) < target for ids in ids_list):
                raise ValueError("padding needs a pad_token, and this tokenizer has none")
            for i, ids in enumerate(ids_list):
                fill = target - len(ids)
                if fill > 0:
                    pads, zeros = [self.pad_token_id] * fill, [0] * fill
                    ids_list[i] = pads + ids if side == "left" else ids + pads
                    masks[i] = zeros + masks[i] if side == "left" else masks[i] + zeros
                    blank = [(0, 0)] * fill
                    offsets[i] = blank + offsets[i] if side == "left" else offsets[i] + blank
        data: dict[str, Any] = {"input_ids": ids_list}
        if return_attention_mask:
            data["attention_mask"] = masks
        if return_offsets_mapping:
            data["offset_mapping"] = offsets
        if text_target is not None:
            targets = [text_target] if single else list(text_target)
            data["labels"] = self(targets, add_special_tokens=add_special_tokens, padding=padding,
                                  padding_side=padding_side, truncation=truncation, max_length=max_length,
                                  split_special_tokens=split_special_tokens)["input_ids"]
        if single and return_tensors is None:  # tensors keep the batch dimension, as in transformers
            data = {k: v[0] for k, v in data.items()}
        return to_tensors(data, return_tensors)

    # ---- decoding -----------------------------------------------------------------------------------------------
    def decode(self, ids: Any, *, skip_special_tokens: bool = False,
               clean_up_tokenization_spaces: bool | None = None) -> str:
        """Byte-level decode. clean_up_tokenization_spaces (argument or config) is ignored: it corrupts BPE
        output (transformers >= 5 skips it for BPE models too)."""
        return self._tok.decode(_check_id_range(_as_id_list(ids), len(self)), skip_special_tokens=skip_special_tokens)

    def batch_decode(self, sequences: Any, *, skip_special_tokens: bool = False,
                     clean_up_tokenization_spaces: bool | None = None) -> list[str]:
        if hasattr(sequences, "tolist"):
            sequences = sequences.tolist()
        if not isinstance(sequences, (list, tuple)):
            raise TypeError(f"batch_decode expects a list of id sequences, got {type(sequences).__name__}")
        return self._tok.decode_batch([_check_id_range(_as_id_list(s), len(self)) for s in sequences],
                                      skip_special_tokens=skip_special_tokens)

    def stream(self, *, skip_special_tokens: bool = False) -> "StreamDetokenizer":
        return StreamDetokenizer(self, skip_special_tokens=skip_special_tokens)


class StreamDetokenizer:
    """Feed token ids one at a time (or several), get the newly completed text.

    Text is held back while it ends in U+FFFD (a multi-byte character split across tokens), so no chunk ever
    contains half a character; `finish()` releases whatever is left. The chunks concatenate to `decode(ids)`.
    """

    def __init__(self, tokenizer: MllamaTokenizer, *, skip_special_tokens: bool = False) -> None:
        self._tokenizer = tokenizer
        self._skip = skip_special_tokens
        self._ids: list[int] = []
        self._prefix = 0  # start of the window re-decoded for context
        self._read = 0  # ids before this point have been emitted

    def _decode(self, ids: list[int]) -> str:
        return self._tokenizer.decode(ids, skip_special_tokens=self._skip)

    def put(self, ids: int | Iterable[int]) -> str:
        self._ids.extend(_as_id_list(ids))
        done = self._decode(self._ids[self._prefix:self._read])
        text = self._decode(self._ids[self._prefix:])
        if text.endswith("\ufffd") or len(text) <= len(done) or not text.startswith(done):
            return ""
        self._prefix, self._read = self._read, len(self._ids)
        return text[len(done):]

    def finish(self) -> str:
        done = self._decode(self._ids[self._prefix:self._read])
        text = self._decode(self._ids[self._prefix:])
        self._prefix = self._read = len(self._ids)
        return text[len(done):] if text.startswith(done) else text


AutoTokenizer = MllamaTokenizer
