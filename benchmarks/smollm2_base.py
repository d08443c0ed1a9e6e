"""Measure the text-model stages on the SmolLM2-135M-Instruct base (issue 28, part 5).

Runs one stage's library function per call, in its own process, so the peak memory
reported is that stage's alone; prints one JSON line: wall seconds and peak RSS.
The inputs are a finished run's ``chunks.jsonl`` and instruction splits (``--data``,
with ``markdown/`` and ``instructions/`` under it); everything written goes under
``--out``. Steps can be cut (``--steps``) to time a few and extrapolate: the training
stages' cost is linear in steps.

    python benchmarks/smollm2_base.py prepare --data D --out O
    python benchmarks/smollm2_base.py pretrain --data D --out O --steps 4
    python benchmarks/smollm2_base.py maths --data D --out O     # base zero-/few-shot, calculator
    python benchmarks/smollm2_base.py maths --data D --out O --model sft

``maths`` scores the untouched base on the benchmark's etching-maths rows with the
calculator, zero-shot and few-shot (two worked answers of the same kind from the train
split as earlier chat turns), per kind and difficulty.
"""

from __future__ import annotations

import argparse
import json
import resource
import time
from pathlib import Path
from typing import Any

import yaml

from semilens.config import Config, validate_config


def config(data: Path, out: Path, steps: int | None, threads: int, extra: dict[str, Any]) -> Config:
    raw = yaml.safe_load(Path("params.yaml").read_text())
    raw["paths"].update(
        markdown=str(data / "markdown"),
        instructions=str(data / "instructions"),
        models=str(out / "models"),
        metrics=str(out / "metrics"),
        cache=str(out / "cache"),
        logs=str(out / "logs"),
    )
    raw["prepare_llm"]["base"] = "smollm2-135m-instruct"  # the default, and what this benchmark is about
    for section in ("pretrain_llm", "sft_llm", "quantize_llm", "evaluate_llm"):
        raw[section]["threads"] = threads
    if steps:
        for section in ("pretrain_llm", "sft_llm"):
            raw[section].update(max_steps=steps, save_steps=max(steps, 1), logging_steps=1, warmup_steps=0)
    for key, value in extra.items():
        section, name = key.split(".", 1)
        raw[section][name] = yaml.safe_load(value)
    return validate_config(raw, "benchmark overrides")


def maths(
    cfg: Config, folder: Path, shots_n: int, modes: tuple[str, ...] = ("zero_shot", "few_shot")
) -> dict[str, Any]:
    import datasets
    import torch
    from transformers import AutoTokenizer

    from semilens.llm.calculator import generate_with_calculator_batch
    from semilens.llm.evaluate import few_shot_prompt, math_correct, maths_tally, shots_by_kind
    from semilens.llm.pretrain import load_causal

    ecfg = cfg.evaluate_llm
    torch.set_num_threads(ecfg.threads)
    inst = Path(cfg.paths.instructions)
    bench = [r for r in datasets.Dataset.from_parquet(str(inst / "benchmark.parquet")) if r["category"] == "etch_math"]
    shots = shots_by_kind([dict(r) for r in datasets.Dataset.from_parquet(str(inst / "train.parquet"))], shots_n)
    tokenizer, model = AutoTokenizer.from_pretrained(folder), load_causal(folder)
    tokenizer.padding_side = "left"
    result: dict[str, Any] = {"n": len(bench)}
    for mode in modes:
        t0 = time.perf_counter()
        prompts = [
            few_shot_prompt(tokenizer, shots.get(r["kind"], []) if mode == "few_shot" else [], r["instruction"])
            for r in bench
        ]
        answers = generate_with_calculator_batch(model, tokenizer, prompts, ecfg.maths_max_new_tokens, ecfg.batch_size)
        scored = [{**r, "prediction": a} for r, a in zip(bench, answers)]
        result[mode] = {
            **maths_tally(scored, "prediction", ecfg.math_rel_tol),
            "seconds": round(time.perf_counter() - t0, 1),
            "examples": [
                {
                    "kind": r["kind"],
                    "ok": math_correct(r["prediction"], json.loads(r["answer"]), ecfg.math_rel_tol),
                    "answer": r["prediction"][:300],
                }
                for r in scored[:4]
            ],
        }
    return result


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("stage", choices=["prepare", "pretrain", "sft", "quantize", "evaluate", "maths"])
    ap.add_argument("--data", type=Path, required=True)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--steps", type=int, default=None, help="cut both training stages to this many steps")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--shots", type=int, default=2)
    ap.add_argument(
        "--model", default="base", help="maths: the folder under <out>/models/llm to score (base, sft, ...)"
    )
    ap.add_argument("--modes", default="zero_shot,few_shot", help="maths: which of zero_shot, few_shot")
    ap.add_argument("--set", nargs="*", default=[], help="section.key=value overrides")
    args = ap.parse_args()
    cfg = config(args.data, args.out, args.steps, args.threads, dict(s.split("=", 1) for s in args.set))
    t0 = time.perf_counter()
    if args.stage == "prepare":
        from semilens.llm.prepare import prepare_llm as run
    elif args.stage == "pretrain":
        from semilens.llm.pretrain import pretrain_llm as run
    elif args.stage == "sft":
        from semilens.llm.sft import sft_llm as run
    elif args.stage == "quantize":
        from semilens.llm.quantize import quantize_llm as run
    elif args.stage == "evaluate":
        from semilens.llm.evaluate import MODELS, answer_llm, evaluate_llm

        def run(c: Config) -> dict[str, Any]:
            for name in MODELS:
                answer_llm(c, name)
            return evaluate_llm(c)
    else:

        def run(c: Config) -> dict[str, Any]:
            return maths(c, Path(c.paths.models) / "llm" / args.model, args.shots, tuple(args.modes.split(",")))

    summary = run(cfg)
    peak_gb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2
    print(
        json.dumps(
            {
                "stage": args.stage,
                "wall_s": round(time.perf_counter() - t0, 1),
                "peak_rss_gb": round(peak_gb, 2),
                "threads": args.threads,
                "steps": args.steps,
                "summary": summary,
            },
            default=str,
        )
    )


if __name__ == "__main__":
    main()
