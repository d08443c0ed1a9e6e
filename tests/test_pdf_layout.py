"""clean_markdown on real layouts: running lines, page numbers, front matter, equations.

Every real PDF goes through extract -> clean (the committed sample in data/raw/pdfs always,
the rest of ../shared/realdata/pdfs where it exists) and the Markdown is
searched for what a reader spots at once: a header or footer that comes back on every
page, a page number standing alone or glued to a line. The checker is independent of the
cleaning rules (it looks at all lines, not at page edges), so it fails when they miss.
Small hand-made page records pin equations, front matter and glued page numbers.
"""

from __future__ import annotations

import math
import re
from pathlib import Path

import pytest
from conftest import SAMPLE, real_file

from semilens.config import CleanMarkdownConfig, ExtractPdfsConfig
from semilens.text.clean import clean_document

PAGE_NUMBER_LINE = re.compile(r"^\W*(page|p\.|seite)?\s*:?\s*\d{1,4}(\s*(of|/|von)\s*\d{1,4})?\W*$", re.IGNORECASE)
# Footers and headers read off the files by eye (a second check beside the repetition count).
KNOWN_RUNNING = {
    "ihp_open_pdk/SG13G2_os_process_spec.pdf": [
        "Page 3 of 26",
        "Page 26 of 26",
        "SG13G2 Process Specification Rev. 1.2",
    ],
    "ihp_open_pdk/SG13G2_os_layout_rules.pdf": ["1of 75", "74of 75", "SG13G2Layout Rules Rev. 0.4"],
    "ihp_open_pdk/High_Frequency_Noise_SG13G2_pdk.pdf": ["Enter Date", "www.ihp-microelectronics.com"],
    "ihp_open_pdk/S380.pdf": ["Seite:1", "Seite:2", "Testfelder"],
    "pypdf_sample_files/multicolumn.pdf": ["1 lacus vel est", "2 Table 1"],
}


def _mask(text: str) -> str:
    return re.sub(r"\d+", "#", "".join(text.lower().split()))


def leftovers(pages: list[dict], markdown: str, known: list[str] = ()) -> dict[str, list[str]]:
    """Running lines and page numbers left in ``markdown``.

    running: a line of the pages (anywhere on them) whose masked text recurs at the same
    height (1% of the page) on half the pages or more, found again as a Markdown line, or
    inside the text when it has 8 letters or more; plus the ``known`` strings. page numbers:
    Markdown lines that are only a page label, or a number that could be a page's.
    """
    n = len(pages)
    where: dict[str, dict[int, list[float]]] = {}
    for p in pages:
        for ln in p["lines"]:
            where.setdefault(_mask(ln["text"]), {}).setdefault(p["page"], []).append(ln["y"] / p["height"])
    running = set()
    if n > 1:
        for text, on in where.items():
            ys = sorted(y for page_ys in on.values() for y in page_ys)
            for y in ys:
                pages_there = {pg for pg, pys in on.items() if any(abs(v - y) <= 0.01 for v in pys)}
                if len(pages_there) >= max(2, math.ceil(n / 2)):
                    running.add(text)
                    break
    lines = [_mask(line.lstrip("#").strip()) for line in markdown.splitlines() if line.strip()]
    flat = _mask(markdown)
    left = [t for t in running if t in lines or (sum(c.isalpha() for c in t) >= 8 and t in flat)]
    left += [k for k in known if _mask(k) in flat]
    numbers = []
    for line in markdown.splitlines():
        text = line.strip().lstrip("#").strip()
        # "1." alone is a list number that lost its item, not a page number
        m = PAGE_NUMBER_LINE.match(text) if not re.fullmatch(r"\d{1,2}[.)]", text) else None
        # a lone "-950" is a table value that lost its row, not a page number
        if (
            m
            and re.search(r"[a-z]", line, re.IGNORECASE)
            or m
            and 0 < int(re.findall(r"\d+", line)[0]) <= n + 5
            and "-" not in line
        ):
            numbers.append(line)
    return {"running": sorted(left), "page_numbers": numbers}


@pytest.fixture(scope="module")
def real_docs():
    """name under pdfs/ -> (pages, clean result), each file read once, on demand: the
    committed sample's copy where it has the file, else the full set's."""
    out: dict[str, tuple[list[dict], dict]] = {}

    def get(name: str) -> tuple[list[dict], dict]:
        if name not in out:
            pages = extract_pages(real_file(f"pdfs/{name}"))
            out[name] = (pages, clean_document([dict(p) for p in pages], CleanMarkdownConfig()))
        return out[name]

    return get


def _names(root: Path) -> list[str]:
    return sorted(p.relative_to(root / "pdfs").as_posix() for p in (root / "pdfs").rglob("*.pdf"))


def _running_lines_left(real_docs, names: list[str]) -> dict[str, dict]:
    bad = {}
    for name in names:
        pages, result = real_docs(name)
        left = leftovers(pages, result["markdown"], KNOWN_RUNNING.get(name, []))
        if left["running"] or left["page_numbers"]:
            bad[name] = left
    return bad


