"""ingest_images unit and stage tests on small inputs written into tmp_path.

Covers the synthetic layout (crop checked against ground truth), metadata and sidecar
precedence, folder labels and tile groups, normalisation, the databar and low-information
detectors, determinism and the per-item cache.
"""

from __future__ import annotations

import io
import json
from pathlib import Path, PurePosixPath

import numpy as np
import pytest
import tifffile
from PIL import Image
from scipy import ndimage

from semilens.images.databar import Databar, detect_databar, low_information
from semilens.images.ingest import ingest_images, source_of
from semilens.images.metadata import (
    assign_groups,
    default_group,
    folder_label,
    parse_modality,
    to_nm,
)
from semilens.images.readers import decode, to_gray8
from semilens.images.records import GroundTruth, ImageRecord, Sidecar
from semilens.io import read_jsonl

# ---------------------------------------------------------------------------------------
# Builders
# ---------------------------------------------------------------------------------------


def specimen(h: int, w: int, seed: int = 0, noise: float = 6.0) -> np.ndarray:
    """Blobs on a textured background plus shot-like noise: an SEM-ish 8-bit frame."""
    rng = np.random.default_rng(seed)
    field = ndimage.gaussian_filter(rng.normal(size=(h, w)), 3)
    field = (field - field.min()) / (np.ptp(field) + 1e-9)
    img = 60 + 120 * field + rng.normal(0, noise, (h, w))
    return np.clip(np.rint(img), 0, 255).astype(np.uint8)


