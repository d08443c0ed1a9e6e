"""Find the burned-in data bar at the bottom of an SEM/TEM image; flag blank/noise frames.

Reads an 8-bit grayscale array (and, when the vendor recorded it, the number of image
rows); writes nothing. Used by ``semilens.images.ingest``.

FEI/Thermo store the scanned height ([Image] ResolutionY), so their bar is exact. Zeiss
and most others do not, so the bar is found from the pixels: a full-width band at the
bottom whose rows are dominated by one background value (white on Zeiss, black on FEI,
whatever a renderer chose) with text and separator lines (rows through one line of large
bold text are bridged), under a sharp boundary above which the image rows do not hold
that value. Where the band has no single background (text drawn over an image-like band,
Hitachi-style), the bar is a straight full-width edge with a line of rendered glyphs below
it. What a specimen band lacks is one of the two: a dark or saturated region fades in or
has a ragged edge; a substrate layer has a straight edge but neither a flat background
nor a line of glyphs. A band taller than ``MAX_FRACTION`` is never a bar, so an image
without a bar keeps every row.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

# A bar is at least this many rows and at most this share of the height.
MIN_ROWS = 4
MAX_FRACTION = 0.3
# A row belongs to the bar when this share of its pixels sits within TOL of the bar's
# background value; text strokes rarely cover more than a third of a bar row.
BACKGROUND_SHARE = 0.6
TOL = 3
# Separator lines (the frame around a Zeiss bar, FEI's grid) are rows that are almost
# entirely one value, whatever that value is.
LINE_SHARE = 0.95
# Rows through a long scale-bar line can drop below BACKGROUND_SHARE; bridge that many.
MAX_GAP = 3
# Odd rows at the very bottom edge (Zeiss sometimes leaves one image row under its bar).
EDGE_ROWS = 2
# Boundary test: the TOP_ROWS highest bar rows against the ABOVE_ROWS image rows above
# them. Above a real bar less than ABOVE_SHARE of the pixels hold the bar's background, and
# the share drops by at least BOUNDARY_STEP across the boundary.
TOP_ROWS = 3
ABOVE_ROWS = 8
ABOVE_SHARE = 0.5
BOUNDARY_STEP = 0.35
# Rows through large or bold text (Thermo Fisher exports, old analogue frames) hold less
# than BACKGROUND_SHARE background: still TEXT_ROW_SHARE, or CLEAN_ROW_SHARE when the rest
# is ink (pixels at least INK_CONTRAST from it) with few mid-tones, which a specimen row near
# the bar's value never is. Such rows join the bar only between bar rows, for at most one
# text line (TEXT_LINE of the height), so a specimen band is never bridged into.
TEXT_ROW_SHARE = 0.4
CLEAN_ROW_SHARE = 0.25
TEXT_ROW_CLEAN = 0.88
INK_CONTRAST = 64
TEXT_LINE = 0.05
# Text drawn over an image-like band (Hitachi-style): no uniform background, so the bar
# is a straight full-width edge (over STEP_ROWS rows each side, the mean steps by EDGE_STEP
# grey levels in EDGE_CONSISTENCY of the columns) with a line of saturated glyphs below it
# (at least MIN_GLYPHS components of text size in one line), with a quarter of that ink
# density at most in as many rows above it.
STEP_ROWS = 4
EDGE_STEP = 12
EDGE_CONSISTENCY = 0.9
INK_LEVELS = (250, 5)  # white text, black text
MIN_GLYPHS = 5


@dataclass(frozen=True)
class Databar:
    rows: int  # rows removed from the bottom (0: no bar)
    method: str | None


def dominant(gray: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per row: the share of pixels within +-TOL of its most common value, and that value."""
    h = gray.shape[0]
    width = 256 + 2 * TOL + 1  # padded so the window below never leaves the histogram
    codes = np.arange(h)[:, None] * width + gray.astype(np.int64) + TOL + 1
    hist = np.bincount(codes.ravel(), minlength=h * width).reshape(h, width)
    cum = np.cumsum(hist, axis=1)
    window = cum[:, 2 * TOL + 1 :] - cum[:, : -(2 * TOL + 1)]  # values v-TOL..v+TOL
    return window.max(axis=1) / gray.shape[1], window.argmax(axis=1)


def detect_databar(gray: np.ndarray, image_rows: int | None = None) -> Databar:
    """Rows to crop from the bottom of ``gray`` and how that was decided."""
    h = gray.shape[0]
    if image_rows is not None and 0 < image_rows < h:
        # The vendor's own record of the scanned height (FEI/Thermo ResolutionY).
        return Databar(h - image_rows, "metadata:ResolutionY")
    if image_rows is not None and image_rows == h:
        return Databar(0, None)
    return _detect_from_pixels(gray)


