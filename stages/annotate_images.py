"""DVC stage annotate_images: records + measurements -> grounded captions and VQA pairs.

Reads paths.interim_images/records.jsonl and paths.measurements/measurements.jsonl; writes
paths.annotations/{annotations,skipped}.jsonl. Run: python -m stages.annotate_images
"""

from semilens.images.annotate import annotate_images
from semilens.stage_runner import run_stage


def main() -> dict:
    return run_stage("annotate_images", annotate_images)


if __name__ == "__main__":
    main()
