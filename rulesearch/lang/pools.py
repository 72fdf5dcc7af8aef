r"""The paper's 10-term pool and named rules (Shervani-Tabar & Rosenbaum 2023, Methods Eqs. 14-23 and 7-10).

With :math:`x = y_{\ell-1}`, :math:`y = y_\ell`, :math:`e = e_\ell`, :math:`e' = e_{\ell-1}` (index notation,
:math:`i` post, :math:`j` pre):

====  ======================================================  ================
r     :math:`F^r_{ij}`                                        locality
====  ======================================================  ================
0     :math:`-e_i x_j` (pseudo-gradient)                      synapse-local
1     :math:`-y_i e'_j`                                       synapse-local
2     :math:`-e_i e'_j` (eHebb)                               synapse-local
3     :math:`-W_{ij}` (decay)                                 synapse-local
4     :math:`-e'_j`                                           synapse-local
5     :math:`-(\sum_k y_k)\, e_i x_j`                         layer-nonlocal
6     :math:`-(y^\top W e')\, y_i e'_j`                       layer-nonlocal
7     :math:`-(y^\top W e')\, e_i x_j`                        layer-nonlocal
8     :math:`-(e^\top W x)\, y_i e'_j`                        layer-nonlocal
9     :math:`y_i (x_j - (W^\top y)_j)` (Oja, subspace)         layer-nonlocal
====  ======================================================  ================

``pool_f5mean`` is the pool with :math:`F^5` width-normalized, :math:`-(\frac{1}{n}\sum_k y_k)\, e_i x_j`
(term ``F5m``): the sum over a layer's :math:`n` outputs makes :math:`F^5` 10-30x larger than :math:`F^0`, so one
meta-step on its coefficient can wreck the inner loop; the mean keeps it at :math:`F^0`'s scale.

Expect :math:`\theta_2 < 0` (eHebb pulls W toward the feedback's transpose only then); signs are never
constrained.

Feedback rules update the feedback matrices under plastic feedback (``dfb`` in W's layout, :math:`B_{ji}`).
``kp`` (Kolen-Pollack) is :math:`\Delta B_{ji} = -\theta_0 e_i x_j - \theta_1 B_{ji}`: with the forward rule's
learning rate and decay, :math:`W - B` decays geometrically, so the feedback aligns with W.
"""

from __future__ import annotations

from ..errors import InvalidRuleError
from .rule import Pool, Rule, Term
from .signals import bilinear, err, fb, layer_mean, layer_sum, post, pre, pre_err, w, wT

__all__ = [
    "PAPER_POOL",
    "pool",
    "pool_f5mean",
    "f0",
    "ehebb",
    "oja",
    "bio",
    "NAMED_RULES",
    "named_rule",
    "kp",
    "FEEDBACK_RULES",
]

PAPER_POOL = Pool(
    (
        Term("F0", -err * pre, "pseudo-gradient -e x^T"),
        Term("F1", -post * pre_err, "-y e'^T"),
        Term("F2", -err * pre_err, "eHebb -e e'^T"),
        Term("F3", -w, "weight decay -W"),
        Term("F4", -pre_err, "-1 e'^T"),
        Term("F5", -layer_sum(post) * err * pre, "-(sum y) e x^T"),
        Term("F6", -bilinear(post, pre_err) * post * pre_err, "-y y^T W e' e'^T"),
        Term("F7", -bilinear(post, pre_err) * err * pre, "-e y^T W e' x^T"),
        Term("F8", -bilinear(err, pre) * post * pre_err, "-y x^T W^T e e'^T"),
        Term("F9", post * (pre - wT(post)), "Oja (subspace) y x^T - y y^T W"),
    )
)

pool = PAPER_POOL.rule("pool")
f0 = pool.select(["F0"])
ehebb = pool.select(["F0", "F2"])
oja = pool.select(["F0", "F9"])
bio = pool.select(["F0", "F2", "F9"])
f0, ehebb, oja, bio = (Rule(r.terms, n) for r, n in ((f0, "f0"), (ehebb, "ehebb"), (oja, "oja"), (bio, "bio")))

F5_MEAN = Term("F5m", -layer_mean(post) * err * pre, "-(mean y) e x^T (F5 normalized by the layer's width)")
pool_f5mean = Rule(tuple(F5_MEAN if t.name == "F5" else t for t in pool.terms), "pool_f5mean")

NAMED_RULES = {"pool": pool, "pool_f5mean": pool_f5mean, "f0": f0, "ehebb": ehebb, "oja": oja, "bio": bio}

kp = Rule(
    (
        Term("KP0", -err * pre, "pseudo-gradient on the feedback -e x^T"),
        Term("KP1", -fb, "feedback decay -B"),
    ),
    "kp",
)
FEEDBACK_RULES = {"kp": kp}
"""Named feedback rules (plastic feedback); a named forward rule may serve as one too."""


def named_rule(name: str) -> Rule:
    """One of ``pool``, ``pool_f5mean``, ``f0``, ``ehebb``, ``oja``, ``bio``."""
    try:
        return NAMED_RULES[name]
    except KeyError:
        raise InvalidRuleError(f"Unknown rule {name!r}; named rules are {sorted(NAMED_RULES)}.") from None
