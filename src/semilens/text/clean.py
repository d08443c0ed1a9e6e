"""clean_markdown: extracted pages -> one cleaned Markdown file per PDF, chunks, fidelity.

Reads ``paths.pages/pages.jsonl`` (from extract_pdfs) and, for synthetic documents, the
ground truth ``<doc>.md`` beside each PDF; writes ``paths.markdown/docs/<doc>.md``,
``paths.markdown/documents.jsonl`` (doc id -> source, sha256, pages), ``chunks.jsonl``
(chunks with file and page provenance) and ``metrics/clean.json`` (character-level
similarity to the ground truth and header/footer leakage).
Run: ``python -m stages.clean_markdown``.

The rules, in order, each for a problem real PDFs have:
1. running headers and footers: lines in the top or bottom band of the page that repeat
   on many pages once digits are masked, and bare page numbers, are dropped;
2. reading order: a page whose body lines rarely cross the middle is two-column; lines
   spanning both columns cut it into bands, each read left column then right;
3. tables: two or more consecutive rows of two or more cells on one baseline whose cell
   boundaries line up (a gap of whitespace running down both rows, with the next cells
   starting, ending or centred at one x); a lone row, or rows whose gaps fall anywhere, is
   justified prose split at a font change or a wide word space. Display equations (a
   number "(3)" at the end of a line of math) and numbered code listings are blocks of
   their own, kept line by line; small-caps words ("C OMPUTATION") are joined;
4. headings: lines set larger than the body text (or bold at body size and short),
   levelled by size;
5. paragraphs: re-joined across lines, columns and pages; a paragraph breaks at a gap
   wider than the line spacing or after a sentence end followed by a new column;
6. de-hyphenation: ``wo-`` + ``rd`` -> ``word`` unless the hyphenated form is used
   elsewhere in the document, also when a table or figure text stands between the two
   halves; ligatures (ﬁ, ﬂ) spelled out.

OCR pages come in tesseract's reading order and go through the same rules from 3 on.
Work is cached per document by the hash of its pages, so one new PDF cleans one PDF.
"""

from __future__ import annotations

import math
import re
import statistics
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from semilens.cache import ItemCache, code_version
from semilens.config import CleanMarkdownConfig, Config
from semilens.io import atomic_write_text, hash_json, read_json, read_jsonl, reset_dir, write_json, write_jsonl
from semilens.text.extract import Line

STAGE = "clean_markdown"

LIGATURES = str.maketrans({"ﬀ": "ff", "ﬁ": "fi", "ﬂ": "fl", "ﬃ": "ffi", "ﬄ": "ffl", "ﬅ": "st", "ﬆ": "st"})
# A line that is only a page number: "7", "- 7 -", "Page 7 of 26", "p. 7", "Seite 7 von 9".
_PAGE_NUMBER = re.compile(
    r"^\W*(?:page|pg\.?|p\.|seite|s\.|pagina|página)?\s*:?\s*(?P<n>\d{1,4})(?:\s*(?:of|/|von|de|sur)\s*\d{1,4})?\W*$",
    re.IGNORECASE,
)
# A page label inside a short header line: "IHP Seite:2 -", "Report X, Page 3 of 26".
_PAGE_LABEL = re.compile(
    r"\b(page|seite|pagina|página)\s*:?\s*(?P<n>\d{1,4})\b(?:\s*(?:of|/|von|de)\s*\d{1,4})?", re.IGNORECASE
)
_ENUMERATOR = re.compile(r"\(?(\d{1,2}|[a-z])[.)]")
BULLETS = {"•", "▪", "◦", "‣", "●", "○", "■", "□", "–", "-", "*"}
_SENTENCE_END = re.compile(r"[.!?:;)\]]['\"]?$")
_NOT_HEADING_END = re.compile(r"[.!?;]$")  # bold lines ending so are emphasised prose


@dataclass
class Ln(Line):
    """A line on its way through the rules; ``page`` keeps provenance."""

    page: int = 0
    column: int = 0
    cells: list[str] = field(default_factory=list)
    spans: list[tuple[float, float]] = field(default_factory=list)  # (x0, x1) of each cell
    item: bool = False  # a bulleted list item: always starts a block
    role: str = ""  # "equation" | "code": a display line kept as it is
    gapped: bool = False  # pieces far apart that are no table row: never a heading

    def flatten(self, gapped: bool = False) -> None:
        """No longer a table row: the text stays, joined with spaces."""
        self.cells, self.spans, self.gapped = [], [], gapped


@dataclass
class Block:
    kind: str  # heading | paragraph | table | equation | code
    lines: list[Ln]
    level: int = 0
    rows: list[list[str]] = field(default_factory=list)
    text: str = ""

    @property
    def pages(self) -> list[int]:
        return sorted({ln.page for ln in self.lines})


def _mask(text: str) -> str:
    """Lower case, digits masked, spaces dropped: "Page 3 of 26" and "Page 12 of 26" meet,
    and so do "SG13G2Layout" and "SG13G2 Layout" however the extractor spaces glyphs."""
    return re.sub(r"\d+", "#", "".join(text.lower().split()))


def _baselines(lines: list[Ln]) -> list[list[Ln]]:
    """The page's lines grouped by baseline, top first (a footer's pieces share one)."""
    rows: list[list[Ln]] = []
    for ln in sorted(lines, key=lambda ln: -ln.y):
        if rows and abs(rows[-1][0].y - ln.y) <= 2:
            rows[-1].append(ln)
        else:
            rows.append([ln])
    return rows


def _edge_lines(lines: list[Ln], k: int, height: float) -> list[tuple[Ln, str, float]]:
    """Lines on the ``k`` outermost baselines at the top and at the bottom of a page, each
    with its edge and its distance from that edge. Running lines sit outside the body
    whatever the margins are, so the search goes by rank, not by a fixed band."""
    top, bottom = _edge_rows(lines, k, height)
    return [(ln, "top", height - ln.y) for row in top for ln in row] + [
        (ln, "bottom", ln.y) for row in bottom for ln in row
    ]


def _edge_rows(lines: list[Ln], k: int, height: float) -> tuple[list[list[Ln]], list[list[Ln]]]:
    """The ``k`` outermost baselines from the top and from the bottom, each from its own half
    of the page: on a sparse slide the bottom's third line may be the title."""
    rows = _baselines(lines)
    top = [row for row in rows[:k] if row[0].y > height / 2]
    return top, [row for row in rows[::-1][:k] if row[0].y <= height / 2]


def _page_number(text: str) -> int | None:
    """The number a page-number line shows ("7", "- 7 -", "Page 7 of 26", "IHP Seite:2 -")."""
    m = _PAGE_NUMBER.match(text) or _PAGE_LABEL.search(text)
    if m is None:
        return None
    if m.re is _PAGE_LABEL and sum(c.isalpha() for c in text) - len(m.group(1)) > 12:
        return None  # a sentence that mentions a page, not a page label
    return int(m.group("n"))


