"""Lineage hashes agree with DVC's own, drift is named, and MLflow registration is idempotent."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from semilens.lineage import LineageError, dvc_md5, git_state, verified_hashes
from semilens.registry import Registration, describe_uri, flatten, register


def _run(cmd: list[str], cwd: Path) -> None:
    env = {
        **os.environ,
        "DVC_NO_ANALYTICS": "1",
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
    }
    res = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True)
    assert res.returncode == 0, res.stdout + res.stderr


@pytest.fixture
def dvc_repo(tmp_path: Path) -> Path:
    """A git + DVC repo whose dvc.lock holds one stage with a directory and a file output."""
    repo = tmp_path / "repo"
    data = repo / "data" / "out"
    # names chosen so that sorting joined paths and sorting path parts disagree ('-' < '/')
    for rel, text in {"a-b.txt": "1", "a/x.txt": "2", "a/b/c.bin": "3" * 100, "z.txt": "4"}.items():
        (data / rel).parent.mkdir(parents=True, exist_ok=True)
        (data / rel).write_text(text)
    (repo / "data" / "single.txt").write_text("hello\n")
    _run(["git", "init", "-q"], repo)
    _run([sys.executable, "-m", "dvc", "init", "-q"], repo)
    (repo / "dvc.yaml").write_text(
        yaml.safe_dump({"stages": {"make": {"cmd": "true", "outs": ["data/out", "data/single.txt"]}}})
    )
    _run([sys.executable, "-m", "dvc", "commit", "-f", "make"], repo)
    return repo


def test_md5_equals_what_dvc_records(dvc_repo: Path) -> None:
    lock = yaml.safe_load((dvc_repo / "dvc.lock").read_text())
    outs = {o["path"]: o["md5"] for o in lock["stages"]["make"]["outs"]}
    assert dvc_md5(dvc_repo / "data/out") == outs["data/out"]
    assert dvc_md5(dvc_repo / "data/single.txt") == outs["data/single.txt"]


def test_verified_hashes_name_drift_and_unknown_artifacts(dvc_repo: Path) -> None:
    ok = verified_hashes({"d": dvc_repo / "data/out", "f": dvc_repo / "data/single.txt"}, root=dvc_repo)
    assert ok["d"]["stage"] == "make" and ok["d"]["md5"].endswith(".dir")
    target = dvc_repo / "data/out/a/b/c.bin"
    target.write_bytes(b"4" + target.read_bytes()[1:])  # one byte changed
    (dvc_repo / "data/extra").mkdir()
    with pytest.raises(LineageError) as err:
        verified_hashes({"d": dvc_repo / "data/out", "x": dvc_repo / "data/extra"}, root=dvc_repo)
    message = str(err.value)
    assert "data/out (d) has md5" in message and "dvc.lock says" in message
    assert "data/extra (x) is not an output in dvc.lock" in message


def test_lock_is_read_only_when_dvc_is_not_writing_it(dvc_repo: Path) -> None:
    # A stage beside this one finishing: its DVC process holds the repository lock while it
    # rewrites dvc.lock in place. A read meanwhile would see a torn file, so it waits.
    import threading
    import time

    from dvc.lock import make_lock

    tmp = dvc_repo / ".dvc" / "tmp"
    tmp.mkdir(exist_ok=True)
    lock_file = dvc_repo / "dvc.lock"
    whole = lock_file.read_text()
    result: dict[str, object] = {}

    def read() -> None:
        result["hashes"] = verified_hashes({"f": dvc_repo / "data/single.txt"}, root=dvc_repo)

    with make_lock(str(tmp / "lock"), tmp_dir=str(tmp)):
        lock_file.write_text(whole[: len(whole) // 3])  # torn, as mid-write
        reader = threading.Thread(target=read)
        reader.start()
        time.sleep(1.0)
        assert reader.is_alive() and not result  # still waiting for the lock
        lock_file.write_text(whole)
    reader.join(timeout=30)
    assert result["hashes"]["f"]["stage"] == "make"


def test_git_state_outside_a_repo_is_unknown(tmp_path: Path) -> None:
    assert git_state(tmp_path)["commit"] == "unknown"


def test_credentials_never_reach_logs() -> None:
    assert describe_uri("https://user:s3cret@mlflow.example.com/path") == "https://***@mlflow.example.com/path"
    assert describe_uri("sqlite:////tmp/x/mlflow.db") == "sqlite:////tmp/x/mlflow.db"


def test_flatten_nested_params() -> None:
    assert flatten("t", {"a": {"b": 1}, "c": [1, 2]}) == {"t.a.b": 1, "t.c": [1, 2]}


def test_registration_is_idempotent_and_tags_read_back(tmp_path: Path) -> None:
    from mlflow import MlflowClient

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text("{}")
    reg = Registration(
        name="semilens-test",
        params={"lora.r": 4},
        metrics={"vqa_accuracy": 0.5},
        tags={"dvc.dataset.md5": "abc.dir", "git.commit": "c1"},
        artifacts={"adapter": adapter},
        model_artifact="adapter",
    )
    first = register(reg, uri, "exp", tmp_path / "artifacts")
    # a new commit with identical lineage is the same model: no second version
    reg.tags = {"dvc.dataset.md5": "abc.dir", "git.commit": "c2"}
    again = register(reg, uri, "exp", tmp_path / "artifacts")
    assert again == {**first, "reused": True}
    reg.tags = {"dvc.dataset.md5": "def.dir", "git.commit": "c2"}
    changed = register(reg, uri, "exp", tmp_path / "artifacts")
    assert changed["version"] == first["version"] + 1 and not changed["reused"]
    client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    mv = client.get_model_version("semilens-test", str(changed["version"]))
    assert mv.tags["dvc.dataset.md5"] == "def.dir"
    assert mv.source.endswith("/adapter")
    run = client.get_run(mv.run_id)
    assert run.data.params["lora.r"] == "4" and run.data.metrics["vqa_accuracy"] == 0.5
    assert (tmp_path / "artifacts").is_dir()  # artifacts beside the store, not in the cwd
