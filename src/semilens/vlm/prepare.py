"""prepare_vlm: the base checkpoint of one VLM family.

``base: tiny`` builds the family's tiny preset (real classes, shrunk), pretrains it on the
generic shapes task so that it behaves like a general VLM, and saves an ordinary HF
checkpoint folder at ``<paths.models>/<family>/base``. ``base: <folder>`` validates a real
checkpoint instead (config model_type, safetensors weights) and records where it is and
the sha256 of its config in ``base/source.json``; the weights are not copied.
Also writes ``<paths.metrics>/vlm/prepare_<family>.json`` (pretraining loss and generic
accuracy). Run: ``python -m stages.prepare_vlm <family>``.
"""

from __future__ import annotations

import json
import math
import random
import time
from pathlib import Path
from typing import Any

from semilens.cards import table, write_card
from semilens.checkpoints import CONFIG_FILE, SOURCE_FILE
from semilens.config import Config, PrepareVLMConfig, dump_config
from semilens.io import atomic_write_text, hash_json, reset_dir, sha256_file, write_json
from semilens.tokenizer import general_corpus
from semilens.training import supervised_forward
from semilens.vlm import generic_task
from semilens.vlm.families import Family, get_family
from semilens.vlm.generate import greedy_answers
from semilens.vlm.labels import check_image_tokens


def validate_real_base(path: Path, family: Family) -> dict[str, Any]:
    """Check a user's checkpoint folder before anything trains on it."""
    path = Path(path).expanduser()
    config = path / "config.json"
    if not config.is_file():
        raise ValueError(
            f"{path}: not a checkpoint folder (no config.json); give a local folder, nothing is downloaded at run time"
        )
    model_type = json.loads(config.read_text()).get("model_type")
    if model_type != family.model_type:
        raise ValueError(f"{path}: model_type {model_type!r}, expected {family.model_type!r} for {family.name}")
    if not list(path.glob("*.safetensors")):
        raise ValueError(f"{path}: no .safetensors weights (only safetensors are loaded)")
    return {
        "path": str(path.resolve()),
        "model_type": model_type,
        "config_sha256": sha256_file(config),
    }


def _batch(samples: list[generic_task.Sample], processor: Any, family: Family) -> dict:
    batch = family.encode(processor, [generic_task.conversation(s) for s in samples], [[s.image] for s in samples])
    check_image_tokens(
        batch["input_ids"], processor.image_token_id, family.image_tokens(processor, batch, len(samples))
    )
    return batch


def generic_accuracy(model: Any, processor: Any, n: int, seed: int, image_size: int) -> float | None:
    """Greedy exact-match accuracy on held-out generic questions (first turn only)."""
    if n == 0:
        return None
    rnd = random.Random(10_000 + seed)
    samples = [generic_task.any_sample(rnd, image_size) for _ in range(n)]
    model.eval()
    preds = greedy_answers(
        model,
        processor,
        [generic_task.conversation(s, turns=1)[:1] for s in samples],
        [[s.image] for s in samples],
        max_new_tokens=8,
    )
    return round(sum(p == s.qa[0][1] for p, s in zip(preds, samples)) / n, 4)


def pretrain_generic(model: Any, processor: Any, family: Family, pcfg: PrepareVLMConfig) -> dict[str, Any]:
    """Full-parameter training on the generic task; returns the loss curve and accuracies."""
    import torch

    pre = pcfg.pretrain
    torch.manual_seed(pcfg.seed)
    rnd = random.Random(pcfg.seed)
    opt = torch.optim.AdamW(model.parameters(), lr=pre.learning_rate, weight_decay=0.0)
    steps = pre.steps

    def lr_factor(step: int) -> float:
        # linear warm-up, then cosine decay to 10%: stable for tiny models at a high LR
        if step < pre.warmup_steps:
            return (step + 1) / pre.warmup_steps
        progress = (step - pre.warmup_steps) / max(1, steps - pre.warmup_steps)
        return 0.1 + 0.45 * (1 + math.cos(math.pi * progress))

    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_factor)
    acc_before = generic_accuracy(model, processor, pre.eval_samples, pcfg.seed, pre.image_size)
    model.train()
    losses: list[dict[str, float]] = []
    start = time.perf_counter()
    for step in range(1, steps + 1):
        samples = [generic_task.any_sample(rnd, pre.image_size) for _ in range(pre.batch_size)]
        batch = _batch(samples, processor, family)
        loss, _ = supervised_forward(model, batch)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        if step == 1 or step % 10 == 0 or step == steps:
            losses.append({"step": step, "loss": round(loss.item(), 4)})
    seconds = time.perf_counter() - start
    acc_after = generic_accuracy(model, processor, pre.eval_samples, pcfg.seed, pre.image_size)
    return {
        "steps": steps,
        "seconds": round(seconds, 1),
        "loss_curve": losses,
        "generic_accuracy_before": acc_before,
        "generic_accuracy_after": acc_after,
    }


