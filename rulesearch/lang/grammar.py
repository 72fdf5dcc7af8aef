r"""Grammars: enumerate candidate plasticity terms under constraints.

A :class:`Grammar` forms every monomial :math:`\prod_k a_k` of degree ``min_degree..max_degree`` over a list of
*atoms* (signals, user factors such as :math:`\tanh(x_j)`, operators such as :math:`(W^\top y)_j`), keeps those
that satisfy the constraints (maximum power per atom, required and forbidden atoms or signals, allowed locality
classes), deduplicates them by canonical form (expanded, content and sign removed) and returns them in a stable order:
by degree, then by the order of the atoms.

Examples
--------
>>> from rulesearch.lang.signals import pre, post, err
>>> g = Grammar(atoms=(pre, post, err), max_degree=2)
>>> g.size
9
>>> g.term_names()[:4]
('pre', 'post', 'err', 'pre^2')
>>> Grammar(atoms=(pre, post, err), max_degree=2, required=("err",)).term_names()
('err', 'err*pre', 'err*post', 'err^2')
"""

from __future__ import annotations

import dataclasses
import itertools
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import sympy as sp

from ..errors import InvalidRuleError
from .rule import LOCALITY_CLASSES, Pool, Rule, Term, locality_of
from .signals import (
    Signal,
    bcm_threshold,
    err,
    post,
    pre,
    pre_err,
    reward,
    reward_baseline,
    sanger,
    signals_in,
    trace,
    w,
    wT,
    wv,
)

__all__ = ["BUILTIN_GRAMMARS", "Grammar", "canonical"]


def canonical(expr) -> sp.Expr:
    """Canonical form used for deduplication: expanded, numeric content removed, leading sign positive."""
    expr = sp.expand(sp.sympify(expr))
    if expr == 0:
        return expr
    _, prim = expr.as_content_primitive()
    if prim.could_extract_minus_sign():
        prim = -prim
    return prim


def _name(expr) -> str:
    return sp.sstr(expr, order="none").replace("**", "^").replace(" ", "")


