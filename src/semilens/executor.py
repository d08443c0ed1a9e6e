"""Per-item work of a stage (one image, one PDF) on a local process pool.

A per-item stage first answers what it can from its content-hash cache in its own process,
then hands the misses to ``map_items``; each item's function writes its own cache entry in
the worker, so a run stopped half-way keeps every item a worker finished and a rerun
computes only the rest. Results come back in input order, so the stage's outputs are the
same bytes whatever the number of workers.

Workers are processes, not threads: the measurements and the PDF readers are mostly Python
and hold the GIL. They are started with ``spawn``: the stage's process may already hold
OpenMP or torch thread pools, whose locked state a ``fork`` would copy into the child.
"""

from __future__ import annotations

import multiprocessing
import os
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ProcessPoolExecutor
from typing import TypeVar

T = TypeVar("T")
R = TypeVar("R")

# Set by `semilens repro --jobs N` for each stage it starts: the cores that stage may use
# (cores / jobs), so two stages side by side do not each start a worker per core.
STAGE_CORES_ENV = "SEMILENS_STAGE_CORES"


def available_cores() -> int:
    """The cores this process may use (its CPU affinity, not the machine's count)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def stage_workers(requested: int) -> int:
    """Worker processes for a stage: ``requested``, or with 0 this stage's share of the cores."""
    if requested > 0:
        return requested
    share = os.environ.get(STAGE_CORES_ENV, "")
    return max(1, int(share)) if share.isdigit() else available_cores()


def map_items(
    fn: Callable[[T], R],
    items: Iterable[T],
    *,
    workers: int,
    description: str,
    console: object | None = None,
) -> list[R]:
    """``[fn(item) for item in items]`` on up to ``stage_workers(workers)`` processes.

    ``fn`` must be picklable (a module-level function or a ``functools.partial`` of one).
    With one worker, or one item, everything runs in this process: starting a pool costs
    about a second of imports per worker, more than a cached rerun's whole stage.
    An exception in ``fn`` stops the stage like it would in a loop; the per-item
    functions catch what one odd file may raise and return it as that item's result.
    """
    from rich.progress import track

    todo: Sequence[T] = list(items)
    n = min(stage_workers(workers), len(todo))
    kwargs = {"description": description, "transient": True, "total": len(todo)}
    if console is not None:
        kwargs["console"] = console
    if n <= 1:
        return [fn(item) for item in track(todo, **kwargs)]
    with ProcessPoolExecutor(max_workers=n, mp_context=multiprocessing.get_context("spawn")) as pool:
        return list(track(pool.map(fn, todo, chunksize=1), **kwargs))
