"""Pixel size from the image itself: the burned-in scale bar, or the databar's field width.

Reads an 8-bit grayscale frame (the whole page, databar included) and, optionally, the
number of rows the databar takes; writes nothing. Used by ``semilens.images.ingest`` when
a file's tags or sidecar leave the pixel size open, and to cross-check a vendor tag.

A scale bar is found from its geometry alone (cheap, no OCR): a horizontal stroke of one
extreme gray level (white on black or black on white), thin against its length, long
enough to measure, whose rows above and below are clear of that level along its span.
Two collinear strokes with text between them are one bar with its label in the gap (the
FEI/Thermo layout, ``—— 200 µm ——``). End marks decide where the bar ends, because
renderers differ: tall thin ticks (the Zeiss H-bar, ticks 10x taller than the line is
thick) mark the ends at their centre lines; short end caps or blocks (FEI, TVIPS) are part
of the bar and count whole. Measured against the vendor tags of four instrument families
the two rules land within 2% where the other rule would miss by 3-11%; the difference
between the two is kept as the bar's uncertainty.

The label is the text next to the bar (in its gap, above, below or beside it): its ink
components are cropped together, enlarged and read by Debian's tesseract, then parsed
as a length (``200 nm``, ``1 µm``, ``0.5um``, ``200.0nm``, ``1,5 µm``; tesseract often
reads µ as u, p, y, j or E, and a micrograph's bar is never in picometres, so any other
letter before ``m`` is taken as µ). The databar's ``HFW`` (horizontal field width) cell,
where present, gives the pixel size as field width over image width.

Every result carries its source (``scalebar:ocr``, ``databar:hfw``), a confidence and a
one-line reason, and the boxes of the bar and its label, which are not specimen and are
kept out of the measurement.
"""

from __future__ import annotations

import io
import os
import re
import shutil
import subprocess
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from scipy import ndimage as ndi

Box = tuple[int, int, int, int]  # left, top, right, bottom (right/bottom exclusive)

# Ink: within this many gray levels of pure white (bright bars) or pure black (dark bars).
# After the percentile stretch a rendered bar sits at 0 or 255; specimen rarely does over
# a long thin run.
INK_MARGIN = 56
# On a databar, ink is this far (gray levels) from the bar's background.
BAR_CONTRAST = 64
# A bar is at least this long (px) and its line at most this thick (px, and a fifth of
# its length): thinner than any filled panel or specimen band.
MIN_LENGTH = 12
MAX_THICKNESS = 14
# Rows just above and below the line, along its span, hold at most this share of ink
# (ticks and label strokes aside); a specimen edge or a filled block fails this.
CLEAR_SHARE = 0.35
# Ticks at least this many times taller than the line is thick are thin H-bar ticks,
# whose centre lines mark the ends; shorter marks are caps counted whole.
TALL_TICK_RATIO = 6.0
# OCR: labels are enlarged to about this text height (px) before tesseract reads them.
OCR_TEXT_HEIGHT = 40
OCR_TIMEOUT_S = 20.0
# Candidates whose labels are read (each read is one or more tesseract calls).
MAX_READ = 3

_NM_PER = {"nm": 1.0, "µm": 1e3, "mm": 1e6, "Å": 0.1}
# A number, optional space, a unit. Units as tesseract reads them: "nm", "mm", "Å"; µm
# also as "um", "pm", "ym", "jm", "Em" (a micrograph's bar is never in picometres).
_LENGTH = re.compile(
    r"(?<![\d.,])(\d{1,4}(?:[.,]\d{1,3})?)\s?(nm|mm|Å|[uµμpyjJEe]{1,2}m|m)(?![a-z])",
    re.IGNORECASE,
)
# Databar fields that hold lengths but are not a bar's label.
_DATABAR_KEY = re.compile(r"\b(WD|HFW|FOV|EHT|HV|Spot|Width|Mag)\b", re.IGNORECASE)
# The field-width header as one OCR word ("HFW", misread "HRW"/"HEW"; "FOV"; "Width").
_HFW_HEAD = re.compile(r"H[FRE]W|FOV|Width", re.IGNORECASE)


@dataclass(frozen=True)
class Bar:
    """A scale bar's geometry in frame coordinates (no label read yet)."""

    box: Box  # the whole bar, end marks included
    line_rows: tuple[int, int]  # first and last row of the horizontal stroke
    length_px: float  # between the ends, by the end rule
    alt_length_px: float  # by the other end rule: the spread is the uncertainty
    ends: str  # "ticks" (centre lines) | "caps" (midpoint of centre and outer) | "plain"
    polarity: str  # "bright" | "dark"
    gap: Box | None = None  # the text gap between two collinear strokes
    background: int | None = None  # the databar's background, when found on one

    @property
    def uncertainty(self) -> float:
        return abs(self.length_px - self.alt_length_px) / max(self.length_px, 1.0)


@dataclass(frozen=True)
class Label:
    box: Box
    text: str
    value_nm: float
    confidence: float  # tesseract's mean word confidence, 0..1


