"""The stage runner: ``run_stage`` / ``run_matrix_stage`` are every ``stages/*.py``'s main
(load params.yaml, do the work, report), plus the DVC stage lock ``semilens run`` takes.

What a stage read, wrote and skipped is printed for people and saved for tests and audits.
The summary goes to ``paths.logs/<stage>.json`` (git-ignored, not a DVC output: it holds
cache hit counts and timings that legitimately differ between runs, which must not make
the data outputs differ).
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any

from rich.console import Console

from semilens.config import VLM_FAMILIES, Config, ConfigError, load_config
from semilens.io import write_json

console = Console(stderr=True)


def report(stage: str, summary: dict[str, Any], logs_dir: Path) -> None:
    if int(os.environ.get("RANK", "0")) != 0:
        return  # a secondary process of a multi-process launch: the first one reports
    parts = ", ".join(f"{k}={v}" for k, v in summary.items() if not isinstance(v, (dict, list)))
    console.print(f"[bold]{stage}[/bold]: {parts}")
    write_json(Path(logs_dir) / f"{stage}.json", summary)


class StageFailed(RuntimeError):
    """A stage that ran as configured but must not produce its outputs (a backend that
    answered too few requests, say); the message says why and what to change."""


def run_stage(stage: str, work: Callable[[Config], dict[str, Any]]) -> dict[str, Any]:
    """A stage's whole main: load params.yaml, do the work, report what happened.

    A bad params.yaml ends the stage with exit code 2 and the offending keys, and a
    StageFailed with exit code 1 and its reason: one line each, not a traceback.
    """
    try:
        cfg = load_config()
    except ConfigError as exc:
        console.print(f"[red]{stage}: config error[/red]: {exc}")
        raise SystemExit(2) from exc
    try:
        summary = work(cfg)
    except StageFailed as exc:
        console.print(f"[red]{stage}: failed[/red]: {exc}")
        raise SystemExit(1) from exc
    report(stage, summary, cfg.paths.logs)
    return summary


def run_matrix_stage(
    stage: str, work: Callable[[Config, str], dict[str, Any]], items: tuple[str, ...] = VLM_FAMILIES
) -> dict[str, Any]:
    """Main of a dvc.yaml matrix stage: ``python -m stages.<stage> ITEM``, ITEM one of
    ``items`` (the VLM families by default; the text models for answer_llm): anything else
    exits 2 naming the known ones instead of failing with a traceback inside the work."""
    if len(sys.argv) != 2:
        raise SystemExit(f"usage: python -m stages.{stage} ITEM (one of {', '.join(items)})")
    item = sys.argv[1]
    if item not in items:
        console.print(f"[red]{stage}: unknown item[/red] {item!r}; known: {', '.join(items)}")
        raise SystemExit(2)
    return run_stage(f"{stage}@{item}", lambda cfg: work(cfg, item))


# ---------------------------------------------------------------- DVC's locks


class StageLockError(RuntimeError):
    """DVC holds the repository or one of the stage's paths (a `dvc repro` is running)."""


def clear_stale_rwlock(tmp_dir: Path, hardlink: bool = False) -> list[str]:
    """Drop every entry of ``<tmp_dir>/rwlock`` whose process is gone; one message each.

    A `dvc repro` killed with SIGKILL never releases its entries. DVC itself only drops a
    dead entry when a later command wants an overlapping path (and says so through a logger
    that is usually silent), so the stale file kept confusing whoever read it. Edited under
    DVC's own ``rwlock.lock`` guard, so a DVC command cannot change it meanwhile.
    """
    import psutil
    from dvc.lock import make_lock

    path = Path(tmp_dir) / "rwlock"
    if not path.is_file():
        return []
    cleared: list[str] = []
    with make_lock(str(Path(tmp_dir) / "rwlock.lock"), tmp_dir=str(tmp_dir), hardlink_lock=hardlink):
        try:
            lock = json.loads(path.read_text(encoding="utf-8") or "{}")
        except json.JSONDecodeError:
            return []  # DVC reports a corrupt file itself, with its own advice
        for mode in ("read", "write"):
            entries = lock.get(mode) or {}
            for where in list(entries):
                holders = entries[where] if isinstance(entries[where], list) else [entries[where]]
                alive = [h for h in holders if psutil.pid_exists(int(h["pid"]))]
                for h in holders:
                    if h not in alive:
                        cleared.append(
                            f"cleared a stale DVC {mode} lock on {where} held by PID {h['pid']} "
                            f"({h['cmd']}), which is no longer running"
                        )
                if not alive:
                    del entries[where]
                elif mode == "read":
                    entries[where] = alive
            if mode in lock and not entries:
                del lock[mode]
        if cleared:
            path.write_text(json.dumps(lock), encoding="utf-8")
    return cleared


@contextmanager
def dvc_stage_lock(target: str, root: Path = Path(".")) -> Iterator[None]:
    """Hold, while a stage runs outside DVC (`semilens run`), the locks `dvc repro` takes
    for it: the repository lock ``.dvc/tmp/lock`` while the stage's paths are claimed, then
    DVC's read/write lock (``.dvc/tmp/rwlock``: read on the deps, write on the outs) for
    the whole run, as DVC does around a stage's command. So a `dvc repro` of the same stage
    and a `semilens run` cannot write the same outputs at once, whichever starts first.

    Outside a DVC repository, or for a stage dvc.yaml does not know, there is nothing to
    share a lock with and the stage just runs. Raises StageLockError naming the holder.
    """
    if not (Path(root) / ".dvc").is_dir():
        yield
        return
    from dvc.dependency.db import AbstractDependency
    from dvc.dependency.repo import RepoDependency
    from dvc.exceptions import DvcException
    from dvc.lock import LockError
    from dvc.repo import Repo
    from dvc.rwlock import rwlock
    from dvc.stage.exceptions import StageNotFound

    def paths(items: list[Any]) -> list[str]:
        # what dvc.stage.decorators.rwlocked locks: no repo or database dependencies
        return [i.fs_path for i in items if not isinstance(i, (RepoDependency, AbstractDependency))]

    with Repo(str(root)) as repo, ExitStack() as held:  # the rwlock is released before the repo closes
        hardlink = repo.config["core"].get("hardlink_lock", False)
        try:
            with repo.lock:
                for message in clear_stale_rwlock(Path(repo.tmp_dir), hardlink):
                    console.print(f"[yellow]note[/yellow]: {message}")
                try:
                    stages = list(repo.stage.collect(target))
                except StageNotFound:
                    stages = []
                for stage in stages:
                    held.enter_context(
                        rwlock(
                            repo.tmp_dir,
                            repo.fs,
                            f"semilens run {target}",
                            paths(stage.deps),
                            paths(stage.outs),
                            hardlink,
                        )
                    )
        except LockError as exc:
            detail = " ".join(str(exc).split()).split(" If there are no processes")[0]
            raise StageLockError(
                f"{target}: DVC holds its lock ({detail}); wait for that `dvc` command to finish"
            ) from exc
        except DvcException as exc:  # an unreadable dvc.yaml, say: DVC's words, one line
            raise StageLockError(f"{target}: {' '.join(str(exc).split())}") from exc
        # The repository lock is released here, as `dvc repro` releases it while a stage's
        # command runs: other DVC commands (status, a repro of other stages) stay possible.
        yield
