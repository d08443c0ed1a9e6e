"""`answer_llm`'s decoder beside plain ``transformers`` ``generate``, on the pipeline's own
text checkpoints and benchmark.

For each model (base, pretrained, sft, gptq) both answer the same benchmark questions
the stage answers (the prose, the etching maths with the calculator, and for the base its
few-shot maths), greedily, in the stage's dtype and threads:

- ``generate``: what ``answer_llm`` did before its own decoder, and what a user would
  write: left-padded batches of 16 per kind of question, one ``model.generate`` call per
  batch, the calculator as a logits processor that forces its value's tokens;
- ``answer_llm``: the stage's own function (``semilens.llm.decode``: finished rows leave
  the batch, batches refill, every kind of question shares them, grouped attention
  without copied key and value heads, a key-value cache that grows in place), at
  ``evaluate_llm.batch_size``.

Reported per model and in total: seconds (model loading left out), the speed-up, how
many answers are identical, and the benchmark scores computed from each side's answers
(``score_rows``: maths exactness, ROUGE-L, BERTScore), which must be equal.

Writes ``metrics/bench_answer_decoding.json`` (``--out``). Run from a project root after
``make run`` (it reads ``models/llm`` and the instruction splits), on an otherwise idle
machine: ``.venv/bin/python benchmarks/answer_decoding.py [--root .] [--models sft]``
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]


class CalculatorProcessor:
    """The calculator inside one ``generate`` call: a logits processor that, when a row's
    answer ends in ``=`` after arithmetic, forces the value's tokens one a step (the rule
    of ``semilens.llm.decode``, applied to ``generate``'s rows)."""

    def __init__(self, tokenizer: Any, prompt_len: int, rows: int, max_calls: int):
        from semilens.llm.decode import _Calculator, _Row

        self.calculator, self.prompt_len = _Calculator(tokenizer), prompt_len
        self.rows = [_Row(i, budget=0, max_calls=max_calls) for i in range(rows)]

    def __call__(self, input_ids: Any, scores: Any) -> Any:
        if input_ids.shape[1] <= self.prompt_len:
            return scores
        for i, row in enumerate(self.rows):
            row.tokens = input_ids[i, self.prompt_len :].tolist()
            self.calculator.queue(row)
            if row.forced:
                scores[i] = float("-inf")
                scores[i, row.forced.pop(0)] = 0.0
        return scores


def generate_answers(
    model: Any, tokenizer: Any, prompts: list[str], max_new_tokens: int, calls: int, batch: int
) -> list[str]:
    """Left-padded batches, one ``generate`` each (with the calculator when ``calls``)."""
    import torch
    from transformers import LogitsProcessorList

    from semilens.llm.decode import end_ids

    tokenizer.padding_side = "left"
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    out: list[str] = []
    for i in range(0, len(prompts), batch):
        enc = tokenizer(prompts[i : i + batch], return_tensors="pt", padding=True, add_special_tokens=False)
        width = enc["input_ids"].shape[1]
        processors = LogitsProcessorList(
            [CalculatorProcessor(tokenizer, width, enc["input_ids"].shape[0], calls)] if calls else []
        )
        with torch.no_grad():
            gen = model.generate(
                **enc,
                max_new_tokens=max_new_tokens,
                do_sample=False,
                logits_processor=processors,
                pad_token_id=pad,
                eos_token_id=sorted(end_ids(model, tokenizer)),
            )
        out += [t.strip() for t in tokenizer.batch_decode(gen[:, width:], skip_special_tokens=True)]
    return out


