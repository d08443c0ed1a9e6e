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
3. tables: two or more consecutive rows of two or more cells on one baseline;
4. headings: lines set larger than the body text (or bold at body size and short),
   levelled by size;
5. paragraphs: re-joined across lines, columns and pages; a paragraph breaks at a gap
   wider than the line spacing or after a sentence end followed by a new column;
6. de-hyphenation: ``wo-`` + ``rd`` -> ``word`` unless the hyphenated form is used
   elsewhere in the document; ligatures (ﬁ, ﬂ) spelled out.

OCR pages come in tesseract's reading order and go through the same rules from 3 on.
Work is cached per document by the hash of its pages, so one new PDF cleans one PDF.
"""

from __future__ import annotations

import re
import statistics
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

from semilens.cache import ItemCache, code_version
from semilens.config import CleanMarkdownConfig, Config
from semilens.io import atomic_write_text, hash_json, read_json, read_jsonl, reset_dir, write_json, write_jsonl
from semilens.text.extract import Line

STAGE = "clean_markdown"

LIGATURES = str.maketrans({"ﬀ": "ff", "ﬁ": "fi", "ﬂ": "fl", "ﬃ": "ffi", "ﬄ": "ffl", "ﬅ": "st", "ﬆ": "st"})
_PAGE_NUMBER = re.compile(r"^\W*(page|p\.|seite)?\s*\d{1,4}(\s*(of|/)\s*\d{1,4})?\W*$", re.IGNORECASE)
BULLETS = {"•", "▪", "◦", "‣", "●", "○", "■", "□", "–", "-", "*"}
_SENTENCE_END = re.compile(r"[.!?:;)\]]['\"]?$")
_NOT_HEADING_END = re.compile(r"[.!?;]$")  # bold lines ending so are emphasised prose


@dataclass
class Ln(Line):
    """A line on its way through the rules; ``page`` keeps provenance."""

    page: int = 0
    column: int = 0
    cells: list[str] = field(default_factory=list)
    item: bool = False  # a bulleted list item: always starts a block


@dataclass
class Block:
    kind: str  # heading | paragraph | table
    lines: list[Ln]
    level: int = 0
    rows: list[list[str]] = field(default_factory=list)
    text: str = ""

    @property
    def pages(self) -> list[int]:
        return sorted({ln.page for ln in self.lines})


def _mask(text: str) -> str:
    return re.sub(r"\d+", "#", text.lower()).strip()


def strip_running(pages: list[dict[str, Any]], cfg: CleanMarkdownConfig) -> tuple[list[list[Ln]], list[str]]:
    """Drop running headers/footers and page numbers; return body lines per page and what went."""
    bands: list[list[tuple[Ln, str]]] = []
    per_page: list[list[Ln]] = []
    for p in pages:
        lines = [Ln(**ln, page=p["page"]) for ln in p["lines"]]
        per_page.append(lines)
        top, bottom = p["height"] * (1 - cfg.margin_band), p["height"] * cfg.margin_band
        bands.append([(ln, "top" if ln.y >= top else "bottom") for ln in lines if ln.y >= top or ln.y <= bottom])
    counts = Counter()
    for page_band in bands:
        counts.update({(band, _mask(ln.text)) for ln, band in page_band})
    need = max(2, round(cfg.repeat_fraction * len(pages)))
    removed: list[str] = []
    out = []
    for lines, page_band in zip(per_page, bands):
        drop = {
            id(ln)
            for ln, band in page_band
            if _PAGE_NUMBER.match(ln.text) or (len(pages) > 1 and counts[(band, _mask(ln.text))] >= need)
        }
        removed += [ln.text for ln in lines if id(ln) in drop]
        out.append([ln for ln in lines if id(ln) not in drop])
    return out, removed


def reading_order(lines: list[Ln], width: float, ordered: bool) -> list[Ln]:
    """Lines in reading order; ``column`` set to 0/1 on two-column pages (-1: spanning)."""
    if ordered or not lines:
        return lines
    mid = width / 2
    crossing = sum(ln.x0 < mid - 4 and ln.x1 > mid + 4 for ln in lines)
    right = sum(ln.x0 >= mid for ln in lines)
    lines = sorted(lines, key=lambda ln: (-ln.y, ln.x0))
    if right == 0 or crossing > 0.3 * len(lines):
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


def merge_rows(lines: list[Ln]) -> list[Ln]:
    """Lines of one column on one baseline become one row whose ``cells`` are the pieces."""
    out: list[Ln] = []
    for ln in lines:
        prev = out[-1] if out else None
        if prev and prev.page == ln.page and prev.column == ln.column and abs(prev.y - ln.y) <= 2 and ln.x0 > prev.x1:
            prev.cells = (prev.cells or [prev.text]) + [ln.text]
            prev.text = f"{prev.text} {ln.text}"
            prev.x1 = ln.x1
        else:
            out.append(ln)
    for ln in out:
        # "•   item": a bullet set apart from its text is a list item, not a two-cell row
        if len(ln.cells) >= 2 and ln.cells[0] in BULLETS:
            ln.text, ln.cells, ln.item = "- " + " ".join(ln.cells[1:]), [], True
        elif ln.text[:1] in BULLETS and ln.text[1:2] == " ":
            ln.text, ln.item = "- " + ln.text[2:], True
    return out


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
        else:
            b.text = dehyphenate([ln.text for ln in b.lines], vocabulary)
    return blocks


def clean_document(pages: list[dict[str, Any]], cfg: CleanMarkdownConfig) -> dict[str, Any]:
    """One document's pages -> Markdown blocks with page provenance, plus what was removed."""
    pages = sorted(pages, key=lambda p: p["page"])
    for p in pages:
        for ln in p["lines"]:
            ln["text"] = ln["text"].translate(LIGATURES)
    body, removed = strip_running(pages, cfg)
    ordered: list[Ln] = []
    for p, lines in zip(pages, body):
        ordered += merge_rows(reading_order(lines, p["width"], ordered=p["method"] == "ocr"))
    blocks = to_markdown(blocks_from(ordered, cfg), _vocabulary(ordered))
    return {
        "markdown": "\n\n".join(b.text for b in blocks) + "\n",
        "blocks": [{"kind": b.kind, "text": b.text, "pages": b.pages} for b in blocks],
        "removed": removed,
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
    for sha, pages in docs:
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
