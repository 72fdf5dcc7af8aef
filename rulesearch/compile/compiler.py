r"""Compile rules to batched, differentiable torch updates.

``compile_rule(rule)`` returns a :class:`CompiledRule`, a function ``update(signals, params) -> dW`` of shape
``(B, n_post, n_pre)`` that declares the signals it ``needs``, so the inner loop computes nothing else.

How a rule is compiled
----------------------
1. Derived signals are substituted; every term is expanded into products and each product is factored into
   ``c * g * u_i * v_j * s_ij``: a number, global factors, a post vector, a pre vector and a synapse factor.
2. Products without a synapse factor (the whole paper pool but :math:`F^3`) are summed as ONE batched matmul

   .. math:: \Delta W = U \,\mathrm{diag}(\theta_r c\, g)\, V^\top,

   with one column per distinct ``(u, v)`` pair: no per-term ``(n_post, n_pre)`` temporaries, and
   :math:`y y^\top W` is never formed (:math:`F^9` uses the contraction :math:`W^\top y`).
3. Products with a synapse factor are grouped by that factor: ``dW += s * (U_s diag(.) V_s^T)`` (``s * c`` when
   the group has no vectors, e.g. weight decay).
4. Every distinct subexpression (signal, contraction, layer sum, bilinear form, elementwise function) becomes one
   instruction of a *tape* and is computed once per call in its natural shape: global ``(B,)``, post
   ``(B, n_post)``, pre ``(B, n_pre)``, synapse ``(B, n_post, n_pre)``; children are broadcast to the parent's role.

The tape is built by :class:`TorchCompiler`, a printer-style class: ``_compile_<NodeClass>`` methods found by
walking ``type(expr).__mro__``. To support a new node, add such a method; an unknown node raises
:class:`~rulesearch.errors.UnsupportedNodeError` naming it. Elementwise functions come from
:data:`TORCH_FUNCTIONS`, keyed by SymPy class name; ``functions=`` entries are consulted first.

Compiled rules are cached by structure: changing parameters never recompiles.

Examples
--------
>>> import torch
>>> from rulesearch.lang.pools import oja
>>> upd = compile_rule(oja)
>>> sorted(upd.needs)
['err', 'post', 'pre', 'w']
>>> B, n_post, n_pre = 2, 3, 4
>>> sig = {"pre": torch.rand(B, n_pre), "post": torch.rand(B, n_post), "err": torch.rand(B, n_post),
...        "w": torch.rand(B, n_post, n_pre)}
>>> upd(sig, torch.tensor([1e-3, 0.1])).shape
torch.Size([2, 3, 4])
"""

from __future__ import annotations

import functools
import json
import math
import operator
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import NamedTuple

import sympy as sp
import torch

from ..errors import InvalidRuleError, ShapeError, SignalError, UnsupportedNodeError
from ..lang.bounds import MAX_EXPONENT, check_expr_bounds
from ..lang.rule import Rule
from ..lang.signals import (
    BUILTIN_SIGNALS,
    Constant,
    Contract,
    Signal,
    expand_derived,
    pre,
    role_of,
    signals_in,
    state_signals,
    w,
)

__all__ = [
    "compile_rule",
    "CompiledRule",
    "StateSpec",
    "TorchCompiler",
    "TORCH_FUNCTIONS",
    "RuleModule",
    "BoundRule",
    "lift",
]


def _heaviside(x, h=0.5):
    # not torch.heaviside: it has no derivative, and rules are differentiated through (zero gradient a.e.)
    # SymPy's H(0) = 1/2 in three ops: the values of the general case below (0, 1/2, 1; NaN gives 1/2)
    if not isinstance(h, torch.Tensor) and h == 0.5:
        return 0.5 * torch.sign(x) + 0.5
    h = torch.as_tensor(h, dtype=x.dtype, device=x.device)
    return torch.where(x > 0, torch.ones_like(x), torch.where(x < 0, torch.zeros_like(x), h))


def _nary(fn):
    return lambda *xs: functools.reduce(fn, xs)


TORCH_FUNCTIONS: dict[str, Callable] = {
    "exp": torch.exp,
    "log": torch.log,
    "tanh": torch.tanh,
    "sinh": torch.sinh,
    "cosh": torch.cosh,
    "sin": torch.sin,
    "cos": torch.cos,
    "Abs": torch.abs,
    "sign": torch.sign,
    "erf": torch.erf,
    "atan": torch.atan,
    "Heaviside": _heaviside,
    "Max": _nary(torch.maximum),
    "Min": _nary(torch.minimum),
}

_RELATIONS = {
    "StrictGreaterThan": torch.gt,
    "StrictLessThan": torch.lt,
    "GreaterThan": torch.ge,
    "LessThan": torch.le,
}

_SHAPE_DIMS = {"global": 1, "post": 2, "pre": 2, "synapse": 3}


def lift(t, frm: str, to: str):
    """Broadcast a value of role ``frm`` so it combines with role ``to`` (numbers pass through)."""
    if frm == to or not isinstance(t, torch.Tensor) or to == "global":
        return t
    if frm == "global":
        return t.reshape(-1, 1) if to in ("post", "pre") else t.reshape(-1, 1, 1)
    return t.unsqueeze(-1) if frm == "post" else t.unsqueeze(-2)


def _role(expr) -> str:
    return "global" if not expr.free_symbols else role_of(expr)


