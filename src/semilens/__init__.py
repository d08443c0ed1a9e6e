"""semilens: PDFs and SEM/TEM images to domain-adapted LLMs and VLMs, as one DVC pipeline."""

__version__ = "0.1.0"
