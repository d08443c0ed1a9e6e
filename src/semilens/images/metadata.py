"""Instrument metadata, pixel size, labels and groups for one image.

Reads the vendor tags ``readers`` hands over (FEI/Thermo tag 34682, Zeiss tag 34118,
TVIPS tag 37706, ImageJ resolution, Gatan DM axes and tag tree) and the user's sidecars
(``<image>.json`` as ``records.Sidecar``, or a row of ``metadata.csv`` with a ``file``
column in the image's folder). Writes nothing; used by ``semilens.images.ingest``.

Precedence, decided here once:
- pixel size (decided in ``ingest``): sidecar JSON > metadata.csv > file metadata (tags, DM
  axes) > the image's own scale bar (``scalebar``) > none, because the person who wrote a
  sidecar knows the calibration (a tag goes stale when a frame is resized or
  recalibrated); a tag and a readable bar are cross-checked;
- modality: file metadata > sidecar > ground truth > unknown;
- label: sidecar > ground truth > the innermost folder that names a known class or a
  ``label_aliases`` key > none (a data set's or batch's folder name is not a class);
- group: sidecar > folder + file stem with any tile suffix (``_x1_y0``) stripped, joined
  with the tiles and full frame of one micrograph kept in sibling folders
  (``assign_groups``).
"""

from __future__ import annotations

import csv
import io
import math
import re
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

from semilens.images.records import Sidecar

Scalar = str | float | int

# Length units as vendors spell them -> nanometres per unit.
_NM_PER_UNIT = {
    "m": 1e9,
    "mm": 1e6,
    "um": 1e3,
    "µm": 1e3,
    "μm": 1e3,
    "micron": 1e3,
    "\\u00b5m": 1e3,  # ImageJ writes the micro sign escaped in its description
    "microns": 1e3,
    "micrometer": 1e3,
    "micrometre": 1e3,
    "nm": 1.0,
    "nanometer": 1.0,
    "nanometre": 1.0,
    "a": 0.1,
    "å": 0.1,
    "angstrom": 0.1,
    "pm": 1e-3,
}

# A tile of a larger micrograph: name_x1_y0, name-r2-c3, name_tile07 (case-insensitive).
_TILE_SUFFIX = re.compile(r"[_-](x\d+[_-]y\d+|r\d+[_-]c\d+|tile\d+)$", re.IGNORECASE)

SIDECAR_CSV = "metadata.csv"
# metadata.csv columns 'measure.<key>' carry measure_images settings; a row whose file is
# FOLDER_ROW applies to every image of the folder (an image's own row wins per column).
MEASURE_PREFIX = "measure."
FOLDER_ROW = "*"


def to_nm(value: Any, unit: Any) -> float | None:
    """A length in ``unit`` as nanometres, or None when it is not a positive length."""
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    factor = _NM_PER_UNIT.get(str(unit).strip().lower())
    if factor is None or not math.isfinite(number) or number <= 0:
        return None
    # 6 significant digits: more than any calibration holds, and it drops binary noise
    # (6.51042e-08 m -> 65.1042 nm, not 65.10419999999999; float32 DM scales likewise).
    return float(f"{number * factor:.6g}")


@dataclass
class FileMeta:
    """What the file itself says about how it was acquired."""

    vendor: str | None = None
    modality: str | None = None
    instrument: dict[str, Scalar] = field(default_factory=dict)
    pixel_size_nm: float | None = None
    pixel_size_source: str | None = None
    # Rows of the image proper, when the vendor records it (FEI ResolutionY).
    image_rows: int | None = None


def _put(d: dict[str, Scalar], key: str, value: Any, digits: int = 6) -> None:
    """Add a scalar to a flat instrument dict, dropping empty, NaN and non-scalar values."""
    if value is None or isinstance(value, (dict, list, tuple, bytes)):
        return
    if isinstance(value, bool):
        value = str(value).lower()
    if isinstance(value, float):
        if not math.isfinite(value):
            return
        value = float(f"{value:.{digits}g}")
    if isinstance(value, str):
        value = " ".join(value.split())
        if not value:
            return
    d[key] = value


def file_metadata(tags: dict[str, Any], width: int | None = None) -> FileMeta:
    """Parse the vendor tags of one page (``width``: its stored width in pixels, which
    Zeiss needs when a file was saved smaller than it was scanned); empty FileMeta when
    there are none."""
    if "fei" in tags:
        return _fei(tags["fei"], tags.get("fei_tag", 34682))
    if "zeiss" in tags:
        return _zeiss(tags["zeiss"], width)
    if "tvips" in tags:
        return _tvips(tags["tvips"])
    if "dm" in tags:
        return _dm(tags["dm"])
    if "imagej" in tags:
        return _imagej(tags["imagej"])
    return FileMeta()


