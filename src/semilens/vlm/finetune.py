"""finetune_vlm: LoRA SFT of a family's base checkpoint on the VQA train split.

Reads ``<paths.models>/<family>/base`` (or the real checkpoint it points to) and
``<paths.vqa>/train.parquet``; writes ``<paths.models>/<family>/adapter`` (PEFT adapter,
loadable with ``PeftModel.from_pretrained``, plus the resolved config),
``<paths.models>/<family>/merged`` (adapter merged into the base: an ordinary HF
checkpoint) and ``<paths.metrics>/vlm/train_<family>.json`` + ``loss_<family>.csv`` (the
loss curve, a DVC plot). Run: ``python -m stages.finetune_vlm <family>``.

Training checkpoints live in the work cache under a key made of the base, the training
data and the params: a run killed mid-way resumes from its last checkpoint, and a run
with anything changed starts fresh instead of resuming someone else's state.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Any

from semilens.config import Config, FinetuneVLMConfig, TrainerSection, dump_config
from semilens.io import atomic_write_text, hash_json, reset_dir, sha256_file, write_json
from semilens.vlm.families import Family, get_family
from semilens.vlm.labels import assistant_labels, check_image_tokens
from semilens.vlm.prepare import CONFIG_FILE, resolve_checkpoint


class BackendError(RuntimeError):
    """The requested trainer setup cannot run on this machine; the message says why."""


def select_backend(trainer: TrainerSection, cuda: bool) -> dict[str, Any]:
    """Decide precision and quantization once, with a clear refusal where impossible."""
    if trainer.quantization == "4bit":
        if not cuda:
            raise BackendError(
                "finetune_vlm.trainer.quantization: 4bit (QLoRA) needs a CUDA GPU and bitsandbytes; "
                "this machine has no CUDA. Use quantization: none on the CPU."
            )
        if importlib.util.find_spec("bitsandbytes") is None:
            raise BackendError("QLoRA needs bitsandbytes: pip install -e '.[gpu]'")
    if trainer.precision == "bf16" and not cuda:
        raise BackendError("finetune_vlm.trainer.precision: bf16 needs CUDA here; use auto or fp32")
    bf16 = trainer.precision == "bf16" or (trainer.precision == "auto" and cuda)
    return {"backend": "transformers", "bf16": bf16, "quantization": trainer.quantization, "cuda": cuda}


def make_collator(processor: Any, family: Family, max_length: int):
    """TRL's VLM collator with labels on the assistant's answer tokens only.

    TRL's own assistant mask is refused for vision data below transformers 5.18, so the
    labels are rebuilt from token ids; every batch is checked for truncated image tokens
    and for answers cut off by ``max_length``.
    """
    from trl.trainer.sft_trainer import DataCollatorForVisionLanguageModeling

    markers = family.turn_markers(processor)
    merge = processor.image_processor.merge_size

    class AnswerOnlyCollator(DataCollatorForVisionLanguageModeling):
        def torch_call(self, examples):
            n_turns = [sum(m["role"] == "assistant" for m in ex["messages"]) for ex in examples]
            batch = super().torch_call(examples)
            ids = batch["input_ids"]
            expected = int(batch["image_grid_thw"].prod(-1).sum()) // merge**2
            check_image_tokens(ids, processor.image_token_id, expected)
            batch["labels"] = labels = assistant_labels(ids, batch["attention_mask"], **markers)
            # Every answer must end inside the sequence: its closing token is supervised.
            closed = (labels == markers["end_id"]).sum(-1)
            for i, turns in enumerate(n_turns):
                if int(closed[i]) != turns:
                    raise ValueError(
                        f"an answer was truncated at max_length={max_length}; raise finetune_vlm.trainer.max_length"
                    )
            return batch

    return AnswerOnlyCollator(processor, max_length=max_length)


def lora_config(fcfg: FinetuneVLMConfig, family: Family):
    from peft import LoraConfig

    targets = fcfg.lora.target_modules
    if targets is None:
        targets = family.lora_targets
        if fcfg.lora.train_vision:
            targets = f"({family.lora_targets})|({family.vision_lora_targets})"
    return LoraConfig(
        r=fcfg.lora.r,
        lora_alpha=fcfg.lora.alpha,
        lora_dropout=fcfg.lora.dropout,
        bias="none",
        task_type="CAUSAL_LM",
        target_modules=targets,
        modules_to_save=list(fcfg.lora.modules_to_save) or None,
    )


def load_base(path: Path, setup: dict[str, Any]):
    import torch
    from transformers import AutoModelForImageTextToText, AutoProcessor

    kwargs: dict[str, Any] = {}
    if setup["quantization"] == "4bit":
        from transformers import BitsAndBytesConfig

        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_compute_dtype=torch.bfloat16,
            bnb_4bit_use_double_quant=True,
        )
    if setup["bf16"]:
        kwargs["dtype"] = torch.bfloat16
    model = AutoModelForImageTextToText.from_pretrained(path, **kwargs)
    processor = AutoProcessor.from_pretrained(path)
    return model, processor


def run_key(base_dir: Path, train_file: Path, fcfg: FinetuneVLMConfig) -> str:
    """Identity of a training run: resuming is only valid for the same base, data and params."""
    base = resolve_checkpoint(base_dir)
    weights = sorted(base.glob("*.safetensors"))
    return hash_json(
        {
            "base": [sha256_file(w) for w in weights] + [sha256_file(base / "config.json")],
            "train": sha256_file(train_file),
            "params": fcfg.model_dump(mode="json"),
        }
    )[:16]


def last_checkpoint(folder: Path) -> str | None:
    from transformers.trainer_utils import get_last_checkpoint

    return get_last_checkpoint(str(folder)) if folder.is_dir() else None


def finetune_vlm(cfg: Config, family_name: str) -> dict[str, Any]:
    import datasets
    import torch
    from trl import SFTConfig, SFTTrainer

    family = get_family(family_name)
    fcfg = cfg.finetune_vlm
    torch.set_num_threads(fcfg.threads)
    setup = select_backend(fcfg.trainer, torch.cuda.is_available())
    base_dir = cfg.paths.models / family_name / "base"
    train_file = cfg.paths.vqa / "train.parquet"
    if not train_file.is_file():
        raise FileNotFoundError(f"{train_file}: no training split; run split_dataset first")
    train = datasets.Dataset.from_parquet(str(train_file))
    if len(train) == 0:
        raise ValueError(f"{train_file}: the training split is empty; add images or change split_dataset")
    train = train.select_columns(["messages", "images"])

    ckpt_dir = cfg.paths.cache / "finetune_vlm" / family_name / run_key(base_dir, train_file, fcfg)
    resume = last_checkpoint(ckpt_dir)
    model, processor = load_base(resolve_checkpoint(base_dir), setup)
    t = fcfg.trainer
    args = SFTConfig(
        output_dir=str(ckpt_dir),
        max_steps=t.max_steps,
        per_device_train_batch_size=t.batch_size,
        gradient_accumulation_steps=t.gradient_accumulation_steps,
        learning_rate=t.learning_rate,
        lr_scheduler_type="cosine",
        warmup_steps=t.warmup_steps,
        logging_steps=t.logging_steps,
        save_strategy="steps",
        save_steps=t.save_steps,
        save_total_limit=t.save_total_limit,
        report_to="none",
        use_cpu=not setup["cuda"],
        bf16=setup["bf16"],
        fp16=False,
        # TRL turns this on by default; it only slows small models down
        gradient_checkpointing=False,
        max_length=t.max_length,
        assistant_only_loss=False,  # done by the collator (see make_collator)
        dataset_kwargs={"skip_prepare_dataset": True},
        dataloader_num_workers=0,
        seed=fcfg.seed,
        data_seed=fcfg.seed,
        disable_tqdm=True,
    )
    trainer = SFTTrainer(
        model=model,
        args=args,
        train_dataset=train,
        processing_class=processor,
        data_collator=make_collator(processor, family, t.max_length),
        peft_config=lora_config(fcfg, family),
    )
    lora_names = [n for n, _ in trainer.model.named_parameters() if "lora_" in n]
    if not lora_names:
        raise ValueError(f"LoRA target_modules matched nothing in {family_name}: check finetune_vlm.lora")
    if not fcfg.lora.train_vision and fcfg.lora.target_modules is None:
        # the vision tower shares projection names with the language model; keep it frozen
        stray = [n for n in lora_names if "language_model" not in n]
        if stray:
            raise ValueError(f"LoRA reached outside the language model: {stray[:3]}")
    trainable = sum(p.numel() for p in trainer.model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in trainer.model.parameters())
    result = trainer.train(resume_from_checkpoint=resume)

    adapter_dir = reset_dir(cfg.paths.models / family_name / "adapter")
    trainer.model.save_pretrained(adapter_dir)
    processor.save_pretrained(adapter_dir)
    atomic_write_text(adapter_dir / CONFIG_FILE, dump_config(fcfg))

    merged_dir = reset_dir(cfg.paths.models / family_name / "merged")
    merged = trainer.model.merge_and_unload()
    merged.save_pretrained(merged_dir)
    processor.save_pretrained(merged_dir)
    atomic_write_text(merged_dir / CONFIG_FILE, dump_config(fcfg))

    curve = [
        {"step": int(h["step"]), "loss": round(float(h["loss"]), 4)}
        for h in trainer.state.log_history
        if "loss" in h
    ]
    metrics_dir = cfg.paths.metrics / "vlm"
    atomic_write_text(
        metrics_dir / f"loss_{family_name}.csv",
        "step,loss\n" + "".join(f"{p['step']},{p['loss']}\n" for p in curve),
    )
    summary = {
        "family": family_name,
        "steps": int(trainer.state.global_step),
        "resumed_from": None if resume is None else Path(resume).name,
        "train_rows": len(train),
        "trainable_parameters": trainable,
        "total_parameters": total,
        "train_loss": round(float(result.training_loss), 4),
        "first_loss": curve[0]["loss"] if curve else None,
        "last_loss": curve[-1]["loss"] if curve else None,
        **{k: v for k, v in setup.items() if k != "cuda"},
    }
    write_json(metrics_dir / f"train_{family_name}.json", summary)
    return summary
