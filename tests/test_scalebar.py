"""semilens.images.scalebar: bars drawn with PIL on textured frames, read with tesseract.

Each case draws what a vendor or a journal figure draws (an H-bar with its label above, an
FEI bar with the label in its gap, a plain bar in a corner), then checks the length, the
label, the pixel size and the reason; the bad inputs (no bar, an unreadable label, two
bars that disagree, a bar in um on a 16-bit TIFF through ingest) each give a clear reason.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageDraw, ImageFont

from semilens.images.scalebar import find_bars, image_scale, parse_length, tesseract_available

needs_tesseract = pytest.mark.skipif(
    not tesseract_available(), reason="tesseract is not installed (make setup installs it)"
)


def _font(size: int) -> ImageFont.ImageFont:
    for path in (
        "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf",
        "/usr/share/fonts/truetype/dejavu/DejaVuSans-Bold.ttf",
    ):
        if Path(path).is_file():
            return ImageFont.truetype(path, size)
    return ImageFont.load_default(size=size)


def _specimen(h: int, w: int, seed: int = 0) -> np.ndarray:
    """Mid-gray speckled background with soft blobs: no long extreme strokes."""
    rng = np.random.default_rng(seed)
    img = rng.normal(120, 12, (h, w))
    yy, xx = np.mgrid[:h, :w]
    for _ in range(12):
        cy, cx, r = rng.uniform(0, h), rng.uniform(0, w), rng.uniform(5, 15)
        img += 40 * np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / (2 * r * r))
    return np.clip(img, 30, 220).astype(np.uint8)


def _h_bar(draw: ImageDraw.ImageDraw, x0: int, x1: int, y: int, fill: int, tick: int = 10) -> None:
    draw.rectangle((x0, y - 1, x1, y + 1), fill=fill)
    draw.rectangle((x0 - 1, y - tick, x0 + 1, y + tick), fill=fill)
    draw.rectangle((x1 - 1, y - tick, x1 + 1, y + tick), fill=fill)


def _zeiss_like(length: int, label: str) -> tuple[np.ndarray, int]:
    """Specimen above a white databar with a black H-bar (ticks at x 40 and 40+length)."""
    h, w, bar = 400, 600, 70
    img = Image.fromarray(np.vstack([_specimen(h - bar, w), np.full((bar, w), 255, np.uint8)]))
    draw = ImageDraw.Draw(img)
    draw.text((40, h - bar + 6), label, fill=0, font=_font(18))
    _h_bar(draw, 40, 40 + length, h - 22, 0)
    draw.text((300, h - bar + 20), "EHT = 5.00 kV", fill=0, font=_font(16))
    return np.asarray(img), bar


def _fei_like(length: int, label: str) -> tuple[np.ndarray, int]:
    """Black databar; white bar split by its label (the FEI/Thermo layout)."""
    h, w, bar = 420, 640, 60
    img = Image.fromarray(np.vstack([_specimen(h - bar, w, 1), np.zeros((bar, w), np.uint8)]))
    draw = ImageDraw.Draw(img)
    x0, y = 300, h - bar + 18
    font = _font(18)
    tw = draw.textlength(label, font=font)
    mid = x0 + length / 2
    draw.text((mid - tw / 2, y - 11), label, fill=255, font=font)
    draw.rectangle((x0, y - 1, mid - tw / 2 - 6, y + 1), fill=255)
    draw.rectangle((mid + tw / 2 + 6, y - 1, x0 + length, y + 1), fill=255)
    draw.rectangle((x0, y - 3, x0 + 1, y + 3), fill=255)
    draw.rectangle((x0 + length - 1, y - 3, x0 + length, y + 3), fill=255)
    draw.text((20, h - bar + 8), "HV 10.00 kV   WD 10.5 mm", fill=255, font=_font(14))
    return np.asarray(img), bar


def test_parse_length_reads_units_as_tesseract_spells_them():
    assert parse_length("200 nm") == (200.0, "200 nm")
    assert parse_length("200.0nm")[0] == 200.0
    assert parse_length("1 µm")[0] == 1000.0
    assert parse_length("1,5 um")[0] == 1500.0
    assert parse_length("1 ym")[0] == 1000.0  # tesseract's usual µ
    assert parse_length("S00 um")[0] == 500_000.0  # S read for 5
    assert parse_length("2 mm")[0] == 2e6
    for text in ("10 kV", "Mag 200 x", "EHT = 3.00 kV", "200 am", "", "nm"):
        assert parse_length(text) is None, text


def test_geometry_finds_the_h_bar_and_measures_between_tick_centres():
    gray, bar_rows = _zeiss_like(120, "500 nm")
    bars = find_bars(gray, (gray.shape[0] - bar_rows, gray.shape[0]), background=255)
    assert bars, "no bar found"
    best = bars[0]
    assert best.ends == "ticks" and best.polarity == "dark"
    assert best.length_px == pytest.approx(120, abs=1)


@needs_tesseract
def test_zeiss_like_h_bar_gives_the_pixel_size():
    gray, bar_rows = _zeiss_like(120, "500 nm")
    scale = image_scale(gray, bar_rows)
    assert scale.source == "scalebar:ocr", scale.reason
    assert scale.pixel_size_nm == pytest.approx(500 / 120, rel=0.02)
    assert scale.label is not None and "500" in scale.label.text
    assert 0 < scale.confidence <= 1
    # The overlays cover the bar and its label, both inside the databar rows here.
    assert all(b[1] >= gray.shape[0] - bar_rows - 3 for b in scale.overlays)


@needs_tesseract
def test_fei_like_bar_with_its_label_in_the_gap():
    gray, bar_rows = _fei_like(300, "10 µm")
    scale = image_scale(gray, bar_rows)
    assert scale.source == "scalebar:ocr", scale.reason
    assert scale.bar is not None and scale.bar.gap is not None
    assert scale.pixel_size_nm == pytest.approx(10_000 / 300, rel=0.02)
    # The working distance "10.5 mm" in the same databar is not taken for the bar's label.
    assert scale.label is not None and "mm" not in scale.label.text


@needs_tesseract
def test_bar_burned_into_the_image_corner_is_found_and_masked():
    h, w = 500, 500
    img = Image.fromarray(_specimen(h, w, 2))
    draw = ImageDraw.Draw(img)
    draw.rectangle((10, h - 60, 170, h - 10), fill=255)
    draw.rectangle((20, h - 48, 160, h - 42), fill=0)
    draw.text((55, h - 36), "200 nm", fill=0, font=_font(18))
    gray = np.asarray(img)
    scale = image_scale(gray, 0)
    assert scale.source == "scalebar:ocr", scale.reason
    assert scale.pixel_size_nm == pytest.approx(200 / 141, rel=0.02)
    x0, y0, x1, y1 = scale.overlays[0]
    assert x0 <= 20 and x1 >= 160 and y0 <= h - 48 and y1 >= h - 42


def test_no_bar_gives_a_reason_and_no_pixel_size():
    gray = _specimen(300, 400, 3)
    scale = image_scale(gray, 0)
    assert scale.pixel_size_nm is None and scale.source is None
    assert scale.reason == "no scale bar found" and scale.overlays == ()


@needs_tesseract
def test_unreadable_label_keeps_the_bar_masked_and_says_why():
    h, w, bar = 400, 600, 70
    img = Image.fromarray(np.vstack([_specimen(h - bar, w), np.full((bar, w), 255, np.uint8)]))
    draw = ImageDraw.Draw(img)
    _h_bar(draw, 40, 160, h - 22, 0)
    # Scribble instead of a label.
    for i in range(6):
        draw.line((40 + 12 * i, h - 60, 46 + 12 * i, h - 44), fill=0, width=2)
    scale = image_scale(np.asarray(img), bar)
    assert scale.pixel_size_nm is None
    assert scale.reason.startswith("no scale bar read: ") and "none labelled with a length" in scale.reason
    # Unlabelled, the stroke could be specimen: nothing is masked.
    assert scale.overlays == ()


@needs_tesseract
def test_two_bars_that_disagree_leave_the_pixel_size_open():
    gray, bar_rows = _zeiss_like(120, "500 nm")
    img = Image.fromarray(gray.copy())
    draw = ImageDraw.Draw(img)
    h = gray.shape[0]
    draw.text((420, h - bar_rows + 6), "2 µm", fill=0, font=_font(18))
    _h_bar(draw, 420, 520, h - 22, 0)
    scale = image_scale(np.asarray(img), bar_rows)
    assert scale.pixel_size_nm is None
    assert "scale bars disagree" in scale.reason


@needs_tesseract
def test_ingest_reads_a_um_bar_on_a_16_bit_tiff_and_a_sidecar_still_wins(tmp_path, make_cfg):
    """Through the stage: a 16-bit TIFF with only a burned-in bar gets its pixel size from
    the bar; the same image with a sidecar keeps the sidecar's value."""
    import tifffile

    from semilens.images.ingest import ingest_images
    from semilens.io import read_jsonl

    gray, bar_rows = _fei_like(300, "3 µm")
    deep = (gray.astype(np.uint16) * 257).astype(np.uint16)
    raw = tmp_path / "raw"
    (raw / "a").mkdir(parents=True)
    (raw / "b").mkdir(parents=True)
    tifffile.imwrite(raw / "a" / "bar16.tif", deep)
    tifffile.imwrite(raw / "b" / "sidecar16.tif", deep[:, ::-1].copy())  # other bytes
    (raw / "b" / "sidecar16.json").write_text(json.dumps({"pixel_size_nm": 12.5}))
    cfg = make_cfg(raw=raw)
    ingest_images(cfg)
    out = Path(cfg.paths.interim_images) / "records.jsonl"
    records = {Path(r["source"]).name: r for r in read_jsonl(out)}
    bar = records["bar16.tif"]
    assert bar["original_dtype"] == "uint16"
    assert bar["pixel_size_source"] == "scalebar:ocr", bar["pixel_size_note"]
    assert bar["pixel_size_nm"] == pytest.approx(3000 / 300, rel=0.02)
    assert 0 < bar["pixel_size_confidence"] <= 1
    side = records["sidecar16.tif"]
    assert (side["pixel_size_nm"], side["pixel_size_source"]) == (12.5, "sidecar:json")
    assert side["pixel_size_confidence"] == 1.0


