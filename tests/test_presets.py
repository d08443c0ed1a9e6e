"""Real-checkpoint presets: each one validates against the project's params.yaml, sets its
own family's base and a GPU recipe, and its `dvc exp run -S` arguments, applied by DVC's
own override code, give the same config as the preset laid over params.yaml."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from semilens.cli import app
from semilens.config import ConfigError, load_config
from semilens.presets import Preset, apply, available, command, load_preset, set_args
from semilens.vlm.families import FAMILIES

ROOT = Path(__file__).resolve().parents[1]
PARAMS = yaml.safe_load((ROOT / "params.yaml").read_text())
PRESETS = available(ROOT / "presets")


def test_every_targeted_real_checkpoint_has_a_preset():
    assert set(PRESETS) == {
        "qwen2_5_vl-3b-instruct",
        "qwen2_5_vl-7b-instruct",
        "llama-3.2-11b-vision-instruct",
        "paligemma2-3b-pt-224",
        "paligemma2-10b-pt-448",
    }
    assert {p.family for p in PRESETS.values()} == set(FAMILIES)


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_a_preset_validates_and_sets_a_real_base_and_a_gpu_recipe(name):
    preset = PRESETS[name]
    cfg = apply(PARAMS, preset)
    assert cfg.prepare_vlm.bases[preset.family].startswith("/models/")
    # the other families stay as params.yaml has them
    others = {f: b for f, b in cfg.prepare_vlm.bases.items() if f != preset.family}
    assert others == {f: b for f, b in PARAMS["prepare_vlm"]["bases"].items() if f != preset.family}
    lora, trainer = cfg.finetune_vlm.lora, cfg.finetune_vlm.trainer
    # a real base keeps its output layer and embeddings; the tiny preset's full-trained
    # modules would be billions of parameters here
    assert lora.modules_to_save == [] and not lora.train_vision
    assert trainer.precision in ("auto", "bf16") and trainer.learning_rate <= 2e-4
    if trainer.quantization == "4bit":
        assert trainer.batch_size * trainer.gradient_accumulation_steps >= 16
    if preset.family == "paligemma":
        assert trainer.backend == "transformers"  # unsloth not checked for PaliGemma-2


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_dvc_applies_the_set_args_to_the_same_config(name, tmp_path):
    from dvc.utils.hydra import apply_overrides

    params = tmp_path / "params.yaml"
    shutil.copy(ROOT / "params.yaml", params)
    apply_overrides(params, set_args(PRESETS[name]))
    assert load_config(params) == apply(PARAMS, PRESETS[name])
    assert command(PRESETS[name]).endswith(f"register_models@{PRESETS[name].family}")


def test_a_bad_preset_is_refused_with_the_key_named(tmp_path):
    bad = Preset(
        "bad",
        "mllama",
        "x",
        {"prepare_vlm": {"bases": {"mllama": "/m"}}, "finetune_vlm": {"trainer": {"quantisation": "4bit"}}},
    )
    with pytest.raises(ConfigError, match="quantisation"):
        apply(PARAMS, bad)
    (tmp_path / "other.yaml").write_text(
        yaml.safe_dump({"family": "mllama", "summary": "x", "params": {"prepare_vlm": {"bases": {"paligemma": "/m"}}}})
    )
    with pytest.raises(ConfigError, match="prepare_vlm.bases.mllama"):
        load_preset(tmp_path / "other.yaml")


def test_cli_lists_and_shows_presets(monkeypatch):
    monkeypatch.chdir(ROOT)
    runner = CliRunner()
    listed = runner.invoke(app, ["preset"])
    assert listed.exit_code == 0 and sorted(line.split("\t")[0] for line in listed.output.splitlines()) == sorted(
        PRESETS
    )
    shown = runner.invoke(app, ["preset", "qwen2_5_vl-7b-instruct"])
    assert shown.exit_code == 0
    assert "quantization: 4bit" in shown.output and "dvc exp run -n qwen2_5_vl-7b-instruct" in shown.output
    unknown = runner.invoke(app, ["preset", "nope"])
    assert unknown.exit_code == 2
