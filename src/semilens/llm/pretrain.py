"""pretrain_llm: continued causal-LM pretraining on the cleaned Markdown corpus (stage 1).

Reads ``<paths.models>/llm/base`` and ``<paths.markdown>/chunks.jsonl``; writes
``<paths.models>/llm/pretrained`` (an ordinary HF checkpoint), ``metrics/llm/pretrain.json``
(held-out perplexity before and after) and ``metrics/llm/pretrain_loss.csv`` (a DVC plot).
Run: ``python -m stages.pretrain_llm``.

Chunks are split into training and held-out text by a hash of the chunk id, so the
perplexity is measured on text the model never trained on. Documents are packed: each
chunk gets the tokenizer's begin and end tokens, all are concatenated and cut into
``block_size`` blocks, so no compute is spent on padding. ``method: full`` trains every
weight (the tiny preset starts from random weights); ``method: lora`` trains a PEFT
adapter and merges it (a large real base). Checkpoints live in the work cache under a key
of base, corpus and params, so a killed run resumes.
"""

from __future__ import annotations

import hashlib
import math
from pathlib import Path
from typing import Any

from semilens.checkpoints import CONFIG_FILE, resolve_checkpoint
from semilens.config import Config, PretrainLLMConfig, dump_config
from semilens.io import atomic_write_text, hash_json, read_jsonl, reset_dir, sha256_file, write_json
from semilens.training import clear_runtime_state, lora_target_pattern, open_run, train_or_reuse, whole_model

STAGE = "pretrain_llm"
LLAMA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def is_heldout(chunk: dict[str, Any], heldout_fraction: float) -> bool:
    """Is the chunk kept out of pretraining? By a hash of its id: stable as chunks are added."""
    h = int(hashlib.sha256(f"heldout:{chunk['chunk_id']}".encode()).hexdigest()[:8], 16) / 0xFFFFFFFF
    return h < heldout_fraction


def split_corpus(chunks: list[dict[str, Any]], heldout_fraction: float) -> tuple[list[str], list[str]]:
    """(train texts, held-out texts), split by ``is_heldout``."""
    train, held = [], []
    for c in chunks:
        (held if is_heldout(c, heldout_fraction) else train).append(c["text"])
    return train, held


def heldout_by_origin(chunks: list[dict[str, Any]], heldout_fraction: float, raw_pdfs: Path) -> dict[str, list[str]]:
    """Held-out chunk texts, all of them and split by origin: ``real`` from the user's PDFs
    (under ``paths.raw_pdfs``), ``synthetic`` from the rendered knowledge base."""
    raw = raw_pdfs.as_posix().rstrip("/") + "/"
    held = [c for c in chunks if is_heldout(c, heldout_fraction)]
    real = [c["text"] for c in held if str(c.get("source", "")).startswith(raw)]
    synthetic = [c["text"] for c in held if not str(c.get("source", "")).startswith(raw)]
    return {"all": [c["text"] for c in held], "real": real, "synthetic": synthetic}


def heldout_texts(cfg: Config, chunks: list[dict[str, Any]] | None = None) -> dict[str, list[str]]:
    """The corpus' held-out chunk texts by origin (``heldout_by_origin``); ``chunks``, when
    the caller has read them already, else ``chunks.jsonl``."""
    if chunks is None:
        chunks = list(read_jsonl(Path(cfg.paths.markdown) / "chunks.jsonl"))
    return heldout_by_origin(chunks, cfg.pretrain_llm.heldout_fraction, Path(cfg.paths.raw_pdfs))


def heldout_perplexities(model: Any, tokenizer: Any, held: dict[str, list[str]], block_size: int) -> dict[str, Any]:
    """Perplexity on the real and on the synthetic held-out text, each packed apart, and
    over both (``all``: their summed loss over their summed tokens), with the tokens
    scored. An origin whose text fills no block (a corpus without real documents, say)
    gets None.

    Each model's perplexity is measured once, by the stage that has it in memory
    (pretrain_llm: base and pretrained; quantize_llm: SFT and GPTQ); evaluate_llm reads
    it from their metrics rather than a second pass (about 50 s a model on SmolLM2).
    """
    sums = {origin: loss_total(model, pack(held[origin], tokenizer, block_size)) for origin in ("real", "synthetic")}
    total, count = sum(t for t, _ in sums.values()), sum(c for _, c in sums.values())
    out: dict[str, Any] = {origin: round(math.exp(t / c), 3) if c else None for origin, (t, c) in sums.items()}
    out["all"] = round(math.exp(total / count), 3) if count else None
    out["tokens"] = count
    return out


def require_heldout(ppl: dict[str, Any], chunks_file: Path, block_size: int) -> dict[str, Any]:
    if ppl["all"] is None:
        raise ValueError(
            f"{chunks_file}: no held-out block to measure perplexity on: the corpus is too small for block_size "
            f"{block_size}"
        )
    return ppl


