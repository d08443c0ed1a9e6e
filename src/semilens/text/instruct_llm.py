"""synth_instructions with ``backend: llm``: a language model on an OpenAI-compatible
server writes question-answer pairs from the corpus and works the etching maths, and
checks decide what enters the dataset.

Two kinds of request go through ``semilens.openai_client`` (concurrent, retried, cached
per request):

- **corpus pairs**: each chunk the template backend would quote (tagged, all its units in
  one split) is sent with the instruction to write questions an engineer would ask and
  answers taken from the chunk alone, as JSON ``{"pairs": [{"category", "difficulty",
  "instruction", "response"}]}`` (validated, re-asked when invalid). A pair is kept only
  if at least ``min_grounding`` of its answer's content words occur in the chunk
  (``ungrounded`` otherwise) and its question is new (``duplicate``). Kept pairs cite the
  chunk (``source: chunk:<id>``) and join the split of the chunk's module, as the
  template's corpus pairs do.
- **maths**: each generated etching problem is sent as it is; the model's worked answer
  replaces the template's only if its final quantity is right within ``math_rel_tol``,
  with units converted, as evaluation scores it (``wrong_answer`` otherwise).

The template pairs stay in the dataset either way, so a server that fails or writes
nothing usable costs nothing but the time; ``metrics/instructions.json`` counts what was
kept and dropped and why, with the request accounting.
"""

from __future__ import annotations

import json
import re
from collections import Counter
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from semilens.config import SynthInstructionsConfig
from semilens.openai_client import Client, Request

PAIRS_PROMPT = (
    "Below is a passage from a semiconductor process document. Write {n} question-answer "
    "pairs that a process engineer would ask a colleague about it. Answer only from the "
    "passage, in its own terms and numbers; categories: concepts (what and why) or "
    "process_control (a parameter out of its window, a defect: causes, checks, actions). "
    'Reply with only a JSON object: {{"pairs": [{{"category": "...", "difficulty": '
    '"easy|medium|hard", "instruction": "...", "response": "..."}}]}}\n\nPassage:\n{text}'
)
MATH_PROMPT = "{question}\nWork it out step by step and end with the result as '= value unit'."
_CONTENT_WORD = re.compile(r"[A-Za-z][A-Za-z0-9-]{3,}")


class LLMPair(BaseModel):
    model_config = ConfigDict(extra="forbid")

    category: Literal["concepts", "process_control"]
    difficulty: Literal["easy", "medium", "hard"]
    instruction: str = Field(min_length=10)
    response: str = Field(min_length=20)


class LLMPairs(BaseModel):
    model_config = ConfigDict(extra="forbid")

    pairs: list[LLMPair] = Field(min_length=1)


def grounding(response: str, source: str) -> float:
    """Share of the response's content words (four letters and up) found in ``source``."""
    said = [w.lower() for w in _CONTENT_WORD.findall(response)]
    if not said:
        return 0.0
    known = {w.lower() for w in _CONTENT_WORD.findall(source)}
    return sum(w in known for w in said) / len(said)


def llm_pairs(
    template: list[dict[str, Any]],
    chunks: dict[str, dict[str, Any]],
    icfg: SynthInstructionsConfig,
    cache_root: Path | None,
    make_pair: Any,
) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """The model's verified pairs (corpus pairs added, maths responses replaced) and the
    backend's report. ``template`` are the template backend's pairs (with ``split``),
    ``chunks`` the corpus chunks by id, ``make_pair`` the template module's pair builder
    (ids and fields stay identical in kind)."""
    from semilens.llm.evaluate import math_correct

    corpus = [p for p in template if p["kind"] == "corpus"]
    maths = [p for p in template if p["category"] == "etch_math"]
    requests = [
        Request(
            [
                {
                    "role": "user",
                    "content": PAIRS_PROMPT.format(
                        n=icfg.llm_pairs_per_chunk, text=chunks[p["source"].removeprefix("chunk:")]["text"]
                    ),
                }
            ],
            schema=LLMPairs,
            tag=p["source"],
        )
        for p in corpus
    ] + [
        Request([{"role": "user", "content": MATH_PROMPT.format(question=p["instruction"])}], tag=p["id"])
        for p in maths
    ]
    client = Client(icfg.llm, cache_root, cache_stage="synth_instructions_llm")
    outcomes = client.run(requests)
    counts: Counter[str] = Counter()
    seen = {p["instruction"] for p in template}
    added: list[dict[str, Any]] = []
    for p, outcome in zip(corpus, outcomes[: len(corpus)]):
        if outcome.error is not None:
            counts[f"chunk_failed_{outcome.error.kind}"] += 1
            continue
        text = chunks[p["source"].removeprefix("chunk:")]["text"]
        for q in outcome.parsed.pairs[: icfg.llm_pairs_per_chunk]:  # type: ignore[union-attr]
            if grounding(q.response, text) < icfg.min_grounding:
                counts["dropped_ungrounded"] += 1
            elif q.instruction in seen:
                counts["dropped_duplicate"] += 1
            else:
                seen.add(q.instruction)
                added.append(
                    {
                        **make_pair(
                            q.category, "llm", q.difficulty, q.instruction, q.response, p["source"], p["group_key"]
                        ),
                        "split": p["split"],
                    }
                )
                counts["pairs_from_llm"] += 1
    replaced = {}
    for p, outcome in zip(maths, outcomes[len(corpus) :]):
        if outcome.error is not None:
            counts[f"math_failed_{outcome.error.kind}"] += 1
        elif math_correct(outcome.text or "", _answer(p), icfg.math_rel_tol):
            replaced[p["id"]] = outcome.text
            counts["math_answers_from_llm"] += 1
        else:
            counts["dropped_wrong_answer"] += 1
    out = []
    for p in template:
        if p["id"] in replaced:
            p = {**p, "response": replaced[p["id"]].strip(), "source": p["source"] + "+llm"}
        out.append(p)
    report = {
        "backend": "llm",
        "base_url": icfg.llm.base_url,
        "model": icfg.llm.model,
        "counts": dict(sorted(counts.items())),
        "requests": client.accounting.as_dict(),
    }
    return out + added, report


def _answer(pair: dict[str, Any]) -> dict[str, Any]:
    return json.loads(pair["answer"])