class TorchCompiler:
    """Turns SymPy expressions into a tape of torch instructions with shared subexpressions.

    ``slot(expr)`` returns ``("const", float)`` for constant expressions (folded at compile time) or
    ``("slot", index)``; ``run(env)`` evaluates the tape into a list of tensors. ``vjps[index]`` is the
    instruction's accumulating vector-Jacobian product ``(g, args, cots) -> cots + g^T d(out)/d(args)`` (``g``: the
    cotangent of a global ``(B,)`` value as a ``(B, 1)`` column; a None cotangent is zero) where one is written by
    hand (layer sums and bilinear forms: the fast inner loop's adjoint applies them without autograd), else None.
    """

    _default_settings = {"functions": None}

    def __init__(self, settings: Mapping | None = None):
        settings = dict(settings or {})
        unknown = set(settings) - set(self._default_settings)
        if unknown:
            raise TypeError(f"Unknown setting(s) {sorted(unknown)}; known: {sorted(self._default_settings)}.")
        self._settings = {**self._default_settings, **settings}
        self.functions = {**TORCH_FUNCTIONS, **(self._settings["functions"] or {})}
        self._functions_user = dict(self._settings["functions"] or {})
        self.tape: list[tuple[Callable, tuple[int, ...]]] = []
        self.roles: list[str] = []
        self.vjps: list[Callable | None] = []
        self.kinds: set[str] = set()  # which compile paths were used
        self._memo: dict[sp.Basic, tuple[str, object]] = {}

    # ---- tape --------------------------------------------------------------------------------------------
    def _emit(self, fn, args: tuple[int, ...], role: str, vjp: Callable | None = None) -> tuple[str, int]:
        self.tape.append((fn, args))
        self.roles.append(role)
        self.vjps.append(vjp)
        return ("slot", len(self.tape) - 1)

    def slot(self, expr) -> tuple[str, object]:
        expr = sp.sympify(expr)
        if expr in self._memo:
            return self._memo[expr]
        if not expr.free_symbols:
            out = ("const", _finite_float(expr))
        else:
            out = self._compile(expr)
        self._memo[expr] = out
        return out

    def role(self, ref) -> str:
        return "global" if ref[0] == "const" else self.roles[ref[1]]

    def _compile(self, expr):
        for cls in type(expr).__mro__:
            method = getattr(self, f"_compile_{cls.__name__}", None)
            if method is not None:
                return method(expr)
        raise UnsupportedNodeError(
            f"TorchCompiler cannot compile node {type(expr).__name__} ({expr}). Add a method "
            f"`_compile_{type(expr).__name__}` to TorchCompiler, or pass functions={{'{type(expr).__name__}': fn}}."
        )

    def run(self, env: Mapping) -> list:
        vals: list = []
        append = vals.append
        for fn, args in self.tape:  # the common arities without building an argument list (an online loop's steps)
            n = len(args)
            if n == 0:
                append(fn(env))
            elif n == 1:
                append(fn(env, vals[args[0]]))
            elif n == 2:
                append(fn(env, vals[args[0]], vals[args[1]]))
            else:
                append(fn(env, *[vals[a] for a in args]))
        return vals

    @staticmethod
    def value(ref, vals):
        return ref[1] if ref[0] == "const" else vals[ref[1]]

    # ---- combining children of mixed roles -----------------------------------------------------------------
    def _combine(self, expr, children, reduce_fn):
        refs = [self.slot(c) for c in children]
        role = role_of(expr)
        consts = [r[1] for r in refs if r[0] == "const"]
        slots = [r[1] for r in refs if r[0] == "slot"]
        lifts = tuple((self.roles[s], role) for s in slots)
        const = functools.reduce(reduce_fn, consts) if consts else None
        if all(a == b or b == "global" for a, b in lifts):  # no child is broadcast (lift is the identity)
            if const is None:
                if len(slots) == 2:  # the same operation as the reduction below, without its call
                    return self._emit(lambda env, x, y: reduce_fn(x, y), tuple(slots), role)
                return self._emit(lambda env, *xs: functools.reduce(reduce_fn, xs), tuple(slots), role)
            if len(slots) == 1:
                return self._emit(lambda env, x: reduce_fn(x, const), tuple(slots), role)
            return self._emit(lambda env, *xs: reduce_fn(functools.reduce(reduce_fn, xs), const), tuple(slots), role)

        def fn(env, *xs):
            out = functools.reduce(reduce_fn, [lift(x, a, b) for x, (a, b) in zip(xs, lifts)])
            return out if const is None else reduce_fn(out, const)

        return self._emit(fn, tuple(slots), role)

    def _compile_Add(self, expr):
        return self._combine(expr, expr.args, operator.add)

    def _compile_Mul(self, expr):
        return self._combine(expr, expr.args, operator.mul)

    def _compile_Pow(self, expr):
        base, ex = expr.args
        if not (ex.is_Integer and int(ex) in (1, 2, 3)):
            self.kinds.add("elementwise")
        rb, re_ = self.slot(base), self.slot(ex)
        role = role_of(expr)
        if re_[0] == "const":
            e = re_[1]
            if abs(e) > MAX_EXPONENT:
                raise InvalidRuleError(
                    f"Power {sp.sstr(expr)[:60]}: numeric exponents are limited to +-{MAX_EXPONENT}."
                )
            e = int(e) if float(e).is_integer() else e
            if e == 2:
                return self._emit(lambda env, x: x * x, (rb[1],), role)
            return self._emit(lambda env, x: torch.pow(x, e), (rb[1],), role)
        lb, le = (self.role(rb), role), (self.role(re_), role)
        if rb[0] == "const":
            b = rb[1]
            return self._emit(lambda env, y: torch.pow(torch.as_tensor(b, dtype=y.dtype, device=y.device), y),
                              (re_[1],), role)  # fmt: skip
        return self._emit(lambda env, x, y: torch.pow(lift(x, *lb), lift(y, *le)), (rb[1], re_[1]), role)

    def _compile_Application(self, expr):
        name = type(expr).__name__
        fn = self.functions.get(name)
        if fn is None:
            raise UnsupportedNodeError(
                f"No torch function for {name} in {expr}. Pass functions={{'{name}': torch_fn}} to compile_rule; "
                f"known: {sorted(self.functions)}."
            )
        self.kinds.add("elementwise")
        refs = [self.slot(a) for a in expr.args]
        role = role_of(expr)
        consts = {i: r[1] for i, r in enumerate(refs) if r[0] == "const"}
        slots = [r[1] for r in refs if r[0] == "slot"]
        lifts = [(self.roles[s], role) for s in slots]
        if not consts and all(a == b or b == "global" for a, b in lifts):  # lift is the identity: fn of the values
            return self._emit(lambda env, *xs: fn(*xs), tuple(slots), role)

        def call(env, *xs):
            it = iter(lift(x, *lf) for x, lf in zip(xs, lifts))
            args = [consts[i] if i in consts else next(it) for i in range(len(refs))]
            if name in ("Max", "Min") and consts:
                t = next(a for a in args if isinstance(a, torch.Tensor))
                args = [torch.as_tensor(a, dtype=t.dtype, device=t.device) if not isinstance(a, torch.Tensor) else a
                        for a in args]  # fmt: skip
            return fn(*args)

        return self._emit(call, tuple(slots), role)

    def _compile_Piecewise(self, expr):
        self.kinds.add("elementwise")
        role = role_of(expr)
        out = None
        for e, c in reversed(expr.args):
            val = self.slot(e)
            if c is sp.true:
                out = val
                continue
            cond = self._relation(c, role)
            prev = out if out is not None else ("const", float("nan"))
            out = self._where(cond, val, prev, role)
        return out

    def _relation(self, c, role):
        name = type(c).__name__
        if name not in _RELATIONS:
            raise UnsupportedNodeError(f"Piecewise condition {c} ({name}) is not supported; use >, <, >=, <=.")
        op = _RELATIONS[name]
        a, b = self.slot(c.lhs), self.slot(c.rhs)

        def fn(env, *xs):
            it = iter(xs)
            xa = lift(next(it), self.role(a), role) if a[0] == "slot" else a[1]
            xb = lift(next(it), self.role(b), role) if b[0] == "slot" else b[1]
            return op(xa, xb) if isinstance(xa, torch.Tensor) else _flip(op)(xb, xa)

        return self._emit(fn, tuple(r[1] for r in (a, b) if r[0] == "slot"), role)

    def _where(self, cond, a, b, role):
        def fn(env, c, *xs):
            it = iter(xs)
            xa = lift(next(it), self.role(a), role) if a[0] == "slot" else a[1]
            xb = lift(next(it), self.role(b), role) if b[0] == "slot" else b[1]
            if not isinstance(xa, torch.Tensor):  # dtype and device of the other branch or of the signals
                like = xb if isinstance(xb, torch.Tensor) else _reference_tensor(env["signals"])
                xa = torch.as_tensor(xa, dtype=like.dtype, device=like.device)
            return torch.where(c, xa, xb)

        return self._emit(fn, (cond[1], *(r[1] for r in (a, b) if r[0] == "slot")), role)

    # ---- leaves and operators ------------------------------------------------------------------------------
    def _compile_Signal(self, expr):
        name = expr.name
        if isinstance(expr, Constant):
            return self._emit(lambda env: env["params"][name], (), "global")
        return self._emit(lambda env: env["signals"][name], (), expr.role)

    def _compile_Symbol(self, expr):
        role_of(expr)  # raises the informative error

    def _compile_Contract(self, expr):
        self.kinds.add("contraction")
        M, u = expr.args
        rm, ru = self.slot(M), self.slot(u)
        if self.role(ru) == "post":  # (M^T u)_j
            return self._emit(lambda env, m, x: _contract(m, x, True), (rm[1], ru[1]), "pre")
        return self._emit(lambda env, m, x: _contract(m, x, False), (rm[1], ru[1]), "post")

    def _compile_LayerSum(self, expr):
        return self._layer_reduction(expr, lambda env, x: x.sum(-1), _sum_vjp)

    def _compile_LayerMean(self, expr):
        return self._layer_reduction(expr, lambda env, x: x.mean(-1), _mean_vjp)

    def _layer_reduction(self, expr, fn, vjp):
        self.kinds.add("contraction")
        ru = self.slot(expr.args[0])
        return self._emit(fn, (ru[1],), "global", vjp)

    def _compile_Bilinear(self, expr):
        self.kinds.add("bilinear")
        u, M, v = expr.args
        if M == w and v == pre:  # u^T (W x): W x is the pre-activation z, which the fast inner loop already has
            left, right = self.slot(Contract(M, v)), self.slot(u)
        else:  # (M^T u)^T v: M^T u is shared with any F9-like term
            left, right = self.slot(Contract(M, u)), self.slot(v)
        return self._emit(lambda env, a, b: torch.linalg.vecdot(a, b), (left[1], right[1]), "global", _vecdot_vjp)

    def _compile_Reindex(self, expr):
        self.kinds.add("reindex")  # the same tensor read with the other index; CompiledRule checks n_post == n_pre
        ru = self.slot(expr.args[0])
        role = "pre" if self.role(ru) == "post" else "post"
        return self._emit(lambda env, x: x, (ru[1],), role)

    def _compile_OrderedContract(self, expr):
        self.kinds.add("contraction")
        u, M = expr.args
        ru, rm = self.slot(u), self.slot(M)
        return self._emit(lambda env, x, m: torch.cumsum(x.unsqueeze(-1) * m, dim=-2), (ru[1], rm[1]), "synapse")


