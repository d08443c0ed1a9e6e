"""DVC stage evaluate_llm (see semilens.llm.evaluate for what it reads and writes).
Run: python -m stages.evaluate_llm
"""

from semilens.llm.evaluate import evaluate_llm
from semilens.stage_runner import run_stage


def main() -> dict:
    return run_stage("evaluate_llm", evaluate_llm)


if __name__ == "__main__":
    main()
