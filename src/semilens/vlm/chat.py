"""Batches for chat-template families (Qwen2.5-VL, Llama-3.2-Vision).

The chat is rendered with the processor's own template and tokenized with the images by
the processor, exactly as TRL's VLM collator does it; only the assistant's answers carry
the loss (see ``labels.assistant_labels``). Prefix-LM families (PaliGemma) bring their own
``encode`` and ``prompt_inputs`` instead.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from semilens.vlm.labels import assistant_labels


def encode(
    turn_markers: Callable[[Any], dict[str, Any]],
    processor: Any,
    chats: list[list[dict[str, Any]]],
    images: list[list[Any]],
    max_length: int | None = None,
) -> Any:
    """A training batch (right-padded, truncated at ``max_length``) with answer-only labels."""
    texts = [processor.apply_chat_template(chat, tokenize=False) for chat in chats]
    # The template already wrote every special token (Llama's <|begin_of_text|> among
    # them); the tokenizer adding its own would double it.
    batch = processor(
        text=texts,
        images=images,
        padding=True,
        padding_side="right",
        truncation=max_length is not None,
        max_length=max_length,
        return_tensors="pt",
        add_special_tokens=False,
    )
    batch["labels"] = assistant_labels(batch["input_ids"], batch["attention_mask"], **turn_markers(processor))
    return batch


def prompt_inputs(processor: Any, prompts: list[list[dict[str, Any]]], images: list[list[Any]]) -> Any:
    """Left-padded generation inputs: each chat ends in a user turn, the template opens the reply."""
    texts = [processor.apply_chat_template(p, add_generation_prompt=True, tokenize=False) for p in prompts]
    return processor(
        text=texts, images=images, padding=True, padding_side="left", return_tensors="pt", add_special_tokens=False
    )
