r"""The meta-trainer: meta-learn a plasticity rule by backpropagating through the unrolled online inner loop.

For every meta-step ``t`` each run ``s`` draws ``B`` (``meta_batch``) fresh episodes ``(seed_s, t, k)``, adapts a
fresh network on each with the rule (:func:`rulesearch.inner.loop.run_episodes`), and takes one Adam step on

.. math::

    \mathcal{L}_{meta}(\theta) = \frac{1}{B} \sum_{k} \mathrm{CE}\big(f_{W_k(\theta)}(X^{query}_k), Y^{query}_k\big)
    + \lambda \lVert\theta\rVert_1

(Shervani-Tabar & Rosenbaum 2023, Eq. 6, Alg. 1). The defaults are the paper's: Adam with learning rate
``1e-3``, :math:`\theta_0 = 10^{-3}` and the other coefficients 0, no gradient clipping, the L1 term as a
subgradient. Options: gradient clipping, a proximal (soft-thresholding) L1 step in Adam's metric so that
coefficients reach exactly zero (:func:`adam_step`), ``B > 1``, per-layer coefficients ``(L, R)``, several
independent runs trained together as one batch, neural rules (:class:`rulesearch.neural.NeuralRule`).

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
:class:`~rulesearch.errors.DivergenceError`. Parameters are never updated with NaN.

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
>>> from rulesearch.train.meta import RuleSearch, TaskConfig, NetworkConfig, MetaConfig
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

import contextlib
import dataclasses
import datetime
import json
import math
import os
import sys
import time
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import sympy as sp
import torch
from torch import Tensor

from ..errors import ConfigError, DivergenceError, InvalidRuleError, NotFittedError, RunDirectoryError
from ..inner.loop import InnerResult, run_episodes
from ..io.config import Config, option
from ..io.runs import RunDir, run_path
from ..io.stats import bootstrap_ci
from ..lang.export import FORMAT as RULE_FORMAT
from ..lang.export import latex_table, markdown_table
from ..lang.rule import NetworkRule, Pool, Rule
from ..networks.feedforward import ACTIVATIONS, FEEDBACK_MODES, INITS, LOSSES, Network, stack_episodes
from ..neural import DEFAULT_FEATURES, NEURAL_ACTIVATIONS, NeuralRule
from ..neural import FORMAT as NEURAL_FORMAT
from ..tasks.data import DATASETS, Dataset, load_dataset, split_classes
from ..tasks.episodes import TaskSampler, episode_generator
from .distributed import (
    all_reduce_sum,
    broadcast_object,
    gather_objects,
    init_distributed,
    rank_episodes,
    shutdown,
    world,
)

__all__ = [
    "TaskConfig",
    "NetworkConfig",
    "MetaConfig",
    "NeuralConfig",
    "DiscoverConfig",
    "RuleSearch",
    "discover",
    "resolve_rule",
    "load_rule",
    "resolve_feedback_rule",
    "load_feedback_rule",
    "rule_to_json",
    "rule_latex",
    "rule_markdown",
    "coefficient_table",
    "terms_table",
    "export_run",
    "NETWORK_RULE_FORMAT",
    "DEFAULT_HIDDEN",
]

NETWORK_RULE_FORMAT = "rulesearch.network_rule/1"
DEFAULT_HIDDEN = (170, 130, 100, 70)
"""Hidden widths of the paper's network (Shervani-Tabar & Rosenbaum 2023)."""

_RULE_HELP = (
    "The rule to meta-learn: a named rule (pool, f0, ehebb, oja, bio), 'neural' (a NeuralRule, see the neural "
    "section), 'grammar:default' / 'grammar:classic' (every term of that grammar), or the path of a rule JSON file."
)


# ------------------------------------------------------------------------------------------------------------
# Configuration
# ------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TaskConfig(Config):
    """Which tasks the inner loop learns: the dataset and the M-way K-shot Q-query episodes."""

    dataset: str = option("digits", help="Dataset name.", choices=tuple(DATASETS))
    data_dir: str | None = option(
        None, help="Folder (or file) of file datasets such as EMNIST; default $RULESEARCH_DATA or ../shared/data."
    )
    options: dict[str, Any] = option(
        default_factory=dict,
        help="Extra keywords of the dataset loader, e.g. {per_class: 400} for EMNIST or {n_in: 8} for teacher.",
    )
    M: int = option(5, help="Classes per episode (M-way).")
    K: int = option(50, help="Training samples per class (K-shot); an episode has M*K online steps.")
    Q: int = option(10, help="Query samples per class; the meta-loss is the mean query loss.")
    split: str = option(
        "all",
        help="Class split: 'all', 'digits' / 'letters' (47-class EMNIST), or a fraction such as '0.8' of the "
        "classes for meta-training (the rest are held out for evaluation).",
    )
    split_seed: int = option(0, help="Seed of a fractional class split.")
    replacement: bool = option(False, help="Draw the M classes of an episode with replacement (the paper's code).")
    fixed_images: bool = option(
        False, help="Use the first K images of a class for training and the next Q as queries (the paper's code)."
    )
    remap_labels: bool = option(False, help="Label an episode's classes 0..M-1 (M outputs) instead of raw ids.")

    def __post_init__(self):
        super().__post_init__()
        for name, low in (("M", 1), ("K", 1), ("Q", 1)):
            if getattr(self, name) < low:
                raise ConfigError(f"Config key 'task.{name}' must be >= {low}; received {getattr(self, name)}.")
        _split_spec(self.split)

    def load(self) -> Dataset:
        """The dataset (loaded from disk or generated)."""
        return load_dataset(self.dataset, self.data_dir, **self.options)

    def classes(self, dataset: Dataset, side: str = "train") -> list[int] | None:
        """Allowed class ids: the meta-train (``side="train"``) or held-out (``"test"``) side of the split."""
        if dataset.task != "classification":
            return None
        spec = _split_spec(self.split)
        split = split_classes(dataset, spec, seed=self.split_seed)
        if side == "test" and spec == "all":
            raise ConfigError(
                "Held-out classes need a class split: the split is 'all' (meta-train and test classes coincide). "
                "Pass a split such as '0.5', 'digits' or 'letters'."
            )
        return split.meta_train if side == "train" else split.meta_test

    def sampler(self, dataset: Dataset, side: str = "train") -> TaskSampler:
        """A :class:`TaskSampler` over ``dataset`` with these options."""
        return TaskSampler(
            dataset,
            self.M,
            self.K,
            self.Q,
            classes=self.classes(dataset, side),
            replacement=self.replacement,
            remap_labels=self.remap_labels,
            fixed_images=self.fixed_images,
        )


def _split_spec(split: str):
    try:
        x = float(split)
    except ValueError:
        if split not in ("all", "digits", "letters"):
            raise ConfigError(
                f"Config key 'task.split': received {split!r}, expected 'all', 'digits', 'letters' or a fraction "
                f"in (0, 1) such as '0.8'."
            ) from None
        return split
    if not 0.0 < x < 1.0:
        raise ConfigError(f"Config key 'task.split': a fractional split must lie in (0, 1); received {split!r}.")
    return x


@dataclass(frozen=True)
class NetworkConfig(Config):
    """The inner-loop network: sizes, activation and feedback pathway (see :class:`rulesearch.networks.Network`)."""

    sizes: tuple[int, ...] | None = option(
        None,
        help="Layer widths input,...,output; default: the dataset's input size, 170,130,100,70, and its number of "
        "outputs (64-170-130-100-70-10 on digits, 784-170-130-100-70-47 on EMNIST).",
    )
    activation: str = option("softplus", help="Hidden nonlinearity.", choices=ACTIVATIONS)
    beta: float = option(10.0, help="Softplus sharpness beta.")
    feedback: str = option("fa", help="Error pathway: backprop, feedback alignment, ...", choices=FEEDBACK_MODES)
    loss: str = option("ce", help="Inner and query loss: cross-entropy or mean squared error.", choices=LOSSES)
    init: str = option("xavier", help="Initialization of weights and feedback.", choices=INITS)
    gain: float = option(1.0, help="Scale of the initial forward weights.")
    feedback_gain: float = option(1.0, help="Scale of the random feedback matrices.")
    feedback_rule: str | None = option(
        None,
        help="Under feedback 'plastic': the rule that updates the feedback matrices (dB in W's layout), a named rule "
        "(default kp: Kolen-Pollack, -e_i x_j and the decay -B_ji; or f0, pool, ...) or a rule JSON file.",
    )
    feedback_rule_json: dict[str, Any] | None = option(
        None, help="The feedback rule as JSON, e.g. Rule.to_json() in Python (overrides 'feedback_rule')."
    )

    def build(self, n_in: int, n_out: int) -> Network:
        """The :class:`Network` for a dataset with ``n_in`` inputs and ``n_out`` outputs."""
        sizes = self.sizes if self.sizes is not None else (n_in, *DEFAULT_HIDDEN, n_out)
        if sizes[0] != n_in or sizes[-1] != n_out:
            raise ConfigError(
                f"Config key 'network.sizes': received {list(sizes)}, but the task has {n_in} inputs and {n_out} "
                f"outputs; the sizes must start with {n_in} and end with {n_out} (e.g. "
                f"{[n_in, *DEFAULT_HIDDEN, n_out]})."
            )
        return Network(
            sizes=tuple(sizes),
            activation=self.activation,
            beta=self.beta,
            feedback=self.feedback,
            loss=self.loss,
            init=self.init,
            gain=self.gain,
            feedback_gain=self.feedback_gain,
        )


