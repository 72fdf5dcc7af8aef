r"""The distillation pipeline: collect, fit, select, verify in the loop, export.

* :func:`distill` fits a backend to a sample table (:func:`~rulesearch.distill.samples.collect_samples`) and
  returns a :class:`DistillResult`.
* :func:`distill_update` does everything for any update object (a compiled rule, a neural rule, a black box):
  samples on fresh episodes, the fit, the error on held-out episodes, and the closed-loop check.
* :func:`distill_run` does the same for a run directory (its ``rule.json`` and ``config.yaml``) and writes the
  results into ``<run>/distill/``: ``samples.parquet``, ``rule.json`` (the distilled rule), ``rule.tex``,
  ``front.csv``, ``summary.json`` and ``report.md``.

Examples
--------
>>> import torch
>>> from rulesearch.tasks.data import load_dataset
>>> from rulesearch.tasks.episodes import TaskSampler
>>> from rulesearch.networks.feedforward import Network
>>> from rulesearch.lang.pools import oja
>>> sampler = TaskSampler(load_dataset("digits"), M=3, K=4, Q=2)
>>> net = Network(sizes=(64, 12, 10), feedback="fa")
>>> theta = torch.tensor([0.05, 0.01], dtype=torch.float64)
>>> res = distill_update(oja.compile(), theta, net, sampler,
...                      grammar=Grammar.default(reward_signals=False, max_degree=2), n_episodes=4, test_episodes=4)
>>> res.rule.sympy()
-0.05*err*pre + 0.01*post*pre - 0.01*post*Contract(w, post)
>>> res.closed_loop.cosine > 0.999999
True
"""

from __future__ import annotations

import contextlib
import csv
import dataclasses
import io
import json
import math
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import sympy as sp
import torch

from ..errors import ConfigError, RunDirectoryError
from ..lang.export import latex_fragment, round_floats
from ..lang.grammar import Grammar
from ..lang.rule import NetworkRule, Rule
from ..lang.signals import BASE_SIGNALS, OPERATORS, Constant, base_needs, signals_in
from .base import DistillBackend, evaluate_expr, get_backend, term_name
from .closed_loop import ClosedLoopReport, closed_loop
from .samples import collect_samples, samples_arrays, save_samples
from .select import CollinearityReport
from .sparse import library_collinearity, library_terms

__all__ = [
    "DistillResult",
    "Progress",
    "data_identities",
    "distill",
    "distill_update",
    "distill_run",
    "heldout_error",
    "library_for",
    "resolve_grammar",
]

GRAMMARS = {"classic": Grammar.classic, "default": Grammar.default}


def resolve_grammar(grammar) -> Grammar:
    """A Grammar from a Grammar, ``"classic"`` (default) or ``"default"``."""
    if grammar is None:
        return Grammar.classic()
    if isinstance(grammar, Grammar):
        return grammar
    maker = GRAMMARS.get(str(grammar))
    if maker is None:
        raise ConfigError(f"Unknown grammar {grammar!r}; known: {sorted(GRAMMARS)} (or pass a Grammar).")
    return maker()


class Progress:
    """Stage messages of a distillation on stderr: what runs, an estimate of how long, then how long it took; a
    progress bar with the remaining time over the online steps of a stage that runs the network.

    ``Progress(False)`` is silent. Estimates come from the stages already run (the held-out sampling from the
    training sampling, the closed loop from the held-out sampling) or from a backend's time bound.
    """

    def __init__(self, enabled: bool = True, stream=None):
        self.enabled = enabled
        self.stream = stream if stream is not None else sys.stderr
        self.seconds: dict[str, float] = {}

    def say(self, text: str) -> None:
        if self.enabled:
            print(f"distill: {text}", file=self.stream, flush=True)

    @contextlib.contextmanager
    def stage(self, key: str, text: str, estimate: float | None = None, steps: int | None = None):
        """Announce a stage (``estimate`` in seconds); yields an ``on_step`` callback for a bar of ``steps``."""
        self.say(text + (f" (about {_duration(estimate)})" if estimate is not None else "") + " ...")
        bar = None
        if self.enabled and steps:
            from tqdm.auto import tqdm

            bar = tqdm(total=steps, unit="step", file=self.stream, leave=False, dynamic_ncols=True)
        t0 = time.perf_counter()
        try:
            yield (lambda: bar.update(1)) if bar is not None else None
        finally:
            if bar is not None:
                bar.close()
        self.seconds[key] = time.perf_counter() - t0
        self.say(f"  {key} done in {_duration(self.seconds[key])}")


