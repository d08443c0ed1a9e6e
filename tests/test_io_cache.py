"""io and cache helpers: atomic writes leave nothing half-written; cache keys and misses."""

import json
import os

import pytest

from semilens.cache import ItemCache
from semilens.io import (
    atomic_write_bytes,
    canonical_json,
    display_path,
    read_jsonl,
    write_json,
    write_jsonl,
)


def test_atomic_write_failure_leaves_old_file_and_no_temp(tmp_path):
    target = tmp_path / "out.json"
    write_json(target, {"a": 1})

    class Boom:
        def __iter__(self):
            yield {"ok": 1}
            raise RuntimeError("killed mid-way")

    with pytest.raises(RuntimeError):
        write_jsonl(target, Boom())
    assert json.loads(target.read_text()) == {"a": 1}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.json"]


def test_canonical_json_is_order_independent_and_rejects_nan():
    assert canonical_json({"b": 1, "a": [1, 2]}) == canonical_json({"a": [1, 2], "b": 1})
    with pytest.raises(ValueError):
        canonical_json({"x": float("nan")})


def test_read_jsonl_names_the_bad_line(tmp_path):
    p = tmp_path / "x.jsonl"
    p.write_text('{"a": 1}\n{oops\n')
    with pytest.raises(ValueError, match=r"x.jsonl:2"):
        list(read_jsonl(p))


def test_display_path_survives_non_utf8_names(tmp_path):
    name = os.fsdecode(b"bad\xffname.png")
    shown = display_path(tmp_path / name)
    assert shown.endswith("bad\\xffname.png")
    canonical_json({"source": shown})  # encodable


def test_cache_hits_misses_and_corrupt_entry(tmp_path):
    cache = ItemCache(tmp_path, "stage", "1")
    k = cache.key("sha", {"p": 1})
    assert k != cache.key("sha", {"p": 2}) != ItemCache(tmp_path, "stage", "2").key("sha", {"p": 1})
    assert cache.get(k) is None
    cache.put(k, {"v": 3}, blobs={".png": b"PNG"})
    assert cache.get(k, blobs=(".png",)) == {"v": 3}
    assert cache.blob_path(k, ".png").read_bytes() == b"PNG"
    # a missing blob or a torn entry is a miss, never a crash
    cache.blob_path(k, ".png").unlink()
    assert cache.get(k, blobs=(".png",)) is None
    atomic_write_bytes(cache._entry(k), b"{torn")
    assert cache.get(k) is None
    assert cache.stats() == {"hits": 1, "misses": 3}


def test_code_version_follows_the_source(tmp_path, monkeypatch):
    """Editing a stage's code changes its cache version (no hand-bumped number to forget)."""
    import importlib

    from semilens.cache import code_version

    (tmp_path / "rules_mod.py").write_text("RULE = 'typical grain size'\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    importlib.invalidate_caches()
    before = code_version("rules_mod", "semilens.images.records")
    assert before == code_version("semilens.images.records", "rules_mod")  # order does not matter
    (tmp_path / "rules_mod.py").write_text("RULE = 'typical grain grain size'\n")
    assert code_version("rules_mod", "semilens.images.records") != before
    with pytest.raises(ModuleNotFoundError):
        code_version("no_such_module_here")
