"""DVC stage evaluate_vlm@<family>: the base and the fine-tuned model on the test split.

Writes paths.metrics/vlm/<family>.json and paths.models/<family>/eval/predictions.jsonl.
Run: python -m stages.evaluate_vlm qwen2_5_vl
"""

from semilens.stage_runner import run_matrix_stage
from semilens.vlm.evaluate import evaluate_vlm

if __name__ == "__main__":
    run_matrix_stage("evaluate_vlm", evaluate_vlm)
