"""DVC stage tag_ontology: chunks -> ontology units (keywords + MiniLM similarity);
writes paths.tags/{tags.jsonl, coverage.md} and metrics/ontology.json.
Run: python -m stages.tag_ontology
"""

from semilens.stage_runner import run_stage
from semilens.text.tag import tag_ontology


def main() -> dict:
    return run_stage("tag_ontology", tag_ontology)


if __name__ == "__main__":
    main()