def _section(ini: dict[str, Any], name: str) -> dict[str, Any]:
    value = ini.get(name)
    return value if isinstance(value, dict) else {}


def _fei(ini: dict[str, Any], code: int) -> FileMeta:
    """FEI/Thermo INI block (tag 34682, older tools 34680): SI units (metres, volts)."""
    system, beam, scan = _section(ini, "System"), _section(ini, "Beam"), _section(ini, "Scan")
    image, dets = _section(ini, "Image"), _section(ini, "Detectors")
    ebeam = _section(ini, str(beam.get("Beam") or "EBeam"))
    inst: dict[str, Scalar] = {"vendor": "FEI/Thermo Fisher"}
    _put(inst, "model", system.get("SystemType") or system.get("Type"))
    _put(inst, "detector", dets.get("Name"))
    _put(inst, "detector_mode", dets.get("Mode"))
    hv = ebeam.get("HV", beam.get("HV"))
    if isinstance(hv, (int, float)):
        _put(inst, "hv_kv", hv / 1000.0)
    wd = ebeam.get("WD", _section(ini, "Stage").get("WorkingDistance"))
    if isinstance(wd, (int, float)):
        _put(inst, "wd_mm", wd * 1000.0)
    hfw = ebeam.get("HFW", scan.get("HorFieldsize"))
    if isinstance(hfw, (int, float)):
        _put(inst, "hfw_um", hfw * 1e6)
        # FEI has no magnification field: it is the reference display width over the HFW.
        canvas = image.get("MagCanvasRealWidth")
        if isinstance(canvas, (int, float)) and hfw > 0:
            _put(inst, "magnification", round(canvas / hfw, 1))
    _put(inst, "beam_current_a", ebeam.get("BeamCurrent"))
    _put(inst, "dwell_time_s", scan.get("Dwelltime"))
    pixel = to_nm(scan.get("PixelWidth"), "m")
    rows = image.get("ResolutionY")
    return FileMeta(
        vendor="FEI",
        # A dual-beam's ion-beam image ([Beam] Beam=IBeam) is a FIB-SEM image.
        modality="FIB-SEM" if str(beam.get("Beam", "")).lower() == "ibeam" else "SEM",
        instrument=inst,
        pixel_size_nm=pixel,
        pixel_size_source=f"tiff:fei_{code}" if pixel else None,
        image_rows=int(rows) if isinstance(rows, (int, float)) and rows > 0 else None,
    )


def _zeiss_value(cz: dict[str, Any], key: str) -> tuple[Any, str | None]:
    """A CZ_SEM entry is (label, value[, unit]); returns (value, unit)."""
    entry = cz.get(key)
    if not isinstance(entry, (tuple, list)) or len(entry) < 2:
        return None, None
    return entry[1], (str(entry[2]) if len(entry) > 2 else None)


def _zeiss_mag(value: Any, unit: str | None) -> float | None:
    """'50.00 K X' -> 50000; (105, 'X') -> 105."""
    if isinstance(value, (int, float)):
        return float(value)
    m = re.match(r"\s*([\d.]+)\s*([kKmM]?)\s*[xX]?", str(value or ""))
    if not m:
        return None
    try:
        number = float(m.group(1))
    except ValueError:
        return None
    return number * {"": 1, "k": 1e3, "m": 1e6}[m.group(2).lower()]


