"""synth_corpus: sample PDFs rendered from the knowledge base, with their source text.

Reads the knowledge base (``paths.knowledge``); writes ``paths.synthetic_pdfs/<doc>.pdf``
and beside each its ground truth ``<doc>.md`` (the Markdown the PDF was rendered from).
Run: ``python -m stages.synth_corpus``.

The PDFs carry the layout problems real papers have, so clean_markdown can be scored on
them: two columns (or one), running headers and footers with page numbers, words
hyphenated at line ends, paragraphs and headings broken across columns and pages, tables,
numbered equations and figure captions. Rendering is deterministic: the same knowledge
base and params give byte-identical PDFs (reportlab's invariant mode fixes the dates and
document id it would otherwise stamp).
"""

from __future__ import annotations

import io
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from semilens.config import Config, SynthCorpusConfig
from semilens.io import atomic_write_bytes, atomic_write_text, write_json
from semilens.text.knowledge import Group, Knowledge, load_knowledge

STAGE = "synth_corpus"

# One short worked relation per group, written as engineers write them in plain text:
# the documents need equations to exercise extraction, and these are correct ones.
EQUATIONS: dict[str, list[str]] = {
    "substrate_preparation": ["C_s = k0 C0 (1 - f)^(k0 - 1)", "TTV = t_max - t_min"],
    "film_formation": ["x^2 + A x = B (t + tau)", "R_dep = t_film / t_dep"],
    "patterning": ["ER = (d_before - d_after) / t_etch", "S = ER_film / ER_mask", "A = 1 - ER_lateral / ER_vertical"],
    "doping": ["Q = integral of N(x) dx = 1.0e15 cm^-2", "x_j = 2 sqrt(D t) erfc^-1(N_B / N_s)"],
    "planarization": ["MRR = K_p P v", "WIWNU = sigma(t) / mean(t) x 100%"],
    "cleaning": ["RE = (N_before - N_after) / N_before x 100%", "t_etch = d_oxide / ER_HF"],
    "thermal_processing": ["D = D0 exp(-E_a / (k T))", "L_D = sqrt(D t)"],
    "metrology": ["R_s = (pi / ln 2) V / I = 4.532 V / I", "Cpk = min(USL - mean, mean - LSL) / (3 sigma)"],
    "advanced_modules": ["EOT = t_highk (3.9 / k_highk)", "W_eff = N_fin (2 H_fin + W_fin)"],
    "back_end": ["R = rho L / (W t)", "tau_RC = R C = rho eps L^2 / (t T)"],
}


@dataclass(frozen=True)
class Block:
    """One piece of a document; ``markdown()`` is the ground truth it contributes."""

    kind: Literal["title", "heading", "paragraph", "table", "equation", "figure"]
    text: str = ""
    level: int = 2
    rows: tuple[tuple[str, ...], ...] = ()

    def markdown(self) -> str:
        if self.kind == "title":
            return f"# {self.text}"
        if self.kind == "heading":
            return f"{'#' * self.level} {self.text}"
        if self.kind == "table":
            header, *body = self.rows
            lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
            return "\n".join(lines + ["| " + " | ".join(r) + " |" for r in body])
        return self.text  # paragraphs, equations and figure captions are plain text


