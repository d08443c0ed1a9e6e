"""synth_images: procedural SEM/TEM-like micrographs with exact ground truth.

Writes ``<out_dir>/<class>/<image_id>.tif`` (single-page 8-bit grayscale TIFF, the image
with a rendered databar at the bottom) and beside it ``<image_id>.json`` (a
``records.Sidecar`` holding the pixel size, label, modality, instrument settings and the
``GroundTruth``). The whole folder is rewritten on every run. Run:
``python -m stages.synth_images``.

Every image is drawn from its own numpy Generator, seeded from (seed, class, index) by a
hash, so the same seed gives byte-identical files and adding a class or an image does not
change any other image. Object sizes are drawn in *pixels* (so objects stay resolvable at
any pixel size) and converted to nm with the image's pixel size.

What the ground truth means per class (``sizes_nm`` has one entry per counted object):

- ``particles``: blobs (slightly elliptical, some touching in pairs/clusters), fully inside
  the frame. Size = equivalent circular diameter of each particle's own rasterised mask.
  A share ``tem_fraction`` is drawn with the TEM look (dark on bright).
- ``nanowires``: straight capsules (rounded rods), fully inside, a few crossing. Size = rod
  width (solved from the rasterised mask area and the tip-to-tip length); lengths = tip to
  tip; orientations = long-axis angle, degrees counter-clockwise from the +x axis, [0, 180).
- ``fibres``: long curvy fibres of constant width that may leave the frame. Size = width;
  lengths = visible centre-line length.
- ``porous``: a sponge; pores are the dark phase of a thresholded smooth random field (pores
  and solid islands under ``_MIN_FEATURE_PX`` are filled, so none is drawn). Counted
  objects = pores not touching the border, size = their equivalent diameter;
  ``area_fraction`` = porosity over the whole frame.
- ``cracked_film``: a textured film with non-intersecting dark cracks (random-walk
  polylines that may leave the frame). Size = crack width; lengths = visible length;
  ``area_fraction`` = crack fraction.
- ``lines``: a line/space grating (bright lines). Size = line width; ``pitch_nm`` = period.
  Counted lines = stripes whose visible length is at least half the longest visible one
  (corner slivers are not lines).
- ``holes``: a square or hexagonal array of dark holes. Size = equivalent diameter of each
  hole's rasterised mask; ``pitch_nm`` = nearest-neighbour centre distance. Counted holes
  = those whose mask does not touch the border.
- ``grains``: a Voronoi polycrystal (Lloyd-relaxed) with per-grain channelling contrast and
  dark boundaries. Counted grains = cells not touching the border; size = equivalent
  diameter of the whole cell (its half of the boundary included).

``area_fraction`` is always the drawn foreground (particles, wires, fibres, lines) or the
drawn dark phase (pores, cracks, holes) over the frame; for grains it is the boundary
fraction.
"""

from __future__ import annotations

import hashlib
import io
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import tifffile
from PIL import Image, ImageDraw, ImageFont
from scipy import ndimage as ndi
from scipy.spatial import cKDTree

from semilens.config import SynthImagesConfig
from semilens.images.records import GroundTruth, Modality, Sidecar
from semilens.io import atomic_write_bytes, reset_dir, write_json

VENDOR = "semilens-synth"
# Pores or solid islands smaller than this (px) are filled before drawing, so the drawn
# image holds no sub-resolution feature that the ground truth would have to count.
_MIN_FEATURE_PX = 24


# ----------------------------------------------------------------------------- scene


@dataclass
class Scene:
    """A noiseless drawing plus its truth, all in pixel units."""

    signal: np.ndarray  # float image in [0, 1], before blur and shot noise
    count: int
    sizes_px: list[float]
    area_fraction: float
    lengths_px: list[float] | None = None
    orientations_deg: list[float] | None = None
    pitch_px: float | None = None


def image_seed(seed: int, label: str, index: int) -> int:
    """A 63-bit seed for one image, independent of every other (class, index)."""
    digest = hashlib.sha256(f"semilens-synth/{seed}/{label}/{index}".encode()).digest()
    return int.from_bytes(digest[:8], "big") >> 1


