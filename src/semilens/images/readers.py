"""Decode image files (TIFF, PNG, JPEG, Gatan DM3/DM4) into pages of pixels plus raw tags.

Reads one file; writes nothing. Used by ``semilens.images.ingest``. Every failure is raised
as ``ReadError`` with a one-line reason, so the caller can quarantine the file and go on.

The decompression-bomb guard runs on the header, before any pixel is decoded: a PNG that
claims 100000x100000 pixels is refused on its IHDR, a TIFF on each page's shape, a DM file
on the dimensions in its tag tree (rosettasciio's lazy reader only parses the header).

Normalisation to 8-bit grayscale lives here too (``to_gray8``), because what a sample
value means (palette index, RGB, 16-bit count, float) is a property of the decoded data.
"""

from __future__ import annotations

import io
import re
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

IMAGE_EXTENSIONS = frozenset({".tif", ".tiff", ".png", ".jpg", ".jpeg", ".dm3", ".dm4"})

# ITU-R BT.601 luma, the weights PIL's convert("L") uses, so every path to gray agrees.
_LUMA = np.array([0.299, 0.587, 0.114])


class ReadError(Exception):
    """The file cannot be used; ``str(exc)`` is the one-line reason for the quarantine."""


@dataclass
class Page:
    """One decoded image plane and the metadata found for it.

    ``pixels`` is 2-D (gray, possibly 16-bit or float) or 3-D (H, W, 3|4 RGB[A]) with
    palettes already expanded; ``original_dtype`` is the stored sample type (a palette
    image stays uint8 even though its expansion is RGB).
    """

    pixels: np.ndarray
    index: int
    original_dtype: str
    tags: dict[str, Any] = field(default_factory=dict)


@dataclass
class Decoded:
    format: str
    pages: list[Page]
    n_pages: int
    # Pages that failed while others decoded: "page N: reason", kept for the quarantine.
    page_errors: list[str] = field(default_factory=list)


def is_image_name(name: str) -> bool:
    return Path(name).suffix.lower() in IMAGE_EXTENSIONS


def one_line(exc: BaseException, limit: int = 240) -> str:
    """An exception as a single short line (quarantine reasons must be one line)."""
    text = " ".join(str(exc).split()) or type(exc).__name__
    # Pillow names the stream it was given ("<_io.BytesIO object at 0x7f...>"): a memory
    # address would make the same broken file give a different quarantine reason each run.
    text = re.sub(r"<([\w.]+) object at 0x[0-9a-f]+>", r"<\1>", text)
    if not isinstance(exc, ReadError):
        text = f"{type(exc).__name__}: {text}"
    return text if len(text) <= limit else text[: limit - 3] + "..."


