"""Greedy decoding of many prompts at once, with finished rows leaving the batch.

``transformers``' ``generate`` keeps every row of a batch in every forward until the
longest answer ends: a row that wrote its end-of-sequence token at step 20 of 192 is
computed 172 more times. On the CPU a step's cost grows with its rows (SmolLM2-135M in
float32 on one thread: 65 ms for one row, 179 ms for 16, 336 ms for 48), so those rows
are most of the work once the answers differ in length. Here a row leaves the batch, key
and value cache included, the step after it ends; what is left costs what its rows cost.
And since a step of many rows costs far less per row than one of few (11 ms a row at 16,
7 at 48), larger batches pay.

The step itself is the model's own forward with its own cache, positions and padding
mask built as ``generate`` builds them for left-padded rows. Prompts are taken shortest
first, so the rows of a batch carry little padding.

The calculator (``semilens.llm.calculator``) is a per-row rule here: when a row's answer
ends in ``=`` after an arithmetic clause, the value's tokens are that row's next tokens.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

from semilens.llm.calculator import fill_in


@dataclass
class _Row:
    """One prompt's answer in progress."""

    index: int
    budget: int  # max_new_tokens
    max_calls: int  # calculator calls allowed (0: no calculator)
    tokens: list[int] = field(default_factory=list)
    forced: list[int] = field(default_factory=list)  # the calculator's value, still to write
    calls: int = 0
    done: bool = False


class _Calculator:
    """Which tokens write an ``=``, and the value a row's answer asks for after one."""

    def __init__(self, tokenizer: Any):
        self.tokenizer = tokenizer
        self._equals: set[int] | None = None

    @property
    def equals_ids(self) -> set[int]:
        if self._equals is None:  # read once, and only when a row has the calculator
            vocab = self.tokenizer.convert_ids_to_tokens(list(range(len(self.tokenizer))))
            self._equals = {i for i, t in enumerate(vocab) if t is not None and "=" in t}
        return self._equals

    def queue(self, row: _Row) -> None:
        """Queue the value after the ``=`` the row has just written, if it is arithmetic."""
        if row.forced or row.calls >= row.max_calls or not row.tokens or row.tokens[-1] not in self.equals_ids:
            return
        text = self.tokenizer.decode(row.tokens, skip_special_tokens=True)
        value = fill_in(text) if text.rstrip().endswith("=") else None
        if value is not None:
            row.calls += 1
            lead = "" if text[-1:].isspace() else " "
            row.forced = self.tokenizer(lead + value, add_special_tokens=False)["input_ids"]


GQA_SDPA = "semilens_gqa_sdpa"


def _gqa_sdpa(module: Any, query: Any, key: Any, value: Any, attention_mask: Any, *args: Any, **kwargs: Any) -> Any:
    """``transformers``' SDPA attention, except that a one-token decoding step of a model
    whose query heads share key and value heads passes them to SDPA as they are
    (``enable_gqa``) instead of copying each key and value head once per query head.

    ``transformers`` copies them whenever there is a padding mask, for the sake of GPU
    kernels that fall back to plain maths with one. On the CPU the copies were a seventh
    of a decoding run's time; SDPA's own grouped attention gives the same bits.
    """
    import torch.nn.functional as F
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    groups = getattr(module, "num_key_value_groups", 1)
    if query.shape[2] != 1 or groups == 1 or kwargs.get("position_bias") is not None or query.device.type != "cpu":
        return sdpa_attention_forward(module, query, key, value, attention_mask, *args, **kwargs)
    dropout = kwargs.get("dropout", args[0] if args else 0.0)
    scaling = kwargs.get("scaling", args[1] if len(args) > 1 else None)
    out = F.scaled_dot_product_attention(
        query, key, value, attn_mask=attention_mask, dropout_p=dropout, scale=scaling, enable_gqa=True
    )
    return out.transpose(1, 2).contiguous(), None


def _register_gqa_sdpa() -> None:
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask

    AttentionInterface.register(GQA_SDPA, _gqa_sdpa)
    ALL_MASK_ATTENTION_FUNCTIONS.register(GQA_SDPA, sdpa_mask)


@contextmanager
def grouped_attention(model: Any) -> Iterator[None]:
    """Within the block, a model on SDPA attention decodes with ``_gqa_sdpa``; others as they are."""
    before = getattr(model.config, "_attn_implementation", None)
    if before != "sdpa":
        yield
        return
    _register_gqa_sdpa()
    model.set_attn_implementation(GQA_SDPA)
    try:
        yield
    finally:
        model.set_attn_implementation(before)


def end_ids(model: Any, tokenizer: Any) -> set[int]:
    """The token ids that end an answer: the model's generation config, else the tokenizer's."""
    eos = model.generation_config.eos_token_id
    if eos is None:
        eos = tokenizer.eos_token_id
    return set(eos) if isinstance(eos, (list, tuple)) else {eos}


