"""DVC stage extract_pdfs: raw + synthetic PDFs -> paths.pages/{pages,quarantine}.jsonl
(pypdf text per page with provenance; tesseract OCR for pages without a text layer).
Hostile files are quarantined by the limits in params.yaml `extract_pdfs` (pages, blank
pages in a row, OCR raster pixels, OCR seconds per page and per file); finished pages are
cached (paths.cache/extract_pdfs/pages), so a killed run resumes at the next page.
Run: python -m stages.extract_pdfs
"""

from semilens.stage_runner import run_stage
from semilens.text.extract import extract_pdfs


def main() -> dict:
    return run_stage("extract_pdfs", extract_pdfs)


if __name__ == "__main__":
    main()
