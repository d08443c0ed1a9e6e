"""Where a VLM checkpoint loses the morphology class: its image features or its answer.

Two numbers per split, side by side:
- a linear probe (logistic regression, scikit-learn) on the checkpoint's image features,
  pooled over the image tokens (mean, and mean with standard deviation), trained on the
  train split's images and scored on the others: what the vision side makes separable;
- the checkpoint's own greedy answer to each image's class question, as ``evaluate_vlm``
  asks it (one question, no chat before it): what the language model reads out.

A probe far above the answers means the language side is the limit, not the features.

    python benchmarks/vision_probe.py models/qwen2_5_vl/base models/qwen2_5_vl/merged

Writes ``--out`` (``metrics/bench_vision_probe.json`` by default). Families whose model
exposes ``get_image_features`` are probed (Qwen2.5-VL, PaliGemma-2); Llama-3.2-Vision reads
its image through cross-attention and is refused with that reason.
"""

from __future__ import annotations

import argparse
import inspect
import json
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

SPLITS = ("train", "val", "test")


def class_rows(vqa: Path, split: str) -> tuple[list[Any], list[str], list[str]]:
    """(image, label, class question) for each image of a split, once per image."""
    import datasets

    rows = datasets.Dataset.from_parquet(str(vqa / f"{split}.parquet"))
    rows = rows.filter(lambda r: r["question_type"] == "class")
    seen: set[str] = set()
    images, labels, questions = [], [], []
    for r in rows:
        if r["image_id"] in seen:
            continue
        seen.add(r["image_id"])
        images.append(r["images"][0].convert("RGB"))
        labels.append(r["label"])
        questions.append(r["question"])
    if not images:
        raise ValueError(f"{vqa / split}.parquet has no class questions")
    return images, labels, questions


def pooled_features(model: Any, processor: Any, images: list[Any]) -> np.ndarray:
    """Mean and standard deviation over each image's tokens, as the language model gets them."""
    owner = model.model if hasattr(model.model, "get_image_features") else model
    if not hasattr(owner, "get_image_features"):
        raise ValueError(f"{type(model).__name__} has no get_image_features: nothing to probe")
    wanted = set(inspect.signature(owner.get_image_features).parameters)
    out = []
    for image in images:
        inputs = processor.image_processor(images=[image], return_tensors="pt")
        with torch.no_grad():
            feats = owner.get_image_features(**{k: v for k, v in inputs.items() if k in wanted})
        feats = getattr(feats, "pooler_output", feats)
        if isinstance(feats, (list, tuple)):
            feats = feats[0]
        feats = feats.reshape(-1, feats.shape[-1]).float()
        out.append(torch.cat([feats.mean(0), feats.std(0)]).numpy())
    return np.stack(out)


def probe(train: np.ndarray, y_train: list[str], others: dict[str, tuple[np.ndarray, list[str]]]) -> dict[str, Any]:
    from sklearn.linear_model import LogisticRegression

    mu, sd = train.mean(0), train.std(0) + 1e-6
    half = train.shape[1] // 2
    result: dict[str, Any] = {}
    for name, cols in (("mean", slice(0, half)), ("mean_std", slice(None))):
        clf = LogisticRegression(max_iter=5000, C=1.0).fit(((train - mu) / sd)[:, cols], y_train)
        result[name] = {
            split: round(float(clf.score(((x - mu) / sd)[:, cols], y)), 4)
            for split, (x, y) in {"train": (train, y_train), **others}.items()
        }
    return result


def answered(model: Any, processor: Any, images: list[Any], labels: list[str], questions: list[str]) -> float:
    from semilens.vlm.generate import greedy_answers

    chats = [[{"role": "user", "content": [{"type": "image", "text": None}, {"type": "text", "text": q}]}] for q in questions]
    answers = greedy_answers(model, processor, chats, [[im] for im in images], max_new_tokens=12)
    return round(sum(a.strip() == label for a, label in zip(answers, labels)) / len(labels), 4)


def main() -> None:
    from transformers import AutoModelForImageTextToText, AutoProcessor

    from semilens.vlm.prepare import resolve_checkpoint

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("checkpoints", nargs="+", type=Path, help="checkpoint folders (base or merged)")
    ap.add_argument("--vqa", type=Path, default=Path("data/processed/vqa"), help="the split_dataset output")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", type=Path, default=Path("metrics/bench_vision_probe.json"))
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    data = {split: class_rows(args.vqa, split) for split in SPLITS}
    report: dict[str, Any] = {"vqa": str(args.vqa), "images": {s: len(d[1]) for s, d in data.items()}, "checkpoints": {}}
    for folder in args.checkpoints:
        start = time.perf_counter()
        path = resolve_checkpoint(folder)
        model = AutoModelForImageTextToText.from_pretrained(path).eval()
        processor = AutoProcessor.from_pretrained(path)
        feats = {s: pooled_features(model, processor, data[s][0]) for s in SPLITS}
        row = {
            "probe": probe(feats["train"], data["train"][1], {s: (feats[s], data[s][1]) for s in SPLITS[1:]}),
            "answered": {s: answered(model, processor, *data[s]) for s in SPLITS},
            "seconds": round(time.perf_counter() - start, 1),
        }
        report["checkpoints"][str(folder)] = row
        print(folder, json.dumps(row))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
