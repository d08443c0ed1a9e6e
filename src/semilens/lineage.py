"""Lineage from DVC's own bookkeeping: dvc.lock hashes, recomputed and compared.

DVC records an md5 for every stage output in ``dvc.lock``. Anything that tags a model
with "made from these artifacts" (MLflow versions, model cards) takes those hashes, but
only after recomputing them from the files present: a tag copied from a stale lock would
vouch for data the model was not trained on. The hashing follows DVC 3 exactly (plain
md5 of a file; for a directory, the md5 of the JSON list of its files' md5 and relative
paths, suffixed ``.dir``), so the values compare equal to ``dvc.lock``'s.

DVC commands cannot run inside a stage (``dvc repro`` holds the repository lock), which
is why this reads ``dvc.lock`` as YAML instead of asking DVC.
"""

from __future__ import annotations

import hashlib
import json
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from semilens.config import PathsConfig
from semilens.io import file_digest

LOCK_FILE = "dvc.lock"


class LineageError(RuntimeError):
    """An artifact and dvc.lock disagree (or the lock does not know it); the message says which."""


def file_md5(path: Path) -> str:
    return file_digest(path, "md5")


def dvc_md5(path: Path) -> str:
    """The md5 DVC records for ``path`` (a file, or a directory as ``<md5>.dir``)."""
    path = Path(path)
    if path.is_file():
        return file_md5(path)
    if not path.is_dir():
        raise FileNotFoundError(f"{path}: no such file or directory")
    # DVC sorts the listing by the joined relative path string ("a-b" before "a/x"),
    # not by path components; the test with such names pins this down.
    files = sorted((p.relative_to(path).as_posix(), p) for p in path.rglob("*") if p.is_file())
    entries = [{"md5": file_md5(p), "relpath": rel} for rel, p in files]
    listing = json.dumps(entries, sort_keys=True).encode("utf-8")
    return hashlib.md5(listing).hexdigest() + ".dir"


@dataclass(frozen=True)
class Hashed:
    path: str  # as written in dvc.lock (relative to the repository root)
    md5: str


@dataclass
class LockStage:
    name: str  # e.g. finetune_vlm@qwen2_5_vl
    cmd: str
    deps: list[Hashed]
    outs: list[Hashed]
    params: dict[str, Any]
    entry: dict[str, Any]  # the raw lock entry, compared across revisions


@dataclass(frozen=True)
class LockedOutput:
    path: str  # as written in dvc.lock (relative to the repository root)
    stage: str  # the stage that produces it, e.g. finetune_vlm@qwen2_5_vl
    md5: str


def parse_lock(text: str) -> dict[str, LockStage]:
    """The stages of a ``dvc.lock`` text, in lock order."""
    data = yaml.safe_load(text) or {}

    def hashed(items: list[dict[str, Any]] | None) -> list[Hashed]:
        return [Hashed(Path(str(i["path"])).as_posix(), i.get("md5", "")) for i in items or []]

    return {
        name: LockStage(
            name,
            entry.get("cmd", ""),
            hashed(entry.get("deps")),
            hashed(entry.get("outs")),
            entry.get("params") or {},
            entry,
        )
        for name, entry in (data.get("stages") or {}).items()
    }


def lock_outputs(root: Path = Path(".")) -> dict[str, LockedOutput]:
    """Every stage output recorded in ``dvc.lock``, by path."""
    lock_file = Path(root) / LOCK_FILE
    if not lock_file.is_file():
        raise LineageError(f"{lock_file}: no dvc.lock; run the pipeline with `dvc repro`")
    return {
        out.path: LockedOutput(out.path, stage.name, out.md5)
        for stage in parse_lock(read_lock_text(lock_file)).values()
        for out in stage.outs
    }


def read_lock_text(lock_file: Path) -> str:
    """``dvc.lock`` as DVC last finished writing it.

    Under `semilens repro --jobs 2` another stage's DVC process may be rewriting the file
    while this one reads it (DVC truncates and writes it in place, under its repository
    lock): a read then sees a torn file, and every output seems missing from the lock. So
    the read waits for DVC's repository lock ``.dvc/tmp/lock``, held only for DVC's short
    bookkeeping phases, never while a stage's command runs.
    """
    tmp = Path(lock_file).parent / ".dvc" / "tmp"
    if not tmp.is_dir():
        return Path(lock_file).read_text()
    from dvc.lock import make_lock

    with make_lock(str(tmp / "lock"), tmp_dir=str(tmp), wait=True):
        return Path(lock_file).read_text()


def _relative(path: Path, root: Path) -> str:
    path, root = Path(path), Path(root)
    try:
        return path.resolve().relative_to(root.resolve()).as_posix()
    except ValueError:
        raise LineageError(f"{path} is outside the DVC repository at {root.resolve()}") from None


def verified_hashes(paths: dict[str, Path], root: Path = Path(".")) -> dict[str, dict[str, str]]:
    """``{role: {"path", "stage", "md5"}}`` for each artifact, checked against dvc.lock.

    Raises LineageError naming every artifact that is missing from the lock or whose
    contents differ from it (a stage re-run outside DVC, or a file edited by hand).
    """
    locked = lock_outputs(root)
    result: dict[str, dict[str, str]] = {}
    problems: list[str] = []
    for role, path in paths.items():
        rel = _relative(path, root)
        entry = locked.get(rel)
        if entry is None:
            problems.append(f"{rel} ({role}) is not an output in dvc.lock")
            continue
        actual = dvc_md5(Path(root) / rel)
        if actual != entry.md5:
            problems.append(f"{rel} ({role}) has md5 {actual} but dvc.lock says {entry.md5}")
            continue
        result[role] = {"path": rel, "stage": entry.stage, "md5": actual}
    if problems:
        raise LineageError(
            "artifacts do not match dvc.lock: "
            + "; ".join(problems)
            + ". Rebuild them with `dvc repro` (or `dvc commit` if the change is intended)."
        )
    return result


def path_allowance(paths: PathsConfig, root: Path = Path(".")) -> dict[str, str]:
    """Lineage tags for ``paths.allow_outside``: the allowance and every folder outside the
    project it let in, so a model made from a mounted data disk says so. Nothing when all
    paths are inside, so the identities of models made the usual way do not change."""
    outside = paths.outside(root) if paths.allow_outside else {}
    if not outside:
        return {}
    return {"paths.allow_outside": "true", **{f"paths.outside.{key}": str(full) for key, full in outside.items()}}


def run_git(root: Path, *args: str) -> str | None:
    """A git command's stdout, or None where git is missing or the command fails."""
    try:
        done = subprocess.run(["git", *args], cwd=root, capture_output=True, text=True, check=True)
    except (OSError, subprocess.CalledProcessError):
        return None
    return done.stdout


def git_state(root: Path = Path(".")) -> dict[str, Any]:
    """The commit the working tree is on, and whether tracked files differ from it."""
    commit = run_git(root, "rev-parse", "HEAD")
    dirty = run_git(root, "status", "--porcelain", "--untracked-files=no")
    return {
        "commit": commit.strip() if commit else "unknown",
        "dirty": bool(dirty.strip()) if dirty is not None else None,
    }
