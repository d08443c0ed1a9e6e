"""Benchmark of measure_images on real, hand-labelled micrographs nobody tuned for.

Reads public images and their labels from ``../shared/realdata/images`` (relative to the
project root; used by path, never copied into the repository), measures each frame with
the same ``analyse_array`` the stage uses (``measure_array`` plus the segmented phase) and
compares with the labels. A folder that is absent is skipped with a printed reason.
Writes ``<paths.metrics>/bench_measure_real.json`` and prints a table.

What is compared, and why it is fair:

- ``particles`` (EMPS, 36 TEM/SEM crops of journal figures, 16-bit instance maps): each
  image goes through ingest's own page record first, as in the pipeline (a databar
  cropped, a burned-in scale bar and its label found, read and kept out as overlays, and so
  are panel labels such as "(a)" or "b1"); the
  median equivalent diameter of the particles not cut by the frame against the instance
  map's interior median (``median_eqd_interior_px``), and the object count against
  ``n_instances``. Measured with label "particles" and modality unknown (EMPS mixes TEM
  and SEM). Some particles and inset panels are unlabelled, so a count can be right and
  still differ; every image is reported, not only a pass rate.
- ``soot`` (TEM, aggregates on a carbon film, 1-bit slider masks): IoU of the measured
  object phase with the mask and relative area-fraction error; label "soot aggregates",
  modality TEM.
- ``superalloy`` (NASA MicroNet Super1, SEM): the precipitate mask is every pixel the RGBA
  overlay paints pure blue or pure red (both precipitate classes); label None, SEM.
- ``nanomembranes`` (DeepSEM, SEM): the object mask is the union of every grown object,
  classes 2-6 (nanomembrane, parasitic, bottom and side nucleus, nanowire); the slit
  (class 1) is the etched trench of the substrate, not an object, so it is left out.
  Label None, SEM.
- ``nanowire tiles`` (DeepSEM, 31 tiles): Pearson and Spearman of the measured count
  against the labelled NW count, as in ``measure_synthetic.py``.

Targets: particles median diameter within 10% on >= 80% of images and count within 15% on
>= 70%; phases IoU >= 0.6 and area fraction within 25% (relative); nanowire Pearson >= 0.8.

Run from the project root: ``.venv/bin/python benchmarks/measure_real.py [--only particles]``
"""

from __future__ import annotations

import argparse
import csv
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from semilens.config import MeasureImagesConfig, load_config
from semilens.images.measure import analyse_array, load_gray
from semilens.io import write_json

ROOT = Path(__file__).resolve().parents[1]
REAL = ROOT.parent / "shared" / "realdata" / "images"
sys.path.insert(0, str(Path(__file__).resolve().parent))

PARTICLE_SIZE_TOL, PARTICLE_SIZE_SHARE = 0.10, 0.80
PARTICLE_COUNT_TOL, PARTICLE_COUNT_SHARE = 0.15, 0.70
PHASE_IOU, PHASE_FRACTION_TOL = 0.6, 0.25
NANOWIRE_PEARSON = 0.8


def _rel(measured: float | None, truth: float) -> float | None:
    return None if measured is None or truth == 0 else round((measured - truth) / truth, 4)


def _quantiles(values: list[float]) -> dict[str, float] | None:
    arr = np.abs(np.asarray([v for v in values if v is not None], float))
    if arr.size == 0:
        return None
    q = np.quantile(arr, [0.1, 0.25, 0.5, 0.75, 0.9])
    return {k: round(float(v), 4) for k, v in zip(("p10", "p25", "p50", "p75", "p90"), q)}


def _iou(a: np.ndarray, b: np.ndarray) -> float:
    union = (a | b).sum()
    return round(float((a & b).sum() / union), 4) if union else 1.0


# ----------------------------------------------------------------------------- particles


def _as_ingested(path: Path) -> tuple[np.ndarray, list[tuple[int, int, int, int]], list[str]]:
    """The frame as the pipeline measures it: ingest's own page record (databar cropped,
    scale bar and label found and read, panel labels found) and its overlays, with the
    panel labels kept out as text."""
    from semilens.images.ingest import Context, page_record
    from semilens.images.readers import decode

    icfg = load_config(ROOT / "params.yaml").ingest_images
    data = path.read_bytes()
    decoded = decode(data, path, icfg.max_pixels, icfg.min_side)
    ctx = Context("raw", "0" * 64, None, path.stem, ())
    record, png = page_record(decoded, 0, ctx, icfg)
    import io

    gray = np.asarray(Image.open(io.BytesIO(png)))
    panels = [f"{p['text']} {list(p['box'])}" for p in record["panel_labels"]]
    return gray, [tuple(b) for b in record["overlays"]], panels


