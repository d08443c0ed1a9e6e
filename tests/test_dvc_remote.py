"""A shared DVC remote over SSH: push from one clone, pull into a fresh one, nothing rebuilt.

The server is Debian's OpenSSH (``openssh-server``, installed by ``make test``), started by
the test on a free loopback port with its own host key and one authorised client key, so
the remote is a real SSH server speaking SFTP, as a team's artifact store would be.
"""

from __future__ import annotations

import getpass
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from loopback import free_port, wait_for_port

SSHD = shutil.which("sshd") or "/usr/sbin/sshd"


def _run(cmd: list[str], cwd: Path, env: dict[str, str]) -> str:
    res = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, f"{' '.join(cmd)}\n{res.stdout}\n{res.stderr}"
    return res.stdout


@pytest.fixture(scope="module")
def ssh_server(tmp_path_factory: pytest.TempPathFactory):
    """sshd on 127.0.0.1:<free port>; yields (port, the authorised client key, an empty HOME)."""
    if not Path(SSHD).is_file():
        pytest.fail("openssh-server is not installed: `make test` installs it (TEST_APT_PACKAGES)")
    d = tmp_path_factory.mktemp("sshd")
    for name in ("host", "client"):
        subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(d / name)], check=True)
    (d / "authorized_keys").write_text((d / "client.pub").read_text())
    port = free_port()
    config = d / "sshd_config"
    config.write_text(
        "\n".join(
            [
                f"Port {port}",
                "ListenAddress 127.0.0.1",
                f"HostKey {d / 'host'}",
                f"AuthorizedKeysFile {d / 'authorized_keys'}",
                "PubkeyAuthentication yes",
                "PasswordAuthentication no",
                "KbdInteractiveAuthentication no",
                "PermitRootLogin prohibit-password",
                "StrictModes no",
                "UsePAM no",
                f"PidFile {d / 'sshd.pid'}",
                "Subsystem sftp internal-sftp",
                "",
            ]
        )
    )
    if os.geteuid() == 0:
        Path("/run/sshd").mkdir(exist_ok=True)  # privilege separation directory
    proc = subprocess.Popen([SSHD, "-D", "-e", "-f", str(config)], stderr=subprocess.PIPE, text=True)
    wait_for_port(port, proc, "sshd", seconds=20)
    # A HOME of its own: no key or ssh config of whoever runs the tests takes part.
    home = d / "home"
    (home / ".ssh").mkdir(parents=True)
    try:
        yield port, d / "client", home
    finally:
        proc.terminate()
        proc.wait(timeout=10)


def _env(home: Path) -> dict[str, str]:
    return {
        **os.environ,
        "HOME": str(home),
        "DVC_NO_ANALYTICS": "1",
        "GIT_AUTHOR_NAME": "t",
        "GIT_AUTHOR_EMAIL": "t@t",
        "GIT_COMMITTER_NAME": "t",
        "GIT_COMMITTER_EMAIL": "t@t",
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
    }


def _tree(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_push_from_one_clone_and_pull_into_a_fresh_one_rebuilds_nothing(ssh_server, tmp_path: Path) -> None:
    port, key, home = ssh_server
    env = _env(home)
    dvc = [sys.executable, "-m", "dvc"]
    origin = tmp_path / "origin"
    origin.mkdir()
    _run(["git", "init", "-q", "-b", "main"], origin, env)
    _run([*dvc, "init", "-q"], origin, env)
    # Two stages, a directory output and a file built from it: what `dvc pull` must restore.
    (origin / "make.py").write_text(
        "import pathlib, sys\n"
        "out = pathlib.Path('data/out'); out.mkdir(parents=True, exist_ok=True)\n"
        "for i in range(5): (out / f'{i}.bin').write_bytes(bytes(range(256)) * (i + 1))\n"
    )
    (origin / "dvc.yaml").write_text(
        yaml.safe_dump(
            {
                "stages": {
                    "make": {"cmd": "python make.py", "deps": ["make.py"], "outs": ["data/out"]},
                    "count": {
                        "cmd": "ls data/out | wc -l > data/count.txt",
                        "deps": ["data/out"],
                        "outs": ["data/count.txt"],
                    },
                }
            }
        )
    )
    _run([*dvc, "repro", "-q"], origin, env)
    user = getpass.getuser()
    store = tmp_path / "store"  # the remote's folder on the SSH host
    _run([*dvc, "remote", "add", "-d", "team", f"ssh://{user}@127.0.0.1:{port}{store}"], origin, env)
    # The key is each user's own: kept in the untracked config.local, not in git.
    _run([*dvc, "remote", "modify", "--local", "team", "keyfile", str(key)], origin, env)
    _run(["git", "add", "-A"], origin, env)
    _run(["git", "commit", "-q", "-m", "pipeline"], origin, env)
    _run([*dvc, "push", "-q"], origin, env)
    assert any(store.rglob("*")), "nothing reached the remote"

    clone = tmp_path / "clone"
    _run(["git", "clone", "-q", str(origin), str(clone)], tmp_path, env)
    assert not (clone / "data" / "out").exists()
    _run([*dvc, "remote", "modify", "--local", "team", "keyfile", str(key)], clone, env)
    _run([*dvc, "pull", "-q"], clone, env)
    status = _run([*dvc, "status", "--quiet"], clone, env)
    assert status.strip() == ""
    assert _tree(clone / "data") == _tree(origin / "data")
    # Nothing is rebuilt: every stage is up to date after the pull.
    repro = _run([*dvc, "repro", "--dry"], clone, env)
    assert "Running stage" not in repro and repro.count("didn't change") == 2, repro


def test_a_key_the_server_does_not_know_is_refused_and_nothing_is_written(ssh_server, tmp_path: Path) -> None:
    port, _, home = ssh_server
    env = _env(home)
    dvc = [sys.executable, "-m", "dvc"]
    stranger = tmp_path / "stranger"
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(stranger)], check=True)
    repo = tmp_path / "repo"
    repo.mkdir()
    _run(["git", "init", "-q"], repo, env)
    _run([*dvc, "init", "-q"], repo, env)
    (repo / "f.txt").write_text("x")
    _run([*dvc, "add", "-q", "f.txt"], repo, env)
    store = tmp_path / "store"
    _run([*dvc, "remote", "add", "-d", "team", f"ssh://{getpass.getuser()}@127.0.0.1:{port}{store}"], repo, env)
    _run([*dvc, "remote", "modify", "--local", "team", "keyfile", str(stranger)], repo, env)
    res = subprocess.run([*dvc, "push"], cwd=repo, env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode != 0
    assert "permission denied" in (res.stdout + res.stderr).lower()
    assert not store.exists()
