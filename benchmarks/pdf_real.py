"""Benchmark of PDF readers on real PDFs: this project's extraction against plain readers.

Reads every PDF under ``../shared/realdata/pdfs`` (relative to the project root; used by
path, never copied into the repository) and a few of the project's synthetic PDFs, rendered
here with their ground truth by ``semilens.text.corpus`` (a temporary folder, the project's
knowledge base). Each file goes through:

- ``semilens``: ``extract_pdf`` + ``clean_document`` with the params.yaml config, as the
  extract_pdfs and clean_markdown stages run them (OCR included where a page has no text);
- ``pypdf``: ``PdfReader(...).pages[i].extract_text()``;
- ``pypdfium2``: ``PdfDocument(...)[i].get_textpage().get_text_range()``;
- ``pymupdf4llm``: ``to_markdown`` per page, a comparison only (the ``bench`` extra, not a
  project dependency); reported as skipped, with the reason, when it is not installed.

Per file and reader:

- ``similarity``: 1 - normalised Levenshtein distance between the plain texts
  (``semilens.text.clean.similarity``) against a reference where one exists: the transcript
  ``linn.txt`` of the scanned ``linn.pdf`` and ``skew.pdf``, the ground-truth Markdown of a
  synthetic PDF; None elsewhere.
- ``glued_rate``: glued words per word (``semilens.text.words``: words of 16+ letters that
  are not words but split into two or more common words), and ``glued`` their count.
- ``running_leaks``: output lines that are one of the PDF's running headers or footers:
  a line that the PDF itself draws at the same height (1% of the page) on at least half of
  its pages (3 pages at least), found once per file with pypdfium2's text runs, whatever
  the reader; compared with digits masked and Markdown marks dropped. Plus
  ``page_number_lines``: lines that are only a page number ("12", "Page 3", "- 4 -",
  "Seite 2"). The semilens reader is scored on its cleaned Markdown, the others on their
  raw page text, which is what a pipeline using them would get.
- ``repeated_lines``: the earlier, position-blind count: output lines that repeat on half
  of the pages once digits are masked. It also counts content a document repeats on
  purpose (the layout rules' "| Rule | Description | Value |" header over the rule table
  of each section), so it is reported but is not the leak figure.
- ``pages_per_s``: pages over wall time of the reader alone (the first call of a reader
  pays its imports; a warm-up page is read first so that the numbers compare).

Per file, once (``tags``): the semilens Markdown cut into chunks as clean_markdown cuts it and
tagged as tag_ontology tags a document (``semilens.text.tag.tag_document``, the local MiniLM):
chunks, share tagged, whether the document is on-topic, its top group / module / unit and why
the rest of the chunks got no tag. ``--no-tags`` skips it.

Writes ``<paths.metrics>/bench_pdf_real.json`` (or ``--out``) and prints a table.
Run from the project root: ``.venv/bin/python benchmarks/pdf_real.py [--only S380] [--synthetic 3]``
"""

from __future__ import annotations

import argparse
import os
import re
import statistics
import tempfile
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

from semilens.config import Config, load_config
from semilens.io import write_json

ROOT = Path(__file__).resolve().parents[1]
# SEMILENS_REALDATA: the same override tests/conftest.py honours
REAL = Path(os.environ.get("SEMILENS_REALDATA") or ROOT.parent / "shared" / "realdata") / "pdfs"
READERS = ("semilens", "pypdf", "pypdfium2", "pymupdf4llm")
# A page-number line: a bare number, "Page 3", "- 4 -", "3 / 26", "Seite 2".
PAGE_NUMBER = re.compile(
    r"^(?:(?:page|seite|p\.)\s*)?[-–(\[]?\s*\d{1,4}\s*[-–)\]]?(?:\s*(?:/|of|von)\s*\d{1,4})?$", re.I
)


# ----------------------------------------------------------------------------- readers
# Each reader: PDF bytes -> one text per page.


def read_semilens(data: bytes, cfg: Config) -> list[str]:
    """The stages' path: extract_pdf, then clean_document; the cleaned Markdown split back
    into pages by the blocks' page provenance (a block on two pages counts on its first)."""
    from semilens.text.clean import clean_document
    from semilens.text.extract import extract_pdf

    pages = extract_pdf(data, cfg.extract_pdfs)
    doc = clean_document(pages, cfg.clean_markdown)
    out = {p["page"]: [] for p in pages}
    for b in doc["blocks"]:
        out.setdefault(min(b["pages"]) if b["pages"] else 1, []).append(b["text"])
    return ["\n\n".join(out[k]) for k in sorted(out)]


def read_pypdf(data: bytes, cfg: Config) -> list[str]:
    import io

    from pypdf import PdfReader

    return [p.extract_text() or "" for p in PdfReader(io.BytesIO(data)).pages]


