r"""Planted rules: make any torch function of the signals an update, noise a sample table, score a recovery.

To test whether distillation finds a known rule, *plant* it: run it in the network, sample its updates, fit, and
compare the formula with the truth.

* A rule of the rule language plants itself (``rule.compile()``). Any other function of the signals, e.g. one
  outside every grammar, becomes an update object with :class:`FunctionUpdate`.
* :func:`add_noise` adds Gaussian noise to the target column of a sample table.
* :func:`same_terms` and :func:`is_recovered` decide whether a distilled formula is the planted one.

The update protocol
-------------------
:func:`~rulesearch.inner.run_episodes` (and so :func:`~rulesearch.distill.distill_update`,
:func:`~rulesearch.distill.collect_samples`) accepts any object with

``needs``
    a frozenset of the base signal names it reads (a subset of ``pre, post, err, pre_err, w, fb, reward, loss,
    mod``); the loop computes only those (``pre_err`` of the first layer, the feedback pathway, ...);
``__call__(signals, params) -> dW``
    ``signals`` maps each name in ``needs`` to a tensor: ``pre``, ``pre_err`` ``(B, n_pre)``; ``post``, ``err``
    ``(B, n_post)``; ``w``, ``fb`` ``(B, n_post, n_pre)``; ``reward``, ``loss``, ``mod`` ``(B,)``. ``params`` is
    what the caller passed (``None`` for a planted function). It returns ``dW`` of shape ``(B, n_post, n_pre)``;
``states`` (optional)
    stateful derived signals (traces), as compiled rules have them.

:class:`FunctionUpdate` wraps a plain function of the signals in this protocol and checks its output.

Examples
--------
>>> import torch
>>> hebb_tanh = FunctionUpdate(lambda s: 0.01 * torch.tanh(s["post"])[:, :, None] * s["pre"][:, None, :],
...                            needs=("pre", "post"))
>>> dw = hebb_tanh({"pre": torch.ones(2, 3), "post": torch.zeros(2, 4)}, None)
>>> tuple(dw.shape)
(2, 4, 3)
>>> from rulesearch.lang.signals import post, pre, reward
>>> same_terms(0.5 * post * pre + 0.2 * reward**2, 0.5 * post * pre + 0.2 * reward, [(reward**2, reward)])
True
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence

import numpy as np
import pandas as pd
import sympy as sp
import torch

from ..errors import ConfigError, ShapeError
from ..inner import SIGNALS
from .pipeline import heldout_error
from .samples import TARGET

__all__ = ["FunctionUpdate", "add_noise", "is_recovered", "reduce_identities", "same_terms"]


class FunctionUpdate:
    """A torch function of the signals as an update object (the protocol in this module's docstring).

    Parameters
    ----------
    fn : callable
        ``fn(signals) -> dW`` (or ``fn(signals, params)`` with ``takes_params=True``), ``dW`` of shape
        ``(B, n_post, n_pre)``; ``signals`` holds the names in ``needs``.
    needs : iterable of str
        The base signals ``fn`` reads.
    takes_params : bool
        Pass the caller's ``params`` as a second argument.
    name : str
        Shown in errors.
    """

    def __init__(self, fn: Callable, needs: Iterable[str], takes_params: bool = False, name: str = "function"):
        if not callable(fn):
            raise ConfigError(f"FunctionUpdate needs a callable fn(signals) -> dW; received {type(fn).__name__}.")
        needs = frozenset([needs] if isinstance(needs, str) else needs)
        unknown = sorted(needs - set(SIGNALS))
        if unknown or not needs:
            raise ConfigError(
                f"FunctionUpdate {name!r}: needs must name base signals from {sorted(SIGNALS)}; "
                f"received {sorted(needs) or 'none'}."
            )
        self.fn, self.needs, self.takes_params, self.name = fn, needs, takes_params, name

    def __call__(self, signals, params) -> torch.Tensor:
        dw = self.fn(signals, params) if self.takes_params else self.fn(signals)
        want = None
        if "w" in signals:
            want = tuple(signals["w"].shape)
        elif "post" in signals and "pre" in signals:
            want = (signals["pre"].shape[0], signals["post"].shape[-1], signals["pre"].shape[-1])
        if not isinstance(dw, torch.Tensor) or dw.dim() != 3 or (want is not None and tuple(dw.shape) != want):
            got = tuple(dw.shape) if isinstance(dw, torch.Tensor) else type(dw).__name__
            raise ShapeError(
                f"FunctionUpdate {self.name!r} returned {got}; an update returns dW of shape (B, n_post, n_pre)"
                f"{f' = {want}' if want else ''}. Broadcast per-neuron signals: post[:, :, None] * pre[:, None, :]."
            )
        return dw

    def __repr__(self) -> str:
        return f"FunctionUpdate({self.name!r}, needs={sorted(self.needs)})"


def add_noise(samples: pd.DataFrame, level: float, seed: int | Sequence[int] = 0) -> pd.DataFrame:
    """A copy of a sample table with Gaussian noise of standard deviation ``level * std(dw)`` added to ``dw``.

    Only the target changes (the signals stay exact), the metadata is kept, and the noise is a function of
    ``seed`` (an int or a sequence of ints, as ``numpy.random.default_rng`` takes).
    """
    if not (isinstance(level, (int, float)) and math.isfinite(level) and level >= 0):
        raise ConfigError(f"Noise level must be a finite number >= 0 (a fraction of std(dw)); received {level!r}.")
    if TARGET not in samples.columns:
        raise ShapeError(f"The sample table has no target column {TARGET!r}; build it with collect_samples.")
    out = samples.copy()
    out.attrs = samples.attrs
    dw = samples[TARGET].to_numpy(dtype=np.float64)
    out[TARGET] = dw + level * dw.std() * np.random.default_rng(seed).standard_normal(len(dw))
    return out


def _terms(expr) -> dict:
    out: dict = {}
    for t in sp.Add.make_args(sp.expand(expr)):
        c, m = t.as_coeff_Mul()
        out[m] = out.get(m, 0.0) + float(c)
    return out


def reduce_identities(expr, identities: Iterable[tuple] = ()) -> dict:
    """Monomial -> coefficient of ``expr`` expanded, with every monomial that an identity ``(term, combination)``
    drops rewritten as its combination (e.g. ``(reward**2, reward)``; a backend's ``identities_``), negligible
    coefficients (below 1e-9 of the largest) removed."""
    terms = _terms(expr)
    rewrite = {sp.expand(t): comb for t, comb in identities}
    for _ in range(4):  # identities map to simpler terms, so a few passes suffice
        changed = False
        for m in list(terms):
            if m in rewrite:
                c = terms.pop(m)
                for m2, c2 in _terms(rewrite[m]).items():
                    terms[m2] = terms.get(m2, 0.0) + c * c2
                changed = True
        if not changed:
            break
    scale = max((abs(c) for c in terms.values()), default=0.0)
    return {m: c for m, c in terms.items() if abs(c) > 1e-9 * scale}


def same_terms(found, truth, identities: Iterable[tuple] = ()) -> bool:
    """Whether two formulas have the same monomials after expansion, modulo the data's identities."""
    identities = list(identities)
    return set(reduce_identities(found, identities)) == set(reduce_identities(truth, identities))


def is_recovered(
    found, truth, identities: Iterable[tuple] = (), heldout: pd.DataFrame | None = None, tol: float = 1e-6
) -> bool:
    """Whether a distilled formula is the planted one: the same terms (:func:`same_terms`) and, when noise-free
    ``heldout`` samples are given, a weighted relative RMS error below ``tol`` on them (the same values)."""
    if not same_terms(found, truth, identities):
        return False
    return heldout is None or bool(heldout_error(found, heldout) < tol)
