"""DVC stage prepare_vlm@<family>: the family's base checkpoint (tiny preset or a real one).

Writes paths.models/<family>/base (HF checkpoint folder, or source.json pointing at a real
one) and paths.metrics/vlm/prepare_<family>.json. Run: python -m stages.prepare_vlm qwen2_5_vl
"""

import sys

from semilens.runlog import run_stage
from semilens.vlm.prepare import prepare_vlm


def main(family: str) -> dict:
    return run_stage(f"prepare_vlm@{family}", lambda cfg: prepare_vlm(cfg, family))


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit("usage: python -m stages.prepare_vlm FAMILY")
    main(sys.argv[1])
