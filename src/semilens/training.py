"""Training runs kept under ``paths.cache``: resumed when killed, reused when finished.

A training stage keeps its checkpoints in a folder named by its run key (base weights,
data, params and the training code). DVC re-runs the stage whenever any dependency
changes, including ones that do not touch training (a model-card template, say):

- a run killed mid-way resumes from its last checkpoint;
- a run that finished left ``finished.json`` beside its final checkpoint. Its weights and
  its record (steps, losses, where it resumed from) are taken as they are, so the stage
  writes the same model and metrics without training again. Resuming from that final
  checkpoint instead would not be a no-op: where ``max_steps`` ends mid-epoch the Trainer
  takes one step past it and the weights change.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from semilens.io import read_json, write_json

FINISHED = "finished.json"


@dataclass(frozen=True)
class Run:
    dir: Path
    checkpoint: str | None  # the newest checkpoint, if any
    finished: dict[str, Any] | None  # the record a finished run left

    @property
    def resume_from(self) -> str | None:
        return None if self.finished is not None else self.checkpoint


def checkpoint_step(checkpoint: str) -> int:
    return int(Path(checkpoint).name.rsplit("-", 1)[-1])


def open_run(ckpt_dir: Path, max_steps: int) -> Run:
    """What ``ckpt_dir`` holds: nothing, a checkpoint to resume, or a finished run."""
    from transformers.trainer_utils import get_last_checkpoint

    last = get_last_checkpoint(str(ckpt_dir)) if ckpt_dir.is_dir() else None
    record_file = ckpt_dir / FINISHED
    finished = None
    if last is not None and record_file.is_file() and checkpoint_step(last) >= max_steps:
        record = read_json(record_file)
        # the record must belong to this checkpoint; a stray one (its run cut short
        # before the record was rewritten) is ignored and the run resumed instead
        if record.get("checkpoint") == Path(last).name:
            finished = record
    return Run(ckpt_dir, last, finished)


def loss_curve(trainer: Any) -> list[dict[str, Any]]:
    return [
        {"step": int(h["step"]), "loss": round(float(h["loss"]), 4)} for h in trainer.state.log_history if "loss" in h
    ]


def whole_run_loss(
    log_history: list[dict[str, Any]], training_loss: float, global_step: int, resumed_step: int
) -> float:
    """The mean step loss of the whole run, whether or not it was resumed.

    The Trainer's ``training_loss`` sums only the losses of the steps this process ran
    and divides by ``global_step`` (transformers 5: ``_total_loss_scalar /
    global_step``), so a run resumed at step 50 of 100 reported half its loss. The steps
    before the resume are in the log history the checkpoint carried: each logged ``loss``
    is the mean over the steps since the previous log. Steps between the last log and the
    checkpoint are in neither (logging_steps not dividing save_steps), so the mean is over
    the steps whose loss is known; without a resume this is ``training_loss`` itself.
    """
    earlier_sum, earlier_steps = 0.0, 0
    for h in log_history:
        if "loss" in h and int(h["step"]) <= resumed_step:
            earlier_sum += float(h["loss"]) * (int(h["step"]) - earlier_steps)
            earlier_steps = int(h["step"])
    this_run_sum = training_loss * max(global_step, 0.001)  # undo the Trainer's division
    steps = earlier_steps + (global_step - resumed_step)
    return (earlier_sum + this_run_sum) / steps if steps > 0 else training_loss


def train_or_reuse(trainer: Any, run: Run) -> dict[str, Any]:
    """Train (resuming if a checkpoint is there) or load a finished run's final weights.

    Returns the run's record: ``steps``, ``train_loss`` (the mean step loss of the whole
    run, resumed or not: ``whole_run_loss``), ``resumed_from``, ``curve`` (the logged
    losses) and ``checkpoint`` (the final one).
    """
    if run.finished is not None:
        from transformers.trainer_utils import align_special_tokens

        # What train() does to the model before its first step, and a reuse does too: the
        # config takes the tokenizer's special tokens (EOS, PAD), which the saved config
        # and generation config carry.
        if trainer.processing_class is not None and hasattr(trainer.model, "config"):
            align_special_tokens(trainer.model, trainer.processing_class)
        # the Trainer's own checkpoint loader: adapters for PEFT models, the full state
        # dict otherwise, exactly as a resume would load them
        trainer._load_from_checkpoint(str(run.dir / run.finished["checkpoint"]))
        return run.finished
    result = trainer.train(resume_from_checkpoint=run.resume_from)
    resumed_step = 0 if run.resume_from is None else checkpoint_step(run.resume_from)
    record = {
        "steps": int(trainer.state.global_step),
        "train_loss": round(
            whole_run_loss(
                trainer.state.log_history, float(result.training_loss), int(trainer.state.global_step), resumed_step
            ),
            4,
        ),
        "resumed_from": None if run.checkpoint is None else Path(run.checkpoint).name,
        "curve": loss_curve(trainer),
        "checkpoint": f"checkpoint-{int(trainer.state.global_step)}",
    }
    final = run.dir / record["checkpoint"]
    if trainer.is_world_process_zero() and final.is_dir():
        write_json(run.dir / FINISHED, record)
    return record


def sharded(trainer: Any) -> bool:
    """Whether each process holds only a shard of the weights or optimiser (FSDP, DeepSpeed)."""
    return bool(getattr(trainer, "is_fsdp_enabled", False) or getattr(trainer, "is_deepspeed_enabled", False))


def whole_model(trainer: Any, checkpoint: Path, base: Path, build: Callable[[Path], Any]) -> Any | None:
    """The trained model, whole, in the first process (None in the others), to save from.

    With one process or DDP every process holds all the weights: the trainer's model.
    Under FSDP or DeepSpeed a process holds a shard; the Trainer's save of the final
    ``checkpoint`` gathered them (the accelerate configs in presets/accelerate ask for full
    state dicts), so the first process builds the model afresh on the CPU and loads that
    checkpoint (``from_checkpoint``): the same path whether the run trained now or was
    reused. Every process calls this; the others wait until the first has its model.
    """
    if not sharded(trainer):
        return trainer.model if trainer.is_world_process_zero() else None
    trainer.accelerator.wait_for_everyone()
    if not trainer.is_world_process_zero():
        return None
    peft_config = getattr(trainer.accelerator.unwrap_model(trainer.model), "peft_config", None)
    return from_checkpoint(checkpoint, base, build, peft_config["default"] if peft_config else None)


def from_checkpoint(checkpoint: Path, base: Path, build: Callable[[Path], Any], peft_config: Any = None) -> Any:
    """A Trainer checkpoint as a model: ``build(checkpoint)`` when it holds the whole model;
    ``build(base)`` with the checkpoint's LoRA adapter laid on (``peft_config``) when it
    holds an adapter. ValueError when the adapter's weights do not fit the config."""
    adapter = Path(checkpoint) / "adapter_model.safetensors"
    if not adapter.is_file():
        return build(Path(checkpoint))
    if peft_config is None:
        raise ValueError(f"{checkpoint}: holds a LoRA adapter but the run has no LoRA config")
    import copy

    from peft import get_peft_model, set_peft_model_state_dict
    from safetensors.torch import load_file

    model = get_peft_model(build(Path(base)), copy.deepcopy(peft_config))
    loaded = set_peft_model_state_dict(model, load_file(adapter))
    if loaded.unexpected_keys:
        raise ValueError(f"{adapter}: weights the LoRA config has no place for: {loaded.unexpected_keys[:3]}")
    return model