def _duration(seconds: float) -> str:
    return f"{seconds:.0f} s" if seconds < 100 else f"{seconds / 60:.1f} min"


def library_for(update, grammar=None) -> Grammar:
    """The term library for distilling ``update`` (an update object, or one per layer).

    A :class:`Grammar` is used as given. A built-in one, by name (default ``classic``), is fitted to the update:
    atoms that read a signal the update never reads (its ``needs``) are dropped, so a rule that reads no reward gets
    no reward terms (nor identities about the reward), and the operators and derived signals of a compiled rule's own
    terms (e.g. the pool's layer sum and bilinear forms) are added as atoms, so the rule lies in its library.
    """
    if isinstance(grammar, Grammar):
        return grammar
    base = resolve_grammar(grammar)
    updates = list(update) if isinstance(update, (list, tuple)) else [update]
    if not all(isinstance(getattr(u, "needs", None), (set, frozenset)) for u in updates):
        return base
    reads = set().union(*(u.needs for u in updates))
    for u in updates:
        for spec in getattr(u, "states", None) or ():
            reads |= set(spec.needs)
    atoms = [a for a in base.atoms if base_needs(a) <= reads]
    for u in updates:
        rule = getattr(u, "rule", None)
        if not isinstance(rule, Rule):
            continue
        for e in [t.expr for t in rule.terms] if rule.is_linear else [rule.expr]:
            own = sorted(e.atoms(*OPERATORS), key=sp.default_sort_key)
            own += sorted((x for x in signals_in(e) if not x.is_base and not isinstance(x, Constant)), key=str)
            atoms += [a for a in own if a not in atoms]
    if atoms == list(base.atoms):
        return base
    names = {term_name(a) for a in atoms}
    limits = {k: v for k, v in base.degree_per_signal.items() if k in names}
    return dataclasses.replace(base, atoms=tuple(atoms), degree_per_signal=limits)


