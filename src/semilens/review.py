"""Expert review round trip: a CSV of model outputs out, validated ratings back in.

    semilens review export                 # reviews/<export-id>.csv (+ .items.json beside it)
    semilens review import FILLED.csv      # reviews/ratings.jsonl (DVC-tracked) + metrics/review.json

The export samples the text model's benchmark answers (rated on the judge's six expert
criteria, 1-5) and the fine-tuned VLM's captions and answers (rated on correctness,
relevance and clarity, 1-5). Everything needed to read the ratings back travels in the
manifest beside the CSV: each item's question, reference, answer and what the machine
said about it (the LLM judge's scores, the evaluation's right/wrong), frozen at export
time, so re-running the pipeline later does not change what the expert rated.

The import refuses each bad row with its CSV row number (unknown item, score out of range
or not a whole number, a criterion that does not apply to the item, a half-filled row)
and keeps the good ones. Ratings are merged into ``reviews/ratings.jsonl`` (one line per
item and reviewer; a re-import replaces that reviewer's earlier rating), which ``dvc add``
versions. Agreement between expert and machine is written per criterion: Spearman's rho
and quadratic-weighted Cohen's kappa (for VLM correctness, against the evaluation's own
right/wrong: kappa on the expert's score read as right when 4 or 5).
"""

from __future__ import annotations

import csv
import json
import random
import subprocess
import sys
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from semilens.config import Config
from semilens.io import atomic_write_text, hash_json, read_json, read_jsonl, write_json
from semilens.llm.judge import CRITERIA as LLM_CRITERIA
from semilens.scores import answer_correct

VLM_CRITERIA: dict[str, str] = {
    "correctness": "Correct for this image",
    "relevance": "Answers what was asked",
    "clarity": "Clear and well put",
}
ALL_CRITERIA = list(dict.fromkeys([*LLM_CRITERIA, *VLM_CRITERIA]))
SCALE = (1, 5)
NOT_APPLICABLE = "-"
ID_COLUMNS = ["export_id", "item_id", "kind", "model", "question", "reference", "answer", "image"]
COLUMNS = [*ID_COLUMNS, *ALL_CRITERIA, "reviewer", "comment"]
RIGHT_FROM = 4  # an expert correctness score from here on counts as "right" (kappa vs the metric)


class ReviewError(ValueError):
    """A review file that cannot be used at all (not a bad row: those are reported by number)."""


def criteria_of(kind: str) -> dict[str, str]:
    return dict(LLM_CRITERIA) if kind == "llm" else dict(VLM_CRITERIA)


# ---------------------------------------------------------------- export


def _llm_items(cfg: Config, model: str) -> list[dict[str, Any]]:
    path = Path(cfg.paths.models) / "llm" / "eval" / "predictions.jsonl"
    if not path.is_file():
        return []
    judged = {}
    judge_file = path.parent / "judge.jsonl"
    if judge_file.is_file():
        judged = {(r["model"], r["id"]): r.get("scores") for r in read_jsonl(judge_file)}
    items = []
    for p in read_jsonl(path):
        if p["model"] != model:
            continue
        items.append(
            {
                "item_id": f"llm:{model}:{p['id']}",
                "kind": "llm",
                "model": model,
                "question": p["instruction"],
                "reference": p.get("reference", ""),
                "answer": p["prediction"],
                "image": "",
                "machine": judged.get((model, p["id"])),  # the judge's six scores, or None without a judge
            }
        )
    return items


def _vlm_items(cfg: Config, family: str) -> list[dict[str, Any]]:
    path = Path(cfg.paths.models) / family / "eval" / "predictions.jsonl"
    if not path.is_file():
        return []
    items = []
    for p in read_jsonl(path):
        machine = None
        if p["task"] != "caption":
            machine = {"correctness": int(answer_correct(p["finetuned"], p["reference"], p["question_type"]))}
        items.append(
            {
                "item_id": f"vlm:{family}:{p['id']}",
                "kind": "vlm",
                "model": family,
                "question": p["question"],
                "reference": p["reference"],
                "answer": p["finetuned"],
                "image": p.get("source", ""),
                "machine": machine,  # the evaluation's right (1) / wrong (0); captions have none
            }
        )
    return items