def extract_pages(path: Path) -> list[dict]:
    from semilens.text.extract import extract_pdf

    return extract_pdf(path.read_bytes(), ExtractPdfsConfig())


@pytest.mark.e2e
def test_no_running_line_or_page_number_is_left_in_any_sample_pdf(real_docs, real_sample):
    names = _names(real_sample)
    assert len(names) >= 7
    bad = _running_lines_left(real_docs, names)
    assert not bad, bad


@pytest.mark.e2e
def test_no_running_line_or_page_number_is_left_in_the_other_real_pdfs(real_docs, realdata):
    """The full set's PDFs that the sample does not hold (scans, CC BY-SA producers)."""
    others = [n for n in _names(realdata) if not (SAMPLE / "pdfs" / n).is_file()]
    assert len(others) + len(_names(SAMPLE)) >= 11
    bad = _running_lines_left(real_docs, others)
    assert not bad, bad


@pytest.mark.parametrize(
    "name",
    [
        "ihp_open_pdk/SG13G2_os_process_spec.pdf",
        "ihp_open_pdk/High_Frequency_Noise_SG13G2_pdk.pdf",
        "pypdf_sample_files/multicolumn.pdf",
        "ihp_open_pdk/S380.pdf",
    ],
)
def test_the_checker_finds_what_the_raw_text_layer_keeps(real_docs, name):
    """The raw text of the paged documents still has its headers, footers and numbers."""
    pages, _ = real_docs(name)
    raw = "\n".join(p["text"] for p in pages)
    left = leftovers(pages, raw, KNOWN_RUNNING[name])
    assert left["running"] or left["page_numbers"], name


# ---------------------------------------------------------------- constructed pages


def _line(y, text, x0=72.0, size=10.0, bold=False, x1=None):
    return {
        "x0": x0,
        "x1": x1 if x1 is not None else x0 + 0.5 * size * len(text),
        "y": y,
        "size": size,
        "bold": bold,
        "text": text,
    }


def _page(n, lines, height=792.0, width=612.0):
    return {"page": n, "width": width, "height": height, "method": "text", "lines": lines, "text": ""}


WORDS = ["oxide", "nitride", "silicon", "resist", "copper", "tungsten", "carbon"]


def _body(top, word="oxide"):
    return [
        _line(top, f"Plasma etching of {word} removes material through reactive species that the discharge makes,"),
        _line(top - 12, f"and the {word} rate depends on the ion flux and on the neutral flux at the wafer surface."),
        _line(
            top - 24, f"A higher pressure raises the neutral flux and lowers the ion energy on {word} in most tools."
        ),
    ]


def test_running_lines_are_found_by_repetition_wherever_the_margin_is():
    """A header 13% down a slide and a footer 12% up, neither in a fixed band, go; the
    page numbers (one glued to the caption on its baseline) go; a heading used on two of
    six pages stays."""
    pages = []
    for n, word in zip(range(1, 7), WORDS):
        lines = [_line(470, "RIE process module", size=12)] + _body(430, word)
        if n in (2, 5):
            lines.append(_line(380, "Results", size=14, bold=True))
        if n == 4:  # the extractor joined the page number to the caption on its baseline
            lines.append(_line(66, f"Figure {n}: {word} profile 4", x0=72))
        else:
            lines += [_line(66, f"Figure {n}: {word} profile", x0=72), _line(66, str(n), x0=560)]
        lines.append(_line(40, "ACME Fab - Confidential", x0=250, size=8))
        pages.append(_page(n, lines, height=540, width=720))
    result = clean_document(pages, CleanMarkdownConfig())
    md = result["markdown"]
    assert "RIE process module" not in md and "Confidential" not in md
    assert md.count("# Results") == 2 and md.count(" profile") == 6
    assert "Figure 4: resist profile" in md and not re.search(r"profile \d", md) and not re.search(r"(?m)^\d+$", md)
    assert result["removed"].count("4") == 1  # cut off the caption, counted once
    assert leftovers(pages, md) == {"running": [], "page_numbers": []}
    # the checker is not blind: on the raw text it finds both kinds
    raw = "\n".join(ln["text"] for p in pages for ln in p["lines"])
    left = leftovers(pages, raw)
    assert "rieprocessmodule" in left["running"] and left["page_numbers"]


def test_a_one_page_document_keeps_its_lines_and_page_labels_follow_the_sequence():
    one = [_page(1, [_line(760, "Process notes", size=16)] + _body(700) + [_line(300, "Process notes", size=10)])]
    md = clean_document(one, CleanMarkdownConfig())["markdown"]
    assert md.count("Process notes") == 2 and all(t in " ".join(md.split()) for t in ("ion flux", "most tools."))
    # "Seite:1 +" and "IHP Seite:2 -" at different heights: the page label itself is the evidence
    two = [
        _page(
            1, [_line(760, "Test structure sheet", size=14), _line(725, "Seite:1 +", x0=117)] + _body(690), height=842
        ),
        _page(2, [_line(795, "IHP Seite:2 -", x0=112)] + _body(740), height=842),
    ]
    md = clean_document(two, CleanMarkdownConfig())["markdown"]
    assert "Seite" not in md and "Test structure sheet" in md