@dataclass
class DistillResult:
    """What a distillation produced.

    Attributes
    ----------
    rule : Rule
        The selected formula as a compilable rule (values = its coefficients or constants).
    backend : DistillBackend
        The fitted backend (``front_``, ``candidates_``, ``selection_``, ...).
    samples : pandas.DataFrame
        The table it was fitted on.
    identities : list of str
        Near-collinear library columns found on the data, as ``term = combination`` (every backend; see
        :func:`data_identities`).
    heldout_error : float
        Relative RMS error :math:`\\lVert f - \\Delta W \\rVert_w / \\lVert \\Delta W \\rVert_w` on held-out samples
        (NaN when none were given).
    closed_loop : ClosedLoopReport or None
    layers : tuple of int or None
        The layers the samples were restricted to.
    seconds : dict
        Wall time per stage.
    """

    rule: Rule
    backend: DistillBackend
    samples: pd.DataFrame
    identities: list[str] = field(default_factory=list)
    heldout_error: float = math.nan
    closed_loop: ClosedLoopReport | None = None
    layers: tuple[int, ...] | None = None
    seconds: dict = field(default_factory=dict)

    @property
    def formula(self) -> sp.Expr:
        return self.backend.best_.expr

    def latex(self, precision: int = 3) -> str:
        r"""The update as LaTeX, ``\Delta W_{ij} = ...``."""
        return self.rule.latex(precision=precision)

    def front_rows(self, precision: int | None = None) -> list[dict]:
        """The Pareto front, one dict per formula (``precision``: round its numbers to that many digits)."""
        b = self.backend
        chosen = b.front_[b.selection_["index"]]
        return [
            {
                "complexity": c.complexity,
                "loss": c.loss,
                "n_params": c.n_params,
                "score": s,
                "selected": c is chosen,
                "source": c.source,
                "formula": sp.sstr(c.expr if precision is None else round_floats(c.expr, precision), order="none"),
            }
            for c, s in zip(b.front_, b.selection_["scores"])
        ]

    def summary(self) -> dict:
        b = self.backend
        return {
            "backend": getattr(b, "name", type(b).__name__),
            "params": {k: _plain(v) for k, v in b.get_params().items()},
            "formula": sp.sstr(self.formula, order="none"),
            "latex": self.latex(),
            "complexity": b.best_.complexity,
            "train_loss": b.best_.loss,
            "heldout_relative_error": self.heldout_error,
            "n_samples": int(b.n_samples_),
            "n_features": int(b.n_features_),
            "layers": None if self.layers is None else list(self.layers),
            "identities": list(self.identities),
            "closed_loop": self.closed_loop.to_dict() if self.closed_loop is not None else None,
            "seconds": self.seconds,
        }

    def report(self) -> str:
        """A Markdown report: formula, front, identities, closed loop."""
        s = self.summary()
        lines = ["# Distilled rule", "", f"$${s['latex']}$$", "", f"`{s['formula']}`", ""]
        lines += [
            f"- backend: {s['backend']}; {s['n_samples']} samples, {s['n_features']} features",
            f"- complexity {s['complexity']}, weighted train MSE {s['train_loss']:.4e}, held-out relative error "
            f"{s['heldout_relative_error']:.3e}",
        ]
        if self.closed_loop is not None:
            lines.append(f"- closed loop: {self.closed_loop}")
        lines += ["", "## Pareto front", "", "| | complexity | loss | params | formula |", "|---|---|---|---|---|"]
        for r in self.front_rows(precision=4):
            mark = "**>**" if r["selected"] else ""
            lines.append(f"| {mark} | {r['complexity']} | {r['loss']:.4e} | {r['n_params']} | `{r['formula']}` |")
        if self.identities:
            lines += ["", "## Identities on the data (the simplest member was kept)", ""]
            lines += [f"- `{i}`" for i in self.identities[:50]]
            if len(self.identities) > 50:
                lines.append(f"- ... and {len(self.identities) - 50} more")
        return "\n".join(lines) + "\n"

    def __repr__(self) -> str:
        cl = f", cosine={self.closed_loop.cosine:.6f}" if self.closed_loop is not None else ""
        return f"DistillResult({sp.sstr(self.formula, order='none')!r}, heldout_error={self.heldout_error:.3e}{cl})"


def _plain(v):
    if isinstance(v, (str, int, float, bool)) or v is None:
        return v
    if isinstance(v, (list, tuple)):
        return [_plain(x) for x in v]
    return repr(v)


def heldout_error(formula, samples: pd.DataFrame, layers: Sequence[int] | None = None) -> float:
    """Weighted relative RMS error of ``formula`` on a sample table."""
    X, y, w, features, _ = samples_arrays(samples, layers)
    pred = evaluate_expr(formula, features, X)
    den = float(np.sum(w * y**2))
    return math.sqrt(float(np.sum(w * (pred - y) ** 2)) / den) if den > 0 else math.nan