def export_review(
    cfg: Config,
    out_dir: Path,
    n_llm: int,
    n_vlm: int,
    seed: int = 0,
    llm_model: str = "sft",
    families: Iterable[str] | None = None,
) -> dict[str, Any]:
    """Sample items, write ``<out_dir>/<export_id>.csv`` and its ``.items.json`` manifest."""
    rng = random.Random(seed)
    llm = _llm_items(cfg, llm_model)
    vlm = [i for f in (families or cfg.prepare_vlm.bases) for i in _vlm_items(cfg, f)]
    if not llm and not vlm:
        raise ReviewError("nothing to review: no predictions under models/*/eval (run the pipeline first)")
    picked = rng.sample(llm, min(n_llm, len(llm))) + rng.sample(vlm, min(n_vlm, len(vlm)))
    picked.sort(key=lambda i: i["item_id"])
    export_id = (
        "review-" + hash_json({"items": [i["item_id"] for i in picked], "answers": [i["answer"] for i in picked]})[:12]
    )
    out_dir.mkdir(parents=True, exist_ok=True)
    csv_path = out_dir / f"{export_id}.csv"
    if csv_path.exists():
        # the sheet may be half filled in already; a new sample needs another --seed
        raise ReviewError(
            f"{csv_path} exists (the same sample was exported before); fill that one, or pass another --seed"
        )
    with csv_path.open("w", newline="", encoding="utf-8") as fh:
        w = csv.DictWriter(fh, COLUMNS)
        w.writeheader()
        for item in picked:
            applies = criteria_of(item["kind"])
            w.writerow(
                {
                    "export_id": export_id,
                    **{k: item[k] for k in ID_COLUMNS[1:]},
                    **{c: ("" if c in applies else NOT_APPLICABLE) for c in ALL_CRITERIA},
                    "reviewer": "",
                    "comment": "",
                }
            )
    manifest = {
        "export_id": export_id,
        "scale": list(SCALE),
        "seed": seed,
        "criteria": {"llm": LLM_CRITERIA, "vlm": VLM_CRITERIA},
        "items": {i["item_id"]: i for i in picked},
    }
    write_json(out_dir / f"{export_id}.items.json", manifest)
    return {
        "csv": str(csv_path),
        "export_id": export_id,
        "llm_items": sum(i["kind"] == "llm" for i in picked),
        "vlm_items": sum(i["kind"] == "vlm" for i in picked),
    }


# ---------------------------------------------------------------- import


@dataclass
class Imported:
    accepted: list[dict[str, Any]] = field(default_factory=list)
    rejected: list[tuple[int, str]] = field(default_factory=list)  # (CSV row number, reason)
    skipped: int = 0  # rows left blank: not reviewed


def _score(text: str) -> int | None:
    text = text.strip()
    if not text.lstrip("-").isdigit():
        raise ValueError(f"{text!r} is not a whole number")
    value = int(text)
    if not SCALE[0] <= value <= SCALE[1]:
        raise ValueError(f"{value} is outside {SCALE[0]}-{SCALE[1]}")
    return value


def read_ratings(csv_path: Path, manifests: Mapping[str, Mapping[str, Any]], reviewer: str | None = None) -> Imported:
    """Validate a filled CSV row by row. Row numbers count the header as row 1, as a
    spreadsheet shows them."""
    result = Imported()
    try:
        with csv_path.open(newline="", encoding="utf-8-sig") as fh:  # -sig: spreadsheets add a BOM
            reader = csv.DictReader(fh)
            missing = [c for c in ("export_id", "item_id") if c not in (reader.fieldnames or [])]
            if missing:
                raise ReviewError(f"{csv_path}: not a semilens review sheet (no column {', '.join(missing)})")
            rows = list(reader)
    except UnicodeDecodeError as exc:
        raise ReviewError(f"{csv_path}: not UTF-8 text ({exc.reason})") from None
    for number, row in enumerate(rows, start=2):
        export_id, item_id = (row.get("export_id") or "").strip(), (row.get("item_id") or "").strip()
        manifest = manifests.get(export_id)
        if manifest is None:
            result.rejected.append(
                (number, f"unknown export {export_id!r} (no {export_id}.items.json beside the sheet)")
            )
            continue
        item = manifest["items"].get(item_id)
        if item is None:
            result.rejected.append((number, f"unknown item id {item_id!r} in export {export_id}"))
            continue
        applies = criteria_of(item["kind"])
        cells = {c: (row.get(c) or "").strip() for c in ALL_CRITERIA}
        wrong = [c for c in ALL_CRITERIA if c not in applies and cells[c] not in ("", NOT_APPLICABLE)]
        if wrong:
            result.rejected.append((number, f"{', '.join(wrong)} do(es) not apply to a {item['kind']} item"))
            continue
        filled = {c: cells[c] for c in applies if cells[c]}
        if not filled:
            result.skipped += 1
            continue
        blank = [c for c in applies if not cells[c]]
        if blank:
            result.rejected.append((number, f"half-filled: no score for {', '.join(blank)}"))
            continue
        scores, problems = {}, []
        for c, text in filled.items():
            try:
                scores[c] = _score(text)
            except ValueError as exc:
                problems.append(f"{c}: {exc}")
        if problems:
            result.rejected.append((number, "; ".join(problems)))
            continue
        who = (reviewer or row.get("reviewer") or "").strip()
        if not who:
            result.rejected.append((number, "no reviewer named (fill the reviewer column or pass --reviewer)"))
            continue
        result.accepted.append(
            {
                "export_id": export_id,
                "item_id": item_id,
                "kind": item["kind"],
                "model": item["model"],
                "reviewer": who,
                "scores": scores,
                "comment": (row.get("comment") or "").strip(),
                "machine": item.get("machine"),
            }
        )
    return result