def pack(texts: list[str], tokenizer: Any, block_size: int) -> list[list[int]]:
    """Concatenate ``<bos> text <eos>`` for every text and cut into full blocks."""
    bos = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
    eos = [tokenizer.eos_token_id]
    stream: list[int] = []
    for text in texts:
        stream += bos + tokenizer(text, add_special_tokens=False)["input_ids"] + eos
    return [stream[i : i + block_size] for i in range(0, len(stream) - block_size + 1, block_size)]


# Logit elements one perplexity batch may hold (x4 bytes, and the loss makes copies): a
# 49,152-word vocabulary (SmolLM2) at 256 tokens is 12.6M a block, so 2 blocks a batch.
LOGIT_BUDGET = 2**25


def loss_total(model: Any, blocks: list[list[int]], batch_size: int = 8) -> tuple[float, int]:
    """(summed next-token loss, tokens predicted) over the blocks; (0.0, 0) for none."""
    import torch

    model.eval()
    if blocks:
        vocab = model.get_output_embeddings().out_features
        batch_size = max(1, min(batch_size, LOGIT_BUDGET // (len(blocks[0]) * vocab)))
    total, count = 0.0, 0
    with torch.no_grad():
        for i in range(0, len(blocks), batch_size):
            ids = torch.tensor(blocks[i : i + batch_size], device=model.device)
            logits = model(input_ids=ids).logits[:, :-1].float()
            loss = torch.nn.functional.cross_entropy(
                logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1), reduction="sum"
            )
            total += float(loss)
            count += ids[:, 1:].numel()
    return total, count


def perplexity(model: Any, blocks: list[list[int]], batch_size: int = 8) -> float:
    """exp(mean next-token loss) over every predicted token of the blocks."""
    total, count = loss_total(model, blocks, batch_size)
    if count == 0:
        raise ValueError("no held-out block to measure perplexity on: the corpus is too small for block_size")
    return round(math.exp(total / count), 3)


# Facts about this run rather than the model: a resumed run reports the checkpoint it
# resumed from and a loss averaged over its own steps only. They go to the run log; the
# DVC metrics file keeps what is the same however the model was reached.
RUN_ONLY = ("resumed_from", "train_loss")


def model_metrics(summary: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in summary.items() if k not in RUN_ONLY}


def load_causal(folder: Path, cpu_dtype: str = "float32") -> Any:
    """A causal LM for scoring or generating: ``cpu_dtype`` on the CPU, bf16 on the GPU
    when there is one.

    Training stages load their own way (the Trainer places the model); this is for the
    stages that only run the model, where a real 8B base would crawl on the CPU.
    """
    import torch
    from transformers import AutoModelForCausalLM

    if torch.cuda.is_available():
        return AutoModelForCausalLM.from_pretrained(folder, dtype=torch.bfloat16, device_map="cuda").eval()
    return AutoModelForCausalLM.from_pretrained(folder, dtype=getattr(torch, cpu_dtype)).eval()


def lora_config(lora: Any) -> Any:
    """PEFT LoraConfig from a params ``lora`` section (Llama projections by default)."""
    from peft import LoraConfig

    return LoraConfig(
        r=lora.r,
        lora_alpha=lora.alpha,
        lora_dropout=lora.dropout,
        target_modules=lora_target_pattern(lora.target_modules or LLAMA_TARGETS),
        modules_to_save=list(lora.modules_to_save) or None,
        task_type="CAUSAL_LM",
    )


def lora_model(model: Any, lora: Any) -> Any:
    from peft import get_peft_model

    return get_peft_model(model, lora_config(lora))


def run_key(*parts: Any) -> str:
    return hash_json([str(p) for p in parts])[:16]


def weights_digest(folder: Path) -> list[str]:
    return [sha256_file(w) for w in sorted(Path(folder).glob("*.safetensors"))] + [
        sha256_file(Path(folder) / "config.json")
    ]


def trainer_kwargs(c: Any, ckpt_dir: Path) -> dict[str, Any]:
    """The arguments both text-model trainers share (``c``: a pretrain or SFT section).

    bf16 only on CUDA: TRL defaults to bf16 autocast, which on a CPU without bf16 units
    made SFT ~8x slower (measured: 10.7 s vs 1.3 s per step).
    """
    import torch

    cuda = torch.cuda.is_available()
    return dict(
        output_dir=str(ckpt_dir),
        max_steps=c.max_steps,
        per_device_train_batch_size=c.batch_size,
        gradient_accumulation_steps=c.gradient_accumulation_steps,
        learning_rate=c.learning_rate,
        lr_scheduler_type="cosine",
        warmup_steps=c.warmup_steps,
        logging_steps=c.logging_steps,
        save_strategy="steps",
        save_steps=c.save_steps,
        save_total_limit=2,
        report_to="none",
        use_cpu=not cuda,
        bf16=cuda,
        fp16=False,
        seed=c.seed,
        data_seed=c.seed,
        dataloader_num_workers=0,
        disable_tqdm=True,
    )


def trained_causal(trainer: Any, checkpoint: Path, base: Path) -> Any | None:
    """``whole_model`` for a causal LM trained from ``base``: the model to save in the first
    process, None in the others."""
    import torch
    from transformers import AutoModelForCausalLM

    return whole_model(
        trainer, checkpoint, base, lambda f: AutoModelForCausalLM.from_pretrained(f, dtype=torch.float32)
    )


def train_causal(
    model: Any, blocks: list[list[int]], pcfg: PretrainLLMConfig, ckpt_dir: Path
) -> tuple[Any, dict[str, Any]]:
    """HF Trainer over fixed-length blocks; returns (trainer, the run's record)."""
    import datasets
    from transformers import Trainer, TrainingArguments, default_data_collator

    ds = datasets.Dataset.from_dict({"input_ids": blocks, "labels": blocks})
    args = TrainingArguments(**trainer_kwargs(pcfg, ckpt_dir), weight_decay=0.01)
    trainer = Trainer(model=model, args=args, train_dataset=ds, data_collator=default_data_collator)
    return trainer, train_or_reuse(trainer, open_run(ckpt_dir, pcfg.max_steps))


def pretrain_llm(cfg: Config) -> dict[str, Any]:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    pcfg = cfg.pretrain_llm
    torch.set_num_threads(pcfg.threads)
    torch.manual_seed(pcfg.seed)
    base_dir = Path(cfg.paths.models) / "llm" / "base"
    weights = resolve_checkpoint(base_dir)
    chunks_file = Path(cfg.paths.markdown) / "chunks.jsonl"
    chunks = list(read_jsonl(chunks_file))
    train_texts, _ = split_corpus(chunks, pcfg.heldout_fraction)
    held = heldout_texts(cfg, chunks)
    tokenizer = AutoTokenizer.from_pretrained(weights)
    model = AutoModelForCausalLM.from_pretrained(weights, dtype=torch.float32)
    train_blocks = pack(train_texts, tokenizer, pcfg.block_size)
    if not train_blocks:
        raise ValueError(f"{chunks_file}: the corpus gives no full {pcfg.block_size}-token block to train on")
    ppl_before = require_heldout(
        heldout_perplexities(model, tokenizer, held, pcfg.block_size), chunks_file, pcfg.block_size
    )

    # this module's own hash too: a checkpoint written by other training code is not resumed;
    # and the launch: another process count is another global batch, another sharding
    # another checkpoint format
    key = run_key(
        weights_digest(weights),
        sha256_file(chunks_file),
        pcfg.model_dump(mode="json"),
        sha256_file(Path(__file__)),
        cfg.launch.model_dump(mode="json"),
    )
    ckpt_dir = Path(cfg.paths.cache) / STAGE / key
    if pcfg.method == "lora":
        model = lora_model(model, pcfg.lora)
    trainer, record = train_causal(model, train_blocks, pcfg, ckpt_dir)
    curve = record["curve"]
    # under `accelerate launch` every process trains and the first alone evaluates and writes
    model = trained_causal(trainer, ckpt_dir / record["checkpoint"], weights)
    if model is None:
        return {"process": trainer.args.process_index}
    if pcfg.method == "lora":
        model = model.merge_and_unload()
    ppl_after = heldout_perplexities(model, tokenizer, held, pcfg.block_size)

    out = reset_dir(Path(cfg.paths.models) / "llm" / "pretrained")
    model.save_pretrained(out)
    clear_runtime_state(tokenizer).save_pretrained(out)
    atomic_write_text(out / CONFIG_FILE, dump_config(pcfg))
    metrics_dir = Path(cfg.paths.metrics) / "llm"
    atomic_write_text(
        metrics_dir / "pretrain_loss.csv", "step,loss\n" + "".join(f"{p['step']},{p['loss']}\n" for p in curve)
    )
    summary = {
        "method": pcfg.method,
        "steps": record["steps"],
        "resumed_from": record["resumed_from"],
        "train_chunks": len(train_texts),
        "processes": trainer.args.world_size,
        "heldout_chunks": len(held["all"]),
        "train_tokens": len(train_blocks) * pcfg.block_size,
        "heldout_tokens": ppl_before["tokens"],
        **{
            f"heldout_perplexity_{when}{suffix}": ppl[key]
            for when, ppl in (("before", ppl_before), ("after", ppl_after))
            for key, suffix in (("all", ""), ("real", "_real"), ("synthetic", "_synthetic"))
        },
        "first_loss": curve[0]["loss"] if curve else None,
        "last_loss": curve[-1]["loss"] if curve else None,
    }
    write_json(metrics_dir / "pretrain.json", model_metrics(summary))
    return summary
