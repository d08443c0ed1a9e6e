"""ingest_images: raw + synthetic micrographs -> normalised 8-bit PNGs and one record each.

Reads everything under ``paths.raw_images`` (recursively; class sub-folders, ``<image>.json``
sidecars and ``metadata.csv`` allowed; the folder may be empty or absent) and the synthetic
set under ``paths.synthetic_images`` (``<class>/<id>.tif`` + ``<id>.json`` Sidecar). Files and
folders matching ``ingest_images.exclude`` (label masks, instance maps) are listed, never
read.
Writes ``<paths.interim_images>/png/<id>.png``, ``records.jsonl`` (records.ImageRecord, by
id) and ``quarantine.jsonl`` (records.QuarantineEntry, by source).
Run: ``python -m stages.ingest_images``.

Per-item work (decode, databar, normalise, PNG) is cached in ItemCache by the file's sha256
plus everything else that changes its record (path-derived label and group, sidecar
content, the ingest params), so adding one image to a thousand decodes one image. The
output folder is rebuilt each run in a hidden staging folder beside it and swapped in at
the end: a killed run leaves the previous outputs, never a half-written folder.
"""

from __future__ import annotations

import functools
import io
import os
import shutil
import stat
import tempfile
from dataclasses import dataclass, field
from fnmatch import fnmatchcase
from pathlib import Path, PurePosixPath
from typing import Any

import numpy as np

from semilens.cache import ItemCache, code_version
from semilens.config import Config, IngestImagesConfig
from semilens.executor import map_items
from semilens.images.databar import Databar, detect_databar, low_information
from semilens.images.metadata import (
    FOLDER_ROW,
    SIDECAR_CSV,
    FileMeta,
    SidecarError,
    assign_groups,
    file_metadata,
    folder_label,
    load_metadata_csv,
    load_sidecar_json,
    sidecar_from_row,
)
from semilens.images.readers import Decoded, ReadError, decode, is_image_name, one_line, to_gray8
from semilens.images.records import ImageRecord, QuarantineEntry, Sidecar
from semilens.images.scalebar import ImageScale, find_panel_labels, image_scale
from semilens.io import atomic_write_bytes, display_path, leaves_folder, sha256_bytes, write_jsonl

STAGE = "ingest_images"
# The per-item cache is keyed by this code: any change recomputes every cached record.
VERSION = code_version(
    __name__,
    "semilens.images.readers",
    "semilens.images.metadata",
    "semilens.images.databar",
    "semilens.images.scalebar",
    "semilens.images.records",
)


# ---------------------------------------------------------------------------------------
# Discovery
# ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Candidate:
    """A file with an image extension found under an input root."""

    path: Path
    rel: PurePosixPath  # relative to its input root: drives label and group
    origin: str  # "raw" | "synthetic"


@dataclass
class Found:
    candidates: list[Candidate] = field(default_factory=list)
    quarantine: list[QuarantineEntry] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)  # not images: sidecars, README, ...
    excluded: list[str] = field(default_factory=list)  # images matching cfg.exclude


def source_of(path: Path) -> str:
    """The path relative to the project root (cwd), or as given when it lies outside."""
    absolute = Path(os.path.abspath(path))
    try:
        return display_path(absolute.relative_to(Path.cwd()).as_posix())
    except ValueError:
        return display_path(Path(path).as_posix())


def _quarantine(source: str, reason: str, sha256: str | None = None) -> QuarantineEntry:
    return QuarantineEntry(source=source, reason=reason, sha256=sha256, stage=STAGE)


def _excluded(rel: PurePosixPath, patterns: tuple[str, ...]) -> bool:
    """Case-insensitive glob match on the file name, the path under the input root, or,
    for a pattern ending in ``/``, any folder on the way (``masks/`` matches
    ``a/masks/3/x.png``; ``Super1/masks/`` matches that run of folders).

    Folder patterns exist because data sets keep their label masks and instance maps as
    images in folders of their own, named like the micrographs they annotate.
    """
    name, path = rel.name.lower(), rel.as_posix().lower()
    folders = [part.lower() for part in rel.parts[:-1]]
    for pattern in (p.lower() for p in patterns):
        if pattern.endswith("/"):
            run = pattern.rstrip("/").split("/")
            n = len(run)
            if any(
                all(fnmatchcase(f, q) for f, q in zip(folders[i : i + n], run)) for i in range(len(folders) - n + 1)
            ):
                return True
        elif fnmatchcase(name, pattern) or fnmatchcase(path, pattern):
            return True
    return False


