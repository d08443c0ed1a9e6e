"""Instrument metadata, pixel size, labels and groups for one image.

Reads the vendor tags ``readers`` hands over (FEI/Thermo tag 34682, Zeiss tag 34118,
TVIPS tag 37706, ImageJ resolution, Gatan DM axes and tag tree) and the user's sidecars
(``<image>.json`` as ``records.Sidecar``, or a row of ``metadata.csv`` with a ``file``
column in the image's folder). Writes nothing; used by ``semilens.images.ingest``.

Precedence, decided here once:
- pixel size: file metadata (tags, DM axes) > sidecar JSON > metadata.csv > none, because a
  number the instrument wrote at acquisition beats one a person typed later;
- modality: file metadata > sidecar > ground truth > unknown;
- label: sidecar > ground truth > first folder under the input root > none;
- group: sidecar > top folder + file stem with any tile suffix (``_x1_y0``) stripped.
"""

from __future__ import annotations

import csv
import io
import math
import re
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

from semilens.records import Sidecar

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


def file_metadata(tags: dict[str, Any]) -> FileMeta:
    """Parse the vendor tags of one page; empty FileMeta when there are none."""
    if "fei" in tags:
        return _fei(tags["fei"], tags.get("fei_tag", 34682))
    if "zeiss" in tags:
        return _zeiss(tags["zeiss"])
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
        modality="SEM",
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


def _zeiss(cz: dict[str, Any]) -> FileMeta:
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
    pixel, source = None, None
    for key in ("ap_image_pixel_size", "ap_pixel_size"):
        pixel = to_nm(*_zeiss_value(cz, key))
        if pixel:
            source = "tiff:zeiss_34118"
            break
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


def load_sidecar_json(path: Path) -> tuple[Sidecar, dict[str, Any]]:
    """``<image>.json`` -> (validated Sidecar, the raw dict for the cache key)."""
    import json

    try:
        raw = json.loads(Path(path).read_text(encoding="utf-8"))
        return Sidecar.model_validate(raw), raw
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        text = " ".join(str(exc).split())
        raise SidecarError(f"invalid sidecar JSON: {text[:200]}") from exc


_SIDECAR_KEYS = {"pixel_size_nm", "label", "modality", "group"}


def load_metadata_csv(path: Path) -> tuple[dict[str, dict[str, Any]], list[str]]:
    """``metadata.csv`` -> ({file name: row dict}, [row errors]); raises if unreadable.

    Rows are kept raw (strings) and validated per image by ``sidecar_from_row``, so one
    bad row quarantines nothing but its own sidecar information.
    """
    try:
        text = Path(path).read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as exc:
        raise SidecarError(f"unreadable metadata.csv: {exc}") from exc
    reader = csv.DictReader(io.StringIO(text))
    if not reader.fieldnames or "file" not in reader.fieldnames:
        raise SidecarError("metadata.csv has no 'file' column")
    rows: dict[str, dict[str, Any]] = {}
    errors: list[str] = []
    for n, row in enumerate(reader, 2):
        name = (row.get("file") or "").strip()
        if not name:
            errors.append(f"metadata.csv line {n}: empty 'file'")
            continue
        rows[PurePosixPath(name).name] = {
            k.strip(): v.strip() for k, v in row.items() if k and v and k != "file"
        }
    return rows, errors


def sidecar_from_row(row: dict[str, Any]) -> Sidecar:
    """A metadata.csv row -> Sidecar: known columns by name, the rest as instrument keys."""
    known = {k: v for k, v in row.items() if k in _SIDECAR_KEYS}
    instrument: dict[str, Scalar] = {}
    for key, value in row.items():
        if key in _SIDECAR_KEYS:
            continue
        try:
            _put(instrument, key, float(value) if re.fullmatch(r"[-+.\deE]+", value) else value)
        except ValueError:
            _put(instrument, key, value)
    try:
        return Sidecar.model_validate({**known, "instrument": instrument})
    except ValueError as exc:
        text = " ".join(str(exc).split())
        raise SidecarError(f"invalid metadata.csv row: {text[:200]}") from exc


# ---------------------------------------------------------------------------------------
# Labels and groups from the path
# ---------------------------------------------------------------------------------------


def folder_label(rel: PurePosixPath) -> str | None:
    """The first folder under the input root (``nanowires/a.tif`` -> ``nanowires``)."""
    return rel.parts[0] if len(rel.parts) > 1 else None


def default_group(rel: PurePosixPath) -> str:
    """Source micrograph of a file: top folder + stem without a tile suffix.

    The top folder, not the full relative folder, is the prefix on purpose: a data set
    often keeps the full frame and its tiles in sibling folders (``fullres/x.png`` and
    ``tiles/x_x1_y0.png``), and both must fall in one group so no split sees the same
    specimen area twice. Grouping coarser is the safe direction for leakage.
    """
    stem = _TILE_SUFFIX.sub("", rel.stem)
    top = folder_label(rel)
    return f"{top}/{stem}" if top else stem
