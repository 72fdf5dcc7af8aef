"""rulesearch: discover biologically plausible synaptic plasticity rules.

The data path: grammar -> rule -> compiled update -> inner loop -> meta-loss -> rule -> distilled formula -> LaTeX.
"""

from ._lazy import lazy_exports
from .errors import (
    BackendUnavailableError,
    ConfigError,
    DatasetError,
    DivergenceError,
    InvalidRuleError,
    NotFittedError,
    RuleSearchError,
    RunDirectoryError,
    ShapeError,
    SignalError,
    UnsupportedNodeError,
)

__version__ = "0.1.0"

# Every name is imported from its submodule when first used: ``import rulesearch`` loads neither SymPy nor torch (the
# command line's ``--help`` stays quick); the rule language (``post``, ``Rule``, ...) loads SymPy, the compiler and
# the learning side (networks, tasks, inner loop, meta-training) torch.
_LAZY = {
    **dict.fromkeys(("Signal", "Constant", "pre", "post", "err", "pre_err", "w", "fb", "mod", "reward", "loss",
                     "derived", "state", "trace", "bcm_threshold", "reward_baseline", "wT", "wv", "layer_sum",
                     "layer_mean", "bilinear", "sanger"), "lang.signals"),
    **dict.fromkeys(("Term", "Rule", "Pool", "NetworkRule"), "lang.rule"),
    **dict.fromkeys(("PAPER_POOL", "pool", "f0", "ehebb", "oja", "bio", "named_rule"), "lang.pools"),
    "Grammar": "lang.grammar", "latex_table": "lang.export",
    "compile_rule": "compile", "CompiledRule": "compile", "RuleModule": "compile",
    "RuleSearch": "train", "discover": "train", "DiscoverConfig": "train", "MetaConfig": "train",
    "TaskConfig": "train", "NetworkConfig": "train", "NeuralConfig": "train", "Problem": "train", "Trainer": "train",
    "Learner": "train", "Objective": "train", "QueryLoss": "train",
    "Network": "networks", "LayeredNetwork": "networks", "AdjointNetwork": "networks",
    "Task": "tasks", "run_episodes": "inner", "InnerResult": "inner",
}  # fmt: skip


__getattr__, __dir__ = lazy_exports(__name__, globals(), _LAZY)


__all__ = [
    "__version__",
    # signals and operators
    "Signal", "Constant", "pre", "post", "err", "pre_err", "w", "fb", "mod", "reward", "loss",
    "derived", "state", "trace", "bcm_threshold", "reward_baseline", "wT", "wv", "layer_sum", "layer_mean", "bilinear",
    "sanger",
    # rules
    "Term", "Rule", "Pool", "NetworkRule", "Grammar", "PAPER_POOL", "pool", "f0", "ehebb", "oja", "bio",
    "named_rule", "latex_table",
    # compiler
    "compile_rule", "CompiledRule", "RuleModule",
    # learning settings and meta-training (imported on first use)
    "RuleSearch", "discover", "DiscoverConfig", "MetaConfig", "TaskConfig", "NetworkConfig", "NeuralConfig",
    "Problem", "Trainer", "Learner", "Objective", "QueryLoss", "Network", "LayeredNetwork", "AdjointNetwork",
    "Task", "run_episodes", "InnerResult",
    # errors
    "RuleSearchError", "InvalidRuleError", "UnsupportedNodeError", "SignalError", "ShapeError", "ConfigError",
    "DatasetError", "DivergenceError", "BackendUnavailableError", "NotFittedError", "RunDirectoryError",
]  # fmt: skip