def _page_offset(found: list[tuple[int, int]], n_pages: int) -> int | None:
    """The shift between printed page numbers and page order, if the candidates agree.

    ``found`` holds (page, number shown) for number-like lines at the page edges. A shift
    shared by at least two pages and a quarter of the document is the page numbering; a
    number that merely happens to stand at an edge rarely follows the sequence.
    """
    shifts = Counter(n - page for page, n in set(found))
    if not shifts:
        return None
    shift, pages = shifts.most_common(1)[0]
    return shift if pages >= max(2, math.ceil(0.25 * n_pages)) else None


def _clusters(positions: list[tuple[float, int]], tol: float) -> list[set[int]]:
    """Pages of (distance-from-edge, page) points grouped where neighbours lie within ``tol``."""
    groups: list[list[tuple[float, int]]] = []
    for pos in sorted(positions):
        if groups and pos[0] - groups[-1][-1][0] <= tol:
            groups[-1].append(pos)
        else:
            groups.append([pos])
    return [{page for _, page in g} for g in groups]


def strip_running(pages: list[dict[str, Any]], cfg: CleanMarkdownConfig) -> tuple[list[list[Ln]], list[str]]:
    """Drop running headers/footers and page numbers; return body lines per page and what went.

    Three signals, none tied to a margin width (letter pages, A4 and slides differ):
    - repetition: a line whose masked text comes back at about the same distance from the
      same edge on ``repeat_fraction`` of the pages (at least 3; both pages of a two-page
      document). Lines are peeled from the edge inwards and the peeling stops at the first
      baseline that does not repeat, so a slide template's recurring axis label or a
      subscript under a title stays. A heading that recurs once is not enough, and a
      one-page document has no running lines;
    - sequence: an edge line that is only a page number ("7", "Page 7 of 26", "Seite:2")
      whose number follows the page order at a position shared with another page (or
      spelled out as a page label); on a one-page document, one in the margin band;
    - glued numbers: the page number that the extractor joined to the first or last line
      of a page ("1 Figure 1:"), once the document's numbering is known.
    """
    per_page = [[Ln(**ln, page=p["page"]) for ln in p["lines"]] for p in pages]
    edges = [_edge_lines(lines, cfg.edge_lines, p["height"]) for p, lines in zip(pages, per_page)]
    n = len(pages)
    tol = cfg.position_tolerance * max(p["height"] for p in pages) if pages else 0.0
    drop: set[int] = set()
    # page numbers: by sequence at a shared position, or in the margin band
    numbered = [
        (p, ln, edge, dist, num)
        for p, page_edges in zip(pages, edges)
        for ln, edge, dist in page_edges
        if (num := _page_number(ln.text)) is not None
    ]
    shift = _page_offset([(p["page"], num) for p, *_, num in numbered], n) if n > 1 else None
    in_sequence = [x for x in numbered if shift is not None and x[4] - x[0]["page"] == shift]
    slots = {
        (edge, page)
        for edge in ("top", "bottom")
        for group in _clusters([(dist, p["page"]) for p, _, e, dist, _ in in_sequence if e == edge], tol)
        if len(group) >= 2
        for page in group
    }
    numbers_at: list[tuple[str, float]] = []  # where this document prints its page numbers
    for p, ln, edge, dist, _ in in_sequence:
        if (edge, p["page"]) in slots or _PAGE_LABEL.search(ln.text):
            drop.add(id(ln))
            numbers_at.append((edge, dist))
    for p, ln, *_ in numbered:
        if _PAGE_NUMBER.match(ln.text) and not p["height"] * cfg.margin_band < ln.y < p["height"] * (
            1 - cfg.margin_band
        ):
            drop.add(id(ln))
    # repetition at a position, peeled from each edge
    if n > 1:
        need = 2 if n == 2 else max(3, math.ceil(cfg.repeat_fraction * n))
        seen: dict[tuple[str, str], list[tuple[float, int]]] = {}
        for p, page_edges in zip(pages, edges):
            for ln, edge, dist in page_edges:
                if _mask(ln.text):
                    seen.setdefault((edge, _mask(ln.text)), []).append((dist, p["page"]))
        running = {
            (key, page)
            for key, positions in seen.items()
            for group in _clusters(positions, tol)
            if len(group) >= need
            for page in group
        }
        for p, lines in zip(pages, per_page):
            top, bottom = _edge_rows(lines, cfg.edge_lines, p["height"])
            for edge, ranked in (("top", top), ("bottom", bottom)):
                for row in ranked:
                    hit = [ln for ln in row if ((edge, _mask(ln.text)), p["page"]) in running]
                    drop.update(id(ln) for ln in hit)
                    if not all(id(ln) in drop for ln in row):
                        break
    removed: list[str] = []
    out = []
    for p, lines in zip(pages, per_page):
        removed += [ln.text for ln in lines if id(ln) in drop]
        kept = [ln for ln in lines if id(ln) not in drop]
        if shift is not None and numbers_at and not any(id(ln) in drop and _page_number(ln.text) for ln in lines):
            removed += _unglue(kept, p["page"] + shift, p["height"], numbers_at, tol)
        out.append(kept)
    return out, removed


def _unglue(lines: list[Ln], number: int, height: float, numbers_at: list[tuple[str, float]], tol: float) -> list[str]:
    """Cut the page number off the first or last line of a page where the extractor joined
    it to its neighbour on the same baseline: only on a page whose number was not found on
    its own, and only where the document prints its page numbers, since "11 years" at the
    foot of page 11 is text."""
    if not lines:
        return []
    rows = _baselines(lines)
    cut: list[str] = []
    for edge, row in (("top", rows[0]), ("bottom", rows[-1])):
        for ln in row:
            dist = height - ln.y if edge == "top" else ln.y
            if not any(e == edge and abs(d - dist) <= tol for e, d in numbers_at):
                continue
            head = re.match(rf"^\W*{number}\W*\s+(?=\w)", ln.text)
            tail = re.search(rf"(?<=\S)\s+\W*{number}\W*$", ln.text)
            if head:
                cut.append(head.group(0).strip())
                ln.text = ln.text[head.end() :]
            elif tail:
                cut.append(tail.group(0).strip())
                ln.text = ln.text[: tail.start()]
    return cut


# ---------------------------------------------------------------- front matter

_MONTHS = (
    "jan(uary)?|feb(ruary)?|mar(ch)?|apr(il)?|may|june?|july?|aug(ust)?|sep(t(ember)?)?|oct(ober)?|nov(ember)?|dec(ember)?"
    "|januar|februar|märz|mai|juni|juli|oktober|dezember"
)
_DATE = re.compile(
    rf"\b(\d{{1,2}}\.?\s*({_MONTHS})\.?,?\s+\d{{4}}|({_MONTHS})\.?\s+(\d{{1,2}},?\s+)?\d{{4}}"
    r"|\d{1,2}[./]\d{1,2}[./]\d{4}|\d{4}-\d{2}-\d{2})\b",
    re.IGNORECASE,
)
_AFFILIATION = re.compile(
    r"univ|institut|laborator|\blab\b|department|\bdept\b|school|college|cent(er|re)\b|faculty|academy|gmbh|\binc\b"
    r"|\bltd\b|corporation|company|\bag\b|hochschule|@|e-?mail|\b\d{5}(-\d{4})?\b",
    re.IGNORECASE,
)
_NAME = re.compile(r"^[A-ZÀ-Þ][\w'’.-]*\.?(\s+(van|von|de|der|da|di|le)?\s*[A-ZÀ-Þ][\w'’.-]*\.?){1,3}$")
_AUTHOR_LABEL = re.compile(r"^\s*(authors?|by|autor(en)?)\s*[:\-]\s*", re.IGNORECASE)
_FRONT_STOP = re.compile(
    r"^\W*(abstract|summary|keywords|index terms|introduction|contents|table of contents|zusammenfassung)\b",
    re.IGNORECASE,
)
_MARKERS = "∗*†‡§¶,0123456789 "


