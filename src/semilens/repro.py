"""`dvc repro` with several stages at once, each in its own `dvc repro --single-item`.

dvc repro runs one stage at a time. On a small CPU box the tiny models' training steps are
dominated by per-operation overhead and use a second core poorly (two torch threads made a
step 1.2 to 1.4 times faster than one), while two small training loops side by side, one
thread each, gave 1.6 times the work of one loop on two threads. DVC supports running
independent stages in parallel: it releases the repository lock while a stage's command
runs and guards each stage's dependencies and outputs with read/write locks, and
`--wait-for-lock` makes a process queue for the short locked phases (status checks, hashing,
writing dvc.lock) instead of failing. What DVC leaves to the caller is the order: this
module takes the stage graph from DVC and starts a stage only when every stage upstream of
it has finished, so no stage ever reads an output that is still being written.

- Threads: the training stages take theirs from params.yaml (``threads``: it changes how
  float sums split, so it is part of the result and DVC tracks it); with two jobs on two
  cores it is 1, since two stages on two threads each made a step 3x slower, the threads
  spinning for cores the other stage held. Everything else in a stage (NumPy's BLAS,
  OpenCV, tokenizers) gets ``OMP_NUM_THREADS`` = cores / jobs, and so does a per-item
  stage's worker count (``executor.workers: 0``); an explicit value wins.
- Shared resources DVC does not see: stages whose ``meta.exclusive`` names the same
  resource in dvc.yaml never run at the same time (the registry stages all write one
  MLflow sqlite store).
- Order: stages that ``first`` targets need start before the rest (the first VLM family
  reaches a registered model early); then the stage with the longest chain of stages
  still behind it, so long sequential chains (the text path) start early; then dvc.yaml's
  order.
- A failed stage stops new starts (as dvc repro stops at the first failure); the stages
  already running finish, so no work is thrown away, and the failure's log tail is shown.

Each stage's output goes to ``<logs>/repro/<stage>.log``; ``<logs>/repro.json`` records when
each stage started and ended, for budget measurements.
"""

from __future__ import annotations

import contextlib
import os
import re
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from semilens.executor import STAGE_CORES_ENV, available_cores
from semilens.io import write_json


class ReproError(ValueError):
    """A target DVC does not know, or a bad jobs count: nothing was started."""


@dataclass(frozen=True)
class StageNode:
    name: str  # DVC's addressing: "prepare_vlm@qwen2_5_vl"
    upstream: frozenset[str]
    exclusive: str | None = None  # meta.exclusive: a resource only one stage may hold


@dataclass
class StageResult:
    name: str
    returncode: int
    start_s: float  # seconds after the run began
    end_s: float
    log: str

    @property
    def seconds(self) -> float:
        return self.end_s - self.start_s


@dataclass
class Plan:
    """The stages to run, keyed by name, and the order in which ready stages start."""

    nodes: dict[str, StageNode]
    priority: dict[str, tuple[int, int, int]]

    def ready(self, done: set[str], running: set[str], held: set[str]) -> list[str]:
        """Stages whose upstream is done and whose exclusive resource is free, best first."""
        free = [
            n
            for n in self.nodes.values()
            if n.name not in done
            and n.name not in running
            and n.upstream <= done
            and (n.exclusive is None or n.exclusive not in held)
        ]
        return sorted((n.name for n in free), key=lambda name: self.priority[name])


def load_plan(root: Path, targets: Sequence[str] = (), first: Sequence[str] = ()) -> Plan:
    """The DVC stage graph under ``root``: ``targets`` and all they depend on (every stage
    when none is given), ordered as the module docstring says."""
    import networkx as nx
    from dvc.exceptions import DvcException
    from dvc.repo import Repo

    # chdir: DVC names stages relative to the working directory (`sub/dvc.yaml:name`)
    with contextlib.chdir(root), Repo(".") as repo:
        graph = repo.index.graph  # edges point from a stage to the stages it depends on

        def collect(target: str) -> list[Any]:
            try:
                return list(repo.stage.collect(target))
            except DvcException as exc:
                raise ReproError(f"unknown target {target!r}: {exc}") from exc

        if targets:
            wanted: set[Any] = set()
            for target in targets:
                for stage in collect(target):
                    wanted |= {stage, *nx.descendants(graph, stage)}
        else:
            wanted = set(graph.nodes)
        wanted = {s for s in wanted if s.cmd}  # `.dvc` files of added data have nothing to run
        sub = graph.subgraph(wanted)
        nodes = {
            s.addressing: StageNode(
                s.addressing,
                frozenset(u.addressing for u in sub.successors(s)),
                (s.meta or {}).get("exclusive") if isinstance(s.meta, dict) else None,
            )
            for s in wanted
        }
        rank = {name: len(first) for name in nodes}
        for i, target in reversed(list(enumerate(first))):
            for stage in collect(target):
                for s in {stage, *nx.descendants(graph, stage)}:
                    if s.addressing in rank:
                        rank[s.addressing] = i
        # the longest chain of stages downstream of each stage (itself included)
        chain: dict[str, int] = {}
        for s in nx.topological_sort(sub):  # downstream stages come first
            chain[s.addressing] = 1 + max((chain[d.addressing] for d in sub.predecessors(s)), default=0)
        order = {s.addressing: i for i, s in enumerate(repo.index.stages)}
    priority = {name: (rank[name], -chain[name], order.get(name, len(order))) for name in nodes}
    return Plan(nodes, priority)


