"""A byte-level BPE tokenizer trained locally with `tokenizers`, for the tiny presets.

Real checkpoints bring their own tokenizer; the tiny presets need one that behaves like a
general-purpose model's: byte-level (never an unknown token), the family's pre-tokenizer
regex, the family's special tokens appended after the learned vocabulary. It is trained on
a corpus of general English that ships with Python (standard-library docstrings) plus the
phrasings of the generic pretraining task, so it knows common words but no microscopy in
particular: the domain vocabulary arrives with the fine-tune, as it would for a real base.

``llama3_tokenizer`` wraps such a BPE with Llama-3's special tokens and chat template: the
text preset's tokenizer, and (with ``<|image|>`` added) the Llama-3.2-Vision preset's.
"""

from __future__ import annotations

import inspect
import json
from collections.abc import Iterable
from typing import Any

# The Qwen2 pre-tokenizer split (also used by Llama-3-style byte-level BPEs).
QWEN2_PRETOKENIZE = (
    r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|"""
    r"""\s*[\r\n]+|\s+(?!\S)|\s+"""
)


def general_corpus() -> list[str]:
    """General English from standard-library docstrings: offline and fixed per Python release."""
    import argparse
    import collections
    import datetime
    import fractions
    import json as json_mod
    import pathlib
    import random
    import statistics
    import string
    import textwrap

    lines: list[str] = []
    for mod in (
        argparse,
        collections,
        datetime,
        fractions,
        json_mod,
        pathlib,
        random,
        statistics,
        string,
        textwrap,
        inspect,
    ):
        for _, obj in sorted(inspect.getmembers(mod), key=lambda kv: kv[0]):
            doc = inspect.getdoc(obj)
            if isinstance(doc, str):
                lines.extend(line for line in doc.splitlines() if line.strip())
    # Units and numbers any general model has seen.
    lines += [f"{n} {u}" for n in range(0, 200, 7) for u in ("nm", "µm", "mm", "px", "%", "kV", "°")]
    return lines


def train_bpe(corpus: Iterable[str], vocab_size: int) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """Train a byte-level BPE; returns (vocab, merges) ready for a transformers tokenizer."""
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE(unk_token=None, fuse_unk=False, byte_fallback=False))
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(QWEN2_PRETOKENIZE), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        show_progress=False,
        # every byte is in the alphabet, so no input is ever unknown
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        special_tokens=[],  # specials go after the learned vocabulary, as in the real models
    )
    tok.train_from_iterator(list(corpus), trainer=trainer)
    merges_raw = json.loads(tok.to_str())["model"]["merges"]
    # tokenizers serialises merges as [a, b] lists; transformers wants tuples
    merges = [tuple(m) if isinstance(m, list) else tuple(m.split(" ")) for m in merges_raw]
    return tok.get_vocab(), merges  # type: ignore[return-value]


# Llama-3's special tokens, appended after the learned vocabulary as in the real model.
LLAMA3_SPECIAL_TOKENS = [
    "<|begin_of_text|>",
    "<|end_of_text|>",
    "<|start_header_id|>",
    "<|end_header_id|>",
    "<|eot_id|>",
    "<|finetune_right_pad_id|>",
]

# Meta-Llama-3-8B-Instruct's chat template (it has no system-prompt default and no tools).
LLAMA3_CHAT_TEMPLATE = (
    "{% set loop_messages = messages %}{% for message in loop_messages %}"
    "{% set content = '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'"
    "+ message['content'] | trim + '<|eot_id|>' %}"
    "{% if loop.index0 == 0 %}{% set content = bos_token + content %}{% endif %}"
    "{{ content }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
)


def llama3_tokenizer(
    vocab_size: int,
    corpus: list[str] | None = None,
    extra_special: tuple[str, ...] = (),
    chat_template: str = LLAMA3_CHAT_TEMPLATE,
) -> Any:
    """A Llama-3 style tokenizer: byte-level BPE learned on ``corpus`` (general English by
    default), then Llama-3's special tokens and ``extra_special`` (e.g. Llama-3.2-Vision's
    ``<|image|>``), in that order, after the learned vocabulary."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    special = LLAMA3_SPECIAL_TOKENS + list(extra_special)
    vocab, merges = train_bpe(general_corpus() if corpus is None else corpus, vocab_size)
    n = len(vocab)
    for i, token in enumerate(special):
        vocab[token] = n + i
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, unk_token=None, fuse_unk=False, byte_fallback=False))
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(QWEN2_PRETOKENIZE), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(special)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<|begin_of_text|>",
        eos_token="<|eot_id|>",  # what an instruct Llama-3 stops on
        pad_token="<|finetune_right_pad_id|>",
        model_max_length=4096,
        clean_up_tokenization_spaces=False,
        chat_template=chat_template,
    )
