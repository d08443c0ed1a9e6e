"""The VLM families semilens fine-tunes, and what differs between them.

A family names its HF ``model_type`` (checked against a real checkpoint's config), how to
build its tiny preset, its LoRA target modules and its chat-turn markers. Everything else
(pretraining, fine-tuning, evaluation) is shared code that only goes through the Auto
classes, so a real checkpoint and the tiny preset take the same path.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from semilens.vlm import qwen2_5_vl


@dataclass(frozen=True)
class Family:
    name: str
    model_type: str
    build_tiny: Callable[[Any, list[str]], tuple[Any, Any]]
    turn_markers: Callable[[Any], dict[str, Any]]
    lora_targets: str
    vision_lora_targets: str


FAMILIES: dict[str, Family] = {
    "qwen2_5_vl": Family(
        name="qwen2_5_vl",
        model_type="qwen2_5_vl",
        build_tiny=qwen2_5_vl.build_tiny,
        turn_markers=qwen2_5_vl.turn_markers,
        lora_targets=qwen2_5_vl.LORA_TARGETS,
        vision_lora_targets=qwen2_5_vl.VISION_LORA_TARGETS,
    ),
}


def get_family(name: str) -> Family:
    try:
        return FAMILIES[name]
    except KeyError:
        raise ValueError(f"unknown VLM family {name!r}; known: {', '.join(FAMILIES)}") from None
