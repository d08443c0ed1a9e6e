"""`semilens repro`: DVC stages run side by side in a real git + DVC repository.

The stages are small Python commands that leave evidence: when two stages must overlap,
each waits for the other's start marker (a run one at a time would time out and say so);
a stage records whether its inputs were complete when it started; the stages that share
a resource log when they enter and leave it.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from semilens.io import read_json
from semilens.repro import ReproError, load_plan, repro, run_plan

STEP = r"""
import json, os, sys, time
from pathlib import Path
name, *rest = sys.argv[1:]
trace = Path("trace"); trace.mkdir(exist_ok=True)
(trace / f"{name}.start").write_text("")
info = {"omp": os.environ.get("OMP_NUM_THREADS")}
for arg in rest:
    kind, _, value = arg.partition("=")
    if kind == "wait":  # the other stage must start while this one runs
        deadline = time.monotonic() + 60
        while not (trace / f"{value}.start").exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        info["met"] = (trace / f"{value}.start").exists()
    elif kind == "read":  # an input must be complete when this stage starts
        info.setdefault("read", {})[value] = Path(value).read_text()
    elif kind == "store":  # a resource shared with other stages
        with open("store.log", "a") as fh:
            fh.write(f"enter {name}\n")
        time.sleep(1.0)
        with open("store.log", "a") as fh:
            fh.write(f"exit {name}\n")
    elif kind == "fail":
        sys.exit(3)
Path(f"{name}.txt").write_text(json.dumps(info))
"""


def stage(name: str, *args: str, deps: tuple[str, ...] = (), exclusive: str | None = None) -> dict:
    spec: dict = {
        "cmd": f"python step.py {name} {' '.join(args)}".strip(),
        "deps": ["step.py", *deps],
        "outs": [f"{name}.txt"],
    }
    if exclusive:
        spec["meta"] = {"exclusive": exclusive}
    return spec


def make_repo(root: Path, stages: dict[str, dict]) -> Path:
    root.mkdir()
    env = {
        **os.environ,
        "GIT_AUTHOR_NAME": "t",
        "GIT_AUTHOR_EMAIL": "t@t",
        "GIT_COMMITTER_NAME": "t",
        "GIT_COMMITTER_EMAIL": "t@t",
    }
    subprocess.run(["git", "init", "-q"], cwd=root, check=True, env=env)
    subprocess.run([sys.executable, "-m", "dvc", "init", "-q"], cwd=root, check=True, env=env)
    (root / "step.py").write_text(STEP)
    (root / "dvc.yaml").write_text(yaml.safe_dump({"stages": stages}, sort_keys=False))
    (root / ".gitignore").write_text("trace/\nstore.log\nlogs/\n")
    subprocess.run(["git", "add", "-A"], cwd=root, check=True, env=env)
    subprocess.run(["git", "commit", "-qm", "pipeline"], cwd=root, check=True, env=env)
    return root


@pytest.fixture(autouse=True)
def _env(monkeypatch: pytest.MonkeyPatch) -> None:
    # the stages' `python` is this interpreter, as `make run` arranges through PATH
    monkeypatch.setenv("PATH", f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.setenv("DVC_NO_ANALYTICS", "1")
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)


def run(root: Path, jobs: int, first: tuple[str, ...] = (), targets: tuple[str, ...] = ()) -> list:
    return run_plan(
        load_plan(root, targets, first),
        root,
        jobs,
        root / "logs",
        dvc=[sys.executable, "-m", "dvc"],
        echo=lambda _: None,
    )


def out(root: Path, name: str) -> dict:
    return json.loads((root / f"{name}.txt").read_text())


def test_independent_stages_overlap_and_the_rest_wait_for_their_inputs(tmp_path: Path) -> None:
    root = make_repo(
        tmp_path / "repo",
        {
            "a": stage("a", "wait=b"),
            "b": stage("b", "wait=a"),
            "c": stage("c", "read=a.txt", "read=b.txt", deps=("a.txt", "b.txt")),
            "r1": stage("r1", "store", deps=("c.txt",), exclusive="store"),
            "r2": stage("r2", "store", deps=("c.txt",), exclusive="store"),
        },
    )
    results = run(root, jobs=2)
    assert sorted(r.name for r in results) == ["a", "b", "c", "r1", "r2"]
    assert all(r.returncode == 0 for r in results)
    # a and b ran at the same time: each saw the other start before it finished
    assert out(root, "a")["met"] and out(root, "b")["met"]
    # c started after both inputs were written in full
    assert json.loads(out(root, "c")["read"]["a.txt"])["met"]
    assert json.loads(out(root, "c")["read"]["b.txt"])["met"]
    # r1 and r2 were both ready together, yet held the shared store one at a time
    log = (root / "store.log").read_text().split("\n")[:-1]
    assert [line.split()[0] for line in log] == ["enter", "exit", "enter", "exit"]
    assert log[0].split()[1] == log[1].split()[1]
    # two jobs on this machine's cores: each stage got its share of threads
    cores = len(os.sched_getaffinity(0))
    assert out(root, "a")["omp"] == str(max(1, cores // 2))
    timings = read_json(root / "logs" / "repro.json")
    assert timings["jobs"] == 2 and not timings["not_run"]
    assert {s["name"] for s in timings["stages"]} == {"a", "b", "c", "r1", "r2"}
    assert (root / "logs" / "repro" / "c.log").is_file()
    # DVC recorded every stage: the pipeline is up to date, and a second run changes nothing
    status = subprocess.run([sys.executable, "-m", "dvc", "status"], cwd=root, capture_output=True, text=True)
    assert "up to date" in status.stdout, status.stdout
    before = (root / "dvc.lock").read_text()
    assert all(r.returncode == 0 for r in run(root, jobs=2))
    assert (root / "dvc.lock").read_text() == before
    assert (root / "store.log").read_text().count("enter") == 2  # nothing ran again


def test_a_failure_stops_what_depends_on_it_and_keeps_finished_work(tmp_path: Path) -> None:
    root = make_repo(
        tmp_path / "repo",
        {
            "ok": stage("ok", "wait=bad"),
            "bad": stage("bad", "wait=ok", "fail"),
            "after": stage("after", deps=("bad.txt",)),
        },
    )
    results = {r.name: r.returncode for r in run(root, jobs=2)}
    assert results["ok"] == 0 and results["bad"] != 0
    assert "after" not in results and not (root / "after.txt").exists()
    timings = read_json(root / "logs" / "repro.json")
    assert timings["not_run"] == ["after"]
    assert "ok" in (root / "dvc.lock").read_text()  # the stage that finished was recorded
    assert "bad" in (root / "logs" / "repro" / "bad.log").read_text()


def test_first_targets_start_first_and_targets_limit_the_run(tmp_path: Path) -> None:
    root = make_repo(
        tmp_path / "repo",
        {
            "x": stage("x"),
            "y": stage("y"),
            "z": stage("z", deps=("y.txt",)),
        },
    )
    assert [r.name for r in run(root, jobs=1, first=("z",))] == ["y", "z", "x"]
    (root / "x.txt").unlink()
    # only x and what it needs; z is left alone
    assert [r.name for r in run(root, jobs=1, targets=("x",))] == ["x"]
    with pytest.raises(ReproError, match="nosuch"):
        load_plan(root, ("nosuch",))
    with pytest.raises(ReproError, match="jobs"):
        run_plan(load_plan(root), root, 0, root / "logs")
    assert repro(root, root / "logs", jobs=2, echo=lambda _: None)  # the CLI's entry: all up to date