def _zeiss(cz: dict[str, Any], width: int | None = None) -> FileMeta:
    """Zeiss CZ_SEM (tag 34118): values carry their own units."""
    inst: dict[str, Scalar] = {"vendor": "Zeiss"}
    for key, name in (("dp_sem", "model"), ("dp_detector_type", "detector")):
        _put(inst, name, _zeiss_value(cz, key)[0])
    if "model" not in inst:
        _put(inst, "model", _zeiss_value(cz, "sv_serial_number")[0])
    hv, hv_unit = _zeiss_value(cz, "ap_actualkv")
    if isinstance(hv, (int, float)) and hv_unit in ("kV", "V"):
        _put(inst, "hv_kv", hv if hv_unit == "kV" else hv / 1000.0)
    wd, wd_unit = _zeiss_value(cz, "ap_wd")
    wd_nm = to_nm(wd, wd_unit)
    if wd_nm:
        _put(inst, "wd_mm", wd_nm / 1e6)
    mag = _zeiss_mag(*_zeiss_value(cz, "ap_mag"))
    if mag:
        _put(inst, "magnification", mag)
    # 'Image Pixel Size' is the stored image's; 'Pixel Size' is the scan's and differs when
    # the store resolution differs from the scan (the multipage sample: 12.33 vs 24.65 nm).
    # Files without the former give the field 'Width': over the stored width it is the
    # stored pixel, also for a frame saved at half size (the 512-px sample: Width 5.965 um
    # over 512 px = 11.65 nm, which its burned-in 200 nm bar confirms, where 'Pixel Size'
    # says the 1024-px scan's 5.825 nm).
    pixel, source = to_nm(*_zeiss_value(cz, "ap_image_pixel_size")), None
    field_width = to_nm(*_zeiss_value(cz, "ap_width"))
    if not pixel and field_width and width:
        pixel = float(f"{field_width / width:.6g}")
    if not pixel:
        pixel = to_nm(*_zeiss_value(cz, "ap_pixel_size"))
    if pixel:
        source = "tiff:zeiss_34118"
    return FileMeta(
        vendor="Zeiss",
        modality="SEM",
        instrument=inst,
        pixel_size_nm=pixel,
        pixel_size_source=source,
    )


def _tvips(meta: dict[str, Any]) -> FileMeta:
    """TVIPS camera tag 37706 (TEM); PixelSizeX is in nm (as rosettasciio reads it)."""
    inst: dict[str, Scalar] = {"vendor": "TVIPS"}
    _put(inst, "camera", meta.get("CameraType"))
    _put(inst, "model", meta.get("TemType"))
    hv = meta.get("TemHighTension")
    if isinstance(hv, (int, float)) and hv > 0:
        _put(inst, "hv_kv", hv / 1000.0)
    mag = meta.get("TemMagnification")
    if isinstance(mag, (int, float)) and mag > 0:
        _put(inst, "magnification", float(mag))
    pixel = to_nm(meta.get("PixelSizeX"), "nm")
    return FileMeta(
        vendor="TVIPS",
        modality="TEM",
        instrument=inst,
        pixel_size_nm=pixel,
        pixel_size_source="tiff:tvips_37706" if pixel else None,
    )


def _imagej(meta: dict[str, Any]) -> FileMeta:
    """ImageJ TIFF: XResolution is pixels per ``unit`` only when ImageJ names the unit."""
    px_per_unit = meta.get("px_per_unit") or 0.0
    pixel = to_nm(1.0 / px_per_unit, meta.get("unit")) if px_per_unit > 0 else None
    return FileMeta(pixel_size_nm=pixel, pixel_size_source="tiff:imagej" if pixel else None)


def _dm(dm: dict[str, Any]) -> FileMeta:
    """Gatan DM3/DM4 via rosettasciio: calibrated axes + the mapped acquisition metadata."""
    axes = dm.get("axes") or []
    pixel = None
    if axes:
        x = axes[-1]
        pixel = to_nm(x.get("scale"), x.get("units"))
    acq = (dm.get("metadata") or {}).get("Acquisition_instrument") or {}
    # Gatan cameras sit on TEMs and rosettasciio files the acquisition metadata under TEM;
    # should a file carry SEM metadata only, it is taken at its word.
    modality = "SEM" if "SEM" in acq and "TEM" not in acq else "TEM"
    mic = acq.get(modality) or {}
    inst: dict[str, Scalar] = {"vendor": "Gatan"}
    _put(inst, "model", mic.get("microscope"))
    _put(inst, "hv_kv", mic.get("beam_energy"))
    _put(inst, "magnification", mic.get("magnification"))
    _put(inst, "camera_length_mm", mic.get("camera_length"))
    detector = mic.get("Detector") or {}
    camera = detector.get("Camera") if isinstance(detector, dict) else None
    if isinstance(camera, dict):
        _put(inst, "camera", camera.get("name"))
    return FileMeta(
        vendor="Gatan",
        modality=modality,
        instrument=inst,
        pixel_size_nm=pixel,
        pixel_size_source="dm:axes" if pixel else None,
    )


# ---------------------------------------------------------------------------------------
# Sidecars
# ---------------------------------------------------------------------------------------


class SidecarError(ValueError):
    """A sidecar file could not be parsed; the message is the one-line reason."""


