"""annotate_images with ``backend: vlm``: a vision-language model on an OpenAI-compatible
server writes the caption and the question-answer pairs; the measurements decide what
is kept.

Each image goes to the server once (through ``semilens.openai_client``: concurrent,
retried, cached per request) as a data-URL PNG with its measured facts in the prompt.
The reply must be a JSON object ``{"caption": ..., "qa": [{"type", "question",
"answer"}]}`` (validated with pydantic, re-asked when invalid). Then every answer is
checked against the grounded answer of its type with the evaluation's own
``answer_correct`` (the same tolerances the fine-tuned model is scored with):

- an answer that contradicts a measurement is dropped and counted by type;
- a type the measurements cannot back is dropped as ``unsupported``; a second answer of
  one type as ``duplicate``; a yes/no comparison that does not ask the measured
  threshold as ``unverifiable``;
- a caption is kept only if each of its numbers matches a measured value;
- a caption, question or answer that names the picture or the objects wrongly ("a SEM
  image", a modality other than the record's, rods called wires) is dropped as
  ``wording``, and a length answer in px that does not say the pixel size is unknown as
  ``no_scale``; the prompt asks for both in the first place;
- whatever was dropped, or never came (a request that failed for good), is filled from
  the grounded backend, so the dataset never loses an image or a question type. Every
  pair says who wrote it (``written_by``: ``vlm`` or ``grounded``).

A kept pair takes its ``value``, ``unit`` and ``grounding`` from the measurement, never
from the model.
"""

from __future__ import annotations

import base64
import re
from collections import Counter
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from semilens.config import EndpointConfig
from semilens.images.annotate import ELECTRON_MODALITIES, with_article
from semilens.openai_client import Client, Request
from semilens.scores import (
    DEFAULT_ABS_TOL,
    answer_correct,
    find_quantities,
    normalise_answer,
)
from semilens.stage_runner import StageFailed

QAType = Literal["class", "count", "size", "pitch", "shape", "coverage", "modality", "reasoning"]
CAPTION_REL_TOL = 0.10  # a caption's lengths within 10% of a measured one, as size answers


class VLMQuestion(BaseModel):
    model_config = ConfigDict(extra="forbid")

    type: QAType
    question: str = Field(min_length=5)
    answer: str = Field(min_length=1)


class VLMAnnotation(BaseModel):
    """The JSON object the server must return for one image."""

    model_config = ConfigDict(extra="forbid")

    caption: str = Field(min_length=10)
    qa: list[VLMQuestion] = Field(min_length=1)


def data_url(png: Path) -> str:
    return "data:image/png;base64," + base64.b64encode(Path(png).read_bytes()).decode("ascii")


# Modality names in a text, longest first so "FIB-SEM" and "STEM" are not read as "SEM".
_MODALITY_RE = re.compile(
    r"\b(?:(?P<article>an?)\s+)?(?P<name>"
    + "|".join(re.escape(x) for x in sorted(ELECTRON_MODALITIES, key=len, reverse=True))
    + r")\b",
    re.IGNORECASE,
)
_WIRE_RE = re.compile(r"wires?\b", re.IGNORECASE)
_SCALE_UNKNOWN_RE = re.compile(
    r"pixel size\W+(?:\w+\W+){0,3}(?:not known|unknown|not given|missing)|unknown pixel size|no (?:physical )?scale",
    re.IGNORECASE,
)


def wording_problem(text: str, facts: dict[str, Any] | None, question: bool = False) -> str | None:
    """Why ``text`` names the image or its objects wrongly, or None: a wrong article before
    a modality ("a SEM", "an STEM"), a modality other than the record's (any at all when
    it is unknown; a ``question`` may offer others as choices), or wires on an image of
    rods."""
    if not facts:
        return None
    modality = str(facts.get("modality", "unknown"))
    for m in _MODALITY_RE.finditer(text):
        name = next(x for x in ELECTRON_MODALITIES if x.lower() == m["name"].lower())
        if m["article"] and m["article"].lower() != with_article(name).split()[0]:
            return f"'{m[0]}' should be '{with_article(name)}'"
        if name != modality and not question:
            return f"names {name} but the image is {modality}"
    if facts.get("rods") and _WIRE_RE.search(text):
        return "calls rods wires"
    return None


