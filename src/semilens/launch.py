"""A training stage on several processes: relaunched through ``accelerate launch``.

DVC runs a stage as one command (``python -m stages.sft_llm``). When params.yaml's
``launch`` asks for more than one process, or names an accelerate config (FSDP, DeepSpeed
ZeRO-3), that command starts the same module again under ``accelerate launch`` and waits:
every launched process trains (gradients all-reduced, or parameters sharded), and the
first one writes the outputs. So ``dvc repro`` and ``dvc exp run -S launch.processes=4``
train on four GPUs with nothing else changed, and dvc.lock records the launch with the
stage's params.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

from semilens.config import ConfigError, LaunchConfig, load_config

# Set in every process a launcher starts (accelerate launch, torchrun): the stage is
# already one of the launched processes and must not launch again.
LAUNCHED_ENV = "LOCAL_RANK"


def free_port() -> int:
    """A free TCP port for the processes' rendezvous (two launches may run side by side)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wanted(launch: LaunchConfig) -> bool:
    return launch.processes > 1 or launch.accelerate_config is not None


def launch_command(launch: LaunchConfig, module: str, args: list[str], port: int) -> list[str]:
    """``accelerate launch`` of ``python -m module args`` as ``launch`` sets it.

    Without a config file it is plain data parallel (``--multi_gpu``: nccl on GPUs, gloo on
    the CPU). Precision is left to the stage: its trainer section turns bf16 on where CUDA
    is, and a launcher-wide mixed precision would override that (on a CPU, bf16 autocast
    made a step several times slower).
    """
    cmd = [sys.executable, "-m", "accelerate.commands.launch"]
    if launch.accelerate_config is None:
        cmd += ["--multi_gpu", "--mixed_precision", "no", "--dynamo_backend", "no"]
    else:
        cmd += ["--config_file", launch.accelerate_config]
    cmd += ["--num_processes", str(launch.processes), "--num_machines", "1", "--main_process_port", str(port)]
    return [*cmd, "-m", module, *args]


def relaunch(module: str, args: list[str] | None = None) -> bool:
    """Run this stage as ``launch.processes`` processes when params.yaml asks for that.

    True when it did (the launched processes did the work and the first one reported);
    False when the stage is to run in this process: one process asked, already a launched
    process, or a params.yaml the stage's own loader will report on. A launch that fails
    ends this process with its exit code; a config file that is not there, with exit code
    2 and its path.
    """
    if LAUNCHED_ENV in os.environ:
        return False
    try:
        launch = load_config().launch
    except ConfigError:
        return False
    if not wanted(launch):
        return False
    if launch.accelerate_config is not None and not Path(launch.accelerate_config).is_file():
        print(
            f"{module}: launch.accelerate_config {launch.accelerate_config!r} is not a file "
            "(presets/accelerate/ holds ddp.yaml, fsdp.yaml and zero3.yaml)",
            file=sys.stderr,
        )
        raise SystemExit(2)
    cmd = launch_command(launch, module, sys.argv[1:] if args is None else args, free_port())
    done = subprocess.run(cmd, check=False)
    if done.returncode != 0:
        raise SystemExit(done.returncode)
    return True
