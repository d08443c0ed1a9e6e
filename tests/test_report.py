"""The report stage on hand-made pipeline outputs, rendered in Debian's headless Chromium.

The page built from the real pipeline is checked the same way in test_pipeline_dvc.py.
The screenshot goes to test-artifacts/ (git-ignored) for people to look at.
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from browser import check_page, file_url
from PIL import Image

from semilens.config import Config
from semilens.io import write_json, write_jsonl
from semilens.report import build_report

ARTIFACTS = Path(__file__).resolve().parents[1] / "test-artifacts"


def _png(seed: int) -> bytes:
    rng = np.random.default_rng(seed)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (48, 48), dtype=np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def _outputs(root: Path) -> Config:
    """Every file the report reads, tiny: one VLM family, the text model, the datasets."""
    paths = {k: root / v if isinstance(v, Path) else v for k, v in Config().paths.model_dump().items()}
    # one family evaluated: the report covers what is there
    cfg = Config(paths=paths, report={"max_images": 2}, prepare_vlm={"bases": {"qwen2_5_vl": "tiny"}})
    m = cfg.paths.metrics
    scores = {
        "vqa_accuracy": 0.5,
        "vqa_macro_accuracy": 0.5,
        "class_accuracy": 1.0,
        "caption_rouge_l": 0.4,
        "caption_bleu": 20.0,
        "caption_bertscore_f1": 0.8,
        "n_vqa": 4,
        "n_captions": 2,
        "vqa_per_type": {"class": {"n": 2, "accuracy": 1.0}, "count": {"n": 2, "accuracy": 0.0}},
    }
    base = {
        **scores,
        "vqa_accuracy": 0.0,
        "class_accuracy": 0.0,
        "vqa_per_type": {"class": {"n": 2, "accuracy": 0.0}, "count": {"n": 2, "accuracy": 0.0}},
    }
    real = {
        "n_rows": 3,
        "n_images": 1,
        "base": {**base, "caption_rouge_l": 0.123},
        "finetuned": {**scores, "caption_rouge_l": 0.456},
    }
    synthetic = {"n_rows": 3, "n_images": 1, "base": base, "finetuned": scores}
    write_json(
        m / "vlm/qwen2_5_vl.json",
        {
            "base": base,
            "finetuned": scores,
            "delta": {"vqa_accuracy": 0.5},
            "n_test_rows": 6,
            "real": real,
            "synthetic": synthetic,
        },
    )
    write_json(
        m / "vlm/prepare_qwen2_5_vl.json",
        {"base": "tiny", "generic_accuracy_before": 0.0, "generic_accuracy_after": 0.8},
    )
    (m / "vlm/loss_qwen2_5_vl.csv").write_text("step,loss\n5,3.0\n10,1.5\n15,0.9\n")
    images = [("img-a", "particles"), ("img-b", "lines"), ("img-c", "lines")]
    rows = [
        {
            "image_id": i,
            "label": lab,
            "source": f"data/raw/images/{lab}/{i}.png",
            "images": [{"bytes": _png(n), "path": None}],
        }
        for n, (i, lab) in enumerate(images)
    ]
    cfg.paths.vqa.mkdir(parents=True)
    pd.DataFrame(rows).to_parquet(cfg.paths.vqa / "test.parquet")
    preds = []
    for i, lab in images:
        preds += [
            {
                "id": f"{i}:caption",
                "image_id": i,
                "task": "caption",
                "question_type": "caption",
                "question": "Describe.",
                "reference": f"SEM image of {lab}.",
                "finetuned": f"SEM image of {lab}.",
                "base": "<b>not html</b>",
            },
            {
                "id": f"{i}:qa0",
                "image_id": i,
                "task": "vqa",
                "question_type": "class",
                "question": "What kind?",
                "reference": lab,
                "finetuned": lab,
                "base": "most",
            },
            {
                "id": f"{i}:qa1",
                "image_id": i,
                "task": "vqa",
                "question_type": "count",
                "question": "How many?",
                "reference": "10",
                "finetuned": "30",
                "base": "10",
            },
        ]
    write_jsonl(cfg.paths.models / "qwen2_5_vl/eval/predictions.jsonl", preds)
    write_json(
        m / "llm.json",
        {
            "benchmark_rows": 2,
            "math_rel_tol": 0.02,
            "judge": {"configured": False, "note": "no judge endpoint configured", "scores": None},
            "rows": [
                {"model": "base", "difficulty": "easy", "n": 2, "heldout_perplexity": 900.0, "rouge_l": 0.01},
                {"model": "sft", "difficulty": "easy", "n": 2, "heldout_perplexity": 20.0, "rouge_l": 0.2},
                # a difficulty with no items has no scores
                {"model": "sft", "difficulty": "hard", "n": 0, "heldout_perplexity": 20.0, "rouge_l": None},
            ],
            "maths": {
                "base": {
                    "zero_shot": {"correct": 0, "n": 3, "kind": {"endpoint": "0/3"}, "difficulty": {"easy": "0/3"}},
                    "few_shot": {"shots": 2, "correct": 1, "n": 3, "kind": {"endpoint": "1/3"}},
                },
                "sft": {
                    "zero_shot": {"correct": 3, "n": 3, "kind": {"endpoint": "3/3"}, "difficulty": {"easy": "3/3"}}
                },
            },
        },
    )
    (m / "llm").mkdir(parents=True)
    (m / "llm/sft_loss.csv").write_text("step,loss\n10,3.1\n20,2.2\n")
    write_json(m / "split.json", {"test": {"images": 3, "rows": 9, "labels": {"particles": 1, "lines": 2}}})
    write_json(
        m / "measure.json",
        {
            "images": 3,
            "scored": 3,
            "per_class": {
                "lines": {"n": 2, "median_count_error": 0.0, "median_size_error": 0.02, "median_pitch_error": 0.001}
            },
        },
    )
    write_jsonl(
        cfg.paths.interim_images / "quarantine.jsonl",
        [
            {"source": "data/raw/images/x.tif", "reason": "unreadable: not an image", "stage": "ingest_images"},
            {"source": "data/raw/images/y.tif", "reason": "unreadable: truncated", "stage": "ingest_images"},
        ],
    )
    return cfg


def test_report_shows_models_images_and_quarantine_and_renders_in_chromium(tmp_path):
    from semilens.vlm.compare import compare_vlm

    cfg = _outputs(tmp_path)
    compare_vlm(cfg)
    summary = build_report(cfg)
    page = (tmp_path / "reports/index.html").read_text()
    assert summary["images_shown"] == {"qwen2_5_vl": 2}
    # the families side by side, each margin over the base marked: VQA 0.5 holds, ROUGE-L (0.4 both) gained nothing
    assert "Families side by side" in page
    assert (
        '<span class="ok">✓</span> vqa_at_least_0.5' in page
        and '<span class="bad">✗</span> rouge_l_gain_at_least_0.2' in page
    )
    # two test images (one per class first), the VQA per-type chart, both loss plots
    assert summary["embedded_images"] == page.count("<img ") == 2 + 3
    assert "particles" in page and "img-a" in page and "img-c" not in page  # round-robin: a (particles), b (lines)
    # fine-tuned: class right, count wrong (30 vs 10); base the other way round
    assert "fine-tuned 2/4, base 2/4" in page
    # real micrographs scored apart, before the synthetic ones
    assert "1 images, 3 rows" in page and page.index("0.456") < page.index(">synthetic<")
    assert "&lt;b&gt;not html&lt;/b&gt;" in page and "<b>not html</b>" not in page
    assert "unreadable" in page and "no judge endpoint configured" in page
    # the maths tallies: the base zero-shot and shown worked answers, beside the SFT model
    assert "<td>base</td><td>zero-shot</td><td>0/3</td>" in page
    assert "<td>2 worked answers first</td><td>1/3</td>" in page and "endpoint 3/3" in page
    assert "no ontology tagging yet" in page  # absent inputs are said, not crashed on
    check = check_page(file_url(tmp_path / "reports/index.html"))
    ARTIFACTS.mkdir(exist_ok=True)
    (ARTIFACTS / "report-unit.png").write_bytes(check.screenshot)
    assert check.errors == []
    assert len(check.images) == 5 and all(i["complete"] and i["width"] > 0 for i in check.images), check.images
    assert check.title == "semilens report" and "Vision-language models" in check.text
    assert check.screenshot.startswith(b"\x89PNG")


def test_the_browser_check_sees_errors_and_broken_images(tmp_path):
    page = tmp_path / "broken.html"
    page.write_text(
        "<!doctype html><title>broken</title><img src='missing.png'>"
        "<script>console.error('boom'); undefined_function();</script>"
    )
    check = check_page(file_url(page))
    text = " | ".join(check.errors)
    assert "console: boom" in text and "undefined_function" in text, text
    assert "missing.png" in text or "load failed" in text, text
    assert check.images[0]["width"] == 0


def test_report_refuses_a_bad_max_images():
    with pytest.raises(ValueError):
        Config(report={"max_images": -1})


def test_unlabelled_images_are_picked_under_their_own_heading():
    from semilens.report import _pick_images

    # A user's unlabelled micrograph reads back from parquet with a NaN label.
    labels = {"a": float("nan"), "b": "lines", "c": None, "d": "lines"}
    picked = _pick_images({k: [] for k in labels}, labels, 3)
    assert picked == ["b", "a", "d"]
