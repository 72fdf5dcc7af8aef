r"""Evaluate a learned rule against the baselines on fresh tasks, with bootstrap confidence intervals.

A rule (from a run directory, a JSON file, or a named rule) adapts fresh networks online on fresh episodes under a
feedback mode; so does the pseudo-gradient rule :math:`F^0 = -\eta\, e_i x_j` under feedback alignment and under
backprop, on the same episodes and initial weights. Each of ``seeds`` independent evaluation seeds contributes the
mean over its ``episodes`` episodes; the table gives the mean over seeds and a 95% percentile-bootstrap interval
(:func:`rulesearch.io.stats.bootstrap_ci`).

Several rules are compared side by side on the same episodes: ``evaluate({"learned": rule, "f0 at 0.05":
f0.with_values([0.05])})``, or ``rulesearch evaluate RUN_A RUN_B f0@0.05`` (a spec ``NAME@v1,v2,...`` gives a rule
its coefficients).

Evaluation episodes are ``(seed, 0, k)`` with seeds starting at ``EvalConfig.seed`` (10000), far from the
training seeds (0, 1, ...), so the tasks are fresh draws; ``classes="held-out"`` restricts them to the classes
the task split kept out of meta-training, and another ``dataset`` tests transfer.

Examples
--------
>>> from rulesearch.evaluate import evaluate, EvalConfig
>>> from rulesearch.train import NetworkConfig, TaskConfig
>>> from rulesearch.lang.pools import f0
>>> ev = evaluate(f0.with_values([0.05]), network=NetworkConfig(sizes=(8, 6, 3)),
...               task=TaskConfig(dataset="teacher", options={"n_in": 8, "n_classes": 3}, M=3, K=5, Q=2),
...               config=EvalConfig(seeds=3, episodes=2, dtype="float64"))
>>> list(ev.table["method"])
['rule (fa)', 'f0 (fa)', 'f0 (bp)']
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import math
import os
import warnings
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .errors import ConfigError, InvalidRuleError
from .io.config import Config, option
from .io.runs import RunDir, atomic_open, atomic_write_text
from .io.stats import bootstrap_ci
from .lang.rule import NetworkRule, Rule
from .networks.feedforward import stack_episodes
from .neural import NeuralRule
from .train import (
    DiscoverConfig,
    NetworkConfig,
    Problem,
    TaskConfig,
    load_feedback_rule,
    load_rule,
    pseudo_gradient_lr,
    resolve_rule,
    threads,
)

__all__ = [
    "EvalConfig", "Evaluation", "evaluate", "evaluate_spec", "rule_params", "plot_evaluation", "seed_episodes",
    "parse_spec",
]  # fmt: skip


@dataclass(frozen=True)
class EvalConfig(Config):
    """How a rule is evaluated: seeds, episodes, classes, the baselines, device."""

    seeds: int = option(10, help="Independent evaluation seeds (the unit of the bootstrap).")
    episodes: int = option(5, help="Episodes per seed (fresh tasks and initial weights).")
    seed: int = option(10_000, help="First evaluation seed (training uses seeds 0, 1, ...).")
    classes: str = option(
        "train",
        help="Which classes tasks draw from: 'train' (the meta-training side of the task split) or 'held-out'.",
        choices=("train", "held-out"),
    )
    baselines: bool = option(True, help="Also evaluate f0 under fa and under bp on the same episodes.")
    baseline_lr: float | None = option(
        None,
        help="Learning rate of the f0 baselines; default: the rule's learned -e_i x_j coefficient, else theta0.",
    )
    theta0: float = option(1e-3, help="Coefficient of the first term when the rule carries no trained values.")
    ci: float = option(0.95, help="Coverage of the bootstrap intervals.")
    resamples: int = option(1000, help="Bootstrap resamples.")
    dtype: str = option("float32", help="Floating-point type.", choices=("float32", "float64"))
    device: str = option("cpu", help="Torch device, e.g. 'cpu' or 'cuda'.")
    chunk: int = option(64, help="Episodes per inner-loop call (memory bound).")
    threads: int | None = option(1, help="CPU threads for torch (null: torch's own setting).")

    def __post_init__(self):
        super().__post_init__()
        for name in ("seeds", "episodes", "resamples", "chunk"):
            if getattr(self, name) < 1:
                raise ConfigError(f"Config key 'evaluate.{name}' must be >= 1; received {getattr(self, name)}.")
        if not 0.0 < self.ci < 1.0:
            raise ConfigError(f"Config key 'evaluate.ci' must lie in (0, 1); received {self.ci}.")
        if self.baseline_lr is not None and not (math.isfinite(self.baseline_lr) and self.baseline_lr > 0):
            raise ConfigError(f"Config key 'evaluate.baseline_lr' must be > 0; received {self.baseline_lr}.")


def rule_params(rule, n_layers: int, theta0: float = 1e-3, dtype=torch.float64, device=None):
    """The ``update`` and ``params`` for :func:`rulesearch.inner.run_episodes` of a trained rule object.

    A rule without trained values gets ``theta0`` for its first term and 0 for the others (with a warning).
    """
    from .compile.compiler import compile_rule

    def theta(r: Rule):
        vals = r.values
        if vals is None:
            warnings.warn(
                f"Rule {r.name!r} carries no trained coefficients; evaluating it with theta_0 = {theta0:g} and the "
                f"other coefficients 0. Pass a trained rule (a run directory or rule.json) or set its values.",
                RuntimeWarning,
                stacklevel=4,
            )
            vals = [theta0] + [0.0] * (r.n_terms - 1)
        return torch.tensor(vals, dtype=dtype, device=device)

    if isinstance(rule, NeuralRule):
        if rule.params is None:
            raise InvalidRuleError(f"Neural rule {rule.name!r} has no trained parameters to evaluate.")
        return rule, {k: v.to(dtype=dtype, device=device) for k, v in rule.params.items()}
    if isinstance(rule, NetworkRule):
        rules = rule.rules_per_layer(n_layers)
        return [compile_rule(r) for r in rules], [theta(r) for r in rules]
    if isinstance(rule, Rule):
        return compile_rule(rule), theta(rule)
    raise InvalidRuleError(f"Cannot evaluate a {type(rule).__name__}; expected a Rule, NetworkRule or NeuralRule.")


@dataclass
class Evaluation:
    """The result of :func:`evaluate`.

    Attributes
    ----------
    table : pandas.DataFrame
        One row per method: ``method``, ``feedback``, ``lr``, ``accuracy`` with ``accuracy_lo`` /
        ``accuracy_hi`` (bootstrap interval over seeds), ``loss`` (with interval), ``angle`` (mean alignment angle
        of the hidden layers), ``diverged`` (fraction of episodes), ``seeds``, ``episodes``.
    per_seed : pandas.DataFrame
        One row per method and seed.
    info : dict
        The rule, network, task and evaluation settings.
    """

    table: Any
    per_seed: Any
    info: dict

    def to_markdown(self, precision: int = 3) -> str:
        ci = int(round(100 * self.info.get("ci", 0.95)))
        lines = [
            f"| method | accuracy | {ci}% interval | loss | {ci}% interval | angle (deg) | diverged |",
            "|---|---|---|---|---|---|---|",
        ]
        for _, r in self.table.iterrows():
            lines.append(
                f"| {r['method']} | {r['accuracy']:.{precision}f} | [{r['accuracy_lo']:.{precision}f}, "
                f"{r['accuracy_hi']:.{precision}f}] | {r['loss']:.{precision}f} | [{r['loss_lo']:.{precision}f}, "
                f"{r['loss_hi']:.{precision}f}] | {r['angle']:.1f} | {r['diverged']:.2f} |"
            )
        return "\n".join(lines)

    def __str__(self) -> str:
        i = self.info
        head = (
            f"{i['rule']} on {i['dataset']} ({i['classes']} classes), {i['seeds']} seeds x {i['episodes']} episodes, "
            f"{int(round(100 * i['ci']))}% bootstrap intervals over seeds"
        )
        return head + "\n" + self.to_markdown()

    def save(self, directory: str | os.PathLike) -> dict[str, Path]:
        """Write ``evaluation.csv``, ``evaluation_per_seed.csv``, ``evaluation.md``, ``evaluation.json`` and
        ``evaluation.png`` into ``directory`` (atomically)."""
        d = Path(directory)
        d.mkdir(parents=True, exist_ok=True)
        out = {
            "table": atomic_write_text(d / "evaluation.csv", self.table.to_csv(index=False)),
            "per_seed": atomic_write_text(d / "evaluation_per_seed.csv", self.per_seed.to_csv(index=False)),
            "markdown": atomic_write_text(d / "evaluation.md", str(self) + "\n"),
            "info": atomic_write_text(d / "evaluation.json", json.dumps(self.info, indent=2, default=str) + "\n"),
        }
        out["plot"] = plot_evaluation(self, d / "evaluation.png")
        return out


def plot_evaluation(evaluation: Evaluation, path: str | os.PathLike) -> Path:
    """Bar chart of the mean query accuracy per method with its bootstrap interval (matplotlib, no pyplot)."""
    from matplotlib.figure import Figure

    t = evaluation.table
    fig = Figure(figsize=(1.6 + 1.3 * len(t), 3.6), layout="constrained")
    ax = fig.add_subplot()
    x = np.arange(len(t))
    acc = t["accuracy"].to_numpy(dtype=float)
    err = np.stack([acc - t["accuracy_lo"].to_numpy(dtype=float), t["accuracy_hi"].to_numpy(dtype=float) - acc])
    ax.bar(x, acc, yerr=np.nan_to_num(err), capsize=4, color=[f"C{i}" for i in range(len(t))])
    ax.set_xticks(x, list(t["method"]))
    ax.set_ylabel("query accuracy")
    ax.set_ylim(0.0, 1.0)
    ci = int(round(100 * evaluation.info.get("ci", 0.95)))
    ax.set_title(f"{evaluation.info['rule']}: mean of {evaluation.info['seeds']} seeds, {ci}% bootstrap CI", fontsize=9)
    ax.grid(axis="y", alpha=0.3)
    path = Path(path)
    with atomic_open(path, "wb") as f:
        fig.savefig(f, format=path.suffix.lstrip(".") or "png", dpi=150)
    return path


def evaluate(
    rule,
    *,
    network: NetworkConfig | None = None,
    task: TaskConfig | None = None,
    config: EvalConfig | None = None,
    progress: bool = False,
    feedback_rule: Rule | None = None,
) -> Evaluation:
    """Evaluate trained rule objects (and the f0 baselines) on fresh episodes, all on the same episodes.

    Parameters
    ----------
    rule : Rule, NetworkRule or NeuralRule, or a dict of them
        With trained values (see :func:`rule_params` for rules without). A dict ``{label: rule}`` compares several
        rules side by side (methods ``"<label> (<feedback>)"``; one rule is ``"rule (<feedback>)"``); a value may
        be a pair ``(rule, feedback_rule)``. The f0 baselines take their learning rate from the first rule.
    network : NetworkConfig
        The network; its ``feedback`` is the mode the rule runs under.
    task : TaskConfig
        Dataset and episodes (``M``, ``K``, ``Q``, split).
    config : EvalConfig
        Seeds, episodes, classes, baselines.
    feedback_rule : Rule, optional
        Under ``network.feedback = "plastic"``: the trained feedback rule (e.g. :func:`load_feedback_rule` of a
        run); default: ``network.feedback_rule`` (see :func:`rule_params` for a rule without values).

    Returns
    -------
    Evaluation
    """
    cfg = config or EvalConfig()
    items = rule.items() if isinstance(rule, Mapping) else [("rule", rule)]
    rules = [(str(label), *(r if isinstance(r, tuple) else (r, feedback_rule))) for label, r in items]
    if not rules:
        raise ConfigError("evaluate needs at least one rule; received an empty dict.")
    with threads(cfg.threads):
        return _evaluate(rules, network or NetworkConfig(), task or TaskConfig(), cfg)


def seed_episodes(sampler, net, seeds, episodes: int, dtype=torch.float32, device=None):
    """Episodes ``(s, 0, k)``, ``k < episodes``, of every seed ``s`` as one batch (rows ordered by seed, then k):
    ``(batch, weights, feedback)`` for :func:`~rulesearch.inner.run_episodes`."""
    return stack_episodes(sampler, net, [(s, 0, range(episodes)) for s in seeds], dtype, device)


def _evaluate(rules: list[tuple], network: NetworkConfig, task: TaskConfig, cfg: EvalConfig) -> Evaluation:
    """``rules``: ``(label, rule, feedback_rule)`` triples, evaluated in order before the baselines."""
    import pandas as pd

    from .inner import f0 as f0_update
    from .inner import run_episodes

    side = "test" if cfg.classes == "held-out" else "train"
    problem = Problem.of(task, network, side=side, dtype=cfg.dtype, device=cfg.device).load()
    dtype, device, net = problem.dtype, problem.device, problem.net
    methods = []
    for label, rule, feedback_rule in rules:
        update, params = rule_params(rule, net.n_layers, cfg.theta0, dtype, device)
        plastic = {}
        if net.feedback == "plastic":
            fb_update, fb_params = rule_params(
                feedback_rule if feedback_rule is not None else problem.feedback_rule(), net.n_layers, cfg.theta0,
                dtype, device,
            )  # fmt: skip
            plastic = {"feedback_update": fb_update, "feedback_params": fb_params}
        methods.append((f"{label} ({net.feedback})", net, update, params, plastic))
    if len({m[0] for m in methods}) < len(methods):
        raise ConfigError(f"Rule labels must differ; received {[label for label, *_ in rules]}.")
    rule, feedback_rule = rules[0][1], rules[0][2]
    lr = cfg.baseline_lr
    if lr is None:
        lr = pseudo_gradient_lr(rule) if not isinstance(rule, NeuralRule) else None
        if lr is None and isinstance(rule, NeuralRule) and rule.params is not None and "skip" in rule.params:
            idx = [i for i, f in enumerate(rule.features) if set(f.split("*")) == {"err", "pre"}]
            lr = float(-rule.params["skip"][idx[0]]) if idx else None
        if lr is None or not lr > 0:
            lr = cfg.theta0
    if cfg.baselines:
        for mode in ("fa", "bp"):
            methods.append(
                (
                    f"f0 ({mode})",
                    dataclasses.replace(getattr(net, "base", net), feedback=mode),  # PC: its feedforward Network
                    f0_update,
                    torch.tensor(lr, dtype=dtype),
                    {},
                )
            )
    seeds = [cfg.seed + i for i in range(cfg.seeds)]
    E = cfg.episodes
    per_chunk = max(1, cfg.chunk // E)
    rows = []
    for name, mnet, upd, prm, extra in methods:
        prm = {k: v.to(device) for k, v in prm.items()} if isinstance(prm, dict) else prm
        if torch.is_tensor(prm):
            prm = prm.to(device)
        elif isinstance(prm, list):
            prm = [p.to(device) for p in prm]
        for i in range(0, len(seeds), per_chunk):
            chunk = seeds[i : i + per_chunk]
            batch, weights, feedback = problem.batch([(s, 0, range(E)) for s in chunk], mnet)
            with torch.no_grad():
                res = run_episodes(mnet, batch, upd, prm, weights, feedback, raise_on_divergence=False, **extra)
            acc = torch.where(res.diverged, torch.zeros_like(res.accuracy), res.accuracy).double().cpu()
            loss = res.loss.double().cpu()
            ang = res.angles.double().cpu()
            for j, s in enumerate(chunk):
                sl = slice(j * E, (j + 1) * E)
                row = {
                    "method": name,
                    "feedback": mnet.feedback,
                    "seed": s,
                    "accuracy": float(acc[sl].mean()),
                    "loss": float(loss[sl][torch.isfinite(loss[sl])].mean())
                    if torch.isfinite(loss[sl]).any()
                    else math.nan,
                    "diverged": float(res.diverged[sl].double().mean()),
                }
                for layer in range(ang.shape[1]):
                    row[f"angle.{layer + 1}"] = float(torch.nanmean(ang[sl, layer]))
                rows.append(row)
    per_seed = pd.DataFrame(rows)
    table_rows = []
    for name, mnet, *_ in methods:
        d = per_seed[per_seed["method"] == name]
        acc, acc_lo, acc_hi = bootstrap_ci(d["accuracy"].to_numpy(), cfg.resamples, cfg.ci, nan_policy="omit")
        loss, loss_lo, loss_hi = bootstrap_ci(d["loss"].to_numpy(), cfg.resamples, cfg.ci, nan_policy="omit")
        angle_cols = [c for c in d.columns if c.startswith("angle.")]
        table_rows.append(
            {
                "method": name,
                "feedback": mnet.feedback,
                "lr": lr if name.startswith("f0") else math.nan,
                "accuracy": acc,
                "accuracy_lo": acc_lo,
                "accuracy_hi": acc_hi,
                "loss": loss,
                "loss_lo": loss_lo,
                "loss_hi": loss_hi,
                "angle": float(np.nanmean(d[angle_cols].to_numpy())) if angle_cols else math.nan,
                "diverged": float(d["diverged"].mean()),
                "seeds": len(d),
                "episodes": E,
            }
        )
    names = [getattr(r, "name", type(r).__name__) for _, r, _ in rules]
    info = {
        "rule": names[0] if len(rules) == 1 else ", ".join(label for label, *_ in rules),
        "rules": dict(zip([label for label, *_ in rules], names)),
        "dataset": task.dataset,
        "classes": cfg.classes,
        "seeds": cfg.seeds,
        "episodes": E,
        "ci": cfg.ci,
        "baseline_lr": lr,
        "feedback_rule": feedback_rule.name if feedback_rule is not None else None,  # of the first rule
        "network": network.to_dict(),
        "task": task.to_dict(),
        "evaluate": cfg.to_dict(),
        "time": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }
    return Evaluation(pd.DataFrame(table_rows), per_seed, info)


def parse_spec(spec: str | os.PathLike) -> tuple[str, tuple[float, ...] | None]:
    """``"f0@0.05"`` -> ``("f0", (0.05,))``: a rule spec and the coefficients given after ``@`` (None without)."""
    text = str(spec)
    if Path(text).exists():  # a file or run directory whose name holds '@'
        return text, None
    base, sep, tail = text.rpartition("@")
    if not sep or not base:
        return text, None
    try:
        values = tuple(float(v) for v in tail.split(","))
    except ValueError:
        raise ConfigError(f"Rule spec {text!r}: the coefficients after '@' must be numbers, e.g. f0@0.05.") from None
    if not all(math.isfinite(v) for v in values):
        raise ConfigError(f"Rule spec {text!r}: the coefficients after '@' must be finite numbers.")
    return base, values


def _load_spec(spec, run: int | None):
    """``(rule, feedback_rule, run directory or None)`` of one spec (see :func:`evaluate_spec`)."""
    text, values = parse_spec(spec)
    path = Path(text)
    if path.is_dir():
        RunDir.open(path)
        rule, feedback_rule, run_dir = load_rule(path, run=run), load_feedback_rule(path, run=run), path
    elif path.is_file() or text.endswith(".json"):
        rule, feedback_rule, run_dir = load_rule(path, run=run), load_feedback_rule(path, run=run), None
    else:
        rule, feedback_rule, run_dir = resolve_rule(text), None, None
    if values is not None:
        if not isinstance(rule, Rule) or not rule.is_linear:
            raise ConfigError(
                f"Rule spec {str(spec)!r}: coefficients after '@' apply to a linear rule (one number per term); "
                f"{text!r} is a {type(rule).__name__}."
            )
        if len(values) != rule.n_terms:
            raise ConfigError(
                f"Rule spec {str(spec)!r}: {len(values)} coefficients for the {rule.n_terms} terms "
                f"{', '.join(rule.term_names())} of {text!r}; give one per term."
            )
        rule = rule.with_values(values)
    return rule, feedback_rule, run_dir


def _label(spec) -> str:
    text, values = parse_spec(spec)
    name = Path(text).stem if Path(text).suffix == ".json" else Path(text).name or text
    return name + (f"@{','.join(f'{v:g}' for v in values)}" if values is not None else "")


def evaluate_spec(
    spec: str | os.PathLike | list,
    *,
    network: Mapping[str, Any] | None = None,
    task: Mapping[str, Any] | None = None,
    config: EvalConfig | None = None,
    run: int | None = None,
    out: str | os.PathLike | None = None,
) -> tuple[Evaluation, Path | None]:
    """Evaluate a rule given as a run directory, a rule JSON file or a named rule (``f0``, ``pool``, ...), or
    several of them side by side on the same episodes (a list of specs).

    ``NAME@v1,v2,...`` gives a linear rule its coefficients (``f0@0.05``, ``ehebb@0.01,-0.001``, ``RUN@...``). The
    network and task default to those of the first run directory among the specs, else to :class:`NetworkConfig` /
    :class:`TaskConfig`; ``network`` and ``task`` override single keys (e.g. ``{"feedback": "bp"}``,
    ``{"dataset": "emnist"}``). ``run`` picks one run of a multi-run result. A rule trained under plastic feedback
    brings its trained feedback rule (``feedback_rule`` of ``rule.json``). Results are saved in ``out`` (default:
    ``<run>/evaluation`` for a single run directory, else nothing is written).
    """
    specs = list(spec) if isinstance(spec, (list, tuple)) else [spec]
    if not specs:
        raise ConfigError("Give at least one rule to evaluate: a run directory, a rule JSON file or a named rule.")
    loaded = [_load_spec(s, run) for s in specs]
    labels = ["rule"] if len(specs) == 1 else [_label(s) for s in specs]
    if len(set(labels)) < len(labels):
        labels = [f"{i + 1}:{label}" for i, label in enumerate(labels)]
    base_net, base_task = NetworkConfig(), TaskConfig()
    run_dirs = [d for _, _, d in loaded if d is not None]
    if run_dirs:
        cfg = DiscoverConfig.from_dict(RunDir.open(run_dirs[0]).config())
        base_net, base_task = cfg.network, cfg.task
        if cfg.meta.device != "cpu" and config is None:
            config = EvalConfig(device=cfg.meta.device)
    default_out = run_dirs[0] / "evaluation" if len(specs) == 1 and run_dirs else None
    network, task = dict(network or {}), dict(task or {})
    if "dataset" in task and task["dataset"] != base_task.dataset:  # another dataset: its own sizes and options
        network.setdefault("sizes", None)
        task.setdefault("options", {})
    net_cfg = base_net.replace(**network)
    task_cfg = base_task.replace(**task)
    explicit_fb = bool({"feedback_rule", "feedback_rule_json"} & set(network))  # replaces the trained ones
    rules = {label: (rule, None if explicit_fb else fb) for label, (rule, fb, _) in zip(labels, loaded)}
    ev = evaluate(rules, network=net_cfg, task=task_cfg, config=config)
    ev.info["source"] = str(spec) if len(specs) == 1 else [str(s) for s in specs]
    target = Path(out) if out is not None else default_out
    if target is not None:
        ev.save(target)
    return ev, target
