"""DVC stage sft_llm (see semilens.llm.sft for what it reads and writes).
Run: python -m stages.sft_llm
"""

from semilens.llm.sft import sft_llm
from semilens.stage_runner import run_stage


def main() -> dict:
    return run_stage("sft_llm", sft_llm)


if __name__ == "__main__":
    main()
