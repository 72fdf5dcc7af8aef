r"""Learners: how a rule's parameters are laid out, initialized, expanded per episode, penalized, logged and read back.

A :class:`Learner` owns the meta-learned parameters (a dict of ``[S, ...]`` tensors, one
row per run) and maps them to what the inner loop needs per layer; callers never look inside. Implementations:
:class:`LinearLearner` (coefficients :math:`\theta` of :math:`\Delta W = \sum_r \theta_r T^r`, shared, per layer or
per layer group), :class:`NeuralLearner` (the MLP of a :class:`~rulesearch.neural.NeuralRule`) and
:class:`PlasticFeedback` (any learner plus the coefficients of the rule that updates the feedback matrices).

How to add a learner: subclass :class:`Learner`, implement ``init``, ``update``, ``layer_params``, ``columns`` and
``trained`` (optionally ``l1``, ``proximal``, ``inner_kwargs``, ``term_probe``), and pass an instance as the rule of a
:class:`~rulesearch.train.Problem` trained by a :class:`~rulesearch.train.Trainer` (``tests/test_contracts.py``
meta-learns per-layer learning rates in log space this way).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence

import torch
from torch import Tensor

from ..errors import ConfigError
from ..lang.rule import NetworkRule, Rule
from ..networks.feedforward import Network
from ..neural import NeuralRule
from ..tasks.episodes import episode_generator
from .configs import MetaConfig
from .rules import _pseudo_gradient_term

__all__ = ["Learner", "LinearLearner", "NeuralLearner", "PlasticFeedback", "make_learner"]


class Learner(ABC):
    """The meta-learned parameters of a rule and how the inner loop reads them.

    Parameters are a dict ``{name: Tensor [S, ...]}`` (one row per run, ``S`` runs trained together); the trainer
    expands them to one row per episode (``[S * B, ...]``) before :meth:`layer_params`. Adam, checkpoints and metrics
    treat every name as a parameter group.
    """

    linear: bool = False
    """Whether the parameters are coefficients of a linear rule (``theta_`` of :class:`RuleSearch`)."""

    @abstractmethod
    def init(self, seeds: Sequence[int], dtype, device) -> dict[str, Tensor]:
        """Initial parameters of the runs with these seeds, each ``[S, ...]``."""

    @abstractmethod
    def update(self, net):
        """The update object of every layer (one shared object, or a list of ``L``) for
        :func:`~rulesearch.inner.run_episodes`."""

    @abstractmethod
    def layer_params(self, expanded: dict[str, Tensor]):
        """The ``params`` argument of :func:`~rulesearch.inner.run_episodes` from per-episode parameters."""

    def inner_kwargs(self, expanded: dict[str, Tensor]) -> dict:
        """Further keyword arguments of :func:`~rulesearch.inner.run_episodes` (e.g. a feedback rule)."""
        return {}

    def l1(self, params: dict[str, Tensor]) -> Tensor | None:
        """Per-run ``sum |p|`` ``(S,)`` of the parameters the L1 term acts on, or None (no L1)."""
        return None

    def proximal(self, name: str) -> bool:
        """Whether the proximal L1 step applies to the parameter group ``name``."""
        return False

    def term_probe(self, init: dict[str, Tensor], dtype, device) -> tuple[list[int], Callable] | None:
        """For ``meta.term_scale``: the number of scaled terms per layer and ``rms_of(layer, signals) -> (R,)``, the
        RMS of every term over the synapses of a step, or None when the parameters have no term structure."""
        return None

    def step_multipliers(self, init: dict[str, Tensor], sums: list[Tensor], cap: float) -> dict[str, Tensor]:
        """Per parameter group, multipliers of Adam's step from the per-layer RMS sums of :meth:`term_probe`."""
        return {}

    @abstractmethod
    def columns(self, params: dict[str, Tensor], s: int) -> dict[str, float]:
        """The metric columns of run ``s`` (``theta.<term>``, ...)."""

    @abstractmethod
    def trained(self, params: dict[str, Tensor], s: int | None = None):
        """The rule object with the parameters of run ``s`` (None: the mean over runs, where that is meaningful)."""


