"""DVC stage synth_instructions: knowledge base + tagged chunks -> instruction pairs
(concepts, etching maths, process control / diagnosis) as paths.instructions/
{train,val,test,benchmark}.parquet, with metrics/instructions.json.
Run: python -m stages.synth_instructions
"""

from semilens.stage_runner import run_stage
from semilens.text.instruct import synth_instructions


def main() -> dict:
    return run_stage("synth_instructions", synth_instructions)


if __name__ == "__main__":
    main()
