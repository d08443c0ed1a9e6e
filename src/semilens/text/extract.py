"""extract_pdfs: raw + synthetic PDFs -> text per page with provenance.

Reads every ``*.pdf`` under ``paths.raw_pdfs`` and ``paths.synthetic_pdfs``; writes
``paths.pages/pages.jsonl`` (one record per page: source, sha256, page number, method,
text, positioned lines) and ``paths.pages/quarantine.jsonl`` (one line per refused file
with the reason). Run: ``python -m stages.extract_pdfs``.

The text layer is read with pypdf. Its text visitor gives each fragment with its position
and font, so a page is stored as positioned lines: clean_markdown needs them to put two
columns in reading order and to tell running headers from body text. A page without a
text layer is rendered with pypdfium2 and read by Debian's ``tesseract`` (OCR); its lines
come in tesseract's own reading order, with positions converted to PDF points.

Work is cached per file by content hash (``paths.cache/extract_pdfs``): adding one PDF to
a thousand extracts one. Each finished page is cached too (``.../extract_pdfs/pages``), so
a run killed in the middle of a long file resumes at the next page.

A hostile or broken file must cost seconds and bounded memory, not hours: a file with more
than ``max_pages`` pages is refused before any page is read, a run of ``max_blank_run``
pages without text ends the file, a page too large for ``ocr_dpi`` is rendered for OCR at
a lower resolution (``max_ocr_pixels``), and OCR time is bounded per page
(``ocr_timeout_s``) and per file (``ocr_file_timeout_s``). Each refusal is a quarantine
line naming the setting.
"""

from __future__ import annotations

import functools
import io
import math
import re
import shutil
import subprocess
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from semilens.cache import ItemCache, code_version
from semilens.config import Config, ExtractPdfsConfig
from semilens.executor import map_items
from semilens.io import display_path, leaves_folder, sha256_file, write_jsonl

STAGE = "extract_pdfs"

# Characters that mean the text layer did not map glyphs to Unicode: the replacement
# character, the private use area (subset fonts without a ToUnicode map land there), C0
# controls, and pdfminer-style "(cid:12)" placeholders.
_GARBLED = re.compile(r"[\ufffd\ue000-\uf8ff\x00-\x08\x0b\x0c\x0e-\x1f]|\(cid:\d+\)")


# Symbol-font glyphs that a text layer without a ToUnicode map places in the private use
# area at U+F000 + their Symbol code (Word does this for bullets, Greek and maths), mapped
# back with Adobe's Symbol encoding. Codes not listed stay and count as garbled.
_SYMBOL_GREEK = "ΑΒΧΔΕΦΓΗΙϑΚΛΜΝΟΠΘΡΣΤΥςΩΞΨΖ"  # Symbol 0x41-0x5A
_SYMBOL_greek = "αβχδεφγηιϕκλμνοπθρστυϖωξψζ"  # Symbol 0x61-0x7A
SYMBOL_PUA = {
    **{0xF020 + i: chr(0x20 + i) for i in range(0x5F)},  # digits and punctuation as ASCII
    **{0xF041 + i: c for i, c in enumerate(_SYMBOL_GREEK)},
    **{0xF061 + i: c for i, c in enumerate(_SYMBOL_greek)},
    0xF022: "∀",
    0xF024: "∃",
    0xF027: "∋",
    0xF02A: "∗",
    0xF02D: "−",
    0xF040: "≅",
    0xF05C: "∴",
    0xF05E: "⊥",
    0xF0A3: "≤",
    0xF0A5: "∞",
    0xF0AC: "←",
    0xF0AD: "↑",
    0xF0AE: "→",
    0xF0AF: "↓",
    0xF0B0: "°",
    0xF0B1: "±",
    0xF0B2: "″",
    0xF0B3: "≥",
    0xF0B4: "×",
    0xF0B5: "∝",
    0xF0B6: "∂",
    0xF0B7: "•",
    0xF0B8: "÷",
    0xF0B9: "≠",
    0xF0BA: "≡",
    0xF0BB: "≈",
    0xF0BC: "…",
    0xF0D6: "√",
    0xF0D7: "⋅",
    0xF0A2: "′",
    0xF0A6: "ƒ",
    0xF0C5: "⊕",
    0xF0C4: "⊗",
    0xF0C6: "∅",
    0xF0CE: "∈",
    0xF0E5: "∑",
    0xF0F2: "∫",
}


def repair_glyphs(text: str) -> str:
    """Map Symbol-font private-use code points to Unicode (see ``SYMBOL_PUA``)."""
    return text.translate(SYMBOL_PUA) if any("\uf000" <= c <= "\uf0ff" for c in text) else text


class PdfProblem(ValueError):
    """A file that cannot be extracted; the message is the quarantine reason.

    ``machine=True`` marks a problem of this machine rather than of the file (no
    tesseract, an OCR timeout): it is reported but not cached, so installing tesseract
    or re-running on a quieter machine retries the file.
    """

    def __init__(self, reason: str, machine: bool = False):
        super().__init__(reason)
        self.machine = machine