def with_bar(img: np.ndarray, rows: int, background: int, seed: int = 1) -> np.ndarray:
    """Append a vendor-style bar: uniform background with sparse text-like strokes."""
    rng = np.random.default_rng(seed)
    bar = np.full((rows, img.shape[1]), background, np.uint8)
    ink = 0 if background >= 128 else 255
    for x in range(6, img.shape[1] - 12, 14):  # "characters": small strokes in a text line
        if rng.random() < 0.7:
            y0 = rows // 3
            bar[y0 : y0 + rows // 3, x : x + 2] = ink
            bar[y0, x : x + 6] = ink
    bar[-4:-2, 6:60] = ink  # a scale bar
    return np.vstack([img, bar])


def tif(arr: np.ndarray, **kw) -> bytes:
    buf = io.BytesIO()
    tifffile.imwrite(buf, arr, **kw)
    return buf.getvalue()


def png(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


def write_synthetic(root: Path, label: str, image_id: str, bar_rows: int, seed: int) -> Sidecar:
    """One image in the synth_images layout: <class>/<id>.tif + <id>.json (Sidecar)."""
    folder = root / label
    folder.mkdir(parents=True, exist_ok=True)
    pixels = with_bar(specimen(96, 128, seed=seed), bar_rows, background=18 + seed % 3)
    truth = GroundTruth(
        label=label,
        modality="SEM",
        pixel_size_nm=2.5,
        object_count=3,
        sizes_nm=[10.0, 12.0, 14.0],
        area_fraction=0.1,
        databar_height_px=bar_rows,
        seed=seed,
    )
    sidecar = Sidecar(
        pixel_size_nm=2.5,
        label=label,
        modality="SEM",
        group=image_id,
        instrument={"vendor": "semilens-synth", "hv_kv": 5.0},
        ground_truth=truth,
    )
    (folder / f"{image_id}.tif").write_bytes(tif(pixels, photometric="minisblack"))
    (folder / f"{image_id}.json").write_text(sidecar.model_dump_json())
    return sidecar


def read_outputs(cfg) -> tuple[list[ImageRecord], list[dict]]:
    out = Path(cfg.paths.interim_images)
    records = [ImageRecord.model_validate(r) for r in read_jsonl(out / "records.jsonl")]
    return records, list(read_jsonl(out / "quarantine.jsonl"))


def by_name(records: list[ImageRecord]) -> dict[str, ImageRecord]:
    return {Path(r.source).name: r for r in records}


# ---------------------------------------------------------------------------------------
# Synthetic layout
# ---------------------------------------------------------------------------------------


def test_synthetic_layout_crop_matches_ground_truth(tmp_path, make_cfg):
    synth = tmp_path / "synthetic"
    expected = {}
    for i, (label, rows) in enumerate([("particles", 12), ("grains", 20), ("holes", 9)]):
        sc = write_synthetic(synth, label, f"synth-{label}-000", rows, seed=i)
        expected[f"synth-{label}-000.tif"] = sc
    cfg = make_cfg(synthetic=synth)
    summary = ingest_images(cfg)
    records, quarantine = read_outputs(cfg)
    assert quarantine == [] and summary["n_records"] == 3
    assert summary["n_skipped"] == 3  # the three sidecar JSONs
    for name, rec in by_name(records).items():
        sc = expected[name]
        gt = sc.ground_truth
        assert rec.origin == "synthetic"
        assert rec.original_height - rec.height == gt.databar_height_px
        assert rec.crop_box == (0, 0, 128, 96) and rec.databar == "pixels:text_band"
        assert (rec.label, rec.label_source) == (sc.label, "sidecar")
        assert (rec.pixel_size_nm, rec.pixel_size_source) == (2.5, "sidecar:json")
        assert rec.group == sc.group and rec.modality == "SEM"
        assert rec.ground_truth == gt
        assert rec.instrument == {"vendor": "semilens-synth", "hv_kv": 5.0}
        assert not rec.low_information
        out = np.asarray(Image.open(rec.png))
        assert out.shape == (96, 128)
        src = tifffile.imread(synth / sc.label / name)
        assert np.array_equal(out, src[:96])  # 8-bit data passes through unchanged
        assert rec.id == f"{rec.sha256[:16]}-p0"


def test_synth_images_output_is_cropped_exactly(tmp_path, make_cfg):
    """The real synth_images renderer, one image per class: crop == ground truth."""
    synth_mod = pytest.importorskip("semilens.images.synth")
    cfg = make_cfg()
    synth_cfg = cfg.synth_images.model_copy(update={"n_per_class": 1, "size": 128})
    synth_mod.synth_images(synth_cfg, cfg.paths.synthetic_images)
    ingest_images(cfg)
    records, quarantine = read_outputs(cfg)
    assert quarantine == [] and len(records) == len(synth_cfg.classes)
    for rec in records:
        gt = rec.ground_truth
        assert gt is not None
        assert rec.original_height - rec.height == gt.databar_height_px, rec.source
        assert not rec.low_information, (rec.source, rec.low_information_reason)


# ---------------------------------------------------------------------------------------
# Metadata, sidecars, labels, groups
# ---------------------------------------------------------------------------------------

FEI_INI = (
    "[User]\r\nDate=01/02/2024\r\n[System]\r\nSystemType=Quanta 250\r\n"
    "[Beam]\r\nHV=10000\r\nBeam=EBeam\r\n[EBeam]\r\nHV=10000\r\nWD=0.0051\r\nHFW=3.2e-07\r\n"
    "[Scan]\r\nPixelWidth=2.5e-09\r\nPixelHeight=2.5e-09\r\n"
    "[Image]\r\nResolutionX=128\r\nResolutionY=96\r\nMagCanvasRealWidth=0.127\r\n"
    "[Detectors]\r\nName=ETD\r\nMode=SE\r\n"
)


def test_fei_tag_gives_pixel_size_instrument_and_exact_bar(tmp_path, make_cfg):
    raw = tmp_path / "raw" / "films"
    raw.mkdir(parents=True)
    # A white bar: the crop comes from ResolutionY, whatever the bar looks like.
    pixels = with_bar(specimen(96, 128), 17, background=255)
    (raw / "fei.tif").write_bytes(tif(pixels, extratags=[(34682, "s", 0, FEI_INI, True)]))
    (raw / "fei.json").write_text(json.dumps({"pixel_size_nm": 99.0, "label": "override"}))
    cfg = make_cfg(raw=tmp_path / "raw")
    ingest_images(cfg)
    (rec,) = read_outputs(cfg)[0]
    # The sidecar is the user's word and wins over the tag; the note keeps the tag's value.
    assert (rec.pixel_size_nm, rec.pixel_size_source) == (99.0, "sidecar:json")
    assert "overrides tiff:fei_34682 2.5 nm" in rec.pixel_size_note
    assert rec.pixel_size_check == "disagree"
    assert (rec.height, rec.databar) == (96, "metadata:ResolutionY")
    assert rec.modality == "SEM" and rec.label == "override"  # tags > sidecar > folder
    assert rec.instrument["vendor"] == "FEI/Thermo Fisher"
    assert rec.instrument["hv_kv"] == 10.0 and rec.instrument["wd_mm"] == pytest.approx(5.1)
    assert rec.instrument["detector"] == "ETD"
    assert rec.instrument["magnification"] == pytest.approx(0.127 / 3.2e-7, rel=1e-3)


def test_sidecar_beats_imagej_resolution_and_the_note_keeps_the_tag(tmp_path, make_cfg):
    raw = tmp_path / "raw"
    raw.mkdir()
    img = specimen(64, 64)
    (raw / "ij.tif").write_bytes(tif(img, imagej=True, resolution=(2.0, 2.0), metadata={"unit": "nm"}))
    (raw / "ij.json").write_text(json.dumps({"pixel_size_nm": 7.0}))
    cfg = make_cfg(raw=raw)
    ingest_images(cfg)
    (rec,) = read_outputs(cfg)[0]
    assert (rec.pixel_size_nm, rec.pixel_size_source) == (7.0, "sidecar:json")
    assert rec.pixel_size_note == "sidecar:json 7 nm overrides tiff:imagej 0.5 nm (+1300.0%)"


def test_sidecar_json_beats_csv_beats_folder(tmp_path, make_cfg):
    raw = tmp_path / "raw" / "nanowires"
    raw.mkdir(parents=True)
    for i, name in enumerate(["a.png", "b.png", "c.png", "d.png"]):
        (raw / name).write_bytes(png(specimen(48, 64, seed=i)))
    (raw / "metadata.csv").write_text(
        "file,label,pixel_size_nm,modality,detector\na.png,from_csv,3.0,TEM,BF\nb.png,from_csv,3.0,,InLens\n"
    )
    (raw / "a.json").write_text(json.dumps({"label": "from_json", "pixel_size_nm": 1.5}))
    (raw / "c.json").write_text(json.dumps({"group": "shared-specimen"}))
    cfg = make_cfg(raw=tmp_path / "raw")
    summary = ingest_images(cfg)
    records, quarantine = read_outputs(cfg)
    assert quarantine == []
    got = by_name(records)
    a, b, c, d = (got[n] for n in ("a.png", "b.png", "c.png", "d.png"))
    assert (a.label, a.label_source, a.pixel_size_nm, a.pixel_size_source) == (
        "from_json",
        "sidecar",
        1.5,
        "sidecar:json",
    )
    assert a.modality == "TEM" and a.instrument == {"detector": "BF"}  # csv fills the gaps
    assert (b.label, b.pixel_size_nm, b.pixel_size_source) == ("from_csv", 3.0, "sidecar:csv")
    assert b.modality == "unknown" and b.instrument == {"detector": "InLens"}
    assert (c.label, c.label_source, c.group) == ("nanowires", "folder", "shared-specimen")
    assert (d.label, d.label_source, d.pixel_size_nm, d.pixel_size_source) == ("nanowires", "folder", None, "none")
    assert d.group == "nanowires/d"
    assert summary["n_skipped"] == 3  # metadata.csv, a.json, c.json


@pytest.mark.parametrize(
    "value,modality,detector",
    [
        ("SEM", "SEM", None),
        ("tem", "TEM", None),
        ("stem", "STEM", None),
        ("HAADF-STEM", "STEM", "HAADF"),
        ("HAADF", "STEM", "HAADF"),
        ("haadf stem", "STEM", "HAADF"),
        ("BF-STEM", "STEM", "BF"),
        ("ADF", "STEM", "ADF"),
        ("ABF-STEM", "STEM", "ABF"),
        ("FIB", "FIB-SEM", None),
        ("FIB-SEM", "FIB-SEM", None),
        ("fibsem", "FIB-SEM", None),
        ("Unknown", "unknown", None),
        ("XRD", None, None),
        ("BF", None, None),
        ("", None, None),
        (3, None, None),
    ],
)
def test_parse_modality(value, modality, detector):
    assert parse_modality(value) == (modality, detector)


def test_modality_spellings_from_csv_and_json(tmp_path, make_cfg):
    raw = tmp_path / "raw"
    raw.mkdir()
    names = "abcdefg"
    for i, n in enumerate(names):
        (raw / f"{n}.png").write_bytes(png(specimen(40, 40, seed=30 + i)))
    (raw / "metadata.csv").write_text(
        "file,modality,detector\n"
        "a.png,stem,\nb.png,HAADF-STEM,\nc.png,HAADF-STEM,DF4\nd.png,ADF,\n"
        "e.png,FIB,\nf.png,Fib-Sem,\n"
    )
    (raw / "g.json").write_text(json.dumps({"modality": "bf-stem"}))
    cfg = make_cfg(raw=raw)
    ingest_images(cfg)
    records, quarantine = read_outputs(cfg)
    assert quarantine == []
    got = {Path(r.source).stem: (r.modality, r.instrument.get("detector")) for r in records}
    assert got == {
        "a": ("STEM", None),
        "b": ("STEM", "HAADF"),
        "c": ("STEM", "DF4"),  # a detector column says more than the modality's name
        "d": ("STEM", "ADF"),
        "e": ("FIB-SEM", None),
        "f": ("FIB-SEM", None),
        "g": ("STEM", "BF"),
    }


def test_fei_ion_beam_image_is_fib_sem(tmp_path, make_cfg):
    raw = tmp_path / "raw"
    raw.mkdir()
    ini = FEI_INI.replace("Beam=EBeam\r\n[EBeam]", "Beam=IBeam\r\n[IBeam]")
    pixels = with_bar(specimen(96, 128), 17, background=0)
    (raw / "ion.tif").write_bytes(tif(pixels, extratags=[(34682, "s", 0, ini, True)]))
    cfg = make_cfg(raw=raw)
    ingest_images(cfg)
    (rec,) = read_outputs(cfg)[0]
    assert rec.modality == "FIB-SEM" and rec.instrument["hv_kv"] == 10.0


def test_labels_and_tile_groups_from_paths(tmp_path, make_cfg):
    raw = tmp_path / "raw"
    (raw / "wires" / "tiles").mkdir(parents=True)
    (raw / "wires" / "full").mkdir(parents=True)
    for i, name in enumerate(["m1_x0_y0.png", "m1_x1_y0.png", "m2_x0_y0.png"]):
        (raw / "wires" / "tiles" / name).write_bytes(png(specimen(40, 40, seed=i)))
    (raw / "wires" / "full" / "m1.png").write_bytes(png(specimen(80, 40, seed=9)))
    (raw / "loose.png").write_bytes(png(specimen(40, 40, seed=5)))
    for i, rel in enumerate(["Nanowires/n.png", "particle/p.png", "deepsem_set/q.png"]):
        (raw / rel).parent.mkdir(parents=True)
        (raw / rel).write_bytes(png(specimen(40, 40, seed=20 + i)))
    cfg = make_cfg(raw=raw, label_aliases={"wires": "nanowires"})
    summary = ingest_images(cfg)
    got = by_name(read_outputs(cfg)[0])
    assert {got[n].group for n in ("m1_x0_y0.png", "m1_x1_y0.png", "m1.png")} == {"wires/m1"}
    assert got["m2_x0_y0.png"].group == "wires/tiles/m2"
    # A folder is a label when it names a class (loosely) or an alias; otherwise none.
    labels = {n: (r.label, r.label_source) for n, r in got.items()}
    assert labels["m1.png"] == labels["n.png"] == ("nanowires", "folder")
    assert labels["p.png"] == ("particles", "folder")
    assert labels["q.png"] == labels["loose.png"] == (None, "none")
    assert got["loose.png"].group == "loose"
    assert (summary["n_unlabelled"], summary["unlabelled_folders"]) == (2, [".", "deepsem_set"])
    # Without the alias the data set's own folder name is no class answer either.
    summary = ingest_images(make_cfg(raw=raw))
    assert summary["n_unlabelled"] == 6
    assert summary["unlabelled_folders"] == [".", "deepsem_set", "wires/full", "wires/tiles"]


def test_mask_and_label_folders_are_excluded_unread(tmp_path, make_cfg):
    raw = tmp_path / "raw"
    masks = [
        "s/masks/3/obj1.png",
        "s/masks_slider/m.TIF",
        "s/SegMaps/m.png",
        "s/labels/m.png",
        "s/m_mask.png",
        "s/deep/Masks/x/y.tif",
    ]
    kept = ["s/m.png", "s/masks.png", "s/masksets/m2.png", "s/mask_free/m3.png"]
    for i, rel in enumerate(kept):
        (raw / rel).parent.mkdir(parents=True, exist_ok=True)
        (raw / rel).write_bytes(png(specimen(40, 40, seed=i)))
    for rel in masks:
        (raw / rel).parent.mkdir(parents=True, exist_ok=True)
        (raw / rel).write_bytes(b"II*\x00not read: would be quarantined if it were")
    cfg = make_cfg(raw=raw)
    summary = ingest_images(cfg)
    records, quarantine = read_outputs(cfg)
    assert quarantine == []
    assert sorted(Path(r.source).relative_to(raw).as_posix() for r in records) == sorted(kept)
    assert summary["n_excluded"] == len(masks)
    assert sorted(summary["excluded"]) == sorted(source_of(raw / m) for m in masks)
    # A run of folders: only that run, wherever it sits.
    cfg = make_cfg(raw=raw, exclude=["s/masksets/"])
    summary = ingest_images(cfg)
    assert summary["excluded"] == [source_of(raw / "s/masksets/m2.png")]


CLASSES = ("particles", "nanowires", "cracked_film")


@pytest.mark.parametrize(
    "rel,label,group",
    [
        ("a.tif", None, "a"),
        ("particles/a_x1_y0.png", "particles", "particles/a"),
        ("Nanowires/sub/a-r2-c3.tif", "nanowires", "Nanowires/sub/a"),
        ("nanowire/a_tile07.tif", "nanowires", "nanowire/a"),
        ("Cracked-Films/a_x1.tif", "cracked_film", "Cracked-Films/a_x1"),  # not a tile suffix
        ("particles/batch3/tiles/a.png", "particles", "particles/batch3/tiles/a"),
        ("deepsem_nanowires/tiles/a.png", None, "deepsem_nanowires/tiles/a"),  # a data set
        ("sem_wires_2023/a.png", "nanowires", "sem_wires_2023/a"),  # by alias
        ("Particles/SEM-Wires-2023/a.png", "nanowires", "Particles/SEM-Wires-2023/a"),
    ],
)
def test_folder_label_and_default_group(rel, label, group):
    p = PurePosixPath(rel)
    assert folder_label(p, CLASSES, {"sem_wires_2023": "nanowires"}) == label
    assert default_group(p) == group


def test_groups_join_one_micrograph_and_never_two():
    rels = [
        PurePosixPath(r)
        for r in (
            "ds/tiles/m1_cropped_x0_y0.png",
            "ds/tiles/m1_cropped_x1_y0.png",
            "ds/fullres/m1_cropped.png",
            "ds/raw_tiff/m1.tif",  # one micrograph, three folders
            "ds/tiles/m2_cropped_x0_y0.png",  # a tile whose full frame is not here
            "ds/batch1/img01.tif",
            "ds/batch2/img01.tif",  # two micrographs, one name
            "ds/run1/s_x0_y0.png",
            "ds/run1/s_x1_y0.png",  # two runs tiled alike
            "ds/run2/s_x0_y0.png",
            "ds/run2/s_x1_y0.png",
            "other/tiles/m1_cropped_x0_y0.png",  # another data set's m1: not a sibling
            "x.png",
            "x_x1_y0.png",
            "y/x.png",
        )
    ]
    groups = assign_groups(rels)
    got = {r.as_posix(): g for r, g in groups.items()}
    m1 = {
        got[r]
        for r in (
            "ds/tiles/m1_cropped_x0_y0.png",
            "ds/tiles/m1_cropped_x1_y0.png",
            "ds/fullres/m1_cropped.png",
            "ds/raw_tiff/m1.tif",
        )
    }
    assert m1 == {"ds/m1"}
    assert got["ds/tiles/m2_cropped_x0_y0.png"] == "ds/tiles/m2_cropped"
    assert (got["ds/batch1/img01.tif"], got["ds/batch2/img01.tif"]) == ("ds/batch1/img01", "ds/batch2/img01")
    assert got["other/tiles/m1_cropped_x0_y0.png"] == "other/tiles/m1_cropped"
    assert got["ds/run1/s_x1_y0.png"] == "ds/run1/s"
    assert got["ds/run2/s_x0_y0.png"] == "ds/run2/s"
    assert got["x.png"] == got["x_x1_y0.png"] == "x" and got["y/x.png"] == "y/x"
    assert len(set(got.values())) == 9


@pytest.mark.parametrize(
    "value,unit,nm",
    [(2.615, "µm", 2615.0), (6.51e-8, "m", 65.1), (5.825, "nm", 5.825), (12, "Å", 1.2)],
)
def test_to_nm(value, unit, nm):
    assert to_nm(value, unit) == pytest.approx(nm)


def test_to_nm_rejects_non_lengths():
    assert to_nm(3.0, "kV") is None and to_nm(-1, "nm") is None and to_nm("x", "nm") is None


def test_source_is_relative_to_the_project_root(tmp_path, make_cfg, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "data" / "raw").mkdir(parents=True)
    (tmp_path / "data" / "raw" / "x.png").write_bytes(png(specimen(32, 32)))
    cfg = make_cfg(raw=Path("data/raw"))
    ingest_images(cfg)
    (rec,) = read_outputs(cfg)[0]
    assert rec.source == "data/raw/x.png"
    assert source_of(Path("/elsewhere/y.png")) == "/elsewhere/y.png"


# ---------------------------------------------------------------------------------------
# Pixels: normalisation, databar, low-information
# ---------------------------------------------------------------------------------------


def test_to_gray8_modes():
    ramp16 = np.tile(np.arange(0, 65536, 256, dtype=np.uint16), (16, 1))
    out = to_gray8(ramp16, (0.0, 100.0))
    assert out.dtype == np.uint8 and out[0, 0] == 0 and out[0, -1] == 255
    assert np.all(np.diff(out[0].astype(int)) >= 0)
    # A hot pixel does not squash the range: percentiles clip it.
    spiky = ramp16.astype(np.float32)
    spiky[0, 0] = 1e9
    assert to_gray8(spiky, (1.0, 99.0))[5].max() == 255
    rgb = np.zeros((4, 4, 3), np.uint8)
    rgb[..., 1] = 200
    assert np.all(to_gray8(rgb, (0.1, 99.9)) == round(0.587 * 200))
    gray8 = specimen(8, 8)
    assert to_gray8(gray8, (0.1, 99.9)) is gray8  # 8-bit unchanged
    assert np.all(to_gray8(np.full((4, 4), np.nan), (0.1, 99.9)) == 0)


def _decode_gray(raw: bytes) -> np.ndarray:
    (page,) = decode(raw, Path("x.tif"), 10**8, 16).pages
    return to_gray8(page.pixels, (0.0, 100.0))


def test_decode_tiff_layouts():
    rng = np.random.default_rng(0)
    rgb = (rng.random((3, 40, 50)) * 255).astype(np.uint8)
    luma = np.rint(np.moveaxis(rgb, 0, -1) @ np.array([0.299, 0.587, 0.114])).astype(np.uint8)
    # Planar (samples first) and interleaved RGB give the same luminance.
    planar = tif(rgb, photometric="rgb", planarconfig="separate")
    interleaved = tif(np.moveaxis(rgb, 0, -1), photometric="rgb")
    assert np.array_equal(_decode_gray(planar), luma)
    assert np.array_equal(_decode_gray(interleaved), luma)
    gray = rgb[0]
    # MINISWHITE stores 0 as white: the decoded image is inverted back.
    assert np.array_equal(_decode_gray(tif(gray, photometric="miniswhite")), 255 - gray)
    mask = gray > 128  # 1-bit TIFF: tifffile writes MINISWHITE, so a set bit shows black
    assert np.array_equal(_decode_gray(tif(mask)), (~mask).astype(np.uint8) * 255)
    compressed = tif(gray, compression="zlib")
    assert np.array_equal(_decode_gray(compressed), gray)
    floats = gray.astype(np.float32)
    floats[0, 0] = np.nan
    out = _decode_gray(tif(floats))
    assert out.dtype == np.uint8 and out[0, 0] == 0 and out.max() == 255


@pytest.mark.parametrize("background", [0, 18, 128, 255])
@pytest.mark.parametrize("rows", [6, 24, 40])
def test_databar_found_from_pixels(background, rows):
    img = with_bar(specimen(160, 192, seed=rows), rows, background)
    bar = detect_databar(img)
    assert bar.rows == rows and bar.method == "pixels:text_band"


def _font(size: int):
    from PIL import ImageFont

    return ImageFont.load_default(size=size)  # Pillow's own font: no system font needed


def thermo_fisher_export(width: int = 1536, seed: int = 0) -> bytes:
    """A Thermo Fisher JPEG export: 2048 specimen rows over a 140-row black bar with
    labels, large bold values in cells, grey separators and a boxed scale bar."""
    from PIL import ImageDraw

    bar = Image.new("L", (width, 140), 0)
    draw = ImageDraw.Draw(bar)
    cells = [
        ("HV", "5.00 kV"),
        ("curr", "0.10 nA"),
        ("mag", "50 000 x"),
        ("HFW", "5.97 um"),
        ("WD", "4.1 mm"),
        ("det", "TLD"),
    ]
    for i, (label, value) in enumerate(cells):
        x = 12 + 205 * i
        draw.text((x, 10), label, fill=255, font=_font(32))
        draw.text((x, 58), value, fill=255, font=_font(48), stroke_width=2, stroke_fill=255)
        draw.line([(x + 191, 6), (x + 191, 134)], fill=160, width=2)
    draw.rectangle([width - 300, 14, width - 16, 126], outline=255, width=3)
    draw.text((width - 210, 22), "1 um", fill=255, font=_font(48), stroke_width=2, stroke_fill=255)
    draw.rectangle([width - 280, 96, width - 36, 108], fill=255)
    frame = np.vstack([specimen(2048, width, seed=seed), np.asarray(bar)])
    buf = io.BytesIO()
    Image.fromarray(frame).save(buf, format="JPEG", quality=85)
    return buf.getvalue()


def hitachi_frame(band_level: int, width: int = 640, seed: int = 0) -> np.ndarray:
    """960 specimen rows over a 64-row band that is itself image-like (textured, no single
    background value), with white text and a tick ruler drawn over it (Hitachi-style)."""
    from PIL import ImageDraw

    rng = np.random.default_rng(seed + 1)
    texture = ndimage.gaussian_filter(rng.normal(size=(64, width)), 1.5)
    texture = band_level + 14 * texture / texture.std() + rng.normal(0, 4, (64, width))
    band = Image.fromarray(np.clip(np.rint(texture), 0, 235).astype(np.uint8))
    draw = ImageDraw.Draw(band)
    draw.text((12, 18), "S-4800 5.0kV 8.1mm x50.0k SE(U)", fill=255, font=_font(22))
    x0, x1 = width - 220, width - 40
    for i in range(11):
        x = x0 + i * (x1 - x0) // 10
        draw.line([(x, 12), (x, 24)], fill=255, width=2)
    draw.text((x1 - 80, 30), "1.00um", fill=255, font=_font(22))
    return np.vstack([specimen(960, width, seed=seed), np.asarray(band)])


def test_tall_bar_with_large_bold_text_is_found():
    gray = np.asarray(Image.open(io.BytesIO(thermo_fisher_export())).convert("L"))
    assert gray.shape[0] == 2188
    assert detect_databar(gray) == Databar(140, "pixels:text_band")


@pytest.mark.parametrize("band_level", [40, 215])  # darker or lighter than the specimen
def test_text_over_an_image_like_band_is_found(band_level):
    assert detect_databar(hitachi_frame(band_level)) == Databar(64, "pixels:text_over_band")


def test_bars_from_every_layout_cropped_by_the_stage(tmp_path, make_cfg):
    raw = tmp_path / "raw"
    raw.mkdir()
    (raw / "thermo.jpg").write_bytes(thermo_fisher_export(width=768))
    hitachi = hitachi_frame(40)
    (raw / "hitachi.png").write_bytes(png(hitachi))
    cfg = make_cfg(raw=raw)
    ingest_images(cfg)
    got = by_name(read_outputs(cfg)[0])
    assert (got["thermo.jpg"].height, got["thermo.jpg"].databar) == (2048, "pixels:text_band")
    rec = got["hitachi.png"]
    assert (rec.height, rec.databar) == (960, "pixels:text_over_band")
    assert np.array_equal(np.asarray(Image.open(rec.png)), hitachi[:960])


def test_specimen_bands_are_not_bars():
    """What sets a bar apart is a straight full-width top edge AND a bar's content (one
    background value with marks, or rendered glyphs). A specimen band lacks one of them."""
    from PIL import ImageDraw

    rng = np.random.default_rng(3)
    img = specimen(400, 320, seed=3)
    # A substrate layer under a cross-section: straight edge, but noisy and unmarked.
    layer = img.copy()
    layer[-60:] = np.clip(rng.normal(30, 8, (60, 320)), 0, 255).astype(np.uint8)
    assert detect_databar(layer).rows == 0
    # The same with bright particles sitting in it (saturated blobs, not glyphs in a row).
    dotted = layer.copy()
    for y, x in zip(rng.integers(345, 395, 12), rng.integers(5, 310, 12)):
        dotted[y - 1 : y + 2, x - 1 : x + 2] = 255
    assert detect_databar(dotted).rows == 0
    # A scale bar and its label burned into the specimen (a figure crop): no full-width edge.
    labelled = Image.fromarray(img)
    draw = ImageDraw.Draw(labelled)
    draw.rectangle([200, 370, 300, 378], fill=255)
    draw.text((215, 340), "200 nm", fill=255, font=_font(22))
    assert detect_databar(np.asarray(labelled)).rows == 0
    # A dark specimen region with text-like bright marks that fades in: no sharp edge.
    dark = img.copy()
    ramp = np.linspace(0, 1, 80)[:, None]
    dark[-80:] = np.where(rng.random((80, 320)) < ramp, 0, dark[-80:])
    dark_img = Image.fromarray(dark)
    ImageDraw.Draw(dark_img).text((20, 360), "A", fill=255, font=_font(22))
    assert detect_databar(np.asarray(dark_img)).rows == 0


def test_no_bar_means_no_crop():
    img = specimen(160, 192)
    assert detect_databar(img).rows == 0
    # A dark specimen region at the bottom fades in: not a bar, even if it is saturated.
    dark = img.copy()
    ramp = np.linspace(0, 1, 40)[:, None]
    dark[-40:] = np.where(np.random.default_rng(0).random((40, 192)) < ramp, 0, dark[-40:])
    assert detect_databar(dark).rows == 0
    # An all-black frame has no boundary: nothing to crop without metadata.
    assert detect_databar(np.zeros((100, 100), np.uint8)).rows == 0


def test_metadata_rows_win_over_pixels():
    img = with_bar(specimen(100, 100), 20, 0)
    assert detect_databar(img, image_rows=90).rows == 30
    assert detect_databar(img, image_rows=120).rows == 0  # the vendor says: no bar
    assert detect_databar(img, image_rows=500).rows == 20  # nonsense metadata: pixels


def test_low_information():
    args = (2.0, 0.02, 1.8)
    assert low_information(np.full((64, 64), 7, np.uint8), *args).startswith("near-constant")
    noise = np.random.default_rng(0).normal(128, 40, (256, 256))
    reason = low_information(np.clip(noise, 0, 255).astype(np.uint8), *args)
    assert reason is not None and reason.startswith("noise only")
    assert low_information(specimen(256, 256), *args) is None
    rng = np.random.default_rng(1)
    # Very noisy but real: thin oblique dark cracks in heavy shot noise are content.
    yy, xx = np.mgrid[:256, :256]
    cracks = np.full((256, 256), 150.0)
    for offset in (-80, 0, 90):
        cracks[np.abs(yy - 0.6 * xx - offset - 60) < 1.6] = 30
    noisy = np.clip(rng.normal(cracks, 45), 0, 255).astype(np.uint8)
    assert low_information(noisy, *args) is None
    # Camera artefacts are not: noise plus random line offsets (banding), like TVIPS.
    banded = rng.normal(128, 40, (256, 256)) + rng.normal(0, 12, (256, 1))
    reason = low_information(np.clip(banded, 0, 255).astype(np.uint8), *args)
    assert reason is not None and reason.startswith("noise only")
    # Small crops are too little evidence for "noise only" (only near-constant is judged).
    assert low_information(np.clip(noise[:128, :128], 0, 255).astype(np.uint8), *args) is None


# ---------------------------------------------------------------------------------------
# Stage behaviour: fresh outputs, determinism, cache
# ---------------------------------------------------------------------------------------


def _tree(folder: Path) -> dict[str, bytes]:
    files = sorted(p for p in folder.rglob("*") if p.is_file())
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in files}


def _mixed_inputs(tmp_path: Path) -> tuple[Path, Path]:
    raw = tmp_path / "raw"
    (raw / "grains").mkdir(parents=True)
    (raw / "grains" / "g.png").write_bytes(png(specimen(64, 80, seed=1)))
    deep = (specimen(64, 80, seed=2).astype(np.uint16) * 200).astype(np.uint16)
    (raw / "grains" / "deep.tif").write_bytes(tif(deep))
    (raw / "broken.tif").write_bytes(b"II*\x00garbage")
    synth = tmp_path / "synthetic"
    write_synthetic(synth, "holes", "synth-holes-000", 10, seed=3)
    return raw, synth


def test_outputs_are_deterministic_and_rebuilt_fresh(tmp_path, make_cfg):
    raw, synth = _mixed_inputs(tmp_path)
    cfg = make_cfg(raw=raw, synthetic=synth)
    out = Path(cfg.paths.interim_images)
    ingest_images(cfg)
    first = _tree(out)
    assert {"records.jsonl", "quarantine.jsonl"} <= set(first)
    assert sum(k.startswith("png/") for k in first) == 3

    (out / "png" / "stale.png").write_bytes(b"left from an old run")
    ingest_images(cfg)  # warm cache
    assert _tree(out) == first

    cold = cfg.model_copy(update={"paths": cfg.paths.model_copy(update={"cache": tmp_path / "cache2"})})
    ingest_images(cold)  # cold cache, same bytes
    assert _tree(out) == first
    assert not [p for p in out.parent.iterdir() if p.name.startswith(".")]


def test_cache_hits_and_one_miss_per_new_file(tmp_path, make_cfg):
    raw, synth = _mixed_inputs(tmp_path)
    cfg = make_cfg(raw=raw, synthetic=synth)
    s1 = ingest_images(cfg)
    assert s1["cache"] == {"hits": 0, "misses": 4}
    s2 = ingest_images(cfg)
    assert s2["cache"] == {"hits": 4, "misses": 0}
    assert s2["n_records"] == s1["n_records"] == 3 and s2["n_quarantined"] == 1

    (raw / "grains" / "new.png").write_bytes(png(specimen(64, 64, seed=11)))
    s3 = ingest_images(cfg)
    assert s3["cache"] == {"hits": 4, "misses": 1} and s3["n_records"] == 4

    # A sidecar edit redoes that image only; a params change redoes everything.
    (raw / "grains" / "new.json").write_text(json.dumps({"label": "renamed"}))
    s4 = ingest_images(cfg)
    assert s4["cache"] == {"hits": 4, "misses": 1}
    assert by_name(read_outputs(cfg)[0])["new.png"].label == "renamed"
    s5 = ingest_images(make_cfg(raw=raw, synthetic=synth, percentile_clip=(1.0, 99.0)))
    assert s5["cache"] == {"hits": 0, "misses": 5}


def test_code_version_bump_invalidates_the_cache(tmp_path, make_cfg, monkeypatch):
    from semilens.images import ingest

    raw, synth = _mixed_inputs(tmp_path)
    cfg = make_cfg(raw=raw, synthetic=synth)
    ingest_images(cfg)
    monkeypatch.setattr(ingest, "VERSION", ingest.VERSION + "-changed")
    assert ingest_images(cfg)["cache"] == {"hits": 0, "misses": 4}


def test_missing_inputs_give_empty_outputs(tmp_path, make_cfg):
    cfg = make_cfg(raw=tmp_path / "nope", synthetic=tmp_path / "nope2")
    summary = ingest_images(cfg)
    records, quarantine = read_outputs(cfg)
    assert records == [] and quarantine == [] and summary["n_records"] == 0
    assert (Path(cfg.paths.interim_images) / "png").is_dir()


def test_excluded_patterns_are_skipped_and_counted(tmp_path, make_cfg):
    raw = tmp_path / "raw"
    raw.mkdir()
    (raw / "a.png").write_bytes(png(specimen(32, 32)))
    (raw / "a_mask.png").write_bytes(png(specimen(32, 32, seed=4)))
    summary = ingest_images(make_cfg(raw=raw))
    assert summary["n_records"] == 1 and summary["n_excluded"] == 1
    summary = ingest_images(make_cfg(raw=raw, exclude=()))
    assert summary["n_records"] == 2 and summary["n_excluded"] == 0


def test_stage_entry_point_runs_from_params(tmp_path):
    """``python -m stages.ingest_images`` as DVC runs it: params.yaml in cwd, outputs, log."""
    import os
    import subprocess
    import sys

    import yaml

    root = Path(__file__).resolve().parents[1]
    (tmp_path / "data" / "raw" / "images" / "Grains").mkdir(parents=True)
    (tmp_path / "data" / "raw" / "images" / "Grains" / "x.png").write_bytes(png(specimen(32, 32)))
    params = yaml.safe_load((root / "params.yaml").read_text())
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(root), str(root / "src")])}
    res = subprocess.run(
        [sys.executable, "-m", "stages.ingest_images"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
    )
    assert res.returncode == 0, res.stderr
    log = json.loads((tmp_path / params["paths"]["logs"] / "ingest_images.json").read_text())
    assert log["n_records"] == 1 and log["cache"] == {"hits": 0, "misses": 1}
    rec = next(read_jsonl(tmp_path / params["paths"]["interim_images"] / "records.jsonl"))
    # The folder names a class of params.yaml's synth_images.classes, loosely spelt.
    assert rec["source"] == "data/raw/images/Grains/x.png" and rec["label"] == "grains"
    assert rec["png"].startswith(params["paths"]["interim_images"] + "/png/")


def test_damaged_cache_entry_is_recomputed(tmp_path, make_cfg):
    raw = tmp_path / "raw"
    raw.mkdir()
    (raw / "a.png").write_bytes(png(specimen(48, 48)))
    cfg = make_cfg(raw=raw)
    ingest_images(cfg)
    first = _tree(Path(cfg.paths.interim_images))
    (blob,) = Path(cfg.paths.cache).rglob("*.pngs")
    blob.write_bytes(blob.read_bytes()[:-10])  # a torn blob, e.g. from a full disk
    summary = ingest_images(cfg)
    assert summary["cache"] == {"hits": 0, "misses": 1}
    assert _tree(Path(cfg.paths.interim_images)) == first
    # An entry from an older record schema (a field missing) is recomputed, not fatal.
    (entry,) = Path(cfg.paths.cache).rglob("*.json")
    value = json.loads(entry.read_text())
    del value["value"]["records"][0]["format"]
    entry.write_text(json.dumps(value))
    summary = ingest_images(cfg)
    assert summary["cache"] == {"hits": 0, "misses": 1}
    assert _tree(Path(cfg.paths.interim_images)) == first


def test_outputs_under_an_input_root_are_not_read_back(tmp_path, make_cfg):
    raw = tmp_path / "out"  # the input root holds the output folder (out/images)
    raw.mkdir()
    (raw / "a.png").write_bytes(png(specimen(48, 48)))
    cfg = make_cfg(raw=raw)
    ingest_images(cfg)
    summary = ingest_images(cfg)
    assert summary["n_records"] == 1 and summary["n_quarantined"] == 0


# --- Gatan DigitalMicrograph -------------------------------------------------------------
# No public DM sample is at hand, so a minimal writer makes real DM3/DM4 files (the tag tree
# layout rosettasciio parses: header, ImageList/ImageData with Data, DataType, Dimensions,
# Calibrations, and ImageTags); reading goes through the real rosettasciio reader.

_DM_DTYPES = {"float32": (2, 6), "int16": (1, 2), "uint16": (10, 4), "uint8": (6, 10)}


def dm_bytes(
    version: int, data: np.ndarray, scale: float, units: str, tags: dict, dims: tuple[int, ...] | None = None
) -> bytes:
    import struct

    q = "I" if version == 3 else "Q"  # DM4 widened lengths and counts to 64 bits

    def name(kind: int, text: str) -> bytes:
        raw = text.encode("latin-1")
        return struct.pack(">bH", kind, len(raw)) + raw

    def datum(key: str, infos: list[int], payload: bytes) -> bytes:
        size = b"" if version == 3 else struct.pack(">Q", 0)
        info = struct.pack(f">{q}", len(infos)) + struct.pack(f">{len(infos)}{q}", *infos)
        return name(21, key) + size + b"%%%%" + info + payload

    def group(key: str, items: list[bytes]) -> bytes:
        size = b"" if version == 3 else struct.pack(">Q", 0)
        count = struct.pack(f">{q}", len(items))
        return name(20, key) + struct.pack(">bb", 0, 0) + size + count + b"".join(items)

    def value(key: str, v) -> bytes:
        if isinstance(v, dict):
            return group(key, [value(k, x) for k, x in v.items()])
        if isinstance(v, str):  # DM strings are arrays of 2-byte characters
            return datum(key, [20, 4, len(v)], struct.pack(f"<{len(v)}H", *map(ord, v)))
        if isinstance(v, int):
            return datum(key, [5], struct.pack("<I", v))
        return datum(key, [6], struct.pack("<f", v))

    code, enc = _DM_DTYPES[str(data.dtype)]
    little_endian = data.astype(data.dtype.newbyteorder("<")).tobytes()
    dims = dims or data.shape[::-1]  # DM lists X first
    calib = [value("", {"Origin": 0.0, "Scale": scale, "Units": units}) for _ in dims]
    image = group(
        "",
        [
            group(
                "ImageData",
                [
                    group(
                        "Calibrations",
                        [
                            value("Brightness", {"Origin": 0.0, "Scale": 1.0, "Units": "Counts"}),
                            group("Dimension", calib),
                        ],
                    ),
                    datum("Data", [20, enc, data.size], little_endian),
                    datum("DataType", [3], struct.pack("<i", code)),
                    group("Dimensions", [value("", int(d)) for d in dims]),
                ],
            ),
            value("ImageTags", tags),
        ],
    )
    root = struct.pack(f">bb{q}", 1, 0, 1) + group("ImageList", [image]) + b"\0" * 8
    return struct.pack(f">I{q}I", version, len(root), 1) + root


def test_gatan_dm3_dm4_through_rosettasciio(tmp_path, make_cfg):
    raw = tmp_path / "raw" / "tem"
    raw.mkdir(parents=True)
    img = specimen(64, 80, seed=3).astype(np.float32) * 10.0 - 300.0  # signed counts
    tags = {"Microscope Info": {"Voltage": 200000.0, "Indicated Magnification": 50000.0, "Microscope": "JEM-2100"}}
    (raw / "a.dm3").write_bytes(dm_bytes(3, img, 0.025, "µm", tags))
    (raw / "b.dm4").write_bytes(dm_bytes(4, img[:, ::-1].astype(np.int16), 2.0, "Å", {}))
    # A header claiming 100000x100000 pixels: refused before any data is read.
    (raw / "huge.dm3").write_bytes(dm_bytes(3, img, 1.0, "nm", {}, dims=(100_000, 100_000)))
    (raw / "spectrum.dm4").write_bytes(dm_bytes(4, img[0], 1.0, "eV", {}, dims=(80,)))
    # An EELS spectrum image is not a micrograph, even though it is 3-D like a series.
    si = {"Meta Data": {"Format": "Spectrum image", "Signal": "EELS"}}
    cube = np.ones((20, 24, 32), np.float32)
    (raw / "eels_si.dm4").write_bytes(dm_bytes(4, cube, 1.0, "nm", si))
    # An in-situ series: three frames in one file -> three pages.
    stack = np.stack([img, img[::-1], img[:, ::-1]]).astype(np.float32)
    (raw / "series.dm4").write_bytes(dm_bytes(4, stack, 0.5, "nm", {}))
    cfg = make_cfg(raw=tmp_path / "raw")
    ingest_images(cfg)
    records, quarantine = read_outputs(cfg)
    got = by_name(records)
    a, b = got["a.dm3"], got["b.dm4"]
    # "tem" says how, not what: no class, so no label.
    assert (a.format, a.original_dtype, a.modality, a.label) == ("DM3", "float32", "TEM", None)
    assert (a.pixel_size_nm, a.pixel_size_source) == (25.0, "dm:axes")
    assert a.instrument == {"vendor": "Gatan", "hv_kv": 200.0, "magnification": 50000.0, "model": "JEM-2100"}
    out = np.asarray(Image.open(a.png))
    assert out.shape == (64, 80) and np.corrcoef(out.ravel(), img.ravel())[0, 1] > 0.99
    assert (b.format, b.original_dtype, b.pixel_size_nm) == ("DM4", "int16", 0.2)
    assert np.corrcoef(np.asarray(Image.open(b.png)).ravel(), img[:, ::-1].ravel())[0, 1] > 0.99
    series = sorted((r for r in records if "series" in r.source), key=lambda r: r.page)
    assert [(r.page, r.n_pages, r.pixel_size_nm) for r in series] == [(0, 3, 0.5), (1, 3, 0.5), (2, 3, 0.5)]
    assert len({r.group for r in series}) == 1 and len({r.png_sha256 for r in series}) == 3
    reasons = {Path(q["source"]).name: q["reason"] for q in quarantine}
    assert set(reasons) == {"huge.dm3", "spectrum.dm4", "eels_si.dm4"}
    assert "no 2-D image" in reasons["eels_si.dm4"]
    assert "max_pixels" in reasons["huge.dm3"]
    assert "no 2-D image" in reasons["spectrum.dm4"]


def test_measure_settings_per_image_and_per_folder_from_sidecars(tmp_path, make_cfg):
    """metadata.csv 'measure.<key>' columns (a '*' row for the whole folder, an image's row
    over it) and a JSON 'measure' mapping over both; a bad key is one line and costs only
    itself."""
    raw = tmp_path / "raw" / "particles"
    raw.mkdir(parents=True)
    for i, name in enumerate(["a.png", "b.png"]):
        (raw / name).write_bytes(png(specimen(48, 64, seed=10 + i)))
    (raw / "metadata.csv").write_text(
        "file,pixel_size_nm,measure.min_object_px,measure.smooth_sigma\n*,,40,\na.png,2.0,20,1.5\n"
    )
    (raw / "a.json").write_text(json.dumps({"measure": {"smooth_sigma": 2.0, "min_object_pixels": 9}}))
    cfg = make_cfg(raw=tmp_path / "raw")
    ingest_images(cfg)
    records, quarantine = read_outputs(cfg)
    recs = by_name(records)
    assert recs["a.png"].measure_settings == {"min_object_px": 20, "smooth_sigma": 2.0}
    assert recs["a.png"].pixel_size_nm == 2.0
    assert recs["b.png"].measure_settings == {"min_object_px": 40}
    (bad,) = [q["reason"] for q in quarantine if q["source"].endswith("a.json")]
    assert "measure setting 'min_object_pixels' is not one of" in bad
    assert "min_object_px" in bad and "\n" not in bad
