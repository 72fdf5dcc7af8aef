r"""Typed signals and operators: the vocabulary plasticity rules are written in.

A rule is written per synapse, :math:`\Delta W_{ij} = f(\dots)`, with :math:`i` the post-synaptic and :math:`j`
the pre-synaptic neuron of a layer whose weight matrix ``W`` has shape ``(n_post, n_pre)``. Every signal is a real
SymPy symbol with a *role*:

========  ===========  ===============================  =========================================
role      index        tensor shape at call time        built-in signals
========  ===========  ===============================  =========================================
global    none         ``(B,)`` or ``()`` (shared)      ``mod``, ``reward``, ``loss``
post      :math:`i`    ``(B, n_post)``                  ``post`` (y_i), ``err`` (e_i)
pre       :math:`j`    ``(B, n_pre)``                   ``pre`` (x_j), ``pre_err`` (e'_j)
synapse   :math:`ij`   ``(B, n_post, n_pre)``           ``w`` (W_ij), ``fb`` (B_ji in W's layout)
========  ===========  ===============================  =========================================

Roles of compound expressions are inferred by :func:`role_of` with the *join* ``global < post, pre < synapse``
(``post`` joined with ``pre`` is ``synapse``). Legal combinations, by node:

* ``Add``, ``Mul``, ``Pow`` and elementwise functions (``tanh``, ``exp``, ``Abs``, ``Piecewise``, ...): any roles;
  the result is their join. So ``y_i + x_j`` is a legal synapse term and ``tanh(W_ij) x_j`` too.
* ``Contract(M, u)`` (:func:`wT`, :func:`wv`): ``M`` a synapse *signal* (``w`` or ``fb``) and ``u`` post-role
  (result :math:`(M^\top u)_j`, pre-role) or pre-role (result :math:`(M u)_i`, post-role).
* ``LayerSum(u)``, ``LayerMean(u)``: ``u`` post- or pre-role; the result (sum or mean over the layer) is global.
* ``Bilinear(u, M, v)`` = :math:`u^\top M v`: one post-role and one pre-role vector, in either order (stored
  canonically with the post vector on the left); the result is global.
* ``OrderedContract(u, M)`` = :math:`\sum_{k \le i} u_k M_{kj}` (Sanger): ``u`` post-role; the result is synapse.
* ``Reindex(u)`` (:func:`as_pre`, :func:`as_post`): for a recurrent layer, whose post- and pre-synaptic neurons are
  one population (``n_post == n_pre``, checked when the compiled rule is called), the vector ``u`` read with the
  other index: :math:`u_i \mapsto u_j`. So ``wv(as_pre(gain * delta))`` is :math:`(W G \delta)_i`.

Recurrent networks at a fixed point (:class:`~rulesearch.networks.FixedPointNetwork`) also provide the built-in
signals ``gain`` (:math:`g_i = f'(z_i)`) and ``delta`` (:math:`\delta_i = \partial J / \partial r^*_i`), listed in
:data:`RECURRENT_SIGNALS`; the feedforward inner loop refuses them.

Everything else is rejected by :func:`role_of` with an :class:`~rulesearch.errors.InvalidRuleError` naming the
offending subexpression: contracting a global or synapse expression, a layer sum of a synapse expression, free
symbols that are not signals, undefined functions, matrices, relations outside ``Piecewise``.

Derived signals are declared with :func:`derived` (a SymPy function of other signals) or :func:`state` (carried
across online steps by the inner loop, e.g. a trace :math:`\bar x \leftarrow (1 - 1/\tau)\bar x + x/\tau`).

Examples
--------
>>> from rulesearch.lang.signals import pre, post, err, w, wT, role_of
>>> role_of(post + pre)
'synapse'
>>> role_of(wT(post))
'pre'
>>> xbar = trace(pre, tau=5)
>>> xbar.role, xbar.name
('pre', 'pre_trace5')
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import sympy as sp

from ..errors import InvalidRuleError

__all__ = [
    "ROLES",
    "Signal",
    "Constant",
    "StateDef",
    "Contract",
    "LayerSum",
    "LayerMean",
    "Bilinear",
    "OrderedContract",
    "Reindex",
    "OPERATORS",
    "pre",
    "post",
    "err",
    "pre_err",
    "w",
    "fb",
    "mod",
    "reward",
    "loss",
    "BASE_SIGNALS",
    "gain",
    "delta",
    "RECURRENT_SIGNALS",
    "BUILTIN_SIGNALS",
    "wT",
    "wv",
    "layer_sum",
    "layer_mean",
    "bilinear",
    "sanger",
    "as_pre",
    "as_post",
    "derived",
    "state",
    "state_probe",
    "state_key",
    "trace",
    "bcm_threshold",
    "reward_baseline",
    "role_of",
    "join_roles",
    "signals_in",
    "expand_derived",
    "state_signals",
    "base_needs",
    "ELEMENTWISE_FUNCTIONS",
]

ROLES = ("global", "post", "pre", "synapse")


class Signal(sp.Symbol):
    """A real SymPy symbol with a role in ``ROLES`` and an optional definition.

    ``definition`` is ``None`` for base signals (computed by the inner loop), a SymPy expression for a stateless
    derived signal (substituted before compiling), or a :class:`StateDef` for a signal carried across steps.
    Two signals are equal when their names, roles and ``key`` are equal; the key is the definition of a derived
    signal and the state equation (with the signal itself replaced by a probe) of a state, so that SymPy's
    expression cache never swaps two signals that share a name but not a definition (e.g. two
    ``reward_baseline`` s with different ``tau``). A rule refuses two different definitions under one name.
    """

    def __new__(cls, name: str, role: str, definition=None, description: str = "", latex: str | None = None, key=None):
        if role not in ROLES:
            raise InvalidRuleError(f"Signal {name!r}: role {role!r} is not one of {ROLES}.")
        if not isinstance(name, str) or not name.isidentifier():
            raise InvalidRuleError(
                f"Signal name {name!r} is not a Python identifier; use letters, digits and underscores."
            )
        obj = sp.Symbol.__xnew__(cls, name, real=True)
        obj.role = role
        obj.definition = definition
        obj.description = description
        obj.latex = latex
        obj.key = key if key is not None else (definition if isinstance(definition, sp.Basic) else None)
        return obj

    def _hashable_content(self):
        return (*super()._hashable_content(), self.role, self.key)

    def __getnewargs_ex__(self):
        return ((self.name, self.role, self.definition, self.description, self.latex, self.key), {})

    @property
    def is_base(self) -> bool:
        return self.definition is None and not isinstance(self, Constant)

    @property
    def is_state(self) -> bool:
        return isinstance(self.definition, StateDef)


class Constant(Signal):
    """A free constant of a general rule (a global parameter, e.g. a distilled formula's coefficient)."""

    def __new__(cls, name: str, description: str = ""):
        return super().__new__(cls, name, "global", None, description)

    def __getnewargs_ex__(self):
        return ((self.name, self.description), {})


@dataclass(frozen=True)
class StateDef:
    """State equation ``s_t = update(s_{t-1}, signals_t)``, ``s_{-1} = init``; ``update`` uses the signal itself."""

    update: sp.Expr
    init: sp.Expr = sp.Integer(0)


# ------------------------------------------------------------------------------------------------------------
# Base signals (computed by the inner loop)

pre = Signal("pre", "pre", description="pre-synaptic activity x_j = y_{l-1,j}", latex="x")
post = Signal("post", "post", description="post-synaptic activity y_i", latex="y")
err = Signal("err", "post", description="error e_i of the post-synaptic neuron (sigma' included)", latex="e")
pre_err = Signal("pre_err", "pre", description="error e'_j of the pre-synaptic neuron", latex="e'")
w = Signal("w", "synapse", description="forward weight W_ij", latex="W")
fb = Signal("fb", "synapse", description="feedback weight B_ji carrying the error from post i to pre j", latex="B")
mod = Signal("mod", "global", description="global modulator (default: reward)", latex="m")
reward = Signal("reward", "global", description="1 if the current sample is classified correctly, else 0", latex="r")
loss = Signal("loss", "global", description="loss of the current training sample", latex=r"\ell")

BASE_SIGNALS = {s.name: s for s in (pre, post, err, pre_err, w, fb, mod, reward, loss)}
"""The base signals of the feedforward inner loop (:func:`rulesearch.inner.run_episodes`)."""

gain = Signal(
    "gain", "post", description="gain g_i = f'(z_i) of the post-synaptic neuron (at the fixed point)", latex="g"
)
delta = Signal(
    "delta", "post", description="direct error dJ/dr*_i at the fixed point (no gain, no recurrence)", latex=r"\delta"
)
RECURRENT_SIGNALS = {s.name: s for s in (gain, delta)}
r"""Base signals of recurrent networks at a fixed point (:class:`~rulesearch.networks.FixedPointNetwork`). There
``pre = post = r*`` and ``err`` is the implicit error :math:`\partial J/\partial z^* = (G^{-1} - W^\top)^{-1}\delta`."""

BUILTIN_SIGNALS = {**BASE_SIGNALS, **RECURRENT_SIGNALS}
"""Every signal a rule may read without defining it."""

# Elementwise functions known to every target (torch, LaTeX, JSON); keyed by SymPy class name.
ELEMENTWISE_FUNCTIONS = (
    "exp", "log", "tanh", "sinh", "cosh", "sin", "cos", "Abs", "sign", "Heaviside", "Max", "Min", "Piecewise",
    "erf", "atan", "sqrt",
)  # fmt: skip


# ------------------------------------------------------------------------------------------------------------
# Role inference


def join_roles(*roles: str) -> str:
    """Join of roles: ``global < post, pre < synapse``; ``post`` joined with ``pre`` is ``synapse``."""
    out = "global"
    for r in roles:
        if r == out or r == "global":
            continue
        out = r if out == "global" else "synapse"
    return out


def _operator_role(expr) -> str:
    if isinstance(expr, Contract):
        M, u = expr.args
        _require_matrix(M, expr)
        ru = role_of(u)
        if ru not in ("post", "pre"):
            raise InvalidRuleError(
                f"Ill-typed contraction {expr}: its vector {u} has role {ru!r}, expected a post-role vector "
                f"(giving (W^T u)_j) or a pre-role vector (giving (W v)_i). Contract one index at a time."
            )
        return "pre" if ru == "post" else "post"
    if isinstance(expr, (LayerSum, LayerMean)):
        ru = role_of(expr.args[0])
        if ru not in ("post", "pre"):
            raise InvalidRuleError(
                f"Ill-typed layer sum {expr}: its argument has role {ru!r}, expected a post- or pre-role vector."
            )
        return "global"
    if isinstance(expr, Bilinear):
        u, M, v = expr.args
        _require_matrix(M, expr)
        ru, rv = role_of(u), role_of(v)
        if (ru, rv) != ("post", "pre"):
            raise InvalidRuleError(
                f"Ill-typed bilinear form {expr}: vector roles ({ru!r}, {rv!r}), expected one post-role and one "
                f"pre-role vector, e.g. bilinear(post, pre_err)."
            )
        return "global"
    if isinstance(expr, OrderedContract):
        u, M = expr.args
        _require_matrix(M, expr)
        ru = role_of(u)
        if ru != "post":
            raise InvalidRuleError(
                f"Ill-typed ordered contraction {expr}: its vector has role {ru!r}, expected a post-role vector "
                f"(Sanger: sum_(k<=i) y_k W_kj)."
            )
        return "synapse"
    if isinstance(expr, Reindex):
        ru = role_of(expr.args[0])
        if ru not in ("post", "pre"):
            raise InvalidRuleError(
                f"Ill-typed reindexing {expr}: its argument has role {ru!r}, expected a post- or pre-role vector "
                f"(as_pre/as_post read a neuron's vector with the other index of a recurrent layer)."
            )
        return "pre" if ru == "post" else "post"
    raise AssertionError(expr)  # pragma: no cover


def _require_matrix(M, expr) -> None:
    if not (isinstance(M, Signal) and M.role == "synapse"):
        raise InvalidRuleError(
            f"In {expr}: the matrix argument {M} must be a synapse signal such as w or fb, "
            f"got {type(M).__name__} {M!r}."
        )


def _check_number(x) -> None:
    """Raise ``InvalidRuleError`` unless the SymPy number ``x`` is finite as a float64 (what the compiler uses)."""
    try:
        ok = bool(x.is_finite) and math.isfinite(float(x))
    except OverflowError:
        ok = False
    if not ok:
        raise InvalidRuleError(
            f"Non-finite number {sp.N(x, 4) if x.is_finite else x} in a rule: expected a number finite as a float64 "
            f"(|x| < 1.8e308), since rules are evaluated in floating point. Use finite constants; rescale the term."
        )


def role_of(expr) -> str:
    """Infer the role of a SymPy expression over signals; raise ``InvalidRuleError`` naming what is ill-typed."""
    if isinstance(expr, Signal):
        return expr.role
    if isinstance(expr, (sp.Number, sp.NumberSymbol)):
        _check_number(expr)
        return "global"
    if isinstance(expr, OPERATORS):
        return _operator_role(expr)
    if isinstance(expr, sp.Symbol):
        raise InvalidRuleError(
            f"Unknown symbol {expr!r}: it is neither a signal nor a declared constant. Use a built-in signal "
            f"({', '.join(BUILTIN_SIGNALS)}), declare one with Signal/derived/state, or a Constant for a free "
            f"coefficient."
        )
    if isinstance(expr, sp.Piecewise):
        roles = []
        for e, c in expr.args:
            roles.append(role_of(e))
            if c is not sp.true:
                if not isinstance(c, sp.core.relational.Relational):
                    raise InvalidRuleError(f"Piecewise condition {c} must be a comparison such as x > 0.")
                roles.extend(role_of(a) for a in c.args)
        return join_roles(*roles)
    if isinstance(expr, (sp.Add, sp.Mul, sp.Pow)):
        return join_roles(*(role_of(a) for a in expr.args))
    if isinstance(expr, sp.Basic) and type(expr).__name__ in ELEMENTWISE_FUNCTIONS:
        return join_roles(*(role_of(a) for a in expr.args))
    if isinstance(expr, sp.core.function.AppliedUndef):
        raise InvalidRuleError(
            f"Undefined function {expr}: rulesearch cannot compile {type(expr).__name__}(...). Use one of "
            f"{', '.join(ELEMENTWISE_FUNCTIONS)} or register an operator."
        )
    if not isinstance(expr, sp.Basic) or isinstance(expr, (sp.MatrixBase, sp.logic.boolalg.Boolean)):
        raise InvalidRuleError(f"Expected a scalar SymPy expression over signals, got {type(expr).__name__}: {expr!r}.")
    raise InvalidRuleError(
        f"Unsupported node {type(expr).__name__} in {expr}: supported are Add, Mul, Pow, numbers, signals, "
        f"the operators {', '.join(o.__name__ for o in OPERATORS)} and the functions "
        f"{', '.join(ELEMENTWISE_FUNCTIONS)}."
    )


def _role_or_none(expr):
    try:
        return role_of(expr)
    except InvalidRuleError:
        return None


# ------------------------------------------------------------------------------------------------------------
# Operators: computed inside the compiled update, never by the caller.


class _Operator(sp.Function):
    is_real = True

    @classmethod
    def _split_linear(cls, vec):
        """Split a vector argument into (scalar factor, rest) pulling out numbers and global-role factors."""
        if vec.is_Number:
            return vec, sp.Integer(1)
        scal, rest = [], []
        for a in sp.Mul.make_args(vec):
            (scal if _role_or_none(a) == "global" else rest).append(a)
        return sp.Mul(*scal), sp.Mul(*rest)


class Contract(_Operator):
    r"""``Contract(M, u)``: :math:`(M^\top u)_j = \sum_i M_{ij} u_i` for post-role ``u`` (pre-indexed result),
    :math:`(M v)_i = \sum_j M_{ij} v_j` for pre-role ``v`` (post-indexed result). Linear in the vector."""

    nargs = 2

    @classmethod
    def eval(cls, M, u):
        if u.is_zero:
            return sp.Integer(0)
        if isinstance(u, sp.Add):
            return sp.Add(*(cls(M, a) for a in u.args))
        scal, rest = cls._split_linear(u)
        if scal != 1 and rest != 1:
            return scal * cls(M, rest)
        return None


class _LayerReduction(_Operator):
    """A linear reduction of a post- or pre-role vector over its layer (global)."""

    nargs = 1

    @classmethod
    def eval(cls, u):
        if isinstance(u, sp.Add):
            return sp.Add(*(cls(a) for a in u.args))
        scal, rest = cls._split_linear(u)
        if scal != 1 and rest != 1:
            return scal * cls(rest)
        return None


class LayerSum(_LayerReduction):
    r"""``LayerSum(u)`` = :math:`\sum_k u_k` over the neurons of a post- or pre-role vector (global)."""


class LayerMean(_LayerReduction):
    r"""``LayerMean(u)`` = :math:`\frac{1}{n} \sum_k u_k` over the :math:`n` neurons of a post- or pre-role vector
    (global): the width-normalized :class:`LayerSum`."""


class Bilinear(_Operator):
    r"""``Bilinear(u, M, v)`` = :math:`u^\top M v` (global); canonical with the post vector ``u`` on the left."""

    nargs = 3

    @classmethod
    def eval(cls, u, M, v):
        if _role_or_none(u) == "pre" and _role_or_none(v) == "post":
            return cls(v, M, u)
        for pos, vec in ((0, u), (2, v)):
            if isinstance(vec, sp.Add):
                args = [u, M, v]
                out = []
                for a in vec.args:
                    args[pos] = a
                    out.append(cls(*args))
                return sp.Add(*out)
        su, ru = cls._split_linear(u)
        sv, rv = cls._split_linear(v)
        if (su != 1 or sv != 1) and ru != 1 and rv != 1:
            return su * sv * cls(ru, M, rv)
        return None


class OrderedContract(_Operator):
    r"""``OrderedContract(u, M)`` = :math:`\sum_{k \le i} u_k M_{kj}` (Sanger's rule), synapse role."""

    nargs = 2


class Reindex(_Operator):
    r"""``Reindex(u)``: the vector :math:`u` of a recurrent layer's neurons read with the other index
    (:math:`u_i \mapsto u_j`, post role <-> pre role); needs ``n_post == n_pre``. Linear; its own inverse."""

    nargs = 1

    @classmethod
    def eval(cls, u):
        if isinstance(u, Reindex):
            return u.args[0]
        if isinstance(u, sp.Add):
            return sp.Add(*(cls(a) for a in u.args))
        scal, rest = cls._split_linear(u)
        if scal != 1 and rest != 1:
            return scal * cls(rest)
        if isinstance(u, sp.Mul) and all(_role_or_none(a) in ("post", "pre") for a in u.args):
            return sp.Mul(*(cls(a) for a in u.args))  # elementwise products: reindex each factor
        return None


OPERATORS = (Contract, LayerSum, LayerMean, Bilinear, OrderedContract, Reindex)


def wT(u, M=w):
    r""":math:`(W^\top u)_j`: contract a post-role vector through ``M`` (default the forward weights)."""
    return Contract(M, sp.sympify(u))


def wv(v, M=w):
    r""":math:`(W v)_i`: contract a pre-role vector through ``M`` (default the forward weights)."""
    return Contract(M, sp.sympify(v))


def layer_sum(u):
    r""":math:`\sum_k u_k` over a layer (global)."""
    return LayerSum(sp.sympify(u))


def layer_mean(u):
    r""":math:`\frac{1}{n} \sum_k u_k` over a layer of :math:`n` neurons (global)."""
    return LayerMean(sp.sympify(u))


def bilinear(a, b, M=w):
    r""":math:`u^\top M v` for one post-role and one pre-role vector, given in either order."""
    return Bilinear(sp.sympify(a), M, sp.sympify(b))


def sanger(u=post, M=w):
    r""":math:`\sum_{k \le i} u_k M_{kj}`, the ordered contraction of Sanger's generalized Hebbian algorithm."""
    return OrderedContract(sp.sympify(u), M)


def _reindex_to(u, role: str):
    u = sp.sympify(u)
    ru = role_of(u)
    if ru == role or ru == "global":
        return u
    if ru == "synapse":
        raise InvalidRuleError(f"as_{role}({u}): a synapse-role expression has both indices; expected a vector.")
    return Reindex(u)


def as_pre(u):
    r""":math:`u_j` from a post-role vector :math:`u_i` of a recurrent layer (pre- and global-role ``u`` unchanged)."""
    return _reindex_to(u, "pre")


def as_post(v):
    r""":math:`v_i` from a pre-role vector :math:`v_j` of a recurrent layer (post- and global-role ``v`` unchanged)."""
    return _reindex_to(v, "post")


# ------------------------------------------------------------------------------------------------------------
# Derived signals


def derived(name: str, expr, description: str = "", latex: str | None = None) -> Signal:
    """A stateless derived signal: a named SymPy function of other signals, substituted before compiling."""
    expr = sp.sympify(expr)
    return Signal(name, role_of(expr), expr, description, latex)


def state(
    name: str, update: Callable[[Signal], sp.Expr], init=0, description: str = "", latex: str | None = None
) -> Signal:
    r"""A derived signal carried across online steps: :math:`s_t = \mathrm{update}(s_{t-1})`, :math:`s_{-1}` = init.

    ``update`` is a function of the previous value (a symbol) returning a SymPy expression over it and other
    signals. The role is inferred from the other signals and ``init``.
    """
    probe = Signal(f"_{name}_probe", "global")  # distinct name: SymPy's cache would reuse expressions with it
    init = sp.sympify(init)
    role = join_roles(role_of(update(probe)), role_of(init))
    sig = Signal(name, role, None, description, latex, key=state_key(name, role, update(state_probe(name, role)), init))
    sig.definition = StateDef(sp.sympify(update(sig)), init)
    return sig


def state_probe(name: str, role: str) -> Signal:
    """The placeholder standing for state ``name`` in its :func:`state_key` (and while loading it from JSON)."""
    return Signal(f"_{name}_probe", role)


def state_key(name: str, role: str, update_of_probe, init) -> tuple:
    """Identity of a state signal: its equation with the signal replaced by :func:`state_probe`."""
    return ("state", sp.sympify(update_of_probe), sp.sympify(init))


def _fmt(x) -> str:
    s = f"{x:g}" if isinstance(x, (int, float)) else str(x)
    return s.replace(".", "p").replace("-", "m")


def trace(signal: Signal, tau: float = 10.0, name: str | None = None) -> Signal:
    r"""Exponential trace :math:`\bar s \leftarrow (1 - 1/\tau)\bar s + s/\tau` of a signal (same role)."""
    if tau < 1:
        raise InvalidRuleError(f"trace of {signal}: tau={tau} must be >= 1 (in online steps).")
    k = sp.Rational(1, 1) / sp.nsimplify(tau)
    return state(
        name or f"{signal.name}_trace{_fmt(tau)}",
        lambda s: (1 - k) * s + k * signal,
        description=f"trace of {signal.name} with tau={tau}",
        latex=rf"\bar{{{signal.latex or signal.name}}}^{{({tau:g})}}" if name is None else None,
    )


def bcm_threshold(tau: float = 10.0, name: str = "theta_bcm") -> Signal:
    r"""BCM sliding threshold :math:`\theta_i \leftarrow (1 - 1/\tau)\theta_i + y_i^2/\tau` (post role)."""
    k = sp.Rational(1, 1) / sp.nsimplify(tau)
    return state(
        name,
        lambda s: (1 - k) * s + k * post**2,
        description=f"BCM threshold, tau={tau}",
        latex=r"\theta^{M}",
    )


def reward_baseline(tau: float = 10.0, name: str = "reward_bar") -> Signal:
    r"""Running reward baseline :math:`\bar r \leftarrow (1 - 1/\tau)\bar r + r/\tau` (global)."""
    return trace(reward, tau, name)


# ------------------------------------------------------------------------------------------------------------
# Queries used by rules and compilers


def signals_in(expr) -> set[Signal]:
    """All signals (and constants) in an expression, including inside operators and definitions' uses."""
    return {s for s in sp.sympify(expr).atoms(sp.Symbol) if isinstance(s, Signal)}


def expand_derived(expr) -> sp.Expr:
    """Substitute stateless derived signals by their definitions, recursively."""
    expr = sp.sympify(expr)
    for _ in range(32):
        sub = {s: s.definition for s in signals_in(expr) if isinstance(s.definition, sp.Basic)}
        if not sub:
            return expr
        expr = expr.xreplace(sub)
    raise InvalidRuleError("Derived signals are defined in a cycle; check their definitions.")


def state_signals(expr) -> list[Signal]:
    """Stateful signals an expression depends on (directly or through other states), dependencies first."""
    order: list[Signal] = []
    visiting: set[str] = set()

    def visit(s: Signal) -> None:
        if s in order:
            return
        if s.name in visiting:
            raise InvalidRuleError(f"State {s.name} depends on itself through other states.")
        visiting.add(s.name)
        d = s.definition
        for dep in signals_in(expand_derived(d.update)) | signals_in(expand_derived(d.init)):
            if dep.is_state and dep != s:
                visit(dep)
        visiting.discard(s.name)
        order.append(s)

    for s in sorted(signals_in(expand_derived(expr)), key=lambda s: s.name):
        if s.is_state:
            visit(s)
    return order


def base_needs(expr) -> frozenset[str]:
    """Names of the base signals an expression (and the states it uses) reads from the inner loop."""
    exprs = [expand_derived(expr)]
    for s in state_signals(expr):
        exprs += [expand_derived(s.definition.update), expand_derived(s.definition.init)]
    return frozenset(s.name for e in exprs for s in signals_in(e) if s.is_base)
