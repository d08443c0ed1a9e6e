"""Nothing is read from outside the data folders.

A symlink planted under the raw image or PDF folder that resolves elsewhere is quarantined
with a reason and never opened (an audit hook watches every open() of the process), and
no output carries its bytes or hash; ``paths.*`` in params.yaml outside the project are
refused unless ``paths.allow_outside: true``, and that allowance shows in the lineage.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml
from conftest import text_config
from PIL import Image

from semilens.config import ConfigError, load_config
from semilens.lineage import path_allowance

SECRET = b"\x89PNG\r\n\x1a\n" + b"TOP-SECRET-OUTSIDE-THE-DATA-FOLDER " * 4

# Paths opened by this process while a watch is on; an audit hook cannot be removed,
# so it stays installed and records only while ``_WATCH`` is set.
_OPENED: list[str] = []
_WATCH: list[bool] = []


def _audit(event: str, args: tuple) -> None:
    if _WATCH and event == "open" and isinstance(args[0], (str, bytes, os.PathLike)):
        _OPENED.append(os.path.realpath(os.fsdecode(args[0])))


sys.addaudithook(_audit)


class watch_opens:
    """Record the real path of every file opened inside the block."""

    def __enter__(self) -> list[str]:
        _OPENED.clear()
        _WATCH.append(True)
        return _OPENED

    def __exit__(self, *exc) -> None:
        _WATCH.clear()


def plant_secret(tmp_path: Path, name: str) -> Path:
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    secret = outside / name
    secret.write_bytes(SECRET)
    return secret


def assert_nowhere(folder: Path, secret: Path) -> None:
    """Neither the secret's bytes, its text nor its sha256 in any file under ``folder``."""
    digest = hashlib.sha256(SECRET).hexdigest().encode()
    for path in folder.rglob("*"):
        if path.is_file() and not path.is_symlink():
            data = path.read_bytes()
            assert b"TOP-SECRET" not in data and digest not in data, path


def test_an_image_symlink_leaving_the_raw_folder_is_quarantined_unread(tmp_path, make_cfg):
    from semilens.images.ingest import ingest_images

    secret = plant_secret(tmp_path, "passwd.png")
    raw = tmp_path / "raw" / "particles"
    raw.mkdir(parents=True)
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 255, (64, 64), dtype=np.uint8)).save(raw / "real.png")
    (raw / "leak.png").symlink_to(secret)
    # a link that stays inside the folder is still an ordinary (duplicate) input
    (raw / "inner.png").symlink_to(raw / "real.png")
    cfg = make_cfg(raw=tmp_path / "raw")

    with watch_opens() as opened:
        summary = ingest_images(cfg)
    assert str(secret.resolve()) not in opened
    assert summary["n_quarantined"] >= 1

    out = Path(cfg.paths.interim_images)
    entries = [json.loads(line) for line in (out / "quarantine.jsonl").read_text().splitlines()]
    leak = [e for e in entries if e["source"].endswith("leak.png")]
    assert len(leak) == 1 and "symbolic link leaving" in leak[0]["reason"] and "not read" in leak[0]["reason"]
    assert leak[0]["sha256"] is None
    # inner.png (first in sorted order) was read; real.png is then its duplicate
    twin = [e for e in entries if e["source"].endswith("real.png")]
    assert twin and twin[0]["reason"].startswith("duplicate of") and twin[0]["reason"].endswith("inner.png")
    assert_nowhere(tmp_path / "out", secret)
    assert_nowhere(tmp_path / "cache", secret)


def test_a_pdf_symlink_leaving_the_raw_folder_is_quarantined_unread(tmp_path):
    from semilens.text.extract import discover, extract_pdfs

    secret = plant_secret(tmp_path, "secret.pdf")
    cfg = text_config(tmp_path)
    raw = Path(cfg.paths.raw_pdfs)
    (raw / "docs").mkdir(parents=True)
    (raw / "docs" / "manual.pdf").symlink_to(secret)

    assert discover(cfg) == []
    with watch_opens() as opened:
        extract_pdfs(cfg)
    assert str(secret.resolve()) not in opened
    entries = [json.loads(line) for line in (Path(cfg.paths.pages) / "quarantine.jsonl").read_text().splitlines()]
    assert [e["source"].endswith("docs/manual.pdf") for e in entries] == [True]
    assert "symbolic link leaving" in entries[0]["reason"]
    assert_nowhere(Path(cfg.paths.pages), secret)


def _params(tmp_path: Path, **paths) -> Path:
    project = tmp_path / "project"
    project.mkdir(exist_ok=True)
    path = project / "params.yaml"
    path.write_text(yaml.safe_dump({"paths": paths}))
    return path


@pytest.mark.parametrize("where", ["/etc", "../../etc"])
def test_config_refuses_paths_outside_the_project(tmp_path, where):
    with pytest.raises(ConfigError, match=r"paths\.raw_images: \S*/etc is outside the project") as info:
        load_config(_params(tmp_path, raw_images=where))
    assert "paths.allow_outside: true" in str(info.value)


def test_a_symlinked_data_folder_counts_as_outside(tmp_path):
    disk = tmp_path / "disk"
    disk.mkdir()
    params = _params(tmp_path)
    (params.parent / "data").symlink_to(disk)
    with pytest.raises(ConfigError, match=r"paths\.raw_images: .*disk/raw/images is outside"):
        load_config(params)


def test_allow_outside_accepts_them_and_the_lineage_records_it(tmp_path):
    params = _params(tmp_path, raw_images="/etc", allow_outside=True)
    cfg = load_config(params)
    assert cfg.paths.raw_images == Path("/etc")
    tags = path_allowance(cfg.paths, params.parent)
    assert tags == {"paths.allow_outside": "true", "paths.outside.raw_images": "/etc"}
    # inside paths (the shipped params.yaml): nothing recorded, model identities unchanged
    root = Path(__file__).resolve().parents[1]
    shipped = load_config(root / "params.yaml")
    assert shipped.paths.allow_outside is False and path_allowance(shipped.paths, root) == {}
