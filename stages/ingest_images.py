"""DVC stage ingest_images: raw + synthetic images -> normalised PNGs, records.jsonl and
quarantine.jsonl under paths.interim_images. Run: python -m stages.ingest_images"""

from semilens.images.ingest import ingest_images
from semilens.stage_runner import run_stage


def main() -> dict:
    return run_stage("ingest_images", ingest_images)


if __name__ == "__main__":
    main()
