"""evaluate_vlm: the base and the fine-tuned model of a family on the held-out test split.

Reads ``<paths.vqa>/test.parquet`` and ``<paths.models>/<family>/{base,merged}``; greedy
generation for every row, then caption BLEU / ROUGE-L / BERTScore, VQA accuracy overall
and per question type (numbers within a tolerance, units understood) and morphology-class
accuracy, for both models. Writes ``<paths.metrics>/vlm/<family>.json`` and
``<paths.models>/<family>/eval/predictions.jsonl`` (each prediction beside its reference
and the image it came from). Run: ``python -m stages.evaluate_vlm <family>``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from semilens.config import Config
from semilens.io import reset_dir, write_json, write_jsonl
from semilens.vlm.metrics import caption_scores, class_accuracy, vqa_accuracy
from semilens.vlm.prepare import resolve_checkpoint

# Captions are a sentence or two; answers a few words.
MAX_NEW_TOKENS = {"caption": 64, "vqa": 16}


def generate_answers(folder: Path, rows: list[dict[str, Any]], batch_size: int = 16) -> list[str]:
    """Greedy answers of the checkpoint in ``folder`` to each row's user turn."""
    import torch
    from transformers import AutoModelForImageTextToText, AutoProcessor

    model = AutoModelForImageTextToText.from_pretrained(folder).eval()
    processor = AutoProcessor.from_pretrained(folder)
    # Left padding so that every row's answer starts right after its own prompt.
    processor.tokenizer.padding_side = "left"
    answers: list[str] = [""] * len(rows)
    for task, limit in MAX_NEW_TOKENS.items():
        idx = [i for i, r in enumerate(rows) if r["task"] == task]
        for k in range(0, len(idx), batch_size):
            chunk = [rows[i] for i in idx[k : k + batch_size]]
            texts = [
                processor.apply_chat_template(r["messages"][:1], add_generation_prompt=True, tokenize=False)
                for r in chunk
            ]
            images = [[img.convert("RGB") for img in r["images"]] for r in chunk]
            inputs = processor(text=texts, images=images, padding=True, return_tensors="pt")
            with torch.no_grad():
                out = model.generate(**inputs, max_new_tokens=limit, do_sample=False)
            decoded = processor.batch_decode(out[:, inputs["input_ids"].shape[1] :], skip_special_tokens=True)
            for i, text in zip(idx[k : k + batch_size], decoded):
                answers[i] = text.strip()
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
    for name, folder in (("base", resolve_checkpoint(models / "base")), ("finetuned", models / "merged")):
        predictions[name] = generate_answers(folder, rows)
        report[name] = score(rows, predictions[name])
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
        **{f"{m}_{k}": report[m][k] for m in ("base", "finetuned") for k in ("vqa_accuracy", "class_accuracy", "caption_rouge_l")},
    }
