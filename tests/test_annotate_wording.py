"""How the grounded captions and VQA pairs read: every answer is of the kind its question
asks, modalities take the article they are spoken with, rods are rods, an image without a
pixel size never gets a length in nm, and an unlabelled image is captioned from its
measurement. The records and measurements are hand-made in the schema ingest and measure
write; build_qa/build_caption run on them as the stage does.
"""

from __future__ import annotations

import itertools
import re
from collections import Counter

import pytest

from semilens.images.annotate import (
    METHOD_CLASS,
    annotate_one,
    build_qa,
    indefinite_article,
    wording_facts,
)
from semilens.images.annotate_vlm import VLMAnnotation, merge, prompt, wording_problem
from semilens.images.records import ImageRecord, Measurement
from semilens.scores import find_quantities, parse_quantity

MODALITIES = ("SEM", "TEM", "STEM", "FIB-SEM", "unknown")
SHAPE_WORDS = ("round", "irregular", "elongated")


def record(
    label: str | None = "particles", modality: str = "SEM", px_nm: float | None = 2.0, folder: str = "particles"
) -> ImageRecord:
    rec = ImageRecord(
        id=f"{folder}-{label}-{modality}-{px_nm}-p0",
        source=f"data/raw/images/{folder}/x.tif",
        origin="raw",
        sha256="0" * 64,
        format="TIFF",
        page=0,
        n_pages=1,
        original_width=64,
        original_height=64,
        original_dtype="uint8",
        width=64,
        height=64,
        crop_box=(0, 0, 64, 64),
        databar=None,
        modality="SEM",
        instrument={},
        pixel_size_nm=px_nm,
        pixel_size_source="none" if px_nm is None else "sidecar:json",
        label=label,
        label_source="none" if label is None else "folder",
        group=f"{folder}/x",
        png="x.png",
        png_sha256="0" * 64,
    )
    # model_copy does not validate: STEM and FIB-SEM whether or not records.Modality has them
    return rec.model_copy(update={"modality": modality})


def measurement(method: str, px_nm: float | None, **extra) -> Measurement:
    """A measurement with the fields measure sets for ``method`` (sizes in px, nm if known)."""

    def nm(v: float) -> float | None:
        return None if px_nm is None else v * px_nm

    fields: dict = {
        "particles": dict(
            object_count=37,
            median_size_px=21.0,
            median_size_nm=nm(21.0),
            circularity=0.86,
            aspect_ratio=1.2,
            area_fraction=0.23,
        ),
        "elongated": dict(
            object_count=9,
            median_size_px=6.0,
            median_size_nm=nm(6.0),
            width_px=6.0,
            width_nm=nm(6.0),
            length_px=80.0,
            length_nm=nm(80.0),
            aspect_ratio=13.0,
            orientation_deg=40.0,
            orientation_spread_deg=35.0,
            area_fraction=0.08,
        ),
        "rods": dict(
            object_count=14,
            width_px=8.0,
            width_nm=nm(8.0),
            length_px=36.0,
            length_nm=nm(36.0),
            aspect_ratio=4.5,
            orientation_deg=12.0,
            orientation_spread_deg=9.0,
            area_fraction=0.12,
        ),
        "periodic_lines": dict(
            object_count=12,
            median_size_px=10.0,
            median_size_nm=nm(10.0),
            width_px=10.0,
            width_nm=nm(10.0),
            length_px=60.0,
            length_nm=nm(60.0),
            aspect_ratio=6.0,
            orientation_deg=90.0,
            orientation_spread_deg=0.0,
            area_fraction=0.5,
            pitch_px=20.0,
            pitch_nm=nm(20.0),
        ),
        "periodic_holes": dict(
            object_count=25,
            median_size_px=9.0,
            median_size_nm=nm(9.0),
            circularity=0.9,
            area_fraction=0.2,
            pitch_px=18.0,
            pitch_nm=nm(18.0),
        ),
        "porous": dict(
            object_count=40,
            median_size_px=7.0,
            median_size_nm=nm(7.0),
            circularity=0.6,
            area_fraction=0.35,
            porosity=0.35,
        ),
        # short crack segments: no circularity, aspect ratio below "elongated": only the
        # orientation is known
        "cracks": dict(
            object_count=3,
            median_size_px=3.0,
            median_size_nm=nm(3.0),
            width_px=3.0,
            width_nm=nm(3.0),
            length_px=6.0,
            length_nm=nm(6.0),
            aspect_ratio=2.0,
            orientation_deg=30.0,
            orientation_spread_deg=40.0,
            area_fraction=0.03,
            crack_fraction=0.03,
        ),
        "grains": dict(
            object_count=20,
            median_size_px=30.0,
            median_size_nm=nm(30.0),
            grain_size_px=30.0,
            grain_size_nm=nm(30.0),
            circularity=0.8,
            aspect_ratio=1.3,
            area_fraction=0.1,
        ),
    }[method]
    fields.update(extra)
    return Measurement(id="m", method=method, pixel_size_nm=px_nm, **fields)


