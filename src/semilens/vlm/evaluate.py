"""evaluate_vlm: the base and the fine-tuned model of a family on the held-out test split.

Reads ``<paths.vqa>/test.parquet`` and ``<paths.models>/<family>/{base,merged}``; greedy
generation for every row, then caption BLEU / ROUGE-L / BERTScore, VQA accuracy overall
and per question type (numbers within a tolerance, units understood) and morphology-class
accuracy, for both models. Writes ``<paths.metrics>/vlm/<family>.json`` and
``<paths.models>/<family>/eval/predictions.jsonl`` (each prediction beside its reference
and the image it came from). Real micrographs (``paths.raw_images``) and the synthetic ones
are also scored apart (``real`` and ``synthetic`` blocks of the JSON, where the test split
has any). Run: ``python -m stages.evaluate_vlm <family>``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from semilens.config import Config
from semilens.io import reset_dir, write_json, write_jsonl
from semilens.scores import caption_scores, class_accuracy, vqa_accuracy
from semilens.vlm.generate import greedy_answers

# Captions are a sentence or two; answers a few words.
MAX_NEW_TOKENS = {"caption": 64, "vqa": 16}


def generate_answers(folder: Path, rows: list[dict[str, Any]]) -> list[str]:
    """Greedy answers of the checkpoint in ``folder`` to each row's user turn."""
    from semilens.vlm.predict import load_vlm

    model, processor = load_vlm(folder)
    answers: list[str] = [""] * len(rows)
    for task, limit in MAX_NEW_TOKENS.items():
        idx = [i for i, r in enumerate(rows) if r["task"] == task]
        preds = greedy_answers(
            model,
            processor,
            [rows[i]["messages"][:1] for i in idx],
            [[img.convert("RGB") for img in rows[i]["images"]] for i in idx],
            max_new_tokens=limit,
        )
        for i, text in zip(idx, preds):
            answers[i] = text
    return answers


def score(rows: list[dict[str, Any]], predictions: list[str]) -> dict[str, Any]:
    vqa = [
        {"question_type": r["question_type"], "prediction": p, "answer": r["answer"]}
        for r, p in zip(rows, predictions)
        if r["task"] == "vqa"
    ]
    caps = [(p, r["answer"]) for r, p in zip(rows, predictions) if r["task"] == "caption"]
    acc = vqa_accuracy(vqa)
    captions = caption_scores([p for p, _ in caps], [ref for _, ref in caps])
    return {
        "vqa_accuracy": acc["accuracy"],
        "vqa_macro_accuracy": acc["macro_accuracy"],
        "vqa_per_type": acc["per_type"],
        "class_accuracy": class_accuracy(vqa),
        "caption_bleu": captions["bleu"],
        "caption_rouge_l": captions["rouge_l"],
        "caption_bertscore_f1": captions["bertscore_f1"],
        "n_vqa": acc["n"],
        "n_captions": captions["n"],
    }


def origin(source: str, synthetic_root: str) -> str:
    """ "synthetic" for an image the project drew (under ``paths.synthetic_images``), else
    "real": every other source is a user's micrograph (``paths.raw_images``)."""
    root = synthetic_root.rstrip("/")
    return "synthetic" if source == root or source.startswith(root + "/") else "real"


def evaluate_vlm(cfg: Config, family: str) -> dict[str, Any]:
    import datasets
    import torch

    torch.set_num_threads(cfg.finetune_vlm.threads)
    test_file = cfg.paths.vqa / "test.parquet"
    test = datasets.Dataset.from_parquet(str(test_file))
    if len(test) == 0:
        raise ValueError(f"{test_file}: the test split is empty; add images or change split_dataset")
    rows = [dict(r) for r in test]
    models = cfg.paths.models / family
    report: dict[str, Any] = {"family": family, "n_test_rows": len(rows)}
    predictions: dict[str, list[str]] = {}
    for name, folder in (("base", models / "base"), ("finetuned", models / "merged")):
        predictions[name] = generate_answers(folder, rows)
        report[name] = score(rows, predictions[name])
    # Real micrographs apart from the drawn ones: a model can learn the renderer's look
    # and score well on synthetic images while real ones say otherwise. Real comes first.
    from semilens.images.ingest import source_of

    synthetic_root = source_of(cfg.paths.synthetic_images)
    kinds = [origin(r["source"], synthetic_root) for r in rows]
    for kind in ("real", "synthetic"):
        idx = [i for i, k in enumerate(kinds) if k == kind]
        if idx:
            part = [rows[i] for i in idx]
            report[kind] = {
                "n_rows": len(idx),
                "n_images": len({r["image_id"] for r in part}),
                **{name: score(part, [predictions[name][i] for i in idx]) for name in ("base", "finetuned")},
            }
    report["delta"] = {
        k: round(report["finetuned"][k] - report["base"][k], 4)
        for k in ("vqa_accuracy", "class_accuracy", "caption_rouge_l", "caption_bleu", "caption_bertscore_f1")
        if report["finetuned"][k] is not None and report["base"][k] is not None
    }
    write_json(cfg.paths.metrics / "vlm" / f"{family}.json", report)
    out = reset_dir(models / "eval")
    write_jsonl(
        out / "predictions.jsonl",
        [
            {
                "id": r["id"],
                "image_id": r["image_id"],
                "source": r["source"],
                "origin": kinds[i],
                "task": r["task"],
                "question_type": r["question_type"],
                "question": r["question"],
                "reference": r["answer"],
                "base": predictions["base"][i],
                "finetuned": predictions["finetuned"][i],
            }
            for i, r in enumerate(rows)
        ],
    )
    return {
        "family": family,
        "n_test_rows": len(rows),
        **{
            f"{m}_{k}": report[m][k]
            for m in ("base", "finetuned")
            for k in ("vqa_accuracy", "class_accuracy", "caption_rouge_l")
        },
    }
