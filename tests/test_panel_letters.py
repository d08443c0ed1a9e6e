"""Panel letters burned into figure crops ("(a)", "b1") are kept out of the measurement.

A journal figure's panel letter segments like a particle (the EMPS crops: "(A)" counted as
two objects in fd1f58d925, "b1" as two in 1d67fb3321). Each case draws dark discs on a
mid-gray frame and a black "(a)" near a corner with Pillow's default font, then checks
that ingest finds the letter (and nothing where there is none), records it, and that the
measurement counts the discs and not the letter.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageDraw, ImageFont

from semilens.images.scalebar import find_panel_labels, is_panel_label, tesseract_available

needs_tesseract = pytest.mark.skipif(
    not tesseract_available(), reason="tesseract is not installed (make setup installs it)"
)

DISCS = [(70, 80), (70, 170), (130, 120), (190, 70), (190, 180), (140, 210)]


def _frame(letter: str | None = "(a)", corner_discs: bool = False) -> np.ndarray:
    """256 x 256: six soft dark discs (r 11) on speckled gray, the letter at the top left."""
    rng = np.random.default_rng(3)
    size = 256
    yy, xx = np.mgrid[:size, :size]
    img = rng.normal(170, 5, (size, size))
    centres = DISCS + ([(22, 22), (232, 232)] if corner_discs else [])
    for cy, cx in centres:
        r = np.hypot(yy - cy, xx - cx)
        img -= 110 / (1 + np.exp((r - 11) / 0.8))  # a blurred edge, as a micrograph has
    out = Image.fromarray(np.clip(img, 0, 255).astype(np.uint8))
    if letter:
        ImageDraw.Draw(out).text((8, 6), letter, fill=0, font=ImageFont.load_default(size=28))
    return np.asarray(out)


@pytest.mark.parametrize("text", ["a", "(b)", "A", "b1", "bl", "c)", "(iii)", "2", "(o)"])
def test_panel_label_readings(text):
    assert is_panel_label(text)


@pytest.mark.parametrize("text", ["o", "0", "|", "I", "nm", "200", "Vy", "Gd30", "50nm", ""])
def test_not_panel_labels(text):
    """Units, numbers of a scale label, words, and what a ring or a stroke reads as."""
    assert not is_panel_label(text)


@needs_tesseract
def test_the_letter_is_found_and_particles_in_the_corners_are_not():
    labels = find_panel_labels(_frame())
    assert len(labels) == 1, labels
    x0, y0, x1, y1 = labels[0].box
    assert x0 <= 10 and y0 <= 12 and 40 <= x1 <= 70 and y1 <= 45
    # Solid discs in the corners are not glyphs: nothing is masked.
    assert find_panel_labels(_frame(letter=None, corner_discs=True)) == []


@needs_tesseract
def test_ingest_masks_the_letter_and_the_measurement_counts_only_the_particles(tmp_path, make_cfg):
    from semilens.cache import ItemCache
    from semilens.images import measure
    from semilens.images.ingest import ingest_images
    from semilens.images.records import ImageRecord
    from semilens.io import read_jsonl

    raw = tmp_path / "raw"
    raw.mkdir()
    Image.fromarray(_frame()).save(raw / "fig.png")
    cfg = make_cfg(raw=raw)
    ingest_images(cfg)
    (record,) = [ImageRecord.model_validate(r) for r in read_jsonl(Path(cfg.paths.interim_images) / "records.jsonl")]
    assert len(record.panel_labels) == 1 and record.panel_labels[0].box in record.overlays

    image = np.asarray(Image.open(record.png))
    mcfg = cfg.measure_images
    plain = measure.measure_array(image, mcfg, label="particles")
    assert plain.object_count > len(DISCS)  # the letter's glyphs count as particles
    cache = ItemCache(tmp_path / "cache", "measure_images", measure.VERSION)
    m = measure.measure_record(record.model_copy(update={"label": "particles"}), mcfg, cache)
    assert m.object_count == len(DISCS)
    assert m.median_size_px == pytest.approx(22.0, rel=0.15)
    assert any(n.startswith("panel label '") and "masked" in n for n in m.notes), m.notes

    # Off: the record keeps no panel label and the letter is measured again.
    off = make_cfg(raw=raw, mask_panel_labels=False)
    ingest_images(off)
    (bare,) = read_jsonl(Path(off.paths.interim_images) / "records.jsonl")
    assert bare["panel_labels"] == [] and bare["overlays"] == []
