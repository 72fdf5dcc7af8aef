"""Feedforward networks: layers, activations, feedback pathways, initialization (pure functions).

A network is a frozen :class:`Network` value; its weights and feedback matrices are plain tensor lists with a
leading episode dimension ``B``, so every function here is pure (tensors in, tensors out) and batched over
episodes.

Notation (Shervani-Tabar & Rosenbaum 2023, Eqs. 1-3). Layer ``l = 1..L`` computes

.. math::

    z_l = W_l y_{l-1}, \\qquad y_l = \\sigma(z_l) \\;(l < L), \\qquad y_0 = x,

with a linear output ``z_L``: ``y_L = softmax(z_L)`` under the cross-entropy loss (``loss="ce"``) and
``y_L = z_L`` under ``loss="mse"``. In both cases the output error is ``e_L = y_L - target`` (the gradient of
the per-sample loss w.r.t. ``z_L``; the MSE loss is ``0.5 * ||y_L - target||^2``). Hidden errors are

.. math::

    e_l = (F_l e_{l+1}) \\odot \\sigma'(z_l), \\qquad l = L-1, \\dots, 0,

where the feedback ``F_l`` depends on the mode: ``W_{l+1}^T`` (``bp``), a fixed random matrix drawn per
episode (``fa``), ``sign(W_{l+1}^T)`` times the layer's Xavier bound, recomputed every step (``sign``), a
plastic matrix updated by its own rule (``plastic``), or, for direct feedback alignment (``dfa``),
``e_l = (D_l e_L) \\odot \\sigma'(z_l)`` with fixed random ``D_l``. The input-layer error ``e_0`` uses the
same formula with ``\\sigma'`` of the input treated as a softplus activity, ``1 - exp(-beta x)`` (the paper's
code).

Layouts (list index ``l = 0..L-1`` is weight layer ``l+1``):

* ``weights[l]``: ``(B, n_{l+1}, n_l)``, i.e. ``(B, n_post, n_pre)``.
* ``feedback[l]`` is stored in W's layout, ``(B, n_post, n_pre)`` (``fb = F_l^T``; it maps an error by
  ``e_l = e_{l+1}^T fb``); under ``dfa`` ``feedback[l] = D_l^T`` has shape ``(B, n_L, n_l)``. Modes ``bp`` and
  ``sign`` store no feedback (an empty list): it is derived from the current weights.
* activities ``y_0..y_L`` and errors ``e_0..e_L``: ``(B, n_l)`` for one sample per episode or ``(B, N, n_l)``
  for N samples per episode.

``sigma'`` is computed from the activity for invertible activations (softplus: ``1 - exp(-beta y)``, an exact
identity; sigmoid: ``y (1 - y)``; tanh: ``1 - y^2``; linear: 1) and from ``z`` otherwise (silu).

Examples
--------
>>> import torch
>>> net = Network(sizes=(6, 5, 4, 3), feedback="fa")
>>> weights, feedback = init_params(net, seed=0, t=0, ks=[0, 1], dtype=torch.float64)
>>> [tuple(w.shape) for w in weights]
[(2, 5, 6), (2, 4, 5), (2, 3, 4)]
>>> ys = forward(net, weights, torch.rand(2, 6, dtype=torch.float64))
>>> es = errors(net, weights, feedback, ys, torch.tensor([0, 2]))
>>> [tuple(e.shape) for e in es]
[(2, 6), (2, 5), (2, 4), (2, 3)]

References
----------
Shervani-Tabar, N. & Rosenbaum, R. Meta-learning biologically plausible plasticity rules with random feedback
pathways. Nat. Commun. 14, 1805 (2023).
"""

from __future__ import annotations

import dataclasses
import difflib
import math
from collections.abc import Sequence
from dataclasses import dataclass
from numbers import Integral, Real

import torch
from torch import Tensor

from ..batched import RankOne, add, matvec, vecmat
from ..errors import ConfigError, ShapeError, SignalError
from ..tasks.episodes import episode_generator
from .base import Activity, AdjointNetwork, StepTrace

__all__ = [
    "PAPER",
    "PAPER_3LAYER",
    "DIGITS",
    "ACTIVATIONS",
    "FEEDBACK_MODES",
    "LOSSES",
    "INITS",
    "Network",
    "init_params",
    "stack_episodes",
    "forward",
    "make_targets",
    "output_error",
    "sample_loss",
    "feedback_matrices",
    "errors",
    "backprop_errors",
    "query_loss_accuracy",
    "alignment_angles",
    "vector_angle",
    "activity_orthonormality",
    "orthonormality",
]

PAPER = (784, 170, 130, 100, 70, 47)
"""The paper's EMNIST network (5 weight layers, 47 raw-label outputs)."""
PAPER_3LAYER = (784, 130, 70, 47)
"""The paper's 3-layer network of Table 1."""
DIGITS = (64, 170, 130, 100, 70, 10)
"""The default for sklearn's 8x8 digits."""

ACTIVATIONS = ("softplus", "tanh", "sigmoid", "silu", "linear")
_INVERTIBLE = frozenset({"softplus", "tanh", "sigmoid", "linear"})
FEEDBACK_MODES = ("bp", "fa", "sign", "dfa", "plastic")
LOSSES = ("ce", "mse")
INITS = ("xavier", "xavier_normal")


