"""Small I/O helpers every stage uses: atomic writes, canonical JSON, hashing.

Nothing half-written is ever left behind: every file goes to a temp name in the same
folder and is renamed into place, so a killed stage leaves either the old file or the new.
JSON is written canonically (sorted keys, fixed separators, trailing newline) so that the
same values always give the same bytes, which is what makes data stages byte-reproducible.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

_CHUNK = 1 << 20
_UMASK = os.umask(0)
os.umask(_UMASK)


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def file_digest(path: Path, algorithm: str = "sha256") -> str:
    """Hex digest of a file, read in chunks (sha256 for provenance, md5 where DVC needs it)."""
    h = hashlib.new(algorithm)
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(_CHUNK), b""):
            h.update(block)
    return h.hexdigest()


def sha256_file(path: Path) -> str:
    return file_digest(path, "sha256")


def hash_json(value: Any) -> str:
    """Stable hash of a JSON-able value (dict key order does not matter)."""
    return sha256_bytes(canonical_json(value).encode("utf-8"))


def canonical_json(value: Any, indent: int | None = None) -> str:
    return json.dumps(value, sort_keys=True, indent=indent, ensure_ascii=True, allow_nan=False)


def atomic_write_bytes(path: Path, data: bytes) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
        # mkstemp makes 0600 files; outputs should have the usual umask-derived mode.
        os.chmod(tmp, 0o666 & ~_UMASK)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def write_json(path: Path, value: Any) -> None:
    atomic_write_text(path, canonical_json(value, indent=2) + "\n")


def read_json(path: Path) -> Any:
    return json.loads(Path(path).read_text(encoding="utf-8"))


def write_jsonl(path: Path, rows: Iterable[Any]) -> int:
    """Write one canonical JSON object per line; returns the row count."""
    lines = [canonical_json(row) for row in rows]
    atomic_write_text(path, "".join(line + "\n" for line in lines))
    return len(lines)


def read_jsonl(path: Path) -> Iterator[dict[str, Any]]:
    with open(path, encoding="utf-8") as fh:
        for n, line in enumerate(fh, 1):
            if line.strip():
                try:
                    yield json.loads(line)
                except json.JSONDecodeError as exc:
                    raise ValueError(f"{path}:{n}: not valid JSON: {exc.msg}") from exc


def leaves_folder(path: Path | str, root: Path | str) -> bool:
    """True when ``path`` resolves (symlinks followed, nothing opened) outside ``root``:
    a link planted in an input folder must not pull a file from elsewhere into the outputs."""
    return not Path(os.path.realpath(path)).is_relative_to(os.path.realpath(root))


def display_path(path: Path | str) -> str:
    """A path as printable text, even when the file name is not valid UTF-8.

    Undecodable bytes (which Python keeps as surrogates) are shown as backslash escapes, so
    a quarantine entry can always be written and read back.
    """
    raw = os.fsencode(path)
    return raw.decode("utf-8", errors="backslashreplace")


def reset_dir(path: Path) -> Path:
    """Make ``path`` an empty folder (a stage's declared output folder)."""
    import shutil

    path = Path(path)
    if path.exists():
        shutil.rmtree(path)
    path.mkdir(parents=True)
    return path