def prompt(row: dict[str, Any], png: Path, facts: dict[str, Any] | None = None) -> list[dict[str, Any]]:
    """The request for one image: the picture, its measured facts and what to write.

    The facts are the grounded answers; a yes/no comparison can only be checked for the
    threshold that was measured, so its question is given verbatim. ``facts`` (from
    ``annotate.wording_facts``) say how to name the picture and the objects and whether
    lengths may be in nm."""
    measured = "\n".join(f"- {qa['type']}: {qa['answer']}" for qa in row["qa"] if qa["type"] != "reasoning")
    reasoning = next((qa for qa in row["qa"] if qa["type"] == "reasoning"), None)
    types = ", ".join(qa["type"] for qa in row["qa"])
    text = (
        "You annotate electron micrographs for a training set. Measurements of this image:\n"
        f"{measured}\n\n"
        "Write a one- or two-sentence caption, and one question with its answer for each of "
        f"these types: {types}. Ask the questions as a materials scientist would; answer "
        "them from the image and the measurements, and never contradict a measurement."
    )
    if facts:
        if facts.get("modality", "unknown") == "unknown":
            text += " The imaging technique is not known: call the image a micrograph, never SEM or TEM."
        else:
            text += f" Call the image {facts['picture']}."
        if facts.get("rods"):
            text += f" The objects are rods: call them {facts['objects']}, never wires; give their width and length."
        if facts.get("pixel_size_nm") is None:
            text += (
                " The pixel size is not known: give every length in pixels (px), never in nm or µm, "
                "and say in each such answer that the pixel size is not known."
            )
    if reasoning is not None:
        text += f' For type reasoning, ask exactly: "{reasoning["question"]}"'
    text += ' Reply with only a JSON object: {"caption": "...", "qa": [{"type": "...", "question": "...", "answer": "..."}]}'
    return [
        {
            "role": "user",
            "content": [
                {"type": "image_url", "image_url": {"url": data_url(png)}},
                {"type": "text", "text": text},
            ],
        }
    ]


def caption_consistent(caption: str, row: dict[str, Any], pixel_size_nm: float | None) -> bool:
    """Whether every number in ``caption`` matches a measured value of its unit: counts
    within one, percentages within the coverage tolerance, lengths within 10%."""
    known: list[tuple[float, str | None]] = [
        q
        for qa in row["qa"]
        if qa["type"] in ("count", "size", "pitch", "coverage")
        for q in find_quantities(qa["answer"])
    ]
    if pixel_size_nm is not None:
        known.append((pixel_size_nm, "nm"))
    for value, unit in find_quantities(caption):
        if unit not in (None, "nm", "px", "%"):
            continue  # angles and other units are not measured quantities here
        tol = {None: DEFAULT_ABS_TOL["count"], "%": DEFAULT_ABS_TOL["coverage"]}
        if not any(u == unit and abs(v - value) <= tol.get(unit, CAPTION_REL_TOL * abs(v)) + 1e-9 for v, u in known):
            return False
    return True