def _term_ms(update, eye: Tensor, signals) -> Tensor:
    """Per episode the mean square over the synapses of every term ``F_r`` of a compiled linear rule (``theta`` the
    one-hot rows of ``eye``): ``(B, R)``."""
    return torch.stack([update(signals, e).pow(2).mean((-2, -1)) for e in eye], -1)


def _multipliers(rms: Tensor, v: Tensor, cap: float) -> Tensor:
    """``min(cap, rms(T_ref) / rms(T_r))`` with ``T_ref`` the term of the largest initial ``|theta|`` ``v[0]``; a
    term that is zero throughout keeps the multiplier 1."""
    ref = rms.gather(-1, v[0].abs().double().cpu().reshape(rms.shape).argmax(-1, keepdim=True))
    mult = torch.where(rms > 0, ref / rms.clamp_min(1e-300), torch.ones_like(rms)).clamp(max=cap)
    return mult.to(dtype=v.dtype, device=v.device)


def _initial_values(rule: Rule, init, theta0: float, key: str, init_term: str | None = None) -> list[float]:
    """Initial coefficients of a linear rule: ``init`` (config key ``key``; one per term), else ``theta0`` for
    ``init_term`` or the pseudo-gradient term ``-e_i x_j`` (the first term if there is none) and 0 for the others."""
    if init is not None:
        if len(init) != rule.n_terms:
            raise ConfigError(
                f"Config key {key!r} has {len(init)} values but rule {rule.name!r} has {rule.n_terms} terms "
                f"{list(rule.term_names())}; give one value per term."
            )
        return [float(v) for v in init]
    vec = [0.0] * rule.n_terms
    found = _pseudo_gradient_term(rule)
    if init_term is not None:
        if init_term not in rule.term_names():
            raise ConfigError(
                f"Config key 'meta.init_term': received {init_term!r}, expected one of the terms "
                f"{list(rule.term_names())}."
            )
        vec[rule.term_names().index(init_term)] = theta0
    elif found is not None:  # start as the pseudo-gradient rule -theta0 e_i x_j
        r, c = found
        vec[r] = theta0 / c
    else:
        vec[0] = theta0
    return vec


