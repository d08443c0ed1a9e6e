"""The GPU-only paths: bf16 training and GPTQ of the text model on CUDA, and the unsloth
backend of the VLM fine-tune (16-bit LoRA and QLoRA). Skipped without CUDA; the CPU paths
of the same stages are covered in test_llm.py and test_vlm_finetune.py."""

from __future__ import annotations

import importlib.util
import json

import pytest
import torch
from conftest import text_config

from semilens.io import read_json, write_jsonl
from semilens.text.etch_math import problems

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]


def test_text_model_trains_in_bf16_and_its_gptq_folder_runs_on_the_gpu(tmp_path):
    import datasets

    from semilens.llm.evaluate import generate
    from semilens.llm.prepare import prepare_llm
    from semilens.llm.pretrain import load_causal, pretrain_llm
    from semilens.llm.quantize import quantize_llm
    from semilens.llm.sft import sft_llm

    cfg = text_config(
        tmp_path,
        prepare_llm={
            "tiny": {"vocab_size": 512, "hidden_size": 64, "intermediate_size": 128, "heads": 2, "kv_heads": 1}
        },
        pretrain_llm={
            "max_steps": 6,
            "batch_size": 4,
            "block_size": 64,
            "heldout_fraction": 0.3,
            "save_steps": 6,
            "warmup_steps": 1,
        },
        sft_llm={"max_steps": 4, "batch_size": 4, "max_length": 256, "save_steps": 4, "warmup_steps": 1},
        quantize_llm={"group_size": 64, "calibration_samples": 4, "max_seq_length": 64},
    )
    probs = problems(120, seed=1)
    write_jsonl(
        cfg.paths.markdown / "chunks.jsonl",
        [{"chunk_id": f"d:{i:04d}", "text": p.response} for i, p in enumerate(probs)],
    )
    cfg.paths.instructions.mkdir(parents=True)
    datasets.Dataset.from_dict(
        {"instruction": [p.question for p in probs], "response": [p.response for p in probs]}
    ).to_parquet(str(cfg.paths.instructions / "train.parquet"))

    prepare_llm(cfg)
    pre = pretrain_llm(cfg)
    assert pre["heldout_perplexity_after"] < pre["heldout_perplexity_before"]
    sft_llm(cfg)
    ckpt = sorted((cfg.paths.cache / "sft_llm").glob("*/checkpoint-*"))[-1]
    args = torch.load(ckpt / "training_args.bin", weights_only=False)
    assert args.bf16 is True and args.use_cpu is False

    q = quantize_llm(cfg)
    assert q["quantized_layers"] == 14 and q["linear_size_ratio"] < 0.35 and q["reloads_and_generates"]
    gptq = cfg.paths.models / "llm" / "gptq"
    model = load_causal(gptq)
    assert model.device.type == "cuda" and model.dtype == torch.bfloat16
    answers = generate(gptq, ["What is the etch rate if 300 nm go in 2 min?", "What does CMP do?"], 8, 2)
    assert len(answers) == 2 and all(isinstance(a, str) for a in answers)


@pytest.fixture(scope="module")
def vlm_base(tmp_path_factory):
    """The tiny base and its VQA rows, built once and before unsloth is imported: importing
    unsloth swaps Qwen2.5-VL's loss for a Triton kernel process-wide, and prepare_vlm's
    generic pretraining runs on the CPU (in the pipeline the two stages are separate
    processes, so the patch never meets it there)."""
    from test_vlm_finetune import FAMILY, _annotation, _config, _png

    from semilens.images.split import rows_for_image, write_parquet
    from semilens.vlm.prepare import prepare_vlm

    cfg = _config(tmp_path_factory.mktemp("unsloth"))
    prepare_vlm(cfg, FAMILY)
    cfg.paths.vqa.mkdir(parents=True)
    write_parquet(
        [r for i in range(4) for r in rows_for_image(_annotation(i), _png(i), "s")], cfg.paths.vqa / "train.parquet"
    )
    return cfg


@pytest.mark.skipif(importlib.util.find_spec("unsloth") is None, reason="needs the gpu extra (unsloth)")
@pytest.mark.parametrize("quantization", ["none", "4bit"])
def test_unsloth_backend_fine_tunes_the_vlm(vlm_base, quantization):
    import unsloth  # noqa: F401  (unsloth patches transformers when imported first)
    from test_vlm_finetune import FAMILY

    from semilens.config import TrainerSection
    from semilens.vlm.finetune import finetune_vlm, select_backend

    assert select_backend(TrainerSection(), cuda=True)["backend"] == "unsloth"  # what auto picks here
    cfg = vlm_base.model_copy(
        update={
            "paths": vlm_base.paths.model_copy(update={"cache": vlm_base.paths.cache / quantization}),
            "finetune_vlm": vlm_base.finetune_vlm.model_copy(
                update={
                    "trainer": TrainerSection(
                        max_steps=3,
                        batch_size=2,
                        save_steps=3,
                        logging_steps=1,
                        backend="unsloth",
                        quantization=quantization,
                    )
                }
            ),
        }
    )
    summary = finetune_vlm(cfg, FAMILY)
    assert summary["backend"] == "unsloth" and summary["bf16"] is True and summary["steps"] == 3
    assert summary["quantization"] == quantization
    merged = cfg.paths.models / FAMILY / "merged"
    assert json.loads((merged / "config.json").read_text())["model_type"] == "qwen2_5_vl"
    assert read_json(cfg.paths.metrics / "vlm" / f"train_{FAMILY}.json")["quantization"] == quantization