def merge(
    row: dict[str, Any],
    reply: VLMAnnotation | None,
    pixel_size_nm: float | None,
    counts: Counter[str],
    facts: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """``row`` (the grounded annotation) with the model's verified pairs and caption in
    place of the grounded ones; ``counts`` collects what was kept, dropped and filled.
    ``facts`` (``annotate.wording_facts``) enable the wording checks."""
    grounded = {qa["type"]: qa for qa in row["qa"]}
    kept: dict[str, dict[str, Any]] = {}
    if reply is not None:
        for q in reply.qa:
            truth = grounded.get(q.type)
            if truth is None:
                counts["dropped_unsupported"] += 1
            elif q.type in kept:
                counts["dropped_duplicate"] += 1
            elif q.type == "reasoning" and normalise_answer(q.question) != normalise_answer(truth["question"]):
                counts["dropped_unverifiable"] += 1
            elif not answer_correct(q.answer, truth["answer"], q.type):
                counts[f"dropped_contradicts_{q.type}"] += 1
            elif wording_problem(q.question, facts, question=True) or wording_problem(q.answer, facts):
                counts[f"dropped_wording_{q.type}"] += 1
            elif truth.get("unit") == "px" and not _SCALE_UNKNOWN_RE.search(q.answer):
                # A length in px reads as if it were the size: say why it is not in nm.
                counts[f"dropped_no_scale_{q.type}"] += 1
            else:
                kept[q.type] = {**truth, "question": q.question, "answer": q.answer, "written_by": "vlm"}
                counts["qa_from_vlm"] += 1
    qa = []
    for t, truth in grounded.items():
        if t not in kept:
            counts["qa_filled_from_grounded"] += 1
        qa.append(kept.get(t, {**truth, "written_by": "grounded"}))
    caption, caption_by = row["caption"], "grounded"
    if reply is not None:
        if not caption_consistent(reply.caption, row, pixel_size_nm):
            counts["dropped_contradicts_caption"] += 1
        elif wording_problem(reply.caption, facts):
            counts["dropped_wording_caption"] += 1
        else:
            caption, caption_by = reply.caption, "vlm"
            counts["caption_from_vlm"] += 1
    return {**row, "caption": caption, "caption_written_by": caption_by, "qa": qa}


def check_success_rate(outcomes: list[Any], endpoint: EndpointConfig, min_success_rate: float) -> None:
    """Raise StageFailed when too few requests got an answer from the server.

    Filling a failed image from the grounded backend keeps the dataset whole, but when
    every request fails (a wrong key answered 401, a dead URL) the stage would exit 0 with
    a dataset no model wrote. A reply that came but did not fit the schema counts as
    answered: that is the model's quality, which the per-answer checks already judge,
    not a broken backend.
    """
    if not outcomes:
        return
    answered = sum(1 for o in outcomes if o.ok or o.error.kind == "invalid_output")
    if answered / len(outcomes) >= min_success_rate:
        return
    kinds = Counter(o.error.kind for o in outcomes if not o.ok and o.error.kind != "invalid_output")
    first = next(o.error for o in outcomes if not o.ok and o.error.kind != "invalid_output")
    raise StageFailed(
        f"only {answered} of {len(outcomes)} images got an answer from {endpoint.base_url} "
        f"({answered / len(outcomes):.0%} < annotate_images.min_success_rate {min_success_rate:g}); "
        f"failures: {', '.join(f'{n} {k}' for k, n in kinds.most_common())}; first: {' '.join(first.detail.split())[:200]}. "
        "Check the endpoint's base_url, model and API key, or set min_success_rate: 0 to fill failed images "
        "from the grounded backend"
    )


def annotate_with_vlm(
    rows: list[dict[str, Any]],
    facts: dict[str, dict[str, Any]],
    endpoint: EndpointConfig,
    cache_root: Path | None,
    root: Path = Path("."),
    min_success_rate: float = 0.0,
) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """The grounded ``rows`` rewritten by the model where it agrees with the measurements,
    and the backend's report (counts and the client's accounting). ``facts`` maps an image
    id to ``annotate.wording_facts`` of its record and measurement. StageFailed when fewer
    than ``min_success_rate`` of the images got an answer from the server."""
    client = Client(endpoint, cache_root, cache_stage="annotate_images_vlm")
    outcomes = client.run(
        [Request(prompt(r, root / r["png"], facts.get(r["id"])), schema=VLMAnnotation, tag=r["id"]) for r in rows]
    )
    check_success_rate(outcomes, endpoint, min_success_rate)
    counts: Counter[str] = Counter()
    out = []
    for row, outcome in zip(rows, outcomes):
        if outcome.error is not None:
            counts[f"image_failed_{outcome.error.kind}"] += 1
        f = facts.get(row["id"]) or {}
        out.append(merge(row, outcome.parsed if outcome.ok else None, f.get("pixel_size_nm"), counts, f))  # type: ignore[arg-type]
    report = {
        "backend": "vlm",
        "base_url": endpoint.base_url,
        "model": endpoint.model,
        "images": len(rows),
        "counts": dict(sorted(counts.items())),
        "requests": client.accounting.as_dict(),
    }
    return out, report
