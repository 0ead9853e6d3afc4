"""Arithmetic for the calculator tool without `eval`: a whitelist walk over Python's AST."""

from __future__ import annotations

import ast
import operator
from collections.abc import Callable

_BINARY: dict[type[ast.operator], Callable[[float, float], float]] = {
    ast.Add: operator.add,
    ast.Sub: operator.sub,
    ast.Mult: operator.mul,
    ast.Div: operator.truediv,
}
MAX_EXPRESSION_CHARS = 200


class MathError(ValueError):
    """The expression is not plain arithmetic or cannot be computed."""


def evaluate(expression: str) -> float:
    """Value of `+ - * /` arithmetic over numbers; anything else raises MathError."""
    if len(expression) > MAX_EXPRESSION_CHARS:
        raise MathError(f"expression longer than {MAX_EXPRESSION_CHARS} characters")
    try:
        tree = ast.parse(expression, mode="eval")
    except SyntaxError as exc:
        raise MathError(f"not an arithmetic expression: {expression!r}") from exc
    return _walk(tree.body)


def _walk(node: ast.expr) -> float:
    if isinstance(node, ast.Constant) and isinstance(node.value, int | float):
        if isinstance(node.value, bool):
            raise MathError("booleans are not numbers here")
        return float(node.value)
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.USub | ast.UAdd):
        value = _walk(node.operand)
        return -value if isinstance(node.op, ast.USub) else value
    if isinstance(node, ast.BinOp) and type(node.op) in _BINARY:
        left, right = _walk(node.left), _walk(node.right)
        if isinstance(node.op, ast.Div) and right == 0:
            raise MathError("division by zero")
        return _BINARY[type(node.op)](left, right)
    raise MathError("only numbers, parentheses and + - * / are allowed")
