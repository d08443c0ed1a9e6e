"""measure_images: classical morphology of every normalised image (scikit-image).

Reads ``<paths.interim_images>/records.jsonl`` (one ``ImageRecord`` per line, written by
ingest_images; the PNGs it names are 8-bit grayscale with the databar already cropped).
Writes ``<paths.measurements>/measurements.jsonl`` (one ``Measurement`` per record, sorted
by id) and ``<paths.metrics>/measure.json`` (per synthetic class: median relative count,
size and pitch error against the ground truth). Run: ``python -m stages.measure_images``.

The analysis is chosen from the label when it names a known morphology (synonyms such as
"NW" map to ``elongated``, "nanorods" to ``rods``), otherwise detected: a strongly
periodic Fourier spectrum means a grating (one direction: ``periodic_lines``) or an array
(several: ``periodic_holes``); anything else is segmented as ``particles`` and re-measured
as ``rods`` (short, straight, convex) or ``elongated`` (wires, fibres) when the objects are
long. Labelled wires that turn out to be short straight rods (a tilted view of a growth
array) are measured as ``rods`` too. What ``median_size_px`` means follows the
ground-truth convention: the equivalent circular diameter for particles, holes, pores and
grains; the width for rods, elongated objects, lines and cracks.

Segmentation, in short: remove a planar intensity gradient, smooth, threshold at the gray
level of the steepest edges (for particles in an even two-phase frame whose steepest edges
lie inside one phase, such as rimmed superalloy channels, at Otsu's level), then move every
outline onto the ridge of the gradient (a marker watershed), which keeps sizes unbiased
under SEM edge brightening. Which phase is
the object is decided from the image, not the modality: particles by the sign of the
curvature of the strongest edges (objects are convex), strands by which polarity forms
ridges; the modality breaks only a tie. Touching blobs are split by a distance-transform
watershed whose neck depth and smoothing scale with the typical particle radius, read with
the pockets between close-packed particles open (filled, they weld a packing into one
blob) while particle cores and texture pinholes stay filled; objects
far below the main population's (area-weighted) size and fainter than it are speckle or
debris, set apart in the notes and not counted (small objects as contrasted as the main
population are small particles, and count). Rods are measured along and across their own axes; thin
objects from their pruned skeletons (count = ends / 2, width from area = w L + pi w^2 e /
8); gratings by a zero-padded spectrum; cracks and grain boundaries by a Sato ridge
filter. Burned-in overlays (``ImageRecord.overlays``: scale bars, labels) are filled from
the nearest specimen pixels before segmenting, and objects touching them are dropped.

Results are cached per image under ``paths.cache/measure_images`` keyed by the PNG's
content hash, its label, pixel size, modality and overlays, the measure params and a hash
of this module's source (``VERSION``), so a changed algorithm never reuses old results.
The images not in the cache are measured on ``executor.workers`` processes.
"""

from __future__ import annotations

import functools
import math
import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image
from scipy import ndimage as ndi
from scipy.spatial import cKDTree

from semilens.cache import ItemCache, code_version
from semilens.config import Config, MeasureImagesConfig
from semilens.executor import map_items
from semilens.images.records import GroundTruth, ImageRecord, Measurement
from semilens.io import read_jsonl, reset_dir, write_json, write_jsonl

# The per-image cache is keyed by this code: any change re-measures every image.
VERSION = code_version(__name__, "semilens.images.records")
# Acceptance target: median relative count and size error for these synthetic classes.
TARGET_ERROR = 0.10
TARGET_CLASSES = ("particles", "nanowires", "lines", "holes")

METHODS = (
    "particles",
    "rods",
    "elongated",
    "periodic_lines",
    "periodic_holes",
    "porous",
    "cracks",
    "grains",
    "none",
)

# Label -> method. Keys are labels lower-cased with everything but letters removed and a
# trailing plural "s" dropped; whole-word abbreviations first, then stems found anywhere.
_EXACT = {
    "nw": "elongated",
    "cnt": "elongated",
    "np": "particles",
    "nps": "particles",
    "fibre": "elongated",
    "fiber": "elongated",
    "rod": "rods",
    "line": "periodic_lines",
    "hole": "periodic_holes",
    "via": "periodic_holes",
    "grain": "grains",
    "pore": "porous",
}
_STEMS = (
    ("nanowire", "elongated"),
    ("wire", "elongated"),
    ("nanorod", "rods"),
    ("nanotube", "elongated"),
    ("whisker", "elongated"),
    ("fibre", "elongated"),
    ("fiber", "elongated"),
    ("filament", "elongated"),
    ("crack", "cracks"),
    ("porous", "porous"),
    ("sponge", "porous"),
    ("foam", "porous"),
    ("pore", "porous"),
    ("grain", "grains"),
    ("polycrystal", "grains"),
    ("linespace", "periodic_lines"),
    ("grating", "periodic_lines"),
    ("lines", "periodic_lines"),
    ("holearray", "periodic_holes"),
    ("holes", "periodic_holes"),
    ("contacthole", "periodic_holes"),
    ("particle", "particles"),
    ("powder", "particles"),
    ("sphere", "particles"),
    ("dots", "particles"),
    ("nanodot", "particles"),
    # NFFA "Patterned_surface": periodic, but lines or holes is for the spectrum to say.
    ("pattern", "periodic"),
)


def method_for_label(label: str | None) -> str | None:
    """The analysis a label asks for ('periodic' = lines or holes), None when unknown."""
    if not label:
        return None
    key = re.sub(r"[^a-z]", "", label.lower())
    singular = key[:-1] if key.endswith("s") else key
    if key in _EXACT or singular in _EXACT:
        return _EXACT.get(key) or _EXACT[singular]
    for stem, method in _STEMS:
        if stem in key:
            return method
    return None


# ----------------------------------------------------------------------------- basics


def _flatten(img: np.ndarray) -> np.ndarray:
    """Remove a planar intensity gradient (charging, detector tilt) by least squares."""
    h, w = img.shape
    yy, xx = np.mgrid[0:h, 0:w]
    design = np.stack([np.ones(h * w), yy.ravel() / h, xx.ravel() / w], axis=1)
    coef, *_ = np.linalg.lstsq(design, img.ravel(), rcond=None)
    return img - (design[:, 1:] @ coef[1:]).reshape(h, w)


def _phase_levels(values: np.ndarray) -> tuple[float, float] | float:
    """Median of each side of an Otsu split, or the Otsu level when one side is empty."""
    from skimage.filters import threshold_otsu

    t = float(threshold_otsu(values))
    lo, hi = values[values <= t], values[values > t]
    if lo.size == 0 or hi.size == 0:
        return t
    return float(np.median(lo)), float(np.median(hi))


def _two_level_threshold(values: np.ndarray) -> float:
    """Midpoint of the two phases' medians: unlike Otsu, not pulled by a majority phase."""
    levels = _phase_levels(values)
    return levels if isinstance(levels, float) else 0.5 * (levels[0] + levels[1])


def _edge_threshold(sm: np.ndarray, bins: int = 24) -> float:
    """The gray level whose iso-contour runs along the steepest edges.

    A blurred step is steepest exactly at the drawn outline, wherever the object's plateau
    or bright SEM rim lies, so this threshold does not bias sizes the way a fixed midpoint
    does when edges are brightened. Searched between the two phases' medians.
    """
    levels = _phase_levels(sm)
    if isinstance(levels, float):
        return levels
    lo, hi = levels
    grad = ndi.gaussian_gradient_magnitude(sm, 1.0)
    inside = (sm > lo) & (sm < hi)
    idx = np.clip(((sm[inside] - lo) / (hi - lo) * bins).astype(int), 0, bins - 1)
    n = np.bincount(idx, minlength=bins)
    g = np.bincount(idx, grad[inside], minlength=bins) / np.maximum(n, 1)
    # A level needs a few pixels to be judged (a small frame has few edge pixels per bin).
    g = ndi.uniform_filter1d(np.where(n >= 5, g, 0.0), 3)
    if not g.any():
        return 0.5 * (lo + hi)
    return lo + (int(np.argmax(g)) + 0.5) / bins * (hi - lo)


