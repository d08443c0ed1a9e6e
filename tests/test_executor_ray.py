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


def _busy_ray_workers() -> list:
    """Worker processes running one of our tasks (Ray titles them after the function)."""
    import psutil

    busy = []
    for proc in psutil.process_iter(["cmdline"]):
        if "ray::_in_checkout" in " ".join(proc.info["cmdline"] or []):
            busy.append(proc)
    return busy


def test_a_worker_killed_mid_stage_loses_no_finished_item(ray_address, tmp_path, monkeypatch):
    """A Ray worker SIGKILLed from outside while measure_images runs on the cluster: its
    task is run again, the stage completes with the local run's bytes, and every item
    finished before the kill keeps its cache entry untouched (a rerun measures nothing)."""
    import threading
    import time

    from test_executor import _cache_entries

    from semilens.images.ingest import ingest_images
    from semilens.images.synth import synth_images

    monkeypatch.chdir(tmp_path)
    cfg = Config()
    cfg = cfg.model_copy(update={"synth_images": cfg.synth_images.model_copy(update={"n_per_class": 3})})
    synth_images(cfg.synth_images, Path(cfg.paths.synthetic_images))
    ingest_images(cfg.model_copy(update={"executor": ExecutorConfig(workers=1)}))
    cache = Path(cfg.paths.cache) / "measure_images"

    measure.measure_images(cfg.model_copy(update={"executor": ExecutorConfig(workers=1)}))
    local = (cfg.paths.measurements / "measurements.jsonl").read_bytes(), _cache_entries(cache)
    shutil.rmtree(cache)

    seen: dict[str, object] = {}

    def kill_one_worker_once_some_items_are_done() -> None:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            done = sorted(cache.rglob("*.json")) if cache.is_dir() else []
            busy = _busy_ray_workers()
            if len(done) >= 2 and busy:
                seen["before"] = {str(p): (p.stat().st_mtime_ns, p.read_bytes()) for p in done}
                busy[0].kill()
                seen["killed"] = busy[0].pid
                return
            time.sleep(0.01)

    killer = threading.Thread(target=kill_one_worker_once_some_items_are_done)
    killer.start()
    ray_cfg = cfg.model_copy(update={"executor": ExecutorConfig(kind="ray", address=ray_address)})
    summary = measure.measure_images(ray_cfg)
    killer.join()
    assert "killed" in seen, "no busy Ray worker was found to kill"
    assert summary["cache"]["misses"] == len(local[1])
    assert ((cfg.paths.measurements / "measurements.jsonl").read_bytes(), _cache_entries(cache)) == local
    for path, (mtime, data) in seen["before"].items():  # finished before the kill: kept, not redone
        assert Path(path).stat().st_mtime_ns == mtime and Path(path).read_bytes() == data
    again = measure.measure_images(ray_cfg)
    assert again["cache"] == {"hits": len(local[1]), "misses": 0}
