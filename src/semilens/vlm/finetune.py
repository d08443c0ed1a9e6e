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
import re
from pathlib import Path
from typing import Any

from PIL import Image

from semilens.cards import lineage_table, table, write_card
from semilens.checkpoints import CONFIG_FILE, resolve_checkpoint
from semilens.config import Config, FinetuneVLMConfig, LaunchConfig, TrainerSection, dump_config
from semilens.images.split import CAPTION_PROMPTS
from semilens.io import atomic_write_text, hash_json, reset_dir, sha256_file, write_json
from semilens.lineage import dvc_md5
from semilens.training import (
    clear_runtime_state,
    lora_target_pattern,
    open_run,
    sft_trainer,
    train_or_reuse,
    whole_model,
)
from semilens.vlm.families import Family, get_family
from semilens.vlm.labels import check_image_tokens


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
    has_unsloth = importlib.util.find_spec("unsloth") is not None
    if trainer.backend == "unsloth":
        if not cuda:
            raise BackendError(
                "finetune_vlm.trainer.backend: unsloth needs a CUDA GPU; use auto or transformers on the CPU"
            )
        if not has_unsloth:
            raise BackendError("finetune_vlm.trainer.backend: unsloth is not installed: pip install -e '.[gpu]'")
    backend = trainer.backend
    if backend == "auto":
        backend = "unsloth" if cuda and has_unsloth else "transformers"
    return {"backend": backend, "bf16": bf16, "quantization": trainer.quantization, "cuda": cuda}


# The eight symmetries of a square (PIL transpose codes; None = as is). A turn by 90 or
# 270 degrees swaps width and height, which the processor resizes like any other image.
_DIHEDRAL = (
    None,
    Image.Transpose.FLIP_LEFT_RIGHT,
    Image.Transpose.FLIP_TOP_BOTTOM,
    Image.Transpose.ROTATE_90,
    Image.Transpose.ROTATE_180,
    Image.Transpose.ROTATE_270,
    Image.Transpose.TRANSPOSE,
    Image.Transpose.TRANSVERSE,
)
# What each symmetry does to an orientation, as an axis angle modulo 180 degrees: a
# mirror negates it, a quarter turn adds 90 (either way round, for an axis), a half turn
# keeps it, and the two diagonal mirrors map it to 90 minus itself. This holds whichever
# way angles are counted, because it is about axes, not arrows.
_AXIS_MAP = (
    lambda a: a,
    lambda a: -a,
    lambda a: -a,
    lambda a: a + 90,
    lambda a: a,
    lambda a: a + 90,
    lambda a: 90 - a,
    lambda a: 90 - a,
)
_ANGLE = re.compile(r"(\d+(?:\.\d+)?)°")


def dihedral(image: Image.Image, k: int) -> Image.Image:
    """``image`` under the k-th symmetry of the square (k = 0 leaves it as is)."""
    op = _DIHEDRAL[k % len(_DIHEDRAL)]
    return image if op is None else image.transpose(op)


def turn_angles(text: str, k: int) -> str:
    """``text`` with every orientation ("aligned near 37°") as it reads after symmetry k,
    so that an answer stays true of the turned image."""

    def turned(match: re.Match[str]) -> str:
        return f"{_AXIS_MAP[k](float(match.group(1))) % 180:.0f}°"

    return _ANGLE.sub(turned, text)


def augment_example(example: dict[str, Any], k: int) -> dict[str, Any]:
    """The chat with its images under symmetry k and its answers' angles turned to match."""
    if k == 0:
        return example
    messages = [
        m
        if m["role"] != "assistant"
        else {**m, "content": [{**c, "text": turn_angles(c["text"], k)} if c.get("text") else c for c in m["content"]]}
        for m in example["messages"]
    ]
    return {**example, "messages": messages, "images": [dihedral(im, k) for im in example["images"]]}


