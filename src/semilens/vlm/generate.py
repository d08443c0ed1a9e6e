"""Greedy batched generation for any VLM checkpoint, shared by evaluation, the generic
pretraining check, ``semilens predict`` and ``semilens serve``."""

from __future__ import annotations

from typing import Any

from semilens.vlm.families import family_of


def prompt_inputs(model: Any, processor: Any, prompts: list[list[dict[str, Any]]], images: list[list[Any]]) -> Any:
    """Left-padded inputs (so that every row's reply starts right after its own prompt),
    built the way the model's family is trained: chat template or PaliGemma's prefix."""
    return family_of(model).prompt_inputs(processor, prompts, images).to(model.device)


def greedy_answers(
    model: Any,
    processor: Any,
    prompts: list[list[dict[str, Any]]],
    images: list[list[Any]],
    max_new_tokens: int,
    batch_size: int = 16,
) -> list[str]:
    """The model's greedy reply to each prompt (chat messages ending in a user turn)."""
    import torch

    answers: list[str] = []
    for k in range(0, len(prompts), batch_size):
        inputs = prompt_inputs(model, processor, prompts[k : k + batch_size], images[k : k + batch_size])
        with torch.no_grad():
            out = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)
        new = out[:, inputs["input_ids"].shape[1] :]
        answers += [a.strip() for a in processor.batch_decode(new, skip_special_tokens=True)]
    return answers
