"""measure_images: close packings without gaps are split sphere by sphere.

The pockets between touching spheres are small, convex holes in the particle phase: filled
(as particle cores and pinholes are) they weld each triangle of spheres into one blob with
a single distance maximum. These tests draw such a packing and count.
"""

import math

import numpy as np
import pytest
from scipy import ndimage

from semilens.config import MeasureImagesConfig
from semilens.images import measure

CFG = MeasureImagesConfig()


def _touching_packing(radius: float = 16.0, pitch: float = 33.0, jitter: float = 2.0):
    """Bright discs in a hexagonal packing, each moved up to ``jitter`` px from its site:
    neighbours 2 r +- a few px apart touch, overlap or leave a gap the blur closes, so no
    gap separates them, only the small pockets where three meet (a real packing is never
    perfectly regular; in a perfect one the whole packing welds into one blob). Every disc
    lies wholly inside the frame. Returns the image and the number of discs."""
    rows, cols, margin = 6, 7, 20
    rng = np.random.default_rng(0)
    dy = pitch * math.sqrt(3) / 2
    h = int(2 * margin + 2 * radius + (rows - 1) * dy + 2 * jitter)
    w = int(2 * margin + 2 * radius + (cols - 0.5) * pitch + 2 * jitter)
    yy, xx = np.mgrid[0:h, 0:w]
    mask = np.zeros((h, w), bool)
    for r in range(rows):
        for c in range(cols):
            cy = margin + radius + r * dy + rng.uniform(-jitter, jitter)
            cx = margin + radius + c * pitch + (r % 2) * pitch / 2 + rng.uniform(-jitter, jitter)
            mask |= np.hypot(yy - cy, xx - cx) <= radius
    img = np.where(mask, 170.0, 50.0) + rng.normal(0, 8, mask.shape)
    return np.clip(ndimage.gaussian_filter(img, 1.0), 0, 255).astype(np.uint8), rows * cols


def test_touching_spheres_in_a_packing_are_counted_one_by_one():
    img, n = _touching_packing()
    m = measure.measure_array(img, CFG, label="particles")
    assert m.object_count == pytest.approx(n, rel=0.05)
    assert m.median_size_px == pytest.approx(32.0, rel=0.1)


def test_filled_pockets_weld_the_packing_together(monkeypatch):
    # The same packing with every pocket kept filled for the split (the pocket size floor
    # above any pocket): the spheres merge in clusters and the count falls well short.
    img, n = _touching_packing()
    monkeypatch.setattr(measure, "_POCKET_MIN_REL", 10.0)
    m = measure.measure_array(img, CFG, label="particles")
    assert m.object_count < 0.85 * n


def test_pinholes_in_large_textured_particles_do_not_cut_them():
    # Three large discs with a dozen small dark pinholes each (texture): the pinholes are
    # filled and stay filled for the split, so each disc is one particle.
    size, radius = 320, 60
    yy, xx = np.mgrid[0:size, 0:size]
    rng = np.random.default_rng(3)
    img = np.full((size, size), 50.0)
    for cy, cx in [(80, 80), (80, 230), (230, 150)]:
        img[np.hypot(yy - cy, xx - cx) <= radius] = 170.0
        for _ in range(12):
            a, d = rng.uniform(0, 2 * math.pi), rng.uniform(0, radius - 12)
            py, px = cy + d * math.sin(a), cx + d * math.cos(a)
            img[np.hypot(yy - py, xx - px) <= 2.5] = 60.0
    img = ndimage.gaussian_filter(img + rng.normal(0, 8, img.shape), 1.0)
    m = measure.measure_array(np.clip(img, 0, 255).astype(np.uint8), CFG, label="particles")
    assert m.object_count == 3
