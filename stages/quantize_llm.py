"""DVC stage quantize_llm (see semilens.llm.quantize for what it reads and writes).
Run: python -m stages.quantize_llm
"""

from semilens.llm.quantize import quantize_llm
from semilens.stage_runner import run_stage


def main() -> dict:
    return run_stage("quantize_llm", quantize_llm)


if __name__ == "__main__":
    main()
