"""register_llm: record the text model (SFT and its GPTQ quantisation) in MLflow with its lineage.

Reads ``<paths.models>/llm/{base,pretrained,adapter,sft,gptq,eval}``, the instruction
dataset, the corpus chunks and the metrics ``llm.json``, ``quantize.json``,
``llm/pretrain.json`` and ``llm/sft.json``. Checks every artifact's md5 against
``dvc.lock`` and refuses to register anything DVC did not produce. Then, in the MLflow
store the VLMs use (``register_models``: experiment and name prefix), logs params (the
text sections of params.yaml), metrics (scores per model and difficulty, quantisation and
training numbers) and the instruction train and benchmark splits (``mlflow.log_input``,
digest = the split file's md5), and registers two model versions:

- ``<prefix>llm``: the SFT model; the run logs the LoRA adapter, which with ``pretrained``
  is the merged ``sft`` checkpoint (dvc.lock md5s of both are tags);
- ``<prefix>llm_gptq``: the W4A16 GPTQ checkpoint; the run logs its folder.

Writes the text model's card ``<paths.models>/llm/README.md`` (lineage, scores,
quantisation). Run ids and version numbers go to the run log only: they differ between
runs, the card must not. Run: ``python -m stages.register_llm``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from semilens.cards import lineage_table, table, write_card
from semilens.checkpoints import GGUF_SOURCE_FILE, SOURCE_FILE
from semilens.config import Config
from semilens.io import read_json
from semilens.lineage import git_state, path_allowance, verified_hashes
from semilens.llm.evaluate import DIFFICULTIES, MODELS
from semilens.llm.judge import CRITERIA
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

# Two registered names rather than one name with a "variant" tag: a registered model's
# versions are meant to be successive builds of one deployable thing, and an auditor asks
# "which quantised model is this, and what was it made from?" of the GPTQ weights apart
# from the float SFT model (different files, runtimes, and scores). One name would
# interleave the two, so "the latest version" would mean either.
SUFFIXES = {"sft": "llm", "gptq": "llm_gptq"}
# The sections that shape the text weights. The data sections are pinned by the dataset
# and corpus md5s instead, and the VLM sections do not touch the text model (nor does DVC
# re-run this stage for them, so a hash over them would go stale).
MODEL_SECTIONS = ("prepare_llm", "pretrain_llm", "sft_llm", "quantize_llm")
# logged as params too: they decide the scores the versions carry
LOGGED_SECTIONS = (*MODEL_SECTIONS, "evaluate_llm")
SCORE_KEYS = ("math_exact", "math_exact_calculator", "rouge_l", "bertscore_f1", "heldout_perplexity")
QUANT_KEYS = (
    "bits",
    "group_size",
    "format",
    "quantized_layers",
    "calibration_blocks",
    "linear_bytes_fp32",
    "linear_bytes_quantized",
    "linear_size_ratio",
    "folder_bytes_unquantized",
    "folder_bytes_quantized",
    "heldout_perplexity_unquantized",
    "heldout_perplexity_quantized",
    "perplexity_ratio",
)
TRAIN_KEYS = ("steps", "first_loss", "last_loss", "heldout_perplexity_before", "heldout_perplexity_after")
# MLflow datasets keep the text columns; `messages` repeats instruction and response.
DATASET_COLUMNS = ["id", "category", "kind", "difficulty", "instruction", "response", "source", "group_key", "answer"]


def _numbers(prefix: str, summary: dict[str, Any]) -> dict[str, float]:
    return {
        k: v for k, v in flatten(prefix, summary).items() if isinstance(v, (int, float)) and not isinstance(v, bool)
    }


def text_metrics(
    report: dict[str, Any], quantize: dict[str, Any], training: dict[str, dict[str, Any]]
) -> dict[str, float]:
    """MLflow metrics: ``<model>.<difficulty>.<score>`` (``sft.all.rouge_l``), judge means
    ``judge.<model>.<difficulty>.<criterion>``, ``quantize.*`` and ``train.<stage>.*``."""
    out: dict[str, float] = {}
    for row in report["rows"]:
        out.update({f"{row['model']}.{row['difficulty']}.{k}": row[k] for k in SCORE_KEYS if row.get(k) is not None})
    for row in (report.get("judge") or {}).get("scores") or []:
        out.update(
            {f"judge.{row['model']}.{row['difficulty']}.{k}": row[k] for k in CRITERIA if row.get(k) is not None}
        )
    out.update(_numbers("quantize", quantize))
    for stage, summary in training.items():
        out.update(_numbers(f"train.{stage}", summary))
    return out


def text_params(cfg: Config) -> dict[str, Any]:
    params: dict[str, Any] = {}
    for section in LOGGED_SECTIONS:
        params.update(flatten(section, getattr(cfg, section).model_dump(mode="json")))
    url = params.get("evaluate_llm.judge.base_url")
    if url:
        params["evaluate_llm.judge.base_url"] = describe_uri(url)  # no credentials in the store
    return params


def write_llm_card(
    folder: Path,
    names: dict[str, str],
    lineage: dict[str, dict[str, str]],
    report: dict[str, Any],
    quantize: dict[str, Any],
    training: dict[str, dict[str, Any]],
    phash: str,
    base_source: str,
) -> Path:
    order = {(m, d): i for i, (m, d) in enumerate((m, d) for m in MODELS for d in (*DIFFICULTIES, "all"))}
    rows = sorted(report["rows"], key=lambda r: order.get((r["model"], r["difficulty"]), len(order)))
    sections = [
        (
            "What this is",
            f"A Llama-3-architecture text model for semiconductor process engineers. Base: {base_source}; "
            "continued pretraining on the cleaned process corpus (`pretrained/`), LoRA SFT on the "
            f"instruction train split (`adapter/`, merged into `sft/`), GPTQ W{quantize['bits']}A16 in groups of "
            f"{quantize['group_size']} of the SFT model "
            f"(`gptq/`, compressed-tensors). Registered in MLflow as `{names['sft']}` (the SFT model: "
            f"the adapter on `pretrained/`) and `{names['gptq']}` (the GPTQ weights); each version "
            "carries the md5s below as tags. Ask it: "
            '`semilens ask "What controls the etch rate in RIE?" --checkpoint models/llm/sft`.',
        ),
        ("Lineage", "md5 as recorded in dvc.lock, recomputed when registered.\n\n" + lineage_table(lineage)),
        (
            "Scores",
            f"Benchmark split: {report['benchmark_rows']} pairs, greedy decoding; maths exact within "
            f"{report['math_rel_tol']:.0%} after unit conversion; perplexity on held-out corpus chunks.\n\n"
            + table(
                rows,
                [
                    "model",
                    "difficulty",
                    "n",
                    "math_exact",
                    "math_exact_calculator",
                    "rouge_l",
                    "bertscore_f1",
                    "heldout_perplexity",
                ],
            ),
        ),
    ]
    judge = report.get("judge") or {}
    if judge.get("configured"):
        sections.append(
            (
                "Expert criteria (LLM judge)",
                f"Judge `{judge['model']}`, scores 1 to 5, rubric sha256 `{judge['rubric_sha256'][:16]}`.\n\n"
                + table(judge["scores"], ["model", "difficulty", "n_judged", "n_failed", *CRITERIA]),
            )
        )
    else:
        sections.append(("Expert criteria (LLM judge)", "Not scored: no judge was configured."))
    sections += [
        ("Quantisation", table([{"": k, "value": quantize.get(k)} for k in QUANT_KEYS], ["", "value"])),
        (
            "Training",
            table(
                [{"stage": s, **{k: v.get(k) for k in TRAIN_KEYS}} for s, v in training.items()], ["stage", *TRAIN_KEYS]
            ),
        ),
        ("Params", f"Hash of the text model's sections of params.yaml ({', '.join(MODEL_SECTIONS)}): `{phash}`."),
    ]
    return write_card(
        folder,
        "semilens text model",
        {
            "library_name": "transformers",
            "pipeline_tag": "text-generation",
            "tags": ["semilens", "llama", "lora", "gptq"],
            "model-index": [{"name": names["sft"]}, {"name": names["gptq"]}],
        },
        sections,
    )


def lineage_paths(cfg: Config) -> dict[str, Path]:
    """The artifacts every version is tagged with, by role (the stage's deps in dvc.yaml).

    Both versions carry the whole text path's lineage: they come out of one pipeline run,
    and the scores on each (sft beside gptq) compare the two. "dataset" is the training
    data in both families, so one tag query finds every model trained on it.
    """
    models = Path(cfg.paths.models) / "llm"
    return {
        "dataset": Path(cfg.paths.instructions),
        "corpus": Path(cfg.paths.markdown),
        **{name: models / name for name in ("base", "pretrained", "adapter", "sft", "gptq")},
        # each model's benchmark answers (answer_llm@<model>), which the evaluation scored
        **{f"answers_{name}": models / "answers" / f"{name}.json" for name in MODELS},
        "evaluation": models / "eval",
    }


def _read_metrics(path: Path, stage: str) -> dict[str, Any]:
    if not path.is_file():
        raise FileNotFoundError(f"{path}: not found; run {stage} first (dvc repro {stage})")
    return read_json(path)


def register_llm(cfg: Config) -> dict[str, Any]:
    models = Path(cfg.paths.models) / "llm"
    metrics = Path(cfg.paths.metrics)
    report = _read_metrics(metrics / "llm.json", "evaluate_llm")
    quantize = _read_metrics(metrics / "quantize.json", "quantize_llm")
    training = {
        stage: _read_metrics(metrics / "llm" / f"{stage}.json", f"{stage}_llm") for stage in ("pretrain", "sft")
    }
    lineage = verified_hashes(lineage_paths(cfg))
    source_file = models / "base" / SOURCE_FILE
    real = read_json(source_file) if source_file.is_file() else None  # a referenced real base
    gguf_file = models / "base" / GGUF_SOURCE_FILE
    gguf = read_json(gguf_file) if gguf_file.is_file() else None  # a base converted from a packaged GGUF
    base_source = "the tiny preset (random init)" if real is None else f"`{real['path']}`"
    if gguf is not None:
        base_source = f"{cfg.prepare_llm.base}, from `{gguf['file']}` of the package `{gguf['package']}` {gguf['version']} (sha256 `{gguf['sha256']}`)"
    phash = params_hash(cfg, MODEL_SECTIONS)
    names = {kind: f"{cfg.register_models.model_prefix}{suffix}" for kind, suffix in SUFFIXES.items()}
    git = git_state()
    card = write_llm_card(models, names, lineage, report, quantize, training, phash, base_source)
    common = {
        "base": cfg.prepare_llm.base,
        "params_hash": phash,
        **lineage_tags(lineage, git),
        **path_allowance(cfg.paths),  # empty unless paths.allow_outside let a folder in (as vlm/register)
    }
    if real is not None:
        common["base.config_sha256"] = real["config_sha256"]
    if gguf is not None:
        common.update({f"base.gguf.{k}": str(gguf[k]) for k in ("package", "version", "file", "sha256")})
    datasets = [
        (
            parquet_dataset(
                Path(cfg.paths.instructions) / f"{split}.parquet", f"instructions-{split}", DATASET_COLUMNS, "response"
            ),
            context,
            {"dvc.dataset.md5": lineage["dataset"]["md5"]},
        )
        for split, context in (("train", "training"), ("benchmark", "evaluation"))
    ]
    qcfg = cfg.quantize_llm
    # The merged sft/ folder is not copied into MLflow: the adapter plus pretrained/ (both
    # pinned by md5) make it, and for a real 8B base it would be another 32 GB of fp32.
    # The GPTQ folder is the deployable artifact itself, so it goes in whole.
    versions = {
        "sft": ({"model": "sft"}, "adapter"),
        "gptq": ({"model": "gptq", "quantization": f"gptq w{qcfg.bits}a16 group {qcfg.group_size}"}, "gptq"),
    }
    params, numbers = text_params(cfg), text_metrics(report, quantize, training)
    uri = tracking_uri(cfg.paths.mlflow)
    summary: dict[str, Any] = {"tracking": describe_uri(uri), "params_hash": phash, "git_commit": git["commit"]}
    for kind, (tags, artifact) in versions.items():
        reg = Registration(
            name=names[kind],
            params=params,
            metrics=numbers,
            tags={**common, **tags},
            artifacts={artifact: models / artifact, "card": card},
            model_artifact=artifact,
            datasets=datasets,
            description=card.read_text(),
        )
        done = register(reg, uri, cfg.register_models.experiment, Path(cfg.paths.mlflow) / "artifacts")
        summary.update({f"{kind}_{k}": v for k, v in done.items()})
    return summary