def _sum_vjp(g, args, cots):
    """``s = sum_k x_k``, ``x`` ``(B, n)``, ``ds = g`` ``(B, 1)``: ``c_x + g`` (broadcast; a view if ``c_x`` is
    zero)."""
    (x,), (cx,) = args, cots
    return (g.expand_as(x) if cx is None else cx + g,)


def _mean_vjp(g, args, cots):
    """``s = mean_k x_k``, ``x`` ``(B, n)``: the sum's VJP with ``g / n``."""
    return _sum_vjp(g / args[0].shape[-1], args, cots)


def _vecdot_vjp(g, args, cots):
    """``s = a . b``, ``a``, ``b`` ``(B, n)``, ``ds = g`` ``(B, 1)``: ``(c_a + g b, c_b + g a)``."""
    (a, b), (ca, cb) = args, cots
    return (g * b if ca is None else torch.addcmul(ca, g, b)), (g * a if cb is None else torch.addcmul(cb, g, a))


def _contract(m, x, transpose: bool):
    """``M^T x`` (``transpose``) or ``M x`` for vectors ``x`` ``(B, n)``; ``m`` is a tensor or a matrix operand with
    methods ``vm(x)`` and ``mv(x)`` (the inner loop's fast path passes the weights this way)."""
    if not isinstance(m, torch.Tensor):
        return m.vm(x) if transpose else m.mv(x)
    if m.dim() == 3 and m.stride(0) == 0:  # one matrix shared by the batch (an expanded view): one 2-D matmul
        return x @ m[0] if transpose else x @ m[0].T
    if transpose:
        return torch.matmul(x.unsqueeze(-2), m).squeeze(-2)
    return torch.matmul(m, x.unsqueeze(-1)).squeeze(-1)


