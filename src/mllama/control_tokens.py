"""Chats whose user input cannot write control tokens: `apply_chat_template(..., sanitize_control_tokens=True)`.

A chat template writes control tokens (`<|eot_id|>`, `<|start_header_id|>`, `<|image|>`, ...) around
the messages; the same text typed in a message would normally be encoded as those tokens too, so a
user could end their turn, open a system turn or ask for an image that was never given. With the
option, every control token found in a string the caller passes (message values, tools, documents,
extra template variables; not dict keys) is wrapped in two private-use markers before the template
runs. The rendered prompt is then encoded piece by piece: a marked token as ordinary text, the rest
as usual, so only tokens the template wrote itself are control tokens.

The semantics, the marker characters included, are those of transformers' option of the same name,
so both libraries give the same ids. Control tokens are the tokenizer's special tokens, plus the
other added tokens that occur in the template's source. Marker characters already in user strings
are dropped. A template that cuts a marked token apart (with `split()`, say) leaves lone markers:
they are dropped, but still cut the text so the pieces on either side cannot join into a token.
"""

from __future__ import annotations

import re
from functools import lru_cache
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from mllama.tokenizer import MllamaTokenizer

__all__ = ["MARK_END", "MARK_START", "control_tokens", "encode_marked", "mark_control_tokens"]

# Supplementary private use characters: never produced by a tokenizer or a template, and the ones
# transformers uses, so a string holding them is treated the same by both libraries.
MARK_START, MARK_END = "\U000f0000", "\U000f0001"


def control_tokens(tokenizer: MllamaTokenizer, template: str) -> tuple[str, ...]:
    """The added tokens that user strings may not write: all special ones, and the others the template mentions
    (not whitespace tokens, which templates hold as ordinary text)."""
    added = tokenizer.backend_tokenizer.get_added_tokens_decoder().values()
    return tuple(sorted({t.content for t in added
                         if t.special or (t.content in template and not t.content.isspace())}))


@lru_cache(maxsize=8)
def _pattern(tokens: tuple[str, ...]) -> re.Pattern[str]:
    longest_first = sorted(tokens, key=len, reverse=True)  # `<|a|>` must not win over `<|a|>x` when both exist
    return re.compile("|".join(map(re.escape, longest_first)) or "(?!)")


@lru_cache(maxsize=8)
def _marked_pattern(tokens: tuple[str, ...]) -> re.Pattern[str]:
    # One group: split() yields the token of a whole marked token and None for a lone marker.
    return re.compile(f"{MARK_START}({_pattern(tokens).pattern}){MARK_END}|[{MARK_START}{MARK_END}]")


def mark_control_tokens(value: Any, tokens: tuple[str, ...]) -> Any:
    """`value` with every control token in its strings wrapped in the markers (lists, tuples and dict values
    recursively; other objects, images for one, unchanged)."""
    if isinstance(value, str):
        pattern = _pattern(tokens)
        clean = value.replace(MARK_START, "").replace(MARK_END, "")  # no forged markers
        return pattern.sub(lambda m: MARK_START + m.group() + MARK_END, clean)
    if isinstance(value, dict):
        return {key: mark_control_tokens(item, tokens) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [mark_control_tokens(item, tokens) for item in value]
    return value


def encode_marked(tokenizer: MllamaTokenizer, text: str) -> list[int]:
    """Ids of a prompt rendered from marked inputs: marked tokens as plain text, everything else as usual."""
    added = tuple(t.content for t in tokenizer.backend_tokenizer.get_added_tokens_decoder().values())
    pieces = _marked_pattern(added).split(text)
    ids: list[int] = []
    for index, piece in enumerate(pieces):
        if not piece:  # None: a lone marker; "": nothing between two markers
            continue
        if index % 2 == 0:
            ids += tokenizer.encode(piece, add_special_tokens=False)
            continue
        plain = tokenizer.encode(piece, add_special_tokens=False, split_special_tokens=True)
        if tokenizer.convert_tokens_to_ids(piece) in plain:  # would pass through as the token after all
            raise ValueError(f"cannot encode {piece!r} as text: the tokenizer makes the token from its plain text")
        ids += plain
    return ids
