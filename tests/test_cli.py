"""The semilens CLI: stage listing, --dry-run config printing, clear errors."""

import os
import subprocess
import sys
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]


def semilens(*args: str, cwd: Path = ROOT) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "semilens.cli", *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        env={**os.environ, "COLUMNS": "200"},
    )


def test_stages_lists_every_dvc_stage():
    res = semilens("stages")
    assert res.returncode == 0, res.stderr
    listed = set(res.stdout.split())
    dvc_stages = set(yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"])
    assert dvc_stages <= listed


def test_dry_run_prints_resolved_section_and_paths():
    res = semilens("run", "split_dataset", "--dry-run")
    assert res.returncode == 0, res.stderr
    body = yaml.safe_load(res.stdout)
    assert set(body) == {"paths", "split_dataset"}
    assert body["split_dataset"]["salt"] == "semilens"
    assert body["paths"]["vqa"] == "data/processed/vqa"


def test_config_section_and_unknown_section():
    res = semilens("config", "measure_images")
    assert res.returncode == 0
    assert "watershed_min_distance" in yaml.safe_load(res.stdout)
    res = semilens("config", "nonsense")
    assert res.returncode == 2 and "unknown section" in res.stderr


def test_unknown_stage_and_bad_params(tmp_path):
    res = semilens("run", "no_such_stage")
    assert res.returncode == 2 and "unknown stage" in res.stderr
    bad = tmp_path / "p.yaml"
    bad.write_text("synth_images:\n  n_per_class: -1\n")
    res = semilens("run", "synth_images", "--dry-run", "--params", str(bad))
    assert res.returncode == 2 and "synth_images.n_per_class" in res.stderr
