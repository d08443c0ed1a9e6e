"""DVC stage prepare_llm (see semilens.llm.prepare for what it reads and writes).
Run: python -m stages.prepare_llm
"""

from semilens.llm.prepare import prepare_llm
from semilens.stage_runner import run_stage


def main() -> dict:
    return run_stage("prepare_llm", prepare_llm)


if __name__ == "__main__":
    main()
