"""DVC stage measure_images: image records -> morphology per image, scored on synthetic ones.

Reads paths.interim_images/records.jsonl and the PNGs it names; writes
paths.measurements/measurements.jsonl and paths.metrics/measure.json.
Run: python -m stages.measure_images
"""

from semilens.images.measure import measure_images
from semilens.stage_runner import run_stage


def main() -> dict:
    return run_stage("measure_images", measure_images)


if __name__ == "__main__":
    main()