def distill(
    samples: pd.DataFrame,
    backend="sparse",
    *,
    grammar=None,
    layers: Sequence[int] | None = None,
    heldout: pd.DataFrame | None = None,
    name: str = "distilled",
    **backend_params,
) -> DistillResult:
    """Fit ``backend`` to a sample table and return the selected formula as a Rule.

    Parameters
    ----------
    samples : DataFrame
        From :func:`collect_samples` or :func:`load_samples`.
    backend : str or DistillBackend
        A name in :data:`~rulesearch.distill.base.BACKENDS` or an instance.
    grammar : Grammar or str, optional
        The sparse backend's library (default ``Grammar.classic()``). The other backends search over the table's
        atom columns; for them it only sets where identities are looked for (default: products of up to three atom
        columns, see :func:`data_identities`).
    layers : sequence of int, optional
        Fit only the rows of these layers.
    heldout : DataFrame, optional
        Held-out samples for :attr:`DistillResult.heldout_error`.
    **backend_params :
        Parameters of a backend given by name.
    """
    t0 = time.perf_counter()
    X, y, w, features, _ = samples_arrays(samples, layers)
    given = isinstance(backend, DistillBackend)
    be = backend.clone() if given else get_backend(backend, **backend_params)
    if "library" in be.get_params() and be.library is None:
        be.set_params(library=resolve_grammar(grammar))
    if "rel_floor" in be.get_params() and "rel_floor" not in backend_params and not given:
        dtype = samples.attrs.get("rulesearch", {}).get("dtype", "float64")
        be.set_params(rel_floor=1e-9 if dtype == "float64" else 1e-5)
    be.fit(X, y, features, w)
    seconds = {"fit": time.perf_counter() - t0}
    rule = be.best_.rule(name)
    report = getattr(be, "collinearity_", None)
    if report is None:
        report = data_identities(X, w, features, grammar)
    identities = [str(i) for i in report.identities if i.kind == "identity"]
    if report.n_degenerate:
        identities.append(
            f"{report.n_degenerate} further columns are linearly dependent on these samples without a short identity "
            "(too few informative rows); collect more episodes to resolve them"
        )
    err = heldout_error(be.best_.expr, heldout, layers) if heldout is not None else math.nan
    return DistillResult(rule, be, samples, identities, err, None, None if layers is None else tuple(layers), seconds)


def data_identities(X, weights, features, grammar=None, tol: float = 1e-6) -> CollinearityReport:
    """Near-collinear library columns on sample rows, for backends without a library of their own (operon, pysr).

    The library is ``grammar`` or, by default, every product of up to three of the table's atom columns (``w`` at
    most linear, as in :meth:`Grammar.default`): the terms a genetic-programming formula expands into.
    """
    if grammar is None:
        linear_w = {"w": 1} if BASE_SIGNALS["w"] in features else {}
        grammar = Grammar(atoms=tuple(features), max_degree=3, degree_per_signal=linear_w)
    return library_collinearity(library_terms(resolve_grammar(grammar)), features, X, weights, tol)[1]


def _update_and_params(rule, dtype, device):
    """``(update, params)`` for run_episodes from a trained Rule, NetworkRule or NeuralRule."""
    if isinstance(rule, Rule):
        from .closed_loop import rule_params

        return rule.compile(), rule_params(rule, dtype, device)
    if isinstance(rule, NetworkRule):
        raise ConfigError("NetworkRule: distill each layer group separately (distill_run does).")
    params = getattr(rule, "params", None)
    if params is not None and isinstance(params, dict):
        params = {k: torch.as_tensor(v, dtype=dtype, device=device) for k, v in params.items()}
    return rule, params


