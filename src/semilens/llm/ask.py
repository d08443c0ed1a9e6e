"""Answer a question with any semilens text checkpoint folder (``semilens ask``).

The folder may be ``base`` (or the real checkpoint its ``source.json`` names),
``pretrained``, ``sft``, ``gptq`` (compressed-tensors: transformers unpacks it on load)
or a LoRA ``adapter`` folder. The answer comes from evaluate_llm's own ``generate``:
greedy, through the folder's chat template, so what ``ask`` prints is what the benchmark
scored. Reads the folder; writes nothing.
"""

from __future__ import annotations

import json
from pathlib import Path

from semilens.checkpoints import locate_checkpoint


def causal_lm_folder(folder: Path) -> Path:
    """The folder to load, once it is known to hold a causal LM (or an adapter on one).

    Checked from config.json before any weights load, so a VLM or encoder folder fails
    with its model type instead of a loader traceback.
    """
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    folder, base = locate_checkpoint(folder)
    config = (base or folder) / "config.json"
    try:
        model_type = json.loads(config.read_text()).get("model_type")
    except (OSError, ValueError, AttributeError) as exc:  # missing, unreadable, not JSON, not an object
        raise ValueError(f"{config}: not a readable model config ({type(exc).__name__}: {exc})") from None
    if model_type not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES:
        what = f"adapter's base {base}" if base is not None else str(folder)
        raise ValueError(
            f"{what}: model_type {model_type!r} is not a causal language model (give a text checkpoint, e.g. models/llm/sft)"
        )
    return folder


def ask(folder: Path, question: str, max_new_tokens: int = 128, calculator: bool = False) -> str:
    """The model's greedy answer to one question; with ``calculator``, the digits after each
    ``=`` of its arithmetic are computed (as evaluate_llm scores the etching maths).

    An adapter folder is loaded by transformers' PEFT integration (``load_causal`` ->
    ``from_pretrained``): it reads ``adapter_config.json``, loads the base it names and
    applies the adapter unmerged, which answers as the merged ``sft`` folder does.
    """
    from semilens.llm.evaluate import generate

    if not question.strip():
        raise ValueError("the question is empty")
    folder = causal_lm_folder(folder)
    if not calculator:
        return generate(folder, [question], max_new_tokens, batch_size=1)[0]
    from transformers import AutoTokenizer

    from semilens.llm.calculator import generate_with_calculator
    from semilens.llm.evaluate import chat_prompt
    from semilens.llm.pretrain import load_causal

    tokenizer = AutoTokenizer.from_pretrained(folder)
    return generate_with_calculator(load_causal(folder), tokenizer, chat_prompt(tokenizer, question), max_new_tokens)
