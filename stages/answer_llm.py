"""DVC stage answer_llm@<model>: one text model's answers to the benchmark and its held-out
perplexity (see semilens.llm.evaluate). Writes paths.models/llm/answers/<model>.json.
Run: python -m stages.answer_llm sft
"""

from semilens.llm.evaluate import MODELS, answer_llm
from semilens.stage_runner import run_matrix_stage

if __name__ == "__main__":
    run_matrix_stage("answer_llm", answer_llm, items=MODELS)