@dataclass
class Line:
    """One text line in PDF points (origin bottom-left); ``bold`` from the font name."""

    x0: float
    x1: float
    y: float
    size: float
    bold: bool
    text: str


def garbled_ratio(text: str) -> float:
    """Share of the non-space characters that are unmapped glyphs (0 for clean text)."""
    chars = sum(not c.isspace() for c in text)
    if chars == 0:
        return 0.0
    bad = sum(len(m.group()) for m in _GARBLED.finditer(text))
    return round(min(1.0, bad / chars), 4)


def precheck(data: bytes) -> None:
    """Refuse what is not a complete PDF before a parser tries to repair it.

    pypdf in its default lenient mode rebuilds a cut-off file's cross-reference table and
    would hand back whatever pages survived; a truncated download must be named as such
    instead of silently losing its tail.
    """
    if not data:
        raise PdfProblem("empty file (0 bytes)")
    head = data[:1024]
    if b"%PDF-" not in head:
        raise PdfProblem(f"not a PDF: no %PDF- header (starts with {data[:8]!r})")
    if b"%%EOF" not in data[-2048:]:
        raise PdfProblem("truncated: no %%EOF marker at the end of the file (incomplete copy?)")


def _font_bold(font: Any) -> bool:
    name = _font_name(font).lower()
    return "bold" in name or "black" in name


def _font_name(font: Any) -> str:
    try:
        return str(font.get("/BaseFont", "")).lstrip("/") if font else ""
    except Exception:  # a broken font dict only costs the metrics
        return ""


_HEX = re.compile(rb"<([0-9A-Fa-f]+)>")


def _cid_widths(font: Any) -> tuple[dict[str, float], float] | None:
    """Glyph widths by Unicode character of a composite (Type0) font, and its default width.

    A Type0 font keeps its widths by CID in the descendant font's /W array, and only the
    /ToUnicode map says which character a CID shows. Without them every glyph would count
    0.5 em, which misplaces the end of a run by more than a word gap ("insideThickGateOx":
    Arial's "inside" is 0.26 em per letter).
    """
    if str(font.get("/Subtype", "")) != "/Type0":
        return None
    desc = font["/DescendantFonts"].get_object()[0].get_object()
    default = float(desc.get("/DW", 1000))
    by_cid: dict[int, float] = {}
    w = desc.get("/W")
    items = list(w.get_object()) if w is not None else []
    i = 0
    while i + 1 < len(items):
        first, nxt = int(items[i]), items[i + 1].get_object() if hasattr(items[i + 1], "get_object") else items[i + 1]
        if isinstance(nxt, list):
            by_cid.update({first + k: float(v) for k, v in enumerate(nxt)})
            i += 2
        else:
            by_cid.update({c: float(items[i + 2]) for c in range(first, int(nxt) + 1)})
            i += 3
    widths: dict[str, float] = {}
    cmap = font.get("/ToUnicode")
    data = cmap.get_object().get_data() if cmap is not None else b""
    for block in re.findall(rb"beginbfchar(.*?)endbfchar", data, re.S):
        hexes = _HEX.findall(block)
        for src, dst in zip(hexes[::2], hexes[1::2]):
            char = bytes.fromhex(dst.decode()).decode("utf-16-be", "ignore")
            if len(char) == 1:
                widths.setdefault(char, by_cid.get(int(src, 16), default))
    for lo, hi, dst in re.findall(
        rb"<([0-9A-Fa-f]+)>\s*<([0-9A-Fa-f]+)>\s*<([0-9A-Fa-f]+)>",
        b"".join(re.findall(rb"beginbfrange(.*?)endbfrange", data, re.S)),
    ):
        base = bytes.fromhex(dst.decode()).decode("utf-16-be", "ignore")
        if len(base) == 1:
            for k, cid in enumerate(range(int(lo, 16), int(hi, 16) + 1)):
                widths.setdefault(chr(ord(base) + k), by_cid.get(cid, default))
    return widths, default


def _width(text: str, size: float, font: Any, cache: dict[int, Any] | None = None) -> float:
    """Rendered width in points: the font's /Widths (or a Type0 font's /W), the standard-14
    metrics, or 0.5 em/char.

    Widths matter: a gap between fragments wider than ``SPLIT_GAP`` em separates two
    columns (or two table cells) that share a baseline, and one of ``word_gap`` em is a
    space. ``cache`` keeps parsed Type0 widths per font object for one page.
    """
    try:
        widths = font["/Widths"].get_object()
        first = int(font.get("/FirstChar", 0))
        return (
            sum(float(widths[ord(c) - first]) if 0 <= ord(c) - first < len(widths) else 500.0 for c in text)
            * size
            / 1000.0
        )
    except Exception:
        pass
    try:
        cache = {} if cache is None else cache
        if id(font) not in cache:
            cache[id(font)] = _cid_widths(font)
        if cache[id(font)] is not None:
            by_char, default = cache[id(font)]
            # A space the font has no glyph for was put in by pypdf for a TJ offset:
            # count it as a typical word gap (the gaps in those offsets are 0.2-0.35 em).
            return sum(by_char.get(c, 280.0 if c == " " else default) for c in text) * size / 1000.0
    except Exception:  # a broken /W or /ToUnicode only costs the metrics
        pass
    from reportlab.pdfbase.pdfmetrics import standardFonts, stringWidth

    name = _font_name(font).split("+")[-1]
    if name in standardFonts:  # the standard 14 fonts carry no /Widths; their metrics are fixed
        try:
            return stringWidth(text, name, size)
        except Exception:
            pass
    return 0.5 * size * len(text)


