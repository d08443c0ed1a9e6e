"""answer_llm@<model> and evaluate_llm: every stage's text model on the benchmark split.

``answer_llm@<model>`` (one of base, pretrained, sft, gptq) reads that checkpoint under
``<paths.models>/llm/``, the benchmark split (and the train split's worked answers for
the base's few-shot baseline), and writes ``<paths.models>/llm/answers/<model>.json``: its
answers. ``evaluate_llm`` scores the four, beside the held-out perplexity ``pretrain_llm``
and ``quantize_llm`` measured, and writes ``metrics/llm.json`` (one row per model and
difficulty) and ``<paths.models>/llm/eval/predictions.jsonl`` (every answer beside its
reference); with a judge configured, also ``<paths.models>/llm/eval/judge.jsonl`` (every
judge reply). Run: ``python -m stages.answer_llm sft``, ``python -m stages.evaluate_llm``.

Scores: etching-maths exactness (the final number of the answer within a relative
tolerance, in the expected unit after conversion: 0.5 min equals 30 s; answered with the
calculator when ``calculator`` is on, else with the model's own digits), ROUGE-L and
BERTScore (the local MiniLM) against the reference answers, and held-out corpus
perplexity per model: overall, on the user's real documents and on the synthetic ones
apart. Maths is also tallied per kind and difficulty (``maths``), and the base model is
shown ``few_shot`` worked answers first as the baseline SFT has to beat (it also needs
the train split). Generation is greedy and batched. With ``evaluate_llm.judge`` set
(or SEMILENS_JUDGE_URL / SEMILENS_JUDGE_MODEL), an LLM judge on an OpenAI-compatible
server scores every answer on six expert criteria (see semilens.llm.judge).
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

from semilens.checkpoints import resolve_checkpoint
from semilens.config import Config
from semilens.io import read_json, reset_dir, write_json, write_jsonl
from semilens.llm.calculator import MAX_CALLS
from semilens.llm.decode import greedy_answers
from semilens.llm.judge import judge_report, resolve_judge
from semilens.llm.pretrain import heldout_texts, load_causal
from semilens.scores import caption_scores

MODELS = ("base", "pretrained", "sft", "gptq")
DIFFICULTIES = ("easy", "medium", "hard")

# unit spelling -> (canonical unit, factor): what etching answers are quoted in
MATH_UNITS: dict[str, tuple[str, float]] = {
    **{u: ("nm/min", 1.0) for u in ("nm/min", "nm min-1", "nm per minute")},
    **{u: ("nm/min", 60.0) for u in ("nm/s", "nm/sec", "nm per second")},
    **{u: ("nm/min", 0.1) for u in ("Å/min", "A/min", "angstrom/min")},
    # µ is written as the micro sign (U+00B5) or the Greek mu (U+03BC); both are seen
    **{u: ("nm/min", 1000.0) for u in ("µm/min", "μm/min", "um/min")},
    **{u: ("nm", 1.0) for u in ("nm", "nanometers", "nanometres")},
    **{u: ("nm", 1000.0) for u in ("µm", "μm", "um")},
    **{u: ("nm", 0.1) for u in ("Å", "angstrom", "angstroms")},
    **{u: ("s", 1.0) for u in ("s", "sec", "secs", "second", "seconds")},
    **{u: ("s", 0.001) for u in ("ms", "msec")},
    **{u: ("s", 60.0) for u in ("min", "mins", "minute", "minutes")},
    **{u: ("s", 3600.0) for u in ("h", "hour", "hours")},
    **{u: ("%", 1.0) for u in ("%", "percent")},
}
_UNIT_RE = "|".join(re.escape(u) for u in sorted(MATH_UNITS, key=len, reverse=True))
# a number may group thousands with commas ("1,250 nm"); "3,4" is two numbers, not one
_NUM_UNIT = re.compile(
    rf"(?<![\w.,])(-?(?:\d{{1,3}}(?:,\d{{3}})+|\d+)(?:\.\d+)?(?:e[+-]?\d+)?)\s*(?:({_UNIT_RE})(?![\w/]))?"
)


def final_quantity(text: str) -> tuple[float, str | None] | None:
    """The answer a worked response ends on: the first quantity after its last ``=``, or
    its last number if there is no ``=``; unit converted to the canonical one."""
    tail = text.rsplit("=", 1)[-1] if "=" in text else text
    found = list(_NUM_UNIT.finditer(tail))
    if not found:
        return None
    m = found[0] if "=" in text else found[-1]
    value, unit = float(m.group(1).replace(",", "")), m.group(2)
    if unit is None:
        return value, None
    canonical, factor = MATH_UNITS[unit]
    return value * factor, canonical


def math_correct(prediction: str, answer: dict[str, Any], rel_tol: float) -> bool:
    got = final_quantity(prediction)
    if got is None:
        return False
    expected_unit = MATH_UNITS[answer["unit"]][0] if answer["unit"] else None
    value, unit = got
    ref = float(answer["value"]) * (MATH_UNITS[answer["unit"]][1] if answer["unit"] else 1.0)
    if expected_unit is not None and unit not in (expected_unit, None):
        return False  # a number in the wrong dimension
    return abs(value - ref) <= rel_tol * max(abs(ref), 1e-12)


def chat_prompt(tokenizer: Any, question: str) -> str:
    """A single-turn question in the model's own chat template, ready for the answer."""
    return tokenizer.apply_chat_template(
        [{"role": "user", "content": question}], tokenize=False, add_generation_prompt=True
    )