@dataclass(frozen=True)
class MetaConfig(Config):
    """The outer loop: episodes, runs, Adam, L1, divergence handling, checkpoints, device."""

    episodes: int = option(100, help="Meta-steps per run (each draws meta_batch fresh episodes).")
    meta_batch: int = option(1, help="Episodes per meta-step and run (B; the paper uses 1).")
    runs: int = option(1, help="Independent runs (seeds seed, seed+1, ...) trained together as one batch.")
    seed: int = option(0, help="Seed of the first run; episodes are pure functions of (seed, step, k).")
    lr: float = option(1e-3, help="Adam learning rate of the rule parameters.")
    betas: tuple[float, float] = option((0.9, 0.999), help="Adam betas.")
    eps: float = option(1e-8, help="Adam epsilon.")
    l1: float = option(
        0.5,
        help="L1 strength lambda on the coefficients of linear rules (meta-loss = query CE + lambda*|theta|_1). The "
        "paper gives no value for its pool; 0.5 is comparable to the query-loss gradients of the weak terms on digits.",
    )
    l1_mode: str = option(
        "subgradient",
        help="'subgradient': L1 in the meta-loss (the paper); 'proximal': soft-threshold after each Adam step by "
        "lr*lambda/(sqrt(v)+eps), Adam's own metric, so coefficients reach exactly zero (a coefficient stays at 0 "
        "while its mean query-loss gradient is below lambda; with meta.clip, lambda is clipped with the gradient).",
        choices=("subgradient", "proximal"),
    )
    clip: float | None = option(None, help="Clip each run's meta-gradient to this L2 norm (default: no clipping).")
    term_scale: str = option(
        "none",
        help="Adam step size per coefficient of a linear rule (or of a neural rule's skip part): 'none' (lr for "
        "all, the paper) or 'rms': "
        "lr_r = lr * rms(T_ref) / rms(T_r), the RMS of each term's update in a probe episode under the initial rule "
        "(T_ref: the term that starts at theta0), so that one step of any coefficient changes dW about equally "
        "(in the pool, (sum y) e x^T and W are 10-30x larger than e x^T; bilinear-form terms 30-100x smaller); "
        "'capped': the same but never above lr (only large terms get smaller steps: a term that starts tiny, such "
        "as a product of two errors, would otherwise get a step 30-100x lr).",
        choices=("none", "rms", "capped"),
    )
    theta0: float = option(
        1e-3,
        help="Initial learning rate of the pseudo-gradient term -e_i x_j (F0; the first term if the rule has no "
        "such term); the other coefficients start at 0.",
    )
    init_term: str | None = option(None, help="Give theta0 to this term instead (by name).")
    init: tuple[float, ...] | None = option(
        None, help="Initial coefficients, one per term (overrides theta0); per-layer rules repeat them per layer."
    )
    per_layer: bool = option(False, help="One coefficient vector per layer ([L, R]) instead of one shared ([R]).")
    feedback_init: tuple[float, ...] | None = option(
        None,
        help="Initial coefficients of the plastic feedback rule, one per term; default: theta0 for its -e_i x_j term "
        "and 0 for the others.",
    )
    meta_feedback: bool = option(
        True,
        help="Under plastic feedback, meta-learn the feedback rule's coefficients too (a second parameter group, "
        "without L1); false keeps them at their initial values.",
    )
    dtype: str = option("float32", help="Floating-point type of the inner loop.", choices=("float32", "float64"))
    device: str = option("cpu", help="Torch device, e.g. 'cpu', 'cuda', 'cuda:1'.")
    threads: int | None = option(
        1,
        help="CPU threads for torch during the fit (null: torch's own setting). The inner loop's matrices are small: "
        "one thread is usually fastest, and oversubscribed cores on a shared machine are many times slower.",
    )
    checkpoint_every: int = option(10, help="Save a checkpoint every this many meta-steps (and at the end).")
    max_skips: int = option(5, help="Stop a run after this many consecutive skipped (diverged) meta-steps.")
    divergence_bound: float = option(1e3, help="An episode diverges when max |W| exceeds this bound.")
    check_every: int = option(25, help="Check for divergence every this many inner steps.")
    method: str = option(
        "auto",
        help="How the inner loop computes the meta-gradient: 'auto' (the fast adjoint path when the rule allows it), "
        "'adjoint' or 'autograd' (see rulesearch.inner.loop.run_episodes).",
        choices=("auto", "adjoint", "autograd"),
    )
    segment: int | None = option(
        None,
        help="Checkpoint the inner loop in segments of this many online steps (bounded memory; autograd path) or "
        "the snapshot interval of the adjoint path.",
    )
    compare: bool = option(
        True,
        help="At the end, run f0 under fa and under bp on the tasks of the first and last 10% of meta-steps.",
    )
    compare_lr: float | None = option(
        None,
        help="Learning rate of the f0 comparison; default: the learned coefficient of the rule's -e_i x_j term "
        "(theta0 if it has none).",
    )

    def __post_init__(self):
        super().__post_init__()
        for name in ("episodes", "meta_batch", "runs", "checkpoint_every", "max_skips", "check_every"):
            if getattr(self, name) < 1:
                raise ConfigError(f"Config key 'meta.{name}' must be >= 1; received {getattr(self, name)}.")
        for name in ("lr", "eps", "divergence_bound"):
            v = getattr(self, name)
            if not (math.isfinite(v) and v > 0):
                raise ConfigError(f"Config key 'meta.{name}' must be a finite number > 0; received {v}.")
        if not (math.isfinite(self.l1) and self.l1 >= 0):
            raise ConfigError(f"Config key 'meta.l1' must be a finite number >= 0; received {self.l1}.")
        if self.clip is not None and not (math.isfinite(self.clip) and self.clip > 0):
            raise ConfigError(f"Config key 'meta.clip' must be a number > 0 or null; received {self.clip}.")
        if self.segment is not None and self.segment < 1:
            raise ConfigError(f"Config key 'meta.segment' must be >= 1 or null; received {self.segment}.")
        if self.threads is not None and self.threads < 1:
            raise ConfigError(f"Config key 'meta.threads' must be >= 1 or null; received {self.threads}.")
        if not all(0.0 <= b < 1.0 for b in self.betas):
            raise ConfigError(f"Config key 'meta.betas' must lie in [0, 1); received {list(self.betas)}.")
        try:
            torch.device(self.device)
        except (RuntimeError, TypeError) as err:
            raise ConfigError(
                f"Config key 'meta.device': received {self.device!r}, expected a torch device such as 'cpu', "
                f"'cuda' or 'cuda:0'."
            ) from err

    @property
    def torch_dtype(self) -> torch.dtype:
        return torch.float64 if self.dtype == "float64" else torch.float32


@dataclass(frozen=True)
class NeuralConfig(Config):
    """The neural rule (used when ``rule`` is ``'neural'``); see :class:`rulesearch.neural.NeuralRule`."""

    features: tuple[str, ...] = option(
        DEFAULT_FEATURES, help="Synapse features: signal names, contractions (wTpost) or products 'a*b'."
    )
    hidden: tuple[int, ...] = option((16,), help="Hidden widths of the MLP.")
    activation: str = option("tanh", help="Hidden nonlinearity of the MLP.", choices=tuple(NEURAL_ACTIVATIONS))
    skip: bool = option(True, help="Add a linear skip part over the features (starts as -theta0 e_i x_j).")
    checkpoint: bool = option(True, help="Recompute the MLP in the backward pass (bounded memory).")
    init_scale: float = option(1.0, help="Scale of the MLP's initial hidden weights.")
    out_scale: float = option(1e-3, help="Fixed factor on the MLP's output (keeps Adam's first steps small).")

    def build(self) -> NeuralRule:
        return NeuralRule(**{f.name: getattr(self, f.name) for f in dataclasses.fields(self)})

    @classmethod
    def of(cls, rule: NeuralRule) -> NeuralConfig:
        """The structure of a neural rule as a config."""
        return cls(**{f.name: getattr(rule, f.name) for f in dataclasses.fields(cls)})


