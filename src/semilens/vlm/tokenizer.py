"""A byte-level BPE tokenizer trained locally with `tokenizers`, for the tiny presets.

Real checkpoints bring their own tokenizer; the tiny presets need one that behaves like a
general-purpose model's: byte-level (never an unknown token), the family's pre-tokenizer
regex, the family's special tokens appended after the learned vocabulary. It is trained on
a corpus of general English that ships with Python (standard-library docstrings) plus the
phrasings of the generic pretraining task, so it knows common words but no microscopy in
particular: the domain vocabulary arrives with the fine-tune, as it would for a real base.
"""

from __future__ import annotations

import inspect
import json
from collections.abc import Iterable

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
    for mod in (argparse, collections, datetime, fractions, json_mod, pathlib, random, statistics, string, textwrap, inspect):
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
