"""Servers the tests start on 127.0.0.1: a free port, and waiting until one listens."""

from __future__ import annotations

import os
import pwd
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from semilens.launch import free_port  # noqa: F401  (the servers' ports; the tests import it from here)


def wait_for_port(port: int, proc: subprocess.Popen, what: str, seconds: float = 90) -> None:
    """Return once ``port`` accepts connections; fail naming ``what`` (and its output) if
    ``proc`` exits or ``seconds`` pass first."""
    deadline = time.monotonic() + seconds
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            if proc.poll() is not None or time.monotonic() > deadline:
                proc.kill()
                out = proc.stdout.read() if proc.stdout else (proc.stderr.read() if proc.stderr else "")
                pytest.fail(f"{what} did not start on port {port}: {(out or '')[-2000:]}")
            time.sleep(0.2)


def start(cmd: list[str], env: dict[str, str] | None = None) -> subprocess.Popen:
    """A server process whose output (stdout and stderr together) a failed start shows."""
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)


PG_BIN = (
    next(iter(sorted(Path("/usr/lib/postgresql").glob("*/bin"))), None)
    if Path("/usr/lib/postgresql").is_dir()
    else None
)


@contextmanager
def mlflow_server(base: Path) -> Iterator[tuple[str, Path]]:
    """Debian's PostgreSQL in a fresh cluster, and `mlflow server` on it with a proxied
    artifact store under ``base``, as a team runs it; yields (tracking URI, artifact folder)."""
    if PG_BIN is None:
        pytest.fail("PostgreSQL is not installed: `make test` installs it (TEST_APT_PACKAGES)")
    # The cluster lives in a folder of its own under the system's temp dir: under root it
    # belongs to `postgres`, who must reach it, and pytest's base folder is private to root.
    pg_root = Path(tempfile.mkdtemp(prefix="semilens-pg-"))
    data, sock = pg_root / "data", pg_root / "sock"
    data.mkdir()
    sock.mkdir()
    # PostgreSQL refuses to run as root: under root the cluster belongs to `postgres`.
    as_pg: list[str] = []
    if os.geteuid() == 0:
        as_pg = ["runuser", "-u", "postgres", "--"]
        pg_root.chmod(0o755)
        for p in (pg_root, data, sock):
            shutil.chown(p, "postgres")
    user = "postgres" if as_pg else pwd.getpwuid(os.getuid()).pw_name
    init = subprocess.run(
        [*as_pg, str(PG_BIN / "initdb"), "--no-sync", "-A", "trust", "-U", user, "-D", str(data)],
        capture_output=True,
        text=True,
    )
    if init.returncode:
        pytest.fail(f"initdb failed: {init.stdout[-1000:]}{init.stderr[-1000:]}")
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
        shutil.rmtree(pg_root, ignore_errors=True)