@dataclass(frozen=True)
class DiscoverConfig(Config):
    """Everything a discovery run needs (``rulesearch discover`` and :class:`RuleSearch`)."""

    rule: str = option("pool", help=_RULE_HELP)
    terms: tuple[str, ...] | None = option(None, help="Keep only these terms of the rule (in this order).")
    rule_json: dict[str, Any] | None = option(
        None, help="The rule as JSON (set when a Rule object is given in Python; overrides 'rule')."
    )
    task: TaskConfig = option(default_factory=TaskConfig, help="Tasks: dataset and episodes.")
    network: NetworkConfig = option(default_factory=NetworkConfig, help="The inner-loop network.")
    meta: MetaConfig = option(default_factory=MetaConfig, help="The outer loop.")
    neural: NeuralConfig = option(default_factory=NeuralConfig, help="The neural rule (rule = 'neural').")

    def __post_init__(self):
        super().__post_init__()
        if self.rule != "neural" and self.neural != NeuralConfig():  # unused: the defaults, so that a run resumes
            object.__setattr__(self, "neural", NeuralConfig())  # whatever the neural defaults were when it started


# ------------------------------------------------------------------------------------------------------------
# Rules: resolution, JSON
# ------------------------------------------------------------------------------------------------------------


def resolve_rule(spec, terms: Sequence[str] | None = None, neural: NeuralConfig | None = None):
    """A rule object from a spec: a :class:`Rule`, :class:`NetworkRule`, :class:`NeuralRule`, :class:`Pool`,
    :class:`~rulesearch.lang.grammar.Grammar`, a named rule, ``'neural'``, ``'grammar:<name>'`` or a JSON file path.

    ``terms`` keeps only the named terms of a linear rule.
    """
    from ..lang.grammar import Grammar
    from ..lang.pools import NAMED_RULES

    rule = spec
    if isinstance(spec, str):
        if spec == "neural":
            rule = (neural or NeuralConfig()).build()
        elif spec.startswith("grammar:"):
            kind = spec.split(":", 1)[1]
            makers = {"default": Grammar.default, "classic": Grammar.classic}
            if kind not in makers:
                raise ConfigError(
                    f"Config key 'rule': unknown grammar {kind!r} in {spec!r}; allowed: "
                    f"{', '.join('grammar:' + k for k in makers)}."
                )
            rule = makers[kind]().rule(f"grammar-{kind}")
        elif spec in NAMED_RULES:
            rule = NAMED_RULES[spec]
        elif _is_rule_file(spec):
            rule = load_rule(spec)
        else:
            allowed = ", ".join([*NAMED_RULES, "neural", "grammar:default", "grammar:classic", "<file>.json"])
            import difflib

            close = difflib.get_close_matches(spec, [*NAMED_RULES, "neural"], n=1)
            hint = f" Did you mean {close[0]!r}?" if close else ""
            raise ConfigError(f"Config key 'rule': received {spec!r}, expected one of {allowed}.{hint}")
    elif isinstance(spec, Grammar):
        rule = spec.rule()
    elif isinstance(spec, Pool):
        rule = spec.rule()
    if not isinstance(rule, (Rule, NetworkRule, NeuralRule)):
        raise ConfigError(
            f"rule must be a Rule, NetworkRule, NeuralRule, Pool, Grammar or a name; received {type(spec).__name__}."
        )
    if terms:
        if not isinstance(rule, Rule):
            raise ConfigError("terms= selects terms of a linear Rule; this rule is a " + type(rule).__name__ + ".")
        rule = rule.select(list(terms))
    if isinstance(rule, Rule) and not rule.is_linear:
        raise ConfigError(
            f"Rule {rule.name!r} is a general expression with free constants; the meta-trainer learns linear rules "
            f"(named terms) and neural rules."
        )
    return rule


def rule_to_json(rule, runs=None, intervals=None) -> dict:
    """JSON of a trained rule object: a :class:`Rule` (``rulesearch.rule/1``), a :class:`NetworkRule` or a
    :class:`NeuralRule`; ``runs`` (per-run values) and ``intervals`` are stored alongside."""
    if isinstance(rule, NeuralRule):
        return rule.to_json(runs=runs)
    if isinstance(rule, NetworkRule):
        out = {
            "format": NETWORK_RULE_FORMAT,
            "groups": [{"layers": list(layers), "rule": r.to_json()} for layers, r in rule.groups],
        }
    else:
        out = rule.to_json()
    if runs is not None:
        out["runs"] = _plain(runs)
    if intervals is not None:
        out["intervals"] = _plain(intervals)
    return out