def make_collator(processor: Any, family: Family, max_length: int, augment_seed: int | None = None):
    """Training batches with labels on the assistant's answer tokens only.

    The family encodes the chats (chat families as TRL's VLM collator does, with labels
    rebuilt from token ids because TRL's assistant mask is refused for vision data below
    transformers 5.18; PaliGemma as prefix and suffix). Every batch is checked for
    truncated image tokens and for answers cut off by ``max_length``. With
    ``augment_seed`` each example goes in under one of the eight symmetries, drawn from a
    generator seeded with it (see ``augment_example``). A run resumed from a checkpoint
    draws anew.
    """
    import random

    # what closes an answer: <|im_end|> (Qwen), <|eot_id|> (Llama), <eos> (PaliGemma)
    end_id = processor.tokenizer.eos_token_id
    draw = None if augment_seed is None else random.Random(augment_seed)

    def collate(examples: list[dict[str, Any]]) -> Any:
        if draw is not None:
            examples = [augment_example(ex, draw.randrange(len(_DIHEDRAL))) for ex in examples]
        n_turns = [sum(m["role"] == "assistant" for m in ex["messages"]) for ex in examples]
        images = [ex["images"] for ex in examples]
        batch = family.encode(processor, [ex["messages"] for ex in examples], images, max_length)
        ids, labels = batch["input_ids"], batch["labels"]
        check_image_tokens(ids, processor.image_token_id, family.image_tokens(processor, batch, sum(map(len, images))))
        # Every answer must end inside the sequence: its closing token is supervised.
        closed = (labels == end_id).sum(-1)
        for i, turns in enumerate(n_turns):
            if int(closed[i]) != turns:
                raise ValueError(
                    f"an answer was truncated at max_length={max_length}; raise finetune_vlm.trainer.max_length"
                )
        return batch

    return collate


def _is_caption(user: dict[str, Any]) -> bool:
    return any(c["type"] == "text" and c["text"] in CAPTION_PROMPTS for c in user["content"])


def image_conversations(rows: Any, seed: int) -> Any:
    """One multi-turn chat per (image, opening question) from the one-question rows.

    An image with k questions gives k chats, each opening with a different question (the
    position evaluation asks in) followed by the others in a seeded order. Every chat
    supervises all k answers while the image is encoded once, so a training step carries k
    times the signal of one-question rows; in particular each step sees every image's
    class, which one-question rows show in one row in eight.
    """
    import random

    import datasets

    raw = rows.cast_column("images", datasets.List(datasets.Image(decode=False)))
    by_image: dict[str, list[dict[str, Any]]] = {}
    for row in raw.select_columns(["image_id", "messages", "images"]):
        by_image.setdefault(row["image_id"], []).append(row)
    rnd = random.Random(seed)
    out = []
    for image_id in sorted(by_image):
        turns = [(r["messages"][0], r["messages"][1]) for r in by_image[image_id]]
        for first in range(len(turns)):
            rest = [t for i, t in enumerate(turns) if i != first]
            rnd.shuffle(rest)
            # A caption restates the measurements: after it, later answers could be copied
            # from the text instead of read from the image, so it closes the chat.
            rest.sort(key=lambda t: _is_caption(t[0]))
            messages = []
            for i, (user, assistant) in enumerate([turns[first], *rest]):
                text = [c for c in user["content"] if c["type"] == "text"]
                content = ([{"type": "image", "text": None}] if i == 0 else []) + text
                messages += [{"role": "user", "content": content}, assistant]
            out.append({"messages": messages, "images": by_image[image_id][0]["images"]})
    features = datasets.Features({"messages": rows.features["messages"], "images": datasets.List(datasets.Image())})
    return datasets.Dataset.from_list(out, features=features)


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
        target_modules=lora_target_pattern(targets),
        modules_to_save=list(fcfg.lora.modules_to_save) or None,
    )


def load_unsloth(path: Path, setup: dict[str, Any], fcfg: FinetuneVLMConfig, family: Family):
    """Unsloth's fused kernels for the same LoRA: the model comes back already wrapped by PEFT."""
    import torch
    from transformers import AutoProcessor
    from unsloth import FastVisionModel

    model, _ = FastVisionModel.from_pretrained(
        str(path),
        load_in_4bit=setup["quantization"] == "4bit",
        dtype=torch.bfloat16 if setup["bf16"] else None,
        use_gradient_checkpointing="unsloth",
    )
    lora = lora_config(fcfg, family)
    model = FastVisionModel.get_peft_model(
        model,
        finetune_vision_layers=fcfg.lora.train_vision,
        finetune_language_layers=True,
        finetune_attention_modules=True,
        finetune_mlp_modules=True,
        r=lora.r,
        lora_alpha=lora.lora_alpha,
        lora_dropout=lora.lora_dropout,
        bias="none",
        random_state=fcfg.seed,
        target_modules=lora.target_modules,
        modules_to_save=lora.modules_to_save,
    )
    FastVisionModel.for_training(model)
    # the processor is loaded the usual way: our collator needs the HF processor object
    return model, AutoProcessor.from_pretrained(path)


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


