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
- whatever was dropped, or never came (a request that failed for good), is filled from
  the grounded backend, so the dataset never loses an image or a question type. Every
  pair says who wrote it (``written_by``: ``vlm`` or ``grounded``).

A kept pair takes its ``value``, ``unit`` and ``grounding`` from the measurement, never
from the model.
"""

from __future__ import annotations

import base64
from collections import Counter
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from semilens.config import EndpointConfig
from semilens.openai_client import Client, Request
from semilens.vlm.metrics import (
    DEFAULT_ABS_TOL,
    answer_correct,
    find_quantities,
    normalise_answer,
)

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


def prompt(row: dict[str, Any], png: Path) -> list[dict[str, Any]]:
    """The request for one image: the picture, its measured facts and what to write.

    The facts are the grounded answers; a yes/no comparison can only be checked for the
    threshold that was measured, so its question is given verbatim."""
    facts = "\n".join(f"- {qa['type']}: {qa['answer']}" for qa in row["qa"] if qa["type"] != "reasoning")
    reasoning = next((qa for qa in row["qa"] if qa["type"] == "reasoning"), None)
    types = ", ".join(qa["type"] for qa in row["qa"])
    text = (
        "You annotate electron micrographs for a training set. Measurements of this image:\n"
        f"{facts}\n\n"
        "Write a one- or two-sentence caption, and one question with its answer for each of "
        f"these types: {types}. Ask the questions as a materials scientist would; answer "
        "them from the image and the measurements, and never contradict a measurement."
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
        q for qa in row["qa"] if qa["type"] in ("count", "size", "pitch", "coverage") for q in find_quantities(qa["answer"])
    ]
    if pixel_size_nm is not None:
        known.append((pixel_size_nm, "nm"))
    for value, unit in find_quantities(caption):
        if unit not in (None, "nm", "px", "%"):
            continue  # angles and other units are not measured quantities here
        tol = {None: DEFAULT_ABS_TOL["count"], "%": DEFAULT_ABS_TOL["coverage"]}
        if not any(
            u == unit and abs(v - value) <= tol.get(unit, CAPTION_REL_TOL * abs(v)) + 1e-9 for v, u in known
        ):
            return False
    return True


def merge(row: dict[str, Any], reply: VLMAnnotation | None, pixel_size_nm: float | None, counts: Counter[str]) -> dict[str, Any]:
    """``row`` (the grounded annotation) with the model's verified pairs and caption in
    place of the grounded ones; ``counts`` collects what was kept, dropped and filled."""
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
        if caption_consistent(reply.caption, row, pixel_size_nm):
            caption, caption_by = reply.caption, "vlm"
            counts["caption_from_vlm"] += 1
        else:
            counts["dropped_contradicts_caption"] += 1
    return {**row, "caption": caption, "caption_written_by": caption_by, "qa": qa}


def annotate_with_vlm(
    rows: list[dict[str, Any]],
    pixel_sizes: dict[str, float | None],
    endpoint: EndpointConfig,
    cache_root: Path | None,
    root: Path = Path("."),
) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """The grounded ``rows`` rewritten by the model where it agrees with the measurements,
    and the backend's report (counts and the client's accounting)."""
    client = Client(endpoint, cache_root, cache_stage="annotate_images_vlm")
    outcomes = client.run(
        [Request(prompt(r, root / r["png"]), schema=VLMAnnotation, tag=r["id"]) for r in rows]
    )
    counts: Counter[str] = Counter()
    out = []
    for row, outcome in zip(rows, outcomes):
        if outcome.error is not None:
            counts[f"image_failed_{outcome.error.kind}"] += 1
        out.append(merge(row, outcome.parsed if outcome.ok else None, pixel_sizes.get(row["id"]), counts))  # type: ignore[arg-type]
    report = {
        "backend": "vlm",
        "base_url": endpoint.base_url,
        "model": endpoint.model,
        "images": len(rows),
        "counts": dict(sorted(counts.items())),
        "requests": client.accounting.as_dict(),
    }
    return out, report
