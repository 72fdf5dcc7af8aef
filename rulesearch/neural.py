r"""Neural plasticity rules: a small MLP over a synapse's signals that outputs its weight change.

.. math::

    \Delta W_{ij} = \sum_f a_f\, \phi_f(i, j) + s\,\mathrm{MLP}_\psi\big(\phi_1(i, j), \dots, \phi_F(i, j)\big),

where the features :math:`\phi_f` are signals of the synapse: pre-synaptic (:math:`x_j`, :math:`e'_j`,
:math:`(W^\top y)_j`), post-synaptic (:math:`y_i`, :math:`e_i`, :math:`(W x)_i`), synaptic (:math:`W_{ij}`,
:math:`B_{ji}`) or products of two of them (``"err*pre"`` is :math:`e_i x_j`). The linear *skip* part
:math:`\sum_f a_f \phi_f` starts as the pseudo-gradient rule :math:`-\theta_0 e_i x_j` and the MLP's output layer
starts at zero, so a fresh neural rule is exactly :math:`F^0` and meta-learning bends it from there. Without the
contraction features (:math:`(W^\top y)_j`) the rule cannot express Oja's subspace term.

A :class:`NeuralRule` follows the update protocol of :mod:`rulesearch.inner` (``needs``, ``states``,
``__call__(signals, params) -> dW``), so the same inner loop and meta-trainer run it. Its parameters are a dict of
tensors (see :meth:`NeuralRule.init_params`), each optionally with a leading episode dimension ``B`` (one
parameter set per episode: independent runs trained as one batch).

Memory: the hidden activations are ``(B, n_post, n_pre, H)`` per layer and step; with ``checkpoint=True``
(default) they are recomputed in the backward pass by :func:`torch.utils.checkpoint.checkpoint`, so the unrolled
inner loop stores only the signals it stores anyway.

Examples
--------
>>> import torch
>>> rule = NeuralRule(hidden=(8,))
>>> params = rule.init_params(torch.Generator().manual_seed(0), theta0=1e-3)
>>> sorted(rule.needs)
['err', 'post', 'pre', 'pre_err', 'w']
>>> sig = {"pre": torch.rand(2, 4), "post": torch.rand(2, 3), "err": torch.randn(2, 3),
...        "pre_err": torch.randn(2, 4), "w": torch.randn(2, 3, 4)}
>>> dw = rule(sig, params)
>>> dw.shape
torch.Size([2, 3, 4])
>>> bool(torch.allclose(dw, -1e-3 * sig["err"][:, :, None] * sig["pre"][:, None, :]))  # starts as F0
True
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor
from torch.utils.checkpoint import checkpoint

from .errors import ConfigError, InvalidRuleError, ShapeError

__all__ = ["NeuralRule", "FEATURES", "DEFAULT_FEATURES", "NEURAL_ACTIVATIONS", "FORMAT"]

FORMAT = "rulesearch.neural_rule/1"

#: Base features: name -> (role, base signals needed, description).
FEATURES: dict[str, tuple[str, frozenset, str]] = {
    "pre": ("pre", frozenset({"pre"}), "x_j, pre-synaptic activity"),
    "post": ("post", frozenset({"post"}), "y_i, post-synaptic activity"),
    "err": ("post", frozenset({"err"}), "e_i, post-synaptic error"),
    "pre_err": ("pre", frozenset({"pre_err"}), "e'_j, pre-synaptic error"),
    "w": ("synapse", frozenset({"w"}), "W_ij, the weight"),
    "fb": ("synapse", frozenset({"fb"}), "B_ji, the feedback weight (W's layout)"),
    "wTpost": ("pre", frozenset({"w", "post"}), "(W^T y)_j, contraction of post activity"),
    "oja": ("pre", frozenset({"pre", "w", "post"}), "x_j - (W^T y)_j, pre activity minus its reconstruction"),
    "wpre": ("post", frozenset({"w", "pre"}), "(W x)_i, the pre-activation z_i"),
    "wTerr": ("pre", frozenset({"w", "err"}), "(W^T e)_j, error carried back through W (weight transport)"),
}

DEFAULT_FEATURES = (
    "pre", "post", "err", "pre_err", "w", "wTpost",
    "err*pre", "err*pre_err", "post*oja",
)  # fmt: skip
"""Activities, errors, the weight, :math:`(W^\\top y)_j` and the paper's F0, F2 and F9 (Oja:
``post*oja`` :math:`= y_i (x_j - (W^\\top y)_j)`). Oja's term is one feature, not ``post*pre`` and
``post*wTpost``: a skip step of 3e-4 on either part alone (pure Hebb, or its growth term) makes the digits network
diverge within one episode, while their difference is stable."""

NEURAL_ACTIVATIONS = {"tanh": torch.tanh, "softplus": torch.nn.functional.softplus, "silu": torch.nn.functional.silu}

_ROLE_JOIN = {
    frozenset({"pre"}): "pre",
    frozenset({"post"}): "post",
    frozenset({"pre", "post"}): "synapse",
}


def _feature_role(name: str) -> str:
    parts = name.split("*")
    roles = frozenset(FEATURES[p][0] for p in parts)
    if "synapse" in roles:
        return "synapse"
    return _ROLE_JOIN[roles]


def _check_features(features: Sequence[str]) -> tuple[str, ...]:
    if isinstance(features, str) or not isinstance(features, Sequence) or not features:
        raise ConfigError(
            f"features must be a non-empty sequence of feature names such as {DEFAULT_FEATURES}; received {features!r}."
        )
    out = []
    for name in features:
        parts = str(name).split("*")
        bad = [p for p in parts if p not in FEATURES]
        if bad or len(parts) > 2:
            raise ConfigError(
                f"Unknown neural-rule feature {name!r}. A feature is one of {sorted(FEATURES)} or a product of "
                f"two of them written 'a*b' (e.g. 'err*pre')."
            )
        out.append(str(name))
    if len(set(out)) != len(out):
        raise ConfigError(f"Neural-rule features repeat: {out}; list each feature once.")
    return tuple(out)


def _base(signals: Mapping, name: str) -> Tensor:
    if name == "wTpost":
        return torch.matmul(signals["post"].unsqueeze(-2), signals["w"]).squeeze(-2)
    if name == "wTerr":
        return torch.matmul(signals["err"].unsqueeze(-2), signals["w"]).squeeze(-2)
    if name == "oja":
        return signals["pre"] - _base(signals, "wTpost")
    if name == "wpre":
        return torch.matmul(signals["w"], signals["pre"].unsqueeze(-1)).squeeze(-1)
    return signals[name]


def _lift(x: Tensor, role: str) -> Tensor:
    """A post ``(B, P)`` or pre ``(B, Q)`` vector shaped to broadcast against ``(B, P, Q)``."""
    if role == "post":
        return x.unsqueeze(-1)
    if role == "pre":
        return x.unsqueeze(-2)
    return x


def _bw(p: Tensor, batched: bool, extra: int) -> Tensor:
    """A parameter shaped to broadcast against activations with ``extra`` inner dims after the batch dim."""
    if not batched:
        return p
    return p.reshape(p.shape[0], *([1] * extra), *p.shape[1:])


@dataclass(frozen=True)
class NeuralRule:
    r"""A neural plasticity rule :math:`\Delta W_{ij} = a^\top \phi_{ij} + \mathrm{MLP}(\phi_{ij})`.

    Parameters
    ----------
    features : tuple of str
        Feature names: keys of :data:`FEATURES` or products ``"a*b"`` of two of them.
    hidden : tuple of int
        Hidden layer widths of the MLP (``()`` leaves only the linear skip part).
    activation : str
        Hidden nonlinearity: ``tanh``, ``softplus`` or ``silu``.
    skip : bool
        Include the linear skip part :math:`a^\top \phi` (initialized to :math:`-\theta_0 e_i x_j`).
    checkpoint : bool
        Recompute the MLP in the backward pass (bounded memory through long unrolled inner loops).
    init_scale : float
        Scale of the hidden layers' initial weights (times :math:`1/\sqrt{\text{fan-in}}`).
    out_scale : float
        Fixed factor :math:`s` on the MLP's output, :math:`\Delta W = a^\top\phi + s\,\mathrm{MLP}(\phi)`. An
        Adam step moves every output weight by about the learning rate whatever its effect; a small :math:`s`
        (default :math:`10^{-3}`, the scale of :math:`\theta_0`) keeps the first steps from adding a weight drift
        that swamps the pseudo-gradient.
    name : str
        Used in exports and run directories.
    params : dict, optional
        Trained parameters (see :meth:`with_params`); used by :meth:`__call__` when ``params`` is None.

    Attributes
    ----------
    needs : frozenset of str
        Base signals read by the features.
    states : tuple
        Always empty (no stateful derived signals).
    """

    features: tuple[str, ...] = DEFAULT_FEATURES
    hidden: tuple[int, ...] = (16,)
    activation: str = "tanh"
    skip: bool = True
    checkpoint: bool = True
    init_scale: float = 1.0
    out_scale: float = 1e-3
    name: str = "neural"
    params: dict | None = field(default=None, compare=False, repr=False)

    states = ()

    def __post_init__(self):
        object.__setattr__(self, "features", _check_features(self.features))
        hidden = tuple(self.hidden)
        if any(isinstance(h, bool) or not isinstance(h, int) or h < 1 for h in hidden):
            raise ConfigError(f"hidden must hold positive ints (layer widths); received {self.hidden!r}.")
        object.__setattr__(self, "hidden", hidden)
        if not isinstance(self.activation, str) or self.activation not in NEURAL_ACTIVATIONS:
            raise ConfigError(
                f"Unknown neural-rule activation {self.activation!r}; allowed: {sorted(NEURAL_ACTIVATIONS)}."
            )
        if not self.skip and not hidden:
            raise ConfigError("A neural rule needs hidden layers, the skip part, or both (hidden=() and skip=False).")
        if not (isinstance(self.init_scale, (int, float)) and math.isfinite(self.init_scale) and self.init_scale > 0):
            raise ConfigError(f"init_scale must be a finite number > 0; received {self.init_scale!r}.")
        if not (isinstance(self.out_scale, (int, float)) and math.isfinite(self.out_scale) and self.out_scale > 0):
            raise ConfigError(f"out_scale must be a finite number > 0; received {self.out_scale!r}.")
        if self.params is not None:
            object.__setattr__(self, "params", self._check_params(self.params, batched_ok=False))
        roles = [_feature_role(f) for f in self.features]
        object.__setattr__(self, "_roles", tuple(roles))
        idx = {r: tuple(i for i, x in enumerate(roles) if x == r) for r in ("post", "pre", "synapse")}
        object.__setattr__(self, "_idx", idx)

    # ---- structure --------------------------------------------------------------------------------------
    @property
    def needs(self) -> frozenset:
        out = set()
        for f in self.features:
            for p in f.split("*"):
                out |= FEATURES[p][1]
        return frozenset(out)

    @property
    def n_features(self) -> int:
        return len(self.features)

    def param_shapes(self) -> dict[str, tuple[int, ...]]:
        """Name -> shape of every parameter (without the optional leading episode dimension)."""
        shapes: dict[str, tuple[int, ...]] = {}
        if self.skip:
            shapes["skip"] = (self.n_features,)
        widths = (self.n_features, *self.hidden, 1)
        if self.hidden:
            for k in range(len(widths) - 1):
                shapes[f"w{k}"] = (widths[k], widths[k + 1])
                shapes[f"b{k}"] = (widths[k + 1],)
        return shapes

    @property
    def n_params(self) -> int:
        return sum(math.prod(s) for s in self.param_shapes().values())

    def init_params(
        self, generator: torch.Generator, theta0: float = 1e-3, dtype: torch.dtype = torch.float64, device=None
    ) -> dict[str, Tensor]:
        """Fresh parameters: skip part ``-theta0 e_i x_j`` (if ``"err*pre"`` is a feature), MLP output zero.

        Hidden weights are drawn from ``N(0, init_scale^2 / fan_in)`` with ``generator`` (float64 on the CPU, then
        cast), biases zero.
        """
        out: dict[str, Tensor] = {}
        for name, shape in self.param_shapes().items():
            if name == "skip":
                p = torch.zeros(shape, dtype=torch.float64)
                for i, f in enumerate(self.features):
                    if set(f.split("*")) == {"err", "pre"}:
                        p[i] = -theta0
            elif name.startswith("b") or name == f"w{len(self.hidden)}":
                p = torch.zeros(shape, dtype=torch.float64)
            else:
                p = torch.randn(shape, generator=generator, dtype=torch.float64) * (
                    self.init_scale / math.sqrt(shape[0])
                )
            out[name] = p.to(dtype=dtype, device=device)
        return out

    def _check_params(self, params, batched_ok: bool = True) -> dict[str, Tensor]:
        if not isinstance(params, Mapping):
            raise ShapeError(
                f"NeuralRule params must be a dict of tensors {sorted(self.param_shapes())}; received "
                f"{type(params).__name__}. Make one with rule.init_params(generator)."
            )
        shapes = self.param_shapes()
        missing = sorted(set(shapes) - set(params))
        extra = sorted(set(params) - set(shapes))
        if missing or extra:
            raise ShapeError(
                f"NeuralRule params: missing {missing}, unexpected {extra}; expected exactly {sorted(shapes)}."
            )
        out = {}
        for k, shape in shapes.items():
            p = params[k]
            if not torch.is_tensor(p):
                p = torch.as_tensor(p, dtype=torch.float64)
            ok = tuple(p.shape) == shape or (batched_ok and tuple(p.shape[1:]) == shape)
            if not ok:
                raise ShapeError(
                    f"NeuralRule param {k!r} has shape {tuple(p.shape)}; expected {shape}"
                    + (f" or (B, {', '.join(map(str, shape))})" if batched_ok else "")
                    + "."
                )
            out[k] = p
        return out

    def with_params(self, params) -> NeuralRule:
        """A copy carrying trained parameters (used by ``__call__`` when no params are passed)."""
        params = {k: (v.detach().cpu() if torch.is_tensor(v) else torch.as_tensor(v)) for k, v in params.items()}
        return dataclasses.replace(self, params=params)

    def mlp_norm(self, params=None) -> float | None:
        """The L2 norm of the MLP's parameters (``params`` or the trained ones; None without hidden layers)."""
        params = self.params if params is None else params
        mlp = [params[k].detach().double() for k in self.param_shapes() if k != "skip"]
        return float(torch.sqrt(sum((p**2).sum() for p in mlp))) if mlp else None

    # ---- evaluation -------------------------------------------------------------------------------------
    def features_of(self, signals: Mapping) -> dict[str, Tensor]:
        """Every feature in its natural shape: post ``(B, P)``, pre ``(B, Q)``, synapse ``(B, P, Q)``."""
        base = {}
        for f in self.features:
            for p in f.split("*"):
                if p not in base:
                    base[p] = _base(signals, p)
        out = {}
        for f in self.features:
            parts = f.split("*")
            if len(parts) == 1:
                out[f] = base[f]
            else:
                a, b = parts
                ra, rb = FEATURES[a][0], FEATURES[b][0]
                if ra == rb and ra != "synapse":
                    out[f] = base[a] * base[b]
                else:
                    out[f] = _lift(base[a], ra) * _lift(base[b], rb)
        return out

    def __call__(self, signals: Mapping, params=None) -> Tensor:
        """``dW`` of shape ``(B, n_post, n_pre)`` from the signals and ``params`` (default: the trained ones)."""
        if params is None:
            if self.params is None:
                raise ShapeError(
                    f"NeuralRule {self.name!r} has no trained params; pass params= (rule.init_params(generator)) "
                    f"or use rule.with_params(...)."
                )
            params = self.params
        params = self._check_params(params)
        names = sorted(params)
        ref = next(t for t in signals.values() if torch.is_tensor(t) and t.is_floating_point())
        params = {k: v.to(dtype=ref.dtype, device=ref.device) for k, v in params.items()}
        feats = self.features_of(signals)
        tensors = [feats[f] for f in self.features] + [params[k] for k in names]

        def fn(*xs):
            return self._dw(dict(zip(self.features, xs[: self.n_features])), dict(zip(names, xs[self.n_features :])))

        if self.checkpoint and torch.is_grad_enabled() and any(t.requires_grad for t in tensors):
            return checkpoint(fn, *tensors, use_reentrant=False)
        return fn(*tensors)

    def _dw(self, feats: dict[str, Tensor], params: dict[str, Tensor]) -> Tensor:
        ref = next(iter(feats.values()))
        B = ref.shape[0]
        n_post = n_pre = None
        for f, r in zip(self.features, self._roles):
            x = feats[f]
            if r in ("post", "synapse"):
                n_post = x.shape[1]
            if r == "pre":
                n_pre = x.shape[1]
            if r == "synapse":
                n_pre = x.shape[2]
        if n_post is None or n_pre is None:
            raise ShapeError(
                f"NeuralRule {self.name!r}: the features {self.features} do not fix both layer sizes; include at "
                f"least one pre-synaptic and one post-synaptic (or synaptic) feature."
            )
        batched = any(params[k].dim() > len(s) for k, s in self.param_shapes().items())
        dw = None
        if self.skip:
            a = params["skip"]
            for i, (f, r) in enumerate(zip(self.features, self._roles)):
                coef = a[..., i]
                coef = coef.reshape(B, 1, 1) if coef.dim() == 1 else coef
                term = coef * _lift(feats[f], r)
                dw = term if dw is None else dw + term
        if self.hidden:
            w0 = params["w0"]
            h = _bw(params["b0"], batched, 2)  # (H,) or (B, 1, 1, H)
            for r in ("post", "pre", "synapse"):
                ids = self._idx[r]
                if not ids:
                    continue
                x = torch.stack([feats[self.features[i]] for i in ids], -1)  # (B, n, k) or (B, P, Q, k)
                wr = w0[..., list(ids), :]  # (k, H) or (B, k, H)
                if r == "synapse":
                    h = h + torch.matmul(x, _bw(wr, batched, 1))
                else:
                    proj = torch.matmul(x, wr)  # (B, n, H)
                    h = h + proj.unsqueeze(2 if r == "post" else 1)
            act = NEURAL_ACTIVATIONS[self.activation]
            h = act(h)
            n = len(self.hidden)
            for k in range(1, n + 1):
                h = torch.matmul(h, _bw(params[f"w{k}"], batched, 1)) + _bw(params[f"b{k}"], batched, 2)
                if k < n:
                    h = act(h)
            out = h.squeeze(-1) * self.out_scale
            dw = out if dw is None else dw + out
        return dw.expand(B, n_post, n_pre)

    # ---- exports ----------------------------------------------------------------------------------------
    def spec(self) -> dict:
        """The structure as plain data (no parameters)."""
        out = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "params"}
        return {**out, "features": list(self.features), "hidden": list(self.hidden)}

    def to_json(self, runs: Sequence[Mapping] | None = None) -> dict:
        """JSON-able dict: the structure, the trained params (if any) and optionally every run's params."""

        def plain(p):
            return {k: torch.as_tensor(v).detach().cpu().double().tolist() for k, v in p.items()}

        out = {"format": FORMAT, **self.spec(), "params": plain(self.params) if self.params is not None else None}
        if runs is not None:
            out["runs"] = [plain(p) for p in runs]
        return out

    @classmethod
    def from_json(cls, data: Mapping, run: int | None = None) -> NeuralRule:
        """Rebuild from :meth:`to_json` output; ``run`` picks the params of one run instead of ``params``."""
        if not isinstance(data, Mapping) or data.get("format") != FORMAT:
            got = data.get("format") if isinstance(data, Mapping) else type(data).__name__
            raise InvalidRuleError(f"Not a neural rule: expected format {FORMAT!r}, got {got!r}.")
        names = [f.name for f in dataclasses.fields(cls) if f.name not in ("params", "out_scale")]
        missing = [name for name in names if name not in data]
        if missing:
            raise InvalidRuleError(f"Neural rule file lacks {missing}; write it with NeuralRule.to_json.")
        spec = {name: data[name] for name in names}
        spec["out_scale"] = data.get("out_scale", 1.0)  # files written before out_scale existed: an unscaled MLP
        for key in ("features", "hidden"):
            if not isinstance(spec[key], list):
                raise InvalidRuleError(f"Neural rule file: {key!r} must be a list; received {str(spec[key])[:80]}.")
            spec[key] = tuple(spec[key])
        params = data.get("params")
        if run is not None:
            runs = data.get("runs") or []
            if not isinstance(runs, list) or not 0 <= run < len(runs):
                held = len(runs) if isinstance(runs, list) else "no list of"
                raise InvalidRuleError(f"Neural rule file holds {held} runs; run {run} does not exist.")
            params = runs[run]
        return cls(**spec, params=None if params is None else _params_from_json(params))

    def describe(self) -> str:
        feats = ", ".join(self.features)
        mlp = "-".join(map(str, (self.n_features, *self.hidden, 1))) if self.hidden else "none"
        return (
            f"NeuralRule {self.name!r}: dW_ij = {'a . phi_ij + ' if self.skip else ''}MLP(phi_ij); features: {feats}; "
            f"MLP {mlp} ({self.activation}, output x {self.out_scale:g}); {self.n_params} parameters"
        )

    def __repr__(self) -> str:
        return (
            f"NeuralRule(features={self.features}, hidden={self.hidden}, activation={self.activation!r}, "
            f"skip={self.skip})"
        )


def _params_from_json(params) -> dict[str, Tensor]:
    """Parameters of a neural rule file (name -> nested lists of finite numbers) as float64 tensors."""
    fix = "The file is damaged: export it again from its run (rulesearch export RUN -f json)."
    if not isinstance(params, Mapping):
        raise InvalidRuleError(f"Neural rule parameters must be an object of name -> numbers; received {params!r:.80}.")
    out = {}
    for name, value in params.items():
        try:
            if isinstance(value, (str, bytes)):
                raise TypeError(f"a string {value!r:.40}")
            tensor = torch.tensor(value, dtype=torch.float64)
        except (TypeError, ValueError, RuntimeError, OverflowError) as err:
            raise InvalidRuleError(
                f"Neural rule parameter {name!r} must be numbers (nested lists); {err}. {fix}"
            ) from None
        if not bool(torch.isfinite(tensor).all()):
            raise InvalidRuleError(f"Neural rule parameter {name!r} holds NaN or infinite values. {fix}")
        out[str(name)] = tensor
    return out
