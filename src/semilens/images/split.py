"""split_dataset: annotations -> train/val/test VQA datasets in TRL's VLM chat form.

Reads ``<paths.annotations>/annotations.jsonl`` and the normalised PNGs it names; writes
``<paths.vqa>/{train,val,test}.parquet`` (load with
``datasets.load_dataset("parquet", data_files=...)``) and ``<paths.metrics>/split.json``.
Run: ``python -m stages.split_dataset``.

Each row is one conversation: a user turn with the image and a question (or a caption
request) and an assistant turn with the grounded answer, plus the image itself in
``images`` — the ``messages`` + ``images`` layout TRL's SFTTrainer consumes for VLMs.

The split is decided per source micrograph (``group``), by a hash of the group name: tiles
of one micrograph never straddle splits, and adding images never moves an existing group
to another split, because a group's split depends on its own name alone.
"""

from __future__ import annotations

import hashlib
import json
from collections import Counter
from pathlib import Path
from typing import Any

from semilens.config import Config, SplitDatasetConfig
from semilens.images.annotate import choose_phrasing, load_annotations
from semilens.io import atomic_write_bytes, reset_dir, write_json

SPLITS = ("train", "val", "test")
CAPTION_PROMPTS = (
    "Describe this micrograph.",
    "Write a caption for this SEM/TEM image.",
    "Summarise what this microscopy image shows, with measurements.",
)


def assign_split(group: str, cfg: SplitDatasetConfig) -> str:
    u = int(hashlib.sha256(f"{cfg.salt}|{group}".encode()).hexdigest()[:12], 16) / 16**12
    if u < cfg.test_fraction:
        return "test"
    if u < cfg.test_fraction + cfg.val_fraction:
        return "val"
    return "train"


def _conversation(prompt: str, answer: str) -> list[dict[str, Any]]:
    return [
        {
            "role": "user",
            "content": [{"type": "image", "text": None}, {"type": "text", "text": prompt}],
        },
        {"role": "assistant", "content": [{"type": "text", "text": answer}]},
    ]


def rows_for_image(ann: dict[str, Any], image_bytes: bytes, seed: str) -> list[dict[str, Any]]:
    """One caption row and one row per VQA pair for an annotated image."""
    base = {
        "image_id": ann["id"],
        "group": ann["group"],
        "label": ann["label"],
        "source": ann["source"],
        "sha256": ann["sha256"],
        "page": ann["page"],
        "images": [{"bytes": image_bytes, "path": None}],
    }
    prompt = choose_phrasing(CAPTION_PROMPTS, seed, ann["id"], "caption-prompt")
    rows = [
        {
            **base,
            "id": f"{ann['id']}:caption",
            "task": "caption",
            "question_type": "caption",
            "question": prompt,
            "answer": ann["caption"],
            "value": None,
            "unit": None,
            "grounding": json.dumps({"caption_from": [qa["type"] for qa in ann["qa"]]}),
            "messages": _conversation(prompt, ann["caption"]),
        }
    ]
    for i, qa in enumerate(ann["qa"]):
        rows.append(
            {
                **base,
                "id": f"{ann['id']}:qa{i}",
                "task": "vqa",
                "question_type": qa["type"],
                "question": qa["question"],
                "answer": qa["answer"],
                # Mixed numbers and words: kept as JSON text so one column type fits all.
                "value": json.dumps(qa["value"]),
                "unit": qa["unit"],
                "grounding": json.dumps(qa["grounding"], sort_keys=True),
                "messages": _conversation(qa["question"], qa["answer"]),
            }
        )
    return rows


def features():
    """The datasets schema of a VQA row (imported lazily: datasets is slow to import)."""
    import datasets

    text = datasets.Value("string")
    return datasets.Features(
        {
            "id": text,
            "image_id": text,
            "group": text,
            "label": text,
            "source": text,
            "sha256": text,
            "page": datasets.Value("int32"),
            "task": text,
            "question_type": text,
            "question": text,
            "answer": text,
            "value": text,
            "unit": text,
            "grounding": text,
            "messages": [{"role": text, "content": [{"type": text, "text": text}]}],
            "images": datasets.Sequence(datasets.Image()),
        }
    )


def write_parquet(rows: list[dict[str, Any]], path: Path) -> None:
    import datasets

    ds = datasets.Dataset.from_list(rows, features=features())
    tmp = path.with_name(f".{path.name}.tmp")
    ds.to_parquet(str(tmp))
    atomic_write_bytes(path, tmp.read_bytes())
    tmp.unlink()


def split_dataset(cfg: Config) -> dict[str, Any]:
    scfg = cfg.split_dataset
    annotations = sorted(load_annotations(cfg.paths.annotations), key=lambda a: a["id"])
    by_split: dict[str, list[dict[str, Any]]] = {s: [] for s in SPLITS}
    stats: dict[str, dict[str, Any]] = {
        s: {"images": 0, "groups": set(), "rows": 0, "labels": Counter()} for s in SPLITS
    }
    for ann in annotations:
        split = assign_split(ann["group"], scfg)
        png = Path(ann["png"])
        if not png.is_file():
            raise FileNotFoundError(f"{png}: normalised image missing; re-run ingest_images")
        rows = rows_for_image(ann, png.read_bytes(), scfg.salt)
        by_split[split].extend(rows)
        st = stats[split]
        st["images"] += 1
        st["groups"].add(ann["group"])
        st["rows"] += len(rows)
        st["labels"][ann["label"] or "unlabelled"] += 1

    out = reset_dir(cfg.paths.vqa)
    for split in SPLITS:
        write_parquet(by_split[split], out / f"{split}.parquet")
    sizes = {
        s: {
            "images": st["images"],
            "groups": len(st["groups"]),
            "rows": st["rows"],
            "labels": dict(sorted(st["labels"].items())),
        }
        for s, st in stats.items()
    }
    write_json(cfg.paths.metrics / "split.json", sizes)
    empty = [s for s in SPLITS if sizes[s]["images"] == 0]
    return {
        **{f"{s}_images": sizes[s]["images"] for s in SPLITS},
        **{f"{s}_rows": sizes[s]["rows"] for s in SPLITS},
        "empty_splits": empty,
    }


def load_split(vqa_dir: Path, split: str):
    """The split as a datasets.Dataset, decoded images included."""
    import datasets

    return datasets.load_dataset("parquet", data_files={split: str(Path(vqa_dir) / f"{split}.parquet")}, split=split)
