"""Tables only where a table is: justified prose, small caps, equations and listings.

Hand-made page records (positions in points, as extract_pdf writes them) pin each rule of
semilens.text.clean that decides between a table row and a line of text; the NIST paper
checks them on a real pdfTeX file with justified two-column text and two real tables.
"""

from __future__ import annotations

import re

import pytest
from conftest import real_file

from semilens.config import CleanMarkdownConfig, ExtractPdfsConfig
from semilens.text.clean import clean_document


def _line(y, text, x0=72.0, size=10.0, bold=False, x1=None):
    return {
        "x0": x0,
        "x1": x1 if x1 is not None else x0 + 0.5 * size * len(text),
        "y": y,
        "size": size,
        "bold": bold,
        "text": text,
    }


def _page(lines, n=1):
    return {"page": n, "width": 612.0, "height": 792.0, "method": "text", "lines": lines, "text": ""}


def _md(lines):
    return clean_document([_page(lines)], CleanMarkdownConfig())["markdown"]


def _table_lines(md):
    return [line for line in md.splitlines() if line.startswith("|")]


def test_justified_lines_split_at_a_font_change_stay_prose():
    md = _md(
        [
            _line(700, "The planner was tested in every mode it offers on the same grid."),
            _line(688, "with and decided to use FFTW's", x1=222),
            _line(688, "patient planning mode", x0=240, x1=340),  # italic run after a wide space
            _line(676, "as it demonstrated similar performance to the", x1=300),
            _line(676, "measure and", x0=318, x1=340),
            _line(664, "exhaustive planning modes, while only taking", x1=296),
            _line(664, "4 min 20 s to", x0=318, x1=340),  # starts where the line above's run did
            _line(652, "generate its plans on the evaluation machine."),
        ]
    )
    assert _table_lines(md) == []
    assert "use FFTW's patient planning mode as it demonstrated" in md


def test_a_word_space_at_a_font_change_is_no_cell_gap():
    md = _md(
        [
            _line(700, "The etch rate of", x1=150),
            _line(700, "silicon nitride", x0=153, x1=215),  # 3 pt: a word space
            _line(700, "depends on the chamber pressure.", x0=218, x1=370),
            _line(688, "The selectivity", x1=140),
            _line(688, "to oxide", x0=143, x1=180),
            _line(688, "is set by the gas mixture.", x0=183, x1=300),
        ]
    )
    assert _table_lines(md) == [] and "The etch rate of silicon nitride depends" in md


def test_small_caps_headings_and_captions_are_one_line():
    md = _md(
        [
            _line(720, "III. C OMPUTATION", x0=130),
            _line(700, "Image stitching computes the relative displacement of adjacent images in a grid."),
            _line(688, "The computation is dominated by the operations that the table lists."),
            _line(660, "TABLE I. O", x0=84, size=8, x1=124),
            _line(660, "PERATION COUNTS & COMPLEXITIES", x0=139, size=8, x1=262),
            _line(640, "Each operation count grows with the size of the grid of images."),
        ]
    )
    assert "COMPUTATION" in md and "C OMPUTATION" not in md
    assert "TABLE I. OPERATION COUNTS & COMPLEXITIES" in md
    assert _table_lines(md) == []


def test_a_real_table_stays_a_table():
    rows = [("Layer", "Width", "Space"), ("Metal1", "0.16", "0.18"), ("Metal2", "0.20", "0.21")]
    lines = [_line(600, "The minimum rules of the metal layers are listed below for reference.")]
    for r, row in enumerate(rows):
        lines += [_line(580 - 14 * r, cell, x0=x0) for cell, x0 in zip(row, (72, 160, 240))]
    lines.append(_line(520, "Wider lines relax the space rule as the following section explains."))
    assert _table_lines(_md(lines)) == [
        "| Layer | Width | Space |",
        "|---|---|---|",
        "| Metal1 | 0.16 | 0.18 |",
        "| Metal2 | 0.20 | 0.21 |",
    ]