@needs_tesseract
def test_field_width_read_from_an_fei_like_databar_grid():
    """Headers over values in cells ("HFW" over "31.7 µm"): the value under the header."""
    from semilens.images.scalebar import read_hfw

    h, w, bar = 420, 1024, 60
    img = Image.fromarray(np.vstack([_specimen(h - bar, w, 4), np.zeros((bar, w), np.uint8)]))
    draw = ImageDraw.Draw(img)
    font = _font(18)
    for x, head, value in (
        (20, "HV", "10.00 kV"),
        (160, "WD", "10.5 mm"),
        (300, "HFW", "31.7 µm"),
        (460, "mag", "4 000 x"),
    ):
        draw.text((x, h - bar + 6), head, fill=255, font=font)
        draw.text((x, h - bar + 32), value, fill=255, font=font)
        draw.line((x - 8, h - bar, x - 8, h), fill=255)
    found = read_hfw(np.asarray(img), bar)
    assert found is not None
    assert found[0] == pytest.approx(31_700)
    assert "HFW" in found[1]
    # Without the header there is no field width to read.
    plain = np.asarray(img).copy()
    plain[h - bar + 2 : h - bar + 28, 290:360] = 0
    assert read_hfw(plain, bar) is None


@needs_tesseract
def test_jeol_like_bar_with_its_label_beside_it():
    """A filled bar with the label to its right, the specimen's gray edge just above the
    databar (it must not be read as a glyph)."""
    h, w, bar = 420, 640, 32
    img = Image.fromarray(np.vstack([_specimen(h - bar, w, 5), np.zeros((bar, w), np.uint8)]))
    draw = ImageDraw.Draw(img)
    font = _font(16)
    draw.text((20, h - bar + 8), "SEI   15.0kV   X100,000   WD 5mm", fill=255, font=font)
    draw.rectangle((470, h - bar + 6, 549, h - bar + 12), fill=255)
    draw.text((560, h - bar + 2), "100nm", fill=255, font=font)
    scale = image_scale(np.asarray(img), bar)
    assert scale.source == "scalebar:ocr", scale.reason
    assert scale.label is not None and scale.label.value_nm == 100
    assert scale.pixel_size_nm == pytest.approx(100 / 80, rel=0.02)


