"""Calculator-assisted decoding: the model writes the arithmetic, a calculator does it.

The worked answers the model is trained on spell every step out as
``<expression> = <value>``: ``(1660 - 1455) nm / (30 s / 60 s/min) = 205 nm / 0.5 min = 410 nm/min``.
At inference, each time the model writes ``=`` after an arithmetic expression, the
expression is evaluated (units dropped, ``x`` read as multiplication, ``%`` dropped) and the
value is written in for it; the model then goes on from there. This is the calculator
annotation of Cobbe et al. (2021, GSM8K): choosing the formula and reading the right
numbers out of the question stays the model's job, only the digits are not. Evaluation
reports maths exactness with and without it, side by side.

Only +, -, *, /, ** on numbers, parentheses and ln/log10/exp/sqrt are evaluated (an AST
whitelist, never ``eval`` on model text); anything else leaves the text as the model wrote it.
"""

from __future__ import annotations

import ast
import math
import re
from typing import Any

FUNCTIONS = {"ln": math.log, "log": math.log10, "log10": math.log10, "exp": math.exp, "sqrt": math.sqrt}
_OPS = {
    ast.Add: lambda a, b: a + b,
    ast.Sub: lambda a, b: a - b,
    ast.Mult: lambda a, b: a * b,
    ast.Div: lambda a, b: a / b,
    ast.Pow: lambda a, b: a**b,
}
# A clause ends at these: the expression of an "=" starts after the last of them.
_CLAUSE_END = re.compile(r"(?:=|:|;|,|\n|\.\s|\bso\b|\bthen\b|\band\b)")
_WORD = re.compile(r"[A-Za-zµÅ_][\w/µÅ^-]*")


def _value(node: ast.AST) -> float:
    if isinstance(node, ast.Expression):
        return _value(node.body)
    if isinstance(node, ast.Constant) and isinstance(node.value, (int, float)) and not isinstance(node.value, bool):
        return float(node.value)
    if isinstance(node, ast.BinOp) and type(node.op) in _OPS:
        return _OPS[type(node.op)](_value(node.left), _value(node.right))
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, (ast.USub, ast.UAdd)):
        v = _value(node.operand)
        return -v if isinstance(node.op, ast.USub) else v
    if (
        isinstance(node, ast.Call)
        and isinstance(node.func, ast.Name)
        and node.func.id in FUNCTIONS
        and len(node.args) == 1
        and not node.keywords
    ):
        return FUNCTIONS[node.func.id](_value(node.args[0]))
    raise ValueError("not arithmetic")


def to_python(expression: str) -> str | None:
    """Worked-answer arithmetic -> a Python expression, or None if it is not arithmetic."""
    expr = expression.replace("×", " x ").replace("·", " * ").replace("−", "-")
    expr = re.sub(r"(?<=[\d)\s])x(?=[\s(\d])", "*", expr)  # "2 x 539.4" -> "2 * 539.4"
    expr = expr.replace("%", " ")
    expr = _WORD.sub(lambda m: m.group(0) if m.group(0) in FUNCTIONS else " ", expr)
    expr = re.sub(r"\s+", " ", expr).strip()
    # An operator between two operands, or a function: a lone number is a value, not a sum.
    if not re.search(r"[\d)]\s*[-+*/^]\s*[\d(.lsea]|\b(?:ln|log|log10|exp|sqrt)\(", expr):
        return None
    return expr.replace("^", "**")


def evaluate(expression: str) -> float | None:
    """The value of the arithmetic in ``expression`` (units and words dropped), or None."""
    py = to_python(expression)
    if py is None:
        return None
    try:
        value = _value(ast.parse(py, mode="eval"))
    except (SyntaxError, ValueError, ZeroDivisionError, OverflowError, TypeError, RecursionError):
        return None
    return value if math.isfinite(value) else None


def expression_before_equals(text: str) -> str:
    """The clause a trailing ``=`` closes: from the end of the previous clause to the ``=``."""
    body = text.rstrip()
    body = body[:-1] if body.endswith("=") else body
    starts = [m.end() for m in _CLAUSE_END.finditer(body)]
    return body[starts[-1] :] if starts else body


def fmt(value: float) -> str:
    """Three significant figures, as the worked answers quote them (no exponent notation)."""
    if value == 0:
        return "0"
    digits = max(0, 2 - int(math.floor(math.log10(abs(value)))))
    text = f"{round(value, digits):.{digits}f}"
    return text.rstrip("0").rstrip(".") if "." in text else text


def fill_in(text: str) -> str | None:
    """Text ending in ``=`` -> the value to write after it, or None to leave the model alone."""
    value = evaluate(expression_before_equals(text))
    return None if value is None else fmt(value)