def _flip(op):
    return {torch.gt: torch.lt, torch.lt: torch.gt, torch.ge: torch.le, torch.le: torch.ge}[op]


# ------------------------------------------------------------------------------------------------------------
# Factoring a rule into products


@dataclass(frozen=True)
class _Product:
    r: int | None  # coefficient index (linear rules)
    c: float
    g: sp.Expr  # global factor (1 if none)
    u: sp.Expr  # post vector (1 if none)
    v: sp.Expr  # pre vector (1 if none)
    s: sp.Expr  # synapse factor (1 if none)


_MAX_EXPANDED = 256


def _products(expr, r) -> list[_Product]:
    expanded = sp.expand(expr, deep=False, power_base=False, power_exp=False, log=False)
    if len(sp.Add.make_args(expanded)) > _MAX_EXPANDED:
        expanded = expr
    out = []
    for term in sp.Add.make_args(expanded):
        if term == 0:
            continue
        c, factors = term.as_coeff_mul()
        parts = {"global": [], "post": [], "pre": [], "synapse": []}
        for f in factors:
            if not f.free_symbols:
                c *= f
            else:
                parts[role_of(f)].append(f)
        cval = _finite_float(sp.sympify(c))
        out.append(_Product(r, cval, *(sp.Mul(*parts[k]) for k in ("global", "post", "pre", "synapse"))))
    return out


def _finite_float(expr) -> float:
    """A constant subexpression as a finite float64 (:class:`InvalidRuleError` otherwise)."""
    try:
        x = float(expr.evalf())
    except (TypeError, OverflowError) as e:
        raise InvalidRuleError(f"Constant subexpression {sp.sstr(expr)[:60]} is not a finite real number.") from e
    if not math.isfinite(x):
        raise InvalidRuleError(f"Constant subexpression {sp.sstr(expr)[:60]} is {x} in float64; use smaller numbers.")
    return x


class FactorGroup(NamedTuple):
    """The products of a compiled rule that share one synapse factor ``s``: ``dW += s * (U diag(C[cols]) V^T)``,
    one column of ``C`` per distinct ``(u, v)`` pair, or ``dW += s * (C[cols] . consts)`` without vectors. Vectors
    and factors are tape references, ``("slot", i)`` or ``("const", x)``."""

    synapse: tuple | None  # the synapse factor's tape reference; None for 1 (the fused outer products)
    cols: list[int]  # its columns of the coefficient matrix A
    us: list[tuple]  # per column: the post vector
    vs: list[tuple]  # per column: the pre vector
    consts: torch.Tensor | None  # without vectors (all u, v constant): u * v per column, else None


@dataclass(frozen=True)
class StateSpec:
    """A derived signal carried across online steps: ``s = step(prev, signals)``; ``prev = init(signals)`` first.
    A compiled rule's specs also take ``shape=`` (the state's shape, when the caller knows it)."""

    name: str
    role: str
    init: Callable
    step: Callable
    needs: frozenset