def lora_target_pattern(targets: str | list[str]) -> str:
    """LoRA target modules as one regex, which PEFT saves as it is.

    PEFT keeps a list of module names as a set and saves it in set order, which changes
    from process to process (string hashes are salted), so the same adapter would get a
    different ``adapter_config.json`` each run. The regex matches what the names match:
    a module called that, or ending in ``.`` and that name.
    """
    if isinstance(targets, str):
        return targets
    import re

    return r"(.*\.)?(" + "|".join(re.escape(t) for t in targets) + ")"


# Options of the from_pretrained call that loaded a tokenizer, which it keeps among its init
# kwargs and save_pretrained writes back into tokenizer_config.json. `local_files_only`
# follows HF_HUB_OFFLINE (set by `make run`, unset in a user's shell): left in, the same
# model saved in two environments gives two different folders and DVC hashes.
LOAD_OPTIONS = (
    "local_files_only",
    "is_local",
    "_is_local",
    "_commit_hash",
    "cache_dir",
    "token",
    "revision",
    "force_download",
    "proxies",
    "subfolder",
)


def clear_runtime_state(processing_class: Any) -> Any:
    """The tokenizer without the state of how it was loaded and how it was last called.

    Besides the load options above, a fast tokenizer keeps the padding and truncation of
    its last batch call, and ``save_pretrained`` writes them into ``tokenizer.json``: a
    folder saved after training would carry the collator's last settings (and a reused
    run, which collates nothing, would not). Cleared before saving, every save of the same
    model is the same file wherever it is made.
    """
    tokenizer = getattr(processing_class, "tokenizer", processing_class)
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        backend.no_padding()
        backend.no_truncation()
    init_kwargs = getattr(tokenizer, "init_kwargs", None)
    if isinstance(init_kwargs, dict):
        for key in LOAD_OPTIONS:
            init_kwargs.pop(key, None)
    return processing_class


