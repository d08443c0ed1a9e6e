"""DVC stage synth_corpus: the knowledge base -> sample PDFs with layout problems.

Writes paths.synthetic_pdfs/<doc>.pdf, the ground-truth <doc>.md it was rendered from and
<doc>.json (its running headers/footers); the folder is rewritten from scratch.
Run: python -m stages.synth_corpus
"""

from semilens.stage_runner import run_stage
from semilens.text.corpus import synth_corpus


def main() -> dict:
    return run_stage("synth_corpus", synth_corpus)


if __name__ == "__main__":
    main()
