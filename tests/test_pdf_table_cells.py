"""Tables whose cells run over several lines, read from PDFs built here with reportlab.

A rule table (three columns, bold header, a description too long for its column) and a
data sheet (cells centred on their row, a header cell set on two lines) go through
extract_pdf + clean_document: each row must come out as one Markdown row with its
wrapped cells joined, the header whole, and the page read as one column although the
table's value column stands right of the page's middle.
"""

from __future__ import annotations

import io

from semilens.config import CleanMarkdownConfig, ExtractPdfsConfig
from semilens.text.clean import clean_document
from semilens.text.extract import extract_pdf


def _pdf(draw) -> bytes:
    from reportlab.pdfgen.canvas import Canvas

    buf = io.BytesIO()
    c = Canvas(buf, pagesize=(595, 842), invariant=1)
    draw(c)
    c.showPage()
    c.save()
    return buf.getvalue()


def _markdown(data: bytes) -> str:
    return clean_document(extract_pdf(data, ExtractPdfsConfig(ocr=False)), CleanMarkdownConfig())["markdown"]


def _table(md: str) -> list[str]:
    return [line for line in md.splitlines() if line.startswith("|")]


def _rule_table(c) -> None:
    """Top-aligned cells: the description of NW.c wraps onto a second line."""
    c.setFont("Helvetica", 10)
    c.drawString(72, 760, "The well rules below hold for every device that sits inside an NWell region.")
    cols = (78, 158, 480)  # Rule, Description, Value: the value column right of the middle
    rows = [
        ("Rule", ["Description"], "Value"),
        ("NW.a", ["Min. NWell width"], "0.62"),
        ("NW.b", ["Min. NWell space or notch (same net)"], "0.62"),
        ("NW.c", ["Min. NWell space to unrelated N+Activ not inside", "ThickGateOx in PWell"], "0.31"),
        ("NW.d", ["Min. NWell enclosure of P+Activ"], "0.24"),
    ]
    y = 720.0
    for r, (rule, desc, value) in enumerate(rows):
        bold = "Helvetica-Bold" if r == 0 else "Helvetica"
        c.setFont(bold, 10)
        c.drawString(cols[0], y, rule)
        for k, text in enumerate(desc):
            c.drawString(cols[1], y - 12 * k, text)
        c.setFont("Helvetica-Bold", 10)
        c.drawString(cols[2], y, value)
        c.line(72, y - 12 * (len(desc) - 1) - 6, 520, y - 12 * (len(desc) - 1) - 6)  # the row's rule
        y -= 12 * (len(desc) - 1) + 18
    c.setFont("Helvetica", 10)
    c.drawString(72, y - 20, "Wider wells relax the space rule, as the next section explains in detail.")


def test_a_wrapped_cell_joins_its_row_and_the_header_stays_whole():
    md = _markdown(_pdf(_rule_table))
    assert _table(md) == [
        "| Rule | Description | Value |",
        "|---|---|---|",
        "| NW.a | Min. NWell width | 0.62 |",
        "| NW.b | Min. NWell space or notch (same net) | 0.62 |",
        "| NW.c | Min. NWell space to unrelated N+Activ not inside ThickGateOx in PWell | 0.31 |",
        "| NW.d | Min. NWell enclosure of P+Activ | 0.24 |",
    ]
    assert "#" not in md  # neither the bold "Value" nor a wrapped line became a heading
    assert md.index("The well rules below") < md.index("| Rule |") < md.index("Wider wells relax")


def _data_sheet(c) -> None:
    """Cells centred on their row: the parameter names and the header's "Tar-get" take
    two lines, one above and one below the row's baseline."""
    c.setFont("Helvetica", 10)
    c.drawString(72, 780, "Device parameters measured at room temperature on the reference wafers.")
    x = (75, 200, 260, 310, 360)
    c.setFont("Helvetica-Bold", 10)
    for text, col in (("Parameter", 0), ("Name", 1), ("Min", 2), ("Max", 4)):
        c.drawString(x[col], 740, text)
    c.drawString(x[3], 745.6, "Tar-")
    c.drawString(x[3], 734.4, "get")
    c.setFont("Helvetica", 10)
    y = 716.0
    for first, second, name, values in (
        ("Threshold Voltage", "Short Channel", "VTN013", ("0.43", "0.50", "0.55")),
        ("Saturation Current", "Long Channel", "IDSN10", ("380", "480", "600")),
    ):
        c.drawString(x[0], y + 5.6, first)
        c.drawString(x[0], y - 5.6, second)
        c.drawString(x[1], y, name)
        for col, value in zip(x[2:], values):
            c.drawString(col, y, value)
        y -= 24
    c.drawString(72, y - 20, "Values outside these limits fail the lot at the parametric test station.")


def test_cells_centred_on_their_row_join_it_above_and_below():
    md = _markdown(_pdf(_data_sheet))
    assert _table(md) == [
        "| Parameter | Name | Min | Target | Max |",
        "|---|---|---|---|---|",
        "| Threshold Voltage Short Channel | VTN013 | 0.43 | 0.50 | 0.55 |",
        "| Saturation Current Long Channel | IDSN10 | 380 | 480 | 600 |",
    ]


def test_a_short_row_under_a_row_stays_a_row_of_its_own():
    """A row with fewer cells whose first cell sits under the key column is a new row,
    not the wrapped cells of the row above ("Power 300" under "Pressure 20 mTorr")."""

    def draw(c) -> None:
        c.setFont("Helvetica", 10)
        for r, cells in enumerate((("Setting", "Value", "Unit"), ("Pressure", "20", "mTorr"), ("Power", "300", ""))):
            for text, x0 in zip(cells, (72, 200, 300)):
                if text:
                    c.drawString(x0, 700 - 12 * r, text)

    assert _table(_markdown(_pdf(draw))) == [
        "| Setting | Value | Unit |",
        "|---|---|---|",
        "| Pressure | 20 | mTorr |",
        "| Power | 300 |  |",
    ]
