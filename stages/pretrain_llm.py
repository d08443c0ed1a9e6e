"""DVC stage pretrain_llm (see semilens.llm.pretrain for what it reads and writes).
Run: python -m stages.pretrain_llm
"""

from semilens.launch import relaunch
from semilens.llm.pretrain import pretrain_llm
from semilens.stage_runner import run_stage


def main() -> dict:
    if relaunch("stages.pretrain_llm"):  # params.yaml's launch: several processes
        return {}
    return run_stage("pretrain_llm", pretrain_llm)


if __name__ == "__main__":
    main()