def run_key(base_dir: Path, train_file: Path, fcfg: FinetuneVLMConfig, launch: LaunchConfig) -> str:
    """Identity of a training run: resuming is only valid for the same base, data, params
    and launch (another process count is another global batch; FSDP writes another
    checkpoint format)."""
    base = resolve_checkpoint(base_dir)
    weights = sorted(base.glob("*.safetensors"))
    return hash_json(
        {
            "base": [sha256_file(w) for w in weights] + [sha256_file(base / "config.json")],
            "train": sha256_file(train_file),
            "params": fcfg.model_dump(mode="json"),
            "launch": launch.model_dump(mode="json"),
            # how training runs is part of a run's identity: resuming a checkpoint that
            # older code wrote would mix two recipes in one model
            "code": sha256_file(Path(__file__)),
        }
    )[:16]


def finetune_vlm(cfg: Config, family_name: str) -> dict[str, Any]:
    """The stage: setup, data, model, train, save, in that order (see each step)."""
    import torch

    # Setup: the backend is decided once, before anything loads
    family = get_family(family_name)
    fcfg = cfg.finetune_vlm
    torch.set_num_threads(fcfg.threads)
    setup = select_backend(fcfg.trainer, torch.cuda.is_available())
    base_dir = cfg.paths.models / family_name / "base"

    # Data
    train_file, train = load_train_split(cfg.paths.vqa, fcfg)

    # Model: training checkpoints are keyed by base, data, params and this code
    run = open_run(
        cfg.paths.cache / "finetune_vlm" / family_name / run_key(base_dir, train_file, fcfg, cfg.launch),
        fcfg.trainer.max_steps,
    )
    model, processor, peft_config = load_model(base_dir, setup, fcfg, family)

    # Train
    trainer = sft_trainer(
        cuda=setup["cuda"],
        model=model,
        args=sft_args(run.dir, fcfg, setup),
        train_dataset=train,
        processing_class=processor,
        data_collator=make_collator(processor, family, fcfg.trainer.max_length, fcfg.seed if fcfg.augment else None),
        peft_config=peft_config,
    )
    check_lora_reach(trainer.model, fcfg, family_name)
    trainable = sum(p.numel() for p in trainer.model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in trainer.model.parameters())
    record = train_or_reuse(trainer, run)
    # `accelerate launch`: every process trains (gradients all-reduced, or weights
    # sharded), the first one alone writes the folders and metrics
    model = whole_model(
        trainer, run.dir / record["checkpoint"], resolve_checkpoint(base_dir), lambda f: load_base(f, setup)[0]
    )
    if model is None:
        return {"family": family_name, "process": trainer.args.process_index}

    # Save: adapter, merged checkpoint, metrics, cards
    adapter_dir, merged_dir = save_checkpoints(model, processor, cfg.paths.models / family_name, fcfg)
    curve = record["curve"]
    summary = {
        "family": family_name,
        "steps": record["steps"],
        "resumed_from": record["resumed_from"],
        "train_rows": len(train),
        "processes": trainer.args.world_size,
        "trainable_parameters": trainable,
        "total_parameters": total,
        "train_loss": record["train_loss"],
        "first_loss": curve[0]["loss"] if curve else None,
        "last_loss": curve[-1]["loss"] if curve else None,
        **{k: v for k, v in setup.items() if k != "cuda"},
    }
    write_train_metrics(cfg.paths.metrics / "vlm", family_name, curve, summary)
    lineage = {
        "base": {"path": base_dir.as_posix(), "md5": dvc_md5(base_dir)},
        "dataset": {"path": cfg.paths.vqa.as_posix(), "md5": dvc_md5(cfg.paths.vqa)},
    }
    for folder, kind in ((adapter_dir, "adapter"), (merged_dir, "merged")):
        write_training_card(folder, kind, family_name, fcfg, lineage, summary)
    return summary


def load_train_split(vqa_dir: Path, fcfg: FinetuneVLMConfig) -> tuple[Path, Any]:
    """(the train split's file, its rows in the conversation form fcfg.conversation asks for)."""
    import datasets

    train_file = vqa_dir / "train.parquet"
    if not train_file.is_file():
        raise FileNotFoundError(f"{train_file}: no training split; run split_dataset first")
    train = datasets.Dataset.from_parquet(str(train_file))
    if len(train) == 0:
        raise ValueError(f"{train_file}: the training split is empty; add images or change split_dataset")
    if fcfg.conversation == "image":
        train = image_conversations(train, fcfg.seed)
    else:
        train = train.select_columns(["messages", "images"])
    return train_file, train


def load_model(base_dir: Path, setup: dict[str, Any], fcfg: FinetuneVLMConfig, family: Family) -> tuple[Any, Any, Any]:
    """(model, processor, the LoRA config for the trainer to apply, or None when unsloth
    has applied it already)."""
    if setup["backend"] == "unsloth":
        model, processor = load_unsloth(resolve_checkpoint(base_dir), setup, fcfg, family)
        return model, processor, None
    model, processor = load_base(resolve_checkpoint(base_dir), setup)
    return model, processor, lora_config(fcfg, family)