_NUMERIC = re.compile(r"[-+−±]?\d[\d.,]*\s*%?")


def _is_sentence(text: str) -> bool:
    """Prose: four words or more ending in a full stop (not "Inc." or an initial)."""
    return len(text.split()) >= 4 and re.search(r"[a-z]{3,}[.!?]$", text.strip()) is not None


def _names(text: str) -> list[str] | None:
    """The author names a line lists ("A. Smith, B. Jones and C. Lee", "Fischer, Gerhard"), or None."""
    text = text.strip().strip(_MARKERS)
    if re.fullmatch(r"[A-ZÀ-Þ][\w'’-]+,\s*[A-ZÀ-Þ][\w'’.-]+( [A-ZÀ-Þ][\w'’.-]+)?", text):
        return [text]  # "Surname, Given name"
    parts = [x.strip().strip(_MARKERS) for x in re.split(r",|\band\b|&|;|\bund\b", text)]
    parts = [x for x in parts if x]
    return parts if parts and all(_NAME.match(x) for x in parts) else None


def front_matter(lines: list[Ln], height: float, cfg: CleanMarkdownConfig) -> tuple[dict[str, Any], set[int]]:
    """Title, authors, affiliations and date of a first page; the ids of the lines to leave out.

    The title is the largest text in the upper half of the page. Below it, down to the first
    long line or "Abstract" / "Introduction" / "Contents", come short lines: a date, names
    (in the largest size names are set in, or after "Author:") and, under each name in
    its own column, the affiliation lines. These go to the document record, not into
    the Markdown as headings; a line that is none of these stays in the text.
    """
    body = _body_size(lines)
    upper = [
        ln for ln in lines if ln.y > 0.4 * height and sum(c.isalpha() for c in ln.text) >= 3
    ]  # title slides centre it
    if not upper:
        return {}, set()
    big = max(ln.size for ln in upper)
    if big < body * cfg.heading_ratio:
        return {}, set()
    rows = _baselines(lines)
    first = next(i for i, row in enumerate(rows) if any(ln.size == big and ln in upper for ln in row))
    i = first
    while i < len(rows) and all(abs(ln.size - big) < 0.5 for ln in rows[i]):
        i += 1
    title = " ".join(ln.text for row in rows[first:i] for ln in sorted(row, key=lambda ln: ln.x0))
    zone: list[Ln] = []
    for row in rows[i:]:
        if any(_FRONT_STOP.match(ln.text) or len(ln.text) > cfg.max_front_chars or _is_sentence(ln.text) for ln in row):
            break  # the body begins
        if len(zone) >= 40 or sum(_NUMERIC.fullmatch(ln.text.strip()) is not None for ln in row) >= 2:
            return {"title": title}, set()  # a table or a data sheet, not a title block
        zone += row
    # names are set near body size; a subtitle in display type is not an author
    name_sizes = [ln.size for ln in zone if _names(ln.text) and ln.size <= 1.3 * body]
    author_size = max(name_sizes) if name_sizes else None
    authors: list[str] = []
    stacks: dict[int, list[Ln]] = {}  # author line id -> affiliation lines under it
    date = ""
    leave: set[int] = set()
    for ln in zone:  # top to bottom
        m_date = _DATE.search(ln.text)
        labelled = _AUTHOR_LABEL.match(ln.text)
        if labelled or (author_size and abs(ln.size - author_size) < 0.5 and _names(ln.text)):
            authors += _names(ln.text[labelled.end() :] if labelled else ln.text) or [ln.text[labelled.end() :].strip()]
            stacks[id(ln)] = [ln]
            leave.add(id(ln))
        elif m_date and not date:
            date = m_date.group(0)
            if sum(c.isalpha() for c in ln.text.replace(date, "")) < 12:
                leave.add(id(ln))
        elif not any(c.isalnum() for c in ln.text):
            leave.add(id(ln))  # a lone footnote mark
        else:
            # under the nearest author line above it in the same column, or named as one
            mid = (ln.x0 + ln.x1) / 2
            owner = min(
                (s for s in stacks.values() if abs((s[0].x0 + s[0].x1) / 2 - mid) < 0.15 * (s[0].x1 - s[0].x0 + 200)),
                key=lambda s: s[0].y - ln.y if s[0].y > ln.y else 1e9,
                default=None,
            )
            if owner is not None and owner[0].y > ln.y:
                owner.append(ln)
                leave.add(id(ln))
            elif _AFFILIATION.search(ln.text):
                stacks[id(ln)] = [ln]
                leave.add(id(ln))
    affiliations: list[str] = []
    for stack in stacks.values():
        text = ", ".join(
            ln.text.strip().strip(",")
            for ln in stack
            if not (id(ln) == id(stack[0]) and (_names(ln.text) or _AUTHOR_LABEL.match(ln.text)))
        )
        if text and text not in affiliations:
            affiliations.append(text)
    if not (authors or affiliations or date):
        return {"title": title}, set()
    return {"title": title, "authors": authors, "affiliations": affiliations, "date": date}, leave


def _runs(lines: list[Ln], gap: float) -> list[tuple[float, float, str]]:
    """(x0, x1, text) of the page's runs of text: pieces on one baseline closer than
    ``gap`` em joined, so that a line cut at every font change (a bold word, a symbol)
    counts as the one line it is."""
    runs: list[tuple[float, float, str]] = []
    for row in _baselines(lines):
        x0 = x1 = size = 0.0
        text = ""
        for ln in sorted(row, key=lambda ln: ln.x0):
            if text and ln.x0 - x1 < gap * max(size, ln.size):
                x1, size, text = max(x1, ln.x1), max(size, ln.size), f"{text} {ln.text}"
                continue
            if text:
                runs.append((x0, x1, text))
            x0, x1, size, text = ln.x0, ln.x1, ln.size, ln.text
        if text:
            runs.append((x0, x1, text))
    return runs


