r"""The estimator: :class:`RuleSearch` (``fit``, reports, exports) and :func:`discover`, the main job.

Run directory
-------------
With ``out=`` (or ``name=``) a :class:`~rulesearch.io.runs.RunDir` records the resolved config, a manifest,
``metrics.csv`` (one row per meta-step and run: ``step`` (1-based, the state after that step), ``run``,
``seed``, ``meta_loss``, ``query_loss``, ``l1``, ``meta_accuracy``, ``skipped``, ``diverged``, ``grad_norm``,
``angle.1..`` (alignment angles of the hidden layers), ``ew.1..`` (weight orthonormality E_W per layer),
``theta.<term>`` (after the step), ``fb_theta.<term>`` (plastic feedback), ``seconds``),
checkpoints every ``checkpoint_every`` steps, and at the end ``rule.json``, ``rule.tex``, ``summary.md`` and
``figures/``; ``finished.json`` is written last. Resuming (``resume=True``) continues from the newest readable
checkpoint and is bitwise identical to an uninterrupted run on the same device and thread count.

Examples
--------
>>> from rulesearch import RuleSearch, TaskConfig, NetworkConfig, MetaConfig
>>> search = RuleSearch(
...     rule="ehebb",
...     network=NetworkConfig(sizes=(8, 6, 3), feedback="fa"),
...     task=TaskConfig(dataset="teacher", options={"n_in": 8, "n_classes": 3}, M=3, K=4, Q=2),
...     meta=MetaConfig(episodes=3, runs=2, l1=0.0, compare=False, dtype="float64"),
...     progress=False,
... ).fit()
>>> search.theta_.shape
torch.Size([2, 2])
>>> len(search.history_)
6

References
----------
Shervani-Tabar, N. & Rosenbaum, R. Meta-learning biologically plausible plasticity rules with random feedback
pathways. Nat. Commun. 14, 1805 (2023).
"""

from __future__ import annotations

import dataclasses
import datetime
import math
import os
import sys
import warnings
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import sympy as sp
import torch
from torch import Tensor

from ..errors import ConfigError, DivergenceError, NotFittedError, RunDirectoryError
from ..inner import run_episodes
from ..io.runs import RunDir, run_path
from ..io.stats import bootstrap_ci
from ..lang.export import round_floats
from ..lang.rule import NetworkRule, Rule
from ..networks.feedforward import Network, stack_episodes
from ..neural import NeuralRule
from .configs import DiscoverConfig, MetaConfig, NetworkConfig, NeuralConfig, TaskConfig, main_job_config
from .distributed import (
    broadcast_object,
)
from .learners import _FB, PlasticFeedback, _term_ms
from .objective import Objective
from .problem import Problem
from .report import _with_feedback, coefficient_table, rule_latex, rule_markdown
from .rules import _is_rule_file, _plain, _strip_values, load_rule, pseudo_gradient_lr, resolve_rule, trained_rule_json
from .runtime import process_group, threads
from .trainer import Trainer, TrainState

__all__ = ["RuleSearch", "discover"]


def _as_config(value, cls, name: str):
    if value is None:
        return cls()
    if isinstance(value, cls):
        return value
    if isinstance(value, Mapping):  # validated as a section of DiscoverConfig, so errors name 'network.feedback'
        return getattr(DiscoverConfig.from_dict({name: dict(value)}), name)
    if cls is NetworkConfig and isinstance(value, Network):
        return NetworkConfig(**{f.name: getattr(value, f.name, f.default) for f in dataclasses.fields(NetworkConfig)})
    raise ConfigError(f"{name} must be a {cls.__name__} (or a dict of its keys); received {type(value).__name__}.")