METHODS = ("particles", "elongated", "rods", "periodic_lines", "periodic_holes", "porous", "cracks", "grains")
LABELS = {
    "particles": "particles",
    "elongated": "nanowires",
    "rods": "nanorods",
    "periodic_lines": "lines",
    "periodic_holes": "holes",
    "porous": "porous",
    "cracks": "cracked_film",
    "grains": "grains",
}


def cases():
    """(record, measurement) for every method x pixel size known/unknown x modality x
    labelled/unlabelled."""
    for method, px_nm, modality, labelled in itertools.product(METHODS, (2.0, None), MODALITIES, (True, False)):
        label = LABELS[method] if labelled else None
        rec = record(label, modality, px_nm, folder=f"batch7_{method}")
        yield rec, measurement(method, px_nm).model_copy(update={"id": rec.id})


def _lengths(text: str) -> list[tuple[float, str | None]]:
    return [(v, u) for v, u in find_quantities(text) if u in ("nm", "px")]


def check_answer_kind(rec: ImageRecord, m: Measurement, qa) -> None:
    """One rule per question kind: the answer is what the question asks for."""
    q, a = qa.question, qa.answer
    assert q.endswith(("?", ".")) and a.strip(), (q, a)
    if qa.type == "class":
        if rec.label is None:
            assert a == METHOD_CLASS[m.method] and "_" not in a and a not in SHAPE_WORDS, a
        else:
            assert a == rec.label
    elif qa.type == "count":
        assert re.search(r"\b(How many|Count|number of)\b", q), q
        assert a.isdigit() and int(a) == m.object_count, a
    elif qa.type in ("size", "pitch"):
        assert re.search(r"\b(width|diameter|size|wide|large|pitch|period)\b", q), q
        found = _lengths(a)
        unit = "px" if rec.pixel_size_nm is None else "nm"
        assert found and all(u == unit for _, u in found), (unit, a)
        assert qa.unit == unit and found[0][0] == pytest.approx(qa.value), (qa.value, a)
        if unit == "px":
            assert "pixel size is not known" in a, a
        if qa.type == "size" and m.method == "rods":  # width and length, aspect ratio
            assert len(found) == 2 and "aspect ratio" in a, a
    elif qa.type == "shape":
        if re.search(r"\b(orientation|oriented|direction)\b", q):
            assert "oriented" in a and any(u == "deg" for _, u in find_quantities(a)), (q, a)
        else:
            assert re.search(r"\b(shape|round)\b", q), q
            assert any(w in a for w in SHAPE_WORDS), (q, a)
    elif qa.type == "coverage":
        assert re.fullmatch(r"\d+%", a), a
    elif qa.type == "modality":
        assert re.search(r"\b(technique|microscope|image)\b", q), q
        assert a == rec.modality, a
    elif qa.type == "reasoning":
        assert q.startswith("Is ") and q.endswith("?") and a in ("yes", "no"), (q, a)
    else:
        raise AssertionError(f"no rule for question kind {qa.type!r}")


def test_every_answer_is_of_the_kind_its_question_asks():
    kinds: Counter[str] = Counter()
    for rec, m in cases():
        for seed in range(6):  # every phrasing of every template turns up
            for qa in build_qa(rec, m, seed):
                check_answer_kind(rec, m, qa)
                kinds[qa.type] += 1
    assert set(kinds) == {"class", "count", "size", "pitch", "shape", "coverage", "modality", "reasoning"}


def test_a_shape_question_is_never_answered_with_an_orientation():
    rec = record("cracked_film")
    qas = {qa.type: qa for seed in range(6) for qa in build_qa(rec, measurement("cracks", 2.0), seed)}
    shape = qas["shape"]
    assert shape.answer == "oriented near 30°"
    assert "shape" not in shape.question and "orient" in shape.question


@pytest.mark.parametrize(
    ("phrase", "article"),
    [
        ("SEM image", "an"),
        ("TEM image", "a"),
        ("STEM image", "a"),
        ("FIB-SEM image", "a"),
        ("micrograph", "a"),
        ("HRTEM image", "an"),
        ("AFM image", "an"),
        ("elongated rod", "an"),
    ],
)
def test_the_article_follows_how_the_initialism_is_spoken(phrase, article):
    assert indefinite_article(phrase) == article


