r"""Preconditioned-gradient rules of a recurrent network at its fixed point, written in the rule language.

With :math:`G = \mathrm{diag}(g)` and the direct error :math:`\delta` (signals ``gain``, ``delta``), a rule of the
family is

.. math:: \Delta W = -\theta\; (P_L\, \delta)\, (P_R^\top r^*)^\top, \qquad P_L, P_R \text{ products of factors}

from :data:`FACTORS` over :math:`\{I, G, W, W^\top\}`. Each factor is a map of vectors built from the language's
contractions (``wv``, ``wT``) and reindexing (``as_pre``, ``as_post``), so a rule is a plain compiled rule: batched,
no inverse, :math:`O(B N^2)` per step. Zhu & Rosenbaum's rules:

* ``dW1`` (Euclidean gradient by implicit differentiation): :math:`-\theta\, \mathrm{err}\, r^{*\top}` with the
  network's implicit error :math:`(G^{-1} - W^\top)^{-1}\delta` (one solve per sample);
* ``dW3``: :math:`P_L = (I - W G) G`, :math:`P_R = (I - G W)^\top (I - G W)`;
* ``dW4``: :math:`P_L = I - W G`, :math:`P_R = (I - W G)^\top (I - W G)`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from ..errors import InvalidRuleError
from ..lang.rule import Rule, Term
from ..lang.signals import as_post, as_pre, delta, err, gain, pre, wT, wv

__all__ = [
    "FACTORS",
    "TRANSPOSE",
    "apply_factors",
    "preconditioned_vectors",
    "preconditioned",
    "dW1",
    "dW3",
    "dW4",
    "FIXED_POINT_RULES",
]


def _W(u):
    return wv(as_pre(u))  # (W u)_i for a post-role u


def _Wt(u):
    return as_post(wT(u))  # (W^T u)_i


FACTORS: dict[str, Callable] = {
    "G": lambda u: gain * u,
    "W": _W,
    "Wt": _Wt,
    "I-WG": lambda u: u - _W(gain * u),
    "I-GW": lambda u: u - gain * _W(u),
    "I-WtG": lambda u: u - _Wt(gain * u),
    "I-GWt": lambda u: u - gain * _Wt(u),
}
"""Linear maps of a neuron vector (post role): name -> function of a SymPy expression."""

TRANSPOSE = {"G": "G", "W": "Wt", "Wt": "W", "I-WG": "I-GWt", "I-GWt": "I-WG", "I-GW": "I-WtG", "I-WtG": "I-GW"}
"""The transpose of each factor, by name."""


def apply_factors(names: Sequence[str], u):
    """:math:`F_1 F_2 \\cdots F_k u` for ``names = (F_1, ..., F_k)`` (the last factor acts first)."""
    for name in reversed(tuple(names)):
        if name not in FACTORS:
            raise InvalidRuleError(f"Unknown preconditioner factor {name!r}; known: {sorted(FACTORS)}.")
        u = FACTORS[name](u)
    return u


def preconditioned_vectors(left: Sequence[str], right: Sequence[str]) -> tuple:
    r"""The post-role vector :math:`P_L \delta` and the pre-role vector :math:`P_R^\top r^*` of
    :func:`preconditioned`."""
    for name in right:
        if name not in TRANSPOSE:
            raise InvalidRuleError(f"Unknown preconditioner factor {name!r}; known: {sorted(FACTORS)}.")
    u = apply_factors(left, delta)
    return u, as_pre(apply_factors([TRANSPOSE[f] for f in reversed(tuple(right))], as_post(pre)))


def preconditioned(left: Sequence[str], right: Sequence[str], name: str | None = None) -> Rule:
    r"""The one-term rule :math:`\Delta W = -\theta\, (P_L \delta)(r^{*\top} P_R)` with :math:`P_L` the product of
    the ``left`` factors and :math:`P_R` of the ``right`` factors (names from :data:`FACTORS`; empty: identity)."""
    left, right = tuple(left), tuple(right)
    u, v = preconditioned_vectors(left, right)
    label = f"[{' '.join(left) or 'I'}] delta r^T [{' '.join(right) or 'I'}]"
    return Rule((Term(name or "P", -u * v, label),), name or label)


dW1 = Rule((Term("dW1", -err * pre, "implicit gradient -(G^-1 - W^T)^-1 delta r^T"),), "dW1")
dW3 = preconditioned(("I-WG", "G"), ("I-WtG", "I-GW"), "dW3")
dW4 = preconditioned(("I-WG",), ("I-GWt", "I-WG"), "dW4")
FIXED_POINT_RULES = {"dW1": dW1, "dW3": dW3, "dW4": dW4}
