"""semilens.audit on hand-made projects: dvc.lock graph walks, the commit of each stage's
lock entry, and verify's findings. The real pipeline is traced and verified in
test_pipeline_dvc.py."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
import yaml

from semilens.audit import AuditError, read_lock, resolve, stage_commits, verify
from semilens.config import Config
from semilens.io import sha256_file, write_jsonl
from semilens.lineage import dvc_md5


def _lock(stages: dict) -> str:
    return yaml.safe_dump({"schema": "2.0", "stages": stages}, sort_keys=False)


def _stage(
    deps: dict[str, str], outs: dict[str, str], cmd: str = "python -m stages.x", params: dict | None = None
) -> dict:
    entry = {"cmd": cmd, "deps": [{"path": p, "hash": "md5", "md5": m} for p, m in deps.items()]}
    if params is not None:
        entry["params"] = {"params.yaml": params}
    entry["outs"] = [{"path": p, "hash": "md5", "md5": m} for p, m in outs.items()]
    return entry


def git(root: Path, *args: str) -> str:
    env = {
        "GIT_AUTHOR_NAME": "t",
        "GIT_AUTHOR_EMAIL": "t@t",
        "GIT_COMMITTER_NAME": "t",
        "GIT_COMMITTER_EMAIL": "t@t",
        "PATH": "/usr/bin:/bin",
    }
    return subprocess.run(["git", *args], cwd=root, env=env, capture_output=True, text=True, check=True).stdout.strip()


def test_graph_walks_follow_outputs_into_folders(tmp_path):
    (tmp_path / "dvc.lock").write_text(
        _lock(
            {
                "a": _stage({"data/raw": "r.dir"}, {"data/a": "a.dir"}),
                "b": _stage({"data/a/part.json": "p"}, {"data/b.json": "b"}),  # a file inside a's folder
                "c": _stage({"data/b.json": "b", "src/c.py": "c"}, {"models/c": "m.dir"}),
                "other": _stage({"data/raw2": "x.dir"}, {"data/o": "o.dir"}),
            }
        )
    )
    lock = read_lock(tmp_path)
    assert lock.producer("data/a/part.json")[0].name == "a"
    assert lock.producer("data/raw") is None
    assert lock.consumers("data/a") == ["b"]
    assert lock.downstream(["data/raw"]) == ["a", "b", "c"]
    cfg = Config()
    target, _ = resolve("models/c/weights.bin", tmp_path, cfg, "sqlite:///nowhere.db")
    assert target.kind == "artifact" and target.roots == ["c"]
    target, _ = resolve("data/raw", tmp_path, cfg, "sqlite:///nowhere.db")
    assert target.kind == "input" and "used by a" in target.warnings[0]
    with pytest.raises(AuditError, match="no stage"):
        resolve("data/unknown", tmp_path, cfg, "sqlite:///nowhere.db")
    with pytest.raises(AuditError, match="models:/<name>/<version>"):
        resolve("models:/justaname", tmp_path, cfg, "sqlite:///nowhere.db")


def test_each_stage_gets_the_commit_that_recorded_its_entry(tmp_path):
    git(tmp_path, "init", "-q")
    v1 = {"a": _stage({"raw": "1"}, {"out_a": "a1"}), "b": _stage({"out_a": "a1"}, {"out_b": "b1"})}
    (tmp_path / "dvc.lock").write_text(_lock(v1))
    git(tmp_path, "add", "dvc.lock")
    git(tmp_path, "commit", "-qm", "one")
    first = git(tmp_path, "rev-parse", "HEAD")
    v2 = {**v1, "b": _stage({"out_a": "a1"}, {"out_b": "b2"})}  # only b re-ran
    (tmp_path / "dvc.lock").write_text(_lock(v2))
    git(tmp_path, "commit", "-qam", "two")
    second = git(tmp_path, "rev-parse", "HEAD")
    assert stage_commits(tmp_path, read_lock(tmp_path)) == {"a": first, "b": second}
    v3 = {**v2, "a": _stage({"raw": "2"}, {"out_a": "a2"})}  # a re-ran, not committed
    (tmp_path / "dvc.lock").write_text(_lock(v3))
    assert stage_commits(tmp_path, read_lock(tmp_path)) == {"a": None, "b": second}
    # an older revision's lock, read from git, by any name git knows
    assert stage_commits(tmp_path, read_lock(tmp_path, first)) == {"a": first, "b": first}
    assert stage_commits(tmp_path, read_lock(tmp_path, "HEAD~1")) == {"a": first, "b": first}
    with pytest.raises(AuditError, match="no git revision"):
        read_lock(tmp_path, "no-such-branch")


def _project(root: Path) -> Config:
    """raw images -> records.jsonl (sha256 per file) -> a dataset file, with a true lock."""
    cfg = Config()
    raw = root / "data/raw/images/particles"
    raw.mkdir(parents=True)
    for name, data in (("a.png", b"aaaa"), ("b.png", b"bbbb")):
        (raw / name).write_bytes(data)
    records = root / cfg.paths.interim_images
    records.mkdir(parents=True)
    write_jsonl(
        records / "records.jsonl",
        [
            {"source": f"data/raw/images/particles/{n}", "sha256": sha256_file(raw / n), "page": 0}
            for n in ("a.png", "b.png")
        ],
    )
    (root / "data/processed").mkdir(parents=True)
    (root / "data/processed/set.json").write_text("{}")
    (root / "params.yaml").write_text(yaml.safe_dump({"ingest_images": {"min_side": 16}}))
    (root / "dvc.lock").write_text(
        _lock(
            {
                "ingest_images": _stage(
                    {"data/raw/images": dvc_md5(root / "data/raw/images")},
                    {"data/interim/images": dvc_md5(records)},
                    params={"ingest_images": {"min_side": 16}},
                ),
                "build": _stage(
                    {"data/interim/images": dvc_md5(records)},
                    {"data/processed/set.json": dvc_md5(root / "data/processed/set.json")},
                ),
            }
        )
    )
    return cfg


def test_verify_is_clean_then_names_the_edited_missing_and_new_files(tmp_path):
    cfg = _project(tmp_path)
    nowhere = f"sqlite:///{tmp_path / 'mlruns/mlflow.db'}"
    report = verify(tmp_path, cfg, nowhere)
    assert report["ok"], report["findings"]
    assert report["registry"].startswith("no MLflow store")
    (tmp_path / "data/raw/images/particles/a.png").write_bytes(b"aaab")
    (tmp_path / "data/raw/images/particles/b.png").unlink()
    (tmp_path / "data/raw/images/particles/c.png").write_bytes(b"cccc")
    report = verify(tmp_path, cfg, nowhere)
    found = {(f["kind"], f["path"]) for f in report["findings"]}
    assert found == {
        ("changed-input", "data/raw/images"),
        ("changed-file", "data/raw/images/particles/a.png"),
        ("missing-file", "data/raw/images/particles/b.png"),
        ("new-file", "data/raw/images/particles/c.png"),
    }
    assert report["stale_stages"] == ["ingest_images", "build"] and not report["ok"]


def test_verify_names_changed_params_and_drifted_or_missing_outputs(tmp_path):
    cfg = _project(tmp_path)
    nowhere = f"sqlite:///{tmp_path / 'mlruns/mlflow.db'}"
    (tmp_path / "params.yaml").write_text(yaml.safe_dump({"ingest_images": {"min_side": 32}}))
    (tmp_path / "data/processed/set.json").write_text('{"edited": 1}')
    report = verify(tmp_path, cfg, nowhere)
    by_kind = {f["kind"]: f for f in report["findings"]}
    assert "ingest_images.min_side" in by_kind["changed-params"]["detail"]
    assert by_kind["drifted-output"]["path"] == "data/processed/set.json"
    assert report["stale_stages"] == ["ingest_images", "build"]
    (tmp_path / "data/processed/set.json").unlink()
    kinds = {f["kind"] for f in verify(tmp_path, cfg, nowhere)["findings"]}
    assert "missing-output" in kinds