def _detect_from_pixels(gray: np.ndarray) -> Databar:
    if gray.shape[0] < 4 * MIN_ROWS:
        return Databar(0, None)
    bar = _uniform_bar(gray)
    return bar if bar.rows else _text_over_band(gray)


def _uniform_bar(gray: np.ndarray) -> Databar:
    """A bar drawn on one background value (Zeiss, FEI, JEOL, Thermo Fisher, most others)."""
    h = gray.shape[0]
    # The bar's background: the most common value of the bottom rows.
    bottom = gray[h - max(MIN_ROWS * 2, h // 20) :]
    background = int(np.bincount(bottom.ravel(), minlength=256).argmax())

    limit = min(h, int(MAX_FRACTION * h) + ABOVE_ROWS + MAX_GAP + 1)
    region = gray[h - limit :]
    dist = np.abs(region.astype(np.int16) - background)
    near = (dist <= TOL).mean(axis=1)
    ink = (dist > INK_CONTRAST).mean(axis=1)
    line_share, _ = dominant(region)
    is_bar = (near >= BACKGROUND_SHARE) | (line_share >= LINE_SHARE)
    clean = (near >= CLEAN_ROW_SHARE) & (near + ink >= TEXT_ROW_CLEAN)
    is_text = ~is_bar & ((near >= TEXT_ROW_SHARE) | clean)
    is_bar, is_text = is_bar[::-1], is_text[::-1]  # index 0 = bottom row
    start = next((i for i in range(EDGE_ROWS + 1) if is_bar[i]), None)
    if start is None:
        return Databar(0, None)
    max_text = max(MAX_GAP, int(TEXT_LINE * h))
    top, gap, text = start, 0, 0  # top: index of the highest bar row found so far
    for i in range(start + 1, limit):
        if is_bar[i]:
            top, gap, text = i, 0, 0
        elif is_text[i] and text < max_text:
            text += 1  # a row through a text line: bar only if background rows follow
        else:
            gap += 1
            if gap > MAX_GAP:
                break
    height = top + 1
    if height < MIN_ROWS or height > MAX_FRACTION * h:
        return Databar(0, None)
    # Sharp boundary: the bar's top rows are (nearly) all background or a line, the rows
    # just above clearly less so. A dark or saturated region of the specimen fades out
    # instead, and a noisy specimen background near the bar's value never gets close.
    score = np.maximum(near, line_share)[::-1]
    top_rows = score[max(0, height - TOP_ROWS) : height].mean()
    above_rows = near[::-1][height : height + ABOVE_ROWS].mean()
    if above_rows >= ABOVE_SHARE or top_rows - above_rows < BOUNDARY_STEP:
        return Databar(0, None)
    bar = gray[h - height :].astype(np.int16)
    # A bar carries text or a scale bar: pixels far from its background. A plain band
    # (letterboxing) is cropped too, and the method says which it was.
    has_marks = (np.abs(bar - background) > 64).mean() > 0.002
    return Databar(height, "pixels:text_band" if has_marks else "pixels:uniform_band")


def _text_over_band(gray: np.ndarray) -> Databar:
    """A bar whose text is drawn over an image-like band (Hitachi-style), or no bar.

    Without a uniform background only two things set such a bar apart from a specimen: a
    straight edge across the full width (a specimen's dark or bright region has a ragged
    one) and a line of rendered glyphs in saturated ink below that edge, absent above it.
    """
    from scipy import ndimage

    h, w = gray.shape
    limit = int(MAX_FRACTION * h)
    k = STEP_ROWS
    if limit < MIN_ROWS + k or h < limit + 2 * k:
        return Databar(0, None)
    # Column means of the k rows above and below each candidate top row t (bottom part).
    region = gray[h - limit - k :].astype(np.float64)
    csum = np.vstack([np.zeros((1, w)), np.cumsum(region, axis=0)])
    tops = np.arange(k, limit - MIN_ROWS + k + 1)  # row index of t within region
    above = (csum[tops] - csum[tops - k]) / k
    below = (csum[tops + k] - csum[tops]) / k
    step = below - above
    consistency = np.maximum((step > EDGE_STEP).mean(axis=1), (step < -EDGE_STEP).mean(axis=1))
    strength = np.abs(step.mean(axis=1))
    # Straight edges, nearest the bottom first (a bar is the last band); the rows next to
    # an edge pass too, as their windows straddle it, so each run keeps its strongest row.
    straight = np.flatnonzero(consistency >= EDGE_CONSISTENCY)
    runs = np.split(straight, np.flatnonzero(np.diff(straight) > 1) + 1) if straight.size else []
    for run in runs[::-1]:
        i = run[np.argmax(strength[run])]
        height = int(limit + k - tops[i])
        if height < MIN_ROWS:
            continue
        # Text is only in the bar; a specimen's saturated spots are above the edge as well.
        band, above_band = gray[h - height :], gray[max(0, h - 2 * height) : h - height]
        for level in INK_LEVELS:
            ink = band >= level if level > 128 else band <= level
            ink_above = above_band >= level if level > 128 else above_band <= level
            share = ink.mean()
            if not 0.002 <= share <= 0.4 or ink_above.mean() > share / 4:
                continue
            # Glyphs: ink components of text size, standing side by side in one text line
            # (specks of a saturated specimen are scattered, not lined up on a row).
            per_row = np.zeros(height, int)
            for box in ndimage.find_objects(ndimage.label(ink)[0]):
                rows, cols = box
                if 3 <= rows.stop - rows.start <= height and cols.stop - cols.start <= 0.2 * w:
                    per_row[rows] += 1
            if per_row.max() >= MIN_GLYPHS:
                return Databar(height, "pixels:text_over_band")
    return Databar(0, None)


# ---------------------------------------------------------------------------------------
# Low-information frames
# ---------------------------------------------------------------------------------------


# "Noise only" is only judged on frames at least this large: in a small, shot-noise-limited
# crop a few real features carry too little power to tell from noise (synthetic 64-128 px
# films and hole arrays were flagged), and a false flag drops a usable image downstream.
NOISE_MIN_SIDE = 256


def structure_ratio(gray: np.ndarray, sigma: float = 2.0) -> float:
    """Gradient energy after Gaussian smoothing over gradient energy of the raw frame.

    Smoothing removes most of the gradient energy of white noise (each pixel independent)
    but little of real edges and textures, which span several pixels.
    """
    from scipy import ndimage

    img = gray.astype(np.float64)

    def energy(a: np.ndarray) -> float:
        gy, gx = np.gradient(a)
        return float(np.mean(gx * gx + gy * gy))

    raw = energy(img)
    if raw == 0.0:
        return 0.0
    return energy(ndimage.gaussian_filter(img, sigma)) / raw


def spectral_ratio(gray: np.ndarray, axis_band: float = 0.01) -> float:
    """Off-axis power at low spatial frequencies over that at high ones.

    White noise has a flat spectrum (ratio ~1); a specimen's edges, particles and cracks
    put their power at low frequencies in every direction (2.6 and up on the real and
    synthetic samples seen). The bins near the two axes are left out because camera artefacts
    (line banding, readout tiles, a rectangular scale-bar box) are axis-aligned and sit
    there; that is what keeps the TVIPS noise frame at ~1.3.
    """
    img = gray.astype(np.float64)
    h, w = img.shape
    window = np.outer(np.hanning(h), np.hanning(w))  # no leakage from the frame edges
    power = np.abs(np.fft.fft2((img - img.mean()) * window)) ** 2
    ky = np.abs(np.fft.fftfreq(h) * h)[:, None]
    kx = np.abs(np.fft.fftfreq(w) * w)[None, :]
    radius = np.hypot(ky / h, kx / w)
    band_y, band_x = max(2, round(axis_band * h)), max(2, round(axis_band * w))
    off_axis = (ky > band_y) & (kx > band_x)
    low = power[off_axis & (radius < 0.12)]
    high = power[off_axis & (radius > 0.3) & (radius < 0.5)]
    if low.size == 0 or high.size == 0 or high.mean() == 0.0:
        return 0.0
    return float(low.mean() / high.mean())


def low_information(gray: np.ndarray, min_std: float, min_structure: float, min_spectrum: float) -> str | None:
    """Why ``gray`` carries almost no image content, or None if it does.

    Noise only needs both signs: little gradient energy survives smoothing AND the
    spectrum off the axes is flat. The first alone also fires on real but very noisy
    frames (a polished surface with one indent, a shot-noise-limited film with thin
    cracks score like the TVIPS noise frame). Frames under NOISE_MIN_SIDE are only
    checked for being near-constant.
    """
    std = float(gray.std())
    if std < min_std:
        return f"near-constant frame: std {std:.2f} < {min_std} gray levels"
    if min(gray.shape) < NOISE_MIN_SIDE:
        return None
    ratio = structure_ratio(gray)
    if ratio < min_structure:
        spectrum = spectral_ratio(gray)
        if spectrum < min_spectrum:
            return (
                f"noise only: smoothed/raw gradient energy {ratio:.4f} < {min_structure} "
                f"and low/high-frequency power {spectrum:.2f} < {min_spectrum}"
            )
    return None