class LinearLearner(Learner):
    """Linear rules: ``theta`` of shape ``[S, R]`` (shared), ``[S, L, R]`` (per layer) or one ``[S, R_g]`` per
    group of a :class:`NetworkRule`."""

    linear = True

    def __init__(self, rule, n_layers: int, meta: MetaConfig):
        from ..compile.compiler import compile_rule

        self.rule = rule
        self.n_layers = n_layers
        if isinstance(rule, NetworkRule):
            for layer in range(n_layers):
                rule.group_of(layer)  # every layer covered
            self.kind = "groups"
            self.groups = [r for _, r in rule.groups]
            self.names = [f"theta_g{g}" for g in range(len(self.groups))]
            self.updates = [compile_rule(r) for r in self.groups]
        else:
            self.kind = "per_layer" if meta.per_layer else "shared"
            self.groups = [rule]
            self.names = ["theta"]
            self.updates = [compile_rule(rule)]
        self.meta = meta

    def _init_vector(self, rule: Rule) -> list[float]:
        return _initial_values(rule, self.meta.init, self.meta.theta0, "meta.init", self.meta.init_term)

    def init(self, seeds: Sequence[int], dtype, device) -> dict[str, Tensor]:
        S = len(seeds)
        out = {}
        for name, rule in zip(self.names, self.groups):
            v = torch.tensor(self._init_vector(rule), dtype=torch.float64)
            if self.kind == "per_layer":
                v = v.expand(self.n_layers, -1)
            out[name] = v.expand(S, *v.shape).clone().to(dtype=dtype, device=device)
        return out

    def update(self, net: Network):
        if self.kind == "groups":
            return [self.updates[self.rule.group_of(layer)] for layer in range(self.n_layers)]
        return self.updates[0]

    def layer_params(self, expanded: dict[str, Tensor]):
        if self.kind == "shared":
            return expanded["theta"]
        if self.kind == "per_layer":
            return [expanded["theta"][:, layer] for layer in range(self.n_layers)]
        return [expanded[self.names[self.rule.group_of(layer)]] for layer in range(self.n_layers)]

    def l1(self, params: dict[str, Tensor]) -> Tensor:
        """Per-run ``sum |theta|`` (shape ``(S,)``)."""
        return sum(p.abs().flatten(1).sum(1) for p in params.values())

    def proximal(self, name: str) -> bool:
        return True

    def term_probe(self, init, dtype, device):
        ups = self.update(None)
        ups = ups if isinstance(ups, list) else [ups] * self.n_layers
        eyes = [torch.eye(u.n_params, dtype=dtype, device=device) for u in ups]  # one term at a time

        def rms_of(layer, signals):
            return _term_ms(ups[layer], eyes[layer], signals).mean(0).sqrt()

        return [u.n_params for u in ups], rms_of

    def step_multipliers(self, init, sums, cap):
        """Averaged over the layers that share a coefficient vector."""
        out = {}
        for k, v in init.items():
            if self.kind == "shared":
                rms = torch.stack(sums).mean(0)
            elif self.kind == "per_layer":
                rms = torch.stack(sums)
            else:
                g = self.names.index(k)
                rms = torch.stack([sums[layer] for layer in range(self.n_layers) if self.rule.group_of(layer) == g])
                rms = rms.mean(0)
            out[k] = _multipliers(rms, v, cap)
        return out

    def columns(self, params: dict[str, Tensor], s: int) -> dict[str, float]:
        out = {}
        for name, rule in zip(self.names, self.groups):
            v = params[name][s].detach().cpu().double()
            prefix = "theta." if self.kind != "groups" else f"theta.g{self.names.index(name)}."
            if self.kind == "per_layer":
                for layer in range(self.n_layers):
                    for r, term in enumerate(rule.term_names()):
                        out[f"theta.{layer}.{term}"] = float(v[layer, r])
            else:
                for r, term in enumerate(rule.term_names()):
                    out[prefix + term] = float(v[r])
        return out

    def trained(self, params: dict[str, Tensor], s: int | None = None):
        """The rule with the values of run ``s`` (None: the mean over runs)."""

        def pick(p):
            p = p.detach().cpu().double()
            return p.mean(0) if s is None else p[s]

        if self.kind == "shared":
            return self.rule.with_values(pick(params["theta"]))
        if self.kind == "per_layer":
            th = pick(params["theta"])
            return NetworkRule(
                {
                    (layer,): Rule(self.rule.terms, f"layer {layer + 1}", values=th[layer].tolist())
                    for layer in range(self.n_layers)
                }
            )
        return NetworkRule(
            [(layers, r.with_values(pick(params[name]))) for (layers, r), name in zip(self.rule.groups, self.names)]
        )


class NeuralLearner(Learner):
    """Neural rules: a dict of MLP parameters, each ``[S, ...]``."""

    linear = False

    def __init__(self, rule: NeuralRule, n_layers: int, meta: MetaConfig):
        self.rule = rule
        self.n_layers = n_layers
        self.meta = meta
        self.names = list(rule.param_shapes())

    def init(self, seeds: Sequence[int], dtype, device) -> dict[str, Tensor]:
        per_run = [self.rule.init_params(episode_generator(s, 0, 0, "neural"), self.meta.theta0) for s in seeds]
        return {k: torch.stack([p[k] for p in per_run]).to(dtype=dtype, device=device) for k in self.names}

    def update(self, net: Network):
        return self.rule

    def layer_params(self, expanded: dict[str, Tensor]):
        return expanded

    def term_probe(self, init, dtype, device):
        """The skip part ``a^T phi``: term ``f`` is the feature ``phi_f``, the same in every layer; the MLP keeps
        Adam's learning rate."""
        if "skip" not in init:
            return None
        rule = self.rule

        def rms_of(layer, signals):
            feats = rule.features_of(signals)
            return torch.stack([feats[f].pow(2).mean().sqrt() for f in rule.features])

        return [rule.n_features] * self.n_layers, rms_of

    def step_multipliers(self, init, sums, cap):
        return {"skip": _multipliers(torch.stack(sums).mean(0), init["skip"], cap)}

    def columns(self, params: dict[str, Tensor], s: int) -> dict[str, float]:
        out = {}
        if "skip" in params:
            for f, v in zip(self.rule.features, params["skip"][s].detach().cpu().double().tolist()):
                out[f"skip.{f}"] = v
        norm = self.rule.mlp_norm({k: v[s] for k, v in params.items()})
        if norm is not None:
            out["mlp_norm"] = norm
        return out

    def trained(self, params: dict[str, Tensor], s: int | None = None):
        return self.rule.with_params({k: v[0 if s is None else s] for k, v in params.items()})


