"""The one assembly of a learning problem: dataset -> sampler -> network -> learner -> episode batches.

Training (:class:`~rulesearch.train.Trainer`), evaluation (:func:`rulesearch.evaluate.evaluate`) and distillation
(:func:`rulesearch.distill.distill_run`) all build their inner loops from a :class:`Problem`. Its parts are made when
first needed: the learner needs only the number of layers, so reading a finished run's parameters
(:meth:`RuleSearch.from_run`) reads no data; the network needs the dataset only where its sizes are not known.
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import cached_property

import torch

from ..errors import ConfigError, SignalError
from ..lang.rule import Rule
from ..networks.base import LayeredNetwork
from ..networks.feedforward import stack_episodes
from ..tasks.base import Task
from ..tasks.data import Dataset
from .configs import DiscoverConfig, MetaConfig, NetworkConfig, TaskConfig
from .learners import PlasticFeedback, make_learner
from .rules import resolve_feedback_rule
from .runtime import resolve_device

__all__ = ["Problem"]

SIDES = ("train", "test")


class Problem:
    """Everything fixed for a fit, an evaluation or a distillation: data, sampler, network, learner, seeds.

    Parameters
    ----------
    cfg : DiscoverConfig
        Task, network and meta config (``meta.dtype``, ``meta.device``, ``meta.seed``, ``meta.runs`` and
        ``meta.meta_batch`` set :attr:`dtype`, :attr:`device`, :attr:`seeds` and :attr:`B`).
    rule : optional
        The rule to meta-learn (a resolved rule, see :func:`resolve_rule`, or a :class:`Learner` instance); sets
        :attr:`learner` (None without a rule: evaluation and distillation run trained rules with their own
        parameters).
    device : torch.device, optional
        Overrides ``meta.device`` (already resolved, e.g. a data-parallel rank's device).
    side : {'train', 'test'}
        Which side of the task's class split episodes draw from ('test': the held-out classes).
    dataset : Dataset, optional
        The dataset, if already loaded (default: ``cfg.task.load()`` when first needed).
    sizes : sequence of int, optional
        The network's resolved layer widths when ``network.sizes`` is None (e.g. from a run's manifest), so that
        the network is built without reading the data.
    task : Task, optional
        A task of one's own (any :class:`~rulesearch.tasks.Task`) instead of ``cfg.task``'s sampler.
    network : LayeredNetwork, optional
        A network of one's own (any :class:`~rulesearch.networks.LayeredNetwork`) instead of ``cfg.network``'s.

    Attributes
    ----------
    dataset, sampler, net, update :
        Made when first used; ``net`` reads the dataset only when the sizes are not known, and configured sizes
        are checked against the data as soon as it is loaded.
    learner : Learner or None
    dtype, device, seeds, B :
        Floating-point type, device, the seed of every run and the episodes per meta-step and run.
    """

    def __init__(
        self,
        cfg: DiscoverConfig,
        rule=None,
        device: torch.device | None = None,
        *,
        side: str = "train",
        dataset: Dataset | None = None,
        sizes: Sequence[int] | None = None,
        task: Task | None = None,
        network: LayeredNetwork | None = None,
    ):
        if side not in SIDES:
            raise ConfigError(f"Problem side must be one of {SIDES} ('test': the held-out classes); received {side!r}.")
        self.cfg = cfg
        self.rule = rule
        self.side = side
        meta = cfg.meta
        self.dtype = meta.torch_dtype
        self.device = resolve_device(meta.device) if device is None else device
        self.seeds = [meta.seed + s for s in range(meta.runs)]
        self.B = meta.meta_batch
        self._sizes = tuple(sizes) if sizes is not None and cfg.network.sizes is None else cfg.network.sizes
        if dataset is not None:
            self.__dict__["dataset"] = dataset
        if task is not None:  # a task or network object of one's own replaces the configured one
            self.__dict__["sampler"] = task
        if network is not None:
            self.__dict__["net"] = network
        self.learner = None
        if rule is not None:
            self.learner = make_learner(rule, self.n_layers, meta)
            feedback_rule = self.feedback_rule()
            if feedback_rule is not None:
                self.learner = PlasticFeedback(self.learner, feedback_rule, meta)

    @classmethod
    def of(
        cls,
        task: TaskConfig,
        network: NetworkConfig,
        *,
        side: str = "train",
        dtype: str = "float32",
        device: str | torch.device = "cpu",
        rule=None,
        dataset: Dataset | None = None,
    ) -> Problem:
        """A problem from its task and network alone (evaluation, distillation): one run, seed 0."""
        meta = MetaConfig(dtype=dtype, device=str(device))
        return cls(DiscoverConfig(task=task, network=network, meta=meta), rule, side=side, dataset=dataset)

    # ---- the data and the network, made when first needed ------------------------------------------------
    @cached_property
    def dataset(self) -> Dataset:
        """The task's dataset (loaded, or generated, on first use)."""
        return self.cfg.task.load()

    @cached_property
    def sampler(self) -> Task:
        """Episodes of the task on :attr:`side` of its class split."""
        sampler = self.cfg.task.sampler(self.dataset, self.side)
        if "net" in self.__dict__:  # the network was sized without the data: check it now
            self.cfg.network.replace(sizes=self.net.sizes).build(self.dataset.n_features, sampler.n_outputs)
        return sampler

    @cached_property
    def net(self) -> LayeredNetwork:
        """The network: from the known sizes without reading the data, else sized by the dataset."""
        if self._sizes is None or "dataset" in self.__dict__ or "sampler" in self.__dict__:
            return self.cfg.network.build(self.sampler.n_inputs, self.sampler.n_outputs)
        return self.cfg.network.replace(sizes=self._sizes).build(self._sizes[0], self._sizes[-1])

    def load(self) -> Problem:
        """Read the data now (the dataset and its class split), so that their errors come before any other; the
        network is then sized and checked by the data. Returns ``self``."""
        _ = self.sampler
        return self

    @property
    def n_layers(self) -> int:
        """Weight layers of the network; known without the data (the default widths around the data's input and
        output sizes are fixed)."""
        if "net" in self.__dict__:
            return self.net.n_layers
        if self._sizes is not None:
            return len(self._sizes) - 1
        return len(self.cfg.network.build(1, 1).sizes) - 1

    @cached_property
    def update(self):
        """The learner's update object(s) for :func:`~rulesearch.inner.run_episodes`."""
        if self.learner is None:
            raise ConfigError("This Problem has no rule to meta-learn (constructed without one), hence no update.")
        update = self.learner.update(self.net)
        self._check_signals(update)
        return update

    def _check_signals(self, update):
        ups = update if isinstance(update, list) else [update] * self.n_layers
        try:
            self.net.check_needs([frozenset(u.needs) for u in ups])
        except SignalError as err:  # a configuration error here: the network cannot give the rule's signals
            raise ConfigError(str(err)) from err

    def feedback_rule(self) -> Rule | None:
        """The plastic feedback rule (``network.feedback_rule``, default ``kp``); None for other feedback modes,
        where setting one (or ``meta.feedback_init``) is an error."""
        net, meta = self.cfg.network, self.cfg.meta
        spec = net.feedback_rule_json if net.feedback_rule_json is not None else net.feedback_rule
        if net.feedback == "plastic":
            return resolve_feedback_rule(spec)
        given = [k for k, v in (("network.feedback_rule", spec), ("meta.feedback_init", meta.feedback_init)) if v]
        if given:
            raise ConfigError(
                f"Config key(s) {', '.join(given)} set, but network.feedback is {net.feedback!r}: a feedback "
                f"rule applies to network.feedback 'plastic' only. Set network.feedback to 'plastic' or drop them."
            )
        return None

    # ---- episode batches ----------------------------------------------------------------------------------
    def batch(self, items, net: LayeredNetwork | None = None):
        """Episodes ``(seed, t, k)`` for ``k in ks`` of every ``(seed, t, ks)`` in ``items`` as one batch (rows in
        that order): ``(batch, weights, feedback)`` for :func:`~rulesearch.inner.run_episodes`, in :attr:`dtype`
        on :attr:`device`; ``net`` (default :attr:`net`) draws the initial weights."""
        return stack_episodes(self.sampler, net or self.net, items, self.dtype, self.device)

    def episodes(
        self,
        t: int | Sequence[int],
        runs: Sequence[int],
        net: LayeredNetwork | None = None,
        ks: Sequence[Sequence[int]] | None = None,
    ):
        """The batch and initial weights/feedback of the episodes ``(seed_s, t, k)`` for ``s in runs``, ``k < B``
        (rows ordered by step, then run, then k); ``t`` may be a list of meta-steps, ``ks`` the episode indices of
        each run (a data-parallel rank's share)."""
        ks = [range(self.B)] * len(runs) if ks is None else ks
        items = [(self.seeds[s], tt, kk) for tt in ([t] if isinstance(t, int) else t) for s, kk in zip(runs, ks)]
        return self.batch(items, net)
