"""The rule language: typed signals and operators (:mod:`.signals`), terms, rules and pools (:mod:`.rule`),
grammars (:mod:`.grammar`), the paper's pool and named rules (:mod:`.pools`), and LaTeX / JSON / Markdown export
(:mod:`.export`)."""

from . import export, grammar, pools, rule, signals
from .export import *  # noqa: F403
from .grammar import *  # noqa: F403
from .pools import *  # noqa: F403
from .rule import *  # noqa: F403
from .signals import *  # noqa: F403

__all__ = [*signals.__all__, *rule.__all__, *grammar.__all__, *pools.__all__, *export.__all__]
