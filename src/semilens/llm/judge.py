"""The expert-criteria judge of evaluate_llm: an LLM on an OpenAI-compatible server scores
every benchmark answer from 1 to 5 on six criteria.

Reads the rubric shipped in ``semilens/llm/rubric/`` (``system.md``, ``user.md`` and one
``<criterion>.md`` each: plain text for reviewers to read and edit). Writes nothing
itself: ``judge_report`` returns the ``judge`` block of ``metrics/llm.json`` and one
record per judged answer (raw reply included), which evaluate_llm writes to
``<paths.models>/llm/eval/judge.jsonl``.

A reply is accepted only as a JSON object with all six criteria as integers 1..5 (a
```json fence or prose around it is fine). Anything else, and any HTTP error or timeout,
is a failure counted by kind; a failed answer never gets scores.
"""

from __future__ import annotations

import json
import os
import re
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass
from hashlib import sha256
from importlib.resources import files
from pathlib import Path
from string import Template
from typing import Any

from semilens.config import JudgeConfig
from semilens.openai_client import Client, Request, RequestFailed

# key in the reply and the report -> the criterion's name; each key has a rubric file
CRITERIA: dict[str, str] = {
    "clarity": "Clarity & directness",
    "practicality": "Practicality & immediate usability",
    "efficiency": "Efficiency & brevity",
    "logical_flow": "Logical flow & coherence",
    "expert_communication": "Expert-to-expert communication",
    "specificity": "Use of examples & specificity",
}
URL_ENV, MODEL_ENV = "SEMILENS_JUDGE_URL", "SEMILENS_JUDGE_MODEL"


class ReplyError(ValueError):
    """A judge reply that cannot be read as six scores; ``kind`` names the reason."""

    def __init__(self, kind: str, detail: str):
        super().__init__(f"{kind}: {detail}")
        self.kind = kind
        self.detail = detail


@dataclass(frozen=True)
class Rubric:
    system: str
    user: Template
    sha256: str  # of every rubric file, so a score can be traced to the wording it was given

    def messages(self, question: str, reference: str, answer: str) -> list[dict[str, str]]:
        user = self.user.substitute(question=question, reference=reference, answer=answer)
        return [{"role": "system", "content": self.system}, {"role": "user", "content": user}]


def load_rubric(folder: Path | None = None) -> Rubric:
    """The rubric files (the package's own unless ``folder`` is given) as prompts."""
    root = files("semilens.llm").joinpath("rubric") if folder is None else Path(folder)
    names = ("system", "user", *CRITERIA)
    texts = {n: root.joinpath(f"{n}.md").read_text(encoding="utf-8").strip() for n in names}
    criteria = "\n\n".join(texts[k] for k in CRITERIA)
    return Rubric(
        system=Template(texts["system"]).substitute(criteria=criteria),
        user=Template(texts["user"]),
        sha256=sha256(json.dumps(texts, sort_keys=True).encode()).hexdigest(),
    )


_FENCE = re.compile(r"```[A-Za-z]*\s*(.*?)```", re.DOTALL)


def _reply_object(reply: str) -> dict[str, Any] | None:
    """The JSON object in a reply: fenced blocks first, then any ``{...}`` in the prose;
    of several, the one holding the most criteria."""
    decoder = json.JSONDecoder()
    found: list[dict[str, Any]] = []
    for text in [*(m.group(1) for m in _FENCE.finditer(reply)), reply]:
        for start in (i for i, ch in enumerate(text) if ch == "{"):
            try:
                obj, _ = decoder.raw_decode(text, start)
            except json.JSONDecodeError:
                continue
            if isinstance(obj, dict):
                found.append(obj)
    # max keeps the first of equals, so a fenced object wins over the same one in the prose
    return max(found, key=lambda o: sum(k in o for k in CRITERIA), default=None)


def parse_scores(reply: str) -> tuple[dict[str, int], str | None]:
    """Six integer scores 1..5 and the optional rationale; ReplyError otherwise."""
    obj = _reply_object(reply)
    if obj is None:
        raise ReplyError("not_json", f"no JSON object in reply: {reply[:80]!r}")
    missing = [k for k in CRITERIA if k not in obj]
    if missing:
        raise ReplyError("missing_criteria", ", ".join(missing))
    # bool is an int subclass in Python; "4" and 4.0 are refused too rather than guessed at
    wrong_type = {k: obj[k] for k in CRITERIA if type(obj[k]) is not int}
    if wrong_type:
        raise ReplyError("not_integer", json.dumps(wrong_type))
    out_of_range = {k: obj[k] for k in CRITERIA if not 1 <= obj[k] <= 5}
    if out_of_range:
        raise ReplyError("out_of_range", json.dumps(out_of_range))
    rationale = obj.get("rationale")
    return {k: obj[k] for k in CRITERIA}, rationale if isinstance(rationale, str) else None


