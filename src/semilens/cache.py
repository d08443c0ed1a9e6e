"""Per-item work cache keyed by content hash.

DVC deletes a stage's outputs before re-running it, so per-item results cannot be kept in
the outputs themselves. They live here instead, under ``paths.cache/<stage>/``: the key is
a hash of the item's content plus everything that changes the result (the stage's params
and ``code_version``, a hash of the source files that compute an item, so an edited rule
can never be served from entries the old rule wrote). Adding one image to a
thousand therefore redoes one image's work. Entries are written atomically, so a killed
run leaves no torn entry, and a corrupt entry is treated as a miss.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from semilens.io import atomic_write_bytes, canonical_json, hash_json


def code_version(*modules: str) -> str:
    """Hash of the named modules' source files (e.g. ``"semilens.images.annotate"``).

    A hand-bumped version number is forgotten sooner or later (it was, once: a phrasing fix
    kept being served from old entries); a hash of the source cannot be. Any edit, comments
    included, recomputes the items, which costs time but never correctness.
    """
    digest = hashlib.sha256()
    for name in sorted(modules):
        spec = importlib.util.find_spec(name)
        if spec is None or spec.origin is None:
            raise ModuleNotFoundError(f"code_version: no source for module {name!r}")
        digest.update(name.encode() + b"\0" + Path(spec.origin).read_bytes())
    return digest.hexdigest()[:16]


@dataclass
class ItemCache:
    root: Path
    stage: str
    version: str
    hits: int = 0
    misses: int = 0
    missed_keys: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.dir = Path(self.root) / self.stage

    def key(self, *parts: Any) -> str:
        return hash_json([self.stage, self.version, *parts])

    def _entry(self, key: str) -> Path:
        return self.dir / key[:2] / f"{key}.json"

    def blob_path(self, key: str, suffix: str) -> Path:
        return self.dir / key[:2] / f"{key}{suffix}"

    def get(self, key: str, blobs: tuple[str, ...] = ()) -> Any | None:
        """The cached value for ``key`` (and its blobs exist), or None; counts hit/miss."""
        entry = self._entry(key)
        value = None
        if entry.is_file() and all(self.blob_path(key, s).is_file() for s in blobs):
            try:
                value = json.loads(entry.read_text(encoding="utf-8"))["value"]
            except (ValueError, KeyError):
                value = None
        if value is None:
            self.misses += 1
            self.missed_keys.append(key)
        else:
            self.hits += 1
        return value

    def put(self, key: str, value: Any, blobs: dict[str, bytes] | None = None) -> None:
        # Blobs first, entry last: an entry only exists once everything it names does.
        for suffix, data in (blobs or {}).items():
            atomic_write_bytes(self.blob_path(key, suffix), data)
        atomic_write_bytes(self._entry(key), canonical_json({"value": value}).encode("utf-8"))

    def stats(self) -> dict[str, int]:
        return {"hits": self.hits, "misses": self.misses}