def _plain(x):
    if torch.is_tensor(x):
        return x.detach().cpu().double().tolist()
    if isinstance(x, np.ndarray):
        return x.astype(float).tolist()
    if isinstance(x, Mapping):
        return {k: _plain(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_plain(v) for v in x]
    return x


def load_rule(source, run: int | None = None):
    """A rule from a JSON file, a dict, or a run directory (its ``rule.json``).

    ``run`` picks the parameters of one run of a multi-run result (default: the mean for linear rules, the first
    run for neural rules).
    """
    data = _rule_data(source)
    fmt = data.get("format")
    if fmt == NEURAL_FORMAT:
        return NeuralRule.from_json(data, run=run if run is not None else (0 if data.get("runs") else None))
    runs = data.get("runs")
    if fmt == NETWORK_RULE_FORMAT:
        groups = []
        for g, item in enumerate(data["groups"]):
            r = Rule.from_json(item["rule"])
            if run is not None:
                r = r.with_values(_run_values(runs, run)[g])
            groups.append((tuple(item["layers"]), r))
        return NetworkRule(groups)
    if fmt == RULE_FORMAT:
        rule = Rule.from_json(data)
        if run is not None:
            rule = rule.with_values(_run_values(runs, run))
        return rule
    raise InvalidRuleError(
        f"Unknown rule file format {fmt!r}; expected {RULE_FORMAT!r}, {NETWORK_RULE_FORMAT!r} or a neural rule."
    )


def _rule_data(source) -> Mapping:
    """The JSON object of a rule file, a run directory's ``rule.json``, or a dict."""
    data = source
    if isinstance(source, (str, os.PathLike)):
        path = Path(source)
        if path.is_dir():
            path = path / "rule.json"
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError as err:
            raise InvalidRuleError(f"Rule file {str(path)!r} does not exist.") from err
        except json.JSONDecodeError as err:
            raise InvalidRuleError(f"Rule file {str(path)!r} is not valid JSON: {err}.") from err
    if not isinstance(data, Mapping):
        raise InvalidRuleError(f"A rule file holds a JSON object; received {type(data).__name__}.")
    return data


def _run_values(runs, run):
    if not runs or not 0 <= run < len(runs):
        raise InvalidRuleError(f"The rule file holds {len(runs or [])} runs; run {run} does not exist.")
    return runs[run]


def resolve_feedback_rule(spec=None) -> Rule:
    """The linear rule that updates the feedback matrices under plastic feedback (``dfb`` in W's layout).

    ``spec``: a :class:`Rule`, a rule JSON dict, a named feedback rule (``kp``, Kolen-Pollack, the default), a named
    rule of :func:`resolve_rule` (``f0``, ...) or a rule JSON file. One coefficient vector serves all layers.
    """
    from ..lang.pools import FEEDBACK_RULES, NAMED_RULES

    spec = "kp" if spec is None else spec
    if isinstance(spec, str) and spec in FEEDBACK_RULES:
        return FEEDBACK_RULES[spec]
    if isinstance(spec, Mapping):
        rule = load_rule(spec)
    elif isinstance(spec, str) and not (spec in NAMED_RULES or _is_rule_file(spec)):
        names = ", ".join([*FEEDBACK_RULES, *NAMED_RULES])
        raise ConfigError(
            f"Config key 'network.feedback_rule': received {spec!r}, expected one of {names} or a rule JSON file."
        )
    else:
        rule = resolve_rule(spec)
    if not isinstance(rule, Rule):
        raise ConfigError(
            f"The feedback rule must be a linear Rule (one coefficient vector shared by all layers); received a "
            f"{type(rule).__name__}. Use a named rule such as 'kp' or a rule JSON file of format {RULE_FORMAT!r}."
        )
    return rule


def load_feedback_rule(source, run: int | None = None) -> Rule | None:
    """The plastic feedback rule trained with a rule (``feedback_rule`` of a ``rule.json``), or None if it has none.

    ``source`` as for :func:`load_rule`; ``run`` picks one run's coefficients (default: the mean over runs).
    """
    data = _rule_data(source).get("feedback_rule")
    if data is None:
        return None
    rule = Rule.from_json(data)
    return rule if run is None else rule.with_values(_run_values(data.get("runs"), run))


# ------------------------------------------------------------------------------------------------------------
# Learners: how a rule's parameters are laid out, expanded per episode, penalized and logged
# ------------------------------------------------------------------------------------------------------------


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


class _Linear:
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


class _Neural:
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

    def l1(self, params):
        return None

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


class _WithFeedback:
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

    def l1(self, params: dict[str, Tensor]):
        return self.base.l1(self._forward(params))

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


def _learner(rule, n_layers: int, meta: MetaConfig):
    if isinstance(rule, NeuralRule):
        if meta.per_layer:
            raise ConfigError("meta.per_layer applies to linear rules; a neural rule is shared by all layers.")
        return _Neural(rule, n_layers, meta)
    return _Linear(rule, n_layers, meta)


# ------------------------------------------------------------------------------------------------------------
# Training state and the trainer
# ------------------------------------------------------------------------------------------------------------


@dataclass
class _State:
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
    def from_checkpoint(cls, data: Mapping, like: _State, device) -> _State:
        def dev(d, ref):
            if set(d) != set(ref):
                raise RunDirectoryError(
                    f"Checkpoint parameters {sorted(d)} do not match the rule's {sorted(ref)}; the run directory "
                    f"belongs to another rule."
                )
            out = {}
            for k, v in d.items():
                if tuple(v.shape) != tuple(ref[k].shape):
                    raise RunDirectoryError(
                        f"Checkpoint parameter {k!r} has shape {tuple(v.shape)}, expected {tuple(ref[k].shape)}."
                    )
                out[k] = v.to(device=device, dtype=ref[k].dtype)
            return out

        return cls(
            t=int(data["t"]),
            params=dev(data["params"], like.params),
            m=dev(data["adam_m"], like.params),
            v=dev(data["adam_v"], like.params),
            steps=data["adam_steps"].to(device),
            skips=data["skips"].to(device),
            stopped=data["stopped"].to(device),
            stop_step=data["stop_step"].to(device),
        )


class _Problem:
    """Everything fixed for a fit: data, sampler, network, learner, seeds."""

    def __init__(self, cfg: DiscoverConfig, rule, device: torch.device | None = None):
        self.cfg = cfg
        meta = cfg.meta
        self.dataset = cfg.task.load()
        self.sampler = cfg.task.sampler(self.dataset, "train")
        self.net = cfg.network.build(self.dataset.n_features, self.sampler.n_outputs)
        self.rule = rule
        self.learner = _learner(rule, self.net.n_layers, meta)
        feedback_rule = self._feedback_rule()
        if feedback_rule is not None:
            self.learner = _WithFeedback(self.learner, feedback_rule, meta)
        self.update = self.learner.update(self.net)
        self._check_signals()
        self.dtype = meta.torch_dtype
        self.device = _device(meta.device) if device is None else device
        self.seeds = [meta.seed + s for s in range(meta.runs)]
        self.B = meta.meta_batch

    def _check_signals(self):
        ups = self.update if isinstance(self.update, list) else [self.update]
        needs = set().union(*(u.needs for u in ups))
        if "fb" in needs and not self.net.has_fb:
            raise ConfigError(
                f"The rule reads the feedback matrix 'fb', which feedback mode {self.net.feedback!r} does not have; "
                f"use network.feedback 'fa', 'sign', 'plastic' or 'bp'."
            )

    def _feedback_rule(self) -> Rule | None:
        """The plastic feedback rule; None for other feedback modes (where setting one is an error)."""
        net, meta = self.cfg.network, self.cfg.meta
        spec = net.feedback_rule_json if net.feedback_rule_json is not None else net.feedback_rule
        if self.net.feedback == "plastic":
            return resolve_feedback_rule(spec)
        given = [k for k, v in (("network.feedback_rule", spec), ("meta.feedback_init", meta.feedback_init)) if v]
        if given:
            raise ConfigError(
                f"Config key(s) {', '.join(given)} set, but network.feedback is {self.net.feedback!r}: a feedback "
                f"rule applies to network.feedback 'plastic' only. Set network.feedback to 'plastic' or drop them."
            )
        return None

    def feedback_kwargs(self, expanded: dict[str, Tensor]) -> dict:
        """``feedback_update`` and ``feedback_params`` of :func:`run_episodes` (none unless plastic)."""
        if not isinstance(self.learner, _WithFeedback):
            return {}
        learner = self.learner
        return {"feedback_update": learner.feedback_update, "feedback_params": learner.feedback_params(expanded)}

    def episodes(
        self,
        t: int | Sequence[int],
        runs: Sequence[int],
        net: Network | None = None,
        ks: Sequence[Sequence[int]] | None = None,
    ):
        """The batch and initial weights/feedback of the episodes ``(seed_s, t, k)`` for ``s in runs``, ``k < B``
        (rows ordered by step, then run, then k); ``t`` may be a list of meta-steps, ``ks`` the episode indices of
        each run (a data-parallel rank's share)."""
        net = net or self.net
        ks = [range(self.B)] * len(runs) if ks is None else ks
        items = [(self.seeds[s], tt, kk) for tt in ([t] if isinstance(t, int) else t) for s, kk in zip(runs, ks)]
        return stack_episodes(self.sampler, net, items, self.dtype, self.device)


@contextlib.contextmanager
def threads(n: int | None):
    """Run a block with ``torch.set_num_threads(n)`` (no change for None), restoring the old count after."""
    old = torch.get_num_threads()
    if n is not None:
        torch.set_num_threads(n)
    try:
        yield
    finally:
        if n is not None:
            torch.set_num_threads(old)


def _device(name: str) -> torch.device:
    dev = torch.device(name)
    if dev.type == "cuda" and not torch.cuda.is_available():
        from ..errors import BackendUnavailableError

        raise BackendUnavailableError(
            f"Config key 'meta.device' is {name!r} but CUDA is not available (torch {torch.__version__}, "
            f"cuda {torch.version.cuda}). Install a CUDA build of torch (pip install torch without "
            f"-c constraints.txt) on a machine with a GPU, or use --device cpu."
        )
    if dev.type == "mps" and not torch.backends.mps.is_available():
        from ..errors import BackendUnavailableError

        raise BackendUnavailableError(f"Config key 'meta.device' is {name!r} but MPS is not available; use cpu.")
    return dev


@contextlib.contextmanager
def _process_group(distributed: bool | None, device: str):
    """``(device, (rank, world_size))`` of this process for a fit: data-parallel under torchrun (``WORLD_SIZE`` > 1)
    or in an initialized process group unless ``distributed`` is False; a group joined here is left on exit."""
    dev = _device(device)
    active = world()[1] > 1
    if distributed is False or not (active or int(os.environ.get("WORLD_SIZE", "1")) > 1):
        if distributed:
            raise ConfigError(
                "distributed=True (--distributed) needs several processes, but this one runs alone (WORLD_SIZE "
                "unset or 1). Launch it with torchrun --nproc_per_node=N, or leave distributed unset."
            )
        yield dev, (0, 1)
        return
    dev = init_distributed(device=dev)
    try:
        yield dev, world()
    finally:
        if not active:
            shutdown()


def _term_ms(update, eye: Tensor, signals) -> Tensor:
    """Per episode the mean square over the synapses of every term ``F_r`` of a compiled linear rule (``theta`` the
    one-hot rows of ``eye``): ``(B, R)``."""
    return torch.stack([update(signals, e).pow(2).mean((-2, -1)) for e in eye], -1)


def _rms_multipliers(
    learner, init: dict[str, Tensor], sums: list[Tensor], cap: float = float("inf")
) -> dict[str, Tensor]:
    """``min(cap, rms(T_ref) / rms(T_r))`` per parameter name from per-layer RMS sums ``sums[layer][r]`` (see
    :meth:`_Trainer.lr_scale`); ``T_ref`` is the term with the largest initial ``|theta|`` in that layout."""
    base = getattr(learner, "base", learner)
    out = {}
    for k, v in init.items():
        if k == _FB:
            continue
        if isinstance(base, _Neural) or base.kind == "shared":
            rms = torch.stack(sums).mean(0)
        elif base.kind == "per_layer":
            rms = torch.stack(sums)
        else:
            g = base.names.index(k)
            rms = torch.stack([sums[layer] for layer in range(base.n_layers) if base.rule.group_of(layer) == g]).mean(0)
        ref = rms.gather(-1, v[0].abs().double().cpu().reshape(rms.shape).argmax(-1, keepdim=True))
        mult = torch.where(rms > 0, ref / rms.clamp_min(1e-300), torch.ones_like(rms)).clamp(max=cap)
        out[k] = mult.to(dtype=v.dtype, device=v.device)
    return out


def adam_step(p, g, m, v, t, lr, betas, eps, l1=None):
    r"""One Adam step (bias-corrected; ``t`` >= 1, the step count as a tensor) on ``p`` with gradient ``g``; returns
    ``(p, m, v)``.

    With ``l1`` (a number or a tensor that broadcasts to ``p``) the step is proximal in Adam's own metric
    :math:`D = \sqrt{\hat v} + \epsilon`: :math:`p \leftarrow S_{\eta\lambda/D}(p - \eta \hat m / D)`, the
    soft threshold :math:`S_\tau(u) = \mathrm{sign}(u)\max(|u| - \tau, 0)`. So a coefficient stays exactly zero
    while its mean loss gradient is below ``l1`` (the KKT condition of ``loss + l1 * |p|_1``), whatever the
    gradient's scale; ``lr`` may be a tensor (per-coefficient step sizes).
    """
    b1, b2 = betas
    m = m * b1 + g * (1 - b1)
    v = v * b2 + g * g * (1 - b2)
    denom = v.sqrt() / (1 - b2**t).sqrt() + eps
    p = p - (lr / (1 - b1**t)) * m / denom
    if l1 is not None:
        tau = lr * l1 / denom
        p = torch.sign(p) * torch.clamp(p.abs() - tau, min=0.0)
    return p, m, v


class _Trainer:
    """The meta-training loop over a :class:`_Problem` (state in :class:`_State`)."""

    def __init__(self, problem: _Problem, world: tuple[int, int] = (0, 1)):
        self.p = problem
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
        base = getattr(p.learner, "base", p.learner)
        neural = isinstance(base, _Neural) and "skip" in init
        if self.meta.term_scale != "none" and (p.learner.linear or neural):
            if neural:  # the skip part a^T phi: term f is the feature phi_f, the same in every layer
                rule = base.rule
                sums = [torch.zeros(rule.n_features, dtype=torch.float64) for _ in range(p.net.n_layers)]

                def rms_of(layer, signals):
                    feats = rule.features_of(signals)
                    return torch.stack([feats[f].pow(2).mean().sqrt() for f in rule.features])
            else:
                ups = p.update if isinstance(p.update, list) else [p.update] * p.net.n_layers
                sums = [torch.zeros(u.n_params, dtype=torch.float64) for u in ups]
                eyes = [torch.eye(u.n_params, dtype=p.dtype, device=p.device) for u in ups]  # one term at a time

                def rms_of(layer, signals):
                    return _term_ms(ups[layer], eyes[layer], signals).mean(0).sqrt()

            def observe(step, layer, signals, dW):
                sums[layer] += rms_of(layer, signals).double().cpu()

            batch, weights, feedback = p.episodes(0, [0])
            expanded = {k: v.repeat_interleave(p.B, dim=0) for k, v in init.items()}
            with torch.no_grad():
                run_episodes(
                    p.net, batch, p.update, p.learner.layer_params(expanded), weights, feedback, observe=observe,
                    metrics=False, raise_on_divergence=False, **p.feedback_kwargs(expanded),
                )  # fmt: skip
            cap = 1.0 if self.meta.term_scale == "capped" else math.inf
            scale.update(_rms_multipliers(p.learner, {"skip": init["skip"]} if neural else init, sums, cap))
        self._lr_scale = scale
        return scale

    def fresh_state(self) -> _State:
        p = self.p
        params = p.learner.init(p.seeds, p.dtype, p.device)
        S = len(p.seeds)
        dev = p.device
        return _State(
            t=0,
            params=params,
            m={k: torch.zeros_like(v) for k, v in params.items()},
            v={k: torch.zeros_like(v) for k, v in params.items()},
            steps=torch.zeros(S, dtype=torch.long, device=dev),
            skips=torch.zeros(S, dtype=torch.long, device=dev),
            stopped=torch.zeros(S, dtype=torch.bool, device=dev),
            stop_step=torch.full((S,), -1, dtype=torch.long, device=dev),
        )

    def validate(self, st: _State) -> None:
        """Two online steps of one episode (no gradients): surfaces signal, shape and device errors before a run
        directory is created."""
        p = self.p
        batch, weights, feedback = p.episodes(0, [0])
        small = (batch[0][:, :2], batch[1][:, :2], batch[2][:, :1], batch[3][:, :1])
        expanded = {k: v[:1].repeat_interleave(p.B, dim=0) for k, v in st.params.items()}
        with torch.no_grad():
            run_episodes(
                p.net, small, p.update, p.learner.layer_params(expanded), weights, feedback, metrics=False,
                raise_on_divergence=False, **p.feedback_kwargs(expanded),
            )  # fmt: skip

    def _inner(self, t: int, runs: list[int], params: dict[str, Tensor], grad: bool):
        """This rank's share of the episodes ``(run, k)`` of ``runs`` (all of them in a single process): the inner
        result (None for an empty share), the per-run leaves ``[len(runs), ...]`` and each result row's run index
        into ``runs``."""
        p = self.p
        share = rank_episodes(len(runs) * p.B, self.rank, self.world_size)  # flat episode index i * B + k
        rows = torch.tensor([j // p.B for j in share], dtype=torch.long, device=p.device)
        idx = torch.tensor(runs, device=p.device)
        leaves = {k: v.index_select(0, idx).detach().requires_grad_(grad) for k, v in params.items()}
        if not share:
            return None, leaves, rows
        mine = sorted({j // p.B for j in share})
        ks = [[j % p.B for j in share if j // p.B == i] for i in mine]
        batch, weights, feedback = p.episodes(t, [runs[i] for i in mine], ks=ks)
        expanded = {k: v.index_select(0, rows) for k, v in leaves.items()}
        with torch.set_grad_enabled(grad):
            res = run_episodes(
                p.net,
                batch,
                p.update,
                p.learner.layer_params(expanded),
                weights,
                feedback,
                divergence_bound=self.meta.divergence_bound,
                check_every=self.meta.check_every,
                method=self.meta.method,
                checkpoint_every=self.meta.segment,
                raise_on_divergence=False,
                **p.feedback_kwargs(expanded),
            )
        return res, leaves, rows

    def _per_run(self, res: InnerResult | None, rows: Tensor, n: int):
        """Per-run query loss of this rank's episodes divided by ``B`` (summed over the ranks: the mean over the
        meta-batch), and whether an episode of the run diverged on any rank."""
        p = self.p
        loss = torch.zeros(n, dtype=p.dtype, device=p.device)
        div = torch.zeros(n, dtype=p.dtype, device=p.device)
        if res is not None:
            loss = loss.index_add(0, rows, res.loss) / p.B
            div = div.index_add(0, rows, (res.diverged | ~torch.isfinite(res.loss.detach())).to(p.dtype))
        if self.world_size > 1:
            all_reduce_sum([div])
        return loss, div > 0

    def _gathered(self, res: InnerResult | None):
        """The per-episode metrics of every rank's share, in meta-batch order (``res`` itself in a single process)."""
        if self.world_size == 1:
            return res
        fields = ("loss", "accuracy", "diverged", "angles", "ew")
        mine = None if res is None else [getattr(res, f).detach().cpu() for f in fields]
        parts = [x for x in gather_objects(mine) if x is not None]
        return SimpleNamespace(**{f: torch.cat([x[i] for x in parts]) for i, f in enumerate(fields)})

    def step(self, st: _State) -> list[dict]:
        """One meta-step for every running run; returns the metric rows."""
        meta, p = self.meta, self.p
        t0 = time.perf_counter()
        t = st.t
        active = [s for s in range(len(p.seeds)) if not bool(st.stopped[s])]
        results: dict[int, tuple[InnerResult, int]] = {}
        bad: set[int] = set()
        current = active
        while current:  # diverged runs are dropped and the rest recomputed: NaNs would poison the gradient
            res, leaves, rows = self._inner(t, current, st.params, grad=True)
            loss_run, div = self._per_run(res, rows, len(current))
            full = self._gathered(res)
            results.update({s: (full, i) for i, s in enumerate(current)})
            new_bad = {s for s, d in zip(current, div.tolist()) if d}
            if not new_bad:
                break
            bad |= new_bad
            current = [s for s in current if s not in new_bad]
            del res, leaves, loss_run
        grads: dict[int, dict[str, Tensor]] = {}
        grad_norm: dict[int, float] = {}
        if current:
            total = loss_run.sum()
            l1 = p.learner.l1(leaves)
            if l1 is not None and meta.l1 > 0 and meta.l1_mode == "subgradient" and self.rank == 0:  # counted once
                total = total + meta.l1 * l1.sum()
            names = list(leaves)
            g = [None] * len(names)
            if total.requires_grad:  # a rank without episodes contributes zeros
                g = torch.autograd.grad(total, [leaves[k] for k in names], allow_unused=True)
            g = {k: (torch.zeros_like(leaves[k]) if gi is None else gi.detach()) for k, gi in zip(names, g)}
            if self.world_size > 1:  # every rank now holds the meta-gradient of the whole meta-batch
                all_reduce_sum(g.values())
            norms = torch.sqrt(sum(gi.flatten(1).pow(2).sum(1) for gi in g.values()))
            for i, s in enumerate(current):
                gs = {k: gi[i] for k, gi in g.items()}
                if not all(bool(torch.isfinite(x).all()) for x in gs.values()):
                    continue
                grads[s] = gs
                grad_norm[s] = float(norms[i])
            del total, leaves, loss_run
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

    def _adam(self, st: _State, grads: dict[int, dict[str, Tensor]]) -> set[int]:
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
            if self.p.learner.linear and k != _FB and meta.l1_mode == "proximal" and meta.l1 > 0:
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

    def _row(self, st, t, s, res: InnerResult, i: int, skipped: bool, grad_norm: float, l1: float, seconds: float):
        """The metrics row of run ``s`` at meta-step ``t`` (``res`` rows ``i*B .. (i+1)*B``)."""
        B = self.p.B
        sl = slice(i * B, (i + 1) * B)
        with torch.no_grad():
            query = float(res.loss[sl].detach().double().mean())
            acc = float(res.accuracy[sl].double().mean())
        row = {
            "step": t + 1,
            "run": s,
            "seed": self.p.seeds[s],
            "meta_loss": query + l1,
            "query_loss": query,
            "l1": l1,
            "meta_accuracy": acc,
            "skipped": int(skipped),
            "diverged": int(res.diverged[sl].sum()),
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


# ------------------------------------------------------------------------------------------------------------
# The estimator
# ------------------------------------------------------------------------------------------------------------


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

    Attributes
    ----------
    theta_ : Tensor, shape (S, R) or (S, L, R)
        Learned coefficients of every run (linear rules; a list per group for a :class:`NetworkRule`).
    params_ : dict of Tensor
        Learned parameters of every run, each with a leading run dimension ``S``.
    rule_ : Rule, NetworkRule or NeuralRule
        The learned rule: mean coefficients over runs (linear), the first run's parameters (neural).
    rules_ : list
        The learned rule of every run.
    intervals_ : array, shape (R, 2) or (L, R, 2), or None
        95% bootstrap intervals of the coefficients across runs (linear rules, ``S > 1``).
    feedback_rule_ : Rule or None
        Under plastic feedback: the feedback rule with its mean learned (or fixed) coefficients over runs.
    feedback_theta_ : Tensor, shape (S, R_fb), or None
        Under plastic feedback: every run's feedback-rule coefficients.
    history_ : pandas.DataFrame
        One row per meta-step and run (the columns of ``metrics.csv``).
    summary_ : dict
        Mean meta-accuracy of the first and last 10% of meta-steps, the f0 comparison, stopped runs.
    run_ : RunDir or None
        The run directory (None on the other ranks of a data-parallel fit: rank 0 writes it).
    world_ : tuple of int
        ``(rank, world_size)`` of the fit; ``(0, 1)`` in a single process.
    n_runs_, n_steps_ : int
        Runs and meta-steps trained.

    Examples
    --------
    >>> from rulesearch.train.meta import RuleSearch, MetaConfig, TaskConfig
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

    # ---- sklearn-style parameters -------------------------------------------------------------------------
    _PARAMS = (
        "rule", "network", "task", "meta", "neural", "terms", "out", "name", "resume", "progress", "callback",
        "distributed",
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
                rule_json = _strip_values(rule_to_json(obj))
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
        with _process_group(self.distributed, meta.device) as (device, ranks), threads(meta.threads):
            problem = _Problem(cfg, rule, device)
            trainer = _Trainer(problem, ranks)
            state = trainer.fresh_state()
            trainer.validate(state)
            rows: list[dict] = []
            if path is not None and trainer.rank == 0:
                run = RunDir.create(
                    path,
                    cfg,
                    resume=self.resume,
                    seed=meta.seed,
                    device=meta.device,
                    manifest_extra={
                        "runs": meta.runs,
                        "seeds": problem.seeds,
                        "threads_requested": meta.threads,
                        "world_size": trainer.world_size,
                    },
                )
                if self.resume:
                    loaded = run.resume(map_location="cpu")
                    if loaded is not None:
                        state = _State.from_checkpoint(loaded[1], state, problem.device)
                        df = run.read_metrics()
                        rows = df.to_dict("records") if not df.empty else []
            if trainer.world_size > 1:  # every rank continues from rank 0's (resumed) state
                checkpoint, rows = broadcast_object((state.to_checkpoint(), rows))
                state = _State.from_checkpoint(checkpoint, state, problem.device)
            self.run_ = run
            self.world_ = ranks
            self._problem = problem
            self._fit_loop(trainer, state, rows, run)
        return self

    def _fit_loop(self, trainer: _Trainer, state: _State, rows: list[dict], run: RunDir | None):
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
                for s in stopped_now if trainer.rank == 0 else ():
                    warnings.warn(
                        f"Run {s} (seed {problem.seeds[s]}) stopped at meta-step {state.t}: {meta.max_skips} "
                        f"consecutive meta-steps diverged and were skipped. Lower meta.lr or the initial "
                        f"coefficients, or raise meta.divergence_bound.",
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
            raise DivergenceError(
                f"Every run stopped: {meta.max_skips} consecutive meta-steps diverged (steps "
                f"{state.stop_step.tolist()}); no parameters were updated with NaN.{where} Lower meta.lr, "
                f"meta.theta0 or the initial coefficients, use meta.clip, or raise meta.divergence_bound."
            )
        if meta.compare and trainer.rank == 0:
            self.summary_.update(self._compare(state, problem))
        if run is not None:
            self._write_outputs(run)
            run.mark_finished(_plain(self.summary_))

    # ---- fitted state ---------------------------------------------------------------------------------------
    def _set_fitted(self, state: _State, rows: list[dict], problem: _Problem):
        import pandas as pd

        learner = problem.learner
        params = {k: v.detach().cpu() for k, v in state.params.items()}
        S = len(problem.seeds)
        self.params_ = params
        self.theta_ = None
        self.intervals_ = None
        if learner.linear:
            self.theta_ = params["theta"] if "theta" in params else [params[k] for k in learner.names]
            if S > 1:
                if "theta" in params:
                    _, lo, hi = bootstrap_ci(params["theta"].double().numpy(), axis=0)
                    self.intervals_ = np.stack([lo, hi], -1)
                else:
                    self.intervals_ = [
                        np.stack(bootstrap_ci(params[k].double().numpy(), axis=0)[1:], -1) for k in learner.names
                    ]
        self.rule_ = learner.trained(params, None)
        self.rules_ = [learner.trained(params, s) for s in range(S)]
        self.feedback_rule_ = self.feedback_theta_ = None
        if isinstance(learner, _WithFeedback):
            self.feedback_rule_ = learner.trained_feedback(params, None)
            self.feedback_theta_ = torch.stack([learner.feedback_values(params, s) for s in range(S)])
        self.history_ = pd.DataFrame(rows)
        self.n_runs_ = S
        self.n_steps_ = state.t
        self.stopped_runs_ = [s for s in range(S) if bool(state.stopped[s])]
        self.summary_ = self._summary(rows, state)

    def _check_fitted(self):
        if not hasattr(self, "rule_"):
            raise NotFittedError(
                "This RuleSearch is not fitted yet; call .fit() first (or RuleSearch.from_run(path) for a saved run)."
            )

    def _windows(self, n_steps: int) -> tuple[range, range]:
        n = max(1, int(round(0.1 * n_steps)))
        return range(0, n), range(max(0, n_steps - n), n_steps)

    def _summary(self, rows, state: _State) -> dict:
        meta = self._problem.cfg.meta
        first, last = self._windows(state.t)
        out: dict[str, Any] = {
            "steps": state.t,
            "runs": len(self._problem.seeds),
            "window": len(first),
            "stopped_runs": [s for s in range(len(self._problem.seeds)) if bool(state.stopped[s])],
        }

        def mean_acc(window):
            vals = [r["meta_accuracy"] for r in rows if (int(r["step"]) - 1) in window and not int(r.get("skipped", 0))]
            return float(np.nanmean(vals)) if vals else float("nan")

        out["rule_first"] = mean_acc(first)
        out["rule_last"] = mean_acc(last)
        out["meta_batch"] = meta.meta_batch
        return out

    def compare_lr(self) -> float:
        """Learning rate of the f0 comparison: ``meta.compare_lr``, else the learned coefficient of the rule's
        :math:`-e_i x_j` term (mean over runs and layers), else ``meta.theta0``."""
        self._check_fitted()
        meta = self._problem.cfg.meta
        if meta.compare_lr is not None:
            return meta.compare_lr
        lr = _pseudo_gradient_lr(self.rule_)
        return lr if lr is not None and lr > 0 else meta.theta0

    def _compare(self, state: _State, problem: _Problem) -> dict:
        """f0 under fa and under bp on the episodes of the first and last 10% of meta-steps (no gradients)."""
        from ..inner.loop import f0 as f0_update

        lr = self.compare_lr()
        first, last = self._windows(state.t)
        runs = [s for s in range(len(problem.seeds)) if not bool(state.stopped[s])]
        out: dict[str, Any] = {"compare_lr": lr}
        theta = torch.tensor(lr, dtype=problem.dtype, device=problem.device)
        for label, window in (("first", first), ("last", last)):
            for mode in ("fa", "bp"):
                net = dataclasses.replace(problem.net, feedback=mode)
                accs = []
                for chunk in _chunks(list(window), max(1, 64 // max(1, len(runs) * problem.B))):
                    batch, weights, feedback = problem.episodes(chunk, runs, net)
                    with torch.no_grad():
                        res = run_episodes(
                            net, batch, f0_update, theta, weights, feedback, metrics=False,
                            divergence_bound=problem.cfg.meta.divergence_bound, raise_on_divergence=False,
                        )  # fmt: skip
                    accs.append(torch.where(res.diverged, torch.zeros_like(res.accuracy), res.accuracy).double().cpu())
                out[f"f0_{mode}_{label}"] = float(torch.cat(accs).mean()) if accs else float("nan")
        return out

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
        plot_run(run)

    def _run_values(self):
        learner = self._problem.learner if hasattr(self, "_problem") else None
        if isinstance(self.rule_, NeuralRule):
            return [{k: v[s] for k, v in self.params_.items() if k != _FB} for s in range(self.n_runs_)]
        if learner is not None and learner.kind == "groups":
            return [[self.params_[k][s] for k in learner.names] for s in range(self.n_runs_)]
        return self.params_["theta"]

    # ---- reload -----------------------------------------------------------------------------------------------
    @classmethod
    def from_run(cls, path: str | os.PathLike, *, progress: bool = False) -> RuleSearch:
        """Reload a run directory: its config, the newest checkpoint's parameters and the metrics.

        A finished run gives the final result; an unfinished one the state at its newest checkpoint.
        """
        run = RunDir.open(path)
        cfg = DiscoverConfig.from_dict(run.config())
        search = cls.from_config(cfg, out=run.path, progress=progress)
        rule = resolve_rule(load_rule(cfg.rule_json) if cfg.rule_json else cfg.rule, cfg.terms, cfg.neural)
        problem = _Problem(cfg.replace(**{"meta.device": "cpu"}), rule)  # inspect on the CPU, whatever trained it
        state = _Trainer(problem).fresh_state()
        loaded = run.load_checkpoint(map_location="cpu")
        if loaded is None:
            raise RunDirectoryError(f"Run {str(run.path)!r} has no checkpoint yet; nothing to load.")
        state = _State.from_checkpoint(loaded[1], state, problem.device)
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
            p.learner, _WithFeedback
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
        """The learned rule as JSON (with every run's values; the plastic feedback rule under ``feedback_rule``)."""
        self._check_fitted()
        out = rule_to_json(self.rule_, runs=self._run_values(), intervals=self.intervals_)
        if self.feedback_rule_ is not None:
            out["feedback_rule"] = rule_to_json(self.feedback_rule_, runs=self.feedback_theta_)
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
            expr = sp.sstr(r.sympy().evalf(precision))
            prefix = f"layers {', '.join(str(i + 1) for i in layers)}: " if layers else ""
            out.append(f"{prefix}dW_ij = {expr}")
        return _with_feedback("\n".join(out), self.feedback_rule_, "formula", precision)

    def report(self, markdown: bool = False) -> str:
        """What ``rulesearch discover`` prints: the rule, its coefficients, first/last 10% meta-accuracy beside
        f0 under fa and bp on the same tasks, and the run directory."""
        self._check_fitted()
        s = self.summary_
        runs = f"mean of {self.n_runs_} runs" if self.n_runs_ > 1 else "1 run"
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
        if "compare_lr" in s:
            lines.append(f"f0 learning rate: {s['compare_lr']:.4g} (same tasks and initial weights)")
        if s.get("stopped_runs"):
            lines.append(f"stopped (diverged) runs: {s['stopped_runs']}")
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


# ------------------------------------------------------------------------------------------------------------
# Text exports of trained rules (also used by `rulesearch export` on a run directory)
# ------------------------------------------------------------------------------------------------------------


def _groups(rule) -> list[tuple[tuple[int, ...], Rule]]:
    return list(rule.groups) if isinstance(rule, NetworkRule) else [((), rule)]


def _group_intervals(rule, intervals, g: int):
    if intervals is None:
        return None
    iv = intervals[g] if isinstance(rule, NetworkRule) else intervals
    return np.asarray(iv, dtype=float)


def _layers_label(layers) -> str:
    return f"layers {', '.join(str(i + 1) for i in layers)}" if len(layers) > 1 else f"layer {layers[0] + 1}"


def rule_latex(rule, intervals=None, precision: int = 3) -> str:
    """LaTeX of a trained rule: the update and a booktabs coefficient table (``intervals``: ``(R, 2)`` for a
    Rule, one ``(R_g, 2)`` per group of a NetworkRule; shown as ``mean [lo, hi]``)."""
    if isinstance(rule, NeuralRule):
        return f"% {rule.describe()}\n% A neural rule has no closed form; distill it to get one."
    groups = _groups(rule)
    if not isinstance(rule, NetworkRule):
        ivs = (
            [intervals.tolist() if isinstance(intervals, np.ndarray) else intervals] if intervals is not None else None
        )
        return rule.latex(precision) + "\n\n" + latex_table([rule], precision=precision, intervals=ivs)
    eqs = [rf"\text{{{_layers_label(layers)}}}:\quad " + r.latex(precision) for layers, r in groups]
    rules = [Rule(r.terms, _layers_label(layers), values=r.values) for layers, r in groups]
    if not all(r.terms == rules[0].terms for r in rules):
        return (
            "\n".join(eqs)
            + "\n\n"
            + "\n\n".join(
                latex_table(
                    [r],
                    precision=precision,
                    intervals=None if intervals is None else [_group_intervals(rule, intervals, g).tolist()],
                )
                for g, r in enumerate(rules)
            )
        )
    ivs = None if intervals is None else [_group_intervals(rule, intervals, g).tolist() for g in range(len(rules))]
    return "\n".join(eqs) + "\n\n" + latex_table(rules, precision=precision, intervals=ivs)


def rule_markdown(rule, intervals=None, precision: int = 4) -> str:
    """Markdown coefficient table(s) of a trained rule, with a 95% interval column when ``intervals`` is given."""
    if isinstance(rule, NeuralRule):
        return _neural_table(rule, precision)
    blocks = []
    for g, (layers, r) in enumerate(_groups(rule)):
        table = markdown_table(r, precision=precision)
        iv = _group_intervals(rule, intervals, g)
        if iv is not None:
            lines = table.split("\n")
            lines[0] += " 95% interval |"
            lines[1] += "---|"
            for i, (lo, hi) in enumerate(iv):
                lines[2 + i] += f" [{lo:.{precision}g}, {hi:.{precision}g}] |"
            table = "\n".join(lines)
        blocks.append((f"**{_layers_label(layers)}**\n\n" if layers else "") + table)
    return "\n\n".join(blocks)


def _neural_table(rule: NeuralRule, precision: int) -> str:
    """A neural rule's skip coefficients a_f (one line per feature) and the norm of its MLP parameters."""
    if rule.params is None:
        return rule.describe()
    width = max(8, *(len(f) for f in rule.features))
    lines = [f"{'feature':<{width}} {'a (skip)':>12}"]
    if rule.skip:
        lines += [f"{f:<{width}} {a:>12.{precision}g}" for f, a in zip(rule.features, rule.params["skip"].tolist())]
    norm = rule.mlp_norm()
    if norm is not None:
        lines.append(f"MLP {'-'.join(map(str, (rule.n_features, *rule.hidden, 1)))}: |psi| = {norm:.{precision}g}")
    return "\n".join(lines)


def coefficient_table(rule, intervals=None, precision: int = 4) -> str:
    """Plain-text coefficient table: term, locality, value (and 95% interval) per term and layer group."""
    if isinstance(rule, NeuralRule):
        return _neural_table(rule, precision)
    blocks = []
    for g, (layers, r) in enumerate(_groups(rule)):
        iv = _group_intervals(rule, intervals, g)
        width = max([8, *(len(n) for n in r.term_names())])
        lines = [
            f"{'term':<{width}} {'locality':<16} {'theta':>12}" + (f" {'95% interval':>26}" if iv is not None else "")
        ]
        values = r.values if r.values is not None else [float("nan")] * r.n_terms
        for i, (term, loc) in enumerate(zip(r.term_names(), r.locality())):
            line = f"{term:<{width}} {loc:<16} {values[i]:>12.{precision}g}"
            if iv is not None:
                line += f" {f'[{iv[i][0]:.{precision}g}, {iv[i][1]:.{precision}g}]':>26}"
            lines.append(line)
        blocks.append((_layers_label(layers) + "\n" if layers else "") + "\n".join(lines))
    return "\n\n".join(blocks)


def terms_table(rule) -> str:
    """The terms of a rule, pool or grammar: index, name, locality and LaTeX (``rulesearch terms``)."""
    rule = resolve_rule(rule)
    if isinstance(rule, NeuralRule):
        return rule.describe()
    from ..lang.export import expr_latex

    lines = []
    for layers, r in _groups(rule):
        width = max([4, *(len(n) for n in r.term_names())])
        if layers:
            lines.append(_layers_label(layers))
        lines.append(f"{'#':>3}  {'name':<{width}}  {'locality':<16}  LaTeX")
        for i, (t, loc) in enumerate(zip(r.terms, r.locality())):
            try:
                tex = expr_latex(t.expr)
            except (TypeError, NotImplementedError) as err:  # a printer gap must not hide the listing
                tex = f"{sp.sstr(t.expr)}  (no LaTeX: {type(err).__name__})"
            lines.append(f"{i:>3}  {t.name:<{width}}  {loc:<16}  {tex}")
    return "\n".join(lines)


def export_run(source, fmt: str = "latex", precision: int = 3) -> str:
    """A trained rule as ``latex``, ``json`` or ``markdown`` text, from a run directory (its ``rule.json``, or its
    newest checkpoint if the run is unfinished) or a rule JSON file."""
    fmts = ("latex", "json", "markdown")
    if fmt not in fmts:
        raise ConfigError(f"Unknown export format {fmt!r}; allowed: {', '.join(fmts)}.")
    path = Path(source)
    if path.is_dir() and not (path / "rule.json").is_file():
        search = RuleSearch.from_run(path)
        data = search.to_json()
    else:
        file = path / "rule.json" if path.is_dir() else path
        try:
            data = json.loads(file.read_text(encoding="utf-8"))
        except FileNotFoundError as err:
            raise RunDirectoryError(
                f"{str(file)!r} does not exist; expected a run directory or a rule JSON file."
            ) from err
    if fmt == "json":
        return json.dumps(data, indent=2)
    rule = load_rule(data)
    intervals = data.get("intervals")
    if intervals is not None and isinstance(rule, Rule):
        intervals = np.asarray(intervals, dtype=float)
    elif intervals is not None:
        intervals = [np.asarray(iv, dtype=float) for iv in intervals]
    fb_rule = load_feedback_rule(data)
    if fmt == "latex":
        return _with_feedback(rule_latex(rule, intervals, precision), fb_rule, "latex", precision)
    return _with_feedback(rule_markdown(rule, intervals, precision + 1), fb_rule, "markdown", precision + 1)


def _with_feedback(text: str, feedback_rule: Rule | None, fmt: str, precision: int) -> str:
    """``text`` followed by the plastic feedback rule (``dB_ji``, W's layout) as ``latex``, ``markdown``, ``table``
    or ``formula``; ``text`` itself without one."""
    if feedback_rule is None:
        return text
    if fmt == "formula":
        return f"{text}\nfeedback: dB_ji = {sp.sstr(feedback_rule.sympy().evalf(precision))}"
    if fmt == "latex":
        block = "% plastic feedback rule\n" + rule_latex(feedback_rule, None, precision).replace(
            r"\Delta W_{ij}", r"\Delta B_{ji}", 1
        )
    elif fmt == "markdown":
        block = "**feedback rule (plastic)**\n\n" + rule_markdown(feedback_rule, None, precision)
    else:
        block = "feedback rule (plastic)\n" + coefficient_table(feedback_rule, None, precision)
    return f"{text}\n\n{block}"


def _is_rule_file(spec: str) -> bool:
    return spec.endswith(".json") or os.path.sep in spec or Path(spec).is_file()


def _chunks(items: list, n: int) -> list[list]:
    return [items[i : i + n] for i in range(0, len(items), n)]


def _strip_values(data: dict) -> dict:
    data = dict(data)
    if "values" in data:
        data["values"] = None
    data.pop("runs", None)
    data.pop("intervals", None)
    if data.get("format") == NETWORK_RULE_FORMAT:
        data["groups"] = [{**g, "rule": {**g["rule"], "values": None}} for g in data["groups"]]
    return data


def _pseudo_gradient_term(rule: Rule) -> tuple[int, float] | None:
    """``(r, c)`` for the first term ``T^r = c * (-e_i x_j)`` of a linear rule, or None."""
    from ..lang.signals import err, pre

    for r, term in enumerate(rule.terms):
        ratio = sp.cancel(term.expr / (-err * pre))
        if ratio.is_number and ratio != 0:
            return r, float(ratio)
    return None


def _pseudo_gradient_lr(rule) -> float | None:
    """The learning rate ``c * theta_r`` of the rule's ``-e_i x_j`` term (mean over layer groups), if it has one; for
    a neural rule, minus its skip coefficient of the feature ``err*pre``."""
    if isinstance(rule, NeuralRule):
        ids = [i for i, f in enumerate(rule.features) if sorted(f.split("*")) == ["err", "pre"]]
        if not (rule.skip and ids and rule.params is not None):
            return None
        return -float(rule.params["skip"][..., ids[0]].double().mean())
    groups = [r for _, r in rule.groups] if isinstance(rule, NetworkRule) else [rule]
    vals = []
    for r in groups:
        found = _pseudo_gradient_term(r)
        if r.values is not None and found is not None:
            vals.append(found[1] * r.values[found[0]])
    return float(np.mean(vals)) if vals else None


MAIN_JOB: dict[str, Any] = {"meta": {"lr": 3e-4}}
"""Where the main job (``rulesearch discover``) departs from the paper's defaults (:class:`DiscoverConfig`):
Adam lr 3e-4 instead of 1e-3. On digits with feedback alignment, steps of 1e-3 on all ten pool coefficients
random-walk the large-scale terms (``(sum y) e x^T`` is 10-30x ``e x^T``) into divergence within ~20 meta-steps;
at 3e-4 the meta-accuracy of 100 meta-steps climbs from FA's level (~0.2) to about 0.8."""


def main_job_config(data: Mapping[str, Any] | None = None) -> DiscoverConfig:
    """The main job's config: :data:`MAIN_JOB` overridden by ``data`` (e.g. a config file's keys)."""

    def merge(base: Mapping, over: Mapping) -> dict:
        out = dict(base)
        for k, v in over.items():
            out[k] = merge(base[k], v) if isinstance(v, Mapping) and isinstance(base.get(k), Mapping) else v
        return out

    return DiscoverConfig.from_dict(merge(MAIN_JOB, data or {}))


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