class CompiledRule:
    r"""A batched torch update :math:`\Delta W = \sum_r \theta_r T^r` compiled from a :class:`Rule`.

    Call as ``update(signals, params)``: ``signals`` maps names to tensors (post ``(B, n_post)``, pre
    ``(B, n_pre)``, synapse ``(B, n_post, n_pre)``, global ``(B,)``, or ``()`` for one value broadcast to every
    episode); ``params`` is ``theta`` of shape ``(R,)`` or ``(B, R)`` for a linear rule, or a dict of constants
    (tensors of shape ``()`` or ``(B,)``, or Python numbers) for a general rule. Every tensor has the dtype and
    device of the signals (one floating-point dtype); nothing else is broadcast or converted, except Python numbers.
    Returns ``dW`` of shape ``(B, n_post, n_pre)`` in that dtype.

    Attributes
    ----------
    needs : frozenset of str
        Base signals read (the inner loop computes only these), states included.
    states : tuple of StateSpec
        Stateful derived signals, dependencies first.
    paths : frozenset of str
        Compile paths used: ``outer``, ``synapse``, ``contraction``, ``bilinear``, ``elementwise``, ``reindex``.

    :meth:`batch_mean` gives the update averaged over the batch, for a network whose weights the batch shares;
    :meth:`bind` validates once for an online loop whose signals keep their shapes (:class:`BoundRule`).
    """

    def __init__(self, rule: Rule, functions: Mapping | None = None):
        self.rule = rule
        self.n_params = rule.n_params
        comp = TorchCompiler({"functions": functions})
        try:  # derived signals' definitions are bounded here, where they are expanded
            expanded = [expand_derived(t.expr) for t in rule.terms] if rule.is_linear else [expand_derived(rule.expr)]
        except RecursionError:
            raise InvalidRuleError(f"Rule {rule.name!r}: its derived signals nest too deeply to compile.") from None
        for e in expanded:
            check_expr_bounds(e, f"Rule {rule.name!r}")
        if rule.is_linear:
            prods = [p for r, e in enumerate(expanded) for p in _products(e, r)]
        else:
            prods = _products(expanded[0], None)
        self._linear = rule.is_linear
        self._const_names = tuple(c.name for c in rule.constants)

        # groups by synapse factor; pairs (u, v) within a group; a column per pair
        groups: dict[sp.Expr, dict[tuple, list[int]]] = {}
        for k, p in enumerate(prods):
            groups.setdefault(p.s, {}).setdefault((p.u, p.v), []).append(k)
        pairs = [(s, uv) for s, d in groups.items() for uv in d]
        A = torch.zeros(len(prods), len(pairs), dtype=torch.float64)
        for col, (s, uv) in enumerate(pairs):
            A[groups[s][uv], col] = 1.0
        self._A = A
        self._g_idx = [k for k, p in enumerate(prods) if p.g != 1]
        self._g_all = len(self._g_idx) == len(prods)  # every product has a global factor
        self._r_idx = torch.tensor([p.r if p.r is not None else 0 for p in prods], dtype=torch.long)
        self._c = torch.tensor([p.c for p in prods], dtype=torch.float64)
        self._g = [(k, comp.slot(p.g)) for k, p in enumerate(prods) if p.g != 1]
        one = ("const", 1.0)
        self._groups: list[FactorGroup] = []
        col = 0
        for s, d in groups.items():
            cols = list(range(col, col + len(d)))
            col += len(d)
            us = [comp.slot(u) if u != 1 else one for (u, _v) in d]
            vs = [comp.slot(v) if v != 1 else one for (_u, v) in d]
            consts = None  # a group without vectors reduces to one scale per episode
            if all(u[0] == "const" for u in us) and all(v[0] == "const" for v in vs):
                consts = torch.tensor([u[1] * v[1] for u, v in zip(us, vs)], dtype=torch.float64)
            self._groups.append(FactorGroup(None if s == 1 else comp.slot(s), cols, us, vs, consts))
            if s == 1:
                comp.kinds.add("outer")
            else:
                comp.kinds.add("synapse")
        # the fused outer products first: later groups accumulate into their result in place
        self._groups.sort(key=lambda grp: grp.synapse is not None)
        self._comp = comp

        # states and needs
        self.states = tuple(self._state_spec(s, functions) for s in self._state_signals())
        base = set()
        for e in self._exprs():
            base |= {s.name for s in signals_in(expand_derived(e)) if s.is_base}
        for st in self.states:
            base |= st.needs
        # the shape (B, n_post, n_pre) must be readable from the signals: add post / pre only when nothing else
        # (a post, pre or synapse signal) gives n_post / n_pre, e.g. for a rule of global signals only
        given = {BUILTIN_SIGNALS[n].role for n in base}
        if not given & {"post", "synapse"}:
            base.add("post")
        if not given & {"pre", "synapse"}:
            base.add("pre")
        self.needs = frozenset(base)
        self.paths = frozenset(comp.kinds | {k for st in self.states for k in getattr(st, "_kinds", ())})
        self._roles = {n: BUILTIN_SIGNALS[n].role for n in self.needs}
        self._roles.update({st.name: st.role for st in self.states})

    def _exprs(self):
        return [t.expr for t in self.rule.terms] if self._linear else [self.rule.expr]

    def _state_signals(self):
        seen: list[Signal] = []
        for e in self._exprs():
            for s in state_signals(e):
                if s not in seen:
                    seen.append(s)
        return seen

    @staticmethod
    def _state_spec(sig: Signal, functions) -> StateSpec:
        comp, comp0 = TorchCompiler({"functions": functions}), TorchCompiler({"functions": functions})
        upd = comp.slot(expand_derived(sig.definition.update))
        ini = comp0.slot(expand_derived(sig.definition.init))
        role, name = sig.role, sig.name
        needs = frozenset(
            s.name
            for e in (sig.definition.update, sig.definition.init)
            for s in signals_in(expand_derived(e))
            if s.is_base
        )

        def shaped(x, signals, shape):
            shape = _role_shape(role, signals) if shape is None else shape
            if not isinstance(x, torch.Tensor):
                ref = _reference_tensor(signals)
                return torch.full(shape, float(x), dtype=ref.dtype, device=ref.device)
            if x.shape == shape:
                return x
            return lift(x, _role_of_value(x, role), role).expand(shape)

        def init(signals, shape=None):
            vals = comp0.run({"signals": signals, "params": {}})
            return shaped(TorchCompiler.value(ini, vals), signals, shape)

        def step(prev, signals, shape=None):
            env = {"signals": {**signals, name: prev}, "params": {}}
            vals = comp.run(env)
            return shaped(TorchCompiler.value(upd, vals), signals, shape)

        spec = StateSpec(name, role, init, step, needs)
        object.__setattr__(spec, "_kinds", frozenset(comp.kinds | comp0.kinds))
        return spec

    # ---- call ----------------------------------------------------------------------------------------------
    def _check(self, signals: Mapping):
        missing = sorted(n for n in self._roles if n not in signals)
        if missing:
            raise SignalError(
                f"Rule {self.rule.name!r} needs signals {missing}, which were not given (got {sorted(signals)}). "
                f"Pass them in the signals dict; the inner loop provides every name in `update.needs`."
            )
        # synapse signals first, then by name: deterministic, and the weights fix (n_post, n_pre) when given
        order = sorted(self._roles, key=lambda n: (self._roles[n] != "synapse", n))
        known: dict[str, tuple[int, str]] = {}  # dimension -> (size, name of the signal that fixed it)
        axes = {"global": ("B",), "post": ("B", "n_post"), "pre": ("B", "n_pre"), "synapse": ("B", "n_post", "n_pre")}
        like, scalars = None, []  # the first signal fixes dtype and device; 0-d globals are broadcast to (B,)
        for n in order:
            role, t = self._roles[n], signals[n]
            if not isinstance(t, torch.Tensor):
                raise ShapeError(f"Signal {n!r} must be a torch.Tensor, got {type(t).__name__}.")
            if like is None:
                if not t.is_floating_point():
                    raise ShapeError(f"Signal {n!r} has dtype {t.dtype}; expected a floating-point dtype.")
                like, like_name = t, n
            elif t.dtype != like.dtype or t.device != like.device:
                raise ShapeError(
                    f"Signal {n!r} has dtype {t.dtype} on {t.device}; expected {like.dtype} on {like.device} like "
                    f"{like_name!r}. Give every signal one floating-point dtype and device (e.g. .to(w))."
                )
            if role == "global" and t.dim() == 0:
                scalars.append(n)
                continue
            if t.dim() != _SHAPE_DIMS[role]:
                raise ShapeError(
                    f"Signal {n!r} ({role}) has shape {tuple(t.shape)}; expected {_SHAPE_NAMES[role]}"
                    + (" or () (one value for every episode)." if role == "global" else ".")
                )
            bad = [(ax, size) for ax, size in zip(axes[role], t.shape) if ax in known and known[ax][0] != size]
            if bad:
                expected = tuple(known[ax][0] if ax in known else ax for ax in axes[role])
                why = ", ".join(f"{ax}={known[ax][0]} from signal {known[ax][1]!r}" for ax, _ in bad)
                raise ShapeError(
                    f"Signal {n!r} ({role}) has shape {tuple(t.shape)}; expected {_SHAPE_NAMES[role]} = "
                    f"{expected} ({why}). All signals of one call must share B, n_post and n_pre."
                )
            for ax, size in zip(axes[role], t.shape):
                known.setdefault(ax, (size, n))
        B, n_post, n_pre = (known[ax][0] if ax in known else None for ax in ("B", "n_post", "n_pre"))
        if "reindex" in self.paths and n_post != n_pre:
            raise ShapeError(
                f"Rule {self.rule.name!r} reads a vector with the other index (as_pre/as_post), which needs a "
                f"recurrent layer (n_post == n_pre); got n_post={n_post}, n_pre={n_pre}. Use it with a recurrent "
                f"network such as FixedPointNetwork, or drop as_pre/as_post."
            )
        if scalars:
            signals = {**signals, **{n: signals[n].expand(B) for n in scalars}}
        return B, n_post, n_pre, signals, like

    def _params(self, params, B: int, like: torch.Tensor):
        """Validated ``params``: ``theta`` of shape ``(R,)`` or ``(B, R)`` (linear), or the general rule's constants
        (:func:`_general_params`), all in the dtype and device of ``like``. Also used once per run by the inner
        loop's fast path, which skips the per-call checks."""
        if not self._linear:
            return _general_params(params, self._const_names, self.rule.name, B, like)
        theta = params
        if not isinstance(theta, torch.Tensor):
            raise ShapeError(f"theta must be a tensor of shape (R,) or (B, R) with R={self.n_params}.")
        if theta.shape[-1:] != (self.n_params,) or theta.dim() > 2 or (theta.dim() == 2 and theta.shape[0] != B):
            raise ShapeError(
                f"theta has shape {tuple(theta.shape)}; expected ({self.n_params},) or ({B}, {self.n_params}) "
                f"for rule {self.rule.name!r} with terms {list(self.rule.term_names())}."
            )
        _check_like(theta, "theta", like)
        _check_finite(theta, "theta")
        return theta

    def _base(self, params, ref):
        """Per product, ``theta_r c`` (linear) or ``c`` (general): the coefficients before global factors."""
        if self._linear:
            return params.index_select(-1, self._r_idx.to(params.device)) * self._c.to(params)
        return self._c.to(ref)

    def _coefficients(self, params, vals, B, ref, base=None, A=None):
        """The coefficient of each ``(u, v)`` column, ``(pairs,)`` or ``(B, pairs)``; ``base`` (:meth:`_base`) and
        ``A`` (in the dtype of the signals) when the caller has them at hand (:class:`BoundRule`)."""
        P = self._base(params, ref) if base is None else base
        if self._g:
            gv = torch.stack([torch.broadcast_to(TorchCompiler.value(r, vals), (B,)) for _, r in self._g], -1)
            if self._g_all:  # the values of the general case below, in one product
                P = P * gv
            else:
                P = P.expand(B, -1).clone()
                P[:, self._g_idx] = P[:, self._g_idx] * gv
        return P @ (self._A.to(P) if A is None else A)

    def bind(self, signals: Mapping, params) -> BoundRule:
        """Validate ``signals`` and ``params`` once, as a call does, and return a :class:`BoundRule` that computes
        the update for later signals of the same names, shapes, dtype and device (the steps of an online loop) with
        these ``params``. The rule's states need not be in ``signals`` (the bound rule steps them,
        :meth:`BoundRule.advance`)."""
        return BoundRule(self, signals, params)

    def __call__(self, signals: Mapping, params) -> torch.Tensor:
        B, n_post, n_pre, signals, ref = self._check(signals)
        params = self._params(params, B, ref)
        vals = self._comp.run({"signals": signals, "params": params})
        C = self._coefficients(params, vals, B, ref)  # [pairs] or [B, pairs]
        return self._assemble(vals, C, (B, n_post, n_pre), ref)

    def _assemble(self, vals, C, full, ref) -> torch.Tensor:
        """``dW`` ``full`` = ``(B, n_post, n_pre)`` from the tape's values and the coefficients ``C``."""
        B, n_post, n_pre = full
        # dW is accumulated in place once it is a full-size tensor created in this call (``owned``): at most one
        # (B, n_post, n_pre) temporary besides dW itself. Safe for autograd: no backward formula used here
        # (matmul, mul, add, addcmul) needs the value of its output or of the accumulator.
        dW, owned = None, False
        for s_ref, cols, us, vs, consts in self._groups:
            c = C if len(cols) == C.shape[-1] else C[..., cols]  # cols are in order: one group takes all
            if consts is not None:
                scale = (c * consts.to(c)).sum(-1)
                inner, fresh = (scale.reshape(-1, 1, 1) if scale.dim() else scale), False
            else:
                U = torch.stack([_col(u, vals, (B, n_post), ref) for u in us], -1)
                V = torch.stack([_col(v, vals, (B, n_pre), ref) for v in vs], -1)
                inner, fresh = torch.matmul(U * c.unsqueeze(-2), V.transpose(-1, -2)), True
            s = None if s_ref is None else lift(TorchCompiler.value(s_ref, vals), self._comp.role(s_ref), "synapse")
            if dW is None:
                dW, owned = (inner, fresh) if s is None else (s * inner, True)
            elif owned and dW.shape == full:
                dW = dW.add_(inner) if s is None else dW.addcmul_(s, inner)
            else:
                dW, owned = (dW + inner) if s is None else torch.addcmul(dW, s, inner), True
            owned = owned and dW.shape == full
        if dW is None:
            return torch.zeros(full, dtype=ref.dtype, device=ref.device)
        return dW.expand(full) if dW.shape != full else dW

    def batch_mean(self, signals: Mapping, params) -> torch.Tensor:
        r"""The batch average :math:`\frac1B \sum_b \Delta W_b` ``(n_post, n_pre)`` of :meth:`__call__`, for weights
        shared by the batch (pass ``w`` as ``W.expand(B, n_post, n_pre)``, a view).

        Outer products are summed as one matrix product, :math:`\frac1B [U_1 C_1, \dots, U_B C_B]
        [V_1, \dots, V_B]^\top`, and a synapse factor shared by the batch (an expanded view) multiplies the average,
        so no ``(B, n_post, n_pre)`` tensor is formed; a per-sample synapse factor is averaged in full.
        """
        B, n_post, n_pre, signals, ref = self._check(signals)
        params = self._params(params, B, ref)
        vals = self._comp.run({"signals": signals, "params": params})
        C = self._coefficients(params, vals, B, ref).expand(B, -1)  # (B, pairs)
        out = torch.zeros((n_post, n_pre), dtype=ref.dtype, device=ref.device)
        for s_ref, cols, us, vs, consts in self._groups:
            c = C[:, cols]
            s = None if s_ref is None else lift(TorchCompiler.value(s_ref, vals), self._comp.role(s_ref), "synapse")
            if consts is not None:
                per_sample = (c * consts.to(c)).sum(-1)  # (B,)
                if s is None:
                    out += per_sample.mean()
                elif _shared(s):
                    out += s[0] * per_sample.mean()
                else:
                    out += (s * per_sample.reshape(-1, 1, 1)).mean(0)
                continue
            U = torch.stack([_col(u, vals, (B, n_post), ref) for u in us], -1) * c.unsqueeze(-2)  # (B, n_post, k)
            V = torch.stack([_col(v, vals, (B, n_pre), ref) for v in vs], -1)  # (B, n_pre, k)
            if s is None or _shared(s):
                mean = U.transpose(0, 1).reshape(n_post, -1) @ V.transpose(0, 1).reshape(n_pre, -1).T / B
                out += mean if s is None else s[0] * mean
            else:
                out += (s * torch.matmul(U, V.transpose(-1, -2))).mean(0)
        return out

    def __repr__(self):
        return f"CompiledRule({self.rule.name!r}, needs={sorted(self.needs)}, paths={sorted(self.paths)})"


