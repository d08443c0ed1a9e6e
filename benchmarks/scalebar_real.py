"""Benchmark of the image's own scale: pixel size from burned-in scale bars, and databars.

Reads the real micrographs in ``../shared/realdata/images`` (relative to the project root;
used by path, never copied) with the ingest stage's own functions: decode, vendor tags,
databar detection, ``scalebar.image_scale``. For every file whose vendor tag gives a pixel
size and which carries a burned-in scale bar, the pixel size read from the bar (OCR of its
label over its length) is compared with the tag; every file's databar crop is reported
with how it was found. Writes ``<paths.metrics>/bench_scalebar.json`` and prints a table.
Exits non-zero when the real data is missing.

Which files carry a bar is ground truth taken by eye (``WITH_BAR``), so a bar the reader
misses counts as a miss rather than silently dropping out of the pass rate.

Run from the project root: ``.venv/bin/python benchmarks/scalebar_real.py``
"""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Any

from semilens.config import load_config
from semilens.images.databar import detect_databar
from semilens.images.metadata import file_metadata
from semilens.images.readers import IMAGE_EXTENSIONS, decode, to_gray8
from semilens.images.scalebar import image_scale, read_hfw
from semilens.io import write_json

ROOT = Path(__file__).resolve().parents[1]
REAL = ROOT.parent / "shared" / "realdata" / "images"
TOLERANCE = 0.02
# Files with a burned-in scale bar (looked at one by one).
WITH_BAR = {
    "125nm_03.tif",
    "130nm_05.tif",
    "130nm_06.tif",
    "135nm_07.tif",  # Zeiss H-bar, 1 um
    "test_tiff_Zeiss_SEM_512pix.tif",
    "test_tiff_Zeiss_SEM_1k.tif",  # Zeiss H-bar
    "10%_gelatin_fibers.tif",
    "20%_gelatin_fibers.tif",  # FEI bar, label in its gap
    "Example_thick_fibers.tif",
    "Example_thin_fibers.tif",  # FEI bar, databar text blanked
    "Indent_20230912_7kV_spot4.5_FOV100um_multiBSE_A_05.tif",
    "P33_scale1_detectorA.tif",
    "FEI-Helios-Ebeam-8bits.tif",  # FEI bar on a blank frame
    "TVIPS_bin4.tif",  # TEM camera frame, bar in a white box in a corner
}
# Files known to carry no bar: a length read from them is a false read. (The EMPS crops
# of journal figures carry bars on some images and no tags: reported, not scored.)
NO_BAR = (
    "deepsem_nanowires/fullres/",
    "deepsem_nanomembranes/",
    "nasa_micronet_benchmark/",
    "carbonblack_soot_tem/",
    "ZEISS_SEM_multipage.tif",
)
NOT_MICROGRAPHS = ("masks", "masks_slider", "segmaps", "labels")


def _files(root: Path) -> list[Path]:
    return sorted(
        p
        for p in root.rglob("*")
        if p.is_file()
        and p.suffix.lower() in IMAGE_EXTENSIONS
        and not set(p.relative_to(root).parts[:-1]) & set(NOT_MICROGRAPHS)
        and "_mask." not in p.name
        and "/tiles/" not in p.as_posix()  # crops of fullres/, no bar, no tags
    )