def test_front_matter_goes_to_the_record_not_into_headings():
    lines = [
        _line(720, "Plasma Etching of Deep Trenches", x0=150, size=22),
        _line(690, "Ada Lovelace", x0=100, size=11),
        _line(690, "Alan Turing", x0=400, size=11),
        _line(678, "Dept. of Physics", x0=100),
        _line(678, "Computer Laboratory", x0=400),
        _line(666, "University of Somewhere", x0=100),
        _line(666, "Cambridge, CB3 0FD", x0=400),
        _line(650, "March 3, 2024", x0=250),
        _line(620, "Abstract", size=12, bold=True),
        *_body(600),
    ]
    result = clean_document([_page(1, lines)], CleanMarkdownConfig())
    fm = result["front_matter"]
    assert fm["title"] == "Plasma Etching of Deep Trenches"
    assert fm["authors"] == ["Ada Lovelace", "Alan Turing"]
    assert fm["affiliations"] == [
        "Dept. of Physics, University of Somewhere",
        "Computer Laboratory, Cambridge, CB3 0FD",
    ]
    assert fm["date"] == "March 3, 2024"
    md = result["markdown"]
    assert md.startswith("# Plasma Etching of Deep Trenches\n")
    assert "Lovelace" not in md and "University" not in md and "March 3" not in md and "Abstract" in md
    # a first page without a title block has no front matter to take away
    plain_page = clean_document([_page(1, _body(700))], CleanMarkdownConfig())
    assert plain_page["front_matter"] == {} and "ion flux" in plain_page["markdown"]


def test_scripts_stay_with_their_symbols_and_axis_ticks_leave_the_text():
    lines = [
        _line(700, "The drain current depends on V", x0=72, x1=220),
        _line(696, "GS", x0=220.5, size=7, x1=229),
        _line(700, "and the threshold voltage.", x0=232, x1=340),
        *[_line(600 - 12 * i, str(v), x0=60) for i, v in enumerate((40, 30, 20, 10, 0))],
        _line(520, "Figure 2 shows the transfer curve of the device measured at room temperature.", x0=72),
    ]
    md = clean_document([_page(1, lines)], CleanMarkdownConfig())["markdown"]
    assert "VGS" in md and "\nGS\n" not in md
    assert not re.search(r"(?m)^(40|30|20|10|0)$", md) and "Figure 2 shows" in md


def test_text_inside_a_placed_form_xobject_is_read_where_the_page_shows_it():
    """A figure drawn once as a form XObject and placed with `Do` (here: moved by the CTM,
    and by the form's own /Matrix in a nested form): its labels must land inside the figure,
    where pdfium sees them, not at the form's origin on top of the body text."""
    import io

    import pypdf
    import pypdfium2
    from pypdf.generic import ArrayObject, FloatObject, NameObject
    from reportlab.pdfgen.canvas import Canvas

    from semilens.text.extract import text_lines

    buf = io.BytesIO()
    c = Canvas(buf, pagesize=(612, 792), invariant=1)
    c.beginForm("inner")
    c.setFont("Helvetica", 9)
    c.drawString(0, 0, "nested axis label")
    c.endForm()
    c.beginForm("figure")
    c.setFont("Helvetica", 9)
    c.drawString(10, 20, "Time (s) figure label")
    c.saveState()
    c.translate(0, 40)
    c.doForm("inner")
    c.restoreState()
    c.endForm()
    c.setFont("Helvetica", 10)
    c.drawString(72, 700, "Body text of the first column.")
    c.saveState()
    c.translate(330, 400)
    c.doForm("figure")
    c.restoreState()
    c.showPage()
    c.save()
    # Give the nested form a /Matrix as well (scale 2, shift 5), which reportlab never writes.
    reader = pypdf.PdfReader(io.BytesIO(buf.getvalue()))
    writer = pypdf.PdfWriter(clone_from=reader)
    page = writer.pages[0]
    figure = page["/Resources"]["/XObject"]
    for xobj in figure.values():
        forms = xobj.get_object().get("/Resources", {}).get("/XObject", {})
        for inner in forms.values():
            inner.get_object()[NameObject("/Matrix")] = ArrayObject([FloatObject(v) for v in (2, 0, 0, 2, 5, 5)])
    out = io.BytesIO()
    writer.write(out)
    data = out.getvalue()

    lines = {ln.text: ln for ln in text_lines(pypdf.PdfReader(io.BytesIO(data)).pages[0])}
    pdfium = pypdfium2.PdfDocument(data)[0].get_textpage()
    for text in ("Body text of the first column.", "Time (s) figure label", "nested axis label"):
        start, _ = pdfium.search(text).get_next()
        left, bottom, *_ = pdfium.get_charbox(start)
        assert abs(lines[text].x0 - left) < 3 and abs(lines[text].y - bottom) < 6, (text, lines[text], left, bottom)
    assert lines["Time (s) figure label"].x0 > 330  # inside the figure, not at the page origin
    assert lines["nested axis label"].size == pytest.approx(18, abs=0.5)  # the /Matrix scales it
