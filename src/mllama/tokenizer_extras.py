"""More of transformers' tokenizer surface for MllamaTokenizer: tokenize, pad, add_tokens,
add_special_tokens, all_special_tokens. Mixed into MllamaTokenizer (tokenizer.py)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from tokenizers import AddedToken

SPECIAL_TOKEN_KEYS = ("bos_token", "eos_token", "pad_token", "unk_token")


def cut_after_final_message(prompt: str, conversation: Sequence[Mapping[str, Any]]) -> str:
    """The rendered prompt up to the end of the last message's text (what follows is its end of turn)."""
    content = conversation[-1].get("content")
    if isinstance(content, list):
        texts = [blk.get("text", "") for blk in content if isinstance(blk, Mapping) and blk.get("type") == "text"]
        content = texts[-1] if texts else ""
    text = str(content or "").strip()
    if not text or text not in prompt:
        raise ValueError("continue_final_message needs a last message with text that the template renders")
    return prompt[:prompt.rindex(text) + len(text)]


class TokenizerSurfaceMixin:
    """Needs `_tok` (a tokenizers.Tokenizer), `_special_ids`, `padding_side` and the special token names."""

    _tok: Any
    _special_ids: set[int]

    @property
    def all_special_tokens(self) -> list[str]:
        return [self._tok.id_to_token(i) for i in sorted(self._special_ids)]

    def apply_chat_template(self, conversation: Sequence[Mapping[str, Any]] | Sequence[Sequence[Mapping[str, Any]]],
                            *, tokenize: bool = True, add_generation_prompt: bool = False,
                            continue_final_message: bool = False, return_tensors: str | None = None,
                            return_dict: bool = False, padding: bool | str = False, padding_side: str | None = None,
                            chat_template: str | None = None, tools: list[dict[str, Any]] | None = None,
                            date_string: str | None = None, sanitize_control_tokens: bool = False) -> Any:
        """transformers' tokenizer.apply_chat_template for text conversations: the rendered prompt(s), or
        with tokenize=True (the default, as in transformers) their ids (the template writes the BOS).
        sanitize_control_tokens: control tokens in the messages, tools and date_string are encoded as text
        (mllama.control_tokens; needs tokenize=True)."""
        from mllama.chat_template import render_template
        from mllama.control_tokens import control_tokens, encode_marked, mark_control_tokens
        from mllama.tokenizer import BatchEncoding, default_chat_template

        if continue_final_message and add_generation_prompt:
            raise ValueError("continue_final_message and add_generation_prompt cannot both be set")
        if not isinstance(conversation, (list, tuple)) or not conversation:
            raise TypeError("conversation must be a non-empty list of messages or a list of conversations")
        batched = isinstance(conversation[0], (list, tuple))
        conversations = [list(c) for c in conversation] if batched else [list(conversation)]
        source = chat_template or self.chat_template or default_chat_template()  # type: ignore[attr-defined]
        if sanitize_control_tokens and not tokenize:
            raise ValueError("sanitize_control_tokens=True needs tokenize=True")
        extra = {} if date_string is None else {"date_string": date_string}
        if sanitize_control_tokens:
            tokens = control_tokens(self, source)  # type: ignore[arg-type]
            conversations = [mark_control_tokens(c, tokens) for c in conversations]
            tools, extra = mark_control_tokens(tools, tokens), mark_control_tokens(extra, tokens)
        variables = {**self.special_tokens_map, **extra}  # type: ignore[attr-defined]
        prompts = [render_template(source, messages=conv, tools=tools, documents=None,
                                   add_generation_prompt=add_generation_prompt, **variables) for conv in conversations]
        if continue_final_message:
            prompts = [cut_after_final_message(p, c) for p, c in zip(prompts, conversations)]
        if not tokenize:
            return prompts if batched else prompts[0]
        if sanitize_control_tokens:
            rows = [encode_marked(self, p) for p in prompts]  # type: ignore[arg-type]
            out = self.pad({"input_ids": rows}, padding=padding, padding_side=padding_side,
                           return_tensors=return_tensors)
            if not batched and return_tensors is None:  # one conversation: flat lists, as the tokenizer call gives
                out = BatchEncoding({key: value[0] for key, value in out.items()})
            return out if return_dict else out["input_ids"]
        out = self(prompts if batched else prompts[0], add_special_tokens=False, padding=padding,  # type: ignore[operator]
                   padding_side=padding_side, return_tensors=return_tensors)
        return out if return_dict else out["input_ids"]

    def tokenize(self, text: str, *, add_special_tokens: bool = False) -> list[str]:
        """The token strings of `text` (byte-level BPE pieces, as transformers' tokenize returns them)."""
        if not isinstance(text, str):
            raise TypeError(f"tokenize expects a str, got {type(text).__name__}")
        return self._tok.encode(text, add_special_tokens=add_special_tokens).tokens

    def add_tokens(self, new_tokens: str | Sequence[str], special_tokens: bool = False) -> int:
        """Add tokens to the vocabulary; returns how many were new. Resize the model's embeddings after."""
        tokens = [new_tokens] if isinstance(new_tokens, str) else list(new_tokens)
        if not all(isinstance(t, str) and t for t in tokens):
            raise TypeError("add_tokens takes non-empty strings")
        before = self._tok.get_vocab_size(with_added_tokens=True)
        wrapped = [AddedToken(t, special=special_tokens, normalized=not special_tokens) for t in tokens]
        added = (self._tok.add_special_tokens(wrapped) if special_tokens else self._tok.add_tokens(wrapped))
        if special_tokens:
            self._special_ids.update(self._tok.token_to_id(t) for t in tokens)
        return min(added, self._tok.get_vocab_size(with_added_tokens=True) - before) if added else 0

    def add_special_tokens(self, special_tokens_dict: Mapping[str, Any]) -> int:
        """{"pad_token": "<pad>", "additional_special_tokens": [...]} as in transformers; returns how many
        tokens were new. Named roles (bos/eos/pad) point at the given tokens afterwards."""
        added = 0
        for key, value in special_tokens_dict.items():
            if key == "additional_special_tokens":
                added += self.add_tokens(list(value), special_tokens=True)
            elif key in SPECIAL_TOKEN_KEYS:
                token = str(value)
                added += self.add_tokens([token], special_tokens=True)
                if key != "unk_token":
                    setattr(self, key, token)
            else:
                raise ValueError(f"unknown special token role {key!r}; use one of {SPECIAL_TOKEN_KEYS} or "
                                 "'additional_special_tokens'")
        return added

    def pad(self, encoded_inputs: Any, *, padding: bool | str = True, max_length: int | None = None,
            padding_side: str | None = None, return_tensors: str | None = None,
            return_attention_mask: bool = True) -> Any:
        """Pad already tokenized inputs: a list of {"input_ids": [...]} dicts or one dict of lists."""
        from mllama.tokenizer import to_tensors

        if isinstance(encoded_inputs, Mapping):
            rows = [dict(zip(encoded_inputs, values)) for values in zip(*encoded_inputs.values())]
        else:
            rows = [dict(row) for row in encoded_inputs]
        if not rows or any("input_ids" not in row for row in rows):
            raise ValueError("pad needs a non-empty list of inputs, each with input_ids")
        ids = [list(map(int, row["input_ids"])) for row in rows]
        masks = [list(map(int, row.get("attention_mask", [1] * len(r)))) for row, r in zip(rows, ids)]
        longest = max(len(r) for r in ids)
        target = {True: longest, "longest": longest, "max_length": max_length, False: None,
                  "do_not_pad": None}.get(padding, "bad")
        if target == "bad" or (padding == "max_length" and max_length is None):
            raise ValueError(f"padding must be True, False, 'longest' or 'max_length' (with max_length), "
                             f"got {padding!r}")
        side = padding_side or self.padding_side  # type: ignore[attr-defined]
        pad_id = self.pad_token_id  # type: ignore[attr-defined]
        if target is not None:
            if pad_id is None and any(len(r) < target for r in ids):
                raise ValueError("padding needs a pad_token, and this tokenizer has none")
            for i, row in enumerate(ids):
                fill = max(0, target - len(row))
                ids[i] = [pad_id] * fill + row if side == "left" else row + [pad_id] * fill
                masks[i] = [0] * fill + masks[i] if side == "left" else masks[i] + [0] * fill
        data: dict[str, Any] = {"input_ids": ids}
        if return_attention_mask:
            data["attention_mask"] = masks
        return to_tensors(data, return_tensors)
