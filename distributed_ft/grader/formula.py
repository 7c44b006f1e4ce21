"""Safe arithmetic for multi graders' `calculate_output`: parsed with `ast` against a whitelist, never eval'd."""
from __future__ import annotations

import ast
import math
from typing import Callable

_UNARY_FUNCS: dict[str, Callable[[float], float]] = {
    "abs": abs, "floor": math.floor, "ceil": math.ceil, "exp": math.exp, "sqrt": math.sqrt, "log": math.log,
}
_VARIADIC_FUNCS: dict[str, Callable[..., float]] = {"min": min, "max": max}
_BINOPS = {
    ast.Add: lambda a, b: a + b, ast.Sub: lambda a, b: a - b, ast.Mult: lambda a, b: a * b,
    ast.Div: lambda a, b: a / b, ast.Pow: lambda a, b: a ** b,
}
_UNOPS = {ast.USub: lambda a: -a, ast.UAdd: lambda a: a}


class FormulaError(ValueError):
    """The formula is not valid (load time) or cannot be evaluated for one sample (run time)."""


class Formula:
    """A checked `calculate_output` expression over named sub-grader rewards."""

    def __init__(self, text: str, names: set[str]):
        self.text = text
        # `^` is power, as in the formula language; Python's `**` has the same precedence rules.
        try:
            tree = ast.parse(text.replace("^", "**"), mode="eval")
        except SyntaxError as err:
            raise FormulaError(f"calculate_output '{text}' is not a valid formula ({err.msg})") from None
        self.variables: set[str] = set()
        self._check(tree.body, names)
        self._tree = tree.body

    def _check(self, node: ast.AST, names: set[str]) -> None:
        if isinstance(node, ast.BinOp) and type(node.op) in _BINOPS:
            self._check(node.left, names)
            self._check(node.right, names)
        elif isinstance(node, ast.UnaryOp) and type(node.op) in _UNOPS:
            self._check(node.operand, names)
        elif isinstance(node, ast.Constant) and type(node.value) in (int, float):
            pass
        elif isinstance(node, ast.Name):
            if node.id not in names:
                known = ", ".join(sorted(names)) or "none"
                raise FormulaError(f"calculate_output '{self.text}' uses unknown name '{node.id}' "
                                   f"(graders: {known})")
            self.variables.add(node.id)
        elif isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and not node.keywords:
            fname = node.func.id
            if fname in _UNARY_FUNCS and len(node.args) != 1:
                raise FormulaError(f"calculate_output '{self.text}': {fname}() takes one argument")
            if fname in _VARIADIC_FUNCS and len(node.args) < 1:
                raise FormulaError(f"calculate_output '{self.text}': {fname}() needs arguments")
            if fname not in _UNARY_FUNCS and fname not in _VARIADIC_FUNCS:
                raise FormulaError(f"calculate_output '{self.text}': function '{fname}' is not allowed "
                                   f"(allowed: {', '.join(sorted({**_UNARY_FUNCS, **_VARIADIC_FUNCS}))})")
            for arg in node.args:
                if isinstance(arg, ast.Starred):
                    raise FormulaError(f"calculate_output '{self.text}': '*' arguments are not allowed")
                self._check(arg, names)
        else:
            raise FormulaError(f"calculate_output '{self.text}': '{ast.unparse(node)}' is not allowed "
                               "(use numbers, grader names, + - * / ^ and min max abs floor ceil exp sqrt log)")

    def evaluate(self, values: dict[str, float]) -> float:
        """Value of the formula; FormulaError for a domain error (division by zero, log of 0, ...)."""
        try:
            result = float(self._eval(self._tree, values))
        except (ZeroDivisionError, ValueError, OverflowError) as err:
            raise FormulaError(f"calculate_output '{self.text}' failed: {err}") from None
        if not math.isfinite(result):
            raise FormulaError(f"calculate_output '{self.text}' gave non-finite {result}")
        return result

    def _eval(self, node: ast.AST, values: dict[str, float]) -> float:
        if isinstance(node, ast.BinOp):
            result = _BINOPS[type(node.op)](self._eval(node.left, values), self._eval(node.right, values))
            if isinstance(result, complex):
                raise ValueError("complex result")
            return result
        if isinstance(node, ast.UnaryOp):
            return _UNOPS[type(node.op)](self._eval(node.operand, values))
        if isinstance(node, ast.Constant):
            return float(node.value)  # floats overflow with an error where huge ints would hang (10^10^10)
        if isinstance(node, ast.Name):
            return values[node.id]
        assert isinstance(node, ast.Call) and isinstance(node.func, ast.Name)
        args = [self._eval(arg, values) for arg in node.args]
        if node.func.id in _UNARY_FUNCS:
            return _UNARY_FUNCS[node.func.id](args[0])
        return _VARIADIC_FUNCS[node.func.id](*args)
