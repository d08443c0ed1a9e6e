"""Calculator-assisted decoding: the arithmetic of the worked answers, and the decoding loop."""

from __future__ import annotations

import re

import pytest
import torch

from semilens.llm.calculator import (
    evaluate,
    expression_before_equals,
    fill_in,
    fmt,
    generate_with_calculator,
    generate_with_calculator_batch,
)
from semilens.llm.evaluate import math_correct
from semilens.text.etch_math import GENERATORS, problems


def _replay(response: str) -> tuple[str, int, list[tuple[str, str, float]]]:
    """Rewrite a worked answer as calculator decoding would: after each '=', the calculator's
    value replaces the number written there. Returns (text, values filled, mismatches)."""
    parts = response.split("=")
    text, filled, wrong = parts[0], 0, []
    for part in parts[1:]:
        text += "="
        value = fill_in(text)
        written = re.match(r"\s*(-?\d+(?:\.\d+)?)", part)
        if value is not None and written:
            filled += 1
            ref = float(written.group(1))
            if abs(float(value) - ref) > 0.02 * max(abs(ref), 1e-9):
                wrong.append((expression_before_equals(text), value, ref))
            text += " " + value + part[written.end() :]
        else:
            text += part
    return text, filled, wrong


def test_the_calculator_reproduces_every_step_of_every_worked_answer():
    """Each '=' of the generated answers closes arithmetic whose value is the next number
    written (one '=' per computed value), so calculator decoding of a model that writes the
    reference's arithmetic ends on the reference's answer, for every kind of problem."""
    kinds = set()
    for p in problems(320, seed=11):
        text, filled, wrong = _replay(p.response)
        assert not wrong, (p.kind, wrong)
        assert filled >= 1, (p.kind, p.response)
        assert math_correct(text, {"value": p.answer, "unit": p.unit}, 0.02), (p.kind, text)
        kinds.add(p.kind)
    assert kinds == set(GENERATORS)


def test_every_number_a_worked_answer_writes_is_computed_or_copied():
    """After each '=' the number written is the calculator's (arithmetic before it) or one
    the question states or the answer already has (a max picked from the sites): never a value the model must work
    out in its head, like a conversion ("= 5.67 min = 340 s") or "30% of that = 1.7"."""
    for p in problems(320, seed=12):
        parts = p.response.split("=")
        text = parts[0]
        for part in parts[1:]:
            text += "="
            written = re.match(r"\s*(-?\d+(?:\.\d+)?)", part)
            # a value, not the first operand of more arithmetic ("= 1 - 6 / 210", "= 1170 nm / 0.75 min")
            operand = written and re.match(r"\s*(?:[^\W\d]\S*\s*)?(?:[-+*/x(]|\*\*)\s", part[written.end() :])
            if written and not operand:
                # copied from the question or from a value already worked out above
                copied = re.search(rf"(?<![\d.]){re.escape(written.group(1))}(?![\d])", p.question + text)
                assert fill_in(text) is not None or copied, (p.kind, text)
            text += part


def test_only_arithmetic_is_evaluated():
    assert evaluate("(1660 - 1455) nm / (30 s / 60 s/min)") == pytest.approx(410.0)
    assert evaluate(" 200 / (0.03 x 980) x ln(1 / (1 - 0.03 x 19.5))") == pytest.approx(5.9826, rel=1e-4)
    assert evaluate("(562.5 - 511.4) / (2 x 539.4) x 100%") == pytest.approx(4.737, rel=1e-3)
    assert evaluate("removed thickness / time") is None  # words, no numbers
    assert evaluate("ER(10%)") is None  # a lone number is a value, not a sum
    assert evaluate("__import__('os').system('true')") is None
    assert evaluate("(2 + 3") is None and evaluate("1 / 0") is None
    assert (
        expression_before_equals("Removed = 520 - 205 = 315 nm; time = 30 s / 60 s/min =").strip() == "30 s / 60 s/min"
    )
    assert [fmt(v) for v in (630.0, 0.5, 7.0930, 0.99166, 1234.6, 0.0123456)] == [
        "630",
        "0.5",
        "7.09",
        "0.992",
        "1235",
        "0.0123",
    ]


class _Scripted:
    """A causal LM stand-in that writes a fixed answer, honouring stop_strings=['='] the way
    transformers does (it stops after the token that completes '='). It proves the loop's
    bookkeeping: where the calculator writes, and that the model goes on after it."""

    def __init__(self, tokenizer, script: list[str]):
        self.tok, self.script = tokenizer, list(script)
        self.device = torch.device("cpu")
        self.generation_config = type("G", (), {"eos_token_id": tokenizer.eos_token_id})()
        self.prompts: list[str] = []

    def generate(self, input_ids, max_new_tokens, stop_strings, tokenizer, **_):
        self.prompts.append(tokenizer.decode(input_ids[0]))
        piece = self.script.pop(0) if self.script else ""
        ids = tokenizer(piece, add_special_tokens=False)["input_ids"][:max_new_tokens]
        if not piece.endswith("=") or not self.script:
            ids = ids + [tokenizer.eos_token_id]
        return torch.cat([input_ids, torch.tensor([ids], dtype=input_ids.dtype)], dim=1)