def discover(root: Path, origin: str, exclude: tuple[str, ...], found: Found, own: tuple[Path, ...] = ()) -> None:
    """Walk ``root`` in sorted order, sorting entries into candidates, skips and quarantine.

    ``own`` are this stage's output and cache folders: never read back as inputs, even when
    a configuration puts them under an input root.
    """
    if not root.is_dir():
        return
    own_abs = {Path(os.path.abspath(p)) for p in own}
    for dirpath, dirnames, filenames in os.walk(root, followlinks=False):
        here = Path(dirpath)
        kept = []
        for d in sorted(dirnames):
            path = here / d
            # Hidden folders (.git, .dvc, editor caches) are not data; symlinked folders are
            # not followed (loops, data outside the tracked tree).
            if d.startswith(".") or path.is_symlink() or Path(os.path.abspath(path)) in own_abs:
                found.skipped.append(source_of(path) + "/")
                continue
            if is_image_name(d):
                # Still walked into: whatever it holds is judged on its own.
                found.quarantine.append(_quarantine(source_of(path), "a directory named like an image file"))
            kept.append(d)
        dirnames[:] = kept
        for name in sorted(filenames):
            path = here / name
            rel = PurePosixPath(path.relative_to(root).as_posix())
            # Hidden files include macOS "._x.tif" resource forks, which are not images.
            if name.startswith(".") or not is_image_name(name):
                found.skipped.append(source_of(path))
            elif leaves_folder(path, root):
                # Quarantined unread: its bytes (or hash) must not reach any output.
                found.quarantine.append(
                    _quarantine(source_of(path), f"symbolic link leaving {display_path(root)} (not followed, not read)")
                )
            elif _excluded(rel, exclude):
                found.excluded.append(source_of(path))
            else:
                found.candidates.append(Candidate(path, rel, origin))


# ---------------------------------------------------------------------------------------
# Sidecars
# ---------------------------------------------------------------------------------------


@dataclass
class SidecarIndex:
    """Sidecars of every folder, loaded once; problems are collected per sidecar file."""

    csv_rows: dict[Path, dict[str, tuple[int, dict[str, Any]]]] = field(default_factory=dict)
    problems: dict[str, list[str]] = field(default_factory=dict)

    def _problem(self, path: Path, reason: str) -> None:
        self.problems.setdefault(source_of(path), []).append(reason)

    def _csv(self, folder: Path) -> dict[str, tuple[int, dict[str, Any]]]:
        if folder not in self.csv_rows:
            rows: dict[str, tuple[int, dict[str, Any]]] = {}
            path = folder / SIDECAR_CSV
            if path.is_file():
                try:
                    rows, errors = load_metadata_csv(path)
                    for err in errors:
                        self._problem(path, err)
                except SidecarError as exc:
                    self._problem(path, str(exc))
            self.csv_rows[folder] = rows
        return self.csv_rows[folder]

    def lookup(self, image: Path) -> list[tuple[str, Sidecar, dict[str, Any]]]:
        """[(kind, Sidecar, raw dict)] for ``image``, JSON before CSV (precedence order).

        A bad value is reported (one line naming file, row and field) and only that field
        is dropped: the rest of the sidecar still counts, and the image is always kept.
        """
        found: list[tuple[str, Sidecar, dict[str, Any]]] = []
        json_path = image.with_suffix(".json")
        if json_path.is_file():
            try:
                sidecar, raw, problems = load_sidecar_json(json_path)
                found.append(("json", sidecar, raw))
                for problem in problems:
                    self._problem(json_path, problem)
            except SidecarError as exc:
                self._problem(json_path, str(exc))
        rows = self._csv(image.parent)
        line, row = rows.get(image.name, (0, None))
        folder_line, folder_row = rows.get(FOLDER_ROW, (0, None))
        if folder_row is not None:  # the folder's defaults under the image's own row
            line, row = (line or folder_line), {**folder_row, **(row or {})}
        if row is not None:
            csv_path = image.parent / SIDECAR_CSV
            try:
                sidecar, problems = sidecar_from_row(row, f"{SIDECAR_CSV} line {line} ({image.name})")
                found.append(("csv", sidecar, row))
                for problem in problems:
                    self._problem(csv_path, problem)
            except SidecarError as exc:
                self._problem(csv_path, str(exc))
        return found


