"""DVC stage extract_pdfs: raw + synthetic PDFs -> paths.pages/{pages,quarantine}.jsonl
(pypdf text per page with provenance; tesseract OCR for pages without a text layer).
Run: python -m stages.extract_pdfs
"""

from semilens.runlog import run_stage
from semilens.text.extract import extract_pdfs


def main() -> dict:
    return run_stage("extract_pdfs", extract_pdfs)


if __name__ == "__main__":
    main()
