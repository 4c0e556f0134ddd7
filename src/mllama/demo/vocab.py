"""Train the demo's small byte-level BPE tokenizer, laid out like the Llama 3.2-Vision Instruct files.

Same pre-tokenizer (the Llama 3 split pattern + byte-level), same post-processor (prepends
`<|begin_of_text|>`, as the published tokenizer.json does), same 256 special tokens in the same order
after the base vocabulary and `<|image|>` last, so the image token id equals the model's text
vocab_size. Only the BPE merges are new: learnt from the demo's questions, answers and chat headers.
"""

from __future__ import annotations

import os
from typing import Iterable

from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers, processors, trainers

from mllama.demo.shapes import corpus
from mllama.tokenizer import (IMAGE_TOKEN, LLAMA3_SPLIT_PATTERN, MllamaTokenizer, default_chat_template,
                              llama3_special_tokens)

BOS, EOS, PAD = "<|begin_of_text|>", "<|eot_id|>", "<|finetune_right_pad_id|>"
# Text the chat template wraps around every conversation, so headers cost few tokens.
_TEMPLATE_TEXT = [
    "user", "assistant", "system", "ipython", "\n\n",
    "Cutting Knowledge Date: December 2023\nToday Date: 26 Jul 2024\n\n",
]
# A little general English so a user's own question does not fall apart into single bytes.
_GENERAL_TEXT = [
    "What is the shape and color of the object in this picture? Please answer in one word.",
    "Is there a shape here? Tell me about the image. Can you see anything? Which one is it?",
    "How many shapes are there? Where is the shape? Is it big or small, left or right, top or bottom?",
]


def train_demo_tokenizer(out_dir: str | os.PathLike, *, texts: Iterable[str] | None = None,
                         vocab_size: int = 512, min_frequency: int = 2) -> MllamaTokenizer:
    """Train on `texts` (default: every question and answer of the shapes task), save in HF layout, return it.

    `vocab_size` counts the base BPE vocabulary (256 byte symbols + merges), not the 257 special tokens.
    Training is deterministic: the same texts give the same files.
    """
    if vocab_size < 256:
        raise ValueError(f"vocab_size must be >= 256 (the byte alphabet), got {vocab_size}")
    lines = list(texts) if texts is not None else corpus()
    lines += _TEMPLATE_TEXT + _GENERAL_TEXT
    backend = Tokenizer(models.BPE(fuse_unk=False, ignore_merges=True))
    backend.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(LLAMA3_SPLIT_PATTERN), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=min_frequency, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), special_tokens=[])
    # Repeat so every line clears min_frequency: merges then follow word structure, not corpus counts.
    backend.train_from_iterator(lines * min_frequency, trainer=trainer)
    base = backend.get_vocab_size(with_added_tokens=False)
    specials = llama3_special_tokens() + [IMAGE_TOKEN]
    backend.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in specials])
    if backend.token_to_id(IMAGE_TOKEN) != base + len(specials) - 1:
        raise RuntimeError("special tokens did not land after the base vocabulary")
    bos_id = backend.token_to_id(BOS)
    backend.post_processor = processors.Sequence([
        processors.ByteLevel(trim_offsets=False),
        processors.TemplateProcessing(single=f"{BOS}:0 $A:0", pair=f"{BOS}:0 $A:0 {BOS}:1 $B:1",
                                      special_tokens=[(BOS, bos_id)]),
    ])
    config = {"clean_up_tokenization_spaces": True, "model_input_names": ["input_ids", "attention_mask"],
              "tokenizer_class": "PreTrainedTokenizerFast"}
    template = default_chat_template()
    tokenizer = MllamaTokenizer(backend, bos_token=BOS, eos_token=EOS, pad_token=PAD, chat_template=template,
                                model_max_length=131072, config=config)
    tokenizer.save_pretrained(out_dir)
    return MllamaTokenizer.from_pretrained(out_dir)
