"""Calculator-assisted decoding: the model writes the arithmetic, a calculator does it.

The worked answers the model is trained on spell every step out as
``<expression> = <value>``: ``(1660 - 1455) nm / (30 s / 60 s/min) = 205 nm / 0.5 min = 410 nm/min``.
At inference, each time the model writes ``=`` after an arithmetic expression, the
expression is evaluated (units dropped, ``x`` read as multiplication, ``%`` dropped) and the
value is written in for it (the decoder, ``semilens.llm.decode``, makes its tokens
that row's next ones); the model then goes on from there. This is the calculator
annotation of Cobbe et al. (2021, GSM8K): choosing the formula and reading the right
numbers out of the question stays the model's job, only the digits are not. With
``evaluate_llm.calculator`` on (the default) the benchmark's maths is answered this way;
off, the model writes its own digits.

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
MAX_CALLS = 12  # values the calculator writes into one answer at most; a worked answer has five to ten "="
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
    model: Any, tokenizer: Any, prompt_text: str, max_new_tokens: int, max_calls: int = MAX_CALLS
) -> str:
    """Greedy generation in which the calculator writes the value after each ``=``.

    ``prompt_text`` is the chat-formatted prompt; the return value is the answer alone.
    """
    return generate_with_calculator_batch(model, tokenizer, [prompt_text], max_new_tokens, 1, max_calls)[0]


def generate_with_calculator_batch(
    model: Any,
    tokenizer: Any,
    prompt_texts: list[str],
    max_new_tokens: int,
    batch_size: int,
    max_calls: int = MAX_CALLS,
) -> list[str]:
    """``generate_with_calculator`` for many prompts, ``batch_size`` rows per forward
    (``semilens.llm.decode``). The values the calculator writes count against a row's
    ``max_new_tokens`` like the model's own."""
    from semilens.llm.decode import greedy_answers

    return greedy_answers(model, tokenizer, prompt_texts, max_new_tokens, batch_size, max_calls)
