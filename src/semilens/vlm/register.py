"""register_models@<family>: record a fine-tuned VLM in MLflow with its whole lineage.

Reads the family's base, adapter, merged and eval folders, the VQA dataset and
``<paths.metrics>/vlm/<family>.json``; checks every artifact's hash against ``dvc.lock``
(refusing to register anything DVC did not produce); logs params, metrics, the training
and test datasets (``mlflow.log_input``, digest = the dataset's DVC md5) and the adapter;
registers a model version ``<prefix><family>`` tagged with the git commit, each
artifact's dvc.lock md5 and a params hash. Writes the family's model card
``<paths.models>/<family>/README.md`` (lineage and scores). The MLflow run id and version
go to the run log only: they differ between runs, the card must not.
Run: ``python -m stages.register_models <family>``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from semilens.cards import lineage_table, table, write_card
from semilens.checkpoints import SOURCE_FILE
from semilens.config import Config
from semilens.io import read_json
from semilens.lineage import git_state, path_allowance, verified_hashes
from semilens.registry import (
    Registration,
    describe_uri,
    flatten,
    lineage_tags,
    params_hash,
    parquet_dataset,
    register,
    tracking_uri,
)
from semilens.vlm.families import get_family

# The params that shape a VLM, hashed into its card and tags. register_models declares
# them as DVC params, so a card is rewritten whenever its hash would change; the data's own
# params reach it through the data's hashes (lineage).
MODEL_SECTIONS = ("prepare_vlm", "finetune_vlm", "launch")
SCORE_KEYS = ("vqa_accuracy", "class_accuracy", "caption_rouge_l", "caption_bleu", "caption_bertscore_f1")
# The image bytes and chat layout stay out of MLflow: the split file's md5 (the digest),
# the dataset's DVC md5 (a tag) and each row's source sha256 identify them.
DATASET_COLUMNS = ["id", "image_id", "source", "sha256", "page", "question_type", "question", "answer"]


def numeric_metrics(report: dict[str, Any]) -> dict[str, float]:
    """MLflow metrics from the evaluation report: scores per model, deltas, per-type accuracy."""
    out: dict[str, float] = {}
    for model in ("base", "finetuned"):
        for key, value in report[model].items():
            if key == "vqa_per_type":
                for qtype, stats in value.items():
                    if stats.get("accuracy") is not None:
                        out[f"{model}.vqa.{qtype}"] = stats["accuracy"]
            elif isinstance(value, (int, float)):
                out[f"{model}.{key}"] = value
    out.update({f"delta.{k}": v for k, v in report.get("delta", {}).items()})
    return out


def write_family_card(
    folder: Path,
    family: str,
    name: str,
    lineage: dict[str, dict[str, str]],
    report: dict[str, Any],
    phash: str,
    base_source: str,
) -> Path:
    scores = table(
        [
            {
                "metric": k,
                "base": report["base"][k],
                "fine-tuned": report["finetuned"][k],
                "delta": report.get("delta", {}).get(k),
            }
            for k in SCORE_KEYS
        ],
        ["metric", "base", "fine-tuned", "delta"],
    )
    per_type = table(
        [
            {
                "question type": qtype,
                "n": stats["n"],
                "base": report["base"]["vqa_per_type"].get(qtype, {}).get("accuracy"),
                "fine-tuned": stats["accuracy"],
            }
            for qtype, stats in sorted(report["finetuned"]["vqa_per_type"].items())
        ],
        ["question type", "n", "base", "fine-tuned"],
    )
    return write_card(
        folder,
        f"semilens {family}",
        {
            "library_name": "peft",
            "pipeline_tag": "image-text-to-text",
            "tags": ["semilens", family, "lora"],
            "model-index": [{"name": name}],
        },
        [
            (
                "What this is",
                f"A {family} vision-language model fine-tuned with LoRA on semilens' SEM/TEM "
                f"question-answer data. Base: {base_source}. Folders: `base/`, `adapter/` (PEFT), "
                f"`merged/` (ordinary checkpoint), `eval/` (test predictions beside references). "
                f"Registered in MLflow as `{name}`; its version carries the md5s below as tags.",
            ),
            ("Lineage", "md5 as recorded in dvc.lock, recomputed when registered.\n\n" + lineage_table(lineage)),
            ("Scores", f"Test split: {report['n_test_rows']} rows, greedy decoding.\n\n" + scores),
            ("VQA accuracy per question type", per_type),
            (
                "Params",
                f"Hash of the params.yaml sections that shape the model ({', '.join(MODEL_SECTIONS)}): `{phash}`.",
            ),
        ],
    )


def register_vlm(cfg: Config, family_name: str) -> dict[str, Any]:
    get_family(family_name)
    models = cfg.paths.models / family_name
    report_path = cfg.paths.metrics / "vlm" / f"{family_name}.json"
    if not report_path.is_file():
        raise FileNotFoundError(f"{report_path}: no evaluation report; run evaluate_vlm@{family_name} first")
    report = read_json(report_path)
    lineage = verified_hashes(
        {
            "dataset": cfg.paths.vqa,
            "base": models / "base",
            "adapter": models / "adapter",
            "merged": models / "merged",
            "evaluation": models / "eval",
        }
    )
    base_setting = cfg.prepare_vlm.bases.get(family_name, "tiny")
    source_file = models / "base" / SOURCE_FILE
    real = read_json(source_file) if source_file.is_file() else None  # a referenced real base
    base_source = "the tiny preset" if real is None else f"`{real['path']}`"
    phash = params_hash(cfg, MODEL_SECTIONS)
    name = f"{cfg.register_models.model_prefix}{family_name}"
    git = git_state()
    tags = {
        "family": family_name,
        "base": base_setting,
        "params_hash": phash,
        **lineage_tags(lineage, git),
        **path_allowance(cfg.paths),  # empty unless paths.allow_outside let a folder in
    }
    if real is not None:
        tags["base.config_sha256"] = real["config_sha256"]
    card = write_family_card(models, family_name, name, lineage, report, phash, base_source)
    params = {
        **flatten("finetune_vlm", cfg.finetune_vlm.model_dump(mode="json")),
        "prepare_vlm.base": base_setting,
        "split_dataset.salt": cfg.split_dataset.salt,
    }
    reg = Registration(
        name=name,
        params=params,
        metrics=numeric_metrics(report),
        tags=tags,
        artifacts={"adapter": models / "adapter", "card": card},
        model_artifact="adapter",
        datasets=[
            (
                parquet_dataset(cfg.paths.vqa / f"{split}.parquet", f"vqa-{split}", DATASET_COLUMNS, "answer"),
                context,
                {"dvc.dataset.md5": lineage["dataset"]["md5"]},
            )
            for split, context in (("train", "training"), ("test", "evaluation"))
        ],
        description=card.read_text(),
    )
    uri = tracking_uri(cfg.paths.mlflow)
    done = register(reg, uri, cfg.register_models.experiment, cfg.paths.mlflow / "artifacts")
    return {
        "family": family_name,
        "tracking": describe_uri(uri),
        **done,
        "params_hash": phash,
        "git_commit": git["commit"],
    }
