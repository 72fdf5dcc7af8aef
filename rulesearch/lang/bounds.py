"""Bounds on the numbers and nesting of rule expressions, checked when rules are read or built and compiled.

SymPy evaluates numeric powers exactly: ``Pow(Pow(Pow(Pow(2, 1024), 1024), 1024), 1024)`` asks for a number of
2^40 bits and never returns, and ``pre**(10**100)`` overflows torch. A rule never needs such numbers, so rule files,
:class:`~rulesearch.lang.rule.Rule` and the compiler refuse them with an :class:`~rulesearch.errors.InvalidRuleError`.
"""

from __future__ import annotations

import math

import sympy as sp

from ..errors import InvalidRuleError
from .signals import _check_number as check_finite

__all__ = ["MAX_DEPTH", "MAX_EXPONENT", "MAX_BITS", "check_size", "check_number", "check_power", "check_expr_bounds"]

MAX_DEPTH = 60  # nesting of expression nodes (the grammars' deepest terms nest about a dozen)
MAX_EXPONENT = 1024  # |e| of a numeric exponent
MAX_BITS = 4096  # bits of the numerator and denominator of an exact number


def _short(x) -> str:
    text = sp.sstr(x)
    return text if len(text) <= 40 else f"{text[:20]}...({len(text)} characters)"


def _bits(x: sp.Rational) -> int:
    return max(int(x.p).bit_length(), int(x.q).bit_length())


def check_size(x, where: str = "Rule") -> None:
    """Refuse an exact number of more than :data:`MAX_BITS` bits (SymPy's arithmetic on it would be slow)."""
    if isinstance(x, sp.Rational) and _bits(x) > MAX_BITS:
        raise InvalidRuleError(
            f"{where}: a number of {_bits(x)} bits; numbers in rules are limited to {MAX_BITS} bits (about "
            f"1e{int(MAX_BITS * math.log10(2))}). Write the rule with ordinary coefficients."
        )


def check_number(x, where: str = "Rule") -> None:
    """:func:`check_size`, and refuse a number float64 cannot hold."""
    check_size(x, where)
    try:
        check_finite(x)
    except InvalidRuleError as err:
        raise InvalidRuleError(f"{where}: {err}") from None


def check_power(base, exp, where: str = "Rule") -> None:
    """Before ``Pow(base, exp)`` is built: a numeric exponent within +-:data:`MAX_EXPONENT`, and for a numeric
    base a result within :data:`MAX_BITS` bits (without computing it)."""
    if not exp.is_Number:
        return
    if not abs(exp) <= MAX_EXPONENT:
        raise InvalidRuleError(
            f"{where}: power {_short(base)}**{_short(exp)}; numeric exponents are limited to +-{MAX_EXPONENT}."
        )
    if isinstance(base, sp.Rational) and base not in (0, 1, -1) and _bits(base) * abs(float(exp)) > MAX_BITS:
        raise InvalidRuleError(
            f"{where}: power {_short(base)}**{_short(exp)} would be a number of about "
            f"{int(_bits(base) * abs(float(exp)))} bits; numbers in rules are limited to {MAX_BITS} bits."
        )


def check_expr_bounds(expr, where: str = "Rule") -> None:
    """Refuse an expression nested deeper than :data:`MAX_DEPTH` or holding an out-of-bounds number or power."""
    stack = [(expr, 1)]
    while stack:
        node, depth = stack.pop()
        if depth > MAX_DEPTH:
            raise InvalidRuleError(
                f"{where}: the expression nests deeper than {MAX_DEPTH} levels; rules are short formulas. Simplify it."
            )
        if node.is_Number:
            check_number(node, where)
        elif isinstance(node, sp.Pow):
            check_power(*node.args, where=where)
        stack.extend((arg, depth + 1) for arg in node.args)