def stage_env(jobs: int) -> dict[str, str]:
    env = dict(os.environ)
    share = str(max(1, available_cores() // jobs))
    env.setdefault("OMP_NUM_THREADS", share)
    # Per-item stages start this many workers when `executor.workers` is 0.
    env.setdefault(STAGE_CORES_ENV, share)
    return env


def run_plan(
    plan: Plan,
    root: Path,
    jobs: int,
    logs: Path,
    dvc: Sequence[str] = ("dvc",),
    echo: Callable[[str], None] = print,
    poll_s: float = 0.2,
) -> list[StageResult]:
    """Run every stage of ``plan``, at most ``jobs`` at once; returns them in finishing order."""
    if jobs < 1:
        raise ReproError(f"jobs must be at least 1, got {jobs}")
    stage_logs = Path(logs) / "repro"
    stage_logs.mkdir(parents=True, exist_ok=True)
    env = stage_env(jobs)
    t0 = time.monotonic()
    done: set[str] = set()
    held: set[str] = set()
    running: dict[str, tuple[subprocess.Popen[bytes], float, Path, Any]] = {}
    results: list[StageResult] = []
    failed = False
    try:
        while True:
            while not failed and len(running) < jobs:
                ready = plan.ready(done, set(running), held)
                if not ready:
                    break
                name = ready[0]
                log = stage_logs / (re.sub(r"[^\w.-]", "_", name) + ".log")  # `sub/dvc.yaml:x@y` too
                fh = log.open("wb")
                cmd = [*dvc, "--wait-for-lock", "repro", "--single-item", name]
                proc = subprocess.Popen(cmd, cwd=root, env=env, stdout=fh, stderr=subprocess.STDOUT)
                running[name] = (proc, time.monotonic() - t0, log, fh)
                if plan.nodes[name].exclusive:
                    held.add(plan.nodes[name].exclusive)
                echo(f"[{time.monotonic() - t0:7.1f}s] start  {name}")
            if not running:
                break
            time.sleep(poll_s)
            for name, (proc, start, log, fh) in list(running.items()):
                if proc.poll() is None:
                    continue
                fh.close()
                del running[name]
                held.discard(plan.nodes[name].exclusive)
                result = StageResult(name, proc.returncode, round(start, 2), round(time.monotonic() - t0, 2), str(log))
                results.append(result)
                if proc.returncode == 0:
                    done.add(name)
                    echo(f"[{result.end_s:7.1f}s] done   {name} ({result.seconds:.1f}s)")
                else:
                    failed = True
                    tail = log.read_text(errors="replace").splitlines()[-20:]
                    echo(f"[{result.end_s:7.1f}s] FAILED {name} (exit {proc.returncode}); log: {log}")
                    echo("\n".join("    " + line for line in tail))
    except KeyboardInterrupt:
        # The stages got the same Ctrl-C (one process group); let DVC clean up after them.
        for proc, *_ in running.values():
            proc.wait()
        raise
    not_run = sorted(set(plan.nodes) - done - {r.name for r in results})
    write_json(
        Path(logs) / "repro.json",
        {
            "jobs": jobs,
            "omp_num_threads": env["OMP_NUM_THREADS"],
            "wall_s": round(time.monotonic() - t0, 2),
            "stages": [asdict(r) | {"seconds": round(r.seconds, 2)} for r in results],
            "not_run": not_run,
        },
    )
    if failed and not_run:
        echo(f"not started after the failure: {', '.join(not_run)}")
    return results


def repro(
    root: Path,
    logs: Path,
    targets: Sequence[str] = (),
    first: Sequence[str] = (),
    jobs: int = 2,
    echo: Callable[[str], None] = print,
) -> bool:
    """Plan and run; True when every stage succeeded."""
    plan = load_plan(root, targets, first)
    beside = Path(sys.executable).with_name("dvc")  # the venv's own dvc, as the stages' python
    results = run_plan(plan, root, jobs, logs, dvc=[str(beside)] if beside.exists() else ["dvc"], echo=echo)
    return len(results) == len(plan.nodes) and all(r.returncode == 0 for r in results)
