"""`finetune_vlm` beside the plain TRL script a user would write instead.

Both fine-tune the same tiny Qwen2.5-VL (the CPU default's tiny preset, built here
untrained, so both start from the same weights) with the same LoRA, on the same training
chats (the VQA train split as ``finetune_vlm`` feeds it, augmentation off), at the same
batch, learning rate, schedule, steps, seed and torch threads:

- ``finetune_vlm``: the stage's own function (answer-only labels, the loss computed at the
  labelled positions alone, the checks of every batch);
- the plain script (``plain_trl`` below): ``SFTTrainer`` on the chats with TRL's own VLM
  collator, written as TRL's documentation shows, gradient checkpointing off as in the
  stage (TRL turns it on by default).

Reported: seconds per training step (the ``train`` call alone, model loading and saving
left out), rows and tokens per second, each one's training-loss curve, and one yardstick
for both: the mean loss on the answer tokens of the validation chats after training
(the two training losses differ in what they count: TRL's covers every token).

Writes ``metrics/bench_finetune_vs_trl.json`` (``--out``). Run from the project root after
``make run`` (it reads ``data/processed/vqa``) on an otherwise idle machine:
``.venv/bin/python benchmarks/finetune_vs_trl.py [--steps 30]``
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
FAMILY = "qwen2_5_vl"


def build_base(cfg: Any, folder: Path) -> None:
    from semilens.tokenizer import general_corpus
    from semilens.vlm.qwen2_5_vl import build_tiny

    tiny = cfg.prepare_vlm.tiny.model_copy(update=cfg.prepare_vlm.tiny_overrides.get(FAMILY, {}))
    model, processor = build_tiny(tiny, general_corpus())
    model.save_pretrained(folder)
    processor.save_pretrained(folder)


def plain_trl(base: Path, train: Any, fcfg: Any, out: Path) -> tuple[Any, float, list[float]]:
    """The script a TRL user writes: load, SFTConfig, SFTTrainer with a LoRA config, train.
    Returns (the trained model, seconds in train(), the logged losses)."""
    import torch
    from peft import LoraConfig
    from transformers import AutoModelForImageTextToText, AutoProcessor
    from trl import SFTConfig, SFTTrainer

    from semilens.vlm.families import get_family
    from semilens.vlm.finetune import lora_config  # the same LoRA (targets, rank, alpha)

    model = AutoModelForImageTextToText.from_pretrained(base, dtype=torch.float32)
    processor = AutoProcessor.from_pretrained(base)
    t = fcfg.trainer
    args = SFTConfig(
        output_dir=str(out),
        max_steps=t.max_steps,
        per_device_train_batch_size=t.batch_size,
        gradient_accumulation_steps=t.gradient_accumulation_steps,
        learning_rate=t.learning_rate,
        lr_scheduler_type="cosine",
        warmup_steps=t.warmup_steps,
        logging_steps=1,
        save_strategy="no",
        report_to="none",
        use_cpu=True,
        gradient_checkpointing=False,
        max_length=t.max_length,
        seed=fcfg.seed,
        data_seed=fcfg.seed,
        dataloader_num_workers=0,
        disable_tqdm=True,
    )
    lora: LoraConfig = lora_config(fcfg, get_family(FAMILY))
    trainer = SFTTrainer(model=model, args=args, train_dataset=train, processing_class=processor, peft_config=lora)
    start = time.perf_counter()
    trainer.train()
    seconds = time.perf_counter() - start
    losses = [float(h["loss"]) for h in trainer.state.log_history if "loss" in h]
    return trainer.model, seconds, losses


def answer_loss(model: Any, processor: Any, rows: Any, max_length: int, batch: int = 8) -> float:
    """Mean loss on the answer tokens of ``rows`` (the stage's collator and loss)."""
    import torch

    from semilens.training import IGNORE, supervised_forward
    from semilens.vlm.families import get_family
    from semilens.vlm.finetune import make_collator

    collate = make_collator(processor, get_family(FAMILY), max_length)
    total, count = 0.0, 0
    model.eval()
    with torch.no_grad():
        for k in range(0, len(rows), batch):
            examples = [rows[i] for i in range(k, min(k + batch, len(rows)))]
            inputs = collate(examples)
            n = int((inputs["labels"][:, 1:] != IGNORE).sum())
            loss, _ = supervised_forward(model, inputs)
            total += float(loss) * n
            count += n
    return total / count


def tokens_per_row(processor: Any, rows: Any, max_length: int) -> float:
    """Mean non-padding tokens of a training chat (image tokens included)."""
    from semilens.vlm.families import get_family
    from semilens.vlm.finetune import make_collator

    collate = make_collator(processor, get_family(FAMILY), max_length)
    counts = [int(collate([rows[i]])["attention_mask"].sum()) for i in range(len(rows))]
    return sum(counts) / len(counts)


def main() -> dict[str, Any]:
    import torch
    from transformers import AutoModelForImageTextToText, AutoProcessor

    import semilens.vlm.finetune as stage
    from semilens.config import load_config
    from semilens.io import write_json

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--vqa", type=Path, default=ROOT / "data" / "processed" / "vqa")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, default=ROOT / "metrics" / "bench_finetune_vs_trl.json")
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if not (args.vqa / "train.parquet").is_file():
        raise SystemExit(f"{args.vqa / 'train.parquet'}: no VQA split; run `make run` first or give --vqa")

    shipped = load_config(ROOT / "params.yaml")
    fcfg = shipped.finetune_vlm.model_copy(
        update={
            "augment": False,  # the plain script has none
            "threads": args.threads,
            "trainer": shipped.finetune_vlm.trainer.model_copy(
                update={"max_steps": args.steps, "logging_steps": 1, "save_steps": args.steps}
            ),
        }
    )
    torch.set_num_threads(args.threads)
    result: dict[str, Any] = {"steps": args.steps, "threads": args.threads, "batch_size": fcfg.trainer.batch_size}
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        base = work / "models" / FAMILY / "base"
        build_base(shipped, base)
        _, train = stage.load_train_split(args.vqa, fcfg)
        import datasets

        val = datasets.Dataset.from_parquet(str(args.vqa / "val.parquet"))
        val = stage.image_conversations(val, fcfg.seed) if fcfg.conversation == "image" else val
        processor = AutoProcessor.from_pretrained(base)
        per_row = tokens_per_row(processor, train, fcfg.trainer.max_length)
        rows_per_step = fcfg.trainer.batch_size * fcfg.trainer.gradient_accumulation_steps

        # finetune_vlm: the stage's function, its train() call timed where the stage makes it
        timed: dict[str, float] = {}
        train_or_reuse = stage.train_or_reuse

        def timed_train(trainer: Any, run: Any) -> dict[str, Any]:
            start = time.perf_counter()
            record = train_or_reuse(trainer, run)
            timed["seconds"] = time.perf_counter() - start
            return record

        stage.train_or_reuse = timed_train
        paths = shipped.paths.model_copy(
            update={
                "models": work / "models",
                "metrics": work / "metrics",
                "cache": work / "cache",
                "logs": work / "logs",
                "vqa": args.vqa.resolve(),
                "allow_outside": True,
            }
        )
        try:
            summary = stage.finetune_vlm(shipped.model_copy(update={"paths": paths, "finetune_vlm": fcfg}), FAMILY)
        finally:
            stage.train_or_reuse = train_or_reuse
        curve = (work / "metrics" / "vlm" / f"loss_{FAMILY}.csv").read_text().splitlines()[1:]
        ours = AutoModelForImageTextToText.from_pretrained(work / "models" / FAMILY / "merged", dtype=torch.float32)
        result["finetune_vlm"] = {
            "seconds": round(timed["seconds"], 2),
            "seconds_per_step": round(timed["seconds"] / summary["steps"], 3),
            "losses": [float(line.split(",")[1]) for line in curve],
            "val_answer_loss": round(answer_loss(ours, processor, val, fcfg.trainer.max_length), 4),
        }
        del ours

        model, seconds, losses = plain_trl(base, train, fcfg, work / "trl")
        result["plain_trl"] = {
            "seconds": round(seconds, 2),
            "seconds_per_step": round(seconds / args.steps, 3),
            "losses": [round(v, 4) for v in losses],
            "val_answer_loss": round(answer_loss(model, processor, val, fcfg.trainer.max_length), 4),
        }
    for name in ("finetune_vlm", "plain_trl"):
        r = result[name]
        r["rows_per_s"] = round(rows_per_step / r["seconds_per_step"], 2)
        r["tokens_per_s"] = round(rows_per_step * per_row / r["seconds_per_step"], 1)
    result["tokens_per_row"] = round(per_row, 1)
    result["plain_over_ours_seconds_per_step"] = round(
        result["plain_trl"]["seconds_per_step"] / result["finetune_vlm"]["seconds_per_step"], 3
    )
    write_json(args.out, result)
    for name in ("finetune_vlm", "plain_trl"):
        r = result[name]
        print(
            f"{name:13s} {r['seconds_per_step']:.3f} s/step, {r['tokens_per_s']} tokens/s, "
            f"loss {r['losses'][0]:.3f} -> {r['losses'][-1]:.3f}, validation answer loss {r['val_answer_loss']}"
        )
    print(f"plain TRL / finetune_vlm seconds per step: {result['plain_over_ours_seconds_per_step']}")
    return result


if __name__ == "__main__":
    main()