# A user's spelling of a modality, letters only and lower case -> (modality, detector).
# STEM is named by its detector as often as not; the detector is kept in the instrument.
_MODALITY_WORDS: dict[str, tuple[str, str | None]] = {
    "sem": ("SEM", None),
    "tem": ("TEM", None),
    "stem": ("STEM", None),
    "fib": ("FIB-SEM", None),
    "fibsem": ("FIB-SEM", None),
    "unknown": ("unknown", None),
    "haadf": ("STEM", "HAADF"),
    "adf": ("STEM", "ADF"),
}
_STEM_DETECTOR = re.compile(r"(haadf|adf|abf|bf|df)stem")


def parse_modality(value: Any) -> tuple[str | None, str | None]:
    """A modality as users write it -> (records.Modality, detector or None); (None, None)
    when it names none (``"HAADF-STEM"`` -> ``("STEM", "HAADF")``, ``"fib"`` -> FIB-SEM)."""
    if not isinstance(value, str):
        return None, None
    key = re.sub(r"[^a-z]", "", value.lower())
    if key in _MODALITY_WORDS:
        return _MODALITY_WORDS[key]
    m = _STEM_DETECTOR.fullmatch(key)
    return ("STEM", m.group(1).upper()) if m else (None, None)


def _problem_text(loc: tuple[Any, ...], err: dict[str, Any]) -> str:
    """One pydantic error as ``<field> <value> <why>``: no model dump, no URL."""
    field = ".".join(str(x) for x in loc)
    value = repr(err.get("input"))
    ctx = err.get("ctx") or {}
    kind = err.get("type", "")
    if kind == "extra_forbidden":
        return f"{field} is not a sidecar field ({', '.join(Sidecar.model_fields)})"
    if kind == "literal_error":
        allowed = str(ctx.get("expected", "")).replace("'", "")
        return f"{field} {value} is not one of {allowed.replace(' or ', ', ')}"
    if kind == "greater_than":
        bound = ctx.get("gt")
        bound = f"{bound:g}" if isinstance(bound, float) else bound  # 0, not 0.0
        return f"{field} {value} must be > {bound}"
    if kind.startswith(("float_", "int_")):
        return f"{field} {value} is not a number"
    msg = str(err.get("msg", "invalid"))
    return f"{field} {value}: {msg[:1].lower()}{msg[1:]}"


def _valid_measure_settings(settings: Any, where: str) -> tuple[dict[str, Any], list[str]]:
    """The measure_images settings of a sidecar that the config accepts; one line per bad one.

    Each key is checked on its own against ``MeasureImagesConfig`` (names and value ranges),
    so one typo costs only itself.
    """
    from pydantic import ValidationError

    from semilens.config import MeasureImagesConfig

    if not isinstance(settings, dict):
        return {}, [f"{where}: measure is not a mapping of measure_images settings"]
    known = set(MeasureImagesConfig.model_fields)
    kept, problems = {}, []
    for key, value in settings.items():
        if key not in known:
            problems.append(f"{where}: measure setting {key!r} is not one of {', '.join(sorted(known))}")
            continue
        try:
            MeasureImagesConfig.model_validate({key: value})
        except ValidationError as exc:
            msg = exc.errors()[0].get("msg", "invalid")
            problems.append(f"{where}: measure setting {key} {value!r}: {msg[:1].lower()}{msg[1:]}")
            continue
        kept[key] = value
    return kept, problems


def validate_sidecar(data: Any, where: str) -> tuple[Sidecar, list[str]]:
    """``data`` -> (Sidecar of its valid fields, one line per bad field).

    A bad value costs only its own field: ``a.json: modality 'XRD' is not one of SEM, ...``
    is reported and the label, pixel size and group beside it are still used. ``where``
    names the file (and row) in each line. Raises SidecarError when ``data`` is no mapping.
    """
    from pydantic import ValidationError

    from semilens.images.records import MODALITIES

    if not isinstance(data, dict):
        raise SidecarError(f"{where}: not a JSON object of sidecar fields")
    data, problems = dict(data), []
    if "measure" in data:
        data["measure"], bad = _valid_measure_settings(data["measure"], where)
        problems.extend(bad)
    if data.get("modality") is not None:
        modality, detector = parse_modality(data["modality"])
        if modality is None:
            problems.append(f"{where}: modality {data.pop('modality')!r} is not one of {', '.join(MODALITIES)}")
        else:
            data["modality"] = modality
            instrument = data.get("instrument")
            if detector and isinstance(instrument, dict | None):
                # An explicit detector (a csv column, the JSON's instrument) wins.
                data["instrument"] = {"detector": detector, **(instrument or {})}
    for _ in range(len(data) + 1):  # each pass drops at least one bad field
        try:
            return Sidecar.model_validate(data), problems
        except ValidationError as exc:
            for err in exc.errors():
                loc = tuple(err["loc"])
                field = loc[0] if loc else None
                if field not in data:
                    continue  # dropped already by an earlier error of this pass
                problems.append(f"{where}: {_problem_text(loc, err)}")
                inner = data[field]
                if field == "instrument" and len(loc) > 1 and isinstance(inner, dict):
                    data[field] = {k: v for k, v in inner.items() if k != loc[1]}
                else:
                    del data[field]
    raise SidecarError(f"{where}: no valid sidecar fields")