def _suggest(value: str, allowed: Sequence[str]) -> str:
    close = difflib.get_close_matches(str(value), list(allowed), n=1)
    return f" Did you mean {close[0]!r}?" if close else ""


def _check_choice(name: str, value, allowed: Sequence[str], hint: str = "") -> None:
    if value not in allowed:
        raise ConfigError(
            f"Unknown {name} {value!r}. Allowed values: {', '.join(map(repr, allowed))}.{hint}"
            f"{_suggest(value, allowed) if not hint else ''}"
        )


def _check_positive(name: str, value) -> None:
    if isinstance(value, bool) or not isinstance(value, Real) or not math.isfinite(value) or value <= 0:
        raise ConfigError(f"{name} must be a finite number > 0; received {value!r}.")


@dataclass(frozen=True)
class Network(AdjointNetwork):
    """A bias-free feedforward network with a chosen feedback pathway (the :class:`LayeredNetwork` of the paper,
    with the hand-written step VJP of an :class:`AdjointNetwork`).

    Parameters
    ----------
    sizes : tuple of int
        Layer widths ``(n_0, ..., n_L)``: input, hidden layers, output. Any depth >= 1 weight layer.
    activation : str
        Hidden nonlinearity, one of :data:`ACTIVATIONS`. ReLU is refused: meta-gradients differentiate the
        nonlinearity twice.
    beta : float
        Softplus sharpness, ``sigma(z) = log(1 + exp(beta z)) / beta``; also used for the input-layer
        error ``e_0`` whatever the activation.
    feedback : str
        Error pathway, one of :data:`FEEDBACK_MODES` (``bp``, ``fa``, ``sign``, ``dfa``, ``plastic``).
    loss : str
        ``"ce"`` (softmax output, integer labels) or ``"mse"`` (linear output, integer labels one-hot encoded
        or float targets of shape ``(..., n_out)``).
    init : str
        ``"xavier"`` (Glorot uniform, ``U(+-gain sqrt(6 / (fan_in + fan_out)))``) or ``"xavier_normal"``
        (``N(0, gain^2 2 / (fan_in + fan_out))``), for the weights and (with ``feedback_gain``) the feedback.
    gain : float
        Scale of the initial forward weights (poor-initialization studies use small or large gains).
    feedback_gain : float
        Scale of the random feedback matrices (``fa``, ``dfa``, ``plastic``) and of ``sign`` feedback.

    Examples
    --------
    >>> Network(sizes=DIGITS).n_layers
    5
    >>> Network(sizes=(4, 3), activation="relu")  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ...
    rulesearch.errors.ConfigError: Unknown activation 'relu'. ...
    """

    sizes: tuple[int, ...] = PAPER
    activation: str = "softplus"
    beta: float = 10.0
    feedback: str = "fa"
    loss: str = "ce"
    init: str = "xavier"
    gain: float = 1.0
    feedback_gain: float = 1.0

    def __post_init__(self) -> None:
        sizes = self.sizes
        if isinstance(sizes, (str, bytes)) or not isinstance(sizes, Sequence):
            raise ConfigError(f"sizes must be a sequence of layer widths such as {DIGITS}; received {sizes!r}.")
        if len(sizes) < 2 or any(isinstance(n, bool) or not isinstance(n, Integral) or n < 1 for n in sizes):
            raise ConfigError(
                f"sizes must hold at least two positive integers (input, ..., output); received {sizes!r}."
            )
        object.__setattr__(self, "sizes", tuple(int(n) for n in sizes))
        relu_hint = (
            " ReLU is not supported: meta-gradients differentiate the nonlinearity twice and relu'' = 0;"
            " use 'softplus' (large beta approximates relu)."
            if str(self.activation).lower() == "relu"
            else ""
        )
        _check_choice("activation", self.activation, ACTIVATIONS, relu_hint)
        _check_choice("feedback mode", self.feedback, FEEDBACK_MODES)
        _check_choice("loss", self.loss, LOSSES)
        _check_choice("init", self.init, INITS)
        _check_positive("beta", self.beta)
        _check_positive("gain", self.gain)
        _check_positive("feedback_gain", self.feedback_gain)

    # ---- sizes -----------------------------------------------------------------------------------------
    @property
    def feedback_shapes(self) -> tuple[tuple[int, int], ...]:
        """Shapes of the stored feedback matrices (empty for ``bp`` and ``sign``)."""
        if self.feedback in ("fa", "plastic"):
            return self.weight_shapes
        if self.feedback == "dfa":
            return tuple((self.n_out, self.sizes[i]) for i in range(self.n_layers))
        return ()

    @property
    def bounds(self) -> tuple[float, ...]:
        """Xavier bound ``gain * sqrt(6 / (fan_in + fan_out))`` of every weight layer."""
        return tuple(self.gain * math.sqrt(6.0 / (a + b)) for a, b in self.weight_shapes)

    @property
    def feedback_bounds(self) -> tuple[float, ...]:
        """Xavier bounds of the feedback matrices (``sign``: the scale of ``sign(W)``)."""
        shapes = self.weight_shapes if self.feedback == "sign" else self.feedback_shapes
        return tuple(self.feedback_gain * math.sqrt(6.0 / (a + b)) for a, b in shapes)

    @property
    def has_fb(self) -> bool:
        """Whether a per-layer feedback matrix in W's layout (the ``fb`` signal) exists (not under dfa)."""
        return self.feedback != "dfa"

    @property
    def plastic_feedback(self) -> bool:
        return self.feedback == "plastic"

    # ---- elementwise maps (for networks built on this one, e.g. rulesearch.credit.PCNetwork) ----------------
    def activate(self, z: Tensor) -> Tensor:
        """The hidden nonlinearity ``sigma(z)``."""
        return _activate(self, z)

    def output(self, z: Tensor) -> Tensor:
        """The output map of ``z_L``: softmax under CE, identity under MSE."""
        return _output(self, z)

    def derivative(self, y: Tensor, z: Tensor | None) -> Tensor:
        """``sigma'(z)`` from the activity ``y = sigma(z)`` (and ``z`` where needed)."""
        return _derivative(self, y, z)

    def input_derivative(self, x: Tensor) -> Tensor:
        """``1 - exp(-beta x)``: the input's derivative in the convention of ``e_0``."""
        return _input_derivative(self, x)

    # ---- the LayeredNetwork contract (the hot path: validation is in the public functions below) ----------
    def init_episodes(self, seed, t, ks, dtype=torch.float32, device=None):
        return init_params(self, seed, t, ks, dtype=dtype, device=device)

    @property
    def feedback_context(self):
        return (
            f" for feedback mode {self.feedback!r} (stored in W's layout (B, n_post, n_pre); dfa: (B, n_L, n_l); "
            f"bp and sign store none)"
        )

    def targets(self, y, dtype, batch_shape=None):
        return make_targets(self, y, dtype, batch_shape)

    def forward(self, weights, x):
        return Activity(*_forward(self, weights, x))

    def loss_per_sample(self, act, target):
        return _sample_loss(self, act.zs[-1], act.ys[-1], target)

    def error_layers(self, wanted):
        if self.feedback == "dfa":  # D_l maps e_L to e_l directly: only the wanted errors
            return tuple(sorted((j for j in wanted if j < self.n_layers), reverse=True))
        return super().error_layers(wanted)

    def feedback_matrices(self, weights, feedback, layers):
        return _feedback_mats(self, weights, feedback, layers)

    def propagate(self, act, e_out, mats, layers):
        return _propagate(self, act.ys, act.zs, e_out, mats, layers, self.feedback == "dfa")

    def check_needs(self, needs):
        bad = [i for i, nd in enumerate(needs) if "fb" in nd]
        if bad and not self.has_fb:
            raise SignalError(
                f"An update needs the signal 'fb' (layers {bad}) but feedback mode 'dfa' has no per-layer "
                f"feedback matrix in W's layout (D_l maps e_L directly to e_l). Use feedback='fa', 'sign' or "
                f"'plastic', or a rule without fb terms."
            )

    def diagnostics(self, weights, feedback, act, target):
        angles, angles_ps = _alignment(self, weights, feedback, act.ys, act.zs, target)
        return angles, angles_ps, activity_orthonormality(weights, act.ys, act.zs)

    # ---- the AdjointNetwork contract (the fast path) ---------------------------------------------------
    def trace_step(self, weights, feedback, x, target, err_layers, need_loss):
        return _trace_step(self, weights, feedback, x, target, err_layers, need_loss)

    def step_vjp(self, trace, weights, feedback, target, sinks):
        _step_vjp(self, trace, weights, feedback, target, sinks)

    def fb_source(self, layer):
        return {"bp": "weight", "fa": "stored"}.get(self.feedback)

    # ---- serialization ---------------------------------------------------------------------------------
    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["sizes"] = list(self.sizes)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> Network:
        names = [f.name for f in dataclasses.fields(cls)]
        for key in d:
            if key not in names:
                raise ConfigError(f"Unknown Network key {key!r}; allowed: {', '.join(names)}.{_suggest(key, names)}")
        d = dict(d)
        if "sizes" in d:
            d["sizes"] = tuple(d["sizes"])
        return cls(**d)


