"""Tasks: datasets behind one registry, and episodes (the :class:`Task` contract; M-way K-shot
:class:`TaskSampler`), each episode a pure function of ``(seed, t, k)``."""

from .base import Task
from .data import (
    DATASETS,
    ClassSplit,
    Dataset,
    default_data_dir,
    load_dataset,
    make_lowrank,
    make_teacher,
    read_idx,
    split_classes,
)
from .episodes import EpisodeBatch, TaskSampler, episode_generator, episode_seed

__all__ = [
    "Task",
    "DATASETS",
    "ClassSplit",
    "Dataset",
    "default_data_dir",
    "load_dataset",
    "make_lowrank",
    "make_teacher",
    "read_idx",
    "split_classes",
    "EpisodeBatch",
    "TaskSampler",
    "episode_generator",
    "episode_seed",
]
