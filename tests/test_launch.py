"""params.yaml's launch: a training stage relaunched through `accelerate launch`.

The two-process runs themselves are in test_llm.py and test_vlm_finetune.py (the same loss
curve as one process at the same global batch); here, what the relaunch decides and says.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from accelerate.commands.config.config_args import load_config_from_file

from semilens.config import ConfigError, LaunchConfig, validate_config
from semilens.launch import LAUNCHED_ENV, launch_command, relaunch

ROOT = Path(__file__).resolve().parents[1]
RECIPES = ROOT / "presets" / "accelerate"


def test_one_process_runs_in_place_and_several_go_through_accelerate(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv(LAUNCHED_ENV, raising=False)
    (tmp_path / "params.yaml").write_text(yaml.safe_dump({"launch": {"processes": 1}}))
    assert relaunch("stages.sft_llm", []) is False
    # a launched process (accelerate and torchrun set LOCAL_RANK) never launches again
    (tmp_path / "params.yaml").write_text(yaml.safe_dump({"launch": {"processes": 4}}))
    monkeypatch.setenv(LAUNCHED_ENV, "1")
    assert relaunch("stages.sft_llm", []) is False


def test_the_command_is_plain_ddp_or_the_named_recipe():
    ddp = launch_command(LaunchConfig(processes=4), "stages.sft_llm", [], 29500)
    assert ddp[1:3] == ["-m", "accelerate.commands.launch"] and "--multi_gpu" in ddp
    assert ddp[ddp.index("--num_processes") + 1] == "4" and ddp[-2:] == ["-m", "stages.sft_llm"]
    # the stage's trainer section decides bf16, not the launcher
    assert ddp[ddp.index("--mixed_precision") + 1] == "no"
    fsdp = launch_command(
        LaunchConfig(processes=8, accelerate_config="presets/accelerate/fsdp.yaml"),
        "stages.finetune_vlm",
        ["mllama"],
        29501,
    )
    assert fsdp[fsdp.index("--config_file") + 1] == "presets/accelerate/fsdp.yaml" and "--multi_gpu" not in fsdp
    assert fsdp[fsdp.index("--num_processes") + 1] == "8" and fsdp[fsdp.index("--main_process_port") + 1] == "29501"
    assert fsdp[-3:] == ["-m", "stages.finetune_vlm", "mllama"]


def test_a_missing_recipe_or_a_process_count_under_one_is_refused_with_a_reason(tmp_path, monkeypatch, capsys):
    with pytest.raises(ConfigError, match="launch.processes"):
        validate_config({"launch": {"processes": 0}}, "params.yaml")
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv(LAUNCHED_ENV, raising=False)
    (tmp_path / "params.yaml").write_text(
        yaml.safe_dump({"launch": {"processes": 2, "accelerate_config": "presets/accelerate/fdsp.yaml"}})
    )
    with pytest.raises(SystemExit) as stop:
        relaunch("stages.sft_llm", [])
    assert stop.value.code == 2
    assert "launch.accelerate_config 'presets/accelerate/fdsp.yaml' is not a file" in capsys.readouterr().err


def test_a_failing_launched_stage_fails_the_stage(tmp_path):
    """DVC sees the launched processes' failure as the stage's, with their reason."""
    (tmp_path / "params.yaml").write_text(yaml.safe_dump({"launch": {"processes": 2}}))
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    env.pop(LAUNCHED_ENV, None)
    done = subprocess.run(
        [sys.executable, "-m", "stages.finetune_vlm", "no_such_family"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode != 0
    assert "unknown item 'no_such_family'" in done.stdout + done.stderr


@pytest.mark.parametrize(("recipe", "kind"), [("ddp", "MULTI_GPU"), ("fsdp", "FSDP"), ("zero3", "DEEPSPEED")])
def test_the_recipes_are_accelerate_configs_that_save_whole_weights(recipe, kind):
    """What whole_model relies on: FSDP and ZeRO-3 checkpoints hold whole weights."""
    config = load_config_from_file(str(RECIPES / f"{recipe}.yaml"))
    assert config.distributed_type.name == kind and config.mixed_precision == "no"
    if recipe == "fsdp":
        assert config.fsdp_config["fsdp_state_dict_type"] == "FULL_STATE_DICT"
        assert config.fsdp_config["fsdp_version"] == 2
    if recipe == "zero3":
        assert config.deepspeed_config["zero_stage"] == 3
        assert config.deepspeed_config["zero3_save_16bit_model"] is True
        # left to the trainer ("auto"): a fixed value here would disagree with the params
        assert "gradient_accumulation_steps" not in config.deepspeed_config
