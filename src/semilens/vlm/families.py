"""The VLM families semilens fine-tunes, and what differs between them.

A family names its HF ``model_type`` (checked against a real checkpoint's config), how to
build its tiny preset, its LoRA target modules, how many image tokens a batch must hold
(Qwen2.5-VL expands an image into one token per merged patch group, Llama-3.2-Vision
keeps one ``<|image|>`` token and reads the image through cross-attention, PaliGemma
writes a fixed number per image) and how a chat becomes a batch: through the processor's
chat template with answer-only labels from the turn markers (Qwen2.5-VL, Llama-3.2-Vision),
or as PaliGemma's prefix and suffix. Everything else (pretraining, fine-tuning,
evaluation) is shared code that only goes through the Auto classes and the processor, so
a real checkpoint and the tiny preset take the same path.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from typing import Any

from semilens.config import VLM_FAMILIES
from semilens.vlm import chat, mllama, paligemma, qwen2_5_vl


@dataclass(frozen=True)
class Family:
    name: str
    model_type: str
    build_tiny: Callable[[Any, list[str]], tuple[Any, Any]]
    # (processor, batch, number of images) -> image tokens the batch's input_ids must hold
    image_tokens: Callable[[Any, Any, int], int]
    # (processor, chats, images, max_length) -> training batch with answer-only labels
    encode: Callable[..., Any]
    # (processor, chats ending in a user turn, images) -> left-padded generation inputs
    prompt_inputs: Callable[[Any, list[list[dict[str, Any]]], list[list[Any]]], Any]
    lora_targets: str
    vision_lora_targets: str


def from_module(module: Any) -> Family:
    """A family from its module: ``MODEL_TYPE`` (also its name), ``build_tiny``,
    ``image_tokens``, ``LORA_TARGETS``, ``VISION_LORA_TARGETS``, and either its own
    ``encode`` and ``prompt_inputs`` or the ``turn_markers`` its chat template writes."""
    if hasattr(module, "encode"):
        encode, prompt = module.encode, module.prompt_inputs
    else:
        encode, prompt = partial(chat.encode, module.turn_markers), chat.prompt_inputs
    return Family(
        name=module.MODEL_TYPE,
        model_type=module.MODEL_TYPE,
        build_tiny=module.build_tiny,
        image_tokens=module.image_tokens,
        encode=encode,
        prompt_inputs=prompt,
        lora_targets=module.LORA_TARGETS,
        vision_lora_targets=module.VISION_LORA_TARGETS,
    )


FAMILIES: dict[str, Family] = {f.name: f for f in map(from_module, (qwen2_5_vl, mllama, paligemma))}
# config.py validates prepare_vlm.bases against its own list of names (it must not import
# torch through these modules); a family added here and not there would be refused as
# unknown at config time, so fail at import instead of with a confusing config error.
if tuple(FAMILIES) != VLM_FAMILIES:
    raise ImportError(f"semilens.config.VLM_FAMILIES {VLM_FAMILIES} differs from the registry {tuple(FAMILIES)}")


def get_family(name: str) -> Family:
    try:
        return FAMILIES[name]
    except KeyError:
        raise ValueError(f"unknown VLM family {name!r}; known: {', '.join(FAMILIES)}") from None


def family_of(model: Any) -> Family:
    """The family of a loaded model, by its config's model_type."""
    model_type = model.config.model_type
    for family in FAMILIES.values():
        if family.model_type == model_type:
            return family
    raise ValueError(f"model_type {model_type!r} is none of the VLM families: {', '.join(FAMILIES)}")