# ---------------------------------------------------------------------------------------
# One file -> records (the cached unit of work)
# ---------------------------------------------------------------------------------------


def encode_png(gray: np.ndarray) -> bytes:
    """Deterministic 8-bit grayscale PNG (Pillow writes no timestamp chunk)."""
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(gray, mode="L").save(buf, format="PNG", compress_level=6)
    return buf.getvalue()


@dataclass(frozen=True)
class Context:
    """What a record needs besides the pixels: where the file sits and what was said of it."""

    origin: str
    sha256: str
    folder_label: str | None
    default_group: str
    sidecars: tuple[tuple[str, Sidecar], ...]


def _pick_label(ctx: Context) -> tuple[str | None, str]:
    for _, sc in ctx.sidecars:
        if sc.label:
            return sc.label, "sidecar"
    for _, sc in ctx.sidecars:
        if sc.ground_truth is not None:
            return sc.ground_truth.label, "ground_truth"
    if ctx.folder_label:
        return ctx.folder_label, "folder"
    return None, "none"


def _sidecar_pixel_size(ctx: Context) -> tuple[float, str] | None:
    for kind, sc in ctx.sidecars:
        if sc.pixel_size_nm:
            return sc.pixel_size_nm, f"sidecar:{kind}"
    return None


@dataclass(frozen=True)
class PixelSize:
    value: float | None
    source: str
    confidence: float | None
    note: str | None
    check: str | None = None  # "agree" | "disagree" when two sources gave one


def _pick_pixel_size(meta: FileMeta, ctx: Context, scale: ImageScale | None, tolerance: float) -> PixelSize:
    """Sidecar > vendor tag > the image's own scale bar; a tag is cross-checked.

    The person who wrote a sidecar knows the calibration best (a tag can be stale after a
    resize, see the Zeiss half-size sample); a tag was written at acquisition; the bar is
    read by OCR. When a tag and the bar both give one and differ by more than
    ``tolerance``, the tag is kept and the note says by how much they disagree.
    """
    note = scale.reason if scale is not None else None
    sidecar = _sidecar_pixel_size(ctx)
    if sidecar is not None:
        check = None
        if meta.pixel_size_nm:
            diff = sidecar[0] / meta.pixel_size_nm - 1.0
            check = "disagree" if abs(diff) > tolerance else "agree"
            if check == "disagree":
                note = (
                    f"{sidecar[1]} {sidecar[0]:g} nm overrides {meta.pixel_size_source} "
                    f"{meta.pixel_size_nm:g} nm ({diff:+.1%})"
                )
        return PixelSize(sidecar[0], sidecar[1], 1.0, note, check)
    image = scale.pixel_size_nm if scale is not None else None
    if meta.pixel_size_nm:
        tag = meta.pixel_size_nm
        source = meta.pixel_size_source or "file"
        verdict = None
        if image is not None and scale is not None:
            diff = image / tag - 1.0
            verdict = "disagree" if abs(diff) > tolerance else "agree"
            note = f"{source} {tag:g} nm and {scale.source} {image:g} nm {verdict} ({diff:+.1%}): {scale.reason}"
        return PixelSize(tag, source, 1.0, note, verdict)
    if image is not None and scale is not None and scale.source:
        return PixelSize(image, scale.source, scale.confidence, note)
    return PixelSize(None, "none", None, note)