def greedy_answers(
    model: Any,
    tokenizer: Any,
    prompt_texts: list[str],
    max_new_tokens: int | list[int],
    batch_size: int,
    calculator_calls: int | list[int] = 0,
    logits_processor: Callable[[list[list[int]], Any], Any] | None = None,
) -> list[str]:
    """Greedy answers to already formatted prompts, ``batch_size`` rows at most per forward.

    ``max_new_tokens`` and ``calculator_calls`` are one value for every prompt or one per
    prompt, so questions of different kinds share batches. ``calculator_calls`` > 0 lets
    the calculator write the value after up to that many ``=`` in the answer (its tokens
    count against ``max_new_tokens`` like the model's own). ``logits_processor``, when
    given, sees each row's tokens so far (prompt and answer) and the step's logits (one row
    each) and returns the logits to choose from, as ``generate``'s processors do; the
    calculator's values still win. Returns the answers, stripped, in the order of
    ``prompt_texts``.
    """
    n = len(prompt_texts)
    budgets = max_new_tokens if isinstance(max_new_tokens, list) else [max_new_tokens] * n
    calls = calculator_calls if isinstance(calculator_calls, list) else [calculator_calls] * n
    if len(budgets) != n or len(calls) != n:
        raise ValueError("greedy_answers: one max_new_tokens and calculator_calls per prompt, or one for all")
    encoded = [tokenizer(t, add_special_tokens=False)["input_ids"] for t in prompt_texts]
    rows = [_Row(i, budget=budgets[i], max_calls=calls[i]) for i in range(n)]
    decoder = _Decoder(model, tokenizer, batch_size, logits_processor)
    # shortest prompts first: the rows that join together carry little padding
    with grouped_attention(model):
        decoder.run(sorted((r for r in rows if r.budget > 0), key=lambda r: len(encoded[r.index])), encoded)
    return [tokenizer.decode(r.tokens, skip_special_tokens=True).strip() for r in rows]


class _Decoder:
    """The batch: its rows, their key-value cache and padding mask, refilled from a queue.

    Rows leave the step after they end. When half the batch has left, the next prompts
    in the queue are prefilled together and join: their cache and mask are padded on the
    left to the batch's width (or the batch's to theirs) and stacked under it, so every
    row still ends at the right edge. Joining at half rather than at every free slot
    keeps the copies of the cache that a join costs to a few per batch.
    """

    def __init__(self, model: Any, tokenizer: Any, batch_size: int, processor: Any = None):
        self.model, self.batch_size, self.processor = model, max(1, batch_size), processor
        self.stop = end_ids(model, tokenizer)
        self.pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else min(self.stop)
        self.calculator = _Calculator(tokenizer)

    def run(self, queue: list[_Row], encoded: list[list[int]]) -> None:
        import torch

        active: list[_Row] = []
        cache = mask = None
        with torch.no_grad():
            while queue or active:
                if queue and len(active) <= self.batch_size // 2:
                    joining, queue = queue[: self.batch_size - len(active)], queue[self.batch_size - len(active) :]
                    new_cache, new_mask, logits = self._prefill([encoded[r.index] for r in joining])
                    self._choose(joining, logits, encoded)
                    if active:
                        cache, mask = _stack(cache, mask, new_cache, new_mask)
                    else:
                        cache, mask = new_cache, new_mask
                    active = active + joining
                else:
                    # each row's last token goes in; the mask grows by its column
                    ids = torch.tensor([[r.tokens[-1]] for r in active], device=mask.device)
                    mask = torch.cat([mask, mask.new_ones(len(active), 1)], dim=1)
                    self._choose(active, self._forward(ids, mask, cache), encoded)
                keep = [i for i, r in enumerate(active) if not r.done]
                if len(keep) < len(active):
                    if keep:
                        index = torch.tensor(keep, device=mask.device)
                        cache.batch_select_indices(index)
                        mask = mask[index]
                    active = [active[i] for i in keep]
                    if not active:
                        cache = mask = None

    def _forward(self, ids: Any, mask: Any, cache: Any) -> Any:
        """One forward of ``ids`` (rows x new tokens) after what ``cache`` holds; the last
        position's logits. Positions as ``generate`` gives left-padded rows: counted over
        the real tokens only."""
        import torch

        past = cache.get_seq_length()
        positions = (mask.long().cumsum(-1) - 1).masked_fill(mask == 0, 1)[:, -ids.shape[1] :]
        out = self.model(
            input_ids=ids,
            attention_mask=mask,
            position_ids=positions,
            past_key_values=cache,
            cache_position=torch.arange(past, past + ids.shape[1], device=ids.device),
            use_cache=True,
            logits_to_keep=1,
        )
        return out.logits[:, -1, :].float()

    def _prefill(self, prompts: list[list[int]]) -> tuple[Any, Any, Any]:
        import torch
        from transformers import DynamicCache
        from transformers.cache_utils import DynamicLayer

        width = max(len(p) for p in prompts)
        device = self.model.device
        ids = torch.tensor([[self.pad] * (width - len(p)) + p for p in prompts], device=device)
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts], device=device)
        cache = DynamicCache(config=self.model.config)
        # full-attention layers grow in place; others (sliding windows) stay as they are
        growing = _growing_layer_class()
        cache.layers = [growing() if type(layer) is DynamicLayer else layer for layer in cache.layers]
        return cache, mask, self._forward(ids, mask, cache)

    def _choose(self, rows: list[_Row], logits: Any, encoded: list[list[int]]) -> None:
        """Each row's next token: the calculator's when it has one queued, else the argmax
        (of the processor's logits, when there is a processor)."""
        forced: dict[int, int] = {}
        for slot, row in enumerate(rows):
            if row.max_calls:
                self.calculator.queue(row)
                if row.forced:
                    forced[slot] = row.forced.pop(0)
        if self.processor is not None:
            # as in generate, a processor sees a forced row's logits with one token left
            for slot, token in forced.items():
                logits[slot] = float("-inf")
                logits[slot, token] = 0.0
            logits = self.processor([encoded[r.index] + r.tokens for r in rows], logits)
        chosen = logits.argmax(-1).tolist()
        for slot, row in enumerate(rows):
            token = forced.get(slot, chosen[slot])
            row.tokens.append(token)
            row.done = token in self.stop or len(row.tokens) >= row.budget