def two_columns(lines: list[Ln], width: float, cell_gap: float = 0.8) -> bool:
    """Is the page set in two columns of text?

    Counted on runs (``_runs``), not on the extractor's pieces, and only text that fills a
    column counts: in a two-column page most characters sit in lines at least 0.6 of a
    column wide on each side of the middle, and few runs cross it. A table has a gutter
    of whitespace too, but its cells are narrow (a rule table's value column, a data
    sheet's numbers), so a page of tables, figure labels or slides is one column and is
    read row by row. Two bulleted lists side by side are columns too, narrow as they are.
    """
    runs = _runs(lines, cell_gap)
    if not runs:
        return False
    mid = width / 2
    left_edge, right_edge = min(r[0] for r in runs), max(r[1] for r in runs)
    column = 0.6 * (right_edge - left_edge) / 2
    chars = sum(len(r[2]) for r in runs)
    crossing = sum(r[0] < mid - 4 and r[1] > mid + 4 for r in runs)
    left = [r for r in runs if r[1] <= mid + 4]
    right = [r for r in runs if r[0] >= mid - 4]
    wide_left = sum(len(r[2]) for r in left if r[1] - r[0] >= column)
    wide_right = sum(len(r[2]) for r in right if r[1] - r[0] >= column)
    # the right column of a last page may hold a few lines only
    wide = wide_left + wide_right >= 0.4 * chars and min(wide_left, wide_right) >= 0.05 * chars
    lists = min(sum(r[2][:1] in BULLETS for r in side) for side in (left, right)) >= 3
    return crossing <= 0.3 * len(runs) and (wide or lists)


def reading_order(lines: list[Ln], width: float, ordered: bool, cell_gap: float = 0.8) -> list[Ln]:
    """Lines in reading order; ``column`` set to 0/1 on two-column pages (-1: spanning)."""
    if ordered or not lines:
        return lines
    mid = width / 2
    # by baseline, then left to right: a table cell set 0.1 pt lower than its neighbour
    # ("MIM.a" beside "Min. MIM") still belongs to the same row
    two = two_columns(lines, width, cell_gap)
    lines = [ln for row in _baselines(lines) for ln in sorted(row, key=lambda ln: ln.x0)]
    if not two:
        return lines
    out: list[Ln] = []
    band: list[Ln] = []

    def flush() -> None:
        for col in (0, 1):
            out.extend(ln for ln in band if ln.column == col)
        band.clear()

    for ln in lines:
        if ln.x0 < mid - 4 and ln.x1 > mid + 4:
            flush()
            ln.column = -1
            out.append(ln)
        else:
            ln.column = 0 if ln.x0 < mid else 1
            band.append(ln)
    flush()
    return out


def attach_scripts(lines: list[Ln]) -> list[Ln]:
    """Sub- and superscripts joined to the text they belong to.

    A piece set above or below a neighbour's baseline by 0.2 to 0.7 of its size (more
    than a font's jitter, less than a line) and touching it on the left or right is one of
    its scripts: "V" +
    "BE", "x" + "2", a footnote mark "1" before "nSD". Left alone, each script is a line of
    its own and lands as a lone number or a fake table cell somewhere else.
    """
    out = sorted(lines, key=lambda ln: len(ln.text), reverse=True)
    merged: set[int] = set()
    for small in sorted(lines, key=lambda ln: len(ln.text)):
        if id(small) in merged or len(small.text.strip()) > 12:
            continue
        for host in out:
            if host is small or id(host) in merged or len(host.text) <= len(small.text) or host.size < small.size:
                continue
            rise = small.y - host.y
            if not 0.2 * host.size < abs(rise) <= 0.7 * host.size:  # less is a font's baseline jitter
                continue
            gap = 0.6 * host.size
            if -1 <= small.x0 - host.x1 <= gap:
                host.text, host.x1 = host.text + small.text.strip(), max(host.x1, small.x1)
            elif -1 <= host.x0 - small.x1 <= gap:
                host.text, host.x0 = small.text.strip() + host.text, min(host.x0, small.x0)
            else:
                continue
            merged.add(id(small))
            break
    return [ln for ln in lines if id(ln) not in merged]


_NUMBERS_ONLY = re.compile(r"[\s\d.,:;%()+\-−–±×/^]*\d[\s\d.,:;%()+\-−–±×/^]*")


def _axis_like(texts: list[str], partial: bool = False) -> bool:
    """Do these numbers read like an axis? ``partial``: could they still grow into one."""
    values = []
    for t in texts:
        for tok in t.replace("−", "-").split():
            try:
                values.append(float(tok.replace(",", "")))
            except ValueError:
                return False
    steps = [b - a for a, b in zip(values, values[1:])]
    if not (all(d > 0 for d in steps) or all(d < 0 for d in steps)):
        return False
    if partial or len(values) < 3:
        return partial
    even = max(steps) - min(steps) <= 1e-6 * max(abs(d) for d in steps) + 1e-9
    ratios = [b / a for a, b in zip(values, values[1:]) if a]
    geometric = len(ratios) == len(steps) and max(ratios) - min(ratios) < 1e-6
    return even or geometric or len(values) >= 5


def drop_figure_numbers(lines: list[Ln]) -> tuple[list[Ln], list[str]]:
    """Runs of lines that are nothing but numbers and read like an axis leave the text.

    A run of such lines in a row on one page, none part of a table row, is a plot's tick
    labels when its values step evenly (0 10 20 30; 128 256 512 1024) or, five or more,
    run one way (8 7 4 3 2 1, where the tool split some ticks off). Anything else stays:
    a rule table's values that lost their rows (0.18, 0.42, 5.00) are content.
    """
    bare = [len(ln.cells) < 2 and _NUMBERS_ONLY.fullmatch(ln.text) is not None for ln in lines]
    # a bare number set far smaller than the text is a plot's label wherever it stands
    # (scripts were attached to their symbols before)
    body = _body_size(lines)
    drop = [b and ln.size < 0.6 * body for b, ln in zip(bare, lines)]
    i = 0
    while i < len(lines):
        j = i
        while j < len(lines) and bare[j] and lines[j].page == lines[i].page:
            j += 1
        # the longest stretches that run one way: a run often holds two axes, or a label
        k = i
        while k < j:
            m = k + 1
            while m < j and _axis_like([ln.text for ln in lines[k : m + 1]], partial=True):
                m += 1
            if _axis_like([ln.text for ln in lines[k:m]]):
                drop[k:m] = [True] * (m - k)
            k = m
        i = max(j, i + 1)
    return [ln for ln, d in zip(lines, drop) if not d], [ln.text for ln, d in zip(lines, drop) if d]


