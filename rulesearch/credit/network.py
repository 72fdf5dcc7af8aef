r"""Predictive coding as the error pathway of rulesearch's feedforward network: rules read PC prediction errors.

:class:`PCNetwork` is the feedforward :class:`~rulesearch.networks.Network` (its forward pass, loss and
initialization) whose errors ``e_l`` (the rule signals ``err`` and ``pre_err``) come from truncated predictive-coding
inference instead of a feedback pathway. Beliefs live on the pre-activations (Whittington & Bogacz 2017): layer ``l``
predicts

.. math::

    f_l(v_{l-1}) = W_l\,\sigma(v_{l-1}) \;(l \ge 2), \qquad f_1(x) = W_1 x,

so :math:`J_{l+1}(v_l)^{\top} g = \sigma'(v_l) \odot (W_{l+1}^{\top} g)` and the output error is
:math:`\epsilon_L = y_L - \mathrm{target}`, the network's own ``e_L``. The errors are those of
:func:`~rulesearch.credit.fixedpred_errors` (``inference="fixedpred"``, Jacobians at the feed-forward values) or
:func:`~rulesearch.credit.strict_relax` (``"strict"``, at the relaxed beliefs; there ``e_L`` too is recomputed at the
beliefs, while the signals ``pre`` and ``post`` stay the feed-forward activities). FixedPred with ``eta = 1`` and
``n_iters >= L - l + 1`` gives ``e_l`` equal to backprop's; fewer iterations leave the lower errors exactly zero.
The input error ``e_0`` (``pre_err`` of the first layer) uses the network's convention for the input derivative
(:mod:`rulesearch.networks.feedforward`), i.e. it is the error of a free belief about the input.

Everything is plain differentiable tensor algebra, so meta-gradients flow through the inference. The network is not
an :class:`~rulesearch.networks.AdjointNetwork`: rules run on the inner loop's autograd path.

References
----------
Whittington, J. C. R. & Bogacz, R. An approximation of the error backpropagation algorithm in a predictive coding
network with local Hebbian synaptic plasticity. Neural Comput. 29(5), 1229-1262 (2017).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from numbers import Integral, Real

import torch

from ..batched import matvec, vecmat
from ..errors import ConfigError
from ..networks.base import LayeredNetwork
from ..networks.feedforward import Network, activity_orthonormality, vector_angle
from .predictive_coding import fixedpred_errors, strict_relax

__all__ = ["INFERENCES", "PCNetwork"]

INFERENCES = ("fixedpred", "strict")
"""The PC inference methods a :class:`PCNetwork` runs."""


@dataclass(frozen=True)
class PCNetwork(LayeredNetwork):
    """A feedforward network whose errors are predictive-coding prediction errors (see the module docstring).

    Parameters
    ----------
    base : Network
        The feedforward network (sizes, activation, loss, initialization); its feedback mode must be ``"bp"``
        (PC's Jacobians use the weights themselves).
    inference : str
        ``"fixedpred"`` or ``"strict"``.
    eta : float
        Belief step size :math:`\\eta`.
    n_iters : int
        Inference iterations ``n`` (sweeps or energy steps).

    Examples
    --------
    >>> from rulesearch.networks import Network
    >>> net = PCNetwork(Network(sizes=(6, 5, 4, 3), feedback="bp"), "fixedpred", eta=1.0, n_iters=2)
    >>> net.n_layers, net.feedback
    (3, 'pc-fixedpred')
    """

    base: Network
    inference: str = "fixedpred"
    eta: float = 1.0
    n_iters: int = 1

    def __post_init__(self) -> None:
        if not isinstance(self.base, Network) or self.base.feedback != "bp":
            got = getattr(self.base, "feedback", type(self.base).__name__)
            raise ConfigError(
                f"PCNetwork needs a feedforward Network with feedback='bp' as its base (PC's Jacobians use W^T); "
                f"received {got!r}. Use Network(..., feedback='bp')."
            )
        if self.inference not in INFERENCES:
            raise ConfigError(f"Unknown PC inference {self.inference!r}; allowed: {', '.join(map(repr, INFERENCES))}.")
        eta = self.eta
        if isinstance(eta, bool) or not isinstance(eta, Real) or not math.isfinite(eta) or eta <= 0:
            raise ConfigError(f"PC eta (the belief step size) must be a finite number > 0; received {eta!r}.")
        n = self.n_iters
        if isinstance(n, bool) or not isinstance(n, Integral) or n < 1:
            raise ConfigError(f"PC n_iters (inference iterations) must be an integer >= 1; received {n!r}.")

    # ---- shapes and the feedforward parts: the base network's ------------------------------------------------
    @property
    def sizes(self) -> tuple[int, ...]:
        return self.base.sizes

    @property
    def feedback(self) -> str:
        """The credit-assignment setting's name, ``"pc-<inference>"``."""
        return f"pc-{self.inference}"

    def init_episodes(self, seed, t, ks, dtype=torch.float32, device=None):
        return self.base.init_episodes(seed, t, ks, dtype=dtype, device=device)

    def check_weights(self, weights):
        return self.base.check_weights(weights)

    def targets(self, y, dtype, batch_shape=None):
        return self.base.targets(y, dtype, batch_shape)

    def forward(self, weights, x):
        return self.base.forward(weights, x)

    def loss_per_sample(self, act, target):
        return self.base.loss_per_sample(act, target)

    def feedback_matrices(self, weights, feedback, layers):
        """The weights (``fb = W``); under Strict every layer's, since the predictions need them all."""
        every = range(self.n_layers) if self.inference == "strict" else layers
        return self.base.feedback_matrices(weights, feedback, every)

    # ---- the errors: PC inference --------------------------------------------------------------------------
    def _pullback(self, weights, l: int, u, d=None):
        """``g -> J_{l+1}(u_l)^T g = d_l * (W_{l+1}^T g)`` at the belief ``u_l`` (``d_l = sigma'(u_l)``; ``d_0``: the
        input derivative), or with a given ``d``."""
        if d is None:
            d = self.base.input_derivative(u) if l == 0 else self.base.derivative(self.base.activate(u), u)
        w = weights[l]
        return lambda g: vecmat(g, w) * d

    def _predict(self, weights, l: int, u):
        """``(f_l(u), pullback of layer l at u)`` with ``f_l(u) = W_l sigma(u)`` (``f_1(x) = W_1 x``)."""
        p = matvec(weights[l - 1], u if l == 1 else self.base.activate(u))
        return p, self._pullback(weights, l - 1, u)

    def propagate(self, act, e_out, mats, layers):
        n, base, layers = self.n_layers, self.base, tuple(layers)
        es: list = [None] * (n + 1)
        if self.inference == "fixedpred":
            backs: list = [None] * (n + 1)
            for l in layers:
                d = base.input_derivative(act.ys[0]) if l == 0 else base.derivative(act.ys[l], act.zs[l])
                backs[l + 1] = self._pullback(mats, l, None, d)
            eps, _ = fixedpred_errors(e_out, backs, float(self.eta), int(self.n_iters), layers)
            es[n] = e_out
            for l in layers:  # an error the sweeps have not reached is exactly zero
                es[l] = torch.zeros_like(act.ys[l]) if eps[l] is None else eps[l]
            return es
        target = act.ys[-1] - e_out
        beliefs = [act.ys[0]] + [act.zs[l] for l in range(1, n)]
        _, eps, backs = strict_relax(
            lambda l, u: self._predict(mats, l, u),
            lambda p: base.output(p) - target,
            beliefs,
            float(self.eta),
            int(self.n_iters),
        )
        es[n] = eps[n]
        for l in layers:
            es[l] = backs[1](eps[1]) if l == 0 else eps[l]
        return es

    def diagnostics(self, weights, feedback, act, target):
        """Angles between the query-mean PC and backprop errors of the hidden layers (as the feedforward network's
        alignment angles) and the weight orthonormality."""
        n = self.n_layers
        e_out = act.ys[-1] - target
        layers = range(n - 1, 0, -1)
        mats = self.feedback_matrices(weights, feedback, layers)
        pc = self.propagate(act, e_out, mats, layers)
        bp = self.base.propagate(act, e_out, list(weights), layers)
        if n == 1:
            empty = e_out.new_zeros((e_out.shape[0], 0))
            return empty, empty, activity_orthonormality(weights, act.ys, act.zs)
        angles = torch.stack([vector_angle(pc[i].mean(1), bp[i].mean(1)) for i in range(1, n)], dim=-1)
        per_sample = torch.stack([vector_angle(pc[i], bp[i]).mean(-1) for i in range(1, n)], dim=-1)
        return angles, per_sample, activity_orthonormality(weights, act.ys, act.zs)