def _stack(cache: Any, mask: Any, new_cache: Any, new_mask: Any) -> tuple[Any, Any]:
    """The rows of ``new_cache`` under those of ``cache``, both padded on the left to the
    wider one (a padded key is masked out, so no row's attention changes)."""
    import torch
    import torch.nn.functional as F

    width = max(mask.shape[1], new_mask.shape[1])

    def left(t: Any, dim_from_end: int) -> Any:
        short = width - t.shape[-dim_from_end]
        if not short:
            return t
        pad = [0, 0] * (dim_from_end - 1) + [short, 0]
        return F.pad(t, pad)

    for layer, new_layer in zip(cache.layers, new_cache.layers):
        layer.keys = torch.cat([left(layer.keys, 2), left(new_layer.keys, 2)], dim=0)
        layer.values = torch.cat([left(layer.values, 2), left(new_layer.values, 2)], dim=0)
    return cache, torch.cat([left(mask, 1), left(new_mask, 1)], dim=0)


@functools.cache
def _growing_layer_class() -> type:
    # transformers is imported only when a decoder runs
    from transformers.cache_utils import DynamicLayer

    class GrowingLayer(DynamicLayer):
        """A ``DynamicLayer`` whose keys and values are views of a buffer with room to
        grow, written in place at each step. ``DynamicLayer`` concatenates, copying the
        whole cache at every token of every layer: a twelfth of a decoding run's time at
        48 rows. The values, and so the attention's bits, are the same."""

        room = 64  # tokens of headroom per reallocation

        def update(self, key_states: Any, value_states: Any, *args: Any, **kwargs: Any) -> tuple[Any, Any]:
            if not self.is_initialized:
                self.lazy_initialization(key_states, value_states)
            self.keys, self._key_buffer = _append(self.keys, getattr(self, "_key_buffer", None), key_states, self.room)
            self.values, self._value_buffer = _append(
                self.values, getattr(self, "_value_buffer", None), value_states, self.room
            )
            return self.keys, self.values

    return GrowingLayer


def _append(past: Any, buffer: Any, new: Any, room: int) -> tuple[Any, Any]:
    """``past`` with ``new`` after it along the sequence, and the buffer it is a view of.

    ``past`` is a view of ``buffer`` when the last append made it; anything else (empty,
    rows selected, padded) is copied into a fresh buffer first.
    """
    import torch

    length, extra = (past.shape[-2] if past.numel() else 0), new.shape[-2]
    in_place = (
        buffer is not None
        and past.numel()
        and past.data_ptr() == buffer.data_ptr()
        and past.shape[:2] == buffer.shape[:2]
        and length + extra <= buffer.shape[-2]
    )
    if not in_place:
        shape = (*new.shape[:2], length + extra + room, new.shape[-1])
        buffer = torch.empty(shape, dtype=new.dtype, device=new.device)
        if length:
            buffer[:, :, :length] = past
    buffer[:, :, length : length + extra] = new
    return buffer[:, :, : length + extra], buffer