def _png_overlays(scale: ImageScale | None, keep: int, width: int) -> list[tuple[int, int, int, int]]:
    """The scale bar's boxes that fall in the kept rows, clipped to the PNG."""
    if scale is None:
        return []
    out = []
    for x0, y0, x1, y1 in scale.overlays:
        x0, y0, x1, y1 = max(0, x0), max(0, y0), min(width, x1), min(keep, y1)
        if x1 > x0 and y1 > y0:
            out.append((x0, y0, x1, y1))
    return sorted(set(out))


def _pick_modality(meta: FileMeta, ctx: Context) -> str:
    if meta.modality:
        return meta.modality
    for _, sc in ctx.sidecars:
        if sc.modality:
            return sc.modality
    for _, sc in ctx.sidecars:
        if sc.ground_truth is not None:
            return sc.ground_truth.modality
    return "unknown"


def page_record(decoded: Decoded, index: int, ctx: Context, cfg: IngestImagesConfig) -> tuple[dict[str, Any], bytes]:
    """Record (without ``source``/``png``, which depend on paths, not content) and PNG."""
    page = decoded.pages[index]
    full = to_gray8(page.pixels, cfg.percentile_clip)
    height, width = full.shape
    meta = file_metadata(page.tags, width)
    bar = detect_databar(full, meta.image_rows)
    keep = height - bar.rows
    if keep < cfg.min_side:  # a "bar" that leaves no image is not a bar
        bar, keep = Databar(0, None), height
    # Deep data is normalised on the specimen rows only: the bar's pure black and white
    # would otherwise decide the percentiles.
    gray = full[:keep] if page.pixels.dtype == np.uint8 else to_gray8(page.pixels[:keep], cfg.percentile_clip)
    reason = low_information(gray, cfg.low_info_std, cfg.low_info_structure, cfg.low_info_spectrum)
    png = encode_png(gray)
    label, label_source = _pick_label(ctx)
    # The bar's geometry is always found; its label (a tesseract call) is read when no
    # sidecar settles the pixel size, or when the bar sits in the specimen area, where a
    # read label marks it as not specimen.
    if not cfg.read_scale_bars:
        mode = "none"
    elif _sidecar_pixel_size(ctx) is None:
        mode = "all"
    else:  # the sidecar settles the size; a bar in the specimen area is still masked
        mode = "image_area"
    scale = image_scale(full, bar.rows, ocr=mode)
    pixel = _pick_pixel_size(meta, ctx, scale, cfg.scale_check_tolerance)
    overlays = _png_overlays(scale, keep, width)
    # Panel letters are looked for in the PNG's own pixels (the specimen area), beside the
    # bar's boxes, which they never overlap.
    panels = find_panel_labels(gray, tuple(overlays)) if cfg.mask_panel_labels and reason is None else []
    instrument: dict[str, Any] = {}
    for _, sc in reversed(ctx.sidecars):  # JSON wins over CSV, the file over both
        instrument.update(sc.instrument)
    instrument.update(meta.instrument)
    group = next((sc.group for _, sc in ctx.sidecars if sc.group), ctx.default_group)
    truth = next((sc.ground_truth for _, sc in ctx.sidecars if sc.ground_truth), None)
    settings: dict[str, Any] = {}
    for _, sc in reversed(ctx.sidecars):  # JSON wins over CSV
        settings.update(sc.measure)
    record = {
        "id": f"{ctx.sha256[:16]}-p{page.index}",
        "origin": ctx.origin,
        "sha256": ctx.sha256,
        "format": decoded.format,
        "page": page.index,
        "n_pages": decoded.n_pages,
        "original_width": width,
        "original_height": height,
        "original_dtype": page.original_dtype,
        "width": width,
        "height": keep,
        "crop_box": (0, 0, width, keep),
        "databar": bar.method if bar.rows else None,
        "modality": _pick_modality(meta, ctx),
        "instrument": instrument,
        "pixel_size_nm": pixel.value,
        "pixel_size_source": pixel.source,
        "pixel_size_confidence": pixel.confidence,
        "pixel_size_check": pixel.check,
        "pixel_size_note": pixel.note,
        "label": label,
        "label_source": label_source,
        "group": group,
        "png_sha256": sha256_bytes(png),
        "low_information": reason is not None,
        "low_information_reason": reason,
        "ground_truth": truth.model_dump(mode="json") if truth else None,
        "measure_settings": settings,
        "overlays": sorted(set(overlays) | {p.box for p in panels}),
        "panel_labels": [{"text": p.text, "box": p.box, "confidence": p.confidence} for p in panels],
    }
    return record, png