def merge_rows(lines: list[Ln], cell_gap: float = 0.8) -> list[Ln]:
    """Lines of one column on one baseline become one row whose ``cells`` are the pieces.

    Pieces closer than ``cell_gap`` em are one cell: a reader that starts a new run at
    each font change (pdfium; an italic word in a justified line) leaves word spaces
    between runs, and a word space is no column gap.
    """
    out: list[Ln] = []
    for ln in lines:
        prev = out[-1] if out else None
        # a spanning line (-1) may still share a baseline with the piece before it ("1." + note)
        same_column = prev is not None and (prev.column == ln.column or -1 in (prev.column, ln.column))
        # one baseline: within 2 pt, or a fifth of the size (a heading's number set apart)
        close = prev is not None and abs(prev.y - ln.y) <= max(2.0, 0.2 * max(prev.size, ln.size))
        # a row is set in one size: a plot's tick label beside a body line is no cell of it
        one_size = prev is not None and max(prev.size, ln.size) < 1.8 * min(prev.size, ln.size)
        if prev and prev.page == ln.page and same_column and close and one_size and ln.x0 > prev.x1:
            prev.cells = prev.cells or [prev.text]
            prev.spans = prev.spans or [(prev.x0, prev.x1)]
            if ln.x0 - prev.x1 < cell_gap * max(prev.size, ln.size):
                prev.cells[-1] = f"{prev.cells[-1]} {ln.text}"
                prev.spans[-1] = (prev.spans[-1][0], ln.x1)
            else:
                prev.cells.append(ln.text)
                prev.spans.append((ln.x0, ln.x1))
            prev.text = f"{prev.text} {ln.text}"
            prev.x1 = ln.x1
            prev.bold = prev.bold and ln.bold  # a bold first cell does not make the row a heading
        else:
            out.append(ln)
    for ln in out:
        # "•   item": a bullet set apart from its text is a list item, not a two-cell row
        if len(ln.cells) >= 2 and ln.cells[0] in BULLETS:
            ln.text, ln.item = "- " + " ".join(ln.cells[1:]), True
            ln.flatten()
        elif len(ln.cells) == 2 and ln.bold and re.fullmatch(r"\d+(\.\d+)*\.?", ln.cells[0]):
            ln.flatten()  # "5" + "Physical Layer Design Rules": a numbered heading, not a row
        elif len(ln.cells) == 2 and _ENUMERATOR.fullmatch(ln.cells[0]):
            ln.text, ln.item = f"{ln.cells[0]} {ln.cells[1]}", True  # "1." set apart from its note
            ln.flatten()
        elif len(ln.cells) == 1:
            ln.flatten()  # every piece within a word space of the last: one line of text
        elif ln.text[:1] in BULLETS and ln.text[1:2] == " ":
            ln.text, ln.item = "- " + ln.text[2:], True
    return out


# "C OMPUTATION", "TABLE I. O PERATION": small caps set as a capital in the text font and
# the rest in a smaller one, which the extractor reads as two words.
_SMALL_CAPS = re.compile(r"(?<![\w.'’-])([A-Z]) ([A-Z]{2,})(?![a-z])")
_LONE_CAPITAL = re.compile(r"(?:^|(?<=\s))([A-Z])$")


def _caps_word(head: str, tail: str, vocabulary: set[str]) -> bool:
    """Is ``head`` + ``tail`` one small-caps word? When the joined word is a word and the
    tail alone is not ("OMPUTATION"), or the head is no word by itself ("R UN" -> "RUN";
    "A LOT" stays apart)."""
    from semilens.text.words import is_word

    joined = head + tail
    if not (is_word(joined) or joined.lower() in vocabulary):
        return False
    return not is_word(tail) or head not in "AI"


def join_small_caps(lines: list[Ln], vocabulary: set[str]) -> None:
    """Small-caps words made whole, in a line's text and across the cells of a row: a lone
    capital that ends a cell and the capitals that start the next are one word, not a
    column gap ("| TABLE I. O | PERATION COUNTS |" is one caption)."""

    def fix(text: str) -> str:
        return _SMALL_CAPS.sub(
            lambda m: m.group(1) + m.group(2) if _caps_word(m.group(1), m.group(2), vocabulary) else m.group(0), text
        )

    for ln in lines:
        k = 0
        while k + 1 < len(ln.cells):
            head = _LONE_CAPITAL.search(ln.cells[k])
            tail = re.match(r"[A-Z]{2,}(?![a-z])", ln.cells[k + 1])
            if head and tail and _caps_word(head.group(1), tail.group(0), vocabulary):
                ln.cells[k : k + 2] = [ln.cells[k] + ln.cells[k + 1]]
                ln.spans[k : k + 2] = [(ln.spans[k][0], ln.spans[k + 1][1])]
            else:
                k += 1
        if ln.cells:
            ln.cells = [fix(c) for c in ln.cells]
            ln.text = " ".join(ln.cells)
        else:
            ln.text = fix(ln.text)
        if len(ln.cells) == 1:
            ln.flatten()


def _aligned(a: Ln, b: Ln) -> bool:
    """Do two rows share their column structure? Each gap between cells of one row must
    meet a gap of the other (whitespace running down both) with the cells after the gaps
    starting, ending or centred at one x, for half of the gaps of the row with fewer.

    The right ends of two last cells do not count: every justified line ends at the
    column's edge, so two prose lines split at a wide space would line up there.
    """
    if len(a.spans) == len(b.spans) == 2 and _running(a.cells[0]) and _running(b.cells[0]):
        return False  # two lines of running text split once each: prose, wherever the splits fall
    tol = 0.5 * max(a.size, b.size)
    gaps_a = [
        (a.spans[k][1], a.spans[k + 1][0], a.spans[k + 1], k + 2 == len(a.spans)) for k in range(len(a.spans) - 1)
    ]
    gaps_b = [
        (b.spans[k][1], b.spans[k + 1][0], b.spans[k + 1], k + 2 == len(b.spans)) for k in range(len(b.spans) - 1)
    ]
    matched = 0
    for lo_a, hi_a, (x0_a, x1_a), last_a in gaps_a:
        for lo_b, hi_b, (x0_b, x1_b), last_b in gaps_b:
            if min(hi_a, hi_b) - max(lo_a, lo_b) <= 0:
                continue  # the gaps do not overlap: no column of whitespace
            starts = abs(x0_a - x0_b) <= tol
            centres = abs((x0_a + x1_a) - (x0_b + x1_b)) / 2 <= tol
            ends = abs(x1_a - x1_b) <= tol and not (last_a and last_b)
            if starts or centres or ends:
                matched += 1
                break
    return matched >= max(1, math.ceil(min(len(gaps_a), len(gaps_b)) / 2))


def _pieces(ln: Ln) -> list[tuple[float, float, str]]:
    """(x0, x1, text) of a line's cells, or of the line itself when it has none."""
    if len(ln.cells) >= 2:
        return [(x0, x1, c) for (x0, x1), c in zip(ln.spans, ln.cells)]
    return [(ln.x0, ln.x1, ln.text)]


def _cell_line_of(frag: Ln, row: Ln) -> bool:
    """Could ``frag`` be a line of ``row``'s multi-line cells (by position across)?

    Each piece of it lies under one cell of the row (a wrapped cell) or in a gap between
    its cells (a cell set on two lines, centred on the row: "Tar-" / "get"), never across
    two cells (a line of prose or a caption). A line with several pieces is another row,
    not wrapped cells, when one of them lies under the row's first cell: a new row starts
    with its key ("Power 300" under "Pressure 20 mTorr")."""
    pieces = _pieces(frag)
    if len(frag.cells) >= len(row.cells) or frag.role or frag.page != row.page or frag.column != row.column:
        return False
    for x0, x1, _ in pieces:
        under = [k for k, (a, b) in enumerate(row.spans) if min(x1, b) - max(x0, a) > 0]
        if len(under) > 1 or (under == [0] and len(pieces) > 1):
            return False
    return True