# ---- initialization ----------------------------------------------------------------------------------------


def _draw(net: Network, shape: tuple[int, int], gain: float, gen: torch.Generator) -> Tensor:
    fan_out, fan_in = shape
    if net.init == "xavier":
        bound = gain * math.sqrt(6.0 / (fan_in + fan_out))
        return (torch.rand(shape, generator=gen, dtype=torch.float64) * 2.0 - 1.0) * bound
    std = gain * math.sqrt(2.0 / (fan_in + fan_out))
    return torch.randn(shape, generator=gen, dtype=torch.float64) * std


def init_params(
    net: Network,
    seed: int,
    t: int,
    ks: Sequence[int],
    dtype: torch.dtype = torch.float32,
    device: torch.device | str | None = None,
) -> tuple[list[Tensor], list[Tensor]]:
    """Fresh initial weights and feedback for the episodes ``(seed, t, k)``, ``k in ks``.

    Each episode draws from its own generator ``episode_generator(seed, t, k, "init")`` (in float64 on the
    CPU, then cast), all weight layers first and then the feedback matrices, so episode ``k`` gets identical
    values whether drawn alone or in a batch, and ``bp`` and ``fa`` runs of the same episode share ``W``.

    Returns
    -------
    weights : list of Tensor
        ``L`` tensors ``(B, n_post, n_pre)`` with ``B = len(ks)``.
    feedback : list of Tensor
        ``(B, n_post, n_pre)`` per layer (``fa``, ``plastic``), ``(B, n_L, n_l)`` (``dfa``), or ``[]``.
    """
    ks = [int(k) for k in ks]
    if not ks:
        raise ConfigError("ks must name at least one episode index; received an empty sequence.")
    per_w: list[list[Tensor]] = [[] for _ in range(net.n_layers)]
    per_f: list[list[Tensor]] = [[] for _ in net.feedback_shapes]
    for k in ks:
        gen = episode_generator(seed, t, k, "init")
        for lst, shape in zip(per_w, net.weight_shapes):
            lst.append(_draw(net, shape, net.gain, gen))
        for lst, shape in zip(per_f, net.feedback_shapes):
            lst.append(_draw(net, shape, net.feedback_gain, gen))
    weights = [torch.stack(lst).to(dtype=dtype, device=device) for lst in per_w]
    feedback = [torch.stack(lst).to(dtype=dtype, device=device) for lst in per_f]
    return weights, feedback


