"""What a stage read, wrote and skipped: printed for people, saved for tests and audits.

The summary goes to ``paths.logs/<stage>.json`` (git-ignored, not a DVC output: it holds
cache hit counts and timings that legitimately differ between runs, which must not make
the data outputs differ).
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from rich.console import Console

from semilens.config import Config, ConfigError, load_config
from semilens.io import write_json

console = Console(stderr=True)


def report(stage: str, summary: dict[str, Any], logs_dir: Path) -> None:
    if int(os.environ.get("RANK", "0")) != 0:
        return  # a secondary process of a multi-process launch: the first one reports
    parts = ", ".join(f"{k}={v}" for k, v in summary.items() if not isinstance(v, (dict, list)))
    console.print(f"[bold]{stage}[/bold]: {parts}")
    write_json(Path(logs_dir) / f"{stage}.json", summary)


def run_stage(stage: str, work: Callable[[Config], dict[str, Any]]) -> dict[str, Any]:
    """A stage's whole main: load params.yaml, do the work, report what happened.

    A bad params.yaml ends the stage with exit code 2 and the offending keys, not a
    traceback.
    """
    try:
        cfg = load_config()
    except ConfigError as exc:
        console.print(f"[red]{stage}: config error[/red]: {exc}")
        raise SystemExit(2) from exc
    summary = work(cfg)
    report(stage, summary, cfg.paths.logs)
    return summary


def run_matrix_stage(stage: str, work: Callable[[Config, str], dict[str, Any]]) -> dict[str, Any]:
    """Main of a dvc.yaml matrix stage: ``python -m stages.<stage> ITEM`` (e.g. a family)."""
    if len(sys.argv) != 2:
        raise SystemExit(f"usage: python -m stages.{stage} ITEM (e.g. qwen2_5_vl)")
    item = sys.argv[1]
    return run_stage(f"{stage}@{item}", lambda cfg: work(cfg, item))
