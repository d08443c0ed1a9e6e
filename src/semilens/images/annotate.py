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
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from semilens.cache import ItemCache, code_version
from semilens.config import Config
from semilens.io import read_jsonl, reset_dir, write_json, write_jsonl
from semilens.records import ImageRecord, Measurement, QuarantineEntry

# The per-image cache is keyed by this code (templates, answer rules, record schema).
VERSION = code_version(__name__, "semilens.records")

# What the measure stage's method means for a person reading the answer.
METHOD_NOUN = {
    "particles": ("particle", "particles"),
    "elongated": ("wire", "wires"),
    "periodic_lines": ("line", "lines"),
    "periodic_holes": ("hole", "holes"),
    "porous": ("pore", "pores"),
    "cracks": ("crack", "cracks"),
    "grains": ("grain", "grains"),
}
LABEL_NOUN = {
    "particles": ("particle", "particles"),
    "nanowires": ("nanowire", "nanowires"),
    "fibres": ("fibre", "fibres"),
    "porous": ("pore", "pores"),
    "cracked_film": ("crack", "cracks"),
    "lines": ("line", "lines"),
    "holes": ("hole", "holes"),
    "grains": ("grain", "grains"),
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
    "fibres": "fibres",
    "porous": "a porous sponge",
    "cracked_film": "a film with cracks",
    "lines": "a line/space grating",
    "holes": "a hole array",
    "grains": "a polycrystalline grain structure",
}


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


def _length(px: float | None, nm: float | None, rec: ImageRecord) -> tuple[str, float, str]:
    """A length as text, value and unit: nm when the pixel size is known, else px."""
    if nm is not None:
        value = float(fmt_number(nm))
        if nm >= 1000:
            return f"{fmt_number(nm / 1000)} µm", value, "nm"
        return f"{fmt_number(nm)} nm", value, "nm"
    assert px is not None
    return f"{fmt_number(px)} px", float(fmt_number(px)), "px"


def _nouns(rec: ImageRecord, m: Measurement) -> tuple[str, str]:
    if rec.label in LABEL_NOUN:
        return LABEL_NOUN[rec.label]
    return METHOD_NOUN.get(m.method, ("object", "objects"))


def _morphology(rec: ImageRecord, m: Measurement) -> tuple[str, dict[str, Any]]:
    """The morphology class with where it came from: a label if there is one, else the
    analysis the measure stage chose."""
    if rec.label:
        return rec.label, {"label": rec.label, "label_source": rec.label_source}
    return m.method, {"method": m.method}


def _shape(m: Measurement) -> tuple[str, dict[str, Any]] | None:
    """A categorical shape/orientation answer with the thresholds documented here:
    aspect ratio > 2.5 is elongated; elongated objects with an orientation spread under
    15 degrees are aligned; circularity >= 0.75 is round."""
    if m.aspect_ratio is not None and m.aspect_ratio > 2.5:
        grounding = {"aspect_ratio": m.aspect_ratio}
        if m.orientation_spread_deg is not None:
            grounding["orientation_spread_deg"] = m.orientation_spread_deg
            if m.orientation_spread_deg < 15 and m.orientation_deg is not None:
                grounding["orientation_deg"] = m.orientation_deg
                return f"elongated, aligned near {m.orientation_deg:.0f}°", grounding
            return "elongated, randomly oriented", grounding
        return "elongated", grounding
    if m.circularity is not None:
        grounding = {"circularity": m.circularity}
        return ("round" if m.circularity >= 0.75 else "irregular"), grounding
    if m.orientation_deg is not None:
        return f"oriented near {m.orientation_deg:.0f}°", {"orientation_deg": m.orientation_deg}
    return None


def build_qa(rec: ImageRecord, m: Measurement, seed: int) -> list[QA]:
    """All grounded question-answer pairs an image's measurements support."""
    one, many = _nouns(rec, m)
    key = (seed, rec.id)
    qas: list[QA] = []

    morph, g = _morphology(rec, m)
    q = choose_phrasing(
        [
            "What kind of morphology does this micrograph show?",
            "Which morphology class best describes this image?",
            "What type of nanostructure is shown here?",
        ],
        *key,
        "class",
    )
    qas.append(QA("class", q, morph, morph, None, g))

    q = choose_phrasing(
        [
            f"How many {many} are visible in the image?",
            f"Count the {many} in this micrograph.",
            f"What is the number of {many} in the field of view?",
        ],
        *key,
        "count",
    )
    qas.append(QA("count", q, str(m.object_count), m.object_count, None, {"object_count": m.object_count}))

    size = _size_fields(m)
    if size is not None:
        what, px, nm, fields = size
        text, value, unit = _length(px, nm, rec)
        # "grain size" already names its object: not "the typical grain grain size"
        subject = what if what.startswith(one) else f"{one} {what}"
        q = choose_phrasing(
            [
                f"What is the median {what} of the {many}?",
                f"How large is the typical {subject}?",
                f"Estimate the median {subject}.",
            ],
            *key,
            "size",
        )
        fields["pixel_size_nm"] = rec.pixel_size_nm
        qas.append(QA("size", q, text, value, unit, fields))

    if m.pitch_px is not None:
        text, value, unit = _length(m.pitch_px, m.pitch_nm, rec)
        q = choose_phrasing(
            ["What is the pitch of the pattern?", "What is the period of this periodic structure?"],
            *key,
            "pitch",
        )
        qas.append(
            QA("pitch", q, text, value, unit, {"pitch_px": m.pitch_px, "pitch_nm": m.pitch_nm})
        )

    shape = _shape(m)
    if shape is not None:
        text, g = shape
        q = choose_phrasing(
            [
                f"Describe the shape of the {many}.",
                f"Are the {many} round, irregular or elongated?",
                f"What shape do the {many} have?",
            ],
            *key,
            "shape",
        )
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

    reasoning = _reasoning_qa(rec, m, many, key)
    if reasoning is not None:
        qas.append(reasoning)
    return qas