def stack_episodes(sampler, net: Network, items, dtype=torch.float32, device=None):
    """Episodes ``(seed, t, k)`` for ``k in ks`` of every ``(seed, t, ks)`` in ``items``, as one batch (rows in that
    order): ``(batch, weights, feedback)`` for :func:`~rulesearch.inner.run_episodes`, the tasks drawn by
    ``sampler`` (a :class:`~rulesearch.tasks.episodes.TaskSampler`) and the initial weights by :func:`init_params`."""
    batches = [sampler.sample(seed, t, ks) for seed, t, ks in items]
    inits = [net.init_episodes(seed, t, ks, dtype=dtype) for seed, t, ks in items]

    def cat(name):
        x = torch.cat([getattr(b, name) for b in batches])
        return x.to(device=device, dtype=dtype if x.is_floating_point() else None)

    batch = (cat("x_train"), cat("y_train"), cat("x_query"), cat("y_query"))
    weights = [torch.cat(ws).to(device) for ws in zip(*(w for w, _ in inits))]
    feedback = [torch.cat(fs).to(device) for fs in zip(*(f for _, f in inits))]
    return batch, weights, feedback


# ---- elementary maps (hot path: no validation) -------------------------------------------------------------


def _activate(net: Network, z: Tensor) -> Tensor:
    a = net.activation
    if a == "softplus":
        return torch.nn.functional.softplus(z, beta=net.beta)
    if a == "tanh":
        return torch.tanh(z)
    if a == "sigmoid":
        return torch.sigmoid(z)
    if a == "silu":
        return torch.nn.functional.silu(z)
    return z


def _derivative(net: Network, y: Tensor, z: Tensor | None) -> Tensor:
    """``sigma'(z)`` from the activity ``y`` (invertible activations) or from ``z``."""
    a = net.activation
    if a == "softplus":
        return torch.expm1(y * -net.beta).neg()
    if a == "tanh":
        return 1.0 - y * y
    if a == "sigmoid":
        return y * (1.0 - y)
    if a == "linear":
        return torch.ones_like(y)
    s = torch.sigmoid(z)  # silu
    return s * (1.0 + z * (1.0 - s))


def _activate_backward(net: Network, g: Tensor, y: Tensor, z: Tensor) -> Tensor:
    """``g * sigma'(z)`` for ``y = _activate(net, z)``, by the kernels autograd uses (softplus: the default
    threshold 20 of ``F.softplus``)."""
    a = net.activation
    if a == "softplus":
        return torch.ops.aten.softplus_backward(g, z, net.beta, 20.0)
    if a == "tanh":
        return torch.ops.aten.tanh_backward(g, y)
    if a == "sigmoid":
        return torch.ops.aten.sigmoid_backward(g, y)
    if a == "silu":
        return torch.ops.aten.silu_backward(g, z)
    return g


def _derivative_backward(net: Network, ge: Tensor, back: Tensor, y: Tensor, z: Tensor | None, d: Tensor, gd: Tensor):
    """The vector-Jacobian product of ``e = back * d`` (``d`` = :func:`_derivative`) with ``ge`` through ``d``,
    given ``gd = ge * d``: ``(dL/dy, dL/dz)``, one of them None (None twice for the linear activation)."""
    a = net.activation
    if a == "softplus":  # d = -expm1(-beta y), d' = beta (1 - d): ge back d' = beta back (ge - gd)
        g = (ge - gd) * back
        return (g if net.beta == 1.0 else g * net.beta), None
    g = ge * back
    if a == "tanh":  # d = 1 - y^2
        return g * y * -2.0, None
    if a == "sigmoid":  # d = y (1 - y)
        return g * (1.0 - 2.0 * y), None
    if a == "linear":
        return None, None
    s = torch.sigmoid(z)  # silu: d = s (1 + z (1 - s))
    return None, g * s * (1.0 - s) * (2.0 + z * (1.0 - 2.0 * s))