def particles(cfg: MeasureImagesConfig, root: Path) -> dict[str, Any]:
    rows = []
    with open(root / "labels" / "DERIVED_instance_stats.csv", newline="") as fh:
        for row in csv.DictReader(fh):
            image, overlays, panels = _as_ingested(root / "images" / row["file"])
            # The instance map covers the whole frame; ingest crops a databar off the bottom.
            seg = np.asarray(Image.open(root / "segmaps" / row["file"]))[: image.shape[0]]
            m, phase = analyse_array(image, cfg, image_id=row["file"], label="particles", overlays=overlays)
            size = float(np.median(m.eq_diameter_px)) if m.eq_diameter_px else m.median_size_px
            truth_size = float(row["median_eqd_interior_px"] or row["median_eqd_px"])
            rows.append(
                {
                    "file": row["file"],
                    "method": m.method,
                    "count": m.object_count,
                    "count_truth": int(row["n_instances"]),
                    "count_error": _rel(float(m.object_count), float(row["n_instances"])),
                    "median_eqd_px": None if size is None else round(size, 2),
                    "median_eqd_truth_px": truth_size,
                    "size_error": _rel(size, truth_size),
                    "iou": _iou(phase, seg > 0) if phase.shape == seg.shape else None,
                    "panel_labels_masked": panels,
                    "notes": m.notes,
                }
            )
    size_err = [r["size_error"] for r in rows]
    count_err = [r["count_error"] for r in rows]
    size_ok = sum(1 for e in size_err if e is not None and abs(e) <= PARTICLE_SIZE_TOL)
    count_ok = sum(1 for e in count_err if e is not None and abs(e) <= PARTICLE_COUNT_TOL)
    n = len(rows)
    return {
        "n": n,
        "size_within_10pct": size_ok,
        "count_within_15pct": count_ok,
        "size_share": round(size_ok / n, 4) if n else None,
        "count_share": round(count_ok / n, 4) if n else None,
        "abs_size_error": _quantiles(size_err),
        "abs_count_error": _quantiles(count_err),
        "median_iou": round(float(np.median([r["iou"] for r in rows if r["iou"] is not None])), 4) if n else None,
        "met": bool(n) and size_ok >= PARTICLE_SIZE_SHARE * n and count_ok >= PARTICLE_COUNT_SHARE * n,
        "per_image": rows,
    }


# ----------------------------------------------------------------------------- phases


def _soot_pairs(root: Path) -> list[tuple[str, Path, np.ndarray]]:
    out = []
    for path in sorted((root / "images").glob("*.png")):
        mask_path = root / "masks_slider" / f"{path.stem}.TIF"
        if mask_path.is_file():
            out.append((path.name, path, np.asarray(Image.open(mask_path)) > 0))
    return out


def _superalloy_pairs(root: Path) -> list[tuple[str, Path, np.ndarray]]:
    out = []
    for path in sorted((root / "images").glob("*.tif")):
        rgba = np.asarray(Image.open(root / "masks" / f"{path.stem}_mask.tif")).astype(int)
        r, g, b = rgba[..., 0], rgba[..., 1], rgba[..., 2]
        # The overlay paints the two precipitate classes pure blue and pure red over the
        # grayscale image, whose own pixels always have r == g == b.
        painted = ((b == 255) & (r == 0) & (g == 0)) | ((r == 255) & (g == 0) & (b == 0))
        out.append((path.name, path, painted))
    return out


def _nanomembrane_pairs(root: Path) -> list[tuple[str, Path, np.ndarray]]:
    out = []
    for folder in sorted(p for p in root.iterdir() if p.is_dir()):
        images = sorted((folder / "images").glob("*.png"))
        if not images:
            continue
        shape = load_gray(images[0]).shape
        union = np.zeros(shape, bool)
        for cls in ("2", "3", "4", "5", "6"):  # every grown object; 1 = the trench
            for mask_path in sorted((folder / "masks" / cls).glob("*.png")):
                rgba = np.asarray(Image.open(mask_path).convert("RGBA"))
                union |= rgba[..., 3] > 0
        out.append((images[0].name, images[0], union))
    return out


PHASES = {
    "soot": ("carbonblack_soot_tem", _soot_pairs, "soot aggregates", "TEM"),
    "superalloy": ("nasa_micronet_benchmark/Super1", _superalloy_pairs, None, "SEM"),
    "nanomembranes": ("deepsem_nanomembranes", _nanomembrane_pairs, None, "SEM"),
}


