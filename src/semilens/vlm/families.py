"""The VLM families semilens fine-tunes, and what differs between them.

A family names its HF ``model_type`` (checked against a real checkpoint's config), how to
build its tiny preset, its LoRA target modules, its chat-turn markers and how many image
tokens a batch must hold (Qwen2.5-VL expands an image into one token per merged patch
group, Llama-3.2-Vision keeps one ``<|image|>`` token and reads the image through
cross-attention). Everything else (pretraining, fine-tuning, evaluation) is shared code
that only goes through the Auto classes and the processor, so a real checkpoint and the
tiny preset take the same path.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from semilens.vlm import mllama, qwen2_5_vl


@dataclass(frozen=True)
class Family:
    name: str
    model_type: str
    build_tiny: Callable[[Any, list[str]], tuple[Any, Any]]
    turn_markers: Callable[[Any], dict[str, Any]]
    # (processor, batch, number of images) -> image tokens the batch's input_ids must hold
    image_tokens: Callable[[Any, Any, int], int]
    lora_targets: str
    vision_lora_targets: str


def from_module(module: Any) -> Family:
    """A family from its module: ``MODEL_TYPE`` (also its name), ``build_tiny``,
    ``turn_markers``, ``image_tokens``, ``LORA_TARGETS`` and ``VISION_LORA_TARGETS``."""
    return Family(
        name=module.MODEL_TYPE,
        model_type=module.MODEL_TYPE,
        build_tiny=module.build_tiny,
        turn_markers=module.turn_markers,
        image_tokens=module.image_tokens,
        lora_targets=module.LORA_TARGETS,
        vision_lora_targets=module.VISION_LORA_TARGETS,
    )


FAMILIES: dict[str, Family] = {f.name: f for f in map(from_module, (qwen2_5_vl, mllama))}


def get_family(name: str) -> Family:
    try:
        return FAMILIES[name]
    except KeyError:
        raise ValueError(f"unknown VLM family {name!r}; known: {', '.join(FAMILIES)}") from None