def _input_derivative(net: Network, x: Tensor) -> Tensor:
    """``1 - exp(-beta x)``: sigma' of the input treated as a softplus activity (for ``e_0``)."""
    return torch.expm1(x * -net.beta).neg()


def _output(net: Network, z: Tensor) -> Tensor:
    return torch.softmax(z, dim=-1) if net.loss == "ce" else z


def _output_backward(net: Network, g: Tensor, y: Tensor) -> Tensor:
    """``dL/dz_L`` from ``g = dL/dy_L`` for ``y = _output(net, z)`` (the softmax's Jacobian under CE)."""
    return y * (g - (g * y).sum(-1, keepdim=True)) if net.loss == "ce" else g


def _forward(net: Network, weights: Sequence[Tensor], x: Tensor) -> tuple[list[Tensor], list[Tensor | None]]:
    """Activities ``y_0..y_L`` and pre-activations ``[None, z_1..z_L]``; one bmm per layer."""
    ys = [x]
    zs: list[Tensor | None] = [None]
    last = len(weights) - 1
    for i, w in enumerate(weights):
        z = matvec(w, ys[-1])
        zs.append(z)
        ys.append(_activate(net, z) if i < last else _output(net, z))
    return ys, zs


def _sample_loss(net: Network, z_out: Tensor, y_out: Tensor, target: Tensor) -> Tensor:
    """Per-sample loss from the logits/outputs and a one-hot (or float) target, shape ``z_out.shape[:-1]``."""
    if net.loss == "ce":
        return torch.logsumexp(z_out, dim=-1) - (z_out * target).sum(-1)
    d = y_out - target
    return 0.5 * (d * d).sum(-1)


def _sign_fb(net: Network, w: Tensor, layer: int) -> Tensor:
    return torch.sign(w) * net.feedback_bounds[layer]


def _feedback_mats(
    net: Network, weights: Sequence[Tensor], feedback: Sequence[Tensor], layers: Sequence[int]
) -> list[Tensor | None]:
    """The matrix that carries the error into each listed layer's input (``None`` elsewhere)."""
    mats: list[Tensor | None] = [None] * len(weights)
    for i in layers:
        if net.feedback == "bp":
            mats[i] = weights[i]
        elif net.feedback == "sign":
            mats[i] = _sign_fb(net, weights[i], i)
        else:
            mats[i] = feedback[i]
    return mats


def _propagate(
    net: Network,
    ys: Sequence[Tensor],
    zs: Sequence[Tensor | None],
    e_out: Tensor,
    mats: Sequence[Tensor | None],
    layers: Sequence[int],
    direct: bool,
) -> list[Tensor | None]:
    """Errors ``[e_0..e_L]`` for the error indices in ``layers`` (descending; ``None`` elsewhere).

    ``direct`` (dfa): ``e_l = (e_L mats[l]) * sigma'``; otherwise the chain
    ``e_l = (e_{l+1} mats[l]) * sigma'`` (then ``layers`` must be the contiguous range ``L-1, ..., lowest``).
    """
    n = len(ys) - 1
    es: list[Tensor | None] = [None] * (n + 1)
    es[n] = e_out
    for i in layers:
        back = vecmat(e_out if direct else es[i + 1], mats[i])
        d = _input_derivative(net, ys[0]) if i == 0 else _derivative(net, ys[i], zs[i])
        es[i] = back * d
    return es


# ---- the fast path's step and its hand-written VJP ----------------------------------------------------------


def _trace_step(net: Network, weights, feedback, x, target, err_layers, need_loss) -> StepTrace:
    """One step without autograd (its VJP is :func:`_step_vjp`). ``err_layers=None``: no errors at all; else
    ``e_L`` and the listed ``e_l``, keeping per index the feedback product ``back`` and derivative ``d`` of
    ``e_l = back * d`` (``back`` only where :func:`_step_vjp` needs it)."""
    n = net.n_layers
    ys, zs = _forward(net, weights, x)
    loss = _sample_loss(net, zs[-1], ys[-1], target) if need_loss else None
    t = StepTrace(ys, zs, [None] * (n + 1), loss, {"backs": {}, "ds": {}})
    if err_layers is None:
        return t
    es, backs, ds = t.es, t.saved["backs"], t.saved["ds"]
    es[n] = ys[-1] - target
    mats = _feedback_mats(net, weights, feedback, err_layers)
    for i in err_layers:
        back = vecmat(es[n] if net.feedback == "dfa" else es[i + 1], mats[i])
        ds[i] = _input_derivative(net, x) if i == 0 else _derivative(net, ys[i], zs[i])
        es[i] = back * ds[i]
        if i > 0 or net.feedback == "bp":  # the derivative's backward (and bp's p^T W q)
            backs[i] = back
    return t


