"""DVC stage split_dataset: annotations -> train/val/test parquet in TRL's VLM chat form.

Reads paths.annotations/annotations.jsonl and the PNGs it names; writes
paths.vqa/{train,val,test}.parquet and paths.metrics/split.json.
Run: python -m stages.split_dataset
"""

from semilens.images.split import split_dataset
from semilens.stage_runner import run_stage


def main() -> dict:
    return run_stage("split_dataset", split_dataset)


if __name__ == "__main__":
    main()
