r"""The meta-trainer: meta-learn a plasticity rule by backpropagating through the unrolled online inner loop.

For every meta-step ``t`` each run ``s`` draws ``B`` (``meta_batch``) fresh episodes ``(seed_s, t, k)``, adapts a
fresh network on each with the rule (:func:`rulesearch.inner.run_episodes`), and takes one Adam step on

.. math::

    \mathcal{L}_{meta}(\theta) = \frac{1}{B} \sum_{k} \mathrm{CE}\big(f_{W_k(\theta)}(X^{query}_k), Y^{query}_k\big)
    + \lambda \lVert\theta\rVert_1

(Shervani-Tabar & Rosenbaum 2023, Eq. 6, Alg. 1): the default :class:`~rulesearch.train.objective.QueryLoss`; any
:class:`~rulesearch.train.objective.Objective` can replace the query cross-entropy. The defaults are the paper's:
Adam with learning rate ``1e-3``, :math:`\theta_0 = 10^{-3}` and the other coefficients 0, no gradient clipping,
the L1 term as a subgradient. Options: gradient clipping, a proximal (soft-thresholding) L1 step in Adam's
metric so that coefficients reach exactly zero (:func:`adam_step`), ``B > 1``, per-layer coefficients ``(L, R)``,
several independent runs trained together as one batch, neural rules (:class:`rulesearch.neural.NeuralRule`).

Runs
----
Run ``s`` has seed ``seed + s``, its own parameters, Adam moments and step count; its episodes depend only on
``(seed + s, t, k)``. ``S`` runs are trained as one batch of ``S * B`` episodes (the parameters ``[S, ...]`` are
expanded to one row per episode), and each equals the same run trained alone. The Adam update is written out
per run (not ``torch.optim.Adam``, whose step count is shared by a tensor's rows).

Divergence
----------
If an episode of run ``s`` diverges (:attr:`InnerResult.diverged`, or a non-finite loss or gradient), run ``s``
skips the meta-step (parameters and Adam state untouched; the step is logged with ``skipped = 1``). NaNs poison
gradients even when masked, so when some runs diverge the step is recomputed for the others alone. After
``max_skips`` consecutive skips the run stops; when every run has stopped, :meth:`RuleSearch.fit` raises
:class:`~rulesearch.errors.DivergenceError`. Parameters are never updated with NaN. Where the first diverged episode
of a run's meta-batch went wrong is logged as ``diverged_k`` (its episode index ``k``), ``diverged_inner_step`` and
``diverged_layer`` (1-based, where the loop's check saw it; empty when the episode's weights stayed finite and in
bounds but its loss or gradient did not). A stopped run is left out of the reported rule (see :class:`RuleSearch`).

Data parallel
-------------
Launched by ``torchrun`` (``WORLD_SIZE`` > 1; gloo on CPU, nccl on CUDA, rank ``r`` on ``cuda:LOCAL_RANK``), each
rank runs its own contiguous block of the ``S * B`` episodes of a meta-step
(:func:`rulesearch.train.distributed.rank_episodes`); the meta-gradients, divergence flags and per-episode metrics are
summed or gathered across ranks, so every rank takes the same Adam step and the parameters follow the
single-process trajectory up to rounding. Only rank 0 writes the run directory, prints and shows progress; a
resumed run continues from rank 0's checkpoint on every rank.

Plastic feedback
----------------
Under ``network.feedback = "plastic"`` a second linear rule (``network.feedback_rule``, default ``kp``: Kolen-Pollack
:math:`\Delta B_{ji} = -\theta^{fb}_0 e_i x_j - \theta^{fb}_1 B_{ji}`, in W's layout) updates the feedback matrices
every step. Its coefficients ``fb_theta`` ``[S, R_fb]`` (shared by all layers; initial values ``meta.feedback_init``)
are meta-learned with the forward rule's by default (``meta.meta_feedback``): a second parameter group with its own
Adam moments, checkpointed, logged and exported (``feedback_rule`` in ``rule.json``). The L1 term and the proximal
step act on the forward rule only: they select its terms, and would otherwise pull the feedback learning rate to 0.
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Mapping
from dataclasses import dataclass
from types import SimpleNamespace

import torch
from torch import Tensor

from ..errors import RunDirectoryError
from ..inner import InnerResult, run_episodes
from .distributed import (
    all_reduce_sum,
    gather_objects,
    rank_episodes,
)
from .objective import Objective, QueryLoss
from .optim import adam_step
from .problem import Problem

__all__ = ["Trainer", "TrainState"]


@dataclass
class TrainState:
    t: int  # meta-steps done
    params: dict[str, Tensor]
    m: dict[str, Tensor]
    v: dict[str, Tensor]
    steps: Tensor  # (S,) Adam steps taken per run
    skips: Tensor  # (S,) consecutive skips
    stopped: Tensor  # (S,) bool
    stop_step: Tensor  # (S,) step at which the run stopped, -1 if running

    def to_checkpoint(self) -> dict:
        def cpu(d):
            return {k: v.detach().cpu().clone() for k, v in d.items()}

        return {
            "t": self.t,
            "params": cpu(self.params),
            "adam_m": cpu(self.m),
            "adam_v": cpu(self.v),
            "adam_steps": self.steps.cpu().clone(),
            "skips": self.skips.cpu().clone(),
            "stopped": self.stopped.cpu().clone(),
            "stop_step": self.stop_step.cpu().clone(),
        }

    @classmethod
    def from_checkpoint(
        cls, data: Mapping, like: TrainState, device, *, step: int | None = None, max_t: int | None = None,
        source: str = "The checkpoint",
    ) -> TrainState:  # fmt: skip
        """The state in ``data`` (``to_checkpoint``'s dict), shaped and typed like ``like``.

        ``step`` is the step of the checkpoint file and ``max_t`` the meta-steps of the run: a state that lacks an
        entry, has another rule's parameters, non-finite values, or a step count outside ``0..max_t`` or unequal to
        ``step`` raises :class:`RunDirectoryError` (``source`` names the file).
        """
        fix = "Delete that checkpoint to resume from the one before it, or start the run afresh."
        keys = ("t", "params", "adam_m", "adam_v", "adam_steps", "skips", "stopped", "stop_step")
        missing = [k for k in keys if not isinstance(data, Mapping) or k not in data]
        if missing:
            raise RunDirectoryError(f"{source} lacks {missing}; it is not a complete training state. {fix}")
        t = data["t"]
        bad_t = isinstance(t, bool) or not isinstance(t, int) or t < 0 or (max_t is not None and t > max_t)
        if bad_t or (step is not None and t != step):
            span = f"0..{max_t} (meta.episodes)" if max_t is not None else ">= 0"
            at = f", and equal to the file's step {step}" if step is not None else ""
            raise RunDirectoryError(f"{source} holds t = {str(t)[:40]}; the meta-steps done must be {span}{at}. {fix}")

        def dev(d, ref, name):
            if not isinstance(d, Mapping) or set(d) != set(ref):
                got = sorted(d) if isinstance(d, Mapping) else type(d).__name__
                raise RunDirectoryError(
                    f"{source}: parameters {got} do not match the rule's {sorted(ref)}; the run directory belongs to "
                    f"another rule."
                )
            out = {}
            for k, v in d.items():
                if not torch.is_tensor(v) or tuple(v.shape) != tuple(ref[k].shape):
                    shape = tuple(v.shape) if torch.is_tensor(v) else type(v).__name__
                    raise RunDirectoryError(f"{source}: {name} {k!r} is {shape}, expected shape {tuple(ref[k].shape)}.")
                if not bool(torch.isfinite(v).all()):
                    raise RunDirectoryError(f"{source}: {name} {k!r} holds NaN or infinite values. {fix}")
                out[k] = v.to(device=device, dtype=ref[k].dtype)
            return out

        def per_run(name, ref):
            v = data[name]
            if not torch.is_tensor(v) or tuple(v.shape) != tuple(ref.shape):
                raise RunDirectoryError(f"{source}: {name!r} is not a tensor of shape {tuple(ref.shape)}. {fix}")
            return v.to(device=device, dtype=ref.dtype)

        return cls(
            t=t,
            params=dev(data["params"], like.params, "parameter"),
            m=dev(data["adam_m"], like.params, "Adam moment"),
            v=dev(data["adam_v"], like.params, "Adam moment"),
            steps=per_run("adam_steps", like.steps),
            skips=per_run("skips", like.skips),
            stopped=per_run("stopped", like.stopped),
            stop_step=per_run("stop_step", like.stop_step),
        )


class Trainer:
    """The meta-training loop over a :class:`Problem` (state in :class:`TrainState`)."""

    def __init__(self, problem: Problem, world: tuple[int, int] = (0, 1), objective: Objective | None = None):
        self.p = problem
        self.objective = QueryLoss() if objective is None else objective
        self.meta = problem.cfg.meta
        self.rank, self.world_size = world  # data-parallel: this rank runs its share of each meta-step's episodes
        self._lr_scale: dict[str, Tensor] | None = None

    def lr_scale(self) -> dict[str, Tensor]:
        """Per-coefficient multipliers of the Adam learning rate (``meta.term_scale``), by parameter name.

        'rms': ``rms(T_ref) / rms(T_r)`` per layer and term, measured on episode ``(seed, 0, 0)`` of the first run
        under the initial coefficients (so a resumed run gets the same values), averaged over the layers that share
        a coefficient; a term that is zero throughout keeps the multiplier 1. 'capped': ``min(1, ...)``. A neural
        rule's skip coefficients are scaled the same way (term ``f`` is the feature ``phi_f``); its MLP keeps lr.
        """
        if self._lr_scale is not None:
            return self._lr_scale
        p = self.p
        init = p.learner.init(p.seeds[:1], p.dtype, p.device)
        scale = {k: torch.ones_like(v[0]) for k, v in init.items()}
        probe = p.learner.term_probe(init, p.dtype, p.device) if self.meta.term_scale != "none" else None
        if probe is not None:
            sizes, rms_of = probe
            sums = [torch.zeros(n, dtype=torch.float64) for n in sizes]

            def observe(step, layer, signals, dW):
                sums[layer] += rms_of(layer, signals).double().cpu()

            batch, weights, feedback = p.episodes(0, [0])
            expanded = {k: v.repeat_interleave(p.B, dim=0) for k, v in init.items()}
            with torch.no_grad():
                run_episodes(
                    p.net, batch, p.update, p.learner.layer_params(expanded), weights, feedback, observe=observe,
                    metrics=False, raise_on_divergence=False, **p.learner.inner_kwargs(expanded),
                )  # fmt: skip
            cap = 1.0 if self.meta.term_scale == "capped" else math.inf
            scale.update(p.learner.step_multipliers(init, sums, cap))
        self._lr_scale = scale
        return scale

    def fresh_state(self) -> TrainState:
        p = self.p
        params = p.learner.init(p.seeds, p.dtype, p.device)
        S = len(p.seeds)
        dev = p.device
        return TrainState(
            t=0,
            params=params,
            m={k: torch.zeros_like(v) for k, v in params.items()},
            v={k: torch.zeros_like(v) for k, v in params.items()},
            steps=torch.zeros(S, dtype=torch.long, device=dev),
            skips=torch.zeros(S, dtype=torch.long, device=dev),
            stopped=torch.zeros(S, dtype=torch.bool, device=dev),
            stop_step=torch.full((S,), -1, dtype=torch.long, device=dev),
        )

    def validate(self, st: TrainState) -> str:
        """Two online steps of one episode (no gradients): surfaces signal, shape, device and method errors before a
        run directory is created. Returns the path the inner loop takes (``InnerResult.method``)."""
        p = self.p
        batch, weights, feedback = p.episodes(0, [0])
        small = (batch[0][:, :2], batch[1][:, :2], batch[2][:, :1], batch[3][:, :1])
        expanded = {k: v[:1].repeat_interleave(p.B, dim=0) for k, v in st.params.items()}
        with torch.no_grad():
            res = run_episodes(
                p.net, small, p.update, p.learner.layer_params(expanded), weights, feedback, metrics=False,
                raise_on_divergence=False, method=self.meta.method, **p.learner.inner_kwargs(expanded),
            )  # fmt: skip
        return res.method

    def _inner(self, t: int, runs: list[int], params: dict[str, Tensor], grad: bool):
        """This rank's share of the episodes ``(run, k)`` of ``runs`` (all of them in a single process): the inner
        result (None for an empty share), the per-run leaves ``[len(runs), ...]``, each result row's run index
        into ``runs`` and the per-episode objective (None for an empty share), both detached. With ``grad`` each
        group's meta-gradient is taken as soon as the group has run, ``d(sum(objective) / B) / d leaves``, summed
        into the leaves' ``.grad``: only one group's adjoint records are held at a time, and its weights are
        still in the cache."""
        p = self.p
        share = rank_episodes(len(runs) * p.B, self.rank, self.world_size)  # flat episode index i * B + k
        rows = torch.tensor([j // p.B for j in share], dtype=torch.long, device=p.device)
        idx = torch.tensor(runs, device=p.device)
        leaves = {k: v.index_select(0, idx).detach().requires_grad_(grad) for k, v in params.items()}
        if not share:
            return None, leaves, rows, None
        mine = sorted({j // p.B for j in share})
        ks = [[j % p.B for j in share if j // p.B == i] for i in mine]
        batch, weights, feedback = p.episodes(t, [runs[i] for i in mine], ks=ks)
        results, objectives = [], []
        for g in self.groups(len(share)):  # one inner loop per group of episodes (meta.chunk)
            expanded = {k: v.index_select(0, rows[g]) for k, v in leaves.items()}
            part = tuple(x[g] for x in batch)
            with torch.set_grad_enabled(grad):
                res = run_episodes(
                    p.net,
                    part,
                    p.update,
                    p.learner.layer_params(expanded),
                    [w[g] for w in weights],
                    [f[g] for f in feedback],
                    divergence_bound=self.meta.divergence_bound,
                    check_every=self.meta.check_every,
                    method=self.meta.method,
                    checkpoint_every=self.meta.segment,
                    raise_on_divergence=False,
                    **p.learner.inner_kwargs(expanded),
                )
                objective = self.objective(res, part)
            if objective.requires_grad:
                (objective.sum() / p.B).backward(inputs=list(leaves.values()))
            objectives.append(objective.detach())
            results.append(_detached(res))
        return InnerResult.cat(results), leaves, rows, torch.cat(objectives)

    def groups(self, n: int) -> list[slice]:
        """The groups of this process's ``n`` episodes that run as one inner loop each: as few groups of at most
        ``meta.chunk`` episodes as will do (default 8 on a CPU, where a group's weights then stay in the cache; all
        at once on a GPU), their sizes differing by at most one (10 episodes: 5 + 5, not 8 + 2)."""
        chunk = self.meta.chunk or (n if self.p.device.type == "cuda" else _CPU_CHUNK)
        k = -(-n // chunk)
        bounds = [i * n // k for i in range(k + 1)]
        return [slice(lo, hi) for lo, hi in zip(bounds, bounds[1:])]

    def _diverged_runs(self, res: InnerResult | None, objective: Tensor | None, rows: Tensor, n: int) -> Tensor:
        """``(n,)`` bool: whether an episode of the run diverged (or gave a non-finite loss) on any rank."""
        p = self.p
        div = torch.zeros(n, dtype=p.dtype, device=p.device)
        if res is not None:
            bad = res.diverged | ~torch.isfinite(res.loss) | ~torch.isfinite(objective)
            div = div.index_add(0, rows, bad.to(p.dtype))
        if self.world_size > 1:
            all_reduce_sum([div])
        return div > 0

    def _gathered(self, res: InnerResult | None, objective: Tensor | None):
        """The per-episode metrics (and objective values) of every rank's share, in meta-batch order."""
        fields = ("loss", "accuracy", "diverged", "diverged_step", "diverged_layer", "angles", "ew")
        if self.world_size == 1:
            return SimpleNamespace(**{f: getattr(res, f) for f in fields}, objective=objective)
        mine = None if res is None else [getattr(res, f).detach().cpu() for f in fields] + [objective.detach().cpu()]
        parts = [x for x in gather_objects(mine) if x is not None]
        return SimpleNamespace(**{f: torch.cat([x[i] for x in parts]) for i, f in enumerate((*fields, "objective"))})

    def step(self, st: TrainState) -> list[dict]:
        """One meta-step for every running run; returns the metric rows."""
        meta, p = self.meta, self.p
        t0 = time.perf_counter()
        t = st.t
        active = [s for s in range(len(p.seeds)) if not bool(st.stopped[s])]
        results: dict[int, tuple[SimpleNamespace, int]] = {}
        bad: set[int] = set()
        current = active
        while current:  # diverged runs are dropped and the rest recomputed: NaNs would poison the gradient
            res, leaves, rows, objective = self._inner(t, current, st.params, grad=True)
            div = self._diverged_runs(res, objective, rows, len(current))
            full = self._gathered(res, objective)
            results.update({s: (full, i) for i, s in enumerate(current)})
            new_bad = {s for s, d in zip(current, div.tolist()) if d}
            if not new_bad:
                break
            bad |= new_bad
            current = [s for s in current if s not in new_bad]
            del res, leaves, objective
        grads: dict[int, dict[str, Tensor]] = {}
        grad_norm: dict[int, float] = {}
        if current:  # the meta-loss's gradient is in the leaves' .grad (_inner); a rank without episodes has zeros
            l1 = p.learner.l1(leaves)
            if l1 is not None and meta.l1 > 0 and meta.l1_mode == "subgradient" and self.rank == 0:  # counted once
                (meta.l1 * l1.sum()).backward(inputs=list(leaves.values()))
            g = {k: torch.zeros_like(v) if v.grad is None else v.grad for k, v in leaves.items()}
            if self.world_size > 1:  # every rank now holds the meta-gradient of the whole meta-batch
                all_reduce_sum(g.values())
            norms = torch.sqrt(sum(gi.flatten(1).pow(2).sum(1) for gi in g.values()))
            for i, s in enumerate(current):
                gs = {k: gi[i] for k, gi in g.items()}
                if not all(bool(torch.isfinite(x).all()) for x in gs.values()):
                    continue
                grads[s] = gs
                grad_norm[s] = float(norms[i])
            del leaves
        with torch.no_grad():  # the L1 term of the coefficients the episodes ran with (before the update)
            l1_before = p.learner.l1(st.params)
        updated = self._adam(st, grads)
        rows = []
        seconds = time.perf_counter() - t0
        for s in active:
            r, i = results[s]
            skipped = s not in updated
            if skipped:
                st.skips[s] += 1
                if int(st.skips[s]) >= meta.max_skips:
                    st.stopped[s] = True
                    st.stop_step[s] = t + 1
            else:
                st.skips[s] = 0
            l1 = float(meta.l1 * l1_before[s]) if l1_before is not None else 0.0
            rows.append(self._row(st, t, s, r, i, skipped, grad_norm.get(s, float("nan")), l1, seconds))
        st.t = t + 1
        return rows

    def _adam(self, st: TrainState, grads: dict[int, dict[str, Tensor]]) -> set[int]:
        """Per-run Adam (and proximal L1) on the runs in ``grads``; returns the runs actually updated (a run whose
        new parameters would not be finite keeps its old state)."""
        if not grads:
            return set()
        meta = self.meta
        runs = sorted(grads)
        dev = self.p.device
        idx = torch.tensor(runs, device=dev)
        if meta.clip is not None:
            norm = torch.stack([torch.sqrt(sum(x.pow(2).sum() for x in grads[s].values())) for s in runs])
            scale = torch.clamp(meta.clip / (norm + 1e-6), max=1.0)
        steps = st.steps[idx] + 1
        new: dict[str, tuple[Tensor, Tensor, Tensor]] = {}
        ok = torch.ones(len(runs), dtype=torch.bool, device=dev)
        for k in st.params:
            g = torch.stack([grads[s][k] for s in runs]).to(st.params[k].dtype)
            shape = (-1, *([1] * (g.dim() - 1)))
            clipped = scale.to(g.dtype).reshape(shape) if meta.clip is not None else 1.0
            g = g * clipped
            lr = meta.lr * self.lr_scale()[k].to(g.dtype)
            l1 = None  # the proximal threshold's lambda, clipped with the loss gradient (as the subgradient's is)
            if self.p.learner.proximal(k) and meta.l1_mode == "proximal" and meta.l1 > 0:
                l1 = meta.l1 * clipped
            p, m, v = adam_step(st.params[k][idx], g, st.m[k][idx], st.v[k][idx], steps.to(g.dtype).reshape(shape),
                                lr, meta.betas, meta.eps, l1=l1)  # fmt: skip
            ok &= torch.isfinite(p).flatten(1).all(1) & torch.isfinite(v).flatten(1).all(1)
            new[k] = (m, v, p)
        keep = idx[ok]
        for k, (m, v, p) in new.items():
            st.m[k][keep] = m[ok]
            st.v[k][keep] = v[ok]
            st.params[k][keep] = p[ok]
        st.steps[keep] = steps[ok]
        return {s for s, o in zip(runs, ok.tolist()) if o}

    def _row(self, st, t, s, res, i: int, skipped: bool, grad_norm: float, l1: float, seconds: float):
        """The metrics row of run ``s`` at meta-step ``t`` (``res`` rows ``i*B .. (i+1)*B``)."""
        B = self.p.B
        sl = slice(i * B, (i + 1) * B)
        with torch.no_grad():
            query = float(res.loss[sl].detach().double().mean())
            objective = float(res.objective[sl].detach().double().mean())
            acc = float(res.accuracy[sl].double().mean())
        row = {
            "step": t + 1,
            "run": s,
            "seed": self.p.seeds[s],
            "meta_loss": objective + l1,
            "query_loss": query,
            "l1": l1,
            "meta_accuracy": acc,
            "skipped": int(skipped),
            "diverged": int(res.diverged[sl].sum()),
            **_divergence_columns(res, sl),
            "grad_norm": grad_norm,
        }
        if res.angles.numel():
            ang = res.angles[sl].double()
            for layer in range(ang.shape[1]):
                row[f"angle.{layer + 1}"] = float(torch.nanmean(ang[:, layer])) if ang.shape[0] else float("nan")
        if res.ew.numel():
            ew = res.ew[sl].double()
            for layer in range(ew.shape[1]):
                row[f"ew.{layer + 1}"] = float(torch.nanmean(ew[:, layer])) if ew.shape[0] else float("nan")
        row.update(self.p.learner.columns(st.params, s))
        row["seconds"] = seconds
        return row


def _detached(res: InnerResult) -> InnerResult:
    """``res`` without autograd history (its meta-gradient is taken): the metrics the trainer reads."""
    plain = {f.name: getattr(res, f.name) for f in dataclasses.fields(res)}
    out = {k: v.detach() if isinstance(v, Tensor) else v for k, v in plain.items()}
    out["weights"] = [w.detach() for w in res.weights]
    out["feedback"] = [f.detach() for f in res.feedback]
    out["states"] = [{k: v.detach() for k, v in st.items()} for st in res.states]
    return InnerResult(**out)


_CPU_CHUNK = 8
"""Episodes per inner-loop call on a CPU by default (``meta.chunk``): the weights of 20 episodes of the paper's network
outgrow the cache; in groups of 6-7, F^bio's 600 x 20 protocol takes about a sixth less time and a quarter less
memory than in one call on a 2-core machine (``experiments/bench_protocol.py``, ``results/bench_protocol.txt``)."""


def _divergence_columns(res, sl: slice) -> dict[str, float]:
    """Where the first diverged episode among a run's rows ``sl`` diverged: ``k``, inner step, layer (1-based)."""
    flags = res.diverged[sl]
    if not bool(flags.any()):
        return {"diverged_k": math.nan, "diverged_inner_step": math.nan, "diverged_layer": math.nan}
    j = int(flags.nonzero()[0, 0])
    return {
        "diverged_k": j,
        "diverged_inner_step": int(res.diverged_step[sl][j]) + 1,
        "diverged_layer": int(res.diverged_layer[sl][j]) + 1,
    }
