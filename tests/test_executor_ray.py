"""Per-item stages as Ray tasks: a two-node cluster on this machine gives the local run's bytes.

The cluster is real: ``ray start --head`` and a second ``ray start --address`` node, one CPU
each, started by the test on loopback and stopped after it.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import loopback
import pytest

from semilens.config import Config, ExecutorConfig
from semilens.executor import map_items
from semilens.images import measure

RAY = str(Path(sys.executable).parent / "ray")


@pytest.fixture(scope="module")
def ray_address():
    port = loopback.free_port()
    node = ["--node-ip-address", "127.0.0.1", "--num-cpus", "1", "--object-store-memory", "100000000"]
    common = [*node, "--disable-usage-stats"]
    try:
        subprocess.run(
            [RAY, "start", "--head", "--port", str(port), "--include-dashboard", "false", *common],
            check=True,
            capture_output=True,
            timeout=120,
        )
        subprocess.run(
            [RAY, "start", "--address", f"127.0.0.1:{port}", *common], check=True, capture_output=True, timeout=120
        )
        yield f"127.0.0.1:{port}"
    finally:
        import ray

        ray.shutdown()
        subprocess.run([RAY, "stop", "--force"], capture_output=True, timeout=120)


def test_kind_ray_needs_the_cluster_address():
    with pytest.raises(ValueError, match="needs the cluster's address"):
        ExecutorConfig(kind="ray")


def test_measure_images_on_a_two_node_ray_cluster_writes_the_local_runs_bytes(ray_address, tmp_path, monkeypatch):
    from test_executor import _cache_entries
    from test_measure import _write_inputs

    monkeypatch.chdir(tmp_path)
    cfg = Config()
    _write_inputs(cfg)
    outputs = {}
    for kind in ("local", "ray"):
        shutil.rmtree(cfg.paths.cache, ignore_errors=True)
        ex = ExecutorConfig(kind=kind, address=ray_address if kind == "ray" else None, workers=1)
        summary = measure.measure_images(cfg.model_copy(update={"executor": ex}))
        assert summary["cache"] == {"hits": 0, "misses": 3}
        outputs[kind] = (
            (cfg.paths.measurements / "measurements.jsonl").read_bytes(),
            (cfg.paths.metrics / "measure.json").read_bytes(),
            _cache_entries(Path(cfg.paths.cache)),
        )
    assert outputs["ray"] == outputs["local"]
    assert len(outputs["ray"][2]) == 2  # written by the Ray workers, in this checkout's cache


def test_a_killed_ray_worker_loses_nothing_and_its_item_is_redone(ray_address, tmp_path):
    marks = tmp_path / "marks"
    marks.mkdir()

    def dies_once(x: int) -> int:
        # The first attempt at each item kills its worker process outright, as an OOM
        # kill or a lost node would; Ray runs the task again on a live worker.
        mark = marks / str(x)
        if not mark.exists():
            mark.touch()
            os._exit(1)
        return 2 * x

    got = map_items(dies_once, [1, 2, 3, 4], executor=ExecutorConfig(kind="ray", address=ray_address), description="t")
    assert got == [2, 4, 6, 8]
    assert sorted(p.name for p in marks.iterdir()) == ["1", "2", "3", "4"]