@dataclass(frozen=True)
class ImageScale:
    """What the pixels say about the pixel size."""

    pixel_size_nm: float | None
    source: str | None  # "scalebar:ocr" | "databar:hfw" | None
    confidence: float | None
    reason: str
    overlays: tuple[Box, ...] = field(default_factory=tuple)
    bar: Bar | None = None
    label: Label | None = None


# ---------------------------------------------------------------------------------------
# Geometry
# ---------------------------------------------------------------------------------------


def _runs(row: np.ndarray) -> list[tuple[int, int]]:
    """(start, end exclusive) of every run of True in a 1-D bool array."""
    padded = np.concatenate(([False], row, [False])).astype(np.int8)
    edges = np.flatnonzero(np.diff(padded))
    return list(zip(edges[::2].tolist(), edges[1::2].tolist()))


def ink_mask(gray: np.ndarray, polarity: str, background: int | None = None) -> np.ndarray:
    """Pixels of a bar or its label: near the extreme, or far from a known background.

    A databar has one background value, and a bar drawn on it may be mid-gray (a bar
    rendered for a larger frame and scaled down with the image); in the specimen area
    only near-extreme pixels count, or every dark feature would be a candidate.
    """
    if background is not None:
        diff = gray.astype(np.int16) - background
        return diff >= BAR_CONTRAST if polarity == "bright" else diff <= -BAR_CONTRAST
    if polarity == "bright":
        return gray >= 255 - INK_MARGIN
    return gray <= INK_MARGIN


def _long_runs(ink: np.ndarray, min_len: int) -> np.ndarray:
    """Pixels of ``ink`` that lie on a horizontal run of at least ``min_len``."""
    # A run of >= L pixels: erode by L horizontally, then dilate back.
    structure = np.ones((1, min_len), bool)
    return ndi.binary_dilation(ndi.binary_erosion(ink, structure), structure) & ink


def _end_marks(ink: np.ndarray, rows: tuple[int, int], x: int, step: int, thick: int):
    """Columns of a vertical mark at one end of a line: (first col, last col, height)."""
    h = ink.shape[0]
    top, bottom = rows
    cols, ups, downs = [], [], []
    reach = max(3 * thick, 40)
    xi = x
    for _ in range(max(2, 2 * thick + 2)):
        if not 0 <= xi < ink.shape[1]:
            break
        col = ink[:, xi]
        up = 0
        while top - up - 1 >= 0 and up < reach and col[top - up - 1]:
            up += 1
        down = 0
        while bottom + down + 1 < h and down < reach and col[bottom + down + 1]:
            down += 1
        if up + down >= 2 and up >= 1 and down >= 1:
            cols.append(xi)
            ups.append(up)
            downs.append(down)
        elif cols:
            break
        xi += step
    if not cols:
        return None
    return min(cols), max(cols), int(np.median(ups)), int(np.median(downs))