def test_a_lone_row_of_cells_is_not_a_table():
    md = _md(
        [
            _line(700, "The recipe runs at low pressure and high power for a short time."),
            _line(688, "Pressure", x1=115),
            _line(688, "20 mTorr", x0=300, x1=340),
            _line(676, "The power is chosen to keep the selectivity to the mask high."),
        ]
    )
    assert _table_lines(md) == [] and "Pressure 20 mTorr" in md


def test_display_equations_keep_their_scripts_and_numbers_and_are_no_table():
    md = _md(
        [
            _line(700, "The energy of a particle at rest follows from its mass by the relation"),
            _line(676, "E = m c", x0=250, x1=280),
            _line(680, "2", x0=280.5, size=7, x1=284),
            _line(676, "(3)", x0=520, x1=535),
            _line(660, "J = σ E", x0=250, x1=280),
            _line(660, "(4)", x0=520, x1=535),
            _line(640, "where the current density follows from the conductivity of the film."),
        ]
    )
    assert _table_lines(md) == []
    assert re.search(r"(?m)^E = m c2 \(3\)\nJ = σ E \(4\)$", md), md


def test_a_numbered_listing_is_one_code_block():
    code = ["begin", "x ← 0", "foreach i ∈ tiles do", "x ← x + fft(i) // forward", "end"]
    lines = [_line(700, "The listing below sums the transforms of all tiles in one pass.")]
    for k, text in enumerate(code):
        lines += [_line(680 - 11 * k, str(k + 1), x0=72, size=9), _line(680 - 11 * k, text, x0=92, size=9)]
    lines.append(_line(600, "Its cost is one transform per tile and one addition per pixel."))
    md = _md(lines)
    assert _table_lines(md) == []
    assert "```\n1 begin\n2 x ← 0\n3 foreach i ∈ tiles do\n4 x ← x + fft(i) // forward\n5 end\n```" in md


def test_a_word_hyphenated_around_a_table_is_joined():
    lines = [_line(700, "The process removes the compo-")]
    for r, row in enumerate([("Step", "Time"), ("Etch", "30 s"), ("Rinse", "60 s")]):
        lines += [_line(680 - 14 * r, cell, x0=x0) for cell, x0 in zip(row, (72, 250))]
    lines.append(_line(620, "nents of the resist that the exposure left behind."))
    md = _md(lines)
    assert "The process removes the components of the resist" in md and len(_table_lines(md)) == 4


@pytest.mark.e2e
def test_the_nist_paper_has_its_two_tables_and_no_prose_tables():
    from semilens.text.extract import extract_pdf

    path = real_file("pdfs/nist_mist/Blattner_etal_Hybrid_CPU-GPU_Stitching_Microscopy_Images.pdf")
    md = clean_document(extract_pdf(path.read_bytes(), ExtractPdfsConfig()), CleanMarkdownConfig())["markdown"]
    rows = _table_lines(md)
    # the justified lines a font change split, and the small-caps captions, are text
    for fake in (
        "with and decided to use",
        "Adding a second GPU",
        "proves the run time",
        "TABLE I. O",
        "TABLE II. R",
        "measure and",
    ):
        assert not any(fake in r for r in rows), fake
    assert "TABLE I. OPERATION COUNTS & COMPLEXITIES" in md and "III. COMPUTATION" in md and "V. RESULTS" in md
    # no table row is two pieces of running prose
    prose = [
        r for r in rows if sum(len(c.split()) >= 5 and c.strip()[:1].islower() for c in r.strip("|").split("|")) >= 2
    ]
    assert prose == []
    # TABLE I (operation counts) and TABLE II (run times) are tables
    assert any(r.startswith("| FFT-2D |") for r in rows) and any(r.startswith("| Read |") for r in rows)
    assert any(r.startswith("| Pipelined-GPU | 49.7 s") for r in rows) and any(
        r.startswith("| Simple-GPU |") for r in rows
    )
    # the grid listing (Fig. 4) is one code block
    assert re.search(r"```\n1 begin\n2 foreach I ∈ Grid of Tiles do\n(.*\n){3}6 end\n```", md)