def generate_with_calculator(
    model: Any, tokenizer: Any, prompt_text: str, max_new_tokens: int, max_calls: int = 12
) -> str:
    """Greedy generation that stops at each ``=`` and lets the calculator write the value.

    ``prompt_text`` is the chat-formatted prompt; the return value is the answer alone.
    """
    import torch

    answer = ""
    budget = max_new_tokens
    for _ in range(max_calls + 1):
        enc = tokenizer(prompt_text + answer, return_tensors="pt", add_special_tokens=False).to(model.device)
        with torch.no_grad():
            gen = model.generate(
                **enc,
                max_new_tokens=budget,
                do_sample=False,
                stop_strings=["="],
                tokenizer=tokenizer,
                pad_token_id=tokenizer.pad_token_id,
                eos_token_id=model.generation_config.eos_token_id or tokenizer.eos_token_id,
            )
        new = gen[0, enc["input_ids"].shape[1] :].tolist()
        budget -= len(new)
        answer, writing = _continue(answer, new, tokenizer, _eos_ids(model, tokenizer), budget)
        if not writing:
            break
    return answer.strip()


def _continue(answer: str, new: list[int], tokenizer: Any, eos: set[int], budget: int) -> tuple[str, bool]:
    """One generate call's tokens appended to ``answer``; if they stopped at an "=" with
    budget left, the calculator's value written after it. Returns the answer and whether
    the model goes on writing."""
    piece = tokenizer.decode(new, skip_special_tokens=True)
    answer += piece
    ended = len(new) == 0 or new[-1] in eos
    if ended or budget <= 0 or "=" not in piece:
        return answer, False
    # the stop may fall inside a token ("= (" as one token): cut back to the "="
    answer = answer[: answer.rindex("=") + 1]
    value = fill_in(answer)
    return (answer if value is None else answer.rstrip() + " " + value), True


def generate_with_calculator_batch(
    model: Any, tokenizer: Any, prompt_texts: list[str], max_new_tokens: int, batch_size: int, max_calls: int = 12
) -> list[str]:
    """``generate_with_calculator`` for many prompts: each round, the rows still writing go
    through ``generate`` together (left-padded), each row with its own token budget.

    The rows' text and budgets follow the one-row loop (the same ``_continue``); only the batching differs
    (one row at a time took 66 s of the text evaluation for 72 maths questions). A row that
    stops at "=" is padded to the longest row's end, so its own tokens end at the first pad;
    with no pad token distinct from end-of-sequence that end cannot be told apart from a
    finished answer, and the rows go one at a time.
    """
    import torch

    eos = _eos_ids(model, tokenizer)
    pad = tokenizer.pad_token_id
    if pad is None or pad in eos:
        return [generate_with_calculator(model, tokenizer, p, max_new_tokens, max_calls) for p in prompt_texts]
    side, tokenizer.padding_side = tokenizer.padding_side, "left"
    answers = [""] * len(prompt_texts)
    budgets = [max_new_tokens] * len(prompt_texts)
    writing = list(range(len(prompt_texts)))
    try:
        for _ in range(max_calls + 1):
            still: list[int] = []
            for start in range(0, len(writing), batch_size):
                rows = writing[start : start + batch_size]
                enc = tokenizer(
                    [prompt_texts[i] + answers[i] for i in rows],
                    return_tensors="pt",
                    padding=True,
                    add_special_tokens=False,
                ).to(model.device)
                with torch.no_grad():
                    gen = model.generate(
                        **enc,
                        max_new_tokens=max(budgets[i] for i in rows),
                        do_sample=False,
                        stop_strings=["="],
                        tokenizer=tokenizer,
                        pad_token_id=pad,
                        eos_token_id=model.generation_config.eos_token_id or tokenizer.eos_token_id,
                    )
                for row, i in enumerate(rows):
                    new = gen[row, enc["input_ids"].shape[1] :].tolist()
                    new = new[: new.index(pad)] if pad in new else new
                    new = new[: budgets[i]]
                    budgets[i] -= len(new)
                    answers[i], writing_on = _continue(answers[i], new, tokenizer, eos, budgets[i])
                    if writing_on:
                        still.append(i)
            writing = still
            if not writing:
                break
    finally:
        tokenizer.padding_side = side
    return [a.strip() for a in answers]


def _eos_ids(model: Any, tokenizer: Any) -> set[int]:
    eos = model.generation_config.eos_token_id or tokenizer.eos_token_id
    return set(eos) if isinstance(eos, (list, tuple)) else {eos}
