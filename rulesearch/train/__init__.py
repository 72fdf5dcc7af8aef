"""Meta-training: configs, the problem assembly, learners, the optimizer, the trainer and the estimator.

The data path of a fit: :class:`DiscoverConfig` -> :class:`Problem` (dataset, sampler, network, learner) ->
:class:`Trainer` (meta-steps over :func:`rulesearch.inner.run_episodes`, an :class:`Objective`, Adam) ->
:class:`RuleSearch` (run directory, reports).
"""

from .configs import (
    DEFAULT_HIDDEN,
    MAIN_JOB,
    DiscoverConfig,
    MetaConfig,
    NetworkConfig,
    NeuralConfig,
    TaskConfig,
    main_job_config,
)
from .estimator import RuleSearch, discover
from .learners import Learner, LinearLearner, NeuralLearner, PlasticFeedback, make_learner
from .objective import Objective, QueryLoss
from .optim import adam_step
from .problem import Problem
from .report import coefficient_table, export_run, rule_latex, rule_markdown, terms_table
from .rules import (
    NETWORK_RULE_FORMAT,
    load_feedback_rule,
    load_rule,
    pseudo_gradient_lr,
    resolve_feedback_rule,
    resolve_rule,
    trained_rule_json,
)
from .runtime import process_group, resolve_device, threads
from .trainer import Trainer, TrainState

__all__ = [
    "DEFAULT_HIDDEN",
    "MAIN_JOB",
    "DiscoverConfig",
    "MetaConfig",
    "NetworkConfig",
    "NeuralConfig",
    "TaskConfig",
    "main_job_config",
    "RuleSearch",
    "discover",
    "Learner",
    "LinearLearner",
    "NeuralLearner",
    "PlasticFeedback",
    "make_learner",
    "Objective",
    "QueryLoss",
    "adam_step",
    "Problem",
    "coefficient_table",
    "export_run",
    "rule_latex",
    "rule_markdown",
    "terms_table",
    "NETWORK_RULE_FORMAT",
    "load_feedback_rule",
    "load_rule",
    "pseudo_gradient_lr",
    "resolve_feedback_rule",
    "resolve_rule",
    "trained_rule_json",
    "process_group",
    "resolve_device",
    "threads",
    "Trainer",
    "TrainState",
]