def document_blocks(group: Group, rng: random.Random, max_units: int) -> list[Block]:
    """A process-notes document for one group: modules as sections, units as subsections."""
    blocks = [Block("title", f"{group.name}: process notes"), Block("paragraph", group.description)]
    equations = list(EQUATIONS[group.id])
    eq_no = fig_no = 0
    units = 0
    for module in group.modules:
        blocks += [Block("heading", module.name, 2), Block("paragraph", module.description)]
        for unit in module.units:
            if units >= max_units:
                break
            units += 1
            alias = f" ({', '.join(unit.aliases)})" if unit.aliases else ""
            blocks += [Block("heading", unit.name + alias, 3), Block("paragraph", unit.description)]
            if rng.random() < 0.5:
                rows = [("Parameter", "Unit", "Typical")] + [
                    (p.name, p.unit or "-", p.typical) for p in unit.parameters
                ]
                blocks.append(Block("table", rows=tuple(rows)))
            else:
                blocks.append(
                    Block(
                        "paragraph",
                        "Key parameters: "
                        + "; ".join(
                            f"{p.name} ({p.typical}{' ' + p.unit if p.unit else ''}): {p.effect.rstrip('.')}"
                            for p in unit.parameters
                        ),
                    )
                )
            for d in unit.defects:
                blocks.append(
                    Block(
                        "paragraph",
                        f"{d.name}. {d.symptom} Likely causes: {'; '.join(d.causes)}. "
                        f"Checks: {'; '.join(d.checks)}. Corrective actions: {'; '.join(d.actions)}.",
                    )
                )
            if equations and rng.random() < 0.3:
                eq_no += 1
                blocks.append(Block("equation", f"{equations.pop(0)} ({eq_no})"))
            if rng.random() < 0.2:
                fig_no += 1
                blocks.append(Block("figure", f"Figure {fig_no}: {unit.name}, schematic cross-section."))
    return blocks


def ground_truth(blocks: list[Block]) -> str:
    return "\n\n".join(b.markdown() for b in blocks) + "\n"


# ---------------------------------------------------------------- rendering


@dataclass
class _Style:
    font: str
    size: float
    leading: float
    space_before: float = 0.0


@dataclass
class _Layout:
    cfg: SynthCorpusConfig
    columns: int
    width: float = 612.0  # US letter, points
    height: float = 792.0
    margin: float = 54.0
    gutter: float = 20.0
    styles: dict[str, _Style] = field(default_factory=dict)

    def __post_init__(self) -> None:
        body = self.cfg.body_size
        self.styles = {
            "title": _Style("Helvetica-Bold", body * 1.7, body * 2.1, 0),
            "h2": _Style("Helvetica-Bold", body * 1.3, body * 1.6, body * 0.9),
            "h3": _Style("Helvetica-Bold", body * 1.1, body * 1.35, body * 0.6),
            "paragraph": _Style("Helvetica", body, body * 1.25, body * 0.55),
            "equation": _Style("Courier", body, body * 1.5, body * 0.55),
            "caption": _Style("Helvetica-Oblique", body * 0.9, body * 1.15, body * 0.4),
        }

    @property
    def column_width(self) -> float:
        return (self.width - 2 * self.margin - (self.columns - 1) * self.gutter) / self.columns

    def column_x(self, col: int) -> float:
        return self.margin + col * (self.column_width + self.gutter)

    @property
    def top(self) -> float:
        return self.height - self.margin - 14  # room for the running header

    @property
    def bottom(self) -> float:
        return self.margin + 10


def wrap(text: str, width: float, font: str, size: float, hyphenate: bool) -> list[str]:
    """Greedy line breaking; a long word that does not fit is hyphenated where it can be."""
    from reportlab.pdfbase.pdfmetrics import stringWidth

    def fits(candidate: str) -> bool:
        return stringWidth(candidate, font, size) <= width

    lines: list[str] = []
    line = ""
    words = text.split()
    i = 0
    while i < len(words):
        word = words[i]
        trial = f"{line} {word}" if line else word
        if fits(trial):
            line, i = trial, i + 1
            continue
        head = _hyphen_head(line, word, fits) if hyphenate else None
        if head is not None:
            lines.append(f"{line} {head}-" if line else f"{head}-")
            words[i], line = word[len(head) :], ""
        elif line:
            lines.append(line)
            line = ""
        else:  # one word wider than the column overflows, as it does in real layouts
            lines.append(word)
            i += 1
    if line:
        lines.append(line)
    return lines