def distill_update(
    update,
    params,
    net,
    sampler,
    *,
    grammar=None,
    backend="sparse",
    layers: Sequence[int] | None = None,
    seed: int = 0,
    t: int = 1_000_000,
    n_episodes: int = 8,
    test_episodes: int = 16,
    n_per_step: int = 32,
    n_strata: int = 4,
    dtype: torch.dtype = torch.float64,
    check: bool = True,
    run_kwargs: dict | None = None,
    progress: Progress | bool = False,
    **backend_params,
) -> DistillResult:
    """Distill any update object: sample it on fresh episodes, fit, select, check on held-out episodes.

    Episodes ``(seed, t, 0..n_episodes-1)`` give the training samples and ``(seed, t + 1, ...)`` the held-out
    samples and the closed-loop check (``check=True``); ``t`` defaults far beyond any meta-training step, so the
    tasks are fresh. ``layers`` restricts samples and the closed-loop replacement to some layers. ``grammar``: see
    :func:`library_for`. ``progress``: stage messages on stderr (a :class:`Progress`, or True).
    """
    grammar = library_for(update, grammar)
    be = get_backend(backend, **backend_params)  # bad parameters fail here, before any sampling
    prog = progress if isinstance(progress, Progress) else Progress(bool(progress))
    run_kwargs = dict(run_kwargs or {})
    opts = dict(grammar=grammar, n_per_step=n_per_step, n_strata=n_strata, layers=layers, **run_kwargs)
    train = sampler.sample(seed, t, range(n_episodes)).to(dtype=dtype)
    steps = int(train.x_train.shape[1]) if hasattr(train, "x_train") else None
    what = f"{n_episodes} episodes x {steps} steps" if steps else f"{n_episodes} episodes"
    with prog.stage("sample", f"sampling the update on {what} (fit rows)", steps=steps) as on_step:
        samples = collect_samples(net, train, update, params, seed=seed, on_step=on_step, **opts)
    test = sampler.sample(seed, t + 1, range(test_episodes)).to(dtype=dtype)
    per_episode = prog.seconds["sample"] / max(n_episodes, 1)
    with prog.stage("heldout", f"sampling {test_episodes} held-out episodes", per_episode * test_episodes,
                    steps) as on_step:  # fmt: skip
        held = collect_samples(net, test, update, params, seed=seed + 1, on_step=on_step, **opts)
    size = f"{len(samples)} rows, {len(library_terms(grammar))} library terms ({grammar.name} grammar)"
    with prog.stage("fit", f"fitting {be.name}: {size}", be.get_params().get("max_time")):  # operon's bound
        res = distill(samples, backend, grammar=grammar, layers=layers, heldout=held, **backend_params)
    if check:
        with prog.stage("closed_loop", "closed loop: the original and the distilled rule on the held-out episodes",
                        prog.seconds["heldout"] / 4, steps) as on_step:  # fmt: skip
            res.closed_loop = closed_loop(res.rule, update, params, net, test, layers=layers, on_step=on_step,
                                          **run_kwargs)  # fmt: skip
    stages = ("sample", "heldout", "fit", "closed_loop") if check else ("sample", "heldout", "fit")
    res.seconds = {k: prog.seconds[k] for k in stages}  # wall time per stage
    return res


def _context(run_path: Path, dataset=None):
    """The run directory, its config, network, task sampler and run_episodes options (a :class:`Problem` of the
    run's config, on the CPU; episodes from the held-out classes when the task has a class split)."""
    from ..io.runs import RunDir
    from ..train import DiscoverConfig, Problem

    run = RunDir.open(run_path)
    try:
        dc = DiscoverConfig.from_dict(run.config())
    except ConfigError as err:
        raise RunDirectoryError(
            f"{run_path}/config.yaml is not a discovery config ({err}); pass net= and sampler= explicitly to "
            f"distill_update instead."
        ) from err
    side = "test" if dc.task.split != "all" else "train"  # no class split without classes: 'test' is 'train'
    problem = Problem(dc, side=side, device=torch.device("cpu"), dataset=dataset).load()
    run_kwargs = {"divergence_bound": dc.meta.divergence_bound}
    return run, dc, problem.net, problem.sampler, run_kwargs


