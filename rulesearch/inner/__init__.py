"""The online inner loop: a plan of the signals, the autograd step, the fast path with its hand-written adjoint, the
same as one C kernel (``method="native"``), and baselines. :func:`run_episodes` is the entry point."""

from .baselines import F0, KolenPollack, baselines, f0, kolen_pollack, run_baseline
from .loop import METHODS, InnerResult, run_episodes
from .plan import REWARDS, SIGNALS

__all__ = [
    "SIGNALS",
    "REWARDS",
    "InnerResult",
    "run_episodes",
    "METHODS",
    "F0",
    "f0",
    "KolenPollack",
    "kolen_pollack",
    "run_baseline",
    "baselines",
]