def _grid(shape: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
    yy, xx = np.mgrid[0 : shape[0], 0 : shape[1]]
    return yy.astype(np.float64), xx.astype(np.float64)


def _length_scale(size: int) -> float:
    """Object sizes are tuned for a 384-px frame; smaller frames shrink them only so far
    (0.6x), so that a thumbnail still shows resolvable objects rather than 1-px specks."""
    return max(size / 384.0, 0.6)


def _per_area(n: int, size: int, minimum: int) -> int:
    """Object counts tuned for a 384-px frame, scaled to keep the same areal coverage."""
    return max(minimum, round(n * (size / 384.0 / _length_scale(size)) ** 2))


def _eq_diameter(area_px: float) -> float:
    return 2.0 * math.sqrt(area_px / math.pi)


def _touches_border(mask: np.ndarray) -> bool:
    return bool(mask[0].any() or mask[-1].any() or mask[:, 0].any() or mask[:, -1].any())


def _smooth_noise(rng: np.random.Generator, shape: tuple[int, int], sigma: float) -> np.ndarray:
    """Zero-mean, unit-std smooth random field (substrate texture, film grain, sponge)."""
    field_ = ndi.gaussian_filter(rng.standard_normal(shape), sigma, mode="wrap")
    return (field_ - field_.mean()) / (field_.std() + 1e-12)


def _rim(mask: np.ndarray, width: float) -> np.ndarray:
    """SEM edge effect: secondary-electron yield rises where the beam nears an edge.

    Returned inside the object (decaying inwards), so it brightens edges without moving
    the drawn outline; after blur it does skew a fixed-threshold outline outwards, which
    is the bias a measurement must handle on real SEM images too.
    """
    inside = ndi.distance_transform_edt(mask)
    return np.where(mask, np.exp(-(inside - 0.5) / width), 0.0)


def _sem_objects(mask: np.ndarray, rng: np.random.Generator, bg: float, fg: float, rim_gain: float) -> np.ndarray:
    """Bright objects on a darker, faintly textured substrate, with edge brightening."""
    texture = 0.025 * _smooth_noise(rng, mask.shape, 2.0)
    return bg + texture + (fg - bg) * mask + rim_gain * _rim(mask, rng.uniform(1.2, 2.0))


def _segment_distance(yy: np.ndarray, xx: np.ndarray, p0: np.ndarray, p1: np.ndarray) -> np.ndarray:
    """Euclidean distance of every pixel centre to the segment p0-p1 (points as (y, x))."""
    d = p1 - p0
    length2 = float(d @ d) or 1e-12
    t = np.clip(((yy - p0[0]) * d[0] + (xx - p0[1]) * d[1]) / length2, 0.0, 1.0)
    return np.hypot(yy - (p0[0] + t * d[0]), xx - (p0[1] + t * d[1]))


def _polyline_mask(shape: tuple[int, int], pts: np.ndarray, width: float) -> np.ndarray:
    """Pixels whose centre lies within width/2 of the polyline (sampled, not antialiased)."""
    mask = np.zeros(shape, bool)
    half = width / 2.0
    pad = int(math.ceil(half)) + 1
    for p0, p1 in zip(pts[:-1], pts[1:]):
        y0 = max(int(min(p0[0], p1[0])) - pad, 0)
        y1 = min(int(max(p0[0], p1[0])) + pad + 1, shape[0])
        x0 = max(int(min(p0[1], p1[1])) - pad, 0)
        x1 = min(int(max(p0[1], p1[1])) + pad + 1, shape[1])
        if y0 >= y1 or x0 >= x1:
            continue
        yy, xx = _grid((y1 - y0, x1 - x0))
        near = _segment_distance(yy + y0, xx + x0, p0, p1) <= half
        mask[y0:y1, x0:x1] |= near
    return mask


def _visible_length(pts: np.ndarray, shape: tuple[int, int]) -> float:
    """Length of the polyline part whose points lie inside the frame."""
    inside = (pts[:, 0] >= 0) & (pts[:, 0] <= shape[0] - 1) & (pts[:, 1] >= 0) & (pts[:, 1] <= shape[1] - 1)
    steps = np.hypot(*np.diff(pts, axis=0).T)
    return float(steps[inside[:-1] & inside[1:]].sum())


def _random_walk(
    rng: np.random.Generator,
    start: np.ndarray,
    angle: float,
    n_steps: int,
    step: float,
    wiggle: float,
) -> np.ndarray:
    """A smooth curve: the heading drifts by a random walk on its turning rate."""
    turn = np.cumsum(rng.normal(0.0, wiggle, n_steps))
    turn = np.clip(turn, -0.03, 0.03)  # bounded curvature: no tight loops
    heading = angle + np.cumsum(turn)
    steps = np.stack([np.sin(heading), np.cos(heading)], axis=1) * step
    return np.vstack([start, start + np.cumsum(steps, axis=0)])


# ----------------------------------------------------------------------------- classes


def _particles(rng: np.random.Generator, size: int, tem: bool) -> Scene:
    shape = (size, size)
    n_target = _per_area(int(rng.integers(20, 50)), size, 4)
    r_mean = rng.uniform(6.0, 13.0) * _length_scale(size)
    yy, xx = _grid(shape)
    placed: list[tuple[float, float, float, float, float]] = []  # cy, cx, a, b, theta
    masks: list[np.ndarray] = []
    for _ in range(n_target * 60):
        if len(placed) >= n_target:
            break
        r = float(np.clip(rng.normal(r_mean, 0.18 * r_mean), 0.55 * r_mean, 1.6 * r_mean))
        aspect = rng.uniform(1.0, 1.3)
        a, b = r * math.sqrt(aspect), r / math.sqrt(aspect)
        if placed and rng.random() < 0.3:
            # Touching neighbour: overlaps an existing particle slightly, as in agglomerates.
            cy0, cx0, a0, b0, _ = placed[int(rng.integers(len(placed)))]
            phi = rng.uniform(0, 2 * math.pi)
            dist = (math.sqrt(a0 * b0) + r) * rng.uniform(0.82, 0.95)
            cy, cx = cy0 + dist * math.sin(phi), cx0 + dist * math.cos(phi)
            clear = 0.8
        else:
            cy, cx = rng.uniform(0, size, 2)
            clear = 1.15
        if not (a + 2 <= cy <= size - a - 3 and a + 2 <= cx <= size - a - 3):
            continue
        # Free placements keep a gap to every other particle; touching ones overlap only
        # their chosen partner's neighbourhood (clear=0.8 allows the designed contact).
        if any(math.hypot(cy - p[0], cx - p[1]) < clear * (math.sqrt(p[2] * p[3]) + r) + 1.0 for p in placed):
            continue
        theta = rng.uniform(0, math.pi)
        dy, dx = yy - cy, xx - cx
        u = dx * math.cos(theta) + dy * math.sin(theta)
        v = -dx * math.sin(theta) + dy * math.cos(theta)
        placed.append((cy, cx, a, b, theta))
        masks.append((u / a) ** 2 + (v / b) ** 2 <= 1.0)
    union = np.logical_or.reduce(masks)
    if tem:
        # Mass-thickness contrast: uniformly dark crystals, a little darker in the middle.
        depth = np.zeros(shape)
        for (cy, cx, a, b, theta), m in zip(placed, masks):
            dy, dx = yy - cy, xx - cx
            u = dx * math.cos(theta) + dy * math.sin(theta)
            v = -dx * math.sin(theta) + dy * math.cos(theta)
            rho2 = np.clip(1 - (u / a) ** 2 - (v / b) ** 2, 0, 1)
            depth = np.maximum(depth, np.where(m, 0.7 + 0.3 * np.sqrt(rho2), 0.0))
        bg = rng.uniform(0.7, 0.82)
        signal = bg + 0.02 * _smooth_noise(rng, shape, 3.0) - rng.uniform(0.4, 0.5) * depth
    else:
        signal = _sem_objects(union, rng, rng.uniform(0.12, 0.22), rng.uniform(0.5, 0.62), 0.25)
        # Topographic shading: the side facing the detector is brighter (SE collection).
        phi, amp = rng.uniform(0, 2 * math.pi), rng.uniform(0.04, 0.1)
        for (cy, cx, a, _b, _), m in zip(placed, masks):
            toward = ((xx - cx) * math.cos(phi) + (yy - cy) * math.sin(phi)) / a
            signal = signal + np.where(m, amp * toward, 0.0)
    sizes = [_eq_diameter(float(m.sum())) for m in masks]
    return Scene(signal, len(masks), sizes, float(union.mean()))


def _nanowires(rng: np.random.Generator, size: int) -> Scene:
    shape = (size, size)
    n_target = _per_area(int(rng.integers(10, 22)), size, 3)
    width = rng.uniform(5.0, 9.0) * _length_scale(size)
    union = np.zeros(shape, bool)
    keepout = np.zeros(shape, bool)  # the wires grown by 3 px: "touching" counts as crossing
    crossings = 0
    sizes, lengths, angles = [], [], []
    for _ in range(n_target * 40):
        if len(sizes) >= n_target:
            break
        w = float(np.clip(rng.normal(width, 0.1 * width), 3.5, None))
        seg = rng.uniform(0.15, 0.4) * size
        ang = rng.uniform(0, math.pi)
        c = rng.uniform(0, size, 2)
        half = np.array([-math.sin(ang), math.cos(ang)]) * seg / 2  # (dy, dx); y grows down
        p0, p1 = c - half, c + half
        lo, hi = w / 2 + 2, size - w / 2 - 3
        if not (lo <= min(p0.min(), p1.min()) and max(p0.max(), p1.max()) <= hi):
            continue
        mask = _polyline_mask(shape, np.stack([p0, p1]), w)
        if (mask & keepout).any():
            # A few wires may cross, as in real growth; most lie apart.
            if crossings >= 2 or rng.random() > 0.1:
                continue
            crossings += 1
        union |= mask
        keepout |= ndi.binary_dilation(mask, iterations=3)
        # Width solved from the drawn mask: area = w*seg + pi*w^2/4 for a capsule.
        area = float(mask.sum())
        w_drawn = (-seg + math.sqrt(seg * seg + math.pi * area)) / (math.pi / 2)
        sizes.append(w_drawn)
        lengths.append(seg + w_drawn)
        angles.append(math.degrees(ang) % 180.0)
    signal = _sem_objects(union, rng, rng.uniform(0.12, 0.2), rng.uniform(0.55, 0.68), 0.2)
    return Scene(signal, len(sizes), sizes, float(union.mean()), lengths, angles)


def _fibres(rng: np.random.Generator, size: int) -> Scene:
    shape = (size, size)
    n = max(2, round(int(rng.integers(4, 9)) * size / 384))
    union = np.zeros(shape, bool)
    sizes, lengths, angles = [], [], []
    for _ in range(n):
        w = rng.uniform(3.0, 6.0) * _length_scale(size)
        start = rng.uniform(0.1 * size, 0.9 * size, 2)
        heading = rng.uniform(0, 2 * math.pi)
        half = max(int(int(rng.integers(60, 160)) * size / 384), 20)
        fwd = _random_walk(rng, start, heading, half, 2.0, 0.004)
        back = _random_walk(rng, start, heading + math.pi, half, 2.0, 0.004)
        pts = np.vstack([back[::-1], fwd[1:]])
        union |= _polyline_mask(shape, pts, w)
        sizes.append(w)
        lengths.append(_visible_length(pts, shape))
        angles.append(math.degrees(-heading) % 180.0)
    signal = _sem_objects(union, rng, rng.uniform(0.1, 0.2), rng.uniform(0.5, 0.65), 0.2)
    return Scene(signal, n, sizes, float(union.mean()), lengths, angles)


def _porous(rng: np.random.Generator, size: int) -> Scene:
    from skimage.morphology import remove_small_holes, remove_small_objects

    shape = (size, size)
    field_ = _smooth_noise(rng, shape, rng.uniform(4.0, 7.0) * _length_scale(size))
    porosity = rng.uniform(0.25, 0.45)
    pores = field_ < np.quantile(field_, porosity)
    pores = remove_small_objects(pores, max_size=_MIN_FEATURE_PX - 1)
    pores = remove_small_holes(pores, max_size=_MIN_FEATURE_PX - 1)
    labels, n = ndi.label(pores)
    sizes = []
    for idx in range(1, n + 1):
        m = labels == idx
        if not _touches_border(m):
            sizes.append(_eq_diameter(float(m.sum())))
    solid = ~pores
    # The solid is bright with rims at pore edges; pores are dark, a little graded by depth.
    depth = np.clip(ndi.distance_transform_edt(pores) / 6.0, 0, 1)
    signal = _sem_objects(solid, rng, rng.uniform(0.08, 0.14), rng.uniform(0.5, 0.62), 0.22)
    signal -= 0.06 * depth
    return Scene(signal, len(sizes), sizes, float(pores.mean()))


def _cracked_film(rng: np.random.Generator, size: int) -> Scene:
    shape = (size, size)
    n_target = max(2, round(int(rng.integers(3, 8)) * size / 384))
    cracks = np.zeros(shape, bool)
    keepout = np.zeros(shape, bool)  # cracks grown by 4 px: new cracks must stay outside
    sizes, lengths, angles = [], [], []
    for _ in range(n_target * 30):
        if len(sizes) >= n_target:
            break
        w = rng.uniform(2.5, 4.5) * _length_scale(size)
        start = rng.uniform(0.05 * size, 0.95 * size, 2)
        heading = rng.uniform(0, 2 * math.pi)
        half = max(int(int(rng.integers(25, 90)) * size / 384), 10)
        fwd = _random_walk(rng, start, heading, half, 2.0, 0.006)
        back = _random_walk(rng, start, heading + math.pi, half, 2.0, 0.006)
        pts = np.vstack([back[::-1], fwd[1:]])
        mask = _polyline_mask(shape, pts, w)
        # Cracks here never meet, so each drawn crack is exactly one counted object.
        if not mask.any() or (mask & keepout).any():
            continue
        cracks |= mask
        keepout |= ndi.binary_dilation(mask, iterations=4)
        sizes.append(w)
        lengths.append(_visible_length(pts, shape))
        angles.append(math.degrees(-heading) % 180.0)
    film = rng.uniform(0.4, 0.55) + 0.04 * _smooth_noise(rng, shape, 1.5)
    film += 0.03 * _smooth_noise(rng, shape, 12.0)
    # A crack is a dark gap with a bright lip on the film side (edge effect).
    lip = ndi.binary_dilation(cracks, iterations=2) & ~cracks
    signal = np.where(cracks, rng.uniform(0.05, 0.12), film + 0.12 * lip)
    return Scene(signal, len(sizes), sizes, float(cracks.mean()), lengths, angles)


def _lines(rng: np.random.Generator, size: int) -> Scene:
    shape = (size, size)
    pitch = rng.uniform(18.0, 44.0) * _length_scale(size)
    width = pitch * rng.uniform(0.35, 0.6)
    # Gratings are written along a stage axis; a small rotation is typical.
    ang = math.radians(rng.choice([0.0, 90.0]) + rng.uniform(-8.0, 8.0))
    yy, xx = _grid(shape)
    # u: coordinate across the lines; the stripe index k = floor(u / pitch).
    u = xx * math.cos(ang) + yy * math.sin(ang) + rng.uniform(0, pitch)
    mask = np.mod(u, pitch) < width
    stripe = np.where(mask, np.floor(u / pitch).astype(int), -(10**6))
    visible = [(stripe == k) for k in np.unique(stripe[mask])]
    # Visible length of a stripe = its drawn area over the width; slivers are not lines.
    vis_len = np.array([m.sum() / width for m in visible])
    counted = vis_len >= 0.5 * vis_len.max()
    n = int(counted.sum())
    signal = _sem_objects(mask, rng, rng.uniform(0.12, 0.2), rng.uniform(0.45, 0.55), 0.3)
    line_angle = (90.0 - math.degrees(ang)) % 180.0  # lines run perpendicular to u
    return Scene(
        signal,
        n,
        [width] * n,
        float(mask.mean()),
        [float(v) for v in vis_len[counted]],
        [line_angle] * n,
        pitch_px=pitch,
    )


def _holes(rng: np.random.Generator, size: int) -> Scene:
    shape = (size, size)
    pitch = rng.uniform(26.0, 52.0) * _length_scale(size)
    radius = pitch * rng.uniform(0.22, 0.36)
    hexagonal = bool(rng.random() < 0.5)
    rot = math.radians(rng.uniform(-6.0, 6.0))
    a1 = np.array([math.cos(rot), math.sin(rot)]) * pitch
    a2_angle = rot + (math.pi / 3 if hexagonal else math.pi / 2)
    a2 = np.array([math.cos(a2_angle), math.sin(a2_angle)]) * pitch
    origin = rng.uniform(0, pitch, 2)
    span = int(2 * size / pitch) + 3
    centres = [origin + i * a1 + j * a2 for i in range(-span, span + 1) for j in range(-span, span + 1)]
    yy, xx = _grid(shape)
    holes = np.zeros(shape, bool)
    sizes = []
    for cx, cy in centres:
        if not (-radius - 1 <= cx <= size + radius and -radius - 1 <= cy <= size + radius):
            continue
        y0, y1 = max(int(cy - radius) - 1, 0), min(int(cy + radius) + 2, size)
        x0, x1 = max(int(cx - radius) - 1, 0), min(int(cx + radius) + 2, size)
        if y0 >= y1 or x0 >= x1:
            continue
        m = np.zeros(shape, bool)
        m[y0:y1, x0:x1] = np.hypot(yy[y0:y1, x0:x1] - cy, xx[y0:y1, x0:x1] - cx) <= radius
        if not m.any():
            continue
        holes |= m
        if not _touches_border(m):
            sizes.append(_eq_diameter(float(m.sum())))
    surface = ~holes
    signal = _sem_objects(surface, rng, rng.uniform(0.06, 0.12), rng.uniform(0.42, 0.52), 0.3)
    return Scene(signal, len(sizes), sizes, float(holes.mean()), pitch_px=pitch)


def _grains(rng: np.random.Generator, size: int) -> Scene:
    shape = (size, size)
    n_seeds = _per_area(int(rng.integers(25, 70)), size, 6)
    pts = rng.uniform(0, size, (n_seeds, 2))
    yy, xx = _grid(shape)
    pix = np.stack([yy.ravel(), xx.ravel()], axis=1)
    # Two Lloyd steps make grains equiaxed, as after annealing.
    for _ in range(2):
        owner = cKDTree(pts).query(pix)[1]
        counts = np.bincount(owner, minlength=n_seeds)
        keep = counts > 0
        sums = np.stack([np.bincount(owner, pix[:, k], minlength=n_seeds) for k in (0, 1)], 1)
        pts = sums[keep] / counts[keep, None]
    labels = cKDTree(pts).query(pix)[1].reshape(shape) + 1
    # Boundaries: pixels whose 4-neighbour belongs to another grain, thickened a little.
    edge = np.zeros(shape, bool)
    edge[:-1] |= labels[:-1] != labels[1:]
    edge[1:] |= labels[:-1] != labels[1:]
    edge[:, :-1] |= labels[:, :-1] != labels[:, 1:]
    edge[:, 1:] |= labels[:, :-1] != labels[:, 1:]
    levels = rng.uniform(0.32, 0.72, labels.max() + 1)
    sizes = []
    for idx in range(1, labels.max() + 1):
        m = labels == idx
        if m.any() and not _touches_border(m):
            sizes.append(_eq_diameter(float(m.sum())))
    signal = levels[labels] + 0.02 * _smooth_noise(rng, shape, 2.0)
    signal = np.where(edge, rng.uniform(0.05, 0.12), signal)
    return Scene(signal, len(sizes), sizes, float(edge.mean()))


# ----------------------------------------------------------------------------- look


def _finish(signal: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Beam blur, charging/intensity gradient and shot noise -> 8-bit frame."""
    size = signal.shape[0]
    out = ndi.gaussian_filter(signal, rng.uniform(0.6, 1.0))
    yy, xx = _grid(signal.shape)
    ang = rng.uniform(0, 2 * math.pi)
    ramp = ((xx * math.cos(ang) + yy * math.sin(ang)) / size) - 0.5
    out = out * (1.0 + rng.uniform(0.05, 0.18) * ramp)
    # Charging: a broad, faint glow where the beam dwelt longest.
    cy, cx = rng.uniform(0, size, 2)
    glow = np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / (2 * (0.3 * size) ** 2))
    out = out + rng.uniform(0.0, 0.05) * glow
    # Scan-line jitter: each raster line's gain wanders slightly (beam current, line sync).
    out = out * (1.0 + rng.normal(0.0, rng.uniform(0.003, 0.012), (size, 1)))
    dose = rng.uniform(25.0, 60.0)  # electrons per pixel: sets the shot-noise level
    counts = rng.poisson(np.clip(out, 0, None) * dose) / dose
    return np.clip(np.rint(counts * 255.0), 0, 255).astype(np.uint8)


def _nice_length(target_nm: float) -> float:
    """Largest 1-2-5 x 10^k not above target (how vendors choose scale-bar lengths)."""
    exp = 10 ** math.floor(math.log10(target_nm))
    return max(m * exp for m in (1, 2, 5) if m * exp <= target_nm)


def _length_label(nm: float) -> str:
    return f"{nm / 1000:g} um" if nm >= 1000 else f"{nm:g} nm"


def _databar(width: int, height: int, pixel_size_nm: float, text: str) -> np.ndarray:
    """Dark vendor-style band: scale bar with its length label, then acquisition text."""
    bar = Image.new("L", (width, height), 18)
    draw = ImageDraw.Draw(bar)
    # Pillow's bundled font (no system font lookup): the same Pillow gives the same pixels.
    font = ImageFont.load_default(size=max(9, height // 3))
    sb_nm = _nice_length(0.2 * width * pixel_size_nm)
    sb_px = max(int(round(sb_nm / pixel_size_nm)), 1)
    x0, y_bar = 8, height - max(4, height // 4)
    draw.rectangle([x0, y_bar, x0 + sb_px - 1, y_bar + max(2, height // 10)], fill=245)
    draw.text((x0, 2), _length_label(sb_nm), fill=235, font=font)
    draw.text((x0 + sb_px + 12, height // 2 - height // 6), text, fill=225, font=font)
    return np.asarray(bar, dtype=np.uint8)


_DRAW = {
    "nanowires": _nanowires,
    "fibres": _fibres,
    "porous": _porous,
    "cracked_film": _cracked_film,
    "lines": _lines,
    "holes": _holes,
    "grains": _grains,
}


@dataclass
class SynthImage:
    image_id: str
    pixels: np.ndarray  # (size + databar, size) uint8, databar at the bottom
    sidecar: Sidecar


def is_tem(index: int, tem_fraction: float) -> bool:
    """Exactly round(n * tem_fraction) of the first n particle images are TEM, spread out."""
    return math.floor((index + 1) * tem_fraction) > math.floor(index * tem_fraction)


def render_image(label: str, index: int, cfg: SynthImagesConfig) -> SynthImage:
    """Draw image ``index`` of class ``label``: pixels with databar plus its sidecar."""
    seed = image_seed(cfg.seed, label, index)
    rng = np.random.default_rng(seed)
    size = cfg.size
    lo, hi = cfg.pixel_size_nm
    pixel_size = round(float(rng.uniform(lo, hi)), 4)
    tem = label == "particles" and is_tem(index, cfg.tem_fraction)
    modality: Modality = "TEM" if tem else "SEM"
    scene = _particles(rng, size, tem) if label == "particles" else _DRAW[label](rng, size)
    frame = _finish(scene.signal, rng)

    field_nm = size * pixel_size
    magnification = round(127e6 / field_nm, 1)  # relative to a 127 mm wide display
    if tem:
        hv = float(rng.choice([120.0, 200.0, 300.0]))
        instrument: dict[str, str | float | int] = {
            "vendor": VENDOR,
            "hv_kv": hv,
            "magnification": magnification,
            "detector": "BF",
        }
        text = f"HV {hv:.0f} kV | Mag {magnification / 1000:.1f} kX | BF"
    else:
        hv = float(rng.choice([1.0, 2.0, 3.0, 5.0, 10.0, 15.0, 20.0]))
        wd = round(float(rng.uniform(3.0, 10.0)), 1)
        det = str(rng.choice(["SE", "TLD", "InLens"]))
        instrument = {
            "vendor": VENDOR,
            "hv_kv": hv,
            "wd_mm": wd,
            "magnification": magnification,
            "detector": det,
        }
        text = f"HV {hv:.2f} kV | WD {wd:.1f} mm | Mag {magnification / 1000:.1f} kX | {det}"
    bar_h = max(24, size // 10)
    pixels = np.vstack([frame, _databar(size, bar_h, pixel_size, text)])

    def nm(values: list[float] | None) -> list[float] | None:
        return None if values is None else [round(v * pixel_size, 3) for v in values]

    truth = GroundTruth(
        label=label,
        modality=modality,
        pixel_size_nm=pixel_size,
        object_count=scene.count,
        sizes_nm=nm(scene.sizes_px) or [],
        lengths_nm=nm(scene.lengths_px),
        orientations_deg=(None if scene.orientations_deg is None else [round(a, 3) for a in scene.orientations_deg]),
        pitch_nm=None if scene.pitch_px is None else round(scene.pitch_px * pixel_size, 3),
        area_fraction=round(scene.area_fraction, 5),
        databar_height_px=bar_h,
        seed=seed,
    )
    image_id = f"synth-{label}-{index:03d}"
    sidecar = Sidecar(
        pixel_size_nm=pixel_size,
        label=label,
        modality=modality,
        group=image_id,
        instrument=instrument,
        ground_truth=truth,
    )
    return SynthImage(image_id, pixels, sidecar)


def tiff_bytes(pixels: np.ndarray) -> bytes:
    """Single-page 8-bit TIFF with no date/software tags, so the bytes are reproducible."""
    buf = io.BytesIO()
    tifffile.imwrite(buf, pixels, photometric="minisblack", metadata=None, software=False, datetime=False)
    return buf.getvalue()


def synth_images(cfg: SynthImagesConfig, out_dir: Path) -> dict[str, Any]:
    """Write every class's images and sidecars to ``out_dir`` (rewritten from scratch)."""

    out_dir = reset_dir(Path(out_dir))
    per_class: dict[str, int] = {}
    objects = 0
    for label in cfg.classes:
        for index in range(cfg.n_per_class):
            img = render_image(label, index, cfg)
            folder = out_dir / label
            atomic_write_bytes(folder / f"{img.image_id}.tif", tiff_bytes(img.pixels))
            write_json(folder / f"{img.image_id}.json", img.sidecar.model_dump(mode="json"))
            per_class[label] = per_class.get(label, 0) + 1
            objects += img.sidecar.ground_truth.object_count  # type: ignore[union-attr]
    return {
        "images": sum(per_class.values()),
        "objects": objects,
        "out_dir": str(out_dir),
        "per_class": per_class,
    }