def few_shot_prompt(tokenizer: Any, shots: list[dict[str, Any]], question: str) -> str:
    """``question`` after ``shots`` (instruction/response rows) as earlier chat turns."""
    turns: list[dict[str, str]] = []
    for shot in shots:
        turns += [{"role": "user", "content": shot["instruction"]}, {"role": "assistant", "content": shot["response"]}]
    turns.append({"role": "user", "content": question})
    return tokenizer.apply_chat_template(turns, tokenize=False, add_generation_prompt=True)


def shots_by_kind(train_rows: list[dict[str, Any]], n: int) -> dict[str, list[dict[str, Any]]]:
    """The first ``n`` worked maths answers of each kind in the train split."""
    shots: dict[str, list[dict[str, Any]]] = {}
    for r in train_rows:
        if r["category"] == "etch_math" and len(shots.setdefault(r["kind"], [])) < n:
            shots[r["kind"]].append(r)
    return shots


def maths_tally(rows: list[dict[str, Any]], key: str, rel_tol: float) -> dict[str, Any]:
    """Maths answers under ``key`` scored exact, overall and per kind and difficulty ("3/7")."""
    ok = [math_correct(r[key], json.loads(r["answer"]), rel_tol) for r in rows]
    tally: dict[str, Any] = {"correct": sum(ok), "n": len(rows)}
    for axis in ("kind", "difficulty"):
        counts: dict[str, list[int]] = {}
        for r, good in zip(rows, ok):
            c = counts.setdefault(str(r[axis]), [0, 0])
            c[0] += int(good)
            c[1] += 1
        tally[axis] = {k: f"{c[0]}/{c[1]}" for k, c in sorted(counts.items())}
    return tally


def generate(folder: Path, prompts: list[str], max_new_tokens: int, batch_size: int) -> list[str]:
    """Greedy answers to single-turn prompts with the checkpoint in ``folder``."""
    from transformers import AutoTokenizer

    return answer_batch(load_causal(folder), AutoTokenizer.from_pretrained(folder), prompts, max_new_tokens, batch_size)


def answer_batch(model: Any, tokenizer: Any, prompts: list[str], max_new_tokens: int, batch_size: int) -> list[str]:
    """Greedy answers to single-turn questions, up to ``batch_size`` rows per forward."""
    return greedy_answers(model, tokenizer, [chat_prompt(tokenizer, p) for p in prompts], max_new_tokens, batch_size)


def score_rows(rows: list[dict[str, Any]], rel_tol: float) -> dict[str, Any]:
    """Maths exactness, ROUGE-L and BERTScore of one model's answers on some rows.

    A maths row answered with the calculator (``prediction_calc``) counts there only:
    ``math_exact`` is the model's own arithmetic, None when no row was answered without it.
    """
    math = [r for r in rows if r["category"] == "etch_math"]
    exact = [
        math_correct(r["prediction"], json.loads(r["answer"]), rel_tol) for r in math if "prediction_calc" not in r
    ]
    with_calc = [
        math_correct(r["prediction_calc"], json.loads(r["answer"]), rel_tol) for r in math if "prediction_calc" in r
    ]
    text = caption_scores([r["prediction"] for r in rows], [r["response"] for r in rows]) if rows else {}
    return {
        "n": len(rows),
        "math_n": len(math),
        "math_exact": round(sum(exact) / len(exact), 4) if exact else None,
        "math_exact_calculator": round(sum(with_calc) / len(with_calc), 4) if with_calc else None,
        "rouge_l": None if not rows else round(text["rouge_l"], 4),
        "bertscore_f1": None if not rows else round(text["bertscore_f1"], 4),
    }