def one(path: Path, clip: tuple[float, float]) -> dict[str, Any]:
    decoded = decode(path.read_bytes(), path, 64_000_000, 16)
    page = decoded.pages[0]
    gray = to_gray8(page.pixels, clip)
    meta = file_metadata(page.tags, gray.shape[1])
    bar = detect_databar(gray, meta.image_rows)
    start = time.perf_counter()
    scale = image_scale(gray, bar.rows)
    seconds = time.perf_counter() - start
    row: dict[str, Any] = {
        "file": path.relative_to(REAL).as_posix(),
        "dtype": page.original_dtype,
        "size": list(gray.shape),
        "databar_rows": bar.rows,
        "databar_method": bar.method if bar.rows else None,
        "has_bar": path.name in WITH_BAR,
        "tag_nm": meta.pixel_size_nm,
        "tag_source": meta.pixel_size_source,
        "image_nm": scale.pixel_size_nm,
        "image_source": scale.source,
        "confidence": scale.confidence,
        "bar_length_px": scale.bar.length_px if scale.bar else None,
        "bar_ends": scale.bar.ends if scale.bar else None,
        "label": scale.label.text if scale.label else None,
        "reason": scale.reason,
        "seconds": round(seconds, 2),
    }
    if meta.pixel_size_nm and scale.pixel_size_nm:
        row["rel_error"] = round(scale.pixel_size_nm / meta.pixel_size_nm - 1.0, 4)
    # The databar's field width, read on its own (ingest uses it only when no bar reads).
    hfw = read_hfw(gray, bar.rows) if bar.rows else None
    row["hfw_text"] = hfw[1] if hfw else None
    row["hfw_nm"] = round(hfw[0] / gray.shape[1], 4) if hfw else None
    if hfw and meta.pixel_size_nm:
        row["hfw_rel_error"] = round(row["hfw_nm"] / meta.pixel_size_nm - 1.0, 4)
    return row


def main() -> int:
    if not REAL.is_dir():
        print(f"real data not found at {REAL}", file=sys.stderr)
        return 1
    cfg = load_config(ROOT / "params.yaml")
    rows = [one(p, cfg.ingest_images.percentile_clip) for p in _files(REAL)]
    checked = [r for r in rows if r["has_bar"] and r["tag_nm"]]
    passed = [r for r in checked if r.get("rel_error") is not None and abs(r["rel_error"]) <= TOLERANCE]
    no_tag = [r for r in rows if r["has_bar"] and not r["tag_nm"]]
    false_reads = [r for r in rows if any(k in r["file"] for k in NO_BAR) and r["image_nm"] is not None]
    unscored = [r for r in rows if "emps_particles/" in r["file"]]
    summary = {
        "tolerance": TOLERANCE,
        "n_files": len(rows),
        "n_with_tag_and_bar": len(checked),
        "n_within_tolerance": len(passed),
        "failures": [r["file"] for r in checked if r not in passed],
        "bar_only_read": sum(r["image_nm"] is not None for r in no_tag),
        "bar_only_total": len(no_tag),
        "false_reads_without_bar": [r["file"] for r in false_reads],
        "n_no_bar_files": sum(any(k in r["file"] for k in NO_BAR) for r in rows),
        "emps_read": {r["file"]: r["label"] for r in unscored if r["image_nm"] is not None},
        "n_databar_cropped": sum(r["databar_rows"] > 0 for r in rows),
        "hfw_read": {r["file"]: r.get("hfw_rel_error") for r in rows if r["hfw_text"]},
        "hfw_within_tolerance": sum(
            r.get("hfw_rel_error") is not None and abs(r["hfw_rel_error"]) <= TOLERANCE for r in rows
        ),
        "seconds_total": round(sum(r["seconds"] for r in rows), 1),
        "files": rows,
    }
    write_json(ROOT / cfg.paths.metrics / "bench_scalebar.json", summary)
    print(f"{'file':48s} {'tag nm':>9s} {'image nm':>9s} {'err':>7s} {'bar px':>7s} {'ends':6s} label")
    for r in rows:
        err = f"{r['rel_error']:+.1%}" if r.get("rel_error") is not None else ""
        print(
            f"{r['file'][-48:]:48s} {r['tag_nm'] or '':>9} {r['image_nm'] or '':>9} {err:>7s} "
            f"{r['bar_length_px'] or '':>7} {r['bar_ends'] or '':6s} {r['label'] or ''}"
        )
    print(
        f"\nwithin {TOLERANCE:.0%} of the tag: {len(passed)}/{len(checked)}; bar-only files read: "
        f"{summary['bar_only_read']}/{summary['bar_only_total']}; false reads: {len(false_reads)}; "
        f"databars cropped: {summary['n_databar_cropped']}; databar field widths read: "
        f"{len(summary['hfw_read'])}, within {TOLERANCE:.0%}: {summary['hfw_within_tolerance']}"
    )
    for r in rows:
        if r["databar_rows"]:
            print(f"  databar {r['file'][-48:]:48s} {r['databar_rows']:4d} rows  {r['databar_method']}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
