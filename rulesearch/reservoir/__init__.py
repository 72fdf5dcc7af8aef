"""Reward-modulated reservoir learning (Pyle & Rosenbaum 2019): a chaotic rate reservoir drawing motor trajectories,
an exploratory pathway trained by a compiled reward-modulated rule of the toolkit, a mastery pathway trained by
recursive least squares, and the FORCE and RMHL baselines. See ``docs/reservoir.md``."""

from .loop import (
    DIVERGENCE_BOUND,
    RESERVOIR_SIGNALS,
    Exploration,
    Force,
    Learning,
    Mastery,
    ReservoirResult,
    paper_learning,
    run_reservoir,
)
from .model import NoiseStream, Reservoir, ReservoirParams, recurrent_input, recurrent_matvec, reservoir_step
from .rls import SymmetricRLS, rls_delta, rls_gain_, rls_init, rls_solve
from .rules import MODULATORS, hoerzer_rmhl, modulator_family, node_perturbation
from .tasks import TASKS, Arm, MotorTask, butterfly, get_task

__all__ = [
    "Reservoir",
    "ReservoirParams",
    "NoiseStream",
    "recurrent_input",
    "recurrent_matvec",
    "reservoir_step",
    "rls_init",
    "rls_gain_",
    "rls_delta",
    "rls_solve",
    "SymmetricRLS",
    "node_perturbation",
    "hoerzer_rmhl",
    "modulator_family",
    "MODULATORS",
    "butterfly",
    "Arm",
    "MotorTask",
    "TASKS",
    "get_task",
    "Exploration",
    "Mastery",
    "Force",
    "Learning",
    "ReservoirResult",
    "paper_learning",
    "run_reservoir",
    "RESERVOIR_SIGNALS",
    "DIVERGENCE_BOUND",
]
