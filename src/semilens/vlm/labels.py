"""Loss masks and integrity checks for VLM chat batches, computed from token ids.

Only the assistant's answer tokens carry the loss. transformers <= 5.17 cannot give an
assistant-token mask for multimodal chats (its character offsets are taken before the
image placeholder is expanded into many image tokens), so the mask is rebuilt here from
the token ids of each family's turn markers, which image expansion cannot shift.
"""

from __future__ import annotations

import torch

from semilens.training import IGNORE


def assistant_labels(
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    start: list[int],
    end_id: int,
    trailing: list[int] = (),  # type: ignore[assignment]
) -> torch.Tensor:
    """Labels that equal input_ids inside assistant turns and IGNORE elsewhere.

    A turn starts after the token sequence ``start`` (e.g. ``<|im_start|>assistant\\n``) and
    runs up to and including ``end_id`` (and the ``trailing`` tokens right after it), so
    the model learns to stop.
    """
    labels = torch.full_like(input_ids, IGNORE)
    n = len(start)
    trailing = list(trailing)
    for b in range(input_ids.shape[0]):
        ids = input_ids[b].tolist()
        i = 0
        while i <= len(ids) - n:
            if ids[i : i + n] != start:
                i += 1
                continue
            j = i + n
            while j < len(ids) and ids[j] != end_id:
                j += 1
            stop = min(j + 1, len(ids))
            if trailing and ids[stop : stop + len(trailing)] == trailing:
                stop += len(trailing)
            labels[b, i + n : stop] = input_ids[b, i + n : stop]
            i = stop
    labels[attention_mask == 0] = IGNORE
    return labels


def check_image_tokens(input_ids: torch.Tensor, image_token_id: int, expected: int) -> None:
    """Raise if the batch holds fewer image tokens than the images need (truncation)."""
    found = int((input_ids == image_token_id).sum())
    if found != expected:
        raise ValueError(
            f"image tokens truncated: batch has {found} image tokens, images need {expected}; raise max_length"
        )
