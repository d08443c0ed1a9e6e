"""Per-item stages on 1 and 2 worker processes, and how their cost grows with the input.

In a scratch project (nothing of this checkout's data or cache is touched) this runs the
stages' own functions as the pipeline does:

- ``ingest_images`` and ``measure_images`` on ``--images`` synthetic images (every class;
  the real micrographs of ``../shared/realdata/images`` too with ``--real``), and
  ``extract_pdfs`` on the synthetic corpus plus the real PDFs of ``../shared/realdata/pdfs``
  when that folder is there; each on 1 worker and on 2, from an empty cache, checking the
  outputs and the cache are the same bytes;
- ``measure_images`` on 2 workers over the first 100, 500 and 2,000 synthetic images
  (``--scale``), in seconds per image: linear growth keeps it flat;
- with ``--ray``, each of the three stages a third time as Ray tasks on a two-node cluster
  started here on loopback (a head and a worker node, one CPU each, as two machines of one
  core would be), from an empty cache, checking the outputs are the local runs' bytes.

Writes ``<paths.metrics>/bench_parallel_items.json`` and prints a table. Run from the
project root on an otherwise idle machine:
``.venv/bin/python benchmarks/parallel_items.py [--images 104] [--scale 100,500,2000] [--only pdfs] [--ray]``

The cache is compared less the OCR seconds a page entry records (for the file's OCR
budget): a measured time, different on every run, one worker or two.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from semilens.config import Config, load_config
from semilens.io import read_jsonl, write_json, write_jsonl

ROOT = Path(__file__).resolve().parents[1]
REAL = ROOT.parent / "shared" / "realdata"


def _digest(*paths: Path) -> str:
    """One hash over every file under ``paths`` (names and bytes, in sorted order)."""
    h = hashlib.sha256()
    for root in paths:
        files = [root] if root.is_file() else sorted(p for p in root.rglob("*") if p.is_file())
        for p in files:
            h.update(str(p.relative_to(root.parent)).encode())
            h.update(p.read_bytes())
    return h.hexdigest()


def _cache_digest(root: Path) -> str:
    """``_digest`` of a cache, less the OCR seconds a page entry records for the file's OCR
    budget: a measured time, different on every run whatever the worker count."""
    h = hashlib.sha256()
    for p in sorted(q for q in root.rglob("*") if q.is_file()):
        data = p.read_bytes()
        if p.suffix == ".json":
            value = json.loads(data)
            if isinstance(value.get("value"), dict):
                value["value"].pop("ocr_s", None)
            data = json.dumps(value, sort_keys=True).encode()
        h.update(str(p.relative_to(root)).encode())
        h.update(data)
    return h.hexdigest()


def _with(cfg: Config, **sections: dict[str, Any]) -> Config:
    return cfg.model_copy(update={k: getattr(cfg, k).model_copy(update=v) for k, v in sections.items()})


def _timed(fn: Any, cfg: Config) -> tuple[float, dict[str, Any]]:
    start = time.perf_counter()
    summary = fn(cfg)
    return time.perf_counter() - start, summary


def one_and_two(
    fn: Any, cfg: Config, outputs: list[Path], items: int, ray_address: str | None = None
) -> dict[str, Any]:
    """``fn`` (a stage) on 1 and on 2 workers from an empty cache: seconds, items/s, same
    bytes; and as Ray tasks on the cluster at ``ray_address`` when one is given."""
    executors: dict[str, dict[str, Any]] = {"workers_1": {"workers": 1}, "workers_2": {"workers": 2}}
    if ray_address:
        executors["ray_2_nodes"] = {"kind": "ray", "address": ray_address, "workers": 2}
    runs = {}
    for name, executor in executors.items():
        shutil.rmtree(cfg.paths.cache, ignore_errors=True)
        seconds, summary = _timed(fn, _with(cfg, executor=executor))
        runs[name] = {
            "seconds": round(seconds, 2),
            "items_per_s": round(items / seconds, 3),
            "outputs_sha256": _digest(*outputs),
            "cache_sha256": _cache_digest(Path(cfg.paths.cache)),
            "cache": summary["cache"],
        }
    result = {
        "items": items,
        **runs,
        "speedup": round(runs["workers_1"]["seconds"] / runs["workers_2"]["seconds"], 3),
        "same_outputs": len({r["outputs_sha256"] for r in runs.values()}) == 1,
        "same_cache": len({r["cache_sha256"] for r in runs.values()}) == 1,
    }
    return result


@contextmanager
def ray_cluster() -> Iterator[str]:
    """A head and a worker node on loopback, one CPU each; yields the address, stops both."""
    from semilens.launch import free_port

    ray = str(Path(sys.executable).parent / "ray")
    port = free_port()
    node = ["--node-ip-address", "127.0.0.1", "--num-cpus", "1", "--disable-usage-stats"]
    try:
        subprocess.run(
            [ray, "start", "--head", "--port", str(port), "--include-dashboard", "false", *node],
            check=True,
            capture_output=True,
        )
        subprocess.run([ray, "start", "--address", f"127.0.0.1:{port}", *node], check=True, capture_output=True)
        yield f"127.0.0.1:{port}"
    finally:
        import ray as ray_module

        ray_module.shutdown()
        subprocess.run([ray, "stop", "--force"], capture_output=True)


def main() -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=104, help="synthetic images for the 1-vs-2 comparison")
    parser.add_argument("--real", action="store_true", help="add ../shared/realdata/images to that comparison")
    parser.add_argument("--scale", default="100,500,2000", help="image counts for the growth measurement")
    parser.add_argument(
        "--only",
        choices=["images", "pdfs", "growth"],
        action="append",
        help="run only these parts (repeatable); their results replace those in the JSON",
    )
    parser.add_argument("--ray", action="store_true", help="also run each stage on a two-node Ray cluster")
    args = parser.parse_args()
    parts = set(args.only or ["images", "pdfs", "growth"])
    sizes = [int(s) for s in args.scale.split(",") if s]
    shipped = load_config(ROOT / "params.yaml")
    out_json = ROOT / shipped.paths.metrics / "bench_parallel_items.json"
    result: dict[str, Any] = json.loads(out_json.read_text()) if args.only and out_json.is_file() else {}
    result["cores"] = len(os.sched_getaffinity(0))
    work = Path(tempfile.mkdtemp(prefix="semilens-parallel-"))
    here = Path.cwd()
    try:
        os.chdir(work)
        shutil.copytree(ROOT / "knowledge", work / "knowledge")
        cfg = Config.model_validate(shipped.model_dump(mode="json"))
        classes = len(cfg.synth_images.classes)

        with ray_cluster() if args.ray else _no_cluster() as address:
            if "images" in parts:
                _images(args, cfg, classes, result, address)
            if "pdfs" in parts:
                _pdfs(cfg, result, address)
        if "growth" in parts:
            _growth(cfg, classes, sizes, result)
    finally:
        os.chdir(here)
        shutil.rmtree(work, ignore_errors=True)

    write_json(out_json, result)
    _print(result)
    return result


@contextmanager
def _no_cluster() -> Iterator[None]:
    yield None


def _images(args: argparse.Namespace, cfg: Config, classes: int, result: dict[str, Any], ray: str | None) -> None:
    """ingest_images and measure_images on 1 and 2 workers."""
    from semilens.images.ingest import ingest_images
    from semilens.images.measure import measure_images
    from semilens.images.synth import synth_images

    cfg = _with(cfg, synth_images={"n_per_class": -(-args.images // classes)})
    synth_images(cfg.synth_images, Path(cfg.paths.synthetic_images))
    if args.real and (REAL / "images").is_dir():
        shutil.copytree(REAL / "images", cfg.paths.raw_images)
    n_files = sum(1 for p in Path(cfg.paths.synthetic_images).rglob("*.tif"))
    n_files += sum(1 for p in Path(cfg.paths.raw_images).rglob("*") if p.is_file())
    result["ingest_images"] = one_and_two(ingest_images, cfg, [Path(cfg.paths.interim_images)], n_files, ray)
    records = sum(1 for _ in read_jsonl(Path(cfg.paths.interim_images) / "records.jsonl"))
    outputs = [Path(cfg.paths.measurements), Path(cfg.paths.metrics) / "measure.json"]
    result["measure_images"] = one_and_two(measure_images, cfg, outputs, records, ray)
    shutil.rmtree(cfg.paths.raw_images, ignore_errors=True)


def _pdfs(cfg: Config, result: dict[str, Any], ray: str | None) -> None:
    """extract_pdfs on 1 and 2 workers: the synthetic corpus and the real PDFs."""
    from semilens.text.corpus import synth_corpus
    from semilens.text.extract import extract_pdfs

    synth_corpus(cfg)
    if (REAL / "pdfs").is_dir():
        shutil.copytree(REAL / "pdfs", cfg.paths.raw_pdfs, ignore=shutil.ignore_patterns("*.txt", "*.md"))
    n_pdfs = sum(1 for p in Path(cfg.paths.raw_pdfs).rglob("*.pdf"))
    n_pdfs += sum(1 for p in Path(cfg.paths.synthetic_pdfs).rglob("*.pdf"))
    result["extract_pdfs"] = one_and_two(extract_pdfs, cfg, [Path(cfg.paths.pages)], n_pdfs, ray)


def _growth(cfg: Config, classes: int, sizes: list[int], result: dict[str, Any]) -> None:
    """measure_images on 2 workers over the first ``sizes`` of one ingested synthetic set."""
    from semilens.images.ingest import ingest_images
    from semilens.images.measure import measure_images
    from semilens.images.synth import synth_images

    big = _with(cfg, synth_images={"n_per_class": -(-max(sizes) // classes)}, executor={"workers": 2})
    synth_images(big.synth_images, Path(big.paths.synthetic_images))
    ingest_images(big)
    every = list(read_jsonl(Path(big.paths.interim_images) / "records.jsonl"))
    growth = []
    for size in sizes:
        write_jsonl(Path(big.paths.interim_images) / "records.jsonl", every[:size])
        shutil.rmtree(big.paths.cache, ignore_errors=True)
        seconds, _ = _timed(measure_images, big)
        growth.append({"images": size, "seconds": round(seconds, 2), "seconds_per_image": round(seconds / size, 4)})
    per_image = [g["seconds_per_image"] for g in growth]
    result["measure_growth_2_workers"] = {
        "runs": growth,
        "per_image_ratio_largest_to_smallest": round(per_image[-1] / per_image[0], 3) if per_image else None,
    }


def _print(result: dict[str, Any]) -> None:
    for stage in ("ingest_images", "measure_images", "extract_pdfs"):
        r = result.get(stage)
        if r:
            print(
                f"{stage:15s} {r['items']:5d} items: 1 worker {r['workers_1']['seconds']:7.1f} s"
                f" ({r['workers_1']['items_per_s']:.2f}/s), 2 workers {r['workers_2']['seconds']:7.1f} s"
                f" ({r['workers_2']['items_per_s']:.2f}/s), speedup {r['speedup']:.2f}x,"
                f" same outputs {r['same_outputs']}, same cache {r['same_cache']}"
            )
            if "ray_2_nodes" in r:
                ray = r["ray_2_nodes"]
                print(f"{'':15s} on a two-node Ray cluster {ray['seconds']:7.1f} s ({ray['items_per_s']:.2f}/s)")
    for g in result.get("measure_growth_2_workers", {}).get("runs", []):
        print(
            f"measure_images on 2 workers, {g['images']:5d} images: {g['seconds']:7.1f} s, {g['seconds_per_image']} s/image"
        )


if __name__ == "__main__":
    main()