@needs_tesseract
def test_a_tag_the_bar_contradicts_is_kept_and_flagged(tmp_path, make_cfg):
    """FEI tag 2.5 nm/px, burned-in bar 10 um over 300 px (33.3 nm/px): the tag is the
    record's pixel size, the check says disagree, and the note gives both numbers."""
    import tifffile

    from semilens.images.ingest import ingest_images
    from semilens.io import read_jsonl

    gray, bar_rows = _fei_like(300, "10 µm")
    h, w = gray.shape
    ini = (
        "[System]\r\nSystemType=Quanta 250\r\n[Beam]\r\nHV=10000\r\nBeam=EBeam\r\n"
        "[EBeam]\r\nHV=10000\r\n[Scan]\r\nPixelWidth=2.5e-09\r\n"
        f"[Image]\r\nResolutionX={w}\r\nResolutionY={h - bar_rows}\r\n"
    )
    raw = tmp_path / "raw"
    raw.mkdir()
    tifffile.imwrite(raw / "fei.tif", gray, extratags=[(34682, "s", 0, ini, True)])
    cfg = make_cfg(raw=raw)
    ingest_images(cfg)
    (rec,) = list(read_jsonl(Path(cfg.paths.interim_images) / "records.jsonl"))
    assert (rec["pixel_size_nm"], rec["pixel_size_source"]) == (2.5, "tiff:fei_34682")
    assert rec["pixel_size_check"] == "disagree"
    assert "tiff:fei_34682 2.5 nm and scalebar:ocr 33.3" in rec["pixel_size_note"]