# Fragments on one baseline further apart than this many em are different blocks.
SPLIT_GAP = 1.2
# Default word gap in em (ExtractPdfsConfig.word_gap). Across the real PDFs in
# shared/realdata, kerning inside TJ arrays stays under 0.15 em and word gaps start at
# 0.2 em (tight justified LaTeX lines); between separately placed runs (Word) gaps of
# 0.15-0.18 em are word gaps, and 0.18 glues two words in GIFT2.pdf. 0.12-0.15 read
# every file alike; 0.15 leaves the most room for kerning.
WORD_GAP = 0.15
# A TJ offset below the word gap is handed to pypdf in pieces this small (in thousandths
# of an em), so that no piece looks like a space to pypdf whatever it thinks the font's
# space width is; a larger one is followed by a -_FORCE/+_FORCE pair, which makes pypdf
# write one space and leaves the pen where it was.
_PIECE = 20.0
_FORCE = 1e6


def _respace_tj(items: list[Any], word_gap: float) -> list[Any]:
    """A TJ array whose offsets make pypdf put spaces exactly at gaps >= ``word_gap`` em.

    pypdf inserts a space inside a TJ array when an offset exceeds half the font's space
    width as it reads it from the font, and it misreads subset fonts that carry no space
    glyph (LuaTeX's Arial in the IHP layout rules comes out 584/1000 em wide, twice the
    real width), gluing every justified line: "Licensedunderthe". Producers that draw no
    space glyph put the word gap only in these offsets, so the gap in em decides here.
    """
    out: list[Any] = []
    for item in items:
        if isinstance(item, (int, float)) and not isinstance(item, bool):
            value = float(item)
            if -value / 1000.0 >= word_gap:
                out += [value, -_FORCE, _FORCE]
            elif value < -_PIECE:
                n = int(-value // _PIECE) + 1
                out += [value / n] * n
            else:
                out.append(value)
        else:
            out.append(item)
    return out


def _mult(a: list[float], b: list[float]) -> list[float]:
    """PDF matrix product a x b of [a b c d e f] matrices (row vectors: p' = p a b)."""
    return [
        a[0] * b[0] + a[1] * b[2],
        a[0] * b[1] + a[1] * b[3],
        a[2] * b[0] + a[3] * b[2],
        a[2] * b[1] + a[3] * b[3],
        a[4] * b[0] + a[5] * b[2] + b[4],
        a[4] * b[1] + a[5] * b[3] + b[5],
    ]


class _FormPlacement:
    """Where a form XObject's content lands on the page.

    pypdf reads a form XObject (a figure, a logo, an algorithm box drawn once and placed
    with ``Do``) through a fresh text state, so the positions its visitor gives inside one
    are in the form's own space: figure labels then land on top of body text elsewhere on
    the page (an algorithm listing at x 59 that pdfium, and the reader, see at x 351).
    Here each ``Do`` of a form records the form's /Matrix times the CTM at the ``Do``
    (times the enclosing form's placement, for nested forms), and text inside is mapped
    through it. The placement is made current at the form's first operator, not at
    ``Do`` itself, because pypdf flushes the enclosing stream's pending text between the
    two."""

    def __init__(self, page: Any):
        self.stack: list[list[float]] = []
        self.resources: list[Any] = [page.get("/Resources")]
        self.pending: tuple[list[float], Any] | None = None
        self.opened: list[bool] = []

    def _form(self, name: Any) -> Any:
        try:
            xobjects = self.resources[-1]["/XObject"]
            xobj = xobjects[name].get_object()
        except (KeyError, TypeError, AttributeError, IndexError):
            return None
        return xobj if xobj.get("/Subtype") == "/Form" else None

    def before(self, op: bytes, args: Any, cm: Any) -> None:
        if self.pending is not None:  # the form's first operator: its content has begun
            placement, resources = self.pending
            self.pending = None
            self.stack.append(placement)
            self.resources.append(resources)
            self.opened[-1] = True
        if op == b"Do" and args:
            form = self._form(args[0])
            self.opened.append(False)
            if form is not None:
                matrix = [float(v) for v in form.get("/Matrix", [1, 0, 0, 1, 0, 0])]
                outer = self.stack[-1] if self.stack else [1.0, 0.0, 0.0, 1.0, 0.0, 0.0]
                placement = _mult(_mult(matrix, [float(v) for v in cm]), outer)
                self.pending = (placement, form.get("/Resources") or self.resources[-1])

    def after(self, op: bytes) -> None:
        if op == b"Do" and self.opened:
            self.pending = None  # an image, or a form with no operators
            if self.opened.pop():
                self.stack.pop()
                self.resources.pop()

    def to_page(self, cm: Any) -> Any:
        return _mult([float(v) for v in cm], self.stack[-1]) if self.stack else cm


def text_lines(page: Any, word_gap: float = WORD_GAP) -> list[Line]:
    """The page's text as positioned lines, from pypdf's text visitor.

    Fragments are grouped into a line when their baselines are within a third of the font
    size; within a line they are ordered by x, and a gap of ``word_gap`` em or more
    becomes a space, both between fragments and inside TJ arrays (``_respace_tj``).
    """
    frags: list[tuple[float, float, float, float, bool, str]] = []
    swapped: list[tuple[list[Any], list[Any]]] = []
    widths: dict[int, Any] = {}
    forms = _FormPlacement(page)

    # The TJ operands are rewritten just for pypdf's pass over them and put back after,
    # so the page object is left as it was read.
    def before(op: bytes, args: Any, cm: Any, tm: Any) -> None:
        forms.before(op, args, cm)
        if op == b"TJ" and args and isinstance(args[0], list):
            swapped.append((args[0], list(args[0])))
            args[0][:] = _respace_tj(args[0], word_gap)

    def after(op: bytes, args: Any, cm: Any, tm: Any) -> None:
        forms.after(op)
        if op == b"TJ" and swapped and args and args[0] is swapped[-1][0]:
            array, original = swapped.pop()
            array[:] = original

    def visit(text: str, cm: Any, tm: Any, font: Any, size: float) -> None:
        if not text or not text.strip():
            return
        # text space -> user space: the text matrix's translation through the CTM, and
        # inside a form XObject on through where the page placed the form
        cm = forms.to_page(cm)
        x = tm[4] * cm[0] + tm[5] * cm[2] + cm[4]
        y = tm[4] * cm[1] + tm[5] * cm[3] + cm[5]
        scale = abs(tm[3] * cm[3]) or abs(tm[0] * cm[0]) or 1.0
        eff = float(size) * scale if size else 10.0
        for k, part in enumerate(text.split("\n")):
            if part.strip():
                frags.append((x, y - k * eff * 1.2, x + _width(part, eff, font, widths), eff, _font_bold(font), part))

    page.extract_text(visitor_text=visit, visitor_operand_before=before, visitor_operand_after=after)
    frags.sort(key=lambda f: (-f[1], f[0]))
    lines: list[list[tuple]] = []
    for f in frags:
        if lines and abs(lines[-1][0][1] - f[1]) <= max(1.0, f[3] / 3):
            lines[-1].append(f)
        else:
            lines.append([f])
    out = []
    for group in lines:
        group.sort(key=lambda f: f[0])
        segments: list[list[tuple]] = [[group[0]]]
        for f in group[1:]:
            prev = segments[-1][-1]
            if f[0] - prev[2] > SPLIT_GAP * max(f[3], prev[3]):
                segments.append([f])
            else:
                segments[-1].append(f)
        out += [ln for ln in (_join(seg, word_gap) for seg in segments) if ln is not None]
    return out


def _join(seg: list[tuple], word_gap: float = WORD_GAP) -> Line | None:
    text, x1 = "", None
    for f in seg:
        if x1 is not None and f[0] - x1 >= word_gap * f[3] and not text.endswith(" ") and not f[5].startswith(" "):
            text += " "
        text += f[5]
        x1 = f[2]
    text = repair_glyphs(" ".join(text.split()))
    if not text:
        return None
    return Line(
        x0=round(seg[0][0], 1),
        x1=round(max(f[2] for f in seg), 1),
        y=round(sum(f[1] for f in seg) / len(seg), 1),
        size=round(max(f[3] for f in seg), 1),
        bold=all(f[4] for f in seg),
        text=text,
    )


def pdfium_lines(textpage: Any) -> list[Line]:
    """The page's text as lines from pdfium's text rectangles (runs of one line and font).

    pdfium decides spaces from glyph positions itself and reads every real file right,
    so it is the fallback reading; its runs carry position and font size like the
    visitor's lines, but no bold flag from the font name (pdfium reports the weight).
    """
    import pypdfium2.raw as raw

    out = []
    for i in range(textpage.count_rects()):
        left, bottom, right, top = textpage.get_rect(i)
        text = repair_glyphs(" ".join(textpage.get_text_bounded(left, bottom, right, top).split()))
        if not text:
            continue
        size, weight = top - bottom, 400
        index = textpage.get_index(
            (left + right) / 2, (bottom + top) / 2, max(1.0, right - left) / 2, (top - bottom) / 2
        )
        if index is not None and index >= 0:
            size = raw.FPDFText_GetFontSize(textpage.raw, index) or size
            weight = raw.FPDFText_GetFontWeight(textpage.raw, index)
        # pdfium's rectangle spans ascender to descender; the baseline sits about a fifth
        # of the size above its bottom, where the visitor's y is.
        out.append(
            Line(
                x0=round(left, 1),
                x1=round(right, 1),
                y=round(bottom + 0.2 * (top - bottom), 1),
                size=round(float(size), 1),
                bold=weight >= 600,
                text=text,
            )
        )
    return out


def choose_reading(
    lines: list[Line], textpage: Any, page: Any, cfg: ExtractPdfsConfig
) -> tuple[list[Line], dict[str, Any]]:
    """The lines to keep for one page, and the ``reading`` record that says why.

    Three readings are scored with ``semilens.text.words.check``: the visitor's lines,
    pdfium's plain text and pypdf's layout mode. The visitor's lines are kept unless they
    are clearly worse (glued-word rate above ``max_glued`` and above the best other
    reading's, or a reading score ``reading_margin`` below it): their positions, sizes and
    bold flags are what clean_markdown uses for columns and headings. pdfium's lines have
    positions too, so they replace the visitor's; layout mode is scored for the record
    only, as its text has no positions.
    """
    from semilens.text.words import check

    texts = {"visitor": "\n".join(ln.text for ln in lines), "pdfium": textpage.get_text_range()}
    try:
        texts["layout"] = page.extract_text(extraction_mode="layout")
    except Exception:  # layout mode fails on some malformed pages; it is only compared
        texts["layout"] = ""
    checks = {name: check(text) for name, text in texts.items()}
    scores = {
        name: {"glued": round(c.glued_rate, 4), "score": round(c.score, 4), "words": c.words}
        for name, c in checks.items()
    }
    vis, alt = checks["visitor"], checks["pdfium"]
    worse = alt.words > 0 and (
        (vis.glued_rate > cfg.max_glued and alt.glued_rate < vis.glued_rate)
        or alt.score - vis.score >= cfg.reading_margin
    )
    if worse:
        alt_lines = pdfium_lines(textpage)
        if alt_lines:
            return alt_lines, {"used": "pdfium", "scores": scores}
    return lines, {"used": "visitor", "scores": scores}


def tesseract_available() -> bool:
    return shutil.which("tesseract") is not None


def ocr_scale(width_pt: float, height_pt: float, cfg: ExtractPdfsConfig) -> float:
    """Pixels per point of a page's OCR raster: ``ocr_dpi``, lowered for a page so large
    that the raster would pass ``max_ocr_pixels``.

    The raster is what costs memory (a 14400 pt square page, the PDF maximum, is 600 Mpx
    at 300 dpi: gigabytes here and more inside tesseract), so the scale is decided from
    the page size before anything is drawn.
    """
    area = max(width_pt, 1.0) * max(height_pt, 1.0)
    return min(cfg.ocr_dpi / 72, math.sqrt(cfg.max_ocr_pixels / area))


def ocr_lines(
    pdf: Any, index: int, height_pt: float, cfg: ExtractPdfsConfig, timeout_s: float | None = None
) -> tuple[list[Line], dict[str, Any]]:
    """Render page ``index`` with pypdfium2 and read it with tesseract (TSV output).

    Returns the lines and the page's ``reading`` record: ``{"used": "ocr"}``, with
    ``dpi`` where the page was too large for ``ocr_dpi`` (``ocr_scale``) and
    ``blank: true`` where the raster is one flat colour, in which tesseract cannot find
    text: a blank letter page then costs one grayscale render (25 ms here) instead of a
    tesseract run (1.2 s), which keeps a file of blank pages cheap to refuse.
    Lines keep tesseract's reading order (block, paragraph, line), which already handles
    columns and small skew; positions are converted from pixels to PDF points.
    ``timeout_s`` (default ``ocr_timeout_s``) bounds tesseract; subprocess.TimeoutExpired
    passes to the caller, which knows which limit it was.
    """
    if not tesseract_available():
        raise PdfProblem(
            "page has no text layer and tesseract is not installed (apt-get install tesseract-ocr)", machine=True
        )
    page = pdf[index]
    try:
        scale = ocr_scale(*page.get_size(), cfg)  # the size pdfium draws, in points
        # Normal pages keep exactly ocr_dpi (not 72 * scale), so their OCR is unchanged.
        dpi: float = cfg.ocr_dpi if scale == cfg.ocr_dpi / 72 else scale * 72
        reading: dict[str, Any] = {"used": "ocr"} if dpi == cfg.ocr_dpi else {"used": "ocr", "dpi": round(dpi, 1)}
        gray = page.render(scale=dpi / 72, grayscale=True)
        try:
            low, high = gray.to_pil().getextrema()
        finally:
            gray.close()
        if low == high:
            return [], {**reading, "blank": True}
        # The raster tesseract reads is drawn as before (colour, converted by PIL), so the
        # OCR of normal pages is unchanged; the grayscale render only decides blankness.
        bitmap = page.render(scale=dpi / 72)
        try:
            image = bitmap.to_pil().convert("L")
        finally:
            bitmap.close()
    finally:
        page.close()
    with tempfile.TemporaryDirectory() as tmp:
        png = Path(tmp) / "page.png"
        image.save(png)
        del image  # tesseract reads the file; the raster need not be held while it runs
        proc = subprocess.run(
            ["tesseract", str(png), "stdout", "-l", cfg.ocr_lang, "--dpi", str(round(dpi)), "tsv"],
            capture_output=True,
            text=True,
            timeout=cfg.ocr_timeout_s if timeout_s is None else max(timeout_s, 0.001),
            env={"OMP_THREAD_LIMIT": "1", "PATH": "/usr/bin:/bin"},
        )
    if proc.returncode != 0:
        raise PdfProblem(f"tesseract failed on page {index + 1}: {proc.stderr.strip()[:200]}")
    pt = 72 / dpi
    words: dict[tuple[int, int, int], list[tuple[int, int, int, int, str]]] = {}
    for row in proc.stdout.splitlines()[1:]:
        cols = row.split("\t")
        if len(cols) < 12 or cols[0] != "5" or not cols[11].strip():
            continue
        key = (int(cols[2]), int(cols[3]), int(cols[4]))
        left, top, width, height = (int(c) for c in cols[6:10])
        words.setdefault(key, []).append((left, top, width, height, cols[11]))
    out = []
    for key in sorted(words):
        ws = words[key]
        x0 = min(w[0] for w in ws) * pt
        x1 = max(w[0] + w[2] for w in ws) * pt
        bottom = max(w[1] + w[3] for w in ws) * pt
        size = max(w[3] for w in ws) * pt
        out.append(
            Line(
                x0=round(x0, 1),
                x1=round(x1, 1),
                y=round(height_pt - bottom, 1),
                size=round(size, 1),
                bold=False,
                text=" ".join(w[4] for w in ws),
            )
        )
    return out, reading


# Settings that decide a file's fate but not what any of its pages reads. They are left
# out of the page cache key, so raising max_pages or a timeout reuses every page already
# read; any other setting (a new one too) is in the key, which is the safe default.
FILE_ONLY = frozenset({"max_pages", "max_blank_run", "ocr_timeout_s", "ocr_file_timeout_s", "max_garbled"})


@dataclass
class PageCache:
    """Finished pages of one file (``paths.cache/extract_pdfs/pages``), so that a killed
    run resumes at the next page instead of page 1: an OCRed book is hours of work.

    The key is the file's sha256, the page index and the page-level settings; the entry
    holds the page record exactly as it goes to pages.jsonl and the OCR seconds it took,
    which count against ``ocr_file_timeout_s`` on a resumed run as they did on the first.
    """

    items: ItemCache
    sha256: str
    params: dict[str, Any]

    def _key(self, index: int) -> str:
        return self.items.key(self.sha256, index, {k: v for k, v in self.params.items() if k not in FILE_ONLY})

    def get(self, index: int) -> tuple[dict[str, Any], float] | None:
        hit = self.items.get(self._key(index))
        return None if hit is None else (hit["page"], float(hit["ocr_s"]))

    def put(self, index: int, record: dict[str, Any], ocr_s: float) -> None:
        self.items.put(self._key(index), {"page": record, "ocr_s": ocr_s})


def extract_page(
    reader: Any, pdf: Any, i: int, n: int, cfg: ExtractPdfsConfig, timeout_s: float
) -> tuple[dict[str, Any], float]:
    """Page ``i`` (0-based) of ``n`` as a record without provenance, and the seconds its
    OCR took (0 for a text page); ``timeout_s`` bounds its OCR."""
    try:
        page = reader.pages[i]
        lines = text_lines(page, cfg.word_gap)
        height = float(page.mediabox.height)
        width = float(page.mediabox.width)
    except PdfProblem:
        raise
    except Exception as exc:
        raise PdfProblem(f"corrupt PDF: page {i + 1}: {type(exc).__name__}: {str(exc)[:200]}") from None
    method, ocr_s = "text", 0.0
    reading: dict[str, Any] = {"used": "visitor"}
    if lines:
        pdf_page = pdf[i]
        textpage = pdf_page.get_textpage()
        try:
            lines, reading = choose_reading(lines, textpage, page, cfg)
        finally:
            textpage.close()
            pdf_page.close()
    if sum(len(ln.text.replace(" ", "")) for ln in lines) < cfg.ocr_min_chars:
        if not cfg.ocr:
            method = "none"
        else:
            start = time.monotonic()
            lines, reading = ocr_lines(pdf, i, height, cfg, timeout_s)
            ocr_s = time.monotonic() - start
            method = "ocr"
    text = "\n".join(ln.text for ln in lines)
    record = {
        "page": i + 1,
        "n_pages": n,
        "width": round(width, 1),
        "height": round(height, 1),
        "method": method,
        "chars": len(text),
        "garbled": garbled_ratio(text),
        "reading": reading,
        "text": text,
        "lines": [asdict(ln) for ln in lines],
    }
    return record, ocr_s


def _open(data: bytes) -> Any:
    """A pypdf reader for a complete, openable PDF; raises PdfProblem."""
    from pypdf import PdfReader
    from pypdf.errors import FileNotDecryptedError, PdfReadError

    precheck(data)
    try:
        reader = PdfReader(io.BytesIO(data))
        if reader.is_encrypted:
            # An owner-password-only file opens with the empty user password, as in any viewer.
            try:
                opened = reader.decrypt("")
            except Exception as exc:  # unsupported crypt filter, missing crypto library
                raise PdfProblem(f"encrypted: cannot decrypt ({exc})") from None
            if not opened:
                raise PdfProblem("encrypted: a password is needed to open it")
    except (PdfReadError, FileNotDecryptedError, ValueError, KeyError, TypeError) as exc:
        if isinstance(exc, PdfProblem):
            raise
        raise PdfProblem(f"corrupt PDF: {type(exc).__name__}: {str(exc)[:200]}") from None
    return reader


def extract_pdf(data: bytes, cfg: ExtractPdfsConfig, cache: PageCache | None = None) -> list[dict[str, Any]]:
    """Every page of one PDF as a record without provenance; raises PdfProblem.

    The limits are checked as early as they can be: ``max_pages`` before any page is
    read, ``max_blank_run`` and ``ocr_file_timeout_s`` as the pages go (cached pages
    count as they did when they were read, so a resumed run decides as the first would
    have). With ``cache``, each finished page is stored and a stored page is not redone.
    """
    import pypdfium2

    reader = _open(data)
    # pdfium counts the page tree in C in milliseconds, where pypdf takes seconds to
    # flatten 10,000 pages, so an oversized file is refused before any real work.
    try:
        pdf = pypdfium2.PdfDocument(data)
    except pypdfium2.PdfiumError as exc:
        raise PdfProblem(f"corrupt PDF: pdfium cannot open it: {str(exc)[:200]}") from None
    try:
        if len(pdf) > cfg.max_pages:
            raise PdfProblem(f"too many pages: {len(pdf)}, more than extract_pdfs.max_pages={cfg.max_pages}")
        try:
            n = len(reader.pages)
        except (ValueError, KeyError, TypeError, RecursionError) as exc:
            raise PdfProblem(f"corrupt PDF: {type(exc).__name__}: {str(exc)[:200]}") from None
        if n > cfg.max_pages:  # a page tree that pdfium read shorter than pypdf does
            raise PdfProblem(f"too many pages: {n}, more than extract_pdfs.max_pages={cfg.max_pages}")
        if n == 0:
            raise PdfProblem("the PDF has no pages")
        return _pages(reader, pdf, n, cfg, cache)
    finally:
        pdf.close()


def _pages(reader: Any, pdf: Any, n: int, cfg: ExtractPdfsConfig, cache: PageCache | None) -> list[dict[str, Any]]:
    """The records of an opened file's ``n`` pages, under the blank-run and OCR-time limits."""
    pages: list[dict[str, Any]] = []
    ocr_total, blank_run = 0.0, 0
    over_budget = f"OCR of this file took over extract_pdfs.ocr_file_timeout_s={cfg.ocr_file_timeout_s} s"
    no_ocr = "; OCR is off (extract_pdfs.ocr: false)" if not cfg.ocr else ""
    for i in range(n):
        hit = cache.get(i) if cache is not None else None
        if hit is None:
            # A page's OCR may take what is left of the file's budget, no more.
            budget = cfg.ocr_file_timeout_s - ocr_total
            try:
                record, ocr_s = extract_page(reader, pdf, i, n, cfg, min(cfg.ocr_timeout_s, budget))
            except subprocess.TimeoutExpired:
                if budget < cfg.ocr_timeout_s:
                    raise PdfProblem(f"{over_budget} (stopped at page {i + 1} of {n})", machine=True) from None
                raise PdfProblem(
                    f"OCR of page {i + 1} took longer than extract_pdfs.ocr_timeout_s={cfg.ocr_timeout_s} s",
                    machine=True,
                ) from None
            if cache is not None:
                cache.put(i, record, ocr_s)
        else:
            record, ocr_s = hit
        pages.append(record)
        ocr_total += ocr_s
        if ocr_total > cfg.ocr_file_timeout_s:
            raise PdfProblem(f"{over_budget} (stopped after page {i + 1} of {n})", machine=True)
        blank_run = 0 if record["text"].strip() else blank_run + 1
        # A file that is blank throughout gets the "no text on any page" reason below.
        if blank_run >= cfg.max_blank_run and blank_run < n:
            raise PdfProblem(
                f"{blank_run} pages in a row without text (pages {i + 2 - blank_run}-{i + 1} of {n}); "
                f"extract_pdfs.max_blank_run={cfg.max_blank_run}{no_ocr}"
            )
    if not any(p["text"].strip() for p in pages):
        how = "OCR found no text either" if cfg.ocr else "OCR is off (extract_pdfs.ocr: false)"
        scaled = [p for p in pages if "dpi" in p["reading"]]
        if scaled:
            p = scaled[0]
            how += (
                f" (page {p['page']} is {p['width']:g} x {p['height']:g} pt and was rendered for OCR at {p['reading']['dpi']:g} dpi, "
                f"not {cfg.ocr_dpi}: extract_pdfs.max_ocr_pixels={cfg.max_ocr_pixels})"
            )
        raise PdfProblem(f"no text on any of its {n} pages (image-only or blank); {how}")
    return pages


def discover(cfg: Config, quarantine: list[dict[str, Any]] | None = None) -> list[tuple[Path, str]]:
    """(path, origin) for every PDF, sorted so outputs do not depend on directory order.
    A symlink resolving outside its folder is not returned but added to ``quarantine``
    (its bytes are never read, so neither they nor their hash reach an output)."""
    found = []
    for root, origin in ((cfg.paths.raw_pdfs, "raw"), (cfg.paths.synthetic_pdfs, "synthetic")):
        root = Path(root)
        if root.is_dir():
            for p in sorted(root.rglob("*")):
                if p.suffix.lower() != ".pdf" or not p.is_file():
                    continue
                if leaves_folder(p, root):
                    if quarantine is not None:
                        quarantine.append(
                            {
                                "source": display_path(p),
                                "reason": f"symbolic link leaving {display_path(root)} (not followed, not read)",
                            }
                        )
                    continue
                found.append((p, origin))
    return found


def _version() -> str:
    # words.py decides which reading a page keeps, so an edit there redoes the pages too.
    return code_version("semilens.text.extract", "semilens.text.words")


def _extract_uncached(item: tuple[Path, str], ecfg: ExtractPdfsConfig, cache_root: str) -> dict[str, Any]:
    """One PDF not in the cache -> {"pages": [...]} or {"problem": reason}, cached unless the
    problem was this machine's (a timeout, a missing tool) rather than the file's. Runs in a
    worker process; the page cache lets a run stopped mid-file resume at its next page."""
    path, sha = item
    version = _version()
    params = ecfg.model_dump(mode="json")
    cache = ItemCache(Path(cache_root), STAGE, version)
    page_cache = ItemCache(Path(cache_root) / STAGE, "pages", version)
    cacheable = True
    try:
        hit: dict[str, Any] = {"pages": extract_pdf(path.read_bytes(), ecfg, PageCache(page_cache, sha, params))}
    except PdfProblem as exc:
        hit, cacheable = {"problem": str(exc)}, not exc.machine
    except Exception as exc:  # a file no rule foresaw must not stop the other files
        hit = {"problem": f"unreadable: {type(exc).__name__}: {str(exc)[:200]}"}
    if cacheable:
        cache.put(cache.key(sha, params), hit)
    return {**hit, "page_cache": page_cache.stats()}


def extract_pdfs(cfg: Config) -> dict[str, Any]:
    from semilens.stage_runner import console

    ecfg = cfg.extract_pdfs
    cache = ItemCache(cfg.paths.cache, STAGE, _version())
    params = ecfg.model_dump(mode="json")
    records: list[dict[str, Any]] = []
    quarantine: list[dict[str, Any]] = []
    seen: dict[str, str] = {}
    methods: dict[str, int] = {}
    # Duplicates and cached files are settled here, in order; the rest are read on
    # `executor.workers` processes, and their results are merged back in the same order.
    files: list[tuple[Path, str, str, dict[str, Any] | None]] = []
    for path, origin in discover(cfg, quarantine):
        source = display_path(path)
        sha = sha256_file(path)
        if sha in seen:
            quarantine.append({"source": source, "sha256": sha, "reason": f"duplicate of {seen[sha]}"})
            continue
        seen[sha] = source
        files.append((path, origin, sha, cache.get(cache.key(sha, params))))
    todo = [(path, sha) for path, _, sha, hit in files if hit is None]
    work = functools.partial(_extract_uncached, ecfg=ecfg, cache_root=str(cfg.paths.cache))
    done = iter(map_items(work, todo, executor=cfg.executor, description=STAGE, console=console))
    page_stats = {"hits": 0, "misses": 0}
    for path, origin, sha, hit in files:
        source = display_path(path)
        if hit is None:
            hit = next(done)
            for k, v in hit.pop("page_cache").items():
                page_stats[k] += v
        if "problem" in hit:
            quarantine.append({"source": source, "sha256": sha, "reason": hit["problem"]})
            continue
        for page in hit["pages"]:
            methods[page["method"]] = methods.get(page["method"], 0) + 1
            records.append({"source": source, "origin": origin, "sha256": sha, **page})

    out = Path(cfg.paths.pages)
    out.mkdir(parents=True, exist_ok=True)
    write_jsonl(out / "pages.jsonl", records)
    write_jsonl(out / "quarantine.jsonl", quarantine)
    return {
        "files": len(seen),
        "pages": len(records),
        "quarantined": len(quarantine),
        "pages_by_method": methods,
        "garbled_pages": sum(r["garbled"] > ecfg.max_garbled for r in records),
        "cache": cache.stats(),
        "page_cache": page_stats,
    }
