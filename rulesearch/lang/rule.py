r"""Rules: named terms with coefficients, or general expressions with free constants.

A linear rule is :math:`\Delta W_{ij} = \sum_r \theta_r T^r_{ij}` with named terms :math:`T^r` (SymPy over
signals). Its parameters are a tensor ``theta`` of shape ``(R,)``, ``(B, R)`` (one row per episode), or, for the
caller to slice, ``(L, R)`` per layer and ``(S, ...)`` per independent run. A general rule is one SymPy expression
with free :class:`~rulesearch.lang.signals.Constant` s (a distilled formula); its parameters are a dict of named
tensors of shape ``()`` or ``(B,)``.

Examples
--------
>>> from rulesearch.lang.signals import pre, post, err
>>> r = Rule([Term("F0", -err * pre), Term("oja", post * pre - post**2 * w)])
>>> r.n_terms, r.term_names()
(2, ('F0', 'oja'))
>>> r.locality()
('synapse-local', 'synapse-local')
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field

import sympy as sp

from ..errors import InvalidRuleError
from .bounds import check_expr_bounds
from .signals import (
    BUILTIN_SIGNALS,
    OPERATORS,
    Constant,
    Contract,
    Reindex,
    Signal,
    base_needs,
    expand_derived,
    role_of,
    signals_in,
    state_signals,
    w,
)

__all__ = ["Term", "Rule", "Pool", "NetworkRule", "LOCALITY_CLASSES", "locality_of", "theta_symbols"]

LOCALITY_CLASSES = ("synapse-local", "layer-nonlocal", "weight-transport")


def locality_of(expr) -> str:
    r"""Locality class of an expression.

    * ``weight-transport``: a surviving pre-indexed contraction :math:`(W^\top u)_j` through the forward weights
      where ``u`` contains an error (the forward weights carry an error backward);
    * ``layer-nonlocal``: any other operator (layer sums, bilinear forms, contractions of activities);
    * ``synapse-local``: only :math:`i`, :math:`j`, :math:`ij` and global signals.

    Derived signals and states count by their definitions: :math:`(W^\top \bar e)_j` with :math:`\bar e` a trace of
    the error is weight transport, and a state updated by an operator makes its users non-local. Reindexing a
    recurrent layer's vector (:func:`~rulesearch.lang.signals.as_pre`) is local: neuron ``j`` is the synapse's
    pre-synaptic neuron.
    """
    exprs = [expr, *(e for s in state_signals(expr) for e in (s.definition.update, s.definition.init))]
    ops = [a for e in exprs for a in sp.preorder_traversal(sp.expand(expand_derived(e))) if isinstance(a, OPERATORS)]
    ops = [op for op in ops if not isinstance(op, Reindex)]
    for op in ops:
        if isinstance(op, Contract) and op.args[0] == w and role_of(op.args[1]) == "post":
            if base_needs(op.args[1]) & {"err", "pre_err", "delta"}:
                return "weight-transport"
    return "layer-nonlocal" if ops else "synapse-local"


def _check_expr(expr, where: str) -> sp.Expr:
    try:
        expr = sp.sympify(expr, strict=True)
    except (sp.SympifyError, TypeError) as e:
        raise InvalidRuleError(f"{where}: expected a SymPy expression over signals, got {expr!r}.") from e
    if not isinstance(expr, sp.Expr):
        raise InvalidRuleError(f"{where}: expected a scalar SymPy expression, got {type(expr).__name__}: {expr}.")
    check_expr_bounds(expr, where)
    try:
        role_of(expand_derived(expr))
        for s in state_signals(expr):
            role_of(expand_derived(s.definition.update))
        _check_base_signals(expr)
    except InvalidRuleError as e:
        raise InvalidRuleError(f"{where}: {e}") from None
    return expr


def _floats(values, what: str) -> list[float]:
    try:
        return [float(v) for v in values]
    except (TypeError, ValueError):
        raise InvalidRuleError(f"A rule's {what} must be numbers; received {str(values)[:80]}.") from None


def _check_base_signals(expr) -> None:
    """Signals without a definition must be the built-in ones: nothing else can compute or serialize them."""
    seen: set[Signal] = set()
    stack = [expr]
    while stack:
        for s in signals_in(stack.pop()):
            if s in seen or isinstance(s, Constant):
                continue
            seen.add(s)
            builtin = BUILTIN_SIGNALS.get(s.name)
            if s.definition is None and (builtin is None or builtin.role != s.role):
                raise InvalidRuleError(
                    f"Signal {s.name!r} ({s.role}) has no definition and is not a built-in signal "
                    f"({', '.join(f'{n}: {b.role}' for n, b in BUILTIN_SIGNALS.items())}). Define it with "
                    f"derived(name, expr) or state(name, update), or use a Constant for a free coefficient."
                )
            if s.definition is not None and builtin is not None:
                raise InvalidRuleError(f"Derived signal {s.name!r} shadows a built-in signal; rename it.")
            if isinstance(s.definition, sp.Basic):
                stack.append(s.definition)
            elif s.is_state:
                stack += [s.definition.update, s.definition.init]


def _check_definitions(exprs: Iterable[sp.Expr]) -> None:
    seen: dict[str, Signal] = {}
    stack = list(exprs)
    while stack:
        for s in signals_in(stack.pop()):
            other = seen.get(s.name)
            if other is None:
                seen[s.name] = s
                if isinstance(s.definition, sp.Basic):
                    stack.append(s.definition)
                elif s.is_state:
                    stack += [s.definition.update, s.definition.init]
            elif other.role != s.role or other.definition != s.definition or type(other) is not type(s):
                raise InvalidRuleError(
                    f"Two different signals are named {s.name!r} ({other.role}: {other.definition}; "
                    f"{s.role}: {s.definition}). Give derived signals distinct names."
                )


@dataclass(frozen=True)
class Term:
    """A named candidate term :math:`T^r_{ij}` (a SymPy expression over signals)."""

    name: str
    expr: sp.Expr
    description: str = ""

    def __post_init__(self):
        if not isinstance(self.name, str) or not self.name:
            raise InvalidRuleError(f"Term name must be a non-empty string, got {self.name!r}.")
        object.__setattr__(self, "expr", _check_expr(self.expr, f"term {self.name!r}"))
        consts = [s for s in signals_in(self.expr) if isinstance(s, Constant)]
        if consts:
            raise InvalidRuleError(
                f"Term {self.name!r} contains free constants {consts}; a linear rule's coefficients are theta. "
                f"Use Rule.general(expr, constants) for expressions with free constants."
            )

    @property
    def role(self) -> str:
        return role_of(expand_derived(self.expr))

    @property
    def locality(self) -> str:
        return locality_of(self.expr)


def theta_symbols(n: int) -> tuple[sp.Symbol, ...]:
    """The coefficient symbols :math:`\\theta_0, \\dots, \\theta_{n-1}`."""
    return tuple(sp.Symbol(f"theta_{r}", real=True) for r in range(n))


@dataclass(frozen=True)
class Rule:
    r"""A plasticity rule: :math:`\Delta W_{ij} = \sum_r \theta_r T^r_{ij}` (linear) or a general expression.

    Parameters
    ----------
    terms : sequence of Term
        Named terms of a linear rule (empty for a general rule).
    name : str
        Used in exports and run directories.
    expr : sympy.Expr, optional
        The whole update of a general rule, with free :class:`Constant` s listed in ``constants``.
    values : tuple of float or dict, optional
        Trained coefficient values (theta, or constants by name) used by ``sympy()`` and ``latex()``.
    """

    terms: tuple[Term, ...] = ()
    name: str = "rule"
    expr: sp.Expr | None = None
    constants: tuple[Constant, ...] = ()
    values: tuple | None = field(default=None, compare=True)

    def __post_init__(self):
        terms = tuple(self.terms.terms if isinstance(self.terms, Pool) else self.terms)
        object.__setattr__(self, "terms", terms)
        if self.expr is None:
            if not terms:
                raise InvalidRuleError("A rule needs at least one term (or a general expression via Rule.general).")
            if not all(isinstance(t, Term) for t in terms):
                raise InvalidRuleError("Rule terms must be Term objects: Term(name, expr).")
            names = [t.name for t in terms]
            dup = sorted({n for n in names if names.count(n) > 1})
            if dup:
                raise InvalidRuleError(f"Duplicate term names {dup}; term names must be unique.")
            _check_definitions(t.expr for t in terms)
            if self.values is not None:
                vals = tuple(_floats(self.values, "values (one number per term)"))
                if len(vals) != len(terms):
                    raise InvalidRuleError(f"values has {len(vals)} entries, expected {len(terms)} (one per term).")
                object.__setattr__(self, "values", vals)
        else:
            if terms:
                raise InvalidRuleError("Give either terms (linear rule) or expr (general rule), not both.")
            expr = _check_expr(self.expr, f"rule {self.name!r}")
            declared = set(self.constants)
            free = {s for s in signals_in(expr) if isinstance(s, Constant)}
            if not free <= declared:
                raise InvalidRuleError(
                    f"Free constants {sorted(map(str, free - declared))} are not declared in constants=."
                )
            object.__setattr__(self, "expr", expr)
            object.__setattr__(self, "constants", tuple(sorted(declared, key=lambda c: c.name)))
            _check_definitions([expr])
            if self.values is not None:
                vals = dict(self.values)
                missing = {c.name for c in self.constants} - set(vals)
                if missing:
                    raise InvalidRuleError(f"values misses constants {sorted(missing)}.")
                numbers = _floats(vals.values(), "values (one number per constant)")
                object.__setattr__(self, "values", tuple(sorted(zip(vals, numbers))))

    @classmethod
    def general(cls, expr, constants: Sequence[Constant | str] = (), name: str = "rule", values=None) -> Rule:
        """A general rule: one expression with free constants (strings become :class:`Constant` s)."""
        consts = tuple(Constant(c) if isinstance(c, str) else c for c in constants)
        return cls(name=name, expr=sp.sympify(expr), constants=consts, values=values)

    # ---- structure -------------------------------------------------------------------------------------------
    @property
    def is_linear(self) -> bool:
        return self.expr is None

    @property
    def n_terms(self) -> int:
        return len(self.terms)

    @property
    def n_params(self) -> int:
        return len(self.terms) if self.is_linear else len(self.constants)

    def term_names(self) -> tuple[str, ...]:
        return tuple(t.name for t in self.terms)

    def param_names(self) -> tuple[str, ...]:
        return self.term_names() if self.is_linear else tuple(c.name for c in self.constants)

    def locality(self) -> tuple[str, ...]:
        return tuple(t.locality for t in self.terms) if self.is_linear else (locality_of(self.expr),)

    def structure(self) -> sp.Expr:
        """The update with symbolic coefficients: :math:`\\sum_r \\theta_r T^r` or the general expression."""
        if not self.is_linear:
            return self.expr
        return sp.Add(*(th * t.expr for th, t in zip(theta_symbols(self.n_terms), self.terms)))

    def with_values(self, values) -> Rule:
        """A copy carrying trained values (a sequence of floats, a tensor, or a dict for general rules)."""
        if hasattr(values, "detach"):
            values = values.detach().cpu().double().reshape(-1).tolist()
        return Rule(self.terms, self.name, self.expr, self.constants, values)

    def select(self, names: Sequence[str]) -> Rule:
        """The sub-rule keeping only the named terms (in the given order)."""
        by_name = {t.name: t for t in self.terms}
        unknown = [n for n in names if n not in by_name]
        if unknown:
            raise InvalidRuleError(f"Unknown terms {unknown}; this rule has {list(by_name)}.")
        vals = None
        if self.values is not None:
            idx = {t.name: i for i, t in enumerate(self.terms)}
            vals = tuple(self.values[idx[n]] for n in names)
        return Rule(tuple(by_name[n] for n in names), self.name, values=vals)

    def __add__(self, other: Rule | Pool) -> Rule:
        other_terms = other.terms
        return Rule(tuple(self.terms) + tuple(other_terms), self.name)

    # ---- exports (thin methods over rulesearch.lang.export) -------------------------------------------------------
    def sympy(self, values=None) -> sp.Expr:
        """The update as one SymPy expression, with trained values substituted when known."""
        from .export import rule_to_sympy

        return rule_to_sympy(self, values)

    def latex(self, precision: int = 3, values=None, table: bool = False) -> str:
        """Publication-ready LaTeX in index notation (numeric theta when known; optional coefficient table)."""
        from .export import rule_to_latex

        return rule_to_latex(self, precision=precision, values=values, table=table)

    def to_json(self) -> dict:
        """A JSON-able dict of whitelisted expression trees (no strings are ever evaluated on load)."""
        from .export import rule_to_json

        return rule_to_json(self)

    @classmethod
    def from_json(cls, data: Mapping) -> Rule:
        from .export import rule_from_json

        return rule_from_json(data)

    def torch(self, values=None):
        """A ``torch.nn.Module`` holding the coefficients as Parameters; ``.sympy()`` returns trained values."""
        from ..compile.compiler import RuleModule

        return RuleModule(self, values)

    def compile(self):
        """The compiled batched torch update (cached by structure)."""
        from ..compile.compiler import compile_rule

        return compile_rule(self)

    def __repr__(self) -> str:
        if self.is_linear:
            body = ", ".join(t.name for t in self.terms)
            return f"Rule({self.name!r}, terms=[{body}])"
        return f"Rule({self.name!r}, expr={self.expr}, constants={[c.name for c in self.constants]})"


@dataclass(frozen=True)
class Pool:
    """A composable collection of terms: ``pool_a + pool_b`` concatenates, ``a * b`` forms product terms."""

    terms: tuple[Term, ...]

    def __post_init__(self):
        object.__setattr__(self, "terms", tuple(self.terms))

    def __add__(self, other: Pool) -> Pool:
        return Pool(self.terms + tuple(other.terms))

    def __mul__(self, other: Pool) -> Pool:
        return Pool(tuple(Term(f"{a.name}*{b.name}", a.expr * b.expr) for a in self.terms for b in other.terms))

    def __len__(self) -> int:
        return len(self.terms)

    def __iter__(self):
        return iter(self.terms)

    def term_names(self) -> tuple[str, ...]:
        return tuple(t.name for t in self.terms)

    def rule(self, name: str = "rule") -> Rule:
        return Rule(self.terms, name)


@dataclass(frozen=True)
class NetworkRule:
    """Maps layer groups to rules, so different layers can use different rules (the paper's Table 1).

    ``NetworkRule({(0,): ehebb, (1, 2): f0})``; parameters are a sequence with one entry per group, in order.
    """

    groups: tuple[tuple[tuple[int, ...], Rule], ...]

    def __init__(self, groups: Mapping | Sequence):
        items = list(groups.items()) if isinstance(groups, Mapping) else list(groups)
        norm = []
        for layers, rule in items:
            layers = (layers,) if isinstance(layers, int) else tuple(int(i) for i in layers)
            if not isinstance(rule, Rule):
                raise InvalidRuleError(f"NetworkRule: layers {layers} map to {rule!r}, expected a Rule.")
            norm.append((layers, rule))
        flat = [i for layers, _ in norm for i in layers]
        if len(set(flat)) != len(flat):
            raise InvalidRuleError(f"NetworkRule: a layer appears in two groups: {flat}.")
        object.__setattr__(self, "groups", tuple(norm))

    def group_of(self, layer: int) -> int:
        for g, (layers, _) in enumerate(self.groups):
            if layer in layers:
                return g
        covered = sorted(i for layers, _ in self.groups for i in layers)
        raise InvalidRuleError(f"Layer {layer} has no rule; this NetworkRule covers layers {covered}.")

    def rules_per_layer(self, n_layers: int) -> list[Rule]:
        return [self.groups[self.group_of(layer)][1] for layer in range(n_layers)]

    def params_per_layer(self, params: Sequence, n_layers: int) -> list:
        if len(params) != len(self.groups):
            raise InvalidRuleError(f"Expected {len(self.groups)} parameter entries (one per group), got {len(params)}.")
        return [params[self.group_of(layer)] for layer in range(n_layers)]
