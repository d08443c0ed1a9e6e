"""measure_images: morphology recovers the synthetic truth; odd input never crashes; cache."""

import json
import math
import shutil

import numpy as np
import pytest
from PIL import Image

from semilens.config import Config, MeasureImagesConfig, SynthImagesConfig
from semilens.images import measure
from semilens.images.synth import render_image
from semilens.io import sha256_file
from semilens.records import ImageRecord

CFG = MeasureImagesConfig()
SYNTH = SynthImagesConfig()

# Per-image tolerances (relative). The acceptance target (median error <= 10%) is for
# particles, nanowires and patterned surfaces; the harder classes get looser bounds here
# and are reported honestly by the benchmark.
TOLERANCE = {
    "particles": (0.10, 0.10),
    "nanowires": (0.10, 0.10),
    "lines": (0.10, 0.10),
    "holes": (0.10, 0.10),
    "fibres": (0.25, 0.20),
    "porous": (0.15, 0.15),
    "cracked_film": (0.25, 0.15),
    "grains": (0.15, 0.10),
}
EXPECTED_METHOD = {
    "particles": "particles", "nanowires": "elongated", "fibres": "elongated",
    "porous": "porous", "cracked_film": "cracks", "lines": "periodic_lines",
    "holes": "periodic_holes", "grains": "grains",
}


def _synthetic(label: str, index: int) -> tuple[np.ndarray, object]:
    img = render_image(label, index, SYNTH)
    gt = img.sidecar.ground_truth
    return img.pixels[: -gt.databar_height_px], gt


TARGET_CLASSES = ("particles", "nanowires", "lines", "holes")
CASES = [(label, 0) for label in sorted(TOLERANCE)] + [(label, 1) for label in TARGET_CLASSES]


@pytest.mark.parametrize("label,index", CASES)
def test_recovers_synthetic_truth(label, index):
    count_tol, size_tol = TOLERANCE[label]
    frame, gt = _synthetic(label, index)
    m = measure.measure_array(
        frame, CFG, label=label, modality=gt.modality, pixel_size_nm=gt.pixel_size_nm
    )
    assert m.method == EXPECTED_METHOD[label]
    assert abs(m.object_count - gt.object_count) <= count_tol * gt.object_count
    truth = float(np.median(gt.sizes_nm))
    assert m.median_size_nm == pytest.approx(truth, rel=size_tol)
    if gt.pitch_nm is not None:
        assert m.pitch_nm == pytest.approx(gt.pitch_nm, rel=0.02)
    # Pixel and nm values agree through the pixel size.
    assert m.median_size_nm == pytest.approx(m.median_size_px * gt.pixel_size_nm, rel=1e-3)


@pytest.mark.parametrize("label", TARGET_CLASSES)
def test_method_is_detected_without_a_label(label):
    frame, gt = _synthetic(label, 2)
    m = measure.measure_array(frame, CFG, modality=gt.modality, pixel_size_nm=gt.pixel_size_nm)
    assert m.method == EXPECTED_METHOD[label]
    assert abs(m.object_count - gt.object_count) <= 0.1 * gt.object_count


def test_line_orientation_matches_truth():
    frame, gt = _synthetic("lines", 0)
    m = measure.measure_array(frame, CFG, label="lines")
    diff = abs(m.orientation_deg - gt.orientations_deg[0]) % 180
    assert min(diff, 180 - diff) < 1.0


def _disks(centres, radius, size=96, seed=0) -> np.ndarray:
    yy, xx = np.mgrid[0:size, 0:size]
    mask = np.zeros((size, size), bool)
    for cy, cx in centres:
        mask |= (yy - cy) ** 2 + (xx - cx) ** 2 <= radius**2
    rng = np.random.default_rng(seed)
    img = np.where(mask, 170.0, 50.0) + rng.normal(0, 12, mask.shape)
    return np.clip(img, 0, 255).astype(np.uint8)


def test_touching_particles_are_split():
    # Two particles overlapping by 10% of their diameters: one blob, two particles.
    pair = _disks([(48, 38), (48, 56)], 10)
    assert measure.measure_array(pair, CFG, label="particles").object_count == 2
    single = _disks([(48, 48)], 10)
    one = measure.measure_array(single, CFG, label="particles")
    assert one.object_count == 1
    drawn = 2 * math.sqrt((single > 110).sum() / math.pi)  # noise std 12 on a 120 step
    assert one.median_size_px == pytest.approx(drawn, rel=0.05)
    # Without the watershed split (an impossible neck depth) the pair stays one object.
    unsplit = CFG.model_copy(update={"split_depth_px": 50.0})
    assert measure.measure_array(pair, unsplit, label="particles").object_count == 1


def test_rod_orientation_convention():
    yy, xx = np.mgrid[0:128, 0:128].astype(float)
    # A rod rising at 30 degrees (counter-clockwise from +x, as seen on screen: y is down).
    t = np.radians(30.0)
    u = (xx - 64) * math.cos(t) - (yy - 64) * math.sin(t)
    v = (xx - 64) * math.sin(t) + (yy - 64) * math.cos(t)
    rod = (np.abs(u) < 40) & (np.abs(v) < 3)
    img = np.where(rod, 200, 40).astype(np.uint8)
    m = measure.measure_array(img, CFG, label="NW")
    assert m.method == "elongated" and m.object_count == 1
    assert m.orientation_deg == pytest.approx(30.0, abs=2.0)
    assert m.width_px == pytest.approx(6.0, rel=0.15)


