"""ingest_images on the real public micrographs in ../shared/realdata/images (by path).

One stage run per module (outputs in a tmp folder); each test checks one promise against
what the files are known to hold (../shared/realdata/README.md): vendor pixel sizes,
burned-in databars, blank and noise-only frames, bar-free tiles and their groups, and the
label masks and instance maps beside the micrographs, which are never ingested.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
from conftest import ingest_folder
from PIL import Image

from semilens.images.ingest import ingest_images, source_of
from semilens.images.readers import IMAGE_EXTENSIONS, decode, to_gray8
from semilens.images.records import ImageRecord
from semilens.io import read_jsonl, sha256_file


@pytest.fixture(scope="module")
def run(realdata: Path, tmp_path_factory) -> dict:
    tmp = tmp_path_factory.mktemp("realdata_ingest")
    images = realdata / "images"
    cfg, summary = ingest_folder(images, tmp)
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

# Micrographs per data-set folder, as the README's table lists them.
MICROGRAPHS = {
    "carbonblack_soot_tem": 3,
    "deepsem_nanomembranes": 4,
    "deepsem_nanowires": 31 + 3 + 4,  # tiles, fullres, raw_tiff
    "emps_particles": 36,
    "gift_fibres_fei": 4,
    "nasa_micronet_benchmark": 4,
    "rosettasciio_testdata": 3 + 1 + 1,  # Zeiss, FEI Helios, TVIPS
    "sem2surface_fei_tiff": 2,
}
# EMPS crops whose figure kept the microscope's databar (seen in the files): JEOL, FEI,
# Hitachi S4800 and an old analogue frame. The other EMPS crops end in specimen.
EMPS_WITH_BAR = {"21308b3614", "31f17306c8", "a1dada3898", "fd1f58d925", "427ebc9e15"}


def _is_annotation(path: Path, images: Path) -> bool:
    """Label masks and instance maps, by the README's layout: a ``masks``, ``masks_*``,
    ``segmaps`` or ``labels`` folder on the way, or a ``*_mask`` file name."""
    folders = [f.lower() for f in path.relative_to(images).parts[:-1]]
    in_mask_folder = any(f in ("masks", "segmaps", "labels") or f.startswith("masks_") for f in folders)
    return in_mask_folder or path.stem.lower().endswith("_mask")


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
    files = sorted(p for p in images.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)
    masks = [p for p in files if _is_annotation(p, images)]
    micrographs = [p for p in files if p not in masks]
    per_set: dict[str, int] = {}
    for path in micrographs:
        top = path.relative_to(images).parts[0]
        per_set[top] = per_set.get(top, 0) + 1
    assert per_set == MICROGRAPHS
    # Masks: NASA 4 overlays, soot 3, EMPS 36 instance maps, and one PNG per object of the
    # nanomembranes (their DERIVED_instances.csv has a row per mask).
    with open(images / "deepsem_nanomembranes" / "DERIVED_instances.csv") as f:
        n_objects = sum(1 for _ in f) - 1
    assert len(masks) == 4 + 3 + 36 + n_objects
    # Masks are not micrographs: excluded (unread) by the default config, and listed.
    assert sorted(run["summary"]["excluded"]) == sorted(source_of(p) for p in masks)
    assert run["summary"]["n_excluded"] == len(masks)
    sources = {r.source for r in run["records"]} | {q["source"] for q in run["quarantine"]}
    assert not sources & {source_of(p) for p in masks}

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
    assert len(ingested) == len(first_copy) == len(micrographs) - 1
    assert len(run["quarantine"]) == 1
    # One file has two pages.
    assert len(run["records"]) == len(micrographs) == run["summary"]["n_records"]


@pytest.mark.parametrize(
    "name,page,nm,source",
    [
        # Saved at half the scan's width: the field width (5.965 um) over 512 px, not the
        # scan's 'Pixel Size' 5.825 nm; its burned-in 200 nm bar agrees (17 px).
        ("test_tiff_Zeiss_SEM_512pix.tif", 0, 11.65, "tiff:zeiss_34118"),
        ("ZEISS_SEM_multipage.tif", 0, 12.33, "tiff:zeiss_34118"),
        ("ZEISS_SEM_multipage.tif", 1, 12.33, "tiff:zeiss_34118"),
        ("test_tiff_Zeiss_SEM_1k.tif", 0, 2615.0, "tiff:zeiss_34118"),
        (INDENT, 0, 65.1, "tiff:fei_34682"),
        ("P33_scale1_detectorA.tif", 0, 325.52, "tiff:fei_34682"),
        ("FEI-Helios-Ebeam-8bits.tif", 0, 3372.4, "tiff:fei_34682"),
        ("TVIPS_bin4.tif", 0, 1.4208, "tiff:tvips_37706"),
        ("10%_gelatin_fibers.tif", 0, 31.0059, "tiff:fei_34682"),
        ("20%_gelatin_fibers.tif", 0, 31.0059, "tiff:fei_34682"),
        ("125nm_03.tif", 0, 35.03, "tiff:zeiss_34118"),
        ("135nm_07.tif", 0, 35.03, "tiff:zeiss_34118"),
    ],
)
def test_pixel_size_from_vendor_tags(run, name, page, nm, source):
    rec = _one(run, name, page)
    assert rec.pixel_size_nm == pytest.approx(nm, rel=0.005)
    assert rec.pixel_size_source == source


# Tag and burned-in bar on one file: the bar read from the pixels (the record's note) must
# agree with the tag within 2% (the same figure benchmarks/scalebar_real.py reports).
TAG_AND_BAR = [
    "125nm_03.tif",
    "130nm_05.tif",
    "130nm_06.tif",
    "135nm_07.tif",
    "test_tiff_Zeiss_SEM_512pix.tif",
    "test_tiff_Zeiss_SEM_1k.tif",
    "10%_gelatin_fibers.tif",
    "20%_gelatin_fibers.tif",
    INDENT,
    "P33_scale1_detectorA.tif",
    "FEI-Helios-Ebeam-8bits.tif",
    "TVIPS_bin4.tif",
]


@pytest.mark.parametrize("name", TAG_AND_BAR)
def test_scale_bar_read_from_the_pixels_agrees_with_the_tag(run, name):
    rec = _one(run, name)
    assert rec.pixel_size_source.startswith("tiff:") and rec.pixel_size_confidence == 1.0
    note = rec.pixel_size_note or ""
    assert rec.pixel_size_check == "agree" and " agree (" in note and "scalebar:ocr" in note, note


def test_pixel_size_from_the_scale_bar_alone(run):
    """ImageJ re-saves of the FEI fibre frames: no tag, only the 10 um / 5 um bar (325 px
    with its caps; 30.8 nm/px for 10 um from the bar's pixels)."""
    thick = _one(run, "Example_thick_fibers.tif")
    thin = _one(run, "Example_thin_fibers.tif")
    assert thick.pixel_size_source == thin.pixel_size_source == "scalebar:ocr"
    assert thick.pixel_size_nm == pytest.approx(31.0059, rel=0.02)
    assert thin.pixel_size_nm == pytest.approx(31.0059 / 2, rel=0.02)
    assert 0 < thick.pixel_size_confidence <= 1 and "10 um" in thick.pixel_size_note


def test_no_pixel_size_where_none_is_recorded(run):
    """Frames with neither tag nor bar say so; no size is invented."""
    for rec in run["records"]:
        if any(k in rec.source for k in ("nasa", "nanomembranes", "soot", "/fullres/", "/tiles/")):
            assert (rec.pixel_size_nm, rec.pixel_size_source) == (None, "none")
            assert rec.pixel_size_note.startswith("no scale bar"), (rec.source, rec.pixel_size_note)
            assert rec.overlays == []


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
        # FEI Quanta: the README's 59-row databar (rows 884-942), from ResolutionY ...
        ("10%_gelatin_fibers.tif", 59, "metadata:ResolutionY", 0),
        ("20%_gelatin_fibers.tif", 59, "metadata:ResolutionY", 0),
        # ... and from the pixels where ImageJ dropped the tag and blanked the text.
        ("Example_thin_fibers.tif", 59, "pixels:text_band", 0),
        ("Example_thick_fibers.tif", 59, "pixels:text_band", 0),
        # Zeiss Merlin raw frames behind the nanowire tiles: light bar under a black line.
        ("125nm_03.tif", 78, "pixels:text_band", 255),
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
    for name in ("10%_gelatin_fibers.tif", "20%_gelatin_fibers.tif"):
        rec = _one(run, name)
        bar = detect_databar(_source_gray(run, rec))
        assert (bar.rows, bar.method) == (59, "pixels:text_band")


def test_raw_zeiss_frames_keep_the_tiled_rows_and_lose_the_bar(run):
    """README: rows 0-687 are the cropped full frame the tiles were cut from; the 1 um
    H-bar's ticks sit in rows 719-747. The crop keeps the first and removes the second."""
    for name in ("125nm_03", "130nm_05", "130nm_06", "135nm_07"):
        rec = _one(run, f"{name}.tif")
        assert (rec.original_width, rec.original_height) == (1024, 768)
        assert 688 <= rec.height <= 719 and rec.databar == "pixels:text_band"


def test_images_without_a_bar_keep_every_row(run):
    checked = 0
    for rec in run["records"]:
        path = Path(rec.source)
        bar_free = (
            rec.format == "PNG"
            and "deepsem" in rec.source  # tiles, fullres, nanomembranes
            or "nasa" in rec.source
            or "multipage" in rec.source
            or "carbonblack_soot_tem" in rec.source  # databar cropped off upstream
            or ("emps_particles" in rec.source and path.stem not in EMPS_WITH_BAR)
        )
        if bar_free:
            assert rec.databar is None and rec.crop_box == (0, 0, rec.width, rec.height), path
            assert (rec.width, rec.height) == (rec.original_width, rec.original_height)
            checked += 1
    # tiles + fullres minus the duplicate, nanomembranes, NASA, 2 pages, soot, EMPS
    assert checked == 34 - 1 + 4 + 4 + 2 + 3 + 36 - len(EMPS_WITH_BAR)
    tile = _one(run, "130nm_05_cropped_x0_y0.png")
    assert (tile.width, tile.height) == (341, 344)
    # TVIPS has a scale-bar box in a corner, which is not a full-width data bar.
    assert _one(run, "TVIPS_bin4.tif").databar is None
    # The README's sizes for the newer bar-free sets: every row kept.
    sizes = {"deepsem_nanomembranes": (1024, 768), "carbonblack_soot_tem": (2240, 1952)}
    for top, size in sizes.items():
        recs = [r for r in run["records"] if f"/{top}/" in r.source]
        assert recs and all((r.width, r.height) == size for r in recs), top


def test_emps_crops_are_ingested_and_only_real_bars_cropped(run):
    recs = {Path(r.source).stem: r for r in run["records"] if "emps_particles" in r.source}
    assert len(recs) == 36
    cropped = {stem for stem, r in recs.items() if r.databar is not None}
    assert cropped == EMPS_WITH_BAR
    for stem in cropped:
        rec = recs[stem]
        # A figure crop's databar is a thin strip; the specimen above it is kept.
        assert rec.databar.startswith("pixels:") and rec.height >= 0.85 * rec.original_height


def test_low_information_frames_are_flagged_and_only_those(run):
    blank = _one(run, "FEI-Helios-Ebeam-8bits.tif")
    noise = _one(run, "TVIPS_bin4.tif")
    assert blank.low_information and "near-constant" in blank.low_information_reason
    assert noise.low_information and "noise only" in noise.low_information_reason
    flagged = {Path(r.source).name for r in run["records"] if r.low_information}
    assert flagged == {"FEI-Helios-Ebeam-8bits.tif", "TVIPS_bin4.tif"}


def test_tiles_of_one_micrograph_share_a_group(run):
    """README: the tiles, the cropped full frame and the raw Zeiss TIFF of one nanowire
    micrograph are one specimen area (tiles/, fullres/, raw_tiff/ side by side); every
    other micrograph has a group of its own."""
    groups: dict[str, set[str]] = {}
    for rec in run["records"]:
        stem = Path(rec.source).stem.split("_cropped")[0]
        groups.setdefault(stem, set()).add(rec.group)
    assert all(len(g) == 1 for g in groups.values()), groups
    assert len({next(iter(g)) for g in groups.values()}) == len(groups)
    full = _one(run, "140nm_17_cropped.png")
    tile = _one(run, "140nm_17_cropped_x2_y1.png")
    assert full.group == tile.group == "deepsem_nanowires/140nm_17_cropped"
    raw = _one(run, "125nm_03.tif")
    family = {_one(run, n).group for n in ("125nm_03_cropped.png", "125nm_03_cropped_x1_y1.png")}
    assert family == {raw.group} == {"deepsem_nanowires/125nm_03"}
    # Instance maps named like their image are excluded, so they join nothing.
    soot = _one(run, "Case1_E7_025.png")
    assert soot.group == "carbonblack_soot_tem/images/Case1_E7_025"
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
        if "deepsem" in rec.source and rec.format == "PNG":
            assert rec.modality == "unknown"
        png = Image.open(rec.png)
        assert png.mode == "L" and png.size == (rec.width, rec.height)


def test_data_set_folders_are_not_class_labels(run):
    """No folder here names a class of synth_images.classes (deepsem_nanowires,
    gift_fibres_fei, emps_particles are data sets): every image is unlabelled, and the
    summary names the folders so a user can alias them."""
    assert {(r.label, r.label_source) for r in run["records"]} == {(None, "none")}
    summary = run["summary"]
    assert summary["n_unlabelled"] == len({r.sha256 for r in run["records"]})
    folders = {Path(os.path.abspath(r.source)).parent.relative_to(run["images"]).as_posix() for r in run["records"]}
    assert summary["unlabelled_folders"] == sorted(folders)


def test_rerun_is_all_cache_hits_and_byte_identical(run):
    out = Path(run["cfg"].paths.interim_images)
    before = {p.name: p.read_bytes() for p in sorted(out.rglob("*")) if p.is_file()}
    summary = ingest_images(run["cfg"])
    n_files = len({r.sha256 for r in run["records"]})
    assert summary["cache"] == {"hits": n_files, "misses": 0}
    after = {p.name: p.read_bytes() for p in sorted(out.rglob("*")) if p.is_file()}
    assert after == before and len(after) == len(run["records"]) + 2