def _step_vjp(net: Network, t: StepTrace, weights, feedback, target, sinks) -> None:
    """The VJP of :func:`_trace_step` (see :meth:`AdjointNetwork.step_vjp`): from the ``.grad`` of the traced
    activities, pre-activations (a rule's ``W x``), errors and loss back through the errors and the forward pass."""
    n = net.n_layers
    gy = [None] + [y.grad for y in t.ys[1:]]
    ge = [None if e is None else e.grad for e in t.es]
    # an activity that is its pre-activation (linear) has the gradient in gy already
    gz: list = [None] + [None if z is y else z.grad for z, y in zip(t.zs[1:], t.ys[1:])]
    if t.es[n] is not None:
        layers = [i for i in range(n) if t.es[i] is not None]  # ascending: e_i feeds e_{i-1} (or e_L) only
        mats = None  # the matrices that carried the errors (bp: the weights' own products)
        if net.feedback == "sign":
            mats = _feedback_mats(net, [w.dense() for w in weights], feedback, layers)
        elif net.feedback != "bp":
            mats = feedback
        backs, ds = t.saved["backs"], t.saved["ds"]
        for i in layers:
            if ge[i] is None:
                continue
            src = n if net.feedback == "dfa" else i + 1
            g_back = ge[i] * ds[i]
            ge[src] = add(ge[src], weights[i].vecmat(g_back, True) if mats is None else matvec(mats[i], g_back))
            if net.feedback == "bp":
                sinks[i].append(RankOne(t.es[src], g_back, backs[i], g_back))
            if i > 0:
                dy, dz = _derivative_backward(net, ge[i], backs[i], t.ys[i], t.zs[i], ds[i], g_back)
                gy[i], gz[i] = add(gy[i], dy), add(gz[i], dz)
        gy[n] = add(gy[n], ge[n])
    if gy[n] is not None:
        gz[n] = add(gz[n], _output_backward(net, gy[n], t.ys[n]))
    if t.loss is not None and t.loss.grad is not None:  # the loss' gradient w.r.t. the logits (CE) or outputs
        gz[n] = add(gz[n], t.loss.grad.unsqueeze(-1) * (t.ys[n] - target))
    for i in range(n, 0, -1):
        if i < n and gy[i] is not None:
            gz[i] = add(gz[i], _activate_backward(net, gy[i], t.ys[i], t.zs[i]))
        if gz[i] is None:
            continue
        sinks[i - 1].append(RankOne(gz[i], t.ys[i - 1], gz[i], t.zs[i]))
        if i > 1:
            gy[i - 1] = add(gy[i - 1], weights[i - 1].vecmat(gz[i], False))


# ---- validated public API ----------------------------------------------------------------------------------


def _check_input(net: Network, x: Tensor, b: int, name: str = "x") -> None:
    if not torch.is_tensor(x) or x.dim() not in (2, 3) or x.shape[0] != b or x.shape[-1] != net.n_in:
        shape = tuple(x.shape) if torch.is_tensor(x) else type(x).__name__
        raise ShapeError(
            f"{name} has shape {shape}; expected (B, n_in) or (B, N, n_in) with B = {b} and "
            f"n_in = {net.n_in} (the network's sizes[0]; sizes = {net.sizes})."
        )
    if not x.is_floating_point():
        raise ShapeError(f"{name} must be a floating-point tensor; received dtype {x.dtype}.")


def make_targets(net: Network, y: Tensor, dtype: torch.dtype, batch_shape: tuple[int, ...] | None = None) -> Tensor:
    """Output targets ``(..., n_out)`` from integer labels (one-hot) or, under MSE, float targets.

    Parameters
    ----------
    y : Tensor
        Integer labels of shape ``batch_shape`` in ``[0, n_out)`` (raw labels, no remapping), or (MSE only)
        float targets of shape ``batch_shape + (n_out,)``.
    batch_shape : tuple of int, optional
        The expected leading shape (e.g. ``(B, N)``); checked when given.
    """
    if not torch.is_tensor(y):
        raise ShapeError(f"labels/targets must be a tensor; received {type(y).__name__}.")
    if y.is_floating_point():
        if net.loss != "mse":
            raise ShapeError(
                f"loss 'ce' needs integer class labels (int64); received a float tensor of shape "
                f"{tuple(y.shape)}. Pass labels, or use Network(loss='mse') for float regression targets."
            )
        if y.shape[-1] != net.n_out or (batch_shape is not None and tuple(y.shape[:-1]) != tuple(batch_shape)):
            want = "(..., n_out)" if batch_shape is None else str((*batch_shape, net.n_out))
            raise ShapeError(f"float targets have shape {tuple(y.shape)}; expected {want} with n_out = {net.n_out}.")
        return y.to(dtype)
    if y.dtype == torch.bool or y.is_complex():
        raise ShapeError(f"labels must be integer class ids (int64); received dtype {y.dtype}.")
    if batch_shape is not None and tuple(y.shape) != tuple(batch_shape):
        raise ShapeError(f"labels have shape {tuple(y.shape)}; expected {tuple(batch_shape)}.")
    if y.numel():
        lo, hi = int(y.min()), int(y.max())
        if lo < 0 or hi >= net.n_out:
            raise ConfigError(
                f"labels range over [{lo}, {hi}] but the network has n_out = {net.n_out} outputs "
                f"(valid labels 0..{net.n_out - 1}; labels are raw class ids, not remapped). "
                f"Use sizes[-1] >= {hi + 1}."
            )
    return torch.nn.functional.one_hot(y.long(), net.n_out).to(dtype)