@pytest.mark.parametrize(
    "image",
    [
        np.full((64, 64), 120, np.uint8),
        np.clip(np.random.default_rng(0).normal(128, 30, (128, 128)), 0, 255).astype(np.uint8),
        np.zeros((8, 8), np.uint8),
    ],
    ids=["flat", "noise", "tiny"],
)
def test_low_information_gives_method_none(image):
    m = measure.measure_array(image, CFG, label="particles")
    assert m.method == "none" and m.object_count == 0 and m.notes


@pytest.mark.parametrize(
    "label,method",
    [
        ("nanowires", "elongated"), ("NW", "elongated"), ("Nanowire", "elongated"),
        ("fibres", "elongated"), ("nanorods", "elongated"), ("particles", "particles"),
        ("Nanoparticles", "particles"), ("Porous_Sponge", "porous"), ("cracked_film", "cracks"),
        ("lines", "periodic_lines"), ("holes", "periodic_holes"), ("grains", "grains"),
        ("Patterned_surface", "periodic"), ("Biological", None), (None, None),
    ],
)
def test_label_synonyms(label, method):
    assert measure.method_for_label(label) == method


def test_score_reports_relative_errors():
    frame, gt = _synthetic("holes", 0)
    m = measure.measure_array(frame, CFG, label="holes", pixel_size_nm=gt.pixel_size_nm)
    off = m.model_copy(update={"object_count": 2 * gt.object_count})
    scores = measure.score([(gt, m), (gt, m), (gt, off)])["holes"]
    assert scores["n"] == 3
    assert scores["median_count_error"] == 0.0
    assert scores["median_pitch_error"] < 0.02
    assert measure.score([(gt, off)])["holes"]["median_count_error"] == 1.0


# ----------------------------------------------------------------------------- stage


def _record(rid: str, png: str, **kw) -> dict:
    base = dict(
        id=rid, source=f"data/raw/images/{rid}.tif", origin="raw", sha256="0" * 64,
        format="TIFF", page=0, n_pages=1, original_width=1, original_height=1,
        original_dtype="uint8", width=1, height=1, crop_box=(0, 0, 1, 1), databar=None,
        modality="unknown", instrument={}, pixel_size_nm=None, pixel_size_source="none",
        label=None, label_source="none", group=rid, png=png, png_sha256="0" * 64,
    )
    base.update(kw)
    return ImageRecord.model_validate(base).model_dump(mode="json")


def _write_inputs(cfg: Config) -> list[dict]:
    folder = cfg.paths.interim_images
    folder.mkdir(parents=True)
    rows = []
    for label, index in (("particles", 0), ("lines", 1)):
        frame, gt = _synthetic(label, index)
        png = folder / f"{label}.png"
        Image.fromarray(frame).save(png)
        rows.append(
            _record(
                f"{label}-p0", str(png), png_sha256=sha256_file(png), origin="synthetic",
                label=label, label_source="ground_truth", modality=gt.modality,
                pixel_size_nm=gt.pixel_size_nm, pixel_size_source="sidecar:json",
                ground_truth=gt.model_dump(mode="json"),
            )
        )
    blank = folder / "blank.png"
    Image.fromarray(np.full((64, 64), 7, np.uint8)).save(blank)
    rows.append(
        _record("blank-p0", str(blank), low_information=True, low_information_reason="flat")
    )
    rows.append(_record("gone-p0", str(folder / "missing.png")))
    (folder / "records.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return rows


def test_stage_writes_outputs_and_second_run_is_all_cache_hits(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cfg = Config()
    rows = _write_inputs(cfg)
    first = measure.measure_images(cfg)
    out = cfg.paths.measurements / "measurements.jsonl"
    lines = [json.loads(line) for line in out.read_text().splitlines()]
    assert [m["id"] for m in lines] == sorted(r["id"] for r in rows)
    by_id = {m["id"]: m for m in lines}
    blank = by_id["blank-p0"]
    assert blank["method"] == "none" and "low information" in blank["notes"][0]
    assert by_id["gone-p0"]["method"] == "none" and "unreadable" in by_id["gone-p0"]["notes"][0]
    assert by_id["lines-p0"]["method"] == "periodic_lines"
    metrics = json.loads((cfg.paths.metrics / "measure.json").read_text())
    assert set(metrics["per_class"]) == {"particles", "lines"}
    assert metrics["per_class"]["lines"]["median_count_error"] <= 0.1
    # The missing PNG is a miss every time: it is never cached, so a restored file counts.
    assert first["cache"] == {"hits": 0, "misses": 3}
    assert first["records"] == 4 and first["none"] == 2

    before = out.read_bytes(), (cfg.paths.metrics / "measure.json").read_bytes()
    second = measure.measure_images(cfg)
    assert second["cache"] == {"hits": 2, "misses": 1}
    assert (out.read_bytes(), (cfg.paths.metrics / "measure.json").read_bytes()) == before

    # Recomputed from scratch (no cache), the outputs are the same bytes.
    shutil.rmtree(cfg.paths.cache)
    assert measure.measure_images(cfg)["cache"]["misses"] == 3
    assert (out.read_bytes(), (cfg.paths.metrics / "measure.json").read_bytes()) == before

    # A changed parameter is a different key: everything measurable is redone.
    sharper = CFG.model_copy(update={"smooth_sigma": 1.5})
    changed = cfg.model_copy(update={"measure_images": sharper})
    assert measure.measure_images(changed)["cache"]["misses"] == 3
