"""A team's MLflow: registration, trace and verify against `mlflow server` on PostgreSQL.

The test starts Debian's PostgreSQL (``postgresql``, installed by ``make test``) in a
fresh cluster on a free loopback port, then ``mlflow server`` on it with a proxied
artifact store, as a team would run it, and drives the project's own registry code
through ``MLFLOW_TRACKING_URI=http://...``: what works on the sqlite file must work here.
"""

from __future__ import annotations

from pathlib import Path

import loopback
import pytest


@pytest.fixture(scope="module")
def mlflow_server(tmp_path_factory: pytest.TempPathFactory):
    with loopback.mlflow_server(tmp_path_factory.mktemp("mlflow-server")) as server:
        yield server


def test_registration_trace_and_verify_work_against_the_server(mlflow_server, tmp_path: Path, monkeypatch) -> None:
    from mlflow import MlflowClient

    from semilens.audit import _model_version, _registered_copies, _registry_versions
    from semilens.lineage import dvc_md5
    from semilens.registry import Registration, register, tracking_uri

    uri, server_artifacts = mlflow_server
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    assert tracking_uri(tmp_path / "mlruns") == uri
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text('{"r": 4}')
    (adapter / "adapter_model.safetensors").write_bytes(bytes(range(256)) * 8)
    md5 = dvc_md5(adapter)
    reg = Registration(
        name="semilens-team",
        params={"lora.r": 4},
        metrics={"vqa_accuracy": 0.5},
        tags={"dvc.adapter.path": "models/x/adapter", "dvc.adapter.md5": md5, "git.commit": "c1"},
        artifacts={"adapter": adapter},
        model_artifact="adapter",
    )
    first = register(reg, uri, "semilens", tmp_path / "unused")
    assert not first["reused"]
    # The same lineage from another clone is the same model: no second version.
    assert register(reg, uri, "semilens", tmp_path / "unused")["reused"]
    assert not (tmp_path / "unused").exists()  # artifacts go to the server, not beside the client

    client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    mv = _model_version(uri, "semilens-team", "latest")
    assert mv.tags["dvc.adapter.md5"] == md5 and int(mv.version) == first["version"]
    assert client.get_run(mv.run_id).data.params["lora.r"] == "4"
    assert mv.source.startswith("mlflow-artifacts:")

    # verify hashes the registered copy through the server, like the sqlite store's files.
    versions = _registry_versions(uri)
    assert not isinstance(versions, str)
    findings, hashed = _registered_copies(versions)
    assert (findings, hashed) == ([], 1)
    stored = next(server_artifacts.rglob("adapter_model.safetensors"))
    stored.write_bytes(b"\xff" + stored.read_bytes()[1:])  # one byte changed on the server
    findings, _ = _registered_copies(_registry_versions(uri))
    assert [f.kind for f in findings] == ["changed-registered-copy"]
    assert "was registered as " + md5 in findings[0].detail
