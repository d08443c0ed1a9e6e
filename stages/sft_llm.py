"""DVC stage sft_llm (see semilens.llm.sft for what it reads and writes).
Run: python -m stages.sft_llm
"""

from semilens.launch import relaunch
from semilens.llm.sft import sft_llm
from semilens.stage_runner import run_stage


def main() -> dict:
    if relaunch("stages.sft_llm"):  # params.yaml's launch: several processes
        return {}
    return run_stage("sft_llm", sft_llm)


if __name__ == "__main__":
    main()