# The label that carries no loss (what transformers' cross-entropy ignores).
IGNORE = -100


def supervised_positions(labels: Any) -> Any:
    """Sequence positions whose next token is labelled in at least one row of the batch.

    Only the logits there enter a causal-LM loss. Image tokens and prompts carry no labels,
    and in the VLM batches they are most of the sequence (196 of 292 positions in a
    PaliGemma pretraining batch), so computing the output layer and softmax at these
    positions alone cut a pretraining step there by 30% (0.44 s to 0.31 s, 2 threads).
    """
    return (labels[:, 1:] != IGNORE).any(dim=0).nonzero().squeeze(1)


def supervised_loss(logits: Any, labels: Any, num_items_in_batch: Any = None) -> Any:
    """The causal-LM loss from logits computed at ``supervised_positions(labels)`` alone.

    The same number as the model's own loss on full logits: the mean over labelled tokens,
    or their sum over ``num_items_in_batch`` when the Trainer counts tokens across
    gradient-accumulation steps (and processes).
    """
    import torch.nn.functional as F

    targets = labels[:, 1:][:, supervised_positions(labels)].reshape(-1).to(logits.device)
    total = F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), targets, ignore_index=IGNORE, reduction="sum")
    count = (targets != IGNORE).sum() if num_items_in_batch is None else num_items_in_batch
    return total / count


def supervised_forward(model: Any, batch: dict[str, Any], num_items_in_batch: Any = None) -> tuple[Any, Any]:
    """Run ``model`` on ``batch`` (which holds ``labels``); returns (loss, outputs)."""
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    labels = batch["labels"]
    outputs = model(**inputs, logits_to_keep=supervised_positions(labels))
    return supervised_loss(outputs.logits, labels, num_items_in_batch), outputs


def sft_trainer(*, cuda: bool, **kwargs: Any) -> Any:
    """TRL's ``SFTTrainer``; on the CPU with the loss computed at the labelled positions.

    TRL computes the loss through its fused LM-head kernel (chunked log-probs, plus token
    entropy and accuracy for its logs). On a GPU with a real vocabulary that keeps the
    full logits out of memory, and it stays. On the CPU, with the tiny presets, the kernel
    costs more than it saves: 30 SFT steps of the text preset took 26.0 s with it and
    15.0 s with the model's own cross-entropy, the VLM preset 27.3 s and 22.1 s (2
    threads), with the same losses to three decimals. Here the model computes logits only
    where a label follows (``supervised_forward``), which is the same loss again for less.
    The answer-only labels and ``num_items_in_batch`` (gradient accumulation, token counts
    across processes) are honoured as the Trainer does for a model's own loss; only TRL's
    entropy and token-accuracy log entries are gone.
    """
    from trl import SFTTrainer

    if cuda:
        return SFTTrainer(**kwargs)

    class SupervisedLossSFTTrainer(SFTTrainer):
        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):  # type: ignore[override]
            loss, outputs = supervised_forward(model, inputs, num_items_in_batch)
            if self.args.average_tokens_across_devices and num_items_in_batch is not None:
                # num_items_in_batch counts every process's tokens, and DDP averages the
                # gradients over processes: scaled back as Trainer.compute_loss does
                loss = loss * self.accelerator.num_processes
            return (loss, outputs) if return_outputs else loss

    return SupervisedLossSFTTrainer(**kwargs)
