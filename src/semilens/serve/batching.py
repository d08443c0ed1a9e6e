"""Dynamic batching: the requests waiting for one model, taken a batch at a time.

Requests queue in arrival order. When the model is free, the oldest request opens a batch
of up to ``max_batch_size`` rows: everything compatible already waiting, and, when the
last batch had company (several clients are busy), what arrives within a short window
(``batch_window_ms``). A lone client never waits for company that is not coming: its
requests go straight to the model. Rows share a batch only when one ``generate`` call can serve them
all as it would serve each alone: greedy decoding (a sampled request draws from the RNG,
and with a seed its draws must not depend on its neighbours, so it runs alone) and, for a
vision model, the same number of images. A request that cannot join waits for a later
batch; its place in the queue is kept. A request whose client hung up leaves the queue
without running.
"""

import threading
import time
from collections import Counter, deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any


@dataclass
class Pending:
    """One request waiting for (or in) a batch; ``done`` is set once it has its outcome."""

    messages: list[dict[str, Any]]
    images: list[Any]
    params: Any  # GenerationParams
    on_text: Callable[[str], None] | None
    cancel: threading.Event | None
    context_tokens: int | None
    max_batch_size: int
    window_s: float
    queued_at: float = field(default_factory=time.monotonic)
    done: threading.Event = field(default_factory=threading.Event)
    result: Any = None  # a Completion, or None when cancelled
    error: BaseException | None = None

    def batchable(self) -> bool:
        return self.params.temperature <= 0

    def joins(self, head: "Pending") -> bool:
        """Whether one generate call can serve this row beside ``head``'s."""
        return self.batchable() and head.batchable() and len(self.images) == len(head.images)

    def cancelled(self) -> bool:
        return self.cancel is not None and self.cancel.is_set()

    def finish(self, result: Any = None, error: BaseException | None = None) -> None:
        self.result, self.error = result, error
        self.done.set()


@dataclass
class BatchStats:
    """What the batches looked like: how many ran, how many rows each, how long rows waited."""

    batches: int = 0
    rows: int = 0
    sizes: Counter = field(default_factory=Counter)
    wait_s_total: float = 0.0
    wait_s_max: float = 0.0

    def add(self, batch: list[Pending], started: float) -> None:
        self.batches += 1
        self.rows += len(batch)
        self.sizes[len(batch)] += 1
        for p in batch:
            wait = started - p.queued_at
            self.wait_s_total += wait
            self.wait_s_max = max(self.wait_s_max, wait)

    def as_dict(self) -> dict[str, Any]:
        return {
            "batches": self.batches,
            "rows": self.rows,
            "mean_batch_size": round(self.rows / self.batches, 3) if self.batches else None,
            "batch_sizes": {str(k): v for k, v in sorted(self.sizes.items())},
            "queue_ms_mean": round(1000 * self.wait_s_total / self.rows, 2) if self.rows else None,
            "queue_ms_max": round(1000 * self.wait_s_max, 2),
        }


class BatchQueue:
    """The waiting requests, in arrival order, and the batch-taking rule (module docstring)."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._waiting: deque[Pending] = deque()
        self._last_size = 1  # rows of the last batch taken: more than 1, clients are concurrent

    def put(self, pending: Pending) -> None:
        with self._cond:
            self._waiting.append(pending)
            self._cond.notify_all()

    def waiting(self) -> int:
        """Requests waiting whose clients have not hung up."""
        with self._cond:
            return sum(not p.cancelled() for p in self._waiting)

    def _drop_cancelled(self) -> None:
        for p in [p for p in self._waiting if p.cancelled()]:
            self._waiting.remove(p)
            p.finish(None)

    def take(self, poll_s: float = 0.1) -> list[Pending]:
        """The next batch: blocks until a request waits, then gathers its companions for
        up to the head's window. Cancelled requests are finished (None) on the way; a
        cancel sets no condition, so waits are cut into ``poll_s`` slices to see one."""
        with self._cond:
            while True:
                batch = self._gather(poll_s)
                if batch:
                    return batch

    def _gather(self, poll_s: float) -> list[Pending] | None:
        """One try at a batch, with the condition held; None when its head left meanwhile."""
        self._drop_cancelled()
        while not self._waiting:
            self._cond.wait(poll_s)
            self._drop_cancelled()
        head = self._waiting[0]
        deadline = time.monotonic() + (head.window_s if self._last_size > 1 else 0.0)
        while True:
            self._drop_cancelled()
            if not self._waiting or self._waiting[0] is not head:
                return None
            fits = [p for p in self._waiting if p is head or p.joins(head)][: head.max_batch_size]
            left = deadline - time.monotonic()
            if len(fits) >= head.max_batch_size or left <= 0 or not head.batchable():
                break
            self._cond.wait(min(left, poll_s))
        for p in fits:
            self._waiting.remove(p)
        self._last_size = len(fits)
        return fits