def merge_ratings(store: Path, new: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The stored ratings with ``new`` merged in: one per (export, item, reviewer), the newest
    wins. The export is part of the key: a later export may hold a new answer to the same item."""

    def key(r: Mapping[str, Any]) -> tuple[str, str, str]:
        return r["export_id"], r["item_id"], r["reviewer"]

    kept = {key(r): r for r in (read_jsonl(store) if store.is_file() else [])}
    for r in new:
        kept[key(r)] = r
    rows = sorted(kept.values(), key=key)
    atomic_write_text(store, "".join(json.dumps(r, sort_keys=True, ensure_ascii=False) + "\n" for r in rows))
    return rows


def weighted_kappa(a: list[int], b: list[int], labels: list[int]) -> float | None:
    """Cohen's kappa with quadratic weights; None when it is undefined (one rater constant)."""
    from sklearn.metrics import cohen_kappa_score

    if len(a) < 2 or len(set(a)) < 2 or len(set(b)) < 2:
        return None
    value = cohen_kappa_score(a, b, labels=labels, weights="quadratic")
    return None if value != value else round(float(value), 4)  # NaN: no variance at all


def spearman(a: list[float], b: list[float]) -> float | None:
    from scipy.stats import spearmanr

    if len(a) < 3 or len(set(a)) < 2 or len(set(b)) < 2:
        return None  # undefined for constant scores
    return round(float(spearmanr(a, b).statistic), 4)


def agreement(ratings: list[dict[str, Any]]) -> dict[str, Any]:
    """Per kind and criterion: how many items both rated, the expert's mean, and Spearman
    and weighted kappa against the machine's score (None where either is undefined)."""
    out: dict[str, Any] = {}
    for kind, names in (("llm", LLM_CRITERIA), ("vlm", VLM_CRITERIA)):
        rows = [r for r in ratings if r["kind"] == kind]
        per: dict[str, Any] = {}
        for c in names:
            expert = [r["scores"][c] for r in rows if c in r["scores"]]
            pairs = [
                (r["scores"][c], r["machine"][c])
                for r in rows
                if c in r["scores"] and isinstance(r.get("machine"), dict) and r["machine"].get(c) is not None
            ]
            entry: dict[str, Any] = {
                "rated": len(expert),
                "expert_mean": round(sum(expert) / len(expert), 3) if expert else None,
                "paired": len(pairs),
                "spearman": None,
                "weighted_kappa": None,
            }
            if pairs:
                e, m = [p[0] for p in pairs], [p[1] for p in pairs]
                entry["spearman"] = spearman(e, m)
                if kind == "vlm":  # the metric says right/wrong: compare with the expert's verdict
                    entry["weighted_kappa"] = weighted_kappa([int(x >= RIGHT_FROM) for x in e], m, [0, 1])
                else:
                    entry["weighted_kappa"] = weighted_kappa(e, m, list(range(SCALE[0], SCALE[1] + 1)))
            elif expert:
                entry["note"] = (
                    "no judge scores for these items (configure evaluate_llm.judge)"
                    if kind == "llm"
                    else "no automatic score for this criterion"
                )
            per[c] = entry
        out[kind] = {"items": len({r["item_id"] for r in rows}), "ratings": len(rows), "criteria": per}
    return out


def load_manifests(folder: Path) -> dict[str, dict[str, Any]]:
    return {p.name[: -len(".items.json")]: read_json(p) for p in sorted(Path(folder).glob("*.items.json"))}


def dvc_add(path: Path) -> str | None:
    """Version the ratings with DVC when this is a DVC project; returns why not otherwise."""
    if not Path(".dvc").is_dir():
        return "not a DVC project here: the ratings file is written but not versioned"
    res = subprocess.run([sys.executable, "-m", "dvc", "add", "-q", str(path)], capture_output=True, text=True)
    if res.returncode != 0:
        return f"dvc add {path} failed: {res.stderr.strip() or res.stdout.strip()}"
    return None


def import_review(
    cfg: Config, csv_path: Path, reviews_dir: Path, reviewer: str | None = None, version: bool = True
) -> tuple[Imported, dict[str, Any]]:
    """Read a filled sheet, merge the good rows into the store, write metrics/review.json."""
    if not csv_path.is_file():
        raise ReviewError(f"{csv_path}: no such file")
    manifests = {**load_manifests(reviews_dir), **load_manifests(csv_path.parent)}
    if not manifests:
        raise ReviewError(f"no review manifest (*.items.json) in {reviews_dir} or beside {csv_path}: export first")
    result = read_ratings(csv_path, manifests, reviewer)
    store = Path(reviews_dir) / "ratings.jsonl"
    store.parent.mkdir(parents=True, exist_ok=True)
    ratings = merge_ratings(store, result.accepted)
    summary = {
        "store": str(store),
        "ratings": len(ratings),
        "reviewers": sorted({r["reviewer"] for r in ratings}),
        "last_import": {
            "file": csv_path.name,
            "accepted": len(result.accepted),
            "rejected": len(result.rejected),
            "skipped_blank": result.skipped,
        },
        "agreement": agreement(ratings),
    }
    summary["versioned"] = None
    if version:
        why_not = dvc_add(store)
        summary["versioned"] = why_not or f"{store}.dvc"
    write_json(Path(cfg.paths.metrics) / "review.json", summary)
    return result, summary
