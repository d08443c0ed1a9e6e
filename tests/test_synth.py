"""synth_images: every class renders, the truth matches the drawing, output is reproducible."""

from pathlib import Path

import numpy as np
import pytest
import tifffile
from scipy import ndimage as ndi

from semilens.config import SYNTH_CLASSES, SynthImagesConfig
from semilens.images import synth
from semilens.images.records import Sidecar
from semilens.io import read_json

ELONGATED = {"nanowires", "fibres", "cracked_film", "lines"}
PERIODIC = {"lines", "holes"}


def _cfg(**kw) -> SynthImagesConfig:
    return SynthImagesConfig(**{"n_per_class": 1, "size": 192, **kw})


@pytest.mark.parametrize("label", SYNTH_CLASSES)
def test_every_class_renders_with_consistent_truth(label):
    cfg = _cfg()
    img = synth.render_image(label, 0, cfg)
    gt = img.sidecar.ground_truth
    assert gt is not None and gt.label == label and img.sidecar.label == label
    assert img.pixels.dtype == np.uint8
    assert img.pixels.shape == (cfg.size + gt.databar_height_px, cfg.size)
    assert cfg.pixel_size_nm[0] <= gt.pixel_size_nm <= cfg.pixel_size_nm[1]
    assert gt.object_count > 0 and len(gt.sizes_nm) == gt.object_count
    assert all(s > 0 for s in gt.sizes_nm)
    assert 0.0 < gt.area_fraction < 1.0
    if label in ELONGATED:
        assert gt.lengths_nm is not None and len(gt.lengths_nm) == gt.object_count
        # Elongated means elongated: every object is longer than it is wide.
        assert min(gt.lengths_nm) > max(gt.sizes_nm)
    if label in PERIODIC:
        assert gt.pitch_nm is not None and gt.pitch_nm > max(gt.sizes_nm)
    else:
        assert gt.pitch_nm is None
    frame = img.pixels[: cfg.size].astype(float)
    assert frame.std() > 10  # an image, not a blank


def test_holes_truth_counts_what_was_drawn():
    # Threshold the noiseless drawing: the interior holes must be exactly the counted ones.
    rng = np.random.default_rng(5)
    scene = synth._holes(rng, 256)
    dark = scene.signal < 0.5 * (scene.signal.min() + np.median(scene.signal))
    labels, n = ndi.label(dark)
    edge = set(np.unique(np.r_[labels[0], labels[-1], labels[:, 0], labels[:, -1]])) - {0}
    assert n - len(edge) == scene.count
    areas = ndi.sum_labels(dark, labels, [i for i in range(1, n + 1) if i not in edge])
    assert np.allclose(sorted(2 * np.sqrt(areas / np.pi)), sorted(scene.sizes_px))


def test_lines_truth_pitch_and_width_match_the_drawing():
    rng = np.random.default_rng(11)
    scene = synth._lines(rng, 256)
    from skimage.filters import threshold_otsu

    bright = scene.signal > threshold_otsu(scene.signal)
    # Duty cycle of the drawn grating = width / pitch.
    assert bright.mean() == pytest.approx(scene.sizes_px[0] / scene.pitch_px, abs=0.03)


def test_particles_truth_sizes_come_from_the_drawn_masks():
    rng = np.random.default_rng(3)
    scene = synth._particles(rng, 256, tem=False)
    # Touching particles overlap, so the union is at most the sum of the particle areas.
    drawn = scene.area_fraction * 256 * 256
    total = sum(np.pi * (d / 2) ** 2 for d in scene.sizes_px)
    assert drawn <= total + 1e-6
    assert drawn > 0.9 * total  # overlaps are small contacts, not pile-ups


def test_tem_share_and_modality():
    cfg = _cfg(n_per_class=8, tem_fraction=0.25)
    tem = [synth.is_tem(i, cfg.tem_fraction) for i in range(8)]
    assert sum(tem) == 2
    index = tem.index(True)
    img = synth.render_image("particles", index, cfg)
    assert img.sidecar.modality == "TEM" == img.sidecar.ground_truth.modality
    frame = img.pixels[: cfg.size]
    # TEM look: dark particles on a bright film.
    assert np.median(frame) > 128
    assert synth.render_image("particles", tem.index(False), cfg).sidecar.modality == "SEM"


