"""Calculator-assisted decoding: the arithmetic of the worked answers, and the decoding loop."""

from __future__ import annotations

import re

import pytest
import torch

from semilens.llm.calculator import (
    MAX_CALLS,
    evaluate,
    expression_before_equals,
    fill_in,
    fmt,
    generate_with_calculator,
    generate_with_calculator_batch,
)
from semilens.llm.decode import greedy_answers
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


class _Script:
    """A logits processor for the decoder that makes a model write a fixed answer: each
    row's script (chosen by how its prompt starts) is forced token by token. A step the
    calculator forces (one finite logit) is left alone and uses up no script token, so the
    script resumes after the calculator's value, as a model goes on after it."""

    def __init__(self, tok, scripts: dict[str, list[str]]):
        self.tok, self.scripts, self.state = tok, scripts, {}

    def __call__(self, histories, scores):
        for r, ids in enumerate(histories):
            state = self._state(ids)
            if state["want"] is not None and ids[-1] == state["want"]:
                state["at"] += 1
            if int(torch.isfinite(scores[r]).sum()) == 1:  # the calculator writes this step
                state["want"] = None
                continue
            state["want"] = state["script"][min(state["at"], len(state["script"]) - 1)]
            scores[r] = float("-inf")
            scores[r, state["want"]] = 0.0
        return scores

    def _state(self, ids):
        text = self.tok.decode(ids, skip_special_tokens=True)
        key = next(k for k in self.scripts if text.startswith(k))
        if key not in self.state:  # the first step of this prompt: its answer starts
            script = [t for p in self.scripts[key] for t in self.tok(p, add_special_tokens=False)["input_ids"]]
            self.state[key] = {"script": script + [self.tok.eos_token_id], "at": 0, "want": None}
        return self.state[key]


def _tiny_llama(tok):
    """A one-layer Llama over ``tok`` (random weights, seed 0)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(tok),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
        pad_token_id=tok.pad_token_id,
        eos_token_id=tok.eos_token_id,
    )
    return LlamaForCausalLM(config).eval()


def _scripted(tok, scripts, prompts, max_new_tokens, batch_size=1, max_calls=MAX_CALLS):
    """The decoder's answers when a real tiny Llama is made to write ``scripts``."""
    return greedy_answers(
        _tiny_llama(tok), tok, prompts, max_new_tokens, batch_size, max_calls, logits_processor=_Script(tok, scripts)
    )


SCRIPTS = {
    "A: ": ["Selectivity = ER_film / ER_mask =", " 630 / 214 =", " :1."],
    "B: ": ["rate = 410 nm/min."],  # no arithmetic before its '=': nothing filled
    "C: ": ["t = 500 nm / 250 nm/min =", " min, so x = 3 * 4 =", " in all."],
    "D: ": ["a very long answer that runs past its budget = 1 + 1 ="],
}


def test_the_calculator_writes_the_value_after_each_equals_and_the_model_goes_on():
    from semilens.tokenizer import llama3_tokenizer

    tok = llama3_tokenizer(400)
    answer = _scripted(tok, SCRIPTS, ["A: "], 64)[0]
    assert answer == "Selectivity = ER_film / ER_mask = 630 / 214 = 2.94 :1."
    assert math_correct(answer, {"value": 2.94, "unit": ""}, 0.02)
    # the same script without the calculator: the model's own (scripted) text, no value
    plain = _scripted(tok, SCRIPTS, ["A: "], 64, max_calls=0)[0]
    assert plain == "Selectivity = ER_film / ER_mask = 630 / 214 = :1."
    two = _scripted(tok, SCRIPTS, ["C: "], 64)[0]
    assert two == "t = 500 nm / 250 nm/min = 2 min, so x = 3 * 4 = 12 in all."
    # a row's budget counts the calculator's tokens too: D is cut
    short = _scripted(tok, SCRIPTS, ["D: "], 12)[0]
    assert len(tok(short, add_special_tokens=False)["input_ids"]) <= 12


def test_the_calculator_stops_after_max_calls():
    from semilens.tokenizer import llama3_tokenizer

    tok = llama3_tokenizer(400)
    answer = _scripted(tok, SCRIPTS, ["C: "], 64, max_calls=1)[0]
    assert answer == "t = 500 nm / 250 nm/min = 2 min, so x = 3 * 4 = in all."


def test_batched_rows_get_what_each_gets_alone():
    from semilens.tokenizer import llama3_tokenizer

    tok = llama3_tokenizer(400)
    prompts = ["A: ", "B: ", "C: ", "D: "]
    alone = [_scripted(tok, SCRIPTS, [p], 64)[0] for p in prompts]
    batched = _scripted(tok, SCRIPTS, prompts, 64, batch_size=2)
    assert batched == alone
    assert batched[1] == "rate = 410 nm/min."


def test_the_batched_loop_matches_one_row_at_a_time_on_a_real_model():
    """Real generate with left padding: the same greedy text per row as one at a time."""
    from semilens.tokenizer import llama3_tokenizer

    tok = llama3_tokenizer(400)
    model = _tiny_llama(tok)
    prompts = ["Etch rate = 300 nm / 2 min =", "What is the selectivity?", "x"]
    batched = generate_with_calculator_batch(model, tok, prompts, max_new_tokens=16, batch_size=3)
    assert batched == [generate_with_calculator(model, tok, p, max_new_tokens=16) for p in prompts]
