"""Input and output: strict config dataclasses (:mod:`.config`), atomic run directories (:mod:`.runs`) and
bootstrap statistics (:mod:`.stats`); figures are in :mod:`.plots` (imported on its own: it loads matplotlib)."""

from . import config, runs, stats
from .config import *  # noqa: F403
from .runs import *  # noqa: F403
from .stats import *  # noqa: F403

__all__ = [*config.__all__, *runs.__all__, *stats.__all__]