def sniff_format(head: bytes) -> str | None:
    """Format from the magic bytes; the extension is only a hint (files get renamed)."""
    if head.startswith(b"\x89PNG\r\n\x1a\n"):
        return "PNG"
    if head.startswith(b"\xff\xd8\xff"):
        return "JPEG"
    if head[:4] in (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+"):
        return "TIFF"
    # Gatan DigitalMicrograph: big-endian version number 3 or 4 in the first word.
    if head[:4] == b"\x00\x00\x00\x03":
        return "DM3"
    if head[:4] == b"\x00\x00\x00\x04":
        return "DM4"
    return None


def check_size(width: int, height: int, max_pixels: int, min_side: int) -> None:
    """Refuse a claimed size before decoding (decompression bombs, 1x1 placeholders)."""
    if width * height > max_pixels:
        raise ReadError(
            f"header claims {width}x{height} = {width * height} pixels > max_pixels "
            f"{max_pixels} (decompression-bomb guard; not decoded)"
        )
    if min(width, height) < min_side:
        raise ReadError(f"image is {width}x{height}, smaller than min_side {min_side}")


def decode(data: bytes, path: Path, max_pixels: int, min_side: int) -> Decoded:
    """Decode the bytes of ``path``; raise ReadError with the reason if it is unusable."""
    if not data:
        raise ReadError("empty file (0 bytes)")
    fmt = sniff_format(data[:16])
    if fmt is None:
        raise ReadError(f"not a TIFF/PNG/JPEG/DM3/DM4 file (unrecognised header {data[:8]!r})")
    try:
        if fmt == "TIFF":
            return _decode_tiff(data, max_pixels, min_side)
        if fmt in ("DM3", "DM4"):
            return _decode_dm(path, fmt, max_pixels, min_side)
        return _decode_pil(data, fmt, max_pixels, min_side)
    except ReadError:
        raise
    except MemoryError as exc:
        raise ReadError(f"out of memory while decoding: {exc}") from exc
    except Exception as exc:  # noqa: BLE001 - any decoder failure means "quarantine it"
        raise ReadError(f"cannot decode {fmt}: {one_line(exc)}") from exc


# ---------------------------------------------------------------------------------------
# PNG / JPEG (Pillow)
# ---------------------------------------------------------------------------------------


def _decode_pil(data: bytes, fmt: str, max_pixels: int, min_side: int) -> Decoded:
    from PIL import Image

    # Pillow checks the header's size in open(): with its limit set to max_pixels and its
    # warning made an error, a huge header never reaches load(). check_size repeats the
    # test (and adds min_side) so every format words the refusal the same way.
    previous = Image.MAX_IMAGE_PIXELS
    Image.MAX_IMAGE_PIXELS = max_pixels
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            try:
                im = Image.open(io.BytesIO(data))
            except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
                raise ReadError(f"{one_line(exc)} (max_pixels {max_pixels}; not decoded)") from exc
            check_size(im.width, im.height, max_pixels, min_side)
            im.load()  # truncated files fail here, with Pillow's message
    finally:
        Image.MAX_IMAGE_PIXELS = previous
    original_dtype, pixels = _pil_pixels(im)
    return Decoded(format=fmt, pages=[Page(pixels, 0, original_dtype)], n_pages=1)


def _pil_pixels(im: Any) -> tuple[str, np.ndarray]:
    """Pixels of a Pillow image: 8-bit modes to L or RGB, deeper modes as numpy arrays."""
    mode = im.mode
    if mode in ("I;16", "I;16B", "I;16L", "I;16N"):
        return "uint16", np.asarray(im).astype(np.uint16)
    if mode == "I":
        arr = np.asarray(im)
        # 16-bit PNGs open as mode I; keep them 16-bit when the values fit.
        if arr.size and arr.min() >= 0 and arr.max() <= 65535:
            return "uint16", arr.astype(np.uint16)
        return "int32", arr
    if mode == "F":
        return "float32", np.asarray(im, dtype=np.float32)
    if mode == "L":
        return "uint8", np.asarray(im)
    # P, PA, RGB, RGBA, LA, 1, CMYK, YCbCr: all 8-bit per sample; RGB carries the colour.
    if mode in ("LA", "1"):
        return "uint8", np.asarray(im.convert("L"))
    return "uint8", np.asarray(im.convert("RGB"))


# ---------------------------------------------------------------------------------------
# TIFF (tifffile)
# ---------------------------------------------------------------------------------------


def _decode_tiff(data: bytes, max_pixels: int, min_side: int) -> Decoded:
    import tifffile

    with tifffile.TiffFile(io.BytesIO(data)) as tif:
        n_pages = len(tif.pages)
        if n_pages == 0:
            raise ReadError("TIFF has no pages")
        pages: list[Page] = []
        errors: list[str] = []
        for index, page in enumerate(tif.pages):
            try:
                decoded = _tiff_page(page, index, max_pixels, min_side)
            except ReadError as exc:
                errors.append(f"page {index}: {exc}")
                continue
            except Exception as exc:  # noqa: BLE001 - a bad page must not lose the good ones
                errors.append(f"page {index}: {one_line(exc)}")
                continue
            if decoded is not None:
                pages.append(decoded)
        if not pages:
            raise ReadError("; ".join(errors) if errors else "TIFF has no image pages")
        return Decoded(format="TIFF", pages=pages, n_pages=n_pages, page_errors=errors)


def _tiff_page(page: Any, index: int, max_pixels: int, min_side: int) -> Page | None:
    import tifffile

    # Reduced-resolution copies (thumbnails/previews) are not separate micrographs.
    if int(getattr(page, "subfiletype", 0) or 0) & 1:
        return None
    check_size(int(page.imagewidth), int(page.imagelength), max_pixels, min_side)
    if int(getattr(page, "imagedepth", 1) or 1) > 1:
        raise ReadError("volumetric TIFF page (ImageDepth > 1) is not a 2-D micrograph")
    arr = page.asarray()
    axes = str(getattr(page, "axes", ""))
    if arr.ndim == 3 and "S" in axes and len(axes) == 3:
        # Samples last, whatever the planar configuration stored ('SYX' -> 'YXS').
        arr = np.moveaxis(arr, axes.index("S"), -1)
    photometric = page.photometric
    original_dtype = str(arr.dtype)
    PHOTO = tifffile.PHOTOMETRIC
    if photometric == PHOTO.PALETTE and page.colormap is not None:
        cmap = np.asarray(page.colormap, dtype=np.float64)  # (3, 2**bits), 16-bit entries
        scale = 65535.0 if cmap.max() > 255 else 255.0
        rgb = (cmap.T / scale * 255.0)[np.clip(arr, 0, cmap.shape[1] - 1)]
        arr = np.rint(rgb).astype(np.uint8)
    elif photometric == PHOTO.MINISWHITE:
        arr = _invert(arr)
    elif arr.ndim == 3 and photometric not in (PHOTO.RGB, PHOTO.YCBCR):
        # Gray with extra samples (e.g. alpha): the first sample is the image.
        arr = arr[..., 0]
    if arr.ndim == 3 and arr.shape[-1] not in (3, 4):
        raise ReadError(f"unsupported sample layout {arr.shape}")
    if arr.ndim not in (2, 3):
        raise ReadError(f"unsupported page shape {arr.shape}")
    return Page(arr, index, original_dtype, tags=_tiff_tags(page))


def _invert(arr: np.ndarray) -> np.ndarray:
    if arr.dtype == np.bool_:
        return ~arr
    if np.issubdtype(arr.dtype, np.integer):
        return np.iinfo(arr.dtype).max - arr
    return arr.max() - arr


def _tiff_tags(page: Any) -> dict[str, Any]:
    """The vendor tags ``metadata`` knows how to read, already parsed by tifffile."""
    tags: dict[str, Any] = {}
    # 34682 FEI_HELIOS and 34680 FEI_SFEG both hold the FEI/Thermo INI block.
    for code, name in ((34682, "fei"), (34680, "fei"), (34118, "zeiss"), (37706, "tvips")):
        tag = page.tags.get(code)
        if tag is not None and isinstance(tag.value, dict) and name not in tags:
            tags[name] = tag.value
            tags[f"{name}_tag"] = code
    parent = getattr(page, "parent", None)
    ij = getattr(parent, "imagej_metadata", None) if parent is not None else None
    if ij and page.tags.get("XResolution") is not None:
        num, den = page.tags["XResolution"].value
        tags["imagej"] = {"unit": ij.get("unit"), "px_per_unit": num / den if den else 0.0}
    return tags


# ---------------------------------------------------------------------------------------
# Gatan DigitalMicrograph (rosettasciio)
# ---------------------------------------------------------------------------------------


def _decode_dm(path: Path, fmt: str, max_pixels: int, min_side: int) -> Decoded:
    from rsciio.digitalmicrograph import file_reader

    # lazy=True parses the tag tree and maps the data without reading it, so the claimed
    # shape is checked before a byte of pixels is loaded.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            signals = file_reader(str(path), lazy=True)
        except ValueError as exc:
            if "RGBA" not in str(exc):
                raise
            # rosettasciio cannot map RGBA lazily; DM data is stored uncompressed, so the
            # file's own size bounds what is read and there is no bomb to defuse.
            signals = file_reader(str(path), lazy=False)
    pages: list[Page] = []
    shapes = []
    for sig in signals:
        shape, axes = tuple(np.shape(sig["data"])), sig.get("axes") or []
        shapes.append(shape)
        # An image, or a stack of images (in-situ series) whose last two axes are the
        # signal (x, y). Spectra and spectrum images (EELS, EDS, CL: rosettasciio names a
        # signal_type) are not micrographs.
        spectral = bool(((sig.get("metadata") or {}).get("Signal") or {}).get("signal_type"))
        is_image = not spectral and (
            len(shape) == 2 or (len(shape) == 3 and all(not a.get("navigate", True) for a in axes[-2:]))
        )
        if not is_image:
            continue
        height, width = shape[-2:]
        check_size(int(width), int(height), max_pixels, min_side)
        frames = [sig["data"]] if len(shape) == 2 else list(sig["data"])
        metadata = _dm_metadata(sig)
        for frame in frames:
            arr = np.asarray(frame)
            if arr.dtype.names:  # RGBA packed as a record dtype
                arr = np.stack([arr[c] for c in ("R", "G", "B")], axis=-1)
            tags = {"dm": {"axes": axes[-2:], "metadata": metadata}}
            pages.append(Page(arr, len(pages), str(arr.dtype), tags=tags))
    if not pages:
        raise ReadError(f"{fmt} holds no 2-D image (datasets with shapes {shapes})")
    return Decoded(format=fmt, pages=pages, n_pages=len(pages))


def _dm_metadata(sig: dict[str, Any]) -> dict[str, Any]:
    """rosettasciio's metadata with its ``mapping`` applied, as HyperSpy would do it.

    The reader returns the raw tag tree (original_metadata) plus a mapping from tag paths
    to metadata paths (Microscope Info.Voltage -> Acquisition_instrument.TEM.beam_energy);
    only HyperSpy applies it, so it is applied here. A tag that is absent or that its
    converter rejects is left out: metadata is best effort, pixels are not.
    """
    import copy

    from box import Box  # rosettasciio's own dependency

    metadata = copy.deepcopy(sig.get("metadata") or {})
    original = sig.get("original_metadata") or {}
    for source, (target, convert) in (sig.get("mapping") or {}).items():
        node: Any = original
        for key in source.split("."):
            node = node.get(key) if isinstance(node, dict) else None
        if node is None:
            continue
        if isinstance(node, dict):  # rosettasciio's converters expect dotted access
            node = Box(node, box_dots=True)
        try:
            value = convert(node) if convert is not None else node
        except Exception:  # noqa: BLE001 - a vendor quirk in one tag must not lose the image
            continue
        *parents, leaf = target.split(".")
        here = metadata
        for key in parents:
            here = here.setdefault(key, {})
        here[leaf] = value
    return metadata


# ---------------------------------------------------------------------------------------
# Normalisation
# ---------------------------------------------------------------------------------------


def to_gray8(pixels: np.ndarray, percentile_clip: tuple[float, float]) -> np.ndarray:
    """Any decoded page -> 8-bit grayscale.

    RGB(A) -> luminance; 8-bit stays exactly as stored; deeper or float data is mapped
    linearly so that the given percentiles land on 0 and 255 (robust to hot pixels).
    """
    arr = pixels
    if arr.ndim == 3:
        rgb = arr[..., :3].astype(np.float64)
        gray = rgb @ _LUMA
        if arr.dtype == np.uint8:
            return np.clip(np.rint(gray), 0, 255).astype(np.uint8)
        arr = gray
    if arr.dtype == np.uint8:
        return arr
    if arr.dtype == np.bool_:
        return arr.astype(np.uint8) * 255
    # float32 halves the memory of the float64 default on large frames; the output only
    # needs 256 levels.
    values = arr.astype(np.float32)
    finite = np.isfinite(values)
    if not finite.any():
        return np.zeros(arr.shape, dtype=np.uint8)
    lo, hi = np.percentile(values[finite], percentile_clip)
    if hi <= lo:  # constant image: it maps to 0 (and is flagged low-information later)
        hi = lo + 1.0
    lo32, scale = np.float32(lo), np.float32(255.0 / (hi - lo))
    out = (np.where(finite, values, lo32) - lo32) * scale
    return np.clip(np.rint(out), 0, 255).astype(np.uint8)
