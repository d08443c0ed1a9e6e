"""quantize_llm: GPTQ weight-only quantisation of the SFT model (after stage 2).

Reads ``<paths.models>/llm/sft`` and ``<paths.markdown>/chunks.jsonl``; writes
``<paths.models>/llm/gptq`` (compressed-tensors ``pack-quantized`` checkpoint that
``AutoModelForCausalLM.from_pretrained`` and vLLM load) and ``metrics/quantize.json``.
Run: ``python -m stages.quantize_llm``.

llmcompressor's ``GPTQModifier`` quantises every targeted ``Linear`` to ``bits``-bit
symmetric integers with one scale per ``group_size`` input columns (W4A16 with groups of
128 is the usual preset), minimising each layer's output error on calibration
activations. The calibration text is drawn from the corpus' training chunks, never the
held-out slice, so the held-out perplexity that judges the result is not tuned on.

The report gives the linear weights' bytes on disk against their fp32 size, the whole
folder against the unquantised one, and held-out perplexity of both, measured on the
reloaded folder so what is reported is what a user loads.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from semilens.checkpoints import CONFIG_FILE
from semilens.config import Config, QuantizeLLMConfig, dump_config
from semilens.io import atomic_write_text, read_jsonl, reset_dir, write_json
from semilens.llm.pretrain import heldout_perplexities, heldout_texts, load_causal, pack, require_heldout, split_corpus
from semilens.training import clear_runtime_state

STAGE = "quantize_llm"
# compressed-tensors names the parts of a quantised weight weight_packed, weight_scale,
# weight_zero_point, weight_g_idx and weight_shape.
QUANT_PARTS = ("weight_packed", "weight_scale", "weight_zero_point", "weight_g_idx", "weight_shape")


def targeted_linears(model: Any, ignore: list[str]) -> dict[str, Any]:
    """name -> nn.Linear that GPTQ will quantise (every Linear not named in ``ignore``)."""
    import torch

    return {
        name: m
        for name, m in model.named_modules()
        if isinstance(m, torch.nn.Linear) and not any(name == i or name.endswith("." + i) for i in ignore)
    }


def check_group_size(model: Any, qcfg: QuantizeLLMConfig) -> None:
    """Refuse, before any work, layers whose input width the group size does not divide."""
    bad = {n: m.in_features for n, m in targeted_linears(model, qcfg.ignore).items() if m.in_features % qcfg.group_size}
    if bad:
        widths = sorted(set(bad.values()))
        fits = [g for g in (32, 64, 128) if all(w % g == 0 for w in widths)]
        hint = (
            f"a group_size dividing {widths} (e.g. {fits[-1]})"
            if fits
            else f"a model whose widths {widths} divide by 32"
        )
        raise ValueError(
            f"quantize_llm.group_size {qcfg.group_size} does not divide the input width of "
            f"{len(bad)} layer(s) ({', '.join(sorted(bad)[:4])}{', ...' if len(bad) > 4 else ''}); use {hint}, "
            "or add the layers to quantize_llm.ignore"
        )


def recipe(qcfg: QuantizeLLMConfig) -> Any:
    from llmcompressor.modifiers.gptq import GPTQModifier

    # Written out rather than the "W4A16" preset name so bits and group size come from
    # params.yaml; with bits 4 and group 128 it is that preset exactly.
    weights = {
        "num_bits": qcfg.bits,
        "type": "int",
        "symmetric": qcfg.symmetric,
        "strategy": "group",
        "group_size": qcfg.group_size,
    }
    return GPTQModifier(
        config_groups={"group_0": {"targets": ["Linear"], "weights": weights}},
        ignore=list(qcfg.ignore),
        dampening_frac=qcfg.dampening_frac,
    )


def linear_bytes(folder: Path) -> dict[str, int]:
    """Bytes of the quantised linear layers in a compressed-tensors folder, and their fp32 size."""
    from safetensors import safe_open

    packed, fp32, layers = 0, 0, 0
    for file in sorted(Path(folder).glob("*.safetensors")):
        with safe_open(str(file), "pt") as f:
            keys = list(f.keys())
            prefixes = {k.rsplit(".", 1)[0] for k in keys if k.endswith(".weight_packed")}
            for k in keys:
                prefix, part = k.rsplit(".", 1)
                if prefix in prefixes and part in QUANT_PARTS:
                    t = f.get_tensor(k)
                    packed += t.numel() * t.element_size()
                    if part == "weight_shape":
                        fp32 += math.prod(int(x) for x in t.tolist()) * 4
            layers += len(prefixes)
    return {"layers": layers, "bytes": packed, "fp32_bytes": fp32}


def folder_bytes(folder: Path) -> int:
    return sum(f.stat().st_size for f in Path(folder).glob("*.safetensors"))


def quantize_llm(cfg: Config) -> dict[str, Any]:
    import datasets
    import torch
    from llmcompressor import oneshot
    from transformers import AutoModelForCausalLM, AutoTokenizer

    qcfg = cfg.quantize_llm
    torch.set_num_threads(qcfg.threads)
    torch.manual_seed(qcfg.seed)
    src = Path(cfg.paths.models) / "llm" / "sft"
    chunks_file = Path(cfg.paths.markdown) / "chunks.jsonl"
    chunks = list(read_jsonl(chunks_file))
    train_texts, _ = split_corpus(chunks, cfg.pretrain_llm.heldout_fraction)
    held = heldout_texts(cfg, chunks)
    block = cfg.pretrain_llm.block_size
    tokenizer = AutoTokenizer.from_pretrained(src)
    model = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32)
    check_group_size(model, qcfg)
    calib = pack(train_texts, tokenizer, qcfg.max_seq_length)[: qcfg.calibration_samples]
    if not calib:
        raise ValueError(f"{chunks_file}: no full {qcfg.max_seq_length}-token block to calibrate GPTQ on")
    ppl_fp = require_heldout(heldout_perplexities(model, tokenizer, held, block), chunks_file, block)

    calib_ds = datasets.Dataset.from_dict({"input_ids": calib, "attention_mask": [[1] * len(b) for b in calib]})
    oneshot(
        model=model,
        dataset=calib_ds,
        recipe=recipe(qcfg),
        max_seq_length=qcfg.max_seq_length,
        num_calibration_samples=len(calib),
    )
    out = reset_dir(Path(cfg.paths.models) / "llm" / "gptq")
    model.save_pretrained(out, save_compressed=True)
    clear_runtime_state(tokenizer).save_pretrained(out)
    atomic_write_text(out / CONFIG_FILE, dump_config(qcfg))

    # Everything below reads the saved folder back, as a user would.
    reloaded = load_causal(out)
    ppl_q = heldout_perplexities(reloaded, tokenizer, held, block)
    prompt = tokenizer.apply_chat_template(
        [{"role": "user", "content": qcfg.smoke_prompt}], tokenize=False, add_generation_prompt=True
    )
    enc = tokenizer(prompt, return_tensors="pt", add_special_tokens=False).to(reloaded.device)
    with torch.no_grad():
        gen = reloaded.generate(**enc, max_new_tokens=24, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    sample = tokenizer.decode(gen[0, enc["input_ids"].shape[1] :], skip_special_tokens=True).strip()
    qconfig = json.loads((out / "config.json").read_text()).get("quantization_config", {})

    lin = linear_bytes(out)
    summary = {
        "method": "gptq",
        "bits": qcfg.bits,
        "group_size": qcfg.group_size,
        "format": qconfig.get("format"),
        "quantized_layers": lin["layers"],
        "calibration_blocks": len(calib),
        "calibration_tokens": len(calib) * qcfg.max_seq_length,
        "linear_bytes_fp32": lin["fp32_bytes"],
        "linear_bytes_quantized": lin["bytes"],
        "linear_size_ratio": round(lin["bytes"] / lin["fp32_bytes"], 4) if lin["fp32_bytes"] else None,
        "folder_bytes_unquantized": folder_bytes(src),
        "folder_bytes_quantized": folder_bytes(out),
        **{
            f"heldout_perplexity_{which}{suffix}": ppl[key]
            for which, ppl in (("unquantized", ppl_fp), ("quantized", ppl_q))
            for key, suffix in (("all", ""), ("real", "_real"), ("synthetic", "_synthetic"))
        },
        "perplexity_ratio": round(ppl_q["all"] / ppl_fp["all"], 4),
        "reloads_and_generates": gen.shape[1] > enc["input_ids"].shape[1],
        "sample": {"prompt": qcfg.smoke_prompt, "answer": sample},
    }
    write_json(Path(cfg.paths.metrics) / "quantize.json", summary)
    return summary