def _hyphen_head(line: str, word: str, fits: Any) -> str | None:
    """The longest head of ``word`` (3+ letters, 3+ left) that fits on ``line`` with a hyphen."""
    for k in range(len(word) - 3, 2, -1):
        head = word[:k]
        if head[-1].isalpha() and word[k].isalpha() and fits(f"{line} {head}-" if line else f"{head}-"):
            return head
    return None


class _Writer:
    """Flows blocks down the columns of successive pages, drawing headers and footers."""

    def __init__(self, layout: _Layout, title: str, header: str, footer: str):
        from reportlab.pdfgen.canvas import Canvas

        self.layout = layout
        self.buf = io.BytesIO()
        self.canvas = Canvas(self.buf, pagesize=(layout.width, layout.height), invariant=1, pageCompression=1)
        self.canvas.setTitle(title)
        self.canvas.setCreator("semilens synth_corpus")
        self.header, self.footer = header, footer
        self.running: list[str] = []  # every header/footer string drawn: the leakage check's key
        self.page = 0
        self._new_page()

    def _new_page(self) -> None:
        if self.page:
            self.canvas.showPage()
        self.page += 1
        self.col = 0
        self.y = self.col_top = self.layout.top
        lay, c = self.layout, self.canvas
        right, foot = f"Section {self.page}", self.footer.format(page=self.page)
        c.setFont("Helvetica", 8)
        c.drawString(lay.margin, lay.height - lay.margin + 4, self.header)
        c.drawRightString(lay.width - lay.margin, lay.height - lay.margin + 4, right)
        c.drawCentredString(lay.width / 2, lay.margin - 24, foot)
        self.running += [self.header, right, foot]

    def _advance(self) -> None:
        if self.col + 1 < self.layout.columns:
            self.col += 1
            self.y = self.col_top  # below a full-width title on its page
        else:
            self._new_page()

    def room(self, height: float) -> None:
        """Start a new column (or page) unless ``height`` more points fit in this one."""
        if self.y - height < self.layout.bottom:
            self._advance()

    def lines(self, texts: list[str], style: _Style, keep: int = 1, centre: bool = False) -> None:
        self.y -= style.space_before
        self.room(style.leading * keep)
        for text in texts:
            self.room(style.leading)
            self.y -= style.leading
            self.canvas.setFont(style.font, style.size)
            x = self.layout.column_x(self.col)
            if centre:
                self.canvas.drawCentredString(x + self.layout.column_width / 2, self.y, text)
            else:
                self.canvas.drawString(x, self.y, text)

    def full_width_title(self, text: str, style: _Style) -> None:
        self.canvas.setFont(style.font, style.size)
        self.y -= style.leading
        self.canvas.drawString(self.layout.margin, self.y, text)
        self.y -= style.leading * 0.6
        self.col_top = self.y

    def table(self, rows: tuple[tuple[str, ...], ...]) -> bool:
        """Draw a table in the column; False (nothing drawn) if it cannot fit legibly."""
        from reportlab.pdfbase.pdfmetrics import stringWidth

        lay = self.layout
        for size in (lay.cfg.body_size * 0.85, lay.cfg.body_size * 0.75, lay.cfg.body_size * 0.65):
            gap = max(10.0, 1.6 * size)  # wider than extraction's cell gap (SPLIT_GAP em)
            widths = [
                max(stringWidth(r[j], "Helvetica-Bold" if i == 0 else "Helvetica", size) for i, r in enumerate(rows))
                for j in range(len(rows[0]))
            ]
            if sum(widths) + gap * (len(widths) - 1) <= lay.column_width:
                break
        else:
            return False
        leading = size * 1.3
        self.y -= lay.cfg.body_size * 0.6
        self.room(leading * min(len(rows), 3))
        for i, row in enumerate(rows):
            self.room(leading)
            self.y -= leading
            x = lay.column_x(self.col)
            for j, cell in enumerate(row):
                self.canvas.setFont("Helvetica-Bold" if i == 0 else "Helvetica", size)
                self.canvas.drawString(x, self.y, cell)
                x += widths[j] + gap
        return True

    def figure(self, caption: str, style: _Style) -> None:
        lay = self.layout
        box = min(90.0, lay.column_width * 0.45)
        caption_lines = wrap(caption, lay.column_width, style.font, style.size, hyphenate=False)
        self.y -= style.space_before
        self.room(box + 8 + style.leading * len(caption_lines))
        x = lay.column_x(self.col)
        self.canvas.setFillGray(0.85)
        self.canvas.rect(x + lay.column_width * 0.1, self.y - box, lay.column_width * 0.8, box, stroke=1, fill=1)
        self.canvas.setFillGray(0)
        self.y -= box + 4
        self.lines(caption_lines, _Style(style.font, style.size, style.leading, 0))

    def close(self) -> bytes:
        self.canvas.showPage()
        self.canvas.save()
        return self.buf.getvalue()


