"""Benchmark of measure_images: synthetic truth per class, and real labelled nanowire tiles.

Reads nothing from the pipeline's outputs: it draws a larger synthetic set in memory with
the synth_images functions (``--n`` per class, same seed rule as the stage), crops each
databar with ``ground_truth.databar_height_px`` and measures the frame with the same
``measure_array`` the stage uses. It then measures the DeepSEM nanowire tiles in
``../shared/realdata/images/deepsem_nanowires`` (relative to the project root; never copied
into the repository) without a pixel size and correlates the measured count with the
labelled counts. Writes ``<paths.metrics>/bench_measure.json`` and prints a table.

Run from the project root: ``.venv/bin/python benchmarks/measure_synthetic.py [--n 12]``
"""

from __future__ import annotations

import argparse
import csv
from pathlib import Path
from typing import Any

import numpy as np

from semilens.config import load_config
from semilens.images.measure import (
    TARGET_CLASSES,
    TARGET_ERROR,
    load_gray,
    measure_array,
    score,
    targets_met,
)
from semilens.images.synth import render_image
from semilens.io import write_json

ROOT = Path(__file__).resolve().parents[1]
REAL = ROOT.parent / "shared" / "realdata" / "images" / "deepsem_nanowires"


def synthetic(n: int) -> dict[str, Any]:
    """Per-class median relative count / size / pitch error on ``n`` fresh images each."""
    cfg = load_config(ROOT / "params.yaml")
    synth_cfg = cfg.synth_images.model_copy(update={"n_per_class": n})
    pairs = []
    for label in synth_cfg.classes:
        for index in range(n):
            img = render_image(label, index, synth_cfg)
            gt = img.sidecar.ground_truth
            assert gt is not None
            frame = img.pixels[: -gt.databar_height_px]
            m = measure_array(
                frame,
                cfg.measure_images,
                image_id=img.image_id,
                label=label,
                modality=gt.modality,
                pixel_size_nm=gt.pixel_size_nm,
            )
            pairs.append((gt, m))
    return score(pairs)


def _rank(x: np.ndarray) -> np.ndarray:
    from scipy.stats import rankdata

    return rankdata(x)


def _pearson(x: np.ndarray, y: np.ndarray) -> float | None:
    if len(x) < 3 or x.std() == 0 or y.std() == 0:
        return None
    return round(float(np.corrcoef(x, y)[0, 1]), 4)


def real_nanowires(root: Path = REAL) -> dict[str, Any] | None:
    """Measured wire count per tile vs the labelled NW and total (NW+Parasitic+Nanospade)."""
    labels_csv = root / "labels" / "DERIVED_bbox_counts_per_tile.csv"
    if not labels_csv.is_file():
        return None
    cfg = load_config(ROOT / "params.yaml").measure_images
    tiles, measured, nw, total = [], [], [], []
    with open(labels_csv, newline="") as fh:
        for row in csv.DictReader(fh):
            path = root / "tiles" / row["tile"]
            if not path.is_file():
                continue
            m = measure_array(load_gray(path), cfg, image_id=row["tile"], label="nanowires")
            tiles.append(row["tile"])
            measured.append(m.object_count)
            nw.append(int(row["NW"]))
            total.append(int(row["NW"]) + int(row["Parasitic"]) + int(row["Nanospade"]))
    x = np.asarray(measured, float)
    out: dict[str, Any] = {"n_tiles": len(tiles), "mean_measured_count": round(float(x.mean()), 2)}
    for name, y in (("nw", np.asarray(nw, float)), ("total", np.asarray(total, float))):
        out[f"pearson_vs_{name}"] = _pearson(x, y)
        out[f"spearman_vs_{name}"] = _pearson(_rank(x), _rank(y))
        out[f"mean_labelled_{name}"] = round(float(y.mean()), 2)
        out[f"median_rel_error_vs_{name}"] = round(float(np.median(np.abs(x - y) / y)), 4)
    out["per_tile"] = [
        {"tile": t, "measured": m, "nw": a, "total": b} for t, m, a, b in zip(tiles, measured, nw, total)
    ]
    return out


def _fmt(v: float | None) -> str:
    return "-" if v is None else f"{100 * v:5.1f}%"


def main() -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=12, help="synthetic images per class")
    args = parser.parse_args()

    per_class = synthetic(args.n)
    met = targets_met(per_class)
    result: dict[str, Any] = {
        "synthetic": {"n_per_class": args.n, "per_class": per_class},
        "target": {"max_median_error": TARGET_ERROR, "classes": list(TARGET_CLASSES), "met": met},
        "real_nanowires": real_nanowires(),
    }
    cfg = load_config(ROOT / "params.yaml")
    write_json(ROOT / cfg.paths.metrics / "bench_measure.json", result)

    print(f"{'class':14s} {'n':>3s} {'count err':>10s} {'size err':>9s} {'pitch err':>10s}")
    for label, row in per_class.items():
        print(
            f"{label:14s} {row['n']:3d} {_fmt(row['median_count_error']):>10s}"
            f" {_fmt(row['median_size_error']):>9s} {_fmt(row['median_pitch_error']):>10s}"
        )
    print("target (<=10% count and size) met:", met)
    real = result["real_nanowires"]
    if real is None:
        print("real nanowire tiles: not found at", REAL)
    else:
        print(f"real nanowire tiles (n={real['n_tiles']}), measured count vs labelled:")
        for name in ("nw", "total"):
            print(
                f"  {name:5s} mean {real['mean_labelled_' + name]:7.2f} (measured "
                f"{real['mean_measured_count']:.2f}), median |err| "
                f"{_fmt(real['median_rel_error_vs_' + name])}, Pearson "
                f"{real['pearson_vs_' + name]}, Spearman {real['spearman_vs_' + name]}"
            )
    return result


if __name__ == "__main__":
    main()