def load_sidecar_json(path: Path) -> tuple[Sidecar, dict[str, Any], list[str]]:
    """``<image>.json`` -> (Sidecar of its valid fields, the raw dict for the cache key,
    one line per bad field); raises SidecarError when the file is no JSON object."""
    import json

    try:
        raw = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        text = " ".join(str(exc).split())
        raise SidecarError(f"invalid sidecar JSON: {text[:200]}") from exc
    sidecar, problems = validate_sidecar(raw, Path(path).name)
    return sidecar, raw, problems


_SIDECAR_KEYS = {"pixel_size_nm", "label", "modality", "group"}


def load_metadata_csv(path: Path) -> tuple[dict[str, tuple[int, dict[str, Any]]], list[str]]:
    """``metadata.csv`` -> ({file name: (line number, row dict)}, [row errors]); raises if
    unreadable.

    Rows are kept raw (strings) and validated per image by ``sidecar_from_row``, so one
    bad value costs nothing but its own field; the line number names the row in reports.
    """
    try:
        text = Path(path).read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as exc:
        raise SidecarError(f"unreadable metadata.csv: {exc}") from exc
    reader = csv.DictReader(io.StringIO(text))
    if not reader.fieldnames or "file" not in reader.fieldnames:
        raise SidecarError("metadata.csv has no 'file' column")
    rows: dict[str, tuple[int, dict[str, Any]]] = {}
    errors: list[str] = []
    for row in reader:
        n = reader.line_num  # the row's last line: right unless a quoted cell spans lines
        name = (row.get("file") or "").strip()
        if not name:
            errors.append(f"metadata.csv line {n}: empty 'file'")
            continue
        rows[PurePosixPath(name).name] = (
            n,
            {k.strip(): v.strip() for k, v in row.items() if k and v and k != "file"},
        )
    return rows, errors


def sidecar_from_row(row: dict[str, Any], where: str = SIDECAR_CSV) -> tuple[Sidecar, list[str]]:
    """A metadata.csv row -> (Sidecar, one line per bad field): known columns by name, the
    rest as instrument keys."""
    known = {k: v for k, v in row.items() if k in _SIDECAR_KEYS}
    instrument: dict[str, Scalar] = {}
    measure: dict[str, Any] = {}
    for key, value in row.items():
        if key in _SIDECAR_KEYS:
            continue
        if key.startswith(MEASURE_PREFIX):
            setting = key[len(MEASURE_PREFIX) :]
            measure[setting] = float(value) if re.fullmatch(r"[-+.\deE]+", value) else value
            if isinstance(measure[setting], float) and measure[setting].is_integer():
                measure[setting] = int(measure[setting])
            continue
        try:
            _put(instrument, key, float(value) if re.fullmatch(r"[-+.\deE]+", value) else value)
        except ValueError:
            _put(instrument, key, value)
    fields: dict[str, Any] = {**known, "instrument": instrument}
    if measure:
        fields["measure"] = measure
    return validate_sidecar(fields, where)


# ---------------------------------------------------------------------------------------
# Labels and groups from the path
# ---------------------------------------------------------------------------------------


def class_key(name: str) -> str:
    """A folder or class name compared loosely: case, separators and a plural 's' ignored
    (``Nanowires``, ``nanowire``, ``nano-wires`` -> ``nanowire``)."""
    key = re.sub(r"[^a-z0-9]", "", name.lower())
    return key[:-1] if key.endswith("s") else key