def forward(net: Network, weights: Sequence[Tensor], x: Tensor) -> list[Tensor]:
    """Activities ``[y_0 = x, y_1, ..., y_L]``; ``x`` is ``(B, n_in)`` or ``(B, N, n_in)``.

    ``y_L`` is the softmax output under ``loss="ce"`` and the linear output under ``loss="mse"``.
    """
    b = net.check_weights(weights)
    _check_input(net, x, b)
    return _forward(net, weights, x)[0]


def output_error(net: Network, y_out: Tensor, target: Tensor) -> Tensor:
    """``e_L = y_L - target`` (target one-hot or float, same shape as ``y_L``)."""
    return y_out - target


def sample_loss(net: Network, weights: Sequence[Tensor], x: Tensor, y: Tensor) -> Tensor:
    """Per-sample loss, shape ``x.shape[:-1]``: cross-entropy, or ``0.5 ||y_L - target||^2`` under MSE."""
    b = net.check_weights(weights)
    _check_input(net, x, b)
    ys, zs = _forward(net, weights, x)
    target = make_targets(net, y, ys[-1].dtype, tuple(x.shape[:-1]))
    return _sample_loss(net, zs[-1], ys[-1], target)


def feedback_matrices(net: Network, weights: Sequence[Tensor], feedback: Sequence[Tensor]) -> list[Tensor]:
    """The feedback matrix of every layer in W's layout, ``(B, n_post, n_pre)`` (dfa: ``(B, n_L, n_l)``).

    ``bp``: the weights themselves; ``sign``: ``sign(W) * bound``; otherwise the stored feedback.
    """
    b = net.check_weights(weights)
    if net.feedback not in ("bp", "sign"):
        net.check_feedback(feedback, b)
    return _feedback_mats(net, weights, feedback, range(net.n_layers))


def errors(
    net: Network,
    weights: Sequence[Tensor],
    feedback: Sequence[Tensor],
    activities: Sequence[Tensor],
    y: Tensor,
    z: Sequence[Tensor | None] | None = None,
) -> list[Tensor]:
    """Errors ``[e_0, ..., e_L]`` through the network's feedback pathway (``sigma'`` included).

    Parameters
    ----------
    activities : list of Tensor
        ``forward(net, weights, x)``.
    y : Tensor
        Integer labels (or float MSE targets) for the samples of ``activities``.
    z : list, optional
        Pre-activations ``[None, z_1, ..., z_L]``; only needed for non-invertible activations (silu) and
        recomputed when omitted.
    """
    b = net.check_weights(weights)
    if net.feedback not in ("bp", "sign"):
        net.check_feedback(feedback, b)
    if len(activities) != net.n_layers + 1:
        raise ShapeError(f"activities must hold y_0..y_L ({net.n_layers + 1} tensors); received {len(activities)}.")
    _check_input(net, activities[0], b, "activities[0]")
    if z is None and net.activation not in _INVERTIBLE:
        z = [None] + [matvec(w, a) for w, a in zip(weights, activities[:-1])]
    zs = z if z is not None else [None] * (net.n_layers + 1)
    target = make_targets(net, y, activities[-1].dtype, tuple(activities[0].shape[:-1]))
    layers = range(net.n_layers - 1, -1, -1)
    mats = _feedback_mats(net, weights, feedback, layers)
    e_out = output_error(net, activities[-1], target)
    return _propagate(net, activities, zs, e_out, mats, layers, net.feedback == "dfa")


def backprop_errors(
    net: Network, weights: Sequence[Tensor], activities: Sequence[Tensor], y: Tensor, z=None
) -> list[Tensor]:
    """Errors ``[e_0, ..., e_L]`` of the full backprop recursion through the current ``W^T``."""
    return errors(dataclasses.replace(net, feedback="bp"), weights, [], activities, y, z)


# ---- metrics -----------------------------------------------------------------------------------------------


def _accuracy(net: Network, y_out: Tensor, labels: Tensor | None) -> Tensor:
    if labels is None:  # regression targets: accuracy is undefined
        return torch.full(y_out.shape[:-1], float("nan"), dtype=y_out.dtype, device=y_out.device)
    return (y_out.argmax(-1) == labels).to(y_out.dtype)


