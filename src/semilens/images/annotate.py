"""annotate_images: captions and VQA pairs per image, every answer backed by a measurement.

Reads ``<paths.interim_images>/records.jsonl`` (ingest) and
``<paths.measurements>/measurements.jsonl`` (measure); writes
``<paths.annotations>/annotations.jsonl``: one line per image with a caption and at least
``min_questions`` question-answer pairs of different types. Each pair names the record and
measurement fields its answer was computed from (``grounding``), so any answer can be
re-checked against the numbers behind it. Run: ``python -m stages.annotate_images``.

The ``grounded`` backend is offline and deterministic: the phrasing of each question and
caption is picked from several templates by a hash of (seed, image id, question type), so
the dataset has varied wording but the same inputs always give the same bytes. The
``vlm`` backend has a vision-language model rephrase them from the image and drops what
contradicts a measurement (see semilens.images.annotate_vlm). Either way
``<paths.metrics>/annotate.json`` says how many pairs each wrote.

Wording rules every template keeps: the picture is named with the article its modality is
spoken with ("an SEM image", "a TEM image", "a STEM image", "a FIB-SEM image", "a
micrograph" when the modality is unknown); rods (measure's ``rods``, or a label naming
them) are rods with a width, a length and an aspect ratio, never wires; without a pixel
size every length is in px and the answer says the pixel size is not known; an
unlabelled image is described by what measure found. ``tests/test_annotate_wording.py``
checks each question kind's answer against one rule per kind.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from semilens.cache import ItemCache, code_version
from semilens.config import Config
from semilens.images.records import ImageRecord, Measurement, QuarantineEntry
from semilens.io import read_jsonl, reset_dir, write_json, write_jsonl

# The per-image cache is keyed by this code (templates, answer rules, record schema).
VERSION = code_version(__name__, "semilens.images.records")

# What the measure stage's method means for a person reading the answer. "elongated" is
# measure's class for long objects of unknown kind (wires, fibres, tubes); "rods" is its
# class for short, stiff ones, whose length is part of their size.
METHOD_NOUN = {
    "particles": ("particle", "particles"),
    "elongated": ("wire", "wires"),
    "rods": ("rod", "rods"),
    "periodic_lines": ("line", "lines"),
    "periodic_holes": ("hole", "holes"),
    "porous": ("pore", "pores"),
    "cracks": ("crack", "cracks"),
    "grains": ("grain", "grains"),
}
LABEL_NOUN = {
    "particles": ("particle", "particles"),
    "nanowires": ("nanowire", "nanowires"),
    "nanorods": ("nanorod", "nanorods"),
    "rods": ("rod", "rods"),
    "fibres": ("fibre", "fibres"),
    "porous": ("pore", "pores"),
    "cracked_film": ("crack", "cracks"),
    "lines": ("line", "lines"),
    "holes": ("hole", "holes"),
    "grains": ("grain", "grains"),
}
# The class answer of an unlabelled image: a noun phrase for what measure found (its
# method names such as "periodic_lines" are identifiers, not answers).
METHOD_CLASS = {
    "particles": "particles",
    "elongated": "wires",
    "rods": "rods",
    "periodic_lines": "a line/space grating",
    "periodic_holes": "a hole array",
    "porous": "a porous structure",
    "cracks": "a film with cracks",
    "grains": "a polycrystalline grain structure",
}
# What measure's area_fraction is, per method (for grains it is the boundary network).
AREA_FRACTION_NAME = {
    "grains": "grain-boundary area fraction",
    "periodic_lines": "line duty cycle",
    "periodic_holes": "hole area fraction",
}
LABEL_PHRASE = {
    "particles": "particles",
    "nanowires": "nanowires",
    "nanorods": "nanorods",
    "rods": "rods",
    "fibres": "fibres",
    "porous": "a porous sponge",
    "cracked_film": "a film with cracks",
    "lines": "a line/space grating",
    "holes": "a hole array",
    "grains": "a polycrystalline grain structure",
}
# Labels that are no label: what a blank CSV cell or a careless sidecar leaves behind.
NO_LABEL = frozenset({"", "none", "null", "nan", "unknown", "unlabelled", "unlabeled"})
# Electron-microscopy modalities a closed modality question may list (ingest writes these
# and "unknown"; any other string is still named as given).
ELECTRON_MODALITIES = ("SEM", "TEM", "STEM", "FIB-SEM")
# Letters whose spoken name opens with a vowel sound (ess, eff, aitch, em, en, ...): an
# initialism read letter by letter takes "an" before them: "an SEM", but "a TEM".
VOWEL_SOUND_LETTERS = frozenset("AEFHILMNORSX")
# Initialisms read as one word take the article of that word: "a STEM" (stem), "a FIB-SEM"
# (fib). Everything else in capitals is read letter by letter.
READ_AS_WORD = frozenset({"STEM", "FIB"})
# Methods whose objects are measured across (width), not by an equivalent diameter.
WIDTH_METHODS = ("elongated", "rods", "periodic_lines", "cracks")
ORIENTATION_SPREAD_ALIGNED_DEG = 15.0
ELONGATED_ASPECT = 2.5
ROUND_CIRCULARITY = 0.75


def indefinite_article(phrase: str) -> str:
    """ "a" or "an" for ``phrase`` as it is spoken: "an SEM image", "a TEM image",
    "a STEM image", "a FIB-SEM image", "a micrograph", "an elongated rod"."""
    first = re.split(r"[\s/-]", phrase.strip(), maxsplit=1)[0].strip("\"'(")
    if first.isalpha() and first.isupper() and len(first) > 1 and first not in READ_AS_WORD:
        return "an" if first[0] in VOWEL_SOUND_LETTERS else "a"
    word = first.lower()
    # "u" sounds like "you" in uni-, use-, usu- ("a uniform film"); "one" like "won".
    if word.startswith(("uni", "use", "usu", "one")):
        return "a"
    return "an" if word[:1] in ("a", "e", "i", "o", "u") else "a"


def with_article(phrase: str) -> str:
    return f"{indefinite_article(phrase)} {phrase}"


def modality_phrase(modality: object, noun: str = "image") -> str:
    """How a caption names the picture: "SEM image", "STEM image"; "micrograph" when the
    modality is unknown. ``modality`` is taken as a string, so a value newer than
    ``records.Modality`` is named as it is."""
    name = str(modality or "").strip()
    if name.lower() in ("", "unknown", "none"):
        return "micrograph"
    return f"{name} {noun}"


def _capitalise(text: str) -> str:
    return text[:1].upper() + text[1:]


@dataclass(frozen=True)
class QA:
    """One question-answer pair; ``value``/``unit`` are the machine-checkable answer."""

    type: str
    question: str
    answer: str
    value: float | str | None
    unit: str | None
    grounding: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return {
            "type": self.type,
            "question": self.question,
            "answer": self.answer,
            "value": self.value,
            "unit": self.unit,
            "grounding": self.grounding,
        }


def choose_phrasing(options: Sequence[str], *key: object) -> str:
    """Deterministic choice among phrasings (Python's hash() is salted per process)."""
    digest = hashlib.sha256("|".join(map(str, key)).encode()).digest()
    return options[int.from_bytes(digest[:4], "big") % len(options)]


def fmt_number(x: float) -> str:
    """Human rounding that stays checkable: 2 significant figures, integers above 100."""
    if x >= 100:
        return str(int(round(x)))
    if x >= 10:
        return f"{x:.0f}"
    if x >= 1:
        return f"{x:.1f}"
    return f"{x:.2g}"


NO_SCALE = "the pixel size is not known, so no physical size"


def _length(px: float | None, nm: float | None, rec: ImageRecord) -> tuple[str, float, str]:
    """A length as text, value and unit: nm (µm from 1000 nm) when the record's pixel size
    is known, else px. The record decides, not the measurement: an image without a pixel
    size never gets a length in nm."""
    if rec.pixel_size_nm is not None:
        if nm is None and px is not None:
            nm = px * rec.pixel_size_nm
        if nm is not None:
            value = float(fmt_number(nm))
            if nm >= 1000:
                return f"{fmt_number(nm / 1000)} µm", value, "nm"
            return f"{fmt_number(nm)} nm", value, "nm"
    assert px is not None
    return f"{fmt_number(px)} px", float(fmt_number(px)), "px"


def _label(rec: ImageRecord) -> str | None:
    """The record's label, or None when it has none (a "None"/"nan" string is none)."""
    if rec.label is None or rec.label.strip().lower() in NO_LABEL:
        return None
    return rec.label


def _label_names_rods(label: str | None) -> bool:
    """Whether the label calls the objects rods: "rods", "nanorods", "Au_nanorods" (not
    "electrode", which only contains the letters)."""
    if not label:
        return False
    words = re.split(r"[^a-z]+", label.lower())
    return any(w.endswith(("rod", "rods")) and w not in ("prod", "prods") for w in words)


def _is_rods(rec: ImageRecord, m: Measurement) -> bool:
    return m.method == "rods" or _label_names_rods(_label(rec))


def _nouns(rec: ImageRecord, m: Measurement) -> tuple[str, str]:
    label = _label(rec)
    if _is_rods(rec, m):
        # Rods are never wires, whatever measure or the folder calls the rest.
        nano = label is not None and "nanorod" in label.lower()
        return ("nanorod", "nanorods") if nano else ("rod", "rods")
    if label in LABEL_NOUN:
        return LABEL_NOUN[label]
    return METHOD_NOUN.get(m.method, ("object", "objects"))


def _count_nouns(rec: ImageRecord, m: Measurement) -> tuple[str, str]:
    """What the count counts: measure counts cracks as connected networks, not segments."""
    if m.method == "cracks":
        return ("crack network", "crack networks")
    return _nouns(rec, m)


def _morphology(rec: ImageRecord, m: Measurement) -> tuple[str, str, dict[str, Any]]:
    """The morphology class as answer text, value and where it came from: a label if there
    is one, else the analysis the measure stage chose (named as a reader would)."""
    label = _label(rec)
    if label:
        return label, label, {"label": label, "label_source": rec.label_source}
    phrase = METHOD_CLASS.get(m.method, m.method.replace("_", " "))
    return phrase, m.method, {"method": m.method}


@dataclass(frozen=True)
class Size:
    """The size an expert would quote: ``what`` of the objects, in px and (maybe) nm; for
    rods also their length, since a rod's width alone does not describe it."""

    what: str
    px: float
    nm: float | None
    fields: dict[str, Any]
    length_px: float | None = None
    length_nm: float | None = None


def _size_fields(rec: ImageRecord, m: Measurement) -> Size | None:
    """Width and length for rods; width for elongated objects, lines and cracks; grain size
    for grains; equivalent diameter otherwise."""
    width = {"width_px": m.width_px, "width_nm": m.width_nm}
    if _is_rods(rec, m) and m.width_px is not None and m.length_px is not None:
        fields = {**width, "length_px": m.length_px, "length_nm": m.length_nm}
        return Size("width and length", m.width_px, m.width_nm, fields, m.length_px, m.length_nm)
    if (m.method in WIDTH_METHODS or _is_rods(rec, m)) and m.width_px is not None:
        return Size("width", m.width_px, m.width_nm, width)
    if m.method == "grains" and m.grain_size_px is not None:
        fields = {"grain_size_px": m.grain_size_px, "grain_size_nm": m.grain_size_nm}
        return Size("grain size", m.grain_size_px, m.grain_size_nm, fields)
    if m.median_size_px is not None:
        fields = {"median_size_px": m.median_size_px, "median_size_nm": m.median_size_nm}
        return Size("diameter", m.median_size_px, m.median_size_nm, fields)
    return None


def _size_text(size: Size, rec: ImageRecord) -> tuple[str, float, str]:
    """The size as caption text ("12 nm", "12 nm wide and 60 nm long"), value and unit."""
    text, value, unit = _length(size.px, size.nm, rec)
    if size.length_px is not None:
        length, _, _ = _length(size.length_px, size.length_nm, rec)
        text = f"{text} wide and {length} long"
    return text, value, unit


def _aspect_ratio(m: Measurement) -> float | None:
    if m.aspect_ratio is not None:
        return m.aspect_ratio
    if m.width_px and m.length_px is not None:
        return m.length_px / m.width_px
    return None


def _orientation(m: Measurement) -> tuple[str | None, dict[str, Any]]:
    """ "aligned near 40°" or "randomly oriented" from the orientation spread: objects
    within 15 degrees of each other are aligned."""
    if m.orientation_spread_deg is None:
        return None, {}
    g: dict[str, Any] = {"orientation_spread_deg": m.orientation_spread_deg}
    if m.orientation_spread_deg < ORIENTATION_SPREAD_ALIGNED_DEG and m.orientation_deg is not None:
        g["orientation_deg"] = m.orientation_deg
        return f"aligned near {m.orientation_deg:.0f}°", g
    return "randomly oriented", g


def _shape(rec: ImageRecord, m: Measurement) -> tuple[str, dict[str, Any], bool] | None:
    """A categorical shape answer, its grounding, and whether it is an orientation only.

    Thresholds: aspect ratio > 2.5 is elongated (rods always are, with their aspect ratio
    quoted); circularity >= 0.75 is round, below irregular. With neither, only the
    dominant orientation is known, and the question must ask for that, not for a shape."""
    ar = _aspect_ratio(m)
    if _is_rods(rec, m) and ar is not None:
        grounding: dict[str, Any] = {"aspect_ratio": ar}
        orient, og = _orientation(m)
        text = f"elongated, aspect ratio {fmt_number(ar)}"
        return (f"{text}, {orient}" if orient else text), {**grounding, **og}, False
    if m.aspect_ratio is not None and m.aspect_ratio > ELONGATED_ASPECT:
        orient, og = _orientation(m)
        text = f"elongated, {orient}" if orient else "elongated"
        return text, {"aspect_ratio": m.aspect_ratio, **og}, False
    if m.circularity is not None:
        text = "round" if m.circularity >= ROUND_CIRCULARITY else "irregular"
        return text, {"circularity": m.circularity}, False
    if m.orientation_deg is not None:
        return f"oriented near {m.orientation_deg:.0f}°", {"orientation_deg": m.orientation_deg}, True
    return None


def build_qa(rec: ImageRecord, m: Measurement, seed: int) -> list[QA]:
    """All grounded question-answer pairs an image's measurements support."""
    one, many = _nouns(rec, m)
    key = (seed, rec.id)
    qas: list[QA] = []

    answer, value, g = _morphology(rec, m)
    q = choose_phrasing(
        [
            "What kind of morphology does this micrograph show?",
            "Which morphology class best describes this image?",
            "What type of nanostructure is shown here?",
        ],
        *key,
        "class",
    )
    qas.append(QA("class", q, answer, value, None, g))

    _, counted = _count_nouns(rec, m)
    q = choose_phrasing(
        [
            f"How many {counted} are visible in the image?",
            f"Count the {counted} in this micrograph.",
            f"What is the number of {counted} in the field of view?",
        ],
        *key,
        "count",
    )
    qas.append(QA("count", q, str(m.object_count), m.object_count, None, {"object_count": m.object_count}))

    size = _size_fields(rec, m)
    if size is not None:
        text, value, unit = _size_text(size, rec)
        fields = {**size.fields, "pixel_size_nm": rec.pixel_size_nm}
        if size.length_px is not None:
            ar = _aspect_ratio(m)
            if ar is not None:
                text = f"{text} (aspect ratio {fmt_number(ar)})"
                fields["aspect_ratio"] = ar
            q = choose_phrasing(
                [
                    f"What are the median width and length of the {many}?",
                    f"How wide and how long is a typical {one}?",
                    f"Estimate the median {one} width and length.",
                ],
                *key,
                "size",
            )
        else:
            if unit == "px":
                text = f"about {text} {'wide' if size.what == 'width' else 'across'}"
            # "grain size" already names its object: not "the typical grain grain size"
            own = size.what.startswith(one)
            subject = size.what if own else f"{one} {size.what}"
            q = choose_phrasing(
                [
                    f"What is the median {size.what}?" if own else f"What is the median {size.what} of the {many}?",
                    f"How large is the typical {subject}?",
                    f"Estimate the median {subject}.",
                ],
                *key,
                "size",
            )
        if unit == "px":
            text = f"{text}; {NO_SCALE}"
        qas.append(QA("size", q, text, value, unit, fields))

    if m.pitch_px is not None:
        text, value, unit = _length(m.pitch_px, m.pitch_nm, rec)
        if unit == "px":
            text = f"about {text}; {NO_SCALE}"
        q = choose_phrasing(
            ["What is the pitch of the pattern?", "What is the period of this periodic structure?"],
            *key,
            "pitch",
        )
        grounding = {"pitch_px": m.pitch_px, "pitch_nm": m.pitch_nm, "pixel_size_nm": rec.pixel_size_nm}
        qas.append(QA("pitch", q, text, value, unit, grounding))

    shape = _shape(rec, m)
    if shape is not None:
        text, g, orientation_only = shape
        if orientation_only:
            options = [
                f"In which direction are the {many} oriented?",
                f"What is the dominant orientation of the {many}?",
            ]
        elif m.method in WIDTH_METHODS or _is_rods(rec, m):
            # Asking whether lines or rods are round would be a silly question.
            options = [f"Describe the shape of the {many}.", f"What shape do the {many} have?"]
        else:
            options = [
                f"Describe the shape of the {many}.",
                f"Are the {many} round, irregular or elongated?",
                f"What shape do the {many} have?",
            ]
        q = choose_phrasing(options, *key, "shape")
        qas.append(QA("shape", q, text, text, None, g))

    cover = _coverage(m)
    if cover is not None:
        what, frac, g = cover
        pct = round(100 * frac)
        q = choose_phrasing(
            [
                f"What {what} does the image show?",
                f"Estimate the {what} in percent.",
                f"What is the {what} of this sample?",
            ],
            *key,
            "coverage",
        )
        qas.append(QA("coverage", q, f"{pct}%", float(pct), "%", g))

    qas.append(_modality_qa(rec, key))

    reasoning = _reasoning_qa(rec, m, one, many, key)
    if reasoning is not None:
        qas.append(reasoning)
    return qas


def _coverage(m: Measurement) -> tuple[str, float, dict[str, Any]] | None:
    if m.porosity is not None:
        return "porosity", m.porosity, {"porosity": m.porosity}
    if m.crack_fraction is not None:
        return "crack area fraction", m.crack_fraction, {"crack_fraction": m.crack_fraction}
    if m.area_fraction is not None:
        what = AREA_FRACTION_NAME.get(m.method, "area coverage")
        return what, m.area_fraction, {"area_fraction": m.area_fraction}
    return None


def _modality_qa(rec: ImageRecord, key: tuple[object, ...]) -> QA:
    modality = str(rec.modality or "unknown")
    options = [
        "Which imaging technique was used for this image?",
        "What kind of microscope recorded this image?",
    ]
    # A closed question only where its choices hold the answer (or it is unknown).
    if modality in ELECTRON_MODALITIES or modality == "unknown":
        *first, last = ELECTRON_MODALITIES
        choices = ", ".join(with_article(x) for x in first) + f" or {with_article(last)}"
        options.insert(1, f"Is this {choices} image?")
    q = choose_phrasing(options, *key, "modality")
    grounding: dict[str, Any] = {"modality": modality}
    detector = rec.instrument.get("detector")
    if detector:
        grounding["detector"] = detector
    return QA("modality", q, modality, modality, None, grounding)


def _reasoning_qa(rec: ImageRecord, m: Measurement, one: str, many: str, key: tuple[object, ...]) -> QA | None:
    """A yes/no question whose answer needs a comparison against a measured value.

    The threshold is a round number near the measured value (half or double it, chosen by
    hash) so that both answers occur across the dataset and the model cannot learn a
    constant 'yes'. Sizes are compared in nm only where the record's pixel size is known.
    """
    cover = _coverage(m)
    size = _size_fields(rec, m)
    use_size = size is not None and (cover is None or choose_phrasing(["size", "cover"], *key, "reason-kind") == "size")
    if use_size:
        assert size is not None
        unit = _length(size.px, size.nm, rec)[2]
        measured = size.px if unit == "px" else (size.nm if size.nm is not None else size.px * rec.pixel_size_nm)  # type: ignore[operator]
        what = "width" if size.length_px is not None else size.what
        fields = {k: v for k, v in size.fields.items() if not k.startswith("length_")}
        if unit == "nm" and size.nm is None:
            fields["pixel_size_nm"] = rec.pixel_size_nm
        factor = float(choose_phrasing(["0.5", "2"], *key, "reason-factor"))
        threshold = float(fmt_number(measured * factor))
        answer = "yes" if measured > threshold else "no"
        subject = f"median {what}" if what.startswith(one) else f"median {what} of the {many}"
        q = f"Is the {subject} larger than {fmt_number(threshold)} {unit}?"
        return QA(
            "reasoning",
            q,
            answer,
            answer,
            None,
            {**fields, "threshold": threshold, "threshold_unit": unit},
        )
    if cover is None:
        return None
    what, frac, g = cover
    threshold = choose_phrasing(["10", "25", "50", "75"], *key, "reason-cover")
    answer = "yes" if 100 * frac > float(threshold) else "no"
    q = f"Is the {what} above {threshold}%?"
    return QA("reasoning", q, answer, answer, None, {**g, "threshold_percent": float(threshold)})


def build_caption(rec: ImageRecord, m: Measurement, qas: list[QA], seed: int) -> str:
    """A one- or two-sentence caption assembled from the same grounded measurements.

    The subject is the label's phrase, or for an unlabelled image the objects measure
    found; the picture is "an SEM image", "a STEM image", ... or "a micrograph"."""
    by_type = {qa.type: qa for qa in qas}
    one, many = _nouns(rec, m)
    label = _label(rec)
    if _is_rods(rec, m):
        subject = many
    elif label is None:
        subject = METHOD_CLASS.get(m.method, many)
    else:
        subject = LABEL_PHRASE.get(label, many)
    opening = choose_phrasing(
        [
            f"{_capitalise(with_article(modality_phrase(rec.modality)))} of {subject}",
            f"{_capitalise(modality_phrase(rec.modality, 'micrograph'))} showing {subject}",
            f"{_capitalise(with_article(modality_phrase(rec.modality, 'view')))} of {subject}",
        ],
        seed,
        rec.id,
        "caption",
    )
    c_one, c_many = _count_nouns(rec, m)
    n = m.object_count
    parts = [f"no {c_many}" if n == 0 else f"{n} {c_many if n != 1 else c_one}"]
    size = _size_fields(rec, m)
    if "size" in by_type and size is not None:
        text = _size_text(size, rec)[0]
        # "median 16 nm wide and 72 nm long" for rods, "median width 12 nm" otherwise
        parts.append(f"median {text}" if size.length_px is not None else f"median {size.what} {text}")
    if "pitch" in by_type:
        parts.append(f"pitch {_length(m.pitch_px, m.pitch_nm, rec)[0]}")
    if "shape" in by_type:
        parts.append(by_type["shape"].answer)
    if "coverage" in by_type:
        parts.append(f"{by_type['coverage'].answer} {_coverage(m)[0]}")  # type: ignore[index]
    scale = (
        f" Pixel size {fmt_number(rec.pixel_size_nm)} nm."
        if rec.pixel_size_nm is not None
        else " Pixel size unknown; sizes in pixels."
    )
    return f"{opening}: {', '.join(parts)}.{scale}"


def wording_facts(rec: ImageRecord, m: Measurement) -> dict[str, Any]:
    """What a rewritten caption or answer must respect (see annotate_vlm): how to name the
    picture and the objects, and whether lengths may be given in nm."""
    one, many = _nouns(rec, m)
    return {
        "pixel_size_nm": rec.pixel_size_nm,
        "modality": str(rec.modality or "unknown"),
        "picture": with_article(modality_phrase(rec.modality)),
        "objects": many,
        "rods": _is_rods(rec, m),
    }


def annotate_one(rec: ImageRecord, m: Measurement, seed: int) -> dict[str, Any]:
    qas = build_qa(rec, m, seed)
    return {
        "id": rec.id,
        "group": rec.group,
        "label": rec.label,
        "source": rec.source,
        "sha256": rec.sha256,
        "page": rec.page,
        "png": rec.png,
        "caption": build_caption(rec, m, qas, seed),
        "qa": [qa.to_json() for qa in qas],
    }


def annotate_images(cfg: Config) -> dict[str, Any]:
    """Annotate every measured image; returns the run summary (counts, cache stats)."""
    acfg = cfg.annotate_images
    records = {
        r.id: r for r in (ImageRecord.model_validate(x) for x in read_jsonl(cfg.paths.interim_images / "records.jsonl"))
    }
    measurements = [Measurement.model_validate(x) for x in read_jsonl(cfg.paths.measurements / "measurements.jsonl")]
    cache = ItemCache(cfg.paths.cache, "annotate_images", VERSION)
    params = acfg.model_dump(mode="json")
    rows: list[dict[str, Any]] = []
    skipped: list[QuarantineEntry] = []
    for m in sorted(measurements, key=lambda x: x.id):
        rec = records.get(m.id)
        if rec is None:
            raise ValueError(f"measurement {m.id} has no image record: re-run ingest_images")
        if rec.low_information or m.method == "none":
            reason = rec.low_information_reason or "; ".join(m.notes) or "nothing measurable"
            skipped.append(
                QuarantineEntry(
                    source=rec.source, reason=f"not annotated: {reason}", sha256=rec.sha256, stage="annotate_images"
                )
            )
            continue
        key = cache.key(rec.model_dump(mode="json"), m.model_dump(mode="json"), params)
        row = cache.get(key)
        if row is None:
            row = annotate_one(rec, m, acfg.seed)
            if len({qa["type"] for qa in row["qa"]}) < acfg.min_questions:
                skipped.append(
                    QuarantineEntry(
                        source=rec.source,
                        reason=f"not annotated: measurements support only {len(row['qa'])} question types",
                        sha256=rec.sha256,
                        stage="annotate_images",
                    )
                )
                continue
            cache.put(key, row)
        rows.append(row)

    backend: dict[str, Any] = {"backend": "grounded"}
    if acfg.backend == "vlm":
        from semilens.images.annotate_vlm import annotate_with_vlm

        m_by_id = {m.id: m for m in measurements}
        facts = {r["id"]: wording_facts(records[r["id"]], m_by_id[r["id"]]) for r in rows}
        rows, backend = annotate_with_vlm(
            rows, facts, acfg.vlm, cfg.paths.cache, min_success_rate=acfg.min_success_rate
        )
    out = reset_dir(cfg.paths.annotations)
    write_jsonl(out / "annotations.jsonl", rows)
    write_jsonl(out / "skipped.jsonl", [s.model_dump(mode="json") for s in skipped])
    summary = {
        "n_images": len(rows),
        "n_qa": sum(len(r["qa"]) for r in rows),
        "n_skipped": len(skipped),
        **backend,
    }
    write_json(cfg.paths.metrics / "annotate.json", summary)
    return {**summary, "cache": cache.stats()}


def load_annotations(path: Path) -> list[dict[str, Any]]:
    return list(read_jsonl(path / "annotations.jsonl"))
