"""Words come out apart on PDFs whose producer draws no space glyphs.

The PDFs here carry no space characters between words: the gap is only a TJ offset or
a new text position. The real files come from the committed sample (data/raw/pdfs) where
it has them, else by path from ../shared/realdata (skipped where that is absent).
"""

from __future__ import annotations

import io

import pytest
from conftest import lazy_pdf_pages

from semilens.config import ExtractPdfsConfig
from semilens.text.extract import _respace_tj, extract_pdf, text_lines
from semilens.text.words import check, glued_rate, glued_words, reading_score, split_glued

WORDS = "The Reactive Ion Etcher uses a radio-frequency-powered electromagnetic field to etch-".split()


def _raw_pdf(content: bytes, space_width: int) -> bytes:
    """A one-page PDF in Helvetica whose /Widths give the space glyph ``space_width``.

    LuaTeX's subset fonts make pypdf read the space twice as wide as it is; a /Widths
    entry of 1000 for the space reproduces that, so the TJ gaps below look like no gap
    to pypdf's own rule.
    """
    from reportlab.pdfbase.pdfmetrics import stringWidth

    widths = " ".join(
        str(space_width if c == 32 else round(stringWidth(chr(c), "Helvetica", 1000))) for c in range(32, 127)
    )
    objects = [
        b"<< /Type /Catalog /Pages 2 0 R >>",
        b"<< /Type /Pages /Kids [3 0 R] /Count 1 >>",
        b"<< /Type /Page /Parent 2 0 R /MediaBox [0 0 612 792] /Resources << /Font << /F1 4 0 R >> >> /Contents 5 0 R >>",
        b"<< /Type /Font /Subtype /Type1 /BaseFont /Helvetica /Encoding /WinAnsiEncoding /FirstChar 32 /LastChar 126 /Widths ["
        + widths.encode()
        + b"] >>",
        b"<< /Length %d >>\nstream\n" % len(content) + content + b"\nendstream",
    ]
    out = io.BytesIO()
    out.write(b"%PDF-1.4\n")
    offsets = []
    for n, body in enumerate(objects, 1):
        offsets.append(out.tell())
        out.write(b"%d 0 obj\n" % n + body + b"\nendobj\n")
    xref = out.tell()
    out.write(b"xref\n0 %d\n0000000000 65535 f \n" % (len(objects) + 1))
    out.write(b"".join(b"%010d 00000 n \n" % o for o in offsets))
    out.write(b"trailer\n<< /Size %d /Root 1 0 R >>\nstartxref\n%d\n%%%%EOF\n" % (len(objects) + 1, xref))
    return out.getvalue()


def _tj_pdf(gap: int, kern: int = -60) -> bytes:
    """The words of ``WORDS`` in one TJ array, ``gap`` thousandths of an em apart, no spaces.

    "Reactive" is kerned inside the word (``kern``), as typesetters do with "Re".
    """
    parts = []
    for k, word in enumerate(WORDS):
        if k:
            parts.append(str(-gap))
        parts.append(f"(R) {-kern} (eactive)" if word == "Reactive" else f"({word})")
    return _raw_pdf(b"BT /F1 11 Tf 40 700 Td [" + " ".join(parts).encode() + b"] TJ ET", space_width=1000)


def _page(data: bytes):
    from pypdf import PdfReader

    return PdfReader(io.BytesIO(data)).pages[0]


def test_tj_gaps_of_a_quarter_em_become_spaces_and_kerning_does_not():
    lines = text_lines(_page(_tj_pdf(gap=250)))
    assert [ln.text for ln in lines] == [" ".join(WORDS)]
    assert glued_rate(lines[0].text) == 0


def test_tight_justified_gaps_still_split_but_kerning_stays_inside_the_word():
    # 0.2 em is the tightest word gap in the real LaTeX files; -0.1 em is strong kerning
    lines = text_lines(_page(_tj_pdf(gap=200, kern=100)))
    assert lines[0].text == " ".join(WORDS)


def test_the_page_object_is_left_as_read():
    page = _page(_tj_pdf(gap=250))
    before = page.get_contents().get_data()
    text_lines(page)
    assert page.get_contents().get_data() == before


def test_respace_tj_keeps_the_pen_where_it_was():
    items = ["a", -250.0, "b", -60.0, "c", 40.0, "d"]
    out = _respace_tj(items, 0.15)
    assert sum(x for x in out if isinstance(x, float)) == pytest.approx(sum(x for x in items if isinstance(x, float)))
    assert [x for x in out if isinstance(x, str)] == ["a", "b", "c", "d"]
    assert all(abs(x) <= 20 for x in out[out.index("b") + 1 : out.index("c")])