class BoundRule:
    """A compiled rule bound to its parameters and to the shapes, dtype and device of an online loop's signals
    (:meth:`CompiledRule.bind`). ``bound(signals)`` is ``update(signals, params)`` (the same operations, so the same
    values) without the per-call validation and without recomputing what depends on ``params`` alone;
    :meth:`advance` steps the rule's states. The caller keeps the shapes it bound (nothing is re-checked)."""

    __slots__ = (
        "update",
        "params",
        "full",
        "ref",
        "_base",
        "_A",
        "_scalars",
        "_states",
        "_g1",
        "_eye",
        "_outer",
        "_base3",
    )

    def __init__(self, update: CompiledRule, signals: Mapping, params):
        example = dict(signals)
        for spec in update.states:  # the states' initial values stand in for states not given
            if spec.name not in example:
                example[spec.name] = spec.init(example)
        B, n_post, n_pre, checked, ref = update._check(example)
        self.update, self.full = update, (B, n_post, n_pre)
        self.ref = torch.empty((), dtype=ref.dtype, device=ref.device)
        self.params = update._params(params, B, ref)
        self._base = update._base(self.params, ref)
        self._base3 = self._base.unsqueeze(-2)
        self._A = update._A.to(self._base)
        self._scalars = tuple(n for n in update._roles if update._roles[n] == "global" and example[n].dim() == 0)
        self._states = tuple((spec, _role_shape(spec.role, example)) for spec in update.states)
        # Shortcuts for the common form of a reward-modulated rule, each giving the values of the general path:
        # one global factor (one tape slot) shared by every product, multiplied in as a column instead of a stacked
        # copy per product (``_g1``); the product with ``A`` skipped where ``A`` is the identity (``_eye``: x * 1 +
        # y * 0 = x for finite coefficients); and one group of outer products of tape vectors of the full shapes,
        # assembled by one bmm (``_outer``; ``torch.matmul`` of these 3-D operands is that bmm).
        g_refs = {ref_ for _, ref_ in update._g}
        g1 = next(iter(g_refs)) if update._g_all and len(g_refs) == 1 else None
        self._g1 = g1[1] if g1 is not None and g1[0] == "slot" else None
        n = update._A.shape[0]
        self._eye = update._A.shape == (n, n) and torch.equal(update._A, torch.eye(n, dtype=update._A.dtype))
        self._outer = None
        groups = update._groups
        if len(groups) == 1 and groups[0].synapse is None and groups[0].consts is None:
            us, vs = groups[0].us, groups[0].vs
            if all(r[0] == "slot" for r in (*us, *vs)):
                vals = update._comp.run({"signals": checked, "params": self.params})
                shapes = [(vals[i], (B, n_post)) for _, i in us] + [(vals[i], (B, n_pre)) for _, i in vs]
                if all(isinstance(x, torch.Tensor) and x.shape == shape for x, shape in shapes):
                    self._outer = (tuple(i for _, i in us), tuple(i for _, i in vs))

    def advance(self, states: dict, signals: dict) -> None:
        """Step the rule's states in order (each initialised on its first step): ``states[name]`` and
        ``signals[name]`` become the new values."""
        for spec, shape in self._states:
            prev = states.get(spec.name)
            prev = spec.init(signals, shape) if prev is None else prev
            states[spec.name] = signals[spec.name] = spec.step(prev, signals, shape)

    def __call__(self, signals: Mapping) -> torch.Tensor:
        u, B = self.update, self.full[0]
        if self._scalars:
            signals = {**signals, **{n: signals[n].expand(B) for n in self._scalars}}
        vals = u._comp.run({"signals": signals, "params": self.params})
        if self._g1 is None:
            C = u._coefficients(self.params, vals, B, self.ref, self._base, self._A)
        else:
            g = vals[self._g1]
            if self._outer is not None and self._eye:  # the coefficients as (B, 1, pairs), ready for U * C
                C = self._base3 * (g.view(B, 1, 1) if g.shape == (B,) else g.expand(B).view(B, 1, 1))
            else:
                C = self._base * torch.broadcast_to(g, (B,)).unsqueeze(-1)
                if not self._eye:
                    C = C @ self._A
        if self._outer is None:
            return u._assemble(vals, C, self.full, self.ref)
        ui, vi = self._outer
        U = torch.stack([vals[i] for i in ui], -1)
        V = torch.stack([vals[i] for i in vi], -1)
        return torch.bmm(U * (C if C.dim() == 3 else C.unsqueeze(-2)), V.transpose(-1, -2))


