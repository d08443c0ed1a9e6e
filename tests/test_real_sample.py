"""The committed real sample in data/raw (data/raw/SOURCES.md), the default run's input.

Every file is listed with its source, licence text and sha256; nothing share-alike or
under a publisher's copyright slipped in; the copies are byte-identical to the full set's
files where that set exists; and ingest_images takes every micrograph of the sample, with
the sidecars' modality and label and the vendors' pixel sizes, quarantining none.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from conftest import ingest_folder

from semilens.images.readers import IMAGE_EXTENSIONS
from semilens.images.records import ImageRecord
from semilens.io import read_jsonl, sha256_file

# | `path` | bytes | `sha256` | repository | commit | licence | `licence text` |
ROW = re.compile(r"^\| `([^`]+)` \| (\d+) \| `([0-9a-f]{64})` \| ([^|]+) \| ([^|]+) \| ([^|]+) \| `([^`]+)` \|$")
ALLOWED = ("MIT", "BSD-3-Clause", "Apache-2.0", "US government work")
FORBIDDEN = ("GPL-3.0 at the data", "BY-SA", "Elsevier", "publisher")
MASK_FOLDERS = ("masks", "segmaps", "labels")


def _sources(sample: Path) -> dict[str, dict[str, str]]:
    rows = {}
    for line in (sample / "SOURCES.md").read_text().splitlines():
        m = ROW.match(line)
        if m:
            path, size, sha, repo, commit, licence, text = (g.strip() for g in m.groups())
            rows[path] = {"bytes": size, "sha256": sha, "repo": repo, "licence": licence, "text": text}
    return rows


def _files(sample: Path) -> list[str]:
    return sorted(
        p.relative_to(sample).as_posix()
        for p in sample.rglob("*")
        if p.is_file() and p.name not in (".gitkeep", "SOURCES.md")
    )


def _is_mask(rel: str) -> bool:
    parts = [f.lower() for f in Path(rel).parts[:-1]]
    return any(f in MASK_FOLDERS or f.startswith("masks_") for f in parts) or Path(rel).stem.lower().endswith("_mask")


def test_sources_lists_every_file_with_its_sha256_and_licence_text(real_sample):
    rows = _sources(real_sample)
    files = _files(real_sample)
    assert sorted(rows) == files
    for rel, row in rows.items():
        path = real_sample / rel
        assert sha256_file(path) == row["sha256"] and path.stat().st_size == int(row["bytes"]), rel
        assert any(a in row["licence"] for a in ALLOWED), (rel, row["licence"])
        assert not any(f in row["licence"] for f in FORBIDDEN), (rel, row["licence"])
        assert (real_sample / row["text"]).resolve().is_file(), (rel, row["text"])
    # small enough for git: the repository carries it in every clone
    assert sum((real_sample / rel).stat().st_size for rel in files) < 25_000_000
    assert any(rel.startswith("pdfs/ihp_open_pdk/SG13G2_os_process_spec") for rel in files)


def test_copies_are_byte_identical_to_the_full_set(real_sample, realdata):
    """Every upstream file here is the full set's file, byte for byte. Ours are the
    sidecars, the DERIVED tables cut to the rows of the files here, and one licence text
    the full set lacks."""
    ours = {"images/sem2surface_fei_tiff/LICENSE"}
    checked = 0
    for rel, row in _sources(real_sample).items():
        if rel in ours or rel.endswith("metadata.csv") or Path(rel).name.startswith("DERIVED_"):
            continue
        assert sha256_file(realdata / rel) == row["sha256"], rel
        checked += 1
    assert checked >= 90


@pytest.fixture(scope="module")
def sample_run(real_sample: Path, tmp_path_factory) -> dict:
    tmp = tmp_path_factory.mktemp("sample_ingest")
    cfg, summary = ingest_folder(real_sample / "images", tmp)
    out = Path(cfg.paths.interim_images)
    records = {Path(r["source"]).name: ImageRecord.model_validate(r) for r in read_jsonl(out / "records.jsonl")}
    return {"summary": summary, "records": records, "quarantine": list(read_jsonl(out / "quarantine.jsonl"))}


def test_every_sample_micrograph_is_ingested_and_no_mask_is(real_sample, sample_run):
    images = [
        rel for rel in _files(real_sample) if rel.startswith("images/") and Path(rel).suffix.lower() in IMAGE_EXTENSIONS
    ]
    masks = [rel for rel in images if _is_mask(rel)]
    micrographs = {Path(rel).name for rel in images if not _is_mask(rel)}
    assert len(micrographs) == 9 and len(masks) == 1 + 76 + 2  # soot, nanomembranes, NASA
    assert sample_run["quarantine"] == []
    assert set(sample_run["records"]) == micrographs
    assert sample_run["summary"]["n_excluded"] == len(masks)


def test_sidecars_and_vendor_tags_describe_the_sample(sample_run):
    recs = sample_run["records"]
    assert recs["201805A_A6_004.png"].modality == "TEM"
    assert {r.modality for name, r in recs.items() if name != "201805A_A6_004.png"} == {"SEM"}
    fibres = {name for name, r in recs.items() if r.label == "fibres"}
    assert fibres == {"10%_gelatin_fibers.tif", "Example_thick_fibers.tif"}
    assert all(r.label is None for name, r in recs.items() if name not in fibres)
    # FEI tag 34682 (PixelWidth), each confirmed by the burned-in bar within 2%
    for name, nm in (
        ("10%_gelatin_fibers.tif", 31.0059),
        ("P33_scale1_detectorA.tif", 325.52),
        ("Indent_20230912_7kV_spot4.5_FOV100um_multiBSE_A_05.tif", 65.1),
    ):
        rec = recs[name]
        assert rec.pixel_size_nm == pytest.approx(nm, rel=0.005) and rec.pixel_size_source == "tiff:fei_34682"
        assert rec.pixel_size_check == "agree" and rec.databar == "metadata:ResolutionY", name
    # the ImageJ re-save: no tag, the 10 um bar read from the pixels
    thick = recs["Example_thick_fibers.tif"]
    assert thick.pixel_size_source == "scalebar:ocr" and thick.pixel_size_nm == pytest.approx(31.0059, rel=0.02)
    # no pixel size is invented where the source records none
    for name in (
        "201805A_A6_004.png",
        "spot2_0d_0.tif",
        "spot2_180d_3.tif",
        "6410_NMonSi_MOVPE_w1_17.png",
        "6418_NMonSi_MOVPE_w3_10.png",
    ):
        assert (recs[name].pixel_size_nm, recs[name].pixel_size_source) == (None, "none"), name
    assert not any(r.low_information for r in recs.values())