def _join_cell_text(parts: list[str], vocabulary: set[str]) -> str:
    # "Resis -" + "tance": a hyphen the extractor set apart is still a line-end hyphen
    return dehyphenate([re.sub(r"(?<=[^\W\d_]) -$", "-", p.strip()) for p in parts], vocabulary)


def join_cell_lines(lines: list[Ln], vocabulary: set[str]) -> list[Ln]:
    """Lines of multi-line table cells joined into their row's cells.

    A cell too long for its column wraps onto lines that have fewer pieces than the row
    (only the wrapped cells go on), at the text's line spacing: closer to their row than
    rows are to each other. Left alone, each such line cuts the table in two and, set
    bold, becomes a heading ("| Rule | Description |" + "#### Value"). A table row (a
    line of 2+ cells lined up with a neighbouring row, ``_aligned``) takes:
    - below it, lines within 1.3 em of the line above them that are a line of its cells
      (``_cell_line_of``) and no nearer to the line after them than to the one before
      (a top-aligned cell wraps downwards);
    - above it, such lines only when a line below mirrors them at the same distance: a
      cell centred on its row puts as many lines above the row's baseline as below.
    Each cell's lines are joined top to bottom, a line-end hyphen undone.
    """
    rows = [k for k, ln in enumerate(lines) if len(ln.cells) >= 2 and not ln.role]
    table_rows: set[int] = set()
    for n, a in enumerate(rows):
        # a header whose cells are set on two lines has its neighbours' pieces between it and the first data row
        for b in rows[n + 1 : n + 4]:
            if b - a <= 8 and lines[a].page == lines[b].page and _aligned(lines[a], lines[b]):
                table_rows |= {a, b}
    out: list[Ln] = []
    taken: set[int] = set()
    for k, row in enumerate(lines):
        if k in taken:
            continue
        if k not in table_rows:
            out.append(row)
            continue
        em = 1.3 * row.size
        below: list[Ln] = []
        last = row
        j = k + 1
        while j < len(lines):
            frag = lines[j]
            gap = last.y - frag.y
            nxt = lines[j + 1] if j + 1 < len(lines) and lines[j + 1].page == frag.page else None
            if not (0 < gap <= em and _cell_line_of(frag, row)):
                break
            if nxt is not None and 0 < frag.y - nxt.y < gap - 0.5:
                break  # nearer to the next line: the first line of the next row's cell
            below.append(frag)
            last = frag
            j += 1
        above: list[Ln] = []
        first = row
        while out and below:
            frag = out[-1]
            gap = frag.y - first.y
            mirror = any(abs((row.y - b.y) - (frag.y - row.y)) <= 0.3 * row.size for b in below)
            if not (0 < gap <= em and _cell_line_of(frag, row) and mirror):
                break
            above.append(out.pop())
            first = frag
        if not (above or below):
            out.append(row)
            continue
        taken.update(range(k + 1, k + 1 + len(below)))
        # cells: the pieces of the row and of its lines, grouped where they overlap across
        pieces = sorted(
            [(x0, x1, -ln.y, text) for ln in [*above, row, *below] for x0, x1, text in _pieces(ln)],
            key=lambda p: p[0],
        )
        columns: list[list[tuple[float, float, float, str]]] = []
        for p in pieces:
            if columns and p[0] < max(q[1] for q in columns[-1]):
                columns[-1].append(p)
            else:
                columns.append([p])
        row.cells = [_join_cell_text([q[3] for q in sorted(col, key=lambda q: q[2])], vocabulary) for col in columns]
        row.spans = [(min(q[0] for q in col), max(q[1] for q in col)) for col in columns]
        row.text = " ".join(row.cells)
        out.append(row)
    return out


def _running(text: str) -> bool:
    """Running text: five words or more, most of them in lower case."""
    words = text.split()
    return len(words) >= 5 and sum(w[:1].islower() for w in words) >= 0.6 * len(words)


def confirm_tables(lines: list[Ln]) -> None:
    """Rows of cells stay table rows only next to a row they line up with (``_aligned``);
    any other row is a line of text again. A justified prose line whose word space the
    extractor took for a column gap, or a caption set in two pieces, has no such
    neighbour, while a real table repeats its columns row after row."""
    i = 0
    while i < len(lines):
        if len(lines[i].cells) < 2 or lines[i].role:
            i += 1
            continue
        j = i
        while (
            j + 1 < len(lines)
            and len(lines[j + 1].cells) >= 2
            and not lines[j + 1].role
            and lines[j + 1].page == lines[i].page
        ):
            j += 1
        keep: set[int] = set()
        for k in range(i, j):
            if _aligned(lines[k], lines[k + 1]):
                keep |= {k, k + 1}
        for k in range(i, j + 1):
            if k not in keep:
                lines[k].flatten(gapped=True)
        i = j + 1


# A display equation's number at the end of its line: "(3)", "(2.4)", "(7b)".
_EQ_NUMBER = re.compile(r"\(\s*\d{1,3}(?:\.\d{1,3})?[a-z]?\s*\)$")
_RELATION = re.compile(r"[=<>≤≥≈≠∝≡→⇒]|:=")
_PROSE_WORD = re.compile(r"^[a-z]{4,}[,.;:]?$")
# A listing's line numbers count up by one; the code shows in assignments, comments,
# brackets and the keywords pseudo-code is written in.
_LISTING_LINE = re.compile(r"^(\d{1,3})\s+(\S.*)$")
_CODE = re.compile(r"←|:=|//|[{};]|\b(begin|end|for|foreach|while|if|then|else|return|do|def|function|repeat|until)\b")