def read_pypdfium2(data: bytes, cfg: Config) -> list[str]:
    import pypdfium2

    pdf = pypdfium2.PdfDocument(data)
    try:
        return [pdf[i].get_textpage().get_text_range() for i in range(len(pdf))]
    finally:
        pdf.close()


def read_pymupdf4llm(data: bytes, cfg: Config) -> list[str]:
    import pymupdf
    import pymupdf4llm

    doc = pymupdf.open(stream=data, filetype="pdf")
    try:
        return [c["text"] for c in pymupdf4llm.to_markdown(doc, page_chunks=True, show_progress=False)]
    finally:
        doc.close()


def available(reader: str) -> str | None:
    """None when the reader can run, else why not (printed and written as ``skipped``)."""
    if reader != "pymupdf4llm":
        return None
    try:
        import pymupdf4llm  # noqa: F401
    except ImportError as exc:
        return f"not installed ({exc}); pip install -e '.[bench]'"
    return None


# ----------------------------------------------------------------------------- measures


def _mask(text: str) -> str:
    """Lower case, Markdown marks and spaces dropped, digits masked: "**Page 3 of 26**"
    and "Page 12 of 26" meet."""
    return re.sub(r"\d+", "#", re.sub(r"[\s#*_|`>]+", "", text.lower()))


