"""DVC stage prepare_vlm@<family>: the family's base checkpoint (tiny preset or a real one).

Writes paths.models/<family>/base (HF checkpoint folder, or source.json pointing at a real
one) and paths.metrics/vlm/prepare_<family>.json. Run: python -m stages.prepare_vlm qwen2_5_vl
"""

from semilens.stage_runner import run_matrix_stage
from semilens.vlm.prepare import prepare_vlm

if __name__ == "__main__":
    run_matrix_stage("prepare_vlm", prepare_vlm)