def _snap_to_edges(sm: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """Move a thresholded outline onto the ridge of the gradient (marker watershed).

    A global gray level cannot sit at every edge: SEM edge brightening and thin objects
    change the local contrast. The steepest slope of a blurred edge is at the true edge
    whatever the contrast, so the outline is re-drawn there, seeded from the object cores
    (skeleton and interior) and from the background well away from any object.
    """
    from skimage.morphology import skeletonize
    from skimage.segmentation import watershed

    if not mask.any() or mask.all():
        return mask
    grad = ndi.gaussian_gradient_magnitude(sm, 0.7)
    inside = ndi.distance_transform_edt(mask)
    outside = ndi.distance_transform_edt(~mask)
    # Background seeds: far from any object, or on the middle line of a narrow gap (a
    # 3-px space of a fine grating has no pixel 3 px from both sides).
    markers = np.where((outside >= 3.0) | (skeletonize(~mask) & (outside >= 1.0)), 1, 0)
    markers[(inside >= 2.5) | skeletonize(mask)] = 2
    # Flood only the undecided band (plus the seeds touching it): on a sparse frame that is
    # a few percent of the pixels, and a whole-frame watershed costs seconds per megapixel.
    band = ndi.binary_dilation(markers == 0)
    flooded = watershed(grad, np.where(band, markers, 0), mask=band)
    return np.where(band, flooded == 2, markers == 2)


def _bright_mask(sm: np.ndarray, polarity: str, phases: bool = False) -> np.ndarray:
    """The object phase: thresholded, then outlines snapped onto the gradient ridges.

    With ``phases``, a frame split roughly evenly between two phases (a precipitate
    microstructure) is thresholded at Otsu's level instead of the steepest-edge level
    when the two disagree: there the steepest edges are often the bright rims along the
    boundaries (SEM edge brightening of the matrix channels), whose level lies inside one
    phase, while Otsu's level separates the two phases' bulk.
    """
    t = _edge_threshold(sm)
    if phases:
        from skimage.filters import threshold_otsu

        otsu = float(threshold_otsu(sm))
        f_otsu, f_edge = float((sm > otsu).mean()), float((sm > t).mean())
        if _PHASES_MIN <= f_otsu <= 1.0 - _PHASES_MIN and abs(f_edge - f_otsu) > _PHASES_SHIFT:
            t = otsu
    mask = sm > t if polarity == "bright" else sm < t
    return _snap_to_edges(sm, mask)


# Each phase holds at least this share of the frame for it to count as a two-phase split,
# and the steepest-edge level must move at least this share of the frame across to the
# other phase (it cuts through a phase's bulk) before Otsu's level replaces it; on
# particles with blurred edges the two levels classify nearly the same pixels and the
# edge level, unbiased by blur, is kept. Chosen on the Ni-superalloy and EMPS sets
# together (0.05 costs EMPS sizes, 0.2 misses the superalloy).
_PHASES_MIN = 0.3
_PHASES_SHIFT = 0.1


# |scale-normalised edge curvature| above which the outlines' bend decides the polarity.
# Round objects give 0.1-1.5 (either sign), straight lines and fibres ~0.01.
_CONVEXITY_MIN = 0.05


def edge_convexity(flat: np.ndarray) -> float:
    """Which phase the strong edges bend around: < 0 bright objects, > 0 dark objects.

    The level-set curvature div(grad I / |grad I|) at an edge is -1/r around a bright disc
    and +1/r around a dark one; averaged over the strongest 10% of edges and multiplied by
    the smoothing scale (sigma = 2, 4, 8 px, summed) it is a size-free vote. Particles are
    convex, and the gaps between densely packed particles are concave from the gap's side,
    so the vote is right where a phase-balance rule fails (particles covering 50-90% of a
    frame), and it needs no modality.
    """
    total = 0.0
    for sigma in (2.0, 4.0, 8.0):
        sm = ndi.gaussian_filter(flat, sigma)
        iy, ix = np.gradient(sm)
        iyy, iyx = np.gradient(iy)
        ixy, ixx = np.gradient(ix)
        g2 = ix * ix + iy * iy
        edge = g2 >= np.quantile(g2, 0.9)
        if not edge.any() or not g2[edge].any():
            continue
        num = (ixx * iy * iy - (ixy + iyx) * ix * iy + iyy * ix * ix)[edge]
        # sum(kappa |grad|) / sum(|grad|): the gradient-weighted mean curvature.
        total += sigma * float((num / np.maximum(g2[edge], 1e-18)).sum()) / float(np.sqrt(g2[edge]).sum())
    return total


def ridge_balance(sm: np.ndarray) -> float:
    """log(bright-ridge / dark-ridge response), Sato filter at 1-4 px: > 0 bright strands.

    For thin objects the edges' bend misleads: the gaps of a fibre mat are convex polygons
    bounded by straight fibres. A strand is a ridge of its own polarity, the gaps are not
    (they are wider than the strands or are not strands at all).
    """
    from skimage.filters import sato

    # The top 1%: sparse strands (a few % of the frame) still fill it, and a strand's
    # flanks, which answer as weak ridges of the other polarity, do not.
    bright = float(np.quantile(sato(sm, sigmas=(1.0, 2.0, 4.0), black_ridges=False), 0.99))
    dark = float(np.quantile(sato(sm, sigmas=(1.0, 2.0, 4.0), black_ridges=True), 0.99))
    return math.log(max(bright, 1e-12) / max(dark, 1e-12))


# |ridge_balance| above which it decides the polarity of strands.
_RIDGE_MIN = 0.05


def _strand_polarity(sm: np.ndarray, modality: str) -> str:
    """Bright or dark strands: by the ridge balance when clear, else by the phase balance."""
    balance = ridge_balance(sm)
    if abs(balance) >= _RIDGE_MIN:
        return "bright" if balance > 0 else "dark"
    return _polarity(sm, modality)


def _polarity(sm: np.ndarray, modality: str, convexity: float | None = None) -> str:
    """Bright or dark objects: by the edges' bend when clear, else by the phase balance.

    Objects are convex (``edge_convexity``); when the edges are straight (lines, cracks)
    the objects are taken as the minority phase and the modality decides only a near
    50/50 split. Strands (wires, fibres) are judged by ``_strand_polarity`` instead. TEM
    bright field shows particles dark on a bright film, SEM (SE) bright on a darker
    substrate, but a BSE image or an inverted export breaks that rule, so the image's own
    evidence comes first.
    """
    if convexity is not None and abs(convexity) >= _CONVEXITY_MIN:
        return "bright" if convexity < 0 else "dark"
    frac = float((sm > _two_level_threshold(sm)).mean())
    if 0.4 <= frac <= 0.6 and modality in ("SEM", "TEM", "STEM", "FIB-SEM"):
        # STEM reads like TEM (transmitted beam), FIB-SEM like SEM (scanned surface).
        return "dark" if modality in ("TEM", "STEM") else "bright"
    return "bright" if frac < 0.5 else "dark"


def _eq_diameter(area: np.ndarray | float) -> np.ndarray:
    return 2.0 * np.sqrt(np.asarray(area, dtype=float) / math.pi)


def _touching_border(labels: np.ndarray) -> set[int]:
    edge = np.concatenate([labels[0], labels[-1], labels[:, 0], labels[:, -1]])
    return set(int(v) for v in np.unique(edge) if v)


def _axial_stats(angles_deg: Iterable[float]) -> tuple[float | None, float | None]:
    """Mean and spread of axial angles (0 and 180 are the same direction), degrees."""
    a = np.radians(np.asarray(list(angles_deg), dtype=float)) * 2.0
    if a.size == 0:
        return None, None
    c, s = float(np.cos(a).mean()), float(np.sin(a).mean())
    r = min(math.hypot(c, s), 1.0)
    mean = math.degrees(math.atan2(s, c) / 2.0) % 180.0
    spread = math.degrees(math.sqrt(max(-2.0 * math.log(max(r, 1e-12)), 0.0)) / 2.0)
    return mean, spread


def _axis_angle(rows: np.ndarray, cols: np.ndarray) -> float:
    """Long-axis angle, degrees counter-clockwise from +x as seen on screen, [0, 180)."""
    cov = np.cov(np.stack([rows, cols]).astype(float))
    evals, evecs = np.linalg.eigh(cov)
    vr, vc = evecs[:, int(np.argmax(evals))]
    return math.degrees(math.atan2(-vr, vc)) % 180.0


def texture_contrast(img: np.ndarray) -> float:
    """GLCM contrast (32 gray levels, 1-px offsets along x and y): local roughness."""
    from skimage.feature import graycomatrix, graycoprops

    q = (img.astype(np.uint16) * 32 // 256).astype(np.uint8)
    glcm = graycomatrix(q, [1], [0.0, math.pi / 2], levels=32, symmetric=True, normed=True)
    return float(graycoprops(glcm, "contrast").mean())


# ----------------------------------------------------------------------------- spectrum


_SPECTRUM_SIDE = 1024  # periodicity is judged on at most this central window


@dataclass
class Periodicity:
    score: float  # peak power over the median power at the same spatial frequency
    pitch_px: float  # period of the fundamental
    normal_deg: float  # direction of the wave vector, screen convention
    directions: int  # distinct directions among the strong peaks (1: lines, >=2: array)


def periodicity(sm: np.ndarray, pad: int = 2) -> Periodicity:
    """Strongest spatial frequency of a Hann-windowed, zero-padded spectrum.

    Zero padding and a parabolic fit of the log power give the peak to a small fraction of
    a frequency bin, so the pitch is accurate to ~1% rather than to one bin (several %).
    """
    h, w = sm.shape
    from scipy.fft import next_fast_len

    if max(h, w) > _SPECTRUM_SIDE:
        # A central window holds dozens of periods already; the full frame would cost a
        # (2 x side)^2 transform for nothing.
        y0, x0 = max((h - _SPECTRUM_SIDE) // 2, 0), max((w - _SPECTRUM_SIDE) // 2, 0)
        sm = sm[y0 : y0 + _SPECTRUM_SIDE, x0 : x0 + _SPECTRUM_SIDE]
        h, w = sm.shape
    n = next_fast_len(max(h, w) * pad)
    win = np.outer(np.hanning(h), np.hanning(w))
    spec = np.abs(np.fft.fftshift(np.fft.fft2((sm - sm.mean()) * win, s=(n, n)))) ** 2
    c = n // 2
    fy, fx = np.mgrid[-c : n - c, -c : n - c] / n  # cycles per pixel
    radius = np.hypot(fy, fx)
    # Periods longer than a third of the frame are background, not a pattern.
    usable = (radius > 3.0 / min(h, w)) & (radius < 0.45)
    masked = np.where(usable, spec, 0.0)
    iy, ix = np.unravel_index(int(np.argmax(masked)), masked.shape)
    peak = float(masked[iy, ix])
    if peak <= 0:
        return Periodicity(0.0, float("nan"), 0.0, 0)

    def refine(iy: int, ix: int) -> tuple[float, float]:
        def vertex(a: float, b: float, c_: float) -> float:
            la, lb, lc = (math.log(max(v, 1e-30)) for v in (a, b, c_))
            den = la - 2 * lb + lc
            # The vertex of a parabola through a maximum lies within half a bin of it.
            return 0.0 if den >= 0 else float(np.clip(0.5 * (la - lc) / den, -0.5, 0.5))

        dy = vertex(spec[iy - 1, ix], spec[iy, ix], spec[iy + 1, ix])
        dx = vertex(spec[iy, ix - 1], spec[iy, ix], spec[iy, ix + 1])
        return (iy + dy - c) / n, (ix + dx - c) / n

    # Edge brightening makes the second harmonic strong: prefer a sub-harmonic that carries
    # real power, so a grating's pitch is not reported as half its value.
    f = refine(iy, ix)
    for k in (3, 2):
        sy, sx = c + (iy - c) / k, c + (ix - c) / k
        y0, x0 = int(round(sy)), int(round(sx))
        box = masked[max(y0 - 3, 0) : y0 + 4, max(x0 - 3, 0) : x0 + 4]
        if box.size and box.max() > 0.15 * peak:
            by, bx = np.unravel_index(int(np.argmax(box)), box.shape)
            f = refine(max(y0 - 3, 0) + by, max(x0 - 3, 0) + bx)
            break
    f_abs = math.hypot(*f)
    ring = (radius > 0) & (np.abs(radius - f_abs) < 2.0 / n)
    score = peak / (float(np.median(spec[ring])) + 1e-30) if ring.any() else 0.0
    # A grating's peak stands clear of its radial neighbours (beyond the window's main
    # lobe); the 1/f^2 tail of a single step edge or a ramp rises towards low frequency.
    uy, ux = f[0] / f_abs, f[1] / f_abs

    def power_at(r: float) -> float:
        ny, nx = int(round(c + r * uy * n)), int(round(c + r * ux * n))
        return float(spec[ny, nx]) if 0 <= ny < n and 0 <= nx < n else 0.0

    if max(power_at(f_abs - 6.0 / n), power_at(f_abs + 6.0 / n)) * 4.0 > power_at(f_abs):
        score = 0.0
    # Count directions among strong local maxima (half-plane: the spectrum is symmetric).
    strong = (masked == ndi.maximum_filter(masked, size=9)) & (masked > 0.1 * peak)
    ys, xs = np.nonzero(strong)
    angles = np.degrees(np.arctan2(-(ys - c), xs - c)) % 180.0
    dirs: list[float] = []
    for a in sorted(angles):
        if all(min(abs(a - d), 180 - abs(a - d)) > 8.0 for d in dirs):
            dirs.append(float(a))
    normal = math.degrees(math.atan2(-f[0], f[1])) % 180.0
    return Periodicity(score, 1.0 / f_abs, normal, len(dirs))


# ----------------------------------------------------------------------------- skeleton


def _neighbours(skel: np.ndarray) -> np.ndarray:
    k = np.ones((3, 3), int)
    k[1, 1] = 0
    return ndi.convolve(skel.astype(int), k, mode="constant") * skel


def _prune(skel: np.ndarray, max_len: int) -> np.ndarray:
    """Drop side branches shorter than ``max_len`` px (skeleton spurs from rough edges)."""
    skel = skel.copy()
    nb = _neighbours(skel)
    for y, x in zip(*np.nonzero(nb == 1)):
        path = [(y, x)]
        prev, cur = None, (y, x)
        while len(path) <= max_len:
            cy, cx = cur
            nxt = [
                (cy + dy, cx + dx)
                for dy in (-1, 0, 1)
                for dx in (-1, 0, 1)
                if (dy or dx)
                and 0 <= cy + dy < skel.shape[0]
                and 0 <= cx + dx < skel.shape[1]
                and skel[cy + dy, cx + dx]
                and (cy + dy, cx + dx) != prev
                and (cy + dy, cx + dx) not in path
            ]
            if len(nxt) != 1:
                break
            prev, cur = cur, nxt[0]
            if nb[cur] >= 3:  # reached a junction: this was a short side branch
                for p in path:
                    skel[p] = False
                break
            path.append(cur)
    return skel


def _skeleton_length(skel: np.ndarray) -> float:
    """Chain length with Kulpa's weights (orthogonal 0.948, diagonal 1.343 px).

    Diagonal links that close a corner with two orthogonal links are not counted twice.
    """
    s = skel.astype(bool)
    orth = int((s[:, :-1] & s[:, 1:]).sum() + (s[:-1] & s[1:]).sum())
    d1 = s[:-1, :-1] & s[1:, 1:] & ~s[:-1, 1:] & ~s[1:, :-1]
    d2 = s[:-1, 1:] & s[1:, :-1] & ~s[:-1, :-1] & ~s[1:, 1:]
    diag = int(d1.sum() + d2.sum())
    return 0.948 * orth + 1.343 * diag


@dataclass
class Strand:
    """One connected thin object (or a crossing of several), measured from its skeleton."""

    count: int
    width: float
    length: float
    angle: float | None
    simple: bool


def _strand(comp: np.ndarray, frame_edge: np.ndarray) -> Strand:
    """Measure one component (``comp``, a crop) whose pixels on the frame's edge are marked."""
    from skimage.morphology import skeletonize

    skel = skeletonize(comp)
    area = float(comp.sum())
    dt = ndi.distance_transform_edt(comp)
    rough_w = max(2.0 * float(np.median(dt[skel])) if skel.any() else 2.0, 2.0)
    skel = _prune(skel, max(3, int(round(rough_w))))
    ends = np.argwhere(_neighbours(skel) == 1)
    length = max(_skeleton_length(skel), 1.0)
    # Ends cut by the frame are flat; free ends are rounded: each adds a half-disk of
    # area pi w^2 / 8 beyond the skeleton, so area = w L + e pi w^2 / 8; solve for w.
    near_edge = ndi.binary_dilation(frame_edge, iterations=2)
    free = sum(1 for y, x in ends if not near_edge[y, x])
    a = math.pi / 8.0 * free
    width = area / length if a == 0 else (-length + math.sqrt(length**2 + 4 * a * area)) / (2 * a)
    # Every straight object has two ends, so a crossing of k objects has 2k.
    count = max(1, int(math.floor(len(ends) / 2.0 + 0.5)))
    rows, cols = np.nonzero(skel if skel.sum() >= 2 else comp)
    angle = _axis_angle(rows, cols) if rows.size >= 2 else None
    return Strand(count, width, length + free * width / 2.0, angle, len(ends) == 2)


# ----------------------------------------------------------------------------- methods


@dataclass
class Result:
    """What one analysis found, in pixels; turned into a Measurement by ``measure_array``."""

    method: str
    count: int
    size_px: float | None = None
    diameters_px: list[float] = field(default_factory=list)
    width_px: float | None = None
    length_px: float | None = None
    circularity: float | None = None
    aspect_ratio: float | None = None
    angles: list[float] = field(default_factory=list)
    area_fraction: float | None = None
    porosity: float | None = None
    pitch_px: float | None = None
    grain_size_px: float | None = None
    crack_fraction: float | None = None
    blob_aspect_ratio: float | None = None  # of connected blobs before splitting
    debris_count: int = 0  # objects below the main population's size floor, not counted
    compact_count: int = 0  # compact objects beside rods, not counted as rods
    # Area-weighted solidity of the objects not cut by the frame, and how many they are:
    # the vote between the two phases when the edges' bend does not decide the polarity.
    solidity: float | None = None
    inner_count: int = 0
    polarity: str | None = None  # the phase taken as objects, where a method chose one
    # The object phase as segmented (what area_fraction counts): the benchmarks score it
    # against hand masks; never written to a Measurement.
    mask: np.ndarray | None = field(default=None, repr=False)


def _weighted_median(values: np.ndarray, weights: np.ndarray) -> float:
    """The value below which half the total weight lies (0 for no values)."""
    if values.size == 0:
        return 0.0
    order = np.argsort(values)
    cum = np.cumsum(weights[order])
    return float(values[order][int(np.searchsorted(cum, 0.5 * cum[-1]))])


def _median(values: Iterable[float]) -> float | None:
    arr = np.asarray(list(values), dtype=float)
    return float(np.median(arr)) if arr.size else None


def _circularity(region: Any) -> float:
    """4 pi A / P^2 of a regionprops region, capped at 1 (digital perimeters run short)."""
    return min(4.0 * math.pi * region.area / max(region.perimeter, 1.0) ** 2, 1.0)


def _aspect(region: Any) -> float:
    return region.axis_major_length / max(region.axis_minor_length, 1.0)


def _clean(mask: np.ndarray, cfg: MeasureImagesConfig, excl: np.ndarray | None = None) -> np.ndarray:
    """Drop specks and fill pinholes below ``min_object_px``; drop what touches ``excl``."""
    from skimage.morphology import remove_small_holes, remove_small_objects

    mask = remove_small_objects(mask, max_size=cfg.min_object_px - 1)
    mask = remove_small_holes(mask, max_size=cfg.min_object_px - 1)
    return _drop_touching(mask, excl)


def _drop_touching(mask: np.ndarray, excl: np.ndarray | None) -> np.ndarray:
    """``mask`` without the components that touch ``excl`` (a burned-in overlay).

    An object under a scale bar or a panel letter has a hidden outline, so it is dropped
    like one cut by the frame would be; the overlay pixels themselves are never objects.
    """
    if excl is None or not excl.any():
        return mask
    near = ndi.binary_dilation(excl, iterations=2)
    labels, _ = ndi.label(mask, structure=np.ones((3, 3)))
    hit = np.unique(labels[near & mask])
    return mask & ~np.isin(labels, hit[hit > 0]) & ~excl


def _split(
    mask: np.ndarray,
    cfg: MeasureImagesConfig,
    fill: bool = False,
    depth: float | None = None,
    sigma: float = 0.7,
    open_mask: np.ndarray | None = None,
) -> np.ndarray:
    """Label ``mask`` with touching blobs split by a distance-transform watershed.

    Seeds are distance maxima that stand at least ``split_depth_px`` above the neck to any
    higher maximum (h-maxima): shallower dips are boundary noise, not contacts. Seeds
    closer than ``watershed_min_distance`` merge. ``fill`` lets regions grow over the
    pixels outside the mask too (grain boundaries go to the nearest grain). ``open_mask``
    (``mask`` with some holes left open) gives the distance map instead: the regions
    still cover all of ``mask``.
    """
    from skimage.morphology import disk
    from skimage.segmentation import watershed

    comps, _ = ndi.label(mask)
    dt = ndi.gaussian_filter(ndi.distance_transform_edt(mask if open_mask is None else open_mask), sigma)
    seeds = _domes(dt, cfg.split_depth_px if depth is None else depth)
    seeds = ndi.binary_dilation(seeds, disk(cfg.watershed_min_distance // 2)) & mask
    markers, _ = ndi.label(seeds)
    # Every component gets a seed, even one too flat for h-maxima.
    for lab in np.setdiff1d(np.unique(comps), np.unique(comps[markers > 0])):
        if lab:
            markers.flat[int(np.argmax(np.where(comps == lab, dt, -1)))] = markers.max() + 1
    return watershed(-dt, markers, mask=None if fill else mask)


# Smoothing of the distance map before splitting, as a fraction of the typical radius
# (chosen on EMPS crops and the synthetic particles together: 0.1 leaves textured 200-px
# spheres cut in pieces, 0.3 starts to merge touching synthetic particles).
_SPLIT_SMOOTH_REL = 0.2


def _fill_round_holes(mask: np.ndarray, solidity: float = 0.85) -> np.ndarray:
    """Fill the holes that are a particle's core, not the gaps of a packing.

    A bright SEM rim or a core-shell contrast encloses a round, convex core, while the
    background pockets between close-packed particles are bounded by several convex arcs
    and so are concave (solidity ~0.6-0.75); filling those would merge a whole packing
    into one object.
    """
    from skimage.measure import regionprops

    holes = ndi.binary_fill_holes(mask) & ~mask
    labels, n = ndi.label(holes)
    if n == 0:
        return mask
    out = mask.copy()
    for p in regionprops(labels):
        if p.area <= 16 or p.solidity >= solidity:
            sl = p.slice
            out[sl] |= labels[sl] == p.label
    return out


# A filled hole is a pocket between touching particles, not a pinhole in a textured
# particle, when its equivalent radius is at least this share of the typical particle
# radius (read with every hole filled): three touching discs enclose a pocket of 0.23 r,
# less once blurred (0.16-0.27 r in the EMPS sphere packing 80719af02f), while pinholes in
# rough SEM spheres measure 0.10 r or less (5a6c23682b, 032bd4a6b1). Lower: pinholes open
# and cut textured particles in pieces; higher: packings stay welded in clusters.
_POCKET_MIN_REL = 0.12

# A filled hole is a particle's core when the ring around it is thinner than this share
# of the hole's own diameter (a bright SEM rim, a core-shell contrast); pinholes inside a
# particle and the pockets between close-packed particles sit in objects several times
# their own size thick (ratio ~1 on the EMPS crops, cores below ~0.5).
_CORE_RIM_REL = 0.6


def _rimmed_cores(mask: np.ndarray, holes: np.ndarray) -> np.ndarray:
    """The ``holes`` of ``mask`` that are a particle's core inside a thin rim.

    The rim's thickness is read as the largest distance-to-background of the mask within
    one hole diameter of the hole: around a core in a rim of thickness t it is t / 2,
    around a pocket between touching particles (or a pinhole) it grows with the distance
    from the hole, to the band's width.
    """
    labels, n = ndi.label(holes)
    if n == 0:
        return holes
    index = np.arange(1, n + 1)
    width = np.maximum(3.0, 2.0 * np.sqrt(np.bincount(labels.ravel())[1:] / math.pi))
    dt = ndi.distance_transform_edt(mask)
    dist, (iy, ix) = ndi.distance_transform_edt(labels == 0, return_indices=True)
    near = labels[iy, ix]
    band = np.where(mask & (dist <= np.concatenate([[0.0], width])[near]), near, 0)
    rim = np.asarray(ndi.maximum(dt, band, index), float)
    return np.isin(labels, index[rim < _CORE_RIM_REL * width])


def _kept_filled(mask: np.ndarray, holes: np.ndarray, radius: float) -> np.ndarray:
    """The filled ``holes`` of ``mask`` that stay filled for the split: cores of rimmed
    particles and pinholes far smaller than a particle of typical ``radius``."""
    labels, n = ndi.label(holes)
    if n == 0:
        return holes
    small = np.sqrt(np.bincount(labels.ravel())[1:] / math.pi) < _POCKET_MIN_REL * radius
    return np.isin(labels, np.arange(1, n + 1)[small]) | _rimmed_cores(mask, holes)


def _domes(dt: np.ndarray, h: float) -> np.ndarray:
    """One seed plateau per maximum at least ``h`` above its saddle (h-dome tops).

    skimage's ``h_maxima`` marks every top within ``h`` of a dome's peak, so a flat-topped
    ridge (a rod's distance map, ragged by digitisation) gives many disjoint seeds; the
    regional maxima of the reconstruction of ``dt - h`` under ``dt`` are one per dome.
    """
    from skimage.morphology import local_maxima, reconstruction

    rec = reconstruction(dt - h, dt)
    return np.asarray(local_maxima(rec, connectivity=2, allow_borders=True), bool) & (dt > 0)


def _radius(mask: np.ndarray, cfg: MeasureImagesConfig) -> float:
    """Typical particle radius: the area-weighted median height of the distance maxima.

    Each particle, touching others or not, holds one maximum of the distance transform as
    high as its inscribed radius (the blob's single largest value would be the size of a
    whole close-packed cluster); low maxima from rough outlines weigh little.
    """
    if not mask.any():
        return 0.0
    dt = ndi.gaussian_filter(ndi.distance_transform_edt(mask), 0.7)
    peaks, n = ndi.label(_domes(dt, cfg.split_depth_px), structure=np.ones((3, 3)))
    if n == 0:
        return float(dt.max())
    heights = np.asarray(ndi.maximum(dt, peaks, range(1, n + 1)), float)
    return _weighted_median(heights, heights**2)


# How far a particle's outline may move out to the foot of its edge, as a fraction of its
# radius (at least 2 px): an edge blurred over a few pixels on a small particle, a wider
# one on a large particle seen at low magnification.
_OUTLINE_REACH_REL = 0.15


def _outer_outline(sm: np.ndarray, labels: np.ndarray, polarity: str, level: float, reach_rel: float) -> np.ndarray:
    """Grow each particle out to where its edge leaves the local background.

    The steepest-edge outline sits at the middle of a blurred edge; a microscopist's
    outline follows the visible foot of the edge (on the EMPS hand masks the drawn outline
    lies at 15-35% of the step above the background, median 28%). Each particle grows,
    1 px band by band within ``reach`` of its outline, while the band's mean stays above
    its own background plus ``level`` of its own step (dark particles: below); touching
    particles share the grown pixels by nearest distance. The background is the ring just beyond ``reach``,
    so a neighbour's halo does not count as the particle's own background; a particle
    with no such ring (close packing) takes the frame's background.
    """
    n = int(labels.max())
    if n == 0 or level >= 0.5 or (labels > 0).all():
        return labels
    s = sm if polarity == "bright" else -sm
    obj = labels > 0
    dist, (iy, ix) = ndi.distance_transform_edt(~obj, return_indices=True)
    nearest = labels[iy, ix]  # every pixel's closest particle

    def per_pixel(values: np.ndarray, none: float) -> np.ndarray:
        return np.concatenate([[none], values])[nearest]

    index = np.arange(1, n + 1)
    radius = np.sqrt(np.bincount(labels.ravel(), minlength=n + 1)[1:] / math.pi)
    per_label_reach = np.maximum(2.0, reach_rel * radius)
    reach = per_pixel(per_label_reach, 0.0)
    ring = np.where((dist > reach) & (dist <= 2.0 * reach + 2.0), nearest, 0)
    far = dist > reach
    bg_frame = float(np.median(s[far])) if far.any() else float(np.median(s[~obj]))
    bg = np.full(n, bg_frame)
    ringed = index[np.bincount(ring.ravel(), minlength=n + 1)[1:] >= 8]
    if ringed.size:
        bg[ringed - 1] = ndi.median(s, ring, ringed)
    # The top of the step is the particle's level or, where SEM edge brightening makes a
    # bright rim just inside the outline, the rim's: the blur spreads the rim outwards,
    # and measured from the core's level its spill would read as the particle.
    fg = np.asarray(ndi.median(s, labels, index), float)
    depth = ndi.distance_transform_edt(obj)
    for k in (1, 2, 3):
        band = np.where((depth > k - 1) & (depth <= k), labels, 0).ravel()
        cnt = np.bincount(band, minlength=n + 1)[1:]
        mean = np.bincount(band, s.ravel(), minlength=n + 1)[1:] / np.maximum(cnt, 1)
        fg = np.where(cnt > 0, np.maximum(fg, mean), fg)
    thr = bg + level * (fg - bg)
    # The foot is found on each particle's mean profile out from its outline, one value
    # per 1-px band (band k holds the pixels k-1 < d <= k outside, its centre at k - 0.5;
    # band 0 is the outline's inner pixels), not pixel by pixel: single noisy pixels
    # above the level would otherwise fringe every outline out to the reach. The outline
    # moves to where the profile crosses the level (linear between band centres): whole
    # bands inside it, and of the band it cuts, that share of its pixels, brightest first.
    kmax = int(math.ceil(float(per_label_reach.max())))
    bands = [np.where(obj & ~ndi.binary_erosion(obj), labels, 0).ravel()]
    bands += [np.where(~obj & (dist > k - 1) & (dist <= k), nearest, 0).ravel() for k in range(1, kmax + 1)]
    counts = np.stack([np.bincount(b, minlength=n + 1)[1:] for b in bands])
    means = np.stack([np.bincount(b, s.ravel(), minlength=n + 1)[1:] for b in bands])
    means = means / np.maximum(counts, 1)
    foot = np.zeros(n)  # outward distance of the new outline from the old
    going = fg > bg  # a particle whose step has the wrong sign is left as it is
    for k in range(1, kmax + 1):
        here = going & (counts[k] > 0)
        cross = here & (means[k] <= thr)
        slope = np.maximum(means[k - 1] - means[k], 1e-12)
        at = (k - 1.5) + (means[k - 1] - thr) / slope
        foot = np.where(cross, np.clip(at, 0.0, None), foot)
        foot = np.where(here & ~cross, k - 0.5, foot)
        going = here & ~cross & (k + 1 <= per_label_reach)
    foot = np.minimum(foot, per_label_reach)
    take = obj.copy()
    full = np.floor(foot)
    flat_lab = nearest.ravel()
    for k in range(1, kmax + 1):
        b = bands[k]
        take.ravel()[(b > 0) & (full[np.maximum(b, 1) - 1] >= k)] = True
        share = np.where(full + 1 == k, foot - full, 0.0)
        idx = np.flatnonzero((b > 0) & (share[np.maximum(b, 1) - 1] > 0))
        if idx.size:
            lab = flat_lab[idx]
            order = np.lexsort((-s.ravel()[idx], lab))
            idx, lab = idx[order], lab[order]
            rank = np.arange(idx.size) - np.searchsorted(lab, lab, side="left")
            take.ravel()[idx[rank < np.round(share[lab - 1] * counts[k][lab - 1])]] = True
    out = np.where(take, nearest, 0)
    return out.astype(labels.dtype)


def _particles(
    sm: np.ndarray,
    polarity: str,
    cfg: MeasureImagesConfig,
    excl: np.ndarray | None = None,
    split_rel: float | None = None,
    raw: np.ndarray | None = None,
    foot: bool = True,
) -> Result:
    """Threshold, snap to edges, split touching particles (distance watershed), then (with
    ``foot``) move each outline out to the foot of its edge, read on ``raw`` (the
    unsmoothed frame)."""
    from skimage.measure import regionprops

    open_mask = _clean(_bright_mask(sm, polarity, phases=True), cfg)
    mask = _fill_round_holes(open_mask)
    # The split reads the distance map with the pockets between close-packed particles
    # open again: small convex pockets pass the fill test, and filled they weld each
    # triangle or hexagon of spheres into one blob with a single distance maximum. Open,
    # each sphere keeps its own maximum; the watershed still hands the pocket's pixels to
    # the particles around it. Cores of rimmed particles and pinholes stay filled.
    open_mask |= _kept_filled(open_mask, mask & ~open_mask, _radius(mask, cfg))
    # Elongation is judged on the unsplit blobs: the watershed chops a rod into beads.
    blob_labels, n_blobs = ndi.label(mask)
    blobs = regionprops(blob_labels)
    blob_aspect = _median(_aspect(p) for p in blobs)
    # A contact between two particles of radius r is a neck far shallower than r, while a
    # rough outline dips by a fixed fraction of r: the split depth scales with the typical
    # radius, so a 200-px sphere with a textured rim is not cut into dozens of pieces.
    # The distance map is smoothed on the same scale: a textured outline's bumps then
    # leave no maxima of their own.
    radius = _radius(open_mask, cfg)
    labels = _split(
        mask,
        cfg,
        depth=max(cfg.split_depth_px, (split_rel or cfg.split_depth_rel) * radius),
        sigma=max(0.7, _SPLIT_SMOOTH_REL * radius),
        open_mask=open_mask,
    )
    if excl is not None and excl.any():
        # Split first, then drop: one particle under a scale bar must not take its
        # touching neighbours with it.
        near = ndi.binary_dilation(excl, iterations=2)
        labels[np.isin(labels, np.unique(labels[near]))] = 0
    props = [p for p in regionprops(labels) if p.area >= cfg.min_object_px]
    # The main population: carbon-film speckle, debris and satellites are many but small,
    # the particles carry most of the area, so the floor is relative to the area-weighted
    # median diameter rather than a pixel count that cannot fit every magnification.
    all_diam = np.asarray([float(_eq_diameter(p.area)) for p in props])
    debris = 0
    if all_diam.size:
        floor = cfg.debris_rel_size * _weighted_median(all_diam, all_diam**2)
        keep = all_diam >= floor
        keep |= _small_particles(sm, labels, polarity, props, all_diam, keep, floor, cfg.debris_contrast_rel)
        debris = int((~keep).sum())
        labels[np.isin(labels, [p.label for p, k in zip(props, keep) if not k])] = 0
        props = [p for p, k in zip(props, keep) if k]
    if foot and cfg.outline_level < 0.5:
        # The foot is read on the unsmoothed frame: the measurement's own smoothing would
        # widen every edge (the band means already average the noise out).
        labels = _outer_outline(sm if raw is None else raw, labels, polarity, cfg.outline_level, _OUTLINE_REACH_REL)
        props = [p for p in regionprops(labels) if p.area >= cfg.min_object_px]
    mask = labels > 0
    border = _touching_border(labels)
    whole = [p for p in props if p.label not in border]
    inner = whole or props
    diam = [float(_eq_diameter(p.area)) for p in inner]
    area = sum(p.area for p in whole)
    angles = [_axis_angle(*p.coords.T) for p in inner if p.area >= 2]
    return Result(
        "particles",
        len(props),
        size_px=_median(diam),
        diameters_px=diam,
        circularity=_median(_circularity(p) for p in inner),
        aspect_ratio=_median(_aspect(p) for p in inner),
        angles=angles,
        area_fraction=float(mask.mean()),
        blob_aspect_ratio=blob_aspect,
        mask=mask,
        debris_count=debris,
        solidity=sum(p.area * p.solidity for p in whole) / area if area else None,
        inner_count=len(whole),
        polarity=polarity,
    )


# A small object needs at least this share of the debris floor's diameter to be kept for
# its contrast: below it, bright specks of a rough surface or a textured particle's
# highlights (as contrasted as the particles, but a few pixels wide) would count.
_SMALL_MIN_REL = 0.5


def _small_particles(
    sm: np.ndarray,
    labels: np.ndarray,
    polarity: str,
    props: list[Any],
    diam: np.ndarray,
    keep: np.ndarray,
    floor: float,
    contrast_rel: float,
) -> np.ndarray:
    """Which objects under the debris floor are small particles rather than speckle.

    Speckle of a carbon film and debris are faint; a small particle of the sample's own
    material stands out from the background about as far as the large ones do (a
    polydisperse powder, satellites of the same phase). Contrast is the object's mean
    step above the background, read on the smoothed frame (the median of the pixels
    beyond every object's 3-px surround).
    """
    small = ~keep & (diam >= _SMALL_MIN_REL * floor)
    if not small.any() or not keep.any():
        return np.zeros_like(keep)
    s = sm if polarity == "bright" else -sm
    beyond = ~ndi.binary_dilation(labels > 0, iterations=3)
    if not beyond.any():
        return np.zeros_like(keep)
    step = np.asarray(ndi.mean(s, labels, [p.label for p in props]), float) - float(np.median(s[beyond]))
    main = float(np.median(step[keep]))
    return small & (main > 0) & (step >= contrast_rel * main)


# A phase needs this many whole objects (not cut by the frame) to take part in the vote:
# the background of a sparse frame is one frame-filling blob, convex but no particle.
_MIN_VOTERS = 3


def _convex_phase(
    sm: np.ndarray,
    modality: str,
    convexity: float,
    cfg: MeasureImagesConfig,
    excl: np.ndarray | None,
    raw: np.ndarray | None = None,
) -> Result:
    """Particles of whichever phase segments into the more convex whole objects.

    Particles are convex, while the other phase is a connected matrix, concave pockets
    between close-packed particles, or fragments of texture; the vote needs no modality.
    It outvotes the edges' bend (``edge_convexity``), which SEM spheres with bright rims
    mislead: the rim's inner edge bends around the darker core. With too few whole
    objects on both sides the bend and the phase balance decide (``_polarity``). On the
    36 EMPS crops the vote agreed with the bend wherever the bend was strong (|bend| >=
    0.5) and corrected it on close-packed rimmed spheres.
    """
    tries = {pol: _particles(sm, pol, cfg, excl, raw=raw) for pol in ("bright", "dark")}
    votes = {
        pol: res.solidity for pol, res in tries.items() if res.solidity is not None and res.inner_count >= _MIN_VOTERS
    }
    if not votes:
        return tries[_polarity(sm, modality, convexity)]
    return tries[max(votes, key=lambda pol: votes[pol])]


def _rods(sm: np.ndarray, polarity: str, cfg: MeasureImagesConfig, excl: np.ndarray | None = None) -> Result:
    """Short straight objects (nanorods, aspect 2.5-8): segmented and split like particles,
    each measured along its own axes.

    A skeleton is the wrong tool for a rod only a few widths long: its spurs and rounded
    ends are a large part of it, and speckle becomes "wires". Width and length are the
    object's extents across and along its principal axis (exact for a straight rod or
    capsule at any angle); the median size is the width, as for every elongated class.
    """
    from skimage.measure import regionprops

    # A rod's distance map is a long, nearly flat ridge whose noise makes many shallow
    # maxima: only a neck half the rod's radius deep (two rods meeting) splits it.
    # Rods and wires keep the edge's middle: a pixel more on each side of a 5-px wire
    # halves its aspect ratio's margin, and wires then read as compact blobs (on the
    # DeepSEM tiles the count fell from 60 to 38 per tile, Pearson 0.95 -> 0.89).
    res = _particles(sm, polarity, cfg, excl, split_rel=_ROD_SPLIT_REL, foot=False)
    labels, _ = ndi.label(res.mask)
    # Compact or irregular objects beside the rods (spheres, seeds, parasitic crystallites)
    # are a different population: counted apart, not as rods.
    compact = [p.label for p in regionprops(labels) if not _is_rod(p)]
    labels[np.isin(labels, compact)] = 0
    widths, lengths, aspects, angles, diam = [], [], [], [], []
    border = _touching_border(labels)
    for i, sl in zip(range(1, int(labels.max()) + 1), ndi.find_objects(labels)):
        if sl is None or i in border:
            continue
        rows, cols = np.nonzero(labels[sl] == i)
        if rows.size < cfg.min_object_px:
            continue
        diam.append(float(_eq_diameter(rows.size)))
        angle = _axis_angle(rows, cols)
        t = math.radians(angle)
        # Screen convention: y is down, so the axis (cos t, -sin t) in (x, y).
        along = cols * math.cos(t) - rows * math.sin(t)
        across = cols * math.sin(t) + rows * math.cos(t)
        length = float(along.max() - along.min()) + 1.0
        width = float(across.max() - across.min()) + 1.0
        widths.append(width)
        lengths.append(length)
        aspects.append(length / max(width, 1.0))
        angles.append(angle)
    res.method = "rods"
    res.count = int(len(np.unique(labels)) - 1)
    res.compact_count = len(compact)
    res.diameters_px = diam
    res.mask = labels > 0
    res.area_fraction = float(res.mask.mean())
    res.width_px = _median(widths)
    res.size_px = res.width_px
    res.length_px = _median(lengths)
    res.aspect_ratio = _median(aspects)
    res.angles = angles
    return res


def _are_rods(res: Result, cfg: MeasureImagesConfig, min_share: float = 0.3) -> bool:
    """Long objects that are rods, not wires: separate, straight, convex and short.

    Wires and fibres cross, bend and leave the frame, so their blobs are concave; a rod
    is its own convex hull and only a few widths long.
    """
    from skimage.measure import regionprops

    if res.mask is None or not res.mask.any():
        return False
    props = [p for p in regionprops(ndi.label(res.mask)[0]) if p.area >= cfg.min_object_px]
    rods = [p for p in props if _is_rod(p)]
    # Unlabelled, rods must be a real share of the objects (not a few stray elongated
    # specks); when the label says wires, any short convex ones decide it, since compact
    # crystallites are not wires either (a low-yield growth has few rods, many blobs).
    if not rods or len(rods) < min_share * len(props):
        return False
    return (_median(_aspect(p) for p in rods) or 0.0) <= cfg.rod_max_aspect


def _is_rod(region: Any) -> bool:
    """Long enough to be a rod and convex like one (not a crossing, a bend or a clump)."""
    return _aspect(region) >= _ROD_MIN_ASPECT and region.solidity >= _ROD_SOLIDITY


# A rod's blob fills its convex hull (a capsule: 1.0; a noisy or faceted one 0.8-0.9); a
# crossing or a bent wire does not.
_ROD_SOLIDITY = 0.8
_ROD_SPLIT_REL = 0.5

# An object at least 2.5 times as long as wide is a rod; below that it is compact (a
# faceted crystallite or a rough sphere reaches aspect 2 by its outline alone).
_ROD_MIN_ASPECT = 2.5


def _strands(mask: np.ndarray, method: str) -> Result:
    """Count, width, length and orientation of thin objects from per-component skeletons."""
    labels, n = ndi.label(mask, structure=np.ones((3, 3)))
    edge = np.ones(mask.shape, bool)
    edge[1:-1, 1:-1] = False
    strands = []
    for i, sl in zip(range(1, n + 1), ndi.find_objects(labels)):
        # A crop with a 2-px margin: the skeleton sees background around the object.
        box = tuple(slice(max(s.start - 2, 0), min(s.stop + 2, dim)) for s, dim in zip(sl, mask.shape))
        strands.append(_strand(labels[box] == i, edge[box]))
    simple = [s for s in strands if s.simple] or strands
    # A crossing of k objects has one (shared) width: it counts k times in the median.
    width = _median(s.width for s in strands for _ in range(s.count))
    return Result(
        method,
        sum(s.count for s in strands),
        size_px=width,
        width_px=width,
        length_px=_median(s.length / s.count for s in simple),
        aspect_ratio=_median(s.length / max(s.width, 1.0) for s in simple),
        angles=[s.angle for s in simple if s.angle is not None],
        area_fraction=float(mask.mean()),
        mask=mask,
    )


def _elongated(sm: np.ndarray, polarity: str, cfg: MeasureImagesConfig, excl: np.ndarray | None = None) -> Result:
    return _strands(_clean(_bright_mask(sm, polarity), cfg, excl), "elongated")


def _dark_lines(sm: np.ndarray, cfg: MeasureImagesConfig, rare: bool, excl: np.ndarray | None = None) -> np.ndarray:
    """Thin dark lines (cracks, grain boundaries) by a Sato ridge filter.

    A ridge filter answers to the line's cross-profile, not to the step between a dark
    and a bright grain, which a morphological top-hat mistakes for a boundary.
    """
    from skimage.filters import sato

    sigmas = (1.0, max(cfg.dark_line_max_width_px / 2.0, 1.0))
    ridge = sato(sm, sigmas=sigmas, black_ridges=True)
    t = _two_level_threshold(ridge)
    if rare:
        # Cracks cover 1-5% of a frame, where Otsu can split the film texture instead; a
        # floor well above the texture's own spread (median + 5 robust sigmas) prevents it.
        med = float(np.median(ridge))
        t = max(t, med + 5.0 * 1.4826 * float(np.median(np.abs(ridge - med))))
    return _clean(ridge > t, cfg, excl)


# A crack's bounding box spans at least this share of the frame's shorter side.
_CRACK_MIN_FRAME_SHARE = 0.1


def _cracks(sm: np.ndarray, cfg: MeasureImagesConfig, excl: np.ndarray | None = None) -> Result:

    # The ridge mask finds the cracks; their outline (hence width) comes from the edges.
    mask = _clean(_snap_to_edges(sm, _dark_lines(sm, cfg, rare=True, excl=excl)), cfg, excl)
    # A crack is long: short dark specks of film texture, pores, and the dark arcs that
    # SEM shading draws beside bright particles are not cracks. The floor is relative to
    # the frame too (a crack that matters crosses a good part of the field of view), since
    # at high magnification every arc and pore is many line widths long.
    labels, n = ndi.label(mask, structure=np.ones((3, 3)))
    min_extent = max(4 * cfg.dark_line_max_width_px, int(_CRACK_MIN_FRAME_SHARE * min(mask.shape)))
    for i, sl in zip(range(1, n + 1), ndi.find_objects(labels)):
        if max(sl[0].stop - sl[0].start, sl[1].stop - sl[1].start) < min_extent:
            mask[sl][labels[sl] == i] = False
    res = _strands(mask, "cracks")
    # Crack networks are counted as connected networks, not by their ends.
    res.count = int(ndi.label(mask, structure=np.ones((3, 3)))[1])
    res.crack_fraction = float(mask.mean())
    return res


def _grains(sm: np.ndarray, cfg: MeasureImagesConfig, excl: np.ndarray | None = None) -> Result:
    """Grains = regions enclosed by dark boundaries; a gap in a boundary is a neck, so the
    distance watershed that splits touching particles also closes it."""
    from skimage.measure import regionprops
    from skimage.morphology import remove_small_holes

    boundary = _dark_lines(sm, cfg, rare=False)
    # Noise specks inside a grain are not grains: fill holes up to a few boundary widths.
    inner = remove_small_holes(~boundary, max_size=16 * cfg.dark_line_max_width_px**2)
    labels = _split(inner, cfg, fill=True)
    border = _touching_border(labels)
    if excl is not None and excl.any():
        border |= set(int(v) for v in np.unique(labels[ndi.binary_dilation(excl, iterations=2)]))
    props = [p for p in regionprops(labels) if p.label not in border and p.area >= cfg.min_object_px]
    diam = [float(_eq_diameter(p.area)) for p in props]
    return Result(
        "grains",
        len(props),
        size_px=_median(diam),
        diameters_px=diam,
        grain_size_px=_median(diam),
        circularity=_median(_circularity(p) for p in props),
        aspect_ratio=_median(_aspect(p) for p in props),
        area_fraction=float(boundary.mean()),
        mask=boundary,
    )


def _dark_blobs(
    sm: np.ndarray, cfg: MeasureImagesConfig, method: str, excl: np.ndarray | None = None
) -> tuple[Result, np.ndarray]:
    """Dark phase (holes, pores): count and size the ones not cut by the frame."""
    from skimage.measure import regionprops

    mask = _clean(_bright_mask(sm, "dark"), cfg, excl)
    labels, _ = ndi.label(mask)
    border = _touching_border(labels)
    props = [p for p in regionprops(labels) if p.label not in border]
    diam = [float(_eq_diameter(p.area)) for p in props]
    centres = np.array([p.centroid for p in props]).reshape(-1, 2)
    res = Result(
        method,
        len(props),
        size_px=_median(diam),
        diameters_px=diam,
        circularity=_median(_circularity(p) for p in props),
        area_fraction=float(mask.mean()),
        porosity=float(mask.mean()),
        mask=mask,
    )
    return res, centres


def _holes(sm: np.ndarray, cfg: MeasureImagesConfig, excl: np.ndarray | None = None) -> Result:
    res, centres = _dark_blobs(sm, cfg, "periodic_holes", excl)
    # Pitch as the median nearest-neighbour centre distance: right for square and
    # hexagonal arrays alike (a spectrum peak of a hexagonal lattice is at 2/(sqrt3 a)).
    if len(centres) >= 3:
        dist, _ = cKDTree(centres).query(centres, k=2)
        res.pitch_px = float(np.median(dist[:, 1]))
    res.porosity = None
    return res


def _lines(sm: np.ndarray, cfg: MeasureImagesConfig, per: Periodicity, excl: np.ndarray | None = None) -> Result:
    """Line/space grating: pitch from the spectrum, width = duty cycle x pitch."""
    mask = _clean(_bright_mask(sm, "bright"), cfg, excl)
    labels, n = ndi.label(mask)
    along = math.radians(per.normal_deg + 90.0)
    extents = []
    for i, sl in zip(range(1, n + 1), ndi.find_objects(labels)):
        rows, cols = np.nonzero(labels[sl] == i)
        proj = (cols + sl[1].start) * math.cos(along) - (rows + sl[0].start) * math.sin(along)
        extents.append(float(proj.max() - proj.min()) + 1.0)
    # A line counts when its visible area is at least half the fullest one's: a sliver cut
    # by the frame (along or across) is not a line.
    areas = np.asarray(ndi.sum_labels(mask, labels, range(1, n + 1)), dtype=float)
    ext = np.asarray(extents)
    lines = ext[areas >= 0.5 * areas.max()] if ext.size else ext
    duty = float(mask.mean())
    width = duty * per.pitch_px
    angle = (per.normal_deg + 90.0) % 180.0
    return Result(
        "periodic_lines",
        int(lines.size),
        size_px=width,
        width_px=width,
        length_px=_median(lines),
        aspect_ratio=_median(lines / max(width, 1.0)),
        angles=[angle] * int(lines.size),
        area_fraction=duty,
        pitch_px=per.pitch_px,
        mask=mask,
    )


def _porous(sm: np.ndarray, cfg: MeasureImagesConfig, excl: np.ndarray | None = None) -> Result:
    return _dark_blobs(sm, cfg, "porous", excl)[0]


# ----------------------------------------------------------------------------- entry


def _structure(img: np.ndarray) -> float:
    """Lag-1 autocorrelation (the larger of x and y): ~0 for white noise, >0.3 for images.

    Any real structure (and any microscope's point-spread function) correlates neighbouring
    pixels; shot noise alone does not. Unlike a smoothing test, this keeps fine gratings.
    """

    def corr(a: np.ndarray, b: np.ndarray) -> float:
        a, b = a - a.mean(), b - b.mean()
        den = math.sqrt(float((a * a).sum()) * float((b * b).sum()))
        return 0.0 if den == 0 else float((a * b).sum()) / den

    return max(corr(img[:, :-1], img[:, 1:]), corr(img[:-1], img[1:]))


def measure_array(
    image: np.ndarray,
    cfg: MeasureImagesConfig,
    *,
    image_id: str = "",
    label: str | None = None,
    modality: str = "unknown",
    pixel_size_nm: float | None = None,
    overlays: Iterable[tuple[int, int, int, int]] = (),
) -> Measurement:
    """Measure one 8-bit grayscale frame (databar removed); never raises on odd content.

    ``overlays`` are (left, top, right, bottom) boxes of burned-in scale bars and labels:
    their pixels are not specimen, and an object touching one is dropped (its true outline
    is hidden, like an object cut by the frame).
    """
    return analyse_array(
        image,
        cfg,
        image_id=image_id,
        label=label,
        modality=modality,
        pixel_size_nm=pixel_size_nm,
        overlays=overlays,
    )[0]


def _overlay_mask(shape: tuple[int, ...], overlays: Iterable[tuple[int, int, int, int]]) -> np.ndarray:
    """Boolean mask of the overlay boxes (right and bottom exclusive), clipped to the frame."""
    excl = np.zeros(shape[:2], bool)
    h, w = shape[:2]
    for left, top, right, bottom in overlays:
        l_, r_ = max(int(left), 0), min(int(right), w)
        t_, b_ = max(int(top), 0), min(int(bottom), h)
        if r_ > l_ and b_ > t_:
            excl[t_:b_, l_:r_] = True
    return excl


def analyse_array(
    image: np.ndarray,
    cfg: MeasureImagesConfig,
    *,
    image_id: str = "",
    label: str | None = None,
    modality: str = "unknown",
    pixel_size_nm: float | None = None,
    overlays: Iterable[tuple[int, int, int, int]] = (),
) -> tuple[Measurement, np.ndarray]:
    """``measure_array`` plus the segmented object phase (a boolean frame-sized mask)."""
    img = np.asarray(image, dtype=np.float64) / 255.0
    excl = _overlay_mask(img.shape, overlays)
    if excl.any() and not excl.all():
        # Overlay pixels take the value of the nearest specimen pixel, so a white bar or
        # letter sways neither the thresholds nor the polarity; objects touching an
        # overlay are dropped by each method.
        _, (iy, ix) = ndi.distance_transform_edt(excl, return_indices=True)
        img = img[iy, ix]
    texture = texture_contrast(np.asarray(np.round(img * 255), dtype=np.uint8))
    base: dict[str, Any] = {"id": image_id, "pixel_size_nm": pixel_size_nm}
    empty = np.zeros(img.shape, bool)
    if excl.all():
        return Measurement(
            **base,
            method="none",
            object_count=0,
            texture_contrast=texture,
            notes=["the whole frame is a burned-in overlay: nothing to measure"],
        ), empty
    if min(img.shape) < 16 or img.std() * 255 < 1.0 or _structure(img) < cfg.min_structure:
        return Measurement(
            **base,
            method="none",
            object_count=0,
            texture_contrast=texture,
            notes=["no structure above the noise: nothing to measure"],
        ), empty
    excl_or_none = excl if excl.any() else None
    flat = _flatten(img)
    sm = ndi.gaussian_filter(flat, cfg.smooth_sigma)
    method = method_for_label(label)
    notes: list[str] = []
    per: Periodicity | None = None
    if method in (None, "periodic", "periodic_lines"):
        per = periodicity(sm)
    if method in (None, "periodic"):
        if per is not None and per.score >= cfg.periodic_score and np.isfinite(per.pitch_px):
            method = "periodic_lines" if per.directions == 1 else "periodic_holes"
            notes.append(f"periodic pattern detected (peak/ring power {per.score:.0f})")
        elif method == "periodic":
            method = "periodic_holes"
            notes.append("label says patterned but no clear period: measured as holes")
        else:
            method = "particles"
            notes.append("no label: measured as particles")
    if method == "periodic_lines" and not (per is not None and np.isfinite(per.pitch_px)):
        method = "particles"
        notes.append("label says lines but no period was found: measured as particles")
    if method == "particles":
        # Only particles need the (costlier) phase vote; the other methods fix their phase.
        res = _convex_phase(sm, modality, edge_convexity(flat), cfg, excl_or_none, flat)
        polarity = res.polarity or "bright"
        if label is None and (res.blob_aspect_ratio or 0) >= cfg.elongated_aspect:
            if _are_rods(res, cfg):
                res = _rods(sm, polarity, cfg, excl_or_none)
                notes.append("objects are short straight rods: measured as rods")
            else:
                res = _elongated(sm, _strand_polarity(sm, modality), cfg, excl_or_none)
                notes.append("objects are long: measured as elongated")
    elif method == "rods":
        res = _rods(sm, _polarity(sm, modality, edge_convexity(flat)), cfg, excl_or_none)
    elif method == "elongated":
        strand_polarity = _strand_polarity(sm, modality)
        # "Wires" seen tilted or short are rods: a skeleton would count every parasitic
        # crystallite beside them as a wire, and the rods' ends as crossings.
        blobs = _particles(sm, strand_polarity, cfg, excl_or_none, split_rel=_ROD_SPLIT_REL, foot=False)
        if _are_rods(blobs, cfg, min_share=0.0):
            res = _rods(sm, strand_polarity, cfg, excl_or_none)
            notes.append("the wires are short straight rods: measured as rods")
        else:
            res = _elongated(sm, strand_polarity, cfg, excl_or_none)
    elif method == "periodic_lines" and per is not None and np.isfinite(per.pitch_px):
        res = _lines(sm, cfg, per, excl_or_none)
    elif method == "periodic_holes":
        res = _holes(sm, cfg, excl_or_none)
    elif method == "porous":
        res = _porous(sm, cfg, excl_or_none)
    elif method == "cracks":
        res = _cracks(sm, cfg, excl_or_none)
    else:
        res = _grains(sm, cfg, excl_or_none)
    phase = empty if res.mask is None else res.mask & ~excl
    if excl_or_none is not None and res.area_fraction is not None and res.mask is not None:
        # Fractions are of the specimen: overlay pixels are neither phase.
        res.area_fraction = float(phase[~excl].mean())
        if res.porosity is not None:
            res.porosity = res.area_fraction
        if res.crack_fraction is not None:
            res.crack_fraction = res.area_fraction
    if res.debris_count:
        notes.append(
            f"{res.debris_count} small faint objects (speckle, debris) below"
            f" {cfg.debris_rel_size:g} x the main population's diameter and"
            f" {cfg.debris_contrast_rel:g} x its contrast not counted"
        )
    if res.compact_count:
        notes.append(f"{res.compact_count} compact or irregular objects beside the rods not counted as rods")
    if res.count == 0:
        notes.append("no objects found")
    orient, spread = _axial_stats(res.angles)

    def px(v: float | None) -> float | None:
        return None if v is None else round(v, 3)

    def nm(v: float | None) -> float | None:
        return None if v is None or pixel_size_nm is None else round(v * pixel_size_nm, 3)

    return Measurement(
        **base,
        method=res.method,
        object_count=res.count,
        eq_diameter_px=[round(d, 3) for d in res.diameters_px],
        eq_diameter_nm=(None if pixel_size_nm is None else [round(d * pixel_size_nm, 3) for d in res.diameters_px]),
        median_size_px=px(res.size_px),
        median_size_nm=nm(res.size_px),
        width_px=px(res.width_px),
        width_nm=nm(res.width_px),
        length_px=px(res.length_px),
        length_nm=nm(res.length_px),
        circularity=px(res.circularity),
        aspect_ratio=px(res.aspect_ratio),
        orientation_deg=px(orient),
        orientation_spread_deg=px(spread),
        area_fraction=None if res.area_fraction is None else round(res.area_fraction, 5),
        porosity=None if res.porosity is None else round(res.porosity, 5),
        pitch_px=px(res.pitch_px),
        pitch_nm=nm(res.pitch_px),
        grain_size_px=px(res.grain_size_px),
        grain_size_nm=nm(res.grain_size_px),
        crack_fraction=None if res.crack_fraction is None else round(res.crack_fraction, 5),
        texture_contrast=round(texture, 4),
        notes=notes,
    ), phase


# ----------------------------------------------------------------------------- scoring


def _rel_error(measured: float | None, truth: float | None) -> float | None:
    if measured is None or truth is None or truth == 0:
        return None
    return abs(measured - truth) / abs(truth)


def score(pairs: Iterable[tuple[GroundTruth, Measurement]]) -> dict[str, Any]:
    """Per ground-truth class: median relative count / size / pitch error and n.

    Sizes are compared in nm; a measurement without a pixel size is converted with the
    ground truth's, so scoring also works on images whose scale was not recovered.
    """
    rows: dict[str, dict[str, list[float]]] = {}
    for gt, m in pairs:
        row = rows.setdefault(gt.label, {"count": [], "size": [], "pitch": [], "n": []})
        row["n"].append(1.0)
        scale = m.pixel_size_nm or gt.pixel_size_nm
        err = _rel_error(float(m.object_count), float(gt.object_count))
        row["count"].append(1.0 if err is None and m.object_count else (err or 0.0))
        size = None if m.median_size_px is None else m.median_size_px * scale
        truth_size = float(np.median(gt.sizes_nm)) if gt.sizes_nm else None
        if (e := _rel_error(size, truth_size)) is not None:
            row["size"].append(e)
        pitch = None if m.pitch_px is None else m.pitch_px * scale
        if gt.pitch_nm is not None:
            e = _rel_error(pitch, gt.pitch_nm)
            row["pitch"].append(1.0 if e is None else e)
    out: dict[str, Any] = {}
    for label in sorted(rows):
        r = rows[label]
        out[label] = {
            "n": len(r["n"]),
            "median_count_error": _round(_median(r["count"])),
            "median_size_error": _round(_median(r["size"])),
            "median_pitch_error": _round(_median(r["pitch"])),
        }
    return out


def targets_met(per_class: dict[str, Any]) -> dict[str, bool]:
    """Acceptance: median count and size error <= TARGET_ERROR for the target classes."""
    return {
        label: all((per_class[label][k] or 0.0) <= TARGET_ERROR for k in ("median_count_error", "median_size_error"))
        for label in TARGET_CLASSES
        if label in per_class
    }


def _round(v: float | None) -> float | None:
    return None if v is None else round(v, 4)


# ----------------------------------------------------------------------------- stage


def load_gray(path: Path) -> np.ndarray:
    with Image.open(path) as im:
        return np.asarray(im.convert("L"), dtype=np.uint8)


def _record_settings(rec: ImageRecord, cfg: MeasureImagesConfig) -> MeasureImagesConfig:
    """Settings an image's sidecar carries (``rec.measure_settings``, checked by ingest)
    replace the stage's for that image: a folder of noisier frames can raise its floor alone."""
    if not rec.measure_settings:
        return cfg
    return MeasureImagesConfig.model_validate({**cfg.model_dump(mode="json"), **rec.measure_settings})


def _known(rec: ImageRecord, cfg: MeasureImagesConfig, cache: ItemCache) -> tuple[Measurement | None, str]:
    """The record's Measurement when no image needs reading (flagged by ingest, or cached),
    and its cache key."""
    cfg = _record_settings(rec, cfg)
    if rec.low_information:
        return Measurement(
            id=rec.id,
            method="none",
            object_count=0,
            pixel_size_nm=rec.pixel_size_nm,
            notes=[f"low information: {rec.low_information_reason or 'flagged by ingest'}"],
        ), ""
    key = cache.key(
        rec.png_sha256,
        rec.label,
        rec.pixel_size_nm,
        rec.modality,
        [list(box) for box in rec.overlays],
        cfg.model_dump(mode="json"),
    )
    cached = cache.get(key)
    if cached is None:
        return None, key
    return _with_panel_notes(Measurement.model_validate({**cached, "id": rec.id}), rec), key


def measure_record(rec: ImageRecord, cfg: MeasureImagesConfig, cache: ItemCache) -> Measurement:
    """One record -> its Measurement, from the cache when the inputs are unchanged."""
    known, key = _known(rec, cfg, cache)
    if known is not None:
        return known
    cfg = _record_settings(rec, cfg)
    try:
        image = load_gray(Path(rec.png))
    except (OSError, ValueError) as exc:
        # Not cached: the file may be fixed or restored before the next run.
        return Measurement(
            id=rec.id,
            method="none",
            object_count=0,
            pixel_size_nm=rec.pixel_size_nm,
            notes=[f"unreadable image {rec.png}: {type(exc).__name__}: {exc}"],
        )
    try:
        m = measure_array(
            image,
            cfg,
            image_id=rec.id,
            label=rec.label,
            modality=rec.modality,
            pixel_size_nm=rec.pixel_size_nm,
            overlays=rec.overlays,
        )
    except Exception as exc:  # noqa: BLE001 - one odd image must not stop the stage
        return Measurement(
            id=rec.id,
            method="none",
            object_count=0,
            pixel_size_nm=rec.pixel_size_nm,
            notes=[f"measurement failed: {type(exc).__name__}: {exc}"],
        )
    cache.put(key, m.model_dump(mode="json", exclude={"id"}))
    return _with_panel_notes(m, rec)


def _measure_uncached(rec: ImageRecord, cfg: MeasureImagesConfig, cache_root: str) -> Measurement:
    """``measure_record`` in a worker process, with the stage's cache opened there."""
    return measure_record(rec, cfg, ItemCache(Path(cache_root), "measure_images", VERSION))


def _with_panel_notes(m: Measurement, rec: ImageRecord) -> Measurement:
    """The measurement saying which panel labels were kept out (ingest found them)."""
    if not rec.panel_labels:
        return m
    said = [
        f"panel label '{p.text}' at x {p.box[0]}-{p.box[2]}, y {p.box[1]}-{p.box[3]} masked, not measured"
        for p in rec.panel_labels
    ]
    return m.model_copy(update={"notes": [*said, *m.notes]})


def measure_images(cfg: Config) -> dict[str, Any]:
    """The stage: every record measured, measurements.jsonl + metrics/measure.json written."""
    records_path = cfg.paths.interim_images / "records.jsonl"
    records = sorted((ImageRecord.model_validate(r) for r in read_jsonl(records_path)), key=lambda r: r.id)
    cache = ItemCache(cfg.paths.cache, "measure_images", VERSION)
    # What the cache (or ingest's flag) answers is answered here; only the images to
    # measure go to the workers, each of which writes its own cache entry.
    known = [_known(rec, cfg.measure_images, cache)[0] for rec in records]
    todo = [rec for rec, m in zip(records, known) if m is None]
    work = functools.partial(_measure_uncached, cfg=cfg.measure_images, cache_root=str(cfg.paths.cache))
    done = iter(map_items(work, todo, executor=cfg.executor, description="measure_images"))
    measurements = [m if m is not None else next(done) for m in known]
    out_dir = reset_dir(cfg.paths.measurements)
    write_jsonl(out_dir / "measurements.jsonl", (m.model_dump(mode="json") for m in measurements))
    truth_pairs = [(rec.ground_truth, m) for rec, m in zip(records, measurements) if rec.ground_truth]
    per_class = score(truth_pairs)
    metrics = {
        "per_class": per_class,
        "images": len(records),
        "scored": len(truth_pairs),
        "target": {"max_median_error": TARGET_ERROR, "met": targets_met(per_class)},
    }
    write_json(cfg.paths.metrics / "measure.json", metrics)
    methods: dict[str, int] = {}
    for m in measurements:
        methods[m.method] = methods.get(m.method, 0) + 1
    return {
        "records": len(records),
        "measured": sum(1 for m in measurements if m.method != "none"),
        "none": methods.get("none", 0),
        "scored": len(truth_pairs),
        "cache": cache.stats(),
        "methods": methods,
        "per_class": per_class,
    }
