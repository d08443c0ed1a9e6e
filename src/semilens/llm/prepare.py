"""prepare_llm: the base checkpoint of the text model.

``base: tiny`` builds a small model of the Llama-3 architecture (``LlamaForCausalLM``:
RoPE, grouped-query attention, SwiGLU), a byte-level BPE tokenizer trained locally on
general English (``semilens.vlm.tokenizer.general_corpus``: no domain text, so domain
knowledge can only come from pretraining), Llama-3's special tokens and chat template,
randomly initialised from the seed, saved as an ordinary HF checkpoint folder at
``<paths.models>/llm/base``. ``base: <folder>`` validates a real checkpoint (model_type
``llama``, safetensors, a tokenizer) and records where it is in ``base/source.json``.
Run: ``python -m stages.prepare_llm``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from semilens.cards import table, write_card
from semilens.config import Config, TinyLLMConfig, dump_config
from semilens.io import atomic_write_text, hash_json, reset_dir, sha256_file, write_json
from semilens.vlm.prepare import CONFIG_FILE, SOURCE_FILE
from semilens.vlm.tokenizer import llama3_tokenizer

def build_tiny(tiny: TinyLLMConfig, seed: int) -> tuple[Any, Any]:
    import torch
    from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM

    tokenizer = llama3_tokenizer(tiny.vocab_size)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=tiny.hidden_size,
        intermediate_size=tiny.intermediate_size,
        num_hidden_layers=tiny.layers,
        num_attention_heads=tiny.heads,
        num_key_value_heads=tiny.kv_heads,
        max_position_embeddings=tiny.max_position_embeddings,
        rope_theta=tiny.rope_theta,
        rms_norm_eps=1e-5,
        tie_word_embeddings=False,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=[tokenizer.convert_tokens_to_ids("<|end_of_text|>"), tokenizer.eos_token_id],
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    model.generation_config = GenerationConfig(
        bos_token_id=config.bos_token_id,
        eos_token_id=config.eos_token_id,
        pad_token_id=config.pad_token_id,
        do_sample=False,
    )
    return model, tokenizer


def validate_real_base(path: Path) -> dict[str, Any]:
    path = Path(path).expanduser()
    config = path / "config.json"
    if not config.is_file():
        raise ValueError(f"{path}: not a checkpoint folder (no config.json); give a local folder, nothing is downloaded")
    model_type = json.loads(config.read_text()).get("model_type")
    if model_type != "llama":
        raise ValueError(f"{path}: model_type {model_type!r}, expected 'llama' (the Llama-3 family)")
    if not list(path.glob("*.safetensors")):
        raise ValueError(f"{path}: no .safetensors weights (only safetensors are loaded)")
    if not (path / "tokenizer.json").is_file() and not (path / "tokenizer.model").is_file():
        raise ValueError(f"{path}: no tokenizer (tokenizer.json)")
    return {"path": str(path.resolve()), "model_type": model_type, "config_sha256": sha256_file(config)}


def prepare_llm(cfg: Config) -> dict[str, Any]:
    pcfg = cfg.prepare_llm
    out = reset_dir(Path(cfg.paths.models) / "llm" / "base")
    if pcfg.base != "tiny":
        source = validate_real_base(Path(pcfg.base))
        write_json(out / SOURCE_FILE, source)
        summary = {"base": "real", **source}
    else:
        model, tokenizer = build_tiny(pcfg.tiny, pcfg.seed)
        model.save_pretrained(out)
        tokenizer.save_pretrained(out)
        atomic_write_text(out / CONFIG_FILE, dump_config(pcfg))
        summary = {
            "base": "tiny",
            "parameters": sum(p.numel() for p in model.parameters()),
            "vocab": len(tokenizer),
            "params_hash": hash_json(pcfg.model_dump(mode="json"))[:16],
        }
    write_card(
        out,
        "semilens text model (base)",
        {"library_name": "transformers", "pipeline_tag": "text-generation", "tags": ["semilens", "llama"]},
        [
            (
                "What this is",
                "The tiny Llama-3-architecture preset, randomly initialised: it knows nothing until "
                "`pretrain_llm` trains it on the corpus."
                if summary["base"] == "tiny"
                else f"A reference to a real checkpoint at `{summary['path']}` (weights not copied).",
            ),
            ("Summary", table([{"": k, "value": v} for k, v in summary.items()], ["", "value"])),
        ],
    )
    write_json(Path(cfg.paths.metrics) / "llm" / "prepare.json", summary)
    return summary