def ingest_bytes(data: bytes, path: Path, ctx: Context, cfg: IngestImagesConfig) -> dict[str, Any]:
    """The cache value for one file: records, PNG sizes, and any problem (one line)."""
    try:
        decoded = decode(data, path, cfg.max_pixels, cfg.min_side)
    except ReadError as exc:
        return {"records": [], "png_sizes": [], "problem": str(exc)}
    records, pngs, problems = [], [], list(decoded.page_errors)
    for index in range(len(decoded.pages)):
        try:
            record, png = page_record(decoded, index, ctx, cfg)
        except Exception as exc:  # noqa: BLE001 - one bad page must not stop the run
            problems.append(f"page {decoded.pages[index].index}: {one_line(exc)}")
            continue
        records.append(record)
        pngs.append(png)
    return {
        "records": records,
        "png_sizes": [len(p) for p in pngs],
        "problem": "; ".join(problems) or None,
        "_pngs": pngs,
    }


# ---------------------------------------------------------------------------------------
# The stage
# ---------------------------------------------------------------------------------------

_PNG_BLOB = ".pngs"  # all pages' PNGs of one file, concatenated; sizes in the value


def _read_regular(path: Path) -> bytes:
    """File bytes, refusing what is not a regular file before opening it.

    Opening a FIFO would block forever and a device could be endless, so ``lstat``/``stat``
    decide first; the reason names what the path really is.
    """
    try:
        st = os.stat(path)
    except FileNotFoundError as exc:
        if os.path.islink(path):
            raise ReadError(f"broken symbolic link (-> {display_path(os.readlink(path))})") from exc
        raise ReadError("file disappeared during the run") from exc
    except OSError as exc:
        raise ReadError(f"cannot stat: {one_line(exc)}") from exc
    if not stat.S_ISREG(st.st_mode):
        kind = "FIFO" if stat.S_ISFIFO(st.st_mode) else "device/socket"
        raise ReadError(f"not a regular file ({kind})")
    try:
        return path.read_bytes()
    except OSError as exc:
        raise ReadError(f"cannot read: {one_line(exc)}") from exc


def _cached_pngs(cache: ItemCache, key: str, value: dict[str, Any]) -> list[bytes] | None:
    """The PNGs of a cached entry, or None when the blob does not match its records."""
    try:
        blob = cache.blob_path(key, _PNG_BLOB).read_bytes()
        sizes, records = value["png_sizes"], value["records"]
    except (OSError, KeyError, TypeError):
        return None
    if sum(sizes) != len(blob) or len(sizes) != len(records):
        return None
    pngs, offset = [], 0
    for record, size in zip(records, sizes):
        pngs.append(blob[offset : offset + size])
        offset += size
        if sha256_bytes(pngs[-1]) != record.get("png_sha256"):
            return None
    return pngs


def _build(value: dict[str, Any], source: str, out_dir: Path) -> list[ImageRecord]:
    return [
        ImageRecord.model_validate({**r, "source": source, "png": source_of(out_dir / "png" / f"{r['id']}.png")})
        for r in value["records"]
    ]


