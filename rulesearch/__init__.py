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
from .lang.export import latex_table
from .lang.grammar import Grammar
from .lang.pools import PAPER_POOL, bio, ehebb, f0, named_rule, oja, pool
from .lang.rule import NetworkRule, Pool, Rule, Term
from .lang.signals import (
    Constant,
    Signal,
    bcm_threshold,
    bilinear,
    derived,
    err,
    fb,
    layer_mean,
    layer_sum,
    loss,
    mod,
    post,
    pre,
    pre_err,
    reward,
    reward_baseline,
    sanger,
    state,
    trace,
    w,
    wT,
    wv,
)

__version__ = "0.1.0"

# The compiler and the learning side (networks, tasks, inner loop, meta-training) are imported when first used:
# ``import rulesearch`` for writing rules loads SymPy but not torch or pandas.
_LAZY = {
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