def test_words_drawn_one_by_one_without_spaces_come_apart():
    """Each word its own drawString at a computed x: the gap is only in the positions."""
    from reportlab.pdfbase.pdfmetrics import stringWidth
    from reportlab.pdfgen.canvas import Canvas

    buf = io.BytesIO()
    c = Canvas(buf)
    size = 10.0
    for y, gap_em in ((700, 0.18), (680, 0.3)):
        x = 50.0
        for word in WORDS:
            c.setFont("Helvetica", size)
            c.drawString(x, y, word)
            x += stringWidth(word, "Helvetica", size) + gap_em * size
    c.save()
    pages = extract_pdf(buf.getvalue(), ExtractPdfsConfig(ocr=False))
    assert pages[0]["text"].splitlines() == [" ".join(WORDS)] * 2
    assert pages[0]["text"].splitlines()[0].endswith("etch-")  # hyphenation left to the cleaner
    assert pages[0]["reading"]["used"] == "visitor"
    assert set(pages[0]["reading"]["scores"]) == {"visitor", "pdfium", "layout"}


def test_glued_word_measure_on_known_strings():
    parts = split_glued("ReactiveIonEtcher")  # "etcher" is rare, so the parts may differ
    assert parts is not None and len(parts) >= 2 and "".join(parts) == "reactiveionetcher"
    assert split_glued("poweredelectromagneticfield") == ("powered", "electromagnetic", "field")
    assert split_glued("photolithography") is None  # a real 16-letter word
    assert split_glued("characterization") is None
    assert split_glued("Xqzvbnmwrtplkjhg") is None  # not words at all: unreadable, not glued
    glued = "The ReactiveIonEtcher(RIE)usesa radio-frequency-poweredelectromagneticfield"
    assert glued_words(glued) == ["ReactiveIonEtcher", "poweredelectromagneticfield"]
    c = check(glued)
    assert (c.words, c.long, c.glued) == (7, 2, 2)
    assert glued_rate(glued) == pytest.approx(2 / 7)
    fixed = "The Reactive Ion Etcher (RIE) uses a radio-frequency-powered electromagnetic field"
    assert glued_rate(fixed) == 0
    assert reading_score(fixed) == 1.0
    assert reading_score(glued) < 0.6
    assert reading_score("T h e R e a c t i v e") < 0.3  # over-split text scores low too
    assert glued_rate("") == 0 and reading_score("") == 0


REAL_TEXT_PDFS = [
    "gift_manual/GIFT2.pdf",
    "ihp_open_pdk/High_Frequency_Noise_SG13G2_pdk.pdf",
    "ihp_open_pdk/S380.pdf",
    "ihp_open_pdk/SG13G2_os_layout_rules.pdf",
    "ihp_open_pdk/SG13G2_os_process_spec.pdf",
    "ihp_open_pdk/Using_OpenEMS_with_IHP_SG13G2_v1.pdf",
    "nist_mist/Blattner_etal_Hybrid_CPU-GPU_Stitching_Microscopy_Images.pdf",
    "pypdf_sample_files/google-doc-document.pdf",
    "pypdf_sample_files/multicolumn.pdf",
]


@pytest.fixture(scope="module")
def real_words():
    """name -> extracted pages, each file read once and only when a test asks for it."""
    return lazy_pdf_pages(ExtractPdfsConfig(ocr=False))


@pytest.mark.parametrize("name", REAL_TEXT_PDFS)
def test_real_pdfs_have_at_most_half_a_percent_glued_words(real_words, name):
    pages = real_words(name)
    total = sum((check(p["text"]) for p in pages), check(""))
    assert total.words > 100
    assert total.glued_rate <= 0.005, (name, glued_words("\n".join(p["text"] for p in pages))[:10])


def test_the_visitor_keeps_its_geometry_where_it_reads_well(real_words):
    # LuaTeX's justified lines were glued before; the respaced visitor reads the prose
    # pages itself, and a page that falls back says so and still has positioned lines
    pages = real_words("ihp_open_pdk/SG13G2_os_layout_rules.pdf")
    used = [p["reading"]["used"] for p in pages]
    assert used.count("visitor") > len(pages) / 2
    assert "Licensed under the Apache License" in pages[1]["text"]
    for p in pages:
        assert p["lines"] and all({"x0", "x1", "y", "size", "bold", "text"} <= set(ln) for ln in p["lines"])
    nist = real_words("nist_mist/Blattner_etal_Hybrid_CPU-GPU_Stitching_Microscopy_Images.pdf")
    assert all(p["reading"]["used"] == "visitor" for p in nist)


def test_the_visitor_reads_the_pdftex_two_column_file(real_words):
    pages = real_words("pypdf_sample_files/multicolumn.pdf")  # CC BY-SA: the full set only
    assert all(p["reading"]["used"] == "visitor" for p in pages)