def _is_clear(ink: np.ndarray, top: int, bottom: int, x0: int, x1: int) -> bool:
    """Rows just above and below a line are mostly clear of ink along its middle."""
    h = ink.shape[0]
    inner = slice(x0 + (x1 - x0) // 8, x1 - (x1 - x0) // 8)
    shares = [
        ink[r, inner].mean() if inner.stop > inner.start else 1.0
        for r in (top - 2, top - 1, bottom + 1, bottom + 2)
        if 0 <= r < h
    ]
    return bool(shares) and max(shares) <= CLEAR_SHARE


@dataclass
class _Stroke:
    x0: int
    x1: int  # exclusive
    top: int
    bottom: int  # inclusive


def _strokes(ink: np.ndarray, min_len: int) -> list[_Stroke]:
    """Thin horizontal strokes: components of long-run pixels, thin against their length."""
    long = _long_runs(ink, min_len)
    labels, n = ndi.label(long)
    out = []
    for i, sl in enumerate(ndi.find_objects(labels), 1):
        if sl is None:
            continue
        ys, xs = sl
        height, width = ys.stop - ys.start, xs.stop - xs.start
        if height > min(MAX_THICKNESS, max(2, width // 5)):
            continue
        # The stroke proper: rows where the run covers most of the component's width.
        comp = labels[sl] == i
        cover = comp.mean(axis=1)
        rows = np.flatnonzero(cover >= 0.8)
        if rows.size == 0:
            continue
        out.append(_Stroke(xs.start, xs.stop, ys.start + int(rows[0]), ys.start + int(rows[-1])))
    return out


def _merge_gapped(strokes: list[_Stroke], ink: np.ndarray) -> list[tuple[_Stroke, Box | None]]:
    """Join two collinear strokes with text in the gap between them (FEI ``—— 1 µm ——``)."""
    used: set[int] = set()
    merged: list[tuple[_Stroke, Box | None]] = []
    order = sorted(range(len(strokes)), key=lambda i: (strokes[i].top, strokes[i].x0))
    for a in order:
        if a in used:
            continue
        sa = strokes[a]
        # How far text may reach above and below the line (labels are taller than it).
        pad = max(6, 4 * (sa.bottom - sa.top + 1))
        best = None
        for b in order:
            if b == a or b in used:
                continue
            sb = strokes[b]
            if sb.x0 <= sa.x1 or abs(sb.top - sa.top) > 1 or abs(sb.bottom - sa.bottom) > 1:
                continue
            la, lb, gap = sa.x1 - sa.x0, sb.x1 - sb.x0, sb.x0 - sa.x1
            # A centred label: the two halves about equal, the gap under their sum.
            if not (0.6 <= la / lb <= 1.67) or gap > la + lb:
                continue
            window = ink[max(0, sa.top - pad) : sa.bottom + pad + 1, sa.x1 : sb.x0]
            if window.size and window.mean() > 0.03:  # text in the gap
                if best is None or sb.x0 < strokes[best].x0:
                    best = b
        if best is None:
            merged.append((sa, None))
            continue
        sb = strokes[best]
        used.update((a, best))
        gap_box = (sa.x1, max(0, sa.top - 3 * pad), sb.x0, min(ink.shape[0], sa.bottom + 3 * pad + 1))
        merged.append((_Stroke(sa.x0, sb.x1, min(sa.top, sb.top), max(sa.bottom, sb.bottom)), gap_box))
    return merged


def find_bars(gray: np.ndarray, rows: tuple[int, int] | None = None, background: int | None = None) -> list[Bar]:
    """Scale-bar candidates in ``gray`` (rows ``rows`` only, when given), best first.

    ``background`` is the databar's background value when searching a databar.
    """
    h, w = gray.shape
    r0, r1 = rows if rows is not None else (0, h)
    found: list[Bar] = []
    for polarity in ("bright", "dark"):
        ink = np.zeros_like(gray, dtype=bool)
        ink[r0:r1] = ink_mask(gray[r0:r1], polarity, background)
        for stroke, gap in _merge_gapped(_strokes(ink, MIN_LENGTH), ink):
            x0, x1, top, bottom = stroke.x0, stroke.x1, stroke.top, stroke.bottom
            thick = bottom - top + 1
            # A separator line of a databar or a frame edge spans (nearly) the width.
            if x1 - x0 >= 0.9 * w or x0 == 0 or x1 == w:
                continue
            if gap is None and not _is_clear(ink, top, bottom, x0, x1):
                continue
            if gap is not None and not (
                _is_clear(ink, top, bottom, x0, gap[0]) and _is_clear(ink, top, bottom, gap[2], x1)
            ):
                continue
            left = _end_marks(ink, (top, bottom), x0, 1, thick)
            right = _end_marks(ink, (top, bottom), x1 - 1, -1, thick)
            outer = float(x1 - x0)
            box_top, box_bottom = top, bottom + 1
            if left and right:
                up, down = max(left[2], right[2]), max(left[3], right[3])
                centre = (right[0] + right[1]) / 2 - (left[0] + left[1]) / 2
                box_top = max(0, top - up)
                box_bottom = min(h, bottom + down + 1)
                if up + down + thick >= TALL_TICK_RATIO * thick:
                    length, alt, ends = centre, outer, "ticks"
                else:
                    # Caps: renderers count them whole (TVIPS) or to their middle (FEI);
                    # the midpoint is off by at most a quarter of the two caps' width.
                    length, alt, ends = (centre + outer) / 2, outer, "caps"
            else:
                length, alt, ends = outer, outer, "plain"
            if length < MIN_LENGTH:
                continue
            found.append(
                Bar(
                    box=(x0, int(box_top), x1, int(box_bottom)),
                    line_rows=(top, bottom),
                    length_px=length,
                    alt_length_px=alt,
                    ends=ends,
                    polarity=polarity,
                    gap=gap,
                    background=background,
                )
            )
    # Bars with end marks or a label gap first (a plain stroke may be a specimen edge),
    # then the longest.
    found.sort(key=lambda b: (b.ends == "plain", b.gap is None, -b.length_px))
    return found


# ---------------------------------------------------------------------------------------
# Labels
# ---------------------------------------------------------------------------------------


# Letters tesseract puts for digits in a short number right before a unit ("S00 um",
# "Sum" for 5 µm, "l0 nm").
_DIGIT_LOOKALIKES = str.maketrans({"S": "5", "s": "5", "O": "0", "o": "0", "l": "1", "I": "1", "Z": "2", "B": "8"})
_NUMBER_BEFORE_UNIT = re.compile(
    r"(?<![A-Za-z\d])([\dSsOolIZB][\dSsOolIZB.,]{0,5})(?=\s?(?:nm|mm|[uµμpyjJEe]{1,2}m)\b)"
)


def _fix_digits(text: str) -> str:
    return _NUMBER_BEFORE_UNIT.sub(lambda m: m.group(1).translate(_DIGIT_LOOKALIKES), text)


def parse_length(text: str) -> tuple[float, str] | None:
    """The first length in ``text`` as (nanometres, the matched text), or None."""
    text = _fix_digits(text.replace("—", " ").replace("_", " "))
    for m in _LENGTH.finditer(text):
        number, unit = m.group(1).replace(",", "."), m.group(2)
        low = unit.lower()
        if low == "nm":
            factor = _NM_PER["nm"]
        elif low == "mm":
            factor = _NM_PER["mm"]
        elif unit == "Å":
            factor = _NM_PER["Å"]
        elif low == "m":
            continue  # a bare "m" is a word ending, not a micrograph's unit
        else:
            factor = _NM_PER["µm"]
        try:
            value = float(number)
        except ValueError:
            continue
        if value > 0:
            return value * factor, m.group(0)
    return None


def tesseract_available() -> bool:
    return shutil.which("tesseract") is not None


@dataclass(frozen=True)
class Word:
    text: str
    confidence: float  # 0..1
    box: Box  # in the crop's pixels


def _ocr_words(crop: np.ndarray, psm: int, text_h: float | None = None) -> list[Word]:
    """Words tesseract reads in a black-on-white crop, with boxes in crop pixels.

    ``text_h``: the glyph height when the crop holds more than one line (a databar).
    """
    from PIL import Image

    h = text_h if text_h is not None else crop.shape[0]
    scale = max(1, min(8, round(OCR_TEXT_HEIGHT / max(h, 1))))
    img = Image.fromarray(crop)
    if scale > 1:
        img = img.resize((img.width * scale, img.height * scale), Image.Resampling.LANCZOS)
    pad = 16
    canvas = Image.new("L", (img.width + 2 * pad, img.height + 2 * pad), 255)
    canvas.paste(img, (pad, pad))
    buf = io.BytesIO()
    canvas.save(buf, format="PNG")
    with tempfile.NamedTemporaryFile(suffix=".png") as fh:
        Path(fh.name).write_bytes(buf.getvalue())
        try:
            out = subprocess.run(
                ["tesseract", fh.name, "stdout", "--psm", str(psm), "-l", "eng", "tsv"],
                capture_output=True,
                text=True,
                timeout=OCR_TIMEOUT_S,
                check=False,
                # One thread: tesseract's OpenMP threads only add overhead on a label-sized
                # image, and ingest may run beside other stages.
                env={**os.environ, "OMP_THREAD_LIMIT": "1"},
            )
        except (OSError, subprocess.TimeoutExpired):
            return []
    words = []
    for line in out.stdout.splitlines()[1:]:
        parts = line.split("\t")
        if len(parts) != 12 or not parts[11].strip():
            continue
        try:
            left, top, width, height = (int(v) for v in parts[6:10])
            conf = max(0.0, float(parts[10])) / 100.0
        except ValueError:
            continue
        x0, y0 = (left - pad) / scale, (top - pad) / scale
        box = (int(x0), int(y0), int(x0 + width / scale + 0.5), int(y0 + height / scale + 0.5))
        words.append(Word(parts[11].strip(), conf, box))
    return words


def _ocr(crop: np.ndarray, psm: int) -> tuple[str, float]:
    """Text and mean word confidence (0..1) of a black-on-white crop."""
    words = _ocr_words(crop, psm)
    confs = [w.confidence for w in words]
    return " ".join(w.text for w in words), (float(np.mean(confs)) if confs else 0.0)


def _text_crop(gray: np.ndarray, box: Box, polarity: str, background: int | None = None) -> np.ndarray:
    """The box as black text on white: bright labels are inverted."""
    x0, y0, x1, y1 = box
    crop = gray[y0:y1, x0:x1].astype(np.float32)
    # Keep the glyphs' anti-aliased edges (tesseract reads them better than a hard
    # threshold), stretched so the ink is black and the background white.
    ink = ink_mask(gray[y0:y1, x0:x1], polarity, background)
    if not ink.any() or ink.all():
        return np.full(crop.shape, 255, np.uint8)
    ink_level, bg_level = float(np.median(crop[ink])), float(np.median(crop[~ink]))
    if ink_level == bg_level:
        return np.where(ink, 0, 255).astype(np.uint8)
    out = (crop - ink_level) / (bg_level - ink_level) * 255.0
    return np.clip(out, 0, 255).astype(np.uint8)


def _label_boxes(gray: np.ndarray, bar: Bar, rows: tuple[int, int]) -> list[Box]:
    """Where a bar's label can be, nearest first: its gap, then above, below, beside."""
    h, w = gray.shape
    x0, top, x1, bottom = bar.box
    length = x1 - x0
    r0, r1 = rows
    boxes: list[Box] = []
    if bar.gap is not None:
        # A label between two halves of a bar is the bar's own: nowhere else to look.
        gx0, gy0, gx1, gy1 = bar.gap
        return [(gx0, max(r0, gy0), gx1, min(r1, gy1))]
    # Text height is unknown; a window about as tall as the bar's marks, at least 30 px,
    # and as wide as the bar plus room for a label longer than a short bar.
    reach = max(30, bottom - top + 12)
    margin = max(12, length // 2)
    wx0, wx1 = max(0, x0 - margin), min(w, x1 + margin)
    boxes.append((wx0, max(r0, top - reach), wx1, top))  # above
    boxes.append((wx0, bottom, wx1, min(r1, bottom + reach)))  # below
    boxes.append((x1, max(r0, top - reach // 2), min(w, x1 + 4 * max(length, 30)), min(r1, bottom + reach // 2)))
    boxes.append((max(0, x0 - 4 * max(length, 30)), max(r0, top - reach // 2), x0, min(r1, bottom + reach // 2)))
    return [b for b in boxes if b[2] - b[0] >= 6 and b[3] - b[1] >= 6]


def _tight(gray: np.ndarray, box: Box, polarity: str, bar: Bar, widen: bool = True) -> Box | None:
    """Shrink a search box to the ink components nearest the bar (the label's text line).

    A text line cut by the box's left or right edge is read whole: the box is widened
    once on that side. (A label beside a bar is found by the side boxes, whose reading is
    then whole, rather than as a clipped glyph in the box above.)
    """
    x0, y0, x1, y1 = box
    ink = ink_mask(gray[y0:y1, x0:x1], polarity, bar.background).copy()
    # The bar itself is not label.
    bx0, by0, bx1, by1 = bar.box
    spans = [(bx0, bx1)] if bar.gap is None else [(bx0, bar.gap[0]), (bar.gap[2], bx1)]
    for sx0, sx1 in spans:  # the strokes, not the gap between them (the label is there)
        ink[max(0, by0 - y0) : max(0, by1 - y0), max(0, sx0 - x0) : max(0, sx1 - x0)] = False
    labels, n = ndi.label(ink, structure=np.ones((3, 3), bool))
    if n == 0:
        return None
    objs = ndi.find_objects(labels)
    comps = []
    for sl in objs:
        if sl is None:
            continue
        ys, xs = sl
        hh, ww = ys.stop - ys.start, xs.stop - xs.start
        if hh < 4 or hh > 60 or ww > 80:  # not a glyph: specimen blobs, frame lines
            continue
        comps.append((ys.start, ys.stop, xs.start, xs.stop))
    if not comps:
        return None
    # The text line nearest the bar: components overlapping the row band of the one
    # closest to the bar's line, among those over the bar's span when there are any (a
    # label sits over or beside its own bar, not over the next databar field).
    mid = (bar.line_rows[0] + bar.line_rows[1]) / 2 - y0
    # Above, below or in the gap, a label overlaps its bar's span: the text line is chosen
    # among the glyphs over the span, then read whole (a label may run past a short bar).
    over = [c for c in comps if c[3] + x0 > bx0 and c[2] + x0 < bx1] or comps
    anchor = min(over, key=lambda c: abs((c[0] + c[1]) / 2 - mid))
    a0, a1 = anchor[0], anchor[1]
    # One text line: glyphs sharing at least half the anchor's rows (the next line of a
    # databar may touch it by a row or two).
    line = [c for c in comps if min(c[1], a1) - max(c[0], a0) >= 0.5 * min(a1 - a0, c[1] - c[0])]
    # Glyphs of one label sit close together: keep the run of components around the
    # bar's centre with gaps under two glyph heights.
    line.sort(key=lambda c: c[2])
    glyph_h = max(c[1] - c[0] for c in line)
    groups: list[list[tuple[int, int, int, int]]] = [[line[0]]]
    for c in line[1:]:
        if c[2] - groups[-1][-1][3] <= 2 * glyph_h:
            groups[-1].append(c)
        else:
            groups.append([c])
    centre = (bx0 + bx1) / 2 - x0
    group = min(
        groups,
        key=lambda g: 0 if g[0][2] <= centre <= g[-1][3] else min(abs(g[0][2] - centre), abs(g[-1][3] - centre)),
    )
    ty0 = min(c[0] for c in group)
    ty1 = max(c[1] for c in group)
    tx0 = min(c[2] for c in group)
    tx1 = max(c[3] for c in group)
    cut_left, cut_right = tx0 == 0 and x0 > 0, tx1 == x1 - x0 and x1 < gray.shape[1]
    if (cut_left or cut_right) and widen:
        extra = max(4 * glyph_h, 24)
        wider = (
            max(0, x0 - extra) if cut_left else x0,
            y0,
            min(gray.shape[1], x1 + extra) if cut_right else x1,
            y1,
        )
        return _tight(gray, wider, polarity, bar, widen=False)
    pad = 2
    return (
        max(0, x0 + tx0 - pad),
        max(0, y0 + ty0 - pad),
        min(gray.shape[1], x0 + tx1 + pad),
        min(gray.shape[0], y0 + ty1 + pad),
    )


def read_label(gray: np.ndarray, bar: Bar, rows: tuple[int, int] | None = None) -> Label | None:
    """The bar's label read as a length, from the nearest text that parses as one."""
    rows = rows if rows is not None else (0, gray.shape[0])
    for box in _label_boxes(gray, bar, rows):
        tight = _tight(gray, box, bar.polarity, bar)
        if tight is None:
            continue
        # Never past the region searched: above a databar is specimen, whose gray edge
        # tesseract would read as a glyph.
        tight = (tight[0], max(tight[1], rows[0]), tight[2], min(tight[3], rows[1]))
        crop = _text_crop(gray, tight, bar.polarity, bar.background)
        text, conf = _ocr(crop, 7)
        if _DATABAR_KEY.search(text):  # "WD 6.6mm", "HFW 31.7 um": a databar field
            continue
        parsed = parse_length(text)
        if parsed is not None:
            return Label(tight, text, parsed[0], conf)
    return None


# ---------------------------------------------------------------------------------------
# Databar text: horizontal field width
# ---------------------------------------------------------------------------------------


def read_hfw(gray: np.ndarray, bar_rows: int) -> tuple[float, str] | None:
    """The databar's horizontal field width in nm and the text it came from, or None.

    FEI/Thermo and most others print a header over its value in a grid cell ("HFW" above
    "31.7 µm"), some put them on one line ("HFW: 31.7 µm"); the value is the length read
    right of the header on its line, else the nearest one below it that overlaps it.
    """
    if bar_rows <= 0:
        return None
    band = gray[gray.shape[0] - bar_rows :]
    background = int(np.bincount(band.ravel(), minlength=256).argmax())
    polarity = "bright" if background < 128 else "dark"
    crop = _text_crop(band, (0, 0, band.shape[1], band.shape[0]), polarity, background)
    # Two lines of cells: glyphs about a third of the bar's height; tesseract is sensitive
    # to the scale, so a second size is tried when the first finds no field width.
    for text_h in (bar_rows / 3, bar_rows / 4):
        found = _hfw_from_words(_ocr_words(crop, 11, text_h=text_h))
        if found is not None:
            return found
    return None


def _hfw_from_words(words: list[Word]) -> tuple[float, str] | None:
    for head in words:
        if not _HFW_HEAD.fullmatch(head.text.strip(":")):
            continue
        hx0, hy0, hx1, hy1 = head.box
        line_h = hy1 - hy0
        same_line = [
            w for w in words if w.box[0] >= hx1 - 2 and abs(w.box[1] - hy0) <= line_h and w.box[0] - hx1 < 4 * line_h
        ]
        below = [
            w
            for w in words
            if w.box[1] >= hy1 - 2
            and w.box[1] - hy1 < 3 * line_h
            and w.box[0] < hx1 + 2 * line_h
            and w.box[2] > hx0 - 2 * line_h
        ]
        for group in (same_line, below):
            group = sorted(group, key=lambda w: (w.box[1] // max(line_h, 1), w.box[0]))
            parsed = parse_length(" ".join(w.text for w in group[:3]))
            if parsed is not None:
                return parsed[0], f"{head.text} {parsed[1]}"
    return None


# ---------------------------------------------------------------------------------------
# The image's own scale
# ---------------------------------------------------------------------------------------


def overlays_of(bar: Bar, label: Label | None) -> tuple[Box, ...]:
    pad = 3
    boxes = [bar.box] + ([label.box] if label else []) + ([bar.gap] if bar.gap else [])
    return tuple((b[0] - pad, b[1] - pad, b[2] + pad, b[3] + pad) for b in boxes)


def image_scale(gray: np.ndarray, databar_rows: int = 0, ocr: str = "all") -> ImageScale:
    """Pixel size from the scale bar (or the databar's HFW) of one full frame.

    ``databar_rows`` is the height of the databar already found at the bottom: a bar there
    is searched first; otherwise the whole frame is searched, since bars are burned into
    corners too. ``ocr`` says which labels are read: ``"all"``; ``"image_area"``, only
    candidates in the specimen area (to know what to mask when a sidecar already gives
    the pixel size: a databar is cropped anyway); ``"none"``, geometry only.

    Only a bar whose label reads as a length becomes an overlay: a stroke with end marks
    but no label may be a specimen edge (a trench, a grating line), and masking it would
    hide specimen.
    """
    if ocr not in ("all", "image_area", "none"):
        raise ValueError(f"ocr must be 'all', 'image_area' or 'none', not {ocr!r}")
    h, w = gray.shape
    bars: list[tuple[Bar, tuple[int, int]]] = []
    if databar_rows > 0:
        band = gray[h - databar_rows :]
        background = int(np.bincount(band.ravel(), minlength=256).argmax())
        rows = (h - databar_rows, h)
        bars.extend((b, rows) for b in find_bars(gray, rows, background))
    image_rows = (0, h - databar_rows)
    bars.extend((b, image_rows) for b in find_bars(gray, image_rows))
    # Each label read costs a tesseract call: only the best few candidates are read.
    bars = bars[:MAX_READ]
    if not bars:
        return ImageScale(None, None, None, "no scale bar found")
    first = bars[0][0]
    where = f"first at x {first.box[0]}-{first.box[2]}, y {first.box[1]}"
    to_read = bars if ocr == "all" else [(b, r) for b, r in bars if r == image_rows]
    if ocr == "none" or not tesseract_available():
        why = "OCR off" if ocr == "none" else "tesseract is not installed"
        return ImageScale(None, None, None, f"{len(bars)} bar-like stroke(s), labels not read ({why}; {where})")
    readings: list[tuple[Bar, Label]] = []
    overlays: list[Box] = []
    for bar, rows in to_read:
        label = read_label(gray, bar, rows)
        if label is None:
            continue
        readings.append((bar, label))
        overlays.extend(overlays_of(bar, label))
    if not readings:
        hfw = read_hfw(gray, databar_rows) if ocr == "all" else None
        if hfw is not None:
            return ImageScale(
                float(f"{hfw[0] / w:.6g}"),
                "databar:hfw",
                0.8,
                f"databar field width '{hfw[1]}' over {w} px",
            )
        return ImageScale(
            None,
            None,
            None,
            f"no scale bar read: {len(bars)} bar-like stroke(s), none labelled with a length ({where})",
        )

    # Several bars that read: they must agree (one image, one scale).
    sizes = [label.value_nm / bar.length_px for bar, label in readings]
    best_bar, best_label = readings[0]
    size = sizes[0]
    spread = (max(sizes) - min(sizes)) / min(sizes)
    if len(readings) > 1 and spread > 0.05:
        texts = ", ".join(f"'{lab.text}' over {b.length_px:g} px" for b, lab in readings[:3])
        return ImageScale(
            None,
            None,
            None,
            f"{len(readings)} scale bars disagree by {spread:.0%} ({texts}): pixel size left open",
            tuple(overlays),
            best_bar,
        )
    confidence = best_label.confidence * (1.0 - min(0.5, 5 * best_bar.uncertainty))
    if len(readings) > 1:
        confidence = min(1.0, confidence + 0.1)
    reason = (
        f"scale bar '{best_label.text}' over {best_bar.length_px:g} px "
        f"({best_bar.ends}, {best_bar.polarity}) at x {best_bar.box[0]}-{best_bar.box[2]}, "
        f"y {best_bar.box[1]}"
    )
    return ImageScale(
        float(f"{size:.6g}"),
        "scalebar:ocr",
        round(confidence, 3),
        reason,
        tuple(overlays),
        best_bar,
        best_label,
    )


# ---------------------------------------------------------------------------------------
# Panel letters
# ---------------------------------------------------------------------------------------

# Figures cut from papers carry their panel's letter burned in ("a", "(b)", "A", "b1",
# "III"), which segments like a particle. A letter is found in three cheap steps before
# any OCR: glyph-sized ink components (same extreme-gray ink as a bar's label) near a
# corner of the frame, thin-stroked and flat-filled (rendered text is one gray level with
# a sharp edge; a particle of that size is filled solid or shaded); then one tesseract
# pass over those components alone per polarity finds words, and each word's crop is read
# again as one text line and kept only when it reads as a panel label.
#
# Glyph height in px: at least this, and at most this share of the frame's shorter side.
GLYPH_MIN_PX = 8
GLYPH_MAX_REL = 0.15
# Centre within this share of the width of a left or right edge and of the height of the
# top or bottom edge: panel letters sit in a corner, where papers put them.
CORNER_REL = 0.25
# Twice the largest inscribed radius over the glyph height: strokes of text, bold fonts
# included, stay under 0.3; a solid particle or its filled outline is near 1.
MAX_STROKE_REL = 0.45
# Ink against the ring 2-4 px around it (gray levels): a label is drawn to be read.
MIN_GLYPH_CONTRAST = 48
# Spread (std) of the gray levels 2 px or more inside the ink, over the contrast: text is
# one flat fill (0.00-0.043 on the 14 panel labels of the EMPS crops, JPEG-smeared ones
# included); the bright tips of nanowires that pass the other tests are shaded (0.04-0.13),
# and at 0.07 one in a DeepSEM frame reads as a label ("Hl").
MAX_FILL_SPREAD = 0.05
# Tesseract's confidence in the re-read label: low, because the grammar and the glyph
# tests above already carry the weight ("b1" in a bold serif reads "bl" at 0.48).
MIN_LABEL_CONFIDENCE = 0.35

# A panel label: optional bracket, then one letter with up to two digits ("b1"; tesseract
# reads a "1" after a letter as l, I or |), up to two digits, or a roman numeral; optional
# closing bracket and full stop. Longer words are captions or sample names, left alone.
_PANEL_LABEL = re.compile(r"^([(\[]?)([A-Za-z](?:\d{1,2}|[lI|])?|\d{1,2}|[ivxIVXl]{1,4})([)\]]?)[.:]?$")
# One character that a ring-shaped particle (a closed shape) or a single straight stroke
# (a wire, an edge) reads as: a label only inside brackets.
_SHAPE_READS = frozenset("oO0QDIl|1ijJ!")


@dataclass(frozen=True)
class PanelLabel:
    """A burned-in panel label: what it read as and the box kept out of the measurement."""

    box: Box  # padded, frame coordinates
    text: str
    confidence: float  # tesseract's, 0..1
    polarity: str  # "bright" | "dark"


@dataclass(frozen=True)
class _Glyph:
    label: int
    box: Box


def is_panel_label(text: str) -> bool:
    """Whether an OCR reading is a panel label ("a", "(b)", "A", "b1", "iii)", "2")."""
    m = _PANEL_LABEL.match(text.strip())
    if m is None:
        return False
    bracketed = bool(m.group(1) or m.group(3))
    return bracketed or m.group(2) not in _SHAPE_READS


def _glyphs(gray: np.ndarray, polarity: str, skip: np.ndarray) -> tuple[np.ndarray, list[_Glyph]]:
    """Ink components near a corner that look like glyphs of rendered text."""
    h, w = gray.shape
    ink = ink_mask(gray, polarity)
    labels, _ = ndi.label(ink, structure=np.ones((3, 3), bool))
    values = gray.astype(np.float32)
    out = []
    for i, sl in enumerate(ndi.find_objects(labels), 1):
        if sl is None:
            continue
        ys, xs = sl
        gh, gw = ys.stop - ys.start, xs.stop - xs.start
        if not GLYPH_MIN_PX <= gh <= GLYPH_MAX_REL * min(h, w) or gw > 1.5 * gh + 4:
            continue
        if ys.start == 0 or xs.start == 0 or ys.stop == h or xs.stop == w:
            continue  # cut by the frame: a glyph there cannot be read, a particle can be
        cy, cx = (ys.start + ys.stop) / 2, (xs.start + xs.stop) / 2
        if min(cy, h - cy) > CORNER_REL * h or min(cx, w - cx) > CORNER_REL * w:
            continue
        if skip[sl].any():  # a scale bar's label, already kept out
            continue
        # A window 4 px around the component: its ring is the local background.
        y0, y1 = max(0, ys.start - 4), min(h, ys.stop + 4)
        x0, x1 = max(0, xs.start - 4), min(w, xs.stop + 4)
        comp = labels[y0:y1, x0:x1] == i
        inside = ndi.distance_transform_edt(np.pad(comp, 1))[1:-1, 1:-1]
        if 2 * inside.max() > MAX_STROKE_REL * gh:
            continue
        outside = ndi.distance_transform_edt(~comp)
        ring = (outside > 1.5) & (outside <= 4) & ~ink[y0:y1, x0:x1]
        if ring.sum() < 10:
            continue
        win = values[y0:y1, x0:x1]
        ink_level, bg_level = float(np.median(win[comp])), float(np.median(win[ring]))
        contrast = ink_level - bg_level if polarity == "bright" else bg_level - ink_level
        if contrast < MIN_GLYPH_CONTRAST:
            continue
        core = win[inside >= 2]
        if core.size >= 4 and float(core.std()) > MAX_FILL_SPREAD * contrast:
            continue
        out.append(_Glyph(i, (xs.start, ys.start, xs.stop, ys.stop)))
    return labels, out


def _line_of(seed: list[_Glyph], glyphs: list[_Glyph]) -> Box:
    """The box of ``seed`` grown by the glyphs beside it on its text line (a bracket the
    word read left out), each within one glyph height of the last."""
    x0 = min(g.box[0] for g in seed)
    y0 = min(g.box[1] for g in seed)
    x1 = max(g.box[2] for g in seed)
    y1 = max(g.box[3] for g in seed)
    grown = True
    while grown:
        grown = False
        for g in glyphs:
            gx0, gy0, gx1, gy1 = g.box
            if gx0 >= x0 and gx1 <= x1 and gy0 >= y0 and gy1 <= y1:
                continue
            rows = min(gy1, y1) - max(gy0, y0)
            gap = max(gx0 - x1, x0 - gx1)
            if rows >= 0.5 * min(gy1 - gy0, y1 - y0) and gap <= y1 - y0:
                x0, y0, x1, y1 = min(x0, gx0), min(y0, gy0), max(x1, gx1), max(y1, gy1)
                grown = True
    return x0, y0, x1, y1


def find_panel_labels(gray: np.ndarray, skip: tuple[Box, ...] = ()) -> list[PanelLabel]:
    """Panel letters burned into the corners of ``gray`` (the specimen area), as boxes.

    ``skip``: boxes already kept out (a scale bar and its label). Needs tesseract; without
    it nothing is found. At most two tesseract calls per polarity with candidates, plus
    one per word that may be a label; a frame without glyph-like ink near its corners
    costs none.
    """
    if not tesseract_available():
        return []
    h, w = gray.shape
    skip_mask = np.zeros((h, w), bool)
    for x0, y0, x1, y1 in skip:
        skip_mask[max(0, y0) : max(0, y1), max(0, x0) : max(0, x1)] = True
    found: list[PanelLabel] = []
    for polarity in ("bright", "dark"):
        labels, glyphs = _glyphs(gray, polarity, skip_mask)
        if not glyphs:
            continue
        # The glyphs alone, black on white: no specimen around them to read as text.
        page = np.where(np.isin(labels, [g.label for g in glyphs]), 0, 255).astype(np.uint8)
        text_h = float(np.median([g.box[3] - g.box[1] for g in glyphs]))
        for word in _ocr_words(page, 11, text_h=text_h):
            if len(word.text) > 6:
                continue
            wx0, wy0, wx1, wy1 = word.box
            seed = [
                g
                for g in glyphs
                if g.box[0] >= wx0 - 3 and g.box[2] <= wx1 + 3 and g.box[1] >= wy0 - 3 and g.box[3] <= wy1 + 3
            ]
            if not seed:
                continue
            x0, y0, x1, y1 = _line_of(seed, glyphs)
            pad = max(2, (y1 - y0) // 6)
            box = (max(0, x0 - pad), max(0, y0 - pad), min(w, x1 + pad), min(h, y1 + pad))
            if any(_overlap(box, f.box) for f in found):
                continue
            # Read again as one line from the frame's own pixels (anti-aliased edges).
            reading = _ocr_words(_text_crop(gray, box, polarity), 7)
            if len(reading) != 1 or reading[0].confidence < MIN_LABEL_CONFIDENCE:
                continue
            if is_panel_label(reading[0].text):
                found.append(PanelLabel(box, reading[0].text, round(reading[0].confidence, 3), polarity))
    return found


def _overlap(a: Box, b: Box) -> bool:
    return min(a[2], b[2]) > max(a[0], b[0]) and min(a[3], b[3]) > max(a[1], b[1])
