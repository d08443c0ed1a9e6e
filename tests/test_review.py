"""The expert review round trip through the CLI: export a sheet, fill it (bad rows
included), import it into a DVC-versioned ratings file, read the agreement back."""

from __future__ import annotations

import csv
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from semilens.cli import app
from semilens.io import read_json, read_jsonl, write_jsonl
from semilens.llm.judge import CRITERIA
from semilens.review import agreement, spearman, weighted_kappa

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def project(tmp_path, monkeypatch):
    """A project folder with the evaluation outputs a review samples from."""
    shutil.copy(ROOT / "params.yaml", tmp_path / "params.yaml")
    monkeypatch.chdir(tmp_path)
    llm, judged = [], []
    for n in range(4):
        llm.append(
            {
                "model": "sft",
                "id": f"q{n}",
                "difficulty": "easy",
                "instruction": f"Question {n}?",
                "reference": f"Answer {n}.",
                "prediction": f"Predicted {n}.",
            }
        )
        llm.append(
            {
                "model": "base",
                "id": f"q{n}",
                "difficulty": "easy",
                "instruction": f"Question {n}?",
                "reference": f"Answer {n}.",
                "prediction": "noise",
            }
        )
        judged.append({"model": "sft", "id": f"q{n}", "difficulty": "easy", "scores": {k: 1 + n for k in CRITERIA}})
    write_jsonl(tmp_path / "models/llm/eval/predictions.jsonl", llm)
    write_jsonl(tmp_path / "models/llm/eval/judge.jsonl", judged)
    vlm = [
        {
            "id": "img1:caption",
            "image_id": "img1",
            "task": "caption",
            "question_type": "caption",
            "question": "Describe.",
            "reference": "SEM image of particles.",
            "finetuned": "SEM image of particles.",
            "base": "x",
            "source": "data/raw/images/a.png",
        }
    ]
    for n, (ref, pred) in enumerate([("particles", "particles"), ("12", "30"), ("SEM", "SEM")]):
        qtype = ("class", "count", "modality")[n]
        vlm.append(
            {
                "id": f"img1:qa{n}",
                "image_id": "img1",
                "task": "vqa",
                "question_type": qtype,
                "question": f"Q{n}?",
                "reference": ref,
                "finetuned": pred,
                "base": "x",
                "source": "data/raw/images/a.png",
            }
        )
    write_jsonl(tmp_path / "models/qwen2_5_vl/eval/predictions.jsonl", vlm)
    subprocess.run(["git", "init", "-q"], check=True)
    subprocess.run([sys.executable, "-m", "dvc", "init", "-q"], check=True)
    return tmp_path


def _rows(path: Path) -> list[dict[str, str]]:
    with path.open(newline="") as fh:
        return list(csv.DictReader(fh))


def _write(path: Path, rows: list[dict[str, str]]) -> None:
    with path.open("w", newline="") as fh:
        w = csv.DictWriter(fh, list(rows[0]))
        w.writeheader()
        w.writerows(rows)


