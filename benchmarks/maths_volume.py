"""How much etching maths the tiny Llama-3 preset needs before it copies numbers right.

The pipeline's SFT model writes the right formulas but the wrong numbers. This measures
whether the architecture can copy a question's numbers into a worked answer at all: a
fresh tiny preset (the same tokenizer and sizes as ``prepare_llm.tiny``) is trained in full
on generated etching-maths problems only, loss on the answers, then answers held-out
problems with calculator-assisted decoding and is scored as ``evaluate_llm`` scores them.
``--induction-steps`` first trains on spans of digits and letters shown twice (the task
that forms induction heads), to see whether copying needs that first.

    python benchmarks/maths_volume.py --steps 1000 --problems 3000 --test 40
    python benchmarks/maths_volume.py --steps 500 --tiny '{"layers": 4}' --out metrics/bench_maths_volume_l4.json

``--tiny`` changes the preset's sizes (``prepare_llm.tiny`` fields, as JSON) and ``--batch``
the batch, to compare architectures at equal data. It writes ``--out``
(``metrics/bench_maths_volume.json`` by default): exact answers, the losses, the time taken.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from pydantic import ValidationError

from semilens.config import EvaluateLLMConfig, TinyLLMConfig, validation_problems
from semilens.llm.calculator import generate_with_calculator
from semilens.llm.evaluate import chat_prompt, math_correct
from semilens.llm.prepare import build_tiny
from semilens.text.etch_math import Problem, problems

SYMBOLS = "0123456789abcdefghijklmnopqrstuvwxyz"


def train(model: Any, steps: int, batch: Callable[[], tuple[Any, Any]], lr: float, cosine: bool) -> list[float]:
    """AdamW with 20 warm-up steps, then constant or cosine; returns the loss every 50 steps."""
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01)
    losses = []
    model.train()
    for step in range(steps):
        decay = 0.5 * (1 + math.cos(math.pi * step / steps)) if cosine else 1.0
        for group in opt.param_groups:
            group["lr"] = lr * min(1.0, (step + 1) / 20) * decay
        ids, labels = batch()
        loss = model(input_ids=ids, labels=labels).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad()
        if (step + 1) % 50 == 0:
            losses.append(round(loss.item(), 4))
    return losses


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=1000, help="maths training steps")
    ap.add_argument("--batch", type=int, default=16, help="problems per step")
    ap.add_argument("--tiny", type=json.loads, default={}, help='preset sizes to change, as JSON: {"layers": 4}')
    ap.add_argument("--problems", type=int, default=3000, help="distinct training problems")
    ap.add_argument("--induction-steps", type=int, default=0, help="copying-task steps first (batches of 32)")
    ap.add_argument("--test", type=int, default=40, help="held-out problems (every kind in turn)")
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default="metrics/bench_maths_volume.json")
    args = ap.parse_args()
    for name in ("steps", "batch", "problems", "test"):
        if getattr(args, name) < 1:
            ap.error(f"--{name} must be at least 1")
    if args.induction_steps < 0:
        ap.error("--induction-steps must be 0 or more")
    scoring = EvaluateLLMConfig()  # evaluate_llm's own tolerance and answer length

    torch.set_num_threads(1)
    torch.manual_seed(args.seed)
    rng = random.Random(args.seed)
    try:
        tiny = TinyLLMConfig(**args.tiny)
    except ValidationError as e:
        ap.error(f"--tiny: {validation_problems(e)}")
    except TypeError:
        ap.error('--tiny: a JSON object of preset sizes, e.g. {"layers": 4}')
    model, tok = build_tiny(tiny, args.seed)
    symbols = [tok.convert_tokens_to_ids(c) for c in SYMBOLS]
    train_set, test_set = problems(args.problems, 1), problems(args.test, 99)
    assert not {p.question for p in train_set} & {p.question for p in test_set}, "held-out problems seen in training"

    def copy_batch() -> tuple[Any, Any]:
        rows = []
        for _ in range(32):
            row = [tok.bos_token_id]
            while len(row) < 64:
                span = [rng.choice(symbols) for _ in range(rng.randint(4, 12))]
                row += span + [rng.choice(symbols) for _ in range(rng.randint(0, 6))] + span
            rows.append(row[:64])
        ids = torch.tensor(rows)
        return ids, ids

    def encode(p: Problem) -> tuple[list[int], list[int]]:
        prompt = tok(chat_prompt(tok, p.question), add_special_tokens=False)["input_ids"]
        answer = tok(p.response + tok.eos_token, add_special_tokens=False)["input_ids"]
        return prompt + answer, [-100] * len(prompt) + answer

    def maths_batch() -> tuple[Any, Any]:
        rows = [encode(rng.choice(train_set)) for _ in range(args.batch)]
        width = max(len(ids) for ids, _ in rows)
        ids = torch.tensor([ids + [tok.pad_token_id] * (width - len(ids)) for ids, _ in rows])
        labels = torch.tensor([lab + [-100] * (width - len(lab)) for _, lab in rows])
        return ids, labels

    t0 = time.perf_counter()
    copy_losses = train(model, args.induction_steps, copy_batch, 3e-3, cosine=False) if args.induction_steps else []
    maths_losses = train(model, args.steps, maths_batch, args.lr, cosine=True)
    train_s = time.perf_counter() - t0
    model.eval()
    answers = []
    for p in test_set:
        out = generate_with_calculator(model, tok, chat_prompt(tok, p.question), scoring.max_new_tokens)
        answers.append(
            {
                "kind": p.kind,
                "exact": math_correct(out, {"value": p.answer, "unit": p.unit}, scoring.math_rel_tol),
                "answer": out,
                "reference": p.response,
            }
        )
    per_kind: dict[str, list[int]] = {}
    for a in answers:
        per_kind.setdefault(a["kind"], []).append(int(a["exact"]))
    result = {
        "args": vars(args),
        "parameters": sum(p.numel() for p in model.parameters()),
        "exact": sum(a["exact"] for a in answers),
        "n_test": len(answers),
        "exact_per_kind": {k: f"{sum(v)}/{len(v)}" for k, v in per_kind.items()},
        "train_seconds": round(train_s, 1),
        "maths_loss_every_50": maths_losses,
        "copy_loss_every_50": copy_losses,
        "answers": answers,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps({k: result[k] for k in ("exact", "n_test", "exact_per_kind", "train_seconds")}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