@pytest.mark.parametrize(
    ("modality", "with_article", "bare"),
    [
        ("SEM", "An SEM", "SEM micrograph"),
        ("TEM", "A TEM", "TEM micrograph"),
        ("STEM", "A STEM", "STEM micrograph"),
        ("FIB-SEM", "A FIB-SEM", "FIB-SEM micrograph"),
        ("unknown", "A micrograph", "Micrograph"),
    ],
)
def test_captions_name_every_modality_with_its_article(modality, with_article, bare):
    rec = record("particles", modality)
    m = measurement("particles", 2.0).model_copy(update={"id": rec.id})
    openings = {annotate_one(rec, m, seed)["caption"].split(":")[0] for seed in range(30)}
    assert {o.split(" of ")[0].split(" showing ")[0] for o in openings} == {
        f"{with_article} image" if modality != "unknown" else with_article,
        f"{with_article} view" if modality != "unknown" else with_article,
        bare,
    }
    bad = re.compile(r"\b(a SEM|an TEM|an STEM|an FIB|unknown|Microscopy)\b", re.IGNORECASE)
    for seed in range(12):
        row = annotate_one(rec, m, seed)
        texts = (
            [row["caption"]]
            + [qa["question"] for qa in row["qa"]]
            + [qa["answer"] for qa in row["qa"] if qa["type"] != "modality"]
        )
        assert not any(bad.search(t) for t in texts), texts


@pytest.mark.parametrize(
    ("label", "method", "one", "many"),
    [
        ("nanorods", "rods", "nanorod", "nanorods"),
        ("rods", "rods", "rod", "rods"),
        (None, "rods", "rod", "rods"),
        ("Au_nanorods", "elongated", "nanorod", "nanorods"),
    ],
)
def test_rods_are_captioned_and_answered_as_rods(label, method, one, many):
    rec = record(label, px_nm=2.0)
    m = measurement("rods", 2.0).model_copy(update={"id": rec.id, "method": method})
    for seed in range(12):
        row = annotate_one(rec, m, seed)
        texts = [row["caption"]] + [qa["question"] for qa in row["qa"]] + [qa["answer"] for qa in row["qa"]]
        assert not any("wire" in t for t in texts), texts
        assert f"14 {many}" in row["caption"]
        assert "16 nm wide and 72 nm long" in row["caption"] and "aspect ratio 4.5" in row["caption"]
        qa = {q["type"]: q for q in row["qa"]}
        assert qa["size"]["answer"] == "16 nm wide and 72 nm long (aspect ratio 4.5)"
        assert qa["size"]["value"] == 16.0 and qa["size"]["unit"] == "nm"
        assert qa["shape"]["answer"] == "elongated, aspect ratio 4.5, aligned near 12°"
        assert many in qa["count"]["question"]


def test_elongated_objects_keep_their_wording():
    rec = record("nanowires")
    row = annotate_one(rec, measurement("elongated", 2.0).model_copy(update={"id": rec.id}), 0)
    qa = {q["type"]: q for q in row["qa"]}
    assert "9 nanowires" in row["caption"] and "nanowires" in qa["count"]["question"]
    assert qa["size"]["answer"] == "12 nm" and qa["shape"]["answer"] == "elongated, randomly oriented"


def test_without_a_pixel_size_no_length_is_in_nm():
    for method in METHODS:
        # even a measurement that carries nm values (written under an older pixel size)
        rec = record(LABELS[method], px_nm=None)
        m = measurement(method, 2.0).model_copy(update={"id": rec.id})
        for seed in range(6):
            row = annotate_one(rec, m, seed)
            texts = [row["caption"]] + [qa["question"] for qa in row["qa"]] + [qa["answer"] for qa in row["qa"]]
            for t in texts:
                assert not re.search(r"\d\s*(nm|µm)\b", t), t
                assert all(u != "nm" for _, u in find_quantities(t)), t
            assert "Pixel size unknown" in row["caption"]
            for qa in row["qa"]:
                if qa["type"] in ("size", "pitch"):
                    assert qa["unit"] == "px" and "the pixel size is not known, so no physical size" in qa["answer"]
                    assert parse_quantity(qa["answer"]) == (qa["value"], "px")
                if qa["type"] == "reasoning" and "threshold_unit" in qa["grounding"]:
                    assert qa["grounding"]["threshold_unit"] == "px" and qa["question"].endswith("px?")
    rec = record("particles", px_nm=None)
    size = next(
        qa
        for qa in build_qa(rec, measurement("particles", None).model_copy(update={"id": rec.id}), 0)
        if qa.type == "size"
    )
    assert size.answer == "about 21 px across; the pixel size is not known, so no physical size"