def _cached_records(
    cache: ItemCache, key: str, source: str, out_dir: Path
) -> tuple[list[ImageRecord], list[bytes], str | None] | None:
    """Records, PNGs and problem of one file from the cache, or None to compute them.

    A cached entry that is damaged (torn blob) or no longer validates against the record
    schema is recomputed and counted as a miss, never trusted and never fatal.
    """
    value = cache.get(key, blobs=(_PNG_BLOB,))
    if value is None:
        return None
    pngs = _cached_pngs(cache, key, value)
    try:
        if pngs is not None:
            return _build(value, source, out_dir), pngs, value.get("problem")
    except ValueError:  # pydantic's ValidationError: a record from an older schema
        pass
    cache.hits, cache.misses = cache.hits - 1, cache.misses + 1
    return None


@dataclass(frozen=True)
class _Job:
    """One file to ingest on a worker: what its record needs besides its bytes."""

    path: Path
    key: str
    ctx: Context
    source: str


def _ingest_uncached(
    job: _Job, cfg: IngestImagesConfig, cache_root: str, out_dir: Path
) -> tuple[list[ImageRecord], list[bytes], str | None]:
    """Records, PNGs and problem of one file, computed and cached (in a worker process).

    The bytes are read again here rather than sent: the parent read them for the hash,
    and a path is cheaper to hand over than a 100 MB TIFF.
    """
    cache = ItemCache(Path(cache_root), STAGE, VERSION)
    try:
        data = _read_regular(job.path)
    except ReadError as exc:  # changed or removed since the parent hashed it: not cached
        return [], [], str(exc)
    value = ingest_bytes(data, job.path, job.ctx, cfg)
    pngs = value.pop("_pngs", [])
    cache.put(job.key, value, blobs={_PNG_BLOB: b"".join(pngs)})
    return _build(value, job.source, out_dir), pngs, value["problem"]


def _clean_leftovers(out_dir: Path) -> None:
    """Remove staging/old folders a killed run may have left beside the output folder."""
    if not out_dir.parent.is_dir():
        return
    for pattern in (f".{out_dir.name}.staging-*", f".{out_dir.name}.old-*"):
        for stale in out_dir.parent.glob(pattern):
            shutil.rmtree(stale, ignore_errors=True)