def benchmark_rows(cfg: Config) -> list[dict[str, Any]]:
    """The benchmark split's rows, the first ``evaluate_llm.max_rows`` when that is set."""
    import datasets

    bench = datasets.Dataset.from_parquet(str(Path(cfg.paths.instructions) / "benchmark.parquet"))
    if cfg.evaluate_llm.max_rows:
        bench = bench.select(range(min(cfg.evaluate_llm.max_rows, len(bench))))
    return [dict(r) for r in bench]


def answers_file(cfg: Config, name: str) -> Path:
    return Path(cfg.paths.models) / "llm" / "answers" / f"{name}.json"


def answer_llm(cfg: Config, name: str) -> dict[str, Any]:
    """One model's answers to the benchmark, written to
    ``<paths.models>/llm/answers/<name>.json`` for ``evaluate_llm`` to score.

    A stage per model (``answer_llm@<model>``) so each runs as soon as its model exists:
    the base's beside domain pretraining, the pretrained model's beside SFT, the SFT
    model's beside GPTQ. As one stage after GPTQ the four took about 11 minutes of one
    core at the end of the run's longest chain.
    """
    import datasets
    import torch
    from transformers import AutoTokenizer

    if name not in MODELS:
        raise ValueError(f"answer_llm: unknown model {name!r}; known: {', '.join(MODELS)}")
    ecfg = cfg.evaluate_llm
    torch.set_num_threads(ecfg.threads)
    rows = benchmark_rows(cfg)
    folder = resolve_checkpoint(Path(cfg.paths.models) / "llm" / name)
    # one load serves the plain answers and the calculator's
    tokenizer = AutoTokenizer.from_pretrained(folder)
    model = load_causal(folder, ecfg.cpu_dtype)
    # One decoding run answers everything: the prose, the maths (with the calculator when
    # it is on) and the base's few-shot maths share batches, so a batch stays full while
    # the answers of one kind end.
    jobs: list[tuple[str, tuple[str, ...], str, int, int]] = []  # id, keys, prompt, budget, calculator calls
    calls = MAX_CALLS if ecfg.calculator else 0
    for r in rows:
        prompt = chat_prompt(tokenizer, r["instruction"])
        if r["category"] != "etch_math":
            jobs.append((r["id"], ("prediction",), prompt, ecfg.max_new_tokens, 0))
        elif ecfg.calculator:
            # With the calculator the maths rows are answered with it only: a second, plain
            # answer to every maths row cost a third of the evaluation on SmolLM2, and the maths
            # bar is set with the calculator. Its answer is the model's text with the digits
            # after each "=" computed, so it is also what ROUGE-L and BERTScore read there.
            jobs.append((r["id"], ("prediction", "prediction_calc"), prompt, ecfg.maths_max_new_tokens, calls))
        else:
            jobs.append((r["id"], ("prediction",), prompt, ecfg.max_new_tokens, 0))
    maths = [r for r in rows if r["category"] == "etch_math"]
    shots_shown = bool(maths) and name == "base" and ecfg.few_shot and ecfg.calculator
    if shots_shown:
        # the untouched base shown worked answers: the baseline SFT has to beat
        train = datasets.Dataset.from_parquet(str(Path(cfg.paths.instructions) / "train.parquet"))
        shots = shots_by_kind([dict(r) for r in train], ecfg.few_shot)
        for r in maths:
            prompt = few_shot_prompt(tokenizer, shots.get(r["kind"], []), r["instruction"])
            jobs.append((r["id"], ("prediction_few_shot",), prompt, ecfg.maths_max_new_tokens, calls))
    replies = greedy_answers(
        model, tokenizer, [j[2] for j in jobs], [j[3] for j in jobs], ecfg.batch_size, [j[4] for j in jobs]
    )
    answers: dict[str, dict[str, str]] = {r["id"]: {} for r in rows}
    for (row_id, keys, *_), reply in zip(jobs, replies):
        for key in keys:
            answers[row_id][key] = reply
    record = {"model": name, "shots": ecfg.few_shot if shots_shown else 0, "answers": answers}
    write_json(answers_file(cfg, name), record)
    return {"model": name, "rows": len(answers)}


# Where each model's held-out perplexity was measured: by the stage that had it in memory
# (metrics file, key prefix), not a second pass here.
PERPLEXITY_SOURCES = {
    "base": ("llm/pretrain.json", "heldout_perplexity_before"),
    "pretrained": ("llm/pretrain.json", "heldout_perplexity_after"),
    "sft": ("quantize.json", "heldout_perplexity_unquantized"),
    "gptq": ("quantize.json", "heldout_perplexity_quantized"),
}


