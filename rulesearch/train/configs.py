"""The configs of a discovery run: tasks, network, outer loop, neural rule, and the main job's defaults.

Each is a strict, frozen, serializable :class:`~rulesearch.io.config.Config`; :class:`DiscoverConfig` nests them and
is what ``rulesearch discover`` parses its options into and what a run directory's ``config.yaml`` holds.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch

from ..credit import PCNetwork
from ..errors import ConfigError
from ..io.config import Config, option
from ..networks.feedforward import ACTIVATIONS, FEEDBACK_MODES, INITS, LOSSES, Network
from ..neural import DEFAULT_FEATURES, NEURAL_ACTIVATIONS, NeuralRule
from ..tasks.data import DATASETS, Dataset, load_dataset, split_classes
from ..tasks.episodes import TaskSampler

__all__ = [
    "CREDITS",
    "DEFAULT_HIDDEN",
    "MAIN_JOB",
    "DiscoverConfig",
    "MetaConfig",
    "NetworkConfig",
    "NeuralConfig",
    "TaskConfig",
    "main_job_config",
]


CREDITS = ("feedback", "pc-fixedpred", "pc-strict")
"""Credit-assignment settings of the inner-loop network: its feedback pathway, or predictive-coding inference."""

DEFAULT_HIDDEN = (170, 130, 100, 70)
"""Hidden widths of the paper's network (Shervani-Tabar & Rosenbaum 2023)."""


_RULE_HELP = (
    "The rule to meta-learn: a named rule (pool, pool_f5mean, f0, ehebb, oja, bio), 'neural' (a NeuralRule, see the "
    "neural section), 'grammar:default' / 'grammar:classic' (every term of that grammar), or the path of a rule JSON "
    "file."
)


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
    credit: str = option(
        "feedback",
        help="Where the errors e_l come from: the feedback pathway ('feedback', see 'feedback') or predictive-coding "
        "inference through W^T, FixedPred ('pc-fixedpred') or Strict ('pc-strict'); see rulesearch.credit.PCNetwork.",
        choices=CREDITS,
    )
    pc_iters: int | None = option(
        None,
        help="Under a pc credit: inference iterations n (default: L + 1 for pc-fixedpred, which at pc_eta 1 gives "
        "backprop's errors e_L..e_0; 20 for pc-strict). FixedPred at eta 1 makes e_l exact for l >= L - n + 1 and "
        "leaves the lower ones at zero (n = L: every err exact, the first layer's pre_err e_0 zero).",
    )
    pc_eta: float | None = option(
        None, help="Under a pc credit: the belief step size eta (default 1.0 for pc-fixedpred, 0.1 for pc-strict)."
    )

    def __post_init__(self):
        super().__post_init__()
        if self.credit == "feedback":
            given = [k for k in ("pc_iters", "pc_eta") if getattr(self, k) is not None]
            if given:
                raise ConfigError(
                    f"Config key(s) {', '.join('network.' + k for k in given)} set, but network.credit is "
                    f"'feedback'; they apply to predictive coding only. Set network.credit to 'pc-fixedpred' or "
                    f"'pc-strict', or drop them."
                )
            return
        if self.feedback == "plastic":
            raise ConfigError(
                f"network.credit {self.credit!r} takes its errors from predictive-coding inference through W^T, so "
                f"network.feedback 'plastic' (a meta-learned feedback rule) would never be used; set network.feedback "
                f"to 'bp' or network.credit to 'feedback'."
            )
        if self.pc_iters is not None and self.pc_iters < 1:
            raise ConfigError(f"Config key 'network.pc_iters': received {self.pc_iters}, expected an integer >= 1.")
        if self.pc_eta is not None and not (math.isfinite(self.pc_eta) and self.pc_eta > 0):
            raise ConfigError(f"Config key 'network.pc_eta': received {self.pc_eta}, expected a finite number > 0.")

    def build(self, n_in: int, n_out: int) -> Network | PCNetwork:
        """The :class:`Network` for a dataset with ``n_in`` inputs and ``n_out`` outputs; under a ``pc-`` credit the
        :class:`~rulesearch.credit.PCNetwork` around it (with backprop's Jacobians, ``feedback='bp'``)."""
        sizes = self.sizes if self.sizes is not None else (n_in, *DEFAULT_HIDDEN, n_out)
        if sizes[0] != n_in or sizes[-1] != n_out:
            raise ConfigError(
                f"Config key 'network.sizes': received {list(sizes)}, but the task has {n_in} inputs and {n_out} "
                f"outputs; the sizes must start with {n_in} and end with {n_out} (e.g. "
                f"{[n_in, *DEFAULT_HIDDEN, n_out]})."
            )
        pc = self.credit != "feedback"
        net = Network(
            sizes=tuple(sizes),
            activation=self.activation,
            beta=self.beta,
            feedback="bp" if pc else self.feedback,
            loss=self.loss,
            init=self.init,
            gain=self.gain,
            feedback_gain=self.feedback_gain,
        )
        if not pc:
            return net
        inference = self.credit.removeprefix("pc-")
        strict = inference == "strict"
        eta = self.pc_eta if self.pc_eta is not None else (0.1 if strict else 1.0)
        n_iters = self.pc_iters if self.pc_iters is not None else (20 if strict else net.n_layers + 1)
        return PCNetwork(net, inference, eta=float(eta), n_iters=int(n_iters))


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
        help="How the inner loop computes the meta-gradient: 'auto' (the C kernel or else the fast adjoint path where "
        "they apply, else autograd), "
        "'adjoint', 'autograd', or 'native' (steps and adjoint in one C kernel: feedforward networks on the CPU, "
        "rules of outer products of post, err and pre, pre_err, W^T post, times layer sums or bilinear forms, such "
        "as the paper pool; 'auto' takes it where a C compiler builds it; see rulesearch.inner.run_episodes).",
        choices=("auto", "adjoint", "autograd", "native"),
    )
    chunk: int | None = option(
        None,
        help="Episodes per inner-loop call: each process runs its episodes of a meta-step in groups of at most this "
        "many, one group after the other (the same values up to rounding; on a CPU one group's weights stay in the "
        "cache). null: 8 on a CPU, all at once on a GPU.",
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
        help="Base learning rate of the f0 comparison; default: the learned coefficient of the rule's -e_i x_j term "
        "(theta0 if it has none).",
    )
    compare_tune: int = option(
        4,
        help="Tune f0's learning rate for each feedback mode over 0.1x, 0.3x, 1x, 3x and 10x the base rate on this "
        "many held-out episodes per run (meta-steps after the last one) before comparing; 0: use the base rate.",
    )

    def __post_init__(self):
        super().__post_init__()
        if self.compare_tune < 0:
            raise ConfigError(f"Config key 'meta.compare_tune' must be >= 0; received {self.compare_tune}.")
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
        if self.chunk is not None and self.chunk < 1:
            raise ConfigError(f"Config key 'meta.chunk' must be >= 1 or null; received {self.chunk}.")
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
