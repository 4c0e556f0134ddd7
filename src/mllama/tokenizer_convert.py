"""Meta's tiktoken `tokenizer.model` (base64 tokens and their BPE ranks) to the HF `tokenizer.json` layout
that mllama.tokenizer (and transformers) load: the same ids and splits as tiktoken."""

from __future__ import annotations

import base64
import os
from pathlib import Path

from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers, processors

from mllama.tokenizer import (IMAGE_TOKEN, LLAMA3_SPLIT_PATTERN, MllamaTokenizer, default_chat_template,
                              llama3_special_tokens, write_chat_template_json)


def _byte_alphabet() -> list[str]:
    """Byte -> printable character table of byte-level BPE (printable Latin-1 stays, the rest shifts past 255)."""
    printable = set(range(ord("!"), ord("~") + 1)) | set(range(0xA1, 0xAD)) | set(range(0xAE, 0x100))
    table, shifted = [], 0
    for b in range(256):
        if b in printable:
            table.append(chr(b))
        else:
            table.append(chr(256 + shifted))
            shifted += 1
    return table


def read_tiktoken_ranks(model_file: str | os.PathLike) -> dict[bytes, int]:
    ranks: dict[bytes, int] = {}
    for lineno, line in enumerate(Path(model_file).read_text(encoding="ascii").splitlines(), 1):
        if not line.strip():
            continue
        try:
            token, rank = line.split()
            ranks[base64.b64decode(token, validate=True)] = int(rank)
        except ValueError as exc:
            raise ValueError(f"{model_file}:{lineno}: expected '<base64 token> <rank>', got {line[:60]!r}") from exc
    return ranks


def convert_tiktoken_tokenizer(model_file: str | os.PathLike, out_dir: str | os.PathLike, *,
                               instruct: bool = True, chat_template: str | None = None,
                               add_bos: bool = True) -> MllamaTokenizer:
    """Write an HF-layout tokenizer directory for Meta's tiktoken `tokenizer.model` and return it loaded.

    BPE merges are derived from the ranks: every split of a token into two tokens becomes a merge ranked by the
    merged token's rank (ties by the parts' ranks), so HF's lowest-rank-merge-first loop reproduces tiktoken.
    Like the published tokenizer.json, encoding prepends `<|begin_of_text|>` (the processor still makes exactly
    one BOS); `add_bos=False` writes a variant whose encoding adds nothing.
    """
    if not Path(model_file).is_file():
        raise FileNotFoundError(f"no tiktoken model file at {model_file}")
    ranks = read_tiktoken_ranks(model_file)
    if sorted(ranks.values()) != list(range(len(ranks))):
        raise ValueError(f"{model_file}: ranks are not a contiguous 0..{len(ranks) - 1} range")
    alphabet = _byte_alphabet()
    as_str = {tok: "".join(alphabet[b] for b in tok) for tok in ranks}
    merges = []
    for tok, rank in ranks.items():
        for cut in range(1, len(tok)):
            left, right = tok[:cut], tok[cut:]
            if left in ranks and right in ranks:
                merges.append((rank, ranks[left], ranks[right], as_str[left], as_str[right]))
    merges.sort()
    vocab = {as_str[tok]: rank for tok, rank in ranks.items()}
    backend = Tokenizer(models.BPE(vocab, [(m[3], m[4]) for m in merges], fuse_unk=False, ignore_merges=True))
    backend.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(LLAMA3_SPLIT_PATTERN), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    backend.decoder = decoders.ByteLevel()
    specials = llama3_special_tokens() + [IMAGE_TOKEN]
    backend.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in specials])
    if backend.token_to_id(IMAGE_TOKEN) != len(ranks) + len(specials) - 1:  # the last of them
        raise ValueError("special token ids came out misaligned with the base vocabulary")
    bos = specials[0]
    backend.post_processor = processors.Sequence([  # the published post-processor: BOS before each sequence
        processors.ByteLevel(trim_offsets=False),
        processors.TemplateProcessing(single=f"{bos}:0 $A:0", pair=f"{bos}:0 $A:0 {bos}:1 $B:1",
                                      special_tokens=[(bos, len(ranks))]),
    ]) if add_bos else processors.ByteLevel(trim_offsets=False)
    config = {"clean_up_tokenization_spaces": True, "model_input_names": ["input_ids", "attention_mask"],
              "tokenizer_class": "PreTrainedTokenizerFast"}
    template = (chat_template or default_chat_template()) if instruct else chat_template
    tokenizer = MllamaTokenizer(backend, bos_token=bos,
                                eos_token="<|eot_id|>" if instruct else "<|end_of_text|>",
                                pad_token="<|finetune_right_pad_id|>", chat_template=template,
                                model_max_length=131072, config=config)
    tokenizer.save_pretrained(out_dir)
    if template is not None:  # processors read their template from here (the published layout)
        write_chat_template_json(Path(out_dir), template)
    return tokenizer