def _files(root: Path) -> dict[str, bytes]:
    files = sorted(p for p in root.rglob("*") if p.is_file())
    return {str(p.relative_to(root)): p.read_bytes() for p in files}


def test_same_seed_gives_identical_bytes_and_other_seed_differs(tmp_path):
    cfg = _cfg()
    a = synth.synth_images(cfg, tmp_path / "a")
    synth.synth_images(cfg, tmp_path / "b")
    files_a, files_b = _files(tmp_path / "a"), _files(tmp_path / "b")
    assert len(files_a) == 2 * len(SYNTH_CLASSES) == 2 * a["images"]
    assert files_a == files_b
    synth.synth_images(_cfg(seed=1), tmp_path / "c")
    files_c = _files(tmp_path / "c")
    assert files_c.keys() == files_a.keys()
    assert all(files_c[k] != files_a[k] for k in files_a if k.endswith(".tif"))


def test_adding_a_class_does_not_change_the_others(tmp_path):
    synth.synth_images(_cfg(classes=("lines",)), tmp_path / "one")
    synth.synth_images(_cfg(classes=("particles", "lines")), tmp_path / "two")
    one, two = _files(tmp_path / "one"), _files(tmp_path / "two")
    assert one and all(two[k] == v for k, v in one.items())


def test_layout_and_sidecar_schema(tmp_path):
    cfg = _cfg(classes=("holes",), n_per_class=2)
    synth.synth_images(cfg, tmp_path)
    for i in range(2):
        tif = tmp_path / "holes" / f"synth-holes-{i:03d}.tif"
        with tifffile.TiffFile(tif) as t:
            assert len(t.pages) == 1
            page = t.pages[0]
            assert page.dtype == np.uint8 and page.shape[1] == cfg.size
            # No date or software tag: they would make the bytes depend on the run.
            assert "DateTime" not in page.tags and "Software" not in page.tags
        side = Sidecar.model_validate(read_json(tif.with_suffix(".json")))
        assert side.group == tif.stem and side.label == "holes"
        assert side.instrument["vendor"] == synth.VENDOR
        assert side.pixel_size_nm == side.ground_truth.pixel_size_nm


def test_n_per_class_zero_gives_an_empty_folder(tmp_path):
    out = tmp_path / "synthetic"
    (out / "stale").mkdir(parents=True)
    (out / "stale" / "old.tif").write_bytes(b"x")
    summary = synth.synth_images(_cfg(n_per_class=0), out)
    assert summary["images"] == 0
    assert out.is_dir() and not any(out.iterdir())


def test_databar_is_in_the_bottom_rows_with_a_true_scale_bar():
    cfg = SynthImagesConfig()
    img = synth.render_image("grains", 1, cfg)
    gt = img.sidecar.ground_truth
    bar = img.pixels[-gt.databar_height_px :]
    frame = img.pixels[: -gt.databar_height_px]
    assert np.median(bar) < 40 < np.median(frame)  # a dark band below a brighter frame
    assert (bar > 200).any()  # bright scale bar and text
    # The longest bright horizontal run is the scale bar: its length is a 1-2-5 number of
    # nm at the image's pixel size.
    runs = []
    for row in bar > 240:
        padded = np.r_[0, row.astype(int), 0]
        starts, ends = np.nonzero(np.diff(padded) == 1)[0], np.nonzero(np.diff(padded) == -1)[0]
        runs.extend(ends - starts)
    bar_nm = synth._nice_length(0.2 * cfg.size * gt.pixel_size_nm)
    assert max(runs) == round(bar_nm / gt.pixel_size_nm)
    assert f"{bar_nm:g}" in synth._length_label(bar_nm)


def test_image_seed_is_stable_and_distinct():
    assert synth.image_seed(0, "lines", 0) == synth.image_seed(0, "lines", 0)
    seeds = {synth.image_seed(s, c, i) for s in (0, 1) for c in SYNTH_CLASSES for i in range(3)}
    assert len(seeds) == 2 * len(SYNTH_CLASSES) * 3