@dataclass(frozen=True)
class Grammar:
    r"""Candidate terms: monomials over ``atoms`` of degree ``min_degree..max_degree``, filtered.

    Parameters
    ----------
    atoms : sequence of sympy.Expr
        Signals, user factors and operators (any expressions over signals).
    max_degree, min_degree : int
        Number of atoms multiplied together.
    degree_per_signal : mapping, optional
        Maximum power of an *atom*, keyed by the atom's name (e.g. ``{"w": 1}``). It counts how often that atom is
        multiplied in, not occurrences of a signal inside other atoms: with atoms ``w`` and ``wT(post)``,
        ``{"w": 1}`` keeps ``w * Contract(w, post)`` and drops ``w**2``. Limit an operator atom by its own name
        (``{"Contract(w,post)": 1}``); keys that are not atom names are refused.
    required, forbidden : sequence of str
        Names every term must contain / must not contain: an atom's name, or a signal name, which also matches
        inside operators, factors and powers (``forbidden=("pre",)`` drops ``tanh(pre)`` and ``Contract(w,pre)``).
    locality : sequence of str, optional
        Allowed locality classes (``synapse-local``, ``layer-nonlocal``, ``weight-transport``); all by default.
    """

    atoms: tuple = (pre, post, err, pre_err, w)
    max_degree: int = 2
    min_degree: int = 1
    degree_per_signal: Mapping[str, int] = field(default_factory=dict)
    required: tuple[str, ...] = ()
    forbidden: tuple[str, ...] = ()
    locality: tuple[str, ...] | None = None
    name: str = "grammar"

    def __post_init__(self):
        atoms = tuple(sp.sympify(a) for a in self.atoms)
        object.__setattr__(self, "atoms", atoms)
        object.__setattr__(self, "degree_per_signal", dict(self.degree_per_signal))
        object.__setattr__(self, "required", tuple(self.required))
        object.__setattr__(self, "forbidden", tuple(self.forbidden))
        if not atoms:
            raise InvalidRuleError("Grammar needs at least one atom (a signal, factor or operator).")
        for a in atoms:
            Term("atom", a)  # validates roles; raises naming the offending atom
        if len(set(atoms)) != len(atoms):
            raise InvalidRuleError(f"Grammar atoms contain duplicates: {list(atoms)}.")
        if not 1 <= self.min_degree <= self.max_degree:
            raise InvalidRuleError(
                f"Degrees must satisfy 1 <= min_degree <= max_degree; got min_degree={self.min_degree}, "
                f"max_degree={self.max_degree}."
            )
        names = [_name(a) for a in atoms]
        unknown = sorted(set(self.degree_per_signal) - set(names))
        if unknown:
            raise InvalidRuleError(
                f"Grammar degree_per_signal names {unknown}, which are not atom names: {names}. It limits the "
                f"power of an atom; add the signal as an atom or key the limit by the atom's name."
            )
        known = set(names) | {s.name for a in atoms for s in signals_in(a)}
        for key, values in (("required", self.required), ("forbidden", self.forbidden)):
            unknown = sorted(set(values) - known)
            if unknown:
                raise InvalidRuleError(
                    f"Grammar {key} names {unknown}, which are not atoms or signals: {sorted(known)}."
                )
        if self.locality is not None:
            loc = tuple(self.locality)
            bad = sorted(set(loc) - set(LOCALITY_CLASSES))
            if bad:
                raise InvalidRuleError(f"Unknown locality classes {bad}; allowed: {LOCALITY_CLASSES}.")
            object.__setattr__(self, "locality", loc)

    @classmethod
    def default(cls, traces: Sequence[Signal] = (), reward_signals: bool = True, max_degree: int = 3) -> Grammar:
        r"""The default discovery grammar: degree <= 3 over :math:`x, y, e, e', W`, declared traces, the reward
        (and its running baseline), and the built-in contractions :math:`(W^\top y)_j`, :math:`(W x)_i`,
        :math:`\sum_{k \le i} y_k W_{kj}`."""
        atoms: list = [pre, post, err, pre_err, w, *traces]
        if reward_signals:
            atoms += [reward, reward_baseline()]
        atoms += [wT(post), wv(pre), sanger()]
        return cls(tuple(atoms), max_degree=max_degree, degree_per_signal={"w": 1}, name="default")

    @classmethod
    def classic(cls, tau: float = 10.0, reward_signals: bool = True) -> Grammar:
        """The default grammar with pre/post traces and the BCM threshold declared (classic Hebbian family)."""
        traces = (trace(pre, tau), trace(post, tau), bcm_threshold(tau))
        grammar = cls.default(traces=traces, reward_signals=reward_signals)
        return dataclasses.replace(grammar, name="classic")

    # ---- enumeration ------------------------------------------------------------------------------------------
    def _candidates(self):
        """(names of the atoms used, monomial) for every degree and multiset of atoms, in a stable order."""
        names = [_name(a) for a in self.atoms]
        for d in range(self.min_degree, self.max_degree + 1):
            for combo in itertools.combinations_with_replacement(range(len(self.atoms)), d):
                counts = Counter(combo)
                if any(counts[i] > self.degree_per_signal.get(names[i], d) for i in counts):
                    continue
                yield {names[i] for i in counts}, sp.Mul(*(self.atoms[i] ** k for i, k in counts.items()))

    def terms(self) -> tuple[Term, ...]:
        """The candidate terms, deduplicated by canonical form, in a stable order."""
        out, seen = [], set()
        for used, expr in self._candidates():
            sigs = used | {s.name for s in signals_in(expr)}
            if any(r not in sigs for r in self.required) or any(f in sigs for f in self.forbidden):
                continue
            key = canonical(expr)
            if key == 0 or key in seen:
                continue
            if self.locality is not None and locality_of(key) not in self.locality:
                continue
            seen.add(key)
            out.append(Term(_name(expr), expr))
        return tuple(out)

    @property
    def size(self) -> int:
        """Number of candidate terms (after constraints and deduplication)."""
        return len(self.terms())

    def __len__(self) -> int:
        return self.size

    def term_names(self) -> tuple[str, ...]:
        return tuple(t.name for t in self.terms())

    def pool(self) -> Pool:
        return Pool(self.terms())

    def rule(self, name: str | None = None) -> Rule:
        """All candidate terms as one linear rule."""
        terms = self.terms()
        if not terms:
            raise InvalidRuleError(f"Grammar {self.name!r} produces no terms; relax its constraints.")
        return Rule(terms, name or self.name)

    def describe(self) -> str:
        """Size, and counts by degree and locality class."""
        terms = self.terms()
        by_loc = Counter(t.locality for t in terms)
        by_deg = Counter(_degree(t.expr, self.atoms) for t in terms)
        lines = [f"Grammar {self.name!r}: {len(terms)} terms over {len(self.atoms)} atoms, degree "
                 f"{self.min_degree}..{self.max_degree}"]  # fmt: skip
        lines.append("  by degree: " + ", ".join(f"{d}: {n}" for d, n in sorted(by_deg.items())))
        lines.append("  by locality: " + ", ".join(f"{k}: {n}" for k, n in sorted(by_loc.items())))
        return "\n".join(lines)


BUILTIN_GRAMMARS = {"default": Grammar.default, "classic": Grammar.classic}
"""The built-in grammars by name (``--grammar NAME``, ``rule: grammar:NAME``); each maker takes
``reward_signals=False`` to leave the reward and its baseline out."""


def _degree(expr, atoms) -> int:
    deg = 0
    for f in sp.Mul.make_args(expr):
        base, ex = f.as_base_exp()
        if base in atoms and ex.is_Integer:
            deg += int(ex)
        else:
            deg += 1
    return deg