def folder_label(
    rel: PurePosixPath, classes: tuple[str, ...] = (), aliases: dict[str, str] | None = None
) -> str | None:
    """The class a folder on the way names, innermost first, or None.

    A folder counts only when it is a known class (``classes``, compared by ``class_key``)
    or a key of ``aliases`` (the user's folder name -> class). Any other folder name (a data
    set's, ``tiles``, ``batch3``) says where a file is, not what it shows, and would
    otherwise become a class answer verbatim.
    """
    known = {class_key(c): c for c in classes}
    known.update({class_key(folder): label for folder, label in (aliases or {}).items()})
    for folder in reversed(rel.parts[:-1]):
        label = known.get(class_key(folder))
        if label:
            return label
    return None


# What people append to a derived copy of a micrograph saved beside the original
# (``raw/x.tif`` -> ``fullres/x_cropped.png``): the same specimen area.
_DERIVED_SUFFIX = re.compile(r"[_-](cropped|crop|raw|full|fullres|orig|original)$", re.IGNORECASE)


def default_group(rel: PurePosixPath) -> str:
    """Source micrograph of a file on its own: its folder + stem without a tile suffix.

    The whole folder is the prefix, so ``a/x.png`` and ``b/x.png`` (two micrographs that
    happen to share a name) never share a group; ``assign_groups`` joins the tiles and the
    full frame a data set keeps in sibling folders.
    """
    stem = _TILE_SUFFIX.sub("", rel.stem)
    folder = rel.parent.as_posix()
    return stem if folder == "." else f"{folder}/{stem}"


def assign_groups(rels: list[PurePosixPath]) -> dict[PurePosixPath, str]:
    """The group of every file under one input root, from all their paths together.

    Files join one group when they are the same micrograph by name: in one folder, equal
    stems once a tile suffix is stripped (``x.png``, ``x_x1_y0.png``); in sibling folders
    (one parent), names that differ by a tile or derived-copy suffix
    (``tiles/x_cropped_x1_y0.png``, ``fullres/x_cropped.png``, ``raw_tiff/x.tif``), so no
    split sees one specimen area twice. The same names in sibling folders
    (``batch1/img01.tif``, ``batch2/img01.tif``, or the same tiles of each) are different
    micrographs and stay apart. A group spanning folders is named
    ``<parent>/<shortest stem>``.
    """
    parent: dict[PurePosixPath, PurePosixPath] = {}

    def find(r: PurePosixPath) -> PurePosixPath:
        while parent[r] != r:
            parent[r] = parent[parent[r]]
            r = parent[r]
        return r

    families: dict[tuple[str, str], list[PurePosixPath]] = {}
    for rel in rels:
        parent[rel] = rel
        base = _TILE_SUFFIX.sub("", rel.stem)
        key = _DERIVED_SUFFIX.sub("", base).lower()
        folder = rel.parent
        # Files at the root have no sibling folders: their family is the root alone.
        home = folder.parent.as_posix() if folder.as_posix() != "." else "/"
        families.setdefault((home, key), []).append(rel)
    for members in families.values():
        # One bucket per folder and tile-stripped stem: a micrograph and its tiles, linked.
        buckets: dict[tuple[PurePosixPath, str], list[PurePosixPath]] = {}
        for rel in members:
            buckets.setdefault((rel.parent, _TILE_SUFFIX.sub("", rel.stem)), []).append(rel)
        for bucket in buckets.values():
            for rel in bucket[1:]:
                parent[find(rel)] = find(bucket[0])
        # Buckets in sibling folders link unless they hold the very same names: then they
        # are two batches laid out alike (batch1/img01_x0_y0, batch2/img01_x0_y0), not a
        # frame and its tiles or derived copy.
        keyed = [({m.stem.lower() for m in bucket}, bucket[0]) for bucket in buckets.values()]
        for i, (stems_a, a) in enumerate(keyed):
            for stems_b, b in keyed[i + 1 :]:
                if a.parent != b.parent and stems_a != stems_b:
                    parent[find(a)] = find(b)

    components: dict[PurePosixPath, list[PurePosixPath]] = {}
    for rel in rels:
        components.setdefault(find(rel), []).append(rel)
    groups: dict[PurePosixPath, str] = {}
    for members in components.values():
        if len({m.parent for m in members}) == 1:
            name = default_group(members[0])
        else:
            stem = min((_TILE_SUFFIX.sub("", m.stem) for m in members), key=lambda s: (len(s), s))
            home = members[0].parent.parent.as_posix()
            name = stem if home == "." else f"{home}/{stem}"
        for m in members:
            groups[m] = name
    return groups
