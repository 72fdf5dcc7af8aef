r"""Exports of rules: SymPy, LaTeX (index notation), JSON trees, coefficient tables.

Pure functions, one concern each; :class:`~rulesearch.lang.rule.Rule` methods are thin wrappers. Exports never mutate
a rule and never touch disk.

JSON stores expressions as trees of whitelisted node types (``Add``, ``Mul``, ``Pow``, ``Integer``, ``Rational``,
``Float`` as a decimal string, ``NumberSymbol``, ``Signal``, ``Constant``, the operators and the elementwise
functions of :data:`~rulesearch.lang.signals.ELEMENTWISE_FUNCTIONS`). Loading never evaluates strings; a hostile or
malformed file raises :class:`~rulesearch.errors.InvalidRuleError`.

Examples
--------
>>> from rulesearch.lang.signals import pre, err
>>> from rulesearch.lang.rule import Rule, Term
>>> print(Rule([Term("F0", -err * pre)]).latex(values=[0.001]))
\Delta W_{ij} = - 0.001 e_{i} x_{j}
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from decimal import Decimal

import sympy as sp
from sympy.printing.latex import LatexPrinter

from ..errors import InvalidRuleError, UnsupportedNodeError
from .bounds import MAX_DEPTH, check_power, check_size
from .signals import (
    BUILTIN_SIGNALS,
    ELEMENTWISE_FUNCTIONS,
    OPERATORS,
    Constant,
    Signal,
    StateDef,
    signals_in,
    state_key,
    state_probe,
)

__all__ = [
    "RuleLatexPrinter",
    "expr_latex",
    "latex_fragment",
    "round_floats",
    "significant",
    "rule_to_sympy",
    "rule_to_latex",
    "latex_table",
    "markdown_table",
    "expr_to_json",
    "expr_from_json",
    "rule_to_json",
    "rule_from_json",
    "FORMAT",
]

FORMAT = "rulesearch.rule/1"
_INDEX = {"post": "i", "pre": "j", "synapse": "ij", "global": ""}


class RuleLatexPrinter(LatexPrinter):
    r"""LaTeX in index notation: :math:`x_j, y_i, e_i, e'_j, W_{ij}, B_{ji}`; floats correctly rounded to
    ``precision`` significant digits as by :func:`significant` (scientific below :math:`10^{-\mathrm{precision}}`)."""

    _default_settings = {**LatexPrinter._default_settings, "precision": 3, "vector": False}

    def _print_Float(self, expr):
        mant, exp = significant(float(expr), self._settings["precision"])
        if exp < -self._settings["precision"]:  # scientific below 10^-precision
            return rf"{mant} \cdot 10^{{{exp}}}"
        return format(Decimal(f"{mant}e{exp}"), "f")

    def _glyph(self, sig: Signal) -> str:
        if sig.latex:
            return sig.latex
        return r"\mathrm{" + sig.name.replace("_", r"\_") + "}"

    def _print_Signal(self, sig):
        glyph = self._glyph(sig)
        if self._settings["vector"] or sig.role == "global":
            return glyph
        idx = "ji" if sig.name == "fb" else _INDEX[sig.role]
        return f"{glyph}_{{{idx}}}"

    _print_Constant = _print_Signal

    def parenthesize_super(self, s):
        # a prime is a superscript (e' = e^{\prime}): e'_{j}^{2} is a double superscript, {e'_{j}}^{2} is not
        if "'" in s and "^" not in s:
            return "{" + s + "}"
        return super().parenthesize_super(s)

    def _vec(self, expr) -> str:
        p = RuleLatexPrinter({"precision": self._settings["precision"], "vector": True})
        s = p.doprint(expr)
        return s if isinstance(expr, Signal) else rf"\left({s}\right)"

    # SymPy prints ``f(...)**n`` as ``self._print(f(...), exp=n)``: every operator takes ``exp``. A sum is a
    # group ``{\textstyle\sum ...}``, so the style switch ends with it.
    @staticmethod
    def _power(tex: str, exp, indexed: bool) -> str:
        r"""``tex`` raised to ``exp``; an indexed ``\left(...\right)_{j}`` takes the power after its index."""
        if exp is None:
            return tex
        return rf"{tex}^{{{exp}}}" if indexed else rf"\left({tex}\right)^{{{exp}}}"

    def _print_Contract(self, expr, exp=None):
        M, u = expr.args
        from .signals import role_of

        if role_of(u) == "post":
            tex = rf"\left({self._glyph(M)}^\top {self._vec(u)}\right)_{{j}}"
        else:
            tex = rf"\left({self._glyph(M)} {self._vec(u)}\right)_{{i}}"
        return self._power(tex, exp, indexed=True)

    def _print_LayerSum(self, expr, exp=None):
        (u,) = expr.args
        return self._power(rf"{{\textstyle\sum_k {self._vec(u)}_k}}", exp, indexed=False)

    def _print_LayerMean(self, expr, exp=None):
        (u,) = expr.args
        return self._power(rf"{{\textstyle\frac{{1}}{{n}}\sum_k {self._vec(u)}_k}}", exp, indexed=False)

    def _print_Bilinear(self, expr, exp=None):
        u, M, v = expr.args
        left = self.parenthesize_super(self._vec(u))  # \bar{y}^{(3)}^\top would be a double superscript
        return self._power(rf"{left}^\top {self._glyph(M)} {self._vec(v)}", exp, indexed=False)

    def _print_Reindex(self, expr, exp=None):
        """``u`` read with the other index: ``g_j`` for ``as_pre(gain)``; index-free inside a contraction."""
        (u,) = expr.args
        from .signals import Contract, role_of

        s = RuleLatexPrinter({"precision": self._settings["precision"], "vector": True}).doprint(u)
        if isinstance(u, Contract):
            s = s[: s.rindex("_{")]  # the contraction's own index is replaced
        elif not isinstance(u, Signal):
            s = rf"\left({s}\right)"
        if self._settings["vector"]:
            return self._power(s, exp, indexed=False)
        return self._power(f"{s}_{{{'j' if role_of(u) == 'post' else 'i'}}}", exp, indexed=False)

    def _print_OrderedContract(self, expr, exp=None):
        u, M = expr.args
        tex = rf"{{\textstyle\sum_{{k \le i}} {self._vec(u)}_k {self._glyph(M)}_{{kj}}}}"
        return self._power(tex, exp, indexed=False)


def significant(value: float, precision: int) -> tuple[str, int]:
    """``value`` correctly rounded to ``precision`` significant digits (as Python's ``format(value, ".4g")``), as
    a mantissa without trailing zeros and a decimal exponent: ``significant(0.0017664, 3) == ("1.77", -3)``."""
    mant, exp = f"{value:.{precision - 1}e}".split("e")
    if "." in mant:
        mant = mant.rstrip("0").rstrip(".")
    return ("0", 0) if float(mant) == 0 else (mant, int(exp))


def round_floats(expr, precision: int = 3):
    """``expr`` with every Float rounded as :func:`significant` rounds it (and printed with that many digits):
    the plain-text formula shows the digits the LaTeX shows."""
    expr = sp.sympify(expr)
    return expr.xreplace({f: sp.Float(f"{float(f):.{precision - 1}e}", precision) for f in expr.atoms(sp.Float)})


def expr_latex(expr, precision: int = 3) -> str:
    """LaTeX of one expression over signals."""
    return RuleLatexPrinter({"precision": precision}).doprint(expr)


def _values(rule, values):
    if values is None:
        values = rule.values
    if values is None:
        return None
    if hasattr(values, "detach"):
        values = values.detach().cpu().double().reshape(-1).tolist()
    if rule.is_linear:
        values = list(values)
        if len(values) != rule.n_terms:
            raise InvalidRuleError(f"Got {len(values)} values for a rule with {rule.n_terms} terms.")
        return values
    return dict(values)


def rule_to_sympy(rule, values=None) -> sp.Expr:
    r"""The update :math:`\sum_r \theta_r T^r` with theta symbols, or with trained values substituted."""
    vals = _values(rule, values)
    if rule.is_linear:
        coefs = [sp.Float(v) for v in vals] if vals is not None else None
        if coefs is None:
            return rule.structure()
        return sp.Add(*(c * t.expr for c, t in zip(coefs, rule.terms)))
    if vals is None:
        return rule.expr
    return rule.expr.xreplace({c: sp.Float(vals[c.name]) for c in rule.constants})


def latex_fragment(equations: Sequence[str], tables: Sequence[str] = (), header: bool = True) -> str:
    r"""A LaTeX fragment to ``\input``: a comment naming the packages it needs (``header``), the equations (one in an
    ``equation`` environment, several in ``gather``), then the (booktabs) tables."""
    equations = list(equations)
    head = ""
    if header:
        head = "% \\input this file into a LaTeX document that loads \\usepackage{amsmath}"
        head += " and \\usepackage{booktabs} (\\toprule, \\midrule, \\bottomrule).\n" if tables else ".\n"
    if len(equations) == 1:
        body = "\\begin{equation}\n" + equations[0] + "\n\\end{equation}"
    else:
        body = "\\begin{gather}\n" + " \\\\\n".join(equations) + "\n\\end{gather}"
    return head + "\n\n".join([body, *tables])


def rule_to_latex(rule, precision: int = 3, values=None, table: bool = False) -> str:
    r"""``\Delta W_{ij} = ...`` in index notation; with ``table=True`` a booktabs coefficient table follows."""
    body = expr_latex(rule_to_sympy(rule, values), precision)
    out = rf"\Delta W_{{ij}} = {body}"
    if table:
        out += "\n\n" + latex_table([rule], [values] if values is not None else None, precision=precision)
    return out


def latex_table(rules: Sequence, values: Sequence | None = None, precision: int = 3, intervals=None) -> str:
    r"""A booktabs table: one row per term (LaTeX, locality) and one column of values per rule.

    ``intervals[k][r] = (lo, hi)`` adds a 95% interval to the value of rule ``k``, term ``r`` (multi-seed).
    """
    rules = list(rules)
    vals = [_values(r, v) for r, v in zip(rules, values or [None] * len(rules))]
    ref = rules[0]
    if not ref.is_linear:
        raise InvalidRuleError("latex_table needs linear rules (named terms).")
    num = RuleLatexPrinter({"precision": precision})

    def fmt(v) -> str:  # the equation's number format, in math mode (no "2.5e-05" in a paper table)
        return num.doprint(sp.Float(float(v)))

    cols = "ll" + "r" * len(rules)
    head = " & ".join(["term", "$T_{ij}$"] + [rf"$\theta$ ({r.name})" for r in rules])
    lines = [rf"\begin{{tabular}}{{{cols}}}", r"\toprule", head + r" \\", r"\midrule"]
    for i, t in enumerate(ref.terms):
        cells = [t.name.replace("_", r"\_"), f"${expr_latex(t.expr, precision)}$"]
        for k, v in enumerate(vals):
            if v is None:
                cells.append(rf"$\theta_{{{i}}}$")
                continue
            c = fmt(v[i])
            if intervals is not None:
                lo, hi = intervals[k][i]
                c += rf"\ [{fmt(lo)}, {fmt(hi)}]"
            cells.append(f"${c}$")
        lines.append(" & ".join(cells) + r" \\")
    lines += [r"\bottomrule", r"\end{tabular}"]
    return "\n".join(lines)


def markdown_table(rule, values=None, precision: int = 4) -> str:
    """A Markdown table of a linear rule's terms, locality and values."""
    vals = _values(rule, values)
    lines = ["| term | expression | locality | value |", "|---|---|---|---|"]
    for i, t in enumerate(rule.terms):
        v = f"{vals[i]:.{precision}g}" if vals is not None else "-"
        lines.append(f"| {t.name} | `{t.expr}` | {t.locality} | {v} |")
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------------------------
# JSON trees

_FUNCS = {name: getattr(sp, name) for name in ELEMENTWISE_FUNCTIONS if name not in ("sqrt",)}
_OPS = {op.__name__: op for op in OPERATORS}
_RELS = {
    "StrictGreaterThan": sp.StrictGreaterThan,
    "StrictLessThan": sp.StrictLessThan,
    "GreaterThan": sp.GreaterThan,
    "LessThan": sp.LessThan,
}
_NUMBER_SYMBOLS = {"pi": sp.pi, "E": sp.E}


def expr_to_json(expr) -> dict:
    """Encode an expression as a tree of whitelisted node types."""
    if isinstance(expr, Constant):
        return {"type": "Constant", "name": expr.name}
    if isinstance(expr, Signal):
        return {"type": "Signal", "name": expr.name, "role": expr.role}
    if isinstance(expr, sp.Integer):
        return {"type": "Integer", "value": int(expr)}
    if isinstance(expr, sp.Rational):
        return {"type": "Rational", "p": int(expr.p), "q": int(expr.q)}
    if isinstance(expr, sp.Float):
        # repr digits plus the binary precision: Float(value, precision=...) rebuilds the identical number
        return {"type": "Float", "value": sp.srepr(expr).split("'")[1], "precision": int(expr._prec)}
    if isinstance(expr, sp.NumberSymbol) and str(expr) in _NUMBER_SYMBOLS:
        return {"type": "NumberSymbol", "name": str(expr)}
    if expr is sp.true:
        return {"type": "true"}
    if isinstance(expr, sp.Piecewise):
        return {"type": "Piecewise", "args": [[expr_to_json(e), expr_to_json(c)] for e, c in expr.args]}
    name = type(expr).__name__
    if isinstance(expr, (sp.Add, sp.Mul, sp.Pow)) or name in _OPS or name in _FUNCS or name in _RELS:
        return {"type": name, "args": [expr_to_json(a) for a in expr.args]}
    raise UnsupportedNodeError(
        f"Cannot export node {name} ({expr}) to JSON: supported are Add, Mul, Pow, numbers, signals, constants, "
        f"{', '.join(_OPS)}, {', '.join(_FUNCS)}."
    )


def expr_from_json(node, signals: Mapping[str, Signal], depth: int = 1) -> sp.Expr:
    """Decode a tree written by :func:`expr_to_json`; ``signals`` maps names to (derived) signals.

    Numbers and nesting are bounded (:mod:`rulesearch.lang.bounds`) before SymPy evaluates anything.
    """
    if depth > MAX_DEPTH:
        raise InvalidRuleError(
            f"Rule file: an expression nests deeper than {MAX_DEPTH} levels; rules are short formulas."
        )
    if not isinstance(node, Mapping) or not isinstance(node.get("type"), str):
        raise InvalidRuleError(f"Malformed expression node {str(node)[:80]!r}: expected an object with a 'type'.")
    t = node["type"]
    try:
        if t == "Signal":
            name = node["name"]
            if name not in signals:
                raise InvalidRuleError(
                    f"Unknown signal {name!r} in JSON; known: {sorted(signals)}. Declare derived signals in 'signals'."
                )
            sig = signals[name]
            if sig.role != node["role"]:
                raise InvalidRuleError(f"Signal {name!r} has role {sig.role!r} but the file says {node['role']!r}.")
            return sig
        if t == "Constant":
            return Constant(_str(node["name"]))
        if t == "Integer":
            return _bounded(sp.Integer(_int(node["value"])))
        if t == "Rational":
            return _bounded(sp.Rational(_int(node["p"]), _int(node["q"])))
        if t == "Float":
            v = node["value"]
            if not isinstance(v, str) or not 0 < len(v) <= 400 or not all(ch in "0123456789.-+eE" for ch in v):
                raise InvalidRuleError(f"Float value must be a decimal string, got {str(v)[:80]!r}.")
            if "precision" in node:
                prec = _int(node["precision"])
                if not 1 <= prec <= 4096:
                    raise InvalidRuleError(f"Float precision must be 1..4096 bits, got {prec}.")
                return _bounded(sp.Float(v, precision=prec))
            return _bounded(sp.Float(v, max(15, len(v.strip("-+").replace(".", "").split("e")[0]))))
        if t == "NumberSymbol":
            return _NUMBER_SYMBOLS[_str(node["name"])]
        if t == "true":
            return sp.true
        args = node["args"]
        if not isinstance(args, list):
            raise InvalidRuleError(f"Node {t}: 'args' must be a list.")
        if t == "Piecewise":
            pairs = [(expr_from_json(e, signals, depth + 1), expr_from_json(c, signals, depth + 1)) for e, c in args]
            return sp.Piecewise(*pairs)
        kids = [expr_from_json(a, signals, depth + 1) for a in args]
        if t == "Pow" and len(kids) == 2:
            check_power(*kids, where="Rule file")  # SymPy would evaluate 2**1024**1024**... exactly, hanging
        if t in ("Add", "Mul", "Pow"):
            return _bounded(getattr(sp, t)(*kids))
        if t in _OPS:
            return _OPS[t](*kids)
        if t in _FUNCS:
            return _FUNCS[t](*kids)
        if t in _RELS:
            return _RELS[t](*kids)
    except (KeyError, TypeError, ValueError) as e:
        if isinstance(e, InvalidRuleError):
            raise
        raise InvalidRuleError(f"Malformed {t} node {str(node)[:80]!r}: {e!r}.") from None
    raise InvalidRuleError(f"Node type {t!r} is not allowed in rule files (allowed: Add, Mul, Pow, numbers, ...).")


def _bounded(x: sp.Expr) -> sp.Expr:
    if x.is_Number:
        check_size(x, "Rule file")  # finiteness is checked with the term, whose name the message then gives
    return x


def _int(v) -> int:
    if isinstance(v, bool) or not isinstance(v, int):
        raise InvalidRuleError(f"Expected an integer, got {v!r}.")
    return v


def _str(v) -> str:
    if not isinstance(v, str):
        raise InvalidRuleError(f"Expected a string, got {v!r}.")
    return v


def _opt_str(v) -> str | None:
    return None if v is None else _str(v)


def _number(v) -> float:
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        raise InvalidRuleError(f"Expected a number, got {str(v)[:80]!r}.")
    try:
        x = float(v)
    except OverflowError:
        x = math.inf
    if not math.isfinite(x):
        raise InvalidRuleError(
            f"Coefficient {str(v)[:80]} is not a finite number; a rule's values are finite. The file is damaged: "
            "export it again from its run (rulesearch export RUN -f json) or set the values to null."
        )
    return x


def _values_from_json(v, kind: str):
    if v is None:
        return None
    if kind == "linear" and isinstance(v, list):
        return [_number(x) for x in v]
    if kind == "general" and isinstance(v, Mapping):
        return {_str(k): _number(x) for k, x in v.items()}
    want = "a list of numbers (one per term)" if kind == "linear" else "an object mapping constant names to numbers"
    raise InvalidRuleError(f"'values' of a {kind} rule must be null or {want}, got {v!r}.")


def _derived_signals(exprs) -> list[Signal]:
    out: dict[str, Signal] = {}
    stack = list(exprs)
    while stack:
        for s in signals_in(stack.pop()):
            if s.definition is None or s.name in out:
                continue
            out[s.name] = s
            d = s.definition
            stack += [d.update, d.init] if isinstance(d, StateDef) else [d]
    return list(out.values())


def _signal_to_json(s: Signal) -> dict:
    d = s.definition
    out = {"role": s.role, "description": s.description, "latex": s.latex}
    if isinstance(d, StateDef):
        out.update(kind="state", update=expr_to_json(d.update), init=expr_to_json(d.init))
    else:
        out.update(kind="derived", expr=expr_to_json(d))
    return out


def rule_to_json(rule) -> dict:
    """The rule as a JSON-able dict (format ``rulesearch.rule/1``)."""
    exprs = [t.expr for t in rule.terms] if rule.is_linear else [rule.expr]
    out = {
        "format": FORMAT,
        "name": rule.name,
        "kind": "linear" if rule.is_linear else "general",
        "signals": {s.name: _signal_to_json(s) for s in _derived_signals(exprs)},
    }
    if rule.is_linear:
        out["terms"] = [
            {"name": t.name, "description": t.description, "expr": expr_to_json(t.expr)} for t in rule.terms
        ]
        out["values"] = list(rule.values) if rule.values is not None else None
    else:
        out["expr"] = expr_to_json(rule.expr)
        out["constants"] = [c.name for c in rule.constants]
        out["values"] = dict(rule.values) if rule.values is not None else None
    return out


def _signals_from_json(spec: Mapping) -> dict[str, Signal]:
    if not isinstance(spec, Mapping):
        raise InvalidRuleError("'signals' must be an object mapping names to definitions.")
    known: dict[str, Signal] = dict(BUILTIN_SIGNALS)
    pending = dict(spec)
    for _ in range(len(pending) + 1):
        progressed = False
        for name, d in list(pending.items()):
            if name in BUILTIN_SIGNALS:
                raise InvalidRuleError(f"Derived signal {name!r} shadows a built-in signal.")
            if not isinstance(d, Mapping):
                raise InvalidRuleError(f"Signal {name!r}: expected an object with 'kind' and 'role', got {d!r}.")
            try:
                if d.get("kind") == "state":
                    role = _str(d["role"])
                    probe = known[name] = state_probe(name, role)  # the update refers to the signal itself
                    upd, ini = expr_from_json(d["update"], known), expr_from_json(d["init"], known)
                    sig = Signal(name, role, None, _str(d.get("description", "")), _opt_str(d.get("latex")),
                                 key=state_key(name, role, upd, ini))  # fmt: skip
                    sig.definition = StateDef(upd.xreplace({probe: sig}), ini)
                elif d.get("kind") == "derived":
                    sig = Signal(
                        name, _str(d["role"]), expr_from_json(d["expr"], known), _str(d.get("description", "")),
                        _opt_str(d.get("latex")),
                    )  # fmt: skip
                else:
                    raise InvalidRuleError(f"Signal {name!r}: kind must be 'state' or 'derived'.")
            except InvalidRuleError as e:
                known.pop(name, None)
                if "Unknown signal" in str(e):
                    continue
                raise
            known[name] = sig
            del pending[name]
            progressed = True
        if not pending:
            return known
        if not progressed:
            break
    raise InvalidRuleError(f"Cannot resolve derived signals {sorted(pending)} (unknown dependencies or a cycle).")


def rule_from_json(data) -> object:
    """Rebuild a rule from :func:`rule_to_json` output (a dict or a JSON string); exact round trip."""
    try:
        return _rule_from_json(data)
    except RecursionError:
        raise InvalidRuleError("Rule file nests expressions too deeply to be a rule.") from None


def _rule_from_json(data):
    from .rule import Rule, Term

    if isinstance(data, str):
        from ..io.files import parse_json

        data = parse_json(data, "Rule JSON", InvalidRuleError, "Pass the text written by Rule.to_json.")
    if not isinstance(data, Mapping) or data.get("format") != FORMAT:
        got = data.get("format") if isinstance(data, Mapping) else type(data).__name__
        raise InvalidRuleError(f"Not a rulesearch rule: expected format {FORMAT!r}, got {got!r}.")
    signals = _signals_from_json(data.get("signals", {}))
    try:
        if data["kind"] == "linear":
            terms = [
                Term(_str(t["name"]), expr_from_json(t["expr"], signals), _str(t.get("description", "")))
                for t in data["terms"]
            ]
            return Rule(tuple(terms), _str(data["name"]), values=_values_from_json(data.get("values"), "linear"))
        if data["kind"] == "general":
            consts = [Constant(_str(c)) for c in data["constants"]]
            return Rule(name=_str(data["name"]), expr=expr_from_json(data["expr"], signals), constants=tuple(consts),
                        values=_values_from_json(data.get("values"), "general"))  # fmt: skip
    except (KeyError, TypeError, AttributeError) as e:
        raise InvalidRuleError(f"Malformed rule file: missing or wrong field {e!r}.") from None
    raise InvalidRuleError(f"Rule kind must be 'linear' or 'general', got {data.get('kind')!r}.")