def _swap_in(staging: Path, out_dir: Path) -> None:
    """Replace ``out_dir`` by ``staging`` with renames (each atomic on one file system)."""
    old = None
    if out_dir.exists():
        old = Path(tempfile.mkdtemp(dir=out_dir.parent, prefix=f".{out_dir.name}.old-"))
        os.rmdir(old)
        os.rename(out_dir, old)
    os.rename(staging, out_dir)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def ingest_images(cfg: Config) -> dict[str, Any]:
    """Run the stage: write the outputs under ``cfg.paths.interim_images``; return a summary."""
    from semilens.stage_runner import console

    icfg = cfg.ingest_images
    found = Found()
    own = (Path(cfg.paths.interim_images), Path(cfg.paths.cache))
    for root, origin in ((cfg.paths.raw_images, "raw"), (cfg.paths.synthetic_images, "synthetic")):
        discover(Path(root), origin, icfg.exclude, found, own)

    cache = ItemCache(cfg.paths.cache, STAGE, VERSION)
    # The exclude list decides which files are looked at, not what a file's record says.
    # label_aliases acts through the folder label, which is in the key itself.
    params = icfg.model_dump(mode="json", exclude={"exclude", "label_aliases"})
    classes = tuple(cfg.synth_images.classes)
    # Groups depend on the neighbours of a file (its tiles, its full frame in a sibling
    # folder), so they are decided once from all paths of each input root.
    groups = {
        origin: assign_groups([c.rel for c in found.candidates if c.origin == origin])
        for origin in ("raw", "synthetic")
    }
    sidecars = SidecarIndex()
    out_dir = Path(cfg.paths.interim_images)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    _clean_leftovers(out_dir)
    staging = Path(tempfile.mkdtemp(dir=out_dir.parent, prefix=f".{out_dir.name}.staging-"))
    png_dir = staging / "png"
    png_dir.mkdir()

    records: list[ImageRecord] = []
    quarantine = list(found.quarantine)
    seen: dict[str, str] = {}  # sha256 -> source of the first copy
    unlabelled: dict[str, int] = {}  # folder under the raw root -> images without a label
    try:
        # Settled here, in sorted order: unreadable files, duplicates and cache hits. The
        # rest are decoded on `executor.workers` processes (each caches its own file) and
        # merged back in the same order, so the outputs do not depend on the count.
        steps: list[tuple[Candidate, _Job, tuple[list[ImageRecord], list[bytes], str | None] | None]] = []
        for cand in found.candidates:
            source = source_of(cand.path)
            try:
                data = _read_regular(cand.path)
            except ReadError as exc:
                quarantine.append(_quarantine(source, str(exc)))
                continue
            sha = sha256_bytes(data)
            if sha in seen:
                # Same bytes twice would give two records with one id (and one specimen
                # on both sides of a split); the first copy in sorted order is kept.
                quarantine.append(_quarantine(source, f"duplicate of {seen[sha]}", sha))
                continue
            seen[sha] = source
            found_sidecars = sidecars.lookup(cand.path)
            ctx = Context(
                origin=cand.origin,
                sha256=sha,
                folder_label=folder_label(cand.rel, classes, icfg.label_aliases),
                default_group=groups[cand.origin][cand.rel],
                sidecars=tuple((kind, sc) for kind, sc, _ in found_sidecars),
            )
            key = cache.key(
                sha,
                cand.origin,
                ctx.folder_label,
                ctx.default_group,
                [(kind, raw) for kind, _, raw in found_sidecars],
                params,
            )
            job = _Job(cand.path, key, ctx, source)
            steps.append((cand, job, _cached_records(cache, key, source, out_dir)))
        work = functools.partial(_ingest_uncached, cfg=icfg, cache_root=str(cfg.paths.cache), out_dir=out_dir)
        todo = [job for _, job, known in steps if known is None]
        done = iter(map_items(work, todo, executor=cfg.executor, description=STAGE, console=console))
        for cand, job, known in steps:
            made, pngs, problem = known if known is not None else next(done)
            for record, png in zip(made, pngs):
                atomic_write_bytes(png_dir / f"{record.id}.png", png)
            records.extend(made)
            if cand.origin == "raw" and any(r.label is None for r in made):
                folder = cand.rel.parent.as_posix()
                unlabelled[folder] = unlabelled.get(folder, 0) + 1
            if problem:
                quarantine.append(_quarantine(job.source, problem, job.ctx.sha256))

        for source, problems in sidecars.problems.items():
            quarantine.append(_quarantine(source, "; ".join(problems)))
        records.sort(key=lambda r: r.id)
        quarantine.sort(key=lambda q: (q.source, q.reason))
        write_jsonl(staging / "records.jsonl", (r.model_dump(mode="json") for r in records))
        write_jsonl(staging / "quarantine.jsonl", (q.model_dump(mode="json") for q in quarantine))
        _swap_in(staging, out_dir)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    if unlabelled:
        # Not an error (measurements and captions need no class), but the class questions
        # of these images will be missing: say which folders to name or alias.
        console.print(
            f"[yellow]ingest_images: {sum(unlabelled.values())} raw images have no label; "
            f"folders {', '.join(sorted(unlabelled))} name no class of "
            "synth_images.classes: add them to ingest_images.label_aliases[/yellow]"
        )

    n_files = len({r.sha256 for r in records})
    return {
        "inputs": [source_of(Path(p)) for p in (cfg.paths.raw_images, cfg.paths.synthetic_images)],
        "output": source_of(out_dir),
        "n_candidates": len(found.candidates),
        "n_files_ingested": n_files,
        "n_records": len(records),
        "n_quarantined": len(quarantine),
        "n_skipped": len(found.skipped),
        "n_excluded": len(found.excluded),
        "n_low_information": sum(r.low_information for r in records),
        "n_databar_cropped": sum(r.databar is not None for r in records),
        "n_with_pixel_size": sum(r.pixel_size_nm is not None for r in records),
        "n_unlabelled": sum(unlabelled.values()),
        "unlabelled_folders": sorted(unlabelled),
        "cache": cache.stats(),
        "skipped": found.skipped,
        "excluded": found.excluded,
    }