def distill_run(
    run_dir,
    *,
    backend="sparse",
    grammar=None,
    rule=None,
    run_index: int | None = None,
    out: str = "distill",
    seed: int = 0,
    n_episodes: int = 8,
    test_episodes: int = 16,
    n_per_step: int = 32,
    layers: Sequence[int] | None = None,
    check: bool = True,
    write: bool = True,
    progress: bool = False,
    **backend_params,
) -> DistillResult:
    """Distill the trained rule of a run directory and write the results into ``<run>/<out>/``.

    Parameters
    ----------
    run_dir : path
        A run directory made by the meta-trainer (``config.yaml``, ``rule.json``).
    rule : path, optional
        A rule JSON file to distill instead of ``<run>/rule.json``.
    run_index : int, optional
        Which run of a multi-run result (default: the mean coefficients / the first neural run).
    out : str
        Sub-directory of the run for the outputs.
    backend, grammar, seed, n_episodes, test_episodes, n_per_step, layers, check, **backend_params :
        See :func:`distill_update`.
    write : bool
        Write the outputs (``samples.parquet``, ``rule.json``, ``rule.tex``, ``front.csv``, ``summary.json``,
        ``report.md``).
    progress : bool
        Stage messages with time estimates and progress bars on stderr.
    """
    from ..train import load_rule

    run_path = Path(run_dir)
    run, dc, net, sampler, run_kwargs = _context(run_path)
    source = Path(rule) if rule is not None else run_path / "rule.json"
    if not source.is_file():
        raise RunDirectoryError(
            f"{source} does not exist: the run has no trained rule yet (it is written when training finishes). "
            f"Pass rule=<file.json> to distill another rule."
        )
    trained = load_rule(source, run=run_index)
    dtype = torch.float64
    groups = [tuple(lay) for lay, _ in trained.groups] if isinstance(trained, NetworkRule) else [None]
    results = []
    prog = Progress(progress)
    for g, grp in enumerate(groups):
        if len(groups) > 1:
            prog.say(f"layer group {g + 1} of {len(groups)} (layers {', '.join(str(i) for i in grp)})")
        use = grp if grp is not None else (tuple(layers) if layers is not None else None)
        if isinstance(trained, NetworkRule):
            upd, par = [], []
            for lay in range(net.n_layers):
                u, p = _update_and_params(trained.groups[trained.group_of(lay)][1], dtype, None)
                upd.append(u)
                par.append(p)
        else:
            upd, par = _update_and_params(trained, dtype, None)
        res = distill_update(
            upd, par, net, sampler, grammar=grammar, backend=backend, layers=use, seed=seed + g,
            n_episodes=n_episodes, test_episodes=test_episodes, n_per_step=n_per_step, check=check,
            run_kwargs=run_kwargs, progress=prog, **backend_params,
        )  # fmt: skip
        results.append(res)
    if write:
        for g, res in enumerate(results):
            sub = out if len(results) == 1 else f"{out}/group{g}"
            with prog.stage("write", f"writing {run_path / sub}/"):
                _write(run, sub, res)
    return results[0] if len(results) == 1 else results


def _write(run, sub: str, res: DistillResult) -> None:
    from ..io.runs import atomic_open

    target = run.path / sub
    target.mkdir(parents=True, exist_ok=True)
    tmp = save_samples(res.samples, target / ".samples.tmp.parquet")
    final = target / ("samples" + tmp.suffix)
    tmp.replace(final)
    if tmp.suffix == ".csv":
        side = tmp.with_suffix(".csv.json")
        side.replace(final.with_suffix(".csv.json"))
    run.write_json(f"{sub}/rule.json", res.rule.to_json())
    run.write_text(f"{sub}/rule.tex", latex_fragment([res.latex()]) + "\n")
    buf = io.StringIO()
    rows = res.front_rows()
    writer = csv.DictWriter(buf, fieldnames=list(rows[0]))
    writer.writeheader()
    writer.writerows(rows)
    with atomic_open(target / "front.csv", "w") as f:
        f.write(buf.getvalue())
    run.write_text(f"{sub}/summary.json", json.dumps(_finite(res.summary()), indent=2) + "\n")
    run.write_text(f"{sub}/report.md", res.report())


def _finite(obj):
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_finite(v) for v in obj]
    return obj
