"""DVC stage finetune_vlm@<family>: LoRA SFT of the family's base on the VQA train split.

Writes paths.models/<family>/{adapter,merged} and paths.metrics/vlm/{train,loss}_<family>.*
Run: python -m stages.finetune_vlm qwen2_5_vl
"""

from semilens.launch import relaunch
from semilens.stage_runner import run_matrix_stage
from semilens.vlm.finetune import finetune_vlm

if __name__ == "__main__" and not relaunch("stages.finetune_vlm"):  # launch: several processes
    run_matrix_stage("finetune_vlm", finetune_vlm)
