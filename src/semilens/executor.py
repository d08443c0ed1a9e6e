"""Per-item work of a stage (one image, one PDF) on a local process pool or a Ray cluster.

A per-item stage first answers what it can from its content-hash cache in its own process,
then hands the misses to ``map_items``; each item's function writes its own cache entry in
the worker, so a run stopped half-way keeps every item a worker finished and a rerun
computes only the rest. Results come back in input order, so the stage's outputs are the
same bytes whatever the number of workers.

With ``executor.kind: ray`` each item is a Ray task on the cluster at ``executor.address``;
the content-hash cache stays the unit of work, so a rerun reuses what any node finished,
and a task whose worker dies is retried on another.

Workers are processes, not threads: the measurements and the PDF readers are mostly Python
and hold the GIL. They are started with ``spawn``: the stage's process may already hold
OpenMP or torch thread pools, whose locked state a ``fork`` would copy into the child.
"""

from __future__ import annotations

import multiprocessing
import os
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import ProcessPoolExecutor
from typing import TypeVar

from semilens.config import ExecutorConfig

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
    executor: ExecutorConfig,
    description: str,
    console: object | None = None,
) -> list[R]:
    """``[fn(item) for item in items]`` on ``executor``: up to ``stage_workers(workers)``
    local processes, or one task per item on a Ray cluster.

    ``fn`` must be picklable (a module-level function or a ``functools.partial`` of one).
    With one local worker, or one item, everything runs in this process: starting a pool
    costs about a second of imports per worker, more than a cached rerun's whole stage.
    An exception in ``fn`` stops the stage like it would in a loop; the per-item
    functions catch what one odd file may raise and return it as that item's result.
    """
    from rich.progress import track

    todo: Sequence[T] = list(items)
    kwargs = {"description": description, "transient": True, "total": len(todo)}
    if console is not None:
        kwargs["console"] = console
    if executor.kind == "ray" and todo:
        return list(track(_ray_results(fn, todo, str(executor.address)), **kwargs))
    n = min(stage_workers(executor.workers), len(todo))
    if n <= 1:
        return [fn(item) for item in track(todo, **kwargs)]
    with ProcessPoolExecutor(max_workers=n, mp_context=multiprocessing.get_context("spawn")) as pool:
        return list(track(pool.map(fn, todo, chunksize=1), **kwargs))


# A task whose worker process dies (killed, out of memory) is run again on another worker
# this many times before the stage fails; what finished is in the cache either way.
RAY_TASK_RETRIES = 3


def _in_checkout(fn: Callable[[T], R], item: T, cwd: str) -> R:
    """``fn(item)`` in a Ray worker, from the driver's working directory: records name their
    files relative to the checkout, which every node sees at the same path."""
    os.chdir(cwd)
    return fn(item)


def _ray_results(fn: Callable[[T], R], todo: Sequence[T], address: str) -> Iterator[R]:
    """One Ray task per item, results yielded in input order as they are ready."""
    import ray

    if not ray.is_initialized():
        ray.init(address=address, log_to_driver=False, configure_logging=False)
    task = ray.remote(max_retries=RAY_TASK_RETRIES, retry_exceptions=False)(_in_checkout)
    cwd = os.getcwd()
    refs = [task.remote(fn, item, cwd) for item in todo]
    for ref in refs:
        yield ray.get(ref)