def prepare_vlm(cfg: Config, family_name: str) -> dict[str, Any]:
    import torch

    family = get_family(family_name)
    pcfg = cfg.prepare_vlm
    if family_name not in pcfg.bases:
        raise ValueError(f"prepare_vlm.bases has no entry for {family_name!r}")
    base = pcfg.bases[family_name]
    out = reset_dir(cfg.paths.models / family_name / "base")
    metrics_path = cfg.paths.metrics / "vlm" / f"prepare_{family_name}.json"
    torch.set_num_threads(pcfg.threads)

    if base != "tiny":
        source = validate_real_base(Path(base), family)
        write_json(out / SOURCE_FILE, source)
        summary = {"family": family_name, "base": "real", **source}
        write_json(metrics_path, summary)
        write_base_card(out, family, summary)
        return summary

    torch.manual_seed(pcfg.seed)
    corpus = general_corpus() + generic_task.phrasings()
    model, processor = family.build_tiny(pcfg.tiny_for(family_name), corpus)
    report = pretrain_generic(model, processor, family, pcfg)
    model.save_pretrained(out)
    processor.save_pretrained(out)
    # The resolved config travels with the checkpoint, so the folder explains itself.
    atomic_write_text(out / CONFIG_FILE, dump_config(pcfg))
    n_params = sum(p.numel() for p in model.parameters())
    summary = {
        "family": family_name,
        "base": "tiny",
        "parameters": n_params,
        "vocab": len(processor.tokenizer),
        **{k: v for k, v in report.items() if k != "loss_curve"},
    }
    # The wall time goes to the run log only: a metric that differs between identical runs
    # would make the pipeline's outputs differ too.
    metrics = {k: v for k, v in summary.items() if k != "seconds"}
    write_json(metrics_path, {**metrics, "loss_curve": report["loss_curve"]})
    write_base_card(out, family, {**metrics, "params_hash": hash_json(pcfg.model_dump(mode="json"))[:16]})
    return summary


def write_base_card(out: Path, family: Family, summary: dict[str, Any]) -> None:
    """base/README.md: where the base came from and how the generic pretraining went."""
    if summary["base"] == "real":
        origin = (
            f"A real checkpoint, referenced in place (weights not copied): `{summary['path']}`, "
            f"model_type `{summary['model_type']}`, config.json sha256 `{summary['config_sha256']}`."
        )
        sections = [("Source", origin)]
    else:
        origin = (
            f"The tiny {family.name} preset: the real model and processor classes, shrunk, with a "
            f"byte-level BPE tokenizer trained locally. prepare_vlm params hash `{summary['params_hash']}` "
            f"(the full params are in `{CONFIG_FILE}`)."
        )
        pretrain = table(
            [
                {"": "parameters", "value": summary["parameters"]},
                {"": "vocabulary", "value": summary["vocab"]},
                {"": "generic pretraining steps", "value": summary["steps"]},
                {"": "generic accuracy before", "value": summary["generic_accuracy_before"]},
                {"": "generic accuracy after", "value": summary["generic_accuracy_after"]},
            ],
            ["", "value"],
        )
        sections = [
            ("Source", origin),
            ("Generic pretraining", "Shapes, colours, counts and positions; no microscopy.\n\n" + pretrain),
        ]
    write_card(
        out,
        f"semilens base: {family.name}",
        {"library_name": "transformers", "pipeline_tag": "image-text-to-text", "tags": ["semilens", family.name]},
        sections,
    )
