"""DVC stage clean_markdown: extracted pages -> paths.markdown/{docs/*.md, documents.jsonl,
chunks.jsonl} and metrics/clean.json (fidelity against the synthetic ground truth).
Run: python -m stages.clean_markdown
"""

from semilens.stage_runner import run_stage
from semilens.text.clean import clean_markdown


def main() -> dict:
    return run_stage("clean_markdown", clean_markdown)


if __name__ == "__main__":
    main()
