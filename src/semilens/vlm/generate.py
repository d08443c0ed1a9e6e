"""Greedy batched generation for any VLM checkpoint, shared by evaluation, the generic
pretraining check and ``semilens predict``."""

from __future__ import annotations

from typing import Any


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

    tok = processor.tokenizer
    # Left padding so that every row's reply starts right after its own prompt.
    side, tok.padding_side = tok.padding_side, "left"
    answers: list[str] = []
    try:
        for k in range(0, len(prompts), batch_size):
            texts = [
                processor.apply_chat_template(p, add_generation_prompt=True, tokenize=False)
                for p in prompts[k : k + batch_size]
            ]
            # the template wrote every special token; the tokenizer must not add a second BOS
            inputs = processor(
                text=texts, images=images[k : k + batch_size], padding=True, return_tensors="pt", add_special_tokens=False
            )
            inputs = inputs.to(model.device)
            with torch.no_grad():
                out = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)
            new = out[:, inputs["input_ids"].shape[1] :]
            answers += [a.strip() for a in processor.batch_decode(new, skip_special_tokens=True)]
    finally:
        tok.padding_side = side
    return answers