def pdf_running_lines(data: bytes) -> set[str]:
    """The masked texts of the lines the PDF draws at one height on half of its pages.

    Read with pypdfium2's text runs, joined per baseline (2 pt), so the ground truth does
    not depend on any reader under test; page-number lines are left to ``PAGE_NUMBER``.
    Each run of a line counts as well as the whole line, since readers split a footer
    ("www.ihp-microelectronics.com" / "Enter Date") where the PDF leaves a gap."""
    import pypdfium2

    pdf = pypdfium2.PdfDocument(data)
    where: dict[str, dict[int, list[float]]] = {}
    n = len(pdf)
    try:
        for i in range(n):
            page = pdf[i]
            height = page.get_height()
            tp = page.get_textpage()
            runs = []
            for k in range(tp.count_rects()):
                left, bottom, right, top = tp.get_rect(k)
                runs.append((bottom, left, tp.get_text_bounded(left, bottom, right, top)))
            rows: list[list[tuple[float, float, str]]] = []
            for run in sorted(runs, key=lambda r: -r[0]):
                if rows and abs(rows[-1][0][0] - run[0]) <= 2:
                    rows[-1].append(run)
                else:
                    rows.append([run])
            for row in rows:
                # the whole line and each run of it: readers split a footer at its gaps
                texts = {" ".join(r[2] for r in sorted(row, key=lambda r: r[1])), *(r[2] for r in row)}
                for text in texts:
                    if not PAGE_NUMBER.match(text.strip()):
                        where.setdefault(_mask(text), {}).setdefault(i, []).append(row[0][0] / height)
    finally:
        pdf.close()
    if n < 3:
        return set()  # one or two pages cannot show a repeat
    need = max(3, (n + 1) // 2)
    out = set()
    for text, on in where.items():
        if len(re.findall(r"[^\W\d_]", text)) < 3:
            continue
        for y in (v for ys in on.values() for v in ys):
            if sum(any(abs(v - y) <= 0.01 for v in ys) for ys in on.values()) >= need:
                out.add(text)
                break
    return out


def running_leaks(pages: list[str], running: set[str] | None = None) -> tuple[int, int, int]:
    """(lines that are the PDF's running lines, bare page-number lines, repeated lines)."""
    leaks = sum(_mask(ln) in running for p in pages for ln in p.splitlines()) if running else 0
    repeated, numbers = repeated_lines(pages)
    return leaks, numbers, repeated


def repeated_lines(pages: list[str]) -> tuple[int, int]:
    """(lines repeated on >= half the pages after masking digits, bare page-number lines).

    A running header survives as the same line on most pages ("SG13G2 Process Spec Rev 1.2
    Page 7 of 26" masks to one string); one-page files cannot show a repeat."""
    masked = [{re.sub(r"\d+", "#", ln.strip()) for ln in p.splitlines() if ln.strip()} for p in pages]
    counts = Counter(ln for page in masked for ln in page)
    need = max(3, (len(pages) + 1) // 2)
    # Lines without three letters (table rules, bare numbers) repeat in any document.
    repeated = (
        sum(n for ln, n in counts.items() if n >= need and len(re.findall(r"[^\W\d_]", ln)) >= 3)
        if len(pages) >= 3
        else 0
    )
    numbers = sum(
        bool(PAGE_NUMBER.match(ln.strip().strip("#* "))) for p in pages for ln in p.splitlines() if ln.strip()
    )
    return repeated, numbers


def measure(pages: list[str], seconds: float, reference: str | None, running: set[str] | None = None) -> dict[str, Any]:
    from semilens.text.clean import similarity
    from semilens.text.words import check

    text = "\n\n".join(pages)
    words = check(text)
    leaks, numbers, repeated = running_leaks(pages, running)
    return {
        "pages": len(pages),
        "chars": len(text),
        "similarity": similarity(text, reference) if reference is not None else None,
        "words": words.words,
        "glued": words.glued,
        "glued_rate": round(words.glued_rate, 5),
        "running_leaks": leaks,
        "page_number_lines": numbers,
        "repeated_lines": repeated,
        "seconds": round(seconds, 3),
        "pages_per_s": round(len(pages) / seconds, 2) if seconds > 0 else None,
    }


# ----------------------------------------------------------------------------- files


def real_files(only: list[str] | None) -> tuple[list[tuple[str, Path, str | None]], dict[str, str]]:
    """(name, path, reference text) of every real PDF, and the skipped folders with why."""
    if not REAL.is_dir():
        return [], {"realdata": f"{REAL} not found (../shared/realdata is not next to this checkout)"}
    out = []
    for path in sorted(REAL.rglob("*.pdf")):
        name = str(path.relative_to(REAL))
        if only and not any(o.lower() in name.lower() for o in only):
            continue
        # The transcript is of the brochure page that linn.pdf scans; skew.pdf is the same page tilted.
        ref = path.parent / "linn.txt" if path.stem in ("linn", "skew") else None
        out.append((name, path, ref.read_text(encoding="utf-8") if ref and ref.is_file() else None))
    return out, {}


def synthetic_files(n: int, folder: Path) -> list[tuple[str, Path, str | None]]:
    """``n`` synthetic PDFs rendered with their ground truth, as the synth_corpus stage does."""
    if n <= 0:
        return []
    from semilens.text.corpus import synth_corpus

    cfg = load_config(ROOT / "params.yaml")
    cfg = cfg.model_copy(
        update={
            "paths": cfg.paths.model_copy(update={"synthetic_pdfs": folder, "knowledge": ROOT / cfg.paths.knowledge}),
            "synth_corpus": cfg.synth_corpus.model_copy(update={"n_docs": n}),
        }
    )
    synth_corpus(cfg)
    return [
        (f"synthetic/{p.name}", p, p.with_suffix(".md").read_text(encoding="utf-8"))
        for p in sorted(folder.glob("*.pdf"))
    ]


# ----------------------------------------------------------------------------- main


def run(files: list[tuple[str, Path, str | None]], cfg: Config, readers: dict[str, Callable]) -> list[dict[str, Any]]:
    rows = []
    for name, path, ref in files:
        data = path.read_bytes()
        running = pdf_running_lines(data)
        for reader, fn in readers.items():
            t0 = time.perf_counter()
            try:
                pages = fn(data, cfg)
            except Exception as exc:  # a reader failing on a file is a result, not a crash
                rows.append({"file": name, "reader": reader, "error": f"{type(exc).__name__}: {str(exc)[:200]}"})
                continue
            rows.append({"file": name, "reader": reader, **measure(pages, time.perf_counter() - t0, ref, running)})
    return rows


def tag_rows(files: list[tuple[str, Path, str | None]], cfg: Config) -> list[dict[str, Any]]:
    """Each file's chunks tagged with its document as context: what tag_ontology reports."""
    import numpy as np

    from semilens.minilm import embed
    from semilens.text.clean import chunk, clean_document
    from semilens.text.extract import extract_pdf
    from semilens.text.knowledge import load_knowledge
    from semilens.text.tag import embed_text, tag_document, term_specificity, unit_patterns, unit_text

    tcfg = cfg.tag_ontology
    refs = list(load_knowledge(ROOT / cfg.paths.knowledge).units())
    patterns = [unit_patterns(r) for r in refs]
    specificity = term_specificity(refs, patterns)
    unit_vectors = embed([unit_text(r) for r in refs])
    rows = []
    for name, path, _ in files:
        doc = clean_document(extract_pdf(path.read_bytes(), cfg.extract_pdfs), cfg.clean_markdown)
        chunks = chunk(doc["blocks"], cfg.clean_markdown.chunk_chars)
        if not chunks:
            rows.append({"file": name, "chunks": 0})
            continue
        vectors = np.asarray(embed([embed_text(c, tcfg) for c in chunks]))
        _, topic = tag_document(chunks, vectors, refs, patterns, unit_vectors, tcfg, specificity)
        rows.append({"file": name, **topic})
    return rows


def summary(rows: list[dict[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for reader in READERS:
        rs = [r for r in rows if r["reader"] == reader and "error" not in r]
        if not rs:
            continue
        sims = [r["similarity"] for r in rs if r["similarity"] is not None]
        pages = sum(r["pages"] for r in rs)
        out[reader] = {
            "files": len(rs),
            "errors": sum(r["reader"] == reader and "error" in r for r in rows),
            "similarity_mean": round(statistics.fmean(sims), 4) if sims else None,
            "glued": sum(r["glued"] for r in rs),
            "glued_rate": round(sum(r["glued"] for r in rs) / max(1, sum(r["words"] for r in rs)), 5),
            "running_leaks": sum(r["running_leaks"] for r in rs),
            "page_number_lines": sum(r["page_number_lines"] for r in rs),
            "repeated_lines": sum(r["repeated_lines"] for r in rs),
            "pages_per_s": round(pages / sum(r["seconds"] for r in rs), 2),
        }
    return out


def main() -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", action="append", help="real PDFs whose path contains this (repeatable)")
    parser.add_argument("--synthetic", type=int, default=3, help="synthetic PDFs to render and score (0: none)")
    parser.add_argument("--out", type=Path, help="JSON path (default <paths.metrics>/bench_pdf_real.json)")
    parser.add_argument("--no-tags", action="store_true", help="skip tagging each file's chunks")
    args = parser.parse_args()
    cfg = load_config(ROOT / "params.yaml")

    # Readers
    skipped: dict[str, str] = {}
    readers: dict[str, Callable] = {}
    for name in READERS:
        why = available(name)
        if why:
            skipped[name] = why
            print(f"skipping reader {name}: {why}")
        else:
            readers[name] = globals()[f"read_{name}"]

    # Files
    files, skipped_files = real_files(args.only)
    for part, why in skipped_files.items():
        print(f"skipping {part}: {why}")
    with tempfile.TemporaryDirectory() as tmp:
        files += synthetic_files(args.synthetic, Path(tmp))
        warm = files[0][1].read_bytes() if files else None
        for fn in readers.values():  # pay the imports before timing
            if warm is not None:
                try:
                    fn(warm, cfg)
                except Exception:
                    pass
        rows = run(files, cfg, readers)
        # Tagging (inside the block: the synthetic PDFs live in the temporary folder)
        tags = [] if args.no_tags else tag_rows(files, cfg)

    result = {
        "date": time.strftime("%Y-%m-%d"),
        "readers": {r: ("skipped: " + skipped[r]) if r in skipped else "ran" for r in READERS},
        "skipped_files": skipped_files,
        "summary": summary(rows),
        "rows": rows,
        "tags": tags,
    }
    write_json(args.out or ROOT / cfg.paths.metrics / "bench_pdf_real.json", result)
    _print(result)
    return result


def _print(result: dict[str, Any]) -> None:
    head = f"{'file':58s} {'reader':11s} {'pages':>5s} {'sim':>6s} {'glued%':>7s} {'leaks':>5s} {'pgnum':>5s} {'repeat':>6s} {'pages/s':>8s}"
    print(head)
    print("-" * len(head))
    for r in result["rows"]:
        if "error" in r:
            print(f"{r['file'][:58]:58s} {r['reader']:11s} error: {r['error'][:60]}")
            continue
        sim = "     -" if r["similarity"] is None else f"{r['similarity']:6.3f}"
        print(
            f"{r['file'][:58]:58s} {r['reader']:11s} {r['pages']:5d} {sim} {100 * r['glued_rate']:7.2f} "
            f"{r['running_leaks']:5d} {r['page_number_lines']:5d} {r['repeated_lines']:6d} {r['pages_per_s'] or 0:8.1f}"
        )
    print()
    for reader, s in result["summary"].items():
        sim = "-" if s["similarity_mean"] is None else f"{s['similarity_mean']:.3f}"
        print(
            f"{reader:11s} files {s['files']:2d}  similarity {sim}  glued {s['glued']} ({100 * s['glued_rate']:.2f}%)  "
            f"leaks {s['running_leaks']}  page numbers {s['page_number_lines']}  repeated {s['repeated_lines']}  "
            f"{s['pages_per_s']} pages/s"
        )
    for reader, why in result["readers"].items():
        if why != "ran":
            print(f"{reader}: {why}")
    if result["tags"]:
        print()
        print(
            f"{'file':58s} {'chunks':>6s} {'tagged':>6s} {'topic':>5s}  top group / module / unit; untagged by reason"
        )
        for t in result["tags"]:
            if not t["chunks"]:
                print(f"{t['file'][:58]:58s} {0:6d}")
                continue
            top = f"{t['top_group']} / {t['top_module']} / {t['top_unit']}" if t["top_group"] else "-"
            print(
                f"{t['file'][:58]:58s} {t['chunks']:6d} {t['coverage']:6.0%} {'yes' if t['on_topic'] else 'no':>5s}  "
                f"{top}; {t['untagged_by_reason']}"
            )


if __name__ == "__main__":
    main()