def _mathy(text: str) -> bool:
    """A line of math rather than prose: a relation sign and few running words."""
    words = text.split()
    prose = sum(_PROSE_WORD.match(w) is not None for w in words)
    return bool(_RELATION.search(text)) and prose <= max(1, len(words) // 4) and not _is_sentence(text)


def mark_display(lines: list[Ln]) -> None:
    """Display equations and numbered code listings marked (``role``) and made one line each.

    An equation is a line of math ending in its number, with any math lines right above it
    on the page (a multi-line display). A listing is three or more lines in a row whose
    leading numbers count up by one, a third of them reading as code. Both are kept line
    by line as one block, never cut into table cells; their sub- and superscripts were
    joined to their symbols before (``attach_scripts``).
    """
    for k, ln in enumerate(lines):
        body = _EQ_NUMBER.sub("", ln.text).strip()
        if ln.role or not _EQ_NUMBER.search(ln.text) or not body or not _mathy(body) or len(ln.text) > 160:
            continue
        ln.role = "equation"
        m = k - 1
        while (
            m >= 0
            and lines[m].page == ln.page
            and not lines[m].role
            and _mathy(lines[m].text)
            and len(lines[m].text) <= 160
        ):
            lines[m].role = "equation"
            m -= 1
    i = 0
    while i < len(lines):
        j = i
        while (
            j < len(lines)
            and (m := _LISTING_LINE.match(lines[j].text))
            and int(m.group(1)) == int(_LISTING_LINE.match(lines[i].text).group(1)) + j - i
        ):  # type: ignore[union-attr]
            j += 1
        run = lines[i:j]
        if (
            len(run) >= 3
            and 3 * sum(_CODE.search(ln.text) is not None for ln in run) >= len(run)
            and not any(ln.role for ln in run)
        ):
            for ln in run:
                ln.role = "code"
        i = max(j, i + 1)
    for ln in lines:
        if ln.role:
            ln.flatten()


def _body_size(lines: Iterable[Ln]) -> float:
    weights: Counter = Counter()
    for ln in lines:
        weights[round(ln.size)] += len(ln.text)
    return float(weights.most_common(1)[0][0]) if weights else 10.0


def _leading(lines: list[Ln]) -> float:
    gaps = [
        a.y - b.y
        for a, b in zip(lines, lines[1:])
        if a.page == b.page and a.column == b.column and 0 < a.y - b.y < 3 * a.size
    ]
    return statistics.median(gaps) if gaps else 12.0


def blocks_from(lines: list[Ln], cfg: CleanMarkdownConfig) -> list[Block]:
    body = _body_size(lines)
    leading = _leading(lines)
    heading_sizes = sorted({round(ln.size) for ln in lines if ln.size >= body * cfg.heading_ratio}, reverse=True)

    def heading_level(ln: Ln) -> int:
        letters = sum(c.isalpha() for c in ln.text)
        if ln.gapped:
            return 0  # a broken-up table row or labels of a figure, not a title
        if letters < 3 or letters < 0.5 * len(ln.text.replace(" ", "")):
            return 0  # plot tick labels and numbers set large are not headings
        if round(ln.size) in heading_sizes:
            return min(1 + heading_sizes.index(round(ln.size)), 6)
        if ln.bold and len(ln.text) <= cfg.max_heading_chars and not _NOT_HEADING_END.search(ln.text):
            return min(len(heading_sizes) + 1, 6)
        return 0

    blocks: list[Block] = []
    i = 0
    while i < len(lines):
        ln = lines[i]
        if ln.role:  # a display equation or a listing: its lines as they are
            j = i
            while j < len(lines) and lines[j].role == ln.role and lines[j].page == ln.page:
                j += 1
            blocks.append(Block(ln.role, lines[i:j]))
            i = j
            continue
        # tables: a run of rows with 2+ cells
        if len(ln.cells) >= 2:
            j = i
            while j < len(lines) and len(lines[j].cells) >= 2:
                j += 1
            if j - i >= 2:
                blocks.append(Block("table", lines[i:j], rows=[list(x.cells) for x in lines[i:j]]))
                i = j
                continue
        level = heading_level(ln) if len(ln.cells) < 2 else 0
        if level:
            prev = blocks[-1] if blocks else None
            same = prev and prev.kind == "heading" and prev.level == level and prev.lines[-1].page == ln.page
            if same and 0 < prev.lines[-1].y - ln.y <= ln.size * 1.6:
                prev.lines.append(ln)  # a heading wrapped onto a second line
            else:
                blocks.append(Block("heading", [ln], level=level))
            i += 1
            continue
        prev = blocks[-1] if blocks else None
        if prev is not None and prev.kind == "paragraph" and not ln.item and _continues(prev.lines[-1], ln, leading):
            prev.lines.append(ln)
        else:
            blocks.append(Block("paragraph", [ln]))
        i += 1
    return blocks


def _continues(a: Ln, b: Ln, leading: float) -> bool:
    """Does line ``b`` continue the paragraph that line ``a`` ends?"""
    if a.page == b.page and a.column == b.column:
        return 0 < a.y - b.y <= leading * 1.35
    # a new column or page: the paragraph goes on unless it had visibly ended
    return not _SENTENCE_END.search(a.text) or b.text[:1].islower()


def dehyphenate(lines: list[str], vocabulary: set[str]) -> str:
    """Join a paragraph's lines, undoing end-of-line hyphenation."""
    text = ""
    for line in lines:
        if not text:
            text = line
            continue
        m = re.search(r"(\w+)-$", text)
        if m and line[:1].isalpha() and line[:1].islower():
            head, tail = m.group(1), re.match(r"[\w-]+", line).group(0)  # type: ignore[union-attr]
            keep = f"{head}-{tail}".lower() in vocabulary and f"{head}{tail}".lower() not in vocabulary
            text = text if keep else text[:-1]
            text += line
        else:
            text += " " + line
    return text


def _vocabulary(lines: Iterable[Ln]) -> set[str]:
    """Words as written inside lines (not at line ends): the document's own spellings."""
    vocab: set[str] = set()
    for ln in lines:
        words = ln.text.split()
        vocab.update(w.strip(".,;:()[]").lower() for w in words[:-1])
    return vocab


def to_markdown(blocks: list[Block], vocabulary: set[str]) -> list[Block]:
    for b in blocks:
        if b.kind == "heading":
            b.text = f"{'#' * b.level} " + " ".join(ln.text for ln in b.lines)
        elif b.kind == "table":
            width = max(len(r) for r in b.rows)
            rows = [r + [""] * (width - len(r)) for r in b.rows]
            lines = ["| " + " | ".join(rows[0]) + " |", "|" + "---|" * width]
            b.text = "\n".join(lines + ["| " + " | ".join(r) + " |" for r in rows[1:]])
        elif b.kind == "equation":
            b.text = "\n".join(ln.text for ln in b.lines)
        elif b.kind == "code":
            b.text = "```\n" + "\n".join(ln.text for ln in b.lines) + "\n```"
        else:
            b.text = dehyphenate([ln.text for ln in b.lines], vocabulary)
    return rejoin_split_words(blocks, vocabulary)


def rejoin_split_words(blocks: list[Block], vocabulary: set[str]) -> list[Block]:
    """A paragraph that ends in "compo-" goes on in the next paragraph that starts in lower
    case ("nents ..."), past any table, equation or listing set between them: the layout
    put a float inside the sentence, the reader reads over it."""
    out: list[Block] = []
    for b in blocks:
        host = None
        if b.kind == "paragraph" and b.text[:1].islower():
            for prev in reversed(out):
                if prev.kind == "paragraph":
                    host = prev if re.search(r"[^\W\d_]{2,}-$", prev.text) else None
                    break
                if prev.kind not in ("table", "equation", "code"):
                    break
        if host is not None:
            host.text = dehyphenate([host.text, b.text], vocabulary)
            host.lines += b.lines
        else:
            out.append(b)
    return out


def clean_document(pages: list[dict[str, Any]], cfg: CleanMarkdownConfig) -> dict[str, Any]:
    """One document's pages -> Markdown blocks with page provenance, plus what was removed."""
    pages = sorted(pages, key=lambda p: p["page"])
    for p in pages:
        for ln in p["lines"]:
            ln["text"] = ln["text"].translate(LIGATURES)
    body, removed = strip_running(pages, cfg)
    meta, leave = (
        front_matter(body[0], pages[0]["height"], cfg) if body and pages[0]["method"] != "ocr" else ({}, set())
    )
    if leave:
        body[0] = [ln for ln in body[0] if id(ln) not in leave]
    ordered: list[Ln] = []
    for p, lines in zip(pages, body):
        if p["method"] != "ocr":
            lines = attach_scripts(lines)
        ordered += merge_rows(
            reading_order(lines, p["width"], ordered=p["method"] == "ocr", cell_gap=cfg.cell_gap), cfg.cell_gap
        )
    join_small_caps(ordered, _vocabulary(ordered))
    ordered, ticks = drop_figure_numbers(ordered)
    removed += ticks
    mark_display(ordered)
    ordered = join_cell_lines(ordered, _vocabulary(ordered))
    confirm_tables(ordered)
    blocks = to_markdown(blocks_from(ordered, cfg), _vocabulary(ordered))
    return {
        "markdown": "\n\n".join(b.text for b in blocks) + "\n",
        "blocks": [{"kind": b.kind, "text": b.text, "pages": b.pages} for b in blocks],
        "removed": removed,
        "front_matter": meta,
    }


def chunk(blocks: list[dict[str, Any]], max_chars: int) -> list[dict[str, Any]]:
    """Heading-led chunks of at most ``max_chars`` (a longer block is its own chunk)."""
    chunks: list[dict[str, Any]] = []
    path: list[str] = []
    current: list[dict[str, Any]] = []

    def flush() -> None:
        if any(b["kind"] != "heading" for b in current):
            chunks.append(
                {
                    "headings": list(path),
                    "text": "\n\n".join(b["text"] for b in current),
                    "pages": sorted({p for b in current for p in b["pages"]}),
                }
            )
        current.clear()

    for b in blocks:
        if b["kind"] == "heading":
            flush()
            level = len(b["text"]) - len(b["text"].lstrip("#"))
            path[:] = path[: level - 1] + [b["text"].lstrip("# ")]
        elif current and sum(len(c["text"]) for c in current) + len(b["text"]) > max_chars:
            flush()
        current.append(b)
    flush()
    return chunks


# ---------------------------------------------------------------- fidelity


def plain(markdown: str) -> str:
    """Markdown -> the characters a reader sees: no heading marks, table rules or pipes."""
    out = []
    for line in markdown.splitlines():
        s = line.strip()
        if re.fullmatch(r"\|?(\s*:?-{3,}:?\s*\|)+\s*", s):
            continue
        s = re.sub(r"^#{1,6}\s+", "", s)
        if s.startswith("|"):
            s = " ".join(c.strip() for c in s.strip("|").split("|"))
        out.append(s)
    return " ".join(" ".join(out).split())


def similarity(cleaned: str, truth: str) -> float:
    """Character-level similarity: 1 - normalised Levenshtein distance of the plain texts."""
    from rapidfuzz.distance import Levenshtein

    return round(Levenshtein.normalized_similarity(plain(cleaned), plain(truth)), 4)


def leakage(cleaned: str, running: list[str]) -> int:
    """How many of the running headers/footers drawn on the pages survive in the body.

    A text one is found anywhere (a leaked header ends up inside a joined paragraph); a bare
    number or "- 3 -" only as a line of its own, since digits occur in any text.
    """
    lines = {line.strip() for line in cleaned.splitlines()}
    flat = " ".join(cleaned.split())
    leaked = 0
    for r in running:
        r = " ".join(r.split())
        wordy = sum(c.isalpha() for c in r) >= 4
        leaked += (r in flat) if wordy else (r in lines)
    return leaked


# ---------------------------------------------------------------- stage


def doc_id(source: str, sha256: str) -> str:
    stem = re.sub(r"[^A-Za-z0-9_.-]+", "_", Path(source).stem)[:60]
    return f"{stem}-{sha256[:10]}"


def clean_markdown(cfg: Config) -> dict[str, Any]:
    ccfg = cfg.clean_markdown
    by_doc: dict[str, list[dict[str, Any]]] = {}
    for page in read_jsonl(Path(cfg.paths.pages) / "pages.jsonl"):
        by_doc.setdefault(page["sha256"], []).append(page)
    cache = ItemCache(cfg.paths.cache, STAGE, code_version("semilens.text.clean"))
    params = ccfg.model_dump(mode="json")
    out = Path(cfg.paths.markdown)
    docs_dir = reset_dir(out / "docs")
    documents, chunks, fidelity = [], [], []
    docs = sorted(by_doc.items(), key=lambda kv: kv[1][0]["source"])
    results = []
    for _sha, pages in docs:
        key = cache.key(hash_json(pages), params)
        result = cache.get(key)
        if result is None:
            result = clean_document(pages, ccfg)
            cache.put(key, result)
        results.append(result)
    backend: dict[str, Any] = {"backend": "rules"}
    if ccfg.backend == "llm":
        from semilens.text.clean_llm import polish

        results, backend = polish(results, ccfg, cfg.paths.cache)
    for (sha, pages), result in zip(docs, results):
        source = pages[0]["source"]
        did = doc_id(source, sha)
        atomic_write_text(docs_dir / f"{did}.md", result["markdown"])
        documents.append(
            {
                "doc_id": did,
                "source": source,
                "origin": pages[0]["origin"],
                "sha256": sha,
                "pages": len(pages),
                "ocr_pages": sum(p["method"] == "ocr" for p in pages),
                "chars": len(result["markdown"]),
                "removed_running_lines": len(result["removed"]),
                "front_matter": result.get("front_matter", {}),
            }
        )
        for n, c in enumerate(chunk(result["blocks"], ccfg.chunk_chars)):
            chunks.append({"chunk_id": f"{did}:{n:04d}", "doc_id": did, "source": source, "sha256": sha, **c})
        truth, layout = Path(source).with_suffix(".md"), Path(source).with_suffix(".json")
        if pages[0]["origin"] == "synthetic" and truth.is_file() and layout.is_file():
            running = read_json(layout)["running"]
            fidelity.append(
                {
                    "doc_id": did,
                    "similarity": similarity(result["markdown"], truth.read_text(encoding="utf-8")),
                    "leaked_running_lines": leakage(result["markdown"], running),
                    "running_lines": len(running),
                }
            )
    write_jsonl(out / "documents.jsonl", documents)
    write_jsonl(out / "chunks.jsonl", chunks)
    sims = [f["similarity"] for f in fidelity]
    metrics = {
        "documents": len(documents),
        "chunks": len(chunks),
        "synthetic_scored": len(fidelity),
        "similarity_mean": round(statistics.fmean(sims), 4) if sims else None,
        "similarity_min": min(sims) if sims else None,
        "leaked_running_lines": sum(f["leaked_running_lines"] for f in fidelity),
        **backend,
        "per_document": fidelity,
    }
    write_json(Path(cfg.paths.metrics) / "clean.json", metrics)
    return {k: v for k, v in metrics.items() if k != "per_document"} | {"cache": cache.stats()}