_SHAPE_NAMES = {"global": "(B,)", "post": "(B, n_post)", "pre": "(B, n_pre)", "synapse": "(B, n_post, n_pre)"}


def _shared(s) -> bool:
    """A synapse value shared by the batch: a ``(1, ., .)`` tensor or an expanded view (batch stride 0)."""
    return isinstance(s, torch.Tensor) and s.dim() == 3 and (s.shape[0] == 1 or s.stride(0) == 0)


def _col(ref, vals, shape, like):
    x = TorchCompiler.value(ref, vals)
    if not isinstance(x, torch.Tensor):
        return torch.full(shape, float(x), dtype=like.dtype, device=like.device)
    if x.shape == shape:
        return x
    return torch.broadcast_to(x.reshape(-1, 1) if x.dim() <= 1 and len(shape) == 2 else x, shape)


def _reference_tensor(signals: Mapping) -> torch.Tensor:
    for v in signals.values():
        if isinstance(v, torch.Tensor) and v.is_floating_point():
            return v
    raise SignalError("No floating-point signal tensor was given; cannot infer dtype and device.")


def _role_shape(role, signals):
    dims = {}
    for n, t in signals.items():
        sig = BUILTIN_SIGNALS.get(n)
        if sig is None or not isinstance(t, torch.Tensor) or t.dim() == 0:  # a 0-d global gives no size
            continue
        dims["B"] = t.shape[0]
        if sig.role == "post":
            dims["post"] = t.shape[1]
        elif sig.role == "pre":
            dims["pre"] = t.shape[1]
        elif sig.role == "synapse":
            dims["post"], dims["pre"] = t.shape[1], t.shape[2]
    try:
        return {"global": (dims["B"],), "post": (dims["B"], dims["post"]), "pre": (dims["B"], dims["pre"]),
                "synapse": (dims["B"], dims["post"], dims["pre"])}[role]  # fmt: skip
    except KeyError:
        raise SignalError(f"Cannot infer the shape of a {role} state from signals {sorted(signals)}.") from None