_FB = "fb_theta"  # the parameter group of the plastic feedback rule


class PlasticFeedback(Learner):
    r"""A learner plus the plastic feedback rule :math:`\Delta B = \sum_r \theta^{fb}_r T^r` (``dfb`` in W's
    layout), whose coefficients ``fb_theta`` ``[S, R_fb]`` are shared by all layers.

    With ``meta.meta_feedback`` they are a second parameter group (Adam, checkpoints, ``fb_theta.<term>`` columns),
    else fixed at their initial values. L1 applies to the forward rule's parameters only.
    """

    def __init__(self, base, rule: Rule, meta: MetaConfig):
        from ..compile.compiler import compile_rule

        self.base = base
        self.feedback_rule = rule
        self.feedback_update = compile_rule(rule)
        self.learned = meta.meta_feedback
        self.linear, self.names, self.kind = base.linear, base.names, getattr(base, "kind", None)
        vals = _initial_values(rule, meta.feedback_init, meta.theta0, "meta.feedback_init")
        self.fb_init = torch.tensor(vals, dtype=torch.float64)

    @staticmethod
    def _forward(params: dict[str, Tensor]) -> dict[str, Tensor]:
        return {k: v for k, v in params.items() if k != _FB}

    def init(self, seeds: Sequence[int], dtype, device) -> dict[str, Tensor]:
        out = self.base.init(seeds, dtype, device)
        if self.learned:
            out[_FB] = self.fb_init.expand(len(seeds), -1).clone().to(dtype=dtype, device=device)
        return out

    def update(self, net: Network):
        return self.base.update(net)

    def layer_params(self, expanded: dict[str, Tensor]):
        return self.base.layer_params(self._forward(expanded))

    def feedback_params(self, expanded: dict[str, Tensor]) -> Tensor:
        """``(rows, R_fb)`` learned coefficients, or the fixed ``(R_fb,)`` initial ones."""
        if _FB in expanded:
            return expanded[_FB]
        ref = next(iter(expanded.values()))
        return self.fb_init.to(dtype=ref.dtype, device=ref.device)

    def inner_kwargs(self, expanded: dict[str, Tensor]) -> dict:
        return {"feedback_update": self.feedback_update, "feedback_params": self.feedback_params(expanded)}

    def l1(self, params: dict[str, Tensor]):
        return self.base.l1(self._forward(params))

    def proximal(self, name: str) -> bool:
        return name != _FB and self.base.proximal(name)

    def term_probe(self, init, dtype, device):
        return self.base.term_probe(self._forward(init), dtype, device)

    def step_multipliers(self, init, sums, cap):
        return self.base.step_multipliers(self._forward(init), sums, cap)

    def feedback_values(self, params: dict[str, Tensor], s: int | None = None) -> Tensor:
        """The feedback coefficients of run ``s`` (None: the mean over runs), float64 on the CPU."""
        if _FB not in params:
            return self.fb_init.clone()
        p = params[_FB].detach().cpu().double()
        return p.mean(0) if s is None else p[s]

    def columns(self, params: dict[str, Tensor], s: int) -> dict[str, float]:
        out = self.base.columns(self._forward(params), s)
        names = self.feedback_rule.term_names()
        out.update({f"fb_theta.{t}": float(v) for t, v in zip(names, self.feedback_values(params, s))})
        return out

    def trained(self, params: dict[str, Tensor], s: int | None = None):
        return self.base.trained(self._forward(params), s)

    def trained_feedback(self, params: dict[str, Tensor], s: int | None = None) -> Rule:
        return self.feedback_rule.with_values(self.feedback_values(params, s))


def make_learner(rule, n_layers: int, meta: MetaConfig) -> Learner:
    """The learner of a resolved rule (a :class:`Learner` instance is its own)."""
    if isinstance(rule, Learner):
        return rule
    if isinstance(rule, NeuralRule):
        if meta.per_layer:
            raise ConfigError("meta.per_layer applies to linear rules; a neural rule is shared by all layers.")
        return NeuralLearner(rule, n_layers, meta)
    return LinearLearner(rule, n_layers, meta)
