"""The one assembly of a learning problem: dataset -> sampler -> network -> learner -> episode batches.

Training, evaluation and distillation all build their inner loops from a :class:`Problem`.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from ..errors import ConfigError
from ..lang.rule import Rule
from ..networks.feedforward import Network, stack_episodes
from .configs import DiscoverConfig
from .learners import PlasticFeedback, make_learner
from .rules import resolve_feedback_rule
from .runtime import resolve_device

__all__ = []


class Problem:
    """Everything fixed for a fit: data, sampler, network, learner, seeds."""

    def __init__(self, cfg: DiscoverConfig, rule, device: torch.device | None = None):
        self.cfg = cfg
        meta = cfg.meta
        self.dataset = cfg.task.load()
        self.sampler = cfg.task.sampler(self.dataset, "train")
        self.net = cfg.network.build(self.dataset.n_features, self.sampler.n_outputs)
        self.rule = rule
        self.learner = make_learner(rule, self.net.n_layers, meta)
        feedback_rule = self._feedback_rule()
        if feedback_rule is not None:
            self.learner = PlasticFeedback(self.learner, feedback_rule, meta)
        self.update = self.learner.update(self.net)
        self._check_signals()
        self.dtype = meta.torch_dtype
        self.device = resolve_device(meta.device) if device is None else device
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
        if not isinstance(self.learner, PlasticFeedback):
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
