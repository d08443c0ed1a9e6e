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


def class_rows(vqa: Path, split: str) -> list[dict[str, Any]]:
    """The split's class-question rows, one per image, as ``evaluate_vlm`` reads them."""
    import datasets

    rows = datasets.Dataset.from_parquet(str(vqa / f"{split}.parquet"))
    rows = rows.filter(lambda r: r["question_type"] == "class")
    by_image = {r["image_id"]: dict(r) for r in rows}
    if not by_image:
        raise ValueError(f"{vqa / split}.parquet has no class questions")
    return list(by_image.values())


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


def answered(model: Any, processor: Any, rows: list[dict[str, Any]]) -> float:
    """Class accuracy of the model's greedy answers, asked and scored as ``evaluate_vlm`` does."""
    from semilens.scores import class_accuracy
    from semilens.vlm.evaluate import MAX_NEW_TOKENS
    from semilens.vlm.generate import greedy_answers

    images = [[im.convert("RGB") for im in r["images"]] for r in rows]
    answers = greedy_answers(model, processor, [r["messages"][:1] for r in rows], images, MAX_NEW_TOKENS["vqa"])
    return round(class_accuracy({**r, "prediction": a} for r, a in zip(rows, answers)), 4)


def main() -> None:
    from semilens.io import write_json
    from semilens.vlm.predict import load_vlm

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("checkpoints", nargs="+", type=Path, help="checkpoint folders (base or merged)")
    ap.add_argument("--vqa", type=Path, default=Path("data/processed/vqa"), help="the split_dataset output")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", type=Path, default=Path("metrics/bench_vision_probe.json"))
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    try:
        data = {split: class_rows(args.vqa, split) for split in SPLITS}
    except (FileNotFoundError, ValueError) as exc:
        raise SystemExit(f"vision_probe: {exc}") from None
    labels = {s: [r["label"] for r in data[s]] for s in SPLITS}
    report: dict[str, Any] = {"vqa": str(args.vqa), "images": {s: len(d) for s, d in data.items()}, "checkpoints": {}}
    for folder in args.checkpoints:
        start = time.perf_counter()
        try:
            model, processor = load_vlm(folder)
            feats = {
                s: pooled_features(model, processor, [r["images"][0].convert("RGB") for r in data[s]]) for s in SPLITS
            }
        except (FileNotFoundError, ValueError) as exc:
            raise SystemExit(f"vision_probe: {exc}") from None
        row = {
            "probe": probe(feats["train"], labels["train"], {s: (feats[s], labels[s]) for s in SPLITS[1:]}),
            "answered": {s: answered(model, processor, data[s]) for s in SPLITS},
            "seconds": round(time.perf_counter() - start, 1),
        }
        report["checkpoints"][str(folder)] = row
        print(folder, json.dumps(row))
    write_json(args.out, report)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
