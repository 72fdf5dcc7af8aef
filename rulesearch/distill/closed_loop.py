r"""Closed loop: run the distilled rule again and compare it with the rule it was distilled from.

:func:`closed_loop` compiles the distilled :class:`~rulesearch.lang.rule.Rule` and, on the same fresh episodes and
initial weights,

1. runs the *original* update (any update object: a compiled rule, a neural rule, a black box) and, at every step
   and layer, evaluates the distilled rule on the very signals the original saw (states advanced alongside), giving
   the cosine similarity :math:`\cos(\Delta W^{orig}, \Delta W^{dist})` per episode, step and layer along the
   original trajectory;
2. runs the distilled rule on its own (its own trajectory) and reports its query accuracy beside the original's.

The cosine isolates the formula's fidelity (same inputs); the accuracies show whether small differences compound
when the distilled rule learns on its own.

Examples
--------
>>> import torch
>>> from rulesearch.networks.feedforward import Network
>>> from rulesearch.lang.pools import f0
>>> from rulesearch.lang.signals import err, pre
>>> net = Network(sizes=(6, 5, 3), feedback="fa")
>>> g = torch.Generator().manual_seed(0)
>>> batch = (torch.rand(2, 8, 6, generator=g), torch.randint(3, (2, 8), generator=g),
...          torch.rand(2, 4, 6, generator=g), torch.randint(3, (2, 4), generator=g))
>>> distilled = formula_to_rule(-0.1 * err * pre)
>>> rep = closed_loop(distilled, f0.compile(), torch.tensor([0.1]), net, batch, seed=0)
>>> round(rep.cosine, 6), rep.accuracy_original == rep.accuracy_distilled
(1.0, True)
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch

from ..compile.compiler import compile_rule
from ..inner import run_episodes
from ..lang.rule import Rule
from .base import formula_to_rule

__all__ = ["ClosedLoopReport", "closed_loop", "rule_params"]


@dataclass(frozen=True)
class ClosedLoopReport:
    """The closed-loop comparison of a distilled rule with its original.

    Attributes
    ----------
    accuracy_original, accuracy_distilled : float
        Mean query accuracy over the episodes (NaN for regression tasks).
    loss_original, loss_distilled : float
        Mean query loss.
    cosine : float
        Mean cosine similarity of the two updates on the original's trajectory (over episodes, steps, layers).
    cosine_per_layer : tuple of float
        The same per layer.
    relative_error : float
        :math:`\\lVert \\Delta W^{dist} - \\Delta W^{orig} \\rVert / \\lVert \\Delta W^{orig} \\rVert` summed over
        the trajectory.
    diverged_original, diverged_distilled : int
        Episodes that diverged.
    n_episodes : int
    """

    accuracy_original: float
    accuracy_distilled: float
    loss_original: float
    loss_distilled: float
    cosine: float
    cosine_per_layer: tuple[float, ...]
    relative_error: float
    diverged_original: int
    diverged_distilled: int
    n_episodes: int

    def to_dict(self) -> dict:
        d = asdict(self)
        d["cosine_per_layer"] = list(self.cosine_per_layer)
        return d

    def __str__(self) -> str:
        return (
            f"query accuracy: original {self.accuracy_original:.4f}, distilled {self.accuracy_distilled:.4f} "
            f"({self.n_episodes} episodes; diverged {self.diverged_original} / {self.diverged_distilled}); "
            f"update cosine {self.cosine:.6f} (per layer {', '.join(f'{c:.4f}' for c in self.cosine_per_layer)}), "
            f"relative error {self.relative_error:.3e}"
        )


def rule_params(rule: Rule, dtype=torch.float64, device=None):
    """The parameters a compiled rule takes from the rule's stored values: ``theta`` or a dict of constants."""
    if rule.values is None:
        raise ValueError(f"Rule {rule.name!r} has no values; distilled rules always carry them.")
    if rule.is_linear:
        return torch.tensor(rule.values, dtype=dtype, device=device)
    return {k: torch.tensor(v, dtype=dtype, device=device) for k, v in dict(rule.values).items()}


