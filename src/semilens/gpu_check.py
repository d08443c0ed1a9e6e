"""The GPU check: every VLM family's tiny preset through the GPU-only training paths.

On a CUDA machine, ``python scripts/gpu_check.py`` builds each
family's tiny base (a few generic pretraining steps), then runs ``finetune_vlm`` for a few
steps per family and path:

- ``bf16``: LoRA in bf16 with plain transformers + PEFT;
- ``qlora``: 4-bit NF4 QLoRA through bitsandbytes;
- ``unsloth``: unsloth's backend in 16-bit, when unsloth is installed (else "skipped");
- ``fsdp`` and ``zero3``: bf16 LoRA under ``accelerate launch`` with the recipe of the same
  name in presets/accelerate (FSDP2; DeepSpeed ZeRO-3, when deepspeed is installed), one
  process per visible GPU, saved from the gathered final checkpoint. Accelerate runs
  neither on the CPU (it takes FSDP and DeepSpeed only on accelerators), so this is where
  they are checked.

It prints one table row per (family, path) with the outcome, steps, first and last loss,
seconds and peak GPU memory, and writes the rows to ``--out`` as JSON. Every case runs in
its own process: importing unsloth patches transformers for the whole process, and a
failed case must not leave CUDA state behind for the next. Without CUDA it says so and
exits with 2, running nothing. The training rows come from the pipeline's VQA split
(``--vqa``, default ``data/processed/vqa``, written by ``make run``).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

PATHS = ("bf16", "qlora", "unsloth", "fsdp", "zero3")
# the paths run as several processes, each under the accelerate recipe of its name
SHARDED = ("fsdp", "zero3")


def trainer_for(path: str, steps: int) -> dict[str, Any]:
    common = {"max_steps": steps, "batch_size": 2, "save_steps": steps, "logging_steps": 1}
    if path in ("bf16", *SHARDED):
        return {**common, "backend": "transformers", "precision": "bf16", "quantization": "none"}
    if path == "qlora":
        return {**common, "backend": "transformers", "precision": "bf16", "quantization": "4bit"}
    if path == "unsloth":
        return {**common, "backend": "unsloth", "precision": "bf16", "quantization": "none"}
    raise ValueError(f"unknown path {path!r}; known: {', '.join(PATHS)}")


def case_config(work: Path, vqa: Path, family: str, path: str, steps: int) -> Any:
    from semilens.config import (
        Config,
        FinetuneVLMConfig,
        LaunchConfig,
        LoraConfigSection,
        PathsConfig,
        PrepareVLMConfig,
        TinyVLMConfig,
        TrainerSection,
        VLMPretrainConfig,
    )

    return Config(
        paths=PathsConfig(
            models=work / "models",
            metrics=work / path / "metrics",
            logs=work / path / "logs",
            vqa=vqa,
            cache=work / path / "cache",
        ),
        prepare_vlm=PrepareVLMConfig(
            bases={family: "tiny"},
            tiny=TinyVLMConfig(),
            tiny_overrides={},  # every family at the small tiny size: the check is of code paths, not quality
            pretrain=VLMPretrainConfig(steps=20, batch_size=4, eval_samples=0),
        ),
        finetune_vlm=FinetuneVLMConfig(
            lora=LoraConfigSection(r=8, alpha=16, train_vision=True, modules_to_save=["lm_head", "embed_tokens"]),
            trainer=TrainerSection(**trainer_for(path, steps)),
        ),
        launch=LaunchConfig(processes=gpus(), accelerate_config=recipe(path)) if path in SHARDED else LaunchConfig(),
    )


def gpus() -> int:
    import torch

    return max(torch.cuda.device_count(), 1)


def recipe(path: str) -> str:
    return str(Path("presets") / "accelerate" / f"{path}.yaml")


def run_case(work: Path, vqa: Path, family: str, path: str, steps: int) -> dict[str, Any]:
    """One (family, path) in this process: fine-tune and report; never raises."""
    import torch

    row: dict[str, Any] = {"family": family, "path": path}
    if path == "unsloth" and importlib.util.find_spec("unsloth") is None:
        return {**row, "status": "skipped", "error": "unsloth is not installed (pip install -e '.[gpu]')"}
    if path == "zero3" and importlib.util.find_spec("deepspeed") is None:
        return {**row, "status": "skipped", "error": "deepspeed is not installed (pip install deepspeed)"}
    if path == "unsloth":
        import unsloth  # noqa: F401  (it must be imported before transformers builds the model)
    from semilens.vlm.finetune import finetune_vlm

    torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    try:
        summary = finetune_vlm(case_config(work, vqa, family, path, steps), family)
    except Exception as exc:  # the table reports it; the other cases go on
        return {
            **row,
            "status": "failed",
            "seconds": round(time.perf_counter() - start, 1),
            "error": f"{type(exc).__name__}: {exc}"[:300],
        }
    if "process" in summary:  # a secondary process of a sharded case: the first reports
        return {}
    return {
        **row,
        "status": "ok",
        "backend": summary.get("backend"),
        "bf16": summary.get("bf16"),
        "quantization": summary.get("quantization"),
        "processes": summary.get("processes"),
        "steps": summary.get("steps"),
        "first_loss": summary.get("first_loss"),
        "last_loss": summary.get("last_loss"),
        "seconds": round(time.perf_counter() - start, 1),
        "peak_gpu_mib": round(torch.cuda.max_memory_allocated() / 2**20),
    }


def build_bases(work: Path, vqa: Path, families: list[str]) -> None:
    """Each family's tiny base, built before any case imports unsloth."""
    from semilens.vlm.prepare import prepare_vlm

    for family in families:
        if not (work / "models" / family / "base" / "config.json").is_file():
            prepare_vlm(case_config(work, vqa, family, "bf16", 1), family)


