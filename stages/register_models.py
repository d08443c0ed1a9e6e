"""DVC stage register_models@<family>: record the fine-tuned VLM in MLflow with its lineage.

Writes paths.models/<family>/README.md (the family's model card); the MLflow run and
model version go to the sqlite store under paths.mlflow (or MLFLOW_TRACKING_URI).
Run: python -m stages.register_models qwen2_5_vl
"""

from semilens.stage_runner import run_matrix_stage
from semilens.vlm.register import register_vlm

if __name__ == "__main__":
    run_matrix_stage("register_models", register_vlm)