def one_model(cfg: Any, root: Path, name: str, batch: int) -> dict[str, Any]:
    import datasets
    import torch
    from transformers import AutoTokenizer

    from semilens.checkpoints import resolve_checkpoint
    from semilens.llm import evaluate as ev
    from semilens.llm.calculator import MAX_CALLS
    from semilens.llm.pretrain import load_causal

    ecfg = cfg.evaluate_llm
    torch.set_num_threads(ecfg.threads)
    rows = ev.benchmark_rows(cfg)
    folder = resolve_checkpoint(root / cfg.paths.models / "llm" / name)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    model = load_causal(folder, ecfg.cpu_dtype)

    # generate: one call per kind, as answer_llm was
    calls = MAX_CALLS if ecfg.calculator else 0
    prose = [r for r in rows if not (ecfg.calculator and r["category"] == "etch_math")]
    maths = [r for r in rows if ecfg.calculator and r["category"] == "etch_math"]
    start = time.perf_counter()
    plain: dict[str, dict[str, str]] = {r["id"]: {} for r in rows}
    texts = [ev.chat_prompt(tokenizer, r["instruction"]) for r in prose]
    for r, a in zip(prose, generate_answers(model, tokenizer, texts, ecfg.max_new_tokens, 0, batch)):
        plain[r["id"]]["prediction"] = a
    texts = [ev.chat_prompt(tokenizer, r["instruction"]) for r in maths]
    for r, a in zip(maths, generate_answers(model, tokenizer, texts, ecfg.maths_max_new_tokens, calls, batch)):
        plain[r["id"]].update(prediction=a, prediction_calc=a)
    if maths and name == "base" and ecfg.few_shot:
        train = datasets.Dataset.from_parquet(str(root / cfg.paths.instructions / "train.parquet"))
        shots = ev.shots_by_kind([dict(r) for r in train], ecfg.few_shot)
        texts = [ev.few_shot_prompt(tokenizer, shots.get(r["kind"], []), r["instruction"]) for r in maths]
        for r, a in zip(maths, generate_answers(model, tokenizer, texts, ecfg.maths_max_new_tokens, calls, batch)):
            plain[r["id"]]["prediction_few_shot"] = a
    generate_s = time.perf_counter() - start
    del model

    # answer_llm: the stage's own function, writing to its own file under the root
    start = time.perf_counter()
    ev.answer_llm(cfg, name)
    stage_s = time.perf_counter() - start
    own = json.loads(ev.answers_file(cfg, name).read_text())["answers"]

    pairs = [(plain[r["id"]][k], own[r["id"]].get(k)) for r in rows for k in plain[r["id"]]]
    return {
        "generate_s": round(generate_s, 1),
        "answer_llm_s": round(stage_s, 1),
        "speedup": round(generate_s / stage_s, 2),
        "answers": len(pairs),
        "identical": sum(a == b for a, b in pairs),
        "scores_generate": ev.score_rows([{**r, **plain[r["id"]]} for r in rows], ecfg.math_rel_tol),
        "scores_answer_llm": ev.score_rows([{**r, **own[r["id"]]} for r in rows], ecfg.math_rel_tol),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--root", type=Path, default=ROOT, help="a project root after make run")
    parser.add_argument("--models", nargs="+", default=["base", "pretrained", "sft", "gptq"])
    parser.add_argument("--generate-batch", type=int, default=16, help="rows per generate call")
    parser.add_argument("--out", type=Path, default=ROOT / "metrics" / "bench_answer_decoding.json")
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.chdir(args.root)  # the config's paths are relative to the project root
    from semilens.config import load_config
    from semilens.io import write_json

    cfg = load_config(args.root / "params.yaml")
    scratch = args.root / "models" / "bench_answer_decoding"
    # the stage writes its answers under paths.models; here, beside the real ones
    cfg = cfg.model_copy(update={"paths": cfg.paths.model_copy(update={"models": str(scratch)})})
    (scratch / "llm").mkdir(parents=True, exist_ok=True)
    for name in args.models:  # the checkpoints stay where make run put them
        link = scratch / "llm" / name
        if not link.exists():
            link.symlink_to((args.root / "models" / "llm" / name).resolve())
    results = {}
    for name in args.models:
        results[name] = one_model(cfg, Path("."), name, args.generate_batch)
        print(name, json.dumps({k: v for k, v in results[name].items() if not k.startswith("scores")}), flush=True)
    total_g = sum(r["generate_s"] for r in results.values())
    total_s = sum(r["answer_llm_s"] for r in results.values())
    summary = {
        "threads": cfg.evaluate_llm.threads,
        "dtype": cfg.evaluate_llm.cpu_dtype,
        "generate_batch": args.generate_batch,
        "answer_llm_batch": cfg.evaluate_llm.batch_size,
        "generate_s": round(total_g, 1),
        "answer_llm_s": round(total_s, 1),
        "speedup": round(total_g / total_s, 2),
        "identical": f"{sum(r['identical'] for r in results.values())}/{sum(r['answers'] for r in results.values())}",
        "scores_equal": all(r["scores_generate"] == r["scores_answer_llm"] for r in results.values()),
        "models": results,
    }
    write_json(args.out, summary)
    print(json.dumps({k: v for k, v in summary.items() if k != "models"}))


if __name__ == "__main__":
    main()