def test_export_fill_import_with_bad_rows(project):
    runner = CliRunner()
    res = runner.invoke(app, ["review", "export", "--n-llm", "4", "--n-vlm", "4"])
    assert res.exit_code == 0, res.output
    sheet = next((project / "reviews").glob("review-*.csv"))
    again = runner.invoke(app, ["review", "export", "--n-llm", "4", "--n-vlm", "4"])
    assert again.exit_code == 2 and "exists" in again.output  # a sheet being filled is never overwritten
    rows = _rows(sheet)
    assert len(rows) == 8 and {r["kind"] for r in rows} == {"llm", "vlm"}
    assert all(r["model"] == "sft" for r in rows if r["kind"] == "llm")  # the fine-tuned text model only
    for r in rows:  # criteria that do not apply are marked, the rest left for the expert
        assert (r["correctness"] == "-") == (r["kind"] == "llm") and (r["practicality"] == "-") == (r["kind"] == "vlm")
        assert r["clarity"] == ""  # a criterion of both kinds

    # The expert: text answers scored as the judge did; VLM answers by correctness.
    judge = {f"llm:sft:q{n}": 1 + n for n in range(4)}
    for r in rows:
        r["reviewer"] = "dr-etch"
        if r["kind"] == "llm":
            for c in CRITERIA:
                r[c] = str(judge[r["item_id"]])
        else:
            right = r["answer"] == r["reference"]
            r.update(correctness="5" if right else "1", relevance="4", clarity="4")
    by_id = {r["item_id"]: i for i, r in enumerate(rows)}
    bad = {
        "llm:sft:q3": ("clarity", "7"),  # out of range
        "vlm:qwen2_5_vl:img1:qa1": ("practicality", "3"),  # a text criterion on a VLM item
        "vlm:qwen2_5_vl:img1:qa2": ("relevance", "4.5"),  # not a whole number
    }
    for item_id, (column, value) in bad.items():
        rows[by_id[item_id]][column] = value
    rows[by_id["vlm:qwen2_5_vl:img1:caption"]]["item_id"] = "vlm:qwen2_5_vl:no-such-image"  # unknown id
    blank = rows[by_id["llm:sft:q0"]]
    for c in CRITERIA:
        blank[c] = ""  # not reviewed: skipped, not rejected
    filled = project / "filled.csv"
    _write(filled, rows)

    res = runner.invoke(app, ["review", "import", str(filled)])
    assert res.exit_code == 1, res.output  # some rows were refused; the good ones are kept
    out = res.output
    expected = {
        by_id["llm:sft:q3"] + 2: "outside 1-5",
        by_id["vlm:qwen2_5_vl:img1:qa1"] + 2: "do(es) not apply",
        by_id["vlm:qwen2_5_vl:img1:qa2"] + 2: "not a whole number",
        by_id["vlm:qwen2_5_vl:img1:caption"] + 2: "unknown item id",
    }
    for number, reason in expected.items():
        assert f"row {number} rejected" in out and reason in out, (number, out)
    assert "3 ratings accepted, 4 rows rejected, 1 left blank" in out
    stored = list(read_jsonl(project / "reviews/ratings.jsonl"))
    assert sorted(r["item_id"] for r in stored) == ["llm:sft:q1", "llm:sft:q2", "vlm:qwen2_5_vl:img1:qa0"]
    assert (project / "reviews/ratings.jsonl.dvc").is_file()  # versioned with dvc add
    assert "ratings.jsonl" in (project / "reviews/.gitignore").read_text()

    # Fix two rows and import again: merged by (item, reviewer), not duplicated.
    rows[by_id["llm:sft:q3"]]["clarity"] = "3"  # the judge gave 4
    rows[by_id["vlm:qwen2_5_vl:img1:qa2"]]["relevance"] = "4"
    _write(filled, rows)
    res = runner.invoke(app, ["review", "import", str(filled)])
    assert "5 ratings accepted" in res.output
    stored = list(read_jsonl(project / "reviews/ratings.jsonl"))
    assert len(stored) == 5 and len({(r["item_id"], r["reviewer"]) for r in stored}) == 5
    metrics = read_json(project / "metrics/review.json")
    llm = metrics["agreement"]["llm"]["criteria"]
    assert llm["practicality"]["paired"] == 3 and llm["practicality"]["spearman"] == 1.0
    assert llm["practicality"]["weighted_kappa"] == 1.0
    assert (
        llm["clarity"]["paired"] == 3
        and 0 < llm["clarity"]["spearman"] < 1.0
        and llm["clarity"]["weighted_kappa"] < 1.0
    )
    vlm = metrics["agreement"]["vlm"]["criteria"]
    assert vlm["correctness"]["paired"] == 2 and vlm["relevance"]["paired"] == 0
    assert metrics["last_import"] == {"file": "filled.csv", "accepted": 5, "rejected": 2, "skipped_blank": 1}


def test_import_refuses_a_sheet_that_is_not_one(project):
    (project / "reviews").mkdir()
    (project / "reviews/x.items.json").write_text(json.dumps({"export_id": "x", "items": {}}))
    (project / "other.csv").write_text("a,b\n1,2\n")
    res = CliRunner().invoke(app, ["review", "import", "other.csv"])
    assert res.exit_code == 2 and "not a semilens review sheet" in res.output


def test_agreement_statistics():
    assert weighted_kappa([1, 2, 3, 4, 5], [1, 2, 3, 4, 5], [1, 2, 3, 4, 5]) == 1.0
    assert weighted_kappa([1, 2, 4, 5], [5, 4, 2, 1], [1, 2, 3, 4, 5]) < 0
    assert weighted_kappa([3, 3, 3], [3, 3, 3], [1, 2, 3, 4, 5]) is None  # undefined
    assert weighted_kappa([1, 2, 5], [1, 1, 1], [1, 2, 3, 4, 5]) is None  # one rater constant: undefined too
    assert weighted_kappa([1, 0, 1, 0], [1, 0, 1, 1], [0, 1]) == 0.5
    assert spearman([1, 2, 3, 4], [2, 3, 4, 5]) == 1.0 and spearman([1, 1, 1], [1, 2, 3]) is None
    block = agreement([{"item_id": "a", "kind": "llm", "scores": {"clarity": 4}, "machine": None}])
    assert block["llm"]["criteria"]["clarity"]["note"].startswith("no judge scores")