def _size_fields(m: Measurement) -> tuple[str, float, float | None, dict[str, Any]] | None:
    """The size an expert would quote for this morphology: width for elongated objects and
    lines, grain size for grains, equivalent diameter otherwise."""
    if m.method in ("elongated", "periodic_lines", "cracks") and m.width_px is not None:
        return "width", m.width_px, m.width_nm, {"width_px": m.width_px, "width_nm": m.width_nm}
    if m.method == "grains" and m.grain_size_px is not None:
        return (
            "grain size",
            m.grain_size_px,
            m.grain_size_nm,
            {"grain_size_px": m.grain_size_px, "grain_size_nm": m.grain_size_nm},
        )
    if m.median_size_px is not None:
        return (
            "diameter",
            m.median_size_px,
            m.median_size_nm,
            {"median_size_px": m.median_size_px, "median_size_nm": m.median_size_nm},
        )
    return None


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
    q = choose_phrasing(
        [
            "Which imaging technique was used for this image?",
            "Is this an SEM or a TEM image?",
            "What kind of microscope recorded this image?",
        ],
        *key,
        "modality",
    )
    answer = rec.modality if rec.modality != "unknown" else "unknown"
    grounding: dict[str, Any] = {"modality": rec.modality}
    detector = rec.instrument.get("detector")
    if detector:
        grounding["detector"] = detector
    return QA("modality", q, answer, answer, None, grounding)


def _reasoning_qa(
    rec: ImageRecord, m: Measurement, many: str, key: tuple[object, ...]
) -> QA | None:
    """A yes/no question whose answer needs a comparison against a measured value.

    The threshold is a round number near the measured value (half or double it, chosen by
    hash) so that both answers occur across the dataset and the model cannot learn a
    constant 'yes'.
    """
    cover = _coverage(m)
    size = _size_fields(m)
    use_size = size is not None and (
        cover is None or choose_phrasing(["size", "cover"], *key, "reason-kind") == "size"
    )
    if use_size:
        assert size is not None
        what, px, nm, fields = size
        measured, unit = (nm, "nm") if nm is not None else (px, "px")
        factor = float(choose_phrasing(["0.5", "2"], *key, "reason-factor"))
        threshold = float(fmt_number(measured * factor))
        answer = "yes" if measured > threshold else "no"
        q = f"Is the median {what} of the {many} larger than {fmt_number(threshold)} {unit}?"
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
    """A one- or two-sentence caption assembled from the same grounded answers."""
    by_type = {qa.type: qa for qa in qas}
    one, many = _nouns(rec, m)
    subject = LABEL_PHRASE.get(rec.label or "", many)
    modality = rec.modality if rec.modality != "unknown" else "Microscopy"
    opening = choose_phrasing(
        [
            f"{modality} image of {subject}",
            f"{modality} micrograph showing {subject}",
            f"A {modality} view of {subject}",
        ],
        seed,
        rec.id,
        "caption",
    )
    parts = [f"{m.object_count} {many if m.object_count != 1 else one}"]
    if "size" in by_type:
        parts.append(f"median {_size_fields(m)[0]} {by_type['size'].answer}")  # type: ignore[index]
    if "pitch" in by_type:
        parts.append(f"pitch {by_type['pitch'].answer}")
    if "shape" in by_type:
        parts.append(f"{by_type['shape'].answer}")
    if "coverage" in by_type:
        parts.append(f"{by_type['coverage'].answer} {_coverage(m)[0]}")  # type: ignore[index]
    scale = (
        f" Pixel size {fmt_number(rec.pixel_size_nm)} nm."
        if rec.pixel_size_nm is not None
        else " Pixel size unknown; sizes in pixels."
    )
    return f"{opening}: {', '.join(parts)}.{scale}"


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
        r.id: r
        for r in (ImageRecord.model_validate(x) for x in read_jsonl(cfg.paths.interim_images / "records.jsonl"))
    }
    measurements = [
        Measurement.model_validate(x)
        for x in read_jsonl(cfg.paths.measurements / "measurements.jsonl")
    ]
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
                QuarantineEntry(source=rec.source, reason=f"not annotated: {reason}", sha256=rec.sha256, stage="annotate_images")
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

        pixel_sizes = {r["id"]: records[r["id"]].pixel_size_nm for r in rows}
        rows, backend = annotate_with_vlm(rows, pixel_sizes, acfg.vlm, cfg.paths.cache)
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