@pytest.mark.parametrize("label", [None, "None", "nan"])
def test_an_unlabelled_image_is_captioned_from_its_measurement(label):
    for method in METHODS:
        rec = record(label, folder="NFFA_batch7").model_copy(update={"group": "NFFA_batch7/x"})
        m = measurement(method, 2.0).model_copy(update={"id": rec.id})
        for seed in range(6):
            row = annotate_one(rec, m, seed)
            texts = [row["caption"]] + [qa["question"] for qa in row["qa"]] + [qa["answer"] for qa in row["qa"]]
            for t in texts:
                assert "None" not in t and "nan" not in t.split() and "NFFA" not in t and "batch7" not in t, t
            cls = next(qa for qa in row["qa"] if qa["type"] == "class")
            assert cls["answer"] == METHOD_CLASS[method] and cls["grounding"] == {"method": method}
            assert f"{m.object_count} " in row["caption"]


# ---------------------------------------------------------------------------- backend: vlm


def _row_and_facts(rec: ImageRecord, m: Measurement) -> tuple[dict, dict]:
    return annotate_one(rec, m.model_copy(update={"id": rec.id}), 0), wording_facts(rec, m)


def test_the_vlm_prompt_says_how_to_name_the_image_the_objects_and_the_scale(tmp_path):
    png = tmp_path / "x.png"
    png.write_bytes(b"\x89PNG")
    rec = record("nanorods", "SEM", None)
    row, facts = _row_and_facts(rec, measurement("rods", None))
    text = prompt(row, png, facts)[0]["content"][1]["text"]
    assert "Call the image an SEM image." in text
    assert "call them nanorods, never wires" in text
    assert "pixel size is not known" in text and "never in nm" in text
    rec = record("particles", "unknown", 2.0)
    row, facts = _row_and_facts(rec, measurement("particles", 2.0))
    text = prompt(row, png, facts)[0]["content"][1]["text"]
    assert "call the image a micrograph" in text and "px" not in text


def test_wording_problems_are_named():
    stem_rods = wording_facts(record("nanorods", "STEM"), measurement("rods", 2.0))
    assert wording_problem("An STEM image of nanorods.", stem_rods) == "'An STEM' should be 'a STEM'"
    assert wording_problem("A SEM image of nanorods.", stem_rods) == "'A SEM' should be 'an SEM'"
    assert wording_problem("TEM image of nanorods.", stem_rods) == "names TEM but the image is STEM"
    assert wording_problem("Is this an SEM or a STEM image?", stem_rods, question=True) is None
    assert wording_problem("A STEM image of 14 nanowires.", stem_rods) == "calls rods wires"
    assert wording_problem("A STEM image of 14 nanorods.", stem_rods) is None
    fib = wording_facts(record("particles", "FIB-SEM"), measurement("particles", 2.0))
    assert wording_problem("A FIB-SEM image of particles.", fib) is None
    unknown = wording_facts(record("particles", "unknown"), measurement("particles", 2.0))
    assert wording_problem("An SEM image of particles.", unknown) == "names SEM but the image is unknown"


def test_the_vlm_merge_drops_wrong_wording_and_px_sizes_without_the_caveat():
    rec = record("nanorods", "STEM", None)
    m = measurement("rods", None)
    row, facts = _row_and_facts(rec, m)
    truth = {qa["type"]: qa for qa in row["qa"]}
    reply = VLMAnnotation(
        caption="An STEM image of 14 nanorods. Pixel size unknown.",
        qa=[
            {"type": "count", "question": "How many nanowires are there?", "answer": "14"},
            {"type": "size", "question": "How wide are the rods?", "answer": "8 px"},
            {"type": "pitch", "question": "What is the pitch?", "answer": "none"},
            {"type": "class", "question": "What is shown?", "answer": "nanorods"},
        ],
    )
    counts: Counter[str] = Counter()
    out = merge(row, reply, None, counts, facts)
    assert counts["dropped_wording_count"] == 1 and counts["dropped_no_scale_size"] == 1
    assert counts["dropped_wording_caption"] == 1 and counts["qa_from_vlm"] == 1
    assert out["caption"] == row["caption"]
    kept = {qa["type"]: qa for qa in out["qa"]}
    assert kept["size"]["answer"] == truth["size"]["answer"] and kept["class"]["written_by"] == "vlm"
    # the caveat said in the model's own words is enough
    good = VLMAnnotation(
        caption="A STEM image of 14 nanorods, about 8 px wide; pixel size unknown.",
        qa=[
            {
                "type": "size",
                "question": "How wide are the rods?",
                "answer": "About 8 px wide; the pixel size is unknown, so no nm.",
            }
        ],
    )
    counts = Counter()
    out = merge(row, good, None, counts, facts)
    assert counts["qa_from_vlm"] == 1 and counts["caption_from_vlm"] == 1