def test_the_decoding_loop_writes_the_value_after_each_equals_and_continues():
    from semilens.tokenizer import llama3_tokenizer

    tok = llama3_tokenizer(400)
    model = _Scripted(tok, ["Selectivity = ER_film / ER_mask =", " 630 / 214 =", " :1."])
    answer = generate_with_calculator(model, tok, "Q: ", max_new_tokens=64)
    assert answer == "Selectivity = ER_film / ER_mask = 630 / 214 = 2.94 :1."
    # the model was called again after the calculator wrote, with the value in its context
    assert model.prompts[-1].endswith("630 / 214 = 2.94")
    assert math_correct(answer, {"value": 2.94, "unit": ""}, 0.02)


class _ScriptedBatch:
    """The stand-in for a batch: each prompt has its own script; rows come left-padded and
    finished rows are padded to the longest, as transformers does."""

    def __init__(self, tokenizer, scripts: dict[str, list[str]]):
        self.tok, self.scripts = tokenizer, {k: list(v) for k, v in scripts.items()}
        self.device = torch.device("cpu")
        self.generation_config = type("G", (), {"eos_token_id": tokenizer.eos_token_id})()
        self.batches: list[int] = []

    def generate(self, input_ids, attention_mask, max_new_tokens, stop_strings, tokenizer, pad_token_id, **_):
        self.batches.append(len(input_ids))
        rows = []
        for ids, mask in zip(input_ids, attention_mask):
            text = tokenizer.decode(ids[mask.bool()])
            script = self.scripts[next(k for k in self.scripts if text.startswith(k))]
            piece = script.pop(0) if script else ""
            new = tokenizer(piece, add_special_tokens=False)["input_ids"]
            if not piece.endswith("=") or not script:
                new = new + [tokenizer.eos_token_id]
            rows.append(new[:max_new_tokens])
        width = max(len(r) for r in rows)
        new = torch.tensor([r + [pad_token_id] * (width - len(r)) for r in rows], dtype=input_ids.dtype)
        return torch.cat([input_ids, new], dim=1)


def test_the_batched_loop_gives_each_row_what_the_one_row_loop_gives():
    from semilens.tokenizer import llama3_tokenizer

    tok = llama3_tokenizer(400)
    scripts = {
        "A: ": ["Selectivity = ER_film / ER_mask =", " 630 / 214 =", " :1."],
        "B: ": ["rate = 410 nm/min."],  # no '=' to fill: one call
        "C: ": ["t = 500 nm / 250 nm/min =", " min, so x = 3 * 4 =", " in all."],
        "D: ": ["a very long answer that runs past its budget = 1 + 1 ="],
    }
    one_by_one = [
        generate_with_calculator(_Scripted(tok, scripts[p]), tok, p, max_new_tokens=12 if p == "D: " else 64)
        for p in scripts
    ]
    model = _ScriptedBatch(tok, scripts)
    side = tok.padding_side
    # D's small budget is checked with its own call: a batch shares one budget per row list
    batched = generate_with_calculator_batch(model, tok, ["A: ", "B: ", "C: "], max_new_tokens=64, batch_size=2)
    assert batched == one_by_one[:3]
    assert batched[0] == "Selectivity = ER_film / ER_mask = 630 / 214 = 2.94 :1."
    assert batched[2] == "t = 500 nm / 250 nm/min = 2 min, so x = 3 * 4 = 12 in all."
    assert model.batches[:2] == [2, 1]  # two rows, then the third; B finished in round one
    assert tok.padding_side == side  # left padding was the loop's own, then undone
    short = generate_with_calculator_batch(_ScriptedBatch(tok, {"D: ": scripts["D: "]}), tok, ["D: "], 12, batch_size=4)
    assert short == [one_by_one[3]]


def test_the_batched_loop_matches_one_row_at_a_time_on_a_real_model():
    """Real generate with left padding: the same greedy text per row as one at a time."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from semilens.tokenizer import llama3_tokenizer

    tok = llama3_tokenizer(400)
    torch.manual_seed(0)
    model = LlamaForCausalLM(
        LlamaConfig(
            vocab_size=len(tok),
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=1,
            num_attention_heads=2,
            num_key_value_heads=1,
            pad_token_id=tok.pad_token_id,
            eos_token_id=tok.eos_token_id,
        )
    ).eval()
    prompts = ["Etch rate = 300 nm / 2 min =", "What is the selectivity?", "x"]
    batched = generate_with_calculator_batch(model, tok, prompts, max_new_tokens=16, batch_size=3)
    assert batched == [generate_with_calculator(model, tok, p, max_new_tokens=16) for p in prompts]
