"""The batch-taking rule of `semilens serve` (semilens.serve.batching), without a model.

What the model then does with a batch (answers equal to one at a time, streams, per-row
max_tokens) is tested through the server in test_serve.py.
"""

from __future__ import annotations

import threading
import time

from semilens.serve.batching import BatchQueue, BatchStats, Pending
from semilens.serve.checkpoint import GenerationParams


def pending(
    name: str, images: int = 0, temperature: float = 0.0, window_ms: float = 200.0, max_batch: int = 4
) -> Pending:
    return Pending(
        [{"role": "user", "content": name}],
        ["img"] * images,
        GenerationParams(8, temperature=temperature),
        None,
        threading.Event(),
        None,
        max_batch,
        window_ms / 1000.0,
    )


def names(batch: list[Pending]) -> list[str]:
    return [p.messages[0]["content"] for p in batch]


def test_a_lone_client_goes_straight_to_the_model():
    queue = BatchQueue()
    queue.put(pending("a"))
    start = time.monotonic()
    assert names(queue.take()) == ["a"]
    assert time.monotonic() - start < 0.1  # the 200 ms window was not waited


def test_after_a_shared_batch_the_head_waits_for_company_up_to_the_batch_size():
    queue = BatchQueue()
    for n in "abc":
        queue.put(pending(n))
    assert names(queue.take()) == ["a", "b", "c"]  # all waiting: one batch, no window needed
    queue.put(pending("d"))
    threading.Timer(0.05, lambda: [queue.put(pending(n)) for n in "efg"]).start()
    # clients are concurrent now: d waits for the others that arrive within its window,
    # and the batch closes at max_batch rows
    assert names(queue.take()) == ["d", "e", "f", "g"]


def test_rows_that_cannot_share_a_call_wait_for_a_later_batch_in_order():
    queue = BatchQueue()
    for p in [
        pending("a", images=1),
        pending("s", temperature=0.7),  # sampled: alone
        pending("b", images=1),
        pending("t"),  # no image: not with the image rows
        pending("c", images=1),
        pending("u"),
    ]:
        queue.put(p)
    assert names(queue.take()) == ["a", "b", "c"]
    assert names(queue.take()) == ["s"]
    assert names(queue.take()) == ["t", "u"]
    assert queue.waiting() == 0


def test_a_request_whose_client_hung_up_leaves_without_running():
    queue = BatchQueue()
    gone, kept = pending("gone"), pending("kept")
    queue.put(gone)
    queue.put(kept)
    gone.cancel.set()
    assert queue.waiting() == 1
    assert names(queue.take()) == ["kept"]
    assert gone.done.is_set() and gone.result is None and gone.error is None


def test_stats_count_batches_rows_and_waits():
    stats = BatchStats()
    rows = [pending("a"), pending("b")]
    stats.add(rows, rows[-1].queued_at + 0.01)
    stats.add(rows[:1], rows[0].queued_at + 0.03)
    report = stats.as_dict()
    assert report["batches"] == 2 and report["rows"] == 3 and report["batch_sizes"] == {"1": 1, "2": 1}
    assert report["mean_batch_size"] == 1.5 and 29 <= report["queue_ms_max"] <= 31
