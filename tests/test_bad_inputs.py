"""ingest_images on a raw folder full of broken files beside valid ones.

Every broken file must give exactly one one-line quarantine entry, every valid file its
records, the run must finish, and no temp file may be left in the outputs.
"""

from __future__ import annotations

import io
import os
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
import tifffile
from PIL import Image

from semilens.images.ingest import ingest_images, source_of
from semilens.io import read_jsonl


def _structured(h: int, w: int, seed: int = 0) -> np.ndarray:
    """A smooth random 8-bit field: image-like, never flagged low-information."""
    from scipy import ndimage

    rng = np.random.default_rng(seed)
    field = ndimage.gaussian_filter(rng.normal(size=(h, w)), 4)
    field = (field - field.min()) / (np.ptp(field) + 1e-9)
    return (field * 200 + 20).astype(np.uint8)


def png_bytes(arr: np.ndarray, **kw) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG", **kw)
    return buf.getvalue()


def tiff_bytes(arr: np.ndarray, **kw) -> bytes:
    buf = io.BytesIO()
    tifffile.imwrite(buf, arr, **kw)
    return buf.getvalue()


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def bomb_png(width: int, height: int) -> bytes:
    """A well-formed PNG header claiming width x height, with almost no pixel data."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    idat = zlib.compress(b"\x00" * 64)
    chunks = _chunk(b"IHDR", ihdr) + _chunk(b"IDAT", idat) + _chunk(b"IEND", b"")
    return b"\x89PNG\r\n\x1a\n" + chunks


# name -> expected number of records (valid files)
VALID = {
    "valid.jpg": 1,
    "deep16.tif": 1,
    "stack3.tif": 3,
    "palette.png": 1,
    "gray.png": 1,
}
NON_UTF8 = os.fsdecode(b"bad\xff.png")
BROKEN = [
    "empty.png",
    "truncated.png",
    "truncated.tif",
    "text.tif",
    "bomb.png",
    "one_pixel.png",
    "corrupt.dm4",
    "random.dm3",
    "folder.png",
    "gone.tif",
    "pipe.tif",
]


@pytest.fixture
def raw(tmp_path: Path) -> Path:
    root = tmp_path / "raw" / "mixed"
    root.mkdir(parents=True)
    img = _structured(96, 128)
    # --- valid
    (root / "gray.png").write_bytes(png_bytes(img))
    Image.fromarray(img).convert("RGB").save(root / "valid.jpg", quality=90)
    deep = (img.astype(np.uint16) * 257 + 3).astype(np.uint16)
    (root / "deep16.tif").write_bytes(tiff_bytes(deep))
    stack = np.stack([_structured(64, 80, seed=s) for s in range(3)])
    (root / "stack3.tif").write_bytes(tiff_bytes(stack, photometric="minisblack"))
    Image.fromarray(img).convert("P", palette=Image.Palette.ADAPTIVE, colors=64).save(root / "palette.png")
    # Non-UTF-8 file name with valid content: ingested, its source shown with an escape.
    (root / NON_UTF8).write_bytes(png_bytes(_structured(64, 64, seed=7)))
    # --- broken
    good_png, good_tif = png_bytes(img), tiff_bytes(img)
    (root / "empty.png").write_bytes(b"")
    (root / "truncated.png").write_bytes(good_png[: len(good_png) // 2])
    (root / "truncated.tif").write_bytes(good_tif[: len(good_tif) // 3])
    (root / "text.tif").write_text("this is a lab notebook entry, not an image\n")
    (root / "bomb.png").write_bytes(bomb_png(100_000, 100_000))
    (root / "one_pixel.png").write_bytes(png_bytes(np.zeros((1, 1), np.uint8)))
    (root / "corrupt.dm4").write_bytes(b"\x00\x00\x00\x04" + np.random.default_rng(1).bytes(200))
    (root / "random.dm3").write_bytes(np.random.default_rng(2).bytes(300))
    (root / "folder.png").mkdir()
    # Unreadable files: tests run as root, and root ignores chmod 000, so permissions cannot
    # make a file unreadable here. A dangling symlink (the target is gone) and a FIFO (opening
    # it would block forever) are unreadable for everyone, root included.
    (root / "gone.tif").symlink_to(root / "deleted_long_ago.tif")
    os.mkfifo(root / "pipe.tif")
    # --- not images at all: skipped quietly
    (root / "README.md").write_text("# notes\n")
    (root / "notes.txt").write_text("EHT 5 kV\n")
    return tmp_path / "raw"


def _outputs(cfg) -> tuple[list[dict], list[dict]]:
    out = Path(cfg.paths.interim_images)
    return list(read_jsonl(out / "records.jsonl")), list(read_jsonl(out / "quarantine.jsonl"))


def test_broken_files_are_quarantined_and_valid_ones_ingested(raw, make_cfg):
    cfg = make_cfg(raw=raw)
    summary = ingest_images(cfg)
    records, quarantine = _outputs(cfg)
    root = raw / "mixed"

    by_source: dict[str, list[dict]] = {}
    for q in quarantine:
        by_source.setdefault(q["source"], []).append(q)
        assert q["stage"] == "ingest_images"
        assert q["reason"].strip() and "\n" not in q["reason"]
    for name in BROKEN:
        entries = by_source.get(source_of(root / name), [])
        assert len(entries) == 1, f"{name}: {entries}"
    assert len(quarantine) == len(BROKEN), [q["source"] for q in quarantine]

    counts: dict[str, int] = {}
    for r in records:
        counts[r["source"]] = counts.get(r["source"], 0) + 1
    for name, n in VALID.items():
        assert counts.get(source_of(root / name)) == n, name
    assert counts.get(source_of(root / NON_UTF8)) == 1
    assert summary["n_records"] == sum(VALID.values()) + 1
    assert summary["n_skipped"] == 2  # README.md, notes.txt

    # Reasons say what is wrong, not just "error".
    reason = {Path(q["source"]).name: q["reason"] for q in quarantine}
    assert "0 bytes" in reason["empty.png"]
    assert "max_pixels" in reason["bomb.png"] or "decompression" in reason["bomb.png"]
    assert "min_side" in reason["one_pixel.png"]
    assert "not a TIFF/PNG/JPEG/DM3/DM4" in reason["text.tif"]
    assert "directory" in reason["folder.png"]
    assert "symbolic link" in reason["gone.tif"]
    assert "FIFO" in reason["pipe.tif"]


def test_valid_edge_formats_are_normalised(raw, make_cfg):
    cfg = make_cfg(raw=raw)
    ingest_images(cfg)
    records, _ = _outputs(cfg)
    by_name = {}
    for r in records:
        by_name.setdefault(Path(r["source"]).name, []).append(r)

    deep = by_name["deep16.tif"][0]
    assert deep["original_dtype"] == "uint16" and deep["format"] == "TIFF"
    png = np.asarray(Image.open(deep["png"]))
    assert png.dtype == np.uint8 and png.min() == 0 and png.max() == 255  # percentile stretch

    stack = sorted(by_name["stack3.tif"], key=lambda r: r["page"])
    assert [r["page"] for r in stack] == [0, 1, 2] and {r["n_pages"] for r in stack} == {3}
    assert len({r["group"] for r in stack}) == 1  # pages of one file: one source micrograph
    assert len({r["png_sha256"] for r in stack}) == 3

    palette = by_name["palette.png"][0]
    gray = np.asarray(Image.open(by_name["gray.png"][0]["png"]), dtype=np.int16)
    # Palette -> luminance: close to the gray original it was quantised from (64 colours).
    assert np.abs(np.asarray(Image.open(palette["png"]), dtype=np.int16) - gray).mean() < 4

    jpeg = by_name["valid.jpg"][0]
    assert jpeg["format"] == "JPEG"
    assert np.abs(np.asarray(Image.open(jpeg["png"]), dtype=np.int16) - gray).mean() < 4

    # The source is printable text: the undecodable byte is shown as an escape.
    weird = by_name["bad\\xff.png"][0]
    assert weird["source"] == source_of(raw / "mixed" / NON_UTF8)
    for r in records:
        img = Image.open(r["png"])
        assert img.mode == "L" and (img.width, img.height) == (r["width"], r["height"])
        assert not r["low_information"], r["source"]


def test_no_temp_files_left_and_rerun_is_stable(raw, make_cfg, tmp_path):
    cfg = make_cfg(raw=raw)
    ingest_images(cfg)
    first = (Path(cfg.paths.interim_images) / "quarantine.jsonl").read_bytes()
    ingest_images(cfg)  # second run: from the cache, same result
    assert (Path(cfg.paths.interim_images) / "quarantine.jsonl").read_bytes() == first
    for folder in (tmp_path / "out", tmp_path / "cache"):
        leftovers = [p for p in folder.rglob("*") if p.name.startswith(".") or p.name.endswith(".tmp")]
        assert leftovers == []


def test_tiff_bomb_is_refused_from_the_header(tmp_path, make_cfg, monkeypatch):
    raw = tmp_path / "raw"
    raw.mkdir()
    (raw / "big.tif").write_bytes(tiff_bytes(_structured(200, 200)))

    def must_not_decode(*args, **kwargs):
        raise AssertionError("pixels decoded before the size check")

    monkeypatch.setattr(tifffile.TiffPage, "asarray", must_not_decode)
    cfg = make_cfg(raw=raw, max_pixels=10_000)
    summary = ingest_images(cfg)
    _, quarantine = _outputs(cfg)
    assert summary["n_records"] == 0
    assert len(quarantine) == 1 and "200x200" in quarantine[0]["reason"]
    assert "max_pixels" in quarantine[0]["reason"]


def test_invalid_sidecar_is_quarantined_but_its_image_kept(tmp_path, make_cfg):
    raw = tmp_path / "raw" / "grains"
    raw.mkdir(parents=True)
    (raw / "a.png").write_bytes(png_bytes(_structured(64, 64)))
    (raw / "a.json").write_text('{"pixel_size_nm": -3, "label": ')  # broken JSON
    (raw / "metadata.csv").write_text("name,label\nb.png,x\n")  # no 'file' column
    cfg = make_cfg(raw=tmp_path / "raw")
    ingest_images(cfg)
    records, quarantine = _outputs(cfg)
    assert len(records) == 1 and records[0]["label"] == "grains"
    assert records[0]["label_source"] == "folder"
    sources = sorted(Path(q["source"]).name for q in quarantine)
    assert sources == ["a.json", "metadata.csv"]


def test_bad_sidecar_value_is_one_line_and_the_rest_of_the_record_kept(tmp_path, make_cfg):
    raw = tmp_path / "raw" / "grains"
    raw.mkdir(parents=True)
    for i, name in enumerate(("a.png", "b.png", "c.png")):
        (raw / name).write_bytes(png_bytes(_structured(64, 64, seed=i)))
    (raw / "metadata.csv").write_text(
        "file,label,pixel_size_nm,modality\n"
        "a.png,particles,2.5,XRD\n"  # line 2: a modality that is none
        "b.png,holes,-1,haadf-stem\n"  # line 3: a negative pixel size
    )
    (raw / "c.json").write_text('{"label": "pores", "pixel_size_nm": 4.0, "modality": "EDX", "colour": "red"}')
    cfg = make_cfg(raw=tmp_path / "raw")
    summary = ingest_images(cfg)
    records, quarantine = _outputs(cfg)
    assert summary["n_records"] == 3
    got = {Path(r["source"]).name: r for r in records}
    a, b, c = got["a.png"], got["b.png"], got["c.png"]
    # Every valid field of the same row / file is still used.
    assert (a["label"], a["pixel_size_nm"], a["modality"]) == ("particles", 2.5, "unknown")
    assert (b["label"], b["pixel_size_nm"], b["modality"]) == ("holes", None, "STEM")
    assert b["instrument"] == {"detector": "HAADF"}
    assert (c["label"], c["pixel_size_nm"], c["modality"]) == ("pores", 4.0, "unknown")
    reasons = {Path(q["source"]).name: q["reason"] for q in quarantine}
    allowed = "SEM, TEM, STEM, FIB-SEM, unknown"
    assert reasons == {
        "metadata.csv": f"metadata.csv line 2 (a.png): modality 'XRD' is not one of {allowed}; "
        "metadata.csv line 3 (b.png): pixel_size_nm '-1' must be > 0",
        "c.json": f"c.json: modality 'EDX' is not one of {allowed}; "
        "c.json: colour is not a sidecar field (pixel_size_nm, label, modality, group, "
        "instrument, ground_truth, measure)",
    }


def test_duplicate_content_is_ingested_once(tmp_path, make_cfg):
    raw = tmp_path / "raw"
    for folder in ("a", "b"):
        (raw / folder).mkdir(parents=True)
        (raw / folder / "same.png").write_bytes(png_bytes(_structured(64, 64)))
    cfg = make_cfg(raw=raw)
    ingest_images(cfg)
    records, quarantine = _outputs(cfg)
    assert [Path(r["source"]).parent.name for r in records] == ["a"]
    assert len(quarantine) == 1 and quarantine[0]["reason"].startswith("duplicate of ")