def query_loss_accuracy(net: Network, weights: Sequence[Tensor], x: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
    """Mean loss and accuracy per episode over ``N`` samples: ``x`` ``(B, N, n_in)`` -> two ``(B,)`` tensors.

    Accuracy is the argmax over all output units compared with the raw labels (NaN for float MSE targets).
    Differentiable w.r.t. the weights (the loss).
    """
    b = net.check_weights(weights)
    _check_input(net, x, b)
    if x.dim() != 3:
        raise ShapeError(f"evaluate needs x of shape (B, N, n_in); received {tuple(x.shape)}.")
    ys, zs = _forward(net, weights, x)
    target = make_targets(net, y, ys[-1].dtype, tuple(x.shape[:-1]))
    loss = _sample_loss(net, zs[-1], ys[-1], target).mean(-1)
    labels = None if y.is_floating_point() else y
    return loss, _accuracy(net, ys[-1].detach(), labels).mean(-1)


def vector_angle(a: Tensor, b: Tensor) -> Tensor:
    """Angle in degrees between vectors along the last dim, ``2 atan2(|a^ - b^|, |a^ + b^|)`` (accurate near
    0 and 180 degrees; NaN when a vector is zero)."""
    a = a / torch.linalg.vector_norm(a, dim=-1, keepdim=True)
    b = b / torch.linalg.vector_norm(b, dim=-1, keepdim=True)
    diff = torch.linalg.vector_norm(a - b, dim=-1)
    summ = torch.linalg.vector_norm(a + b, dim=-1)
    return torch.rad2deg(2.0 * torch.atan2(diff, summ))


def _alignment(net, weights, feedback, ys, zs, target) -> tuple[Tensor, Tensor]:
    n = net.n_layers
    e_out = ys[-1] - target
    layers = range(n - 1, 0, -1)
    fb = _propagate(net, ys, zs, e_out, _feedback_mats(net, weights, feedback, layers), layers, net.feedback == "dfa")
    bp = _propagate(net, ys, zs, e_out, list(weights), layers, False)
    if n == 1:
        empty = e_out.new_zeros((e_out.shape[0], 0))
        return empty, empty
    mean_angles = torch.stack([vector_angle(fb[i].mean(1), bp[i].mean(1)) for i in range(1, n)], dim=-1)
    sample_angles = torch.stack([vector_angle(fb[i], bp[i]).mean(-1) for i in range(1, n)], dim=-1)
    return mean_angles, sample_angles


def alignment_angles(
    net: Network, weights: Sequence[Tensor], feedback: Sequence[Tensor], x: Tensor, y: Tensor
) -> tuple[Tensor, Tensor]:
    """Alignment angles (degrees) between feedback and backprop errors of the hidden layers, ``(B, L-1)``.

    .. math::

        \\alpha_l = \\frac{180}{\\pi} \\arccos \\cos(\\overline{e^{FB}_l}, \\overline{e^{BP}_l}),
        \\qquad l = 1, \\dots, L-1,

    with the bar the mean over the ``N`` samples of ``x`` ``(B, N, n_in)`` (the paper's definition; both
    recursions start from the same ``e_L``; ``alpha_L = 0`` is omitted). Returns ``(angles,
    angles_per_sample)``, the second the mean over samples of per-sample angles. ``0`` under ``bp``, ``~90``
    for unrelated pathways. Not differentiable (computed under ``no_grad``).
    """
    b = net.check_weights(weights)
    if net.feedback not in ("bp", "sign"):
        net.check_feedback(feedback, b)
    _check_input(net, x, b)
    if x.dim() != 3:
        raise ShapeError(f"alignment_angles needs x of shape (B, N, n_in); received {tuple(x.shape)}.")
    with torch.no_grad():
        ys, zs = _forward(net, weights, x)
        target = make_targets(net, y, ys[-1].dtype, tuple(x.shape[:-1]))
        return _alignment(net, weights, feedback, ys, zs, target)


def activity_orthonormality(weights: Sequence[Tensor], ys: Sequence[Tensor], zs: Sequence[Tensor]) -> Tensor:
    """``E_W = ||z_l - W W^T y_l||^2`` per layer (columns), averaged over the samples of a forward pass."""
    out = []
    for i, w in enumerate(weights):
        ybar = vecmat(ys[i + 1], w)  # W^T y_l, (B, N, n_pre)
        r = zs[i + 1] - matvec(w, ybar)
        out.append((r * r).sum(-1).mean(-1))
    return torch.stack(out, dim=-1)


def orthonormality(net: Network, weights: Sequence[Tensor], x: Tensor) -> Tensor:
    """Weight orthonormality ``E_W`` per layer, ``(B, L)`` (Eqs. 11-12 of the paper).

    .. math::

        E_{W_l} = \\| z_l - W_l \\bar y_{l-1} \\|^2, \\qquad \\bar y_{l-1} = W_l^T \\sigma(z_l),

    i.e. ``||z_l - W W^T y_l||^2`` with ``y_l`` the layer's activity (softmax for the CE output), averaged
    over the ``N`` samples of ``x`` ``(B, N, n_in)`` (the paper's code sums over the batch: multiply by
    ``N``).
    Zero when the rows of ``W_l`` are orthonormal and ``sigma`` is the identity. Not differentiable.
    """
    b = net.check_weights(weights)
    _check_input(net, x, b)
    if x.dim() != 3:
        raise ShapeError(f"orthonormality needs x of shape (B, N, n_in); received {tuple(x.shape)}.")
    with torch.no_grad():
        ys, zs = _forward(net, weights, x)
        return activity_orthonormality(weights, ys, zs)