def render_pdf(blocks: list[Block], layout: _Layout, header: str, footer: str) -> tuple[bytes, list[Block], list[str]]:
    """The PDF, the blocks as drawn (a table too wide to draw becomes a paragraph) and the
    running header/footer strings of every page."""
    w = _Writer(layout, blocks[0].text, header, footer)
    drawn: list[Block] = []
    width = layout.column_width
    for b in blocks:
        if b.kind == "title":
            w.full_width_title(b.text, layout.styles["title"])
        elif b.kind == "heading":
            st = layout.styles["h2" if b.level == 2 else "h3"]
            w.lines(wrap(b.text, width, st.font, st.size, hyphenate=False), st, keep=3)
        elif b.kind == "paragraph":
            st = layout.styles["paragraph"]
            w.lines(wrap(b.text, width, st.font, st.size, hyphenate=layout.cfg.hyphenate), st)
        elif b.kind == "equation":
            st = layout.styles["equation"]
            w.lines(wrap(b.text, width, st.font, st.size, hyphenate=False), st, centre=True)
        elif b.kind == "figure":
            w.figure(b.text, layout.styles["caption"])
        elif b.kind == "table":
            if not w.table(b.rows):
                header_row, *body = b.rows
                b = Block("paragraph", "; ".join(" ".join(r) for r in body))
                st = layout.styles["paragraph"]
                w.lines(wrap(b.text, width, st.font, st.size, hyphenate=layout.cfg.hyphenate), st)
        drawn.append(b)
    return w.close(), drawn, w.running


FOOTERS = ("Page {page}", "- {page} -", "{page}")


def synth_corpus(cfg: Config) -> dict[str, Any]:
    scfg = cfg.synth_corpus
    out = Path(cfg.paths.synthetic_pdfs)
    out.mkdir(parents=True, exist_ok=True)
    for stale in [*out.glob("*.pdf"), *out.glob("*.md"), *out.glob("*.json")]:
        stale.unlink()
    if scfg.n_docs == 0:
        return {"documents": 0, "pages": 0}
    kb: Knowledge = load_knowledge(cfg.paths.knowledge)
    groups = sorted(kb.groups, key=lambda g: g.id)
    docs = pages = 0
    for i in range(scfg.n_docs):
        group = groups[i % len(groups)]
        rng = random.Random(f"{scfg.seed}:{i}:{group.id}")
        columns = scfg.columns[i % len(scfg.columns)]
        layout = _Layout(scfg, columns)
        blocks = document_blocks(group, rng, scfg.max_units_per_doc)
        header = f"semilens sample corpus | {group.name}"
        pdf, drawn, running = render_pdf(blocks, layout, header, FOOTERS[i % len(FOOTERS)])
        stem = f"{i:03d}_{group.id}"
        atomic_write_bytes(out / f"{stem}.pdf", pdf)
        atomic_write_text(out / f"{stem}.md", ground_truth(drawn))
        write_json(out / f"{stem}.json", {"group": group.id, "columns": columns, "running": running})
        docs, pages = docs + 1, pages + len(running) // 3
    return {"documents": docs, "pages": pages}
