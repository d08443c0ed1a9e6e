"""Benchmark behind `semilens repro -j 2`: two training stages side by side, one core each,
against one after the other on both cores (what `dvc repro` does), measured in one run.

Each workload is the pipeline's own training step on its tiny preset, at the sizes in
params.yaml: the generic VLM pretraining step of every family (``prepare_vlm``) and the
text model's pretraining step (``pretrain_llm``, random tokens at its block size). For each,
two worker processes build the model, wait at a barrier, then time the same number of steps:

- one after the other, 2 threads each (the pair takes the sum of the two loops);
- side by side, 1 thread each (the pair takes the longer loop);
- side by side, 2 threads each (oversubscribed: what running two stages without lowering
  ``threads`` would do).

Writes ``<paths.metrics>/bench_parallel.json`` and prints a table. Run from the project root:
``.venv/bin/python benchmarks/parallel_stages.py [--steps 20]``
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
WORKLOADS = ("qwen2_5_vl", "mllama", "paligemma", "llm")


def worker(workload: str, threads: int, steps: int, barrier: Path, n_workers: int) -> None:
    """Build ``workload``'s tiny model, wait for the other workers, time ``steps`` steps."""
    import random

    import torch

    from semilens.config import load_config
    from semilens.training import supervised_forward

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    cfg = load_config(ROOT / "params.yaml")
    if workload == "llm":
        from semilens.llm.prepare import build_tiny

        model, _ = build_tiny(cfg.prepare_llm.tiny, 0)
        p = cfg.pretrain_llm
        ids = torch.randint(0, model.config.vocab_size, (p.batch_size, p.block_size))

        def batch() -> dict[str, Any]:
            return {"input_ids": ids, "labels": ids}
    else:
        from semilens.tokenizer import general_corpus
        from semilens.vlm import generic_task
        from semilens.vlm.families import get_family
        from semilens.vlm.prepare import _batch

        family = get_family(workload)
        model, processor = family.build_tiny(cfg.prepare_vlm.tiny, general_corpus() + generic_task.phrasings())
        pre = cfg.prepare_vlm.pretrain
        rnd = random.Random(0)

        def batch() -> dict[str, Any]:
            return _batch(
                [generic_task.any_sample(rnd, pre.image_size) for _ in range(pre.batch_size)], processor, family
            )

    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    model.train()

    def step() -> None:
        loss, _ = supervised_forward(model, batch())
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    step()  # first-call allocations out of the timing
    (barrier / f"{os.getpid()}.ready").touch()
    while len(list(barrier.glob("*.ready"))) < n_workers:
        time.sleep(0.01)
    start = time.perf_counter()
    for _ in range(steps):
        step()
    print(json.dumps({"seconds": time.perf_counter() - start}))


def timed(workload: str, threads: int, steps: int, side_by_side: bool) -> list[float]:
    """Two workers' loop times, started together or one after the other."""

    def start(barrier: Path, n: int) -> subprocess.Popen[str]:
        cmd = [
            sys.executable,
            __file__,
            "--worker",
            workload,
            "--threads",
            str(threads),
            "--steps",
            str(steps),
            "--barrier",
            str(barrier),
            "--n-workers",
            str(n),
        ]
        return subprocess.Popen(
            cmd, stdout=subprocess.PIPE, text=True, env={**os.environ, "OMP_NUM_THREADS": str(threads)}
        )

    def seconds(proc: subprocess.Popen[str]) -> float:
        out, _ = proc.communicate()
        if proc.returncode:
            raise RuntimeError(f"{workload} worker failed (exit {proc.returncode})")
        return json.loads(out.strip().splitlines()[-1])["seconds"]

    if side_by_side:
        with tempfile.TemporaryDirectory() as barrier:
            procs = [start(Path(barrier), 2) for _ in range(2)]
            return [seconds(p) for p in procs]
    times = []
    for _ in range(2):
        with tempfile.TemporaryDirectory() as barrier:
            times.append(seconds(start(Path(barrier), 1)))
    return times


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--worker", choices=WORKLOADS)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--barrier", type=Path)
    ap.add_argument("--n-workers", type=int, default=1)
    ap.add_argument("--workloads", nargs="+", choices=WORKLOADS, default=list(WORKLOADS))
    args = ap.parse_args()
    if args.worker:
        worker(args.worker, args.threads, args.steps, args.barrier, args.n_workers)
        return

    from semilens.config import load_config
    from semilens.io import write_json
    from semilens.repro import cores

    rows = {}
    for w in args.workloads:
        one_after_other = sum(timed(w, 2, args.steps, side_by_side=False))
        side_by_side = max(timed(w, 1, args.steps, side_by_side=True))
        oversubscribed = max(timed(w, 2, args.steps, side_by_side=True))
        rows[w] = {
            "one_after_other_2_threads_s": round(one_after_other, 2),
            "side_by_side_1_thread_s": round(side_by_side, 2),
            "side_by_side_2_threads_s": round(oversubscribed, 2),
            "speedup_side_by_side": round(one_after_other / side_by_side, 2),
            "speedup_oversubscribed": round(one_after_other / oversubscribed, 2),
        }
        print(
            f"{w:12s} one after the other (2 threads) {one_after_other:6.1f} s | side by side (1 thread) "
            f"{side_by_side:6.1f} s: {rows[w]['speedup_side_by_side']:.2f}x | side by side (2 threads) "
            f"{oversubscribed:6.1f} s: {rows[w]['speedup_oversubscribed']:.2f}x",
            flush=True,
        )
    cfg = load_config(ROOT / "params.yaml")
    write_json(
        Path(cfg.paths.metrics) / "bench_parallel.json",
        {"cores": cores(), "steps_per_loop": args.steps, "workloads": rows},
    )


if __name__ == "__main__":
    main()