def resolve_judge(jcfg: JudgeConfig, environ: Mapping[str, str] = os.environ) -> JudgeConfig | None:
    """The judge settings with the environment's overrides; None when no URL is set."""
    url = environ.get(URL_ENV) or jcfg.base_url
    model = environ.get(MODEL_ENV) or jcfg.model
    if not url:
        return None
    if not model:
        raise ValueError(f"a judge URL is set ({url}) but no model: set evaluate_llm.judge.model or {MODEL_ENV}")
    # validated again, so a URL from the environment is checked like one from params.yaml
    return JudgeConfig.model_validate({**jcfg.model_dump(), "base_url": url, "model": model})


def judge_answers(
    predictions: list[dict[str, Any]],
    jcfg: JudgeConfig,
    rubric: Rubric,
    environ: Mapping[str, str] = os.environ,
    cache_root: Path | None = None,
) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """One record per answer (``model``, ``id``, ``difficulty``, ``scores`` or None,
    ``failure`` or None, the raw ``reply``), and the client's accounting. ``jcfg`` must
    be resolved (URL and model set). Predictions carry ``instruction``, ``reference`` and
    ``prediction`` as evaluate_llm writes them. Replies are cached under ``cache_root``
    (None: no cache), so re-judging the same answers costs nothing."""
    assert jcfg.base_url and jcfg.model, "resolve_judge first"
    taken: Counter[str] = Counter()
    chosen = []
    for p in predictions:
        if jcfg.max_items and taken[p["model"]] >= jcfg.max_items:
            continue  # every model lists the benchmark in the same order: same rows judged
        taken[p["model"]] += 1
        chosen.append(p)
    client = Client(jcfg, cache_root, environ, cache_stage="judge")
    outcomes = client.run(
        [Request(rubric.messages(p["instruction"], p["reference"], p["prediction"]), tag=p["id"]) for p in chosen]
    )
    records: list[dict[str, Any]] = []
    for p, outcome in zip(chosen, outcomes):
        rec: dict[str, Any] = {
            "model": p["model"],
            "id": p["id"],
            "difficulty": p["difficulty"],
            "scores": None,
            "rationale": None,
            "failure": None,
            "reply": outcome.text,
        }
        try:
            if outcome.error is not None:
                raise outcome.error
            rec["scores"], rec["rationale"] = parse_scores(outcome.text or "")
        except (RequestFailed, ReplyError) as exc:
            rec["failure"] = {"kind": exc.kind, "detail": exc.detail}
        records.append(rec)
    return records, client.accounting.as_dict()


def summarise(records: list[dict[str, Any]], difficulties: tuple[str, ...]) -> list[dict[str, Any]]:
    """Per model and difficulty (plus ``all``): the mean of each criterion over the judged
    answers (None if none was), how many were judged and failed, and failures by kind."""
    rows = []
    for model in dict.fromkeys(r["model"] for r in records):
        for difficulty in (*difficulties, "all"):
            subset = [r for r in records if r["model"] == model and difficulty in ("all", r["difficulty"])]
            judged = [r["scores"] for r in subset if r["scores"] is not None]
            failures = Counter(r["failure"]["kind"] for r in subset if r["failure"] is not None)
            rows.append(
                {
                    "model": model,
                    "difficulty": difficulty,
                    "n_judged": len(judged),
                    "n_failed": sum(failures.values()),
                    "failures": dict(sorted(failures.items())),
                    **{k: round(sum(s[k] for s in judged) / len(judged), 3) if judged else None for k in CRITERIA},
                }
            )
    return rows


def judge_report(
    predictions: list[dict[str, Any]],
    resolved: JudgeConfig | None,
    difficulties: tuple[str, ...],
    environ: Mapping[str, str] = os.environ,
    cache_root: Path | None = None,
) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """The ``judge`` block of metrics/llm.json and the per-answer records, for settings
    from ``resolve_judge``. None (no judge): the block says so and holds no scores."""
    if resolved is None:
        note = (
            f"no judge configured: the six expert criteria are scored only by an LLM judge server; set base_url and "
            f"model of the endpoint evaluate_llm.judge names (under `endpoints` in params.yaml), or {URL_ENV} and {MODEL_ENV}"
        )
        return {"configured": False, "scores": None, "note": note}, []
    rubric = load_rubric()
    records, accounting = judge_answers(predictions, resolved, rubric, environ, cache_root)
    block = {
        "configured": True,
        "base_url": resolved.base_url,
        "model": resolved.model,
        "rubric_sha256": rubric.sha256,
        "criteria": CRITERIA,
        "scale": [1, 5],
        "items_per_model": max(Counter(r["model"] for r in records).values(), default=0),
        "scores": summarise(records, difficulties),
        "requests": accounting,
    }
    return block, records