def sft_args(run_dir: Path, fcfg: FinetuneVLMConfig, setup: dict[str, Any]) -> Any:
    """TRL's SFTConfig for this run: checkpoints in ``run_dir``, precision from ``setup``."""
    from trl import SFTConfig

    t = fcfg.trainer
    return SFTConfig(
        output_dir=str(run_dir),
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


def check_lora_reach(model: Any, fcfg: FinetuneVLMConfig, family_name: str) -> None:
    """ValueError when LoRA matched nothing, or reached the vision tower unasked."""
    lora_names = [n for n, _ in model.named_parameters() if "lora_" in n]
    if not lora_names:
        raise ValueError(f"LoRA target_modules matched nothing in {family_name}: check finetune_vlm.lora")
    if not fcfg.lora.train_vision and fcfg.lora.target_modules is None:
        # the vision tower shares projection names with the language model; keep it frozen
        stray = [n for n in lora_names if "language_model" not in n]
        if stray:
            raise ValueError(f"LoRA reached outside the language model: {stray[:3]}")


def save_checkpoints(model: Any, processor: Any, family_dir: Path, fcfg: FinetuneVLMConfig) -> tuple[Path, Path]:
    """``<family>/adapter`` (the PEFT adapter) and ``<family>/merged`` (merged into the
    base: an ordinary HF checkpoint), each with the processor and the resolved config."""
    clear_runtime_state(processor)
    adapter_dir = reset_dir(family_dir / "adapter")
    model.save_pretrained(adapter_dir)
    processor.save_pretrained(adapter_dir)
    atomic_write_text(adapter_dir / CONFIG_FILE, dump_config(fcfg))

    merged_dir = reset_dir(family_dir / "merged")
    merged = model.merge_and_unload()
    merged.save_pretrained(merged_dir)
    processor.save_pretrained(merged_dir)
    atomic_write_text(merged_dir / CONFIG_FILE, dump_config(fcfg))
    return adapter_dir, merged_dir


def write_train_metrics(
    metrics_dir: Path, family_name: str, curve: list[dict[str, Any]], summary: dict[str, Any]
) -> None:
    """``loss_<family>.csv`` (the DVC plot) and ``train_<family>.json``."""
    atomic_write_text(
        metrics_dir / f"loss_{family_name}.csv",
        "step,loss\n" + "".join(f"{p['step']},{p['loss']}\n" for p in curve),
    )
    write_json(metrics_dir / f"train_{family_name}.json", summary)


def write_training_card(
    folder: Path,
    kind: str,
    family: str,
    fcfg: FinetuneVLMConfig,
    lineage: dict[str, dict[str, str]],
    summary: dict[str, Any],
) -> None:
    """adapter/ and merged/ README.md: what they were trained from and how."""
    what = (
        "A PEFT LoRA adapter; load it with `PeftModel.from_pretrained(base, this_folder)`."
        if kind == "adapter"
        else "The adapter merged into its base: an ordinary checkpoint for `AutoModelForImageTextToText`."
    )
    lora = fcfg.lora
    training = table(
        [
            {"": "LoRA rank / alpha / dropout", "value": f"{lora.r} / {lora.alpha} / {lora.dropout}"},
            {"": "vision tower", "value": "LoRA" if lora.train_vision else "frozen"},
            {"": "trained in full", "value": ", ".join(lora.modules_to_save) or "nothing"},
            {"": "steps", "value": summary["steps"]},
            {"": "training rows", "value": summary["train_rows"]},
            {"": "loss first / last", "value": f"{summary['first_loss']} / {summary['last_loss']}"},
            {
                "": "trainable / total parameters",
                "value": f"{summary['trainable_parameters']} / {summary['total_parameters']}",
            },
            {"": "finetune_vlm params hash", "value": hash_json(fcfg.model_dump(mode="json"))[:16]},
        ],
        ["", "value"],
    )
    front = {
        "library_name": "peft" if kind == "adapter" else "transformers",
        "pipeline_tag": "image-text-to-text",
        "tags": ["semilens", family, "lora"],
    }
    write_card(
        folder,
        f"semilens {family} ({kind})",
        front,
        [
            ("What this is", what),
            (
                "Lineage",
                "Trained on the VQA train split from the artifacts below (md5 as DVC records "
                "them in dvc.lock).\n\n" + lineage_table(lineage),
            ),
            ("Training", training + f"\n\nThe resolved params are in `{CONFIG_FILE}`."),
            (
                "Scores",
                "Test-split scores against the base are written by evaluate_vlm and "
                "recorded, with this lineage, in the family card `../README.md` and in MLflow.",
            ),
        ],
    )
