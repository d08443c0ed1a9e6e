"""Servers the tests start on 127.0.0.1: a free port, and waiting until one listens."""

from __future__ import annotations

import socket
import subprocess
import time

import pytest


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


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