class _CosineObserver:
    """Evaluates per-layer distilled updates on the observed signals and accumulates cosines."""

    def __init__(self, compiled, params, n_layers: int, on_step=None):
        self.compiled, self.params, self.on_step = compiled, params, on_step
        needs, specs = set(), []
        for c in compiled:
            if c is None:
                specs.append(())
                continue
            needs |= set(c.needs)
            specs.append(tuple(c.states))
        self.needs = frozenset(needs)
        self.specs = specs
        self._state: dict[int, dict] = {}
        self.dot = [0.0] * n_layers
        self.count = [0] * n_layers
        self.err2 = 0.0
        self.ref2 = 0.0

    def __call__(self, step, layer, signals, dw):
        if layer == 0 and self.on_step is not None:
            self.on_step()
        comp = self.compiled[layer]
        if comp is None:
            return
        if step == 0:
            self._state[layer] = {}
        sig = dict(signals)
        st = self._state.setdefault(layer, {})
        for spec in self.specs[layer]:
            old = st.get(spec.name)
            new = spec.step(spec.init(sig) if old is None else old, sig)
            sig[spec.name] = new
            st[spec.name] = new
        other = comp(sig, self.params[layer])
        a = dw.reshape(dw.shape[0], -1).double()
        b = other.reshape(other.shape[0], -1).double()
        na, nb = a.norm(dim=1), b.norm(dim=1)
        ok = (na > 0) & (nb > 0) & torch.isfinite(na) & torch.isfinite(nb)
        if ok.any():
            cos = (a[ok] * b[ok]).sum(1) / (na[ok] * nb[ok])
            self.dot[layer] += float(cos.sum())
            self.count[layer] += int(ok.sum())
        diff = (a - b).pow(2).sum()
        if torch.isfinite(diff):
            self.err2 += float(diff)
            self.ref2 += float(a.pow(2).sum())


def closed_loop(
    distilled,
    update,
    params,
    net,
    batch,
    *,
    layers=None,
    seed: int | None = None,
    on_step=None,
    **run_kwargs,
) -> ClosedLoopReport:
    """Compare a distilled rule with the original update on the same episodes (see the module docstring).

    Parameters
    ----------
    distilled : Rule, sympy.Expr, or sequence of them
        The distilled rule (with values) or formula; a sequence gives one per layer (None keeps the original there).
    update, params :
        The original update object(s) and parameters, as for :func:`~rulesearch.inner.run_episodes`.
    net, batch :
        The network and fresh episodes (not those the samples came from).
    layers : sequence of int, optional
        Use the distilled rule only in these layers (the original elsewhere); default all.
    seed : int, optional
        Initialization seed (default: the batch's own); both runs start from the same weights.
    on_step : callable, optional
        Called once per step of the original's run (e.g. to advance a progress bar).
    **run_kwargs :
        Passed to :func:`run_episodes` (e.g. ``reward=``).
    """
    n = net.n_layers
    x = batch[0] if isinstance(batch, (tuple, list)) else batch.x_train
    dtype, device = x.dtype, x.device
    per_layer = list(distilled) if isinstance(distilled, (list, tuple)) else [distilled] * n
    if len(per_layer) != n:
        raise ValueError(f"distilled holds {len(per_layer)} rules; the network has {n} layers.")
    if layers is not None:
        keep = {int(i) for i in layers}
        per_layer = [r if i in keep else None for i, r in enumerate(per_layer)]
    rules = [None if r is None else (r if isinstance(r, Rule) else formula_to_rule(r)) for r in per_layer]
    compiled = [None if r is None else compile_rule(r) for r in rules]
    dparams = [None if r is None else rule_params(r, dtype, device) for r in rules]
    obs = _CosineObserver(compiled, dparams, n, on_step)
    run_kwargs = {"raise_on_divergence": False, **run_kwargs}  # diverged episodes are counted in the report
    orig = run_episodes(net, batch, update, params, seed=seed, observe=obs, metrics=False, **run_kwargs)
    upd_list = update if isinstance(update, (list, tuple)) else [update] * n
    par_list = params if isinstance(params, (list, tuple)) else [params] * n
    mixed_upd = [c if c is not None else upd_list[i] for i, c in enumerate(compiled)]
    mixed_par = [p if compiled[i] is not None else par_list[i] for i, p in enumerate(dparams)]
    dist = run_episodes(net, batch, mixed_upd, mixed_par, seed=seed, metrics=False, **run_kwargs)
    per = tuple(d / c if c else math.nan for d, c in zip(obs.dot, obs.count))
    total = sum(obs.count)
    return ClosedLoopReport(
        accuracy_original=float(orig.accuracy.double().mean()),
        accuracy_distilled=float(dist.accuracy.double().mean()),
        loss_original=float(orig.loss.detach().double().mean()),
        loss_distilled=float(dist.loss.detach().double().mean()),
        cosine=sum(obs.dot) / total if total else math.nan,
        cosine_per_layer=per,
        relative_error=math.sqrt(obs.err2 / obs.ref2) if obs.ref2 > 0 else math.nan,
        diverged_original=int(orig.diverged.sum()),
        diverged_distilled=int(dist.diverged.sum()),
        n_episodes=int(orig.loss.shape[0]),
    )
