"""A team's MLflow: registration, trace and verify against `mlflow server` on PostgreSQL.

The test starts Debian's PostgreSQL (``postgresql``, installed by ``make test``) in a
fresh cluster on a free loopback port, then ``mlflow server`` on it with a proxied
artifact store, as a team would run it, and drives the project's own registry code
through ``MLFLOW_TRACKING_URI=http://...``: what works on the sqlite file must work here.
"""

from __future__ import annotations

import os
import pwd
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from loopback import free_port, start, wait_for_port

PG_BIN = (
    next(iter(sorted(Path("/usr/lib/postgresql").glob("*/bin"))), None)
    if Path("/usr/lib/postgresql").is_dir()
    else None
)


@pytest.fixture(scope="module")
def mlflow_server(tmp_path_factory: pytest.TempPathFactory):
    """PostgreSQL + `mlflow server`; yields (tracking URI, the server's artifact folder)."""
    if PG_BIN is None:
        pytest.fail("PostgreSQL is not installed: `make test` installs it (TEST_APT_PACKAGES)")
    base = tmp_path_factory.mktemp("mlflow-server")
    data, sock = base / "pg", base / "sock"
    sock.mkdir()
    # PostgreSQL refuses to run as root: under root the cluster belongs to `postgres`.
    as_pg: list[str] = []
    if os.geteuid() == 0:
        as_pg = ["runuser", "-u", "postgres", "--"]
        base.chmod(0o755)
        for p in (base.parent, base.parent.parent):
            p.chmod(p.stat().st_mode | 0o055)
        shutil.chown(sock, "postgres")
        data.mkdir()
        shutil.chown(data, "postgres")
    user = "postgres" if as_pg else pwd.getpwuid(os.getuid()).pw_name
    subprocess.run(
        [*as_pg, str(PG_BIN / "initdb"), "--no-sync", "-A", "trust", "-U", user, "-D", str(data)],
        check=True,
        capture_output=True,
    )
    pg_port = free_port()
    postgres = [str(PG_BIN / "postgres"), "-D", str(data), "-p", str(pg_port), "-k", str(sock)]
    pg = start([*as_pg, *postgres, "-c", "listen_addresses=127.0.0.1"])
    wait_for_port(pg_port, pg, "postgres")
    subprocess.run(
        [*as_pg, str(PG_BIN / "createdb"), "-h", "127.0.0.1", "-p", str(pg_port), "-U", user, "mlflow"], check=True
    )
    artifacts = base / "artifacts"
    port = free_port()
    store = f"postgresql+psycopg2://{user}@127.0.0.1:{pg_port}/mlflow"
    server = start(
        [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", store]
        + ["--artifacts-destination", str(artifacts), "--host", "127.0.0.1", "--port", str(port), "--workers", "1"],
        env={**os.environ, "MLFLOW_TRACKING_URI": ""},
    )
    try:
        wait_for_port(port, server, "mlflow server", seconds=180)
        yield f"http://127.0.0.1:{port}", artifacts
    finally:
        server.terminate()
        pg.terminate()
        server.wait(timeout=30)
        pg.wait(timeout=30)


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