class RuleSearch:
    r"""Meta-learn a plasticity rule: ``RuleSearch(rule, network, task, meta).fit()``.

    Parameters
    ----------
    rule : str, Rule, NetworkRule, NeuralRule, Pool or Grammar
        What to meta-learn (see :func:`resolve_rule`); default ``"pool"`` (the paper's 10 terms).
    network : NetworkConfig, Network or dict, optional
        The inner-loop network; default :class:`NetworkConfig` (softplus beta=10, feedback alignment).
    task : TaskConfig or dict, optional
        The tasks; default digits, 5-way, K=50, Q=10.
    meta : MetaConfig or dict, optional
        The outer loop; default :class:`MetaConfig`.
    neural : NeuralConfig or dict, optional
        The neural rule's structure when ``rule="neural"``.
    terms : sequence of str, optional
        Keep only these terms of a linear rule.
    out : path, optional
        Run directory. Default: ``./runs/<name>`` when ``name`` is given, else no run directory.
    name : str, optional
        Run name (``./runs/<name>``).
    resume : bool
        Continue the run in ``out`` from its newest checkpoint (bitwise identical to an uninterrupted run).
    progress : bool
        Show a tqdm progress bar with the live meta-accuracy.
    callback : callable, optional
        ``callback(step, rows)`` after every meta-step (after its checkpoint, if any); called on every rank.
    distributed : bool, optional
        Data-parallel over ``torchrun`` processes: default (None) when launched by torchrun (``WORLD_SIZE`` > 1)
        or inside an initialized ``torch.distributed`` group; False: every process fits alone.
    objective : Objective, optional
        The meta-objective (default :class:`~rulesearch.train.QueryLoss`, the paper's query loss); its ``repr`` is
        recorded in the run's manifest (a resumed fit must be given the same one).

    Attributes
    ----------
    theta_ : Tensor, shape (S, R) or (S, L, R)
        Learned coefficients of every run (linear rules; a list per group for a :class:`NetworkRule`).
    params_ : dict of Tensor
        Learned parameters of every run, each with a leading run dimension ``S``.
    rule_ : Rule, NetworkRule or NeuralRule
        The learned rule: mean coefficients over the reported runs (linear), the first reported run's parameters
        (neural).
    rules_ : list
        The learned rule of every run.
    intervals_ : array, shape (R, 2) or (L, R, 2), or None
        95% bootstrap intervals of the coefficients across the reported runs (linear rules, two or more of them).
    stopped_runs_, reported_runs_ : list of int
        Runs stopped on divergence (their coefficients froze where they diverged), and the others: the reported
        rule, its intervals, ``rule.json`` and the first/last meta-accuracies use the reported runs only.
    feedback_rule_ : Rule or None
        Under plastic feedback: the feedback rule with its mean learned (or fixed) coefficients over runs.
    feedback_theta_ : Tensor, shape (S, R_fb), or None
        Under plastic feedback: every run's feedback-rule coefficients.
    history_ : pandas.DataFrame
        One row per meta-step and run (the columns of ``metrics.csv``).
    summary_ : dict
        Mean meta-accuracy of the first and last 10% of meta-steps, the f0 comparison, the stopped and reported
        runs, and ``divergences``: per stopped run the meta-step it stopped at and where its last diverged episode
        went wrong (``diverged_k``, ``diverged_inner_step``, ``diverged_layer``).
    run_ : RunDir or None
        The run directory (None on the other ranks of a data-parallel fit: rank 0 writes it).
    world_ : tuple of int
        ``(rank, world_size)`` of the fit; ``(0, 1)`` in a single process.
    n_runs_, n_steps_ : int
        Runs and meta-steps trained.

    Examples
    --------
    >>> from rulesearch.train import RuleSearch, MetaConfig, TaskConfig
    >>> search = RuleSearch(rule="f0", meta=MetaConfig(episodes=300, runs=5, l1=0.0),
    ...                     task=TaskConfig(dataset="emnist", options={"per_class": 400}), name="fig3-fa")
    >>> # search.fit(); print(search)  # 784-170-130-100-70-47, fa, 300 episodes x 5 runs batched
    """

    def __init__(
        self,
        rule="pool",
        network=None,
        task=None,
        meta=None,
        neural=None,
        *,
        terms: Sequence[str] | None = None,
        out: str | os.PathLike | None = None,
        name: str | None = None,
        resume: bool = False,
        progress: bool = True,
        callback: Callable | None = None,
        distributed: bool | None = None,
        objective: Objective | None = None,
    ):
        self.rule = rule
        self.network = network
        self.task = task
        self.meta = meta
        self.neural = neural
        self.terms = terms
        self.out = out
        self.name = name
        self.resume = resume
        self.progress = progress
        self.callback = callback
        self.distributed = distributed
        self.objective = objective

    # ---- sklearn-style parameters -------------------------------------------------------------------------
    _PARAMS = (
        "rule", "network", "task", "meta", "neural", "terms", "out", "name", "resume", "progress", "callback",
        "distributed", "objective",
    )  # fmt: skip

    def get_params(self, deep: bool = False) -> dict:
        return {k: getattr(self, k) for k in self._PARAMS}

    def set_params(self, **params) -> RuleSearch:
        for k, v in params.items():
            if k not in self._PARAMS:
                raise ConfigError(f"RuleSearch has no parameter {k!r}; parameters: {', '.join(self._PARAMS)}.")
            setattr(self, k, v)
        return self

    def clone(self) -> RuleSearch:
        """An unfitted copy with the same parameters."""
        return type(self)(**self.get_params())

    @classmethod
    def from_config(cls, config: DiscoverConfig | Mapping, **kwargs) -> RuleSearch:
        """A search from a :class:`DiscoverConfig` (or its dict); ``kwargs`` as in the constructor."""
        cfg = config if isinstance(config, DiscoverConfig) else DiscoverConfig.from_dict(config)
        rule = cfg.rule_json if cfg.rule_json is not None else cfg.rule
        if isinstance(rule, Mapping):
            rule = load_rule(rule)
        return cls(rule, cfg.network, cfg.task, cfg.meta, cfg.neural, terms=cfg.terms, **kwargs)

    # ---- resolution -----------------------------------------------------------------------------------------
    def config(self) -> DiscoverConfig:
        """The fully resolved configuration (what ``config.yaml`` holds)."""
        neural = _as_config(self.neural, NeuralConfig, "neural")
        rule_name, rule_json = "pool", None
        if isinstance(self.rule, str) and not _is_rule_file(self.rule):
            rule_name = self.rule
        else:
            obj = resolve_rule(self.rule, None, neural)
            if isinstance(obj, NeuralRule):
                rule_name = "neural"
                neural = NeuralConfig.of(obj)
            else:
                rule_name = getattr(obj, "name", type(obj).__name__)
                rule_json = _strip_values(trained_rule_json(obj))
        return DiscoverConfig(
            rule=rule_name,
            terms=tuple(self.terms) if self.terms else None,
            rule_json=rule_json,
            task=_as_config(self.task, TaskConfig, "task"),
            network=_as_config(self.network, NetworkConfig, "network"),
            meta=_as_config(self.meta, MetaConfig, "meta"),
            neural=neural,
        )

    def _run_path(self) -> Path | None:
        if self.out is not None:
            return Path(self.out)
        if self.name is not None:
            return run_path(self.name)
        return None

    # ---- fit --------------------------------------------------------------------------------------------------
    def fit(self) -> RuleSearch:
        """Meta-train; returns ``self`` with the fitted attributes set (see the class docstring).

        Raises
        ------
        ConfigError, DatasetError, InvalidRuleError
            A bad configuration (raised before any run directory is created).
        RunDirectoryError
            The run directory holds another run (pass ``resume=True`` to continue it).
        DivergenceError
            Every run stopped after ``max_skips`` consecutive diverged meta-steps (the run is not marked finished).
        """
        cfg = self.config()
        rule = resolve_rule(load_rule(cfg.rule_json) if cfg.rule_json else cfg.rule, cfg.terms, cfg.neural)
        meta = cfg.meta
        path = self._run_path()
        run = None
        with process_group(self.distributed, meta.device) as (device, ranks), threads(meta.threads):
            problem = Problem(cfg, rule, device)
            trainer = Trainer(problem, ranks, self.objective)
            state = trainer.fresh_state()
            inner_loop = trainer.validate(state)
            rows: list[dict] = []
            try:  # the run directory stays locked until the fit ends, however it ends
                if path is not None and trainer.rank == 0:
                    run = RunDir.create(
                        path,
                        cfg,
                        resume=self.resume,
                        lock=True,
                        seed=meta.seed,
                        device=meta.device,
                        manifest_extra={
                            "runs": meta.runs,
                            "seeds": problem.seeds,
                            "threads_requested": meta.threads,
                            "world_size": trainer.world_size,
                            "network_sizes": list(problem.net.sizes),  # from_run sizes the network without the data
                            "objective": repr(trainer.objective),
                            "inner_loop": inner_loop,  # native (C kernel), adjoint (torch) or autograd
                        },
                    )
                    if self.resume:
                        loaded = run.resume(map_location="cpu")
                        if loaded is not None:
                            state = TrainState.from_checkpoint(
                                loaded[1], state, problem.device, step=loaded[0], max_t=meta.episodes,
                                source=f"Checkpoint {run.checkpoint_path(loaded[0])}",
                            )  # fmt: skip
                            df = run.read_metrics()
                            rows = df.to_dict("records") if not df.empty else []
                if trainer.world_size > 1:  # every rank continues from rank 0's (resumed) state
                    checkpoint, rows = broadcast_object((state.to_checkpoint(), rows))
                    state = TrainState.from_checkpoint(checkpoint, state, problem.device)
                self.run_ = run
                self.world_ = ranks
                self._problem = problem
                self._fit_loop(trainer, state, rows, run)
            finally:
                if run is not None:
                    run.unlock()
        return self

    def _fit_loop(self, trainer: Trainer, state: TrainState, rows: list[dict], run: RunDir | None):
        meta = trainer.meta
        problem = trainer.p
        bar = None
        if self.progress and trainer.rank == 0:  # rank 0 of a data-parallel fit speaks for all
            from tqdm.auto import tqdm

            bar = tqdm(
                total=meta.episodes,
                initial=state.t,
                desc=f"discover {problem.rule.name}",
                unit="step",
                file=sys.stderr,
                dynamic_ncols=True,
            )
        try:
            while state.t < meta.episodes and not bool(state.stopped.all()):
                new = trainer.step(state)
                rows.extend(new)
                if run is not None:
                    run.append_metrics(new)
                stopped_now = [r["run"] for r in new if bool(state.stopped[r["run"]]) and r["skipped"]]
                done = state.t >= meta.episodes or bool(state.stopped.all())
                if run is not None and (state.t % meta.checkpoint_every == 0 or done or stopped_now):
                    run.save_checkpoint(state.t, state.to_checkpoint())
                for stop in _stops(new, stopped_now, state, problem.seeds) if trainer.rank == 0 else ():
                    warnings.warn(
                        f"{_stop_text(stop, meta.max_skips)}. It is left out of the reported rule. Lower meta.lr or "
                        f"the initial coefficients, use meta.clip, or raise meta.divergence_bound.",
                        RuntimeWarning,
                        stacklevel=3,
                    )
                if bar is not None:
                    recent = [r["meta_accuracy"] for r in rows[-10 * len(new) :] if not r["skipped"]]
                    bar.set_postfix(acc=f"{np.nanmean(recent):.3f}" if recent else "nan", refresh=False)
                    bar.update(1)
                if self.callback is not None:
                    self.callback(state.t, new)
        finally:
            if bar is not None:
                bar.close()
        self._set_fitted(state, rows, problem)
        if bool(state.stopped.all()):
            where = f" Metrics and the last good checkpoint are in {run.path}." if run is not None else ""
            stops = "; ".join(_stop_text(d, meta.max_skips) for d in self.summary_["divergences"])
            raise DivergenceError(
                f"Every run stopped: {stops}. No parameters were updated with NaN.{where} Lower meta.lr, "
                f"meta.theta0 or the initial coefficients, use meta.clip, or raise meta.divergence_bound."
            )
        if meta.compare and trainer.rank == 0:
            self.summary_.update(self._compare(state, problem))
        if run is not None:
            self._write_outputs(run)
            run.mark_finished(_plain(self.summary_))

    # ---- fitted state ---------------------------------------------------------------------------------------
    def _set_fitted(self, state: TrainState, rows: list[dict], problem: Problem):
        import pandas as pd

        learner = problem.learner
        params = {k: v.detach().cpu() for k, v in state.params.items()}
        S = len(problem.seeds)
        self.stopped_runs_ = [s for s in range(S) if bool(state.stopped[s])]
        # a stopped run's coefficients are frozen where it diverged: the reported rule is that of the others
        self.reported_runs_ = [s for s in range(S) if s not in self.stopped_runs_] or list(range(S))
        reported = {k: v[self.reported_runs_] for k, v in params.items()}
        self.params_ = params
        self.theta_ = None
        self.intervals_ = None
        if learner.linear:
            self.theta_ = params["theta"] if "theta" in params else [params[k] for k in learner.names]
            if len(self.reported_runs_) > 1:
                if "theta" in params:
                    _, lo, hi = bootstrap_ci(reported["theta"].double().numpy(), axis=0)
                    self.intervals_ = np.stack([lo, hi], -1)
                else:
                    self.intervals_ = [
                        np.stack(bootstrap_ci(reported[k].double().numpy(), axis=0)[1:], -1) for k in learner.names
                    ]
        self.rule_ = learner.trained(reported, None)
        self.rules_ = [learner.trained(params, s) for s in range(S)]
        self.feedback_rule_ = self.feedback_theta_ = None
        if isinstance(learner, PlasticFeedback):
            self.feedback_rule_ = learner.trained_feedback(reported, None)
            self.feedback_theta_ = torch.stack([learner.feedback_values(params, s) for s in range(S)])
        self.history_ = pd.DataFrame(rows)
        self.n_runs_ = S
        self.n_steps_ = state.t
        self.summary_ = self._summary(rows, state)

    def _check_fitted(self):
        if not hasattr(self, "rule_"):
            raise NotFittedError(
                "This RuleSearch is not fitted yet; call .fit() first (or RuleSearch.from_run(path) for a saved run)."
            )

    def _windows(self, n_steps: int) -> tuple[range, range]:
        n = max(1, int(round(0.1 * n_steps)))
        return range(0, n), range(max(0, n_steps - n), n_steps)

    def _summary(self, rows, state: TrainState) -> dict:
        meta = self._problem.cfg.meta
        first, last = self._windows(state.t)
        out: dict[str, Any] = {
            "steps": state.t,
            "runs": len(self._problem.seeds),
            "window": len(first),
            "stopped_runs": self.stopped_runs_,
            "reported_runs": self.reported_runs_,
            "divergences": _stops(rows, self.stopped_runs_, state, self._problem.seeds),
        }

        def mean_acc(window, skipped_as_failed: bool = False):
            """Mean meta-accuracy of the reported runs over ``window``; a skipped (diverged) meta-step is left out,
            or counted as accuracy 0."""
            vals = [
                0.0 if int(r.get("skipped", 0)) else r["meta_accuracy"]
                for r in rows
                if (int(r["step"]) - 1) in window
                and r["run"] in self.reported_runs_
                and (skipped_as_failed or not int(r.get("skipped", 0)))
            ]
            return float(np.nanmean(vals)) if vals else float("nan")

        out["rule_first"] = mean_acc(first)
        out["rule_last"] = mean_acc(last)
        out["rule_first_skips_failed"] = mean_acc(first, skipped_as_failed=True)
        out["rule_last_skips_failed"] = mean_acc(last, skipped_as_failed=True)
        out["skipped_steps"] = sum(int(r.get("skipped", 0)) for r in rows)
        out["diverged_episodes"] = sum(int(r.get("diverged", 0)) for r in rows)
        out["meta_steps_run"] = len(rows)
        out["meta_batch"] = meta.meta_batch
        return out

    def compare_lr(self) -> float:
        """Learning rate of the f0 comparison: ``meta.compare_lr``, else the learned coefficient of the rule's
        :math:`-e_i x_j` term (mean over runs and layers), else ``meta.theta0``."""
        self._check_fitted()
        meta = self._problem.cfg.meta
        if meta.compare_lr is not None:
            return meta.compare_lr
        lr = pseudo_gradient_lr(self.rule_)
        return lr if lr is not None and lr > 0 else meta.theta0

    def _compare(self, state: TrainState, problem: Problem) -> dict:
        """f0 under fa and under bp on the episodes of the first and last 10% of meta-steps (no gradients), each
        mode at its learning rate tuned on held-out episodes (``meta.compare_tune``; the steps after the last)."""
        meta = problem.cfg.meta
        base = self.compare_lr()
        first, last = self._windows(state.t)
        runs = [s for s in range(len(problem.seeds)) if not bool(state.stopped[s])]
        out: dict[str, Any] = {"compare_lr": base, "compare_tune": meta.compare_tune}
        held_out = list(range(state.t, state.t + meta.compare_tune))
        for mode in ("fa", "bp"):
            net = dataclasses.replace(getattr(problem.net, "base", problem.net), feedback=mode)  # PC: its Network
            lr = base
            if held_out and runs:
                grid = [base * f for f in _TUNE_FACTORS]
                scores = [float(self._f0_accuracy(problem, net, held_out, runs, g).mean()) for g in grid]
                lr = grid[int(np.nanargmax(scores))] if np.isfinite(scores).any() else base
            out[f"compare_lr_{mode}"] = lr
            for label, window in (("first", first), ("last", last)):
                acc = self._f0_accuracy(problem, net, list(window), runs, lr)
                out[f"f0_{mode}_{label}"] = float(acc.mean()) if acc.numel() else float("nan")
        return out

    @staticmethod
    def _f0_accuracy(problem: Problem, net: Network, steps: list[int], runs: list[int], lr: float) -> Tensor:
        """Query accuracy of f0 at learning rate ``lr`` on the episodes of ``steps`` x ``runs``; a diverged episode
        counts as 0."""
        from ..inner import f0 as f0_update

        theta = torch.tensor(lr, dtype=problem.dtype, device=problem.device)
        accs = []
        for chunk in _chunks(steps, max(1, 64 // max(1, len(runs) * problem.B))):
            batch, weights, feedback = problem.episodes(chunk, runs, net)
            with torch.no_grad():
                res = run_episodes(
                    net, batch, f0_update, theta, weights, feedback, metrics=False,
                    divergence_bound=problem.cfg.meta.divergence_bound, raise_on_divergence=False,
                )  # fmt: skip
            accs.append(torch.where(res.diverged, torch.zeros_like(res.accuracy), res.accuracy).double().cpu())
        return torch.cat(accs) if accs else torch.zeros(0, dtype=torch.float64)

    def _write_outputs(self, run: RunDir):
        from ..io.plots import plot_run

        run.write_json("rule.json", self.to_json())
        try:
            tex = self.to_latex()
        except (TypeError, NotImplementedError) as err:  # a LaTeX printer gap must not cost the finished run
            warnings.warn(f"rule.tex: LaTeX export failed ({type(err).__name__}: {err}).", RuntimeWarning, stacklevel=2)
            tex = f"% LaTeX export failed: {type(err).__name__}: {err}\n% {self.formula()}"
        run.write_text("rule.tex", tex + "\n")
        run.write_text("summary.md", self.report(markdown=True) + "\n")
        plot_run(run, references=self._references())

    def _references(self) -> dict[str, float]:
        """Horizontal reference lines of the meta-accuracy figure: f0 under fa and bp (last 10% of meta-steps, at the
        tuned learning rates) and chance."""
        s = self.summary_
        refs = {f"f0 ({m}), last 10%": s[f"f0_{m}_last"] for m in ("fa", "bp") if f"f0_{m}_last" in s}
        refs[f"chance (1/{self._problem.cfg.task.M})"] = 1.0 / self._problem.cfg.task.M
        return refs

    def _run_values(self, runs: Sequence[int]) -> list:
        """The parameters of each run in ``runs``, as ``rule.json`` stores them."""
        learner = self._problem.learner if hasattr(self, "_problem") else None
        if isinstance(self.rule_, NeuralRule):
            return [{k: v[s] for k, v in self.params_.items() if k != _FB} for s in runs]
        if learner is not None and learner.kind == "groups":
            return [[self.params_[k][s] for k in learner.names] for s in runs]
        return [self.params_["theta"][s] for s in runs]

    # ---- reload -----------------------------------------------------------------------------------------------
    @classmethod
    def from_run(cls, path: str | os.PathLike, *, progress: bool = False) -> RuleSearch:
        """Reload a run directory: its config, the newest checkpoint's parameters and the metrics.

        A finished run gives the final result; an unfinished one the state at its newest checkpoint. No data is
        read: the learner needs only the layer count, the network its sizes (from the config or the manifest).
        :meth:`term_shares` loads the dataset, as does :meth:`report` of a run whose manifest predates the sizes.
        """
        run = RunDir.open(path)
        cfg = DiscoverConfig.from_dict(run.config())
        search = cls.from_config(cfg, out=run.path, progress=progress)
        rule = resolve_rule(load_rule(cfg.rule_json) if cfg.rule_json else cfg.rule, cfg.terms, cfg.neural)
        sizes = run.manifest().get("network_sizes")  # absent in runs made before it was recorded
        problem = Problem(cfg.replace(**{"meta.device": "cpu"}), rule, sizes=sizes)  # on the CPU, whatever trained it
        state = Trainer(problem).fresh_state()
        loaded = run.load_checkpoint(map_location="cpu")
        if loaded is None:
            raise RunDirectoryError(f"Run {str(run.path)!r} has no checkpoint yet; nothing to load.")
        state = TrainState.from_checkpoint(
            loaded[1], state, problem.device, step=loaded[0], max_t=cfg.meta.episodes,
            source=f"Checkpoint {run.checkpoint_path(loaded[0])}",
        )  # fmt: skip
        df = run.read_metrics()
        rows = [r for r in (df.to_dict("records") if not df.empty else []) if r["step"] <= state.t]
        search.run_ = run
        search.world_ = (0, 1)
        search._problem = problem
        search._set_fitted(state, rows, problem)
        if run.is_finished:
            search.summary_.update({k: v for k, v in run.summary().items() if k not in search.summary_})
        return search

    def term_shares(self) -> Tensor:
        r"""Each term's share of the learned update, per run ``(S, R)``, float64:
        :math:`c_r = \sum_{t, \ell} \mathrm{rms}(\theta_r F^r_{t\ell}) / \sum_{r'} (\ldots)` over the online
        steps and layers of a fresh episode of each run (meta-step index = the steps trained, ``k = 0``) under its
        final coefficients. Raw coefficients are not comparable across terms whose scales differ by orders of
        magnitude (``-W`` vs ``e x^T``); the shares are. Needs one coefficient vector per run (a linear rule with
        shared coefficients, fixed feedback)."""
        self._check_fitted()
        p = self._problem
        if not (p.learner.linear and torch.is_tensor(self.theta_) and self.theta_.dim() == 2) or isinstance(
            p.learner, PlasticFeedback
        ):
            raise ConfigError(
                "term_shares needs a linear rule with one coefficient vector per run (theta_ of shape (runs, terms)) "
                "and fixed feedback; per-layer, grouped, neural and plastic-feedback rules have no single share per "
                "term."
            )
        theta = self.theta_.detach().to(torch.float64).cpu()
        t = int(self.history_["step"].max())
        batch, weights, feedback = stack_episodes(p.sampler, p.net, [(seed, t, [0]) for seed in p.seeds], torch.float64)
        eye = torch.eye(theta.shape[1], dtype=torch.float64)
        acc = torch.zeros_like(theta)

        def observe(step, layer, signals, dW):
            acc.add_(_term_ms(p.update, eye, signals).sqrt() * theta.abs())

        with torch.no_grad():
            run_episodes(p.net, batch, p.update, theta, weights, feedback, observe=observe, metrics=False,
                         raise_on_divergence=False)  # fmt: skip
        return acc / acc.sum(1, keepdim=True)

    # ---- exports and display ----------------------------------------------------------------------------------
    def _intervals(self):
        """Intervals normalized for the export functions: ``(R, 2)`` for a Rule, a list per group otherwise."""
        ivs = self.intervals_
        if ivs is None or isinstance(self.rule_, Rule):
            return ivs
        if isinstance(ivs, np.ndarray) and ivs.ndim == 3:
            return list(ivs)
        return ivs

    def to_latex(self, precision: int = 3) -> str:
        """The learned rule as LaTeX, with a booktabs coefficient table (mean and 95% interval across runs)."""
        self._check_fitted()
        text = rule_latex(self.rule_, self._intervals(), precision)
        return _with_feedback(text, self.feedback_rule_, "latex", precision)

    def to_markdown(self, precision: int = 4) -> str:
        """The coefficient table as Markdown (with 95% intervals across runs)."""
        self._check_fitted()
        text = rule_markdown(self.rule_, self._intervals(), precision)
        return _with_feedback(text, self.feedback_rule_, "markdown", precision)

    def to_json(self) -> dict:
        """The learned rule as JSON: the reported runs' values under ``runs`` (the plastic feedback rule under
        ``feedback_rule``); runs stopped on divergence are left out of the values, ``runs`` and ``intervals`` and
        listed under ``stopped_runs`` (where they diverged, and their frozen parameters)."""
        self._check_fitted()
        kept = self.reported_runs_
        out = trained_rule_json(self.rule_, runs=self._run_values(kept), intervals=self.intervals_)
        if self.feedback_rule_ is not None:
            out["feedback_rule"] = trained_rule_json(self.feedback_rule_, runs=self.feedback_theta_[kept])
        if self.stopped_runs_:
            frozen = self._run_values(self.stopped_runs_)
            out["stopped_runs"] = [{**d, "parameters": _plain(v)} for d, v in zip(self.summary_["divergences"], frozen)]
        return out

    def coefficient_table(self, precision: int = 4) -> str:
        """Plain-text table of the learned coefficients: term, locality, value, 95% interval across runs."""
        self._check_fitted()
        text = coefficient_table(self.rule_, self._intervals(), precision)
        return _with_feedback(text, self.feedback_rule_, "table", precision)

    def formula(self, precision: int = 3) -> str:
        """The learned update as plain text, e.g. ``dW = -0.01*err*pre + ...``."""
        self._check_fitted()
        rule = self.rule_
        if isinstance(rule, NeuralRule):
            return rule.describe()
        groups = rule.groups if isinstance(rule, NetworkRule) else [((), rule)]
        out = []
        for layers, r in groups:
            expr = sp.sstr(round_floats(r.sympy(), precision))  # the digits of rule.tex
            prefix = f"layers {', '.join(str(i + 1) for i in layers)}: " if layers else ""
            out.append(f"{prefix}dW_ij = {expr}")
        return _with_feedback("\n".join(out), self.feedback_rule_, "formula", precision)

    def report(self, markdown: bool = False) -> str:
        """What ``rulesearch discover`` prints: the rule, its coefficients, first/last 10% meta-accuracy beside
        f0 under fa and bp on the same tasks, and the run directory."""
        self._check_fitted()
        s = self.summary_
        n = len(self.reported_runs_)
        runs = f"mean of {n} runs" if n > 1 else "1 run"
        if self.stopped_runs_:
            runs = f"{'mean of ' if n > 1 else ''}{n} of {self.n_runs_} runs; {len(self.stopped_runs_)} stopped"
        lines = [f"Discovered rule ({runs}, {self.n_steps_} meta-steps):"]
        lines += ["  " + ln for ln in self.formula().split("\n")] + [""]
        table = self.coefficient_table()
        lines += ["  " + ln for ln in table.split("\n")] + [""]
        w = s.get("window", 0)
        fb = self._problem.net.feedback if hasattr(self, "_problem") else "?"
        hdr = f"{'meta-accuracy':<22} {'rule (' + fb + ')':>12} {'f0 (fa)':>9} {'f0 (bp)':>9}"
        lines.append(hdr)
        for label in ("first", "last"):
            name = f"{label} 10% ({w} steps)"
            vals = [s.get(f"rule_{label}"), s.get(f"f0_fa_{label}"), s.get(f"f0_bp_{label}")]
            cells = [f"{v:>9.3f}" if isinstance(v, float) and math.isfinite(v) else f"{'-':>9}" for v in vals]
            lines.append(f"{name:<22} {cells[0]:>12} {cells[1]} {cells[2]}")
        if "compare_lr_fa" in s:
            tuned = (
                f"tuned over {min(_TUNE_FACTORS):g}x..{max(_TUNE_FACTORS):g}x of {s['compare_lr']:.4g} on "
                f"{s['compare_tune']} held-out episodes per run"
                if s.get("compare_tune")
                else "untuned: the rule's learned -e_i x_j coefficient or meta.compare_lr"
            )
            edge = [
                m
                for m in ("fa", "bp")
                if s.get("compare_tune")
                and any(
                    math.isclose(s[f"compare_lr_{m}"], s["compare_lr"] * f)
                    for f in (min(_TUNE_FACTORS), max(_TUNE_FACTORS))
                )
            ]
            if edge:
                tuned += f"; {' and '.join(edge)} at the grid's edge"
            lines.append(
                f"f0 learning rates: fa {s['compare_lr_fa']:.4g}, bp {s['compare_lr_bp']:.4g} ({tuned}); "
                f"same tasks and initial weights; chance {1 / self._problem.cfg.task.M:.3f}"
            )
        if s.get("skipped_steps"):
            lines.append(
                f"skipped (diverged) meta-steps: {s['skipped_steps']} of {s['meta_steps_run']} (diverged episodes: "
                f"{s['diverged_episodes']}); left out of the accuracies above; counted as 0 they give first "
                f"{s['rule_first_skips_failed']:.3f}, last {s['rule_last_skips_failed']:.3f}"
            )
        if s.get("divergences"):
            lines.append("left out of the rule, its intervals and the accuracies (stopped on divergence):")
            skips = self._problem.cfg.meta.max_skips if hasattr(self, "_problem") else None
            lines += [f"  {_stop_text(d, skips)}" for d in s["divergences"]]
        if getattr(self, "run_", None) is not None:
            lines.append(f"run directory: {self.run_.path}")
        text = "\n".join(lines)
        return f"```\n{text}\n```" if markdown else text

    def __repr__(self) -> str:
        if not hasattr(self, "rule_"):
            name = self.rule if isinstance(self.rule, str) else getattr(self.rule, "name", type(self.rule).__name__)
            return f"RuleSearch(rule={name!r}, unfitted)"
        return f"RuleSearch(rule={self.rule_.name!r}, runs={self.n_runs_}, steps={self.n_steps_})\n" + (
            self.formula() + "\n" + self.coefficient_table()
        )


_TUNE_FACTORS = (0.1, 0.3, 1.0, 3.0, 10.0)
"""Multiples of the base learning rate over which the f0 comparison is tuned (``meta.compare_tune``)."""


def _stops(rows: Sequence[Mapping], runs: Sequence[int], state: TrainState, seeds: Sequence[int]) -> list[dict]:
    """Per stopped run in ``runs``: its seed, the meta-step it stopped at and where its last skipped meta-step's first
    diverged episode went wrong (``k``, inner step, layer; None for a non-finite loss or gradient alone)."""

    def as_int(v):
        return None if v is None or (isinstance(v, float) and math.isnan(v)) or v == "" else int(v)

    out = []
    for s in runs:
        last = next((r for r in reversed(rows) if int(r["run"]) == s and int(r.get("skipped", 0))), {})
        out.append(
            {
                "run": s,
                "seed": seeds[s],
                "meta_step": int(state.stop_step[s]),
                **{k: as_int(last.get(k)) for k in ("diverged_k", "diverged_inner_step", "diverged_layer")},
            }
        )
    return out


def _stop_text(stop: Mapping, skips: int | None) -> str:
    """One line on a stopped run, e.g. ``run 1 (seed 1) stopped at meta-step 4 ...``."""
    after = f" after {skips} consecutive diverged meta-steps" if skips else ""
    text = f"run {stop['run']} (seed {stop['seed']}) stopped at meta-step {stop['meta_step']}{after}"
    if stop.get("diverged_k") is None:
        return text + " (non-finite meta-loss or meta-gradient)"
    return (
        f"{text} (episode k={stop['diverged_k']} diverged at inner step {stop['diverged_inner_step']}, "
        f"layer {stop['diverged_layer']})"
    )


def _chunks(items: list, n: int) -> list[list]:
    return [items[i : i + n] for i in range(0, len(items), n)]


def discover(
    config: DiscoverConfig | Mapping | None = None,
    *,
    out: str | os.PathLike | None = None,
    name: str | None = None,
    resume: bool = False,
    progress: bool = True,
    distributed: bool | None = None,
) -> RuleSearch:
    """Run the main job (``rulesearch discover``): :class:`RuleSearch` from a config, fitted.

    The run directory is ``out``, else ``./runs/<name>``, else ``./runs/discover-<rule>-<feedback>-<time>``.
    Under ``torchrun`` the fit is data-parallel (see :class:`RuleSearch`, ``distributed``).
    """
    cfg = main_job_config() if config is None else config
    cfg = cfg if isinstance(cfg, DiscoverConfig) else main_job_config(cfg)
    if out is None and name is None:
        if resume:
            raise ConfigError("resume needs the run directory: pass --out PATH (or --name NAME).")
        stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
        rule = cfg.rule if cfg.rule_json is None else cfg.rule_json.get("name", "rule")
        name = f"discover-{Path(str(rule)).stem.replace(':', '-')}-{cfg.network.feedback}-{stamp}"
    return RuleSearch.from_config(
        cfg, out=out, name=name, resume=resume, progress=progress, distributed=distributed
    ).fit()