def measured_perplexity(cfg: Config, name: str) -> dict[str, Any]:
    """``name``'s held-out perplexity (all, real, synthetic) from the stage that measured it."""
    rel, key = PERPLEXITY_SOURCES[name]
    path = Path(cfg.paths.metrics) / rel
    if not path.is_file():
        raise ValueError(f"{path}: missing; the {name} model's held-out perplexity is measured there")
    m = read_json(path)
    return {"all": m[key], "real": m.get(f"{key}_real"), "synthetic": m.get(f"{key}_synthetic")}


def read_answers(cfg: Config, name: str, rows: list[dict[str, Any]]) -> dict[str, Any]:
    """``answer_llm@<name>``'s record, refused when it lacks a benchmark row (answers of
    another benchmark, or of a smaller ``max_rows``)."""
    path = answers_file(cfg, name)
    if not path.is_file():
        raise ValueError(f"{path}: no answers of the {name} model; run answer_llm@{name} first")
    record = read_json(path)
    missing = [r["id"] for r in rows if r["id"] not in record["answers"]]
    if missing:
        raise ValueError(
            f"{path}: no answer to {len(missing)} benchmark row(s) ({', '.join(missing[:3])}); "
            f"the answers are stale: run answer_llm@{name} again"
        )
    return record


def evaluate_llm(cfg: Config) -> dict[str, Any]:
    """Every model's answers (``answer_llm``) scored against the references, tallied per
    difficulty and maths kind, and judged when a judge is configured."""
    import torch

    ecfg = cfg.evaluate_llm
    judge_cfg = resolve_judge(ecfg.judge)  # a URL without a model fails here, before any work
    torch.set_num_threads(ecfg.threads)  # BERTScore's encoder
    rows = benchmark_rows(cfg)
    held = heldout_texts(cfg)  # counted per origin
    maths_report: dict[str, Any] = {}
    models_dir = Path(cfg.paths.models) / "llm"
    table: list[dict[str, Any]] = []
    predictions: list[dict[str, Any]] = []
    summary: dict[str, Any] = {}
    for name in MODELS:
        record = read_answers(cfg, name, rows)
        scored = [{**r, **record["answers"][r["id"]]} for r in rows]
        maths = [r for r in scored if "prediction_calc" in r]
        if maths:
            maths_report[name] = {"zero_shot": maths_tally(maths, "prediction_calc", ecfg.math_rel_tol)}
            if record["shots"]:  # set only where the few-shot answers were written
                maths_report[name]["few_shot"] = {
                    "shots": record["shots"],
                    **maths_tally(maths, "prediction_few_shot", ecfg.math_rel_tol),
                }
        ppl = measured_perplexity(cfg, name)
        for difficulty in (*DIFFICULTIES, "all"):
            subset = [r for r in scored if difficulty == "all" or r["difficulty"] == difficulty]
            table.append(
                {
                    "model": name,
                    "difficulty": difficulty,
                    **score_rows(subset, ecfg.math_rel_tol),
                    "heldout_perplexity": ppl["all"],
                    "heldout_perplexity_real": ppl["real"],
                    "heldout_perplexity_synthetic": ppl["synthetic"],
                }
            )
        predictions += [
            {
                "model": name,
                "id": r["id"],
                "difficulty": r["difficulty"],
                "category": r["category"],
                "instruction": r["instruction"],
                "reference": r["response"],
                "prediction": r["prediction"],
                **({"prediction_calculator": r["prediction_calc"]} if "prediction_calc" in r else {}),
                **({"prediction_few_shot": r["prediction_few_shot"]} if "prediction_few_shot" in r else {}),
            }
            for r in scored
        ]
        overall = table[-1]
        summary[name] = {
            "math_exact": overall["math_exact"],
            "math_exact_calculator": overall["math_exact_calculator"],
            "rouge_l": overall["rouge_l"],
            "heldout_perplexity": ppl["all"],
            "heldout_perplexity_real": ppl["real"],
        }
    out = reset_dir(models_dir / "eval")
    write_jsonl(out / "predictions.jsonl", predictions)
    # Without a judge the block says "configured": false rather than showing numbers
    # nobody measured; with one, the raw replies sit beside the predictions for audit.
    judge, judged = judge_report(predictions, judge_cfg, DIFFICULTIES, cache_root=cfg.paths.cache)
    if judged:
        write_jsonl(out / "judge.jsonl", judged)
    report = {
        "benchmark_rows": len(rows),
        "math_rel_tol": ecfg.math_rel_tol,
        "judge": judge,
        "rows": table,
        "maths": maths_report,
        "heldout_chunks": {origin: len(texts) for origin, texts in held.items()},
    }
    write_json(Path(cfg.paths.metrics) / "llm.json", report)
    return summary