def table(rows: list[dict[str, Any]]) -> str:
    cols = [
        "family",
        "path",
        "status",
        "processes",
        "steps",
        "first_loss",
        "last_loss",
        "seconds",
        "peak_gpu_mib",
        "error",
    ]
    lines = [" | ".join(cols), " | ".join("---" for _ in cols)]
    for r in rows:
        lines.append(" | ".join("" if r.get(c) is None else str(r.get(c)) for c in cols))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    from semilens.launch import free_port
    from semilens.vlm.families import FAMILIES

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--vqa", type=Path, default=Path("data/processed/vqa"), help="the VQA split folder (train.parquet)")
    ap.add_argument(
        "--work", type=Path, default=Path(".semilens_cache/gpu_check"), help="bases, adapters and checkpoints"
    )
    ap.add_argument("--out", type=Path, default=Path("metrics/gpu_check.json"), help="the table's rows as JSON")
    ap.add_argument("--families", nargs="+", default=sorted(FAMILIES), choices=sorted(FAMILIES))
    ap.add_argument("--paths", nargs="+", default=list(PATHS), choices=PATHS)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument(
        "--case", nargs=2, metavar=("FAMILY", "PATH"), help=argparse.SUPPRESS
    )  # one case, in a child process
    args = ap.parse_args(argv)

    import torch

    if not torch.cuda.is_available():
        print(
            "gpu_check: no CUDA device here; it checks the GPU-only paths (bf16, QLoRA, unsloth, FSDP, "
            "ZeRO-3) and runs nothing without one"
        )
        return 2
    if not (args.vqa / "train.parquet").is_file():
        print(f"gpu_check: {args.vqa / 'train.parquet'} not found; run `make run` first or give --vqa")
        return 2
    if args.case:
        row = run_case(args.work, args.vqa, args.case[0], args.case[1], args.steps)
        if row:
            print(json.dumps(row))
        return 0

    build_bases(args.work, args.vqa, args.families)
    rows = []
    for family in args.families:
        for path in args.paths:
            launcher = [sys.executable]
            if path in SHARDED:
                port = str(free_port())
                launcher += ["-m", "accelerate.commands.launch", "--config_file", recipe(path)]
                launcher += ["--num_processes", str(gpus()), "--main_process_port", port]
            cmd = [
                *launcher,
                "-m",
                "semilens.gpu_check",
                "--case",
                family,
                path,
                "--vqa",
                str(args.vqa),
                "--work",
                str(args.work),
                "--steps",
                str(args.steps),
            ]
            res = subprocess.run(cmd, capture_output=True, text=True)
            lines = [ln for ln in res.stdout.splitlines() if ln.startswith("{")]
            if res.returncode == 0 and lines:
                rows.append(json.loads(lines[-1]))
            else:
                tail = (res.stderr.strip().splitlines() or ["no output"])[-1]
                rows.append({"family": family, "path": path, "status": "crashed", "error": tail[:300]})
            print(f"{family} {path}: {rows[-1]['status']}", flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(
        json.dumps({"device": torch.cuda.get_device_name(0), "torch": torch.__version__, "rows": rows}, indent=2) + "\n"
    )
    print(table(rows))
    return 0 if all(r["status"] in ("ok", "skipped") for r in rows) else 1


if __name__ == "__main__":
    raise SystemExit(main())
