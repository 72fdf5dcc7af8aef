r"""The reward-modulated rules of the reservoir setting, written in the rule language.

Signals (per step, :mod:`rulesearch.reservoir.loop`): ``pre`` = the rates :math:`r_j`, ``post`` = the exploratory
output :math:`z_i` (noise included), ``reward`` = :math:`R = -e` (the task error, joint costs included), ``loss`` =
:math:`e`, ``w`` = :math:`W^{exp}_{ij}`. Traces are the toolkit's states, updated before the rule reads them, so
with :math:`\bar R \leftarrow (1 - 1/\tau_R)\bar R + R/\tau_R` and :math:`\bar z \leftarrow (1 - 1/\tau_z)\bar z
+ z/\tau_z` the node-perturbation (three-factor) update is

.. math::

    \Delta W_{ij} = \eta\, \Phi(R - \bar R)\, (z_i - \bar z_i)\, r_j, \qquad
    \Phi(u) = 5\, \mathrm{sign}(u) |u|^{1/4}

(Pyle & Rosenbaum 2019; one-sided, :math:`\Phi(u) = 5 H(u) |u|^{1/4}`, on Task 1), and Hoerzer et al.'s (2014)
reward-modulated Hebbian rule uses the binary modulator :math:`\Phi(u) = H(u)`. With exploration noise
:math:`\xi = z - W r` and a reward linear in the output, :math:`E[(R - \bar R)\,\xi] \propto \partial R/\partial z`,
so the expected update follows the reward gradient (checked by Monte Carlo in ``tests/test_reservoir.py``).
"""

from __future__ import annotations

import sympy as sp

from ..errors import ConfigError
from ..lang.rule import Rule, Term
from ..lang.signals import Constant, post, pre, reward, reward_baseline, trace

__all__ = ["node_perturbation", "modulator_family", "hoerzer_rmhl", "MODULATORS"]

MODULATORS = ("power", "binary", "linear")


def node_perturbation(
    tau_z: float = 5.0,
    tau_r: float = 5.0,
    one_sided: bool = False,
    modulator: str = "power",
    exponent="1/4",
    gain=5,
    name: str = "node_perturbation",
) -> Rule:
    r"""The one-term rule :math:`\Phi(R - \bar R)(z_i - \bar z_i) r_j` (its coefficient is the learning rate).

    ``modulator="power"``: :math:`\Phi(u) = g\,s(u)|u|^{p}` with :math:`s` = sign, or the Heaviside step when
    ``one_sided``; ``"binary"``: :math:`\Phi(u) = s(u)`; ``"linear"``: :math:`\Phi(u) = u` (classic node
    perturbation, :math:`u\,H(u)` when one-sided).
    """
    if modulator not in MODULATORS:
        raise ConfigError(f"node_perturbation: modulator={modulator!r}; expected one of {MODULATORS}.")
    u = reward - reward_baseline(tau_r, name=f"reward_bar{_tag(tau_r)}")
    s = sp.Heaviside(u) if one_sided else sp.sign(u)
    if modulator == "binary":
        phi = s
    elif modulator == "linear":
        phi = u * sp.Heaviside(u) if one_sided else u
    else:
        phi = sp.sympify(gain) * s * sp.Abs(u) ** sp.sympify(exponent)
    return Rule([Term(name, phi * (post - trace(post, tau_z)) * pre)], name=name)


def modulator_family(tau_z: float = 5.0, tau_r: float = 5.0) -> Rule:
    r"""A grammar of exploratory rules as one general rule with per-row constants ``a`` and ``p``:

    .. math:: \Delta W_{ij} = 5\,\big(a\,\mathrm{sign}(u) + (1 - a) H(u)\big) |u|^{p} (z_i - \bar z_i) r_j,
        \qquad u = R - \bar R,

    ``a = 1`` signed, ``a = 0`` one-sided; ``p = 0`` binary (Hoerzer et al. with ``a = 0``), ``1/4`` the paper's,
    ``1`` linear node perturbation. :func:`~rulesearch.reservoir.loop.run_reservoir` takes ``rule_constants``
    ``{"a": ..., "p": ...}`` per row, so every point of the grammar runs in one batch.
    """
    a, p = Constant("a", "signed (1) or one-sided (0)"), Constant("p", "exponent of |R - Rbar|")
    u = reward - reward_baseline(tau_r, name=f"reward_bar{_tag(tau_r)}")
    phi = 5 * (a * sp.sign(u) + (1 - a) * sp.Heaviside(u)) * sp.Abs(u) ** p
    return Rule.general(phi * (post - trace(post, tau_z)) * pre, [a, p], name="modulator_family")


def hoerzer_rmhl(tau_z: float = 5.0, tau_r: float = 5.0) -> Rule:
    r"""Hoerzer, Legenstein & Maass (2014): :math:`\Delta W_{ij} = \eta\, H(R - \bar R)(z_i - \bar z_i) r_j`."""
    return node_perturbation(tau_z, tau_r, one_sided=True, modulator="binary", name="rmhl")


def _tag(x: float) -> str:
    return f"{x:g}".replace(".", "p")