def _role_of_value(x: torch.Tensor, role: str) -> str:
    return {1: "global", 3: "synapse"}.get(x.dim(), role) if x.dim() != _SHAPE_DIMS[role] else role


def _check_finite(t: torch.Tensor, name: str) -> None:
    if not bool(torch.isfinite(t.detach()).all()):
        raise InvalidRuleError(
            f"{name} contains NaN or inf ({t.detach().flatten()[:8].tolist()}...). The meta-optimizer diverged or "
            f"the values were loaded from a corrupt file; restart from a finite checkpoint."
        )


def _check_like(t: torch.Tensor, name: str, like: torch.Tensor) -> None:
    if t.dtype != like.dtype or t.device != like.device:
        raise ShapeError(
            f"{name} has dtype {t.dtype} on {t.device}; expected the signals' {like.dtype} on {like.device}. "
            f"Create it with dtype= and device= of the signals, or convert it with .to(signal)."
        )


def _general_params(params, names, rule_name, B: int, like: torch.Tensor) -> dict:
    """The constants of a general rule as tensors of shape ``()`` or ``(B,)`` with the dtype and device of ``like``;
    Python numbers are converted."""
    if not isinstance(params, Mapping):
        raise ShapeError(
            f"General rule {rule_name!r} takes a dict of constants {list(names)}, got {type(params).__name__}."
        )
    missing = [n for n in names if n not in params]
    if missing:
        raise SignalError(f"General rule {rule_name!r} needs constants {missing}; got {sorted(params)}.")
    out = {}
    for n in names:
        v = params[n]
        if not isinstance(v, torch.Tensor):
            v = torch.as_tensor(float(v), dtype=like.dtype, device=like.device)
        elif v.shape not in ((), (B,)):
            raise ShapeError(
                f"Constant {n!r} of general rule {rule_name!r} has shape {tuple(v.shape)}; expected () (shared) or "
                f"({B},) (one value per episode, B={B})."
            )
        _check_like(v, f"constant {n!r}", like)
        _check_finite(v, f"constant {n!r}")
        out[n] = v
    return out


def _cache_key(rule: Rule) -> str:
    return json.dumps(Rule.to_json(rule.with_values(None)), sort_keys=True)


@functools.lru_cache(maxsize=256)
def _compile_cached(key: str, functions_key) -> CompiledRule:
    return CompiledRule(Rule.from_json(json.loads(key)))


def compile_rule(rule: Rule, functions: Mapping[str, Callable] | None = None) -> CompiledRule:
    """Compile a rule to a batched torch update; cached by structure (values never recompile).

    ``functions`` maps SymPy function class names to torch callables and is consulted before the built-ins.
    """
    if not isinstance(rule, Rule):
        raise InvalidRuleError(f"compile_rule expects a Rule, got {type(rule).__name__}.")
    if functions:
        return CompiledRule(rule, functions)
    return _compile_cached(_cache_key(rule), None)


class RuleModule(torch.nn.Module):
    """A rule as a ``torch.nn.Module``: coefficients are Parameters; ``sympy()`` returns trained values.

    The Parameters are created in the default dtype on the CPU; convert the module to the signals' dtype and device
    (``.double()``, ``.to(device)``) before calling it.
    """

    def __init__(self, rule: Rule, values=None):
        super().__init__()
        self.rule = rule
        self.update = compile_rule(rule)
        vals = values if values is not None else rule.values
        if rule.is_linear:
            init = torch.as_tensor(vals if vals is not None else [0.0] * rule.n_terms, dtype=torch.get_default_dtype())
            self.theta = torch.nn.Parameter(init.clone())
        else:
            vals = dict(vals) if vals is not None else {c.name: 1.0 for c in rule.constants}
            self.constants = torch.nn.ParameterDict(
                {k: torch.nn.Parameter(torch.as_tensor(float(v))) for k, v in vals.items()}
            )

    @property
    def needs(self):
        return self.update.needs

    @property
    def states(self):
        return self.update.states

    def forward(self, signals: Mapping) -> torch.Tensor:
        return self.update(signals, self.theta if self.rule.is_linear else dict(self.constants))

    def trained_rule(self) -> Rule:
        if self.rule.is_linear:
            return self.rule.with_values(self.theta)
        return self.rule.with_values({k: float(v.detach()) for k, v in self.constants.items()})

    def sympy(self) -> sp.Expr:
        return self.trained_rule().sympy()
