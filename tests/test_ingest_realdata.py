"""ingest_images on the real public micrographs in ../shared/realdata/images (by path).

One stage run per module (outputs in a tmp folder); each test checks one promise against
what the files are known to hold: vendor pixel sizes, burned-in databars, blank and
noise-only frames, bar-free tiles and their groups.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from semilens.config import Config
from semilens.images.ingest import ingest_images, source_of
from semilens.images.readers import IMAGE_EXTENSIONS, decode, to_gray8
from semilens.io import read_jsonl, sha256_file
from semilens.records import ImageRecord


@pytest.fixture(scope="module")
def run(realdata: Path, tmp_path_factory) -> dict:
    tmp = tmp_path_factory.mktemp("realdata_ingest")
    images = realdata / "images"
    cfg = Config.model_validate(
        {
            "paths": {
                "raw_images": str(images),
                "synthetic_images": str(tmp / "no_synthetic"),
                "interim_images": str(tmp / "interim"),
                "cache": str(tmp / "cache"),
                "logs": str(tmp / "logs"),
            }
        }
    )
    summary = ingest_images(cfg)
    out = Path(cfg.paths.interim_images)
    records = [ImageRecord.model_validate(r) for r in read_jsonl(out / "records.jsonl")]
    quarantine = list(read_jsonl(out / "quarantine.jsonl"))
    return {
        "cfg": cfg,
        "images": images,
        "summary": summary,
        "records": records,
        "quarantine": quarantine,
    }


INDENT = "Indent_20230912_7kV_spot4.5_FOV100um_multiBSE_A_05.tif"


def _one(run: dict, name: str, page: int = 0) -> ImageRecord:
    found = [r for r in run["records"] if Path(r.source).name == name and r.page == page]
    assert len(found) == 1, f"{name} p{page}: {len(found)} records"
    return found[0]


def _source_gray(run: dict, rec: ImageRecord) -> np.ndarray:
    """The page as it was before the crop (same decoder and normalisation)."""
    path = Path(rec.source)
    decoded = decode(path.read_bytes(), path, 64_000_000, 16)
    page = next(p for p in decoded.pages if p.index == rec.page)
    return to_gray8(page.pixels, (0.1, 99.9))


def test_every_readable_image_is_ingested(run):
    images: Path = run["images"]
    files = sorted(
        p for p in images.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS
    )
    masks = [p for p in files if p.name.endswith(("_mask.tif", "_mask.png"))]
    micrographs = [p for p in files if p not in masks]
    assert len(micrographs) == 45 and len(masks) == 4
    # The NASA masks are label overlays, not micrographs: excluded by the default config.
    assert sorted(run["summary"]["excluded"]) == sorted(source_of(p) for p in masks)

    ingested = {r.source for r in run["records"]}
    quarantined = {q["source"]: q["reason"] for q in run["quarantine"]}
    first_copy: dict[str, str] = {}
    for path in micrographs:
        first_copy.setdefault(sha256_file(path), source_of(path))
    for path in micrographs:
        src = source_of(path)
        if src in ingested:
            continue
        # The only allowed miss: a byte-identical copy of a file that was ingested.
        # (deepsem 160nm_13_cropped_x2_y0.png repeats 150nm_12_cropped_x2_y0.png.)
        original = first_copy[sha256_file(path)]
        assert quarantined.get(src) == f"duplicate of {original}", src
        assert original in ingested
    assert len(ingested) == len(first_copy) == 44
    assert len(run["quarantine"]) == 1
    # 44 files, one of them with two pages.
    assert len(run["records"]) == 45 == run["summary"]["n_records"]


@pytest.mark.parametrize(
    "name,page,nm,source",
    [
        ("test_tiff_Zeiss_SEM_512pix.tif", 0, 5.825, "tiff:zeiss_34118"),
        ("ZEISS_SEM_multipage.tif", 0, 12.33, "tiff:zeiss_34118"),
        ("ZEISS_SEM_multipage.tif", 1, 12.33, "tiff:zeiss_34118"),
        ("test_tiff_Zeiss_SEM_1k.tif", 0, 2615.0, "tiff:zeiss_34118"),
        (INDENT, 0, 65.1, "tiff:fei_34682"),
        ("P33_scale1_detectorA.tif", 0, 325.52, "tiff:fei_34682"),
        ("FEI-Helios-Ebeam-8bits.tif", 0, 3372.4, "tiff:fei_34682"),
        ("TVIPS_bin4.tif", 0, 1.4208, "tiff:tvips_37706"),
    ],
)
def test_pixel_size_from_vendor_tags(run, name, page, nm, source):
    rec = _one(run, name, page)
    assert rec.pixel_size_nm == pytest.approx(nm, rel=0.005)
    assert rec.pixel_size_source == source


def test_no_pixel_size_where_none_is_recorded(run):
    for rec in run["records"]:
        if "deepsem" in rec.source or "nasa" in rec.source:
            assert (rec.pixel_size_nm, rec.pixel_size_source) == (None, "none")


@pytest.mark.parametrize(
    "name,rows,method,bar_value",
    [
        # Zeiss: white bar with black text, found from the pixels (no height in the tags).
        ("test_tiff_Zeiss_SEM_512pix.tif", 34, "pixels:text_band", 255),
        ("test_tiff_Zeiss_SEM_1k.tif", 77, "pixels:text_band", 255),
        # FEI/Thermo: black bar, height from [Image] ResolutionY.
        (INDENT, 79, "metadata:ResolutionY", 0),
        ("P33_scale1_detectorA.tif", 79, "metadata:ResolutionY", 0),
        ("FEI-Helios-Ebeam-8bits.tif", 29, "metadata:ResolutionY", 0),
    ],
)
def test_databar_is_cropped_and_really_is_the_bar(run, name, rows, method, bar_value):
    rec = _one(run, name)
    assert rec.original_height - rec.height == rows and rec.databar == method
    assert rec.crop_box == (0, 0, rec.width, rec.height) and rec.width == rec.original_width
    gray = _source_gray(run, rec)
    removed, kept = gray[rec.height :], gray[: rec.height]
    # The removed band is the bar: mostly its uniform background, with text in the other
    # polarity; the rows kept just above it are specimen, not bar background.
    assert (np.abs(removed.astype(int) - bar_value) <= 3).mean() > 0.6
    assert (np.abs(removed.astype(int) - bar_value) > 100).mean() > 0.005
    if name != "FEI-Helios-Ebeam-8bits.tif":  # that frame is black everywhere (blank)
        assert (np.abs(kept[-8:].astype(int) - bar_value) <= 3).mean() < 0.3
    png = np.asarray(Image.open(rec.png))
    assert png.shape == (rec.height, rec.width)


def test_pixel_detector_agrees_with_fei_metadata(run):
    """Without its tags, the FEI bar is still found, to the row, from the pixels."""
    from semilens.images.databar import detect_databar

    for name in (INDENT, "P33_scale1_detectorA.tif"):
        rec = _one(run, name)
        bar = detect_databar(_source_gray(run, rec))
        assert (bar.rows, bar.method) == (79, "pixels:text_band")


def test_images_without_a_bar_keep_every_row(run):
    checked = 0
    for rec in run["records"]:
        if "deepsem" in rec.source or "nasa" in rec.source or "multipage" in rec.source:
            assert rec.databar is None and rec.crop_box == (0, 0, rec.width, rec.height)
            assert (rec.width, rec.height) == (rec.original_width, rec.original_height)
            checked += 1
    assert checked == 34 + 4 + 2 - 1  # tiles + fullres, NASA, 2 pages; minus the duplicate
    tile = _one(run, "130nm_05_cropped_x0_y0.png")
    assert (tile.width, tile.height) == (341, 344)
    # TVIPS has a scale-bar box in a corner, which is not a full-width data bar.
    assert _one(run, "TVIPS_bin4.tif").databar is None


def test_low_information_frames_are_flagged_and_only_those(run):
    blank = _one(run, "FEI-Helios-Ebeam-8bits.tif")
    noise = _one(run, "TVIPS_bin4.tif")
    assert blank.low_information and "near-constant" in blank.low_information_reason
    assert noise.low_information and "noise only" in noise.low_information_reason
    flagged = {Path(r.source).name for r in run["records"] if r.low_information}
    assert flagged == {"FEI-Helios-Ebeam-8bits.tif", "TVIPS_bin4.tif"}


def test_tiles_of_one_micrograph_share_a_group(run):
    groups: dict[str, set[str]] = {}
    for rec in run["records"]:
        if "deepsem" in rec.source:
            stem = Path(rec.source).stem.split("_cropped")[0]
            groups.setdefault(stem, set()).add(rec.group)
    assert all(len(g) == 1 for g in groups.values()), groups
    assert len({next(iter(g)) for g in groups.values()}) == len(groups)
    full = _one(run, "140nm_17_cropped.png")
    tile = _one(run, "140nm_17_cropped_x2_y1.png")
    assert full.group == tile.group == "deepsem_nanowires/140nm_17_cropped"
    pages = [_one(run, "ZEISS_SEM_multipage.tif", p) for p in (0, 1)]
    assert pages[0].group == pages[1].group and pages[0].n_pages == 2


def test_modality_instrument_and_formats(run):
    zeiss = _one(run, "test_tiff_Zeiss_SEM_512pix.tif")
    assert zeiss.modality == "SEM" and zeiss.original_dtype == "uint8"
    assert zeiss.instrument["vendor"] == "Zeiss" and zeiss.instrument["hv_kv"] == 5.0
    assert zeiss.instrument["magnification"] == 50000.0 and zeiss.instrument["wd_mm"] == 3.9
    fei = _one(run, INDENT)
    assert fei.original_dtype == "uint16" and fei.instrument["hv_kv"] == 7.0
    assert fei.instrument["magnification"] == pytest.approx(1270, rel=0.01)  # as on its bar
    tvips = _one(run, "TVIPS_bin4.tif")
    assert tvips.modality == "TEM" and tvips.instrument["vendor"] == "TVIPS"
    for rec in run["records"]:
        if "deepsem" in rec.source:
            assert rec.format == "PNG" and rec.modality == "unknown"
            assert rec.label == "deepsem_nanowires" and rec.label_source == "folder"
        png = Image.open(rec.png)
        assert png.mode == "L" and png.size == (rec.width, rec.height)


def test_rerun_is_all_cache_hits_and_byte_identical(run):
    out = Path(run["cfg"].paths.interim_images)
    before = {p.name: p.read_bytes() for p in sorted(out.rglob("*")) if p.is_file()}
    summary = ingest_images(run["cfg"])
    assert summary["cache"] == {"hits": 44, "misses": 0}
    after = {p.name: p.read_bytes() for p in sorted(out.rglob("*")) if p.is_file()}
    assert after == before and len(after) == 45 + 2
