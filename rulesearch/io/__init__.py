"""Input and output: strict config dataclasses (:mod:`.config`), atomic run directories (:mod:`.runs`) and
bootstrap and Student-t statistics (:mod:`.stats`); figures are in :mod:`.plots` (imported on its own: it loads
matplotlib) and per-run window summaries of a history in :mod:`.summary` (imported on its own: it loads pandas)."""

from . import config, runs, stats
from .config import *  # noqa: F403
from .runs import *  # noqa: F403
from .stats import *  # noqa: F403

__all__ = [*config.__all__, *runs.__all__, *stats.__all__]
