"""Meta-training: configs, the problem assembly, learners, the optimizer, the trainer and the estimator.

The data path of a fit: :class:`DiscoverConfig` -> :class:`Problem` (dataset, sampler, network, learner) ->
:class:`Trainer` (meta-steps over :func:`rulesearch.inner.run_episodes`, an :class:`Objective`, Adam) ->
:class:`RuleSearch` (run directory, reports).

Each name is imported from its module when first used: the reports and rule files (``rulesearch terms``,
``rulesearch export``) load neither torch nor the trainer.
"""

from .._lazy import lazy_exports

_LAZY = {
    **dict.fromkeys(
        ("DEFAULT_HIDDEN", "MAIN_JOB", "DiscoverConfig", "MetaConfig", "NetworkConfig", "NeuralConfig", "TaskConfig",
         "main_job_config"),
        "configs",
    ),
    **dict.fromkeys(("RuleSearch", "discover"), "estimator"),
    **dict.fromkeys(("Learner", "LinearLearner", "NeuralLearner", "PlasticFeedback", "make_learner"), "learners"),
    **dict.fromkeys(("Objective", "QueryLoss"), "objective"),
    "adam_step": "optim",
    "Problem": "problem",
    **dict.fromkeys(("coefficient_table", "export_run", "rule_latex", "rule_markdown", "terms_table"), "report"),
    **dict.fromkeys(
        ("NETWORK_RULE_FORMAT", "load_feedback_rule", "load_rule", "pseudo_gradient_lr", "resolve_feedback_rule",
         "resolve_rule", "trained_rule_json"),
        "rules",
    ),
    **dict.fromkeys(("process_group", "resolve_device", "threads"), "runtime"),
    **dict.fromkeys(("Trainer", "TrainState"), "trainer"),
}  # fmt: skip


__getattr__, __dir__ = lazy_exports(__name__, globals(), _LAZY)


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