def phase(cfg: MeasureImagesConfig, name: str, root: Path) -> dict[str, Any]:
    _, pairs_fn, label, modality = PHASES[name]
    rows = []
    for image_name, path, truth in pairs_fn(root):
        image = load_gray(path)
        m, mask = analyse_array(image, cfg, image_id=image_name, label=label, modality=modality)
        frac = float(mask.mean())
        rows.append(
            {
                "file": image_name,
                "method": m.method,
                "count": m.object_count,
                "iou": _iou(mask, truth),
                "area_fraction": round(frac, 4),
                "area_fraction_truth": round(float(truth.mean()), 4),
                "fraction_error": _rel(frac, float(truth.mean())),
            }
        )
    ok = [
        r
        for r in rows
        if r["iou"] >= PHASE_IOU and r["fraction_error"] is not None and abs(r["fraction_error"]) <= PHASE_FRACTION_TOL
    ]
    return {
        "n": len(rows),
        "passing": len(ok),
        "median_iou": round(float(np.median([r["iou"] for r in rows])), 4) if rows else None,
        "met": bool(rows) and len(ok) == len(rows),
        "per_image": rows,
    }


# ----------------------------------------------------------------------------- main


def main() -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--only",
        choices=["particles", *PHASES, "nanowires"],
        action="append",
        help="run only these parts (repeatable); the JSON is written only for a full run",
    )
    args = parser.parse_args()
    parts = args.only or ["particles", *PHASES, "nanowires"]
    cfg = load_config(ROOT / "params.yaml")
    result: dict[str, Any] = {"skipped": {}}
    timings: dict[str, float] = {}

    for part in parts:
        t0 = time.perf_counter()
        folder = {
            "particles": "emps_particles",
            "nanowires": "deepsem_nanowires",
            **{k: v[0] for k, v in PHASES.items()},
        }[part]
        root = REAL / folder
        if not root.is_dir():
            reason = f"{root} not found (../shared/realdata is not next to this checkout)"
            print(f"skipping {part}: {reason}")
            result["skipped"][part] = reason
            continue
        if part == "particles":
            result[part] = particles(cfg.measure_images, root)
        elif part == "nanowires":
            from measure_synthetic import real_nanowires

            real = real_nanowires(root)
            if real is not None:
                real["met"] = (real["pearson_vs_nw"] or 0.0) >= NANOWIRE_PEARSON
            result[part] = real
        else:
            result[part] = phase(cfg.measure_images, part, root)
        timings[part] = round(time.perf_counter() - t0, 1)

    if args.only is None:
        write_json(ROOT / cfg.paths.metrics / "bench_measure_real.json", result)
    _print(result, timings)
    return result


def _pct(v: float | None) -> str:
    return "    -" if v is None else f"{100 * v:+6.1f}%"


def _print(result: dict[str, Any], timings: dict[str, float]) -> None:
    p = result.get("particles")
    if p:
        print(f"particles (EMPS, n={p['n']}, {timings['particles']} s)")
        print(
            f"  {'file':16s} {'method':10s} {'count':>5s} {'truth':>5s} {'err':>8s}"
            f" {'eqd px':>7s} {'truth':>6s} {'err':>8s} {'IoU':>5s}"
        )
        for r in p["per_image"]:
            print(
                f"  {r['file']:16s} {r['method']:10s} {r['count']:5d} {r['count_truth']:5d}"
                f" {_pct(r['count_error']):>8s} {r['median_eqd_px'] or 0:7.1f}"
                f" {r['median_eqd_truth_px']:6.1f} {_pct(r['size_error']):>8s}"
                f" {r['iou'] if r['iou'] is not None else 0:5.2f}"
            )
        print(
            f"  size within 10%: {p['size_within_10pct']}/{p['n']} (target >= 80%),"
            f" count within 15%: {p['count_within_15pct']}/{p['n']} (target >= 70%),"
            f" median IoU {p['median_iou']}"
        )
        print(f"  |size err| quantiles {p['abs_size_error']}")
        print(f"  |count err| quantiles {p['abs_count_error']}")
    for name in PHASES:
        r = result.get(name)
        if not r:
            continue
        print(
            f"{name} (n={r['n']}, {timings[name]} s): IoU >= {PHASE_IOU} and fraction"
            f" within {int(100 * PHASE_FRACTION_TOL)}% on {r['passing']}/{r['n']}"
        )
        for row in r["per_image"]:
            print(
                f"  {row['file']:28s} {row['method']:10s} IoU {row['iou']:.3f} fraction"
                f" {row['area_fraction']:.4f} vs {row['area_fraction_truth']:.4f}"
                f" ({_pct(row['fraction_error'])})"
            )
    nw = result.get("nanowires")
    if nw:
        print(
            f"nanowire tiles (n={nw['n_tiles']}): Pearson vs NW {nw['pearson_vs_nw']}"
            f" (target >= {NANOWIRE_PEARSON}), Spearman {nw['spearman_vs_nw']},"
            f" mean measured {nw['mean_measured_count']} vs labelled {nw['mean_labelled_nw']}"
        )
    for part, reason in result["skipped"].items():
        print(f"skipped {part}: {reason}")


if __name__ == "__main__":
    main()
