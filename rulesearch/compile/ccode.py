r"""A rule's online update as a C function, for kernels that fuse it into a loop (:mod:`rulesearch.native`).

:func:`rule_c` turns a :class:`~rulesearch.lang.rule.Rule` of elementwise expressions into

.. code-block:: c

    static void <name>(int n_post, int n_pre, const real *const *sig, const real *prm, real *st, int first,
                       real *W);

which steps the rule's states, then adds :math:`\Delta W_{ij}` to ``W`` (``n_post x n_pre``, row-major):
:math:`\Delta W = \sum_r \theta_r T^r` for a linear rule (``prm`` = :math:`\theta`), ``scale`` times the expression
for a general one (``prm`` = its constants, then ``scale``). ``sig[k]`` points to the k-th signal of ``signals``
(one value for a global signal, ``n_post`` or ``n_pre`` values, or ``n_post x n_pre``); ``st`` holds the states, one
after another (:attr:`CRule.states`), and ``first`` != 0 initialises them (``s = init``) before their first step, as
:meth:`~rulesearch.compile.compiler.BoundRule.advance` does. A synapse signal read as the weights (``w``) may be
``W`` itself: each :math:`W_{ij}` is read before it is written.

Each subexpression is evaluated once at the level of its indices (a global once, a post-role value once per
:math:`i`, ...), so :math:`\Phi(R - \bar R)(z_i - \bar z_i) r_j` costs one multiplication per synapse. The C rounds
as written (IEEE, no contraction); the torch compiler may order a product's factors differently, so the two agree
to rounding, not bitwise. Operators that reduce or contract (``LayerSum``, ``Bilinear``, ``Contract``, ...) and
``Piecewise`` are not translated: :class:`~rulesearch.errors.UnsupportedNodeError` names them.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import sympy as sp

from ..errors import SignalError, UnsupportedNodeError
from ..lang.rule import Rule
from ..lang.signals import Signal, expand_derived, join_roles, state_signals

__all__ = ["CRule", "rule_c", "C_PRELUDE"]

# helpers with torch's values (sign(0) = 0, SymPy's Heaviside(0) = h0, maximum / minimum propagate NaN)
C_PRELUDE = r"""
static inline real rs_sign(real x) { return x > 0 ? (real)1 : (x < 0 ? (real)-1 : x); }
static inline real rs_heaviside(real x, real h0) { return x > 0 ? (real)1 : (x < 0 ? (real)0 : (x == 0 ? h0 : x)); }
static inline real rs_max(real a, real b) { return (a != a || a > b) ? a : b; }
static inline real rs_min(real a, real b) { return (a != a || a < b) ? a : b; }
"""

_FUNCS = {
    "exp": "exp",
    "log": "log",
    "tanh": "tanh",
    "sinh": "sinh",
    "cosh": "cosh",
    "sin": "sin",
    "cos": "cos",
    "Abs": "fabs",
    "sign": "rs_sign",
    "erf": "erf",
    "atan": "atan",
}
_LEVELS = ("global", "post", "pre", "synapse")
_INDEX = {"global": "0", "post": "i", "pre": "j", "synapse": "i * n_pre + j"}


@dataclass(frozen=True)
class CRule:
    """The C source of a rule's update (:func:`rule_c`): ``code`` defines ``name``; ``signals`` the order of
    ``sig``; ``params`` the order of ``prm``; ``states`` the ``(name, role)`` blocks of ``st`` in order."""

    name: str
    code: str
    signals: tuple[str, ...]
    params: tuple[str, ...]
    states: tuple[tuple[str, str], ...]

    def state_size(self, n_post: int, n_pre: int) -> int:
        """Values in ``st``: one per state and index."""
        n = {"global": 1, "post": n_post, "pre": n_pre, "synapse": n_post * n_pre}
        return sum(n[role] for _, role in self.states)


class _Program:
    """Straight-line C in four blocks (global, then loops over i, j and (i, j)); one temporary per subexpression,
    evaluated at its own level."""

    def __init__(self, access: Mapping[sp.Symbol, tuple[str, str]]):
        self.access = dict(access)  # symbol -> (role, C array or scalar name)
        self.blocks = {lvl: [] for lvl in _LEVELS}
        self.decls: list[str] = []
        self.memo: dict[sp.Basic, tuple[str, str]] = {}
        self.n = 0

    def value(self, expr) -> tuple[str, str]:
        """``(C expression, role)`` of ``expr``; non-trivial parts are assigned to temporaries of their level."""
        expr = sp.sympify(expr)
        if expr in self.memo:
            return self.memo[expr]
        out = self._value(expr)
        self.memo[expr] = out
        return out

    def _temp(self, code: str, role: str) -> tuple[str, str]:
        self.n += 1
        name = f"t{self.n}"
        if role == "global":
            self.decls.append(f"real {name};")
            self.blocks["global"].append(f"{name} = {code};")
            return name, role
        if role == "synapse":  # read only in the (i, j) loop, the last block: a local of its body
            self.blocks["synapse"].append(f"real {name} = {code};")
            return name, role
        self.decls.append(f"real {name}[{'n_post' if role == 'post' else 'n_pre'}];")
        self.blocks[role].append(f"{name}[{_INDEX[role]}] = {code};")
        return f"{name}[{_INDEX[role]}]", role

    def _value(self, e) -> tuple[str, str]:
        if e.is_Number:
            if not e.is_finite:
                raise UnsupportedNodeError(f"The number {e} has no C translation in a rule.")
            return f"((real){float(e)!r})", "global"
        if isinstance(e, sp.Symbol):
            if e not in self.access:
                raise SignalError(f"The C translation has no value for {e} (a signal the kernel does not provide).")
            role, name = self.access[e]
            return (name if role == "global" else f"{name}[{_INDEX[role]}]"), role
        if isinstance(e, sp.Add | sp.Mul):
            op = " + " if isinstance(e, sp.Add) else " * "
            parts = [self.value(a) for a in e.args]
            role = join_roles(*(r for _, r in parts))
            # group the arguments by level, lower levels first, each group a temporary of its level: a product of
            # a global, a post and a pre factor costs one multiplication per synapse
            groups: dict[str, list[str]] = {}
            for code, r in parts:
                groups.setdefault(r, []).append(code)
            if role == "synapse" and "global" in groups and ({"post", "pre"} & set(groups)):
                low = "post" if "post" in groups else "pre"
                groups[low] = groups.pop("global") + groups[low]  # fold the globals into a vector's loop
            codes = []
            for lvl in _LEVELS:
                if lvl not in groups:
                    continue
                g = groups[lvl]
                joined = g[0] if len(g) == 1 else "(" + op.join(g) + ")"
                codes.append(self._temp(joined, lvl)[0] if lvl != role and len(g) > 1 else joined)
            return self._temp(codes[0] if len(codes) == 1 else "(" + op.join(codes) + ")", role)
        if isinstance(e, sp.Pow):
            (b, rb), ex = self.value(e.base), e.exp
            if ex.is_Integer and 1 <= abs(int(ex)) <= 4:
                prod = " * ".join([b] * abs(int(ex)))
                return self._temp(f"({prod})" if ex > 0 else f"((real)1 / ({prod}))", rb)
            if ex == sp.Rational(1, 2):
                return self._temp(f"sqrt({b})", rb)
            x, rx = self.value(ex)
            return self._temp(f"pow({b}, {x})", join_roles(rb, rx))
        name = type(e).__name__
        if name in _FUNCS and len(e.args) == 1:
            a, r = self.value(e.args[0])
            return self._temp(f"{_FUNCS[name]}({a})", r)
        if name == "Heaviside":
            (a, r), h0 = self.value(e.args[0]), e.args[1] if len(e.args) > 1 else sp.Rational(1, 2)
            return self._temp(f"rs_heaviside({a}, (real){float(h0)!r})", r)
        if name in ("Max", "Min"):
            parts = [self.value(a) for a in e.args]
            code = parts[0][0]
            for c, _ in parts[1:]:
                code = f"rs_{name.lower()}({code}, {c})"
            return self._temp(code, join_roles(*(r for _, r in parts)))
        raise UnsupportedNodeError(
            f"{name} in {e} has no C translation (the native kernels take elementwise rules: +, *, powers and "
            f"{sorted({*_FUNCS, 'Heaviside', 'Max', 'Min'})}); run this rule with the torch backend."
        )

    def assign(self, target: str, role: str, expr, op: str = "=") -> None:
        code, r = self.value(expr)
        if join_roles(r, role) != role:
            raise UnsupportedNodeError(f"A {r}-role value cannot be stored in a {role}-role array ({target}).")
        lhs = target if role == "global" else f"{target}[{_INDEX[role]}]"
        self.blocks[role].append(f"{lhs} {op} {code};")

    def render(self, indent: str = "    ") -> list[str]:
        out = [indent + d for d in self.decls]
        out += [indent + s for s in self.blocks["global"]]
        loop_i, loop_j = "for (int i = 0; i < n_post; i++) {", "for (int j = 0; j < n_pre; j++) {"
        for lvl, head in (("post", [loop_i]), ("pre", [loop_j]), ("synapse", [loop_i, loop_j])):
            if self.blocks[lvl]:
                inner = indent + "    " * len(head)
                out += [indent + "    " * k + h for k, h in enumerate(head)]
                out += [inner + s for s in self.blocks[lvl]]
                out += [indent + "    " * k + "}" for k in reversed(range(len(head)))]
        return out


def rule_c(rule: Rule, signals: Mapping[str, str], name: str = "rule_update") -> CRule:
    """The C function ``name`` stepping ``rule``'s states and adding its update to ``W`` (module docstring).

    ``signals`` maps the signal names the kernel provides to their roles (``{"pre": "pre", "post": "post",
    "w": "synapse", "reward": "global", ...}``); a signal the rule reads and the kernel does not provide raises
    :class:`~rulesearch.errors.SignalError`, an operator with no translation
    :class:`~rulesearch.errors.UnsupportedNodeError`.
    """
    if rule.is_linear:
        thetas = [Signal(f"theta_{r}", "global") for r in range(rule.n_params)]
        expr = sp.Add(*(th * expand_derived(t.expr) for th, t in zip(thetas, rule.terms)))
        params = [th.name for th in thetas]
        consts = thetas
    else:
        scale = Signal("scale", "global")
        expr = scale * expand_derived(rule.expr)
        consts = [*rule.constants, scale]
        params = [c.name for c in consts]
    exprs = [t.expr for t in rule.terms] if rule.is_linear else [rule.expr]
    states: list[Signal] = []
    for e in exprs:
        states += [s for s in state_signals(e) if s not in states]
    given = {s for e in [expr] + [x for s in states for x in (s.definition.update, s.definition.init)]
             for s in sp.sympify(expand_derived(e)).atoms(Signal) if s.is_base and s not in consts}  # fmt: skip
    missing = sorted(s.name for s in given if s.name not in signals)
    if missing:
        raise SignalError(f"Rule {rule.name!r} reads {missing}; the native kernel provides {sorted(signals)}.")
    order = tuple(signals)
    access = {}
    for k, (sname, role) in enumerate(signals.items()):
        sym = next((s for s in given if s.name == sname), None)
        if sym is not None:
            access[sym] = (role, f"s{k}") if role != "global" else (role, f"(*s{k})")
    for k, c in enumerate(consts):
        access[c] = ("global", f"prm[{k}]")
    lines = [f"static void {name}(int n_post, int n_pre, const real *const *sig, const real *prm, real *st, int first,",
             "                   real *W) {"]  # fmt: skip
    lines += [f"    const real *s{k} = sig[{k}];" for k in range(len(order))]
    offset, layout = "0", []
    for k, s in enumerate(states):  # dependencies first; each state steps with the earlier ones' new values
        lines.append(f"    real *st{k} = st + {offset};  /* {s.name} */")
        access[s] = (s.role, f"st{k}" if s.role != "global" else f"st{k}[0]")
        size = {"global": "1", "post": "n_post", "pre": "n_pre", "synapse": "n_post * n_pre"}[s.role]
        offset = f"{offset} + {size}"
        layout.append((s.name, s.role))
    for s in states:
        init = _Program(access)
        init.assign(access[s][1], s.role, expand_derived(s.definition.init))
        lines += ["    if (first) {"] + init.render("        ") + ["    }", "    {"]
        step = _Program(access)
        step.assign(access[s][1], s.role, expand_derived(s.definition.update))
        lines += step.render("        ") + ["    }"]
    body = _Program(access)
    body.assign("W", "synapse", expr, "+=")
    lines += ["    {"] + body.render("        ") + ["    }", "}"]
    return CRule(name, "\n".join(lines) + "\n", order, tuple(params), tuple(layout))
