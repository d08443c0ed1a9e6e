"""DVC stage compare_vlm: every VLM family side by side, base against fine-tuned.

Writes paths.metrics/vlm/compare.json and compare{,_types}.csv (DVC plots).
Run: python -m stages.compare_vlm
"""

from semilens.stage_runner import run_stage
from semilens.vlm.compare import compare_vlm

if __name__ == "__main__":
    run_stage("compare_vlm", compare_vlm)
