"""compare_vlm: every VLM family side by side, base against fine-tuned.

Reads ``<paths.metrics>/vlm/<family>.json`` (evaluate_vlm) for each family in
``prepare_vlm.bases`` and writes:

- ``<paths.metrics>/vlm/compare.json`` (shown by ``dvc metrics show``): per family, each
  headline metric for the base and the fine-tuned model and their difference, accuracy per
  question type, and whether the fine-tune clears the margins in ``compare_vlm`` (VQA
  accuracy at least ``min_vqa_ratio`` times the base's and at least ``min_vqa``, caption
  ROUGE-L at least ``min_rouge_gain`` higher, class accuracy at least ``min_class``);
- ``<paths.metrics>/vlm/compare.csv`` and ``compare_types.csv``: the same numbers in long
  form (one row per family, model and metric or question type; BLEU, on a 0-100 scale,
  only in the JSON), the DVC plots.

Run: ``python -m stages.compare_vlm``.
"""

from __future__ import annotations

from typing import Any

from semilens.config import Config
from semilens.io import atomic_write_text, read_json, write_json

METRICS = (
    "vqa_accuracy",
    "vqa_macro_accuracy",
    "class_accuracy",
    "caption_rouge_l",
    "caption_bleu",
    "caption_bertscore_f1",
)
MODELS = ("base", "finetuned")


def _round(x: Any) -> Any:
    return round(x, 4) if isinstance(x, float) else x


def margins(report: dict[str, Any], cfg: Config) -> dict[str, Any]:
    """Which of the fine-tune's required margins over its base hold."""
    c = cfg.compare_vlm
    base, tuned = report["base"], report["finetuned"]
    checks = {
        f"vqa_at_least_{c.min_vqa_ratio:g}x_base": tuned["vqa_accuracy"] >= c.min_vqa_ratio * base["vqa_accuracy"],
        f"vqa_at_least_{c.min_vqa:g}": tuned["vqa_accuracy"] >= c.min_vqa,
        f"rouge_l_gain_at_least_{c.min_rouge_gain:g}": tuned["caption_rouge_l"] - base["caption_rouge_l"]
        >= c.min_rouge_gain,
    }
    if tuned.get("class_accuracy") is not None:
        checks[f"class_accuracy_at_least_{c.min_class:g}"] = tuned["class_accuracy"] >= c.min_class
    return {**checks, "all": all(checks.values())}


def compare_vlm(cfg: Config) -> dict[str, Any]:
    families = list(cfg.prepare_vlm.bases)
    if not families:
        raise ValueError("prepare_vlm.bases names no family: nothing to compare")
    out: dict[str, Any] = {"families": families, "metrics": {}, "per_type": {}, "margins": {}}
    rows, type_rows = [], []
    for family in families:
        path = cfg.paths.metrics / "vlm" / f"{family}.json"
        if not path.is_file():
            raise FileNotFoundError(f"{path}: no evaluation of {family}; run evaluate_vlm@{family} first")
        report = read_json(path)
        per_metric = {}
        for metric in METRICS:
            values = {m: report[m].get(metric) for m in MODELS}
            if values["base"] is None or values["finetuned"] is None:
                continue  # e.g. no class questions in this test split
            per_metric[metric] = {
                **{m: _round(v) for m, v in values.items()},
                "delta": _round(values["finetuned"] - values["base"]),
            }
            if metric != "caption_bleu":  # 0-100, the others 0-1: it would flatten the plot
                rows += [(family, m, metric, _round(v)) for m, v in values.items()]
        out["metrics"][family] = per_metric
        types = sorted(set(report["base"]["vqa_per_type"]) | set(report["finetuned"]["vqa_per_type"]))
        out["per_type"][family] = {
            t: {m: _round(report[m]["vqa_per_type"].get(t, {}).get("accuracy")) for m in MODELS} for t in types
        }
        type_rows += [
            (family, m, t, out["per_type"][family][t][m])
            for t in types
            for m in MODELS
            if out["per_type"][family][t][m] is not None
        ]
        out["margins"][family] = margins(report, cfg)

    metrics_dir = cfg.paths.metrics / "vlm"
    write_json(metrics_dir / "compare.json", out)
    atomic_write_text(
        metrics_dir / "compare.csv",
        "label,family,model,metric,value\n" + "".join(f"{f} {m} {k},{f},{m},{k},{v}\n" for f, m, k, v in rows),
    )
    atomic_write_text(
        metrics_dir / "compare_types.csv",
        "label,family,model,question_type,accuracy\n"
        + "".join(f"{f} {m} {t},{f},{m},{t},{v}\n" for f, m, t, v in type_rows),
    )
    return {
        "families": len(families),
        **{f"{f}_margins_hold": out["margins"][f]["all"] for f in families},
    }
