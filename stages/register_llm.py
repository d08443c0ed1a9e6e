"""DVC stage register_llm: record the text model (SFT and GPTQ) in MLflow with its lineage
(see semilens.llm.register for what it reads and writes).
Run: python -m stages.register_llm
"""

from semilens.llm.register import register_llm
from semilens.stage_runner import run_stage


def main() -> dict:
    return run_stage("register_llm", register_llm)


if __name__ == "__main__":
    main()
